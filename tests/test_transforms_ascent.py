"""MultiStepSAM against SAM, hand-written float64 references and optax.contrib.sam.

The references are per-tensor transcriptions of the multi-step ascent (dicts of tensors by
parameter name, gradients from ``torch.func.functional_call``), independent of samgria; the inner
optimizer is torch's own, stepped with the reference's gradients. optax's ``sam`` (opaque mode) is
run on the same float64 problem in JAX (skipped when JAX or optax is not installed, unless
``SAMGRIA_REQUIRE_INTEGRATIONS`` is set, as in CI). The contracts every transform keeps (the
two-call loop, checkpoints, bad inputs, ...) are tested through ``transform_infos.py`` by
``test_transforms_generic.py`` for ``ascent_steps=1``; here they are tested for longer ascents.
"""

from __future__ import annotations

import copy
import fractions
import functools
import io
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.func import functional_call
from transform_infos import assert_bitwise_equal, make_closure, make_data, make_model, params_of

from samgria import SAM, MultiStepSAM, TransformingOptimizer, frozen_bn_stats

SGD = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
ADAMW = (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 1e-2})
FIRST_LAYER = {"0.weight", "0.bias"}
MOMENTUM = functools.partial(torch.optim.SGD, momentum=0.9)


# -- the independent reference -------------------------------------------------------------------------
def gradients(model, weights, x, y):
    """Gradient of the MSE loss at ``weights`` (name -> tensor); ``None`` where torch gives none."""
    trainable = {n: w.detach().clone().requires_grad_(p.requires_grad) for (n, p), w in zip(model.named_parameters(), weights.values())}
    loss = nn.functional.mse_loss(functional_call(model, trainable, (x,)), y)
    names = [n for n, t in trainable.items() if t.requires_grad]
    out = dict.fromkeys(trainable)
    out.update(zip(names, torch.autograd.grad(loss, [trainable[n] for n in names], allow_unused=True)))
    return out


def norm(g):
    return math.sqrt(sum(float((t * t).sum()) for t in g.values() if t is not None))


def ascent_reference(rho_of, n, momentum=None, reset_state=True, normalize=True):
    r"""a_0 = w; a_{i+1} = a_i + u_i with u_i = rho g_i/|g_i| (or momentum SGD's step on -g_i/|g_i|);
    the inner optimizer steps with g_n = grad L(a_n)."""
    buffers = {}

    def step(t, w, grad):
        if reset_state:
            buffers.clear()
        a = dict(w)
        g = grad(a)
        for _ in range(n):
            size = norm(g) if normalize else 1.0
            moved = {}
            for name, value in a.items():
                if g[name] is None or rho_of(name) == 0:
                    moved[name] = value
                    continue
                d = -g[name] / size  # the gradient of -L handed to the adversary
                if momentum is not None:  # torch SGD: buf = d at first, then m buf + d
                    buffers[name] = d.clone() if name not in buffers else momentum * buffers[name] + d
                    d = buffers[name]
                moved[name] = value - rho_of(name) * d
            a = moved
            g = grad(a)
        return g

    return step


def run_reference(algorithm, steps, inner=SGD, groups=None):
    x, y = make_data()
    model = make_model()
    named = dict(model.named_parameters())
    cls, kwargs = inner
    optimizer = cls(groups(model) if groups else model.parameters(), **kwargs)
    for t in range(steps):
        weights = {n: p.detach().clone() for n, p in named.items()}
        grads = algorithm(t, weights, lambda w: gradients(model, w, x, y))
        for n, p in named.items():
            p.grad = grads.get(n)
        optimizer.step()
    return params_of(model)


def build(transform, inner=SGD, groups=None, model=None, **optimizer_kwargs):
    model = make_model() if model is None else model
    cls, kwargs = inner
    params = groups(model) if groups else model.parameters()
    return model, TransformingOptimizer(params, cls, transforms=[transform], **optimizer_kwargs, **kwargs)


def run_samgria(transform, steps, inner=SGD, groups=None, **optimizer_kwargs):
    x, y = make_data()
    model, optimizer = build(transform, inner, groups, **optimizer_kwargs)
    closure = make_closure(model, optimizer, x, y)
    for _ in range(steps):
        optimizer.step(closure)
    return params_of(model)


def two_groups(first=None, rest=None):
    """The first layer with ``first``'s keys, every other parameter with ``rest``'s."""

    def groups(model):
        named = dict(model.named_parameters())
        return [
            {"params": [named[n] for n in named if n in FIRST_LAYER], **(first or {})},
            {"params": [named[n] for n in named if n not in FIRST_LAYER], **(rest or {})},
        ]

    return groups


