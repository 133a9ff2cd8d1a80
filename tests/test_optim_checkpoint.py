"""Checkpoints of TransformingOptimizer: torch.distributed.checkpoint, torch.save, chain checks.

Every comparison is bit for bit (``torch.equal``) against an independent reference: a twin run
that was never checkpointed, a deepcopy taken before, or values computed by hand.

Note on torch's semantics: ``Optimizer.load_state_dict`` keeps the tensors of the dict it is
given when no cast is needed (``tensor.to(same dtype)`` is the same tensor), for torch's own
optimizers as well. A dict obtained from a *live* optimizer is therefore deep-copied before it is
loaded into another one, as writing it to disk would.
"""

from __future__ import annotations

import copy
import gzip
import io
import pathlib
import pickle
import runpy
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from samgria import (
    ASAM,
    EMA,
    LAMP,
    SAM,
    ClipGradNorm,
    FriendlySAM,
    LookSAM,
    NormalizeGrad,
    Transform,
    TransformingOptimizer,
)
from state_helpers import assert_same_value, assert_state_dicts_equal, assert_states_equal, groups_without_params, params_in_order, state_by_index

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


# -- helpers ----------------------------------------------------------------------------------------
def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A tiny MLP whose every parameter gets a gradient (DCP wants state for each of them)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)


def make_data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=generator, dtype=dtype)
    y = torch.randn(16, 2, generator=generator, dtype=dtype)
    return x, y


def make_closure(model, optimizer, dtype=torch.float64, data=None):
    x, y = make_data(dtype) if data is None else data

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


CHAINS = {
    "sam": lambda: [SAM(0.05)],
    "asam": lambda: [ASAM(0.5, eta=0.01)],
    "lamp": lambda: [LAMP(1e-2, rollback_len=3, seed=0)],
    "sam+lamp": lambda: [SAM(0.05), LAMP(1e-2, rollback_len=3, seed=0)],
}
INNERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.01}),
}


def build(model, chain, inner="sgd", **extra):
    cls, kwargs = INNERS[inner]
    transforms = CHAINS[chain]() if isinstance(chain, str) else chain
    return TransformingOptimizer(model.parameters(), cls, transforms=transforms, **{**kwargs, **extra})


def assert_weights_equal(model_a, model_b):
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def assert_optimizers_equal(model_a, opt_a, model_b, opt_b):
    assert_weights_equal(model_a, model_b)
    assert_states_equal(state_by_index(opt_a), state_by_index(opt_b))
    assert groups_without_params(opt_a) == groups_without_params(opt_b)


def trained(chain, inner="sgd", steps=2, **extra):
    model = make_model()
    optimizer = build(model, chain, inner, **extra)
    closure = make_closure(model, optimizer)
    for _ in range(steps):
        optimizer.step(closure)
    return model, optimizer


def copy_of_model(model):
    clone = make_model(seed=123)  # other weights, then load: nothing shared with ``model``
    clone.load_state_dict(model.state_dict())
    return clone


def cycle_steps(optimizer):
    """LAMP's cycle positions, wherever they are kept (the first parameter that requires grad)."""
    return {
        key: value
        for param in params_in_order(optimizer)
        for key, value in optimizer.state.get(param, {}).items()
        if key.endswith("cycle_step")
    }


def continue_both(model_a, opt_a, model_b, opt_b, steps=4):
    """Step both runs, checking weights and every state tensor after each step."""
    closure_a, closure_b = make_closure(model_a, opt_a), make_closure(model_b, opt_b)
    rolled_back = False
    for _ in range(steps):
        loss_a, loss_b = opt_a.step(closure_a), opt_b.step(closure_b)
        assert torch.equal(loss_a, loss_b)
        assert_optimizers_equal(model_a, opt_a, model_b, opt_b)
        rolled_back = rolled_back or 0 in cycle_steps(opt_a).values()
    return rolled_back


# -- torch.distributed.checkpoint.state_dict ---------------------------------------------------------
@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_dcp_get_and_set_into_a_fresh_optimizer_continue_bit_for_bit(chain, inner):
    model, optimizer = trained(chain, inner, steps=2)
    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer))

    fresh_model = copy_of_model(model)
    fresh = build(fresh_model, chain, inner)
    assert not fresh.state and all(p.grad is None for p in fresh_model.parameters())
    set_optimizer_state_dict(fresh_model, fresh, optim_state_dict=saved)
    assert fresh.param_groups is fresh.inner.param_groups
    assert_optimizers_equal(model, optimizer, fresh_model, fresh)

    # LAMP(rollback_len=3) rolls back at step 4: steps 3..6 cross it.
    rolled_back = continue_both(model, optimizer, fresh_model, fresh, steps=4)
    assert rolled_back == ("lamp" in chain)


def test_dcp_round_trip_with_two_param_groups_and_per_group_hyperparameters():
    def build_groups(model):
        groups = [
            {"params": model[0].parameters(), "rho": 0.1, "eps": 0.0},
            {"params": model[2].parameters(), "lr": 0.01},
        ]
        return TransformingOptimizer(
            groups, torch.optim.SGD, transforms=[SAM(0.05), LAMP(1e-2, rollback_len=3, seed=0)], lr=0.05, momentum=0.9
        )

    model = make_model()
    optimizer = build_groups(model)
    closure = make_closure(model, optimizer)
    for _ in range(2):
        optimizer.step(closure)
    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer))
    fresh_model = copy_of_model(model)
    fresh = build_groups(fresh_model)
    fresh.param_groups[1]["lr"] = 0.5  # overwritten by the checkpoint
    set_optimizer_state_dict(fresh_model, fresh, optim_state_dict=saved)
    assert [g["lr"] for g in fresh.param_groups] == [0.05, 0.01]
    assert [g["rho"] for g in fresh.param_groups] == [0.1, 0.05]
    assert continue_both(model, optimizer, fresh_model, fresh, steps=4)


@pytest.mark.parametrize("chain", ["lamp", "sam+lamp"])
def test_dcp_round_trip_when_the_first_parameter_is_frozen(chain):
    """A frozen parameter in the optimizer is common (``model.parameters()``). DCP's
    ``set_optimizer_state_dict`` loads state only for parameters that require grad, so LAMP's
    object-level state (cycle position, generator state) must survive it wherever it is kept."""

    def frozen_first(seed=0):
        model = make_model(seed=seed)
        model[0].weight.requires_grad_(False)
        return model

    model = frozen_first()
    optimizer = build(model, chain)
    closure = make_closure(model, optimizer)
    for _ in range(2):
        optimizer.step(closure)
    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer))
    fresh_model = frozen_first(seed=5)
    fresh_model.load_state_dict(model.state_dict())
    fresh = build(fresh_model, chain)
    set_optimizer_state_dict(fresh_model, fresh, optim_state_dict=saved)
    assert_optimizers_equal(model, optimizer, fresh_model, fresh)
    assert continue_both(model, optimizer, fresh_model, fresh, steps=4)


@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize(
    "transforms",
    [
        lambda: [SAM(0.05)],
        lambda: [ASAM(0.5)],
        lambda: [LAMP(0.5, rollback_len=3, seed=0)],
        lambda: [LAMP(0.5, rollback_len=3)],  # default generator
        lambda: [SAM(0.05), LAMP(0.5, rollback_len=3, seed=0)],
    ],
    ids=["sam", "asam", "lamp-seeded", "lamp-unseeded", "sam+lamp"],
)
def test_dcp_get_on_a_fresh_optimizer_leaves_the_weights_alone(transforms, inner):
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build(model, transforms(), inner)
    saved = get_optimizer_state_dict(model, optimizer)  # DCP's step with lr=0 and zero grads
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())
    assert [g["lr"] for g in optimizer.param_groups] == [INNERS[inner][1]["lr"]]
    assert len(saved["state"]) == len(before)  # state was initialised for every parameter
    for entry in optimizer.state.values():
        for key, value in entry.items():
            if key.endswith(".sum"):
                assert torch.equal(value, torch.zeros_like(value))


@pytest.mark.parametrize("chain", ["lamp", "sam+lamp"])
def test_dcp_state_initialisation_does_not_change_the_run_that_follows(chain):
    """With SGD(momentum) the initialised state (zero buffers, no LAMP step, seeded generator) is
    the state a first step starts from, so the run equals one that was never inspected."""
    model, twin_model = make_model(), make_model()
    optimizer, twin = build(model, chain), build(twin_model, chain)
    get_optimizer_state_dict(model, optimizer)
    for value in cycle_steps(optimizer).values():
        assert value == 0
    continue_both(model, optimizer, twin_model, twin, steps=5)


@pytest.mark.parametrize("chain,inner", [("sam+lamp", "sgd"), ("asam", "adamw"), ("lamp", "adamw")])
def test_dcp_save_and_load_through_a_directory(tmp_path, chain, inner):
    model, optimizer = trained(chain, inner, steps=2)
    try:
        dcp.save(
            {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)},
            checkpoint_id=str(tmp_path),
        )
    except RuntimeError as error:  # pragma: no cover - depends on the torch build
        if "process group" in str(error).lower():
            pytest.skip(f"torch.distributed.checkpoint needs a process group here: {error}")
        raise

    fresh_model = make_model(seed=7)
    fresh = build(fresh_model, chain, inner)
    target = {"model": fresh_model.state_dict(), "optim": get_optimizer_state_dict(fresh_model, fresh)}
    dcp.load(target, checkpoint_id=str(tmp_path))
    fresh_model.load_state_dict(target["model"])
    set_optimizer_state_dict(fresh_model, fresh, optim_state_dict=target["optim"])
    assert_optimizers_equal(model, optimizer, fresh_model, fresh)
    continue_both(model, optimizer, fresh_model, fresh, steps=4)


