"""LAMP (LAMPRollback): noise of global size eps, running mean, rollback."""

from __future__ import annotations

import copy
import gc
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_harness import run_ranks, skip_without_gloo
from torch import nn
from transform_infos import assert_bitwise_equal, make_closure, make_data, make_model, params_of

from samgria import LAMP, LAMPRollback, Transform, TransformingOptimizer


def plain_iterates(steps, lr=0.1):
    x, y = make_data()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    closure = make_closure(model, optimizer, x, y)
    iterates = []
    for _ in range(steps):
        optimizer.step(closure)
        iterates.append(params_of(model))
    return iterates


def test_lamp_rollback_is_an_alias():
    assert LAMPRollback is LAMP


def test_eps_zero_rolls_back_to_the_mean_of_the_plain_iterates():
    rollback_len = 3
    iterates = plain_iterates(rollback_len + 1)
    expected = [torch.stack(ws).mean(dim=0) for ws in zip(*iterates)]
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[LAMP(eps=0.0, rollback_len=rollback_len)])
    closure = make_closure(model, optimizer, x, y)
    for step in range(rollback_len):
        optimizer.step(closure)
        assert_bitwise_equal(params_of(model), iterates[step])  # no noise, no rollback yet
    optimizer.step(closure)
    got = params_of(model)
    untouched = {id(model[2].bias), id(model.unused)}
    trainable = [i for i, p in enumerate(model.parameters()) if id(p) not in untouched]
    assert len(trainable) == len(got) - 2
    for i in trainable:
        torch.testing.assert_close(got[i], expected[i], rtol=1e-14, atol=1e-15)
    for i in set(range(len(got))) - set(trainable):  # frozen and unused: untouched
        assert torch.equal(got[i], iterates[0][i])
    # The cycle position is object-level state, kept on the optimizer's first parameter (here the
    # unused one, which has no gradient): back at 0 after the rollback.
    first = optimizer.param_groups[0]["params"][0]
    assert first is model.unused
    assert optimizer.state[first]["lamp.cycle_step"] == 0


def test_noise_has_global_norm_eps_and_scales_with_weight_magnitude():
    eps = 1e-2
    param = nn.Parameter(torch.tensor([0.0, 1.0, -4.0, 2.0], dtype=torch.float64))
    other = nn.Parameter(torch.tensor([[3.0, 0.5]], dtype=torch.float64))
    optimizer = TransformingOptimizer([param, other], torch.optim.SGD, lr=0.0, transforms=[LAMP(eps=eps, rollback_len=100, seed=3)])
    before = [param.detach().clone(), other.detach().clone()]

    def closure():
        optimizer.zero_grad()
        loss = param.sum() + other.sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    noise = [param.detach() - before[0], other.detach() - before[1]]
    norm = math.sqrt(sum(float((n**2).sum()) for n in noise))
    assert norm == torch.tensor(eps, dtype=torch.float64).item() or abs(norm - eps) < 1e-15
    assert noise[0][0] == 0.0  # |w| = 0: no noise
    ratio = (noise[0][1:] / before[0][1:].abs()).abs()
    assert (ratio <= eps).all()  # |u_i| <= |w_i| before normalisation


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize(
    "dtype, tiny",
    [(torch.float64, 1e-315), (torch.float32, 1e-44), (torch.bfloat16, 1e-40)],
    ids=["float64", "float32", "bfloat16"],
)
def test_noise_of_subnormal_weights_has_global_norm_eps(dtype, tiny, foreach):
    # eps / ||u|| is beyond the range of the dtype the noise is added in: float64 weights became
    # inf and NaN, float32 and bfloat16 ones raised ValueError from the kernel.
    eps = 1.0
    param = nn.Parameter(torch.tensor([tiny, 0.0, -3 * tiny, 2 * tiny], dtype=dtype))
    before = param.detach().clone()
    optimizer = TransformingOptimizer(
        [param], torch.optim.SGD, lr=0.0, foreach=foreach, transforms=[LAMP(eps=eps, rollback_len=100, seed=3)]
    )
    param.grad = torch.zeros_like(param)
    optimizer.step()
    # The same draws, normalised in float64 after an exact scaling by a power of two. The norm of
    # float64 noise is itself subnormal (about 20 significant bits), float32 noise is added in
    # float32, bfloat16 rounded to bfloat16.
    r = torch.empty_like(before).uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(3))
    u = (before * r).double() * 2.0 ** (1000 if dtype == torch.float64 else 100)
    expected = (before.double() + eps * u / u.norm()).to(dtype)
    assert torch.isfinite(param).all()
    rtol = {torch.float64: 1e-9, torch.float32: 1e-6, torch.bfloat16: 2**-8}[dtype]
    torch.testing.assert_close(param.detach(), expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("eps", [np.float32(0.01), np.float16(0.01), np.float16(100.0)], ids=["float32", "float16", "float16-large"])
def test_a_numpy_eps_scales_the_noise_as_the_float_it_holds(eps):
    # eps / ||u|| was computed in the NumPy scalar's precision: float32's or float16's rounding
    # of the scale, and beyond float16's range (65504) infinite weights.
    param = nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64) * 1e-3)
    before = param.detach().clone()
    optimizer = TransformingOptimizer(
        [{"params": [param], "eps": eps}], torch.optim.SGD, lr=0.0, transforms=[LAMP(rollback_len=100, seed=0)]
    )
    param.grad = torch.zeros_like(param)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    r = torch.empty_like(before).uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(0))
    u = before * r
    torch.testing.assert_close(param.detach(), before + float(eps) / float(u.norm()) * u, rtol=1e-15, atol=0)


