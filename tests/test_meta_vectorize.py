"""The vmap path equals the per-task loop (values and meta-gradients, float64), falls back
once when a model cannot be vmapped, and refuses second order through batch-statistics norms."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from meta_helpers import ItemModel
from samgria.data.task import Task
from samgria.meta import engine
from samgria.meta.anil import ANIL
from samgria.meta.maml import FOMAML, MAML
from samgria.meta.metasgd import MetaSGD
from samgria.meta.reptile import Reptile
from samgria.meta.vectorize import (
    batched_task_losses,
    can_vectorize,
    second_order_vmap_blocker,
    stack_tasks,
    vmap_task_losses,
)

DT = torch.float64
mse = nn.functional.mse_loss


def make_tasks(n=4, d=2, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Task(*(torch.randn(k, s, generator=g, dtype=DT) for s in (d, 1, d, 1))) for _ in range(n)]


def relu_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)).to(DT)


def losses_and_grads(meta, tasks, vectorize, **kw):
    meta.zero_grad()
    losses = meta.task_losses(tasks, mse, vectorize=vectorize, **kw)
    tensors = [p for g in meta.param_groups for p in g["params"]]
    if losses.requires_grad:
        losses.sum().backward()
    grads = [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in tensors]
    return losses.detach(), grads


BUILDERS = {
    "maml": lambda m: MAML(m, torch.optim.SGD, inner_lr=0.05, inner_steps=3, lr=0.1),
    "fomaml": lambda m: FOMAML(m, torch.optim.SGD, inner_lr=0.05, inner_steps=3, lr=0.1),
    "metasgd": lambda m: MetaSGD(m, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.1),
    "anil": lambda m: ANIL(m, torch.optim.SGD, head=m[4], inner_lr=0.05, inner_steps=3, lr=0.1),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_vmap_equals_loop_values_and_meta_gradients(name):
    model = relu_mlp()
    meta = BUILDERS[name](model)
    tasks = make_tasks()
    lv, gv = losses_and_grads(meta, tasks, True)
    ll, gl = losses_and_grads(meta, tasks, False)
    torch.testing.assert_close(lv, ll, rtol=0, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in gl)
    for a, b in zip(gv, gl):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_vmap_equals_loop_with_create_graph_false():
    model = relu_mlp()
    meta = MAML(model, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.1)
    tasks = make_tasks()
    lv, gv = losses_and_grads(meta, tasks, True, create_graph=False)
    ll, gl = losses_and_grads(meta, tasks, False, create_graph=False)
    for a, b in zip(gv + [lv], gl + [ll]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_reptile_vmap_equals_loop_adapted_weights():
    tasks = make_tasks()
    results = []
    for vectorize in (True, False):
        model = relu_mlp()
        meta = Reptile(model, torch.optim.SGD, inner_lr=0.05, inner_steps=3, lr=0.7)
        meta.step(lambda: meta.task_losses(tasks, mse, vectorize=vectorize).mean())
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_evaluate_vmap_equals_loop():
    model = relu_mlp()
    meta = MAML(model, torch.optim.SGD, inner_lr=0.05, inner_steps=3, lr=0.1)
    tasks = make_tasks()
    loop = meta.task_losses(tasks, mse, vectorize=False).mean().item()
    assert meta.evaluate(tasks, mse) == pytest.approx(loop, rel=1e-12)


def test_vmap_task_losses_function_returns_batched_adapted_params():
    model = relu_mlp()
    tasks = make_tasks(n=3)
    params = dict(model.named_parameters())
    names = list(params)
    losses, fast = vmap_task_losses(model, params, names, {n: 0.1 for n in names}, tasks, mse, 1, return_params=True)
    assert losses.shape == (3,)
    assert fast["0.weight"].shape == (3, 8, 2)
    g = torch.autograd.grad(mse(model(tasks[1].support_x), tasks[1].support_y), model[0].weight)[0]
    torch.testing.assert_close(fast["0.weight"][1], model[0].weight - 0.1 * g, rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match=r"^adapt_names must be a sequence of parameter names, got '0\.weight'$"):
        vmap_task_losses(model, params, "0.weight", {"0.weight": 0.1}, tasks, mse, 1)


def test_batched_task_losses_is_pure_and_grad_and_value_gives_the_maml_gradient():
    model = relu_mlp()
    tasks = make_tasks()
    names = [n for n, _ in model.named_parameters()]
    lrs = {n: 0.05 for n in names}
    meta = MAML(model, torch.optim.SGD, inner_lr=0.05, inner_steps=2, lr=0.1)
    _, reference = losses_and_grads(meta, tasks, False)

    def meta_loss(params):
        losses, _ = batched_task_losses(model, params, names, lrs, *stack_tasks(tasks), mse, 2)
        return losses.sum()

    detached = {n: p.detach() for n, p in model.named_parameters()}
    grads, value = torch.func.grad_and_value(meta_loss)(detached)
    torch.testing.assert_close(value, meta.task_losses(tasks, mse, vectorize=False).sum().detach(), rtol=0, atol=1e-10)
    for n, r in zip(names, reference):
        torch.testing.assert_close(grads[n], r, rtol=0, atol=1e-10)


@pytest.mark.parametrize("make", ["adapt_false_groups", "anil_frozen_head", "reptile_adapt_false"])
def test_nothing_to_adapt_is_refused_on_the_loop_and_vmap_paths_alike(make):
    """A meta-optimizer that adapts no parameter is refused when used, on every path (the loop
    once raised deep in autograd.grad while vmap ran zero-step adaptation); inner_steps=0 with an
    adapted group is the way to train without adaptation."""
    model = relu_mlp()
    if make == "adapt_false_groups":
        meta = MAML(model, torch.optim.SGD, lr=0.1, params=[{"params": model.parameters(), "adapt": False}])
        reason = "every param group has adapt=False"
    elif make == "anil_frozen_head":
        for p in model[4].parameters():
            p.requires_grad_(False)
        meta = ANIL(model, torch.optim.SGD, lr=0.1, head=model[4])
        reason = r"none of head's parameters \['4\.weight', '4\.bias'\] in a param group with adapt=True requires grad"
    else:
        meta = Reptile(model, torch.optim.SGD, lr=0.1)
        meta.param_groups[0]["adapt"] = False
        reason = "every param group has adapt=False"
    tasks = make_tasks()
    for vectorize in (True, False):
        with pytest.raises(ValueError, match=rf"^{type(meta).__name__} adapts no parameter in the inner loop: {reason}; "):
            meta.task_losses(tasks, mse, vectorize=vectorize)
    # Zero-step adaptation: inner_steps=0 gives the query losses at the model's own weights.
    model = relu_mlp()
    meta = MAML(model, torch.optim.SGD, lr=0.1)
    vmapped = meta.task_losses(tasks, mse, inner_steps=0, vectorize=True)
    looped = meta.task_losses(tasks, mse, inner_steps=0, vectorize=False)
    torch.testing.assert_close(looped, vmapped)
    expected = torch.stack([mse(model(t.query_x), t.query_y) for t in tasks])
    torch.testing.assert_close(looped.detach(), expected.detach(), rtol=1e-12, atol=1e-12)


def test_unequal_shapes_loop_and_vectorize_true_raises():
    model = relu_mlp()
    meta = MAML(model, torch.optim.SGD, lr=0.1)
    tasks = make_tasks(n=2) + make_tasks(n=1, k=4)
    assert not can_vectorize(tasks) and can_vectorize(make_tasks(n=2)) and not can_vectorize([])
    assert meta.task_losses(tasks, mse).shape == (3,)  # loop, silently
    with pytest.raises(ValueError, match="vectorize=True cannot be honoured: the tasks do not all have equal shapes"):
        meta.task_losses(tasks, mse, vectorize=True)
    with pytest.raises(TypeError, match="vectorize must be None or a bool, got 'yes'"):
        meta.task_losses(tasks, mse, vectorize="yes")


def test_stack_tasks_adds_a_task_axis():
    tasks = make_tasks(n=3)
    sx, sy, qx, qy = stack_tasks(tasks)
    assert sx.shape == (3, 6, 2) and qy.shape == (3, 6, 1)
    assert torch.equal(qx[2], tasks[2].query_x)


def test_fallback_to_loop_warns_once_and_remembers():
    torch.manual_seed(0)
    model = ItemModel().to(DT)
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, lr=0.1)
    tasks = make_tasks(n=3)
    with pytest.warns(RuntimeWarning, match="MAML: the vmap path failed .*; this step ran on the loop path, and the vmap path is not tried again"):
        first = meta.task_losses(tasks, mse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = meta.task_losses(tasks, mse)
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, meta.task_losses(tasks, mse, vectorize=False))
    with pytest.raises(RuntimeError, match="MAML: the vmap path failed earlier"):
        meta.task_losses(tasks, mse, vectorize=True)


def test_a_users_loss_fn_error_propagates_without_disabling_vmap():
    meta = MAML(relu_mlp(), torch.optim.SGD, inner_lr=0.05, lr=0.1)
    tasks = make_tasks(n=3)

    def broken_loss(prediction, target):
        raise KeyError("typo in my loss")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no misleading "vmap failed" warning
        with pytest.raises(KeyError, match="typo in my loss"):
            meta.task_losses(tasks, broken_loss)
        assert "vmap" not in meta.path_policy.failed
        meta.task_losses(tasks, mse)  # still vectorised, still no warning


def test_non_scalar_loss_is_an_error_in_both_paths():
    model = relu_mlp()
    meta = FOMAML(model, torch.optim.SGD, lr=0.1)
    tasks = make_tasks(n=2)

    def per_element(pred, target):
        return (pred - target) ** 2

    with pytest.raises(ValueError, match=r"^the query loss of a task must be a scalar tensor, got shape \(6, 1\)$"):
        meta.task_losses(tasks, per_element, steps=0, vectorize=True)
    with pytest.raises(ValueError, match=r"^the query loss of a task must be a scalar tensor, got shape \(6, 1\)$"):
        meta.evaluate(tasks, per_element, steps=0)  # not mistaken for a model that cannot be vmapped
    with pytest.raises(ValueError, match=r"^the query loss of tasks\[0\] must be a scalar tensor, got shape \(6, 1\)$"):
        meta.task_losses(tasks, per_element, steps=0, vectorize=False)
    # On the path asked for, the error comes out as raised, of its own type.
    with pytest.raises(TypeError, match=r"^the query loss of a task must be a scalar tensor, got float\b"):
        meta.task_losses(tasks, lambda p, t: 1.0, steps=0, vectorize=True)
    with pytest.raises(TypeError, match=r"^the query loss of tasks\[0\] must be a scalar tensor, got float$"):
        meta.task_losses(tasks, lambda p, t: 1.0, steps=0, vectorize=False)


def batchnorm_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).to(DT)


def _per_task_reference(model, tasks, lr, steps, first_order):
    """Query losses and their summed meta-gradient, task by task with torch.autograd (MAML)."""
    names = [n for n, _ in model.named_parameters()]
    meta_params = [p for _, p in model.named_parameters()]
    losses = []
    for task in tasks:
        fast = list(meta_params)
        for _ in range(steps):
            support = mse(torch.func.functional_call(model, dict(zip(names, fast)), (task.support_x,)), task.support_y)
            grads = torch.autograd.grad(support, fast, create_graph=not first_order)
            fast = [w - lr * g for w, g in zip(fast, grads)]
        losses.append(mse(torch.func.functional_call(model, dict(zip(names, fast)), (task.query_x,)), task.query_y))
    losses = torch.stack(losses)
    return losses.detach(), torch.autograd.grad(losses.sum(), meta_params)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("entry", ["vmap_task_losses", "batched_task_losses"])
def test_the_public_vmap_functions_equal_a_per_task_loop_in_losses_and_meta_gradients(entry, first_order):
    model = relu_mlp()
    tasks = make_tasks(n=3)
    params = dict(model.named_parameters())
    names = list(params)
    lrs = {n: 0.05 for n in names}
    if entry == "vmap_task_losses":
        losses, _ = vmap_task_losses(model, params, names, lrs, tasks, mse, 2, first_order=first_order)
    else:
        losses, _ = batched_task_losses(model, params, names, lrs, *stack_tasks(tasks), mse, 2, first_order=first_order)
    grads = torch.autograd.grad(losses.sum(), list(params.values()))
    expected_losses, expected_grads = _per_task_reference(model, tasks, 0.05, 2, first_order)
    torch.testing.assert_close(losses.detach(), expected_losses, rtol=1e-12, atol=1e-14)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("norm", ["layer_norm", "batch_norm"])
def test_the_public_vmap_functions_refuse_second_order_through_a_norm_vmap_gets_wrong(norm):
    """Their second-order meta-gradients would be wrong (pytorch/functorch#534); first order is exact."""
    torch.manual_seed(0)
    layer = nn.LayerNorm(8) if norm == "layer_norm" else nn.BatchNorm1d(8)
    model = nn.Sequential(nn.Linear(2, 8), layer, nn.Tanh(), nn.Linear(8, 1)).to(DT)
    tasks = make_tasks(n=3)
    params = dict(model.named_parameters())
    names = list(params)
    lrs = {n: 0.3 for n in names}
    name = "LayerNorm" if norm == "layer_norm" else "BatchNorm1d"
    message = rf"this inner loop cannot be vmapped: second-order gradients pass through 1 \({name}\), whose double backward"
    with pytest.raises(ValueError, match=message):
        vmap_task_losses(model, params, names, lrs, tasks, mse, 2)
    with pytest.raises(ValueError, match=message):
        batched_task_losses(model, params, names, lrs, *stack_tasks(tasks), mse, 2)
    losses, _ = vmap_task_losses(model, params, names, lrs, tasks, mse, 2, first_order=True)
    grads = torch.autograd.grad(losses.sum(), list(params.values()))
    expected_losses, expected_grads = _per_task_reference(model, tasks, 0.3, 2, first_order=True)
    torch.testing.assert_close(losses.detach(), expected_losses, rtol=1e-12, atol=1e-14)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_the_public_vmap_functions_check_their_arguments():
    model = relu_mlp()
    tasks = make_tasks(n=2)
    params = dict(model.named_parameters())
    names = list(params)
    lrs = {n: 0.1 for n in names}
    with pytest.raises(ValueError, match=r"^the support loss must be a scalar tensor, got shape \(6, 1\)$"):
        vmap_task_losses(model, params, names, lrs, tasks, lambda p, t: (p - t) ** 2, 1, first_order=True)
    with pytest.raises(ValueError, match=r"^stack_tasks needs tasks whose tensors all have equal shapes, dtypes and devices, got tasks\[1\]\.query_x of shape"):
        vmap_task_losses(model, params, names, lrs, [tasks[0], dataclasses.replace(tasks[1], query_x=tasks[1].query_x[:2], query_y=tasks[1].query_y[:2])], mse, 1)
    with pytest.raises(ValueError, match=r"^steps must be an integer >= 0, got -1$"):
        vmap_task_losses(model, params, names, lrs, tasks, mse, -1)
    with pytest.raises(TypeError, match=r"^steps must be an integer >= 0, got 1\.5$"):
        batched_task_losses(model, params, names, lrs, *stack_tasks(tasks), mse, 1.5)
    with pytest.raises(ValueError, match=r"^tasks must be a non-empty sequence of Task, got \[\]$"):
        vmap_task_losses(model, params, names, lrs, [], mse, 1)


def test_stack_tasks_names_the_task_and_field_that_differ():
    tasks = make_tasks(n=2)
    with pytest.raises(ValueError, match=r"got tasks\[1\]\.query_x of shape \(4, 2\), torch\.float64 on cpu and tasks\[0\]\.query_x of shape \(6, 2\), torch\.float64 on cpu$"):
        stack_tasks([tasks[0], Task(tasks[1].support_x, tasks[1].support_y, tasks[1].query_x[:4], tasks[1].query_y[:4])])
    with pytest.raises(ValueError, match=r"got tasks\[1\]\.support_y of shape \(6, 1\), torch\.float32 on cpu and tasks\[0\]\.support_y of shape \(6, 1\), torch\.float64 on cpu$"):
        stack_tasks([tasks[0], Task(tasks[1].support_x, tasks[1].support_y.float(), tasks[1].query_x, tasks[1].query_y)])
    with pytest.raises(ValueError, match=r"stack_tasks needs tasks whose tensors all have equal shapes, dtypes and devices, got no tasks$"):
        stack_tasks([])


def test_second_order_vmap_blocker_names_the_module():
    assert second_order_vmap_blocker(relu_mlp()) is None
    bn = batchnorm_model()
    assert second_order_vmap_blocker(bn) == "1 (BatchNorm1d)"
    bn.eval()
    assert second_order_vmap_blocker(bn) is None
    assert second_order_vmap_blocker(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))) == "1 (LayerNorm)"
    assert second_order_vmap_blocker(nn.InstanceNorm1d(3)) == "<model> (InstanceNorm1d)"
    assert second_order_vmap_blocker(nn.Sequential(nn.Linear(2, 4), nn.GroupNorm(2, 4))) is None


