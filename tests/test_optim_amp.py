"""Mixed precision: SAM with ``torch.autocast`` and ``torch.amp.GradScaler`` (the documented recipe).

The recipe (:func:`amp_sam_step`) uses ``first_step()`` / ``scaler.step(optimizer)``:
``TransformingOptimizer`` sets ``_step_supports_amp_scaling``, so GradScaler hands it
``grad_scale`` and ``found_inf`` and calls its ``step()`` even after an overflow; ``step()``
restores the weights moved by ``first_step()`` and then unscales and steps, or skips.
The first pass needs no unscaling: SAM's and ASAM's perturbations divide by a norm of the
gradient, so the loss scale cancels.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from samgria import (
    ASAM,
    EMA,
    ClampGrad,
    GSAM,
    LAMP,
    SAM,
    WSAM,
    ClipGradNorm,
    GradSign,
    Lookahead,
    LookSAM,
    MultiStepSAM,
    NormalizeGrad,
    ParamTransform,
    Perturbation,
    PerturbationTransform,
    ProjectParams,
    ScaleGrad,
    SparsifyGrad,
    TransformingOptimizer,
)

SCALE = 2.0**10  # a power of two: scaling and unscaling are exact in floating point


def amp_sam_step(
    model: nn.Module,
    optimizer: TransformingOptimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """One SAM step with mixed precision: the recipe as the docs show it."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model(inputs), targets)
    scaler.scale(loss).backward()
    optimizer.first_step(zero_grad=True)  # w -> w + e; the loss scale cancels in e

    with torch.autocast("cpu", dtype=torch.bfloat16):
        perturbed_loss = loss_fn(model(inputs), targets)
    scaler.scale(perturbed_loss).backward()
    scaler.step(optimizer)  # restores w, then unscales and steps -- or skips on inf/NaN
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# -- helpers ---------------------------------------------------------------------------------------
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _batch(index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + index)
    return torch.randn(12, 6, generator=generator), torch.randint(0, 3, (12,), generator=generator)


def _optimizer(model: nn.Module, transform: str = "SAM") -> TransformingOptimizer:
    chain = [SAM(rho=0.1)] if transform == "SAM" else [ASAM(rho=0.5, eta=0.01)]
    return TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=chain)


def _scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)


def _snapshot(model: nn.Module, optimizer: TransformingOptimizer) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.inner.state_dict())


