"""Lookahead and EMA against hand-written float64 references, AveragedModel and pytorch_optimizer.

Each reference is a per-tensor transcription of the paper's update around torch's own inner
optimizer, independent of samgria. The contracts every transform keeps (checkpoints, the two-call
loop, bad inputs, chains with SAM, ...) are tested by ``test_transforms_generic.py`` through
``transform_infos.py``; this file adds what is particular to weight averaging: the references,
the swap context managers and the states they leave.
"""

from __future__ import annotations

import copy
import fractions
import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from state_helpers import assert_state_dicts_equal
from transform_infos import assert_bitwise_equal, make_closure, make_data, make_model, params_of

from samgria import EMA, SAM, Lookahead, TransformingOptimizer

SGD = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
ADAM = (torch.optim.Adam, {"lr": 1e-2})
TIGHT = {"rtol": 1e-13, "atol": 1e-15}


def two_groups(model, first, second):
    """The first layer with ``first``'s keys, everything else with ``second``'s."""
    head = list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in head)]
    return [{"params": head, **first}, {"params": rest, **second}]


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad and p is not model.unused]


def build(model, transforms, inner=SGD, groups=None):
    cls, kwargs = inner
    params = groups if groups is not None else model.parameters()
    return TransformingOptimizer(params, cls, transforms=transforms, **kwargs)


# -- Lookahead ----------------------------------------------------------------------------------------
def lookahead_reference(steps, alpha_of, k, inner):
    """Algorithm 1 of the paper, per tensor: k inner steps, then phi += alpha (theta - phi), theta = phi."""
    x, y = make_data()
    model = make_model()
    cls, kwargs = inner
    optimizer = cls(model.parameters(), **kwargs)
    closure = make_closure(model, optimizer, x, y)
    params = trainable(model)
    slow = [p.detach().clone() for p in params]  # phi_0 = theta_0
    for step in range(1, steps + 1):
        optimizer.step(closure)
        if step % k == 0:
            with torch.no_grad():
                for index, param in enumerate(params):
                    slow[index] = slow[index] + alpha_of(param, model) * (param - slow[index])
                    param.copy_(slow[index])
    return params_of(model), slow


@pytest.mark.parametrize("inner", [SGD, ADAM], ids=["sgd_momentum", "adam"])
def test_lookahead_equals_the_papers_update_in_float64(inner):
    steps, k = 11, 3
    expected, expected_slow = lookahead_reference(steps, lambda p, m: 0.5, k, inner)
    x, y = make_data()
    model = make_model()
    optimizer = build(model, [Lookahead(alpha=0.5, k=k)], inner)
    closure = make_closure(model, optimizer, x, y)
    for _ in range(steps):
        optimizer.step(closure)
    torch.testing.assert_close(params_of(model), expected, **TIGHT)
    slow = [optimizer.state[p]["lookahead.slow"] for p in trainable(model)]
    torch.testing.assert_close(slow, expected_slow, **TIGHT)
    assert optimizer.state[model.unused]["lookahead.step"] == steps  # object level, on the first parameter
    assert not optimizer.state.get(model[2].bias)  # frozen: no slow weights, untouched


def test_lookahead_per_group_alpha_equals_the_reference():
    steps, k = 8, 2

    def alpha_of(param, model):
        return 0.8 if any(param is q for q in model[0].parameters()) else 0.3

    expected, _ = lookahead_reference(steps, alpha_of, k, SGD)
    x, y = make_data()
    model = make_model()
    optimizer = build(model, [Lookahead(alpha=0.3, k=k)], groups=two_groups(model, {"alpha": 0.8}, {}))
    closure = make_closure(model, optimizer, x, y)
    for _ in range(steps):
        optimizer.step(closure)
    torch.testing.assert_close(params_of(model), expected, **TIGHT)


@pytest.mark.parametrize(
    "alpha", [fractions.Fraction(1, 3), np.float32(0.25), np.float64(0.3), 1], ids=["fraction", "np32", "np64", "int"]
)
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
def test_lookahead_takes_every_real_alpha_its_group_check_accepts(alpha, foreach):
    # validate_group takes any real number (check_real); the synchronisation used the group's
    # value as it was, which torch's lerp_ refused for a Fraction (TypeError at the k-th step).
    x, y = make_data()
    runs = []
    for value in (alpha, float(alpha)):
        model = make_model()
        optimizer = TransformingOptimizer(
            two_groups(model, {"alpha": value}, {}), torch.optim.SGD, lr=0.1, transforms=[Lookahead(k=2)], transform_foreach=foreach
        )
        closure = make_closure(model, optimizer, x, y)
        for _ in range(4):
            optimizer.step(closure)
        runs.append(params_of(model))
    assert_bitwise_equal(*runs)


