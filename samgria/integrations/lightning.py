"""PyTorch Lightning (the ``lightning`` package): checks and float16 mixed precision for SAM.

What works without anything from here (``configure_optimizers`` returns a samgria optimizer):

* **Automatic optimization**, ``precision="32-true"`` or ``"bf16-mixed"``: Lightning passes its
  closure (``training_step`` and ``backward``) to ``optimizer.step(closure)``, which SAM calls
  twice.
* **Manual optimization**: the two-call loop through ``self.optimizers()`` — ``manual_backward``,
  ``first_step()``, ``manual_backward``, ``second_step()`` — also with ``precision="16-mixed"``
  (the scaler finishes the step); ``global_step`` advances once per step. ``opt.step(closure)``
  works too (it returns the loss at :math:`w`; Lightning runs its ``on_before_optimizer_step``
  hooks after each evaluation of the closure, so for both of SAM's passes, as under automatic
  optimization), except under ``"16-mixed"``: Lightning then runs the closure itself, once, and
  the optimizer refuses the step before it changes anything.

What needs this module:

* ``precision="16-mixed"`` under automatic optimization: Lightning's ``MixedPrecision`` runs the
  closure once and then ``scaler.step(optimizer)``, so SAM cannot re-evaluate. Pass
  ``plugins=[SAMMixedPrecision("16-mixed", device)]`` instead of ``precision="16-mixed"``.
* ``accumulate_grad_batches > 1`` under automatic optimization: Lightning runs all micro-batches
  but the last outside the optimizer, so SAM's second pass would see the last micro-batch only.
  That cannot be repaired from the optimizer; :class:`SAMCallback` (and :class:`SAMMixedPrecision`)
  refuse it before the first training step (without them, the optimizer recognises Lightning's
  accumulating closure and refuses the first step, unchanged). Accumulate inside ``training_step`` under manual
  optimization instead (both passes over every micro-batch).

Add ``callbacks=[SAMCallback()]`` to every ``Trainer`` that trains a samgria optimizer: it checks
these settings when ``fit`` starts, after ``configure_optimizers`` and before any weight changes.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from samgria.integrations._common import (
    clipping_refusal,
    find_transforming,
    first_pass_overflowed,
    missing_base,
    outer_reevaluating,
    reevaluating,
    two_call_refusal,
)

pl: ModuleType | None  # None without lightning
try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
except ImportError as _error:  # importable and documented without lightning; using it raises
    pl = None
    Callback = MixedPrecision = Precision = missing_base("lightning", _error)  # type: ignore[misc]

__all__ = ["SAMCallback", "SAMMixedPrecision", "check_trainer"]


def check_trainer(trainer: Any, module: Any, optimizers: list[Any] | None = None) -> None:
    """Refuse the ``Trainer`` settings under which a samgria optimizer would not run SAM.

    Checks every optimizer whose chain re-evaluates the loss (SAM, ASAM), and every
    meta-optimizer (MAML) whose outer optimizer's chain does; others pass.
    :class:`SAMCallback` calls this when ``fit`` starts and :class:`SAMMixedPrecision` when it is
    connected (right after ``configure_optimizers``); call it yourself elsewhere.

    Args:
        trainer: The ``lightning.pytorch.Trainer``.
        module: The ``LightningModule`` being trained.
        optimizers: The optimizers to check (default: ``trainer.optimizers``).

    Raises:
        ValueError: Under automatic optimization, with ``accumulate_grad_batches > 1`` or a
            ``GradientAccumulationScheduler`` that accumulates in some epoch (SAM's second pass
            would see the last micro-batch only), or with a loss scaler
            (``precision="16-mixed"``) in any precision plugin but :class:`SAMMixedPrecision` --
            in any at all for a meta-optimizer whose outer optimizer re-evaluates (the scaler
            steps it without a closure), or with ``gradient_clip_val`` in ``"bf16-mixed"``
            (Lightning's ``MixedPrecision`` refuses to clip for an optimizer that unscales its
            own gradients) or under :class:`SAMMixedPrecision` with GSAM, WSAM or LookSAM in the
            chain (it clips after the second pass only, and they take the first pass's gradient
            into the update). Put ``ClipGradNorm`` in the chain instead.
    """
    optimizers = trainer.optimizers if optimizers is None else optimizers
    names = {name for opt in optimizers for name in reevaluating(find_transforming(opt))}
    outer_names = {name for opt in optimizers for name in outer_reevaluating(opt)}
    if not (names or outer_names) or not getattr(module, "automatic_optimization", True):
        return
    what = ", ".join(sorted(names | outer_names))
    accumulate = trainer.accumulate_grad_batches
    setting = f"Trainer(accumulate_grad_batches={accumulate})"
    for callback in getattr(trainer, "callbacks", ()):
        scheduling = getattr(callback, "scheduling", None)  # GradientAccumulationScheduler's {epoch: factor}
        if type(callback).__name__ == "GradientAccumulationScheduler" and scheduling:
            factor = max(scheduling.values())
            if factor > accumulate:
                accumulate = factor
                setting = f"GradientAccumulationScheduler(scheduling={scheduling})"
    if accumulate > 1:
        raise ValueError(
            f"{setting} with {what} under automatic optimization: "
            f"Lightning runs the first {accumulate - 1} micro-batches of every step outside the "
            "optimizer, so the second pass of SAM would see the last micro-batch only (a different "
            "algorithm). Use accumulate_grad_batches=1 with a larger batch, or manual optimization "
            "that runs both passes over every micro-batch (first_step() after the first, "
            "second_step() after the second; see the samgria docs, Integrations)"
        )
    plugin = trainer.precision_plugin
    if getattr(plugin, "scaler", None) is not None and outer_names:
        raise ValueError(
            f"{type(plugin).__name__} with a meta-optimizer whose outer optimizer runs "
            f"{', '.join(sorted(outer_names))} under automatic optimization: the loss scaler steps "
            "the meta-optimizer without a closure, so its outer optimizer cannot re-evaluate the "
            "loss. Use precision='bf16-mixed' or '32-true', where Lightning calls step(closure)"
        )
    if getattr(plugin, "scaler", None) is not None and names and not isinstance(plugin, SAMMixedPrecision):
        precision = getattr(plugin, "precision", "16-mixed")
        device = getattr(plugin, "device", "cuda")
        raise ValueError(
            f"Trainer(precision={precision!r}) with {what} under automatic optimization: Lightning's "
            f"{type(plugin).__name__} evaluates the closure once and then calls scaler.step(optimizer), "
            "so SAM cannot re-evaluate the loss. Pass plugins=[samgria.integrations.lightning."
            f"SAMMixedPrecision({precision!r}, {device!r})] instead of precision={precision!r}, or use "
            "precision='bf16-mixed'"
        )
    _refuse_clipping(trainer, optimizers)


def _clips_itself(module: Any) -> bool:
    """Whether ``module`` overrides ``configure_gradient_clipping``: it may clip by itself (torch's
    ``clip_grad_norm_`` inside the closure clips both passes), and where it calls Lightning's
    ``clip_gradients`` Lightning raises its own refusal."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return bool(is_overridden("configure_gradient_clipping", module))


