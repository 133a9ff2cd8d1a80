"""Hugging Face ``transformers``: a ``Trainer`` whose step is SAM's, over the whole accumulated batch.

A samgria optimizer passed to the stock ``Trainer`` (``optimizers=(optimizer, None)``) raises on
the first step: the ``Trainer`` calls ``optimizer.step()`` without a closure, and SAM needs a second
forward and backward at the perturbed weights. :class:`SAMTrainer` runs it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from samgria.integrations._common import (
    clipping_refusal,
    find_transforming,
    first_pass_overflowed,
    missing_base,
    reevaluating,
    two_call_refusal,
)
from samgria.integrations.accelerate import SAMAcceleratedOptimizer, adopt
from samgria.optim import TransformingOptimizer
from samgria.transforms.base import GradientTransform, Transform
from samgria.transforms.chain import Chain

try:
    from transformers import Trainer
except ImportError as _error:  # importable and documented without transformers; using it raises
    Trainer = missing_base("transformers", _error)  # type: ignore[misc]

__all__ = ["SAMTrainer"]


class SAMTrainer(Trainer):
    """``transformers.Trainer`` whose optimizer step runs SAM's two passes.

    Takes every ``Trainer`` argument, and either a samgria optimizer in ``optimizers=(optimizer,
    scheduler_or_None)`` or ``transforms=[SAM(rho=0.05)]`` to wrap the optimizer the ``Trainer``
    creates (``args.optim``, ``args.learning_rate``, ``args.weight_decay``) in a
    :class:`~samgria.TransformingOptimizer`. The ``Trainer``'s LR scheduler then drives it.

    Each optimizer step, for a chain that re-evaluates the loss (SAM, ASAM):

    1. the ``Trainer`` runs :meth:`training_step` on each of the ``gradient_accumulation_steps``
       micro-batches (forward, ``backward``), as usual;
    2. after the last one, ``first_step()`` perturbs the weights with the gradient of the whole
       accumulated batch, and :meth:`training_step` runs the second pass over every micro-batch of
       the step again (``accelerator.no_sync`` around all but the last);
    3. the ``Trainer`` clips the gradients (``max_grad_norm``) and calls ``optimizer.step()``, which
       restores the weights and steps with the second pass's gradients — through the loss scaler
       under ``fp16``, which skips the step on an overflow in either pass.

    So one step equals SAM on the concatenated batch. ``bf16``, ``fp16``, LR schedulers and
    gradient clipping work as with any optimizer (a step the loss scaler skips, or the optimizer's
    non-finite policy skips, does not advance the LR schedule); the training loss logged is the
    first pass's. Other optimizers and chains without a re-evaluating transform train as with
    ``Trainer``.

    ``max_grad_norm`` (the ``Trainer``'s default is 1.0) clips the second pass's gradients only.
    GSAM, WSAM and LookSAM take the first pass's gradient into the update, so for them it would
    not bound the update: a chain with one of them is refused with ``max_grad_norm > 0``; set
    ``max_grad_norm=0`` and clip in the chain after the transform,
    ``transforms=[GSAM(...), ClipGradNorm(max_norm)]`` (WSAM: with ``decouple=False``, whose
    update all passes through the inner optimizer).

    The second pass of each micro-batch runs inside the optimizer's ``reevaluation_context``, as in
    ``step(closure)``: with ``reevaluation_context=lambda: frozen_bn_stats(model)`` BatchNorm's
    statistics are updated once per micro-batch, by the first pass. ``first_pass_context``
    (m-sharpness) needs ``step(closure)`` and is refused.

    Args:
        *args: ``Trainer``'s positional arguments.
        transforms: Transforms to wrap the optimizer the ``Trainer`` creates in; not with a
            samgria optimizer in ``optimizers``.
        reevaluation_context: With ``transforms``, the wrapping optimizer's
            ``reevaluation_context``.
        **kwargs: ``Trainer``'s keyword arguments.

    Raises:
        TypeError: If ``transforms`` or ``reevaluation_context`` is given together with an
            optimizer in ``optimizers``, or is refused as by
            :class:`~samgria.TransformingOptimizer` (``transforms`` not transform instances,
            ``reevaluation_context`` neither callable nor ``None``), before the ``Trainer`` is
            set up.
        ValueError: ``transforms`` with a slot name used twice or that is not an identifier;
            from ``train()``, under DeepSpeed, whose engine runs the optimizer step
            itself, or, before any step, with an optimizer that ``first_step()``/``second_step()``
            cannot run (more than one re-evaluation per step, or ``first_pass_context``), or with
            ``max_grad_norm > 0`` and GSAM, WSAM or LookSAM in the chain.
    """

    def __init__(self, *args: Any, transforms: Any = None, reevaluation_context: Any = None, **kwargs: Any) -> None:
        if transforms is not None:
            transforms = _checked_transforms(transforms)
        if reevaluation_context is not None and not callable(reevaluation_context):
            raise TypeError(
                f"reevaluation_context must be a callable returning a context manager, got {reevaluation_context!r}"
            )
        if (transforms is not None or reevaluation_context is not None) and _given_optimizer(args, kwargs) is not None:
            # before the Trainer is set up (it seeds torch's generators and places the model)
            raise TypeError(
                "SAMTrainer(transforms=..., reevaluation_context=...) configure the optimizer the "
                "Trainer creates; with optimizers=(optimizer, ...) pass a samgria "
                "TransformingOptimizer built with them instead"
            )
        super().__init__(*args, **kwargs)
        self.sam_transforms = transforms
        self.sam_reevaluation_context = reevaluation_context
        self._sam_window: list[tuple[Any, Any]] = []

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        created = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        if created and self.sam_transforms is not None and not isinstance(optimizer, TransformingOptimizer):
            try:
                self.optimizer = TransformingOptimizer(
                    optimizer, transforms=self.sam_transforms, reevaluation_context=self.sam_reevaluation_context
                )
                self._refuse_two_call_incapable()
            except BaseException:
                # Not the Trainer's plain optimizer: a later train() would train without SAM.
                self.optimizer = None
                raise
        return self.optimizer

    def _refuse_two_call_incapable(self) -> None:
        """Raise ``ValueError`` before training when the optimizer needs what the two-call loop
        this trainer drives cannot do (``MultiStepSAM(ascent_steps=2)``, two SAMs,
        ``first_pass_context``), or when ``max_grad_norm`` cannot bound its update (GSAM, WSAM,
        LookSAM)."""
        sam = find_transforming(self.optimizer)
        refusal = two_call_refusal(sam, "SAMTrainer (the Trainer calls optimizer.step() without a closure)")
        max_grad_norm = self.args.max_grad_norm
        if refusal is None and reevaluating(sam) and max_grad_norm is not None and max_grad_norm > 0:
            refusal = clipping_refusal(
                sam,
                f"SAMTrainer(args=TrainingArguments(max_grad_norm={max_grad_norm}))",
                "the Trainer",
                "Set max_grad_norm=0",
                max_grad_norm,
            )
        if refusal is not None:
            raise ValueError(refusal)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._sam_window = []
        if getattr(self, "is_deepspeed_enabled", False) and (
            self.sam_transforms is not None or reevaluating(find_transforming(self.optimizer))
        ):
            raise ValueError(
                "SAMTrainer under DeepSpeed: its engine runs the optimizer step itself, so SAM's "
                "second pass cannot run; train with DDP or FSDP2"
            )
        if self.optimizer is not None:
            self._refuse_two_call_incapable()
        return super().train(*args, **kwargs)

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        """The ``Trainer``'s step on one micro-batch; after the last of a step, SAM's second pass."""
        sam = find_transforming(self.optimizer)
        if not reevaluating(sam):
            return super().training_step(model, inputs, num_items_in_batch)
        assert sam is not None
        if not self._sam_window:  # the first micro-batch of a step: an optimizer changed since train()
            self._refuse_two_call_incapable()
        self._sam_window.append((inputs, num_items_in_batch))
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            # The step is abandoned: a retry (auto_find_batch_size after an out-of-memory error
            # runs the training loop again, not train()) starts a new window, whose second pass
            # must not run this one's micro-batches too.
            self._sam_window = []
            raise
        if not self.accelerator.sync_gradients:  # not the last micro-batch of this step
            return loss
        window, self._sam_window = self._sam_window, []
        prepared = adopt(self.optimizer)
        if isinstance(prepared, SAMAcceleratedOptimizer):
            prepared.first_step()  # w -> w + e, from the gradient of every micro-batch
        else:
            sam.first_step()
        if first_pass_overflowed(sam):  # kept: the scaler (or the non-finite policy) skips the step
            return loss
        try:
            for index, (batch, items) in enumerate(window):
                last = index == len(window) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    with sam._enter(sam.reevaluation_context):  # as step(closure) enters it
                        super().training_step(model, batch, items)
        except BaseException:
            sam.cancel_step()
            raise
        return loss


def _given_optimizer(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The optimizer in the ``Trainer``'s ``optimizers=(optimizer, scheduler)`` argument, or
    ``None`` (also for arguments the ``Trainer`` will refuse itself)."""
    try:
        bound = inspect.signature(Trainer.__init__).bind_partial(None, *args, **kwargs)
        return bound.arguments.get("optimizers", (None,))[0]
    except (TypeError, IndexError, KeyError):
        return None


def _checked_transforms(transforms: Any) -> Any:
    """``transforms`` checked as :class:`~samgria.TransformingOptimizer` checks them (its
    :class:`~samgria.transforms.chain.Chain`), an iterator taken as a list (it is read again
    when the optimizer is created)."""
    if not isinstance(transforms, (Mapping, Transform, GradientTransform, str, bytes)) and isinstance(
        transforms, Iterable
    ):
        transforms = list(transforms)
    Chain(transforms, ())
    return transforms