def test_lookahead_alpha_one_is_the_inner_optimizer_and_weights_equal_slow_weights_after_a_sync():
    x, y = make_data()
    plain_model = make_model()
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9)
    model = make_model()
    optimizer = build(model, [Lookahead(alpha=1.0, k=2)])
    closure, plain_closure = make_closure(model, optimizer, x, y), make_closure(plain_model, plain, x, y)
    for _ in range(4):
        optimizer.step(closure)
        plain.step(plain_closure)
    assert_bitwise_equal(params_of(model), params_of(plain_model))
    for param in trainable(model):  # right after a synchronisation theta = phi
        assert torch.equal(param, optimizer.state[param]["lookahead.slow"])


def test_lookahead_agrees_with_pytorch_optimizer():
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    steps, k, alpha = 10, 3, 0.6
    x, y = make_data()
    theirs_model = make_model()
    theirs = pytorch_optimizer.Lookahead(torch.optim.SGD(theirs_model.parameters(), lr=0.1, momentum=0.9), k=k, alpha=alpha)
    ours_model = make_model()
    ours = build(ours_model, [Lookahead(alpha=alpha, k=k)])
    theirs_closure, ours_closure = make_closure(theirs_model, theirs, x, y), make_closure(ours_model, ours, x, y)
    for _ in range(steps):
        theirs.step(theirs_closure)
        ours.step(ours_closure)
    # They compute theta.lerp_(phi, 1 - alpha), the paper's phi + alpha (theta - phi) rearranged.
    torch.testing.assert_close(params_of(ours_model), params_of(theirs_model), **TIGHT)


def test_slow_weights_are_swapped_in_and_the_fast_weights_restored_bitwise():
    x, y = make_data()
    model = make_model()
    lookahead = Lookahead(alpha=0.5, k=4)
    optimizer = build(model, [lookahead])
    closure = make_closure(model, optimizer, x, y)
    for _ in range(6):  # mid-cycle: fast and slow weights differ
        optimizer.step(closure)
    fast = params_of(model)
    with lookahead.slow_weights(optimizer):
        for param in trainable(model):
            assert torch.equal(param, optimizer.state[param]["lookahead.slow"])
        assert not torch.equal(model[0].weight, fast[1])  # params_of: the unused parameter comes first
    assert_bitwise_equal(params_of(model), fast)


# -- EMA ----------------------------------------------------------------------------------------------
def timm_v3_decay(step, decay, gamma, power):
    """timm's ModelEmaV3.get_decay with use_warmup=True, update_after_step=0, min_decay=0."""
    step = max(0, step - 0 - 1)
    if step <= 0:
        return 0.0
    return max(min(1 - (1 + step / gamma) ** -power, decay), 0.0)


def ema_reference(steps, decay_of, inner=SGD, warmup=None):
    """a_1 = theta_1, a_n = d a_{n-1} + (1 - d) theta_n, per tensor, after each inner step."""
    x, y = make_data()
    model = make_model()
    cls, kwargs = inner
    optimizer = cls(model.parameters(), **kwargs)
    closure = make_closure(model, optimizer, x, y)
    params = trainable(model)
    averages = None
    for step in range(1, steps + 1):
        optimizer.step(closure)
        if averages is None:
            averages = [p.detach().clone() for p in params]
            continue
        for index, param in enumerate(params):
            d = decay_of(param, model)
            if warmup is not None:
                d = timm_v3_decay(step, d, *warmup)
            averages[index] = d * averages[index] + (1 - d) * param.detach()
    return params_of(model), averages


def run_ema(steps, ema, groups=None, inner=SGD):
    x, y = make_data()
    model = make_model()
    optimizer = build(model, [ema], inner, groups(model) if groups else None)
    closure = make_closure(model, optimizer, x, y)
    for _ in range(steps):
        optimizer.step(closure)
    return model, optimizer


def averages_of(model, optimizer, slot="ema"):
    return [optimizer.state[p][f"{slot}.average"] for p in trainable(model)]


