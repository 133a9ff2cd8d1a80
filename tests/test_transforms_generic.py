"""Contracts every transform keeps, in every configuration of the TransformInfo registry.

Each test runs over every (info, config) pair of ``transform_infos.CONFIGS``: the default
optimizer around a transform, per-group overrides, adaptive variants, chains, and qualified
group keys beside an inner optimizer that owns the same name.
"""

from __future__ import annotations

import copy
import io
import weakref

import pytest
import torch
from torch import nn
from transform_infos import (
    CONFIGS,
    TRANSFORM_INFOS,
    assert_bitwise_equal,
    config_id,
    make_closure,
    make_data,
    make_model,
    params_of,
)

from samgria import ClampGrad, FriendlySAM, ScaleGrad, TransformingOptimizer

INFO_OF_CLASS = {info.name: info for info in TRANSFORM_INFOS}

SLOT_OF_CLASS = {
    "SAM": "sam",
    "ASAM": "asam",
    "LAMP": "lamp",
    "ClipGradNorm": "clip_grad_norm",
    "GradSign": "grad_sign",
    "NormalizeGrad": "normalize_grad",
    "ScaleGrad": "scale_grad",
    "ClampGrad": "clamp_grad",
    "GSAM": "gsam",
    "WSAM": "wsam",
    "FriendlySAM": "friendly_sam",
    "LookSAM": "look_sam",
    "ESAM": "esam",
    "SparsifyGrad": "sparsify_grad",
    "ClampParams": "clamp_params",
    "ProjectParams": "project_params",
    "HookedRowTransform": "hooked_row_transform",
    "Lookahead": "lookahead",
    "EMA": "ema",
    "MultiStepSAM": "multi_step_sam",
}

all_configs = pytest.mark.parametrize("info,config", CONFIGS, ids=[config_id(pair) for pair in CONFIGS])
reevaluating_configs = pytest.mark.parametrize(
    "info,config",
    [pair for pair in CONFIGS if pair[1].needs_closure],
    ids=[config_id(pair) for pair in CONFIGS if pair[1].needs_closure],
)
standalone_configs = pytest.mark.parametrize(
    "info,config",
    [pair for pair in CONFIGS if pair[1].standalone_equivalent],
    ids=[config_id(pair) for pair in CONFIGS if pair[1].standalone_equivalent],
)

CONSTRUCTOR_ERRORS = [(info, error) for info in TRANSFORM_INFOS for error in info.error_inputs]
# Bad values of group keys: the same value in a param group must raise the same error, naming the group.
GROUP_ERRORS = [(info, error) for info, error in CONSTRUCTOR_ERRORS if set(error.kwargs) <= set(info.group_keys)]


def error_id(pair) -> str:
    info, error = pair
    return f"{info.name}-" + "-".join(f"{k}={v!r}" for k, v in error.kwargs.items())