def weights_after_lamp_steps(seed, rollback_len=5, steps=3):
    """The weights after ``steps`` SGD steps with ``LAMP(eps=1e-2, rollback_len, seed)``."""
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[LAMP(eps=1e-2, rollback_len=rollback_len, seed=seed)])
    closure = make_closure(model, optimizer, x, y)
    for _ in range(steps):
        optimizer.step(closure)
    return params_of(model)


def test_same_seed_same_noise_different_seed_different_noise():
    assert_bitwise_equal(weights_after_lamp_steps(1), weights_after_lamp_steps(1))
    assert any(not torch.equal(a, b) for a, b in zip(weights_after_lamp_steps(1), weights_after_lamp_steps(2)))


def test_each_step_draws_fresh_noise_from_the_checkpointed_generator():
    param = nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.0, transforms=[LAMP(eps=1e-2, rollback_len=100, seed=0)])

    def closure():
        optimizer.zero_grad()
        loss = param.sum()
        loss.backward()
        return loss

    weights = [param.detach().clone()]
    states = []
    for _ in range(3):  # lr=0: the noise is the only change
        optimizer.step(closure)
        weights.append(param.detach().clone())
        states.append(optimizer.state[param]["lamp.rng_state"].clone())
    first, second = weights[1] - weights[0], weights[2] - weights[1]
    assert not torch.allclose(first / first.norm(), second / second.norm())
    assert not torch.equal(states[0], states[1])  # the generator advanced and was saved


def test_default_generator_is_torchs():
    def run():
        torch.manual_seed(123)
        x, y = make_data()
        model = make_model()
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[LAMP(eps=1e-2, rollback_len=5)])
        closure = make_closure(model, optimizer, x, y)
        torch.manual_seed(7)
        for _ in range(3):
            optimizer.step(closure)
        return params_of(model)

    assert_bitwise_equal(run(), run())


def test_state_lives_in_optimizer_state_and_cycles():
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[LAMP(eps=1e-3, rollback_len=2, seed=0)])
    closure = make_closure(model, optimizer, x, y)
    first = optimizer.param_groups[0]["params"][0]
    assert first is model.unused  # object-level state lands on a parameter without gradient
    weight = model[0].weight
    steps, counts = [], []
    for _ in range(6):
        optimizer.step(closure)
        steps.append(optimizer.state[first]["lamp.cycle_step"])
        counts.append(optimizer.state[weight]["lamp.count"])
    assert steps == [1, 2, 0, 1, 2, 0]
    assert counts == [1, 2, 0, 1, 2, 0]
    state = optimizer.state[weight]
    assert torch.equal(state["lamp.sum"], torch.zeros_like(weight))  # emptied by the rollback
    assert state["lamp.sum"].dtype == weight.dtype
    assert "lamp.cycle_step" not in state and "lamp.rng_state" not in state
    # The first parameter holds only the object-level keys; the generator state is a byte tensor.
    assert set(optimizer.state[first]) == {"lamp.cycle_step", "lamp.rng_state"}
    assert optimizer.state[first]["lamp.rng_state"].dtype == torch.uint8
    # The frozen parameter gets nothing; the inner optimizer sees no LAMP key.
    assert not optimizer.state.get(model[2].bias)
    assert not any(key.startswith("lamp.") for key in optimizer.inner.state[weight])