@pytest.mark.parametrize("inner", [SGD, ADAM], ids=["sgd_momentum", "adam"])
def test_ema_equals_the_reference_in_float64_and_leaves_the_weights_alone(inner):
    expected_weights, expected = ema_reference(9, lambda p, m: 0.9, inner)
    model, optimizer = run_ema(9, EMA(decay=0.9), inner=inner)
    assert_bitwise_equal(params_of(model), expected_weights)  # the trajectory is the inner optimizer's
    torch.testing.assert_close(averages_of(model, optimizer), expected, **TIGHT)
    assert optimizer.state[model.unused]["ema.step"] == 9
    assert not optimizer.state.get(model[2].bias)


def test_ema_per_group_decay_and_warmup_equal_the_reference():
    def decay_of(param, model):
        return 0.5 if any(param is q for q in model[0].parameters()) else 0.95

    _, expected = ema_reference(12, decay_of, warmup=(2.0, 0.75))
    ema = EMA(decay=0.95, warmup=True, warmup_gamma=2.0, warmup_power=0.75)
    model, optimizer = run_ema(12, ema, groups=lambda m: two_groups(m, {"decay": 0.5}, {}))
    torch.testing.assert_close(averages_of(model, optimizer), expected, **TIGHT)
    assert [ema.decay_at(n) for n in (1, 2)] == [0.0, timm_v3_decay(2, 0.95, 2.0, 0.75)]
    assert ema.decay_at(10**9) == 0.95  # the warm-up ends at decay


@pytest.mark.parametrize("transforms", [lambda: [], lambda: [SAM(0.05)]], ids=["alone", "after_sam"])
def test_ema_equals_averaged_model_with_get_ema_multi_avg_fn_bitwise(transforms):
    # Where the definitions coincide: every parameter has a gradient at every step.
    decay = 0.9
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x, y = make_data()
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    ema = EMA(decay)
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[*transforms(), ema])
    closure = make_closure(model, optimizer, x, y)
    for _ in range(7):
        optimizer.step(closure)
        averaged.update_parameters(model)
        assert_bitwise_equal([optimizer.state[p]["ema.average"] for p in model.parameters()], list(averaged.module.parameters()))
    with ema.averaged_weights(optimizer):
        assert_bitwise_equal(params_of(model), params_of(averaged.module))


def test_averaged_weights_restores_the_training_weights_bitwise_also_when_the_block_raises():
    model, optimizer = run_ema(5, EMA(decay=0.9))
    ema = optimizer.transforms[0]
    training = params_of(model)
    state = copy.deepcopy(optimizer.state_dict())
    with ema.averaged_weights(optimizer):
        swapped = params_of(model)
        for param in trainable(model):
            assert torch.equal(param, optimizer.state[param]["ema.average"])
    assert any(not torch.equal(a, b) for a, b in zip(swapped, training))
    untouched = [i for i, p in enumerate(model.parameters()) if p is model.unused or p is model[2].bias]
    assert untouched == [0, 4] and all(torch.equal(swapped[i], training[i]) for i in untouched)  # no average: kept
    assert_bitwise_equal(params_of(model), training)
    with pytest.raises(KeyError, match="evaluation failed"):
        with ema.averaged_weights(optimizer):
            model[0].weight.data.mul_(3.0)  # even scribbling on the weights is undone
            raise KeyError("evaluation failed")
    assert_bitwise_equal(params_of(model), training)
    assert_state_dicts_equal(optimizer.state_dict(), state)


