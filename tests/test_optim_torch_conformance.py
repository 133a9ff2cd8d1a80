"""torch.optim's generic contracts, checked on ``TransformingOptimizer`` with torch's own harness.

The optimizer configurations come from torch's shipped test harness
(``torch.testing._internal.common_optimizers.optim_db``): every ``OptimizerInfo``'s
``optim_inputs_func(device="cpu")`` for SGD, Adam, AdamW, RMSprop, Adadelta and Adagrad, minus
the configurations that do not apply on a CPU (capturable; fused where the info has no CPU
kernel), sampled deterministically (every second one: 3 to 5 per optimizer). The infos also
decide what is skipped (``supports_complex``, ``supported_impls``, ``supports_fused_on``, the
``skips`` of the torch test each contract corresponds to) and the tolerances
(``toleranceOverride``). Each configuration runs in four wrappers:

* ``plain``: ``transforms=()``;
* ``sam0``: ``[SAM(rho=0.0)]``;
* ``sam``: ``[SAM(rho=0.05)]``;
* ``lamp``: ``[LAMP(eps=1e-3, rollback_len=2, seed=0)]``.

References are independent of the wrapper where one exists: ``plain`` and ``sam0`` must equal
the bare torch optimizer bit for bit; ``sam`` is also checked against a hand-written SAM step
around the bare optimizer; otherwise a second wrapper reached another way (from a checkpoint,
with the hyperparameter given at construction, with lr set by hand) is the reference. Every
step is ``optimizer.step(closure)``.

Importing torch's harness needs the ``expecttest`` package (a test dependency).
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
import unittest
import warnings

import pytest
import torch

pytest.importorskip(
    "expecttest",
    reason="torch.testing._internal (torch's optimizer test harness) imports the expecttest package",
)

from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau, StepLR  # noqa: E402
from torch.optim.optimizer import (  # noqa: E402
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from state_helpers import assert_same  # noqa: E402

_FLAGS_FROZEN = torch.backends.flags_frozen()
from torch.testing._internal.common_optimizers import OptimizerInput, optim_db  # noqa: E402

# Importing torch's harness calls torch.backends.disable_global_flags() (torch's own test suites
# want that); this module only reads the harness, so the rest of the session keeps its flags.
if not _FLAGS_FROZEN:
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
assert torch.backends.flags_frozen() == _FLAGS_FROZEN

from samgria import LAMP, SAM, TransformingOptimizer  # noqa: E402

# -- the harness's inputs ---------------------------------------------------------------------------

OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adadelta", "Adagrad")
INFOS = {info.name: info for info in optim_db if info.name in OPTIMIZERS}
assert set(INFOS) == set(OPTIMIZERS), f"optim_db lacks {set(OPTIMIZERS) - set(INFOS)}"

#: Every SAMPLE_STRIDE-th applicable input of each optimizer (3 to 5 configurations each).
SAMPLE_STRIDE = 2


def _applicable_on_cpu(info, optim_input: OptimizerInput) -> bool:
    kwargs = optim_input.kwargs
    if optim_input.params is not None:  # the tests build the parameters
        return False
    if kwargs.get("capturable", False):  # capturable needs a CUDA-graph capable device
        return False
    if kwargs.get("fused", False) and "cpu" not in info.supports_fused_on:
        return False
    if kwargs.get("differentiable", False):  # autograd through the step: not a contract here
        return False
    return True


def harness(name: str, *torch_tests: str, dtype: torch.dtype = torch.float64) -> dict:
    """Apply what torch's OptimizerInfo decorates its own tests of these names with, on the CPU.

    A skip there (``unittest.skip``, ``skipIfTorchDynamo`` under dynamo, ...) skips here with
    torch's reason; a ``toleranceOverride`` for ``dtype`` is returned as ``assert_close`` keyword
    arguments (empty: torch's default tolerance).
    """
    tolerance: dict = {}
    for torch_test in torch_tests:
        param_kwargs = {"device": "cpu", "dtype": dtype}
        for decorator in INFOS[name].get_decorators("TestOptimRenewed", torch_test, "cpu", dtype, param_kwargs):
            probe = decorator(lambda *args, **kwargs: None)
            try:
                (probe or (lambda: None))()
            except unittest.SkipTest as skip:
                pytest.skip(f"torch's OptimizerInfo skips {torch_test} for {name} on the CPU: {skip}")
            except Exception:  # a decorator that needs torch's test class: not a skip
                pass
            overrides = getattr(probe, "tolerance_overrides", {})
            if dtype in overrides:
                tolerance = {"atol": overrides[dtype].atol, "rtol": overrides[dtype].rtol}
    return tolerance


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_") or "default"


def _sampled_inputs() -> list[tuple[str, OptimizerInput]]:
    cases = []
    for name in OPTIMIZERS:
        info = INFOS[name]
        inputs = [oi for oi in info.optim_inputs_func(device="cpu") if _applicable_on_cpu(info, oi)]
        assert inputs, f"no CPU inputs for {name}"
        for optim_input in inputs[::SAMPLE_STRIDE]:
            cases.append((name, optim_input))
    return cases


SAMPLED = _sampled_inputs()
INPUT_PARAMS = [pytest.param(name, oi, id=f"{name}-{_slug(oi.desc)}") for name, oi in SAMPLED]
optim_inputs = pytest.mark.parametrize("name,optim_input", INPUT_PARAMS)

VARIANTS = {
    "plain": lambda: (),
    "sam0": lambda: [SAM(rho=0.0)],
    "sam": lambda: [SAM(rho=0.05)],
    "lamp": lambda: [LAMP(eps=1e-3, rollback_len=2, seed=0)],
}
#: Variants that must equal the bare torch optimizer bit for bit.
EXACT_VARIANTS = ("plain", "sam0")
variants = pytest.mark.parametrize("variant", list(VARIANTS))
exact_variants = pytest.mark.parametrize("variant", list(EXACT_VARIANTS))

STEPS = 3  # with rollback_len=2, LAMP rolls back at step 3: runs that checkpoint at step 2 cross it


# -- the problem: a tiny two-tensor regression ---------------------------------------------------

_GEN = torch.Generator().manual_seed(1234)
X = torch.randn(8, 4, generator=_GEN, dtype=torch.float64)
Y = torch.randn(8, 3, generator=_GEN, dtype=torch.float64)
Y_PAIRS = torch.randn(8, 3, 2, generator=_GEN, dtype=torch.float64)


def make_params(dtypes=(torch.float64, torch.float64), seed: int = 0) -> list[torch.Tensor]:
    """``[weight (3, 4), bias (3,)]``, leaf tensors requiring grad, the same values for one seed."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    bias = torch.randn(3, generator=generator, dtype=torch.float64)
    return [weight.to(dtypes[0]).requires_grad_(), bias.to(dtypes[1]).requires_grad_()]


def clone_params(params) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def loss_fn(params) -> torch.Tensor:
    weight, bias = params
    out = torch.tanh(X @ weight.double().T + bias.double())
    return ((out - Y) ** 2).mean() + 0.01 * (weight.double() ** 2).sum()


def make_closure(optimizer, params, fn=loss_fn):
    def closure():
        optimizer.zero_grad()
        loss = fn(params)
        loss.backward()
        return loss

    return closure


def params_of(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def run(optimizer, steps: int = STEPS, params=None, fn=loss_fn) -> list[torch.Tensor]:
    params = params_of(optimizer) if params is None else params
    closure = make_closure(optimizer, params, fn)
    return [optimizer.step(closure) for _ in range(steps)]


def _kwargs(optim_input: OptimizerInput, overrides) -> dict:
    kwargs = copy.deepcopy(optim_input.kwargs)  # tensor lrs must not be shared between optimizers
    kwargs.update(overrides)
    return kwargs


def build(name, optim_input, variant, params, *, transform_foreach=None, **overrides):
    return TransformingOptimizer(
        params,
        INFOS[name].optim_cls,
        transforms=VARIANTS[variant](),
        transform_foreach=transform_foreach,
        **_kwargs(optim_input, overrides),
    )


def build_bare(name, optim_input, params, **overrides) -> torch.optim.Optimizer:
    return INFOS[name].optim_cls(params, **_kwargs(optim_input, overrides))


def build_reference(name, optim_input, variant, params, **overrides):
    """The bare torch optimizer for the exact variants, else a second wrapper of the same kind."""
    if variant in EXACT_VARIANTS:
        return build_bare(name, optim_input, params, **overrides)
    return build(name, optim_input, variant, params, **overrides)


# -- comparisons ---------------------------------------------------------------------------------


def assert_params_same(actual, expected) -> None:
    assert len(actual) == len(expected)
    for index, (a, b) in enumerate(zip(actual, expected)):
        assert_same(a.detach(), b.detach(), f"param {index}")


def assert_inner_state_same(wrapper, wrapper_params, bare, bare_params) -> None:
    """The inner optimizer's state (slot keys hidden) equals a bare optimizer's, bit for bit."""
    for index, (p, q) in enumerate(zip(wrapper_params, bare_params)):
        ours = dict(wrapper.inner.state[p]) if p in wrapper.inner.state else {}
        assert_same(ours, dict(bare.state[q]) if q in bare.state else {}, f"state[{index}]")


def assert_optimizers_same(a, a_params, b, b_params) -> None:
    """Same weights and same full state (inner and transform slots), bit for bit."""
    assert_params_same(a_params, b_params)
    for index, (p, q) in enumerate(zip(a_params, b_params)):
        assert_same(dict(a.state.get(p, {})), dict(b.state.get(q, {})), f"state[{index}]")


def without_params(group) -> dict:
    return {key: value for key, value in group.items() if key != "params"}


def lr_value(group) -> float:
    lr = group["lr"]
    return float(lr) if isinstance(lr, torch.Tensor) else lr


def set_lr(group, value) -> None:
    """Set a group's lr in the group's own representation (a tensor lr stays a tensor)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"] = torch.as_tensor(value, dtype=group["lr"].dtype).clone()
    else:
        group["lr"] = float(value)


def scaled_lr(optim_input: OptimizerInput, name: str, factor: float):
    """The input's lr (or the optimizer's default) times ``factor``, in the input's representation."""
    lr = optim_input.kwargs.get("lr")
    if lr is None:
        lr = INFOS[name].optim_cls([torch.zeros(1, requires_grad=True)]).defaults["lr"]
    return lr.clone() * factor if isinstance(lr, torch.Tensor) else lr * factor


def slot_keys(variant: str) -> set[str]:
    return {"lamp.sum", "lamp.count"} if variant == "lamp" else set()


def _roundtrip(state_dict, via: str):
    if via == "deepcopy":
        return copy.deepcopy(state_dict)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- equal to the bare torch optimizer -----------------------------------------------------------


@optim_inputs
@exact_variants
def test_matches_bare_torch_optimizer_bitwise(name, optim_input, variant):
    params, bare_params = make_params(), make_params()
    optimizer = build(name, optim_input, variant, params)
    bare = build_bare(name, optim_input, bare_params)
    losses = run(optimizer)
    bare_losses = run(bare)
    assert_same(losses, bare_losses, "losses")
    assert_params_same(params, bare_params)
    assert_inner_state_same(optimizer, params, bare, bare_params)
    # What the wrapper's state_dict packs for the inner optimizer is what torch packs.
    ours, theirs = optimizer.state_dict(), bare.state_dict()
    assert_same(ours["state"], theirs["state"], "state_dict()['state']")
    for group, bare_group in zip(ours["param_groups"], theirs["param_groups"]):
        assert_same({key: group[key] for key in bare_group}, bare_group, "param_groups")


@optim_inputs
@variants
def test_loads_a_bare_torch_checkpoint(name, optim_input, variant):
    bare_params = make_params()
    bare = build_bare(name, optim_input, bare_params)
    run(bare, 2)
    checkpoint = copy.deepcopy(bare.state_dict())
    params = clone_params(bare_params)
    optimizer = build(name, optim_input, variant, params)
    optimizer.load_state_dict(copy.deepcopy(checkpoint))  # load keeps the tensors it is given
    assert_inner_state_same(optimizer, params, bare, bare_params)
    for group in optimizer.param_groups:
        assert group["transform_chain"] == optimizer.chain.spec()
    run(optimizer, 2)
    if variant in EXACT_VARIANTS:
        run(bare, 2)
        assert_params_same(params, bare_params)
        assert_inner_state_same(optimizer, params, bare, bare_params)
    else:  # a second wrapper loading the same checkpoint continues identically
        other_params = clone_params(bare_params)  # the bare run has not moved since the checkpoint
        other = build(name, optim_input, variant, other_params)
        other.load_state_dict(copy.deepcopy(checkpoint))
        run(other, 2)
        assert_optimizers_same(optimizer, params, other, other_params)


@optim_inputs
def test_sam_matches_hand_written_sam_around_bare_optimizer(name, optim_input):
    rho = 0.05
    params, bare_params = make_params(), make_params()
    optimizer = build(name, optim_input, "sam", params)
    bare = build_bare(name, optim_input, bare_params)
    run(optimizer)
    # With maximize=True the objective is -L: its worst case within rho lies down the gradient of L.
    radius = -rho if optim_input.kwargs.get("maximize", False) else rho
    for _ in range(STEPS):
        bare.zero_grad()
        loss_fn(bare_params).backward()
        grads = [p.grad.clone() for p in bare_params]
        norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
        originals = [p.detach().clone() for p in bare_params]
        with torch.no_grad():
            for p, g in zip(bare_params, grads):
                p.add_(g, alpha=float(radius / norm))
        bare.zero_grad()
        loss_fn(bare_params).backward()
        with torch.no_grad():
            for p, w in zip(bare_params, originals):
                p.copy_(w)
        bare.step()
    for p, q in zip(params, bare_params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    for p, q in zip(params, bare_params):
        for key, value in bare.state[q].items():
            torch.testing.assert_close(optimizer.state[p][key], value, rtol=1e-10, atol=1e-12)


# -- state_dict --------------------------------------------------------------------------------


@optim_inputs
@variants
def test_state_dict_is_deterministic(name, optim_input, variant):
    harness(name, "test_state_dict_deterministic")
    results = []
    for _ in range(2):
        params = make_params()
        optimizer = build(name, optim_input, variant, params)
        run(optimizer)
        results.append((params, optimizer, optimizer.state_dict()))
    (params_a, optimizer_a, sd_a), (params_b, _, sd_b) = results
    assert_params_same(params_a, params_b)
    assert_same(sd_a, sd_b, "state_dict()")
    assert_same(optimizer_a.state_dict(), sd_a, "state_dict() called twice")


@optim_inputs
@variants
@pytest.mark.parametrize("via", ["deepcopy", "weights_only"])
def test_state_dict_round_trip_continues_bitwise(name, optim_input, variant, via):
    harness(name, "test_state_dict_deterministic", "test_save_load_equality_with_weights_only")
    params = make_params()
    optimizer = build(name, optim_input, variant, params)
    run(optimizer, 2)
    saved = optimizer.state_dict()
    checkpoint = _roundtrip(saved, via)
    loaded_params = clone_params(params)
    loaded = build(name, optim_input, variant, loaded_params)
    loaded.load_state_dict(checkpoint)
    # Re-saving a checkpoint right after loading it gives it back (nothing cast or lost).
    assert_same(loaded.state_dict(), _roundtrip(saved, "deepcopy"), "state_dict() after load")
    run(optimizer, 3)
    run(loaded, 3)
    assert_optimizers_same(optimizer, params, loaded, loaded_params)
    assert_same(loaded.state_dict(), optimizer.state_dict(), "state_dict() after continuing")


@optim_inputs
@variants
def test_state_is_what_state_dict_packs(name, optim_input, variant):
    harness(name, "test_state_dict_deterministic", "test_non_empty_state")
    params = make_params()
    optimizer = build(name, optim_input, variant, params)
    run(optimizer, 2)
    optimizer.state[params[0]]["user_counter"] = torch.tensor(3.0, dtype=torch.float64)
    packed = optimizer.state_dict()
    for index, param in enumerate(params):
        if param not in optimizer.state:  # e.g. SGD without momentum keeps no state
            assert index not in packed["state"]
            continue
        entry = optimizer.state[param]
        assert set(packed["state"][index]) == set(entry)
        for key, value in entry.items():
            assert_same(packed["state"][index][key], value, f"state_dict()['state'][{index}][{key!r}]")
        # The inner optimizer sees everything but the transform slots.
        visible = set(optimizer.inner.state[param])
        assert visible == set(entry) - {key for key in entry if optimizer.chain.hides(key)}
        assert slot_keys(variant) <= set(entry) - visible
    assert_same(packed["state"][0]["user_counter"], torch.tensor(3.0, dtype=torch.float64))
    assert "user_counter" in optimizer.inner.state[params[0]]  # not a slot key: the inner one sees it
    for group in packed["param_groups"]:
        assert group["transform_chain"] == optimizer.chain.spec()
    assert [i for group in packed["param_groups"] for i in group["params"]] == list(range(len(params)))
    # A user key survives a round trip.
    loaded_params = clone_params(params)
    loaded = build(name, optim_input, variant, loaded_params)
    loaded.load_state_dict(copy.deepcopy(packed))
    assert_same(loaded.state[loaded_params[0]]["user_counter"], torch.tensor(3.0, dtype=torch.float64))


# -- hooks ---------------------------------------------------------------------------------------


@optim_inputs
@variants
def test_state_dict_and_load_hooks_run_once_per_call(name, optim_input, variant):
    harness(name, "test_state_dict_pre_post_hook", "test_load_state_dict_pre_post_hook")
    params = make_params()
    optimizer = build(name, optim_input, variant, params)
    run(optimizer, 2)
    calls = []

    def pre_hook(opt):
        calls.append("pre")
        assert opt is optimizer
        opt.state[params[1]]["added_by_pre_hook"] = torch.tensor(7.0, dtype=torch.float64)

    def post_hook(opt, state_dict):
        calls.append("post")
        state_dict["added_by_post_hook"] = True
        return state_dict

    optimizer.register_state_dict_pre_hook(pre_hook)
    optimizer.register_state_dict_post_hook(post_hook)
    packed = optimizer.state_dict()
    assert calls == ["pre", "post"]
    assert_same(packed["state"][1]["added_by_pre_hook"], torch.tensor(7.0, dtype=torch.float64))
    assert packed["added_by_post_hook"] is True

    loaded_params = clone_params(params)
    loaded = build(name, optim_input, variant, loaded_params)
    load_calls = []

    def load_pre_hook(opt, state_dict):
        load_calls.append("load_pre")
        assert opt is loaded
        state_dict = dict(state_dict)
        state_dict["param_groups"] = [dict(g, marker_from_pre_hook=1) for g in state_dict["param_groups"]]
        return state_dict

    def load_post_hook(opt):
        load_calls.append("load_post")
        assert opt is loaded
        assert "added_by_pre_hook" in opt.state[loaded_params[1]]

    loaded.register_load_state_dict_pre_hook(load_pre_hook)
    loaded.register_load_state_dict_post_hook(load_post_hook)
    loaded.load_state_dict(copy.deepcopy(packed))
    assert load_calls == ["load_pre", "load_post"]
    assert loaded.param_groups[0]["marker_from_pre_hook"] == 1
    assert loaded.inner.param_groups[0]["marker_from_pre_hook"] == 1
    run(loaded, 1)  # the extra group key and the state key do not get in the way


@optim_inputs
@variants
def test_step_hooks_run_once_per_step(name, optim_input, variant):
    harness(name, "test_step_all_hooks")
    params = make_params()
    optimizer = build(name, optim_input, variant, params)
    calls = []
    seen_before, seen_after = [], []

    def pre_hook(opt, args, kwargs):
        assert opt is optimizer
        calls.append("pre")
        seen_before.append([p.detach().clone() for p in params])

    def post_hook(opt, args, kwargs):
        assert opt is optimizer
        calls.append("post")
        seen_after.append([p.detach().clone() for p in params])

    def global_pre_hook(opt, args, kwargs):
        if opt is optimizer or opt is optimizer.inner:
            calls.append(("global_pre", opt is optimizer))

    def global_post_hook(opt, args, kwargs):
        if opt is optimizer or opt is optimizer.inner:
            calls.append(("global_post", opt is optimizer))

    handles = [optimizer.register_step_pre_hook(pre_hook), optimizer.register_step_post_hook(post_hook)]
    global_handles = []
    try:
        global_handles.append(register_optimizer_step_pre_hook(global_pre_hook))
        global_handles.append(register_optimizer_step_post_hook(global_post_hook))
        before = [p.detach().clone() for p in params]
        run(optimizer, 2)
    finally:
        for handle in global_handles:
            handle.remove()
    per_step = [("global_pre", True), "pre", "post", ("global_post", True)]
    assert calls == per_step * 2
    # The pre hook sees the weights before the whole step (SAM's perturbation, LAMP's noise
    # included), the post hook the weights after it.
    assert_params_same(seen_before[0], before)
    assert_params_same(seen_before[1], seen_after[0])
    assert_params_same(seen_after[1], params)
    assert not all(torch.equal(a, b) for a, b in zip(seen_after[0], before))
    for handle in handles:
        handle.remove()
    calls.clear()
    run(optimizer, 1)
    assert calls == []


# -- copies --------------------------------------------------------------------------------------


@optim_inputs
@variants
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_with_lambda_hook_behaves_identically(name, optim_input, variant, how):
    harness(name, "test_deepcopy_copies_all_public_attrs")
    params = make_params()
    optimizer = build(name, optim_input, variant, params)
    optimizer.register_step_post_hook(lambda opt, args, kwargs: None)
    optimizer.register_state_dict_pre_hook(lambda opt: None)
    run(optimizer, 2)
    if how == "pickle":
        copied = pickle.loads(pickle.dumps(optimizer))
    else:
        copied = copy.deepcopy(optimizer)
    copied_params = params_of(copied)
    assert len(copied_params) == len(params)
    assert all(c is not p for c, p in zip(copied_params, params))
    assert copied.param_groups is copied.inner.param_groups
    assert not copied._optimizer_step_post_hooks and not copied._optimizer_state_dict_pre_hooks
    assert len(optimizer._optimizer_step_post_hooks) == 1  # the original keeps its hooks
    assert_optimizers_same(copied, copied_params, optimizer, params)
    for p in copied_params:  # the inner optimizer's view is the copy's state
        assert set(copied.inner.state[p]) == {k for k in copied.state[p] if not copied.chain.hides(k)}
    run(optimizer, 3)
    run(copied, 3)
    assert_optimizers_same(copied, copied_params, optimizer, params)


# -- param groups --------------------------------------------------------------------------------


@optim_inputs
@variants
def test_lr_edit_reaches_inner_optimizer(name, optim_input, variant):
    harness(name, "test_param_groups_lr")
    new_lr = scaled_lr(optim_input, name, 0.5)
    params, reference_params = make_params(), make_params()
    optimizer = build(name, optim_input, variant, params)
    for group in optimizer.param_groups:
        set_lr(group, new_lr)
    assert lr_value(optimizer.inner.param_groups[0]) == float(new_lr)
    built_with_lr = build(name, optim_input, variant, reference_params, lr=new_lr)
    run(optimizer, 3)
    run(built_with_lr, 3)
    assert_optimizers_same(optimizer, params, built_with_lr, reference_params)


@optim_inputs
@exact_variants
def test_lr_edit_mid_run_matches_bare_optimizer(name, optim_input, variant):
    harness(name, "test_param_groups_lr")
    new_lr = scaled_lr(optim_input, name, 0.25)
    params, bare_params = make_params(), make_params()
    optimizer = build(name, optim_input, variant, params)
    bare = build_bare(name, optim_input, bare_params)
    for opt in (optimizer, bare):
        run(opt, 2)
        set_lr(opt.param_groups[0], new_lr)
        run(opt, 2)
    assert_params_same(params, bare_params)
    assert_inner_state_same(optimizer, params, bare, bare_params)


def _new_group_options(optim_input, name, variant) -> dict:
    options = {"lr": scaled_lr(optim_input, name, 0.5)}
    if variant == "sam":
        options["sam.rho"] = 0.1  # the qualified key is always accepted
    elif variant == "lamp":
        options["lamp.eps"] = 2e-3
    return options


@optim_inputs
@variants
def test_add_param_group_steps_the_new_group(name, optim_input, variant):
    harness(name, "test_param_groups_lr", "test_param_groups_weight_decay")
    params, reference_params = make_params(), make_params()
    options = _new_group_options(optim_input, name, variant)
    optimizer = build(name, optim_input, variant, params[:1])
    optimizer.add_param_group({"params": [params[1]], **copy.deepcopy(options)})
    assert len(optimizer.inner.param_groups) == 2
    assert optimizer.param_groups[1]["transform_chain"] == optimizer.chain.spec()
    reference = build(
        name,
        optim_input,
        variant,
        [{"params": reference_params[:1]}, {"params": reference_params[1:], **options}],
    )
    for group, expected in zip(optimizer.param_groups, reference.param_groups):
        assert_same(without_params(group), without_params(expected), "param group")
    bias_before = params[1].detach().clone()
    run(optimizer, 3)
    run(reference, 3)
    assert not torch.equal(params[1], bias_before)  # the new group stepped
    assert_optimizers_same(optimizer, params, reference, reference_params)
    if variant in EXACT_VARIANTS:
        bare_params = make_params()
        bare = build_bare(name, optim_input, bare_params[:1])
        bare.add_param_group({"params": [bare_params[1]], "lr": options["lr"]})
        run(bare, 3)
        assert_params_same(params, bare_params)
        assert_inner_state_same(optimizer, params, bare, bare_params)


# -- LR schedulers -------------------------------------------------------------------------------


def _schedulers(kind, name):
    if kind == "StepLR":
        return [[lambda opt: StepLR(opt, step_size=1, gamma=0.5)]]
    if kind == "LambdaLR":
        return [[lambda opt: LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch))]]
    return [list(constructors) for constructors in INFOS[name].scheduler_inputs]