def _dcp_resume(tmp_path, model, optimizer, build_fresh):
    """Save ``optimizer`` with ``dcp.save`` and load it into ``build_fresh(fresh_model)`` as a fresh
    process does (no gradients; ``get_optimizer_state_dict`` initialises the state, ``dcp.load``
    fills it); the fresh model and optimizer."""
    optimizer.zero_grad(set_to_none=True)
    try:
        dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(tmp_path))
    except RuntimeError as error:  # pragma: no cover - depends on the torch build
        if "process group" in str(error).lower():
            pytest.skip(f"torch.distributed.checkpoint needs a process group here: {error}")
        raise
    fresh_model = copy_of_model(model)
    fresh = build_fresh(fresh_model)
    target = {"optim": get_optimizer_state_dict(fresh_model, fresh)}
    dcp.load(target, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(fresh_model, fresh, optim_state_dict=target["optim"])
    return fresh_model, fresh


def test_dcp_resumes_the_docs_example_transforms_state_into_a_fresh_optimizer(tmp_path):
    """The guide's WeightEMA created its average in post_update only: DCP, which loads into a fresh
    optimizer only the keys its state-initialising step created, silently dropped it (the resumed
    run restarted the average). With its init_state the resumed run equals the uninterrupted one."""
    example = runpy.run_path(str(pathlib.Path(__file__).parent.parent / "docs" / "examples" / "optim_custom_transform.py"))
    chain = lambda: [SAM(0.05), example["GradientCentralization"](), example["WeightEMA"](decay=0.5)]  # noqa: E731
    model = make_model()
    optimizer = build(model, chain())
    closure = make_closure(model, optimizer)
    for _ in range(3):
        optimizer.step(closure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the state initialisation does not warn: both declare init_state
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        fresh_model, fresh = _dcp_resume(tmp_path, model, optimizer, lambda m: build(m, chain()))
    assert_optimizers_equal(model, optimizer, fresh_model, fresh)
    continue_both(model, optimizer, fresh_model, fresh, steps=3)


class _CountsWithoutInitState(Transform):
    """Keeps a per-parameter count and a step counter, created in pre_update only."""

    saves_state_before_step = True

    def pre_update(self, ctx):
        slot = ctx.slot_state(keys=("t",))
        slot["t"] = slot.get("t", 0) + 1
        for group in ctx.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    ctx.state[param]["count"] = ctx.state[param].get("count", 0) + 1


class _CountsWithInitState(_CountsWithoutInitState):
    def init_state(self, ctx):
        ctx.slot_state(keys=("t",)).setdefault("t", 0)
        for group in ctx.param_groups:
            for param in group["params"]:
                ctx.state[param].setdefault("count", 0)


class _Stateless(Transform):
    def pre_update(self, ctx):
        pass

    def init_state(self, ctx):
        pass  # says it keeps no state


class _CustomSAM(SAM):  # samgria's hooks, samgria's init_state
    def perturb(self, ctx):
        return super().perturb(ctx)


class _EMAExtendingPostUpdate(EMA):  # its hooks over EMA's: EMA's init_state creates every key
    def post_update(self, ctx):
        super().post_update(ctx)


class _ClipExtendingPreUpdate(ClipGradNorm):  # over a built-in that keeps no state
    def pre_update(self, ctx):
        super().pre_update(ctx)


class _SAMExtendingPreUpdate(SAM):
    def pre_update(self, ctx):
        super().pre_update(ctx)


class _SeedProtocolObject:
    def apply(self, model, loss_fn, batch):
        pass

    def post_step(self, model):
        pass


@pytest.mark.parametrize(
    "make,warns",
    [
        (_CountsWithoutInitState, True),
        (_CountsWithInitState, False),
        (_Stateless, False),
        (_CustomSAM, False),
        (_SeedProtocolObject, False),
        (lambda: LAMP(1e-2, rollback_len=3, seed=0), False),
        (NormalizeGrad, False),
        (FriendlySAM, False),
        (_EMAExtendingPostUpdate, False),
        (lambda: _ClipExtendingPreUpdate(1.0), False),
        (_SAMExtendingPreUpdate, False),
    ],
    ids=[
        "without-init-state",
        "with-init-state",
        "stateless",
        "sam-subclass",
        "seed-protocol",
        "lamp",
        "normalize-grad",
        "friendly-sam",
        "ema-subclass-hooks",
        "clip-subclass-hooks",
        "sam-subclass-hooks",
    ],
)
def test_the_state_initialisation_warns_naming_a_transform_whose_hooks_have_no_init_state(make, warns):
    """DCP loads only the keys the state-initialising step created: a transform that overrides its
    hooks without init_state loses its state at a resume without an error, so that step warns."""
    model = make_model()
    optimizer = build(model, [make()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_optimizer_state_dict(model, optimizer)  # a fresh optimizer: DCP's initialising step
    messages = [str(w.message) for w in caught if "init_state" in str(w.message)]
    if warns:
        assert len(messages) == 1 and all(w.category is UserWarning for w in caught if "init_state" in str(w.message))
        assert messages[0].startswith(
            "TransformingOptimizer: _CountsWithoutInitState override(s) pre_update/post_update but not init_state"
        )
    else:
        assert messages == []


@pytest.mark.parametrize("cls", [_CountsWithoutInitState, _CountsWithInitState])
def test_dcp_restores_a_users_transform_state_exactly_when_init_state_creates_it(tmp_path, cls):
    model = make_model()
    optimizer = build(model, [cls()])
    closure = make_closure(model, optimizer)
    for _ in range(3):
        optimizer.step(closure)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh_model, fresh = _dcp_resume(tmp_path, model, optimizer, lambda m: build(m, [cls()]))
    count = optimizer.slots[0] + ".count"
    assert [optimizer.state[p][count] for p in model.parameters()] == [3] * 4
    restored = [fresh.state[p].get(count) for p in fresh_model.parameters()]
    assert restored == ([3] * 4 if cls is _CountsWithInitState else [None] * 4)  # the warning's case
    if cls is _CountsWithInitState:
        continue_both(model, optimizer, fresh_model, fresh, steps=2)


# -- torch.save / torch.load --------------------------------------------------------------------------
@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_torch_save_and_weights_only_load_continue_bit_for_bit(chain, inner):
    model, optimizer = trained(chain, inner, steps=2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    fresh_model = make_model(seed=9)
    fresh_model.load_state_dict(checkpoint["model"])
    fresh = build(fresh_model, chain, inner)
    fresh.load_state_dict(checkpoint["optim"])
    assert_optimizers_equal(model, optimizer, fresh_model, fresh)
    rolled_back = continue_both(model, optimizer, fresh_model, fresh, steps=4)
    assert rolled_back == ("lamp" in chain)


# -- chain mismatches -----------------------------------------------------------------------------------
MISMATCHES = {
    "sam-into-asam": (lambda: [SAM(0.05)], lambda: [ASAM(0.5)], ["SAM()", "ASAM()"]),
    "lamp-into-sam": (lambda: [LAMP(1e-2, 3, seed=0)], lambda: [SAM(0.05)], ["LAMP(rollback_len=3, seed=0)", "SAM()"]),
    "sam,lamp-into-lamp,sam": (
        lambda: [SAM(0.05), LAMP(1e-2, 3, seed=0)],
        lambda: [LAMP(1e-2, 3, seed=0), SAM(0.05)],
        ["sam=SAM()", "lamp=LAMP(rollback_len=3, seed=0)"],
    ),
    "rollback_len-3-into-4": (lambda: [LAMP(1e-2, 3, seed=0)], lambda: [LAMP(1e-2, 4, seed=0)], ["rollback_len=3", "rollback_len=4"]),
    "seed-0-into-1": (lambda: [LAMP(1e-2, 3, seed=0)], lambda: [LAMP(1e-2, 3, seed=1)], ["seed=0", "seed=1"]),
    "sam-into-nothing": (lambda: [SAM(0.05)], lambda: [], ["SAM()"]),
    "nothing-into-sam": (lambda: [], lambda: [SAM(0.05)], ["SAM()"]),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_loading_a_checkpoint_of_another_chain_raises_naming_it(case):
    source_chain, target_chain, names = MISMATCHES[case]
    _, source = trained(source_chain(), steps=1)
    saved = copy.deepcopy(source.state_dict())
    model, target = trained(target_chain(), steps=1)
    state_before = copy.deepcopy(state_by_index(target))
    groups_before = copy.deepcopy(groups_without_params(target))
    with pytest.raises(ValueError) as info:
        target.load_state_dict(saved)
    message = str(info.value)
    for name in names:
        assert name in message, (name, message)
    assert_states_equal(state_by_index(target), state_before)
    assert groups_without_params(target) == groups_before


def test_a_plain_inner_optimizers_checkpoint_loads_into_a_wrapper():
    plain_model = make_model()
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.05, momentum=0.9)
    closure = make_closure(plain_model, plain)
    for _ in range(2):
        plain.step(closure)
    saved = copy.deepcopy(plain.state_dict())
    assert "transform_chain" not in saved["param_groups"][0]

    # SAM with rho=0 perturbs nothing: the wrapper must continue exactly as the plain optimizer.
    model = copy_of_model(plain_model)
    wrapper = TransformingOptimizer(model.parameters(), torch.optim.SGD, transforms=[SAM(0.0)], lr=0.3)
    wrapper.load_state_dict(saved)
    group = wrapper.param_groups[0]
    assert group["lr"] == 0.05 and group["momentum"] == 0.9
    assert group["rho"] == 0.0 and group["transform_chain"] == ("sam=SAM()",)
    for plain_param, param in zip(plain_model.parameters(), model.parameters()):
        assert torch.equal(wrapper.state[param]["momentum_buffer"], plain.state[plain_param]["momentum_buffer"])
    wrapper_closure = make_closure(model, wrapper)
    for _ in range(3):
        plain.step(closure)
        wrapper.step(wrapper_closure)
        assert_weights_equal(plain_model, model)

    # A transform's default fills a plain checkpoint's group.
    other = TransformingOptimizer(make_model().parameters(), torch.optim.SGD, transforms=[SAM(0.07)], lr=0.3)
    other.load_state_dict(copy.deepcopy(saved))
    assert other.param_groups[0]["rho"] == 0.07


def _release_0_1_checkpoint(optimizer, transform_state, transforms):
    """A checkpoint in the layout samgria 0.1.0 saved (commit f31c715, TransformingOptimizer.state_dict):
    the inner optimizer's "state" and "param_groups", then "transform_state" (per parameter
    index, e.g. LAMP's {"lamp_sum", "lamp_count", "lamp_step"}) and "transforms" (per transform,
    e.g. LAMP's {"generators": {device: state}})."""
    inner = optimizer.base_optimizer.state_dict()
    groups = [{key: value for key, value in group.items() if key != "transform_chain"} for group in inner["param_groups"]]
    return {"state": inner["state"], "param_groups": groups, "transform_state": transform_state, "transforms": transforms}


def test_a_release_0_1_checkpoint_whose_transforms_held_nothing_loads_as_a_plain_optimizers():
    """SAM, ASAM and the gradient transforms held nothing in 0.1.0: such a checkpoint loads as a
    plain optimizer's (its momentum buffers included)."""
    source_model = make_model()
    source = TransformingOptimizer(source_model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, transforms=[SAM(0.05)])
    source.step(make_closure(source_model, source))  # the inner optimizer has state to carry
    other_model = make_model(seed=2)
    other = TransformingOptimizer(other_model.parameters(), torch.optim.SGD, lr=0.3, transforms=[SAM(0.05)])
    other.load_state_dict(_release_0_1_checkpoint(source, {}, [{}]))
    assert other.param_groups[0]["lr"] == 0.05 and other.param_groups[0]["momentum"] == 0.9
    for param, source_param in zip(other_model.parameters(), source_model.parameters()):
        assert torch.equal(other.state[param]["momentum_buffer"], source.state[source_param]["momentum_buffer"])


def _as_release_0_1(optimizer):
    """This release's float64 optimizer with a NormalizeGrad (slot "normalize_grad") and perhaps a
    seeded LAMP (slot "lamp") as 0.1.0 saved it: NormalizeGrad's eps under "normalize_eps", no
    other transform key in the groups (0.1.0's LAMP had none), LAMP's sums, counts and cycle in
    "transform_state" and its generator in "transforms"."""
    saved = copy.deepcopy(optimizer.state_dict())
    slots = optimizer.chain.slots
    eps_key = optimizer.chain.keys["normalize_grad"]["eps"]
    groups, state, transform_state = [], {}, {}
    for group in saved["param_groups"]:
        old = {key: value for key, value in group.items() if key not in optimizer.chain.defaults and key != "transform_chain"}
        old["normalize_eps"] = group[eps_key]
        groups.append(old)
    generators = {}
    for index, entry in saved["state"].items():
        state[index] = {key: value for key, value in entry.items() if not key.startswith("lamp.")}
        lamp = {key[len("lamp."):]: value for key, value in entry.items() if key.startswith("lamp.")}
        if "rng_state" in lamp:
            generators["cpu"] = lamp["rng_state"]
        old = {"lamp_sum": lamp["sum"], "lamp_count": lamp["count"]} if "sum" in lamp else {}
        if "cycle_step" in lamp:
            old["lamp_step"] = lamp["cycle_step"]
        if old:
            transform_state[index] = old
    transforms = [{"generators": generators} if slot == "lamp" else {} for slot in slots]
    return {"state": state, "param_groups": groups, "transform_state": transform_state, "transforms": transforms}


@pytest.mark.parametrize(
    "inner,kwargs,lamp",
    [(torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}, False), (torch.optim.Adam, {"lr": 1e-2}, True)],
    ids=["sgd", "adam-lamp"],
)
def test_a_release_0_1_normalize_eps_becomes_each_groups_normalize_grad_eps(inner, kwargs, lamp):
    """0.1.0's NormalizeGrad kept its per-group eps under "normalize_eps"; this release's reads
    "eps" ("normalize_grad.eps" beside Adam's). The old key was kept unread and every group got
    the constructor's eps (a group's 10.0 silently became 1e-3). The resumed run ends on the
    weights of the run that was never checkpointed."""

    def groups(model, eps_key):
        first = {"params": list(model[0].parameters())}
        if eps_key is not None:
            first[eps_key] = 10.0
        return [first, {"params": list(model[2].parameters())}]

    def transforms():
        return [NormalizeGrad(1e-3)] + ([LAMP(1e-2, rollback_len=3, seed=0)] if lamp else [])

    model = make_model()
    eps_key = "normalize_grad.eps" if inner is torch.optim.Adam else "eps"
    optimizer = TransformingOptimizer(groups(model, eps_key), inner, transforms=transforms(), **kwargs)
    closure = make_closure(model, optimizer)
    for _ in range(2):
        optimizer.step(closure)
    checkpoint = _as_release_0_1(optimizer)
    assert [group["normalize_eps"] for group in checkpoint["param_groups"]] == [10.0, 1e-3]
    assert bool(checkpoint["transform_state"]) == lamp
    as_saved = copy.deepcopy(checkpoint)

    resumed_model = copy_of_model(model)
    resumed = TransformingOptimizer(groups(resumed_model, None), inner, transforms=transforms(), **kwargs)
    resumed.load_state_dict(checkpoint)
    _assert_same_nested(checkpoint, as_saved, "checkpoint")
    assert [group[eps_key] for group in resumed.param_groups] == [10.0, 1e-3]
    assert not any("normalize_eps" in group for group in resumed.param_groups)
    resumed_closure = make_closure(resumed_model, resumed)
    for _ in range(4):
        optimizer.step(closure)
        resumed.step(resumed_closure)
    assert_weights_equal(resumed_model, model)


def test_a_release_0_1_normalize_eps_beside_another_value_of_its_new_key_is_refused():
    """A 0.1.0 group with "normalize_eps" and a key "eps" of its own (0.1.0 read only the
    former): which one is NormalizeGrad's eps is ambiguous; refused, nothing changed."""
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, transforms=[NormalizeGrad(1e-3)], lr=0.05)
    optimizer.step(make_closure(model, optimizer))
    checkpoint = _as_release_0_1(optimizer)
    checkpoint["param_groups"][0]["eps"] = 0.5
    target = TransformingOptimizer(copy_of_model(model).parameters(), torch.optim.SGD, transforms=[NormalizeGrad(1e-3)], lr=0.3)
    before = copy.deepcopy(target.state_dict())
    detail = r"its param_groups\[0\] sets 'normalize_eps'=0\.001, 0\.1\.0's name of NormalizeGrad's eps, and 'eps'=0\.5, which this release reads as slot 'normalize_grad''s eps"
    with pytest.raises(ValueError, match=rf"^the checkpoint has the layout of samgria 0\.1\.0 .*: {detail}\. Resume it with 0\.1\.0"):
        target.load_state_dict(checkpoint)
    assert_state_dicts_equal(target.state_dict(), before)
    checkpoint["param_groups"][0]["eps"] = 1e-3  # the same value: no ambiguity
    target.load_state_dict(checkpoint)
    assert target.param_groups[0]["eps"] == 1e-3 and target.param_groups[0]["lr"] == 0.05


# Checkpoints saved by release 0.1.0 itself and 0.1.0's own continuation of each run
# (tests/data/release_0_1/README.md says how they were made).
RELEASE_0_1_GOLDEN = pathlib.Path(__file__).parent / "data" / "release_0_1" / "golden.pt.gz"
RELEASE_0_1_CHAINS = {
    "float64_lamp": lambda: [LAMP(1e-2, rollback_len=3, seed=0)],
    "float64_sam_lamp": lambda: [SAM(0.05), LAMP(1e-2, rollback_len=3, seed=0)],
    "float64_lamp_frozen_first": lambda: [LAMP(1e-2, rollback_len=3, seed=0)],
    "float64_lamp_unseeded": lambda: [LAMP(1e-2, rollback_len=3)],
    "bfloat16_lamp": lambda: [LAMP(1e-2, rollback_len=1, seed=0)],
    "bfloat16_lamp_count2": lambda: [LAMP(1e-2, rollback_len=3, seed=0)],
}


def _release_0_1_golden():
    return torch.load(io.BytesIO(gzip.decompress(RELEASE_0_1_GOLDEN.read_bytes())), weights_only=True)


def _release_0_1_model(golden, name):
    """The golden run's model with the checkpoint's weights (its first weight frozen where the
    run had it frozen)."""
    run = golden[name]
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(run["model"]["0.weight"].dtype)
    model.load_state_dict(run["model"])
    if name.endswith("_frozen_first"):
        model[0].weight.requires_grad_(False)
    return model


def _resumed_from_release_0_1(golden, name, transforms=None):
    """A fresh optimizer (another lr, which the checkpoint's groups replace) loaded from the
    golden 0.1.0 checkpoint; asserts that the load left the checkpoint as it was."""
    model = _release_0_1_model(golden, name)
    chain = RELEASE_0_1_CHAINS[name]() if transforms is None else transforms
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.7, momentum=0.5, transforms=chain)
    checkpoint = golden[name]["optimizer"]
    as_saved = copy.deepcopy(checkpoint)
    optimizer.load_state_dict(checkpoint)
    _assert_same_nested(checkpoint, as_saved, "checkpoint")
    assert optimizer.param_groups[0]["lr"] == 0.1 and optimizer.param_groups[0]["momentum"] == 0.9
    return model, optimizer


def _assert_same_nested(actual, expected, where):
    """Dicts, lists and tensors equal all the way down, tensors bit for bit."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            _assert_same_nested(actual[key], expected[key], (where, key))
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for index, (a, b) in enumerate(zip(actual, expected)):
            _assert_same_nested(a, b, (where, index))
    else:
        assert_same_value(actual, expected, where)


@pytest.mark.parametrize("name", ["float64_lamp", "float64_sam_lamp", "float64_lamp_frozen_first", "float64_lamp_unseeded", "bfloat16_lamp"])
def test_a_release_0_1_checkpoint_with_lamp_state_resumes_bit_for_bit_as_release_0_1_continued(name):
    """0.1.0's LAMP sums, counts, cycle position and generators land in LAMP's slot: the resumed
    run ends on the weights 0.1.0's own continuation reached (torch.equal). Unseeded, 0.1.0 drew
    from the default generator, which the golden run seeded at the checkpoint; bfloat16 over
    2-step cycles, where 0.1.0's float32 sum and this release's running mean agree."""
    golden = _release_0_1_golden()
    model, optimizer = _resumed_from_release_0_1(golden, name)
    if name.endswith("_unseeded"):
        torch.manual_seed(golden["global_seed"])
    dtype = next(model.parameters()).dtype
    closure = make_closure(model, optimizer, data=(golden["x"].to(dtype), golden["y"].to(dtype)))
    for _ in range(golden[name]["continued_for"]):
        optimizer.step(closure)
    for key, value in model.state_dict().items():
        assert_same_value(value, golden[name]["continued"][key], key)


def test_a_release_0_1_checkpoint_puts_each_piece_of_lamp_state_in_its_slot():
    """By hand: sum and count per parameter, the cycle position on the first parameter that
    requires grad, the generator state on the first parameter of its device; a 16-bit
    parameter's float32 sum becomes the mean sum / count in its dtype; the LAMP's own slot name."""
    golden = _release_0_1_golden()
    old = golden["float64_sam_lamp"]["optimizer"]
    _, optimizer = _resumed_from_release_0_1(golden, "float64_sam_lamp")
    state = optimizer.state_dict()["state"]
    for index, entry in old["transform_state"].items():
        assert_same_value(state[index]["lamp.sum"], entry["lamp_sum"], index)
        assert state[index]["lamp.count"] == entry["lamp_count"] == 2
        assert_same_value(state[index]["momentum_buffer"], old["state"][index]["momentum_buffer"], index)
    assert state[0]["lamp.cycle_step"] == old["transform_state"][0]["lamp_step"] == 2
    assert_same_value(state[0]["lamp.rng_state"], old["transforms"][1]["generators"]["cpu"], "rng_state")
    assert not any("cycle_step" in key or "rng_state" in key for index in (1, 2, 3) for key in state[index])
    assert [g["transform_chain"] for g in optimizer.param_groups] == [optimizer.chain.spec()]
    assert optimizer.param_groups[0]["rho"] == 0.05 and optimizer.param_groups[0]["eps"] == 1e-2

    old = golden["float64_lamp_frozen_first"]["optimizer"]  # 0.1.0 kept the cycle on the frozen weight
    assert old["transform_state"][0] == {"lamp_step": 2}
    _, optimizer = _resumed_from_release_0_1(golden, "float64_lamp_frozen_first")
    state = optimizer.state_dict()["state"]
    assert not state.get(0)
    assert state[1]["lamp.cycle_step"] == 2 and "lamp.rng_state" in state[1]

    old = golden["bfloat16_lamp_count2"]["optimizer"]
    _, optimizer = _resumed_from_release_0_1(golden, "bfloat16_lamp_count2")
    state = optimizer.state_dict()["state"]
    for index, entry in old["transform_state"].items():
        assert entry["lamp_sum"].dtype == torch.float32 and entry["lamp_count"] == 2
        assert "lamp.sum" not in state[index]
        assert_same_value(state[index]["lamp.mean"], (entry["lamp_sum"] / 2).to(torch.bfloat16), index)

    _, optimizer = _resumed_from_release_0_1(golden, "float64_lamp", transforms={"avg": LAMP(1e-2, rollback_len=3, seed=0)})
    state = optimizer.state_dict()["state"]
    assert state[0]["avg.cycle_step"] == 2 and state[3]["avg.count"] == 2


def _0_1_generators(checkpoint, generators):
    checkpoint["transforms"][1]["generators"] = generators


def _0_1_set(where, value):
    def damage(checkpoint):
        *path, last = where
        target = checkpoint
        for key in path:
            target = target[key]
        target[last] = value

    return damage


_RELEASE_0_1_REFUSALS = {
    "two_lamps": (
        lambda: [LAMP(1e-2, rollback_len=3, seed=0), LAMP(1e-2, rollback_len=3, seed=1)], None,
        r"this optimizer's chain has 2 LAMPs \(slots 'lamp', 'lamp_1'\): which one takes 0\.1\.0's LAMP state is ambiguous",
    ),
    "no_lamp": (
        lambda: [SAM(0.05), NormalizeGrad(1e-8)], None,
        r"this optimizer's chain has no LAMP to take 0\.1\.0's LAMP state",
    ),
    "fewer_transforms": (
        lambda: [LAMP(1e-2, rollback_len=3, seed=0)], None,
        r"its 'transforms' holds 2 entries, but this optimizer's chain has 1 transforms \(lamp=LAMP\(rollback_len=3, seed=0\)\)",
    ),
    "more_transforms": (
        lambda: [SAM(0.05), LAMP(1e-2, rollback_len=3, seed=0), NormalizeGrad(1e-8)], None,
        r"its 'transforms' holds 2 entries, but this optimizer's chain has 3 transforms",
    ),
    "lamp_elsewhere": (
        lambda: [LAMP(1e-2, rollback_len=3, seed=0), SAM(0.05)], None,
        r"its 'transforms'\[1\] holds state \['generators'\], but transform 1 of this optimizer is sam=SAM\(\): only LAMP's state converts",
    ),
    "state_of_another_transform": (
        None, _0_1_set(("transforms", 0), {"buffers": torch.zeros(2)}),
        r"its 'transforms'\[0\] holds state \['buffers'\], but transform 0 of this optimizer is sam=SAM\(\): only LAMP's state converts",
    ),
    "parameter_state_of_another_transform": (
        None, _0_1_set(("transform_state", 1, "ema_average"), torch.zeros(4)),
        r"its 'transform_state'\[1\] holds \['ema_average'\], which is not LAMP's state \(lamp_sum, lamp_count, lamp_step\)",
    ),
    "cycle_on_another_parameter": (
        None, _0_1_set(("transform_state", 2, "lamp_step"), 1),
        r"its 'transform_state'\[2\] holds lamp_step, which 0\.1\.0 kept on the first parameter only",
    ),
    "unknown_parameter_index": (
        None, _0_1_set(("transform_state", 7), {"lamp_count": 0}),
        r"its 'transform_state' refers to parameter index 7, which its param_groups do not list",
    ),
    "seeded_generators_into_an_unseeded_lamp": (
        lambda: [SAM(0.05), LAMP(1e-2, rollback_len=3)], None,
        r"its LAMP drew its noise from seeded generators \(devices \['cpu'\]\), but this optimizer's LAMP \(slot 'lamp'\) has seed=None",
    ),
    "generator_of_a_device_without_parameters": (
        None, lambda c: _0_1_generators(c, {"cpu": c["transforms"][1]["generators"]["cpu"], "meta": torch.zeros(16, dtype=torch.uint8)}),
        r"its LAMP holds a generator state for device 'meta', but no parameter of this optimizer is on meta",
    ),
    "generator_key_naming_no_device": (
        None, lambda c: _0_1_generators(c, {"gpu zero": torch.zeros(16, dtype=torch.uint8)}),
        r"its LAMP's 'generators' has the key 'gpu zero', which names no device",
    ),
    "transforms_not_a_list": (
        None, _0_1_set(("transforms",), ({}, 3)),
        r"its 'transforms' is not a list of dicts \(a tuple of dict, int\)",
    ),
    "lamp_entry_with_other_keys": (
        None, _0_1_set(("transforms", 1, "seed"), 0),
        r"its 'transforms'\[1\] \(LAMP's\) holds \['seed'\], not only 'generators'",
    ),
}


@pytest.mark.parametrize("case", sorted(_RELEASE_0_1_REFUSALS))
def test_a_release_0_1_checkpoint_that_does_not_map_unambiguously_is_refused_naming_why(case):
    """Only one LAMP, at its position in a chain of the checkpoint's length, converts; anything
    else is refused naming the mismatch, and neither the optimizer nor the checkpoint changes."""
    transforms, damage, detail = _RELEASE_0_1_REFUSALS[case]
    golden = _release_0_1_golden()
    checkpoint = golden["float64_sam_lamp"]["optimizer"]
    if damage is not None:
        damage(checkpoint)
    model = _release_0_1_model(golden, "float64_sam_lamp")
    chain = transforms() if transforms is not None else RELEASE_0_1_CHAINS["float64_sam_lamp"]()
    target = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.3, transforms=chain)
    target.step(make_closure(model, target, data=(golden["x"], golden["y"])))
    before, as_saved = copy.deepcopy(target.state_dict()), copy.deepcopy(checkpoint)
    weights = copy.deepcopy(model.state_dict())
    message = rf"^the checkpoint has the layout of samgria 0\.1\.0 \(top-level 'transform_state' and 'transforms'\), whose transform state this release converts only unambiguously: {detail}.*\. Resume it with 0\.1\.0, or start the transforms afresh by loading only the inner optimizer's part, .* \(nothing was loaded\)$"
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(checkpoint)
    assert_state_dicts_equal(target.state_dict(), before)
    _assert_same_nested(checkpoint, as_saved, "checkpoint")
    for key, value in model.state_dict().items():
        assert_same_value(value, weights[key], key)


def test_a_release_0_1_checkpoint_made_with_other_lamp_settings_is_refused_where_its_state_says_so():
    """0.1.0 recorded none of LAMP's settings: they are the constructor's. A cycle position past
    the constructor's rollback_len is refused by LAMP's own check, nothing changed; the advice
    (load the inner optimizer's part alone) starts the transforms afresh."""
    golden = _release_0_1_golden()
    model = _release_0_1_model(golden, "float64_sam_lamp")
    target = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.3, transforms=[SAM(0.05), LAMP(1e-2, rollback_len=1, seed=0)])
    before = copy.deepcopy(target.state_dict())
    old = golden["float64_sam_lamp"]["optimizer"]
    with pytest.raises(ValueError, match=r"^the checkpoint's LAMP slot 'lamp' holds cycle_step=2, not an integer in \[0, 1\]$"):
        target.load_state_dict(old)
    assert_state_dicts_equal(target.state_dict(), before)
    target.load_state_dict({"state": old["state"], "param_groups": old["param_groups"]})
    assert target.param_groups[0]["lr"] == 0.1
    assert not any(key.startswith("lamp.") for entry in target.state.values() for key in entry)


def test_an_optimizer_pickled_by_release_0_1_unpickles_and_refuses_every_use_naming_the_remedy(monkeypatch):
    """0.1.0 pickled a list of transforms and no chain: the object unpickled, then its first step
    raised AttributeError: 'TransformingOptimizer' object has no attribute 'chain'. Refusing it
    in the unpickling would make the rest of the file (the model) unreadable too."""
    from samgria import MAML

    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    current = optimizer.__getstate__()
    old = {key: value for key, value in current.items() if key not in ("chain", "atomic", "param_groups")}
    old["transforms"] = [SAM(0.05)]
    with monkeypatch.context() as patch:  # what 0.1.0 pickled
        patch.setattr(TransformingOptimizer, "__getstate__", lambda self: old)
        blob = pickle.dumps({"model": model, "optimizer": optimizer})
    loaded = pickle.loads(blob)
    assert torch.equal(loaded["model"][0].weight, model[0].weight)  # the model is readable
    message = (
        r"^this TransformingOptimizer was pickled by an earlier samgria release \(0\.1\.0\), whose layout "
        r"differs \(it has no chain, atomic\), and cannot be used: load the file with that release and save "
        r"optimizer\.state_dict\(\)"
    )
    stale = loaded["optimizer"]
    assert isinstance(stale, TransformingOptimizer)
    grads = [torch.ones_like(p) for p in loaded["model"].parameters()]
    for p, g in zip(loaded["model"].parameters(), grads):
        p.grad = g
    uses = [
        lambda: stale.step(make_closure(loaded["model"], stale)),
        lambda: stale.state_dict(),
        lambda: stale.zero_grad(),  # ran on the old attributes and cleared the model's gradients
        lambda: stale.second_step(),  # said "called without first_step()"
        lambda: stale.cancel_step(),
        lambda: stale.load_state_dict(optimizer.state_dict()),
        lambda: repr(stale),
    ]
    for use in uses:
        with pytest.raises(RuntimeError, match=message):
            use()
    assert all(p.grad is g for p, g in zip(loaded["model"].parameters(), grads))
    again = pickle.loads(pickle.dumps(stale))  # pickled again: the same old object, still refused
    with pytest.raises(RuntimeError, match=message):
        again.zero_grad()

    class WithProperty(TransformingOptimizer):
        @property
        def current_lr(self):
            return self.param_group[0]["lr"]  # a typo inside a property

    with pytest.raises(AttributeError, match=r"has no attribute 'param_group'"):  # named, as by torch
        WithProperty(make_model().parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)]).current_lr

    meta = MAML(make_model(), torch.optim.SGD, lr=0.1)
    old_meta = {key: value for key, value in meta.__getstate__().items() if key != "checkpoint_inner_steps"}
    stale_meta = MAML.__new__(MAML)
    stale_meta.__setstate__(old_meta)  # what pickle.load calls
    for use in (lambda: stale_meta.inner_loop(), lambda: stale_meta.zero_grad()):
        with pytest.raises(RuntimeError, match=r"^this MAML was pickled by an earlier samgria release \(0\.1\.0\), whose layout differs \(it has no checkpoint_inner_steps\)"):
            use()
    twin = pickle.loads(pickle.dumps(optimizer))  # this release's pickles load and work
    assert twin.chain.slots == optimizer.chain.slots