def test_bfloat16_run_resumes_bitwise_through_state_dict_with_a_bfloat16_running_mean():
    # torch's load_state_dict casts floating-point state to the parameter's dtype, so the running
    # mean is kept in bfloat16 from the start: a resumed run then continues bit for bit.
    x, y = make_data(torch.bfloat16)

    def build(model):
        return TransformingOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[LAMP(eps=1e-2, rollback_len=3, seed=0)]
        )

    model_a = make_model(torch.bfloat16)
    opt_a = build(model_a)
    closure_a = make_closure(model_a, opt_a, x, y)
    for _ in range(2):  # mid-cycle: the mean holds two iterates
        opt_a.step(closure_a)
    weight = model_a[0].weight
    assert "lamp.sum" not in opt_a.state[weight]
    assert opt_a.state[weight]["lamp.mean"].dtype == torch.bfloat16
    assert opt_a.state[weight]["lamp.count"] == 2 and opt_a.state[weight]["lamp.mean"].abs().sum() > 0
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": opt_a.state_dict()}, buffer)
    for _ in range(4):  # crosses the rollback at step 4
        opt_a.step(closure_a)

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model_b = make_model(torch.bfloat16, seed=3)
    model_b.load_state_dict(checkpoint["model"])
    opt_b = build(model_b)
    opt_b.load_state_dict(checkpoint["optimizer"])
    loaded = opt_b.state[model_b[0].weight]["lamp.mean"]
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded, checkpoint["optimizer"]["state"][1]["lamp.mean"])
    closure_b = make_closure(model_b, opt_b, x, y)
    for _ in range(4):
        opt_b.step(closure_b)
    assert all(p.dtype == torch.bfloat16 for p in model_b.parameters())
    assert_bitwise_equal(params_of(model_a), params_of(model_b))
    assert opt_b.state[model_b[0].weight]["lamp.mean"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "dtype,value,rollback_len",
    [(torch.float16, 700.0, 99), (torch.bfloat16, 1.2890625, 99), (torch.bfloat16, 1.2890625, 10)],
    ids=["float16-sum-beyond-65504", "bfloat16-long-cycle", "bfloat16-default-cycle"],
)
def test_16_bit_parameters_roll_back_to_the_mean_of_their_iterates(dtype, value, rollback_len):
    """With eps=0 and lr=0 every iterate is the weight itself, so the mean is the weight: a sum in
    float16 overflowed to inf (700 * 100 > 65504) and one in bfloat16 drifted by up to 4.8%."""
    param = nn.Parameter(torch.full((3,), value, dtype=dtype))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.0, transforms=[LAMP(eps=0.0, rollback_len=rollback_len)])
    for _ in range(rollback_len + 1):
        param.grad = torch.ones_like(param)
        optimizer.step()
    assert optimizer.state[param]["lamp.count"] == 0  # rolled back
    assert torch.equal(param.detach(), torch.full((3,), value, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_running_mean_starts_afresh_after_each_rollback(dtype):
    """The second cycle's mean owes nothing to the first's: after a cycle at 2**15 the iterates
    are 2**-14; a stale mean of 2**15 (float32's 2**-14 - 2**15 + 2**15 is 0) would roll back to 2**-15."""
    param = nn.Parameter(torch.full((3,), 2.0**15, dtype=dtype))
    lamp = LAMP(eps=0.0, rollback_len=1)
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.0, transforms=[lamp])
    for step in range(4):
        if step == 2:
            with torch.no_grad():
                param.fill_(2.0**-14)  # lr=0: every iterate of the second cycle is 2**-14
        param.grad = torch.ones_like(param)
        optimizer.step()
        if step == 1:
            assert torch.equal(param.detach(), torch.full((3,), 2.0**15, dtype=dtype))
    assert optimizer.state[param]["lamp.count"] == 0  # rolled back twice
    assert torch.equal(param.detach(), torch.full((3,), 2.0**-14, dtype=dtype))


class _RecordIterates(Transform):
    """A post-step transform placed before LAMP: records each iterate LAMP sums."""

    def __init__(self) -> None:
        self.iterates: list[torch.Tensor] = []

    def post_update(self, ctx) -> None:
        self.iterates.append(ctx.param_groups[0]["params"][0].detach().clone())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_running_mean_matches_a_float64_mean_of_the_iterates(dtype):
    """Iterates that differ (SGD moves the weights): the rollback gives the float64 mean of the
    iterates, within a few of the dtype's ulps at their size."""
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter((torch.randn(64, generator=generator) * 50).to(dtype))
    recorder = _RecordIterates()
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.5, transforms=[recorder, LAMP(eps=0.0, rollback_len=30)])
    for _ in range(31):
        param.grad = torch.randn(64, generator=generator).to(dtype)
        optimizer.step()
    assert optimizer.state[param]["lamp.count"] == 0 and len(recorder.iterates) == 31
    reference = torch.stack([iterate.double() for iterate in recorder.iterates]).mean(0)
    spacing = torch.finfo(dtype).eps * reference.abs().clamp_min(1.0)
    assert ((param.detach().double() - reference).abs() <= 4 * spacing).all()


