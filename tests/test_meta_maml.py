"""MAML / FOMAML / MetaOptimizer: meta-gradients against closed forms and finite differences,
optimizer plumbing (param groups, schedulers, state_dict), BatchNorm policy and bad inputs."""

from __future__ import annotations

import copy

import pytest
import numpy as np
import torch
from torch import nn

from meta_helpers import finite_difference_grad
from state_helpers import assert_state_dicts_equal
from samgria.data.task import Task
from samgria.meta.base import MetaOptimizer
from samgria.meta.functional import functional_forward, named_params
from samgria.meta.inner_optim import InnerSAM
from samgria.meta.maml import FOMAML, MAML
from samgria.meta.metasgd import MetaSGD

DT = torch.float64
mse = nn.functional.mse_loss


def make_tasks(n=3, d=3, k=5, seed=0, out=1):
    g = torch.Generator().manual_seed(seed)
    return [
        Task(
            torch.randn(k, d, generator=g, dtype=DT),
            torch.randn(k, out, generator=g, dtype=DT),
            torch.randn(k, d, generator=g, dtype=DT),
            torch.randn(k, out, generator=g, dtype=DT),
        )
        for _ in range(n)
    ]


def linear_model(d=3, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, 1, bias=False).to(DT)


def mlp(d=3, hidden=5, seed=0, act=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), act(), nn.Linear(hidden, 1)).to(DT)


def ls_grad(w, x, y):
    """Gradient of mean((x w^T - y)^2) w.r.t. the row vector w."""
    return (2.0 / x.shape[0]) * ((x @ w.T - y).T @ x)


def ls_hessian(x):
    return (2.0 / x.shape[0]) * x.T @ x


def closed_form_maml_grad(w, tasks, alpha, first_order=False):
    """Analytic one-step MAML meta-gradient of the mean query loss on least squares."""
    total = torch.zeros_like(w)
    eye = torch.eye(w.shape[1], dtype=w.dtype)
    for t in tasks:
        w_adapted = w - alpha * ls_grad(w, t.support_x, t.support_y)
        g_q = ls_grad(w_adapted, t.query_x, t.query_y)
        total += g_q if first_order else g_q @ (eye - alpha * ls_hessian(t.support_x))
    return total / len(tasks)


def closure_meta_grad(meta, tasks, steps=None):
    """Meta-gradient through the public closure API (adapt + learner)."""
    meta.zero_grad()
    losses = []
    for t in tasks:
        learner = meta.adapt(lambda f, t=t: mse(f(t.support_x), t.support_y), steps)
        losses.append(mse(learner(t.query_x), t.query_y))
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("vectorize", [False, True])
def test_maml_meta_gradient_equals_closed_form_on_least_squares(vectorize):
    model = linear_model()
    tasks = make_tasks()
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, lr=0.5)
    meta.zero_grad()
    meta.task_losses(tasks, mse, vectorize=vectorize).mean().backward()
    expected = closed_form_maml_grad(model.weight.detach(), tasks, 0.1)
    torch.testing.assert_close(model.weight.grad, expected, rtol=0, atol=1e-12)


def test_maml_step_applies_sgd_update_with_closed_form_gradient():
    model = linear_model()
    tasks = make_tasks()
    w0 = model.weight.detach().clone()
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, lr=0.5)
    loss = meta.step(lambda: closure_meta_grad(meta, tasks))
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    expected = w0 - 0.5 * closed_form_maml_grad(w0, tasks, 0.1)
    torch.testing.assert_close(model.weight.detach(), expected, rtol=0, atol=1e-12)


def test_fomaml_gradient_is_query_gradient_at_adapted_weights():
    model = linear_model()
    tasks = make_tasks()
    meta = FOMAML(model, torch.optim.SGD, inner_lr=0.1, lr=0.5)
    assert meta.first_order is True
    closure_meta_grad(meta, tasks)
    expected = closed_form_maml_grad(model.weight.detach(), tasks, 0.1, first_order=True)
    torch.testing.assert_close(model.weight.grad, expected, rtol=0, atol=1e-12)
    # Same as MAML(first_order=True), and different from second-order MAML.
    twin = linear_model()
    MAML(twin, torch.optim.SGD, inner_lr=0.1, first_order=True, lr=0.5).task_losses(tasks, mse).mean().backward()
    torch.testing.assert_close(twin.weight.grad, model.weight.grad, rtol=0, atol=1e-12)
    second = closed_form_maml_grad(model.weight.detach(), tasks, 0.1)
    assert (second - expected).abs().max() > 1e-3