def _assert_untouched(model: nn.Module, optimizer: TransformingOptimizer, snapshot: tuple) -> None:
    weights, inner_state = snapshot
    for before, param in zip(weights, model.parameters()):
        assert torch.equal(param, before), "the weights changed on a skipped step"
    after = optimizer.inner.state_dict()
    assert after["state"].keys() == inner_state["state"].keys()
    for index, state in inner_state["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(after["state"][index][key]), torch.as_tensor(value)), key


class GradInjector:
    """Puts a non-finite value into one parameter's gradient on chosen backward passes (0, 1, ...)."""

    def __init__(self, param: torch.Tensor, passes: set[int], value: float = math.inf) -> None:
        self.passes = passes
        self.value = value
        self.calls = 0
        self.handle = param.register_hook(self._hook)

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        index, self.calls = self.calls, self.calls + 1
        if index in self.passes:
            grad = grad.clone()
            grad.view(-1)[0] = self.value
        return grad


# -- (a) both passes are unscaled correctly -------------------------------------------------------
@pytest.mark.parametrize("transform", ["SAM", "ASAM"])
def test_scaled_steps_equal_unscaled_steps_bit_for_bit(transform: str) -> None:
    scaled_model, plain_model = _model(), _model()
    scaled_opt, plain_opt = _optimizer(scaled_model, transform), _optimizer(plain_model, transform)
    scaler = _scaler()
    loss_fn = nn.functional.cross_entropy
    for step in range(3):
        x, y = _batch(step)
        amp_sam_step(scaled_model, scaled_opt, scaler, loss_fn, x, y)

        # The same loop without a scaler.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(plain_model(x), y)
        loss.backward()
        plain_opt.first_step(zero_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(plain_model(x), y)
        loss.backward()
        plain_opt.second_step(zero_grad=True)

    assert scaler.get_scale() == SCALE, "no overflow, no growth yet: the scale is unchanged"
    for scaled, plain in zip(scaled_model.parameters(), plain_model.parameters()):
        assert torch.equal(scaled, plain)
    initial = _model()
    assert not torch.equal(next(scaled_model.parameters()), next(initial.parameters())), "it trained"


def test_scaled_sam_step_matches_a_hand_written_reference() -> None:
    """SGD (lr=0.1, no momentum) + SAM(rho=0.1), one step, computed by hand under autocast."""
    model = _model()
    reference = _model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(rho=0.1)])
    x, y = _batch()
    amp_sam_step(model, optimizer, _scaler(), nn.functional.cross_entropy, x, y)

    weights = [p.detach().clone() for p in reference.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(reference(x), y)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    with torch.no_grad():
        for param, grad in zip(reference.parameters(), grads):
            param.add_(grad, alpha=0.1 / norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(reference(x), y)
    perturbed_grads = torch.autograd.grad(loss, list(reference.parameters()))
    for param, weight, grad in zip(model.parameters(), weights, perturbed_grads):
        torch.testing.assert_close(param.detach(), weight - 0.1 * grad, rtol=1e-6, atol=1e-7)


# -- (b) an overflow skips the step -----------------------------------------------------------------
def _warm_up() -> tuple[nn.Module, TransformingOptimizer, torch.amp.GradScaler]:
    """A model, optimizer and scaler after one clean step (so momentum buffers exist)."""
    model = _model()
    optimizer = _optimizer(model)
    scaler = _scaler()
    amp_sam_step(model, optimizer, scaler, nn.functional.cross_entropy, *_batch())
    return model, optimizer, scaler


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("overflow_pass", [0, 1], ids=["first-pass", "second-pass"])
def test_overflow_in_one_pass_skips_the_step(overflow_pass: int, value: float) -> None:
    model, optimizer, scaler = _warm_up()
    snapshot = _snapshot(model, optimizer)
    storages = [p.data_ptr() for p in model.parameters()]
    injector = GradInjector(model[2].weight, passes={overflow_pass}, value=value)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        amp_sam_step(model, optimizer, scaler, nn.functional.cross_entropy, *_batch(1))

    # The scaler's verdict rules: it skips the step and backs off, silently, as for any optimizer;
    # the optimizer's own non-finite policy (warning, counter) does not apply on top of it.
    messages = [str(w.message) for w in caught]
    assert messages == []
    assert optimizer.skipped_steps == 0
    assert injector.calls == 2
    _assert_untouched(model, optimizer, snapshot)
    assert [p.data_ptr() for p in model.parameters()] == storages, "the original tensors are back"
    assert scaler.get_scale() == SCALE / 2, "the scaler backs off"

    # The next clean step goes through, with the backed-off scale.
    injector.handle.remove()
    amp_sam_step(model, optimizer, scaler, nn.functional.cross_entropy, *_batch(2))
    assert not torch.equal(next(model.parameters()), snapshot[0][0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_overflowing_batch_skips_the_step() -> None:
    """A batch whose forward overflows (not an injected gradient): skipped, the scaler backs off."""
    model, optimizer, scaler = _warm_up()
    snapshot = _snapshot(model, optimizer)
    x, y = _batch(1)
    x[0, 0] = 3e38  # the bfloat16 matmul overflows to inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scaler skips silently
        amp_sam_step(model, optimizer, scaler, nn.functional.cross_entropy, x, y)
    assert optimizer.skipped_steps == 0
    _assert_untouched(model, optimizer, snapshot)
    assert scaler.get_scale() == SCALE / 2


# -- (c) an LR scheduler after the step does not warn ---------------------------------------------
def test_lr_scheduler_after_scaled_steps_does_not_warn() -> None:
    model = _model()
    optimizer = _optimizer(model)
    scaler = _scaler()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    injector = GradInjector(model[2].weight, passes={1})  # the very first step overflows: skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            amp_sam_step(model, optimizer, scaler, nn.functional.cross_entropy, *_batch(step))
            scheduler.step()
    assert injector.calls == 6
    assert scaler.get_scale() == SCALE / 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert optimizer.inner.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


# -- a step that raises leaves nothing of the scaler behind ---------------------------------------
class _FailingOnceSGD(torch.optim.SGD):
    """SGD whose next step raises once it is armed (an out-of-memory error, say). The switch lives
    outside the optimizer: a failed step puts back the attributes of an inner optimizer that is
    not torch's own, so a flag on the instance would be armed again."""

    armed: set[int] = set()  # ids of the optimizers whose next step raises

    @torch.no_grad()
    def step(self, closure=None):
        if id(self) in self.armed:
            self.armed.discard(id(self))
            raise RuntimeError("out of memory (injected)")
        return super().step(closure)


@pytest.mark.parametrize("failure", ["inner step", "bad group value"])
def test_a_scaled_step_that_raises_leaves_no_scaler_attributes_and_training_continues_like_a_twin(failure: str) -> None:
    """GradScaler.step sets found_inf and grad_scale on the optimizer and deletes them only after
    step() returns: a step that raises must drop them, or the next steps are unscaled twice (or,
    without a scaler, divided by the stale scale)."""
    runs = []
    for _ in range(2):
        model = _model()
        optimizer = TransformingOptimizer(model.parameters(), _FailingOnceSGD, lr=0.1, momentum=0.9, transforms=[SAM(rho=0.1)])
        runs.append((model, optimizer, _scaler()))
    (model, optimizer, scaler), (twin_model, twin, twin_scaler) = runs
    inputs, targets = _batch()
    loss_fn = nn.functional.cross_entropy
    if failure == "inner step":  # in the step that finishes a first_step()
        scaler.scale(loss_fn(model(inputs), targets)).backward()
        optimizer.first_step(zero_grad=True)
        scaler.scale(loss_fn(model(inputs), targets)).backward()
        _FailingOnceSGD.armed.add(id(optimizer.inner))
        with pytest.raises(RuntimeError, match=r"out of memory \(injected\)"):
            scaler.step(optimizer)
    else:  # refused by the group check, before anything else
        scaler.scale(loss_fn(model(inputs), targets)).backward()
        optimizer.param_groups[0]["rho"] = -1.0
        with pytest.raises(ValueError, match=r"rho must be a finite number >= 0, got -1\.0"):
            scaler.step(optimizer)
        optimizer.param_groups[0]["rho"] = 0.1
    assert "found_inf" not in vars(optimizer) and "grad_scale" not in vars(optimizer)
    scaler.update()  # no overflow was found: the scale stays (growth_interval=1000)
    assert scaler.get_scale() == twin_scaler.get_scale() == SCALE
    optimizer.zero_grad()
    for index in range(1, 3):  # the recipe goes on, then the plain loop without a scaler
        inputs, targets = _batch(index)
        amp_sam_step(model, optimizer, scaler, loss_fn, inputs, targets)
        amp_sam_step(twin_model, twin, twin_scaler, loss_fn, inputs, targets)
    for mdl, opt in ((model, optimizer), (twin_model, twin)):
        loss_fn(mdl(inputs), targets).backward()
        opt.first_step(zero_grad=True)
        loss_fn(mdl(inputs), targets).backward()
        opt.second_step(zero_grad=True)
    for got, want in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(got, want)


class _PostStepOnly(ParamTransform):
    """A constraint after the step: its pre_update leaves the gradients alone."""

    def post_step_transform_(self, param, group):
        param.clamp_(-10.0, 10.0)


class _PreStepHook(ParamTransform):
    """A pre-step hook that adds to the gradients (not scale-equivariant)."""

    def pre_step_transform_(self, param, group):
        param.grad.add_(1e-3)


@pytest.mark.parametrize(
    "chain,refused",
    [
        (lambda: [NormalizeGrad(), WSAM(0.05)], "NormalizeGrad"),
        (lambda: [ClipGradNorm(0.05), GSAM(0.05)], "ClipGradNorm"),
        (lambda: [GradSign(), LookSAM(0.05, k=2)], "GradSign"),
        (lambda: [ScaleGrad(2.0, 1e-3), GSAM(0.05)], "ScaleGrad"),
        (lambda: [ClipGradNorm(0.05), SAM(0.05)], "rounding"),  # SAM uses only their direction
        (lambda: [ScaleGrad(2.0), GSAM(0.05)], None),  # equivariant: 2 g scales with g
        (lambda: [SparsifyGrad(0.5), WSAM(0.05)], None),
        (lambda: [GSAM(0.05), ClipGradNorm(0.05)], None),  # after: acts on the unscaled gradients
        # Transforms whose pre_update leaves the gradients alone:
        (lambda: [LAMP(1e-2, seed=0), GSAM(0.05)], None),
        (lambda: [Lookahead(), WSAM(0.05)], None),
        (lambda: [EMA(), GSAM(0.05)], None),
        (lambda: [ProjectParams(radius=100.0), LookSAM(0.05, k=2)], None),
        (lambda: [_PostStepOnly(), GSAM(0.05)], None),  # a ParamTransform with a post-step hook only
        (lambda: [_PreStepHook(), GSAM(0.05)], "_PreStepHook"),  # may rewrite the gradients
    ],
)
def test_a_transform_before_gsam_wsam_or_looksam_that_does_not_scale_with_the_gradients_is_refused_under_a_loss_scale(chain, refused):
    """In first_step() such a transform acts on the first pass's gradients still multiplied by
    the loss scale, which GSAM, WSAM and LookSAM then mix into the step: a different update,
    silently (|dw| 0.49 against 1.38 for NormalizeGrad before WSAM). It is refused, the weights
    restored; equivariant ones equal the loop without a scaler bit for bit, and before SAM, which
    uses only the direction, clipping changes nothing but rounding."""
    message = rf"mixes the first pass's gradients into the step, and {refused} acted on them"
    refusal = None if refused in (None, "rounding") else message
    scaled = _two_call_step(chain, scaler=_scaler(), momentum=0.9, refusal=refusal)
    if refused is None:
        for got, want in zip(scaled, _two_call_step(chain, momentum=0.9)):
            assert torch.equal(got, want)
    elif refused == "rounding":  # clipping the scaled gradients keeps their direction, up to rounding
        for got, want in zip(scaled, _two_call_step(chain, momentum=0.9)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "chain,groups,refused",
    [
        (lambda: [ClampGrad(-1e-3, 1e-3), SAM(0.05)], 1, "ClampGrad"),
        (lambda: [ScaleGrad(2.0, 1e-3), ASAM(0.5)], 1, "ScaleGrad"),
        (lambda: [ClipGradNorm(0.05), SAM(0.05)], 2, "ClipGradNorm"),  # one factor per group
        (lambda: [_PreStepHook(), SAM(0.05)], 1, "_PreStepHook"),  # may rewrite the gradients
        (lambda: [ClipGradNorm(0.05), SAM(0.05)], 1, None),  # one group: one factor
        (lambda: [NormalizeGrad(), SAM(0.05)], 2, "NormalizeGrad"),  # eps > 0: shares move with s
        (lambda: [GradSign(), ASAM(0.5)], 2, None),
        (lambda: [NormalizeGrad(eps=0.0), SAM(0.05)], 2, None),
        (lambda: [ScaleGrad(2.0), SAM(0.05)], 2, None),
        (lambda: [SparsifyGrad(0.5), ASAM(0.5)], 2, None),
    ],
)
def test_a_transform_before_sam_or_asam_that_changes_the_gradients_direction_with_their_size_is_refused_under_a_loss_scale(
    chain, groups, refused
):
    """SAM and ASAM use only the direction of the gradients they perturb with, but a transform
    before them acting on the first pass's gradients still multiplied by the loss scale changed
    that direction where its result does not follow their size (clipping values, a bias, one
    clipping factor per param group): a different step, silently (0.02 in the weights). It is
    refused, the weights restored; the others equal the loop without a scaler up to rounding."""
    split = _two_groups if groups == 2 else None
    message = rf"perturbs along the direction of the first pass's gradients, and {refused} acted on them"
    refusal = None if refused is None else message
    scaled = _two_call_step(chain, scaler=_scaler(), groups=split, momentum=0.9, refusal=refusal)
    if refused is None:
        for got, want in zip(scaled, _two_call_step(chain, groups=split, momentum=0.9)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def _two_groups(model):
    params = list(model.parameters())
    return [{"params": params[:2]}, {"params": params[2:]}]


class _SeedClip:
    """A seed-protocol object that rescales the gradients, declaring what it keeps."""

    def __init__(self, keeps_direction):
        self.keeps_direction = keeps_direction

    def apply(self, model, loss_fn, batch):
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(0.5)

    def post_step(self, model):
        pass

    def keeps_direction_of_gradients(self, param_groups):
        return self.keeps_direction


def _two_call_step(chain, *, scaler=None, groups=None, momentum=0.0, refusal=None, poison_first=False):
    """One two-call step of SGD on ``_model()`` with ``chain``, finished by ``scaler.step`` (or by
    ``second_step()`` without a scaler); the parameters after it. With ``refusal``, ``scaler.step``
    must raise a ``RuntimeError`` matching it and leave the weights and the state as they were."""
    inputs, targets = _batch()
    model = _model()
    optimizer = TransformingOptimizer(
        groups(model) if groups else model.parameters(), torch.optim.SGD, lr=0.1, momentum=momentum, transforms=chain()
    )
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(inputs), targets)
    scale(loss * float("inf") if poison_first else loss).backward()
    optimizer.first_step(zero_grad=True)
    scale(nn.functional.cross_entropy(model(inputs), targets)).backward()
    if scaler is None:
        optimizer.second_step()
    elif refusal is not None:
        with pytest.raises(RuntimeError, match=refusal):
            scaler.step(optimizer)
        for got, want in zip(model.parameters(), before):
            assert torch.equal(got, want)
        assert not any(optimizer.state.values()) and "found_inf" not in vars(optimizer)
    else:
        scaler.step(optimizer)
        scaler.update()
    return [p.detach().clone() for p in model.parameters()]

def _with_an_idle_group(model):
    params = list(model.parameters())
    idle = nn.Parameter(torch.zeros(3))  # no gradient: not in the loss
    return [{"params": params}, {"params": [idle]}]


@pytest.mark.parametrize(
    "chain,groups",
    [
        (lambda: [ClampGrad(-1e-3, 1e-3), ClipGradNorm(0.1)], None),  # nothing re-evaluates
        (lambda: [ClampGrad(-1e-3, 1e-3), SAM(0.0)], None),  # rho=0: nothing perturbed
        (lambda: [ScaleGrad(2.0, 1e-3), GSAM(0.0)], None),
        (lambda: [ClipGradNorm(0.05), SAM(0.05)], _with_an_idle_group),  # one group with gradients
        (lambda: [_SeedClip(True), SAM(0.05)], None),  # declares that it keeps the direction
    ],
)
def test_a_two_call_step_whose_direction_no_transform_changed_runs_under_a_loss_scale(chain, groups):
    """c9b2b9a refused these with a false message: nothing was perturbed (no SAM, rho=0), the
    only group with gradients has one clipping factor, or the object declares that it keeps the
    direction. They equal the loop without a scaler up to rounding."""
    scaled = _two_call_step(chain, scaler=_scaler(), groups=groups)
    plain = _two_call_step(chain, groups=groups)
    for got, want in zip(scaled, plain):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_a_seed_protocol_object_that_may_change_the_direction_is_named_in_the_refusal():
    refusal = r"and _SeedClip \(seed protocol\) acted on them"
    _two_call_step(lambda: [_SeedClip(False), SAM(0.05)], scaler=_scaler(), refusal=refusal)


def test_a_non_finite_first_pass_under_a_loss_scale_skips_and_backs_off_before_a_clamping_transform():
    """The refusal ran for a step the scaler skips (nothing perturbed): it must skip and back off."""
    scaler = _scaler()
    weights = _two_call_step(lambda: [ClampGrad(-1e-3, 1e-3), SAM(0.05)], scaler=scaler, poison_first=True)
    for got, want in zip(weights, _model().parameters()):
        assert torch.equal(got, want)
    assert scaler.get_scale() == SCALE * scaler.get_backoff_factor()


def _autocast_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


_AUTOCAST_DATA = (torch.randn(8, 6, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 3)


@pytest.mark.parametrize("transform", [SAM, GSAM, LookSAM])
@pytest.mark.parametrize("loop", ["closure", "two_call"])
def test_an_autocast_region_around_the_step_sees_the_moved_weights(transform, loop) -> None:
    """torch.autocast caches its low-precision copy of each weight until the outermost region
    exits: with a region around ``step(closure)`` (or around both passes of the two-call loop),
    the re-evaluation ran at the cached copy of w, not at w + e, so the step was the inner
    optimizer's plain step (silently). Equal, bit for bit, to regions around each forward."""
    x, y = _AUTOCAST_DATA
    results = []
    for outer in (False, True):
        model = _autocast_model()
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.5, transforms=[transform(rho=0.5)])
        losses = []

        def forward() -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            losses.append(loss.item())
            return loss

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = forward()
            loss.backward()
            return loss

        for _ in range(3):
            # (not autocast(enabled=False), which counts as a region: its cache lives on)
            region = torch.autocast("cpu", dtype=torch.bfloat16) if outer else contextlib.nullcontext()
            with region:
                if loop == "closure":
                    optimizer.step(closure)
                else:
                    closure()
                    optimizer.first_step(zero_grad=True)
                    forward().backward()
                    optimizer.second_step(zero_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16) if outer else contextlib.nullcontext():
                forward()  # an evaluation after the step, in the region: the new weights
        results.append(([p.detach().clone() for p in model.parameters()], losses))
    (inner_weights, inner_losses), (outer_weights, outer_losses) = results
    assert inner_losses[0] != inner_losses[1]  # the second pass ran at w + e
    assert outer_losses == inner_losses
    assert all(torch.equal(a, b) for a, b in zip(inner_weights, outer_weights))


@pytest.mark.parametrize("kind", ["ema", "lookahead", "seed_sam"])
def test_weights_swapped_in_an_autocast_region_are_the_ones_evaluated(kind) -> None:
    """EMA's averaged_weights() and Lookahead's slow_weights() inside an autocast region that
    already ran the model evaluated the training weights (autocast's cached copies); so did the
    re-evaluation of a seed-protocol SAM.apply() in such a region."""
    x, y = _AUTOCAST_DATA
    model = _autocast_model()

    def output() -> torch.Tensor:
        return model(x).float()

    if kind == "seed_sam":
        sam = SAM(rho=0.5)
        loss_fn = lambda: nn.functional.cross_entropy(output(), y)  # noqa: E731
        grads = []
        for outer in (False, True):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16) if outer else contextlib.nullcontext():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss_fn().backward()
                sam.apply(model, lambda: _bf16(loss_fn), ())
            grads.append([p.grad.clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads))
        return
    transform = EMA(decay=0.5) if kind == "ema" else Lookahead(k=5, alpha=0.5)
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.5, transforms=[transform])
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(output(), y).backward()
        optimizer.step()
    swap = transform.averaged_weights if kind == "ema" else transform.slow_weights
    with swap(optimizer), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = output()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        training = output()
        with swap(optimizer):
            swapped = output()
        after = output()
    assert not torch.equal(expected, training)
    assert torch.equal(swapped, expected) and torch.equal(after, training)


def _bf16(loss_fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return loss_fn()


@pytest.mark.parametrize("first_pass_reaches_extra", [True, False])
def test_clip_grad_norms_groups_with_gradients_are_counted_in_the_first_pass_it_clipped(first_pass_reaches_extra):
    """The refusal asked ClipGradNorm which groups have gradients after the second backward: a
    group with gradients only in the first pass (two clipping factors there) passed, and the step
    differed from the loop without a scaler (2e-3); one with gradients only in the second pass
    (one factor in the first) was refused."""
    inputs, targets = _batch()

    def run(scaler):
        model = _model()
        extra = nn.Parameter(torch.ones(3))
        optimizer = TransformingOptimizer(
            [{"params": list(model.parameters())}, {"params": [extra]}], torch.optim.SGD, lr=0.1,
            transforms=[ClipGradNorm(1e-3), SAM(0.05)],
        )  # fmt: skip
        scale = scaler.scale if scaler is not None else (lambda loss: loss)
        loss = nn.functional.cross_entropy(model(inputs), targets)
        scale(loss + (extra**2).sum() if first_pass_reaches_extra else loss).backward()
        optimizer.first_step(zero_grad=True)
        loss = nn.functional.cross_entropy(model(inputs), targets)
        scale(loss if first_pass_reaches_extra else loss + (extra**2).sum()).backward()
        if scaler is None:
            optimizer.second_step()
        elif first_pass_reaches_extra:
            with pytest.raises(RuntimeError, match=r"and ClipGradNorm acted on them"):
                scaler.step(optimizer)
            return None
        else:
            scaler.step(optimizer)
        return [p.detach().clone() for p in [*model.parameters(), extra]]

    scaled = run(_scaler())
    if scaled is not None:
        for got, want in zip(scaled, run(None)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_normalize_grad_with_eps_only_on_a_group_without_gradients_keeps_the_direction():
    def chain():
        return [NormalizeGrad(eps=1e-12), SAM(0.05)]

    scaled = _two_call_step(chain, scaler=_scaler(), groups=_eps_zero_but_idle)
    plain = _two_call_step(chain, groups=_eps_zero_but_idle)
    for got, want in zip(scaled, plain):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def _eps_zero_but_idle(model):
    return [{"params": list(model.parameters()), "eps": 0.0}, {"params": [nn.Parameter(torch.zeros(3))]}]


# -- a user's perturbation whose move depends on the size of the gradients --------------------------
class _UnnormalizedSAM(PerturbationTransform):
    r"""A researcher's unnormalised SAM, :math:`e = \rho\,g` (its move grows with the loss scale):
    declares it with ``Perturbation(..., scale_dependent=True)``."""

    def __init__(self, rho=0.05):
        self.rho = rho

    def group_defaults(self):
        return {"rho": self.rho}

    @torch.no_grad()
    def perturb(self, ctx):
        moves = []
        for group in ctx.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                backup = param.detach().clone()
                param.add_(param.grad, alpha=group["rho"])
                moves.append((param, backup, backup, False))
        return Perturbation(moves, scale_dependent=True) if moves else None


def test_a_perturbation_that_declares_its_move_scale_dependent_is_refused_under_a_loss_scale():
    """Undeclared, such a move was silently multiplied by the loss scale under GradScaler's two-call
    loop (9144 off the reference after three steps); declared, scaler.step refuses it, as it
    refuses MultiStepSAM(normalize=False), with the weights restored."""
    refusal = r"^_UnnormalizedSAM computed its move in first_step\(\) from the size of the first pass's gradients.*scale_dependent=True"
    _two_call_step(lambda: [_UnnormalizedSAM(0.05)], scaler=_scaler(), refusal=refusal)
    # Without a scaler the two-call loop takes the move as declared: the hand-written reference.
    inputs, targets = _batch()
    model = _model()
    with torch.no_grad():
        backup = [p.detach().clone() for p in model.parameters()]
    model.zero_grad()
    nn.functional.cross_entropy(model(inputs), targets).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=0.05)
    model.zero_grad()
    nn.functional.cross_entropy(model(inputs), targets).backward()
    with torch.no_grad():
        for p, b in zip(model.parameters(), backup):
            p.copy_(b)
            p.sub_(p.grad, alpha=0.1)
    for got, want in zip(_two_call_step(lambda: [_UnnormalizedSAM(0.05)]), model.parameters()):
        assert torch.equal(got, want)


def test_perturbations_are_scale_independent_unless_declared_and_multi_step_sam_declares_through_the_same_keyword():
    assert Perturbation([]).scale_dependent is False
    assert Perturbation([], scale_dependent=True).scale_dependent is True
    _two_call_step(
        lambda: [MultiStepSAM(0.05, normalize=False)], scaler=_scaler(), refusal=r"scale_dependent=True.*use normalize=True"
    )


@pytest.mark.parametrize("positional", [True, False], ids=["positional", "keyword"])
@pytest.mark.parametrize("chain", [lambda: [SAM(rho=0.1)], lambda: [ClipGradNorm(1.0)]], ids=["SAM", "ClipGradNorm"])
def test_a_disabled_scaler_passes_a_closure_on_like_a_plain_step(chain, positional):
    """GradScaler(enabled=False) (the ``enabled=use_amp`` idiom) hands step() its arguments
    untouched, as torch.optim's optimizers take them; its step(closure) was refused as if the
    scaler had unscaled the gradients. It now steps as step(closure) without the scaler."""
    inputs, targets = _batch()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    results = []
    for through_scaler in (True, False):
        model = _model()
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=chain())

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            return loss

        for _ in range(2):
            if not through_scaler:
                optimizer.step(closure)
            elif positional:
                scaler.step(optimizer, closure)
            else:
                scaler.step(optimizer, closure=closure)
        results.append([p.detach().clone() for p in model.parameters()])
    assert not torch.equal(results[1][0], _model()[0].weight), "it trained"
    for got, want in zip(*results):
        assert torch.equal(got, want)


def _half_regression() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=generator).half(), (10 * torch.randn(32, 1, generator=generator)).half()
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).half(), x, y


