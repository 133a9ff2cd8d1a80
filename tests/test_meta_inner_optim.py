"""Differentiable inner optimizers (SGD, momentum, Adam) against torch.optim, their
meta-gradients against finite differences, per-adaptation state, and InnerSAM."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from meta_helpers import central_differences
from samgria.data.task import Task
from samgria.meta.inner_optim import (
    AdamInnerStep,
    InnerGradTransform,
    InnerSAM,
    InnerStepFn,
    MomentumInnerStep,
    adam_inner_step,
    momentum_inner_step,
    sgd_inner_step,
)
from samgria.meta.learner import Learner
from samgria.meta.maml import MAML

DT = torch.float64
mse = nn.functional.mse_loss


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    g = torch.Generator().manual_seed(seed)
    task = Task(*(torch.randn(6, s, generator=g, dtype=DT) for s in (3, 1, 3, 1)))
    return model, task


def torch_optim_adapted(model, task, make_opt, steps):
    clone = copy.deepcopy(model)
    opt = make_opt(clone.parameters())
    for _ in range(steps):
        opt.zero_grad()
        mse(clone(task.support_x), task.support_y).backward()
        opt.step()
    return [p.detach() for p in clone.parameters()]


CASES = {
    "sgd": (lambda: sgd_inner_step, lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "momentum": (lambda: MomentumInnerStep(0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "dampening": (
        lambda: MomentumInnerStep(0.8, dampening=0.3),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8, dampening=0.3),
    ),
    "nesterov": (
        lambda: MomentumInnerStep(0.9, nesterov=True),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    ),
    "adam": (lambda: AdamInnerStep(), lambda ps: torch.optim.Adam(ps, lr=0.1)),
    "adam_betas": (
        lambda: AdamInnerStep(betas=(0.5, 0.9), eps=1e-6),
        lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.5, 0.9), eps=1e-6),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_inner_step_fn_matches_torch_optim(name):
    make_fn, make_opt = CASES[name]
    model, task = setup()
    learner = Learner(model, inner_lr=0.1, inner_step_fn=make_fn()).adapt_on(mse, task.support_x, task.support_y, steps=4)
    expected = torch_optim_adapted(model, task, make_opt, 4)
    for (n, _), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(learner.params[n].detach(), e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adam"])
def test_meta_gradient_through_stateful_inner_optimizer_matches_finite_differences(name):
    make_fn, _ = CASES[name]
    model, task = setup()
    step_fn = make_fn()
    meta = MAML(model, torch.optim.SGD, inner_lr=0.05, inner_steps=3, lr=0.1)
    learner = meta.adapt(lambda f: mse(f(task.support_x), task.support_y), inner_step_fn=step_fn)
    mse(learner(task.query_x), task.query_y).backward()

    def value():
        ref = Learner(model, inner_lr=0.05, inner_step_fn=step_fn, track_graph=False)
        ref.adapt_on(mse, task.support_x, task.support_y, steps=3)
        with torch.no_grad():
            return mse(ref(task.query_x), task.query_y).item()

    for p in model.parameters():
        for i, estimate in enumerate(central_differences(p.view(-1), value)):
            assert p.grad.view(-1)[i].item() == pytest.approx(estimate, rel=1e-5, abs=1e-8)


def test_state_is_per_adaptation_so_shared_instances_do_not_leak():
    model, task = setup()
    meta = MAML(model, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.1)
    for shared in (adam_inner_step, momentum_inner_step):
        a = meta.adapt(lambda f: mse(f(task.support_x), task.support_y), inner_step_fn=shared)
        b = meta.adapt(lambda f: mse(f(task.support_x), task.support_y), inner_step_fn=shared)
        for n in a.params:
            assert torch.equal(a.params[n], b.params[n])


def test_protocols_are_runtime_checkable():
    assert isinstance(sgd_inner_step, InnerStepFn)
    assert isinstance(MomentumInnerStep(), InnerStepFn)
    assert isinstance(InnerSAM(0.1), InnerGradTransform)
    assert not isinstance(object(), InnerGradTransform)
    assert "MomentumInnerStep(momentum=0.9" in repr(momentum_inner_step)
    assert "AdamInnerStep(betas=(0.9, 0.999)" in repr(adam_inner_step)


def ls_problem():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).to(DT)
    g = torch.Generator().manual_seed(1)
    xs, ys, xq, yq = (torch.randn(5, s, generator=g, dtype=DT) for s in (3, 1, 3, 1))
    return model, xs, ys, xq, yq


def ls_grad(w, x, y):
    return (2.0 / x.shape[0]) * ((x @ w.T - y).T @ x)


@pytest.mark.parametrize("first_order", [False, True])
def test_inner_sam_step_and_meta_gradient_closed_form(first_order):
    model, xs, ys, xq, yq = ls_problem()
    rho, alpha = 0.2, 0.1
    meta = MAML(model, torch.optim.SGD, inner_lr=alpha, first_order=first_order, lr=0.1)
    learner = meta.adapt(lambda f: mse(f(xs), ys), grad_transforms=[InnerSAM(rho)])
    w = model.weight.detach()
    g = ls_grad(w, xs, ys)
    eps = rho * g / g.norm()
    w1 = w - alpha * ls_grad(w + eps, xs, ys)
    torch.testing.assert_close(learner.params["weight"], w1, rtol=0, atol=1e-12)
    mse(learner(xq), yq).backward()
    g_q = ls_grad(w1, xq, yq)
    jac = torch.eye(3, dtype=DT) if first_order else torch.eye(3, dtype=DT) - alpha * (2.0 / 5) * xs.T @ xs
    torch.testing.assert_close(model.weight.grad, g_q @ jac, rtol=0, atol=1e-12)


def test_inner_sam_with_zero_rho_is_plain_sgd_and_combines_with_regulariser():
    model, xs, ys, xq, yq = ls_problem()
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, inner_steps=2, lr=0.1)
    plain = meta.adapt(lambda f: mse(f(xs), ys))
    zero = meta.adapt(lambda f: mse(f(xs), ys), grad_transforms=[InnerSAM(0.0)])
    torch.testing.assert_close(plain.params["weight"], zero.params["weight"], rtol=0, atol=0)

    def reg(current, base):
        return ((current["weight"] - base["weight"]) ** 2).sum()

    learner = meta.adapt(lambda f: mse(f(xs), ys), steps=1, inner_reg_fn=reg, grad_transforms=[InnerSAM(0.3)])
    w = model.weight.detach()
    g = ls_grad(w, xs, ys)  # the regulariser's gradient is 0 at the start
    eps = 0.3 * g / g.norm()
    expected = w - 0.1 * (ls_grad(w + eps, xs, ys) + 2 * eps)
    torch.testing.assert_close(learner.params["weight"], expected, rtol=0, atol=1e-12)


def test_inner_optimizer_arguments_are_validated():
    with pytest.raises(ValueError, match=r"momentum must be a finite number in \[0, 1\), got 1\.5"):
        MomentumInnerStep(1.5)
    with pytest.raises(ValueError, match=r"dampening must be a finite number in \[0, 1\), got -0\.1"):
        MomentumInnerStep(0.9, dampening=-0.1)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0 and dampening == 0"):
        MomentumInnerStep(0.0, nesterov=True)
    with pytest.raises(TypeError, match="nesterov must be a bool, got 1"):
        MomentumInnerStep(0.9, nesterov=1)
    with pytest.raises(ValueError, match=r"betas\[1\] must be a finite number in \[0, 1\), got 1\.0"):
        AdamInnerStep(betas=(0.9, 1.0))
    with pytest.raises(TypeError, match=r"betas must be a pair of numbers in \[0, 1\), got 0.9"):
        AdamInnerStep(betas=0.9)
    with pytest.raises(ValueError, match="eps must be a finite number > 0, got 0"):
        AdamInnerStep(eps=0)
    with pytest.raises(ValueError, match=r"rho must be a finite number >= 0, got -0\.1"):
        InnerSAM(-0.1)
    with pytest.raises(TypeError, match="rho must be a finite number >= 0, got '0.1'"):
        InnerSAM("0.1")
    with pytest.raises(ValueError, match="rho must be a finite number >= 0, got inf"):
        InnerSAM(float("inf"))
    with pytest.raises(ValueError, match="eps must be a finite number > 0, got nan"):
        AdamInnerStep(eps=float("nan"))


def test_a_numpy_bool_nesterov_is_stored_as_a_bool():
    """check_bool accepts NumPy bools everywhere and the value kept is Python's bool (as
    InnerLoop keeps its flags): MomentumInnerStep kept the np.bool_ it was given."""
    import numpy as np

    step = MomentumInnerStep(0.9, nesterov=np.True_)
    assert step.nesterov is True
    assert MomentumInnerStep(0.9, nesterov=np.False_).nesterov is False


def test_adam_inner_step_second_order_is_finite_with_zero_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)).to(DT)
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU dead: exact zero gradients upstream
    x, y = torch.randn(5, 2, dtype=DT), torch.randn(5, 1, dtype=DT)
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, inner_steps=2, lr=0.1)
    learner = meta.adapt(lambda f: mse(f(x), y), inner_step_fn=AdamInnerStep())
    mse(learner(x), y).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 1)
        self.b = nn.Linear(3, 1)

    def forward(self, x, heads):
        return sum(getattr(self, h)(x) for h in heads)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-7)])
def test_adam_counts_steps_per_weight_as_torch_adam(dtype, atol):
    # Head b gets no gradient at inner step 1: like torch.optim.Adam with its grad set to None,
    # it neither moves nor counts the step, so its first gradient gets a first step's bias
    # correction (one shared count would give it step 2's).
    torch.manual_seed(0)
    model = TwoHeads().to(dtype)
    x, y = torch.randn(6, 3, dtype=dtype), torch.randn(6, 1, dtype=dtype)
    schedule = ["a", "b", "ab", "b"]
    step_fn = AdamInnerStep(betas=(0.8, 0.95), eps=1e-6)

    reference = copy.deepcopy(model)
    opt = torch.optim.Adam(reference.parameters(), lr=0.1, betas=(0.8, 0.95), eps=1e-6)
    for heads in schedule:
        opt.zero_grad(set_to_none=True)
        mse(reference(x, heads), y).backward()
        opt.step()

    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, lr=0.1)
    by_loss = meta.clone(inner_step_fn=step_fn)
    for heads in schedule:
        by_loss.adapt(mse(by_loss(x, heads), y))
    calls = iter(schedule)
    by_closure = meta.adapt(lambda f: mse(f(x, next(calls)), y), inner_steps=len(schedule), inner_step_fn=step_fn)
    for n, p in reference.named_parameters():
        for learner in (by_loss, by_closure):
            torch.testing.assert_close(learner.params[n].detach(), p.detach(), rtol=0, atol=atol)


def test_adam_continues_an_inner_state_with_the_single_step_count_of_earlier_versions():
    """Inner state kept by a user from before the per-weight counts ({"step": 3, ...}) continues
    as the per-weight form with every moment at step 3 (it raised AttributeError before)."""
    g = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    moments = {"exp_avg": {"w": torch.randn(4, generator=g, dtype=torch.float64)}, "exp_avg_sq": {"w": torch.rand(4, generator=g, dtype=torch.float64)}}
    old_form = {"step": 3, **{k: dict(v) for k, v in moments.items()}}
    new_form = {"step": {"w": 3}, **{k: dict(v) for k, v in moments.items()}}
    step = AdamInnerStep()
    got = step({"w": weight}, {"w": grad}, {"w": 0.1}, old_form)
    want = step({"w": weight}, {"w": grad}, {"w": 0.1}, new_form)
    assert torch.equal(got["w"], want["w"]) and old_form["step"] == {"w": 4}


def bits(t):
    return t.view(torch.int64 if t.element_size() == 8 else torch.int32)


def test_inner_sam_with_a_non_finite_gradient_reevaluates_at_the_same_weights_bit_for_bit():
    """The perturbation inf * 0 was NaN: the gradient was taken at a = [nan, -0.0], and the
    NaN weight poisoned the gradient of every other weight."""
    params = {"a": torch.tensor([1.0, -0.0]), "b": torch.tensor([3.0])}
    seen = {}

    def grad_fn(weights):
        seen.update(weights)
        return {n: torch.full_like(v, 7.0) for n, v in weights.items()}

    for bad in (float("inf"), float("nan")):
        seen.clear()
        grads = {"a": torch.tensor([bad, 1.0]), "b": torch.tensor([1.0])}
        out = InnerSAM(0.05).transform_inner_grads(params, grads, grad_fn)
        for n in params:
            assert torch.equal(bits(seen[n]), bits(params[n])), (bad, n, seen[n])
            assert torch.equal(out[n], torch.full_like(params[n], 7.0))


class Line(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.1]))
        self.b = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x):
        return self.a * x + self.b


@pytest.mark.parametrize(
    "path, first_order, checkpoint",
    [("loop", False, False), ("loop", True, False), ("loop", False, True), ("vmap", False, False), ("vmap", True, False)],
)
def test_inner_sam_with_an_overflowing_gradient_steps_as_plain_sgd_on_every_path(path, first_order, checkpoint):
    # float32, x = 1e20: the support loss (1e38) is finite, d/da = 2e39 overflows to inf and
    # d/db = 2e19 is finite. SAM cannot perturb (no finite norm), so its gradient is the plain
    # one: a steps to -inf as in SGD, and b keeps its finite step (it was NaN).
    from samgria.meta.engine import InnerLoop, task_losses

    model = Line()
    x = torch.full((2, 1), 1e20)
    task = Task(x, torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1))
    plain = InnerLoop(("a", "b"), {"a": 0.1, "b": 0.1}, 1, first_order=first_order, checkpoint=checkpoint)
    sam = plain.replace(grad_transforms=(InnerSAM(0.05),))
    params = dict(model.named_parameters())
    _, (want,) = task_losses(model, plain, params, [task], mse, path=path)
    _, (got,) = task_losses(model, sam, params, [task], mse, path=path)
    assert torch.isfinite(want["b"]).all() and torch.isinf(want["a"]).all()
    for n in ("a", "b"):
        assert torch.equal(got[n].detach(), want[n].detach()), (n, got[n], want[n])


def complex_weights_and_grads(steps=4):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 3, generator=g, dtype=torch.complex128)
    return weight, [torch.randn(2, 3, generator=g, dtype=torch.complex128) for _ in range(steps)]


@pytest.mark.parametrize(
    "make_fn, make_opt",
    [
        (lambda: AdamInnerStep(), lambda ps: torch.optim.Adam(ps, lr=0.1)),
        (lambda: AdamInnerStep(betas=(0.5, 0.9), eps=1e-3), lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.5, 0.9), eps=1e-3)),
        (lambda: MomentumInnerStep(0.9, dampening=0.2), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.2)),
        (lambda: MomentumInnerStep(0.9, nesterov=True), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)),
        (lambda: sgd_inner_step, lambda ps: torch.optim.SGD(ps, lr=0.1)),
    ],
    ids=["adam", "adam_betas_eps", "momentum", "nesterov", "sgd"],
)
def test_inner_steps_treat_complex_weights_as_pairs_of_reals_as_torch_optim(make_fn, make_opt):
    """AdamInnerStep raised 'clamp is not supported for complex types'; torch.optim.Adam takes
    the moments of the real and imaginary parts (view_as_real)."""
    weight, grads = complex_weights_and_grads()
    reference = weight.clone().requires_grad_(True)
    opt = make_opt([reference])
    step_fn, state, fast = make_fn(), {}, weight
    for grad in grads:
        reference.grad = grad.clone()
        opt.step()
        fast = step_fn({"w": fast}, {"w": grad}, {"w": 0.1}, state)["w"]
        assert fast.dtype == torch.complex128
        torch.testing.assert_close(fast, reference.detach(), rtol=0, atol=1e-13)


def test_adam_inner_step_meta_gradient_with_complex_weights_matches_finite_differences():
    torch.manual_seed(0)
    model = nn.Linear(2, 1, bias=False, dtype=torch.complex128)
    g = torch.Generator().manual_seed(1)
    xs, ys, xq, yq = (torch.randn(4, s, generator=g, dtype=torch.complex128) for s in (2, 1, 2, 1))

    def loss(pred, target):
        return torch.view_as_real(pred - target).pow(2).mean()

    step_fn = AdamInnerStep(betas=(0.8, 0.9))
    meta = MAML(model, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.1)
    learner = meta.adapt(lambda f: loss(f(xs), ys), inner_step_fn=step_fn)
    loss(learner(xq), yq).backward()
    grad = torch.view_as_real(model.weight.grad).reshape(-1)  # d/dRe + i d/dIm, as pairs

    def value():
        ref = Learner(model, inner_lr=0.05, inner_step_fn=step_fn, track_graph=False)
        ref.adapt_on(loss, xs, ys, steps=2)
        with torch.no_grad():
            return loss(ref(xq), yq).item()

    for i, estimate in enumerate(central_differences(torch.view_as_real(model.weight).view(-1), value)):
        assert grad[i].item() == pytest.approx(estimate, rel=1e-5, abs=1e-8)


def test_inner_sam_norm_of_complex_gradients_counts_their_imaginary_parts():
    """The norm was taken of .double(), which drops the imaginary part (with a warning)."""
    weight, (grad, *_) = complex_weights_and_grads(1)
    seen = {}

    def grad_fn(weights):
        seen.update(weights)
        return dict(weights)

    InnerSAM(0.3).transform_inner_grads({"w": weight}, {"w": grad}, grad_fn)
    norm = torch.sqrt((grad.abs() ** 2).sum())
    torch.testing.assert_close(seen["w"], weight + 0.3 * grad / norm, rtol=0, atol=1e-15)


def test_inner_sam_perturbs_a_float16_weight_whose_gradient_norm_is_below_rho_over_the_dtype_max():
    """||g|| = 3e-7: the scale rho / ||g|| (1.7e5) was cast to float16, overflowed to inf, and the
    perturbed weights were [inf, nan] (inf * 0) instead of w + rho * g / ||g||."""
    weight = torch.tensor([1.0, 2.0], dtype=torch.float16)
    grad = torch.tensor([3e-7, 0.0], dtype=torch.float16)
    seen = {}

    def grad_fn(weights):
        seen.update(weights)
        return dict(weights)

    InnerSAM(0.05).transform_inner_grads({"w": weight}, {"w": grad}, grad_fn)
    g = grad.double()
    want = weight + (0.05 * g / g.norm()).half()
    assert torch.equal(seen["w"], want) and torch.isfinite(want).all(), seen["w"]



@pytest.mark.parametrize("entry", ["adapt", "task_losses"])
def test_inner_sam_with_checkpointed_inner_steps_equals_the_plain_loop_bitwise(entry):
    """MAML(checkpoint_inner_steps=True) with InnerSAM raised 'the support closure reads data that
    changed' in every meta-backward: torch recomputes a checkpointed step also inside its own
    forward (the support gradient's backward needs its saved tensors), and the step's second support
    loss, at the perturbed weights, was then compared with the recorded first one → the same
    meta-gradient as checkpoint_inner_steps=False, bit for bit, on both entry points."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    generator = torch.Generator().manual_seed(1)
    tasks = [Task(*[torch.randn(5, k, generator=generator, dtype=torch.float64) for k in (2, 1, 2, 1)]) for _ in range(2)]

    def meta_gradient(checkpoint_inner_steps):
        meta = MAML(model, torch.optim.SGD, lr=0.1, inner_steps=2, checkpoint_inner_steps=checkpoint_inner_steps)
        meta.zero_grad()
        if entry == "adapt":
            losses = []
            for task in tasks:
                learner = meta.adapt(lambda f, t=task: mse(f(t.support_x), t.support_y), grad_transforms=[InnerSAM(0.05)])
                losses.append(mse(learner(task.query_x), task.query_y))
            torch.stack(losses).mean().backward()
        else:
            meta.task_losses(tasks, mse, vectorize=False, grad_transforms=[InnerSAM(0.05)]).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    expected = meta_gradient(False)
    got = meta_gradient(True)
    assert all(torch.equal(g, e) for g, e in zip(got, expected)), (got, expected)