def _step_schedulers(schedulers, loss) -> None:
    for scheduler in schedulers:
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(float(loss))
        else:
            scheduler.step()


@optim_inputs
@variants
@pytest.mark.parametrize("kind", ["StepLR", "LambdaLR", "harness"])
def test_lr_scheduler_on_wrapper_drives_inner_lr(name, optim_input, variant, kind):
    harness(
        name, "test_forloop_goes_right_direction", "test_param_group_with_lrscheduler_goes_right_direction"
    )
    for constructors in _schedulers(kind, name):
        params, reference_params = make_params(), make_params()
        optimizer = build(name, optim_input, variant, params)
        reference = build_reference(name, optim_input, variant, reference_params)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            schedulers = [make(optimizer) for make in constructors]
            # The bare reference runs the same schedulers; a wrapper reference gets lr by hand.
            reference_schedulers = (
                [make(reference) for make in constructors] if variant in EXACT_VARIANTS else []
            )
            closure = make_closure(optimizer, params)
            reference_closure = make_closure(reference, reference_params)
            lrs, reference_lrs = [], []
            for _ in range(STEPS):
                for group, reference_group in zip(optimizer.param_groups, reference.param_groups):
                    if not reference_schedulers:
                        set_lr(reference_group, group["lr"])
                loss = optimizer.step(closure)
                reference_loss = reference.step(reference_closure)
                _step_schedulers(schedulers, loss)
                _step_schedulers(reference_schedulers, reference_loss)
                lrs.append(lr_value(optimizer.inner.param_groups[0]))
                reference_lrs.append(lr_value(reference.param_groups[0]))
        order_warnings = [str(w.message) for w in caught if "lr_scheduler.step()" in str(w.message)]
        assert order_warnings == []
        assert_params_same(params, reference_params)
        if reference_schedulers:
            assert lrs == reference_lrs
        if kind != "harness":
            initial = lr_value({"lr": scaled_lr(optim_input, name, 1.0)})
            if kind == "StepLR":
                factors = [0.5 ** (k + 1) for k in range(STEPS)]
            else:
                factors = [1 / (k + 2) for k in range(STEPS)]
            for lr, factor in zip(lrs, factors):
                assert math.isclose(lr, initial * factor, rel_tol=1e-6)


