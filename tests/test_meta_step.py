"""Tests for samgria.meta.step: meta_step / MetaStep against hand-written reference loops."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from samgria.meta.anil import ANIL
from samgria.meta.inner_optim import InnerSAM, MomentumInnerStep
from samgria.meta.maml import FOMAML, MAML
from samgria.meta.metasgd import MetaSGD
from samgria.meta.reptile import Reptile
from samgria.meta.step import MetaStep, meta_step

DT = torch.float64


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)


def make_tasks(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xs, xq = torch.randn(4, 2, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT)
        w = torch.randn(2, 1, generator=g, dtype=DT)
        out.append(((xs, xs @ w), (xq, xq @ w)))
    return out


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def adapt_ref(model, params, x, y, lr, steps, first_order=False, reg=None, momentum=None):
    """Hand-written inner loop with torch.func.functional_call (independent of samgria)."""
    fast = dict(params)
    buf = {}
    for _ in range(steps):
        loss = F.mse_loss(functional_call(model, fast, (x,)), y)
        if reg is not None:
            loss = loss + reg * sum(((fast[n] - params[n]) ** 2).sum() for n in fast) / 2
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
        new = {}
        for (n, p), g in zip(fast.items(), grads):
            if momentum is not None:
                buf[n] = g if n not in buf else momentum * buf[n] + g
                g = buf[n]
            new[n] = p - lr * g
        fast = new
    return fast


def maml_ref_grads(model, tasks, weights, lr, steps, first_order=False, **kw):
    params = dict(model.named_parameters())
    total = sum(weights)
    meta_loss = sum(
        w * F.mse_loss(functional_call(model, adapt_ref(model, params, xs, ys, lr, steps, first_order, **kw), (xq,)), yq)
        for ((xs, ys), (xq, yq)), w in zip(tasks, weights)
    ) / total
    return torch.autograd.grad(meta_loss, list(params.values())), meta_loss.detach()


@pytest.mark.parametrize("first_order", [False, True])
def test_weighted_maml_update_matches_reference(first_order):
    model = make_model()
    tasks, weights = make_tasks(3), [1.0, 3.0, 0.5]
    grads, ref_loss = maml_ref_grads(model, tasks, weights, lr=0.1, steps=2, first_order=first_order)
    before = snapshot(model)
    meta = MAML(model, torch.optim.SGD, lr=1.0, inner_lr=0.1, inner_steps=2, first_order=first_order)
    with meta_step(meta, loss_fn=F.mse_loss) as ms:
        for (support, query), w in zip(tasks, weights):
            ms.task(support=support, query=query, weight=w)
    for p, p0, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ms.loss, ref_loss)
    assert ms.losses == [] and ms.weights == []  # reset for the next meta-update


def test_returned_loss_is_detached_post_adaptation_query_loss():
    model = make_model()
    (support, query), = make_tasks(1)
    meta = MAML(model, torch.optim.SGD, lr=0.0, inner_lr=0.1, inner_steps=3)
    fast = adapt_ref(model, dict(model.named_parameters()), *support, lr=0.1, steps=3)
    expected = F.mse_loss(functional_call(model, fast, (query[0],)), query[1])
    with meta_step(meta, loss_fn=F.mse_loss) as ms:
        loss = ms.task(support, query)
        assert not loss.requires_grad
        torch.testing.assert_close(loss, expected.detach())


def test_zero_weight_task_is_excluded_and_uniform_weights_give_the_mean():
    tasks = make_tasks(3)
    a, b = make_model(), make_model()
    meta_a = MAML(a, torch.optim.SGD, lr=0.5, inner_lr=0.1)
    meta_b = MAML(b, torch.optim.SGD, lr=0.5, inner_lr=0.1)
    with meta_step(meta_a, loss_fn=F.mse_loss) as ms:
        for (s, q), w in zip(tasks, [2.0, 0.0, 2.0]):
            ms.task(s, q, weight=w)
    with meta_step(meta_b, loss_fn=F.mse_loss) as ms:
        ms.task(*tasks[0])
        ms.task(*tasks[2])
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [MAML, Reptile])
def test_a_zero_weight_task_with_a_nan_loss_neither_skips_nor_changes_the_step(cls):
    (good, good_query), (bad, bad_query) = make_tasks(2)
    nan = float("nan")
    bad, bad_query = (bad[0], torch.full_like(bad[1], nan)), (bad_query[0], torch.full_like(bad_query[1], nan))
    both, alone = make_model(), make_model()
    meta_both = cls(both, torch.optim.SGD, lr=0.5, inner_lr=0.1, inner_steps=2)
    meta_alone = cls(alone, torch.optim.SGD, lr=0.5, inner_lr=0.1, inner_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "meta-loss is nan" skip
        with meta_step(meta_both, loss_fn=F.mse_loss) as ms_both:
            ms_both.task(good, good_query, weight=1.0)
            assert torch.isnan(ms_both.task(bad, bad_query, weight=0.0))
    with meta_step(meta_alone, loss_fn=F.mse_loss) as ms_alone:
        ms_alone.task(good, good_query)
    assert meta_both.skipped_steps == meta_alone.skipped_steps == 0
    assert not torch.equal(next(both.parameters()), next(make_model().parameters()))  # it stepped
    assert torch.equal(ms_both.loss, ms_alone.loss)
    for p, q in zip(both.parameters(), alone.parameters()):
        assert torch.equal(p, q)


def test_per_task_inner_steps_override():
    model = make_model()
    (support, query), = make_tasks(1)
    meta = MAML(model, torch.optim.SGD, lr=0.0, inner_lr=0.1, inner_steps=5)
    with meta_step(meta, loss_fn=F.mse_loss, inner_steps=2) as ms:
        no_adapt = ms.task(support, query, inner_steps=0)
        two = ms.task(support, query)
    torch.testing.assert_close(no_adapt, F.mse_loss(model(query[0]), query[1]).detach())
    fast = adapt_ref(model, dict(model.named_parameters()), *support, lr=0.1, steps=2)
    torch.testing.assert_close(two, F.mse_loss(functional_call(model, fast, (query[0],)), query[1]).detach())


def test_inner_regularisation_and_momentum_step_fn_match_reference():
    model = make_model()
    tasks = make_tasks(2)
    reg = 0.7

    def inner_reg_fn(current, base):
        return reg * sum(((current[n] - base[n]) ** 2).sum() for n in current) / 2

    grads, _ = maml_ref_grads(model, tasks, [1.0, 1.0], lr=0.1, steps=3, reg=reg, momentum=0.9)
    plain, _ = maml_ref_grads(model, tasks, [1.0, 1.0], lr=0.1, steps=3)
    assert not torch.allclose(grads[0], plain[0])  # the options change the meta-gradient
    before = snapshot(model)
    meta = MAML(model, torch.optim.SGD, lr=1.0, inner_lr=0.1, inner_steps=3)
    with meta_step(meta, loss_fn=F.mse_loss, inner_reg_fn=inner_reg_fn, inner_step_fn=MomentumInnerStep(0.9)) as ms:
        for s, q in tasks:
            ms.task(s, q)
    for p, p0, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - g, rtol=1e-10, atol=1e-12)


def test_grad_transforms_match_the_closure_api():
    tasks = make_tasks(2)
    a, b = make_model(), make_model()
    meta_a = MAML(a, torch.optim.SGD, lr=1.0, inner_lr=0.1, inner_steps=2)
    meta_b = MAML(b, torch.optim.SGD, lr=1.0, inner_lr=0.1, inner_steps=2)
    with meta_step(meta_a, loss_fn=F.mse_loss) as ms:
        ms.task(*tasks[0], grad_transforms=[InnerSAM(rho=0.05)])
        ms.task(*tasks[1], weight=2.0)

    def closure():
        meta_b.zero_grad()
        losses = []
        for (xs, ys), (xq, yq), transforms in ((*tasks[0], [InnerSAM(rho=0.05)]), (*tasks[1], None)):
            learner = meta_b.adapt(lambda f: F.mse_loss(f(xs), ys), grad_transforms=transforms)
            losses.append(F.mse_loss(learner(xq), yq))
        loss = meta_b.meta_loss(losses, [1.0, 2.0])
        loss.backward()
        return loss

    meta_b.step(closure)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)
    # InnerSAM made a difference: compare with plain MAML on the same tasks.
    c = make_model()
    meta_c = MAML(c, torch.optim.SGD, lr=1.0, inner_lr=0.1, inner_steps=2)
    with meta_step(meta_c, loss_fn=F.mse_loss) as ms:
        ms.task(*tasks[0])
        ms.task(*tasks[1], weight=2.0)
    assert not torch.allclose(next(a.parameters()), next(c.parameters()))


@pytest.mark.parametrize("cls", [MetaSGD, ANIL, FOMAML])
def test_other_maml_family_match_the_closure_api(cls):
    tasks, weights = make_tasks(3), [1.0, 2.0, 0.25]

    def build(model):
        kwargs = {"head": model[2]} if cls is ANIL else {}
        return cls(model, torch.optim.SGD, lr=0.5, inner_lr=0.1, inner_steps=2, **kwargs)

    a, b = make_model(), make_model()
    meta_a, meta_b = build(a), build(b)
    with meta_step(meta_a, loss_fn=F.mse_loss) as ms:
        for (s, q), w in zip(tasks, weights):
            ms.task(s, q, weight=w)

    def closure():
        meta_b.zero_grad()
        losses = []
        for (xs, ys), (xq, yq) in tasks:
            learner = meta_b.adapt(lambda f: F.mse_loss(f(xs), ys))
            losses.append(F.mse_loss(learner(xq), yq))
        loss = meta_b.meta_loss(losses, weights)
        loss.backward()
        return loss

    meta_b.step(closure)
    for pa, pb in zip(meta_a.param_groups, meta_b.param_groups):
        for x, y in zip(pa["params"], pb["params"]):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    if cls is MetaSGD:  # the rates moved, i.e. they received (scaled) gradients
        assert not torch.allclose(meta_a.inner_lrs["0.weight"], torch.full_like(meta_a.inner_lrs["0.weight"], 0.1))


def test_weighted_reptile_matches_interpolation_formula():
    model = make_model()
    tasks, weights = make_tasks(3), [1.0, 3.0, 0.5]
    params = dict(model.named_parameters())
    adapted = [adapt_ref(model, params, xs, ys, lr=0.1, steps=3, first_order=True) for (xs, ys), _ in tasks]
    total = sum(weights)
    beta = 0.5
    expected = {
        n: (p + beta * (sum(w * a[n] for a, w in zip(adapted, weights)) / total - p)).detach()
        for n, p in params.items()
    }
    meta = Reptile(model, torch.optim.SGD, lr=beta, inner_lr=0.1, inner_steps=3)
    with meta_step(meta, loss_fn=F.mse_loss) as ms:
        for ((xs, ys), query), w in zip(tasks, weights):
            ms.task(support=(xs, ys), weight=w)  # Reptile needs no query set
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-10, atol=1e-12)
    assert meta.num_recorded == 0


class TwiceEvaluating(torch.optim.Optimizer):
    """A SAM-like outer optimizer: evaluate at w, again at w + delta, descend with the second grads."""

    def __init__(self, params, lr, delta):
        super().__init__(params, {"lr": lr})
        self.delta = delta

    @torch.no_grad()
    def step(self, closure):
        with torch.enable_grad():
            loss = closure()
        params = [p for g in self.param_groups for p in g["params"]]
        for p in params:
            p.add_(self.delta)
        with torch.enable_grad():
            closure()
        for p in params:
            p.sub_(self.delta)
            p.add_(p.grad, alpha=-self.param_groups[0]["lr"])
        return loss


def test_outer_optimizer_that_reevaluates_the_closure_gets_gradients_at_its_point():
    model = make_model()
    tasks, weights = make_tasks(2), [1.0, 2.0]
    shifted = make_model()
    with torch.no_grad():
        for p in shifted.parameters():
            p.add_(0.01)
    grads, _ = maml_ref_grads(shifted, tasks, weights, lr=0.1, steps=1)
    before = snapshot(model)
    meta = MAML(model, TwiceEvaluating(model.parameters(), lr=1.0, delta=0.01), inner_lr=0.1)
    with meta_step(meta, loss_fn=F.mse_loss) as ms:
        for (s, q), w in zip(tasks, weights):
            ms.task(s, q, weight=w)
    for p, p0, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - g, rtol=1e-9, atol=1e-12)


def test_reptile_with_reevaluating_outer_uses_the_second_evaluation():
    model = make_model()
    tasks = make_tasks(2)
    delta, lr = 0.01, 0.5
    shifted = make_model()
    with torch.no_grad():
        for p in shifted.parameters():
            p.add_(delta)
    params = dict(shifted.named_parameters())
    adapted = [adapt_ref(shifted, params, xs, ys, lr=0.1, steps=2, first_order=True) for (xs, ys), _ in tasks]
    before = dict((n, p.detach().clone()) for n, p in model.named_parameters())
    meta = Reptile(model, TwiceEvaluating(model.parameters(), lr=lr, delta=delta), inner_lr=0.1, inner_steps=2)
    with meta_step(meta, loss_fn=F.mse_loss) as ms:
        for s, q in tasks:
            ms.task(s, q)
    for n, p in model.named_parameters():
        pseudo = params[n] - (adapted[0][n] + adapted[1][n]) / 2
        torch.testing.assert_close(p.detach(), (before[n] - lr * pseudo).detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [MAML, Reptile])
def test_exception_in_block_applies_nothing_and_leaves_no_state(cls):
    model = make_model()
    tasks = make_tasks(2)
    before = snapshot(model)
    meta = cls(model, torch.optim.SGD, lr=1.0, inner_lr=0.1)
    with pytest.raises(RuntimeError, match="user error"):
        with meta_step(meta, loss_fn=F.mse_loss) as ms:
            ms.task(*tasks[0])
            raise RuntimeError("user error")
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0) and p.grad is None
    # The next meta-update with the same builder is unaffected by the aborted one.
    with ms:
        ms.task(*tasks[1])
    reference = make_model()
    ref_meta = cls(reference, torch.optim.SGD, lr=1.0, inner_lr=0.1)
    with meta_step(ref_meta, loss_fn=F.mse_loss) as ms:
        ms.task(*tasks[1])
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_failing_loss_fn_leaves_model_unchanged():
    model = make_model()
    (support, query), = make_tasks(1)
    before = snapshot(model)
    meta = MAML(model, torch.optim.SGD, lr=1.0)
    with pytest.raises(ValueError, match=r"^the query loss of task 1 must be a scalar tensor, got shape \(6, 1\)$"):
        with meta_step(meta, loss_fn=lambda p, t: F.mse_loss(p, t) if p.shape[0] == 4 else (p - t) ** 2) as ms:
            ms.task(support, support)
            ms.task(support, query)
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0) and p.grad is None


class FailingOuter(torch.optim.SGD):
    """Evaluates the closure, then fails before updating anything."""

    def step(self, closure=None):
        closure()
        raise RuntimeError("outer failed")


def test_failing_outer_step_resets_gradients_and_leaves_model_unchanged():
    model = make_model()
    (support, query), = make_tasks(1)
    before = snapshot(model)
    meta = MAML(model, FailingOuter(model.parameters(), lr=1.0))
    ms = meta_step(meta, loss_fn=F.mse_loss)
    with pytest.raises(RuntimeError, match="outer failed"):
        with ms:
            ms.task(support, query)
            assert all(p.grad is not None for p in model.parameters())
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0) and p.grad is None
    assert ms.losses == [] and ms.loss is None


def test_all_zero_weights_and_no_tasks_are_errors_and_apply_nothing():
    model = make_model()
    (support, query), = make_tasks(1)
    before = snapshot(model)
    meta = MAML(model, torch.optim.SGD, lr=1.0)
    with pytest.raises(ValueError, match=r"no task was added to the meta-step"):
        with meta_step(meta, loss_fn=F.mse_loss):
            pass
    with pytest.raises(ValueError, match=r"task weights must not all be 0, got \[0.0, 0.0\]"):
        with meta_step(meta, loss_fn=F.mse_loss) as ms:
            ms.task(support, query, weight=0.0)
            ms.task(support, query, weight=0)
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0) and p.grad is None


def test_builder_without_with_block_and_step_inside_block():
    tasks = make_tasks(2)
    a, b = make_model(), make_model()
    ms = MetaStep(MAML(a, torch.optim.SGD, lr=0.3), loss_fn=F.mse_loss)
    ms.task(*tasks[0])
    loss_a = ms.step()
    meta_b = MAML(b, torch.optim.SGD, lr=0.3)
    with meta_step(meta_b, loss_fn=F.mse_loss) as ms_b:
        ms_b.task(*tasks[0])
        loss_b = ms_b.step()  # exiting afterwards must not step again nor raise
    torch.testing.assert_close(loss_a, loss_b)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_nested_use_is_rejected():
    ms = meta_step(MAML(make_model(), torch.optim.SGD, lr=0.1), loss_fn=F.mse_loss)
    with pytest.raises(RuntimeError, match="already in use"):
        with ms:
            with ms:
                pass


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda ms, s, q: ms.task(s), ValueError, r"query is required for MAML"),
        (lambda ms, s, q: ms.task(s[0], q), TypeError, r"support must be an \(inputs, targets\) pair, got Tensor"),
        (lambda ms, s, q: ms.task(s, (q[0],)), TypeError, r"query must be an \(inputs, targets\) pair, got tuple"),
        # The loss of an empty query batch is nan: the meta-step was skipped with a warning.
        (lambda ms, s, q: ms.task(s, (q[0][:0], q[1][:0])), ValueError, r"query has no examples \(inputs of shape \(0, 2\)\): MAML's meta-loss"),
        (lambda ms, s, q: ms.task(s, q, weight=-1.0), ValueError, r"weight must be a finite number >= 0, got -1.0"),
        (lambda ms, s, q: ms.task(s, q, weight=float("nan")), ValueError, r"weight must be a finite number >= 0, got nan"),
        (lambda ms, s, q: ms.task(s, q, weight="2"), TypeError, r"weight must be a finite number >= 0, got '2'"),
        (lambda ms, s, q: ms.task(s, q, inner_steps=-1), ValueError, r"inner_steps must be an integer >= 0, got -1"),
        (lambda ms, s, q: ms.task(s, q, inner_steps=1.5), TypeError, r"inner_steps must be an integer >= 0, got 1.5"),
        (lambda ms, s, q: ms.task(s, q, grad_transforms=[object()]), TypeError, r"grad_transforms entries must have a transform_inner_grads"),
    ],
)
def test_bad_task_arguments(call, error, match):
    (support, query), = make_tasks(1)
    ms = MetaStep(MAML(make_model(), torch.optim.SGD, lr=0.1), loss_fn=F.mse_loss)
    with pytest.raises(error, match=match):
        call(ms, support, query)
    assert ms.losses == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss_fn": 3}, TypeError, r"loss_fn must be callable, got 3"),
        ({"inner_steps": -2}, ValueError, r"inner_steps must be an integer >= 0, got -2"),
        ({"inner_step_fn": "sgd"}, TypeError, r"inner_step_fn must be callable, got 'sgd'"),
        ({"inner_reg_fn": 1.0}, TypeError, r"inner_reg_fn must be callable, got 1.0"),
        ({"grad_transforms": InnerSAM()}, TypeError, r"grad_transforms must be a sequence"),
    ],
)
def test_bad_builder_arguments(kwargs, error, match):
    args = {"loss_fn": F.mse_loss, **kwargs}
    with pytest.raises(error, match=match):
        meta_step(MAML(make_model(), torch.optim.SGD, lr=0.1), **args)


def test_meta_must_be_a_meta_optimizer():
    model = make_model()
    with pytest.raises(TypeError, match=r"meta must be a samgria MetaOptimizer, got SGD"):
        meta_step(torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=F.mse_loss)


def test_repr():
    ms = meta_step(MAML(make_model(), torch.optim.SGD, lr=0.1), loss_fn=F.mse_loss, inner_steps=3)
    assert repr(ms) == "MetaStep(meta=MAML, tasks=0, inner_steps=3)"


@pytest.mark.parametrize(
    ("cls", "dtype", "scale"),
    [
        (MAML, torch.float16, 2.0**-30),
        (MAML, torch.float16, 2.0**20),
        (MAML, torch.bfloat16, 2.0**-140),
        (MAML, torch.float64, 2.0**-1074),
        (Reptile, torch.float64, 2.0**-1074),
    ],
    ids=["fp16-small", "fp16-large", "bf16-small", "fp64-subnormal", "reptile-fp64-subnormal"],
)
def test_the_update_does_not_depend_on_the_scale_of_the_task_weights(cls, dtype, scale):
    """Weights w and c * w give the same weighted mean. Each task's loss was back-propagated times
    its weight as given: in 16 bits a small weight underflowed (a zero meta-gradient, the step
    taken), a large one overflowed (the step skipped as non-finite), and a subnormal float64
    weight made the meta-loss raise OverflowError (Reptile's too)."""
    _assert_the_update_ignores_a_common_scale_of_the_weights(cls, dtype, [1.0, 2.0], scale)


def _assert_the_update_ignores_a_common_scale_of_the_weights(cls, dtype, task_weights, scale):
    """The meta-loss and the stepped weights of one meta-update with ``task_weights`` and with
    ``scale`` times them are equal, bit for bit, and the update was taken."""
    tasks = [tuple((x.to(dtype), y.to(dtype)) for x, y in task) for task in make_tasks(len(task_weights))]
    results = []
    for c in (1.0, scale):
        model = make_model().to(dtype)
        meta = cls(model, torch.optim.SGD, lr=1.0, inner_lr=0.1, inner_steps=2)
        with meta_step(meta, loss_fn=F.mse_loss) as ms:
            for (support, query), w in zip(tasks, task_weights):
                ms.task(support, query, weight=w * c)
        assert meta.skipped_steps == 0
        results.append((ms.loss, snapshot(model)))
    (loss, weights), (scaled_loss, scaled_weights) = results
    assert torch.equal(scaled_loss, loss)
    assert all(torch.equal(p, q) for p, q in zip(scaled_weights, weights))
    assert not all(torch.equal(p, q) for p, q in zip(weights, snapshot(make_model().to(dtype))))  # it stepped



@pytest.mark.parametrize("failing_task", [0, 1])
def test_a_task_that_raises_does_not_set_the_scale_of_the_others(failing_task):
    """A float16 meta-update with a task whose loss raised, first or after another: its large
    weight had set the scale of the weights, so the other tasks' losses were back-propagated
    (or their gradients rescaled) times 2**-40 and underflowed to a zero meta-gradient."""
    tasks = [tuple((x.half(), y.half()) for x, y in task) for task in make_tasks(2)]
    failing = []

    def loss_fn(prediction, target):
        if failing:
            raise RuntimeError("loss_fn failed")
        return F.mse_loss(prediction, target)

    results = []
    for with_failure in (False, True):
        model = make_model().half()
        ms = meta_step(MAML(model, torch.optim.SGD, lr=1.0, inner_lr=0.1), loss_fn=loss_fn)
        for index, (support, query) in enumerate(tasks):
            if with_failure and index == failing_task:
                failing.append(True)
                with pytest.raises(RuntimeError, match="loss_fn failed"):
                    ms.task(support, query, weight=2.0**40)
                failing.clear()
            ms.task(support, query)
        ms.step()
        results.append(snapshot(model))
    assert all(torch.equal(p, q) for p, q in zip(*results))


def test_a_leading_zero_weight_task_does_not_set_the_scale_of_the_others():
    """A task of weight 0 takes no part in the scale: had it set one (2**1, from frexp(0)), the
    float16 losses of tasks of weight 2**-30 added after it were back-propagated times 2**-29
    and underflowed to a zero meta-gradient."""
    _assert_the_update_ignores_a_common_scale_of_the_weights(MAML, torch.float16, [0.0, 1.0, 2.0], 2.0**-30)


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("query backward failed")


def test_a_first_task_whose_backward_raises_does_not_set_the_scale_of_the_next():
    """The first task's weight enters the scale before its query loss is back-propagated: when
    that backward raises, no task is added, and the next task (the first then) starts a fresh
    scale. Kept, a weight of 2**40 scaled the next tasks' float16 losses by 2**-40 (a zero
    meta-gradient)."""
    tasks = [tuple((x.half(), y.half()) for x, y in task) for task in make_tasks(2)]
    failing = []

    def loss_fn(prediction, target):
        loss = F.mse_loss(prediction, target)
        if failing and prediction.shape[0] == 6:  # the query loss only (6 rows; the support has 4)
            loss = _FailingBackward.apply(loss)
        return loss

    results = []
    for with_failure in (False, True):
        model = make_model().half()
        ms = meta_step(MAML(model, torch.optim.SGD, lr=1.0, inner_lr=0.1), loss_fn=loss_fn)
        if with_failure:
            failing.append(True)
            with pytest.raises(RuntimeError, match="query backward failed"):
                ms.task(*tasks[0], weight=2.0**40)
            failing.clear()
        for support, query in tasks:
            ms.task(support, query)
        ms.step()
        results.append(snapshot(model))
    assert all(torch.equal(p, q) for p, q in zip(*results))
    assert not all(torch.equal(p, q) for p, q in zip(results[0], snapshot(make_model().half())))  # it stepped


def test_a_task_without_support_examples_follows_its_own_inner_steps_over_the_builders():
    """The empty-support check reads the task's inner_steps first: 0 there scores the task
    without adapting even where the builder adapts, and the reverse raises."""
    (support, query), = make_tasks(1)
    empty = (support[0][:0], support[1][:0])
    model = make_model()
    before = snapshot(model)
    ms = MetaStep(MAML(model, torch.optim.SGD, lr=0.1, inner_lr=0.1), loss_fn=F.mse_loss, inner_steps=2)
    loss = ms.task(empty, query, inner_steps=0)
    expected = F.mse_loss(functional_call(model, dict(model.named_parameters()), (query[0],)), query[1])
    torch.testing.assert_close(loss, expected.detach(), rtol=0, atol=0)
    ms = MetaStep(MAML(model, torch.optim.SGD, lr=0.1, inner_lr=0.1), loss_fn=F.mse_loss, inner_steps=0)
    with pytest.raises(ValueError, match=r"^support has no examples .* MAML would take 3 inner step\(s\)"):
        ms.task(empty, query, inner_steps=3)
    assert all(torch.equal(p, q) for p, q in zip(snapshot(model), before))


def test_reptile_takes_a_query_set_without_examples_and_updates_as_without_one():
    """Only the MAML family refuses a query set of 0 rows: Reptile's update does not read the
    query set (its reported loss of an empty batch is nan)."""
    tasks = make_tasks(2)
    results = []
    for empty_query in (False, True):
        model = make_model()
        with meta_step(Reptile(model, torch.optim.SGD, lr=0.5, inner_lr=0.1), loss_fn=F.mse_loss) as ms:
            for support, query in tasks:
                loss = ms.task(support, (query[0][:0], query[1][:0]) if empty_query else None)
                assert torch.isnan(loss) == empty_query
        results.append(snapshot(model))
    assert all(torch.equal(p, q) for p, q in zip(*results))
    assert not all(torch.equal(p, q) for p, q in zip(results[0], snapshot(make_model())))  # it stepped


class TwiceEvaluatingReturningTheSecond(TwiceEvaluating):
    """As TwiceEvaluating, but returns the loss of the second evaluation."""

    @torch.no_grad()
    def step(self, closure):
        params = [p for g in self.param_groups for p in g["params"]]
        with torch.enable_grad():
            closure()
        for p in params:
            p.add_(self.delta)
        with torch.enable_grad():
            loss = closure()
        for p in params:
            p.sub_(self.delta)
        return loss


@pytest.mark.parametrize("cls", [MAML, Reptile])
def test_a_reevaluation_of_the_closure_returns_the_losses_at_its_point(cls):
    """The closure's second evaluation returns the weighted query loss of the tasks re-adapted at
    the outer optimizer's point, not the losses of the first evaluation."""
    tasks, weights, delta = make_tasks(2), [1.0, 3.0], 0.01
    shifted = make_model()
    with torch.no_grad():
        for p in shifted.parameters():
            p.add_(delta)
    params = dict(shifted.named_parameters())
    expected = []
    for ((xs, ys), (xq, yq)), w in zip(tasks, weights):
        fast = adapt_ref(shifted, params, xs, ys, lr=0.1, steps=2, first_order=True)
        expected.append(w * F.mse_loss(functional_call(shifted, fast, (xq,)), yq).detach())
    model = make_model()
    meta = cls(model, TwiceEvaluatingReturningTheSecond(model.parameters(), lr=0.0, delta=delta), inner_lr=0.1, inner_steps=2)
    with meta_step(meta, loss_fn=F.mse_loss) as ms:
        for (s, q), w in zip(tasks, weights):
            ms.task(s, q, weight=w)
    torch.testing.assert_close(ms.loss, sum(expected) / sum(weights), rtol=1e-10, atol=1e-12)


def test_entering_a_builder_that_holds_tasks_added_outside_the_block_is_refused():
    (support, query), = make_tasks(1)
    model = make_model()
    ms = MetaStep(MAML(model, torch.optim.SGD, lr=0.1, inner_lr=0.1), loss_fn=F.mse_loss)
    ms.task(support, query)
    with pytest.raises(RuntimeError, match=r"^this MetaStep already holds 1 task\(s\) added outside the `with` block; call step\(\) first$"):
        with ms:
            pass
    ms.step()
    with ms:
        ms.task(support, query)
