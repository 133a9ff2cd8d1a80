"""Hugging Face accelerate: SAM's two-call loop and float16 mixed precision on prepared optimizers.

``accelerate.Accelerator().prepare(optimizer)`` wraps a samgria optimizer in an
``AcceleratedOptimizer``: ``step(closure)`` works through it (without a loss scaler), but it has
no ``first_step`` / ``second_step`` (calling them raises accelerate's ``AttributeError``), and
under ``mixed_precision="fp16"`` its ``step(closure)`` hands the closure to ``GradScaler.step``,
which cannot scale and unscale the passes the closure runs (the optimizer refuses that before
anything changes). A :class:`SAMAcceleratedOptimizer` adds both. Two ways to get one:

* :class:`SAMAccelerator`, an ``Accelerator`` whose ``prepare`` returns one for every samgria
  optimizer;
* :func:`sam_accelerated`, for an optimizer prepared by an ``Accelerator`` you cannot replace (your
  own subclass, or one another library builds):
  ``optimizer = sam_accelerated(accelerator.prepare(optimizer))``.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from samgria._checks import check_bool
from samgria._frameworks import grad_scaler_forget, grad_scaler_scale, grad_scaler_unscaled, scheduler_wrapped_step
from samgria.integrations._common import (
    clipping_refusal,
    find_transforming,
    first_pass_overflowed,
    missing_base,
    reevaluating,
    two_call_refusal,
)
from samgria.optim import TransformingOptimizer

try:
    # accelerate ships no type information (no py.typed marker, no stubs)
    from accelerate import Accelerator  # type: ignore[import-untyped]
    from accelerate.optimizer import AcceleratedOptimizer  # type: ignore[import-untyped]
    from accelerate.utils import DistributedType  # type: ignore[import-untyped]
except ImportError as _error:  # importable and documented without accelerate; using it raises
    Accelerator = AcceleratedOptimizer = missing_base("accelerate", _error)  # type: ignore[misc]
    DistributedType = None  # type: ignore[assignment,misc]

__all__ = ["SAMAccelerator", "SAMAcceleratedOptimizer", "sam_accelerated"]


class SAMAcceleratedOptimizer(AcceleratedOptimizer):
    """accelerate's ``AcceleratedOptimizer`` around a samgria optimizer, with SAM's two-call loop.

    :class:`SAMAccelerator` returns one from ``prepare``, and :func:`sam_accelerated` turns a
    stock prepared optimizer into one (it is the ``AcceleratedOptimizer`` accelerate built,
    nothing copied). On top of accelerate's:

    * :meth:`first_step`, :meth:`second_step` and :meth:`cancel_step` as on
      :class:`~samgria.TransformingOptimizer`; ``second_step`` goes through accelerate's
      ``step()``, so under ``mixed_precision="fp16"`` the loss scaler finishes the step (it
      restores the weights and steps, or skips on an overflow and backs off);
    * ``step(closure)`` under ``"fp16"`` runs the two passes itself (closure, ``first_step()``,
      closure, the scaler's step), each scaled by ``accelerator.backward``; accelerate's clipping
      in the closure (which unscales under ``"fp16"``) clips each pass, as without a scaler, and
      so does clipping after each backward of the two-call loop;
    * ``step(closure)`` returns the loss of the first evaluation;
    * ``step_was_skipped`` is true after a step the loss scaler skipped, and after one the
      optimizer's non-finite policy skipped (so neither advances a prepared LR scheduler).

    Both passes must see the whole batch, so ``first_step()`` and ``step(closure)`` refuse to run
    on a micro-batch that accelerate does not synchronise (inside ``accelerator.accumulate()``
    before the last micro-batch, where accelerate's step does nothing). Loop over the
    micro-batches yourself instead, in both passes (``accelerator.no_sync(model)`` around all but
    the last backward of each pass), e.g. inside the closure of ``step(closure)``; this works
    with any ``gradient_accumulation_steps`` as long as ``accumulate()`` is not used
    (``accelerator.backward`` divides each micro-batch's loss by ``gradient_accumulation_steps``).
    """

    #: Read by the optimizer's net for framework accumulation (``samgria._frameworks``): this
    #: wrapper refuses ``step(closure)`` on every micro-batch ``accumulate()`` does not step
    #: (:meth:`_check_synchronised`) before handing the closure on, so the closure it hands on is
    #: not refused for ``gradient_accumulation_steps > 1``.
    _samgria_refuses_unsynchronised = True

    @property
    def sam(self) -> TransformingOptimizer:
        """The samgria optimizer inside."""
        found = find_transforming(self.optimizer)
        assert found is not None
        return found

    def _check_synchronised(self, action: str) -> None:
        if not self.gradient_state.sync_gradients:
            raise RuntimeError(
                f"{action} on a micro-batch that accelerate does not synchronise (inside "
                "accelerator.accumulate() before the last micro-batch, where accelerate's step does "
                "nothing): SAM's two passes must each see every micro-batch. Do not use "
                "accumulate() with SAM; loop over the micro-batches inside one step instead (see the "
                "samgria docs, Integrations)"
            )

    def first_step(self, zero_grad: bool = False) -> None:
        """:meth:`samgria.TransformingOptimizer.first_step`, on a synchronised micro-batch only.

        Under ``"fp16"``, gradients that accelerate's clipping (``accelerator.clip_grad_norm_``,
        ``clip_grad_value_``) unscaled after the first backward are put back into the loss scale
        (an overflow the scaler found there into non-finite gradients), and the scaler unscales
        again after the second backward: clipping after each backward clips each pass.
        """
        check_bool("zero_grad", zero_grad)  # before the gradients are put back into the scale
        self._check_synchronised("first_step()")
        self._record_scale()
        self._rescale_unscaled_first_pass()
        self.sam.first_step(zero_grad)

    def second_step(self, zero_grad: bool = False) -> None:
        """Finish the step through accelerate's ``step()`` (and its loss scaler under fp16)."""
        zero_grad = check_bool("zero_grad", zero_grad)
        sam = self.sam
        if sam._pending is None:
            raise RuntimeError("second_step() called without first_step()")
        if not self.gradient_state.sync_gradients:
            self.cancel_step()  # the weights back at w: accelerate's step would do nothing
            self._check_synchronised("second_step()")
        self.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def cancel_step(self) -> None:
        """:meth:`samgria.TransformingOptimizer.cancel_step`; under ``"fp16"`` the loss scaler
        forgets that it unscaled this step's gradients (it unscales the next step's)."""
        self.sam.cancel_step()
        self._forget_unscaling()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """accelerate's ``step``; with a closure, SAM's step on it (see the class docstring)."""
        sam = self.sam
        # first_step() skips nothing: a two-call step is judged (and counted) when step() finishes it
        skipped = sam.skipped_steps
        self._sam_policy_skipped = False
        self._sam_stepping = True
        try:
            return self._sam_step(sam, closure)
        finally:
            self._sam_stepping = False
            self._sam_policy_skipped = sam.skipped_steps > skipped

    def _sam_step(self, sam: TransformingOptimizer, closure: Callable[[], Any] | None) -> Any:
        if closure is None or sam._pending is not None or not reevaluating(sam):
            self._record_scale()
            return super().step(closure)
        self._check_synchronised("step(closure)")
        if self.scaler is None:
            losses: list[Any] = []

            def recording() -> Any:
                result = closure()
                losses.append(result)
                return result

            super().step(recording)
            return _detached(losses[0]) if losses else None
        # GradScaler cannot run a closure: the two passes here, each scaled by accelerator.backward.
        refusal = two_call_refusal(sam, "SAMAcceleratedOptimizer.step(closure) under a loss scaler")
        if refusal is not None:  # before the closure runs: nothing has changed
            raise RuntimeError(refusal)
        self._record_scale()
        try:
            with torch.enable_grad():
                loss = closure()
            self._rescale_unscaled_first_pass()  # a closure that clips (accelerate's clipping unscales)
            sam.first_step()
        except BaseException:
            self._forget_unscaling()
            raise
        if not first_pass_overflowed(sam):  # else the kept inf gradients make the scaler skip
            try:
                with torch.enable_grad(), sam._enter(sam.reevaluation_context):
                    closure()
            except BaseException:
                self.cancel_step()
                raise
        super().step()
        return _detached(loss)

    def _rescale_unscaled_first_pass(self) -> None:
        """Before ``first_step()``: when the loss scaler has unscaled the first pass's gradients
        (accelerate's ``clip_grad_norm_`` and ``clip_grad_value_`` do under ``"fp16"``), put them
        back into the loss scale and let the scaler forget it unscaled them.

        ``GradScaler`` unscales once per step: the second pass's clipping would raise, and
        without it ``scaler.step`` would step with the second pass's gradients still scaled (an
        update the loss scale times too large). ``first_step()`` and the step the scaler finishes
        take the first pass's gradients in the loss scale (GSAM, WSAM and LookSAM mix them into the
        update); unscaling and rescaling are exact for a scale that is a power of two
        (GradScaler's defaults keep it one; an ``init_scale`` or ``growth_factor`` that is not
        may cost a rounding). An overflow the scaler found there (which clipping by value may
        have clamped to finite values) becomes non-finite gradients, which ``first_step()``
        keeps, so that the scaler skips the step.
        """
        found_inf = grad_scaler_unscaled(self.scaler, self.optimizer)
        if found_inf is None:
            return
        scale = grad_scaler_scale(self.scaler)  # what unscale_ divided by (a 0-dim tensor)
        self.sam._mul_grads_(torch.where(found_inf == 0, scale, torch.full_like(scale, math.nan)))
        self._forget_unscaling()

    def _forget_unscaling(self) -> None:
        """Let the loss scaler forget what it recorded for this optimizer (under the optimizer
        accelerate unwraps to: ``self.optimizer``) since its last ``update()``: for a step
        abandoned before the scaler stepped, so that the next step's gradients are unscaled, and
        for a first pass put back into the loss scale."""
        if self.scaler is not None:
            grad_scaler_forget(self.scaler, self.optimizer)

    def _record_scale(self) -> None:
        self._sam_scale = self.scaler.get_scale() if self.scaler is not None else None

    @property
    def step_was_skipped(self) -> bool:
        """Whether the last step was skipped: by the loss scaler (an overflow in either pass), or
        by the samgria optimizer's non-finite policy (``non_finite="skip"``, counted in its
        ``skipped_steps``).

        accelerate's prepared scheduler and ``accelerator.optimizer_step_was_skipped`` (which the
        Hugging Face ``Trainer`` reads before advancing its LR schedule) read it, so a skipped
        step does not advance the schedule. accelerate tells a scaler's skip by whether the
        scaler called the optimizer's ``step()``, but it calls a samgria optimizer's also on an
        overflow (to restore the weights ``first_step()`` moved): here a skip by the scaler is a
        step after which the scale backed off.
        """
        if self.__dict__.get("_sam_policy_skipped", False):
            return True
        scale = self.__dict__.get("_sam_scale")
        if self.scaler is None or scale is None:
            return bool(self.__dict__.get("_is_overflow", False))
        return self.scaler.get_scale() < scale


def _detached(loss: Any) -> Any:
    return loss.detach() if isinstance(loss, torch.Tensor) else loss


def adopt(prepared: Any) -> Any:
    """Turn accelerate's ``AcceleratedOptimizer`` around a re-evaluating samgria optimizer into a
    :class:`SAMAcceleratedOptimizer` (the same object: accelerate's lists still hold it).

    Anything else is returned as it is (``SAMAccelerator.prepare_optimizer`` prepares every
    optimizer); :func:`sam_accelerated` is the public, checking form.

    An LR scheduler built on the prepared optimizer before this (the Hugging Face ``Trainer``
    builds one) has pinned accelerate's ``step`` on the instance (torch's ``_opt_called``
    bookkeeping): it is pinned again as :meth:`SAMAcceleratedOptimizer.step`, so that
    ``step(closure)`` under a scaler and the non-finite policy's skips in ``step_was_skipped``
    work through it too.
    """
    if isinstance(prepared, SAMAcceleratedOptimizer) or not isinstance(prepared, AcceleratedOptimizer):
        return prepared
    if reevaluating(find_transforming(prepared.optimizer)):
        prepared.__class__ = SAMAcceleratedOptimizer
        _repin_scheduler_step(prepared)
    return prepared


def _repin_scheduler_step(prepared: SAMAcceleratedOptimizer) -> None:
    """Replace torch's LR-scheduler wrapper of ``AcceleratedOptimizer.step`` on the instance (set
    when a scheduler was built on it, ``torch.optim.lr_scheduler.LRScheduler.__init__``) by the
    same wrapper of :meth:`SAMAcceleratedOptimizer.step`."""
    pinned = prepared.__dict__.get("step")
    if scheduler_wrapped_step(pinned) is not AcceleratedOptimizer.step:
        return
    owner = weakref.ref(prepared)  # as torch's wrapper: no reference cycle through the instance

    @functools.wraps(SAMAcceleratedOptimizer.step)
    def step(*args: Any, **kwargs: Any) -> Any:
        optimizer = owner()
        assert optimizer is not None
        optimizer._opt_called = True  # what torch's wrapper records for its scheduler
        return SAMAcceleratedOptimizer.step(optimizer, *args, **kwargs)

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    prepared.step = step  # type: ignore[method-assign]


#: accelerate's optimizer wrappers whose engine runs the optimizer step itself.
_ENGINE_WRAPPERS = {"DeepSpeedOptimizerWrapper": "DeepSpeed", "MegatronLMOptimizerWrapper": "Megatron-LM"}


def sam_accelerated(prepared_optimizer: AcceleratedOptimizer) -> SAMAcceleratedOptimizer:
    """SAM's two-call loop (and ``step(closure)`` under fp16) on an optimizer a stock
    ``accelerate.Accelerator`` prepared.

    For an ``Accelerator`` you cannot replace by :class:`SAMAccelerator` (your own subclass, or one
    another library builds)::

        model, optimizer = accelerator.prepare(model, optimizer)
        optimizer = sam_accelerated(optimizer)

    The prepared optimizer becomes a :class:`SAMAcceleratedOptimizer` in place: the same object,
    so the references accelerate keeps (``accelerator._optimizers``, a prepared scheduler) see it
    too. Calling it again, or on what :class:`SAMAccelerator` prepared, returns the argument
    unchanged. An LR scheduler may be built before or after it, on the samgria optimizer or on
    the prepared one (torch's scheduler pins the ``step`` method it finds on the prepared
    optimizer; this pins :meth:`SAMAcceleratedOptimizer.step` in its place).

    Args:
        prepared_optimizer: What ``Accelerator.prepare`` (or ``prepare_optimizer``) returned for a
            samgria optimizer whose chain re-evaluates the loss (SAM, ASAM).

    Returns:
        ``prepared_optimizer`` itself, now a :class:`SAMAcceleratedOptimizer`.

    Raises:
        TypeError: ``prepared_optimizer`` is not accelerate's ``AcceleratedOptimizer`` (e.g. the
            samgria optimizer before ``prepare``), or is a subclass of it other than
            :class:`SAMAcceleratedOptimizer` (under DeepSpeed and Megatron-LM, whose engines run
            the optimizer step themselves, or a wrapper whose methods this would replace).
        ValueError: The optimizer inside is not a samgria optimizer whose chain re-evaluates the
            loss, so there is no second pass to run.
    """
    if isinstance(prepared_optimizer, SAMAcceleratedOptimizer):
        return prepared_optimizer
    got = type(prepared_optimizer)
    if not isinstance(prepared_optimizer, AcceleratedOptimizer):
        hint = (
            ": prepare it first, sam_accelerated(accelerator.prepare(optimizer))"
            if find_transforming(prepared_optimizer) is not None
            else ""
        )
        raise TypeError(
            "sam_accelerated(prepared_optimizer) takes the accelerate.optimizer.AcceleratedOptimizer "
            f"that Accelerator.prepare returns, got {got.__module__}.{got.__qualname__}{hint}"
        )
    if got is not AcceleratedOptimizer:
        engine = _ENGINE_WRAPPERS.get(got.__name__)
        reason = (
            f"under {engine} the engine runs the optimizer step itself, so SAM's second pass cannot "
            "run; train with DDP or FSDP2"
            if engine is not None
            else "its methods would be replaced; subclass SAMAcceleratedOptimizer instead"
        )
        raise TypeError(
            "sam_accelerated(prepared_optimizer) takes accelerate's AcceleratedOptimizer itself, got "
            f"its subclass {got.__module__}.{got.__qualname__}: {reason}"
        )
    inner = prepared_optimizer.optimizer
    sam = find_transforming(inner)
    if sam is None:
        raise ValueError(
            "sam_accelerated(prepared_optimizer) needs a prepared samgria optimizer, got an "
            f"AcceleratedOptimizer around {type(inner).__module__}.{type(inner).__qualname__}, which "
            "has no two-call loop; build it with samgria (e.g. samgria.sam_optimizer) before prepare"
        )
    if not reevaluating(sam):
        raise ValueError(
            "sam_accelerated(prepared_optimizer) needs a samgria optimizer whose chain re-evaluates "
            f"the loss (SAM, ASAM), got an AcceleratedOptimizer around {type(sam).__qualname__} with "
            f"transforms [{', '.join(type(t).__name__ for t in sam.transforms)}]: there is no second "
            "pass; use the prepared optimizer's step() as it is"
        )
    adopted = adopt(prepared_optimizer)
    assert isinstance(adopted, SAMAcceleratedOptimizer)
    return adopted


class SAMAccelerator(Accelerator):
    """``accelerate.Accelerator`` whose ``prepare`` gives samgria optimizers SAM's two-call loop.

    A drop-in replacement: every argument is ``Accelerator``'s. ``prepare`` (and
    ``prepare_optimizer``) return a :class:`SAMAcceleratedOptimizer` for every samgria optimizer
    whose chain re-evaluates (SAM, ASAM); everything else is prepared as by ``Accelerator``. For
    an ``Accelerator`` you cannot replace, see :func:`sam_accelerated`.

    Raises:
        ValueError: From ``prepare``, under DeepSpeed or Megatron-LM, whose engines run the
            optimizer step themselves.
        RuntimeError: From ``clip_grad_norm_`` and ``clip_grad_value_`` between ``first_step()``
            and ``second_step()`` of an optimizer with GSAM, WSAM or LookSAM in its chain (they
            take the first pass's gradient, which the clipping does not reach, into the update),
            after cancelling that step.
    """

    def prepare(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse_engines(args)
        return super().prepare(*args, **kwargs)

    def prepare_optimizer(self, optimizer: Any, device_placement: Any = None) -> Any:
        self._refuse_engines((optimizer,))
        return adopt(super().prepare_optimizer(optimizer, device_placement=device_placement))

    def clip_grad_norm_(self, parameters: Any, max_norm: Any, *args: Any, **kwargs: Any) -> Any:
        """accelerate's ``clip_grad_norm_``, refused with ``RuntimeError`` between ``first_step()``
        and ``second_step()`` of a prepared optimizer whose chain takes the first pass's gradient
        into the update (GSAM, WSAM, LookSAM): it would clip the second pass's gradients only and
        not bound the update. The pending step is cancelled first (the weights back as before
        ``first_step()``, the gradients unclipped). Clip in the chain instead,
        ``transforms=[GSAM(...), ClipGradNorm(max_norm)]``."""
        self._refuse_clipping_between_passes(f"accelerator.clip_grad_norm_(parameters, max_norm={max_norm})", max_norm)
        return super().clip_grad_norm_(parameters, max_norm, *args, **kwargs)

    def clip_grad_value_(self, parameters: Any, clip_value: Any) -> Any:
        """accelerate's ``clip_grad_value_``, refused as ``clip_grad_norm_`` is (in the chain:
        ``ClampGrad(-clip_value, clip_value)`` after the transform)."""
        self._refuse_clipping_between_passes(
            f"accelerator.clip_grad_value_(parameters, clip_value={clip_value})", clip_value, by_value=True
        )
        return super().clip_grad_value_(parameters, clip_value)

    def _refuse_clipping_between_passes(self, setting: str, threshold: Any, *, by_value: bool = False) -> None:
        """Raise ``RuntimeError`` when a prepared optimizer is between ``first_step()`` and
        ``second_step()`` (not inside its ``step(closure)``, whose closure clips both passes) and
        its chain takes the first pass's gradient into the update (GSAM, WSAM, LookSAM): the
        clipping would reach the second pass's gradients only. The step is cancelled first (the
        weights back as before ``first_step()``), the gradients are left unclipped."""
        for optimizer in self._optimizers:
            if not isinstance(optimizer, SAMAcceleratedOptimizer) or optimizer.__dict__.get("_sam_stepping", False):
                continue
            sam = optimizer.sam
            if sam._pending is None:
                continue
            refusal = clipping_refusal(
                sam,
                f"{setting} between first_step() and second_step()",
                setting.split("(")[0],
                "Do not clip between the passes",
                threshold,
                by_value=by_value,
            )
            if refusal is not None:
                sam.cancel_step()
                raise RuntimeError(f"{refusal}. The step was cancelled: the weights are back as before first_step()")

    def _refuse_engines(self, objects: tuple[Any, ...]) -> None:
        engines = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
        if self.distributed_type not in engines:
            return
        for obj in objects:
            names = reevaluating(find_transforming(obj))
            if names:
                raise ValueError(
                    f"{', '.join(names)} under {self.distributed_type.value}: its engine runs the "
                    "optimizer step itself, so SAM's second pass cannot run; train with DDP or FSDP2"
                )