def test_a_lamp_pickled_by_release_0_1_unpickles_as_the_lamp_its_settings_build():
    """0.1.0's LAMP kept {device: torch.Generator} in the attribute _generators, which hid
    this release's method of that name: the unpickled LAMP's first step raised TypeError
    ("'dict' object is not callable"). Its run goes on as a LAMP built with its settings."""
    generator = torch.Generator().manual_seed(0)
    torch.empty(5).uniform_(generator=generator)  # a stepped 0.1.0 LAMP's generator
    old = LAMP(1e-2, rollback_len=3, seed=0)
    old.__dict__ = {"eps": 1e-2, "rollback_len": 3, "seed": 0, "_generators": {"cpu": generator}, "_had_grad": None}
    unpickled = pickle.loads(pickle.dumps(old))
    model, twin_model = make_model(), make_model()
    optimizer = build(model, [SAM(0.05), unpickled])
    twin = build(twin_model, "sam+lamp")
    for _ in range(5):
        optimizer.step(make_closure(model, optimizer))
        twin.step(make_closure(twin_model, twin))
    assert_optimizers_equal(model, optimizer, twin_model, twin)
    assert "_generators" not in vars(unpickled) and repr(unpickled) == "LAMP(eps=0.01, rollback_len=3, seed=0)"