def per_group(first, rest):
    return lambda name: first if name in FIRST_LAYER else rest


def assert_close(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def state_snapshot(optimizer):
    return copy.deepcopy(optimizer.state_dict())


def assert_same_state(before, after):
    assert before["state"].keys() == after["state"].keys()
    for index, entry in before["state"].items():
        assert entry.keys() == after["state"][index].keys()
        for key, value in entry.items():
            other = after["state"][index][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


# -- SAM, bit for bit ----------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("inner", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_default_is_sam_bitwise(inner, foreach):
    got = run_samgria(MultiStepSAM(rho=0.05), 6, inner, transform_foreach=foreach)
    assert_bitwise_equal(got, run_samgria(SAM(rho=0.05), 6, inner, transform_foreach=foreach))


def test_default_is_sam_bitwise_with_per_group_rho_and_in_the_two_call_loop():
    groups = two_groups({"rho": 0.0}, {"rho": 0.2})
    assert_bitwise_equal(run_samgria(MultiStepSAM(0.05), 5, groups=groups), run_samgria(SAM(0.05), 5, groups=groups))
    x, y = make_data()
    model, optimizer = build(MultiStepSAM(0.05))
    for _ in range(5):
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.first_step()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.second_step(zero_grad=True)
    assert_bitwise_equal(params_of(model), run_samgria(SAM(0.05), 5))


# -- multi-step ascent against the references -----------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("inner", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_multi_step_ascent_matches_reference(inner, n):
    expected = run_reference(ascent_reference(lambda name: 0.05, n), 5, inner)
    got = run_samgria(MultiStepSAM(0.05, ascent_steps=n), 5, inner)
    assert_close(got, expected)
    assert any(not torch.equal(a, b) for a, b in zip(got, run_samgria(SAM(0.05), 5, inner)))


def test_multi_step_ascent_per_group_rho_and_unnormalized():
    expected = run_reference(ascent_reference(per_group(0.0, 0.1), 3), 5)
    assert_close(run_samgria(MultiStepSAM(0.1, ascent_steps=3), 5, groups=two_groups({"rho": 0.0})), expected)
    expected = run_reference(ascent_reference(lambda name: 0.5, 2, normalize=False), 5)
    assert_close(run_samgria(MultiStepSAM(0.5, ascent_steps=2, normalize=False), 5), expected)


def test_every_ascent_step_takes_each_groups_own_rho():
    # Two groups that both move, with different radii: every step of the ascent (not only the
    # first) scales each group's part by that group's rho.
    expected = run_reference(ascent_reference(per_group(0.02, 0.1), 3), 5)
    assert_close(run_samgria(MultiStepSAM(0.1, ascent_steps=3), 5, groups=two_groups({"rho": 0.02})), expected)


@pytest.mark.parametrize("momentum", [None, 0.9], ids=["sgd", "momentum"])
def test_an_unnormalized_adversary_climbs_along_the_raw_gradient(momentum):
    # normalize=False hands the adversary -g (not -g / |g|): its SGD step w - rho (-g) climbs L.
    adversary = torch.optim.SGD if momentum is None else functools.partial(torch.optim.SGD, momentum=momentum)
    expected = run_reference(ascent_reference(lambda name: 0.5, 2, momentum=momentum, normalize=False), 5)
    assert_close(run_samgria(MultiStepSAM(0.5, ascent_steps=2, adversary=adversary, normalize=False), 5), expected)


def test_a_stationary_point_inside_the_ascent_moves_nothing_and_the_ascent_goes_on():
    # The gradient vanishes at a_1: the second ascent step moves nothing, the closure is still
    # re-evaluated there (ascent_steps re-evaluations), and the inner step takes that gradient.
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    gradients_at = [torch.tensor([3.0, 4.0]), torch.zeros(2), torch.tensor([-1.0, 0.5])]
    optimizer = TransformingOptimizer([w], torch.optim.SGD, lr=0.1, transforms=[MultiStepSAM(0.5, ascent_steps=2)])
    points = []

    def closure():
        optimizer.zero_grad()
        g = gradients_at[len(points)].double()
        points.append(w.detach().clone())
        loss = (w * g).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    a_1 = torch.tensor([1.0 + 0.5 * 3 / 5, 2.0 + 0.5 * 4 / 5], dtype=torch.float64)
    assert len(points) == 3
    torch.testing.assert_close(points[1], a_1, rtol=0, atol=1e-15)
    assert torch.equal(points[2], points[1])
    assert torch.equal(w.detach(), torch.tensor([1.0 + 0.1, 2.0 - 0.05], dtype=torch.float64))


@pytest.mark.parametrize("reset_state", [True, False], ids=["reset", "kept"])
@pytest.mark.parametrize("n", [1, 3])
def test_momentum_adversary_matches_reference(n, reset_state):
    expected = run_reference(ascent_reference(per_group(0.02, 0.05), n, momentum=0.9, reset_state=reset_state), 5)
    transform = MultiStepSAM(0.05, ascent_steps=n, adversary=MOMENTUM, reset_state=reset_state)
    got = run_samgria(transform, 5, groups=two_groups({"rho": 0.02}))
    assert_close(got, expected)


def test_sgd_adversary_is_the_default_step_up_to_rounding():
    expected = run_samgria(MultiStepSAM(0.05, ascent_steps=3), 5)
    assert_close(run_samgria(MultiStepSAM(0.05, ascent_steps=3, adversary=torch.optim.SGD), 5), expected)


def test_reset_state_makes_a_difference_only_with_a_stateful_adversary():
    kept = run_samgria(MultiStepSAM(0.05, 2, adversary=MOMENTUM, reset_state=False), 4)
    reset = run_samgria(MultiStepSAM(0.05, 2, adversary=MOMENTUM, reset_state=True), 4)
    assert any(not torch.equal(a, b) for a, b in zip(kept, reset))
    stateless = [run_samgria(MultiStepSAM(0.05, 2, reset_state=r), 4) for r in (True, False)]
    assert_bitwise_equal(*stateless)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_evaluates_the_closure_one_plus_ascent_steps_times(n):
    x, y = make_data()
    model, optimizer = build(MultiStepSAM(0.05, ascent_steps=n))
    closure = make_closure(model, optimizer, x, y)
    calls = {"n": 0}

    def counting():
        calls["n"] += 1
        return closure()

    for _ in range(3):
        optimizer.step(counting)
    assert calls["n"] == 3 * (1 + n)
    assert optimizer.transforms[0].reevaluations == n


# -- restoration, state and atomicity for longer ascents --------------------------------------------------
ASCENTS = {
    "default": lambda: MultiStepSAM(0.05, ascent_steps=3),
    "momentum-kept": lambda: MultiStepSAM(0.05, ascent_steps=3, adversary=MOMENTUM, reset_state=False),
    "adam-kept": lambda: MultiStepSAM(0.01, ascent_steps=2, adversary=torch.optim.Adam, reset_state=False),
    "adam-reset": lambda: MultiStepSAM(0.01, ascent_steps=2, adversary=torch.optim.Adam),
}


class _FlatModel(nn.Module):
    """The MLP of ``make_model`` with its weights as views into one flat buffer (perturbed in place)."""

    def __init__(self, reference):
        super().__init__()
        shapes = [p.shape for p in reference.parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
        self.weights = nn.ParameterList()
        offset = 0
        for shape in shapes:
            size = math.prod(shape)
            self.weights.append(nn.Parameter(flat[offset : offset + size].view(shape)))
            offset += size
        self.reference = [reference]  # for its structure only (a list hides it from the module)

    def forward(self, x):
        unused, w0, b0, w1, b1, w2, b2 = self.weights
        h = torch.tanh(nn.functional.linear(x, w0, b0))
        h = torch.tanh(nn.functional.linear(h, w1, b1.detach()))  # the frozen bias of make_model
        return nn.functional.linear(h, w2, b2)


@pytest.mark.parametrize("name", sorted(ASCENTS))
def test_weights_are_restored_bitwise_also_for_parameters_that_are_views(name):
    x, y = make_data()
    model = make_model()
    flat_model = _FlatModel(make_model())
    flat_model.weights[4].requires_grad_(False)
    assert all(p.untyped_storage().nbytes() > p.numel() * p.element_size() for p in flat_model.weights)
    before = params_of(model)
    for mdl in (model, flat_model):  # lr=0: the weights must come back exactly
        optimizer = TransformingOptimizer(mdl.parameters(), torch.optim.SGD, lr=0.0, transforms=[ASCENTS[name]()])
        closure = make_closure(mdl, optimizer, x, y)
        for _ in range(3):
            optimizer.step(closure)
        assert_bitwise_equal(params_of(mdl), before)
    # And with a learning rate, the view parameters follow the same trajectory bit for bit.
    trajectories = []
    for mdl in (make_model(), _FlatModel(make_model())):
        optimizer = TransformingOptimizer(mdl.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[ASCENTS[name]()])
        closure = make_closure(mdl, optimizer, x, y)
        for _ in range(3):
            optimizer.step(closure)
        trajectories.append(params_of(mdl))
    assert_bitwise_equal(*trajectories)


@pytest.mark.parametrize("name", sorted(ASCENTS))
def test_foreach_path_equals_reference_path_bitwise(name):
    fast, reference = (run_samgria(ASCENTS[name](), 4, transform_foreach=f) for f in (True, False))
    assert_bitwise_equal(fast, reference)


@pytest.mark.parametrize("name", sorted(ASCENTS))
def test_state_lives_in_the_slot_and_a_checkpoint_resumes_bitwise(name):
    x, y = make_data()
    model_a, opt_a = build(ASCENTS[name]())
    closure_a = make_closure(model_a, opt_a, x, y)
    for _ in range(3):
        opt_a.step(closure_a)
    keys = set(opt_a.state[model_a[0].weight])
    adversary_keys = {key for key in keys if key.startswith("multi_step_sam.")}
    expected = {
        "default": set(),
        "adam-reset": set(),
        "momentum-kept": {"multi_step_sam.momentum_buffer"},
        "adam-kept": {"multi_step_sam.step", "multi_step_sam.exp_avg", "multi_step_sam.exp_avg_sq"},
    }[name]
    assert adversary_keys == expected
    if name == "adam-kept":  # the step counter is a number (a tensor would be cast to the param dtype on load)
        assert opt_a.state[model_a[0].weight]["multi_step_sam.step"] == 6.0  # 3 steps x 2 ascent steps
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": opt_a.state_dict()}, buffer)
    for _ in range(3):
        opt_a.step(closure_a)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model_b, opt_b = build(ASCENTS[name](), model=make_model(seed=5))
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["optimizer"])
    closure_b = make_closure(model_b, opt_b, x, y)
    for _ in range(3):
        opt_b.step(closure_b)
    assert_bitwise_equal(params_of(model_a), params_of(model_b))
    assert_same_state(state_snapshot(opt_a), state_snapshot(opt_b))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("name", ["momentum-kept", "adam-kept"])
def test_dcp_save_and_load_into_a_fresh_optimizer_continues_bitwise(tmp_path, name):
    # torch.distributed.checkpoint loads into the state dict of a fresh optimizer, whose state it
    # first initialises (a step with lr=0 and zero gradients): the adversary's keys must exist
    # after that initialisation, and it must not move a weight.
    x = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def build_dense(seed):  # every parameter trains (DCP wants state for each)
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
        return build(ASCENTS[name](), model=model)

    model, optimizer = build_dense(0)
    closure = make_closure(model, optimizer, x, y)
    for _ in range(3):
        optimizer.step(closure)
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(tmp_path))

    fresh_model, fresh = build_dense(1)
    initial = params_of(fresh_model)
    target = {"model": fresh_model.state_dict(), "optim": get_optimizer_state_dict(fresh_model, fresh)}
    assert_bitwise_equal(params_of(fresh_model), initial)
    assert any(key.startswith("multi_step_sam.") for entry in fresh.state.values() for key in entry)
    dcp.load(target, checkpoint_id=str(tmp_path))
    fresh_model.load_state_dict(target["model"])
    set_optimizer_state_dict(fresh_model, fresh, optim_state_dict=target["optim"])
    assert_same_state(state_snapshot(optimizer), state_snapshot(fresh))
    fresh_closure = make_closure(fresh_model, fresh, x, y)
    for _ in range(3):
        optimizer.step(closure)
        fresh.step(fresh_closure)
    assert_bitwise_equal(params_of(model), params_of(fresh_model))
    assert_same_state(state_snapshot(optimizer), state_snapshot(fresh))


@pytest.mark.parametrize("failing_call", [2, 3])
@pytest.mark.parametrize("name", sorted(ASCENTS))
def test_a_failing_reevaluation_leaves_weights_and_state_untouched(name, failing_call):
    x, y = make_data()
    (model, optimizer), (twin_model, twin) = build(ASCENTS[name]()), build(ASCENTS[name]())
    for opt, mdl in ((optimizer, model), (twin, twin_model)):
        closure = make_closure(mdl, opt, x, y)
        for _ in range(2):
            opt.step(closure)
    before, weights = state_snapshot(optimizer), params_of(model)
    closure = make_closure(model, optimizer, x, y)
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise KeyError("data loader died")
        return closure()

    with pytest.raises(KeyError, match="data loader died"):
        optimizer.step(flaky)
    assert_bitwise_equal(params_of(model), weights)
    assert_same_state(before, state_snapshot(optimizer))
    optimizer.step(closure)  # and the run continues as one without the failure
    twin.step(make_closure(twin_model, twin, x, y))
    assert_bitwise_equal(params_of(model), params_of(twin_model))
    assert_same_state(state_snapshot(twin), state_snapshot(optimizer))


@pytest.mark.parametrize("bad_call, ordinal", [(2, "second"), (3, "third")])
@pytest.mark.parametrize("name", ["momentum-kept", "adam-kept"])
def test_non_finite_gradients_at_a_later_ascent_point_skip_the_step_and_commit_nothing(name, bad_call, ordinal):
    x, y = make_data()
    model, optimizer = build(ASCENTS[name]())
    closure = make_closure(model, optimizer, x, y)
    optimizer.step(closure)
    before, weights = state_snapshot(optimizer), params_of(model)
    calls = {"n": 0}

    def overflowing():
        calls["n"] += 1
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) * (float("inf") if calls["n"] == bad_call else 1.0)
        loss.backward()
        return loss

    # The warning counts the closure's evaluations in the step (the first is the unperturbed one).
    with pytest.warns(RuntimeWarning, match=f"the gradients of the {ordinal} evaluation are not finite"):
        optimizer.step(overflowing)
    assert optimizer.skipped_steps == 1
    assert_bitwise_equal(params_of(model), weights)
    assert_same_state(before, state_snapshot(optimizer))