def test_batchnorm_second_order_uses_the_loop_and_first_order_still_vmaps():
    model = batchnorm_model()
    tasks = make_tasks()
    maml = MAML(model, torch.optim.SGD, inner_lr=0.1, inner_steps=2, lr=0.1)
    with pytest.raises(ValueError, match=r"second-order gradients pass through 1 \(BatchNorm1d\), whose double backward torch.func.vmap gets wrong.*functorch#534"):
        maml.task_losses(tasks, mse, vectorize=True)
    auto = losses_and_grads(maml, tasks, None)
    loop = losses_and_grads(maml, tasks, False)
    for a, b in zip(auto[1], loop[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    fo = FOMAML(model, torch.optim.SGD, inner_lr=0.1, inner_steps=2, lr=0.1)
    lv, gv = losses_and_grads(fo, tasks, True)  # first order through BatchNorm: vmapped and exact
    ll, gl = losses_and_grads(fo, tasks, False)
    torch.testing.assert_close(lv, ll, rtol=0, atol=1e-10)
    for a, b in zip(gv, gl):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert model[1].num_batches_tracked.item() == 0


def test_batchnorm_eval_mode_second_order_vmaps_exactly():
    model = batchnorm_model()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    meta = MAML(model, torch.optim.SGD, inner_lr=0.1, inner_steps=2, lr=0.1)
    tasks = make_tasks()
    lv, gv = losses_and_grads(meta, tasks, True)
    ll, gl = losses_and_grads(meta, tasks, False)
    torch.testing.assert_close(lv, ll, rtol=0, atol=1e-10)
    for a, b in zip(gv, gl):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_dropout_model_is_vmapped_with_independent_randomness():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Dropout(0.5), nn.Linear(16, 1)).to(DT)
    meta = MAML(model, torch.optim.SGD, inner_lr=0.05, lr=0.1)
    tasks = [make_tasks(n=1)[0]] * 3  # identical tasks: only dropout makes the losses differ
    losses = meta.task_losses(tasks, mse, vectorize=True)
    assert losses.shape == (3,) and len(set(losses.tolist())) == 3
    model.eval()
    same = meta.task_losses(tasks, mse, vectorize=True)
    assert len(set(same.tolist())) == 1


def _anil(model, head):
    return ANIL(model, torch.optim.SGD, head=head, inner_lr=0.3, inner_steps=2, lr=0.1)


def test_a_second_order_loop_that_adapts_only_after_the_norm_layers_vmaps_exactly():
    """ANIL's support gradient stops at the head, so the body's BatchNorm needs only its first
    backward, which vmap batches correctly; it was refused (sent to the loop, with a message
    calling the meta-gradient wrong). The loop path is the reference."""
    model = batchnorm_model()
    tasks = make_tasks(n=3)
    anil = _anil(model, model[3])
    assert engine.vmap_blocker(model, anil.inner_loop(), tasks) is None
    vmapped = losses_and_grads(anil, tasks, True)
    looped = losses_and_grads(anil, tasks, False)
    torch.testing.assert_close(vmapped[0], looped[0], rtol=1e-12, atol=1e-14)
    for got, want in zip(vmapped[1], looped[1]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


class _GainHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(6) + 0.5)
        self.lin = nn.Linear(6, 1)

    def forward(self, h):
        return self.lin(h * self.gain)


class _Chain(nn.Sequential):
    def forward(self, x):  # its own forward: the order of the children says nothing
        return self[2](self[1](torch.tanh(self[0](x))))


def _blocker_of_head_only_loop(model, head):
    return engine.vmap_blocker(model, _anil(model, head).inner_loop(), make_tasks(n=2))


def test_the_vmap_blocker_lets_through_only_norms_before_the_first_adapted_child_of_a_sequential():
    reached = "second-order gradients pass through {}, whose double backward torch.func.vmap gets wrong"
    maybe = "second-order gradients may pass through {}, whose double backward torch.func.vmap gets wrong"
    torch.manual_seed(0)
    before = nn.Sequential(nn.Linear(2, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
    assert _blocker_of_head_only_loop(before, before[3]) is None
    # A norm after the adapted child, or inside it.
    after = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 1)).to(DT)
    assert reached.format("3 (LayerNorm)") in _blocker_of_head_only_loop(after, after[2])
    inside = nn.Sequential(nn.Linear(2, 6), nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 1))).to(DT)
    assert reached.format("1.1 (LayerNorm)") in _blocker_of_head_only_loop(inside, inside[1])
    # One norm module used before and after the head.
    norm = nn.LayerNorm(6)
    reused = nn.Sequential(nn.Linear(2, 6), norm, nn.Linear(6, 6), norm, nn.Linear(6, 1)).to(DT)
    assert reached.format("1 (LayerNorm)") in _blocker_of_head_only_loop(reused, reused[2])
    # The norm's weight is the adapted head's parameter (registered under both).
    shared = nn.Sequential(nn.Linear(2, 6), nn.LayerNorm(6, bias=False), nn.Tanh(), _GainHead()).to(DT)
    shared[1].weight = shared[3].gain
    assert reached.format("1 (LayerNorm)") in _blocker_of_head_only_loop(shared, shared[3])
    # Not told without running the model: its own forward, or a hook that could route anything.
    custom = _Chain(nn.Linear(2, 6), nn.LayerNorm(6), nn.Linear(6, 1)).to(DT)
    assert maybe.format("1 (LayerNorm)") in _blocker_of_head_only_loop(custom, custom[2])
    hooked = nn.Sequential(nn.Linear(2, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
    handle = hooked[0].register_forward_hook(lambda module, inputs, output: output)
    assert maybe.format("1 (LayerNorm)") in _blocker_of_head_only_loop(hooked, hooked[3])
    handle.remove()
    assert _blocker_of_head_only_loop(hooked, hooked[3]) is None


def test_a_norm_sharing_the_adapted_heads_parameter_keeps_second_order_on_the_loop():
    """The shared weight is adapted: the support gradient's double backward goes through the
    norm, which vmap gets wrong. The default path must give the loop's meta-gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 6), nn.LayerNorm(6, bias=False), nn.Tanh(), _GainHead()).to(DT)
    model[1].weight = model[3].gain
    tasks = make_tasks(n=3)
    anil = _anil(model, model[3])
    chosen = losses_and_grads(anil, tasks, None)
    looped = losses_and_grads(anil, tasks, False)
    for got, want in zip(chosen[1], looped[1]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"tasks": 5}, TypeError, r"^tasks must be a sequence of Task, got 5$"),
        ({"adapt_names": ["0.weight", "head.weight"]}, ValueError, r"^adapt_names must name entries of params \(\['0.weight', '0.bias', '2.weight', '2.bias', '4.weight', '4.bias'\]\), got \['head.weight'\]$"),
        ({"lrs": [0.1, 0.1, 0.1, 0.1]}, TypeError, r"^lrs must be a mapping from every adapted name to its step size, got \[0.1, 0.1, 0.1, 0.1\]$"),
        ({"lrs": "rates"}, TypeError, r"^lrs must be a mapping from every adapted name to its step size, got 'rates'$"),
        ({"lrs": {"0.weight": torch.full((3, 3), 0.1), "0.bias": 0.1, "2.weight": 0.1, "2.bias": 0.1, "4.weight": 0.1, "4.bias": 0.1}}, ValueError,
         r"^lrs\['0.weight'\] must be a number or a tensor that broadcasts to the parameter's shape \(8, 2\), got a tensor of shape \(3, 3\)$"),
    ],
    ids=["tasks-int", "adapt-name-not-in-params", "lrs-list", "lrs-str", "rate-of-another-shape"],
)
def test_the_public_vmap_functions_name_the_argument_that_is_wrong(change, error, match):
    """A name to adapt that params lacks raised "lrs has no entry for the adapted parameters"
    (or a KeyError when lrs had one), an lrs that is no mapping the TypeError of dict(), a rate of
    another shape a broadcasting RuntimeError from inside vmap, and tasks that are no iterable a
    ValueError."""
    model = relu_mlp()
    params = dict(model.named_parameters())
    args = {"params": params, "adapt_names": list(params), "lrs": {n: 0.1 for n in params}, "tasks": make_tasks(n=2)}
    args.update(change)
    with pytest.raises(error, match=match):
        vmap_task_losses(model, args["params"], args["adapt_names"], args["lrs"], args["tasks"], mse, 1)
    if "tasks" not in change:
        with pytest.raises(error, match=match):
            batched_task_losses(model, args["params"], args["adapt_names"], args["lrs"], *stack_tasks(args["tasks"]), mse, 1)


def test_vmap_task_losses_takes_any_iterable_of_tasks():
    model = relu_mlp()
    params = dict(model.named_parameters())
    tasks = make_tasks(n=3)
    lrs = {n: 0.1 for n in params}
    expected, _ = vmap_task_losses(model, params, list(params), lrs, tasks, mse, 1)
    got, _ = vmap_task_losses(model, params, list(params), lrs, (t for t in tasks), mse, 1)
    assert torch.equal(got, expected)


def test_a_norm_in_eval_mode_without_running_stats_blocks_second_order_vmap():
    """An eval-mode BatchNorm/InstanceNorm with track_running_stats=False normalises with batch
    statistics (its double backward under vmap is wrong): named; with running stats it is not."""
    from samgria.meta.engine import second_order_vmap_blocker

    for norm in (torch.nn.BatchNorm1d(3, track_running_stats=False), torch.nn.InstanceNorm1d(3)):
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), norm).eval()
        assert second_order_vmap_blocker(model) == f"1 ({type(norm).__name__})"
    assert second_order_vmap_blocker(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).eval()) is None
