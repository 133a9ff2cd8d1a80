"""Reptile: the interpolation formula, task weights, the outer-optimizer variants and errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from samgria.data.task import Task
from samgria.meta.reptile import Reptile

DT = torch.float64
mse = nn.functional.mse_loss


def make_tasks(n=3, d=3, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        Task(*(torch.randn(k, s, generator=g, dtype=DT) for s in (d, 1, d, 1)))
        for _ in range(n)
    ]


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)


def sgd_adapted(model, task, lr, steps):
    """Reference inner loop: a deep copy trained with torch.optim.SGD."""
    clone = copy.deepcopy(model)
    opt = torch.optim.SGD(clone.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        mse(clone(task.support_x), task.support_y).backward()
        opt.step()
    return [p.detach() for p in clone.parameters()]


def reptile_closure(meta, tasks, weights=None):
    def closure():
        losses = []
        for i, t in enumerate(tasks):
            w = 1.0 if weights is None else weights[i]
            learner = meta.adapt(lambda f, t=t: mse(f(t.support_x), t.support_y), weight=w)
            with torch.no_grad():
                losses.append(mse(learner(t.query_x), t.query_y))
        return torch.stack(losses).mean()

    return closure


@pytest.mark.parametrize("weights", [None, [1.0, 3.0, 0.5]])
def test_reptile_with_sgd_is_the_interpolation_formula(weights):
    model = mlp()
    tasks = make_tasks()
    beta, alpha, k = 0.3, 0.05, 3
    theta = [p.detach().clone() for p in model.parameters()]
    adapted = [sgd_adapted(model, t, alpha, k) for t in tasks]
    w = [1.0] * len(tasks) if weights is None else weights
    meta = Reptile(model, torch.optim.SGD, inner_lr=alpha, inner_steps=k, lr=beta)
    loss = meta.step(reptile_closure(meta, tasks, weights))
    assert torch.is_tensor(loss) and meta.num_recorded == 0
    for j, p in enumerate(model.parameters()):
        mean = sum(wi * a[j] for wi, a in zip(w, adapted)) / sum(w)
        expected = theta[j] + beta * (mean - theta[j])
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)



def test_weights_whose_sum_overflows_a_float_move_as_their_ratios_say():
    """The pseudo-gradient divided each weight by their sum, a Python float: weights [1e308, 1e308]
    summed to inf, every task counted 0 and the step moved nothing, without a word. The weights
    are scaled by a power of two first (which changes no rounding), so only their ratios count:
    the same update as weights [1, 1], bit for bit."""
    tasks = make_tasks(n=2)
    runs = []
    for weights in ([1e308, 1e308], [1.0, 1.0]):
        model = mlp()
        meta = Reptile(model, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.5)
        meta.step(reptile_closure(meta, tasks, weights=weights))
        runs.append(model)
    assert all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in runs)))
    assert not all(torch.equal(p, q) for p, q in zip(runs[0].parameters(), mlp().parameters()))

def test_reptile_pseudo_gradient_goes_through_adam():
    model = mlp()
    twin = copy.deepcopy(model)
    tasks = make_tasks()
    adapted = [sgd_adapted(model, t, 0.05, 2) for t in tasks]
    meta = Reptile(model, torch.optim.Adam, inner_lr=0.05, inner_steps=2, lr=0.01)
    meta.step(reptile_closure(meta, tasks))
    ref = torch.optim.Adam(twin.parameters(), lr=0.01)
    for j, p in enumerate(twin.parameters()):
        p.grad = p.detach() - sum(a[j] for a in adapted) / len(adapted)
    ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_step_without_closure_uses_recorded_adaptations_and_clears_them():
    model = mlp()
    tasks = make_tasks(n=2)
    theta = [p.detach().clone() for p in model.parameters()]
    adapted = [sgd_adapted(model, t, 0.1, 1) for t in tasks]
    meta = Reptile(model, torch.optim.SGD, inner_lr=0.1, inner_steps=1, lr=1.0)
    for t in tasks:
        learner = meta.adapt(lambda f, t=t: mse(f(t.support_x), t.support_y))
        assert all(not v.requires_grad or v.grad_fn is None for v in learner.params.values())
    assert meta.num_recorded == 2
    meta.step()
    assert meta.num_recorded == 0
    for j, p in enumerate(model.parameters()):  # lr=1: theta moves to the mean
        torch.testing.assert_close(p.detach(), (adapted[0][j] + adapted[1][j]) / 2, rtol=0, atol=1e-12)
        assert not torch.equal(p.detach(), theta[j])


@pytest.mark.parametrize("vectorize", [False, True, None])
def test_task_losses_records_adapted_params_and_returns_detached_query_losses(vectorize):
    model = mlp()
    tasks = make_tasks()
    adapted = [sgd_adapted(model, t, 0.05, 2) for t in tasks]
    theta = [p.detach().clone() for p in model.parameters()]
    meta = Reptile(model, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.5)

    def closure():
        meta.zero_grad()
        losses = meta.task_losses(tasks, mse, vectorize=vectorize)
        assert not losses.requires_grad and losses.shape == (3,)
        return losses.mean()

    meta.step(closure)
    for j, p in enumerate(model.parameters()):
        mean = sum(a[j] for a in adapted) / 3
        torch.testing.assert_close(p.detach(), theta[j] + 0.5 * (mean - theta[j]), rtol=0, atol=1e-12)


def test_reptile_query_losses_match_reference():
    model = mlp()
    tasks = make_tasks()
    meta = Reptile(model, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.5)
    losses = meta.task_losses(tasks, mse, vectorize=False)
    expected = []
    for t in tasks:
        clone = copy.deepcopy(model)
        adapted = sgd_adapted(model, t, 0.05, 2)
        with torch.no_grad():
            for p, a in zip(clone.parameters(), adapted):
                p.copy_(a)
            expected.append(mse(clone(t.query_x), t.query_y))
    torch.testing.assert_close(losses, torch.stack(expected), rtol=0, atol=1e-12)
    assert meta.evaluate(tasks, mse) == pytest.approx(torch.stack(expected).mean().item(), rel=1e-12)
    assert meta.num_recorded == 3  # task_losses recorded; evaluate did not


def without_query(tasks):
    """The tasks with an empty query set (``k_query=0``)."""
    return [Task(t.support_x, t.support_y, t.query_x[:0], t.query_y[:0]) for t in tasks]


def support_loss_after(model, task, lr, steps):
    """Reference: the support loss of a copy of ``model`` trained on the support set with SGD."""
    clone, adapted = copy.deepcopy(model), sgd_adapted(model, task, lr, steps)
    with torch.no_grad():
        for p, a in zip(clone.parameters(), adapted):
            p.copy_(a)
        return mse(clone(task.support_x), task.support_y)


@pytest.mark.parametrize("vectorize", [False, True, None])
def test_an_empty_query_set_steps_with_the_pseudo_gradient_and_reports_the_support_loss(vectorize):
    """k_query=0 is allowed: the step is the interpolation formula (never skipped), and the
    monitoring loss is each task's post-adaptation support loss."""
    model = mlp()
    tasks = without_query(make_tasks())
    theta = [p.detach().clone() for p in model.parameters()]
    adapted = [sgd_adapted(model, t, 0.05, 2) for t in tasks]
    expected_losses = torch.stack([support_loss_after(model, t, 0.05, 2) for t in tasks])
    meta = Reptile(model, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.5)
    assert meta.evaluate(tasks, mse, vectorize=vectorize) == pytest.approx(expected_losses.mean().item(), rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = meta.step(lambda: meta.task_losses(tasks, mse, vectorize=vectorize).mean())
    assert meta.skipped_steps == 0
    torch.testing.assert_close(loss, expected_losses.mean(), rtol=0, atol=1e-12)
    for j, p in enumerate(model.parameters()):
        mean = sum(a[j] for a in adapted) / len(adapted)
        torch.testing.assert_close(p.detach(), theta[j] + 0.5 * (mean - theta[j]), rtol=0, atol=1e-12)


def test_a_non_finite_pseudo_gradient_is_still_skipped_without_a_query_set():
    model = mlp()
    tasks = without_query(make_tasks())
    bad = tasks[1]
    tasks[1] = Task(bad.support_x, torch.full_like(bad.support_y, float("inf")), bad.query_x, bad.query_y)
    before = [p.detach().clone() for p in model.parameters()]
    meta = Reptile(model, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.5)
    with pytest.warns(RuntimeWarning, match=r"^Reptile: the pseudo-gradient is not finite; the meta-step is skipped"):
        meta.step(lambda: meta.task_losses(tasks, mse).mean())
    assert meta.skipped_steps == 1
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_adapt_false_group_is_not_moved_and_gets_no_pseudo_gradient():
    model = mlp()
    body = model[0]
    meta = Reptile(
        model,
        torch.optim.SGD([{"params": body.parameters(), "adapt": False}, {"params": model[2].parameters()}], lr=1.0),
        inner_lr=0.1,
        inner_steps=2,
    )
    body_before = [p.detach().clone() for p in body.parameters()]
    head_before = [p.detach().clone() for p in model[2].parameters()]
    meta.step(reptile_closure(meta, make_tasks()))
    for p, b in zip(body.parameters(), body_before):
        assert torch.equal(p, b) and p.grad is None
    assert any(not torch.equal(p, b) for p, b in zip(model[2].parameters(), head_before))


def test_a_stale_gradient_of_a_parameter_that_is_not_adapted_is_dropped_not_stepped():
    # The body (adapt=False) carries a gradient from an earlier backward: Reptile's step sets it
    # to None, so the outer SGD moves only the head, by the pseudo-gradient.
    model = mlp()
    body, head = model[0], model[2]
    meta = Reptile(
        model,
        torch.optim.SGD([{"params": body.parameters(), "adapt": False}, {"params": head.parameters()}], lr=1.0),
        inner_lr=0.1,
        inner_steps=2,
    )
    task = make_tasks()[0]
    mse(model(task.query_x), task.query_y).backward()  # e.g. a monitoring loss
    assert all(p.grad is not None for p in body.parameters())
    body_before = [p.detach().clone() for p in body.parameters()]
    meta.step(reptile_closure(meta, make_tasks()))
    for p, b in zip(body.parameters(), body_before):
        assert torch.equal(p, b) and p.grad is None


def test_outer_that_calls_closure_twice_gets_fresh_records_each_time():
    class TwiceSGD(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure):
            closure()
            self.first = [p.grad.clone() for p in self.param_groups[0]["params"]]
            loss = closure()
            for p in self.param_groups[0]["params"]:
                p.add_(p.grad, alpha=-self.param_groups[0]["lr"])
            return loss

    model = mlp()
    tasks = make_tasks()
    twin = copy.deepcopy(model)
    meta = Reptile(model, TwiceSGD, inner_lr=0.05, inner_steps=1, lr=0.5)
    meta.step(reptile_closure(meta, tasks))
    ref = Reptile(twin, torch.optim.SGD, inner_lr=0.05, inner_steps=1, lr=0.5)
    ref.step(reptile_closure(ref, tasks))
    for p, q in zip(model.parameters(), twin.parameters()):  # 3 records per call, not 6
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_tasks_adapted_before_step_count_once_with_those_the_closure_adapts():
    """A framework may adapt earlier micro-batches outside the optimizer and then hand step() a
    closure for the last one (Lightning's accumulate_grad_batches), or a closure that adapts
    nothing (Lightning's manual optimization): the closure cleared the earlier records, so the
    update used the last micro-batch only, or step() raised "found no adapted tasks". Now the
    update is over every task adapted since the last step."""
    kind = torch.optim.SGD
    tasks = make_tasks(4)
    reference_model = mlp()
    reference = Reptile(reference_model, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.5)
    reference.step(reptile_closure(reference, tasks))

    split_model = mlp()
    split = Reptile(split_model, kind, inner_lr=0.05, inner_steps=2, lr=0.5)
    reptile_closure(split, tasks[:2])()  # an earlier micro-batch, outside the optimizer
    split.step(reptile_closure(split, tasks[2:]))

    nothing_model = mlp()
    nothing = Reptile(nothing_model, kind, inner_lr=0.05, inner_steps=2, lr=0.5)
    reptile_closure(nothing, tasks)()
    nothing.step(lambda: None)

    for p, q, r in zip(reference_model.parameters(), split_model.parameters(), nothing_model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
        torch.testing.assert_close(r, p, rtol=0, atol=1e-12)
    assert split.num_recorded == 0 and nothing.num_recorded == 0


@pytest.mark.parametrize("outer", ["twice", "sam", "lbfgs"])
def test_tasks_adapted_before_step_are_refused_with_an_outer_that_evaluates_the_closure_again(outer):
    """Tasks adapted before step() were adapted from the weights at its start; an outer
    optimizer that evaluates the closure again (at SAM's perturbed weights, LBFGS's next
    iterate) would form their pseudo-gradient at other weights: not SAM, silently. Refused at
    the second evaluation, with the weights, the outer state and the record as before."""
    from samgria import SAM, TransformingOptimizer

    class TwiceSGD(torch.optim.SGD):
        def step(self, closure):
            closure()
            return super().step(closure)

    model = mlp()
    if outer == "sam":
        built = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.5, momentum=0.9, transforms=[SAM(0.5)])
        meta = Reptile(model, built, inner_lr=0.05, inner_steps=2)
    elif outer == "lbfgs":
        meta = Reptile(model, torch.optim.LBFGS, inner_lr=0.05, inner_steps=2, lr=0.5, max_iter=3)
    else:
        meta = Reptile(model, TwiceSGD, inner_lr=0.05, inner_steps=2, lr=0.5, momentum=0.9)
    tasks = make_tasks(4)
    meta.step(reptile_closure(meta, tasks[2:]))  # a step that creates the outer state
    reptile_closure(meta, tasks[:2])()  # adapted before the step
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(meta.state_dict())
    with pytest.raises(RuntimeError, match=r"^Reptile: 2 task\(s\) were adapted before step\(\), from the weights at its start"):
        meta.step(reptile_closure(meta, tasks[2:]))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert meta.num_recorded == 2
    assert meta._task_weight == 2.0  # the record's weight stays with it (distributed weighting)
    assert _same(meta.state_dict()["state"], state["state"])


def _same(a, b) -> bool:
    """Bit-for-bit equality of nested optimizer state (tensors, lists, dicts, numbers, None)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_clear_records_drops_adaptations_made_for_evaluation():
    """Test-time adaptation with meta.adapt kept every adapted model until the next step (memory
    grew without bound) and folded those tasks into it; clear_records() drops them, so the next
    step equals one without them."""
    tasks = make_tasks(4)
    model, twin = mlp(), mlp()
    meta = Reptile(model, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.5)
    reference = Reptile(twin, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.5)
    reptile_closure(meta, make_tasks(5, seed=3), weights=[1.0, 0.5, 2.0, 1.0, 1.0])()  # evaluation adaptations
    assert meta.num_recorded == 5 and meta._task_weight == 5.5
    meta.clear_records()
    assert meta.num_recorded == 0
    assert meta._task_weight == 0.0  # their weights go too: with distributed=True they weight the all-reduce
    meta.step(reptile_closure(meta, tasks))
    reference.step(reptile_closure(reference, tasks))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("with_closure", [False, True])
def test_non_finite_raise_consumes_the_record_as_a_skipped_step_does(with_closure):
    """non_finite="raise" judges and skips the step: the record of adapted tasks is consumed, as
    with "skip". Since a raising step kept the record, one non-finite task made every later
    step raise."""
    model = mlp()
    meta = Reptile(model, torch.optim.SGD, inner_lr=0.05, inner_steps=1, lr=0.5, non_finite="raise")
    bad = make_tasks(1)[0]
    bad = Task(bad.support_x, bad.support_y * float("inf"), bad.query_x, bad.query_y)
    if with_closure:
        with pytest.raises(FloatingPointError, match="the meta-step is skipped"):
            meta.step(reptile_closure(meta, [bad]))
    else:
        meta.adapt(lambda f: mse(f(bad.support_x), bad.support_y))
        with pytest.raises(FloatingPointError, match="the meta-step is skipped"):
            meta.step()
    assert meta.num_recorded == 0
    twin = mlp()
    reference = Reptile(twin, torch.optim.SGD, inner_lr=0.05, inner_steps=1, lr=0.5)
    tasks = make_tasks(3)
    meta.step(reptile_closure(meta, tasks))
    reference.step(reptile_closure(reference, tasks))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_adapt_leaves_model_untouched():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    meta = Reptile(model, torch.optim.SGD, inner_lr=0.1, inner_steps=3, lr=0.5)
    t = make_tasks(n=1)[0]
    meta.adapt(lambda f: mse(f(t.support_x), t.support_y))
    meta.task_losses([t], mse)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_reptile_with_clone_learners_says_how_to_record_them():
    """learn2learn style (``learner = meta.clone()``, ``learner.adapt(loss)`` k times) records
    nothing, and step() said only "call meta.adapt(...) or meta.task_losses(...)", though the
    tasks had been adapted. The message names record_adaptation, and recording the learners'
    weights gives the paper's update towards their mean (reference: torch.optim.SGD copies)."""
    model, tasks = mlp(), make_tasks(n=2)
    start = [p.detach().clone() for p in model.parameters()]
    adapted = [sgd_adapted(model, t, 0.1, 3) for t in tasks]
    meta = Reptile(model, torch.optim.SGD, inner_lr=0.1, lr=0.5)
    learners = []
    for t in tasks:
        learner = meta.clone()
        for _ in range(3):
            learner.adapt(mse(learner(t.support_x), t.support_y))
        learners.append(learner)
    with pytest.raises(ValueError, match=r"a learner of meta\.clone\(\) is not recorded: .*meta\.record_adaptation\(learner\.params\)"):
        meta.step()
    for learner in learners:
        meta.record_adaptation(learner.params)
    meta.step()
    for p, p0, a, b in zip(model.parameters(), start, *adapted):
        torch.testing.assert_close(p.detach(), p0 + 0.5 * ((a + b) / 2 - p0), rtol=1e-12, atol=1e-14)


def test_reptile_errors_name_argument_and_value():
    model = mlp()
    meta = Reptile(model, torch.optim.SGD, inner_lr=0.1, lr=0.5)
    with pytest.raises(ValueError, match="Reptile.step found no adapted tasks"):
        meta.step()
    with pytest.raises(ValueError, match="Reptile.step found no adapted tasks"):
        meta.step(lambda: torch.tensor(0.0))
    t = make_tasks(n=1)[0]
    meta.adapt(lambda f: mse(f(t.support_x), t.support_y), weight=0.0)
    with pytest.raises(ValueError, match=r"task weights must not all be 0, got \[0\.0\]"):
        meta.step()
    assert meta.num_recorded == 1  # a step that raises changes nothing
    meta.clear_records()
    with pytest.raises(ValueError, match=r"weight must be a finite number >= 0, got -2\.0"):
        meta.adapt(lambda f: mse(f(t.support_x), t.support_y), weight=-2.0)
    with pytest.raises(ValueError, match="inner_lr must be a finite number >= 0, got -0.1"):
        Reptile(model, torch.optim.SGD, inner_lr=-0.1, lr=0.5)
    with pytest.raises(TypeError, match="inner_steps must be an integer >= 0, got 1.5"):
        Reptile(model, torch.optim.SGD, inner_steps=1.5, lr=0.5)
    with pytest.raises(TypeError, match="Reptile is always first order"):
        Reptile(model, torch.optim.SGD, first_order=False, lr=0.5)
    with pytest.raises(ValueError, match="got 0 tasks"):
        meta.task_losses([], mse)
    with pytest.raises(TypeError, match="support_closure must be callable, got None"):
        meta.adapt(None)
    before = [p.detach().clone() for p in model.parameters()]

    def failing():
        meta.adapt(lambda f: mse(f(t.support_x), t.support_y))
        raise RuntimeError("boom")

    meta.adapt(lambda f: mse(f(t.support_x), t.support_y))  # adapted before the step
    with pytest.raises(RuntimeError, match="boom"):
        meta.step(failing)
    assert meta.num_recorded == 1  # as before the step: the closure's record is dropped
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_pseudo_gradient_is_exact_up_to_one_rounding(dtype):
    # Weights ~ +-1 and inner updates ~ 1e-3: theta - mean(theta') in the parameter dtype loses
    # the update to rounding (bfloat16: an error 22 times the exact value); the differences
    # theta'_i - theta are exact, so only the final rounding to the dtype remains.
    torch.manual_seed(0)
    model = nn.Linear(64, 64).to(dtype)
    with torch.no_grad():
        model.weight.mul_(8.0)
    g = torch.Generator().manual_seed(1)
    tasks = [Task(*(torch.randn(8, 64, generator=g).to(dtype) for _ in range(4))) for _ in range(32)]
    weights = [float(1 + i % 3) for i in range(32)]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    meta = Reptile(model, torch.optim.SGD, inner_lr=0.01, inner_steps=5, lr=0.0)
    adapted = [
        meta.adapt(lambda f, t=t: mse(f(t.support_x), t.support_y), weight=w).params
        for t, w in zip(tasks, weights)
    ]
    meta.step()
    total = sum(weights)
    for n, p in model.named_parameters():
        exact = -sum((w / total) * (a[n].double() - theta[n].double()) for a, w in zip(adapted, weights))
        error = ((p.grad.double() - exact).norm() / exact.norm()).item()
        assert error < torch.finfo(dtype).eps, (n, error)


def test_a_weight_0_task_adds_nothing_even_with_nan_adapted_weights():
    tasks = make_tasks(n=2)
    bad = tasks[1]
    tasks[1] = Task(bad.support_x, torch.full_like(bad.support_y, float("nan")), bad.query_x, bad.query_y)
    both, alone = mlp(), mlp()
    meta_both = Reptile(both, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.5)
    meta_alone = Reptile(alone, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "pseudo-gradient is not finite" skip
        meta_both.step(reptile_closure(meta_both, tasks, weights=[1.0, 0.0]))
    meta_alone.step(reptile_closure(meta_alone, tasks[:1]))
    assert meta_both.skipped_steps == 0
    for p, q in zip(both.parameters(), alone.parameters()):
        assert torch.equal(p.grad, q.grad)
        assert torch.equal(p, q)


def test_adapt_with_a_closure_that_ignores_the_fast_weights_raises_and_records_nothing():
    model = mlp()
    t = make_tasks(n=1)[0]
    meta = Reptile(model, torch.optim.SGD, inner_lr=0.1, inner_steps=2, lr=0.5)
    with pytest.raises(ValueError, match="the support loss depends on none of the [0-9]+ adapted weights"):
        meta.adapt(lambda f: mse(model(t.support_x), t.support_y))
    assert meta.num_recorded == 0
    with pytest.raises(ValueError, match="Reptile.step found no adapted tasks"):
        meta.step()


@pytest.mark.parametrize("kind", [torch.optim.SGD, torch.optim.Adam])
def test_a_distributed_checkpoint_save_keeps_the_tasks_adapted_before_it(kind):
    """torch.distributed.checkpoint's save creates a missing optimizer state by a step at lr 0
    with zero gradients -- for a stateless SGD at every save. With tasks adapted before the save,
    Reptile took that call for a step: it stepped on their pseudo-gradient (Adam's moments came
    from it) and cleared the record, so the next step left those tasks out. A save changes
    nothing to the record: the next step equals one over every task (of a twin saved before it
    with no task pending: Adam's state is created at the save, from zero gradients, as torch
    does for a plain Adam)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tasks = make_tasks(4)
    reference_model, model = mlp(), mlp()
    reference = Reptile(reference_model, kind, inner_lr=0.05, inner_steps=2, lr=0.5)
    get_optimizer_state_dict(reference_model, reference)
    reference.step(reptile_closure(reference, tasks))

    meta = Reptile(model, kind, inner_lr=0.05, inner_steps=2, lr=0.5)
    reptile_closure(meta, tasks[:2])()
    weights = [p.detach().clone() for p in model.parameters()]
    get_optimizer_state_dict(model, meta)
    assert meta.num_recorded == 2
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    reptile_closure(meta, tasks[2:])()
    meta.step()
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_the_refusal_of_tasks_adapted_before_a_re_evaluating_step_names_clear_records():
    """Adaptations made for evaluation stay recorded; with an outer SAM every later
    ``step(closure)`` was refused, and the message's advice (adapt every task inside the
    closure) failed again: it names ``clear_records()``, which then lets the step through."""
    from samgria import SAM, TransformingOptimizer

    model = mlp()
    outer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.5, transforms=[SAM(0.05)])
    meta = Reptile(model, outer, inner_lr=0.05, inner_steps=2)
    tasks = make_tasks(3)
    reptile_closure(meta, tasks[:1])()  # adapted for evaluation
    with pytest.raises(RuntimeError, match=r"drop adaptations made for evaluation with meta\.clear_records\(\)"):
        meta.step(reptile_closure(meta, tasks))
    meta.clear_records()
    meta.step(reptile_closure(meta, tasks))
    assert meta.num_recorded == 0


@pytest.mark.parametrize(
    "adapted, error, match",
    [
        ({"0.weight": 1.0}, TypeError, r"^adapted\['0.weight'\] must be a tensor, got 1\.0$"),
        ([1.0], TypeError, r"^adapted must be a mapping of parameter names to tensors, got \[1\.0\]$"),
        ({"0.weight": torch.zeros(3, dtype=DT)}, ValueError,  # broadcast against (5, 3) in step: taken
         r"^adapted\['0.weight'\] must be a tensor of its parameter's shape \(5, 3\), got one of shape \(3,\)$"),
    ],
    ids=["non-tensor", "list", "broadcastable-shape"],
)
def test_record_adaptation_refuses_what_step_cannot_use_and_records_nothing(adapted, error, match):
    """A non-tensor failed with AttributeError after its task weight was counted; a weight of a
    broadcastable shape was recorded and stepped towards as if it were the parameter's."""
    model, t = mlp(), make_tasks(n=1)[0]
    meta = Reptile(model, torch.optim.SGD, inner_lr=0.1, lr=0.5)
    with pytest.raises(error, match=match):
        meta.record_adaptation(adapted)
    assert meta.num_recorded == 0 and meta._task_weight == 0.0  # nothing counted for the refused task
    # The next step is the one a fresh Reptile takes (reference: its twin never saw the refusal).
    twin_model = mlp()
    twin = Reptile(twin_model, torch.optim.SGD, inner_lr=0.1, lr=0.5)
    for m in (meta, twin):
        m.adapt(lambda f: mse(f(t.support_x), t.support_y))
        m.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))