def assert_state_equal(actual, expected):
    """Nested dicts/lists equal, tensors bit for bit (a printed comparison would round)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_state_equal(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, b in zip(actual, expected):
            assert_state_equal(a, b)
    else:
        assert actual == expected


def run(config, steps, *, model=None, **optimizer_kwargs):
    x, y = make_data()
    model = model if model is not None else make_model()
    optimizer = config.build(model, **optimizer_kwargs)
    closure = make_closure(model, optimizer, x, y)
    for _ in range(steps):
        optimizer.step(closure)
    return model, optimizer


# -- construction -------------------------------------------------------------------------------
@pytest.mark.parametrize("info,error", CONSTRUCTOR_ERRORS, ids=[error_id(pair) for pair in CONSTRUCTOR_ERRORS])
def test_bad_constructor_input_names_argument_rule_and_value(info, error):
    with pytest.raises(error.error_type, match=error.error_regex):
        info.make(**error.kwargs)


@pytest.mark.parametrize("info,error", GROUP_ERRORS, ids=[error_id(pair) for pair in GROUP_ERRORS])
def test_bad_group_value_names_the_group_argument_rule_and_value(info, error):
    model = make_model()
    with pytest.raises(error.error_type, match=r"param_groups\[1\]: " + error.error_regex):
        TransformingOptimizer(
            [{"params": list(model[0].parameters())}, {"params": list(model[4].parameters()), **error.kwargs}],
            torch.optim.SGD,
            lr=0.1,
            transforms=[info.make()],
        )


@pytest.mark.parametrize("info", TRANSFORM_INFOS, ids=[info.name for info in TRANSFORM_INFOS])
def test_declares_its_group_keys_and_whether_it_reevaluates(info):
    transform = info.make()
    assert tuple(transform.group_defaults()) == info.group_keys
    assert transform.needs_closure is info.needs_closure


@all_configs
def test_groups_hold_the_hyperparameters_under_the_expected_keys(info, config):
    optimizer = config.build(make_model())
    if config.expect_groups:
        assert len(optimizer.param_groups) == len(config.expect_groups)
        for group, expected in zip(optimizer.param_groups, config.expect_groups):
            assert {key: group.get(key) for key in expected} == expected
    else:  # the default: short keys with the constructor's values
        defaults = info.make().group_defaults()
        for group in optimizer.param_groups:
            assert {key: group[key] for key in info.group_keys} == defaults
    # Slots are named after the classes in snake case, a repeated class gets "_1"; every group
    # records the chain as "<slot>=<Class>(<settings>)".
    classes = [type(t).__name__ for t in config.transform_list()]
    slots: list[str] = []
    for name in classes:
        slot, suffix = SLOT_OF_CLASS[name], 0
        while slot in slots:
            suffix += 1
            slot = f"{SLOT_OF_CLASS[name]}_{suffix}"
        slots.append(slot)
    assert optimizer.slots == slots
    for group in optimizer.param_groups:
        recorded = [entry.partition("=") for entry in group["transform_chain"]]
        assert [slot for slot, _, _ in recorded] == slots
        assert all(described.startswith(name + "(") for (_, _, described), name in zip(recorded, classes))


@all_configs
def test_transforms_change_the_trajectory(info, config):
    # Guards the bitwise comparisons below against a configuration that does nothing.
    x, y = make_data()
    model, _ = run(config, 3)
    bare_model = make_model()
    bare = config.build_bare(bare_model)
    closure = make_closure(bare_model, bare, x, y)
    for _ in range(3):
        bare.step(closure)
    assert any(not torch.equal(a, b) for a, b in zip(params_of(model), params_of(bare_model)))


@pytest.mark.parametrize(
    "info,config",
    [pair for pair in CONFIGS if pair[1].groups is not None],
    ids=[config_id(pair) for pair in CONFIGS if pair[1].groups is not None],
)
def test_group_overrides_take_effect(info, config):
    # The same optimizer without the groups' transform keys takes another path: the per-group
    # values (short or qualified keys) are read, not the constructor's.
    model, _ = run(config, 3)
    plain_model, _ = run(config.without_group_overrides(), 3)
    assert any(not torch.equal(a, b) for a, b in zip(params_of(model), params_of(plain_model)))


# -- the step -------------------------------------------------------------------------------------
@all_configs
def test_foreach_path_equals_reference_path_bitwise(info, config):
    fast_model, fast = run(config, 5, transform_foreach=True)
    reference_model, reference = run(config, 5, transform_foreach=False)
    assert_bitwise_equal(params_of(fast_model), params_of(reference_model))
    assert_state_equal(fast.state_dict(), reference.state_dict())


@all_configs
def test_two_call_loop_equals_step_closure_bitwise(info, config):
    x, y = make_data()
    model_a = make_model()
    opt_a = config.build(model_a)
    model_b = make_model()
    opt_b = config.build(model_b)
    closure = make_closure(model_a, opt_a, x, y)
    for _ in range(4):
        loss_a = opt_a.step(closure)

        loss_b = nn.functional.mse_loss(model_b(x), y)
        loss_b.backward()
        opt_b.first_step(zero_grad=True)
        nn.functional.mse_loss(model_b(x), y).backward()
        opt_b.second_step(zero_grad=True)
        assert torch.equal(loss_a, loss_b)
    assert_bitwise_equal(params_of(model_a), params_of(model_b))
    assert_state_equal(opt_b.state_dict(), opt_a.state_dict())


@all_configs
@pytest.mark.parametrize("loop", ["step(closure)", "two-call"])
def test_gradients_of_backward_with_create_graph_step_as_plain_ones_without_warnings(info, config, loop):
    """Closures that call backward(create_graph=True) (what Hessian-based inner optimizers need)
    give gradients that require grad: norms taken outside no_grad recorded autograd graphs and
    warned "Converting a tensor with requires_grad=True to a scalar". The steps equal those of
    plain gradients bit for bit, and nothing warns but torch's own note on create_graph."""
    import warnings

    x, y = make_data()
    runs = []
    for create_graph in (False, True):
        model = make_model()
        optimizer = config.build(model)

        def evaluate() -> torch.Tensor:
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward(create_graph=create_graph)
            return loss.detach()

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            return evaluate()

        warn_always = torch.is_warn_always_enabled()
        torch.set_warn_always(True)  # torch warns once per process otherwise: every config must see it
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
                for _ in range(3):
                    if loop == "step(closure)":
                        optimizer.step(closure)
                    else:
                        optimizer.zero_grad()
                        evaluate()
                        optimizer.first_step(zero_grad=True)
                        evaluate()
                        optimizer.second_step(zero_grad=True)
        finally:
            torch.set_warn_always(warn_always)
        runs.append(params_of(model))
        for param in model.parameters():
            param.grad = None  # create_graph gradients reference the graph: free it
    assert_bitwise_equal(runs[1], runs[0])


