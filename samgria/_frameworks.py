"""What the core recognises of frameworks' closures and callers, without importing any framework.

A framework that accumulates gradients over micro-batches by itself runs all but the last
micro-batch outside the optimizer and hands ``step()`` a closure for the last one only. A
transform that re-evaluates the closure (SAM's second pass) would then see the last micro-batch
only -- a different algorithm, silently. The optimizer refuses such a step before anything
changes. The frameworks' own checks (``samgria.integrations``) refuse the setting earlier, when
training starts; this is the net for users who did not add them. Recognised: Lightning's
accumulating closure, and a step made through accelerate's plain ``AcceleratedOptimizer`` with
``gradient_accumulation_steps > 1`` (not through ``SAMAcceleratedOptimizer``, which refuses the
micro-batches ``accumulate()`` does not step itself).
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Iterator
from types import FrameType
from typing import Any

__all__ = [
    "accumulating_framework",
    "called_from",
    "grad_scaler_forget",
    "grad_scaler_scale",
    "grad_scaler_unscaled",
    "refuse_closure_under_grad_scaler",
    "scheduler_wrapped_step",
    "stacklevel_outside",
    "stepping_grad_scaler",
    "wrapper_chain",
]

_LIGHTNING_MODULES = ("lightning.pytorch.", "pytorch_lightning.")


def _lightning_accumulates(candidate: Any) -> bool:
    """Lightning's automatic-optimization ``Closure`` of a step that ends an accumulation window.

    Lightning gives the closure no ``zero_grad`` function exactly when the micro-batch is not the
    first of its window (``lightning.pytorch.loops.optimization.automatic``), i.e. when earlier
    micro-batches were accumulated outside the optimizer.
    """
    cls = type(candidate)
    return (
        cls.__name__ == "Closure"
        and cls.__module__.startswith(_LIGHTNING_MODULES)
        and getattr(candidate, "_zero_grad_fn", False) is None
        and getattr(candidate, "_backward_fn", None) is not None
    )


def wrapper_chain(optimizer: Any, depth: int = 8) -> Iterator[Any]:
    """``optimizer``, then the optimizers that framework wrappers around it wrap, outermost first.

    Follows ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``) and else ``._optimizer``, ``depth`` objects at most, stopping at an
    object that wraps nothing or itself.
    """
    for _ in range(depth):
        yield optimizer
        wrapped = getattr(optimizer, "optimizer", None)
        if wrapped is None or wrapped is optimizer:
            wrapped = getattr(optimizer, "_optimizer", None)
        if wrapped is None or wrapped is optimizer:
            return
        optimizer = wrapped


def called_from(function: Any, depth: int) -> bool:
    """Whether ``function`` is running among the ``depth`` callers of the function that asks.

    How the core recognises who is stepping it when the framework passes no marker (accelerate's
    ``AcceleratedOptimizer.step``, ``torch.distributed.checkpoint``'s state initialisation).
    """
    return next(_frames_of(function, depth, sys._getframe(2)), None) is not None  # the asker's caller


def _frames_of(function: Any, depth: int, frame: Any) -> Iterator[Any]:
    """The frames running ``function`` among ``frame`` and its ``depth - 1`` callers."""
    code = getattr(function, "__code__", None)
    for _ in range(depth):
        if frame is None or code is None:
            return
        if frame.f_code is code:
            yield frame
        frame = frame.f_back


def stacklevel_outside(*prefixes: str) -> int:
    """``stacklevel`` for a warning that points at the first caller outside the modules named by
    ``prefixes`` (default: samgria and torch, whose hook wrappers and ``GradScaler.step`` sit
    between the user's line and samgria), counted from the function that warns."""
    prefixes = prefixes or ("samgria.", "torch.")
    frame: FrameType | None = sys._getframe(2)
    level = 2
    while frame is not None and (frame.f_globals.get("__name__", "") + ".").startswith(prefixes):
        frame, level = frame.f_back, level + 1
    return level


#: How many callers up :func:`stepping_grad_scaler` looks for ``GradScaler.step`` from samgria's
#: step: ``TransformingOptimizer``'s ``_finish_pending``, ``_step``, ``step``, torch's hook
#: wrapper, ``with_hooks``'s two frames: seven, three more for each subclass whose ``step`` calls
#: ``super().step()``, then a framework's wrappers.
SCALER_FRAMES = 24


def refuse_closure_under_grad_scaler(optimizer_name: str) -> None:
    """Raise when ``torch.amp.GradScaler.step`` hands a closure to an optimizer that leaves the
    unscaling to the scaler (``_step_supports_amp_scaling`` false), before anything changes.

    Such a scaler unscales the gradients, then calls ``step(closure)``, whose closure computes the
    gradients anew, times the loss scale: the update would be the loss scale times too large.
    torch's scaler refuses ``closure=`` for this reason, but not a closure passed by position,
    as accelerate's ``AcceleratedOptimizer.step(closure)`` passes it under fp16. A disabled
    scaler (``GradScaler(enabled=False)``) hands ``step`` its arguments untouched: not refused.
    """
    scaler = stepping_grad_scaler(SCALER_FRAMES)
    if scaler is not None and scaler.is_enabled():
        raise RuntimeError(
            f"torch.amp.GradScaler.step(optimizer, closure) cannot drive {optimizer_name}.step(closure): "
            "the scaler unscaled the gradients before this step, and the closure would compute them "
            "anew, times the loss scale, so the step would apply scaled gradients (torch's "
            "GradScaler refuses closure= for this reason). Run the forward and the scaled backward "
            "first, then step without a closure: scaler.scale(loss).backward(); "
            "scaler.step(optimizer) (accelerate: accelerator.backward(loss); optimizer.step())"
        )


def stepping_grad_scaler(depth: int) -> Any:
    """The ``torch.amp.GradScaler`` whose ``step`` is running among the ``depth`` callers of the
    function that asks, or ``None``.

    ``GradScaler.step`` tells an optimizer that handles scaling itself the overflow verdict
    (``found_inf``) and the scale (``grad_scale``), but not the scale when the user unscaled the
    gradients first (``scaler.unscale_``, to clip them): then the scaler is asked here.
    """
    import torch

    code = torch.amp.GradScaler.step.__code__
    frame: FrameType | None = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code is code:
            scaler = frame.f_locals.get("self")
            return scaler if isinstance(scaler, torch.amp.GradScaler) else None
        frame = frame.f_back
    return None


# -- GradScaler's private record -------------------------------------------------------------------
# Private torch API, read here only: torch.amp.GradScaler has no public way to tell the scale that
# unscale_() divided by (get_scale() is a float that may have been updated since), whether it has
# already unscaled an optimizer's gradients this step, or to let it forget that (undo unscale_).
# The optimizer needs the first (GSAM, WSAM, LookSAM mix the still-scaled first pass into a step
# whose second pass the user unscaled to clip it); SAMAcceleratedOptimizer needs all three
# (accelerate's clipping unscales after the first backward, and GradScaler unscales once a step).
def scheduler_wrapped_step(pinned: Any) -> Any:
    """The function that torch's LR-scheduler wrapper of ``optimizer.step`` calls, or ``None``.

    Building a scheduler pins that wrapper on the optimizer instance (marked
    ``_wrapped_by_lr_sched``, ``LRScheduler.__init__``). torch 2.5 and later name the wrapped
    function in ``__wrapped__`` (``functools.wraps``); torch 2.4 keeps it only in the wrapper's
    closure, the one function among its cells (the other is a weak reference to the optimizer).
    """
    if not getattr(pinned, "_wrapped_by_lr_sched", False):
        return None
    wrapped = getattr(pinned, "__wrapped__", None)
    if wrapped is not None:
        return wrapped
    cells = [cell.cell_contents for cell in getattr(pinned, "__closure__", None) or ()]
    functions = [value for value in cells if callable(value) and not isinstance(value, weakref.ref)]
    return functions[0] if len(functions) == 1 else None


def grad_scaler_scale(scaler: Any) -> Any:
    """The scale ``scaler.unscale_`` divides by (a 0-dim tensor on the scaler's device)."""
    return scaler._scale


def grad_scaler_unscaled(scaler: Any, optimizer: Any) -> Any:
    """Whether ``scaler`` has unscaled ``optimizer``'s gradients since its last ``update()``:
    ``None`` if not, else the overflow it found then (a 0-dim tensor, nonzero for an overflow)."""
    from torch.amp.grad_scaler import OptState

    states = getattr(scaler, "_per_optimizer_states", None)
    state = states.get(id(optimizer)) if isinstance(states, dict) else None
    if not isinstance(state, dict) or state.get("stage") is not OptState.UNSCALED:
        return None
    scale = grad_scaler_scale(scaler)
    found_inf = scale.new_zeros(())
    for found in state["found_inf_per_device"].values():
        found_inf += found.to(scale.device)
    return found_inf


def grad_scaler_forget(scaler: Any, optimizer: Any) -> None:
    """Let ``scaler`` forget what it recorded for ``optimizer`` since its last ``update()`` (that
    it unscaled the gradients, and what it found): its next ``unscale_`` or ``step`` unscales."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if isinstance(states, dict):
        states.pop(id(optimizer), None)


#: How many callers up :func:`_accelerate_accumulation_steps` looks for accelerate's ``step``.
_ACCELERATE_FRAMES = 24  # samgria's step is 7 frames deep, 3 more per subclass calling super().step()


def _accelerate_accumulation_steps() -> int:
    """accelerate's ``gradient_accumulation_steps`` when a plain ``AcceleratedOptimizer.step`` is
    stepping the optimizer now, else 1.

    Whether a closure covers the last micro-batch only depends on ``accelerator.accumulate()``,
    which accelerate records in the ``Accelerator`` alone (its ``step`` counter), out of the
    optimizer's reach; ``GradientState().sync_gradients`` is true on the micro-batch that steps
    whether ``accumulate()`` is in use or not. A plain ``AcceleratedOptimizer.step`` does not
    call the optimizer on the micro-batches ``accumulate()`` does not step, so nothing here tells
    its last micro-batch from a closure that accumulates every micro-batch itself: refused
    whenever ``gradient_accumulation_steps > 1``. A wrapper whose class sets
    ``_samgria_refuses_unsynchronised`` (``SAMAcceleratedOptimizer``) refuses a closure on every
    micro-batch that ``accumulate()`` does not step (``sync_gradients`` false) before handing it
    on, so ``accumulate()``'s loop is refused on its first micro-batch, and a closure it hands on
    is taken as the whole step (e.g. one that accumulates every micro-batch): not refused here.
    Looked up only where accelerate is already imported (never imported here).
    """
    optimizer_module = sys.modules.get("accelerate.optimizer")
    state_module = sys.modules.get("accelerate.state")
    if optimizer_module is None or state_module is None:
        return 1
    step = getattr(getattr(optimizer_module, "AcceleratedOptimizer", None), "step", None)
    frames = _frames_of(step, _ACCELERATE_FRAMES, sys._getframe(1))  # as called_from looks
    # any plain wrapper on the way skips micro-batches unseen
    if all(getattr(type(f.f_locals.get("self")), "_samgria_refuses_unsynchronised", False) for f in frames):
        return 1
    return int(state_module.GradientState().num_steps)


def accelerate_accumulation() -> str | None:
    """accelerate's setting under which a closure given to the optimizer covers the last
    accumulated micro-batch only (see :func:`_accelerate_accumulation_steps`), or ``None``."""
    steps = _accelerate_accumulation_steps()
    if steps > 1:
        return f"accelerate's gradient_accumulation_steps={steps} (accumulate() steps the optimizer on the last micro-batch only)"
    return None


def accumulating_framework(closure: Any) -> str | None:
    """The framework setting under which ``closure`` covers only the last accumulated micro-batch.

    Returns:
        A description of the setting, or ``None`` when the closure is not recognised as such.
    """
    pending, seen = [closure], set()
    while pending:  # Lightning's precision plugins wrap their closure in functools.partial
        candidate = pending.pop()
        if id(candidate) in seen:
            continue
        seen.add(id(candidate))
        if _lightning_accumulates(candidate):
            return "Lightning's Trainer(accumulate_grad_batches > 1) under automatic optimization"
        if isinstance(candidate, functools.partial):
            pending += [candidate.func, *candidate.args, *candidate.keywords.values()]
    return accelerate_accumulation()