def test_a_normalize_grad_pickled_by_release_0_1_unpickles_and_steps_as_the_one_its_eps_builds():
    """0.1.0's NormalizeGrad had only eps (p and param_ndim came later): the unpickled transform's
    first step raised AttributeError ('NormalizeGrad' object has no attribute 'p'). It takes the
    defaults 0.1.0 computed with (L2 norm of each whole gradient) and steps as NormalizeGrad(eps)."""
    old = NormalizeGrad(1e-3)
    old.__dict__ = {"eps": 1e-3}  # what 0.1.0 pickled
    unpickled = pickle.loads(pickle.dumps(old))
    model, twin_model = make_model(), make_model()
    optimizer = build(model, [SAM(0.05), unpickled])
    twin = build(twin_model, [SAM(0.05), NormalizeGrad(1e-3)])
    for _ in range(3):
        optimizer.step(make_closure(model, optimizer))
        twin.step(make_closure(twin_model, twin))
    assert_optimizers_equal(model, optimizer, twin_model, twin)
    assert repr(unpickled) == repr(NormalizeGrad(1e-3))


def test_a_checkpoint_of_this_release_with_a_transforms_key_added_beside_loads_as_before():
    """A 'transforms' key that a post-hook adds (say, as metadata) made the load take this
    release's checkpoint for one of 0.1.0 and refuse it; torch ignores unknown top-level keys."""
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), LAMP(seed=0)])
    optimizer.step(make_closure(model, optimizer))
    checkpoint = optimizer.state_dict()
    checkpoint["transforms"] = ["SAM(rho=0.05)", "LAMP(seed=0)"]
    twin_model = copy_of_model(model)
    twin = TransformingOptimizer(twin_model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), LAMP(seed=0)])
    twin.load_state_dict(checkpoint)
    for _ in range(3):
        optimizer.step(make_closure(model, optimizer))
        twin.step(make_closure(twin_model, twin))
    assert_weights_equal(model, twin_model)

    # A plain torch checkpoint with such a key: 0.1.0 always wrote both of its keys.
    plain = torch.optim.SGD(make_model().parameters(), lr=0.05).state_dict()
    plain["transforms"] = ["SAM(rho=0.05)"]
    wrapper = TransformingOptimizer(make_model().parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    wrapper.load_state_dict(plain)
    assert wrapper.param_groups[0]["lr"] == 0.05


def test_a_plain_checkpoint_leaves_each_groups_transform_hyperparameters_as_they_are():
    """A plain torch checkpoint says nothing about rho: a group built with rho=0 (biases left out
    of SAM) and a group whose rho was edited keep theirs, paired by position as torch pairs groups."""
    plain_model = make_model()
    weights = [p for n, p in plain_model.named_parameters() if n.endswith("weight")]
    others = [p for n, p in plain_model.named_parameters() if not n.endswith("weight")]
    plain = torch.optim.SGD([{"params": weights}, {"params": others}], lr=0.05, momentum=0.9)
    plain.step(make_closure(plain_model, plain))
    saved = copy.deepcopy(plain.state_dict())

    model = copy_of_model(plain_model)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    others = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    wrapper = TransformingOptimizer(
        [{"params": weights}, {"params": others, "rho": 0.0}],
        torch.optim.SGD,
        transforms=[SAM(0.05), LAMP(1e-2, rollback_len=2, seed=0)],
        lr=0.3,
    )
    wrapper.param_groups[0]["eps"] = 0.02  # LAMP's eps, edited (as a scheduler would)
    wrapper.param_groups[1]["sam.rho"] = 0.03  # an edit under the qualified key, not stepped yet
    wrapper.load_state_dict(saved)
    assert [group["rho"] for group in wrapper.param_groups] == [0.05, 0.03]
    assert "sam.rho" not in wrapper.param_groups[1]
    assert [group["eps"] for group in wrapper.param_groups] == [0.02, 1e-2]
    assert [group["lr"] for group in wrapper.param_groups] == [0.05, 0.05]  # the checkpoint's

    # An invalid value of the optimizer's own (an edit not stepped yet) is named as its own, not
    # blamed on the checkpoint, and the load changes nothing.
    wrapper.param_groups[0]["rho"] = -1.0
    before = copy.deepcopy(wrapper.state_dict())
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: rho must be a finite number >= 0, got -1\.0"):
        wrapper.load_state_dict(saved)
    wrapper.param_groups[0]["rho"] = 0.05
    before["param_groups"][0]["rho"] = 0.05
    assert wrapper.state_dict()["param_groups"] == before["param_groups"]


@pytest.mark.parametrize(
    "inner,kwargs,transforms,own_key,slot_key",
    [
        (torch.optim.Adam, {"lr": 1e-2, "eps": 1e-6}, lambda: [LAMP(2e-2, rollback_len=3, seed=0)], "eps", "lamp.eps"),
        (torch.optim.Adadelta, {"lr": 1.0, "rho": 0.7}, lambda: [SAM(0.05)], "rho", "sam.rho"),
    ],
    ids=["adam-lamp", "adadelta-sam"],
)
def test_a_plain_checkpoint_keeps_the_inner_optimizers_own_key(inner, kwargs, transforms, own_key, slot_key):
    plain_model = make_model()
    plain = inner(plain_model.parameters(), **kwargs)
    plain.step(make_closure(plain_model, plain))
    saved = copy.deepcopy(plain.state_dict())
    wrapper = TransformingOptimizer(make_model().parameters(), inner, transforms=transforms(), lr=0.5)
    wrapper.load_state_dict(saved)
    group = wrapper.param_groups[0]
    assert group[own_key] == kwargs[own_key]  # the inner optimizer's value from the checkpoint
    assert group[slot_key] == getattr(wrapper.transforms[0], slot_key.split(".")[1])
    for param, plain_param in zip(params_in_order(wrapper), plain_model.parameters()):
        for key, value in plain.state[plain_param].items():
            assert_same_value(wrapper.state[param][key], value, key)


# -- a failed load changes nothing -------------------------------------------------------------------------
def _damage_rng(sd):
    sd["state"][0]["lamp.rng_state"] = torch.zeros(3, dtype=torch.uint8)


def _damage_sum(sd):
    sd["state"][1]["lamp.sum"] = torch.zeros(7, dtype=torch.float64)


def _damage_rho(sd):
    sd["param_groups"][0]["rho"] = -1


def _damage_eps(sd):
    sd["param_groups"][0]["eps"] = float("nan")


@pytest.mark.parametrize("damage", [_damage_rng, _damage_sum, _damage_rho, _damage_eps], ids=["rng_state", "sum-shape", "rho=-1", "eps=nan"])
def test_a_failing_load_leaves_the_optimizer_exactly_as_before(damage):
    chain = lambda: [SAM(0.05), LAMP(1e-2, rollback_len=3, seed=0)]  # noqa: E731
    _, source = trained(chain(), steps=1)
    saved = copy.deepcopy(source.state_dict())
    assert "lamp.rng_state" in saved["state"][0] and "lamp.sum" in saved["state"][1]
    damage(saved)

    model, optimizer = trained(chain(), steps=2)
    twin_model, twin = trained(chain(), steps=2)
    state_before = copy.deepcopy(state_by_index(optimizer))
    groups_before = copy.deepcopy(groups_without_params(optimizer))
    groups_object = optimizer.param_groups
    with pytest.raises(ValueError):
        optimizer.load_state_dict(saved)
    assert_states_equal(state_by_index(optimizer), state_before)
    assert groups_without_params(optimizer) == groups_before
    assert optimizer.param_groups is groups_object and optimizer.param_groups is optimizer.inner.param_groups
    assert [p for p in optimizer.param_groups[0]["params"]] == list(model.parameters())
    # ... and it steps exactly as an optimizer that never saw the bad checkpoint.
    continue_both(model, optimizer, twin_model, twin, steps=3)


@pytest.mark.parametrize("chain", ["sam", "sam+lamp"])
def test_a_checkpoint_the_inner_optimizer_s_setstate_refuses_leaves_the_optimizer_as_before(chain):
    """torch's load ends with the inner optimizer's __setstate__, where AdamW reads every entry's
    "step": a checkpoint whose entry lacks it was committed first (the moments and the
    transforms' slots loaded), then the load raised, and every later step raised KeyError."""
    _, source = trained(chain, inner="adamw", steps=1)
    saved = copy.deepcopy(source.state_dict())
    del saved["state"][0]["step"]
    model, optimizer = trained(chain, inner="adamw", steps=2)
    twin_model, twin = trained(chain, inner="adamw", steps=2)
    state_before = copy.deepcopy(state_by_index(optimizer))
    groups_before = copy.deepcopy(groups_without_params(optimizer))
    with pytest.raises(KeyError, match="step"):
        optimizer.load_state_dict(saved)
    assert_states_equal(state_by_index(optimizer), state_before)
    assert groups_without_params(optimizer) == groups_before
    continue_both(model, optimizer, twin_model, twin, steps=2)


def _set(index, key, value):
    def damage(sd):
        sd["state"][index][key] = value

    return damage


def _drop(index, key):
    def damage(sd):
        del sd["state"][index][key]

    return damage


UNUSABLE_SLOTS = {
    "FriendlySAM-momentum-shape": (
        lambda: [FriendlySAM(0.05)],
        _set(1, "friendly_sam.momentum", torch.zeros(5, dtype=torch.float64)),
        r"^the checkpoint's FriendlySAM slot 'friendly_sam' holds 'momentum' of shape \(5,\) for a parameter of shape \(6,\)$",
    ),
    "LookSAM-g_v-shape": (
        lambda: [LookSAM(0.05, k=3)],
        _set(0, "look_sam.g_v", torch.zeros(5, dtype=torch.float64)),
        r"^the checkpoint's LookSAM slot 'look_sam' holds 'g_v' of shape \(5,\) for a parameter of shape \(6, 4\)$",
    ),
    "LookSAM-step-negative": (
        lambda: [LookSAM(0.05, k=3)],
        _set(0, "look_sam.step", -1),
        r"^the checkpoint's LookSAM slot 'look_sam' holds step=-1, not an integer >= 0$",
    ),
    "LAMP-count-none": (
        lambda: [LAMP(1e-2, rollback_len=3, seed=0)],
        _set(1, "lamp.count", None),
        r"^the checkpoint's LAMP slot 'lamp' holds count=None, not an integer >= 0$",
    ),
    "LAMP-count-negative": (
        lambda: [LAMP(1e-2, rollback_len=3, seed=0)],
        _set(1, "lamp.count", -3),
        r"^the checkpoint's LAMP slot 'lamp' holds count=-3, not an integer >= 0$",
    ),
    "LAMP-count-float": (
        lambda: [LAMP(1e-2, rollback_len=3, seed=0)],
        _set(1, "lamp.count", 2.5),
        r"^the checkpoint's LAMP slot 'lamp' holds count=2.5, not an integer >= 0$",
    ),
    "LAMP-count-missing": (
        lambda: [LAMP(1e-2, rollback_len=3, seed=0)],
        _drop(1, "lamp.count"),
        r"^the checkpoint's LAMP slot 'lamp' holds a parameter's sum without its count$",
    ),
    "LAMP-cycle_step-float": (
        lambda: [LAMP(1e-2, rollback_len=3, seed=0)],
        _set(0, "lamp.cycle_step", 1.5),
        r"^the checkpoint's LAMP slot 'lamp' holds cycle_step=1.5, not an integer in \[0, 3\]$",
    ),
    "LAMP-cycle_step-beyond-the-cycle": (
        lambda: [LAMP(1e-2, rollback_len=3, seed=0)],
        _set(0, "lamp.cycle_step", 4),
        r"^the checkpoint's LAMP slot 'lamp' holds cycle_step=4, not an integer in \[0, 3\]$",
    ),
    "LAMP-sum-and-mean": (
        lambda: [LAMP(1e-2, rollback_len=3, seed=0)],
        _set(1, "lamp.mean", torch.ones(6, dtype=torch.float64)),
        r"^the checkpoint's LAMP slot 'lamp' holds both a sum and a mean for one parameter$",
    ),
    "LAMP-sum-not-a-tensor": (
        lambda: [LAMP(1e-2, rollback_len=3, seed=0)],
        _set(1, "lamp.sum", [0.0] * 6),
        r"^the checkpoint's LAMP slot 'lamp' holds 'sum' = \[0\.0, 0\.0, 0\.0, 0\.0, 0\.0, 0\.0\], not a tensor, for a parameter of shape \(6,\)$",
    ),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE_SLOTS))