@pytest.mark.parametrize("source,target", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_a_checkpoint_converts_between_a_sum_and_a_running_mean_with_the_parameters_dtype(source, target):
    """A float32 run's sum loads into a bfloat16 model as sum / count, a bfloat16 run's mean into a
    float32 model as mean * count; the rollback then gives the mean of every iterate."""
    param = nn.Parameter(torch.tensor([1.0, 2.0, 4.0], dtype=source))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.0, transforms=[LAMP(eps=0.0, rollback_len=3)])
    for _ in range(2):
        param.grad = torch.ones_like(param)
        optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    resumed = nn.Parameter(torch.tensor([1.0, 2.0, 4.0], dtype=target))
    twin = TransformingOptimizer([resumed], torch.optim.SGD, lr=0.0, transforms=[LAMP(eps=0.0, rollback_len=3)])
    twin.load_state_dict(saved)
    key, other = ("lamp.mean", "lamp.sum") if target == torch.bfloat16 else ("lamp.sum", "lamp.mean")
    assert other not in twin.state[resumed] and twin.state[resumed]["lamp.count"] == 2
    expected = torch.tensor([1.0, 2.0, 4.0]) * (1 if key == "lamp.mean" else 2)
    assert torch.equal(twin.state[resumed][key], expected.to(target))
    with torch.no_grad():
        resumed.copy_(torch.tensor([3.0, 4.0, 8.0]))  # two more iterates at other weights
    for _ in range(2):
        resumed.grad = torch.ones_like(resumed)
        twin.step()
    assert torch.equal(resumed.detach(), torch.tensor([2.0, 3.0, 6.0], dtype=target))


class _RecordAllIterates(Transform):
    """A post-step transform placed before LAMP: records every parameter's iterate, as float64."""

    def __init__(self) -> None:
        self.iterates: list[list[torch.Tensor]] = []

    def post_update(self, ctx) -> None:
        self.iterates.append([p.detach().to(torch.float64, copy=True) for g in ctx.param_groups for p in g["params"]])


class _RaiseOnce(Transform):
    """A post-step transform placed after LAMP: raises once when armed."""

    def __init__(self) -> None:
        self.armed = False

    def post_update(self, ctx) -> None:
        if self.armed:
            self.armed = False
            raise RuntimeError("injected")


def _dtype_converting_run(start, target, convert_before, fail_once=False):
    """SGD with ``LAMP(eps=0, rollback_len=3)`` on ``make_model(start)``, converted to ``target``
    (``model.to(target)``, which replaces ``param.data``) before step ``convert_before`` of the
    cycle's 4. ``fail_once``: the first step after the conversion raises in a post-step transform
    after LAMP's, and is retried. Returns the model, the optimizer and the recorded iterates."""
    x, y = make_data()
    model = make_model(start)
    recorder = _RecordAllIterates()
    failing = _RaiseOnce()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, transforms=[recorder, LAMP(eps=0.0, rollback_len=3), failing]
    )

    def closure():
        optimizer.zero_grad()
        dtype = model[0].weight.dtype
        loss = nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))
        loss.backward()
        return loss

    for step in range(4):
        if step == convert_before:
            model.to(target)
            if fail_once:
                before = {p: dict(optimizer.state[p]) for p in model.parameters() if p in optimizer.state}
                copies = {p: {k: v.clone() for k, v in e.items() if isinstance(v, torch.Tensor)} for p, e in before.items()}
                weights = params_of(model)
                failing.armed = True
                with pytest.raises(RuntimeError, match="injected"):
                    optimizer.step(closure)
                recorder.iterates.pop()  # the failed step's iterate: not one of the cycle
                assert_bitwise_equal(params_of(model), weights)
                for param, entry in before.items():  # the same keys and objects, with the same values
                    assert optimizer.state[param].keys() == entry.keys()
                    assert all(optimizer.state[param][key] is value for key, value in entry.items())
                    for key, value in copies[param].items():
                        assert value.dtype == entry[key].dtype and torch.equal(value, entry[key])
        optimizer.step(closure)
    assert len(recorder.iterates) == 4
    return model, optimizer, recorder.iterates


#: (start, target) dtypes of a model converted mid-cycle: sum -> mean, mean -> sum, sum -> sum and
#: mean -> mean in another dtype.
DTYPE_CONVERSIONS = [
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float64),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float64),
    (torch.float16, torch.bfloat16),
]