@all_configs
def test_checkpoint_resume_continues_bitwise(info, config):
    x, y = make_data()
    model_a, opt_a = run(config, 3)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": opt_a.state_dict()}, buffer)
    closure_a = make_closure(model_a, opt_a, x, y)
    for _ in range(4):
        opt_a.step(closure_a)

    buffer.seek(0)
    checkpoint = torch.load(buffer)  # torch's default: weights_only=True
    model_b = make_model(seed=5)
    opt_b = config.build(model_b)
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["optimizer"])
    closure_b = make_closure(model_b, opt_b, x, y)
    for _ in range(4):
        opt_b.step(closure_b)
    assert_bitwise_equal(params_of(model_a), params_of(model_b))
    assert_state_equal(opt_b.state_dict(), opt_a.state_dict())


@all_configs
def test_evaluates_the_closure_once_plus_at_most_its_declared_reevaluations(info, config):
    x, y = make_data()
    model, optimizer = run(config, 0)
    closure = make_closure(model, optimizer, x, y)
    declared = sum(t.reevaluations for t in optimizer.transforms)
    assert declared == 0 or config.needs_closure
    calls = []
    for _ in range(4):
        calls.append(0)

        def counting():
            calls[-1] += 1
            return closure()

        optimizer.step(counting)
    assert min(calls) >= 1 and max(calls) == 1 + declared, (declared, calls)  # LookSAM: not every step


@all_configs
def test_maximizing_a_loss_equals_minimizing_its_negation_bitwise(info, config):
    """``maximize=True`` on the inner optimizer means the objective is :math:`-L`: the SAM
    family's worst case then lies down the gradient of :math:`L` (it climbed before)."""
    if any(isinstance(t, (ScaleGrad, ClampGrad)) for t in config.build(make_model()).transforms):
        pytest.skip("an affine map or a clamp of the gradient is not odd: maximising differs by design")
    x, y = make_data()
    runs = []
    for maximize in (True, False):
        model = make_model()
        optimizer = config.build(model, **({"maximize": True} if maximize else {}))
        sign = 1.0 if maximize else -1.0

        def closure(model=model, optimizer=optimizer, sign=sign):
            optimizer.zero_grad()
            loss = sign * nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        adversary = any(getattr(t, "adversary", None) is not None for t in optimizer.transforms)
        if maximize and adversary:
            before = params_of(model)
            with pytest.raises(ValueError, match=r"^MultiStepSAM's adversary climbs L .*maximize=True"):
                optimizer.step(closure)
            assert_bitwise_equal(before, params_of(model))
            return
        for _ in range(3):
            optimizer.step(closure)
        runs.append(params_of(model))
    assert_bitwise_equal(*runs)
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], params_of(make_model()))), "it trained"