def test_standalone_non_finite_gradients_at_an_ascent_point_stop_the_ascent_and_commit_nothing():
    x, y = make_data()
    model = make_model()
    transform = MultiStepSAM(0.05, ascent_steps=3, adversary=MOMENTUM, reset_state=False)
    calls = {"n": 0}

    def loss_fn(inputs, targets):
        calls["n"] += 1
        return nn.functional.mse_loss(model(inputs), targets) * (float("inf") if calls["n"] == 3 else 1.0)

    weights = params_of(model)
    loss_fn(x, y).backward()
    with pytest.warns(RuntimeWarning, match="the gradient norm at an ascent point is (nan|inf); the ascent stops"):
        transform.apply(model, loss_fn, (x, y))
    assert calls["n"] == 3  # no re-evaluation after the non-finite one
    assert_bitwise_equal(params_of(model), weights)
    assert all(not entry for entry in transform.state_dict()["state"].values())  # nothing committed


def test_two_call_loop_refuses_a_longer_ascent_and_changes_nothing():
    x, y = make_data()
    model, optimizer = build(MultiStepSAM(0.05, ascent_steps=2, adversary=MOMENTUM, reset_state=False))
    optimizer.step(make_closure(model, optimizer, x, y))
    before, weights = state_snapshot(optimizer), params_of(model)
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(
        RuntimeError,
        match=r"^MultiStepSAM\(ascent_steps=2, .*\) re-evaluates the loss 2 times per step, which "
        r"first_step\(\)/second_step\(\) cannot do: use optimizer\.step\(closure\), or one re-evaluation "
        r"per step \(ascent_steps=1 for MultiStepSAM\)$",
    ):
        optimizer.first_step()
    assert optimizer._two_call_refusal() is not None  # what the integrations ask before training
    assert_bitwise_equal(params_of(model), weights)
    assert_same_state(before, state_snapshot(optimizer))
    optimizer.zero_grad()
    optimizer.step(make_closure(model, optimizer, x, y))  # the closure loop still works