def test_a_step_inside_the_swap_block_raises_and_changes_nothing():
    x, y = make_data()
    model, optimizer = run_ema(3, EMA(decay=0.9))
    twin_model, twin = run_ema(3, EMA(decay=0.9))
    ema = optimizer.transforms[0]
    closure = make_closure(model, optimizer, x, y)
    with ema.averaged_weights(optimizer):
        inside = params_of(model)
        state = copy.deepcopy(optimizer.state_dict())
        with pytest.raises(RuntimeError, match="step after the block"):
            optimizer.step(closure)
        assert_bitwise_equal(params_of(model), inside)
        assert_state_dicts_equal(optimizer.state_dict(), state)
    for _ in range(2):  # and training goes on as if nothing had happened
        optimizer.step(closure)
        twin.step(make_closure(twin_model, twin, x, y))
    assert_bitwise_equal(params_of(model), params_of(twin_model))
    assert_state_dicts_equal(optimizer.state_dict(), twin.state_dict())


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ["ema", "lookahead"])
def test_a_copy_made_inside_the_swap_block_steps_from_the_weights_it_copied(name, copier):
    """The copy used to inherit the open block and refuse every step forever."""
    x, y = make_data()
    transform = EMA(decay=0.9) if name == "ema" else Lookahead(k=2, alpha=0.5)
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), transform])
    for _ in range(3):
        optimizer.step(make_closure(model, optimizer, x, y))
    block = transform.averaged_weights if name == "ema" else transform.slow_weights
    with block(optimizer):
        if copier == "deepcopy":
            copied_model, copied = copy.deepcopy((model, optimizer))
        else:
            buffer = io.BytesIO()
            torch.save((model, optimizer), buffer)
            buffer.seek(0)
            copied_model, copied = torch.load(buffer, weights_only=False)
        # The reference: a fresh run from the same weights and state, outside any block.
        twin_model = copy.deepcopy(model)
        twin = TransformingOptimizer(twin_model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), EMA(decay=0.9) if name == "ema" else Lookahead(k=2, alpha=0.5)])
        twin.load_state_dict(optimizer.state_dict())
    for _ in range(2):
        copied.step(make_closure(copied_model, copied, x, y))
        twin.step(make_closure(twin_model, twin, x, y))
    assert_bitwise_equal(params_of(copied_model), params_of(twin_model))


def test_switch_every_copies_the_averages_into_the_weights():
    _, expected = ema_reference(3, lambda p, m: 0.8)  # no switch before step 3
    model, optimizer = run_ema(3, EMA(decay=0.8, switch_every=3))
    torch.testing.assert_close(averages_of(model, optimizer), expected, **TIGHT)
    assert_bitwise_equal(averages_of(model, optimizer), [p.detach() for p in trainable(model)])


def test_pure_ema_checkpoint_resumes_bitwise_with_warmup():
    x, y = make_data()

    def make(model):
        return build(model, [EMA(decay=0.99, warmup=True)])

    model_a = make_model()
    opt_a = make(model_a)
    closure_a = make_closure(model_a, opt_a, x, y)
    for _ in range(3):
        opt_a.step(closure_a)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": opt_a.state_dict()}, buffer)
    for _ in range(4):
        opt_a.step(closure_a)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model_b = make_model(seed=5)
    model_b.load_state_dict(checkpoint["model"])
    opt_b = make(model_b)
    opt_b.load_state_dict(checkpoint["optimizer"])
    closure_b = make_closure(model_b, opt_b, x, y)
    for _ in range(4):
        opt_b.step(closure_b)
    assert_bitwise_equal(averages_of(model_a, opt_a), averages_of(model_b, opt_b))
    assert opt_b.state[model_b.unused]["ema.step"] == 7
    with pytest.raises(ValueError, match="EMA\\(warmup=False, switch_every=None\\)"):
        build(make_model(), [EMA(decay=0.99)]).load_state_dict(checkpoint["optimizer"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize(
    "transforms",
    [lambda: [Lookahead(alpha=0.5, k=2)], lambda: [SAM(0.05), EMA(decay=0.9, warmup=True)]],
    ids=["lookahead", "sam_then_ema"],
)
def test_dcp_state_dict_into_a_fresh_optimizer_continues_bitwise(transforms):
    # torch.distributed.checkpoint first initialises a fresh optimizer's state (a step with lr=0
    # and zero gradients: init_state), then loads into it.
    x, y = make_data()

    def make(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1)).double()
        return model, TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, transforms=transforms())

    model, optimizer = make(0)
    closure = make_closure(model, optimizer, x, y)
    for _ in range(3):
        optimizer.step(closure)
    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer))
    fresh_model, fresh = make(1)
    fresh_model.load_state_dict(model.state_dict())
    set_optimizer_state_dict(fresh_model, fresh, optim_state_dict=saved)
    fresh_closure = make_closure(fresh_model, fresh, x, y)
    for _ in range(4):
        optimizer.step(closure)
        fresh.step(fresh_closure)
    assert_bitwise_equal(params_of(model), params_of(fresh_model))
    assert_state_dicts_equal(fresh.state_dict(), optimizer.state_dict())


def test_a_checkpoint_with_misshapen_averages_is_refused():
    model, optimizer = run_ema(2, EMA(decay=0.9))
    checkpoint = optimizer.state_dict()
    checkpoint["state"][1]["ema.average"] = torch.zeros(3, dtype=torch.float64)
    fresh = build(make_model(), [EMA(decay=0.9)])
    with pytest.raises(ValueError, match=r"EMA slot 'ema' holds 'average' of shape \(3,\) for a parameter of shape \(8, 5\)"):
        fresh.load_state_dict(checkpoint)