@pytest.mark.parametrize("convert_before", [1, 2, 3])
@pytest.mark.parametrize("start,target", DTYPE_CONVERSIONS, ids=lambda d: str(d).replace("torch.", ""))
def test_a_model_converted_mid_cycle_rolls_back_to_the_mean_of_the_cycles_iterates(start, target, convert_before):
    """``model.half()`` (``.bfloat16()``, ``.double()``, ...) mid-cycle: the rollback is the float64
    mean of the 4 iterates within the rounding of the accumulator before the conversion (its share
    ``k / 4`` of the iterates, ``k`` of them accumulated in ``start``) and of a few roundings in
    ``target``; one accumulator remains, the one ``target`` keeps, in ``target``. (A fresh zero
    accumulator was started beside the old one, with the old count: the iterates before the
    conversion were left out of a 16-bit mean, and a float32 sum stayed float32.)"""
    model, optimizer, iterates = _dtype_converting_run(start, target, convert_before)
    trainable = [i for i, p in enumerate(model.parameters()) if p.requires_grad and p is not model.unused]
    params = list(model.parameters())
    for i in trainable:
        stacked = torch.stack([iterate[i] for iterate in iterates])
        reference, size = stacked.mean(0), stacked.abs().amax(0)
        share = convert_before / len(iterates)
        tolerance = (2 * share * torch.finfo(start).eps + 4 * torch.finfo(target).eps) * size
        error = (params[i].detach().double() - reference).abs()
        assert params[i].dtype == target
        assert (error <= tolerance).all(), float((error - tolerance).max())
        entry = optimizer.state[params[i]]
        key = "lamp.mean" if target in (torch.float16, torch.bfloat16) else "lamp.sum"
        assert [k for k in entry if k in ("lamp.sum", "lamp.mean")] == [key]
        assert entry[key].dtype == target and entry["lamp.count"] == 0


@pytest.mark.parametrize("start,target", [(torch.float32, torch.float16), (torch.float16, torch.float64)])
def test_a_step_that_raises_after_the_conversion_leaves_the_old_accumulator(start, target):
    """The conversion replaces the accumulator, so a step that fails after it leaves the entry as it
    was (the optimizer puts the state's objects back); the retried step converts it again and the
    run ends as one that did not fail, bit for bit."""
    model, _, _ = _dtype_converting_run(start, target, 2, fail_once=True)
    twin, _, _ = _dtype_converting_run(start, target, 2)
    assert_bitwise_equal(params_of(model), params_of(twin))


def test_a_parameter_converted_mid_cycle_without_a_gradient_since_is_rolled_back_in_its_dtype():
    """Frozen right after its conversion to float64: the rollback converts its float32 sum of 2
    iterates to float64, and sets it to their mean (exact: dyadic iterates)."""
    first = nn.Parameter(torch.tensor([1.0, -2.0, 0.375]))
    second = nn.Parameter(torch.tensor([0.5, 0.25, 3.0]))
    optimizer = TransformingOptimizer([first, second], torch.optim.SGD, lr=0.5, transforms=[LAMP(eps=0.0, rollback_len=3)])
    iterates = []
    for step in range(4):
        if step == 2:
            first.data = first.data.double()
            first.requires_grad_(False)
        for param in (first, second):
            param.grad = torch.full_like(param, 0.625) if param.requires_grad else None
        optimizer.step()
        if step < 2:
            iterates.append(first.detach().double())
    assert first.dtype == torch.float64 and torch.equal(first.detach(), (iterates[0] + iterates[1]) / 2)
    assert optimizer.state[first]["lamp.sum"].dtype == torch.float64 and "lamp.mean" not in optimizer.state[first]


def test_standalone_in_the_seed_readme_loop_rolls_back_to_the_mean():
    # The seed README's loop: backward, apply, step, zero_grad, post_step. zero_grad() between
    # step() and post_step() must not hide which parameters took part in the step.
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lamp = LAMPRollback(eps=0.0, rollback_len=1)  # mean of 2 plain iterates
    iterates = []

    def loss_fn(inputs):
        return model(inputs).square().mean()

    for _ in range(2):
        batch = (torch.randn(4, 2),)
        loss_fn(*batch).backward()
        lamp.apply(model, loss_fn, batch)
        optimizer.step()
        optimizer.zero_grad()
        iterates.append(model.weight.detach().clone())
        lamp.post_step(model)
    assert not torch.equal(iterates[0], iterates[1])
    torch.testing.assert_close(model.weight.detach(), (iterates[0] + iterates[1]) / 2)


def test_cycle_and_generator_move_on_when_the_parameter_holding_them_is_frozen():
    torch.manual_seed(0)
    first, second = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    optimizer = TransformingOptimizer([first, second], torch.optim.SGD, lr=0.1, transforms=[LAMP(eps=1e-2, rollback_len=3, seed=0)])

    def step():
        for param in (first, second):
            param.grad = torch.ones(4) if param.requires_grad else None
        optimizer.step()

    step()
    step()
    rng_before = optimizer.state[first]["lamp.rng_state"].clone()
    first.requires_grad_(False)
    step()
    assert "lamp.cycle_step" not in optimizer.state[first]
    assert optimizer.state[second]["lamp.cycle_step"] == 3  # the cycle went on
    assert not torch.equal(optimizer.state[second]["lamp.rng_state"], rng_before)  # drawn from, not re-seeded
    fresh = torch.Generator().manual_seed(0).get_state()
    assert not torch.equal(optimizer.state[second]["lamp.rng_state"], fresh)


def test_no_parameter_requiring_grad_is_a_no_op():
    frozen = nn.Parameter(torch.randn(3), requires_grad=False)
    optimizer = TransformingOptimizer([frozen], torch.optim.SGD, lr=0.1, transforms=[LAMP(seed=0)])
    before = frozen.detach().clone()
    optimizer.step()
    assert torch.equal(frozen, before)