def test_a_failing_adversary_restores_the_weights():
    class Broken(torch.optim.SGD):
        fail = False

        def step(self, closure=None):
            if Broken.fail:
                raise MemoryError("adversary failed")
            return super().step(closure)

    x, y = make_data()
    model, optimizer = build(MultiStepSAM(0.05, ascent_steps=2, adversary=Broken))
    closure = make_closure(model, optimizer, x, y)
    optimizer.step(closure)
    weights = params_of(model)
    Broken.fail = True
    try:
        with pytest.raises(MemoryError, match="adversary failed"):
            optimizer.step(closure)
    finally:
        Broken.fail = False
    assert_bitwise_equal(params_of(model), weights)


@pytest.mark.parametrize("name", ["default", "momentum-kept"])
def test_standalone_seed_protocol_equals_optimizer_step(name):
    x, y = make_data()
    model_a, opt_a = build(ASCENTS[name]())
    closure = make_closure(model_a, opt_a, x, y)
    model_b = make_model()
    plain = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    transform = ASCENTS[name]()

    def loss_fn(inputs, targets):
        return nn.functional.mse_loss(model_b(inputs), targets)

    for _ in range(4):
        opt_a.step(closure)
        plain.zero_grad()
        loss_fn(x, y).backward()
        transform.apply(model_b, loss_fn, (x, y))
        plain.step()
    assert_bitwise_equal(params_of(model_a), params_of(model_b))