# -- implementations -------------------------------------------------------------------------------


def _final(name, optim_input, variant, params, **overrides):
    optimizer = build(name, optim_input, variant, params, **overrides)
    run(optimizer)
    return optimizer


def assert_optimizers_close(a, a_params, b, b_params, **tolerance) -> None:
    for a_param, b_param in zip(a_params, b_params):
        torch.testing.assert_close(a_param, b_param, **tolerance)
    for index, (p, q) in enumerate(zip(a_params, b_params)):
        expected = dict(b.state.get(q, {}))
        actual = dict(a.state.get(p, {}))
        assert set(actual) == set(expected), f"state[{index}] keys"
        for key, value in expected.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                torch.testing.assert_close(actual[key], value, **tolerance)
            else:
                assert_same(actual[key], value, f"state[{index}][{key!r}]")


@optim_inputs
@variants
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_inner_impl_matches_forloop(name, optim_input, variant, impl):
    """foreach / fused inner optimizer vs the for-loop one: within torch's own tolerance, and
    bit for bit equal to torch's same implementation where the wrapper must equal torch."""
    info = INFOS[name]
    if impl not in info.supported_impls or (impl == "fused" and "cpu" not in info.supports_fused_on):
        pytest.skip(f"torch's OptimizerInfo: {name} has no CPU {impl} implementation")
    loop_params, impl_params = make_params(), make_params()
    loop = _final(name, optim_input, variant, loop_params, foreach=False)
    fast = _final(name, optim_input, variant, impl_params, **{impl: True})
    tolerance = harness(name, f"test_{impl}_matches_forloop")
    assert_optimizers_close(fast, impl_params, loop, loop_params, **tolerance)
    if variant in EXACT_VARIANTS:
        bare_params = make_params()
        bare = build_bare(name, optim_input, bare_params, **{impl: True})
        run(bare)
        assert_params_same(impl_params, bare_params)
        assert_inner_state_same(fast, impl_params, bare, bare_params)