def test_seed_protocol_beside_a_plain_optimizer_and_its_swap():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(decay=0.5)
    weights = []

    def loss_fn(inputs):
        return model(inputs).square().mean()

    for _ in range(2):
        batch = (torch.randn(4, 3, dtype=torch.float64),)
        loss_fn(*batch).backward()
        ema.apply(model, loss_fn, batch)
        optimizer.step()
        optimizer.zero_grad()  # between step() and post_step(), as the seed README's loop does
        ema.post_step(model)
        weights.append(model.weight.detach().clone())
    expected = weights[0].lerp(weights[1], 0.5)
    with ema.averaged_weights(model):
        assert torch.equal(model.weight, expected)
    assert torch.equal(model.weight, weights[1])


def test_owner_must_hold_the_transform():
    """An optimizer without the transform is a wrong value (ValueError); an owner of another kind
    is a wrong type (TypeError, as every argument check raises for one; it was a ValueError)."""
    model, optimizer = run_ema(1, EMA())
    with pytest.raises(ValueError, match="owner must be the TransformingOptimizer that holds this EMA"):
        with EMA().averaged_weights(optimizer):
            pass
    for owner, name in ((object(), "object"), ("x", "str")):
        with pytest.raises(TypeError, match=rf"^owner must be the TransformingOptimizer that holds this Lookahead \(or the nn\.Module it is used with through apply/post_step\), got {name}$"):
            with Lookahead().slow_weights(owner):
                pass


@pytest.mark.parametrize("kind", ["ema", "lookahead"])
def test_the_block_takes_the_optimizer_as_accelerate_prepared_it(kind):
    """``accelerator.prepare(optimizer)`` (and so the Hugging Face Trainer's ``trainer.optimizer``)
    is an ``AcceleratedOptimizer`` around the TransformingOptimizer: the block refused it ("owner
    must be the TransformingOptimizer that holds this EMA ..., got AcceleratedOptimizer") though
    it holds the transform, as Lightning's ``self.optimizers()`` does and is taken."""
    accelerate = pytest.importorskip("accelerate")
    x, y = make_data()
    model = make_model()
    transform = EMA(decay=0.5) if kind == "ema" else Lookahead(alpha=0.5, k=2)
    optimizer = build(model, [transform])
    closure = make_closure(model, optimizer, x, y)
    for _ in range(3):
        optimizer.step(closure)
    block = transform.averaged_weights if kind == "ema" else transform.slow_weights
    key = f"{kind}.{'average' if kind == 'ema' else 'slow'}"
    kept = [optimizer.state[p][key] for p in trainable(model) if p.grad is not None]
    training = params_of(model)
    from accelerate.state import AcceleratorState, GradientState

    try:
        prepared = accelerate.Accelerator(cpu=True).prepare(optimizer)
        with block(prepared):
            assert_bitwise_equal([p.detach().clone() for p in trainable(model) if p.grad is not None], kept)
        assert_bitwise_equal(params_of(model), training)
        other = EMA() if kind == "ema" else Lookahead()  # held by no optimizer inside the wrapper
        other_block = other.averaged_weights if kind == "ema" else other.slow_weights
        with pytest.raises(ValueError, match="owner must be the TransformingOptimizer that holds this"):
            with other_block(prepared):
                pass
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.mark.parametrize("kind", ["ema", "lookahead"])
@pytest.mark.parametrize("how", ["stepped", "loaded"])
def test_a_transform_held_by_an_optimizer_refuses_the_module_as_owner_and_changes_nothing(kind, how):
    """``ema.averaged_weights(model)`` for an EMA stepped by a TransformingOptimizer swapped
    nothing, silently: the module path looked for standalone state, found none and left every
    parameter as a never-stepped one. It is the reverse of an optimizer that does not hold the
    transform, refused the same way; a checkpoint loaded into a fresh optimizer counts too."""
    name, what = ("EMA", "averages") if kind == "ema" else ("Lookahead", "slow weights")
    x, y = make_data()
    model = make_model()
    transform = EMA(decay=0.5) if kind == "ema" else Lookahead(alpha=0.5, k=2)
    optimizer = build(model, [transform])
    closure = make_closure(model, optimizer, x, y)
    for _ in range(3):  # Lookahead (k=2): mid-cycle, the fast weights differ from the slow ones
        optimizer.step(closure)
    if how == "loaded":
        checkpoint = copy.deepcopy(optimizer.state_dict())
        transform = EMA(decay=0.5) if kind == "ema" else Lookahead(alpha=0.5, k=2)
        optimizer = build(model, [transform])
        optimizer.load_state_dict(checkpoint)
    block = transform.averaged_weights if kind == "ema" else transform.slow_weights
    key = f"{kind}.{'average' if kind == 'ema' else 'slow'}"
    training = params_of(model)
    state = copy.deepcopy(optimizer.state_dict())
    message = (
        rf"^owner must be the TransformingOptimizer that holds this {name}, got Sequential, a module: "
        rf"the {name} is stepped by a TransformingOptimizer, which keeps its {what}; pass that optimizer$"
    )
    with pytest.raises(ValueError, match=message):
        with block(model):
            pytest.fail("the block was entered")
    assert_bitwise_equal(params_of(model), training)
    assert_state_dicts_equal(optimizer.state_dict(), state)
    fast = [p.detach().clone() for p in trainable(model)]
    with block(optimizer):  # the right owner swaps, and no block was left open
        kept = [optimizer.state[p][key] for p in trainable(model)]
        assert_bitwise_equal([p.detach().clone() for p in trainable(model)], [k.clone() for k in kept])
    assert any(not torch.equal(k, f) for k, f in zip(kept, fast))
    optimizer.step(closure)