def test_rho_is_read_from_the_groups_every_step():
    x, y = make_data()
    (model_a, opt_a), (model_b, opt_b) = build(MultiStepSAM(0.05, 2, adversary=MOMENTUM)), build(MultiStepSAM(0.1, 2, adversary=MOMENTUM))
    for group in opt_a.param_groups:
        group["rho"] = 0.1  # e.g. a schedule
    for optimizer, model in ((opt_a, model_a), (opt_b, model_b)):
        closure = make_closure(model, optimizer, x, y)
        for _ in range(3):
            optimizer.step(closure)
    assert_bitwise_equal(params_of(model_a), params_of(model_b))
    opt_a.param_groups[0]["rho"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]: rho must be a finite number >= 0, got -1\.0"):
        opt_a.step(make_closure(model_a, opt_a, x, y))


@pytest.mark.parametrize("rho", [fractions.Fraction(1, 20), np.float32(0.05)], ids=["fraction", "np32"])
@pytest.mark.parametrize("reset_state", [True, False])
def test_the_adversary_takes_every_real_rho_its_group_check_accepts(rho, reset_state):
    # validate_group takes any real number; the adversary got the group's rho as its lr as it
    # was, which torch's SGD refused for a Fraction (add_(): argument 'alpha' must be Number).
    x, y = make_data()
    runs = []
    for value in (rho, float(rho)):
        model, optimizer = build(
            MultiStepSAM(0.05, 2, adversary=MOMENTUM, reset_state=reset_state), groups=two_groups({"rho": value})
        )
        closure = make_closure(model, optimizer, x, y)
        for _ in range(3):
            optimizer.step(closure)
        runs.append(params_of(model))
    assert_bitwise_equal(*runs)