def test_fomaml_on_mlp_matches_independent_query_gradient():
    model = mlp()
    tasks = make_tasks(n=2)
    meta = FOMAML(model, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.1)
    closure_meta_grad(meta, tasks)
    # Independent reference: adapt a deep copy with torch.optim.SGD, take its query gradient.
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for t in tasks:
        clone = copy.deepcopy(model)
        inner = torch.optim.SGD(clone.parameters(), lr=0.05)
        for _ in range(2):
            inner.zero_grad()
            mse(clone(t.support_x), t.support_y).backward()
            inner.step()
        inner.zero_grad()
        mse(clone(t.query_x), t.query_y).backward()
        for e, p in zip(expected, clone.parameters()):
            e += p.grad / len(tasks)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_matches_finite_differences(first_order):
    model = mlp()
    tasks = make_tasks(n=2)
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, inner_steps=2, first_order=first_order, lr=0.1)
    closure_meta_grad(meta, tasks)
    analytic = [p.grad.clone() for p in model.parameters()]
    if first_order:
        # FOMAML is not the gradient of the meta-loss: check it differs from finite differences.
        fd = finite_difference_grad(lambda: meta.task_losses(tasks, mse, vectorize=False, create_graph=True).mean(),
                                    list(model.parameters()))
        assert max((a - f).abs().max().item() for a, f in zip(analytic, fd)) > 1e-4
        return
    fd = finite_difference_grad(lambda: meta.evaluate(tasks, mse) * torch.ones((), dtype=DT), list(model.parameters()))
    for a, f in zip(analytic, fd):
        torch.testing.assert_close(a, f, rtol=1e-6, atol=1e-8)


def test_create_graph_false_gives_first_order_gradient():
    model = linear_model()
    tasks = make_tasks()
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, lr=0.5)
    meta.task_losses(tasks, mse, create_graph=False).mean().backward()
    expected = closed_form_maml_grad(model.weight.detach(), tasks, 0.1, first_order=True)
    torch.testing.assert_close(model.weight.grad, expected, rtol=0, atol=1e-12)


def test_adapt_returns_learner_with_adapted_params_and_steps_override():
    model = linear_model()
    t = make_tasks(n=1)[0]
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, inner_steps=1, lr=0.5)
    learner = meta.adapt(lambda f: mse(f(t.support_x), t.support_y), steps=3)
    w = model.weight.detach()
    for _ in range(3):
        w = w - 0.1 * ls_grad(w, t.support_x, t.support_y)
    torch.testing.assert_close(learner.params["weight"], w, rtol=0, atol=1e-12)
    torch.testing.assert_close(learner(t.query_x), t.query_x @ w.T, rtol=0, atol=1e-12)
    assert learner.params["weight"].grad_fn is not None  # graph-connected to the meta-params
    # weight is accepted (and ignored) by the MAML family
    meta.adapt(lambda f: mse(f(t.support_x), t.support_y), weight=2.0)


def test_adapt_and_task_losses_leave_model_untouched_only_step_changes_it():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    tasks = make_tasks()
    before = copy.deepcopy(model.state_dict())
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, inner_steps=2, lr=0.5)
    meta.adapt(lambda f: mse(f(tasks[0].support_x), tasks[0].support_y))
    meta.task_losses(tasks, mse)
    meta.evaluate(tasks, mse)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    meta.step(lambda: closure_meta_grad(meta, tasks))
    assert not torch.equal(model[0].weight, before["0.weight"])
    for k in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(model.state_dict()[k], before[k]), k


# ----------------------------------------------------------------------------- BatchNorm policy
def test_batchnorm_second_order_maml_runs_and_matches_finite_differences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT).train()
    tasks = make_tasks(n=2)
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, inner_steps=3, lr=0.1)
    closure_meta_grad(meta, tasks)  # no in-place modification error
    analytic = [p.grad.clone() for p in model.parameters()]
    fd = finite_difference_grad(
        lambda: meta.task_losses(tasks, mse, vectorize=False, create_graph=False).mean(), list(model.parameters())
    )
    for a, f in zip(analytic, fd):
        torch.testing.assert_close(a, f, rtol=1e-6, atol=1e-8)
    assert model[1].num_batches_tracked.item() == 0
    assert torch.equal(model[1].running_mean, torch.zeros(4, dtype=DT))


def test_batchnorm_uses_batch_statistics_in_train_mode_and_running_stats_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(DT)
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(2.0)
    x = torch.randn(6, 3, dtype=DT)
    meta = MAML(model, torch.optim.SGD, inner_lr=0.0, lr=0.1)
    learner = meta.clone()
    h = model[0](x)
    train_expected = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * model[1].weight + model[1].bias
    torch.testing.assert_close(learner(x), train_expected)
    model.eval()
    eval_expected = (h - 0.5) / torch.sqrt(torch.tensor(2.0 + 1e-5, dtype=DT)) * model[1].weight + model[1].bias
    torch.testing.assert_close(learner(x), eval_expected)


# ----------------------------------------------------------------------------- plumbing
def test_param_groups_are_the_outer_optimizer_list_and_schedulers_work():
    model = linear_model()
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, lr=1.0)
    assert meta.param_groups is meta.outer.param_groups
    assert meta.param_groups[0]["inner_lr"] == 0.1 and meta.param_groups[0]["adapt"] is True
    assert meta.defaults["inner_lr"] == 0.1 and meta.defaults["lr"] == 1.0
    weight = next(model.parameters())
    meta.outer.state[weight]["written_by_outer"] = 1  # the outer optimizer writes into meta.state
    assert meta.state[weight]["written_by_outer"] == 1
    sched = torch.optim.lr_scheduler.StepLR(meta, step_size=1, gamma=0.5)
    tasks = make_tasks()
    meta.step(lambda: closure_meta_grad(meta, tasks))
    sched.step()
    assert meta.outer.param_groups[0]["lr"] == 0.5
    assert isinstance(meta, torch.optim.Optimizer)