def test_a_standalone_transform_never_stepped_keeps_the_weights_in_its_block():
    model = make_model()
    training = params_of(model)
    for transform in (EMA(), Lookahead()):
        block = transform.averaged_weights if isinstance(transform, EMA) else transform.slow_weights
        with block(model):
            assert_bitwise_equal(params_of(model), training)
        assert_bitwise_equal(params_of(model), training)


def test_the_model_to_reshard_must_be_a_module():
    model, optimizer = run_ema(1, EMA())
    training = params_of(model)
    with pytest.raises(TypeError, match=r"^model must be an nn\.Module or None, got 'model'$"):
        with optimizer.transforms[0].averaged_weights(optimizer, model="model"):
            pytest.fail("the block was entered")
    assert_bitwise_equal(params_of(model), training)
    with optimizer.transforms[0].averaged_weights(optimizer, model=model):  # no FSDP2 module: a plain swap
        assert torch.equal(model[0].weight, optimizer.state[model[0].weight]["ema.average"])
    assert_bitwise_equal(params_of(model), training)


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((0,), ValueError, r"^update must be an integer >= 1, got 0$"),
        ((None,), TypeError, r"^update must be an integer"),
        ((2.0,), TypeError, r"^update must be an integer"),
        ((2, "x"), TypeError, r"^decay must be a finite number in \[0, 1\], got 'x'$"),
        ((2, 1.5), ValueError, r"^decay must be"),
        ((2, float("nan")), ValueError, r"^decay must be"),
    ],
)
def test_decay_at_checks_its_arguments(args, error, message):
    """decay_at returned decay="x" as it was and failed on update=None with a bare comparison
    error; its arguments are checked as the constructor's are."""
    with pytest.raises(error, match=message):
        EMA(decay=0.9).decay_at(*args)


def test_settings_and_repr():
    assert Lookahead(0.8, k=10).describe() == "Lookahead(k=10)"
    assert repr(Lookahead(0.8, k=10)) == "Lookahead(alpha=0.8, k=10)"
    assert repr(EMA(0.99, switch_every=5)) == "EMA(decay=0.99, warmup=False, switch_every=5)"
    assert EMA(warmup=True).settings() == {"warmup": True, "warmup_gamma": 1.0, "warmup_power": 2 / 3, "switch_every": None}