def test_batchnorm_statistics_are_updated_once_per_step_with_frozen_bn_stats():
    # optax needs opaque mode for this; here the closure's forward passes are the side effects.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randn(16, 1, dtype=torch.float64)
    expected = copy.deepcopy(model)
    expected(x)  # one train-mode forward pass at w
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, transforms=[MultiStepSAM(0.05, ascent_steps=3)],
        reevaluation_context=lambda: frozen_bn_stats(model),
    )
    optimizer.step(make_closure(model, optimizer, x, y))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(expected[1], name)), name


def test_the_checkpoint_records_the_settings_and_refuses_another_adversary():
    transform = MultiStepSAM(0.05, 2, adversary=MOMENTUM, reset_state=False)
    assert transform.describe() == (
        "MultiStepSAM(ascent_steps=2, adversary='SGD(momentum=0.9)', normalize=True, reset_state=False)"
    )
    x, y = make_data()
    model, optimizer = build(transform)
    optimizer.step(make_closure(model, optimizer, x, y))
    _, other = build(MultiStepSAM(0.05, 2, adversary=torch.optim.Adam, reset_state=False))
    with pytest.raises(ValueError, match=r"adversary='SGD\(momentum=0\.9\)'.* in the checkpoint and .*adversary='Adam'"):
        other.load_state_dict(optimizer.state_dict())
    # The same class with other hyperparameters keeps other momentum buffers: refused too.
    for kwargs, record in (({"momentum": 0.5}, "SGD(momentum=0.5)"), ({"momentum": 0.9, "nesterov": True}, "SGD(momentum=0.9, nesterov=True)")):
        _, other = build(MultiStepSAM(0.05, 2, adversary=functools.partial(torch.optim.SGD, **kwargs), reset_state=False))
        with pytest.raises(ValueError, match=re.escape(f"adversary='{record}'")):
            other.load_state_dict(optimizer.state_dict())
    # How the adversary computes is no part of the record, nor how it was written.
    for adversary in (
        functools.partial(torch.optim.SGD, momentum=0.9, foreach=False),
        lambda groups: torch.optim.SGD(groups, lr=0.5, momentum=0.9),
    ):
        _, same = build(MultiStepSAM(0.05, 2, adversary=adversary, reset_state=False))
        same.load_state_dict(optimizer.state_dict())