@reevaluating_configs
def test_closure_raising_in_second_pass_leaves_weights_and_state_untouched(info, config):
    x, y = make_data()
    model, optimizer = run(config, 2)
    twin_model, twin = run(config, 2)
    before_params = params_of(model)
    before_state = copy.deepcopy(optimizer.state_dict())
    closure = make_closure(model, optimizer, x, y)
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("data loader died")
        return closure()

    with pytest.raises(KeyError, match="data loader died"):
        optimizer.step(flaky)
    assert calls["n"] == 2  # it was the re-evaluation that raised
    assert_bitwise_equal(before_params, params_of(model))
    assert_state_equal(optimizer.state_dict(), before_state)
    # And the next step is the one a run without the failure takes.
    optimizer.step(closure)
    twin.step(make_closure(twin_model, twin, x, y))
    assert_bitwise_equal(params_of(model), params_of(twin_model))
    assert_state_equal(optimizer.state_dict(), twin.state_dict())


@all_configs
def test_a_first_step_without_closure_that_raises_leaves_no_state(info, config, monkeypatch):
    """Transforms that create state before the inner step (Lookahead's slow weights,
    ProjectParams' centre) must not keep it when the step fails (before, the plain
    loop kept it, step(closure) did not)."""
    if config.needs_closure:
        pytest.skip("needs a closure")
    x, y = make_data()
    model, twin_model = make_model(), make_model()
    optimizer, twin = config.build(model), config.build(twin_model)
    before_params, before_state = params_of(model), copy.deepcopy(optimizer.state_dict())

    def failing(self, closure=None):  # refused before writing, as torch's own optimizers refuse
        raise KeyError("inner step refused")

    monkeypatch.setattr(type(optimizer.inner), "step", failing)
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(KeyError, match="inner step refused"):
        optimizer.step()
    assert_bitwise_equal(before_params, params_of(model))
    assert_state_equal(optimizer.state_dict(), before_state)
    monkeypatch.undo()
    for run_model, run_optimizer in ((model, optimizer), (twin_model, twin)):
        run_optimizer.zero_grad()
        nn.functional.mse_loss(run_model(x), y).backward()
        run_optimizer.step()
    assert_bitwise_equal(params_of(model), params_of(twin_model))
    assert_state_equal(optimizer.state_dict(), twin.state_dict())


@all_configs
@pytest.mark.parametrize("deleted", ["after a step", "between first_step and second_step"])
def test_a_deleted_optimizer_frees_its_model_at_once(info, config, deleted, no_cyclic_collector):
    """With the cyclic collector off, deleting the optimizer and the model frees the parameters,
    also between the two calls (GSAM's and WSAM's step in progress held itself in a cycle
    through its finishing function, keeping the first weights until the collector ran)."""
    x, y = make_data()
    model = make_model()
    optimizer = config.build(model)
    if deleted == "after a step":
        optimizer.step(make_closure(model, optimizer, x, y))
    else:
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
    watched = [weakref.ref(param) for param in model.parameters()]
    del model, optimizer
    assert [ref() is None for ref in watched] == [True] * len(watched)


def _assert_as_before_then_like_the_twin(model, optimizer, before_params, before_state, twin_model, twin, x, y):
    """The weights and state are as before the failed step, and the next step is the twin's."""
    assert_bitwise_equal(before_params, params_of(model))
    assert_state_equal(optimizer.state_dict(), before_state)
    optimizer.step(make_closure(model, optimizer, x, y))
    twin.step(make_closure(twin_model, twin, x, y))
    assert_bitwise_equal(params_of(model), params_of(twin_model))
    assert_state_equal(optimizer.state_dict(), twin.state_dict())


def _poisoned_two_call_step(model, optimizer, x, y, where):
    """One two-call step whose ``where`` ("first"/"second") backward gives NaN gradients."""
    for which in ("first", "second"):
        loss = nn.functional.mse_loss(model(x), y)
        (loss * float("nan") if which == where else loss).backward()
        if which == "first":
            optimizer.first_step(zero_grad=True)
    optimizer.second_step(zero_grad=True)


