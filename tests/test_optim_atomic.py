"""Atomic steps, the non-finite policy, 16-bit safety and hyperparameter checks (fault injection).

Every "nothing changed" check compares the weights and every entry of ``optimizer.state`` (inner
optimizer and transform slots, tensors and plain values alike) bit for bit against a deepcopy
taken before the step, and then checks that the next normal step equals that of an untouched
twin optimizer.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import fractions
import math
import re
import warnings

import numpy
import pytest
import torch
from torch import nn

import samgria.optim as optim_module
import samgria.transforms.lamp as lamp_module
from samgria import (
    ASAM,
    LAMP,
    LookSAM,
    MultiStepSAM,
    SAM,
    ClampGrad,
    ClipGradNorm,
    FriendlySAM,
    NormalizeGrad,
    ScaleGrad,
    Transform,
    TransformingOptimizer,
)
from samgria.transforms import ParamTransform
from state_helpers import assert_states_equal, groups_without_params, state_by_index
from transform_infos import assert_bitwise_equal
from transform_infos import make_closure as closure_on


# -- helpers ----------------------------------------------------------------------------------------
class Injected(Exception):
    """The failure this file injects."""


class RaisingPre(Transform):
    """Raises in ``pre_update`` when armed, after changing nothing."""

    def __init__(self) -> None:
        self.armed = False

    def pre_update(self, ctx) -> None:
        if self.armed:
            raise Injected("pre-step transform failed")


class RaisingPost(Transform):
    """Raises in ``post_update`` when armed (after every earlier post-step transform ran)."""

    def __init__(self) -> None:
        self.armed = False

    def post_update(self, ctx) -> None:
        if self.armed:
            raise Injected("post-step transform failed")


class ShrinkingHook(ParamTransform):
    """A pre-step hook that writes the weights (a decay applied before the inner step), as
    ParamTransform allows; they stay changed, so the optimizer must copy them to undo a step."""

    def pre_step_transform_(self, param, group) -> None:
        param.mul_(0.99)


def failing(base):
    """``base`` whose step does the real update and then raises when ``fail`` is set."""

    class FailingAfterUpdate(base):
        fail = False

        @torch.no_grad()
        def step(self, closure=None):
            loss = super().step(closure)
            if self.fail:
                raise Injected("inner step failed after updating")
            return loss

    FailingAfterUpdate.__name__ = f"Failing{base.__name__}"
    return FailingAfterUpdate


FailingSGD, FailingAdam = failing(torch.optim.SGD), failing(torch.optim.Adam)


class MidwaySGD(torch.optim.Optimizer):
    """SGD with momentum written out, with plain-number counters in the state and in the groups
    (as timm's and pytorch-optimizer's optimizers keep them); raises midway when told."""

    def __init__(self, params, lr=0.05, momentum=0.9):
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self.fail_at = None

    @torch.no_grad()
    def step(self, closure=None):
        index = 0
        for group in self.param_groups:
            group["steps_taken"] = group.get("steps_taken", 0) + 1
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = param.grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(param.grad)
                state["updates"] = state.get("updates", 0) + 1
                param.add_(state["momentum_buffer"], alpha=-group["lr"])
                if self.fail_at is not None and index == self.fail_at:
                    raise Injected("inner step failed midway through the parameters")
                index += 1


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)


X = torch.randn(12, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
Y = torch.randn(12, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def loss_of(model):
    return nn.functional.mse_loss(model(X), Y)


def make_closure(model, optimizer, on_call=None):
    """A closure; ``on_call(n)`` runs after the n-th call's backward (n counts from 1)."""
    calls = [0]

    def closure():
        calls[0] += 1
        optimizer.zero_grad()
        loss = loss_of(model)
        loss.backward()
        if on_call is not None:
            on_call(calls[0])
        return loss

    return closure


CHAINS = {
    "sam": lambda: [SAM(0.05)],
    # rollback_len=2: the third step (the faulty one after two warm-up steps) is a rollback.
    "sam+lamp": lambda: [SAM(0.05), LAMP(1e-2, rollback_len=2, seed=0)],
    "lamp": lambda: [LAMP(1e-2, rollback_len=2, seed=0)],
    "weight-hook+sam": lambda: [ShrinkingHook(param_ndim=None), SAM(0.05)],
}
INNERS = {
    "sgd": (FailingSGD, {"lr": 0.05, "momentum": 0.9}),
    "adam": (FailingAdam, {"lr": 1e-2}),
    "midway": (MidwaySGD, {"lr": 0.05, "momentum": 0.9}),
}


def build(model, chain, inner="sgd", **options):
    cls, kwargs = INNERS[inner]
    transforms = CHAINS[chain]() + [RaisingPre(), RaisingPost()]
    return TransformingOptimizer(model.parameters(), cls, transforms=transforms, **kwargs, **options)