def test_already_built_outer_optimizer_with_groups_per_group_inner_lr_and_adapt_false():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    outer = torch.optim.SGD(
        [{"params": [model.weight], "inner_lr": 0.3}, {"params": [model.bias], "adapt": False}], lr=0.1
    )
    meta = MAML(model, outer, inner_lr=0.05)
    assert meta.outer is outer
    assert meta.param_groups[1]["inner_lr"] == 0.05  # filled from the constructor
    x, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    learner = meta.adapt(lambda f: mse(f(x), y))
    g_w = torch.autograd.grad(mse(model(x), y), model.weight)[0]
    torch.testing.assert_close(learner.params["weight"], model.weight - 0.3 * g_w)
    assert learner.params["bias"] is model.bias  # not adapted ...
    mse(learner(x), y).backward()
    assert model.bias.grad is not None  # ... but still a meta-parameter
    # editing a group's inner_lr takes effect at the next adaptation
    meta.param_groups[0]["inner_lr"] = 0.0
    assert torch.equal(meta.adapt(lambda f: mse(f(x), y)).params["weight"], model.weight)


def test_params_argument_builds_groups_from_an_optimizer_class():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    meta = MAML(model, torch.optim.Adam, params=[{"params": [model.weight]}, {"params": [model.bias], "adapt": False}], lr=1e-3)
    assert [g["adapt"] for g in meta.param_groups] == [True, False]
    assert meta.clone().adapt_names == ["weight"]


def test_add_param_group_fills_inner_defaults():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).to(DT)
    meta = MAML(model, torch.optim.SGD, params=model[0].parameters(), inner_lr=0.2, lr=0.1)
    meta.add_param_group({"params": model[1].parameters(), "adapt": False})
    assert meta.param_groups[1]["inner_lr"] == 0.2 and meta.param_groups[1]["adapt"] is False
    with pytest.raises(ValueError, match="not a parameter of model"):
        meta.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_add_param_group_refuses_a_set_as_torch_does():
    """A set's order changes between runs, and checkpoints pair state with parameters by position:
    torch's optimizers (and the meta-optimizers' constructors) refuse one; add_param_group took it."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).to(DT)
    meta = MAML(model, torch.optim.Adam, params=model[0].parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"^param_groups\[1\]: params must be an ordered collection \(a list or tuple\), got a set"):
        meta.add_param_group({"params": set(model[1].parameters())})
    assert len(meta.param_groups) == 1


def test_a_plain_outer_optimizers_checkpoint_keeps_the_groups_inner_settings():
    """A checkpoint of the bare outer optimizer has no inner_lr or adapt: the groups lost them
    (param_groups[0]["inner_lr"] raised KeyError); they keep the values they had."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).to(DT)
    plain = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[1].parameters()}], lr=0.01)
    meta = MAML(model, torch.optim.Adam, params=[{"params": model[0].parameters(), "inner_lr": 0.3}, {"params": model[1].parameters(), "adapt": False}], lr=0.1)
    meta.load_state_dict(plain.state_dict())
    assert [(g["inner_lr"], g["adapt"], g["lr"]) for g in meta.param_groups] == [(0.3, True, 0.01), (0.01, False, 0.01)]


def test_state_dict_round_trip_continues_bit_for_bit():
    tasks = make_tasks()
    model_a = mlp()
    meta_a = MAML(model_a, torch.optim.Adam, inner_lr=0.1, lr=1e-2)
    for _ in range(2):
        meta_a.step(lambda: closure_meta_grad(meta_a, tasks))
    model_b = copy.deepcopy(model_a)
    meta_b = MAML(model_b, torch.optim.Adam, inner_lr=0.7, lr=5.0)
    meta_b.load_state_dict(copy.deepcopy(meta_a.state_dict()))
    assert meta_b.param_groups[0]["inner_lr"] == 0.1 and meta_b.param_groups[0]["lr"] == 1e-2
    for _ in range(2):
        meta_a.step(lambda: closure_meta_grad(meta_a, tasks))
        meta_b.step(lambda: closure_meta_grad(meta_b, tasks))
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("cls", ["MAML", "FOMAML", "MetaSGD", "Reptile"])
def test_state_dict_hooks_registered_on_a_meta_optimizer_run(cls):
    from samgria.meta.metasgd import MetaSGD
    from samgria.meta.reptile import Reptile

    classes = {"MAML": MAML, "FOMAML": FOMAML, "MetaSGD": MetaSGD, "Reptile": Reptile}
    meta = classes[cls](mlp(), torch.optim.SGD, lr=0.1)
    fired = []
    meta.register_state_dict_pre_hook(lambda opt: fired.append("pre"))
    meta.register_state_dict_post_hook(lambda opt, sd: fired.append("post"))
    meta.register_load_state_dict_pre_hook(lambda opt, sd: fired.append("load_pre"))
    meta.register_load_state_dict_post_hook(lambda opt: fired.append("load_post"))
    meta.load_state_dict(meta.state_dict())
    assert fired == ["pre", "post", "load_pre", "load_post"]


