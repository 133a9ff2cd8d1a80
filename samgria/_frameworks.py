"""What the core recognises of frameworks' closures, without importing any framework.

A framework that accumulates gradients over micro-batches by itself runs all but the last
micro-batch outside the optimizer and hands ``step()`` a closure for the last one only. A
transform that re-evaluates the closure (SAM's second pass) would then see the last micro-batch
only -- a different algorithm, silently. The optimizer refuses such a step before anything
changes. The frameworks' own checks (``samgria.integrations``) refuse the setting earlier, when
training starts; this is the net for users who did not add them.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["accumulating_framework"]

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
    return None