class Before:
    """Deepcopies of everything a step may change."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.weights = [p.detach().clone() for p in model.parameters()]
        self.state = copy.deepcopy(state_by_index(optimizer))
        self.groups = copy.deepcopy(groups_without_params(optimizer))
        self.skipped = optimizer.skipped_steps

    def assert_unchanged(self):
        for before, param in zip(self.weights, self.model.parameters()):
            assert torch.equal(before, param)
        assert_states_equal(state_by_index(self.optimizer), self.state)
        assert groups_without_params(self.optimizer) == self.groups
        assert self.optimizer.param_groups is self.optimizer.inner.param_groups


def assert_runs_equal(model_a, opt_a, model_b, opt_b):
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    assert_states_equal(state_by_index(opt_a), state_by_index(opt_b))


def make_twins(chain, inner, warmup):
    runs = []
    for _ in range(2):
        model = make_model()
        optimizer = build(model, chain, inner)
        closure = make_closure(model, optimizer)
        for _ in range(warmup):
            optimizer.step(closure)
        runs.append((model, optimizer))
    return runs


def step_both_normally(run, twin, steps=2):
    for _ in range(steps):
        for model, optimizer in (run, twin):
            optimizer.step(make_closure(model, optimizer))
        assert_runs_equal(*run, *twin)


def step_in(loop, model, optimizer):
    """One step of ``loop``: ``step(closure)``, ``step()`` after a backward (``"no-closure"``), or
    ``first_step()``/``second_step()`` after backwards."""
    if loop == "closure":
        optimizer.step(make_closure(model, optimizer))
    elif loop == "no-closure":
        make_closure(model, optimizer)()
        optimizer.step()
    else:
        make_closure(model, optimizer)()
        optimizer.first_step()
        make_closure(model, optimizer)()
        optimizer.second_step()


def raise_on_call(bad_call):
    def on_call(n):
        if n == bad_call:
            raise Injected(f"closure failed on call {n}")

    return on_call


def out_of_memory(*args, **kwargs):
    raise MemoryError("injected")


def partly(kernel):
    """``kernel`` (a list kernel of samgria.functional) done for the first tensor only, then OOM."""

    def run(*lists, **kwargs):
        kernel(*[items[:1] for items in lists], **kwargs)
        raise MemoryError("injected after the first tensor")

    return run


def poison(model, value):
    next(iter(model.parameters())).grad.view(-1)[0] = value


# -- atomic steps: a failure anywhere leaves everything as it was ------------------------------------------
FAULTS = [
    "closure-first-pass",
    "closure-second-pass",
    "pre-step-transform",
    "inner-after-update",
    "inner-midway",
    "post-step-transform",
    "lamp-noise-memory-error",
    "lamp-accumulate-memory-error",
    "lamp-rollback-memory-error",
]


@pytest.mark.parametrize("warmup", [0, 2])
@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize("chain", sorted(CHAINS))
@pytest.mark.parametrize("fault", FAULTS)
def test_a_step_that_raises_changes_nothing(fault, chain, inner, warmup, monkeypatch):
    if fault == "closure-second-pass" and "sam" not in chain:
        pytest.skip("only SAM re-evaluates the closure")
    if fault.startswith("lamp") and "lamp" not in chain:
        pytest.skip("no LAMP in the chain")
    if fault == "lamp-rollback-memory-error" and warmup == 0:
        pytest.skip("the first step does not roll back")
    if fault == "inner-midway":
        if inner == "adam":
            pytest.skip("the midway failure has one inner optimizer")
        inner = "midway"
    (model, optimizer), twin = make_twins(chain, inner, warmup)
    before = Before(model, optimizer)

    on_call = None
    expected = Injected
    if fault == "closure-first-pass":
        on_call = raise_on_call(1)
    elif fault == "closure-second-pass":
        on_call = raise_on_call(2)
    elif fault == "pre-step-transform":
        optimizer.transforms[-2].armed = True
    elif fault == "inner-after-update":
        optimizer.inner.fail = True
    elif fault == "inner-midway":
        optimizer.inner.fail_at = 1
    elif fault == "post-step-transform":
        optimizer.transforms[-1].armed = True
    else:
        # magnitude_noise: before LAMP changed anything; accumulate_: after it added the noise
        # to the weights, counted the iterate and advanced its generator, and after summing the
        # first parameter; assign_mean_ (the rollback at the third step): after setting the first
        # parameter to its mean and zeroing its sum.
        name = {"noise": "magnitude_noise", "accumulate": "accumulate_", "rollback": "assign_mean_"}[fault.split("-")[1]]
        monkeypatch.setattr(lamp_module, name, out_of_memory if name == "magnitude_noise" else partly(getattr(lamp_module, name)))
        expected = MemoryError

    closure = make_closure(model, optimizer, on_call)
    with pytest.raises(expected):
        optimizer.step(closure)
    before.assert_unchanged()

    # Disarm and compare the next normal steps with the twin's.
    monkeypatch.undo()
    for transform in optimizer.transforms[-2:]:
        transform.armed = False
    optimizer.inner.fail = False
    optimizer.inner.fail_at = None
    step_both_normally((model, optimizer), twin)


@pytest.mark.parametrize("chain", ["sam", "sam+lamp"])
@pytest.mark.parametrize("fault", ["inner-after-update", "post-step-transform", "lamp-accumulate-memory-error"])
def test_a_second_step_that_raises_changes_nothing(fault, chain, monkeypatch):
    if fault.startswith("lamp") and "lamp" not in chain:
        pytest.skip("no LAMP in the chain")
    (model, optimizer), twin = make_twins(chain, "sgd", warmup=2)
    before = Before(model, optimizer)
    expected = Injected
    if fault == "inner-after-update":
        optimizer.inner.fail = True
    elif fault == "post-step-transform":
        optimizer.transforms[-1].armed = True
    else:
        monkeypatch.setattr(lamp_module, "accumulate_", partly(lamp_module.accumulate_))
        expected = MemoryError

    optimizer.zero_grad()
    loss_of(model).backward()
    optimizer.first_step()
    loss_of(model).backward()
    with pytest.raises(expected):
        optimizer.second_step()
    before.assert_unchanged()

    monkeypatch.undo()
    optimizer.inner.fail = False
    optimizer.transforms[-1].armed = False
    step_both_normally((model, optimizer), twin)


# -- non-finite gradients ---------------------------------------------------------------------------------------
def non_finite_step(model, optimizer, mode, where, value):
    """One step whose ``where`` ("first"/"second") pass has a non-finite gradient."""
    bad_call = 1 if where == "first" else 2
    if mode == "closure":
        closure = make_closure(model, optimizer, lambda n: poison(model, value) if n == bad_call else None)
        return optimizer.step(closure)
    if mode == "no-closure":  # the plain loop, for chains that do not re-evaluate
        optimizer.zero_grad()
        loss_of(model).backward()
        poison(model, value)
        return optimizer.step()
    optimizer.zero_grad()
    loss_of(model).backward()
    if bad_call == 1:
        poison(model, value)
    optimizer.first_step()
    loss_of(model).backward()
    if bad_call == 2:
        poison(model, value)
    return optimizer.second_step()


NON_FINITE_CASES = [
    (chain, mode, where)
    for chain in sorted(CHAINS)
    for mode in ("closure", "two-call", "no-closure")
    for where in ("first", "second")
    if not (where == "second" and "sam" not in chain)
    if not (mode == "two-call" and "sam" not in chain)
    if not (mode == "no-closure" and ("sam" in chain or where == "second"))
]


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("chain,mode,where", NON_FINITE_CASES)
def test_non_finite_gradients_skip_the_step_whole(chain, mode, where, value):
    (model, optimizer), twin = make_twins(chain, "sgd", warmup=2)
    before = Before(model, optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        non_finite_step(model, optimizer, mode, where, value)
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    assert "skipped" in str(runtime[0].message)
    assert optimizer.skipped_steps == before.skipped + 1
    before.assert_unchanged()
    step_both_normally((model, optimizer), twin)
    assert twin[1].skipped_steps == 0


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("chain,mode,where", NON_FINITE_CASES)
def test_non_finite_raise_policy_raises_and_changes_nothing(chain, mode, where, value):
    runs = []
    for _ in range(2):
        model = make_model()
        optimizer = build(model, chain, "sgd", non_finite="raise")
        for _ in range(2):
            optimizer.step(make_closure(model, optimizer))
        runs.append((model, optimizer))
    (model, optimizer), twin = runs
    before = Before(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no warning on top of the exception
        with pytest.raises(FloatingPointError):
            non_finite_step(model, optimizer, mode, where, value)
    assert optimizer.skipped_steps == 0
    before.assert_unchanged()
    step_both_normally((model, optimizer), twin)


_OVERFLOW_LR = 1e-202


def _step_on_gradients_whose_norm_overflows(transforms, mode, prepare=None):
    """One step (``mode``: "closure", "two-call" or "no-closure") of plain SGD (lr ``_OVERFLOW_LR``)
    wrapped with ``transforms`` on one float64 weight of four zeros whose gradients are 1e308:
    finite, although their norm, 2e308, is beyond float64's range. ``prepare(optimizer)`` runs
    before the step. Returns the optimizer, the weight and the messages of the warnings."""
    weight = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    optimizer = TransformingOptimizer([weight], torch.optim.SGD, lr=_OVERFLOW_LR, transforms=transforms)
    if prepare is not None:
        prepare(optimizer)

    def backward():
        optimizer.zero_grad()
        loss = (weight * 1e308).sum()
        loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mode == "closure":
            optimizer.step(backward)
        elif mode == "two-call":
            backward()
            optimizer.first_step()
            backward()
            optimizer.second_step()
        else:
            backward()
            optimizer.step()
    return optimizer, weight, [str(w.message) for w in caught]


def _sgd_update_of_gradients_whose_norm_overflows():
    """Plain SGD's update of :func:`_step_on_gradients_whose_norm_overflows`'s weight."""
    return torch.zeros(4, dtype=torch.float64).add_(torch.full((4,), 1e308, dtype=torch.float64), alpha=-_OVERFLOW_LR)


@pytest.mark.parametrize("mode", ["closure", "two-call", "no-closure"])
def test_finite_gradients_whose_norm_overflows_are_not_a_non_finite_step(mode):
    """The policy looks at the gradients, not at their norm: four float64 gradients of 1e308 are
    finite although their norm, 2e308, is beyond float64's range. SAM cannot scale by an infinite
    norm: it warns and skips the perturbation, and the inner optimizer steps with the unperturbed
    gradients."""
    transforms = [] if mode == "no-closure" else [SAM(0.1)]
    optimizer, weight, messages = _step_on_gradients_whose_norm_overflows(transforms, mode)
    if transforms:  # SAM's warning, once; no warning of the non-finite policy
        assert len(messages) == 1 and messages[0].startswith("SAM: the gradient norm is inf;"), messages
    else:
        assert messages == []
    assert optimizer.skipped_steps == 0
    assert torch.equal(weight.detach(), _sgd_update_of_gradients_whose_norm_overflows())  # plain SGD's update


def test_float32_gradients_whose_squares_overflow_float32_get_their_true_norm():
    """Gradients of 1e20 in float32: the norm, 2e20, is taken again in float64, so SAM perturbs by
    rho along them (no warning) and ClipGradNorm clips them to norm 1 (torch's clip_grad_norm_,
    whose float32 norm overflows, zeroes them)."""
    weight = nn.Parameter(torch.zeros(4))
    seen = []

    def closure():
        optimizer.zero_grad()
        seen.append(weight.detach().clone())
        loss = (weight * 1e20).sum()
        loss.backward()
        return loss

    optimizer = TransformingOptimizer([weight], torch.optim.SGD, lr=1e-22, transforms=[SAM(0.1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step(closure)
    assert torch.equal(seen[1], torch.full((4,), 0.05))  # w + rho g / |g| = 0.1 * 1e20 / 2e20

    clipped = nn.Parameter(torch.ones(4))
    clipping = TransformingOptimizer([clipped], torch.optim.SGD, lr=0.1, transforms=[ClipGradNorm(1.0)])
    (clipped * 1e20).sum().backward()
    clipping.step()
    assert torch.equal(clipped.grad, torch.full((4,), 0.5))


def test_normalize_grad_gives_unit_norm_to_finite_gradients_whose_norm_overflows_float64():
    """Four of 1e308 (a norm of 2e308, beyond float64's range): the norm is taken again scaled by
    the largest element, so the gradients get unit norm, g / ||g|| = 0.5 each (they were scaled to
    zero, as ClipGradNorm does below, which the true norm does not call for)."""
    dt = torch.float64
    weight = nn.Parameter(torch.ones(4, dtype=dt))
    optimizer = TransformingOptimizer([weight], torch.optim.SGD, lr=0.1, weight_decay=0.5, transforms=[NormalizeGrad()])
    (weight * 1e308).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert optimizer.skipped_steps == 0
    assert torch.equal(weight.grad, torch.full((4,), 0.5, dtype=dt))
    assert torch.equal(weight.detach(), torch.full((4,), 1.0 - 0.1 * (0.5 + 0.5), dtype=dt))


def test_clip_grad_norm_scales_finite_gradients_with_an_overflowing_norm_to_zero():
    """As torch.nn.utils.clip_grad_norm_ does (the step is not skipped: the gradients are finite)."""
    dt = torch.float64  # four of 1e308: a norm of 2e308, beyond float64's range
    weight = nn.Parameter(torch.ones(4, dtype=dt))
    optimizer = TransformingOptimizer([weight], torch.optim.SGD, lr=0.1, weight_decay=0.5, transforms=[ClipGradNorm(1.0)])
    reference = nn.Parameter(torch.ones(4, dtype=dt))
    reference.grad = torch.full((4,), 1e308, dtype=dt)
    torch.nn.utils.clip_grad_norm_([reference], 1.0)
    assert torch.equal(reference.grad, torch.zeros(4, dtype=dt))
    optimizer.zero_grad()
    (weight * 1e308).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert optimizer.skipped_steps == 0
    assert torch.equal(weight.grad, torch.zeros(4, dtype=dt))
    assert torch.equal(weight.detach(), torch.ones(4, dtype=dt).mul_(1 - 0.1 * 0.5))  # weight decay alone


# -- 16-bit parameters --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [True, False])
def test_asam_in_float16_does_not_overflow_from_finite_weights_and_gradients(foreach):
    w = torch.tensor([300.0, -250.0, 200.0, 310.0], dtype=torch.float16)
    c = torch.tensor([300.0, 280.0, -290.0, 250.0])  # the gradient, exactly representable in fp16
    rho, eta = 0.5, 0.01
    assert float(((w.float().abs() + eta) ** 2 * c).abs().max()) > 65504  # T^2 * g overflows fp16
    param = nn.Parameter(w.clone())
    optimizer = TransformingOptimizer(
        [param], torch.optim.SGD, transforms=[ASAM(rho, eta=eta)], lr=1e-4, transform_foreach=foreach
    )
    seen = []

    def closure():
        optimizer.zero_grad()
        seen.append(param.detach().clone())
        loss = (param.float() * c).sum()  # gradient computed in fp32, stored in fp16
        loss.backward()
        return loss

    optimizer.step(closure)
    assert len(seen) == 2
    perturbed = seen[1]
    assert perturbed.dtype == torch.float16 and torch.isfinite(perturbed).all()
    # By hand, in float64: e = rho * T^2 g / ||T g||, T = |w| + eta.
    w64, g64 = w.double(), c.double()
    t = w64.abs() + eta
    expected = w64 + rho * t**2 * g64 / torch.linalg.vector_norm(t * g64)
    torch.testing.assert_close(perturbed.double(), expected, rtol=2e-3, atol=0)
    assert torch.equal(seen[0], w)
    assert torch.isfinite(param).all()
    torch.testing.assert_close(param.detach().double(), w64 - 1e-4 * g64, rtol=2e-3, atol=0)


def _asam_perturbed_weights(weights, grads, rho, foreach):
    """The weights ASAM(rho) moves ``weights`` to for gradient ``grads`` (no inner step)."""
    param = nn.Parameter(weights.clone())
    optimizer = TransformingOptimizer(
        [param], torch.optim.SGD, transforms=[ASAM(rho)], lr=0.1, transform_foreach=foreach
    )
    param.grad = grads.clone()
    optimizer.first_step()
    perturbed = param.detach().clone()
    optimizer.cancel_step()
    assert torch.equal(param.detach(), weights)
    return perturbed


def _asam_reference(weights, grads, rho, eta=0.01):
    """e = rho * T^2 g / ||T g||, T = |w| + eta, in float64 (no overflow for these inputs)."""
    w64, g64 = weights.double(), grads.double()
    t = w64.abs() + eta
    return w64 + rho * t * (t * g64) / torch.linalg.vector_norm(t * g64)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_asam_does_not_overflow_where_its_perturbation_is_finite(dtype, foreach):
    """T^2 * g was formed before the division by the norm: weights near 1e20 (T^2 near 1e40,
    beyond float32's range, in which bfloat16 parameters are perturbed) became infinite though
    the perturbation (1.5e20) is finite. Also a norm of T * g beyond float32's range (taken again
    in float64) divides correctly."""
    weights = torch.tensor([1e20, 1.0], dtype=dtype)
    grads = torch.tensor([1.0, 1.0], dtype=dtype)
    perturbed = _asam_perturbed_weights(weights, grads, 0.5, foreach)
    assert torch.isfinite(perturbed).all()
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # one rounding to the parameter's dtype
    torch.testing.assert_close(perturbed.double(), _asam_reference(weights, grads, 0.5), rtol=rtol, atol=0)
    # ||T g|| = sqrt(2) * 3e38 * 1.0, beyond float32's largest value: e = rho * T * (1/sqrt(2)).
    weights = torch.tensor([0.99, -0.99], dtype=torch.float32)
    grads = torch.tensor([3e38, 3e38], dtype=torch.float32)
    perturbed = _asam_perturbed_weights(weights, grads, 0.5, foreach)
    torch.testing.assert_close(perturbed.double(), _asam_reference(weights, grads, 0.5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("transform", ["sam", "asam-not-adaptive", "asam-mixed"])
def test_a_float32_gradient_norm_so_tiny_that_rho_over_it_overflows_float32_perturbs_by_rho(transform, foreach):
    """rho / ||g|| beyond float32's range (a norm of denormal gradients) made torch raise
    "value cannot be converted to type float without overflow" in SAM's move. The reference:
    e = rho * g / ||g|| in float64 from the same float32 gradients; in ASAM's adaptive groups
    e = rho * T * (T g) / ||T g|| with T and the denormal T g rounded in float32, as ASAM forms
    them."""
    weights = [torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])]
    grads = [torch.tensor([1e-42, 2e-42]), torch.tensor([1e-42, -1e-42])]  # denormal float32
    rho = 0.05
    chain, adaptive = {
        "sam": (SAM(rho), [False, False]),
        "asam-not-adaptive": (ASAM(rho, adaptive=False), [False, False]),
        "asam-mixed": (ASAM(rho), [True, False]),
    }[transform]
    params = [nn.Parameter(w.clone()) for w in weights]
    optimizer = TransformingOptimizer(
        [{"params": [p], "adaptive": a} if transform != "sam" else {"params": [p]} for p, a in zip(params, adaptive)],
        torch.optim.SGD, lr=0.1, transforms=[chain], transform_foreach=foreach,
    )
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    optimizer.first_step()
    scalings = [weight.abs() + 0.01 if a else torch.ones(2) for weight, a in zip(weights, adaptive)]
    scaled = [(t * g).double() for t, g in zip(scalings, grads)]  # float32 products, then exact
    norm = torch.linalg.vector_norm(torch.cat(scaled))
    for param, weight, direction, t in zip(params, weights, scaled, scalings):
        expected = weight.double() + rho * t.double() * direction / norm
        torch.testing.assert_close(param.detach().double(), expected, rtol=1e-6, atol=0)
    optimizer.cancel_step()
    for param, weight in zip(params, weights):
        assert torch.equal(param.detach(), weight)


@pytest.mark.parametrize("foreach", [True, False])
def test_every_ascent_step_of_multistep_sam_with_denormal_gradients_moves_by_rho(foreach):
    """The later ascent steps took rho / ||g|| unsplit and raised torch's overflow error."""
    weights = torch.tensor([1.0, 2.0, 3.0])
    slope = torch.tensor([1e-41, -2e-41, 3e-41])  # denormal float32: a constant gradient
    param = nn.Parameter(weights.clone())
    optimizer = TransformingOptimizer(
        [param], torch.optim.SGD, lr=0.0, transforms=[MultiStepSAM(0.05, ascent_steps=2)], transform_foreach=foreach
    )
    seen = []

    def closure():
        optimizer.zero_grad()
        seen.append(param.detach().double())
        loss = (param * slope).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    step = 0.05 * slope.double() / torch.linalg.vector_norm(slope.double())
    for ascents, point in enumerate(seen):
        torch.testing.assert_close(point, weights.double() + ascents * step, rtol=1e-6, atol=0)


def test_a_float64_gradient_norm_below_float32s_range_squared_moves_float32_parameters_too():
    """With every float32 gradient zero and a float64 norm near 1e-300, rho / ||g|| (5e298)
    stayed beyond float32's range after one square root, and the move raised."""
    wide = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    narrow = nn.Parameter(torch.tensor([3.0, 4.0]))
    optimizer = TransformingOptimizer([wide, narrow], torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    wide.grad = torch.tensor([1e-300, 0.0], dtype=torch.float64)
    narrow.grad = torch.zeros(2)
    optimizer.first_step()
    assert torch.equal(wide.detach(), torch.tensor([1.05, 2.0], dtype=torch.float64))
    assert torch.equal(narrow.detach(), torch.tensor([3.0, 4.0]))
    optimizer.cancel_step()


@pytest.mark.parametrize("foreach", [True, False])
def test_sam_in_float16_with_a_tiny_gradient_norm_perturbs_by_rho(foreach):
    w = torch.tensor([0.75, -0.5, 0.625, 0.875], dtype=torch.float16)
    c = torch.tensor([1e-6, -2e-6, 1.5e-6, 3e-6])
    rho = 0.5  # rho / ||g|| > 65504: the scale itself is out of float16's range
    param = nn.Parameter(w.clone())
    optimizer = TransformingOptimizer([param], torch.optim.SGD, transforms=[SAM(rho)], lr=0.1, transform_foreach=foreach)
    seen, grads = [], []

    def closure():
        optimizer.zero_grad()
        seen.append(param.detach().clone())
        loss = (param.float() * c).sum()
        loss.backward()
        grads.append(param.grad.detach().clone())
        return loss

    optimizer.step(closure)
    assert len(seen) == 2
    g64 = grads[0].double()
    assert 0 < float(torch.linalg.vector_norm(g64)) < 1e-5  # a tiny (subnormal fp16) gradient
    assert rho / float(torch.linalg.vector_norm(g64)) > torch.finfo(torch.float16).max
    expected = w.double() + rho * g64 / torch.linalg.vector_norm(g64)
    perturbed = seen[1].double()
    assert torch.isfinite(perturbed).all()
    torch.testing.assert_close(perturbed, expected, rtol=0, atol=2**-10)  # one fp16 ulp in [1, 2)
    assert abs(float(torch.linalg.vector_norm(perturbed - w.double())) - rho) < 2e-3
    assert torch.isfinite(param).all()


# -- first_step/second_step equals step(closure) when nothing is perturbed ----------------------------------------
PRE_TRANSFORMS = {
    "scale": lambda: ScaleGrad(scale=2.0),
    "clip": lambda: ClipGradNorm(0.05),
    "scale-to-zero": lambda: ScaleGrad(scale=0.0),  # SAM then sees a zero gradient
    "weight-hook": lambda: ShrinkingHook(param_ndim=None),  # writes the weights, not the gradients
}


@pytest.mark.parametrize("after", [False, True], ids=["", "clamp-after-sam"])
@pytest.mark.parametrize("case", ["rho-zero", "zero-gradient"])
@pytest.mark.parametrize("pre", sorted(PRE_TRANSFORMS))
def test_two_call_loop_equals_step_closure_when_the_perturbation_is_skipped(pre, case, after):
    """step(closure) does not re-evaluate when nothing is perturbed; the two-call loop's second
    pass (same batch, unperturbed weights) gives the same gradients, and the transforms before
    SAM must run on them again (their work on the first pass's gradients is discarded with
    those). Keeping the first pass's gradients instead would discard what the caller does to the
    second pass's (GradScaler's unscale_, clipping): see the test below."""
    rho = 0.0 if case == "rho-zero" else 0.05
    if case == "zero-gradient" and pre == "scale-to-zero":
        pytest.skip("same as the rho-zero case")

    def first_pass_loss(model):
        loss = loss_of(model)
        return loss * 0.0 if case == "zero-gradient" else loss

    second_pass_loss = first_pass_loss

    def build_one():
        model = make_model()
        transforms = [PRE_TRANSFORMS[pre](), SAM(rho)] + ([ClampGrad(-0.02, 0.02)] if after else [])
        optimizer = TransformingOptimizer(
            model.parameters(), torch.optim.SGD, transforms=transforms, lr=0.1, momentum=0.9, weight_decay=0.1
        )
        return model, optimizer

    (model_a, closure_opt), (model_b, loop_opt) = build_one(), build_one()

    def closure():
        closure_opt.zero_grad()
        loss = first_pass_loss(model_a)
        loss.backward()
        return loss

    for _ in range(3):
        closure_opt.step(closure)
        loop_opt.zero_grad()
        first_pass_loss(model_b).backward()
        loop_opt.first_step()
        second_pass_loss(model_b).backward()
        loop_opt.second_step()
        assert_runs_equal(model_a, closure_opt, model_b, loop_opt)
    assert any(not torch.equal(a, b) for a, b in zip(model_a.parameters(), make_model().parameters()))


def test_two_call_loop_with_nothing_perturbed_keeps_what_is_done_to_the_second_gradients():
    """rho=0 in the two-call loop under GradScaler: unscale_ and clipping of the second pass's
    gradients reach the inner step (it equals a plain SGD step on the unscaled gradients)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 4, dtype=torch.float64)
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(rho=0.0)])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(model(x).pow(2).mean()).backward()
    optimizer.first_step()
    scaler.scale(model(x).pow(2).mean()).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    scaler.step(optimizer)
    scaler.update()

    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference(x).pow(2).mean().backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
    plain.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)



def backward_zeroing_in_place(optimizer, pair, step, x):
    """Zero the gradients in place (``set_to_none=False``), then back-propagate a loss of both
    layers of ``pair`` for the first two steps and of the first layer alone after them."""
    optimizer.zero_grad(set_to_none=False)
    loss = pair[0](x).pow(2).sum()
    if step < 2:
        loss = loss + pair[1](x).pow(2).sum()
    loss.backward()
    return loss


@pytest.mark.parametrize("transforms", [lambda: [SAM(0.0)], lambda: [ClipGradNorm(1e6)]], ids=["sam-rho-zero", "no-second-pass"])
def test_two_call_loop_with_nothing_perturbed_keeps_the_zeroed_gradients_of_parameters_backward_misses(transforms):
    """With nothing perturbed, step(closure) steps with the first pass's gradients: a loop that
    zeroes them in place (set_to_none=False) steps a frozen or no longer used parameter with its
    zero gradient (Adam moves it by its momentum), as plain torch does. The two-call loop used to
    clear that gradient to None, so its inner step skipped such parameters and the runs differed."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    template = (nn.Linear(3, 2).double(), nn.Linear(3, 2).double())
    models = [copy.deepcopy(template) for _ in range(3)]
    plain = torch.optim.Adam([p for m in models[0] for p in m.parameters()], lr=0.1)
    closure_opt, loop_opt = (
        TransformingOptimizer([p for m in pair for p in m.parameters()], torch.optim.Adam, transforms=transforms(), lr=0.1)
        for pair in models[1:]
    )

    backward = functools.partial(backward_zeroing_in_place, x=x)

    for step in range(4):
        if step == 2:  # and the first layer's bias is frozen (its gradient stays, zeroed)
            for pair in models:
                pair[0].bias.requires_grad_(False)
        backward(plain, models[0], step)
        plain.step()
        closure_opt.step(lambda: backward(closure_opt, models[1], step))
        backward(loop_opt, models[2], step)
        loop_opt.first_step()
        backward(loop_opt, models[2], step)
        loop_opt.second_step()
    expected = [p for m in models[0] for p in m.parameters()]
    assert not torch.equal(expected[1], template[0].bias) and not torch.equal(expected[2], template[1].weight)
    for pair in models[1:]:
        assert_bitwise_equal([p for m in pair for p in m.parameters()], expected)


@pytest.mark.parametrize("transforms", [lambda: [SAM(0.0)], lambda: [ClipGradNorm(1e6)]], ids=["sam-rho-zero", "no-second-pass"])
def test_first_pass_context_with_nothing_perturbed_keeps_the_zeroed_gradients_of_parameters_backward_misses(transforms):
    """Under first_pass_context (DDP's no_sync; here a context that does nothing) with nothing
    perturbed, step(closure) evaluates the closure once more for synchronised gradients. It
    cleared every gradient to None first, so a parameter that backward misses, whose gradient a
    loop zeroes in place (set_to_none=False), was not stepped, where plain torch (and the run
    without first_pass_context) steps it with its zero gradient (Adam moves it by its momentum)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    template = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    plain_pair, pair = copy.deepcopy(template), copy.deepcopy(template)
    plain = torch.optim.Adam([p for m in plain_pair for p in m.parameters()], lr=0.1)
    optimizer = TransformingOptimizer(
        [p for m in pair for p in m.parameters()], torch.optim.Adam, transforms=transforms(), lr=0.1,
        first_pass_context=contextlib.nullcontext,
    )

    backward = functools.partial(backward_zeroing_in_place, x=x)

    for step in range(4):
        backward(plain, plain_pair, step)
        plain.step()
        optimizer.step(lambda: backward(optimizer, pair, step))
    expected = [p for m in plain_pair for p in m.parameters()]
    assert not torch.equal(expected[2], template[1].weight)
    assert_bitwise_equal([p for m in pair for p in m.parameters()], expected)

# -- hyperparameter checks ------------------------------------------------------------------------------------
MESSAGE = re.compile(r"^(?:param_groups\[\d+\]: )?(?P<name>[\w.]+) must be (?P<rule>.+), got (?P<value>.+)$")

INF_REJECTED = [
    ("scale", lambda: ScaleGrad(scale=math.inf), "inf"),
    ("bias", lambda: ScaleGrad(bias=-math.inf), "-inf"),
    ("grad_min", lambda: ClampGrad(math.inf, math.inf), "inf"),
    ("rho", lambda: SAM(rho=math.inf), "inf"),
    ("rho", lambda: ASAM(rho=math.inf), "inf"),
    ("eta", lambda: ASAM(eta=math.inf), "inf"),
    ("eps", lambda: LAMP(eps=math.inf), "inf"),
    ("eps", lambda: NormalizeGrad(eps=math.inf), "inf"),
]
NAN_REJECTED = [
    ("rho", lambda: SAM(rho=math.nan)),
    ("rho", lambda: ASAM(rho=math.nan)),
    ("eta", lambda: ASAM(eta=math.nan)),
    ("eps", lambda: LAMP(eps=math.nan)),
    ("max_grad_norm", lambda: ClipGradNorm(math.nan)),
    ("eps", lambda: NormalizeGrad(math.nan)),
    ("scale", lambda: ScaleGrad(scale=math.nan)),
    ("bias", lambda: ScaleGrad(bias=math.nan)),
    ("grad_min", lambda: ClampGrad(math.nan, 1.0)),
    ("grad_max", lambda: ClampGrad(-1.0, math.nan)),
]


def assert_true_rule_message(error, name, value):
    match = MESSAGE.match(str(error))
    assert match, str(error)
    assert match["name"] == name and match["value"] == value, str(error)
    # The rule must be false of the value: an infinite or NaN value breaks only a "finite" rule.
    assert "finite" in match["rule"], str(error)


@pytest.mark.parametrize("name,make,value", INF_REJECTED, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(INF_REJECTED)])
def test_infinite_hyperparameters_are_rejected_with_a_true_rule(name, make, value):
    with pytest.raises(ValueError) as info:
        make()
    assert_true_rule_message(info.value, name, value)


@pytest.mark.parametrize("name,make", NAN_REJECTED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(NAN_REJECTED)])
def test_nan_hyperparameters_are_value_errors(name, make):
    with pytest.raises(ValueError) as info:
        make()
    assert_true_rule_message(info.value, name, "nan")


INTEGER_NON_FINITE_REJECTED = [
    ("rollback_len", lambda value: LAMP(rollback_len=value), "an integer >= 1"),
    ("seed", lambda value: LAMP(seed=value), "an integer"),
    ("k", lambda value: LookSAM(0.05, k=value), "an integer >= 1"),
    ("ascent_steps", lambda value: MultiStepSAM(0.05, ascent_steps=value), "an integer >= 1"),
]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name,make,rule", INTEGER_NON_FINITE_REJECTED, ids=[n for n, _, _ in INTEGER_NON_FINITE_REJECTED])
def test_non_finite_integer_hyperparameters_are_value_errors_too(name, make, rule, value):
    with pytest.raises(ValueError) as info:
        make(value)
    assert str(info.value) == f"{name} must be {rule}, got {value!r}"
    # a finite non-integral number is of the wrong kind
    with pytest.raises(TypeError, match=rf"^{name} must be {rule}, got 2\.5$"):
        make(2.5)


GROUP_KEYS = [
    (lambda: [SAM(0.05)], "rho"),
    (lambda: [ASAM(0.5)], "eta"),
    (lambda: [LAMP(1e-2, seed=0)], "eps"),
    (lambda: [ClipGradNorm(1.0)], "max_grad_norm"),
    (lambda: [NormalizeGrad(1e-3)], "eps"),
    (lambda: [ScaleGrad(2.0)], "grad_scale"),
    (lambda: [ScaleGrad(2.0)], "grad_bias"),
    (lambda: [ClampGrad(-1.0, 1.0)], "grad_min"),
    (lambda: [ClampGrad(-1.0, 1.0)], "grad_max"),
]


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("chain,key", GROUP_KEYS, ids=[k + str(i) for i, (_, k) in enumerate(GROUP_KEYS)])
def test_non_finite_group_values_are_value_errors_everywhere(chain, key, value):
    text = repr(value)
    model = make_model()
    # In a constructor group ...
    with pytest.raises(ValueError) as info:
        TransformingOptimizer([{"params": model.parameters(), key: value}], torch.optim.SGD, transforms=chain(), lr=0.1)
    assert_true_rule_message(info.value, key, text)
    # ... in add_param_group ...
    first, *rest = list(model.parameters())
    optimizer = TransformingOptimizer([first], torch.optim.SGD, transforms=chain(), lr=0.1)
    with pytest.raises(ValueError) as info:
        optimizer.add_param_group({"params": rest, key: value})
    assert_true_rule_message(info.value, key, text)
    assert len(optimizer.param_groups) == 1
    # ... and edited into a group, found by the next step, which changes nothing.
    optimizer.add_param_group({"params": rest})
    optimizer.step(make_closure(model, optimizer))
    optimizer.param_groups[0][key] = value
    before = Before(model, optimizer)
    with pytest.raises(ValueError) as info:
        optimizer.step(make_closure(model, optimizer))
    assert_true_rule_message(info.value, key, text)
    before.assert_unchanged()


def test_qualified_key_is_named_in_the_message():
    model = make_model()
    with pytest.raises(ValueError) as info:
        TransformingOptimizer(
            [{"params": model.parameters(), "sam.rho": math.inf}], torch.optim.Adadelta, transforms=[SAM(0.05)]
        )
    assert_true_rule_message(info.value, "sam.rho", "inf")
    with pytest.raises(ValueError) as info:
        TransformingOptimizer(model.parameters(), torch.optim.Adam, transforms=[NormalizeGrad(math.nan)])
    assert_true_rule_message(info.value, "eps", "nan")


@pytest.mark.parametrize(
    "make,name,value",
    [
        (lambda: SAM(rho=-1.0), "rho", "-1.0"),
        (lambda: LAMP(eps=-0.5), "eps", "-0.5"),
        (lambda: ClipGradNorm(0.0), "max_grad_norm", "0.0"),
        (lambda: ClampGrad(1.0, 0.0), "grad_max", "0.0"),
    ],
)
def test_out_of_range_messages_state_a_rule_the_value_breaks(make, name, value):
    with pytest.raises(ValueError) as info:
        make()
    match = MESSAGE.match(str(info.value))
    assert match and match["name"] == name and match["value"] == value, str(info.value)


def test_a_bound_in_a_message_is_not_rounded_into_a_false_rule():
    """``ClampGrad(0.1234574, 0.1234571)``: the rule must name a bound that 0.1234571 breaks."""
    with pytest.raises(ValueError) as info:
        ClampGrad(0.1234574, 0.1234571)
    message = str(info.value)
    match = MESSAGE.match(message)
    assert match and match["name"] == "grad_max" and match["value"] == "0.1234571", message
    bound = re.search(r">=\s*(?:\w+\s*=\s*)?([-+0-9.e]+)", match["rule"])
    assert bound, message
    assert 0.1234571 < float(bound[1]), f"the stated rule holds for the rejected value: {message}"


def test_torch_optimizer_raising_after_creating_state_leaves_no_new_state():
    """torch's Adam initialises the state of the parameters before a bad one, then raises."""
    dense, sparse = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    optimizer = TransformingOptimizer([dense, sparse], torch.optim.Adam, lr=0.1)
    dense.grad = torch.ones(3)
    sparse.grad = torch.ones(3).to_sparse()
    before = (dense.detach().clone(), sparse.detach().clone())
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
    assert not any(optimizer.state.values())
    assert torch.equal(dense, before[0]) and torch.equal(sparse, before[1])


def test_a_post_step_hook_set_on_the_instance_runs_and_its_failure_changes_nothing():
    """``post_update`` assigned to a transform object (not its class) is a post-step transform."""
    model = make_model()
    hook = Transform()
    calls = []

    def post_update(ctx):
        calls.append(ctx.slot)
        if len(calls) == 2:
            raise Injected("instance post_update failed")

    hook.post_update = post_update
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, transforms=[SAM(0.05), hook], lr=0.05)
    optimizer.step(make_closure(model, optimizer))
    assert len(calls) == 1
    before = Before(model, optimizer)
    with pytest.raises(Injected):
        optimizer.step(make_closure(model, optimizer))
    before.assert_unchanged()


@pytest.mark.parametrize("refusal, chain", [("tensor-lr", "none"), ("tensor-lr", "sam"), ("sparse-gradient", "none")])
def test_a_later_param_group_refused_by_torch_leaves_the_earlier_groups_unstepped(refusal, chain):
    """torch's Adam checks and writes group by group: a refused second group must not leave the
    first one stepped. (SAM refuses sparse gradients itself, before anything changes.)"""
    torch.manual_seed(0)
    body, embedding = nn.Linear(4, 3).double(), nn.Embedding(5, 3, sparse=refusal == "sparse-gradient").double()
    model = nn.ModuleList([body, embedding])
    optimizer = TransformingOptimizer(
        [{"params": body.parameters()}, {"params": embedding.parameters()}], torch.optim.Adam, lr=0.1,
        foreach=True, transforms=[SAM(0.05)] if chain == "sam" else [],
    )
    tokens = torch.tensor([0, 2, 4])

    def closure(use_embedding=True):
        optimizer.zero_grad()
        features = body(X[:3])
        loss = ((features * embedding(tokens)).sum() if use_embedding else features.sum()) ** 2
        loss.backward()
        return loss

    optimizer.step(lambda: closure(use_embedding=refusal == "tensor-lr"))  # Adam state in group 0
    if refusal == "tensor-lr":
        optimizer.param_groups[1]["lr"] = torch.tensor(0.1)  # refused with foreach=True
    before = Before(model, optimizer)
    with pytest.raises(RuntimeError, match="lr as a Tensor is not supported" if refusal == "tensor-lr" else "does not support sparse gradients"):
        optimizer.step(closure)
    before.assert_unchanged()


class _Reevaluating(Transform):
    """Re-evaluates the closure and accepts sparse gradients (unlike the SAM family)."""

    needs_closure = True

    def pre_update(self, ctx) -> None:
        ctx.reevaluate()


@pytest.mark.parametrize("layout", ["one-group", "two-groups", "reevaluating-transform"])
def test_a_sparse_gradient_refused_midway_by_torch_leaves_every_parameter_unstepped(layout):
    """torch's Adagrad refuses a sparse gradient with weight_decay inside its per-tensor loop,
    after stepping the tensors before it (they stayed stepped before)."""
    torch.manual_seed(0)
    body, embedding = nn.Linear(3, 1).double(), nn.Embedding(5, 3, sparse=True).double()
    model = nn.ModuleList([body, embedding])
    params = list(body.parameters()) + list(embedding.parameters())
    if layout == "two-groups":  # the refused tensor is in the last group, after a dense one
        params = [{"params": [body.weight]}, {"params": [body.bias, embedding.weight]}]
    optimizer = TransformingOptimizer(
        params, torch.optim.Adagrad, lr=0.1, weight_decay=0.01,
        transforms=[_Reevaluating()] if layout == "reevaluating-transform" else [],
    )

    def closure():
        optimizer.zero_grad()
        loss = body(embedding(torch.tensor([1, 2]))).sum()
        loss.backward()
        return loss

    before = Before(model, optimizer)
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible with sparse gradients"):
        optimizer.step(closure)
    before.assert_unchanged()


# -- values beyond what a float or a dtype holds -----------------------------------------------------------
HUGE = 10**400  # a Python integer no float holds


def _clamp_params(*args, **kwargs):
    from samgria import ClampParams  # imported here: this section was added at the end of the file

    return ClampParams(*args, **kwargs)


def _project_params(*args, **kwargs):
    from samgria import ProjectParams

    return ProjectParams(*args, **kwargs)


@pytest.mark.parametrize(
    "name,make,value",
    [
        ("rho", lambda: SAM(rho=HUGE), HUGE),
        ("rho", lambda: SAM(rho=-HUGE), -HUGE),
        ("grad_scale", lambda: TransformingOptimizer([{"params": [nn.Parameter(torch.ones(2))], "grad_scale": HUGE}], torch.optim.SGD, lr=0.1, transforms=[ScaleGrad()]), HUGE),
        ("param_min", lambda: _clamp_params(-HUGE, HUGE), -HUGE),
    ],
    ids=["rho", "rho-negative", "group-grad_scale", "param_min"],
)
def test_integers_beyond_the_float_range_are_value_errors_with_the_usual_message(name, make, value):
    with pytest.raises(ValueError) as info:
        make()
    match = MESSAGE.match(str(info.value))
    assert match, str(info.value)
    assert match["name"] == name and match["value"] == repr(value), str(info.value)
    assert match["rule"].endswith(" that fits in a float"), str(info.value)


@pytest.mark.parametrize(
    "bounded,unbounded",
    [
        (lambda: ClampGrad(-1e5, 1e5), None),  # ClampGrad takes finite bounds only
        (lambda: _clamp_params(0.0, 1e5), lambda: _clamp_params(0.0, math.inf)),
        (lambda: _project_params(1e5, p=math.inf), None),
    ],
    ids=["ClampGrad", "ClampParams", "ProjectParams-inf"],
)
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_a_bound_beyond_float16_range_steps_a_float32_and_float16_model_as_no_bound(bounded, unbounded, foreach):
    """It used to raise "value cannot be converted to type c10::Half without overflow" at the step."""

    def run(transforms):
        weights = [nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=dtype)) for dtype in (torch.float32, torch.float16)]
        optimizer = TransformingOptimizer(
            weights, torch.optim.SGD, lr=0.1, momentum=0.9, transforms=transforms, transform_foreach=foreach
        )
        for step in range(2):
            for weight in weights:
                weight.grad = torch.full((3,), 0.5 + step, dtype=weight.dtype)
            optimizer.step()
        return [weight.detach().clone() for weight in weights]

    got = run([bounded()])
    expected = run([] if unbounded is None else [unbounded()])
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_the_non_finite_policy_and_sam_warnings_point_at_the_users_line():
    """Through torch's hook wrapper, step() and the chain, the warnings name the caller's line."""
    weight = nn.Parameter(torch.ones(3))
    optimizer = TransformingOptimizer([weight], torch.optim.SGD, lr=0.1, transforms=[SAM(0.1)])

    def closure():
        optimizer.zero_grad()
        loss = (weight * float("inf")).sum()
        loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step(closure)  # the non-finite policy's warning
    assert [w.filename for w in caught] == [__file__], [(w.filename, str(w.message)) for w in caught]

    wide = nn.Parameter(torch.ones(4, dtype=torch.float64))
    sam = TransformingOptimizer([wide], torch.optim.SGD, lr=1e-300, transforms=[SAM(0.1)])

    def overflowing():
        sam.zero_grad()
        loss = (wide * 1e308).sum()
        loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sam.step(overflowing)  # SAM's "the gradient norm is inf" warning
    assert [w.filename for w in caught] == [__file__], [(w.filename, str(w.message)) for w in caught]


