"""What the framework integrations share: finding the samgria optimizer, and stand-in bases."""

from __future__ import annotations

from typing import Any

from samgria._frameworks import wrapper_chain
from samgria.meta.base import MetaOptimizer
from samgria.optim import TransformingOptimizer
from samgria.transforms.base import transform_name
from samgria.transforms.sam_family import WSAM

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
    """The ``cls`` instance inside a framework's optimizer wrappers (:func:`wrapper_chain`), if any."""
    for candidate in wrapper_chain(optimizer):
        if isinstance(candidate, cls):
            # A LightningOptimizer is an instance of the optimizer's class too: take the optimizer.
            inner = candidate.__dict__.get("_optimizer")
            return inner if isinstance(inner, cls) else candidate
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


def first_pass_in_update(optimizer: TransformingOptimizer | None) -> list[str]:
    """The transforms in ``optimizer``'s chain whose update takes in the first pass's gradient,
    by name (GSAM, WSAM, LookSAM; SAM and ASAM use it only to perturb): those that combine the
    gradients (``combines_gradients``), and the re-evaluating ones (``needs_closure``) that declare
    ``supports_local_first_pass = False`` (their update mixes in the first pass's gradient). A
    transform that does not re-evaluate sees one pass's gradients only, whatever it declares (a
    seed-protocol object is not asked for ``supports_local_first_pass``: it answers ``False``
    when it does not say)."""
    if optimizer is None:
        return []
    return [
        transform_name(transform)
        for transform in optimizer.transforms
        if getattr(transform, "combines_gradients", False)
        or (transform.needs_closure and not transform.supports_local_first_pass)
    ]


def clipping_refusal(
    optimizer: TransformingOptimizer | None, setting: str, clipper: str, remedy: str, threshold: Any, *, by_value: bool = False
) -> str | None:
    """Why framework clipping that runs once, after the second backward, cannot clip ``optimizer``'s
    update, or ``None``.

    The two-call loop keeps the first pass's gradient from ``first_step()`` on; GSAM, WSAM and
    LookSAM take it into the update when ``second_step()`` finishes, after the framework clipped
    the second pass's gradients only, so the update is not bounded (``step(closure)`` with the
    clipping inside the closure clips both passes). ``ClipGradNorm`` after them in the chain clips
    the gradient the inner optimizer steps with; decoupled WSAM applies its sharpness term after
    the inner step, where nothing in the chain clips it.

    Args:
        optimizer: The samgria optimizer the framework steps.
        setting: The framework setting that clips, e.g. ``"TrainingArguments(max_grad_norm=1.0)"``.
        clipper: Who clips, the subject of a sentence.
        remedy: How to switch the framework's clipping off, the start of a sentence.
        threshold: The framework's clipping threshold, for the example chain.
        by_value: The framework clips each element (the example then clamps, with ``ClampGrad``).
    """
    names = first_pass_in_update(optimizer)
    if not names:
        return None
    assert optimizer is not None
    listed = ", ".join(dict.fromkeys(names))
    verb = "takes" if len(set(names)) == 1 else "take"
    message = (
        f"{setting} with {listed} in the chain: {clipper} clips the gradients once, after the second "
        f"backward, but {listed} {verb} the first pass's gradient (kept since first_step(), before "
        "that clipping) into the update, so the clipping does not bound the update. "
        f"{remedy} and clip in the chain after {listed}: "
    )
    if by_value:
        message += (
            f"transforms=[..., {names[-1]}(...), samgria.ClampGrad(-{threshold}, {threshold})] clamps "
            f"every element of the gradient the inner optimizer steps with to [-{threshold}, {threshold}]"
        )
    else:
        message += (
            f"transforms=[..., {names[-1]}(...), samgria.ClipGradNorm({threshold})] clips the gradient "
            f"the inner optimizer steps with to a norm of at most {threshold} in each parameter group"
        )
    if any(isinstance(transform, WSAM) and transform.decouple for transform in optimizer.transforms):
        message += (
            "; WSAM(decouple=True) adds its sharpness term after the inner step, beyond any clipping "
            "in the chain: use WSAM(decouple=False) (the same update with plain SGD) to clip it too"
        )
    return message