def test_an_unusable_slot_is_refused_at_load_naming_it_and_changes_nothing(case):
    """A slot the next step could not use (a tensor of another shape, a counter that is not a
    count) is refused when it is loaded, with nothing changed, not at a later step."""
    chain, damage, message = UNUSABLE_SLOTS[case]
    _, source = trained(chain(), steps=2)
    saved = copy.deepcopy(source.state_dict())
    damage(saved)
    model, optimizer = trained(chain(), steps=2)
    twin_model, twin = trained(chain(), steps=2)
    state_before = copy.deepcopy(state_by_index(optimizer))
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(saved)
    assert_states_equal(state_by_index(optimizer), state_before)
    continue_both(model, optimizer, twin_model, twin, steps=3)


# -- casting ------------------------------------------------------------------------------------------------
def test_load_casts_floating_transform_state_to_the_parameters_dtype():
    chain = lambda: [SAM(0.05), LAMP(1e-2, rollback_len=4, seed=0)]  # noqa: E731
    model64, optimizer64 = trained(chain(), steps=2)
    saved = copy.deepcopy(optimizer64.state_dict())

    model32 = make_model(dtype=torch.float32, seed=5)
    with torch.no_grad():
        for p32, p64 in zip(model32.parameters(), model64.parameters()):
            p32.copy_(p64)
    optimizer32 = build(model32, chain())
    optimizer32.load_state_dict(saved)
    for index, param in enumerate(model32.parameters()):
        entry, saved_entry = optimizer32.state[param], saved["state"][index]
        for key in ("lamp.sum", "momentum_buffer"):
            assert entry[key].dtype == torch.float32 and entry[key].device == param.device, key
            assert torch.equal(entry[key], saved_entry[key].to(torch.float32)), key
        assert type(entry["lamp.count"]) is int and entry["lamp.count"] == saved_entry["lamp.count"]
    first = next(iter(model32.parameters()))
    rng = optimizer32.state[first]["lamp.rng_state"]
    assert rng.dtype == torch.uint8 and torch.equal(rng, saved["state"][0]["lamp.rng_state"])

    closure = make_closure(model32, optimizer32, dtype=torch.float32)
    for _ in range(3):  # crosses the rollback at step 5
        optimizer32.step(closure)
    for param in model32.parameters():
        assert param.dtype == torch.float32 and torch.isfinite(param).all()
        assert optimizer32.state[param]["lamp.sum"].dtype == torch.float32