@pytest.mark.parametrize("chain", ["sam", "sam+lamp"])
def test_second_step_raising_before_the_weights_go_back_restores_them(chain, monkeypatch):
    """A failure in second_step before the perturbation is undone (before, the
    gradient alignment or GradScaler's rescaling raising there left the weights at w + e, and
    cancel_step could not help: the pending step was already gone)."""
    (model, optimizer), twin = make_twins(chain, "sgd", 1)
    before = Before(model, optimizer)
    loss_of(model).backward()
    optimizer.first_step()
    calls = []

    def failing_alignment():
        calls.append(1)
        raise MemoryError("all-gather ran out of memory")

    monkeypatch.setattr(optimizer, "_align_sharded_grads", failing_alignment)
    loss_of(model).backward()
    with pytest.raises(MemoryError, match="all-gather"):
        optimizer.second_step()
    assert calls == [1]
    optimizer.zero_grad()
    before.assert_unchanged()
    monkeypatch.undo()
    optimizer.cancel_step()  # nothing pending: does nothing
    step_both_normally((model, optimizer), twin)


# -- a loaded state that does not fit the parameters ----------------------------------------------------------
def shaped_model(outputs: int) -> nn.Module:
    """As many parameters as ``shaped_model(k)`` for any k, of other shapes."""
    torch.manual_seed(outputs)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, outputs)).double()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("how", ["wrapper", "inner"])