@all_configs
@pytest.mark.parametrize("non_finite", ["skip", "raise"])
@pytest.mark.parametrize("where", ["first", "second"])
def test_two_call_loop_with_a_non_finite_pass_changes_nothing(info, config, where, non_finite):
    """The non-finite policy of the two-call loop: either pass non-finite skips the step whole
    (warned and counted) or raises, and the weights and every state are as before the step."""
    x, y = make_data()
    model, optimizer = run(config, 2, non_finite=non_finite)  # LookSAM(k=2): the next step is a SAM step
    twin_model, twin = run(config, 2, non_finite=non_finite)
    before_params = params_of(model)
    before_state = copy.deepcopy(optimizer.state_dict())
    if non_finite == "skip":
        with pytest.warns(RuntimeWarning, match=f"the gradients of the {where} evaluation are not finite"):
            _poisoned_two_call_step(model, optimizer, x, y, where)
        assert optimizer.skipped_steps == 1
    else:
        with pytest.raises(FloatingPointError, match=f"the gradients of the {where} evaluation are not finite"):
            _poisoned_two_call_step(model, optimizer, x, y, where)
        assert optimizer.skipped_steps == 0
    _assert_as_before_then_like_the_twin(model, optimizer, before_params, before_state, twin_model, twin, x, y)


