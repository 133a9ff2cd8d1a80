"""What the framework integrations share: finding the samgria optimizer, and stand-in bases."""

from __future__ import annotations

from typing import Any

from samgria.meta.base import MetaOptimizer
from samgria.optim import TransformingOptimizer

INSTALL_HINT = "pip install 'samgria[integrations]'"


def missing_base(package: str, error: ImportError) -> Any:
    """A stand-in for a framework class when ``package`` cannot be imported.

    A samgria class that subclasses it can be imported and documented; constructing one raises
    ``ImportError`` naming the package to install and the original error. Typed ``Any``, as it
    stands in for whichever class could not be imported.
    """

    class Unavailable:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError(
                f"{type(self).__name__} needs {package}: pip install {package} (or {INSTALL_HINT}); "
                f"importing it failed with: {error}"
            )

    Unavailable.__qualname__ = Unavailable.__name__ = f"Unavailable_{package}"
    return Unavailable


def _found_inside(optimizer: Any, cls: type) -> Any:
    """The ``cls`` instance inside a framework's optimizer wrappers, if any: follows
    ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``)
    and ``._optimizer`` a few levels deep."""
    for _ in range(8):
        if isinstance(optimizer, cls):
            # A LightningOptimizer is an instance of the optimizer's class too: take the optimizer.
            inner = optimizer.__dict__.get("_optimizer")
            return inner if isinstance(inner, cls) else optimizer
        wrapped = getattr(optimizer, "optimizer", None)
        if wrapped is None or wrapped is optimizer:
            wrapped = getattr(optimizer, "_optimizer", None)
        if wrapped is None or wrapped is optimizer:
            return None
        optimizer = wrapped
    return None


def find_transforming(optimizer: Any) -> TransformingOptimizer | None:
    """The :class:`~samgria.TransformingOptimizer` inside a framework's optimizer wrappers, if
    any (the one the framework steps: not a meta-optimizer's outer optimizer)."""
    found: TransformingOptimizer | None = _found_inside(optimizer, TransformingOptimizer)
    return found


def outer_reevaluating(optimizer: Any) -> list[str]:
    """The transforms that re-evaluate the loss in the outer optimizer of a meta-optimizer inside
    a framework's optimizer wrappers (``MAML(model, TransformingOptimizer(..., transforms=[SAM()]))``)."""
    meta = _found_inside(optimizer, MetaOptimizer)
    return [] if meta is None else reevaluating(find_transforming(meta.outer))


def reevaluating(optimizer: TransformingOptimizer | None) -> list[str]:
    """The names of the transforms in ``optimizer``'s chain that re-evaluate the loss (SAM, ASAM)."""
    if optimizer is None:
        return []
    return optimizer._reevaluating_names()


def first_pass_overflowed(optimizer: TransformingOptimizer) -> bool:
    """Whether ``first_step()`` found non-finite gradients (an fp16 overflow) and kept them.

    The second pass must then accumulate onto them, so that the loss scaler sees the overflow,
    skips the step and backs off; a second pass that zeroes the gradients first (a framework's
    closure does) would hide it, so it is not run.
    """
    pending = optimizer._pending
    return pending is not None and pending.non_finite


def two_call_refusal(optimizer: TransformingOptimizer | None, driver: str) -> str | None:
    """Why ``driver`` (an integration that runs ``first_step()``/``second_step()`` itself) cannot
    run ``optimizer``, or ``None`` (also for no samgria optimizer, or a chain without a second pass,
    which the integration steps as any optimizer).

    The optimizer's own refusal (``first_step()`` raises the same): more than one re-evaluation
    per step, or ``first_pass_context`` (m-sharpness), whose ranks' decisions only
    ``step(closure)`` agrees (in the two-call loop a rank whose local first pass overflowed would
    skip its second pass alone, and the others would wait in its all-reduce).
    """
    if not reevaluating(optimizer):
        return None
    assert optimizer is not None
    refusal = optimizer._two_call_refusal()
    if refusal is None:
        return None
    return f"{driver} runs SAM through first_step()/second_step(), and this optimizer cannot: {refusal}"