def test_a_step_failing_on_a_loaded_state_of_other_shapes_changes_nothing(how, foreach):
    """A checkpoint of a model with as many parameters but other shapes loads (torch checks the
    counts only) and torch's Adam finds the misfit while it writes: after a first parameter
    stepped (for-loop) or after every step counter went up (foreach). The step is undone whole."""
    x = torch.randn(8, 3, dtype=torch.float64)

    def build_run(outputs):
        model = shaped_model(outputs)
        optimizer = TransformingOptimizer(
            model.parameters(), torch.optim.Adam, lr=1e-2, foreach=foreach, transforms=[SAM(0.05)]
        )
        y = torch.randn(8, outputs, dtype=torch.float64)
        return model, optimizer, closure_on(model, optimizer, x, y)

    model, optimizer, closure = build_run(1)
    optimizer.step(closure)
    checkpoint = copy.deepcopy(optimizer.state_dict() if how == "wrapper" else optimizer.inner.state_dict())
    model, optimizer, closure = build_run(2)
    optimizer.step(closure)
    if how == "wrapper":
        optimizer.load_state_dict(checkpoint)
    else:
        optimizer.inner.load_state_dict(checkpoint)
        optimizer.state_dict()  # the wrapper takes the inner optimizer's new state over
    before = Before(model, optimizer)
    with pytest.raises(RuntimeError, match="shape"):
        optimizer.step(closure)
    before.assert_unchanged()