@optim_inputs
@pytest.mark.parametrize("variant", ["sam", "lamp"])  # plain and sam0 run no transform code
@pytest.mark.parametrize("inner_foreach", [False, True], ids=["inner_forloop", "inner_foreach"])
def test_transform_foreach_matches_reference_path_bitwise(name, optim_input, variant, inner_foreach):
    harness(name, "test_foreach_matches_forloop")
    results = []
    for transform_foreach in (True, False):
        params = make_params()
        optimizer = _final(
            name, optim_input, variant, params, foreach=inner_foreach, transform_foreach=transform_foreach
        )
        results.append((optimizer, params))
    (fast, fast_params), (reference, reference_params) = results
    assert_optimizers_same(fast, fast_params, reference, reference_params)


# -- complex parameters ----------------------------------------------------------------------------


def _pair_loss(pairs) -> torch.Tensor:
    """A real loss of real pairs ``weight (3, 4, 2)``, ``bias (3, 2)``."""
    weight, bias = pairs
    out = torch.tanh(torch.einsum("ni,oic->noc", X, weight) + bias)
    return ((out - Y_PAIRS) ** 2).mean() + 0.01 * (weight**2).sum()


@optim_inputs
@variants
def test_complex_params_match_real_pairs(name, optim_input, variant):
    if not INFOS[name].supports_complex:
        pytest.skip(f"torch's OptimizerInfo: {name} does not support complex parameters")
    tolerance = harness(name, "test_complex", "test_complex_2d", dtype=torch.complex128)
    generator = torch.Generator().manual_seed(3)
    complex_params = [
        torch.randn(3, 4, generator=generator, dtype=torch.complex128).requires_grad_(),
        torch.randn(3, generator=generator, dtype=torch.complex128).requires_grad_(),
    ]
    real_params = [torch.view_as_real(p).detach().clone().requires_grad_() for p in complex_params]
    complex_optimizer = build(name, optim_input, variant, complex_params)
    real_optimizer = build(name, optim_input, variant, real_params)
    complex_losses = run(complex_optimizer, fn=lambda ps: _pair_loss([torch.view_as_real(p) for p in ps]))
    real_losses = run(real_optimizer, fn=_pair_loss)
    torch.testing.assert_close(torch.stack(complex_losses), torch.stack(real_losses), **tolerance)
    for c, r in zip(complex_params, real_params):
        torch.testing.assert_close(torch.view_as_real(c.detach()), r.detach(), **tolerance)