# -- steps in which no parameter has a gradient; checkpoints for complex parameters --------------------
@pytest.mark.parametrize(
    "transforms",
    [
        lambda: [EMA(decay=0.9, warmup=True)],
        lambda: [Lookahead(alpha=0.5, k=2)],
        lambda: [EMA(decay=0.8, switch_every=3), Lookahead(alpha=0.5, k=3)],
    ],
    ids=["ema_warmup", "lookahead", "switch_ema_then_lookahead"],
)
def test_a_step_without_any_gradient_changes_nothing(transforms):
    """torch's optimizers take no step when no parameter has a gradient; neither do EMA and Lookahead:
    such a step used to count, advancing the warm-up's decay, the switch and the k-cycle."""
    x, y = make_data()
    model, twin_model = make_model(), make_model()
    optimizer, twin = build(model, transforms()), build(twin_model, transforms())
    closure, twin_closure = make_closure(model, optimizer, x, y), make_closure(twin_model, twin, x, y)
    for _ in range(7):
        optimizer.step(closure)
        twin.step(twin_closure)
        optimizer.zero_grad(set_to_none=True)
        weights, state = params_of(model), copy.deepcopy(optimizer.state_dict())
        optimizer.step()  # no gradient anywhere
        assert_bitwise_equal(params_of(model), weights)
        assert_state_dicts_equal(optimizer.state_dict(), state)
    # and the run is the one without the empty steps, bit for bit
    assert_bitwise_equal(params_of(model), params_of(twin_model))
    assert_state_dicts_equal(optimizer.state_dict(), twin.state_dict())


def test_a_seed_protocol_step_without_any_gradient_changes_nothing():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    ema = EMA(decay=0.5)
    model.weight.grad = torch.ones_like(model.weight)
    ema.post_step(model)  # the first update: a copy
    with torch.no_grad():
        model.weight.add_(1.0)
    model.weight.grad = None
    ema.post_step(model)  # no gradient: no update
    with ema.averaged_weights(model):
        averaged = model.weight.detach().clone()
    assert torch.equal(averaged, model.weight.detach() - 1.0)
    assert ema.state_dict()["state"][0]["ema.step"] == 1


@pytest.mark.parametrize(
    "make,key", [(lambda: EMA(decay=0.9), "average"), (lambda: Lookahead(alpha=0.5, k=2), "slow")], ids=["ema", "lookahead"]
)
def test_a_checkpoint_with_real_kept_weights_for_a_complex_parameter_is_refused_with_nothing_loaded(make, key):
    # torch casts a real parameter's state to its dtype, but leaves a complex parameter's as it was:
    # real weights of the same shape were loaded, and averaged as pairs of reals against nothing.
    real = nn.Parameter(torch.randn(3, dtype=torch.float64))
    source = TransformingOptimizer([real], torch.optim.SGD, lr=0.1, transforms=[make()])
    real.grad = torch.ones_like(real)
    source.step()
    z = nn.Parameter(torch.randn(3, dtype=torch.complex128))
    target = TransformingOptimizer([z], torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[make()])
    z.grad = torch.ones_like(z)
    target.step()
    weights, state = z.detach().clone(), copy.deepcopy(target.state_dict())
    name, slot = type(make()).__name__, target.slots[0]
    message = rf"^the checkpoint's {name} slot '{slot}' holds '{key}' of dtype torch\.float64 for a parameter of dtype torch\.complex128$"
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(source.state_dict())
    assert torch.equal(z.detach(), weights)
    assert_state_dicts_equal(target.state_dict(), state)


def test_a_checkpoint_whose_kept_weights_are_not_a_tensor_is_refused():
    model, optimizer = run_ema(2, EMA(decay=0.9))
    checkpoint = optimizer.state_dict()
    checkpoint["state"][1]["ema.average"] = [0.0, 1.0]
    fresh = build(make_model(), [EMA(decay=0.9)])
    with pytest.raises(ValueError, match=r"^the checkpoint's EMA slot 'ema' holds 'average' = \[0\.0, 1\.0\], not a tensor, for a parameter of shape \(8, 5\)$"):
        fresh.load_state_dict(checkpoint)