@pytest.mark.parametrize(
    "adversary, damage, message",
    [
        (MOMENTUM, "shape", r"holds 'momentum_buffer' of shape \(1, 5\) and dtype torch.float64 where SGD\(momentum=0\.9\) keeps shape \(8, 5\)"),
        (torch.optim.Adam, "missing", r"holds adversary state without \['exp_avg_sq'\] for a parameter of shape \(8, 5\) \(Adam keeps \['exp_avg', 'exp_avg_sq', 'step'\]\)"),
        (torch.optim.Adam, "not a tensor", r"holds 'exp_avg' = \[0\.0\], not a tensor, where Adam keeps one"),
        (torch.optim.Adafactor, "shape", r"holds 'row_var' of shape \(1, 1\) and dtype torch.float64 where Adafactor keeps shape \(8, 1\)"),
    ],
    ids=["momentum-shape", "adam-missing", "adam-not-a-tensor", "adafactor-factor-shape"],
)
def test_a_damaged_kept_adversary_state_is_refused_at_load_and_nothing_changes(adversary, damage, message):
    """reset_state=False: the kept adversary state is compared with the state a fresh adversary
    makes (Adafactor's factored moments are not shaped like the parameter), before the load commits."""
    x, y = make_data()
    model, optimizer = build(MultiStepSAM(0.05, 2, adversary=adversary, reset_state=False))
    for _ in range(2):
        optimizer.step(make_closure(model, optimizer, x, y))
    saved = copy.deepcopy(optimizer.state_dict())  # its entries are the optimizer's own dicts
    first = saved["state"][1]  # the first linear layer's weight (index 0: a parameter without gradient)
    if adversary is torch.optim.Adafactor:
        first["multi_step_sam.row_var"] = first["multi_step_sam.row_var"][:1]
    elif damage == "shape":
        first["multi_step_sam.momentum_buffer"] = first["multi_step_sam.momentum_buffer"][:1]
    elif damage == "missing":
        del first["multi_step_sam.exp_avg_sq"]
    else:
        first["multi_step_sam.exp_avg"] = [0.0]
    other_model, other = build(MultiStepSAM(0.05, 2, adversary=adversary, reset_state=False))
    other.step(make_closure(other_model, other, x, y))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"^the checkpoint's MultiStepSAM slot 'multi_step_sam' " + message):
        other.load_state_dict(saved)
    after = other.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, entry in before["state"].items():
        for name, value in entry.items():
            got = after["state"][index][name]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, (index, name)
    # The undamaged checkpoint loads and the run goes on.
    other.load_state_dict(optimizer.state_dict())
    other.step(make_closure(other_model, other, x, y))


def test_the_adversary_record_names_only_what_differs_from_the_class_defaults_and_no_address():
    def record(adversary):
        return MultiStepSAM(0.05, adversary=adversary).settings()["adversary"]

    assert record(torch.optim.SGD) == "SGD" and record(torch.optim.Adam) == "Adam"
    assert record(functools.partial(torch.optim.Adam, betas=(0.5, 0.9), amsgrad=True)) == "Adam(amsgrad=True, betas=(0.5, 0.9))"

    class WithACallable(torch.optim.SGD):
        def __init__(self, params, lr=0.1, schedule=None):
            super().__init__(params, lr=lr)
            self.defaults["schedule"] = schedule

    assert record(functools.partial(WithACallable, schedule=lambda t: t)) == "WithACallable(schedule=function)"


# -- optax.contrib.sam -------------------------------------------------------------------------------------
def _import_optax():
    if os.environ.get("SAMGRIA_REQUIRE_INTEGRATIONS"):
        import jax
        import optax
    else:
        jax = pytest.importorskip("jax", reason="pip install 'samgria[test]' (jax, optax)")
        optax = pytest.importorskip("optax", reason="pip install 'samgria[test]' (jax, optax)")
    jax.config.update("jax_enable_x64", True)
    return jax, optax


@pytest.fixture(scope="module")
def optax_problem():
    """The float64 MLP of ``make_model`` and its MSE loss in JAX (the same weights and data)."""
    jax, optax = _import_optax()
    import jax.numpy as jnp

    model = make_model()
    x, y = make_data()
    weights = {n: jnp.asarray(p.detach().numpy()) for n, p in model.named_parameters() if p.requires_grad}
    frozen = jnp.asarray(model[2].bias.detach().numpy())
    inputs, targets = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())

    def loss(w):
        h = jnp.tanh(inputs @ w["0.weight"].T + w["0.bias"])
        h = jnp.tanh(h @ w["2.weight"].T + frozen)
        return jnp.mean((h @ w["4.weight"].T + w["4.bias"] - targets) ** 2)

    return jax, optax, weights, jax.jit(jax.grad(loss))


def _run_optax(problem, adv_optimizer, sync_period, reset_state, steps):
    jax, optax, weights, grad = problem
    sam = optax.contrib.sam(optax.sgd(0.1, momentum=0.9), adv_optimizer, sync_period=sync_period, opaque_mode=True, reset_state=reset_state)
    state = sam.init(weights)
    for _ in range(steps):
        updates, state = sam.update(grad(weights), state, weights, grad_fn=lambda w, i: grad(w))
        weights = optax.apply_updates(weights, updates)
    return weights