# -- the same transform twice ------------------------------------------------------------------------------
def test_two_lamps_have_separate_slots_keys_and_checkpointed_state():
    chain = lambda: [LAMP(1e-2, rollback_len=3, seed=0), LAMP(3e-2, rollback_len=5, seed=1)]  # noqa: E731
    model, optimizer = trained(chain(), "sgd", steps=2)
    assert optimizer.slots == ["lamp", "lamp_1"]
    group = optimizer.param_groups[0]
    assert group["lamp.eps"] == 1e-2 and group["lamp_1.eps"] == 3e-2 and "eps" not in group
    first = next(iter(model.parameters()))
    for slot in ("lamp", "lamp_1"):
        for param in model.parameters():
            assert f"{slot}.sum" in optimizer.state[param] and optimizer.state[param][f"{slot}.count"] == 2
        assert optimizer.state[first][f"{slot}.cycle_step"] == 2
    assert not torch.equal(optimizer.state[first]["lamp.rng_state"], optimizer.state[first]["lamp_1.rng_state"])

    saved = optimizer.state_dict()
    assert {"lamp.rng_state", "lamp_1.rng_state", "lamp.sum", "lamp_1.sum"} <= set(saved["state"][0])
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    fresh_model = copy_of_model(model)
    fresh = build(fresh_model, chain(), "sgd")
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert continue_both(model, optimizer, fresh_model, fresh, steps=4)

    # With Adam (its own "eps") the keys stay qualified and Adam's eps is Adam's.
    adam = TransformingOptimizer(make_model().parameters(), torch.optim.Adam, transforms=chain(), lr=1e-3, eps=1e-7)
    assert adam.param_groups[0]["eps"] == 1e-7
    assert adam.param_groups[0]["lamp.eps"] == 1e-2 and adam.param_groups[0]["lamp_1.eps"] == 3e-2


def test_two_normalize_grads_use_their_own_eps_in_order_and_checkpoint_it():
    w0 = torch.tensor([3.0, -4.0], dtype=torch.float64)
    coefficients = torch.tensor([0.6, 0.8], dtype=torch.float64)  # gradient of (c * w).sum()
    eps_a, eps_b = 0.5, 2.0

    def make(eps_first, eps_second):
        param = nn.Parameter(w0.clone())
        optimizer = TransformingOptimizer(
            [param], torch.optim.Adam, transforms=[NormalizeGrad(eps_first), NormalizeGrad(eps_second)], lr=1.0, eps=1e-8
        )
        return param, optimizer

    param, optimizer = make(eps_a, eps_b)
    group = optimizer.param_groups[0]
    assert group["normalize_grad.eps"] == eps_a and group["normalize_grad_1.eps"] == eps_b
    assert group["eps"] == 1e-8  # Adam's

    def closure():
        optimizer.zero_grad()
        loss = (coefficients * param).sum()
        loss.backward()
        return loss

    optimizer.step(closure)  # the arithmetic of the two slots is checked with SGD below
    assert torch.isfinite(param).all() and not torch.equal(param.detach(), w0)

    # The hyperparameters are checkpointed per slot and restored from the checkpoint.
    saved = copy.deepcopy(optimizer.state_dict())
    assert saved["param_groups"][0]["normalize_grad.eps"] == eps_a
    assert saved["param_groups"][0]["normalize_grad_1.eps"] == eps_b
    other_param, other = make(1e-3, 1e-4)
    other.load_state_dict(saved)
    assert other.param_groups[0]["normalize_grad.eps"] == eps_a
    assert other.param_groups[0]["normalize_grad_1.eps"] == eps_b


def test_normalize_grads_eps_really_differ_per_slot():
    """Swapping the two eps values changes the result (each slot reads its own key)."""

    def run(eps_first, eps_second):
        param = nn.Parameter(torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64))
        optimizer = TransformingOptimizer(
            [param], torch.optim.SGD, transforms=[NormalizeGrad(eps_first), NormalizeGrad(eps_second)], lr=1.0
        )

        def closure():
            optimizer.zero_grad()
            loss = (param * torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64)).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return param.detach().clone()

    g = torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64)
    for first, second in [(0.5, 2.0), (2.0, 0.5)]:
        once = g / (torch.linalg.vector_norm(g) + first)
        twice = once / (torch.linalg.vector_norm(once) + second)
        torch.testing.assert_close(run(first, second), w - twice, rtol=1e-14, atol=1e-15)


def test_a_dict_chain_of_two_lamps_checkpoints_both_slots():
    def chain():
        return {"fast": LAMP(1e-2, rollback_len=2, seed=0), "slow": LAMP(0.0, rollback_len=5, seed=1)}

    model, optimizer = trained(chain(), "adamw", steps=3)
    assert optimizer.slots == ["fast", "slow"]
    group = optimizer.param_groups[0]
    assert group["fast.eps"] == 1e-2 and group["slow.eps"] == 0.0 and group["eps"] == 1e-8  # AdamW's
    assert group["transform_chain"] == (
        "fast=LAMP(rollback_len=2, seed=0)",
        "slow=LAMP(rollback_len=5, seed=1)",
    )
    first = next(iter(model.parameters()))
    assert optimizer.state[first]["fast.cycle_step"] == 0  # rolled back after rollback_len + 1 = 3 steps
    assert optimizer.state[first]["slow.cycle_step"] == 3
    for param in model.parameters():
        assert optimizer.state[param]["fast.count"] == 0 and optimizer.state[param]["slow.count"] == 3

    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer))
    fresh_model = copy_of_model(model)
    fresh = build(fresh_model, chain(), "adamw")
    set_optimizer_state_dict(fresh_model, fresh, optim_state_dict=saved)
    assert continue_both(model, optimizer, fresh_model, fresh, steps=4)

    # A dict chain with other slot names is another chain.
    renamed = build(make_model(), {"a": LAMP(1e-2, rollback_len=2, seed=0), "b": LAMP(0.0, rollback_len=5, seed=1)}, "adamw")
    with pytest.raises(ValueError, match="fast=LAMP"):
        renamed.load_state_dict(copy.deepcopy(optimizer.state_dict()))


# -- SAM around Adadelta (whose own key is "rho") -------------------------------------------------------------
def test_sam_around_adadelta_uses_the_qualified_key():
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.Adadelta, transforms=[SAM(0.05)], lr=1.0, rho=0.8)
    group = optimizer.param_groups[0]
    assert group["rho"] == 0.8 and group["sam.rho"] == 0.05

    saved = copy.deepcopy(optimizer.state_dict())
    assert saved["param_groups"][0]["rho"] == 0.8 and saved["param_groups"][0]["sam.rho"] == 0.05


@pytest.mark.parametrize("adadelta_rho", [None, 0.5])
def test_sam_rho_zero_group_override_equals_plain_adadelta(adadelta_rho):
    plain_model, model, perturbed_model = make_model(), make_model(), make_model()
    extra = {} if adadelta_rho is None else {"rho": adadelta_rho}
    plain = torch.optim.Adadelta(plain_model.parameters(), lr=1.0, **extra)
    optimizer = TransformingOptimizer(
        [{"params": model.parameters(), "sam.rho": 0.0, **extra}], torch.optim.Adadelta, transforms=[SAM(0.05)], lr=1.0
    )
    perturbed = TransformingOptimizer(
        [{"params": perturbed_model.parameters(), **extra}], torch.optim.Adadelta, transforms=[SAM(0.05)], lr=1.0
    )
    assert optimizer.param_groups[0]["sam.rho"] == 0.0
    assert optimizer.param_groups[0]["rho"] == plain.param_groups[0]["rho"]
    closures = [make_closure(m, o) for m, o in ((plain_model, plain), (model, optimizer), (perturbed_model, perturbed))]
    for _ in range(3):
        for (m, o), closure in zip(((plain_model, plain), (model, optimizer), (perturbed_model, perturbed)), closures):
            o.step(closure)
        assert_weights_equal(plain_model, model)
    for plain_param, param in zip(plain_model.parameters(), model.parameters()):
        for key in ("square_avg", "acc_delta"):
            assert torch.equal(plain.state[plain_param][key], optimizer.state[param][key])
    # Sanity: the default radius does perturb (so it was the override that switched SAM off).
    assert any(not torch.equal(a, b) for a, b in zip(plain_model.parameters(), perturbed_model.parameters()))