@pytest.mark.parametrize("seed", [2**64, 2**70, -(2**63) - 1])
def test_a_seed_torch_generators_do_not_take_is_refused_at_construction(seed):
    with pytest.raises(ValueError, match=rf"^seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\], got {seed}$"):
        LAMP(seed=seed)


@pytest.mark.parametrize("negative", [-1, -(2**63)])
def test_a_negative_seed_counts_modulo_2_to_the_64_as_in_torch(negative):
    assert torch.Generator().manual_seed(negative).initial_seed() == negative + 2**64
    assert_bitwise_equal(
        weights_after_lamp_steps(negative, rollback_len=2, steps=2),
        weights_after_lamp_steps(negative + 2**64, rollback_len=2, steps=2),
    )


def test_a_parameter_frozen_mid_cycle_is_rolled_back_to_the_mean_of_its_iterates():
    """Documented: the rollback sets every parameter summed during the cycle to its mean, also one
    without a gradient at the rollback step (its last iterate is a noisy one)."""
    first = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    second = nn.Parameter(torch.tensor([0.5, 0.25], dtype=torch.float64))
    optimizer = TransformingOptimizer([first, second], torch.optim.SGD, lr=0.1, transforms=[LAMP(eps=0.0, rollback_len=3)])
    start = first.detach().clone()
    for step in range(4):  # the 4th step ends the cycle
        if step == 2:
            first.requires_grad_(False)
        for param in (first, second):
            param.grad = torch.ones_like(param) if param.requires_grad else None
        optimizer.step()
        if step == 2:
            assert torch.equal(first.detach(), start - 0.2)  # left alone while frozen
    torch.testing.assert_close(first.detach(), ((start - 0.1) + (start - 0.2)) / 2, rtol=0, atol=1e-15)
    assert optimizer.state[first]["lamp.count"] == 0


def test_a_float32_sum_beyond_float16_loads_into_a_float16_model_as_its_mean():
    """A float32 run's sum of 100 iterates of 700 (70000) is beyond float16: it is turned into the
    mean before torch's load casts it, and the rollback gives 700, not NaN."""
    param = nn.Parameter(torch.full((3,), 700.0))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.0, transforms=[LAMP(eps=0.0, rollback_len=100)])
    for _ in range(100):
        param.grad = torch.ones_like(param)
        optimizer.step()
    saved = optimizer.state_dict()
    assert float(saved["state"][0]["lamp.sum"][0]) == 70000.0
    untouched = copy.deepcopy(saved)
    half = nn.Parameter(torch.full((3,), 700.0, dtype=torch.float16))
    resumed = TransformingOptimizer([half], torch.optim.SGD, lr=0.0, transforms=[LAMP(eps=0.0, rollback_len=100)])
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.state[half]["lamp.mean"], torch.full((3,), 700.0, dtype=torch.float16))
    assert torch.equal(saved["state"][0]["lamp.sum"], untouched["state"][0]["lamp.sum"])  # the caller's dict
    half.grad = torch.ones_like(half)
    resumed.step()  # the rollback
    assert resumed.state[half]["lamp.count"] == 0
    assert torch.equal(half.detach(), torch.full((3,), 700.0, dtype=torch.float16))


def _lamp_at_700(dtype, params=None):
    params = params if params is not None else [nn.Parameter(torch.full((3,), 700.0, dtype=dtype))]
    return params, TransformingOptimizer(params, torch.optim.SGD, lr=0.0, transforms=[LAMP(eps=0.0, rollback_len=100)])


def _step_n(params, optimizer, steps):
    for _ in range(steps):
        for param in params:
            param.grad = torch.ones_like(param)
        optimizer.step()


def test_the_sum_is_converted_after_the_users_load_pre_hooks_remap_the_checkpoint():
    """torch's documented way to adapt a checkpoint is a load_state_dict pre-hook; the conversion
    runs after it, on the parameter the entry then belongs to."""
    a, b = nn.Parameter(torch.full((3,), 700.0)), nn.Parameter(torch.ones(2))
    _, optimizer = _lamp_at_700(None, [a, b])
    _step_n([a, b], optimizer, 100)
    saved = optimizer.state_dict()
    half, other = nn.Parameter(torch.full((3,), 700.0, dtype=torch.float16)), nn.Parameter(torch.ones(2))
    _, resumed = _lamp_at_700(None, [other, half])

    def reverse(_optimizer, state_dict):  # the checkpoint lists [a, b], this optimizer [b, a]
        group = dict(state_dict["param_groups"][0])
        group["params"] = group["params"][::-1]
        return {**state_dict, "param_groups": [group]}

    resumed.register_load_state_dict_pre_hook(reverse)
    resumed.load_state_dict(copy.deepcopy(saved))
    assert torch.equal(resumed.state[half]["lamp.mean"], torch.full((3,), 700.0, dtype=torch.float16))