@all_configs
@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler-step", "unscale-clip-step"])
def test_two_call_loop_under_grad_scaler_equals_the_unscaled_loop_bitwise(info, config, unscale_first):
    """With ``torch.amp.GradScaler`` (a power-of-two scale) the two-call loop takes the steps of
    the loop without it, also when the second pass's gradients are unscaled (and clipped) before
    ``scaler.step``, while the chain still holds the first pass's scaled gradients."""
    x, y = make_data()

    def train(scaled):
        model = make_model()
        optimizer = config.build(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
        for _ in range(4):
            loss = nn.functional.mse_loss(model(x), y)
            (scaler.scale(loss) if scaled else loss).backward()
            optimizer.first_step(zero_grad=True)
            loss = nn.functional.mse_loss(model(x), y)
            (scaler.scale(loss) if scaled else loss).backward()
            if unscale_first:
                if scaled:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            if scaled:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.second_step()
            optimizer.zero_grad()
        return model, optimizer

    transforms = config.transform_list()
    refusals = {
        # Its move depends on the size of the (scaled) first gradients.
        "unnormalized_then_lamp": r"from the size of the first pass's gradients, which GradScaler has multiplied",
        # ScaleGrad's bias does not scale with the gradients, and LookSAM mixes them into the step.
        "scale_grad_then_look_sam": r"LookSAM mixes the first pass's gradients into the step, and ScaleGrad acted on them",
    }
    if config.id in refusals:  # refused, the weights restored
        model = make_model()
        optimizer = config.build(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        before = params_of(model)
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        optimizer.first_step(zero_grad=True)
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        with pytest.raises(RuntimeError, match=refusals[config.id]):
            scaler.step(optimizer)
        assert_bitwise_equal(before, params_of(model))
        assert not any(optimizer.state.values())
        assert "found_inf" not in vars(optimizer) and "grad_scale" not in vars(optimizer)
        return
    model, optimizer = train(scaled=True)
    reference_model, reference = train(scaled=False)
    assert_bitwise_equal(params_of(model), params_of(reference_model))
    expected = reference.state_dict()
    if any(isinstance(t, FriendlySAM) for t in transforms):  # its average is kept in the scale's units
        for entry in expected["state"].values():
            entry["friendly_sam.momentum"] = entry["friendly_sam.momentum"] * 2.0**10
    assert_state_equal(optimizer.state_dict(), expected)


@reevaluating_configs
@pytest.mark.parametrize("atomic", [True, False])
def test_cancel_step_commits_nothing_of_the_abandoned_step(info, config, atomic):
    x, y = make_data()
    model, optimizer = run(config, 2, atomic=atomic)  # LookSAM(k=2): the next step is a SAM step
    twin_model, twin = run(config, 2, atomic=atomic)
    before_params = params_of(model)
    before_state = copy.deepcopy(optimizer.state_dict())
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    optimizer.cancel_step()
    _assert_as_before_then_like_the_twin(model, optimizer, before_params, before_state, twin_model, twin, x, y)


@all_configs
def test_parameters_without_grad_are_left_alone(info, config):
    model = make_model()
    frozen, unused = model[2].bias, model.unused
    assert next(iter(model.parameters())) is unused  # object-level state lands on it
    frozen_before, unused_before = frozen.detach().clone(), unused.detach().clone()
    model, optimizer = run(config, 6, model=model)
    assert torch.equal(frozen, frozen_before)
    assert torch.equal(unused, unused_before)
    infos = [INFO_OF_CLASS[type(t).__name__] for t in optimizer.transforms]
    per_param = {f"{slot}.{key}" for slot, i in zip(optimizer.slots, infos) for key in i.param_state_keys}
    object_level = {f"{slot}.{key}" for slot, i in zip(optimizer.slots, infos) for key in i.object_state_keys}
    assert not optimizer.state.get(frozen)
    assert set(optimizer.state.get(unused, {})) <= object_level
    assert per_param <= set(optimizer.state[model[0].weight])


@all_configs
def test_mixed_float64_float32_bfloat16_parameters(info, config):
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(4, 4).to(torch.float64), nn.Linear(4, 4).to(torch.float32), nn.Linear(4, 1).to(torch.bfloat16))
    x = torch.randn(16, 4, dtype=torch.float64)

    def run_mixed(foreach, steps):
        model = copy.deepcopy(layers)
        optimizer = config.build(model, transform_foreach=foreach)

        def closure():
            optimizer.zero_grad()
            h = torch.tanh(model[0](x)).float()
            h = torch.tanh(model[1](h)).bfloat16()
            loss = model[2](h).float().square().mean()
            loss.backward()
            return loss

        for _ in range(steps):
            optimizer.step(closure)
        return params_of(model)

    initial = params_of(layers)
    # One step: the float64/float32 parameters agree bit for bit between the two paths; torch's
    # foreach and per-tensor bfloat16 kernels may round differently, so bfloat16 gets a tolerance.
    fast, reference = run_mixed(True, 1), run_mixed(False, 1)
    assert [p.dtype for p in fast] == [torch.float64] * 2 + [torch.float32] * 2 + [torch.bfloat16] * 2
    assert_bitwise_equal(fast[:4], reference[:4])
    torch.testing.assert_close(fast[4:], reference[4:])
    assert all(not torch.equal(a, b) for a, b in zip(fast[:4], initial[:4]))
    fast, reference = run_mixed(True, 4), run_mixed(False, 4)
    assert all(torch.isfinite(p.float()).all() for p in fast)
    # Later steps see the bfloat16 rounding through the loss: bfloat16-sized tolerances.
    torch.testing.assert_close(fast, reference, rtol=1.6e-2, atol=1e-3)


@standalone_configs
def test_standalone_seed_protocol_equals_optimizer_step(info, config):
    x, y = make_data()
    model_a = make_model()
    opt_a = config.build(model_a)
    closure = make_closure(model_a, opt_a, x, y)

    model_b = make_model()
    plain = config.build_bare(model_b)
    (transform,) = config.transform_list()

    def loss_fn(inputs, targets):
        return nn.functional.mse_loss(model_b(inputs), targets)

    for _ in range(5):
        opt_a.step(closure)
        plain.zero_grad()
        loss_fn(x, y).backward()
        transform.apply(model_b, loss_fn, (x, y))
        plain.step()
        transform.post_step(model_b)
    assert_bitwise_equal(params_of(model_a), params_of(model_b))


def test_standalone_state_dict_is_keyed_by_the_parameters_positions_in_the_model():
    """State created for the first and third parameters before the second: the keys are still
    the positions 0, 1, 2 of the model's parameters, each with the state of its own shape."""
    from samgria import EMA

    model = nn.Module()
    model.a = nn.Parameter(torch.zeros(1))
    model.b = nn.Parameter(torch.zeros(2))
    model.c = nn.Parameter(torch.zeros(3))
    model.frozen = nn.Parameter(torch.zeros(4), requires_grad=False)  # not numbered
    ema = EMA(0.5)
    model.a.grad, model.c.grad = torch.ones(1), torch.ones(3)
    ema.apply(model, None, ())
    ema.post_step(model)
    assert sorted(ema.state_dict()["state"]) == [0, 2]
    model.b.grad = torch.ones(2)
    ema.apply(model, None, ())
    ema.post_step(model)
    state = ema.state_dict()["state"]
    assert sorted(state) == [0, 1, 2]
    for index, param in enumerate([model.a, model.b, model.c]):
        tensors = [value for value in state[index].values() if isinstance(value, torch.Tensor) and value.dim() > 0]
        assert tensors and all(value.shape == param.shape for value in tensors), (index, state[index])


def test_a_declared_no_op_post_update_is_skipped_but_a_subclass_override_of_it_runs():
    """A third-party transform whose class declares ``_post_update_runs = False`` speaks only for
    its own ``post_update``: the optimizer skips that one, but a subclass's override, or one set
    on the instance, runs after every inner step."""
    from samgria import Transform

    calls = []

    class Quiet(Transform):
        _post_update_runs = False

        def post_update(self, ctx):
            calls.append("quiet")

    class Loud(Quiet):
        def post_update(self, ctx):
            calls.append("loud")

    def set_on_the_instance():
        transform = Quiet()
        transform.post_update = lambda ctx: calls.append("instance")
        return transform

    for make, expected in [(Quiet, []), (Loud, ["loud", "loud"]), (set_on_the_instance, ["instance", "instance"])]:
        calls.clear()
        model, (x, y) = make_model(), make_data()
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[make()])
        closure = make_closure(model, optimizer, x, y)
        optimizer.step(closure)
        optimizer.step(closure)
        assert calls == expected, make.__name__