class TwiceSGD(torch.optim.Optimizer):
    """A SAM-like optimizer: evaluates the closure twice, steps with the second gradient."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})
        self.calls = 0

    @torch.no_grad()
    def step(self, closure):
        with torch.enable_grad():
            first = closure()
        self.calls += 1
        with torch.enable_grad():
            closure()
        self.calls += 1
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])
        return first


def test_closure_is_passed_through_to_an_outer_optimizer_that_calls_it_twice():
    model = linear_model()
    tasks = make_tasks()
    w0 = model.weight.detach().clone()
    meta = MAML(model, TwiceSGD, inner_lr=0.1, lr=0.5)
    loss = meta.step(lambda: closure_meta_grad(meta, tasks))
    assert meta.outer.calls == 2
    assert torch.is_tensor(loss)
    torch.testing.assert_close(model.weight.detach(), w0 - 0.5 * closed_form_maml_grad(w0, tasks, 0.1), rtol=0, atol=1e-12)


def test_sam_transforming_optimizer_on_the_outer_loop():
    optim = pytest.importorskip("samgria.optim")
    sam_mod = pytest.importorskip("samgria.transforms.sam")
    model = linear_model()
    tasks = make_tasks()
    w0 = model.weight.detach().clone()
    rho, lr, alpha = 0.05, 0.5, 0.1
    outer = optim.TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=lr, transforms=[sam_mod.SAM(rho=rho)])
    meta = MAML(model, outer, inner_lr=alpha)
    calls = []

    def closure():
        calls.append(1)
        return closure_meta_grad(meta, tasks)

    meta.step(closure)
    assert len(calls) == 2
    g = closed_form_maml_grad(w0, tasks, alpha)
    g_sam = closed_form_maml_grad(w0 + rho * g / g.norm(), tasks, alpha)
    torch.testing.assert_close(model.weight.detach(), w0 - lr * g_sam, rtol=0, atol=1e-10)


@pytest.mark.parametrize("algorithm", ["MAML", "Reptile"])
def test_a_step_without_closure_is_refused_when_the_outer_optimizer_re_evaluates(algorithm):
    """A framework loop that steps without a closure (Hugging Face's Trainer, a loss scaler) got
    the outer SAM's message, which sends the user to SAMTrainer or SAMMixedPrecision: the classes
    that were in use. The meta-optimizer says what its outer optimizer needs, before any change."""
    import samgria
    from samgria.optim import TransformingOptimizer
    from samgria.transforms import SAM

    model = mlp()
    outer = TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=0.1, transforms=[SAM(rho=0.05)])
    meta = getattr(samgria, algorithm)(model, outer, inner_lr=0.1)
    tasks = make_tasks()
    if algorithm == "MAML":
        closure_meta_grad(meta, tasks)
    else:
        for task in tasks:
            meta.adapt(lambda f, task=task: mse(f(task.support_x), task.support_y))
    before = copy.deepcopy((model.state_dict(), meta.state_dict(), [p.grad for p in model.parameters()]))
    with pytest.raises(
        RuntimeError,
        match=rf"^{algorithm}\.step\(\) got no closure, but its outer optimizer runs SAM, which "
        rf"re-evaluate\(s\) the loss: pass the closure .*{algorithm}\.step\(closure\)\. A training loop .*"
        r"Hugging Face's Trainer and SAMTrainer",
    ):
        meta.step()
    after = (model.state_dict(), meta.state_dict(), [p.grad for p in model.parameters()])
    for key, value in before[0].items():
        assert torch.equal(after[0][key], value)
    assert_state_dicts_equal(after[1], before[1])
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(after[2], before[2]))


@pytest.mark.parametrize("algorithm", ["MAML", "Reptile"])
@pytest.mark.parametrize("with_closure", [False, True])
def test_a_meta_step_refuses_an_outer_two_call_step_begun_and_cancel_step_puts_it_back(algorithm, with_closure):
    """MAML.step() finished an outer SAM step begun with outer.first_step() outside its checks: a
    non-finite second pass was skipped with the weights left perturbed and the step pending, a
    loss scaler's overflow skipped the meta-step and left it pending too, and under Reptile,
    whose pseudo-gradient exists only inside step(), first_step() had perturbed nothing, so SAM
    was silently dropped."""
    import samgria
    from samgria.optim import TransformingOptimizer
    from samgria.transforms import SAM

    tasks = make_tasks()

    def build():
        model = mlp()
        outer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(rho=0.05)])
        return model, outer, getattr(samgria, algorithm)(model, outer, inner_lr=0.1)

    def closure_of(meta):
        if algorithm == "MAML":
            return lambda: closure_meta_grad(meta, tasks)

        def adapt_all():
            for task in tasks:
                meta.adapt(lambda f, task=task: mse(f(task.support_x), task.support_y))
            return torch.tensor(0.0)

        return adapt_all

    model, outer, meta = build()
    weights = [p.detach().clone() for p in model.parameters()]
    model.zero_grad()
    mse(model(tasks[0].support_x), tasks[0].support_y).backward()  # a first pass's gradients
    outer.first_step()
    perturbed = [p.detach().clone() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(perturbed, weights))
    with pytest.raises(
        RuntimeError,
        match=rf"^{algorithm}\.step\(\) found its outer optimizer's two-call step begun \(outer\.first_step\(\) "
        rf"was called\): .*Call outer\.cancel_step\(\) to put the weights back, then {algorithm}\.step\(closure\)",
    ):
        meta.step(closure_of(meta)) if with_closure else meta.step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), perturbed))  # as before the call
    outer.cancel_step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    meta.step(closure_of(meta))
    twin_model, _, twin = build()
    twin.step(closure_of(twin))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))


def test_exception_in_closure_leaves_model_unchanged():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    meta = MAML(model, torch.optim.Adam, lr=0.1)
    tasks = make_tasks()

    def closure():
        closure_meta_grad(meta, tasks)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        meta.step(closure)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_evaluate_is_mean_query_loss_and_touches_nothing():
    model = mlp()
    tasks = make_tasks()
    meta = MAML(model, torch.optim.Adam, inner_lr=0.1, inner_steps=2, lr=0.1)
    expected = meta.task_losses(tasks, mse, vectorize=False).mean().item()
    meta.zero_grad()
    outer_state = copy.deepcopy(meta.state_dict())
    value = meta.evaluate(tasks, mse)
    assert isinstance(value, float)
    assert value == pytest.approx(expected, rel=1e-12)
    assert all(p.grad is None for p in model.parameters())
    assert meta.state_dict() == outer_state
    assert meta.evaluate(tasks, mse, steps=0) == pytest.approx(
        torch.stack([mse(model(t.query_x), t.query_y) for t in tasks]).mean().item(), rel=1e-12
    )


def test_meta_loss_weighted_mean_and_count_mismatch():
    losses = torch.tensor([1.0, 2.0, 4.0], dtype=DT)
    assert MetaOptimizer.meta_loss(losses).item() == pytest.approx(7 / 3)
    assert MetaOptimizer.meta_loss(list(losses), [1.0, 0.0, 1.0]).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="got 2 weights for 3 losses"):
        MetaOptimizer.meta_loss(losses, [1.0, 2.0])
    with pytest.raises(
        ValueError, match=r"^weights must be a 1-D sequence of one weight per task loss, got shape \(1, 2\)$"
    ):
        MetaOptimizer.meta_loss(torch.tensor([1.0, 2.0]), [[1, 2]])
    with pytest.raises(ValueError, match=r"got shape \(\)$"):
        MetaOptimizer.meta_loss(torch.tensor([1.0]), 1.0)
    with pytest.raises(ValueError, match=r"got shape \(\)$"):
        MetaOptimizer.meta_loss(torch.tensor([1.0]), np.array(1.0))
    with pytest.raises(ValueError, match="at least one task loss, got 0"):
        MetaOptimizer.meta_loss([])
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        MetaOptimizer.meta_loss(losses, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="must not all be 0"):
        MetaOptimizer.meta_loss(losses, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_meta_loss_weighs_16_bit_losses_in_float32_and_takes_weights_beyond_their_range(dtype):
    """meta_loss cast the weights to the losses' dtype: with float16 losses a weight of 1e5 was
    refused as 'weights must be finite and >= 0, got [inf, 1.0]', weights [4e4, 4e4] (sum beyond
    float16) gave a NaN meta-loss and zero gradients without a word, and bfloat16 rounded 1.01 to
    1.0078. The weights are checked as given and scaled by a power of two (which changes no
    rounding) into the range of the computing dtype, float32 for 16-bit losses, and the mean is
    rounded to the losses' dtype once."""
    values = [0.5, 2.0]
    for weights in ([1e5, 1.0], [4e4, 4e4], [1.0, 1.01], [1e300, 3e300]):
        losses = torch.tensor(values, dtype=dtype, requires_grad=True)
        loss = MetaOptimizer.meta_loss(losses, weights)
        loss.backward()
        exact = sum(w * v for w, v in zip(weights, values)) / sum(weights)
        expected_grad = torch.tensor([w / sum(weights) for w in weights], dtype=DT)
        assert loss.dtype == dtype
        if dtype == torch.float32:  # computed in float32: within a few roundings
            torch.testing.assert_close(loss, torch.tensor(exact, dtype=dtype), rtol=1e-6, atol=0)
            torch.testing.assert_close(losses.grad, expected_grad.to(dtype), rtol=1e-6, atol=0)
        else:  # computed in float32, rounded once to 16 bits: the correctly rounded value
            assert loss.item() == torch.tensor(exact, dtype=dtype).item()
            assert torch.equal(losses.grad, expected_grad.to(dtype))
    float64 = torch.tensor([1.0, 2.0, 4.0], dtype=DT)  # unchanged bit for bit where it fits
    weights = [0.3, 1.7, 2.9]
    w = torch.tensor(weights, dtype=DT)
    assert torch.equal(MetaOptimizer.meta_loss(float64, weights), (w * float64).sum() / w.sum())


@pytest.mark.parametrize("as_list", [False, True], ids=["tensor", "list"])
def test_meta_loss_differentiates_weights_that_require_grad(as_list):
    """Learned task weights (a tensor that requires grad, or such tensors in a list) were read
    as numbers: the meta-loss had the right value but no gradient reached the weights
    (``weights.grad`` stayed None, silently). They are differentiated through as the losses are,
    :math:`\\partial L / \\partial w_i = (\\ell_i - L) / \\sum_j w_j`, with the value unchanged bit for bit."""
    losses = torch.tensor([1.0, 2.0, 4.0], dtype=DT, requires_grad=True)
    learned = torch.tensor([0.3, 1.7, 2.9], dtype=DT, requires_grad=True)
    weights = [learned[0], 1.7, learned[2]] if as_list else learned
    loss = MetaOptimizer.meta_loss(losses, weights)
    loss.backward()
    w, values = torch.tensor([0.3, 1.7, 2.9], dtype=DT), losses.detach()
    expected = (w * values).sum() / w.sum()
    assert torch.equal(loss.detach(), MetaOptimizer.meta_loss(values, [0.3, 1.7, 2.9]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-15)
    grad = (values - expected) / w.sum()
    if as_list:
        grad[1] = 0.0  # a number: no gradient
    torch.testing.assert_close(learned.grad, grad, rtol=1e-14, atol=0)
    torch.testing.assert_close(losses.grad, w / w.sum(), rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "weights, message",
    [
        ([True, False, True], r"^weights\[0\] must be a finite number >= 0, got True$"),
        ([1.0, np.bool_(False), 1.0], r"^weights\[1\] must be a finite number >= 0, got np\.False_$"),
        ([1.0, 2.0, torch.tensor(True)], r"^weights\[2\] must be a finite number >= 0, got tensor\(True\)$"),
        (torch.tensor([True, False, True]), r"^weights must be finite numbers >= 0, got a tensor of dtype torch\.bool: \[True, False, True\]$"),
    ],
    ids=["bool", "numpy-bool", "bool-tensor-item", "bool-tensor"],
)
def test_meta_loss_refuses_truth_values_as_weights(weights, message):
    """A task weight that is a truth value is refused everywhere else (adapt, meta_step.task,
    add_task_weight); meta_loss read True as 1."""
    losses = torch.tensor([1.0, 2.0, 4.0], dtype=DT)
    with pytest.raises(TypeError, match=message):
        MetaOptimizer.meta_loss(losses, weights)


@pytest.mark.parametrize("cls", [MAML, FOMAML])
def test_adapt_with_a_closure_that_ignores_the_fast_weights_raises_and_changes_nothing(cls):
    model = mlp()
    t = make_tasks(n=1)[0]
    meta = cls(model, torch.optim.SGD, inner_lr=0.1, inner_steps=2, lr=0.5)
    before = copy.deepcopy(model.state_dict())
    other = torch.randn(3, 1, dtype=DT, requires_grad=True)
    closures = (
        lambda f: mse(model(t.support_x), t.support_y),  # the model, not f: unconnected from step 2 on
        lambda f: mse(t.support_x @ other, t.support_y),
    )
    for closure in closures:
        with pytest.raises(ValueError, match="the support loss depends on none of the [0-9]+ adapted weights"):
            meta.adapt(closure)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())
    assert meta._task_weight == 0.0  # no task was counted


def test_one_second_order_step_on_the_model_adapts_as_with_f_unless_a_transform_moves_the_fast_weights():
    """The meta guide: with ``inner_steps=1`` second-order MAML accepts a support loss computed
    with ``model`` (its first step starts from theta) and adapts exactly as with ``f``; InnerSAM
    evaluates the loss again at moved fast weights, where such a loss is refused."""
    model = mlp()
    t = make_tasks(n=1)[0]
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, inner_steps=1, lr=0.5, first_order=False)
    on_model = meta.adapt(lambda f: mse(model(t.support_x), t.support_y)).params
    on_f = meta.adapt(lambda f: mse(f(t.support_x), t.support_y)).params
    assert all(torch.equal(on_model[name], on_f[name]) for name in on_f)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="the support loss depends on none of the [0-9]+ adapted weights"):
        meta.adapt(lambda f: mse(model(t.support_x), t.support_y), grad_transforms=[InnerSAM(0.05)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- bad inputs
def test_constructor_rejects_bad_inputs_with_messages():
    model = linear_model()
    with pytest.raises(ValueError, match=r"inner_lr must be a finite number >= 0, got -1\.0"):
        MAML(model, torch.optim.SGD, inner_lr=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 0, got -1"):
        MAML(model, torch.optim.SGD, inner_steps=-1, lr=0.1)
    with pytest.raises(TypeError, match=r"inner_steps must be an integer >= 0, got 2\.0"):
        MAML(model, torch.optim.SGD, inner_steps=2.0, lr=0.1)
    with pytest.raises(TypeError, match="inner_steps must be an integer >= 0, got True"):
        MAML(model, torch.optim.SGD, inner_steps=True, lr=0.1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        MAML([model.weight], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="outer must be a torch.optim.Optimizer subclass or instance, got 'sgd'"):
        MAML(model, "sgd", lr=0.1)
    with pytest.raises(TypeError, match="outer must be a torch.optim.Optimizer subclass or instance"):
        MAML(model, nn.Linear)
    with pytest.raises(TypeError, match=r"outer_kwargs \['lr'\] can only be given when outer is an optimizer class"):
        MAML(model, torch.optim.SGD(model.parameters(), lr=0.1), lr=0.1)
    with pytest.raises(TypeError, match="first_order must be a bool, got 1"):
        MAML(model, torch.optim.SGD, first_order=1, lr=0.1)
    with pytest.raises(TypeError, match="FOMAML is always first order; got first_order=False"):
        FOMAML(model, torch.optim.SGD, first_order=False, lr=0.1)
    with pytest.raises(ValueError, match="not a parameter of model"):
        MAML(model, torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))
    with pytest.raises(ValueError, match="model has no parameters"):
        MAML(nn.ReLU(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match=r"param_groups\[0\]: adapt must be a bool, got 'yes'"):
        MAML(model, torch.optim.SGD([{"params": model.parameters(), "adapt": "yes"}], lr=0.1))
    with pytest.raises(ValueError, match=r"param_groups\[0\]: inner_lr must be a finite number >= 0, got -0\.5"):
        MAML(model, torch.optim.SGD([{"params": model.parameters(), "inner_lr": -0.5}], lr=0.1))


def test_adapt_and_task_losses_reject_bad_inputs_with_messages():
    model = linear_model()
    meta = MAML(model, torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="support_closure must be callable, got 3"):
        meta.adapt(3)
    with pytest.raises(ValueError, match=r"^steps must be an integer >= 0, got -1$"):
        meta.adapt(lambda f: f(torch.zeros(1, 3, dtype=DT)).sum(), steps=-1)
    with pytest.raises(ValueError, match="weight must be a finite number >= 0, got -1"):
        meta.adapt(lambda f: f(torch.zeros(1, 3, dtype=DT)).sum(), weight=-1)
    with pytest.raises(ValueError, match="tasks must be a non-empty sequence of Task, got 0 tasks"):
        meta.task_losses([], mse)
    with pytest.raises(ValueError, match="tasks must be a non-empty sequence of Task, got 0 tasks"):
        meta.evaluate([], mse)
    with pytest.raises(TypeError, match=r"tasks\[0\] must be a Task, got tuple"):
        meta.task_losses([(1, 2, 3, 4)], mse)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        meta.task_losses(make_tasks(), "mse")
    with pytest.raises(ValueError, match="support loss must be a scalar tensor, got shape"):
        meta.adapt(lambda f: f(torch.zeros(2, 3, dtype=DT)))
    # a param group edited to a bad inner_lr is caught at adaptation time
    meta.param_groups[0]["inner_lr"] = -3.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]: inner_lr must be a finite number >= 0, got -3\.0"):
        meta.adapt(lambda f: f(torch.zeros(1, 3, dtype=DT)).sum())


def test_functional_forward_of_learner_matches_named_params_at_zero_steps():
    model = mlp()
    meta = MAML(model, torch.optim.SGD, lr=0.1)
    learner = meta.adapt(lambda f: f(torch.zeros(1, 3, dtype=DT)).sum(), steps=0)
    x = torch.randn(4, 3, dtype=DT)
    assert torch.equal(learner(x), functional_forward(model, named_params(model), x))
    assert repr(meta).startswith("MAML(outer=SGD")


def test_step_hooks_fire_and_meta_optimizer_pickles_and_deep_copies():
    import pickle

    model = linear_model()
    tasks = make_tasks()
    meta = MAML(model, torch.optim.Adam, inner_lr=0.1, lr=1e-2)
    seen = []
    meta.register_step_pre_hook(lambda opt, args, kwargs: seen.append("pre"))
    meta.register_step_post_hook(lambda opt, args, kwargs: seen.append("post"))
    meta.step(lambda: closure_meta_grad(meta, tasks))
    assert seen == ["pre", "post"]
    for twin in (pickle.loads(pickle.dumps(meta)), copy.deepcopy(meta)):
        assert twin.param_groups is twin.outer.param_groups
        assert twin.param_groups[0]["params"][0] is twin.model.weight
        assert torch.equal(twin.model.weight, model.weight)
        twin.step(lambda: closure_meta_grad(twin, tasks))
        meta_copy_state = twin.state_dict()["state"][0]["exp_avg"]
        assert meta_copy_state.shape == model.weight.shape
    assert seen == ["pre", "post"]  # hooks are not carried over (as in torch.optim)


# ----------------------------------------------------------------------------- weight normalisation
def weight_norm_mlp(kind="parametrization"):
    """:func:`mlp` with its first layer weight-normalised by torch (``weight = g v / ||v||``,
    norm over each row); returns the model and the names of ``(g, v)``."""
    model = mlp()
    if kind == "parametrization":
        nn.utils.parametrizations.weight_norm(model[0])
        return model, ("0.parametrizations.weight.original0", "0.parametrizations.weight.original1")
    with pytest.warns(FutureWarning, match="deprecated"):
        nn.utils.weight_norm(model[0])
    return model, ("0.weight_g", "0.weight_v")


def weight_norm_reference_loss(params, names, tasks, lrs, steps):
    """The second-order meta-loss of :func:`weight_norm_mlp` with the normalisation written out
    (``g v / ||v||``) on an MLP without it, by ``torch.func.functional_call`` and
    ``torch.autograd.grad(create_graph=True)``; ``lrs`` maps each name to its step size."""
    plain = mlp()
    g_name, v_name = names

    def forward(w, x):
        v = w[v_name]
        weights = {"0.weight": w[g_name] * v / v.norm(dim=1, keepdim=True), "0.bias": w["0.bias"],
                   "2.weight": w["2.weight"], "2.bias": w["2.bias"]}
        return torch.func.functional_call(plain, weights, (x,))

    total = 0
    for t in tasks:
        fast = dict(params)
        for _ in range(steps):
            loss = mse(forward(fast, t.support_x), t.support_y)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - lrs[n] * g for (n, p), g in zip(fast.items(), grads)}
        total = total + mse(forward(fast, t.query_x), t.query_y)
    return total / len(tasks)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap of torch._weight_norm
@pytest.mark.parametrize("path", ["loop", "vmap", "learner"])
@pytest.mark.parametrize("algorithm, steps", [("MAML", 1), ("MAML", 2), ("MetaSGD", 2)])
def test_second_order_meta_gradient_through_weight_norm_equals_the_written_out_formula(algorithm, steps, path):
    """torch._weight_norm (dim 0) runs a fused kernel whose double backward is wrong; the inner
    loop must compute g v / ||v|| instead (it was off by about 1e-2)."""
    model, names = weight_norm_mlp()
    tasks = make_tasks(n=3)
    cls = MAML if algorithm == "MAML" else MetaSGD
    meta = cls(model, torch.optim.SGD, lr=0.1, inner_lr=0.2, inner_steps=steps)
    params = dict(model.named_parameters())
    lrs = dict(meta.inner_lrs) if cls is MetaSGD else dict.fromkeys(params, 0.2)
    meta.zero_grad()
    if path == "learner":  # the forward of a Learner, one adapt(loss) per step
        losses = []
        for t in tasks:
            learner = meta.clone()
            for _ in range(steps):
                learner.adapt(mse(learner(t.support_x), t.support_y))
            losses.append(mse(learner(t.query_x), t.query_y))
        torch.stack(losses).mean().backward()
    else:
        meta.task_losses(tasks, mse, vectorize=path == "vmap").mean().backward()
    wrt = list(params.values()) + (list(lrs.values()) if cls is MetaSGD else [])
    reference = torch.autograd.grad(weight_norm_reference_loss(params, names, tasks, lrs, steps), wrt)
    for tensor, expected in zip(wrt, reference):
        torch.testing.assert_close(tensor.grad, expected, rtol=1e-9, atol=1e-12)

    # The reference itself against a central difference of the meta-loss, on one entry of v.
    v = params[names[1]]
    h, old = 1e-6, v[1, 2].item()
    values = []
    for moved in (old + h, old - h):
        with torch.no_grad():
            v[1, 2] = moved
        values.append(weight_norm_reference_loss(params, names, tasks, lrs, steps).item())
    with torch.no_grad():
        v[1, 2] = old
    assert v.grad[1, 2].item() == pytest.approx((values[0] - values[1]) / (2 * h), rel=1e-6, abs=1e-9)


def test_second_order_meta_gradient_through_hook_based_weight_norm_equals_the_written_out_formula():
    """The deprecated hook-based torch.nn.utils.weight_norm calls the same torch._weight_norm."""
    model, names = weight_norm_mlp("hook")
    tasks = make_tasks(n=2)
    meta = MAML(model, torch.optim.SGD, lr=0.1, inner_lr=0.2, inner_steps=2)
    params = dict(model.named_parameters())
    meta.zero_grad()
    meta.task_losses(tasks, mse, vectorize=False).mean().backward()
    reference = torch.autograd.grad(
        weight_norm_reference_loss(params, names, tasks, dict.fromkeys(params, 0.2), 2), list(params.values())
    )
    for tensor, expected in zip(params.values(), reference):
        torch.testing.assert_close(tensor.grad, expected, rtol=1e-9, atol=1e-12)