# -- mixed dtypes ----------------------------------------------------------------------------------

MIXED = (torch.float32, torch.float64)


def _floating_state(entry):
    return {
        key: value
        for key, value in entry.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and key != "step"
    }


@optim_inputs
@variants
def test_mixed_dtypes_state_follows_each_param(name, optim_input, variant):
    harness(name, "test_mixed_device_dtype")
    params = make_params(MIXED)
    optimizer = build(name, optim_input, variant, params)
    run(optimizer, 3)
    for param in params:
        assert param.dtype in MIXED and torch.isfinite(param).all()
        for key, value in _floating_state(optimizer.state[param]).items():
            assert value.dtype == param.dtype, f"state[{key!r}] is {value.dtype} for a {param.dtype} param"
    if variant in EXACT_VARIANTS:
        bare_params = make_params(MIXED)
        bare = build_bare(name, optim_input, bare_params)
        run(bare, 3)
        assert_params_same(params, bare_params)
        assert_inner_state_same(optimizer, params, bare, bare_params)


@optim_inputs
@variants
def test_load_state_dict_casts_floating_state_to_param_dtype(name, optim_input, variant):
    harness(name, "test_mixed_device_dtype", "test_state_dict_deterministic")
    params = make_params((torch.float64, torch.float64))
    optimizer = build(name, optim_input, variant, params)
    run(optimizer, 2)
    saved = copy.deepcopy(optimizer.state_dict())
    narrow_params = [p.detach().float().requires_grad_() for p in params]
    narrow = build(name, optim_input, variant, narrow_params)
    narrow.load_state_dict(copy.deepcopy(saved))
    for index, param in enumerate(narrow_params):
        if index not in saved["state"]:  # e.g. SGD without momentum keeps no state
            assert param not in narrow.state
            continue
        entry = narrow.state[param]
        assert set(entry) == set(saved["state"][index])
        floating = _floating_state(saved["state"][index])
        for key, value in floating.items():
            assert entry[key].dtype == torch.float32, f"state[{key!r}] stayed {entry[key].dtype}"
            assert_same(entry[key], value.float(), f"state[{key!r}]")
        if "step" in entry:
            assert_same(entry["step"], saved["state"][index]["step"], "step")  # never cast
    run(narrow, 2)
    for param in narrow_params:
        for key, value in _floating_state(narrow.state[param]).items():
            assert value.dtype == torch.float32, f"state[{key!r}] is {value.dtype} after stepping"