def test_the_first_step_after_a_load_is_undone_whole_and_later_ones_copy_nothing_again(monkeypatch):
    """The copy for a loaded state is taken for the steps until one completes; then SAM around a
    torch optimizer with one param group copies nothing again (its speed and memory)."""
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(0.05)])
    closure = make_closure(model, optimizer)
    optimizer.step(closure)
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    import samgria.optim as optim_module

    taken = []
    original = optim_module.StepSnapshot

    def counting(*args, **kwargs):
        taken.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(optim_module, "StepSnapshot", counting)
    optimizer.step(closure)
    assert len(taken) == 1
    optimizer.step(closure)
    assert len(taken) == 1


# -- which ParamTransforms count as writing the weights -----------------------------------------------------
def test_param_transforms_declare_writing_the_weights_only_with_a_pre_step_hook():
    class GradOnly(ParamTransform):
        writes_weights_before_step = False

        def pre_step_transform_(self, param, group) -> None:
            param.grad.mul_(2.0)

    class PostOnly(ParamTransform):
        def post_step_transform_(self, param, group) -> None:
            param.clamp_(-1.0, 1.0)

    class PostThenPre(PostOnly):  # a pre-step hook added below a class without one
        def pre_step_transform_(self, param, group) -> None:
            param.mul_(0.5)

    class GradOnlyChild(GradOnly):  # overrides the hook its parent declared for: derived again
        def pre_step_transform_(self, param, group) -> None:
            param.grad.mul_(3.0)

    assert ShrinkingHook.writes_weights_before_step is True
    assert GradOnly.writes_weights_before_step is False
    assert PostOnly.writes_weights_before_step is False
    assert PostThenPre.writes_weights_before_step is True
    assert GradOnlyChild.writes_weights_before_step is True
    assert SAM(0.05).writes_weights_before_step is False  # it puts the weights back itself


# -- the two-call loop, seed-protocol objects and states given to the inner optimizer --------------------
class DecayingObject:
    """A seed-protocol object whose ``apply`` writes the weights (a decay) and leaves them so."""

    def __init__(self) -> None:
        self.fail = False

    def apply(self, model, loss_fn, batch) -> None:
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(0.5)

    def post_step(self, model) -> None:
        if self.fail:
            raise Injected("post_step failed")


@pytest.mark.parametrize("chain", ["weight-hook", "protocol"])
@pytest.mark.parametrize("mode", ["closure", "two-call"])
def test_a_chain_without_a_second_pass_that_writes_the_weights_is_undone_in_either_loop(chain, mode):
    """No transform re-evaluates: the two-call loop runs the whole chain in second_step(); a
    post-step failure must undo the weights a pre-step hook (or a seed-protocol object) wrote,
    as step() does."""
    model = make_model()
    first = ShrinkingHook(param_ndim=None) if chain == "weight-hook" else DecayingObject()
    failing_post = RaisingPost()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[first, failing_post])
    optimizer.step(make_closure(model, optimizer))
    before = Before(model, optimizer)
    failing_post.armed = True
    with pytest.raises(Injected):
        step_in(mode, model, optimizer)
    before.assert_unchanged()


def test_a_seed_protocol_object_writing_the_weights_is_undone_when_the_step_is_skipped():
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[DecayingObject(), SAM(0.05)])
    optimizer.step(make_closure(model, optimizer))
    before = Before(model, optimizer)
    with pytest.warns(RuntimeWarning, match="second evaluation are not finite"):
        optimizer.step(make_closure(model, optimizer, lambda n: poison(model, math.inf) if n == 2 else None))
    before.assert_unchanged()


def test_a_two_call_loop_with_nothing_perturbed_runs_a_weight_hook_once_also_without_atomic():
    """atomic=False takes no copies for atomicity, but the two-call loop's second_step() runs the
    transforms before SAM again when nothing was perturbed: the weights the hook wrote in
    first_step() are undone first, or it would act twice."""
    runs = []
    for loop in ("closure", "two-call"):
        model = make_model()
        optimizer = TransformingOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.1, atomic=False, transforms=[ShrinkingHook(param_ndim=None), SAM(0.0)]
        )
        for _ in range(2):
            step_in(loop, model, optimizer)
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("chain", ["post-only", "lookahead"], ids=["a-post-step-failure", "with-a-pre-step-structure"])
def test_a_state_given_to_the_inner_optimizer_survives_a_failed_step(chain):
    """inner.load_state_dict(...) and then a step that raises: the loaded state is what the step
    started from, so it is what the failure leaves (it was once put back to the state before the
    load when the chain recorded the state's structure)."""
    from samgria import Lookahead

    source_model = make_model()
    source = torch.optim.SGD(source_model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        source.zero_grad()
        loss_of(source_model).backward()
        source.step()
    checkpoint = copy.deepcopy(source.state_dict())
    model = make_model()
    failing_post = RaisingPost()
    transforms = ([Lookahead()] if chain == "lookahead" else []) + [failing_post]
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=transforms)
    optimizer.inner.load_state_dict(copy.deepcopy(checkpoint))
    failing_post.armed = True
    with pytest.raises(Injected):
        optimizer.step(make_closure(model, optimizer))
    buffers = [optimizer.state[p].get("momentum_buffer") for p in model.parameters()]
    expected = [checkpoint["state"][i]["momentum_buffer"] for i in range(len(buffers))]
    assert all(b is not None and torch.equal(b, e) for b, e in zip(buffers, expected))