def _refuse_clipping(trainer: Any, optimizers: list[Any]) -> None:
    """Refuse ``gradient_clip_val`` where Lightning's clipping cannot run or cannot bound the update
    of a samgria optimizer whose chain re-evaluates, under automatic optimization.

    ``"bf16-mixed"`` (a ``MixedPrecision`` plugin without a scaler): Lightning refuses to clip for an
    optimizer that unscales its own gradients, at the first step. :class:`SAMMixedPrecision` with a
    scaler clips once, after the second pass, which does not bound the update of GSAM, WSAM and
    LookSAM (they take the first pass's gradient into it). ``"32-true"`` clips inside the closure,
    in both passes: accepted.
    """
    clip = trainer.gradient_clip_val
    plugin = trainer.precision_plugin
    if clip is None or clip <= 0 or not isinstance(plugin, MixedPrecision):
        return
    ordered = [name for opt in optimizers for name in reevaluating(find_transforming(opt))]
    if not ordered:
        return
    algorithm = trainer.gradient_clip_algorithm
    by_value = str(getattr(algorithm, "value", algorithm)) == "value"
    setting = f"gradient_clip_val={clip}" + (", gradient_clip_algorithm='value'" if by_value else "")
    if plugin.scaler is None:  # "bf16-mixed"
        module = getattr(trainer, "lightning_module", None)
        if module is not None and _clips_itself(module):
            return  # Lightning's clip_gradients, which refuses, is not reached
        example = f"ClampGrad(-{clip}, {clip})" if by_value else f"ClipGradNorm({clip})"
        raise ValueError(
            f"Trainer(precision={plugin.precision!r}, {setting}) with {', '.join(dict.fromkeys(ordered))} "
            f"under automatic optimization: Lightning's {type(plugin).__name__} refuses to clip the "
            "gradients of an optimizer that unscales them in its step(), which a TransformingOptimizer "
            "whose chain re-evaluates the loss declares (so that a GradScaler can finish its two-call "
            "step); it would raise at the first step. Remove gradient_clip_val and clip in the chain: "
            f"transforms=[..., {ordered[-1]}(...), samgria.{example}] clips the gradient the inner "
            "optimizer steps with"
        )
    for optimizer in optimizers:
        refusal = clipping_refusal(
            find_transforming(optimizer),
            f"Trainer({setting}, plugins=[{type(plugin).__name__}(...)])",
            type(plugin).__name__,
            "Remove gradient_clip_val",
            clip,
            by_value=by_value,
        )
        if refusal is not None:
            raise ValueError(refusal)


class SAMCallback(Callback):
    """Refuses, when ``fit`` starts, the ``Trainer`` settings under which SAM would be wrong.

    ``fit`` calls it after ``configure_optimizers`` and before the first training step, so a
    refused run changes no weight. See :func:`check_trainer` for what is refused and why.

    .. code-block:: text

        trainer = lightning.pytorch.Trainer(..., callbacks=[SAMCallback()])
    """

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        check_trainer(trainer, pl_module)