def test_the_sum_is_converted_when_a_meta_optimizer_loads_its_outer_optimizers_checkpoint():
    from samgria import FOMAML

    def build(dtype):
        model = nn.Linear(3, 1).to(dtype)
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(700.0)
        _, outer = _lamp_at_700(None, list(model.parameters()))
        return model, outer, FOMAML(model, outer, inner_lr=0.0)

    model, outer, meta = build(torch.float32)
    _step_n(list(model.parameters()), outer, 100)
    saved = meta.state_dict()
    model16, outer16, meta16 = build(torch.float16)
    meta16.load_state_dict(copy.deepcopy(saved))
    assert torch.equal(outer16.state[model16.weight]["lamp.mean"], torch.full((1, 3), 700.0, dtype=torch.float16))
    _step_n(list(model16.parameters()), outer16, 1)  # the rollback
    assert torch.equal(model16.weight.detach(), torch.full((1, 3), 700.0, dtype=torch.float16))


def test_set_optimizer_state_dict_with_a_full_state_dict_converts_the_sum():
    """torch.distributed.checkpoint merges the checkpoint into the state a fresh optimizer creates,
    which holds this dtype's key too: the checkpoint's sum wins, as its mean."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

    model = nn.Linear(3, 1)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(700.0)
    _, optimizer = _lamp_at_700(None, list(model.parameters()))
    _step_n(list(model.parameters()), optimizer, 100)
    options = StateDictOptions(full_state_dict=True)
    saved = get_optimizer_state_dict(model, optimizer, options=options)
    model16 = nn.Linear(3, 1).half()
    _, resumed = _lamp_at_700(None, list(model16.parameters()))
    set_optimizer_state_dict(model16, resumed, copy.deepcopy(saved), options=options)
    assert torch.equal(resumed.state[model16.weight]["lamp.mean"], torch.full((1, 3), 700.0, dtype=torch.float16))
    assert "lamp.sum" not in resumed.state[model16.weight]


@pytest.mark.parametrize("seed", [None, 3])
def test_a_step_without_any_gradient_is_no_step_of_the_cycle(seed):
    """``step()`` when no parameter has a gradient moves no weight: LAMP neither perturbs, sums nor
    counts it, so the rollback comes after ``rollback_len + 1`` real steps, as in a run without
    that call (it advanced the cycle, and the rollback came a step early)."""
    x, y = make_data()
    runs = []
    for with_empty_step in (False, True):
        model = make_model()
        optimizer = TransformingOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.1, transforms=[LAMP(eps=1e-2, rollback_len=2, seed=seed)]
        )
        for index in range(5):
            if with_empty_step and index == 1:
                optimizer.zero_grad(set_to_none=True)
                optimizer.step()
            optimizer.step(make_closure(model, optimizer, x, y))
        runs.append((params_of(model), optimizer.state_dict()["state"]))
    assert_bitwise_equal(runs[0][0], runs[1][0])
    first, second = runs[0][1], runs[1][1]
    assert first.keys() == second.keys()
    for index in first:
        assert first[index].keys() == second[index].keys()
        for key, value in first[index].items():
            assert torch.equal(value, second[index][key]) if isinstance(value, torch.Tensor) else value == second[index][key]


# -- LAMP without a seed under torch.distributed: each rank's own default generator -------------

#: What LAMP(seed=None) says on 2 ranks when it perturbs parameters replicated across ranks.
UNSEEDED_WARNING = (
    "LAMP: seed=None in a process group of 2 ranks: each rank draws the noise from its own default "
    "generator, so replicas of a parameter (DistributedDataParallel, HSDP) stay identical only while "
    "every rank's generator is in the same state; pass seed= (the same on every rank) to make the "
    "noise identical (parameters no other rank holds a copy of, as in pipeline parallelism, need no "
    "seed: a plain tensor cannot say)"
)
#: Steps of each multi-process run: the warning comes once over all of them.
WARNING_STEPS = 4


def _lamp_warnings(model: nn.Module, lamp: LAMP, steps: int = WARNING_STEPS) -> list[list[str]]:
    """Train ``model`` with SGD and ``lamp``; return LAMP's warnings as (message, category, file)."""
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.05, transforms=[lamp])
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=generator), torch.randn(8, 2, generator=generator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()  # the line the warning points at
    return [
        [str(w.message), w.category.__name__, Path(w.filename).name] for w in caught if str(w.message).startswith("LAMP")
    ]


def _small_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _replica_difference(model: nn.Module) -> float:
    """The largest difference between rank 0's and rank 1's local weights (``all_gather_object``)."""
    import torch.distributed as dist

    local = [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in model.parameters()]
    both: list = [None] * dist.get_world_size()
    dist.all_gather_object(both, local)
    return max(float((a - b).abs().max()) for a, b in zip(both[0], both[1]))


def _unseeded_worker() -> None:
    """One of 2 ranks: unseeded and seeded LAMP under DDP, FSDP2 and a 2x1 HSDP mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results: dict[str, dict] = {}
    for name, lamp in (
        ("ddp_unseeded", LAMP(eps=1e-2, rollback_len=10)),
        ("ddp_seeded", LAMP(eps=1e-2, rollback_len=10, seed=0)),
        ("ddp_no_noise", LAMP(eps=0.0, rollback_len=10)),
    ):
        model = DistributedDataParallel(_small_model())
        torch.manual_seed(100 + rank)  # a per-rank stream (data augmentation, dropout)
        results[name] = {"warnings": _lamp_warnings(model, lamp), "replica_difference": _replica_difference(model)}
    for name, mesh in (
        ("fsdp2_unseeded", init_device_mesh("cpu", (2,))),
        ("hsdp_unseeded", init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))),
    ):
        model = _small_model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        torch.manual_seed(100 + rank)
        results[name] = {"warnings": _lamp_warnings(model, LAMP(eps=1e-2, rollback_len=10))}
        if name == "hsdp_unseeded":  # both ranks hold the whole (one) shard: replicas
            results[name]["replica_difference"] = _replica_difference(model)
    print("RESULT " + json.dumps(results), flush=True)
    # Free the reference cycles (DDP/FSDP modules, optimizers) that hold the process group while
    # it is alive: destroyed at interpreter exit instead, gloo's threads can abort a rank that
    # has finished (as test_optim_fsdp.py's worker does).
    model = mesh = None
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


@pytest.fixture(scope="module")
def unseeded_ranks() -> list[dict]:
    skip_without_gloo()
    outputs = run_ranks(__file__, 2, ["--unseeded-worker"])
    results = []
    for output in outputs:
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, output
        results.append(json.loads(lines[0][len("RESULT "):]))
    return results


def test_unseeded_lamp_under_ddp_warns_once_per_rank_when_the_replicas_can_draw_apart(unseeded_ranks):
    """Ranks seeded 100 + rank: the DDP replicas drift apart, and each rank is told so once over
    all the steps, at the user's ``optimizer.step()`` line."""
    for rank_results in unseeded_ranks:
        got = rank_results["ddp_unseeded"]
        assert got["warnings"] == [[UNSEEDED_WARNING, "RuntimeWarning", "test_transforms_lamp.py"]]
        assert got["replica_difference"] > 0.0  # what the warning is about


def test_seeded_lamp_under_ddp_does_not_warn_and_the_replicas_stay_identical(unseeded_ranks):
    for rank_results in unseeded_ranks:
        assert rank_results["ddp_seeded"] == {"warnings": [], "replica_difference": 0.0}


def test_unseeded_lamp_without_noise_does_not_warn(unseeded_ranks):
    """eps=0 draws nothing: no noise, no warning (the replicas stay identical)."""
    for rank_results in unseeded_ranks:
        assert rank_results["ddp_no_noise"] == {"warnings": [], "replica_difference": 0.0}


def test_unseeded_lamp_on_fsdp2_shards_does_not_warn(unseeded_ranks):
    """Each rank holds other shards: per-rank noise is by design."""
    for rank_results in unseeded_ranks:
        assert rank_results["fsdp2_unseeded"]["warnings"] == []


def test_unseeded_lamp_on_hsdp_replicas_warns_once_per_rank(unseeded_ranks):
    """A 2x1 mesh replicates the one shard over 2 ranks: they drift apart as DDP's replicas do."""
    for rank_results in unseeded_ranks:
        got = rank_results["hsdp_unseeded"]
        assert got["warnings"] == [[UNSEEDED_WARNING, "RuntimeWarning", "test_transforms_lamp.py"]]
        assert got["replica_difference"] > 0.0


def test_the_unseeded_warning_says_why_and_what_to_do(unseeded_ranks):
    message = unseeded_ranks[0]["ddp_unseeded"]["warnings"][0][0]
    assert "each rank draws the noise from its own default generator" in message
    assert "stay identical only while every rank's generator is in the same state" in message
    assert "pass seed= (the same on every rank) to make the noise identical" in message


@pytest.mark.parametrize("one_rank_group", [False, True], ids=["no_group", "one_rank_group"])
def test_unseeded_lamp_in_one_process_does_not_warn(one_rank_group):
    import torch.distributed as dist

    if one_rank_group:
        skip_without_gloo()
        if dist.is_initialized():
            pytest.skip("a process group is already initialised in this process")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert _lamp_warnings(_small_model(), LAMP(eps=1e-2, rollback_len=2)) == []
    finally:
        if one_rank_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--unseeded-worker"]:
        _unseeded_worker()