@pytest.mark.parametrize("foreach", [True, False])
def test_atomic_full_undoes_an_allocation_failing_inside_torchs_step(foreach):
    """torch's Adam allocates sqrt(v) after it updated the moments (foreach), or steps parameter
    after parameter (for-loop): an out-of-memory error there left part of the inner step applied.
    ``atomic="full"`` copies before the inner step, so the optimizer is exactly as before and the
    next step equals that of a twin that never saw the failure."""
    def build():
        model = make_model()
        optimizer = TransformingOptimizer(
            model.parameters(), torch.optim.Adam, lr=0.01, foreach=foreach, transforms=[SAM(0.05)], atomic="full"
        )
        return model, optimizer

    model, optimizer = build()
    twin_model, twin = build()
    for _ in range(2):
        optimizer.step(make_closure(model, optimizer))
        twin.step(make_closure(twin_model, twin))
    weights, saved = [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict())
    calls = []
    if foreach:
        target, name = torch, "_foreach_sqrt"
    else:
        target, name = torch.Tensor, "sqrt"
    original = getattr(target, name)

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 or foreach:
            raise torch.OutOfMemoryError("simulated: out of memory inside the inner step")
        return original(*args, **kwargs)

    setattr(target, name, failing)
    try:
        with pytest.raises(torch.OutOfMemoryError, match="simulated"):
            optimizer.step(make_closure(model, optimizer))
    finally:
        setattr(target, name, original)
    assert calls  # the failure came from inside the inner step
    for before, param in zip(weights, model.parameters()):
        assert torch.equal(before, param)
    after = optimizer.state_dict()
    assert_states_equal(after["state"], saved["state"])
    for _ in range(2):
        optimizer.step(make_closure(model, optimizer))
        twin.step(make_closure(twin_model, twin))
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_atomic_full_undoes_a_step_failing_on_state_a_dtype_cast_of_the_model_left_behind(foreach):
    """A model cast to float32 after its state was made in float64: torch's Adam finds the state
    of another dtype only while it writes (step counters advanced, earlier tensors stepped), which
    the class docstring says only ``atomic="full"`` undoes; it leaves everything as it was."""
    model = make_model(torch.float64)
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.Adam, lr=0.01, foreach=foreach, transforms=[SAM(0.05)], atomic="full"
    )
    for _ in range(2):
        optimizer.step(closure_on(model, optimizer, X, Y))
    model.float()
    weights, saved = [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict())
    with pytest.raises(RuntimeError, match="dtype"):
        optimizer.step(closure_on(model, optimizer, X.float(), Y.float()))
    assert_bitwise_equal([p.detach() for p in model.parameters()], weights)
    assert_states_equal(optimizer.state_dict()["state"], saved["state"])


def test_atomic_accepts_a_numpy_bool_and_full():
    import numpy as np

    model = make_model()
    assert TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, atomic=np.bool_(False)).atomic is False
    assert TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, atomic="full").atomic == "full"


@pytest.mark.parametrize("atomic", [True, "full"])
@pytest.mark.parametrize("chain", ["sam", "looksam", "hook+sam"])
def test_an_interrupt_in_first_step_before_the_step_is_pending_leaves_the_weights(chain, atomic, monkeypatch):
    """Ctrl-C after perturb() moved the weights and before first_step() made the step pending
    (where cancel_step() finds it) left them at w + e, pointing at SAM's backup buffers; and a
    completed first_step() left its moves registered on the transform. Behind a hook that
    writes the weights, the hook's write stayed too."""
    import samgria.optim as optim_module

    transforms = {"sam": [SAM(0.05)], "looksam": [LookSAM(0.05, k=2)], "hook+sam": [ShrinkingHook(), SAM(0.05)]}[chain]
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=transforms, atomic=atomic)
    weights, pointers = [p.detach().clone() for p in model.parameters()], [p.data_ptr() for p in model.parameters()]
    loss_of(model).backward()
    real = optim_module._PendingStep

    def interrupted(*args, **kwargs):
        monkeypatch.setattr(optim_module, "_PendingStep", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(optim_module, "_PendingStep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        optimizer.first_step()
    assert optim_module._PendingStep is real
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert "_moving" not in optimizer.transforms[-1].__dict__
    optimizer.zero_grad()
    loss_of(model).backward()
    optimizer.first_step()
    assert "_moving" not in optimizer.transforms[-1].__dict__
    loss_of(model).backward()
    optimizer.second_step()


class _MovesThenRaises(SAM):
    """SAM whose perturb() raises after it moved the weights (it declares nothing: the
    optimizer copies the weights first)."""

    def perturb(self, ctx):
        super().perturb(ctx)
        raise ValueError("perturb failed after moving the weights")


@pytest.mark.parametrize("atomic", [True, "full"])
def test_a_perturb_that_raises_behind_a_weight_writing_hook_leaves_the_weights_in_first_step(atomic):
    """first_step() put the structure's copy of the weights back while they pointed at SAM's
    backup buffers, then re-pointed them at their own storage, which held the hook's write."""
    model = make_model()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, transforms=[ShrinkingHook(), _MovesThenRaises(0.05)], atomic=atomic
    )
    weights, pointers = [p.detach().clone() for p in model.parameters()], [p.data_ptr() for p in model.parameters()]
    loss_of(model).backward()
    with pytest.raises(ValueError, match="perturb failed after moving the weights"):
        optimizer.first_step()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert [p.data_ptr() for p in model.parameters()] == pointers


@pytest.mark.parametrize("chain", ["sam", "hook+sam"])
def test_a_second_interrupt_while_first_step_puts_the_weights_back_is_finished(chain, monkeypatch):
    """A first Ctrl-C after perturb() moved the weights, a second one as first_step() started
    putting them back: they stayed at w + e, on SAM's backup buffers (step(closure) finishes the
    way back once more; first_step did not)."""
    import linecache
    import sys

    import samgria.optim as optim_module

    transforms = {"sam": [SAM(0.05)], "hook+sam": [ShrinkingHook(), SAM(0.05)]}[chain]
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=transforms)
    sam = optimizer.transforms[-1]
    weights, pointers = [p.detach().clone() for p in model.parameters()], [p.data_ptr() for p in model.parameters()]
    loss_of(model).backward()

    def moves_then_interrupted(ctx):
        type(sam).perturb(sam, ctx)
        raise KeyboardInterrupt  # the first Ctrl-C

    monkeypatch.setattr(sam, "perturb", moves_then_interrupted)
    hits = []

    def local(frame, event, arg):
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
        if event == "line" and line == "transform._put_back(ctx, perturbation, finish=False)" and not hits:
            hits.append(frame.f_lineno)
            raise KeyboardInterrupt  # the second, as the weights are about to be put back
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == optim_module.__file__ else None

    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            optimizer.first_step()
    finally:
        sys.settrace(None)
    assert hits
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert "_moving" not in sam.__dict__


# -- a param-group value torch would use only as it writes ------------------------------------------------
@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("eps", "1e-8", r"a real number \(Python or a NumPy scalar\) or a one-element real tensor"),
        ("lr", None, r"a real number \(Python or a NumPy scalar\) or a one-element real tensor"),
        ("weight_decay", True, r"a real number \(Python or a NumPy scalar\) or a one-element real tensor"),
        ("betas", ("0.9", 0.999), r"a sequence of 2 with a real number \(Python or a NumPy scalar\) or a one-element real tensor at 0, 1"),
        ("betas", (0.9,), r"a sequence of 2 with a real number \(Python or a NumPy scalar\) or a one-element real tensor at 0, 1"),
    ],
)
@pytest.mark.parametrize("chain", ["none", "sam"])
def test_a_group_value_of_another_kind_than_torch_s_default_is_refused_before_the_step(chain, key, value, rule):
    """torch's Adam uses eps, lr and betas only as it writes, group by group and tensor by tensor:
    a string eps in the second group raised after the first group stepped and after the second
    group's own step counters and moments were written."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    optimizer = TransformingOptimizer(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}], torch.optim.Adam, lr=0.1,
        transforms=[SAM(0.05)] if chain == "sam" else [],
    )
    closure = make_closure(model, optimizer)
    optimizer.step(closure)
    optimizer.param_groups[1][key] = value
    before = Before(model, optimizer)
    with pytest.raises(TypeError, match=rf"^param_groups\[1\]: {key} must be {rule}, got {re.escape(repr(value))}$"):
        optimizer.step(closure)
    before.assert_unchanged()


@pytest.mark.parametrize("inner", ["sgd-momentum", "adam"])
def test_a_tensor_lr_of_several_elements_is_refused_before_the_step(inner):
    """torch's SGD wrote the momentum buffers, and Adam its moments and step counters, before
    they raised on such an lr ("alpha must be Number"): also with one param group."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    cls, kwargs = (torch.optim.SGD, {"momentum": 0.9}) if inner == "sgd-momentum" else (torch.optim.Adam, {})
    optimizer = TransformingOptimizer(model.parameters(), cls, lr=0.1, transforms=[SAM(0.05)], **kwargs)
    closure = make_closure(model, optimizer)
    optimizer.step(closure)
    lr = optimizer.param_groups[0]["lr"] = torch.tensor([0.1, 0.2])
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(state_by_index(optimizer))
    with pytest.raises(TypeError, match=r"^param_groups\[0\]: lr must be a real number \(Python or a NumPy scalar\) or a one-element real tensor, got tensor"):
        optimizer.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    assert_states_equal(state_by_index(optimizer), state)
    assert optimizer.param_groups[0]["lr"] is lr