@pytest.mark.parametrize(
    "make",
    [lambda: EMA(decay=0.9), lambda: EMA(decay=0.9, warmup=True, switch_every=3), lambda: Lookahead(alpha=0.5, k=2)],
    ids=["ema", "ema-warmup-switch", "lookahead"],
)
@pytest.mark.parametrize(
    "start, target",
    [
        (torch.float32, torch.float64),
        (torch.float32, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.float64, torch.float32),
        (torch.complex64, torch.complex128),
    ],
    ids=["double", "half", "bfloat16", "float", "complex128"],
)
@pytest.mark.parametrize("swap_on_conversion", [False, True], ids=["data", "swap"])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
def test_kept_weights_follow_a_dtype_conversion_as_a_checkpoint_reloaded_into_a_fresh_optimizer(
    make, start, target, swap_on_conversion, foreach
):
    """``model.double()`` (``.half()``, ...) after a few steps: the next step raised torch's
    "expected dtype float for `end` but got dtype double" in the lerp of the kept weights. The
    reference reloads the checkpoint taken before the conversion into a freshly built optimizer
    (torch casts the kept weights to the parameters' dtype): the two runs agree bit for bit, in
    the swap blocks (directly after the conversion and after the steps) too."""
    inputs, targets = torch.randn(8, 3, dtype=start), torch.randn(8, 2, dtype=start)

    def run(reload):
        torch.manual_seed(0)
        model = nn.Linear(3, 2, dtype=start)
        transform = make()
        optimizer = TransformingOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.1, transforms=[transform], transform_foreach=foreach
        )

        def closure():
            optimizer.zero_grad()
            loss = (model(inputs.to(model.weight.dtype)) - targets.to(model.weight.dtype)).abs().square().mean()
            loss.backward()
            return loss

        def swapped_in():
            block = transform.averaged_weights if isinstance(transform, EMA) else transform.slow_weights
            training = [p.detach().clone() for p in model.parameters()]
            with block(optimizer):
                kept = [p.detach().clone() for p in model.parameters()]
            assert_bitwise_equal([p.detach() for p in model.parameters()], training)
            return kept

        for _ in range(3):
            optimizer.step(closure)
        checkpoint = copy.deepcopy(optimizer.state_dict())
        previous = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(swap_on_conversion)
        try:
            model.to(target)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(previous)
        assert model.weight.dtype == target
        if reload:
            transform = make()
            optimizer = TransformingOptimizer(
                model.parameters(), torch.optim.SGD, lr=0.1, transforms=[transform], transform_foreach=foreach
            )
            optimizer.load_state_dict(checkpoint)
        kept_then = swapped_in()
        for _ in range(4):  # Lookahead (k=2) synchronises at the first of them; Switch EMA switches
            optimizer.step(closure)
        return [p.detach().clone() for p in model.parameters()], optimizer.state_dict(), kept_then, swapped_in()

    weights, state, kept_then, kept_after = run(reload=False)
    expected_weights, expected_state, expected_kept_then, expected_kept_after = run(reload=True)
    assert_bitwise_equal(weights, expected_weights)
    assert_state_dicts_equal(state, expected_state)
    kept = [value for entry in state["state"].values() for key, value in entry.items() if key.endswith((".average", ".slow"))]
    assert len(kept) == 2 and all(value.dtype == target for value in kept)
    assert_bitwise_equal(kept_then, expected_kept_then)
    assert_bitwise_equal(kept_after, expected_kept_after)


def test_seed_protocol_averages_follow_a_dtype_conversion():
    """Through ``apply``/``post_step`` the averages are kept by the transform: after
    ``model.double()`` the next update raised the same dtype error; it averages in float64 from
    the float32 average, as a checkpoint cast to float64 would."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    ema = EMA(decay=0.5)
    inputs = torch.randn(4, 3)
    averages = []

    def loss_fn(batch):
        return model(batch.to(model.weight.dtype)).square().mean()

    for step in range(3):
        if step == 2:
            model.double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # stateless: rebuilt after the conversion
        loss_fn(inputs).backward()
        ema.apply(model, loss_fn, (inputs,))
        optimizer.step()
        ema.post_step(model)
        model.zero_grad()
        with ema.averaged_weights(model):
            averages.append(model.weight.detach().clone())
    expected = averages[1].double().lerp(model.weight.detach(), 0.5)
    assert averages[2].dtype == torch.float64 and torch.equal(averages[2], expected)


def test_the_block_swaps_parameters_only_and_update_bn_on_a_copy_leaves_the_training_model_bitwise():
    # As documented: BatchNorm's statistics are neither averaged nor swapped; update_bn run on a
    # deepcopy made inside the block gives the averaged model its statistics (as update_bn on
    # AveragedModel's module does) and leaves the training model and optimizer bit for bit.
    from torch.optim.swa_utils import update_bn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    ema = EMA(decay=0.5)
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.5, transforms=[ema])
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=False)
    x = torch.randn(16, 3)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        averaged.update_parameters(model)
    training = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    with ema.averaged_weights(optimizer):
        assert torch.equal(model[1].running_mean, training["1.running_mean"])  # the model's, not swapped
        evaluated = copy.deepcopy(model)
        update_bn([(x,)], evaluated)
    update_bn([(x,)], averaged)
    assert_bitwise_equal(list(evaluated.state_dict().values()), list(averaged.module.state_dict().values()))
    assert_bitwise_equal(list(model.state_dict().values()), list(training.values()))
    assert_state_dicts_equal(optimizer.state_dict(), state)