def test_a_checkpoint_from_before_a_transform_gained_a_key_loads_with_its_default():
    model = nn.Linear(3, 2)
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[NormalizeGrad(1e-8)])
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:  # as written before NormalizeGrad had p and param_ndim
        del group["p"], group["param_ndim"]
    fresh = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[NormalizeGrad(1e-8)])
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["p"] == 2.0 and fresh.param_groups[0]["param_ndim"] is None


# -- edits under the qualified key; groups added to the inner optimizer directly ----------------------------
def test_an_edit_under_the_qualified_key_replaces_the_stored_short_key():
    """``group["sam.rho"] = 0.0`` switches SAM off although the group stores ``"rho"``."""
    plain_model, model = make_model(), make_model()
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.1)
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, transforms=[SAM(0.05)], lr=0.1)
    group = optimizer.param_groups[0]
    assert "rho" in group and "sam.rho" not in group
    group["sam.rho"] = 0.0
    for opt, m in ((plain, plain_model), (optimizer, model)):
        opt.step(make_closure(m, opt))
    assert_weights_equal(plain_model, model)
    assert group["rho"] == 0.0 and "sam.rho" not in group

    group["sam.rho"] = -1.0  # an invalid edit is refused and leaves the group as it was
    before = dict(group)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: rho must be a finite number >= 0, got -1\.0"):
        optimizer.step(make_closure(model, optimizer))
    assert group == before
    assert_weights_equal(plain_model, model)


def test_a_checkpoint_taken_before_a_directly_added_group_steps_loads_into_the_same_setup():
    """A group added through ``optimizer.inner.add_param_group`` gets the chain when it is saved."""

    def setup():
        model = make_model()
        first, second = list(model.children())[0], list(model.children())[-1]
        optimizer = TransformingOptimizer(first.parameters(), torch.optim.SGD, transforms=[LAMP(1e-2, rollback_len=2, seed=0)], lr=0.1)
        optimizer.inner.add_param_group({"params": list(second.parameters())})
        return model, optimizer

    model, optimizer = setup()
    saved = copy.deepcopy(optimizer.state_dict())
    assert [group["transform_chain"] for group in saved["param_groups"]] == [optimizer.chain.spec()] * 2
    fresh_model, fresh = setup()
    fresh.load_state_dict(saved)
    assert continue_both(model, optimizer, fresh_model, fresh, steps=3)

    later = copy.deepcopy(optimizer.state_dict())  # with LAMP's state in both groups
    _, again = setup()
    again.load_state_dict(later)


@pytest.mark.parametrize("copied", ["original", "deepcopy", "pickle"])
def test_a_state_loaded_into_the_inner_optimizer_directly_is_the_wrappers_at_once(copied):
    """``optimizer.base_optimizer.load_state_dict(...)``: ``optimizer.state`` shows the loaded
    state before any step (it showed the old one, and an edit of it was lost at the next step),
    the transforms' slots stay as they were, and the run continues as one loaded through the
    wrapper -- also for a copy of the wrapper (its inner optimizer is a new object)."""
    _, source = trained("lamp", steps=3)  # another run: other momentum buffers
    inner_checkpoint = copy.deepcopy(source.base_optimizer.state_dict())
    model, optimizer = trained("lamp", steps=2)
    if copied == "deepcopy":
        model, optimizer = copy.deepcopy((model, optimizer))
    elif copied == "pickle":
        model, optimizer = pickle.loads(pickle.dumps((model, optimizer)))
    params = list(model.parameters())
    slots_before = [{key: copy.deepcopy(value) for key, value in optimizer.state[p].items() if key.startswith("lamp.")} for p in params]
    optimizer.base_optimizer.load_state_dict(copy.deepcopy(inner_checkpoint))
    for index, param in enumerate(params):
        entry = optimizer.state[param]
        assert torch.equal(entry["momentum_buffer"], inner_checkpoint["state"][index]["momentum_buffer"])
        slots = {key: value for key, value in entry.items() if key.startswith("lamp.")}
        assert sorted(slots) == sorted(slots_before[index])
        for key in slots:
            assert_same_value(slots[key], slots_before[index][key], key)
    optimizer.state[params[0]]["momentum_buffer"].zero_()  # edits before the next step are kept
    optimizer.state[params[0]]["note"] = 7
    saved = copy.deepcopy(optimizer.state_dict())
    assert saved["state"][0]["note"] == 7
    assert torch.count_nonzero(saved["state"][0]["momentum_buffer"]) == 0

    twin_model, twin = trained("lamp", steps=2)  # the same weights; the state loaded through the wrapper
    twin.load_state_dict(saved)
    continue_both(model, optimizer, twin_model, twin, steps=3)
    assert optimizer.state[params[0]]["note"] == 7


def test_a_wrapper_checkpoint_given_to_the_inner_optimizer_leaves_the_transforms_slots_as_they_were():
    """A wrapper's checkpoint loaded through ``base_optimizer.load_state_dict`` replaced the
    transforms' slots unchecked (another chain's -- LAMP with rollback_len 3 into one with 1 --
    and the optimizer then saved a checkpoint that it refused itself: cycle_step=2 with
    rollback_len=1). Another chain's is refused as through the wrapper's load, nothing changed;
    of the same chain, the inner optimizer's keys are taken and the slots stay as they were."""
    def build(rollback_len):
        model = make_model()
        optimizer = TransformingOptimizer(
            model.parameters(), torch.optim.AdamW, lr=1e-2, transforms=[SAM(0.05), LAMP(1e-3, rollback_len=rollback_len, seed=0)]
        )
        return model, optimizer

    model, source = build(3)
    for _ in range(2):
        source.step(make_closure(model, source))
    checkpoint = copy.deepcopy(source.state_dict())
    model, other = build(1)
    other.step(make_closure(model, other))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"transform 1 is lamp=LAMP\(rollback_len=3, seed=0\) in the checkpoint and lamp=LAMP\(rollback_len=1, seed=0\) here$"):
        other.base_optimizer.load_state_dict(copy.deepcopy(checkpoint))
    assert_state_dicts_equal(other.state_dict(), before)
    model, target = build(3)
    target.step(make_closure(model, target))
    slots_before = {key: copy.deepcopy(value) for key, value in target.state[next(model.parameters())].items() if key.startswith("lamp.")}
    target.base_optimizer.load_state_dict(copy.deepcopy(checkpoint))
    entry = target.state[next(model.parameters())]
    assert int(entry["step"]) == int(checkpoint["state"][0]["step"])  # the inner optimizer's state
    assert {key: value for key, value in entry.items() if key.startswith("lamp.")}.keys() == slots_before.keys()
    for key, value in slots_before.items():
        assert_same_value(entry[key], value, key)
    _, again = build(3)
    again.load_state_dict(copy.deepcopy(target.state_dict()))  # its own checkpoint loads
    target.step(make_closure(model, target))


def test_a_plain_checkpoint_given_to_the_inner_optimizer_keeps_each_group_s_transform_settings():
    """A plain optimizer's checkpoint loaded through ``base_optimizer.load_state_dict`` replaced
    the groups with its own, which lack the transforms' keys: ``group["rho"]`` raised KeyError
    until the next step, which then filled the constructor's values (a ``rho=0`` group of biases
    was perturbed). Each group keeps its settings, as through the wrapper's own load."""
    from samgria import EMA

    model = make_model()
    plain = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=1e-2)
    checkpoint = plain.state_dict()
    results = []
    for route in ("wrapper", "inner"):
        model = make_model()
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "rho": 0.0, "decay": 0.5}]
        optimizer = TransformingOptimizer(groups, torch.optim.AdamW, lr=1e-2, transforms=[SAM(0.05), EMA(0.9)])
        loader = optimizer if route == "wrapper" else optimizer.base_optimizer
        loader.load_state_dict(copy.deepcopy(checkpoint))
        assert [(group["rho"], group["decay"]) for group in optimizer.param_groups] == [(0.05, 0.9), (0.0, 0.5)]
        for _ in range(2):
            optimizer.step(make_closure(model, optimizer))
        assert [(group["rho"], group["decay"]) for group in optimizer.param_groups] == [(0.05, 0.9), (0.0, 0.5)]
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_first_step_at_lr_zero_with_zero_gradients_is_a_real_step_outside_checkpoint_loading():
    """Only torch.distributed.checkpoint's state initialisation is treated as one; a user's warm-up
    step from lr 0 with zero gradients runs every transform (LAMP's noise moves the weights)."""
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, transforms=[LAMP(1e-2, rollback_len=2, seed=0)], lr=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    twin_model = make_model()
    twin = TransformingOptimizer(twin_model.parameters(), torch.optim.SGD, transforms=[LAMP(1e-2, rollback_len=2, seed=0)], lr=0.0)
    for param in twin_model.parameters():
        param.grad = torch.zeros_like(param)
    twin.step(lambda: None)  # the same step through a closure: no doubt it is a real step
    assert_weights_equal(model, twin_model)
    assert_states_equal(state_by_index(optimizer), state_by_index(twin))


class _SeededNoise(Transform):
    """A post-step transform with object-level state of other dtypes than the parameters': a
    generator state (uint8), a draw counter (int64) and a nested record holding a bool mask."""

    slot_name = "seeded_noise"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def settings(self):
        return {"seed": self.seed}

    @torch.no_grad()
    def post_update(self, ctx):
        slot = ctx.slot_state(keys=("rng", "draws", "record"))
        generator = torch.Generator()
        if "rng" in slot:
            generator.set_state(slot["rng"].cpu())
        else:
            generator.manual_seed(self.seed)
        for group in ctx.param_groups:
            for param in group["params"]:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype), alpha=1e-3)
        slot["rng"] = generator.get_state()
        slot["draws"] = slot.get("draws", torch.tensor(0)) + 1
        slot["record"] = {"mask": torch.tensor([True, False]), "history": [slot["draws"].clone()], "spectrum": torch.tensor([1 + 2j])}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_floating_tensors_of_a_slot_load_with_their_dtype(dtype):
    """torch's load casts every tensor of a parameter's state but "step" to a floating parameter's
    dtype: a transform's generator state came back as floats (the next step failed) and a counter
    of 2049 came back as 2048 in float16. Slots keep their non-floating tensors' dtypes now, and the
    resumed run continues bit for bit."""
    torch.manual_seed(0)
    model = nn.Linear(2, 2).to(dtype)
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[_SeededNoise(1)])
    x = torch.randn(4, 2).to(dtype)

    def step(model, optimizer):
        optimizer.zero_grad()
        model(x).float().pow(2).sum().backward()
        optimizer.step()

    for _ in range(3):
        step(model, optimizer)
    def slot_of(optimizer):
        return next(entry for entry in optimizer.state.values() if "seeded_noise.rng" in entry)

    slot_of(optimizer)["seeded_noise.draws"] = torch.tensor(2049)  # a long run
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = nn.Linear(2, 2).to(dtype)
    resumed_model.load_state_dict(model.state_dict())
    resumed = TransformingOptimizer(resumed_model.parameters(), torch.optim.SGD, lr=0.1, transforms=[_SeededNoise(1)])
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    slot, loaded = slot_of(optimizer), slot_of(resumed)
    for key in ("seeded_noise.rng", "seeded_noise.draws"):
        assert loaded[key].dtype == slot[key].dtype and torch.equal(loaded[key], slot[key])
    assert loaded["seeded_noise.draws"].item() == 2049
    record = loaded["seeded_noise.record"]
    assert record["mask"].dtype == torch.bool and record["history"][0].dtype == torch.int64
    assert record["spectrum"].dtype == torch.complex64 and torch.equal(record["spectrum"], torch.tensor([1 + 2j]))
    for _ in range(2):
        step(model, optimizer)
        step(resumed_model, resumed)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert slot_of(resumed)["seeded_noise.draws"].item() == 2051