class SAMMixedPrecision(MixedPrecision):
    """Lightning's ``MixedPrecision`` with a ``GradScaler`` that runs SAM's two passes.

    Use it instead of ``precision="16-mixed"``:
    ``Trainer(plugins=[SAMMixedPrecision("16-mixed", "cuda")])``. Under automatic optimization
    each step of a samgria optimizer whose chain re-evaluates (SAM, ASAM) runs the closure
    (``training_step``, scaled ``backward``), ``first_step()`` (the loss scale cancels in SAM's
    perturbation), the closure again at the perturbed weights, unscales the gradients (so
    gradient clipping and the ``on_before_optimizer_step`` hooks see true gradients) and lets the
    scaler finish the step: it restores the weights and steps, or skips the step on an overflow
    in either pass and backs off. The second pass runs inside the optimizer's
    ``reevaluation_context``, as in ``step(closure)`` (so
    ``reevaluation_context=lambda: frozen_bn_stats(model)`` keeps BatchNorm to one update per
    step). Everything else — other optimizers, manual optimization, ``"bf16-mixed"`` — runs as in
    ``MixedPrecision``.

    When connected (right after ``configure_optimizers``) it refuses what :func:`check_trainer`
    refuses, such as ``accumulate_grad_batches > 1`` and ``gradient_clip_val`` with GSAM, WSAM or
    LookSAM in the chain (clipped once, after the second pass, it would not bound their update,
    which takes in the first pass's gradient: put ``ClipGradNorm`` after them in the chain), and,
    under automatic optimization, what the two-call loop cannot run: a chain with more than one
    re-evaluation per step (``MultiStepSAM(ascent_steps=2)``) and ``first_pass_context``
    (m-sharpness, which needs ``step(closure)`` to agree the ranks' verdicts on their local
    gradients).

    Args:
        precision: ``"16-mixed"`` (or ``"bf16-mixed"``, which needs no scaler and no plugin).
        device: The device type for ``torch.autocast`` (``"cuda"``).
        scaler: A ``torch.amp.GradScaler``; by default one for ``device``.
    """

    def connect(self, model: Any, optimizers: list[Any], lr_schedulers: list[Any]) -> Any:
        if pl is not None and isinstance(model, pl.LightningModule):
            trainer = getattr(model, "_trainer", None)  # model.trainer raises when detached
            if trainer is not None:
                check_trainer(trainer, model, optimizers)
            if self.scaler is not None and getattr(model, "automatic_optimization", True):
                for optimizer in optimizers:
                    self._refuse_two_call_incapable(find_transforming(optimizer))
        return super().connect(model, optimizers, lr_schedulers)

    @staticmethod
    def _refuse_two_call_incapable(sam: Any) -> None:
        refusal = two_call_refusal(sam, "SAMMixedPrecision (under automatic optimization)")
        if refusal is not None:
            raise ValueError(
                f'{refusal}. Or train in "bf16-mixed" or "32-true" precision, where Lightning calls '
                "step(closure)"
            )

    # lightning.pytorch's Precision.optimizer_step, whose signature this is, adds model and closure
    # to lightning.fabric's (lightning ignores the incompatible override the same way).
    def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        sam = find_transforming(optimizer)
        automatic = getattr(model, "automatic_optimization", True)
        if self.scaler is None or not automatic or not reevaluating(sam):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        assert sam is not None
        self._refuse_two_call_incapable(sam)  # also an optimizer changed since it was connected
        if pl is not None and isinstance(model, pl.LightningModule):
            _refuse_clipping(model.trainer, [optimizer])
        closure_result = closure()  # training_step, zero_grad, scaled backward
        if closure_result is None:  # training_step returned None: Lightning skips the step
            self._after_closure_unscaled(model, optimizer)  # its hooks still run, as Lightning's do
            return closure_result
        sam.first_step()  # w -> w + e; the loss scale cancels in e
        if not first_pass_overflowed(sam):
            try:
                with sam._enter(sam.reevaluation_context):  # as step(closure) enters it
                    closure()  # the second pass, at w + e
            except BaseException:
                sam.cancel_step()
                raise
        self.scaler.unscale_(optimizer)
        self._after_closure_unscaled(model, optimizer)  # hooks and gradient clipping, on true gradients
        step_output = self.scaler.step(optimizer, **kwargs)  # restores w, then steps or skips
        self.scaler.update()
        return step_output

    def _after_closure_unscaled(self, model: Any, optimizer: Any) -> None:
        """Lightning's hooks and gradient clipping after the closure, on gradients this plugin
        unscaled itself (or that a skipped step never computed)."""
        self._unscaled_for_sam = True
        try:
            self._after_closure(model, optimizer)
        finally:
            self._unscaled_for_sam = False

    def clip_gradients(self, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "_unscaled_for_sam", False):
            # MixedPrecision refuses to clip for an optimizer that unscales in its step(); this
            # plugin unscaled the gradients itself, before the hooks that clip them.
            Precision.clip_gradients(self, optimizer, *args, **kwargs)
        else:
            super().clip_gradients(optimizer, *args, **kwargs)