def _mse_step_in(loop: str, model: nn.Module, optimizer: TransformingOptimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One step of ``loop`` on the mean squared error, without a scaler: ``step(closure)``
    (``"closure"``), or ``first_step()``/``second_step()`` after each backward (``"two-call"``)."""
    if loop == "closure":

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    else:
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.second_step(zero_grad=True)


def test_scale_grad_overflowing_the_scaled_first_pass_before_sam_is_an_overflow_the_scaler_skips():
    """[ScaleGrad(100), SAM] on float16 weights under GradScaler: ScaleGrad takes the loss-scaled
    first pass beyond 65504. first_step() did not check it: SAM warned "the gradient norm is inf",
    perturbed nothing, and the step went on as a plain SGD step on the second pass (every step: the
    scaler never backed off). Now the gradients are kept, so the scaler skips and backs off, with
    the weights and state untouched, and nothing warns."""
    model, x, y = _half_regression()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=1e-4, transforms=[ScaleGrad(100.0), SAM(0.05)])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        optimizer.first_step(zero_grad=True)
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not any(optimizer.state.values())


def test_scale_grad_overflowing_before_sam_skips_the_two_call_step_as_step_closure_does():
    """Without a scaler the two-call step was skipped too, but after SAM's "the gradient norm is
    inf" and as a non-finite second evaluation; step(closure) says once that ScaleGrad computed
    the first evaluation's gradients beyond the range. Both loops now say the same."""
    messages = []
    for loop in ("closure", "two-call"):
        model, x, y = _half_regression()
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=1e-4, transforms=[ScaleGrad(1e5), SAM(0.05)])
        before = [p.detach().clone() for p in model.parameters()]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _mse_step_in(loop, model, optimizer, x, y)
        messages.append([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
        assert optimizer.skipped_steps == 1
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    expected = (
        "TransformingOptimizer: the gradients of the first evaluation, as ScaleGrad computed them, are not finite: "
        "the step is skipped (weights and optimizer state unchanged)"
    )
    assert messages == [[expected], [expected]]


@pytest.mark.parametrize("atomic", [True, False])
def test_an_overflow_before_sam_leaves_a_weight_writing_hook_as_step_closure_does(atomic):
    """A pre-step hook that writes the weights, before a ScaleGrad that overflows the first pass:
    with atomic=False step(closure) skips the step with the hook's write kept (it copies nothing;
    "only the pre-step phase is undone, without the weights of a transform that writes them"),
    but first_step() copied the weights anyway and put them back, so the two loops left different
    weights. Both now leave what step(closure) leaves (with atomic=True: the weights from before)."""

    class Shrink(ParamTransform):
        def pre_step_transform_(self, param, group):
            param.mul_(0.5)

    results = []
    for loop in ("closure", "two-call"):
        model, x, y = _half_regression()
        model.float()
        x, y = x.float(), y.float()
        optimizer = TransformingOptimizer(
            model.parameters(), torch.optim.SGD, lr=1e-4, atomic=atomic, transforms=[Shrink(), ScaleGrad(1e38), SAM(0.05)]
        )
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.warns(RuntimeWarning, match=r"^TransformingOptimizer: the gradients of the first evaluation, as ScaleGrad computed them, are not finite"):
            _mse_step_in(loop, model, optimizer, x, y)
        assert optimizer.skipped_steps == 1
        results.append([p.detach().clone() for p in model.parameters()])
    expected = before if atomic else [b * 0.5 for b in before]  # the hook's one write, kept
    for closure_weights, two_call_weights, want in zip(*results, expected):
        assert torch.equal(closure_weights, want)
        assert torch.equal(two_call_weights, want)