def test_group_values_of_the_default_s_kind_in_another_form_step_as_torch_steps_them():
    """A list for a tuple, an int or a NumPy scalar for a float, a tensor for a number: accepted,
    and the step is torch's on the same values."""
    values = {"betas": [0.8, numpy.float32(0.99)], "eps": numpy.float64(1e-6), "weight_decay": 0, "lr": torch.tensor(0.05)}
    runs = []
    for wrapped in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), **values}]
        if wrapped:
            optimizer = TransformingOptimizer(groups, torch.optim.Adam, lr=0.1, foreach=False)
        else:
            optimizer = torch.optim.Adam(groups, lr=0.1, foreach=False)
        closure = make_closure(model, optimizer)
        for _ in range(2):
            optimizer.step(closure)
        runs.append([p.detach() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize(
    "value, default, refused",
    [
        (1, 0.1, False),
        (torch.tensor(0.1), 0.1, False),
        (torch.tensor([0.1]), 0.1, False),
        (torch.tensor([0.1, 0.2]), 0.1, True),
        ((0.9, torch.ones(2)), (0.9, 0.999), True),
        (fractions.Fraction(1, 10), 0.1, True),  # torch's kernels take no Fraction
        (torch.tensor(0.1 + 0j), 0.1, True),
        (numpy.float32(0.01), 0.1, False),
        (numpy.int64(0), 0.1, False),
        ((numpy.float64(0.9), torch.tensor(0.99)), (0.9, 0.999), False),
        # torch's Adam refuses a NumPy array as eps only as it writes (add_ takes a number or a
        # tensor), NAdam's foreach path a tensor of betas, ASGD a long double: refused first
        (numpy.array(0.01), 0.1, True),
        (numpy.array([0.9, 0.99]), (0.9, 0.999), True),
        (torch.tensor([0.9, 0.99]), (0.9, 0.999), True),
        (numpy.longdouble(0.1), 0.1, True),
        (numpy.bool_(True), 0.1, True),
        ("0.1", 0.1, True),
        (False, 0.1, True),  # a flag is no number here, as in every samgria check
        ((None, 1e-3), (None, 1e-3), False),  # Adafactor's eps: None where the default has None
        (("x", 1e-3), (None, 1e-3), False),
        ((None, "x"), (None, 1e-3), True),
        ([0.9, torch.tensor(0.99)], (0.9, 0.999), False),
        ((0.9, 0.99, 0.5), (0.9, 0.999), True),
        (0.9, (0.9, 0.999), True),
        ("anything", None, False),  # Muon's adjust_lr_fn
        ("anything", False, False),  # a flag's kind is not checked
        ("anything", "original", False),
    ],
)
def test_check_like_default_refuses_only_a_value_of_another_kind_than_a_numeric_default(value, default, refused):
    from samgria._checks import check_like_default

    if refused:
        with pytest.raises(TypeError, match=rf"^param_groups\[0\]: key must be a .*, got {re.escape(repr(value))}$"):
            check_like_default("param_groups[0]: key", value, default)
    else:
        check_like_default("param_groups[0]: key", value, default)


def test_adafactor_and_muon_group_values_are_checked_as_every_torch_optimizer_s():
    """Their classes live in the module torch.optim itself (not torch.optim.<name>): the check of
    their group values was skipped, and Adafactor refused lr="0.1" after the first group stepped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    optimizer = TransformingOptimizer(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}], torch.optim.Adafactor, lr=0.01,
        atomic=False,
    )
    closure = make_closure(model, optimizer)
    optimizer.step(closure)
    optimizer.param_groups[1]["lr"] = "0.1"
    before = Before(model, optimizer)
    with pytest.raises(TypeError, match=r"^param_groups\[1\]: lr must be a real number"):
        optimizer.step(closure)
    before.assert_unchanged()
    from samgria._wrapper import is_torch_optimizer

    assert is_torch_optimizer(torch.optim.Muon([torch.zeros(2, 2)])) and is_torch_optimizer(optimizer.inner)
    assert not is_torch_optimizer(optimizer)


@pytest.mark.parametrize("how", ["transforming", "maml"])
def test_a_muon_step_refused_inside_its_loop_over_tensors_changes_nothing(how):
    """Muon checks a gradient's dimensions inside its loop over tensors, after the tensors before
    it stepped (its add_param_group takes a 1-D parameter): treated as a torch optimizer that
    checks before it writes, the matrix before the bias stayed stepped."""
    from samgria import MAML

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Linear(3, 2))
    first, second = [model[0].weight], [model[2].weight, model[2].bias]
    if how == "transforming":
        optimizer = TransformingOptimizer(first, torch.optim.Muon, lr=0.1)
        optimizer.add_param_group({"params": second})
    else:
        optimizer = MAML(model, torch.optim.Muon(first, lr=0.1), inner_lr=0.1)
        optimizer.add_param_group({"params": second})
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="2D"):
        optimizer.step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(len(entry) == 0 for entry in optimizer.state.values())


# -- a user's re-evaluating transform and the non-finite policy -----------------------------------------
class _ExtraGradient(Transform):
    r"""Extragradient, as a researcher writes it: :math:`w \to w - \gamma g`, re-evaluate there, come
    back (no ``try``/``finally``): the inner step uses :math:`\nabla L(w - \gamma g)`."""

    needs_closure = True

    def __init__(self, gamma=0.1):
        self.gamma = gamma

    def group_defaults(self):
        return {"gamma": self.gamma}

    def _move(self, ctx):
        moved = []
        for group in ctx.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    delta = param.grad * group["gamma"]
                    param.sub_(delta)
                    moved.append((param, delta))
        return moved

    @torch.no_grad()
    def pre_update(self, ctx):
        moved = self._move(ctx)
        ctx.reevaluate()
        for param, delta in moved:
            param.add_(delta)


class _ExtraGradientWithFallback(_ExtraGradient):
    """Catches ``Exception`` around the re-evaluation (keep the first pass's step if it fails) and
    puts the weights back in a ``finally``."""

    @torch.no_grad()
    def pre_update(self, ctx):
        moved = self._move(ctx)
        try:
            ctx.reevaluate()
        except Exception:  # noqa: BLE001 - the fallback a user writes
            pass
        finally:
            for param, delta in moved:
                param.add_(delta)


def _extragradient_reference(steps):
    """Hand-written extragradient with momentum SGD (the steps a skipped one does not count in)."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(model).backward()
        with torch.no_grad():
            deltas = [p.grad * 0.1 for p in model.parameters()]
            for p, delta in zip(model.parameters(), deltas):
                p.sub_(delta)
        optimizer.zero_grad()
        loss_of(model).backward()
        with torch.no_grad():
            for p, delta in zip(model.parameters(), deltas):
                p.add_(delta)  # as the transform comes back (not bit for bit w)
        optimizer.step()
    return model


@pytest.mark.parametrize("cls", [_ExtraGradient, _ExtraGradientWithFallback], ids=["no-finally", "except-exception"])
def test_a_reevaluating_transform_cannot_bypass_the_non_finite_policy_and_its_moved_weights_are_restored(cls):
    """A NaN re-evaluation ends the step from inside ctx.reevaluate(): an ``except Exception``
    around it did swallow that (the step went on and wrote NaN weights, no skip counted), and a
    transform without ``finally`` left the weights at w - gamma g though the step was skipped."""
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[cls()])
    optimizer.step(make_closure(model, optimizer))
    before = Before(model, optimizer)
    with pytest.warns(RuntimeWarning, match="second evaluation are not finite"):
        optimizer.step(make_closure(model, optimizer, lambda n: poison(model, math.nan) if n == 2 else None))
    assert optimizer.skipped_steps == 1
    before.assert_unchanged()
    optimizer.non_finite = "raise"
    with pytest.raises(FloatingPointError, match="second evaluation are not finite"):
        optimizer.step(make_closure(model, optimizer, lambda n: poison(model, math.nan) if n == 2 else None))
    before.assert_unchanged()
    # The run goes on as if the skipped steps had not been tried: the reference's two steps.
    optimizer.step(make_closure(model, optimizer))
    for a, b in zip(model.parameters(), _extragradient_reference(2).parameters()):
        assert torch.equal(a, b)


def test_a_reevaluating_transforms_weights_are_restored_when_its_re_evaluation_raises():
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[_ExtraGradient()])
    optimizer.step(make_closure(model, optimizer))
    before = Before(model, optimizer)
    with pytest.raises(Injected, match="closure failed on call 2"):
        optimizer.step(make_closure(model, optimizer, raise_on_call(2)))
    before.assert_unchanged()


def test_writes_weights_before_step_is_derived_for_a_reevaluating_transform_that_does_not_declare_it():
    class Declared(_ExtraGradient):  # puts them back in a finally: its own word
        writes_weights_before_step = False

        def pre_update(self, ctx):
            pass

    class InheritsTheDeclaration(Declared):  # Declared's pre_update, Declared's declaration
        pass

    class OverridesAgain(Declared):  # a pre_update the declaration does not speak for
        def pre_update(self, ctx):
            pass

    class NoClosure(Transform):  # changes gradients only: not asked
        def pre_update(self, ctx):
            pass

    assert Declared.writes_weights_before_step is False
    assert InheritsTheDeclaration.writes_weights_before_step is False
    assert OverridesAgain.writes_weights_before_step is True
    assert NoClosure.writes_weights_before_step is False
    assert _Reevaluating().writes_weights_before_step is True
    for builtin in (SAM(0.05), ASAM(0.5), LookSAM(0.05), MultiStepSAM(0.05)):  # declared, and copy nothing
        assert builtin.writes_weights_before_step is False


# -- a user's transform that combines gradients: every loop skips the same steps ----------------------
class _Overflowing(Transform):
    """Combines the gradients into non-finite ones when armed (an overflow of its combination)."""

    combines_gradients = True
    saves_state_before_step = True

    def __init__(self):
        self.armed = False

    @torch.no_grad()
    def pre_update(self, ctx):
        for group in ctx.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    entry = ctx.state[param]
                    entry["calls"] = entry.get("calls", 0) + 1  # assigned, so put back on a skip
                    if self.armed:
                        param.grad.mul_(math.inf)

    def scales_with_gradients(self, param_groups):
        return True


@pytest.mark.parametrize(
    "chain,loop",
    [("sam", "closure"), ("sam", "two-call"), ("alone", "closure"), ("alone", "two-call"), ("alone", "no-closure")],
)
def test_a_combining_transform_that_overflows_is_skipped_in_every_loop(chain, loop):
    """``combines_gradients`` was honoured only by step(closure): after SAM in the two-call loop,
    or in step() without a closure, the gradients were checked before the transform ran, and the
    step wrote inf weights."""
    model = make_model()
    combining = _Overflowing()
    transforms = ([SAM(0.05)] if chain == "sam" else []) + [combining]
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=transforms)
    optimizer.step(make_closure(model, optimizer))
    before = Before(model, optimizer)
    combining.armed = True
    evaluation = "first" if loop == "no-closure" or (chain == "alone" and loop == "closure") else "second"
    with pytest.warns(RuntimeWarning, match=rf"^TransformingOptimizer: the gradients of the {evaluation} evaluation, as _Overflowing combined them, are not finite"):
        step_in(loop, model, optimizer)
    assert optimizer.skipped_steps == 1
    before.assert_unchanged()
    # Disarmed, every loop steps as step(closure) does, bit for bit.
    combining.armed = False
    twin_model = make_model()
    twin = TransformingOptimizer(
        twin_model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
        transforms=([SAM(0.05)] if chain == "sam" else []) + [_Overflowing()],
    )  # fmt: skip
    for _ in range(2):
        twin.step(make_closure(twin_model, twin))
    step_in(loop, model, optimizer)
    assert_runs_equal(model, optimizer, twin_model, twin)


@pytest.mark.parametrize(
    "chain,loop",
    [("sam", "closure"), ("sam", "two-call"), ("alone", "closure"), ("alone", "two-call"), ("alone", "no-closure")],
)
def test_a_scale_grad_that_overflows_finite_gradients_skips_the_step_in_every_loop(chain, loop):
    """ScaleGrad maps finite gradients beyond the dtype's range (here twice by 1e300 in float64;
    in float16 a scale of 1e5 on gradients near 1): the step handed inf to the next transform
    (ClipGradNorm: inf * 0 = NaN) and wrote NaN weights with nothing skipped. Now it is checked as
    a combining transform is, and skipped whole."""
    model = make_model()
    transforms = ([SAM(0.05)] if chain == "sam" else []) + [ScaleGrad(1e300), ScaleGrad(1e300), ClipGradNorm(1.0)]
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=transforms)
    optimizer.param_groups[0]["scale_grad_1.grad_scale"] = 1.0  # a first step that stays finite
    optimizer.step(make_closure(model, optimizer))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    optimizer.param_groups[0]["scale_grad_1.grad_scale"] = 1e300
    before = Before(model, optimizer)
    evaluation = "first" if loop == "no-closure" or (chain == "alone" and loop == "closure") else "second"
    with pytest.warns(RuntimeWarning, match=rf"^TransformingOptimizer: the gradients of the {evaluation} evaluation, as ScaleGrad computed them, are not finite"):
        step_in(loop, model, optimizer)
    assert optimizer.skipped_steps == 1
    before.assert_unchanged()


@pytest.mark.parametrize(
    "second_group, checked",
    [({}, False), ({"grad_scale": -1.0}, False), ({"grad_scale": 1.5}, True), ({"grad_scale": -2.0}, True), ({"grad_bias": 0.1}, True)],
)
@pytest.mark.parametrize("loop", ["closure", "two-call"])
def test_scale_grad_checks_its_gradients_only_where_a_group_can_overflow_them(second_group, checked, loop, monkeypatch):
    """|s g| <= |g| for |s| <= 1: ScaleGrad without a bias and with no scale beyond 1 in any group
    cannot take finite gradients beyond the dtype's range, so the step reads them no more for the
    non-finite policy (it read every gradient once more per step); a group with a scale beyond 1
    or a bias is checked, and the steps are the same either way."""
    reads = [0]
    real_all_finite = optim_module.all_finite

    def counting_all_finite(*args, **kwargs):
        reads[0] += 1
        return real_all_finite(*args, **kwargs)

    monkeypatch.setattr(optim_module, "all_finite", counting_all_finite)
    plain_model = make_model()  # SAM's own reads of the gradients, without ScaleGrad
    step_in(loop, plain_model, TransformingOptimizer(plain_model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)]))
    sam_reads, reads[0] = reads[0], 0
    model = make_model()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    groups = [{"params": first, "grad_scale": 0.5}, {"params": second, **second_group}]
    optimizer = TransformingOptimizer(groups, torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), ScaleGrad()])
    assert ScaleGrad().can_overflow_gradients(optimizer.param_groups) is checked
    step_in(loop, model, optimizer)
    assert reads[0] == sam_reads + (1 if checked else 0)
    # The reference: the same step with the check forced (a transform that says it may overflow).
    twin_model = make_model()
    always = ScaleGrad()
    always.can_overflow_gradients = lambda param_groups: True  # type: ignore[method-assign]
    twin = TransformingOptimizer(
        [{"params": list(twin_model.parameters())[:2], "grad_scale": 0.5}, {"params": list(twin_model.parameters())[2:], **second_group}],
        torch.optim.SGD, lr=0.1, transforms=[SAM(0.05), always],
    )  # fmt: skip
    step_in(loop, twin_model, twin)
    assert_runs_equal(model, optimizer, twin_model, twin)