def test_a_no_op_declaration_in_a_mixin_or_for_a_classmethod_post_update_is_honoured():
    """The declaration speaks for the ``post_update`` of a class after it in the method
    resolution order (a mixin placed before the class that defines it), and for a classmethod
    ``post_update`` (a new bound method at each access): both were run after every inner step,
    with a copy of the weights and the optimizer state before it. A subclass's override runs."""
    from samgria import Transform

    calls = []

    class QuietMixin:
        @property
        def _post_update_runs(self):
            return False

    class Defines(Transform):
        def post_update(self, ctx):
            calls.append("defines")

    class Mixed(QuietMixin, Defines):
        pass

    class OwnClassmethod(Transform):
        _post_update_runs = False

        @classmethod
        def post_update(cls, ctx):
            calls.append("classmethod")

    class Overrides(Mixed):
        def post_update(self, ctx):
            calls.append("overrides")

    for make, expected in [(Mixed, []), (OwnClassmethod, []), (Overrides, ["overrides"])]:
        calls.clear()
        model, (x, y) = make_model(), make_data()
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[make()])
        optimizer.step(make_closure(model, optimizer, x, y))
        assert calls == expected, make.__name__


class _Flagged(ValueError):
    """A user's error class that shows its message otherwise than it was given."""

    def __str__(self):
        return f"[flagged] {self.args[0]}"


class _FlaggingScaleGrad(ScaleGrad):
    def validate_group(self, group):
        if group["grad_scale"] < 0:
            raise _Flagged(f"grad_scale must be >= 0, got {group['grad_scale']!r}")


def test_a_validate_group_error_that_would_show_another_message_becomes_a_plain_one_with_the_group_named():
    """An error class whose ``str`` is not the message it is built from is re-raised as a plain
    ``ValueError``, so that the message is exactly the group's name and the error's text, shown once."""
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: \[flagged\] grad_scale must be >= 0, got -1\.0$") as caught:
        TransformingOptimizer([{"params": nn.Linear(2, 1).parameters(), "grad_scale": -1.0}], torch.optim.SGD, lr=0.1, transforms=[_FlaggingScaleGrad()])
    assert type(caught.value) is ValueError


class _WordyScaleGrad(ScaleGrad):
    def validate_group(self, group):
        if group["grad_scale"] < 0:
            raise ValueError(f"grad_scale must be >= 0, got {group['grad_scale']!r} (a grad_scale_factor; see 'grad_scale' and grad_bias)")


def test_a_validate_group_message_names_the_stored_keys_of_whole_words_only():
    """With two ScaleGrads the groups store ``"b.grad_scale"``: the message of the second names
    that key for every whole-word mention of ``grad_scale`` and ``grad_bias``,
    not inside a longer word or a quoted name."""
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError) as caught:
        TransformingOptimizer([{"params": params, "b.grad_scale": -1.0}], torch.optim.SGD, lr=0.1, transforms={"a": ScaleGrad(), "b": _WordyScaleGrad()})
    assert str(caught.value) == (
        "param_groups[0]: b.grad_scale must be >= 0, got -1.0 (a grad_scale_factor; see 'grad_scale' and b.grad_bias)"
    )