def _compare_with_optax(got, weights):
    """samgria's weights (``params_of(make_model())`` order) equal optax's to ~1e-10."""
    names = [n for n, _ in make_model().named_parameters()]
    ours = dict(zip(names, got))
    assert set(weights) < set(ours)
    for name, theirs in weights.items():
        torch.testing.assert_close(ours[name], torch.tensor(theirs.tolist(), dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("sync_period", [2, 4])
def test_default_equals_optax_sam_with_normalized_sgd(optax_problem, sync_period):
    optax = optax_problem[1]
    adv = optax.chain(optax.contrib.normalize(), optax.sgd(0.05))
    expected = _run_optax(optax_problem, adv, sync_period, True, 4)
    _compare_with_optax(run_samgria(MultiStepSAM(0.05, ascent_steps=sync_period - 1), 4), expected)


@pytest.mark.parametrize(
    "adversary,reset_state",
    [("momentum", False), ("adam", False), ("momentum", True)],
    ids=["momentum-kept", "adam-kept", "momentum-reset"],
)
def test_adversary_equals_optax_sam_with_the_same_adversarial_optimizer(optax_problem, adversary, reset_state):
    optax = optax_problem[1]
    theirs, ours = {
        "momentum": (optax.sgd(0.05, momentum=0.9), MOMENTUM),
        "adam": (optax.adam(0.05), torch.optim.Adam),
    }[adversary]
    expected = _run_optax(optax_problem, optax.chain(optax.contrib.normalize(), theirs), 3, reset_state, 4)
    got = run_samgria(MultiStepSAM(0.05, ascent_steps=2, adversary=ours, reset_state=reset_state), 4)
    _compare_with_optax(got, expected)


@pytest.mark.parametrize("name", ["adam-kept", "adam-reset"])
def test_global_step_hooks_fire_once_per_step_not_for_the_adversary(name):
    """The adversary steps inside the optimizer's step: torch's global hooks see one step."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model, optimizer = build(ASCENTS[name]())
    x, y = make_data()
    closure = make_closure(model, optimizer, x, y)
    seen = []
    handles = [
        register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(("pre", type(opt).__name__))),
        register_optimizer_step_post_hook(lambda opt, args, kwargs: seen.append(("post", type(opt).__name__))),
    ]
    try:
        optimizer.step(closure)
        optimizer.step(closure)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [("pre", "TransformingOptimizer"), ("post", "TransformingOptimizer")] * 2


# -- what reset_state=False keeps, and how ----------------------------------------------------------------
class _CountingInGroups(torch.optim.SGD):
    """An adversary that keeps a step counter in its param groups (as AdamP and Lion do)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
        return super().step(closure)


def test_an_adversary_with_state_in_its_param_groups_is_refused_when_its_state_is_kept():
    """reset_state=False carries the per-parameter state over; a counter in the groups would
    restart every step (bias corrections against moments of many steps): refused, with the step
    undone; with reset_state=True it is rebuilt every step anyway, as documented."""
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1,
        transforms=[MultiStepSAM(0.05, 2, adversary=_CountingInGroups, reset_state=False)],
    )
    weights, state = params_of(model), copy.deepcopy(optimizer.state_dict())
    with pytest.raises(RuntimeError, match=r"^MultiStepSAM\(reset_state=False\) keeps the adversary's per-parameter state between steps, but _CountingInGroups keeps state in its param groups \(step\)"):
        optimizer.step(make_closure(model, optimizer, x, y))
    assert_bitwise_equal(params_of(model), weights)
    assert optimizer.state_dict()["state"] == state["state"]
    resetting = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, transforms=[MultiStepSAM(0.05, 2, adversary=_CountingInGroups)]
    )
    resetting.step(make_closure(model, resetting, x, y))


def test_kept_nadam_state_of_a_bfloat16_model_stays_in_float32_between_steps():
    """NAdam keeps its mu_product in float32 also for bfloat16 parameters; the kept state was handed
    back through load_state_dict, which cast it to bfloat16 at every step."""
    seen = []

    class Watched(torch.optim.NAdam):
        @torch.no_grad()
        def step(self, closure=None):
            for state in self.state.values():
                if "mu_product" in state:
                    seen.append(state["mu_product"].dtype)
            return super().step(closure)

    x, y = make_data()
    model = make_model().to(torch.bfloat16)
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1,
        transforms=[MultiStepSAM(0.05, 2, adversary=functools.partial(Watched, eps=1e-3), reset_state=False)],
    )
    for _ in range(3):
        optimizer.step(make_closure(model, optimizer, x.bfloat16(), y.bfloat16()))
    assert seen and set(seen) == {torch.float32}


def test_sparse_gradients_are_refused_naming_multistepsam():
    embedding = nn.Embedding(10, 3, sparse=True)
    optimizer = TransformingOptimizer(embedding.parameters(), torch.optim.SGD, lr=0.1, transforms=[MultiStepSAM(0.05, 2)])

    def closure():
        optimizer.zero_grad()
        loss = embedding(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"^MultiStepSAM does not support sparse gradients"):
        optimizer.step(closure)