class _AscentRestoringInExcept(Transform):
    """Moves w to w + 0.1 g, re-evaluates, and puts the weights back: after the re-evaluation, or
    in the usual cleanup ``except Exception: restore; raise`` when it raises."""

    needs_closure = True

    def pre_update(self, ctx):
        params = [p for group in ctx.param_groups for p in group["params"] if p.grad is not None]
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=0.1)
        try:
            ctx.reevaluate()
        except Exception:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
            raise
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)

    def init_state(self, ctx):
        pass


class _AscentRestoringInExceptDeclared(_AscentRestoringInExcept):
    writes_weights_before_step = False  # its except puts them back: its own word


@pytest.mark.parametrize(
    "cls, atomic",
    [(_AscentRestoringInExcept, False), (_AscentRestoringInExceptDeclared, True), (_AscentRestoringInExcept, True)],
    ids=["atomic=False", "declared", "derived"],
)
def test_a_transforms_except_exception_cleanup_around_reevaluate_runs_on_a_non_finite_re_evaluation(cls, atomic):
    """The non-finite re-evaluation's exception reaches a transform's ``except Exception: restore;
    raise`` (as a BaseException it passed it by: with no copy of the weights, atomic=False or a
    declared writes_weights_before_step=False, the skipped step left them at w + 0.1 g)."""
    param = nn.Parameter(torch.ones(3))
    optimizer = TransformingOptimizer(torch.optim.SGD([param], lr=0.1), transforms=[cls()], atomic=atomic)
    calls = [0]

    def closure(poisoned):
        calls[0] += 1
        optimizer.zero_grad()
        loss = (param**2).sum() * (math.nan if poisoned and calls[0] == 2 else 1.0)
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="second evaluation are not finite"):
        optimizer.step(lambda: closure(True))
    assert optimizer.skipped_steps == 1
    assert torch.equal(param.detach(), torch.ones(3))
    calls[0] = 0
    optimizer.step(lambda: closure(False))
    # By hand: g at w + 0.1 g = 1.2 is 2.4; w - 0.1 * 2.4.
    torch.testing.assert_close(param.detach(), torch.full((3,), 1.0 - 0.1 * 2.4), rtol=0.0, atol=1e-7)


# -- ASAM and FriendlySAM first in the chain check the first pass themselves ------------------------------------
FIRST_PASS_CHECKERS = {
    "sam": lambda: SAM(0.05),  # the optimizer checks: the reference
    "asam": lambda: ASAM(0.05, eta=0.01),
    "friendly-sam": lambda: FriendlySAM(0.05),
}


def _first_pass_run(name, groups_of, non_finite="skip"):
    """A model, and an optimizer with ``name``'s transform alone, after two steps."""
    model = make_model()
    params = list(model.parameters())
    optimizer = TransformingOptimizer(
        groups_of(params), torch.optim.SGD, lr=0.05, momentum=0.9, transforms=[FIRST_PASS_CHECKERS[name]()], non_finite=non_finite
    )
    for _ in range(2):
        optimizer.step(make_closure(model, optimizer))
    return model, optimizer


FIRST_PASS_GROUPS = {
    "one-group": lambda params: [{"params": params}],
    "in-a-rho-zero-group": lambda params: [{"params": params[:1], "rho": 0.0}, {"params": params[1:]}],
    "every-rho-zero": lambda params: [{"params": params, "rho": 0.0}],
}


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("mode", ["closure", "two-call"])
@pytest.mark.parametrize("groups", list(FIRST_PASS_GROUPS))
@pytest.mark.parametrize("name", ["asam", "friendly-sam"])
def test_a_non_finite_first_pass_with_asam_or_friendly_sam_first_is_skipped_as_with_sam(name, groups, mode, value):
    """First in the chain, ASAM and FriendlySAM check the first pass's gradients themselves (their
    norm of T ⊙ g or g - sigma m is finite only if every gradient is; the optimizer takes no
    global norm before them): a non-finite first-pass gradient, also of a parameter in a rho=0
    group or with every rho 0, skips the step as with SAM: the same warning at the user's line,
    counted, weights and state bit for bit as before, and the next steps equal a twin's."""
    warned = {}
    for which in ("sam", name):
        model, optimizer = _first_pass_run(which, FIRST_PASS_GROUPS[groups])
        twin = _first_pass_run(which, FIRST_PASS_GROUPS[groups])
        before = Before(model, optimizer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            non_finite_step(model, optimizer, mode, "first", value)
        warned[which] = [(str(w.message), w.category, w.filename) for w in caught]
        assert optimizer.skipped_steps == 1
        before.assert_unchanged()
        step_both_normally((model, optimizer), twin)
    assert warned[name] == warned["sam"]
    assert len(warned[name]) == 1 and "first evaluation are not finite: the step is skipped" in warned[name][0][0]
    assert warned[name][0][2] == __file__


@pytest.mark.parametrize("mode", ["closure", "two-call"])
@pytest.mark.parametrize("name", ["asam", "friendly-sam"])
def test_a_non_finite_first_pass_with_asam_or_friendly_sam_first_raises_under_the_raise_policy(name, mode):
    model, optimizer = _first_pass_run(name, FIRST_PASS_GROUPS["in-a-rho-zero-group"], non_finite="raise")
    before = Before(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(FloatingPointError, match=r"the gradients of the first evaluation are not finite: .*non_finite='raise' was set$"):
            non_finite_step(model, optimizer, mode, "first", math.nan)
    assert optimizer.skipped_steps == 0
    before.assert_unchanged()


@pytest.mark.parametrize("mode", ["closure", "two-call"])
@pytest.mark.parametrize("name", ["asam", "friendly-sam"])
def test_asam_or_friendly_sam_first_take_no_global_norm_and_finite_gradients_whose_norm_overflows_step(name, mode, monkeypatch):
    """The optimizer takes no norm of the first pass before them; gradients of 1e308, finite, whose
    norm (2e308) overflows are not a skipped step: the transform warns that it skips the
    perturbation, and the inner optimizer steps with the unperturbed gradients."""
    transform = ASAM(0.1, eta=1.0) if name == "asam" else FriendlySAM(0.1)

    def no_norm():
        raise AssertionError("the first pass's global norm was taken")

    optimizer, weight, messages = _step_on_gradients_whose_norm_overflows(
        [transform], mode, lambda optimizer: monkeypatch.setattr(optimizer, "_grad_norm", no_norm)
    )
    label = type(transform).__name__
    assert len(messages) == 1 and messages[0].startswith(f"{label}: the gradient norm is inf;"), messages
    assert optimizer.skipped_steps == 0
    assert torch.equal(weight.detach(), _sgd_update_of_gradients_whose_norm_overflows())


def test_a_subclass_of_asam_that_overrides_perturb_gets_the_optimizers_first_pass_check():
    """The declaration covers ASAM's own perturb(): a subclass's that does not check the gradients
    still has the optimizer skip a non-finite first pass (and the optimizer takes the norm)."""

    class Unchecked(ASAM):
        def perturb(self, ctx):
            return None

    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.05, transforms=[Unchecked(0.05)])
    before = Before(model, optimizer)
    with pytest.warns(RuntimeWarning, match="first evaluation are not finite: the step is skipped"):
        non_finite_step(model, optimizer, "closure", "first", math.inf)
    assert optimizer.skipped_steps == 1
    before.assert_unchanged()


@pytest.mark.parametrize("mode", ["closure", "two-call"])
@pytest.mark.parametrize("method", ["perturb", "pre_update"])
@pytest.mark.parametrize("name", ["asam", "friendly-sam"])
def test_an_instance_whose_perturb_or_pre_update_is_replaced_gets_the_optimizers_first_pass_check(name, method, mode):
    """The declaration covers the class's own methods: an instance given a perturb or pre_update
    of its own (one that does not check the gradients) still has the optimizer skip a non-finite
    first pass, bit for bit as before."""
    model = make_model()
    transform = FIRST_PASS_CHECKERS[name]()
    setattr(transform, method, lambda ctx: None)  # reads no gradient
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.05, transforms=[transform])
    before = Before(model, optimizer)
    with pytest.warns(RuntimeWarning, match="first evaluation are not finite: the step is skipped"):
        non_finite_step(model, optimizer, mode, "first", math.inf)
    assert optimizer.skipped_steps == 1
    before.assert_unchanged()


@pytest.mark.parametrize("name", ["asam", "friendly-sam"])
def test_a_first_step_pending_after_the_transforms_own_first_pass_check_holds_no_reference_to_the_optimizer(name, no_cyclic_collector):
    """The check handed to the first transform's context is taken back after perturb(): what the
    pending step keeps (FriendlySAM's commit of its averages holds the context) must not hold the
    optimizer, which is then freed by reference counts alone once the user drops it."""
    import weakref

    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.05, transforms=[FIRST_PASS_CHECKERS[name]()])
    closure = make_closure(model, optimizer)
    closure()
    optimizer.first_step()
    assert optimizer._pending is not None
    dropped = weakref.ref(optimizer)
    del optimizer, closure
    assert dropped() is None


@pytest.mark.parametrize("name", ["asam", "friendly-sam"])
def test_asam_or_friendly_sam_first_under_first_pass_context_skip_a_step_another_rank_found_non_finite(name, monkeypatch):
    """With first_pass_context (m-sharpness) the ranks agree on the first pass's verdict before the
    chain, so the optimizer checks it, not the transform: finite gradients here and non-finite
    ones on another rank (the all-reduced vote, simulated) skip the step here too, bit for bit."""
    votes = []

    def another_rank_non_finite(flag, first_pass_context, device):
        votes.append(flag)
        return True

    monkeypatch.setattr(optim_module, "_on_any_rank", another_rank_non_finite)
    model = make_model()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.05, transforms=[FIRST_PASS_CHECKERS[name]()], first_pass_context=contextlib.nullcontext
    )
    before = Before(model, optimizer)
    with pytest.warns(RuntimeWarning, match="first evaluation on another rank are not finite: the step is skipped"):
        optimizer.step(make_closure(model, optimizer))
    assert votes == [False] and optimizer.skipped_steps == 1
    before.assert_unchanged()


@pytest.mark.parametrize("mode", ["closure", "two-call"])
@pytest.mark.parametrize("name", ["asam", "friendly-sam"])
def test_a_non_finite_very_first_pass_with_asam_or_friendly_sam_first_leaves_no_state_behind(name, mode):
    """At the optimizer's first step (no state yet) the transform's own first-pass check skips the
    step with the state as it was: empty (FriendlySAM's look-up of its averages made empty entries
    that first_step() kept), and the next steps equal those of a twin that never took it."""

    def fresh():
        model = make_model()
        return model, TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, transforms=[FIRST_PASS_CHECKERS[name]()])

    (model, optimizer), twin = fresh(), fresh()
    with pytest.warns(RuntimeWarning, match="first evaluation are not finite: the step is skipped"):
        non_finite_step(model, optimizer, mode, "first", math.nan)
    assert optimizer.skipped_steps == 1 and len(optimizer.state) == 0
    step_both_normally((model, optimizer), twin)


def test_a_non_finite_sparse_first_pass_gradient_with_asam_first_is_skipped_before_it_is_refused():
    """A sparse gradient is refused by ASAM (RuntimeError); a non-finite one skips the step first,
    as the optimizer's own check did before the chain."""
    embedding = nn.Embedding(5, 3, sparse=True)
    optimizer = TransformingOptimizer(embedding.parameters(), torch.optim.SGD, lr=0.1, transforms=[ASAM(0.05)])
    weights = embedding.weight.detach().clone()

    def closure(value):
        def evaluate():
            optimizer.zero_grad()
            loss = embedding(torch.tensor([1, 2])).sum() * value
            loss.backward()
            return loss

        return evaluate

    with pytest.warns(RuntimeWarning, match="first evaluation are not finite: the step is skipped"):
        optimizer.step(closure(math.inf))
    assert optimizer.skipped_steps == 1 and torch.equal(embedding.weight, weights)
    with pytest.raises(RuntimeError, match="ASAM does not support sparse gradients"):
        optimizer.step(closure(1.0))
    assert torch.equal(embedding.weight, weights)