def test_another_chain_s_checkpoint_given_to_the_inner_optimizer_is_refused_before_anything_changes():
    """A wrapper checkpoint of another chain loaded through ``base_optimizer.load_state_dict``
    installed that chain's groups: ``rho`` vanished (KeyError) and the next step perturbed a
    ``rho=0`` group with the constructor's value. Refused as through the wrapper's own load,
    naming the difference, with the optimizer as it was."""
    model = make_model()
    source = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[LAMP(1e-2, rollback_len=3)])
    source.step(make_closure(model, source))
    checkpoint = copy.deepcopy(source.state_dict())
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "rho": 0.0}]
    target = TransformingOptimizer(groups, torch.optim.SGD, lr=0.1, transforms=[SAM(0.5)])
    target.step(make_closure(model, target))
    before = copy.deepcopy(target.state_dict())
    wrong = copy.deepcopy(checkpoint)
    wrong["param_groups"] = [dict(wrong["param_groups"][0], params=[0, 1]), dict(wrong["param_groups"][0], params=[2, 3])]
    message = r"^the checkpoint was made with the transform chain \['lamp=LAMP\(rollback_len=3, seed=None\)'\], but this optimizer has \['sam=SAM\(\)'\]"
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(copy.deepcopy(wrong))
    with pytest.raises(ValueError, match=message):
        target.base_optimizer.load_state_dict(copy.deepcopy(wrong))
    assert_state_dicts_equal(target.state_dict(), before)
    assert [group["rho"] for group in target.param_groups] == [0.5, 0.0]


@pytest.mark.parametrize("algorithm", ["MAML", "Reptile"])
def test_a_plain_checkpoint_given_to_a_meta_optimizer_s_outer_optimizer_keeps_inner_lr_and_adapt(algorithm):
    """``meta.outer.load_state_dict(plain_checkpoint)`` left groups without ``inner_lr`` and
    ``adapt``: the inner loop fell back to the constructor's rate and adapted a body group set to
    ``adapt=False``. Each group keeps its settings, as through ``meta.load_state_dict``."""
    import samgria

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    plain = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=1e-2)
    checkpoint = plain.state_dict()
    routes = []
    for route in ("meta", "outer"):
        groups = [{"params": model[0].parameters(), "adapt": False}, {"params": model[2].parameters(), "inner_lr": 0.2}]
        outer = torch.optim.Adam(groups, lr=1e-3)
        meta = getattr(samgria, algorithm)(model, outer, inner_lr=0.05)
        (meta if route == "meta" else meta.outer).load_state_dict(copy.deepcopy(checkpoint))
        routes.append([(group["adapt"], group["inner_lr"], group["lr"]) for group in meta.param_groups])
        assert meta.inner_loop().adapt_names == ("2.weight", "2.bias")
    assert routes[0] == routes[1] == [(False, 0.05, 1e-2), (True, 0.2, 1e-2)]


def test_a_direct_load_is_checked_after_the_inner_optimizer_s_own_pre_hooks_and_undone_when_refused():
    """The check of a checkpoint loaded into the inner optimizer directly ran in a pre-hook
    registered before the user's: a pre-hook that strips another chain's keys was refused, and a
    value a later pre-hook made invalid was refused after torch had installed it (every later
    step raised). The groups torch installs are checked, and a refusal puts back what it replaced."""
    model = make_model()
    source = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.7, transforms=[LAMP(1e-2, rollback_len=3)])
    source.step(make_closure(model, source))
    lamp_checkpoint = copy.deepcopy(source.state_dict())
    plain = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.7).state_dict()

    def build():
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "rho": 0.0}]
        optimizer = TransformingOptimizer(groups, torch.optim.SGD, lr=0.1, transforms=[SAM(0.5)])
        optimizer.step(make_closure(model, optimizer))
        return optimizer

    def strip(optimizer, state_dict):  # load only the SGD part of another chain's checkpoint
        groups = [{key: value for key, value in group.items() if key not in ("transform_chain", "eps")} for group in state_dict["param_groups"]]
        groups = [dict(groups[0], params=[0, 1]), dict(groups[0], params=[2, 3])]
        return {"state": {}, "param_groups": groups}

    optimizer = build()
    optimizer.base_optimizer.register_load_state_dict_pre_hook(strip)
    optimizer.base_optimizer.load_state_dict(copy.deepcopy(lamp_checkpoint))
    assert [(group["lr"], group["rho"]) for group in optimizer.param_groups] == [(0.7, 0.5), (0.7, 0.0)]

    def spoil(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][1]["rho"] = -5.0
        return state_dict

    optimizer = build()
    before = copy.deepcopy(optimizer.state_dict())
    optimizer.base_optimizer.register_load_state_dict_pre_hook(spoil)
    with pytest.raises(ValueError, match=r"rho must be a finite number >= 0, got -5\.0"):
        optimizer.base_optimizer.load_state_dict(copy.deepcopy(plain))
    assert_state_dicts_equal(optimizer.state_dict(), before)
    optimizer.step(make_closure(model, optimizer))


def test_a_direct_load_two_wrappers_down_keeps_the_meta_optimizer_s_settings():
    """``meta.outer.base_optimizer.load_state_dict(...)`` (a meta-optimizer around a
    TransformingOptimizer) completed only the transforms' keys: the groups lost ``adapt`` and
    ``inner_lr`` (an adapt=False body was adapted) and an invalid inner_lr got in. Both wrappers
    check and complete the groups they share."""
    import samgria

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    def build():
        groups = [{"params": model[0].parameters(), "adapt": False}, {"params": model[2].parameters(), "inner_lr": 0.2}]
        outer = TransformingOptimizer(groups, torch.optim.SGD, lr=0.1, transforms=[SAM(0.5)])
        return samgria.FOMAML(model, outer, inner_lr=0.05)

    plain = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.3).state_dict()
    meta = build()
    meta.outer.base_optimizer.load_state_dict(copy.deepcopy(plain))
    assert [(g["adapt"], g["inner_lr"], g["rho"], g["lr"]) for g in meta.param_groups] == [(False, 0.05, 0.5, 0.3), (True, 0.2, 0.5, 0.3)]
    assert meta.inner_loop().adapt_names == ("2.weight", "2.bias")
    meta = build()
    checkpoint = copy.deepcopy(meta.state_dict())
    checkpoint["param_groups"][1]["inner_lr"] = -1.0
    before = copy.deepcopy(meta.state_dict())
    with pytest.raises(ValueError, match=r"^the checkpoint's param_groups\[1\]: inner_lr must be a finite number >= 0, got -1\.0$"):
        meta.outer.base_optimizer.load_state_dict(checkpoint)
    assert_state_dicts_equal(meta.state_dict(), before)


def test_a_plain_checkpoint_keeps_metasgd_s_rates_group():
    """A plain outer optimizer's checkpoint (through ``meta.load_state_dict`` or
    ``meta.outer.load_state_dict``) dropped the ``inner_lrs=True`` mark of MetaSGD's rates group:
    a group added later got no rates and the inner loop blamed the user's group."""
    import samgria

    for route in ("meta", "outer"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        meta = samgria.MetaSGD(model, torch.optim.Adam, inner_lr=0.05, lr=1e-3, params=list(model[0].parameters()))
        plain = torch.optim.Adam([{"params": list(g["params"])} for g in meta.param_groups], lr=1e-2).state_dict()
        if route == "meta":
            plain["inner_lrs"] = {name: rate.detach().clone() for name, rate in meta.inner_lrs.items()}
            meta.load_state_dict(plain)
        else:
            meta.outer.load_state_dict(plain)
        assert [group.get("inner_lrs") for group in meta.param_groups] == [None, True]
        meta.add_param_group({"params": list(model[2].parameters())})
        assert set(meta.inner_loop().adapt_names) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_a_direct_load_refused_for_a_setting_that_depends_on_the_parameters_is_put_back():
    """A group setting checked against its parameters (ProjectParams' param_ndim) was checked
    without them before the take-over and refused only after it: the refused checkpoint's state
    stayed installed and every later step raised. Checked with the parameters, put back whole."""
    from samgria import ProjectParams

    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[ProjectParams(radius=10.0)])
    optimizer.step(make_closure(model, optimizer))
    bad = copy.deepcopy(optimizer.state_dict())
    bad["param_groups"][0]["param_ndim"] = 5
    for entry in bad["state"].values():
        entry["momentum_buffer"] = torch.full_like(entry["momentum_buffer"], 3.0)
    before = copy.deepcopy(optimizer.state_dict())
    for load in (optimizer.load_state_dict, optimizer.base_optimizer.load_state_dict):
        with pytest.raises(ValueError, match=r"param_ndim must be None or an integer in \[-2, 2\]"):
            load(copy.deepcopy(bad))
        assert_state_dicts_equal(optimizer.state_dict(), before)
    optimizer.step(make_closure(model, optimizer))


def test_a_state_dict_post_hook_returning_a_new_dict_and_a_load_pre_hook_returning_one_are_used_as_torchs():
    """A ``state_dict`` post-hook's return value replaces the checkpoint, and a load pre-hook's
    replaces the dict being loaded, for the wrapper as for a torch optimizer."""
    results = []
    for wrapped in (False, True):
        model = make_model()
        if wrapped:
            optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, transforms=[SAM(0.05)])
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        optimizer.step(make_closure(model, optimizer))
        optimizer.register_state_dict_post_hook(lambda opt, sd: {**sd, "note": "replaced"})
        checkpoint = optimizer.state_dict()

        def halve_lr(opt, sd):
            sd = copy.deepcopy(sd)
            sd.pop("note")
            for group in sd["param_groups"]:
                group["lr"] = group["lr"] / 2
            return sd

        optimizer.register_load_state_dict_pre_hook(halve_lr)
        optimizer.load_state_dict(checkpoint)
        results.append((checkpoint["note"], optimizer.param_groups[0]["lr"], "note" in checkpoint))
    assert results[1] == results[0] == ("replaced", 0.025, True)


def test_a_checkpoint_of_another_chain_is_refused_naming_the_first_transform_that_differs():
    """Chains that differ at the first transform and agree after it: the message names
    transform 0, not the last one compared."""
    model = make_model()
    saved = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), EMA(0.9)])
    saved.step(make_closure(model, saved))
    other = TransformingOptimizer(make_model().parameters(), torch.optim.SGD, lr=0.1, transforms=[ASAM(0.5), EMA(0.9)])
    with pytest.raises(ValueError, match=r": transform 0 is sam=SAM\(\) in the checkpoint and asam=ASAM\(.*\) here$"):
        other.load_state_dict(saved.state_dict())
