"""``TransformingOptimizer``: any torch optimizer plus a chain of pre- and post-step transforms."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager, cast

import torch
from torch import nn
from torch.optim import Optimizer

from samgria._checks import check_bool, check_choice
from samgria._frameworks import (
    SCALER_FRAMES,
    accumulating_framework,
    grad_scaler_scale,
    refuse_closure_under_grad_scaler,
    stacklevel_outside,
    stepping_grad_scaler,
)
from samgria._legacy import from_release_0_1
from samgria._snapshot import SlotValues, StateStructure, StepSnapshot, ValuesOutsideState, is_entry
from samgria._wrapper import (
    WrappingOptimizer,
    built_by_zero_redundancy,
    checks_before_writing,
    eager_under_compile,
    is_torch_optimizer,
    refuse_driven,
    step_required_arguments,
    warn_of_hooks_not_run,
)
from samgria.functional import all_finite, global_norm
from samgria.functional._grouping import group_indices_by_device_and_dtype, unique_params
from samgria.functional._sharding import any_sharded, is_sharded
from samgria.functional._views import all_as_real
from samgria.transforms.base import Transform, TransformContext, forget_autocast_copies, transform_name
from samgria.transforms.chain import CHAIN_KEY, Chain
from samgria.transforms.sam import ASAM, SAM, Perturbation, PerturbationTransform

__all__ = ["TransformingOptimizer", "sam_optimizer"]

_NEEDS_CLOSURE_MESSAGE = (
    "{names} re-evaluate(s) the loss, so step() needs a closure: call optimizer.step(closure), or "
    "call optimizer.first_step() after the first backward and optimizer.second_step() after the "
    "second (loops without a closure, e.g. AMP); a framework's training loop: see "
    "samgria.integrations (Hugging Face Trainer: SAMTrainer, accelerate: SAMAccelerator)"
)
_SCALER_WITHOUT_FIRST_STEP_MESSAGE = (
    "{names} re-evaluate(s) the loss, but torch.amp.GradScaler.step(optimizer) called step() "
    "without first_step(): the scaler cannot run a second forward and backward. Call "
    "optimizer.first_step() after the first scaled backward and scaler.step(optimizer) after the "
    "second; Lightning's precision='16-mixed' under automatic optimization: "
    "plugins=[samgria.integrations.lightning.SAMMixedPrecision('16-mixed', device)] or "
    "precision='bf16-mixed'; Hugging Face Trainer: samgria.integrations.transformers.SAMTrainer; "
    "accelerate: samgria.integrations.accelerate.SAMAccelerator"
)
_SCALER_WITH_CLOSURE_MESSAGE = (
    "torch.amp.GradScaler.step(optimizer, closure) cannot drive step(closure): the scaler checked "
    "and would unscale gradients the closure has not computed yet, so the step would apply scaled "
    "gradients. Use the two-call loop: scaler.scale(loss).backward(); optimizer.first_step(); "
    "scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update() (accelerate's fp16: "
    "samgria.integrations.accelerate.SAMAccelerator, or with an Accelerator you keep, optimizer = "
    "samgria.integrations.accelerate.sam_accelerated(accelerator.prepare(optimizer)); their "
    "step(closure) does this)"
)


@contextlib.contextmanager
def _put_back_on_error(structure: StepSnapshot | StateStructure | None) -> Iterator[None]:
    """Put the state's references back (``structure``, when atomic) if the block raises."""
    try:
        yield
    except BaseException:
        if structure is not None:
            structure.restore()
        raise


class _NonFiniteGradients(Exception):
    """Raised inside a step when a re-evaluation produced non-finite gradients (caught by step);
    ``evaluation`` counts the closure's evaluations in the step, the first one being 1.

    An ``Exception``, so that a transform's cleanup ``except Exception: restore(); raise`` around
    ``ctx.reevaluate()`` runs. A transform that swallows it cannot bypass the non-finite policy:
    the chain records it before it is raised and raises it again once that transform's
    ``pre_update`` returns (:meth:`TransformingOptimizer._run_chain`).
    """

    def __init__(self, evaluation: int, combined_by: str | None = None, verb: str = "combined") -> None:
        super().__init__(evaluation)
        self.evaluation = evaluation
        self.combined_by = combined_by
        self.verb = verb  # what the transform did to the gradients: "combined" or "computed"


def _combined_by(non_finite: _NonFiniteGradients) -> str:
    """The ``where`` of a skip message for gradients a transform combined or computed (or ``""``)."""
    name = non_finite.combined_by
    return "" if name is None else f", as {name} {non_finite.verb} them,"


def _ordinal(number: int) -> str:
    """``"first"``, ``"second"``, ``"third"``, then ``"4th"``, ..., ``"21st"``, ..."""
    if number <= 3:
        return ("first", "second", "third")[number - 1]
    suffix = "th" if number % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


@dataclass
class _PendingStep:
    """What ``first_step`` left for ``second_step``."""

    perturbation: Perturbation | None
    resume_at: int
    #: Nothing was perturbed: the second pass ran at the unperturbed weights, so its gradients are
    #: those ``step(closure)`` would use; the transforms before the re-evaluating one run on them
    #: again (what they did to the first pass's gradients is discarded with those).
    rerun_before: bool = False
    #: The first pass's gradients were not finite: the step is skipped.
    non_finite: bool = False
    #: Where they became so, for the skip's message (a transform before the re-evaluating one
    #: that computed them: ``_combined_by``); ``""`` for the evaluation's own.
    non_finite_where: str = ""
    #: The state's references at ``first_step`` (see ``_pre_step_structure``).
    structure: StepSnapshot | StateStructure | None = None
    #: The transforms before the re-evaluating one whose result does not scale with the
    #: gradients, and those of them that change their direction too, asked in ``first_step``
    #: while the first pass's gradients were there (see ``_loss_scale_refusal``).
    not_scaling: tuple[str, ...] = ()
    not_keeping_direction: tuple[str, ...] = ()


@dataclass
class _StepProgress:
    """The two-call step in progress, in one object that every view of the optimizer shares.

    Lightning's ``LightningOptimizer`` is a subclass of the optimizer's class that forwards reads
    of attributes it lacks to the optimizer (older versions copied its ``__dict__``): methods
    called through it write their attributes on the wrapper, but mutate this shared object.
    """

    pending: _PendingStep | None = None
    #: ``second_step()`` is calling ``step()``: a framework wrapper around the optimizer (Lightning)
    #: may pass a closure of its own (its hooks, no forward or backward); it runs once.
    finishing: bool = False


#: ``_run_chain``'s ``loss`` where no closure was evaluated (``step()``, the two-call loop).
_NO_LOSS = object()


class _WithMaximize(Mapping):
    """A transform's view of a param group that lacks ``"maximize"``, answering it with the inner
    optimizer's own ``maximize`` attribute (where pytorch_optimizer's optimizers keep it)."""

    __slots__ = ("view", "maximize")

    def __init__(self, view: Mapping[str, Any], maximize: bool) -> None:
        self.view = view
        self.maximize = maximize

    def __getitem__(self, key: str) -> Any:
        return self.maximize if key == "maximize" else self.view[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.view
        yield "maximize"

    def __len__(self) -> int:
        return len(self.view) + 1

    def __repr__(self) -> str:
        return f"{self.view!r} with maximize={self.maximize}"


def _has_post_update(transform: Transform) -> bool:
    """Whether ``transform`` does anything after the inner step: not the base class's no-op, nor
    one that a class's settings make one. A class declares that with ``_post_update_runs`` (an
    attribute or property: ``WSAM(decouple=False)``), which is read only while no class before it
    in the method resolution order (a subclass), nor the instance, puts its own ``post_update`` in
    place of the one it speaks for: theirs runs. A post-step transform makes every atomic step copy
    the weights and the inner optimizer's state before the inner step, since it may fail after that
    step wrote."""
    if "post_update" in getattr(transform, "__dict__", ()):
        return True
    # One walk, stopping at the first class that declares or defines (per step: kept short)
    for klass in type(transform).__mro__:
        names = klass.__dict__
        if "_post_update_runs" in names:
            return bool(getattr(transform, "_post_update_runs"))
        if "post_update" in names:
            return klass is not Transform
    return True  # not a Transform subclass: whatever post_update it has runs


def _lacks_init_state(transform: Transform) -> bool:
    """Whether the state ``transform``'s hooks create may not be created by the state-initialising
    step: a class of the user's (not samgria's) defines ``pre_update`` or ``post_update``, the
    ``init_state`` the class resolves to is :class:`Transform`'s default, and the samgria class
    it extends has only :class:`Transform`'s default hooks too. A subclass of a built-in
    transform (``class MyEMA(EMA)``, ``MyClip(ClipGradNorm)``) is not named: the built-in's
    ``init_state`` creates its keys (or it keeps none)."""
    cls = type(transform)
    if cls.init_state is not Transform.init_state:
        return False

    def samgrias(klass: type) -> bool:
        return klass.__module__ == "samgria" or klass.__module__.startswith("samgria.")

    users = [klass for klass in cls.__mro__ if klass is not object and not samgrias(klass)]
    if not any("pre_update" in vars(klass) or "post_update" in vars(klass) for klass in users):
        return False
    # (samgria classes in a transform's MRO are Transform and its subclasses)
    extended = cast(type[Transform], next((klass for klass in cls.__mro__ if samgrias(klass)), Transform))
    return extended.pre_update is Transform.pre_update and extended.post_update is Transform.post_update


def _warn_without_init_state(transforms: Sequence[Transform]) -> None:
    """Warn, once per state-initialising step, naming the transforms whose hooks have no
    ``init_state`` beside them (see :func:`_lacks_init_state`)."""
    lacking = [transform_name(transform) for transform in transforms if _lacks_init_state(transform)]
    if lacking:
        warnings.warn(
            f"TransformingOptimizer: {', '.join(lacking)} override(s) pre_update/post_update but not "
            "init_state, which this state-initialising step (torch.distributed.checkpoint's, on a "
            "fresh optimizer before it loads) calls: a checkpoint loaded into this optimizer fills "
            "only the state keys that exist now, so state the transform keeps would be dropped "
            "without an error. Override init_state to create every per-parameter key "
            "(ctx.state[p]) and object-level key (ctx.slot_state(keys=...)) with its final shape "
            "and dtype; a transform that keeps no state defines an init_state that does nothing",
            UserWarning,
            stacklevel=stacklevel_outside(),
        )


def _on_any_rank(flag: bool, first_pass_context: Any, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank of the data-parallel group, under ``first_pass_context``.

    With m-sharpness each rank decides from its own first-pass gradient, but the ranks must take
    the same path through the step: the second pass all-reduces, so a rank that skips or
    re-evaluates at another point than the others would pair collectives of different steps.
    One all-reduce of one number agrees. The group is that of the module whose ``no_sync`` is
    ``first_pass_context`` (``DistributedDataParallel.process_group``), else the default group;
    without an initialised process group, ``flag`` itself.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    group = getattr(getattr(first_pass_context, "__self__", None), "process_group", None)
    votes = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(votes.item())


def _refuse_sharded_m_sharpness(first_pass_context: Any, params: Iterable[Any]) -> None:
    """``first_pass_context`` (m-sharpness) with sharded parameters: ``ValueError``."""
    if first_pass_context is not None and any(is_sharded(p) for p in params):
        raise ValueError(
            "first_pass_context (m-sharpness) needs unsharded parameters, got sharded (DTensor) "
            "ones: FSDP2 without gradient synchronisation keeps each rank's unsharded gradient "
            "outside param.grad, so SAM would see none; drop first_pass_context (SAM then "
            "perturbs with the global gradient) or train with DDP"
        )


class TransformingOptimizer(WrappingOptimizer):
    r"""Wraps any optimizer and runs a chain of transforms around its step.

    ``loss = optimizer.step(closure)`` evaluates the closure (under grad mode) at the current
    weights, runs every transform's pre-step hook in chain order (SAM perturbs, re-evaluates the
    closure and restores the weights exactly), steps the inner optimizer, runs every transform's
    post-step hook in chain order (LAMP), and returns the loss of the first evaluation.

    It is a real :class:`torch.optim.Optimizer` that keeps torch's contracts with torch's own
    machinery: ``param_groups`` *are* the inner optimizer's (one list), so LR schedulers,
    ``add_param_group`` and ``lr`` edits reach it; ``state`` holds the inner optimizer's
    per-parameter state and every transform's slot, and is exactly what ``state_dict()["state"]``
    packs; hooks, pickling and ``torch.distributed.checkpoint`` work as for torch's optimizers.

    **Slots and hyperparameters.** Each transform owns a slot (``"sam"``, ``"lamp"``, ``"lamp_1"``
    for a second LAMP, or the keys of a ``transforms`` mapping). Its per-parameter state is stored
    in ``state[p]`` as ``"<slot>.<key>"`` (``state[p]["lamp.sum"]``) and its hyperparameters in
    the param groups: under the short key (``"rho"``) when no other transform and not the inner
    optimizer use that name, else under the qualified key (``"sam.rho"`` beside
    ``torch.optim.Adadelta``'s own ``"rho"``). The qualified key is always accepted as input.
    Every group also records the chain under ``"transform_chain"``; loading a checkpoint made by
    another chain raises ``ValueError`` naming the difference.

    **Atomic steps.** If anything raises during a step — the closure in either pass, a transform,
    the inner step — the weights, the inner optimizer's state and every transform's state are
    exactly as before the step. The pre-step phase restores itself (SAM puts the weights back in
    a ``finally``), at no cost — except a transform that writes the weights before the inner
    step and leaves them changed (a :class:`~samgria.transforms.ParamTransform` pre-step hook,
    ``Transform.writes_weights_before_step``): for it the weights are copied at the start of the
    step. Undoing the inner step needs a copy of the weights and of the
    state taken before it; it is taken (once the closure's activations are freed; the weights go
    into the memory of SAM's clone when SAM ran) only where something can fail after writing:
    everything when the chain has a post-step transform (LAMP), the inner optimizer is not one
    of ``torch.optim``'s own, or a checkpoint was loaded since the last step (its state's tensors
    may not fit the parameters, which torch's optimizers find out only while they write).
    torch's optimizers check a param group's inputs before they write
    into its tensors (what they may create before raising — new state entries — is undone without
    copies), but step the groups one after another, so with several groups the weights and state
    of every group before the last one with a gradient are copied. A chain of pre-step
    transforms around one of them with one param group needs no copy — that is what keeps SAM's
    step as fast and as small as a plain one. What that does not undo is a failure inside torch's
    step after it began writing that is no check of its inputs: an allocation that fails (out of
    memory; foreach Adam allocates :math:`\sqrt{v}` after it updated both moments, the per-tensor
    loop steps parameter after parameter) leaves that part of the inner step applied; so does
    state that stopped fitting its parameter other than by a load (a model cast to another dtype
    after its state was made, ``model.double()``; a state tensor replaced by hand), which torch's
    optimizers also find only while they write. ``atomic="full"`` copies the weights and the
    state before every inner step, so that these are undone too (measured: 5-15% more time for
    SAM's step on the benchmark's MLP with momentum SGD, ``benchmarks/sam_overhead.py``, and the
    copy of the inner optimizer's state in memory during its step). ``atomic=False``
    copies nothing for atomicity: a step that raises, is skipped or cancelled then puts back
    only the weights a re-evaluating transform moved, neither the
    weights a transform writes before the inner step nor the state transforms save before it
    (``saves_state_before_step``: Lookahead's new slow weights, ESAM's random stream);
    :meth:`first_step` still copies the weights a transform before
    SAM writes, to undo them when nothing is perturbed (:meth:`second_step` then runs those
    transforms again, on the second pass's gradients).

    **Non-finite gradients.** A step whose gradients are not finite — in the first evaluation or
    in a re-evaluation, with ``step(closure)`` or the two-call loop alike — is skipped whole
    (weights and state untouched, but for what ``atomic=False`` leaves), with a
    :class:`RuntimeWarning`, and counted in
    :attr:`skipped_steps`; ``non_finite="raise"`` raises :class:`FloatingPointError` instead
    (also with nothing changed). Under ``torch.amp.GradScaler`` the scaler's verdict rules: it
    skips the step and backs off. Not finite means an infinite or NaN element
    (``samgria.functional.all_finite``). The gradients GSAM, WSAM and LookSAM compute from the
    evaluations' (``Transform.combines_gradients``), and those a transform may take beyond the
    dtype's range (``Transform.can_overflow_gradients``: ``ScaleGrad`` with a scale beyond 1 or a
    bias), are checked too, in both loops. Norms that
    float32 (or a 16-bit dtype) cannot hold are taken again in float64
    (``samgria.functional.global_norm`` for SAM and ``ClipGradNorm``; per tensor for
    ``NormalizeGrad`` and ``ProjectParams``' L2 projection), so finite gradients are scaled by
    their true norm (``NormalizeGrad``'s norms of float64 gradients whose powers
    :math:`|g_i|^p` leave float64's range are taken again scaled by their largest element); only
    a norm beyond float64's range is infinite: SAM then leaves the weights unperturbed (with a
    warning), and ``ClipGradNorm`` scales the gradients to zero (as
    ``torch.nn.utils.clip_grad_norm_`` does).

    Args:
        params: Parameters or param-group dicts for the inner optimizer — or an already built
            optimizer to wrap (then ``inner`` and ``inner_kwargs`` must be omitted), which is
            then the wrapper's: one that another wrapper already drives is refused.
        inner: A :class:`torch.optim.Optimizer` subclass, or any callable returning an optimizer,
            called as ``inner(params, **inner_kwargs)``.
        transforms: Transforms in order (:class:`~samgria.SAM`, :class:`~samgria.ASAM`,
            :class:`~samgria.LAMP`, or any object with ``apply`` and ``post_step``), or a mapping
            ``{slot_name: transform}``.
        model: The module the closure evaluates; handed to seed-protocol transforms, and the
            model that :meth:`EMA.averaged_weights <samgria.EMA.averaged_weights>` and
            :meth:`Lookahead.slow_weights <samgria.Lookahead.slow_weights>` reshard over FSDP2.
        first_pass_context: Callable returning a context manager entered around the closure's
            first evaluation, e.g. ``ddp_model.no_sync`` so each replica perturbs with its own
            gradient (the SAM paper's m-sharpness; saves one all-reduce). Refused (``ValueError``)
            with sharded (FSDP2) parameters: FSDP2 without gradient synchronisation keeps the
            local gradients outside ``param.grad``. There SAM perturbs with the global gradient.
        reevaluation_context: Callable returning a context manager entered around every
            re-evaluation by a transform, e.g. ``lambda: frozen_bn_stats(model)``.
        transform_foreach: Use the ``torch._foreach_*`` kernels in transforms (default ``True``);
            ``False`` takes the per-tensor reference path.
        non_finite: ``"skip"`` (default) or ``"raise"``: what a step with non-finite gradients does.
        atomic: Undo a failure in or after the inner step (default ``True``; see above for when
            that takes a copy of the weights and state); ``"full"`` also undoes a failure inside
            torch's own step after it began writing (an allocation that fails), at the cost of a
            copy of the weights and state before every inner step; ``False`` puts back only
            the weights a re-evaluating transform moved (see above).
        **inner_kwargs: Passed to ``inner`` (``lr``, ``momentum``, ``foreach``, …).

    Attributes:
        inner: The inner optimizer.
        transforms: The transforms, in chain order.
        slots: Their slot names, in the same order.
        skipped_steps: Steps skipped because of non-finite gradients (not checkpointed).

    Pickling and :func:`copy.deepcopy` drop hooks (as torch does), an LR scheduler's patch of
    ``step`` (as torch does: the copy steps its own parameters) and the callables
    ``first_pass_context`` and ``reevaluation_context`` (``None`` in the copy). Like
    ``state_dict()``, they raise ``RuntimeError`` between :meth:`first_step` and
    :meth:`second_step`: the copy could not put the weights back.

    Warns:
        UserWarning: If the optimizer to wrap, or the one ``inner`` builds, has hooks of its own
            (``register_step_pre_hook``, ``register_state_dict_post_hook``, ...): the wrapper
            steps, saves and loads with its own hooks, so those never run; register them on the
            wrapper.

    Raises:
        TypeError: If ``inner`` is not an optimizer class or factory, a transform lacks the hooks,
            the inner optimizer keeps its state in another optimizer it holds (timm's
            ``Lookahead``, ``ZeroRedundancyOptimizer``), its ``step()`` needs arguments other
            than a closure, or ``ZeroRedundancyOptimizer`` builds this optimizer, with
            transforms, over its shard of the parameters.
        ValueError: If a hyperparameter is invalid, a param-group key is ambiguous, a slot
            name is not an identifier, the optimizer to wrap is already driven by a wrapper,
            or sharded (``DTensor``) parameters meet
            ``first_pass_context`` or a transform that does not support them
            (``Transform.supports_sharded_params``).
    """

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Whether ``step()`` unscales the gradients itself (torch's flag for ``GradScaler``).

        True for a chain that re-evaluates the closure (SAM, ASAM): GradScaler then calls
        ``step()`` even after an overflow and lets it unscale and skip (see :meth:`step`), so a
        skipped step still restores the weights perturbed by ``first_step``, and a closure or a
        step without ``first_step()`` is refused with the reason. Any other chain steps as a
        plain optimizer under a scaler: unscaled first, not called after an overflow (so
        frameworks unscale before their hooks and may clip, as for any optimizer).
        """
        return self._pending is not None or any(t.needs_closure for t in self.transforms)

    # The inner optimizer (``optimizer.inner``), set by ``_init_wrapper`` under ``_driven_attr``:
    # declared here so that type checkers know the attribute.
    inner: Optimizer
    _driven_attr = "inner"
    _dropped_on_pickle = ("first_pass_context", "reevaluation_context")
    _transient = (*WrappingOptimizer._transient, "_progress")
    _needed_from_pickle = ("chain", "atomic")  # 0.1.0 pickled a list of transforms, no chain

    def __init__(
        self,
        params: Iterable[Any] | Optimizer,
        inner: type[Optimizer] | Callable[..., Optimizer] | None = None,
        *,
        transforms: Any = (),
        model: nn.Module | None = None,
        first_pass_context: Callable[[], ContextManager[Any]] | None = None,
        reevaluation_context: Callable[[], ContextManager[Any]] | None = None,
        transform_foreach: bool | None = None,
        non_finite: str = "skip",
        atomic: bool | str = True,
        **inner_kwargs: Any,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {model!r}")
        for name, value in (
            ("first_pass_context", first_pass_context),
            ("reevaluation_context", reevaluation_context),
        ):
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be a callable returning a context manager, got {value!r}")
        check_choice("non_finite", non_finite, ("skip", "raise"))
        if isinstance(atomic, str):
            check_choice("atomic", atomic, (True, False, "full"))
        else:
            try:
                atomic = check_bool("atomic", atomic)
            except TypeError:
                check_choice("atomic", atomic, (True, False, "full"))  # the message names every choice
                raise
        if transform_foreach is not None:
            transform_foreach = check_bool("transform_foreach", transform_foreach)
        inner_optimizer = self._build_inner(params, inner, inner_kwargs)
        if isinstance(inner_optimizer, torch.optim.LBFGS):
            raise TypeError(
                "inner must be an optimizer whose step() works without a closure, got LBFGS (it "
                "re-evaluates the closure itself): use it on its own"
            )
        closure_required, _ = step_required_arguments(inner_optimizer)  # others: refuse_driven
        if closure_required:
            raise TypeError(
                "inner must be an optimizer whose step() works without a closure, got "
                f"{type(inner_optimizer).__name__}, whose step() requires one: use it on its own"
            )
        _refuse_sharded_m_sharpness(first_pass_context, [p for g in inner_optimizer.param_groups for p in g["params"]])
        chain = Chain(transforms, inner_optimizer.defaults, type(inner_optimizer))
        if chain.transforms and built_by_zero_redundancy():
            raise TypeError(
                "TransformingOptimizer with transforms cannot be ZeroRedundancyOptimizer's local "
                "optimizer: each rank's local optimizer has only its shard of the parameters, and "
                f"the transforms ({', '.join(transform_name(t) for t in chain.transforms)}) need every "
                "parameter (a norm over all of them, every weight perturbed before the second pass); "
                "shard with FSDP2 (torch.distributed.fsdp.fully_shard) and wrap a plain optimizer "
                "over the sharded model instead"
            )
        mixing = [transform_name(t) for t in chain.transforms if not t.supports_local_first_pass]
        if first_pass_context is not None and mixing:
            raise ValueError(
                f"first_pass_context (m-sharpness) cannot be used with {', '.join(mixing)}: the update "
                "mixes in (for a seed-protocol object: may mix in) the first pass's gradients, "
                "which are then each rank's own, so the replicas would drift apart "
                "(Transform.supports_local_first_pass; a seed-protocol object that uses them only "
                "to perturb, or not at all, may declare supports_local_first_pass = True); drop "
                "first_pass_context"
            )
        reevaluating = [(transform_name(t), t.reevaluations) for t in chain.transforms if t.reevaluations]
        if first_pass_context is not None and sum(count for _, count in reevaluating) > 1:
            counts = ", ".join(f"{name} {count}" for name, count in reevaluating)
            raise ValueError(
                "first_pass_context (m-sharpness) needs a chain that re-evaluates the loss at most "
                f"once per step, got re-evaluations per step: {counts}; a rank that perturbs "
                "nothing re-evaluates once, and its synchronised backward would meet another "
                "rank's second one (Transform.reevaluations); drop first_pass_context or keep one "
                "re-evaluation"
            )
        # Check every group before changing any: nothing half-applied on error.
        normalized = [
            chain.checked_group(group, f"param_groups[{index}]")
            for index, group in enumerate(inner_optimizer.param_groups)
        ]
        for group, candidate in zip(inner_optimizer.param_groups, normalized):
            group.clear()
            group.update(candidate)
            chain.fill_group(group)

        self.chain = chain
        self.model = model
        self.first_pass_context = first_pass_context
        self.reevaluation_context = reevaluation_context
        self.transform_foreach = True if transform_foreach is None else transform_foreach
        self.non_finite = non_finite
        self.atomic = atomic
        self.skipped_steps = 0
        self._progress = _StepProgress()
        self._sharded = any_sharded(unique_params(inner_optimizer.param_groups))
        self._init_wrapper(inner_optimizer, {**inner_optimizer.defaults, **chain.defaults})

    # -- construction helpers ------------------------------------------------------------------
    @staticmethod
    def _build_inner(params: Any, inner: Any, inner_kwargs: dict[str, Any]) -> Optimizer:
        if isinstance(params, Optimizer):
            if inner is not None or inner_kwargs:
                raise TypeError(
                    "when wrapping an existing optimizer, pass no inner optimizer or inner "
                    f"arguments; got inner={inner!r} and {sorted(inner_kwargs)}"
                )
            if isinstance(params, WrappingOptimizer):
                raise TypeError(
                    f"params must not be a samgria optimizer, got a {type(params).__name__}: put all "
                    "transforms in one TransformingOptimizer"
                )
            _refuse_without_defaults(params)
            refuse_driven(params, "params")
            warn_of_hooks_not_run(params, "params", "TransformingOptimizer")
            return params
        if inner is None:
            raise TypeError(
                "inner must be a torch.optim.Optimizer subclass or a callable returning one, got None "
                "(e.g. TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1))"
            )
        if isinstance(inner, Optimizer):
            raise TypeError(
                f"inner must be an optimizer class or factory, got the optimizer instance {inner!r}; "
                "to wrap an existing optimizer use TransformingOptimizer(optimizer, transforms=...)"
            )
        if (isinstance(inner, type) and not issubclass(inner, Optimizer)) or not callable(inner):
            raise TypeError(
                f"inner must be a torch.optim.Optimizer subclass or a callable returning one, got {inner!r}"
            )
        built = inner(params, **inner_kwargs)
        if not isinstance(built, Optimizer):
            raise TypeError(f"inner must build a torch.optim.Optimizer, but {inner!r} returned {built!r}")
        _refuse_without_defaults(built)
        refuse_driven(built, "inner")
        warn_of_hooks_not_run(built, f"the optimizer {inner!r} built", "TransformingOptimizer")
        return built

    @property
    def transforms(self) -> list[Transform]:
        """The transforms, in chain order."""
        return self.chain.transforms

    @property
    def slots(self) -> list[str]:
        """The slot names, in chain order."""
        return self.chain.slots

    def _reevaluating_names(self) -> list[str]:
        """The class names of the transforms that re-evaluate the loss (SAM, ASAM), in chain order."""
        return [type(transform).__name__ for transform in self.transforms if transform.needs_closure]

    def _state_hider(self) -> Chain | None:
        return self.__dict__.get("chain")  # a transform's keys are "<slot>.<key>"

    @property
    def _pending(self) -> _PendingStep | None:
        return self._progress.pending

    @_pending.setter
    def _pending(self, pending: _PendingStep | None) -> None:
        self._progress.pending = pending

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self.__dict__.get("_progress") is None:  # unpickled or copied: idle
            self._progress = _StepProgress()
        if "chain" in self.__dict__:
            if "inner_names" not in self.chain.__dict__ and "inner" in self.__dict__:
                self.chain.record_inner_type(type(self.inner))  # a chain pickled before it recorded them

    def _check_idle(self, action: str) -> None:
        super()._check_idle(action)
        if self._pending is not None:
            raise RuntimeError(
                f"{action} between first_step() and second_step(): finish the step (or call "
                "cancel_step()) first"
            )

    # -- param groups ----------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; transform hyperparameters are checked and filled in.

        Short and qualified keys are accepted as in the constructor (see the class docstring).
        A key the group does not set takes the value of :attr:`defaults` where that was edited
        since construction (as torch fills a group from ``optimizer.defaults``), else the inner
        optimizer's or the transform's default.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        where = f"param_groups[{len(self.param_groups)}]"
        group = self.chain.checked_group(self._with_edited_defaults(param_group, self.chain.stored_key), where)
        _refuse_sharded_m_sharpness(self.first_pass_context, group["params"])
        self.inner.add_param_group(group)
        self.chain.fill_group(self.param_groups[-1])
        self._note_sharded(group["params"])

    def _note_sharded(self, params: Iterable[Any]) -> None:
        """Remember whether any parameter is a ``DTensor`` (:meth:`_align_sharded_grads` needs to
        look at the gradients only then); an optimizer pickled before the flag existed looks."""
        self._sharded = self.__dict__.get("_sharded", True) or any_sharded(list(params))

    def _check_groups(self) -> None:
        """Validate every group's hyperparameters (they may have been edited or scheduled)."""
        self._check_driven_group_kinds()
        for index, group in enumerate(self.param_groups):
            if not self._adopt_group(group, index):
                self.chain.take_qualified_edits(group, f"param_groups[{index}]")
                self.chain.validate_group(group, f"param_groups[{index}]")
                # FSDP1 flattens the parameters in place when it wraps the model after the
                # optimizer was built (accelerate's order): refused here too.
                self.chain.check_fsdp1(group["params"], f"param_groups[{index}]")

    def _complete_loaded_group(self, group: dict[str, Any], index: int, previous: Sequence[Mapping[str, Any]]) -> None:
        """Check and complete a checkpoint's group ``index`` in place: a recorded chain must be
        this one (its pending qualified edits taken); an unrecorded group takes the transforms'
        hyperparameters it lacks from ``previous[index]``; keys a transform gained since get
        their defaults."""
        where = f"the checkpoint's param_groups[{index}]"
        if CHAIN_KEY in group:
            self.chain.check_saved_spec(group[CHAIN_KEY])
            # As at a step: an edit pending under a qualified key is the newer value; a key
            # that names no hyperparameter, or several, is refused.
            self.chain.take_qualified_edits(group, where)
        else:
            self.chain.take_unrecorded_group(group, index, previous)
        # Keys a transform gained since the checkpoint get their defaults, as torch fills in
        # hyperparameters an optimizer gained since (``Optimizer.__setstate__``).
        self.chain.fill_group(group)
        self.chain.validate_group(group, where)

    def _adopt_group(self, group: dict[str, Any], index: int) -> bool:
        """Check and fill a group added to the inner optimizer directly (``inner.add_param_group``),
        as :meth:`add_param_group` would have; ``False`` for a group that already has the chain."""
        if group.get(CHAIN_KEY) == self.chain.spec():
            return False
        checked = self.chain.checked_group(group, f"param_groups[{index}]")
        group.clear()
        group.update(checked)
        self.chain.fill_group(group)
        self._note_sharded(group["params"])
        return True

    # -- the step ----------------------------------------------------------------------------------
    def _align_sharded_grads(self) -> None:
        """Give every sharded parameter's gradient the parameter's placements.

        Tensor parallelism gives a replicated bias a sharded gradient (it meets a sharded
        activation); the transforms compute on local shards, which must line up with the
        parameter's element for element (torch's optimizers use ``DTensor`` operations, which
        redistribute by themselves).
        """
        if not self.__dict__.get("_sharded", True):
            return
        with torch.no_grad():
            for param in self._unique_params():
                grad = param.grad
                if (
                    grad is not None
                    and is_sharded(param)
                    and is_sharded(grad)
                    and (grad.placements != param.placements or grad.device_mesh != param.device_mesh)
                ):
                    param.grad = grad.redistribute(param.device_mesh, param.placements)

    def _context(
        self,
        slot: str,
        reevaluate: Callable[[], Any] | None,
        grad_norm: float | None = None,
        spare_buffers: dict[int, torch.Tensor] | None = None,
    ) -> TransformContext:
        ctx = TransformContext(
            self.param_groups,
            self.state,
            slot=slot,
            keys=self.chain.keys[slot],
            reevaluate=reevaluate,
            foreach=self.transform_foreach,
            model=self.model,
            grad_norm=grad_norm,
            spare_buffers=spare_buffers,
        )
        # pytorch_optimizer's optimizers keep maximize=True on the instance, not in their groups,
        # where the transforms read the direction of their climb (SAM's worst case of -L lies
        # down L): a group without the key reads the instance's.
        maximize = getattr(self.inner, "maximize", None)
        if isinstance(maximize, bool):
            ctx.param_groups = [
                view if "maximize" in view else _WithMaximize(view, maximize)  # type: ignore[misc]
                for view in ctx.param_groups
            ]
        return ctx

    def _enter(self, factory: Callable[[], ContextManager[Any]] | None) -> ContextManager[Any]:
        return factory() if factory is not None else contextlib.nullcontext()

    def _device(self) -> torch.device:
        """The device of the first parameter (where a collective's tensor goes)."""
        return next(param for group in self.param_groups for param in group["params"]).device

    def _grad_norm(self) -> float:
        """The global L2 norm of every gradient (complex as pairs of reals), read on the host."""
        grads, sources = self._grads()
        return float(global_norm(grads, foreach=self.transform_foreach, like=sources))

    def _grads_finite(self, grad_norm: float | None = None) -> bool:
        """Whether every gradient element is finite: the non-finite policy's verdict.

        ``grad_norm``: the global norm, when it was computed anyway (a finite norm answers without
        another read; an infinite one may be the overflow of finite gradients, so they are read).
        """
        if grad_norm is not None and math.isfinite(grad_norm):
            return True
        grads, sources = self._grads()
        return all_finite(grads, foreach=self.transform_foreach, like=sources)

    def _first_checks_first_pass(self) -> bool:
        """Whether the first transform checks the first pass's gradients itself (ASAM, FriendlySAM:
        its norm is finite only if every gradient is), so that the global gradient norm is not taken
        before the chain: the class declares ``_checks_first_pass`` in its own body (a subclass
        does not inherit it), the instance overrides neither ``perturb`` nor ``pre_update``, and
        no ``first_pass_context`` makes the ranks agree on the verdict first."""
        if self.first_pass_context is not None or not self.chain.transforms:
            return False
        first = self.chain.transforms[0]
        return bool(type(first).__dict__.get("_checks_first_pass")) and not (
            "perturb" in first.__dict__ or "pre_update" in first.__dict__
        )

    def _check_first_pass(self) -> None:
        """What such a transform calls where its norm is not finite: the first pass's verdict
        (every gradient read), raising the first evaluation's skip when a gradient is not finite."""
        if not self._grads_finite():
            raise _NonFiniteGradients(1)

    @contextlib.contextmanager
    def _first_pass_checked_by(self, ctx: TransformContext) -> Iterator[None]:
        """Hand :meth:`_check_first_pass` to the first transform's ``ctx`` while it runs
        (:meth:`_first_checks_first_pass`), and take it back after: what the step keeps of ``ctx``
        (a finishing function of a pending step) must not hold the optimizer."""
        ctx.__dict__["_check_first_pass"] = self._check_first_pass
        try:
            yield
        finally:
            del ctx.__dict__["_check_first_pass"]

    def _skip(self, which: str, where: str = "") -> None:
        """Apply the non-finite policy to a step whose ``which`` gradients (``where``) are not finite."""
        message = (
            f"the gradients of the {which} evaluation{where} are not finite: the step is skipped "
            "(weights and optimizer state unchanged)"
        )
        if self.non_finite == "raise":
            raise FloatingPointError(message + "; non_finite='raise' was set")
        self.skipped_steps += 1
        warnings.warn(f"TransformingOptimizer: {message}", RuntimeWarning, stacklevel=stacklevel_outside())

    def _amp_skip_or_unscale(self, also: Sequence[torch.Tensor] = ()) -> bool:
        """Apply GradScaler's verdict when it called us: ``True`` means skip this step.

        ``torch.amp.GradScaler.step`` sets ``found_inf`` and ``grad_scale`` on an optimizer whose
        ``_step_supports_amp_scaling`` is true, and calls ``step()`` even after an overflow.
        ``also``: tensors in the gradients' scale that are unscaled with them.
        """
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return False
        if float(found_inf) != 0.0:
            return True
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            self._mul_grads_(grad_scale.double().reciprocal().float(), also)
        return False

    def _mul_grads_(self, factor: torch.Tensor, also: Sequence[torch.Tensor] = ()) -> None:
        """Multiply every gradient (and ``also``) by ``factor`` (a 0-dim tensor), one list call
        per device and dtype."""
        # Local shards of sharded gradients (``also`` holds local shards: WSAM's kept gradients),
        # real views of complex ones: one list call cannot mix DTensors with plain tensors.
        grads = all_as_real([p.grad for p in self._unique_params() if p.grad is not None]) + list(also)
        for (device, _dtype), indices in group_indices_by_device_and_dtype(grads).items():
            torch._foreach_mul_([grads[i] for i in indices], factor.to(device))

    def _loss_scale_refusal(self, pending: _PendingStep) -> str | None:
        """Why a two-call step that ``GradScaler`` finishes would be wrong, or ``None``.

        ``first_step()`` saw the first pass's gradients multiplied by the loss scale, which it
        does not know. That is harmless where only their direction counts, but not where the
        size of what was computed from them does: a move by their size (a perturbation that
        declares ``Perturbation(..., scale_dependent=True)``: ``MultiStepSAM(normalize=False)``,
        a user's ``e = rho * g``), a transform before GSAM, WSAM or LookSAM (which
        mix them into the step) that is not scale-equivariant, or a transform before SAM or
        ASAM whose result changes direction with their size (clipping values, a bias, one
        clipping factor per param group).
        """
        perturbation = pending.perturbation
        split = pending.resume_at - 1
        name = type(self.transforms[split]).__name__
        if getattr(perturbation, "scale_dependent", False):  # Perturbation(scale_dependent=True)
            remedy = "use normalize=True, or " if hasattr(self.transforms[split], "normalize") else ""
            return (
                f"{name} computed its move in first_step() from the size of the first pass's "
                "gradients, which GradScaler has multiplied by the loss scale (its Perturbation "
                f"declares scale_dependent=True, as MultiStepSAM's ascent with normalize=False): {remedy}"
                "train without a loss scaler (float32, or bfloat16 autocast, which needs none)"
            )
        if perturbation is None or pending.rerun_before:  # nothing perturbed (no re-evaluating
            # transform, rho=0, a zero direction, a non-finite first pass): no direction was used,
            # and the transforms before run again on the second pass's unscaled gradients
            return None
        mixes = getattr(perturbation, "mixes_first_pass", False)
        before = list(pending.not_scaling if mixes else pending.not_keeping_direction)
        if not before:
            return None
        if not mixes:
            return (
                f"{name} perturbs along the direction of the first pass's gradients, and "
                f"{', '.join(before)} acted on them in first_step() while GradScaler had them "
                "multiplied by the loss scale, which changes the direction of its result "
                f"(Transform.keeps_direction_of_gradients): place {', '.join(before)} after {name}, "
                "or train without a loss scaler (float32, or bfloat16 autocast, which needs none)"
            )
        return (
            f"{name} mixes the first pass's gradients into the step, and {', '.join(before)} "
            "acted on them in first_step() while GradScaler had them multiplied by the loss scale, "
            "which its result does not scale with (Transform.scales_with_gradients): place "
            f"{', '.join(before)} after {name}, or train without a loss scaler (float32, or "
            "bfloat16 autocast, which needs none)"
        )

    def _scale_sensitive_before(self, split: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The names of the transforms before ``split`` whose result does not scale with the
        gradients (``Transform.scales_with_gradients``), and of those of them whose result
        changes direction with their size (``Transform.keeps_direction_of_gradients``); only
        transforms with a ``pre_update`` of their own are asked."""
        not_scaling: list[str] = []
        not_keeping: list[str] = []
        for slot, transform in list(self.chain)[:split]:
            if type(transform).pre_update is Transform.pre_update:
                continue
            groups = self._context(slot, None).param_groups
            if not transform.scales_with_gradients(groups):
                not_scaling.append(transform_name(transform))
                if not transform.keeps_direction_of_gradients(groups):
                    not_keeping.append(transform_name(transform))
        return tuple(not_scaling), tuple(not_keeping)

    def _rescale_unscaled_grads(self) -> None:
        """Put the second pass's gradients back into the loss scale when ``GradScaler.unscale_``
        unscaled them (to clip them) before ``scaler.step``, for a step that finishes by mixing
        in the first pass's gradients, which are still scaled (GSAM, WSAM, LookSAM): the finish
        then sees both in one scale, and the step unscales its result as when the scaler had not
        unscaled first. Both multiplications are exact for a scale that is a power of two
        (GradScaler's defaults keep it one; an ``init_scale`` or ``growth_factor`` that is not
        may cost a rounding).
        """
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None or getattr(self, "grad_scale", None) is not None or float(found_inf) != 0.0:
            return  # no scaler, a scaler that did not unscale first, or an overflow (skipped)
        scaler = stepping_grad_scaler(SCALER_FRAMES)
        if scaler is None:
            raise RuntimeError(
                "the gradients were unscaled before this step, but the GradScaler that unscaled "
                "them is not the one stepping (torch.amp.GradScaler.step): the first pass's "
                "gradients, which this chain mixes in, cannot be brought into the same scale; call "
                "scaler.step(optimizer) after scaler.unscale_(optimizer)"
            )
        scale = grad_scaler_scale(scaler)  # the scale unscale_ divided by
        self._mul_grads_(scale)
        self.grad_scale = scale

    def _forget_scaler(self) -> None:
        """Drop what ``GradScaler.step`` set before a step that raises (it deletes them only after
        a step returns), so a later step without a scaler does not read them."""
        self.__dict__.pop("found_inf", None)
        self.__dict__.pop("grad_scale", None)

    def _snapshot_before_inner_step(
        self, spare_buffers: dict[int, torch.Tensor]
    ) -> StepSnapshot | StateStructure | None:
        """What undoes a failure in or after the inner step, taken just before it.

        torch.optim's own optimizers check a param group's inputs before they write into its
        tensors (a value of another kind than its default, which they would use only as they
        write, is refused before the step: ``_check_driven_group_kinds``; what they may create
        before raising, new state entries, is undone without copies: :class:`StateStructure`),
        but they step the groups one after another: a group
        they refuse leaves the groups before it stepped. So the weights and state of every group
        before the last one with a gradient are copied. Any other inner optimizer (Adafactor and
        Muon too, which check some inputs only inside their loop over tensors), or a post-step
        transform after a completed inner step, may fail after writing anywhere: everything is
        copied; so is it with ``atomic="full"``, for a failure inside torch's step after it began
        writing (an allocation that fails: foreach Adam allocates ``sqrt(exp_avg_sq)`` after it
        updated the moments).
        """
        if not self.atomic:
            return None
        self._adopt_driven_state()
        if (
            self.atomic == "full"
            or self._loaded_state_unstepped
            or not checks_before_writing(self.inner)
            or any(_has_post_update(transform) for transform in self.transforms)
        ):
            # A loaded state's tensors may not fit the parameters (a checkpoint of another model
            # with as many parameters): torch's optimizers find that out only while they write.
            return StepSnapshot(self._unique_params(), self.state, spare_buffers)
        if not any(isinstance(t, PerturbationTransform) for t in self.transforms) and any(
            param.grad is not None and param.grad.is_sparse for param in self._unique_params()
        ):
            # torch's Adagrad refuses a sparse gradient with weight_decay inside its per-tensor
            # loop, after the tensors before it stepped (the SAM family refuses sparse gradients
            # before anything changes).
            return StepSnapshot(self._unique_params(), self.state, spare_buffers)
        return self._groups_undo(spare_buffers)

    def _pre_step_structure(self) -> StepSnapshot | StateStructure | None:
        """The state's references at the start of a step, when a transform saves state before the
        inner step (the SAM family's averages, directions, random streams): put back if the step
        raises later, is skipped or cancelled. No state tensor is copied (such transforms assign
        new objects); the weights are, when a transform writes them before the inner step and
        leaves them changed (``writes_weights_before_step``)."""
        return self._structure_for(self.transforms) if self.atomic else None

    def _structure_for(self, transforms: Sequence[Transform]) -> StepSnapshot | StateStructure | None:
        """What undoes ``transforms``' pre-step work: a copy of the weights (without state tensors)
        when one writes them, the state's references when one saves state, else nothing."""
        if any(t.writes_weights_before_step for t in transforms):
            return StepSnapshot(self._unique_params(), self.state, copy_state=False)
        if any(t.saves_state_before_step for t in transforms):
            return StateStructure(self.state)
        return None

    def _may_leave_non_finite(self, slot: str, transform: Transform) -> bool:
        """Whether ``transform`` (in ``slot``) combines gradients or may, with its groups'
        settings, overflow them (``combines_gradients``, ``can_overflow_gradients``): the
        gradients it leaves are then checked."""
        return transform.combines_gradients or transform.can_overflow_gradients(
            self._context(slot, None).param_groups
        )

    def _check_after(self, transforms: Sequence[tuple[str, Transform]], evaluation: int) -> None:
        """Raise ``_NonFiniteGradients`` if one of ``transforms`` (``(slot, transform)``, those that
        just ran) may leave non-finite gradients (:meth:`_may_leave_non_finite`) and the gradients
        they left are not finite (``evaluation``: the number of the evaluation they come from); the
        message names the last such transform."""
        checked = [t for slot, t in transforms if self._may_leave_non_finite(slot, t)]
        if checked and not self._grads_finite():
            verb = "combined" if checked[-1].combines_gradients else "computed"
            raise _NonFiniteGradients(evaluation, combined_by=transform_name(checked[-1]), verb=verb)

    @torch.no_grad()
    def _run_chain(
        self,
        start: int,
        reevaluate: Callable[[], Any] | None,
        grad_norm: float | None,
        spare_buffers: dict[int, torch.Tensor] | None = None,
        skip: int | None = None,
        evaluated: int = 1,
        loss: Any = _NO_LOSS,
        first_checks: bool = False,
    ) -> None:
        """Pre-step transforms from ``start`` on (but ``skip``), the inner step, the post-step ones.

        ``loss``: the closure's first evaluation in ``step(closure)``, handed to the inner step
        through :meth:`_replaying`. ``first_checks``: the first pass's gradients were not checked,
        the first transform checks them (:meth:`_first_checks_first_pass`).

        After a transform that combines gradients (``Transform.combines_gradients``) the
        gradients are checked for the non-finite policy, in every loop, so that ``step(closure)``,
        ``step()`` and the two-call loop skip the same steps: ``_NonFiniteGradients`` (numbering
        the evaluation from ``evaluated``, the closure's evaluations before this call; the
        two-call loop's gradients are its second pass's) raises before the inner step; as after
        one that may overflow them (``Transform.can_overflow_gradients``). Under
        ``first_pass_context`` the first run's gradients before a re-evaluation are this rank's
        own, and the ranks must reach their agreement (a collective) before any of them skips: the
        gradients that the transforms after the re-evaluation (or run again, below), and a
        re-evaluating one that combines them, left on the synchronised ones are checked once,
        after it, on every rank alike.

        When the first evaluation ran under ``first_pass_context`` (e.g. DDP's ``no_sync``) and no
        transform re-evaluated on this rank (nothing was perturbed), its gradients were never
        synchronised: the closure is evaluated once more, normally. If no rank re-evaluated, the
        pre-step transforms run again on those gradients (a parameter it missed keeps its first
        gradient, zeroed, as the step without ``first_pass_context`` keeps it); if another rank
        did (it perturbed with its own gradient), only those after the re-evaluating transform run
        again, as they ran there, so that every replica applies the same update. Before they run again, the state
        they saved in their first run (``saves_state_before_step``) is put back: each updates its
        state once per step, as without ``first_pass_context`` (a transform that writes the
        weights before the step writes them again).
        """
        spare_buffers = {} if spare_buffers is None else spare_buffers
        evaluations = [0]
        raised: list[_NonFiniteGradients] = []  # what a re-evaluation raised, swallowed or not

        def counting() -> Any:
            evaluations[0] += 1
            try:
                return reevaluate()  # type: ignore[misc]
            except _NonFiniteGradients as non_finite:
                raised.append(non_finite)
                raise

        counted = counting if reevaluate is not None else None

        transforms = [(i, slot, t) for i, (slot, t) in enumerate(self.chain) if i >= start and i != skip]
        first_run = None  # what the transforms that may run twice (below) saved before their first run
        # Whether the first run may see this rank's own gradients (until a re-evaluation here).
        local_first_run = reevaluate is not None and self.first_pass_context is not None
        if local_first_run:
            saving = [slot for _, slot, t in transforms if t.saves_state_before_step and not t.needs_closure]
            first_run = SlotValues(self.state, saving) if saving else None
        for index, (_, slot, transform) in enumerate(transforms):
            ctx = self._context(slot, counted, grad_norm if index == 0 else None, spare_buffers)
            if first_checks and index == 0:
                with self._first_pass_checked_by(ctx):
                    transform.pre_update(ctx)
            else:
                transform.pre_update(ctx)
            if raised:  # the transform swallowed it (except Exception: pass): the policy applies
                raise raised[0]
            # In every loop (a built-in's combination in the two-call loop is checked once
            # second_step() has finished it, before this runs the transforms after it); under
            # first_pass_context once the ranks agreed (below).
            if not local_first_run and (
                transform.combines_gradients or transform.can_overflow_gradients(ctx.param_groups)
            ):
                self._check_after([(slot, transform)], evaluated + evaluations[0])
        if local_first_run:
            reevaluated_here = evaluations[0] > 0
            first_grads: list[tuple[torch.Tensor, torch.Tensor]] = []
            if not reevaluated_here:
                first_grads = [(p, p.grad) for p in self._unique_params() if p.grad is not None]
                reevaluate()  # type: ignore[misc]  # (local_first_run: reevaluate is not None)
            # After every rank's one synchronised backward: the same order of collectives.
            reevaluated_anywhere = _on_any_rank(reevaluated_here, self.first_pass_context, self._device())
            if not reevaluated_anywhere:
                # The step without first_pass_context steps with the first pass's gradients: one
                # that backward misses is the zero a loop zeroing in place left there, not the None
                # that the evaluation above cleared it to (zeroed, as first_step() zeroes them).
                for param, grad in first_grads:
                    if param.grad is None:
                        param.grad = grad.zero_()
            first = next((i for i, (_, _, t) in enumerate(transforms) if t.needs_closure), -1)
            synchronised = transforms[first + 1 :] if reevaluated_anywhere else transforms
            if not reevaluated_here:
                if first_run is not None:
                    first_run.restore([slot for _, slot, t in synchronised if t.saves_state_before_step and not t.needs_closure])
                for _, slot, transform in synchronised:
                    if not transform.needs_closure:
                        transform.pre_update(self._context(slot, None))
            # One verdict, on the synchronised gradients, at the same point on every rank (a rank
            # that skipped alone before the agreement would leave the others waiting in it).
            checked = [(slot, t) for _, slot, t in synchronised if not t.needs_closure]
            if first >= 0:  # and what the re-evaluating one handed on (combines_gradients)
                # On every rank alike, also where it re-evaluated nothing (it then handed on the
                # synchronised gradients themselves): whether a rank checks must not depend on
                # what it perturbed, as a sharded check is a collective too.
                checked.insert(0, transforms[first][1:])
            self._check_after(checked, evaluated + 1)
        snapshot = self._snapshot_before_inner_step(spare_buffers)
        # torch's own optimizers keep nothing in their groups or attributes; others may
        # (group["step"] += 1, self.total_step += 1).
        outside_state = (
            ValuesOutsideState(self.param_groups, self.inner)
            if snapshot is not None and not is_torch_optimizer(self.inner)
            else None
        )
        spare_buffers.clear()
        try:
            self._driven_step(self._replaying(loss))
            self._loaded_state_unstepped = False
            for slot, transform in self.chain:
                if _has_post_update(transform):
                    transform.post_update(self._context(slot, None))
        except BaseException:
            if snapshot is not None:
                snapshot.restore()
            if outside_state is not None:
                outside_state.restore()
            raise

    def _refuse_graph_at_moved_weights(self) -> None:
        """Raise ``RuntimeError`` if a re-evaluation at moved weights left gradients that carry a
        graph (``backward(create_graph=True)``) for an inner optimizer that is not one of
        torch.optim's own (those never differentiate the gradients; others may: SophiaH's and
        AdaHessian's Hessian estimates). The graph saved the moved weights' tensors, which the
        step puts back before the inner step: a derivative taken from it then mixes :math:`w`
        and :math:`w + e` silently, or torch raises that a saved tensor was modified."""
        if is_torch_optimizer(self.inner):
            return
        if any(param.grad is not None and param.grad.requires_grad for param in self._unique_params()):
            # Those that may re-evaluate: a seed-protocol object declares no needs_closure.
            reevaluating = [transform_name(t) for t in self.transforms if t.needs_closure or t.reevaluations > 0]
            name, names = type(self.inner).__name__, ", ".join(reevaluating)
            raise RuntimeError(
                f"{names} re-evaluated the loss at moved weights with backward(create_graph=True): "
                "the gradients' graph holds those weights, which are put back before the inner "
                f"step, so {name} would differentiate the gradients through weights that are no "
                "longer there. An inner optimizer that needs that graph (a Hessian estimate, as "
                f"SophiaH and AdaHessian take) cannot follow {names}: use {name} on its own; any "
                "other: call backward() without create_graph=True in the re-evaluation. The step "
                "was not applied (weights and state as before)"
            )

    def _replaying(self, loss: Any) -> Callable[[], Any] | None:
        """The closure the inner step gets: in ``step(closure)``, for an inner optimizer that is
        not one of torch.optim's own (those only return what the closure returns), one that
        returns ``loss``, the closure's first evaluation, without evaluating again.

        Some optimizers use the loss when their step is given a closure (pytorch_optimizer's
        EmoNavi follows its trend, AliG takes a Polyak step from it); they call the closure at
        the start of their step, at the weights and with the gradients the wrapper's evaluation
        left (for SAM, the weights put back and the second pass's gradients). One that calls it
        after changing the weights would evaluate the model there (a SAM-style optimizer): the
        replay refuses that, as the weights' version counters tell.
        """
        if loss is _NO_LOSS or is_torch_optimizer(self.inner):
            return None
        params = self._unique_params()
        versions = [param._version for param in params]
        name = type(self.inner).__name__

        def replay() -> Any:
            if any(param._version != version for param, version in zip(params, versions)):
                raise RuntimeError(
                    f"the inner optimizer {name} changed the weights and then called the closure "
                    "given to its step: it evaluates the model during its step (as a SAM-style "
                    "optimizer does), which the wrapper cannot do for it (it evaluates the closure "
                    "itself, at the step's weights, and hands on that evaluation's loss): use "
                    f"{name} on its own"
                )
            return loss

        return replay

    def _refuse_framework_accumulation(self, closure: Callable[[], Any]) -> None:
        """Raise before anything changes when a framework accumulated micro-batches outside the
        closure that a re-evaluating transform would run again (see :mod:`samgria._frameworks`)."""
        needing = self._reevaluating_names()
        setting = accumulating_framework(closure) if needing else None
        if setting is not None:
            raise RuntimeError(
                f"{', '.join(needing)} re-evaluate(s) the loss, but {setting} ran the earlier "
                "micro-batches of this step outside the optimizer: the second pass would see the "
                "last micro-batch only (a different algorithm). Accumulate inside the closure (or "
                "use the two-call loop over every micro-batch), or train with one micro-batch per "
                "step; with Lightning add callbacks=[samgria.integrations.lightning.SAMCallback()], "
                "which refuses this setting when fit starts; with accelerate use "
                "samgria.integrations.accelerate.SAMAccelerator or sam_accelerated(optimizer), which "
                "refuse accumulate()'s micro-batches themselves and take a closure over every "
                "micro-batch, or set gradient_accumulation_steps=1"
            )

    def _before_step_hooks(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """``step()`` (or ``second_step()``, ``GradScaler.step``) finishing a two-call step puts
        :math:`w` back before torch's wrapper runs the step pre-hooks, so that they see (and may
        change) the weights the step updates, as ``step(closure)``'s do; the pending step
        finishes as before (its put-back is done). Not when the call brings a closure (a
        framework's wrapper, Lightning's, passes its own): that runs before the put-back, as
        the second pass did, in case it evaluates the model."""
        pending = self._pending
        closure = args[0] if args else kwargs.get("closure")
        if pending is not None and pending.perturbation is not None and closure is None:
            if self._checkpoint_init_while_pending(closure):
                return  # the step stays pending, at w + e (see _step)
            pending.perturbation.restore_weights()

    def _checkpoint_init_while_pending(self, closure: Callable[[], Any] | None) -> bool:
        """Whether ``torch.distributed.checkpoint`` initialises the state (a zero-gradient step
        with lr 0, :meth:`_is_state_init_step`) between :meth:`first_step` and
        :meth:`second_step`, where the gradients are cleared. That step must not finish the
        pending one: it changes nothing, and the ``state_dict()`` or ``load_state_dict()`` that
        follows it refuses, naming the remedy (torch sets the ``lr`` back only after a step
        that returns)."""
        return (
            self._pending is not None
            and closure is None
            and not self._progress.finishing
            and self._is_state_init_step()
        )

    def _after_failed_step(self) -> None:
        self._forget_scaler()  # GradScaler.step deletes what it set only after step() returns

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step.

        Args:
            closure: Re-evaluates the model: zero the gradients, compute the loss, call
                ``backward()`` and return the loss. Required when a transform re-evaluates (SAM,
                ASAM) unless :meth:`first_step` was called; then ``step()`` without a closure
                finishes the step like :meth:`second_step`. An inner optimizer that is not
                one of ``torch.optim``'s own gets a closure that returns the loss of the first
                evaluation without evaluating again (for one that uses the loss); one that
                calls it after changing the weights raises ``RuntimeError``, with nothing
                changed.

        A function compiled with ``torch.compile`` that calls ``step()`` (a whole training step)
        runs it eagerly, as torch runs its optimizers' ``zero_grad()`` and ``state_dict()``: a
        graph break there (``fullgraph=True`` refuses it); so do :meth:`first_step`,
        :meth:`second_step` and :meth:`cancel_step`.

        Returns:
            The closure's loss at the current weights (its first evaluation; a tensor is returned
            detached, its graph already released), or ``None``.

        Raises:
            RuntimeError: Before anything changes, if a transform needs a closure and none was
                given without :meth:`first_step`, if ``torch.amp.GradScaler.step`` passes a
                closure (the scaler cannot scale and unscale the passes the closure runs; for a
                chain that does not re-evaluate, it unscaled the gradients the closure then
                computes anew, scaled), or if
                a framework accumulated earlier micro-batches outside the closure that a
                transform re-evaluates (Lightning's ``accumulate_grad_batches > 1``). With
                nothing changed, if a re-evaluation at moved weights (SAM's) ran
                ``backward(create_graph=True)`` for an inner optimizer that is not one of
                ``torch.optim``'s own: the gradients' graph holds the moved weights, which are
                put back before the inner step, so one that differentiates the gradients
                (SophiaH, AdaHessian) would take its Hessian estimate through weights no longer
                there (the two-call loop's :meth:`second_step` refuses it too).
        """
        return self._step(closure)

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None) -> Any:
        """:meth:`step`'s body, under ``no_grad`` as torch's steps are (gradients of
        ``backward(create_graph=True)`` require grad: norms and updates record nothing); the
        closure runs under ``enable_grad``."""
        if self._pending is None:
            # A state given to the inner optimizer directly becomes the wrapper's before anything
            # records the state's structure (to put it back if the step fails).
            self._adopt_driven_state()
        if self._checkpoint_init_while_pending(closure):
            return None
        if self._pending is not None:
            if closure is not None:
                if not self._progress.finishing:
                    raise RuntimeError(
                        "first_step() was called: finish this step with second_step() (or step() "
                        "without a closure) before calling step(closure)"
                    )
                with torch.enable_grad():
                    closure()  # the closure of a wrapper that second_step() went through: its hooks
            # Edited since first_step() (or by a step pre-hook): checked as step(closure) checks
            # them; a refusal leaves the step pending (second_step() again, or cancel_step()).
            self._check_groups()
            return self._finish_pending()

        scaled = getattr(self, "found_inf", None) is not None  # GradScaler.step called us
        self._check_groups()
        if closure is None:
            if self._is_state_init_step():
                self._driven_step()
                with torch.no_grad():
                    for slot, transform in self.chain:
                        transform.init_state(self._context(slot, None))
                _warn_without_init_state(self.transforms)
                return None
            needing = [t for t in self.transforms if t.needs_closure]
            if needing:
                names = ", ".join(type(t).__name__ for t in needing)
                message = _SCALER_WITHOUT_FIRST_STEP_MESSAGE if scaled else _NEEDS_CLOSURE_MESSAGE
                self._forget_scaler()
                raise RuntimeError(message.format(names=names))
            self._align_sharded_grads()
            if self._amp_skip_or_unscale():
                return None
            if not self._grads_finite():
                self._skip("first")
                return None
            try:
                with _put_back_on_error(self._pre_step_structure()):
                    self._run_chain(0, None, None)
            except _NonFiniteGradients as non_finite:  # a transform combined them (put back above)
                self._skip(_ordinal(non_finite.evaluation), _combined_by(non_finite))
            return None

        if scaled:
            self._forget_scaler()
            raise RuntimeError(_SCALER_WITH_CLOSURE_MESSAGE)
        refuse_closure_under_grad_scaler(type(self).__name__)  # a chain the scaler unscaled for
        self._refuse_framework_accumulation(closure)
        with torch.enable_grad(), self._enter(self.first_pass_context):
            loss = closure()
        if isinstance(loss, torch.Tensor):
            # Release the first evaluation's autograd graph before the re-evaluation: holding it
            # pins thousands of small allocations across the second pass (process peak memory).
            loss = loss.detach()
        self._align_sharded_grads()
        first_checks = self._first_checks_first_pass()
        grad_norm = None
        if not first_checks:  # else the first transform checks them (_check_first_pass)
            grad_norm = self._grad_norm()
            finite_here = self._grads_finite(grad_norm)
            finite = finite_here
            if self.first_pass_context is not None:  # local gradients: every rank skips, or none
                finite = not _on_any_rank(not finite_here, self.first_pass_context, self._device())
            if not finite:
                self._skip("first", "" if not finite_here else " on another rank")
                return loss

        evaluations = 1

        def reevaluate() -> Any:
            nonlocal evaluations
            evaluations += 1
            # What zero_grad(set_to_none=True) does, without its profiler record: a trace shows
            # the user's own zero_grad calls only.
            for param in self._unique_params():
                param.grad = None
            forget_autocast_copies()  # a transform moved the weights
            with torch.enable_grad(), self._enter(self.reevaluation_context):
                result = closure()
            self._align_sharded_grads()
            if not self._grads_finite():
                raise _NonFiniteGradients(evaluations)
            self._refuse_graph_at_moved_weights()
            return result

        try:
            with _put_back_on_error(self._pre_step_structure()):
                self._run_chain(0, reevaluate, grad_norm, loss=loss, first_checks=first_checks)
        except _NonFiniteGradients as non_finite:  # also the first pass's (first_checks)
            self._skip(_ordinal(non_finite.evaluation), _combined_by(non_finite))
        finally:
            if evaluations > 1:
                forget_autocast_copies()  # copies of the moved weights, cast in a re-evaluation
        return loss

    def _finish_pending(self) -> Any:
        try:
            return self._finish_pending_step()
        finally:
            forget_autocast_copies()  # copies of the perturbed weights, cast in the second pass

    def _finish_pending_step(self) -> Any:
        """:meth:`_finish_pending`'s body."""
        pending, self._pending = self._pending, None
        assert pending is not None
        structure = pending.structure
        if structure is None and pending.perturbation is None and pending.resume_at == 0:
            # Nothing re-evaluates: the whole chain runs now, as in step() without a closure.
            structure = self._pre_step_structure()
        refusal = self._loss_scale_refusal(pending) if getattr(self, "found_inf", None) is not None else None
        if refusal is not None:
            if pending.perturbation is not None:
                pending.perturbation.restore_weights()
            if structure is not None:
                structure.restore()
            raise RuntimeError(refusal + "; the weights are restored")
        restored = pending.perturbation is None
        try:
            if pending.perturbation is not None and not pending.rerun_before:
                self._refuse_graph_at_moved_weights()
            spare_buffers = {}
            self._align_sharded_grads()
            if pending.perturbation is not None:
                if getattr(pending.perturbation, "mixes_first_pass", False):
                    self._rescale_unscaled_grads()
                spare_buffers = pending.perturbation.restore()
                restored = True
            if self._amp_skip_or_unscale(getattr(pending.perturbation, "scaled_with_gradients", ())):
                skipped = True
            elif pending.non_finite:
                self._skip("first", pending.non_finite_where)
                skipped = True
            elif not self._grads_finite():
                self._skip("second")
                skipped = True
            else:
                skipped = False
                try:
                    if pending.rerun_before:
                        self._run_chain(0, None, None, spare_buffers, skip=pending.resume_at - 1, evaluated=2)
                    else:
                        self._run_chain(pending.resume_at, None, None, spare_buffers, evaluated=2)
                except _NonFiniteGradients as non_finite:  # a transform after the split combined them
                    self._skip(_ordinal(non_finite.evaluation), _combined_by(non_finite))
                    skipped = True
        except BaseException:
            if not restored:  # raised before (or while) the weights went back: w, not w + e
                pending.perturbation.restore_weights()  # type: ignore[union-attr]
            if structure is not None:
                structure.restore()
            raise
        if skipped and structure is not None:
            structure.restore()
        return None

    @property
    def base_optimizer(self) -> Optimizer:
        """The wrapped optimizer (the same object as :attr:`inner`), under the name the widely
        used PyTorch SAM gives it."""
        return self.inner

    def _two_call_refusal(self) -> str | None:
        """Why :meth:`first_step`/:meth:`second_step` cannot run this chain, or ``None``: the two-call
        loop has one second pass, so it takes at most one re-evaluating transform, a
        :class:`PerturbationTransform` that re-evaluates once. The integrations that drive the
        two-call loop themselves ask before training starts."""
        reevaluating = [t for t in self.transforms if t.needs_closure]
        if len(reevaluating) > 1:
            return (
                "first_step()/second_step() support one re-evaluating transform; this chain has "
                f"{len(reevaluating)}: use optimizer.step(closure)"
            )
        if not reevaluating:
            return None
        transform = reevaluating[0]
        if not isinstance(transform, PerturbationTransform):
            return f"{transform!r} does not support first_step()/second_step(); use step(closure)"
        if transform.reevaluations > 1:
            return (
                f"{transform.describe()} re-evaluates the loss {transform.reevaluations} times per step, "
                "which first_step()/second_step() cannot do: use optimizer.step(closure), or one "
                "re-evaluation per step (ascent_steps=1 for MultiStepSAM)"
            )
        if self.first_pass_context is not None:
            return (
                "first_pass_context (m-sharpness) needs step(closure), which agrees the ranks' "
                "decisions on their local first-pass gradients; first_step()/second_step() cannot "
                "(a rank that perturbed nothing would run the transforms before SAM again alone): "
                "use step(closure), or drop first_pass_context (SAM then perturbs with the global "
                "gradient)"
            )
        return None

    @eager_under_compile
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """First half of a step for loops without a closure (AMP, Hugging Face style).

        Call after the first ``backward()``: runs the pre-step transforms up to the re-evaluating
        one (SAM), which moves the weights to :math:`w + e`. Every gradient is then cleared (set
        to ``None``), as ``step(closure)`` clears them before its second evaluation. Run the
        second forward and backward and call :meth:`second_step`. Equal bit for bit to
        ``step(closure)``, also when nothing is perturbed (``rho=0``, zero gradient): the second
        pass then ran at the unperturbed weights, so ``second_step`` runs the transforms before
        the re-evaluating one again, on its gradients (what the caller did to them —
        ``GradScaler.unscale_``, clipping — is kept); the gradients are then zeroed in place
        instead, so that one the second backward does not reach (a frozen parameter's, zeroed
        with ``zero_grad(set_to_none=False)``) is stepped as ``step(closure)`` steps it.

        If the gradients are not finite (e.g. an fp16 overflow under ``GradScaler``), nothing is
        perturbed and the gradients are kept: the second backward accumulates onto them, so
        ``scaler.step`` sees the overflow, skips the step and backs off; without a scaler the
        step is skipped by the non-finite policy.

        Args:
            zero_grad: Accepted for compatibility with the widely used PyTorch SAM; the gradients
                are cleared either way.

        Raises:
            TypeError: If ``zero_grad`` is not a bool.
            RuntimeError: If a step is pending already (``first_step()`` twice), or the chain
                cannot run in two calls (the message says why and what to do instead).
            ValueError: If a param group's transform hyperparameter was set to an invalid value
                (checked as ``step(closure)`` checks it), before anything changes.
        """
        check_bool("zero_grad", zero_grad)
        if self._pending is not None:
            raise RuntimeError(
                "first_step() was called twice; call second_step() in between, or cancel_step() "
                "to abandon the step"
            )
        refusal = self._two_call_refusal()
        if refusal is not None:
            raise RuntimeError(refusal)
        self._adopt_driven_state()
        self._check_groups()
        self._align_sharded_grads()
        reevaluating = [i for i, t in enumerate(self.transforms) if t.needs_closure]
        if not reevaluating:  # every transform acts on the second pass's gradients
            if not self._grads_finite():  # skipped as step(closure) skips it; kept for GradScaler
                self._pending = _PendingStep(None, 0, non_finite=True)
                return
            self._pending = _PendingStep(None, 0)
            self.zero_grad(set_to_none=False)  # nothing perturbed: see the end of this method
            return
        split = reevaluating[0]
        # _two_call_refusal lets a re-evaluating transform through only if it is one
        transform = cast(PerturbationTransform, self.transforms[split])
        first_checks = split == 0 and self._first_checks_first_pass()
        grad_norm = None
        if not first_checks:  # else perturb() checks them (_check_first_pass)
            grad_norm = self._grad_norm()
            if not self._grads_finite(grad_norm):
                self._pending = _PendingStep(None, split + 1, non_finite=True)
                return
        structure = self._pre_step_structure()
        # If nothing is perturbed, second_step() runs the transforms before again, on the second
        # pass's gradients: what they did here (weights a hook wrote, state they saved) is undone
        # first, so that the second pass runs at the step's weights and they act once, as in
        # step(closure) -- also with atomic=False, which takes no structure.
        undo = structure if structure is not None else self._structure_for(self.transforms[:split])
        ctx, perturbation, put_back = None, None, False
        with _put_back_on_error(structure):  # second: the weights and state from before the step
            try:
                try:
                    for index, (slot, before) in enumerate(list(self.chain)[:split]):
                        before.pre_update(self._context(slot, None, grad_norm if index == 0 else None))
                        try:  # a transform that took them beyond the dtype's range, as step(closure) checks
                            self._check_after([(slot, before)], 1)
                        except _NonFiniteGradients as non_finite:
                            # Kept (the second backward adds onto them: GradScaler sees the
                            # overflow, skips and backs off); what the transforms did is undone
                            # as step(closure) undoes it when it skips (atomic=False: nothing).
                            if structure is not None:
                                structure.restore()
                            self._pending = _PendingStep(
                                None, split + 1, non_finite=True, non_finite_where=_combined_by(non_finite)
                            )
                            return
                    # Asked now, with the first pass's gradients there (the move clears them).
                    not_scaling, not_keeping = self._scale_sensitive_before(split)
                    ctx = self._context(self.slots[split], None, grad_norm if split == 0 else None)
                    try:
                        with self._first_pass_checked_by(ctx) if first_checks else contextlib.nullcontext():
                            perturbation = transform.perturb(ctx)
                    except _NonFiniteGradients:  # the first pass's (first_checks): nothing moved
                        if not first_checks:
                            raise
                        if structure is not None:
                            structure.restore()
                        self._pending = _PendingStep(None, split + 1, non_finite=True)  # the gradients kept
                        return
                    skipped = perturbation is None or not perturbation.params
                    if skipped and undo is not None:
                        undo.restore()
                    self._pending = _PendingStep(
                        perturbation, split + 1, rerun_before=skipped, structure=structure,
                        not_scaling=not_scaling, not_keeping_direction=not_keeping,
                    )  # fmt: skip
                except BaseException:
                    # First, SAM's moves: a failure (Ctrl-C) after perturb() moved the weights and
                    # before the step is pending, where cancel_step() would find them -- what it
                    # returned, or the moves it registered -- so that the weights point at their
                    # own storage again when the structure restores them.
                    if ctx is not None and self._pending is None:
                        transform._put_back(ctx, perturbation, finish=False)
                    put_back = True
                    raise
            except BaseException:
                if not put_back and ctx is not None and self._pending is None:
                    transform._put_back(ctx, perturbation, finish=False)  # a second Ctrl-C cut it short
                raise
        transform.__dict__.pop("_moving", None)  # the pending step holds the moves now
        # Nothing perturbed: step(closure) steps with the first pass's gradients, so they are
        # zeroed in place, not dropped: a gradient the second backward does not reach (a frozen
        # parameter's, or one left out of the loss) is then the zero that a loop zeroing in place
        # (zero_grad(set_to_none=False)) left in the first pass, and the inner step steps it, as
        # step(closure) and a plain torch optimizer do.
        self.zero_grad(set_to_none=not self._pending.rerun_before)
        forget_autocast_copies()  # the second pass, in the same autocast region, sees the moved weights

    @eager_under_compile
    def cancel_step(self) -> None:
        """Abandon a step begun by :meth:`first_step` (e.g. the second pass raised).

        Restores the weights exactly; the inner optimizer and the post-step transforms do not run.
        Does nothing when no step is pending.
        """
        pending, self._pending = self._pending, None
        self._forget_scaler()  # what a GradScaler.step that raised left (a raising step hook)
        if pending is not None and pending.perturbation is not None:
            pending.perturbation.restore_weights()  # no finish: nothing of this step is committed
            forget_autocast_copies()
        if pending is not None and pending.structure is not None:
            pending.structure.restore()

    @eager_under_compile
    def second_step(self, zero_grad: bool = False) -> None:
        """Second half: restore the weights, step the inner optimizer, run post-step transforms.

        Call after the second ``backward()``. Goes through :meth:`step`, so step hooks run and an
        LR scheduler sees the optimizer step; the weights are put back first, so the step
        pre-hooks see :math:`w` (as those of ``step(closure)`` do). Called on a framework's
        wrapper of the optimizer (``self.optimizers()`` in Lightning), it goes through the
        wrapper's ``step()``, so the framework's hooks run and its step counter advances; a
        closure the wrapper passes on is run once, before the step (Lightning's runs its
        ``on_before_optimizer_step`` hooks).

        Args:
            zero_grad: Clear every gradient afterwards.

        Raises:
            TypeError: If ``zero_grad`` is not a bool (the step stays pending).
            RuntimeError: If no step is pending (:meth:`first_step` was not called); with the
                weights and state as before, if the second backward ran with
                ``create_graph=True`` for an inner optimizer that is not one of ``torch.optim``'s
                own (see :meth:`step`).
            ValueError: If a transform hyperparameter of a param group was set to an invalid
                value since :meth:`first_step` (checked as ``step(closure)`` checks it); the
                step stays pending and keeps the second pass's gradients: fix the value and call
                ``second_step()`` again, or :meth:`cancel_step`.
        """
        zero_grad = check_bool("zero_grad", zero_grad)
        if self._pending is None:
            raise RuntimeError("second_step() called without first_step()")
        progress = self._progress
        progress.finishing = True
        try:
            self.step()
        finally:
            progress.finishing = False
        if zero_grad:
            self.zero_grad(set_to_none=True)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch's :meth:`~torch.optim.Optimizer.state_dict`: ``state`` holds every slot.

        Seed-protocol objects with their own ``state_dict`` are copied into their slots first.
        """
        return super().state_dict()

    def _before_pack(self) -> None:
        super()._before_pack()
        for index, group in enumerate(self.param_groups):  # record the chain of every group
            self._adopt_group(group, index)
        for slot, transform in self.chain:
            transform.export_state(self._context(slot, None))

    def _after_load(self) -> None:
        for slot, transform in self.chain:
            transform.import_state(self._context(slot, None))
        super()._after_load()

    def _before_cast(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Let each transform convert its per-parameter entries for the parameter's dtype while
        they still have the checkpoint's (``Transform.convert_loaded``), and shield the slots'
        non-floating tensors from torch's cast, which comes next (:class:`_AsSaved`)."""
        state_dict = from_release_0_1(state_dict, self.chain, self.param_groups)
        state_dict = super()._before_cast(state_dict)
        saved = state_dict.get("state") if isinstance(state_dict, dict) else None
        if not isinstance(saved, dict):
            return state_dict
        state = self._converted(state_dict, dict(saved))
        hides = self.chain.hides
        for index, entry in state.items():
            if isinstance(entry, dict) and any(hides(key) and _AsSaved.needed(value) for key, value in entry.items()):
                state[index] = {key: _AsSaved.shield(value) if hides(key) else value for key, value in entry.items()}
        return {**state_dict, "state": state}

    def _converted(self, state_dict: dict[str, Any], state: dict[Any, Any]) -> dict[Any, Any]:
        """``state`` (a copy of the checkpoint's) with each converting transform's entries
        converted for its parameter's dtype (``Transform.convert_loaded``)."""
        converting = [(slot, t) for slot, t in self.chain if type(t).convert_loaded is not Transform.convert_loaded]
        if not converting:
            return state
        try:
            indices = [index for group in state_dict["param_groups"] for index in group["params"]]
        except (KeyError, TypeError):
            return state  # torch's load_state_dict says what is wrong
        params = [param for group in self.param_groups for param in group["params"]]
        if len(indices) != len(params):
            return state
        for slot, transform in converting:
            prefix = slot + "."
            for index, param in zip(indices, params):
                entry = state.get(index)
                if isinstance(entry, dict) and any(isinstance(key, str) and key.startswith(prefix) for key in entry):
                    converted = {key[len(prefix):]: value for key, value in entry.items() if isinstance(key, str) and key.startswith(prefix)}
                    transform.convert_loaded(converted, param)
                    kept = {key: value for key, value in entry.items() if not (isinstance(key, str) and key.startswith(prefix))}
                    state[index] = {**kept, **{prefix + key: value for key, value in converted.items()}}
        return state

    def _prepare_loaded(self, state: Any, groups: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
        for param, entry in list(state.items()):
            if isinstance(entry, dict) and any(map(_AsSaved.held, entry.values())):
                # (an entry of no parameter, which torch keeps as saved, keeps its device)
                device = param.device if isinstance(param, torch.Tensor) else None
                state[param] = {key: _AsSaved.unshield(value, device) for key, value in entry.items()}
        for index, group in enumerate(groups):
            if CHAIN_KEY not in group:  # a plain inner optimizer's checkpoint: the transforms start afresh
                for param in group["params"]:
                    entry = state.get(param, ())
                    reserved = [key for key in entry if self.chain.hides(key)] if is_entry(entry) else []
                    if reserved:
                        raise ValueError(
                            f"the checkpoint's param_groups[{index}] records no transform chain, but "
                            f"its state has the transform keys {reserved}"
                        )
            self._complete_loaded_group(group, index, self.param_groups)
        for slot, transform in self.chain:
            transform.check_loaded_state(TransformContext(groups, state, slot=slot, keys=self.chain.keys[slot]))
        return super()._prepare_loaded(state, groups)

    def __repr__(self) -> str:
        transforms = ", ".join(f"{slot}={t!r}" for slot, t in self.chain)
        inner = "\n    ".join(repr(self.inner).splitlines())
        return f"{type(self).__name__}(\n  inner={inner},\n  transforms=[{transforms}]\n)"

    def __del__(self) -> None:
        """Make the transforms that this optimizer stepped last drop the parameters and buffers
        they keep between steps (SAM's weight backups): a transform object may outlive its
        optimizer (one ``SAM()`` reused across a sweep). Runs as the last reference to the
        optimizer goes, as a torch optimizer is freed (nothing it drives refers back to it).
        The groups a transform last stepped may be a list that ``load_state_dict`` has replaced
        since (torch's load makes new groups over the same parameters): recognised by those."""
        try:
            driven = self.__dict__.get(self._driven_attr)
            groups = None if driven is None else driven.param_groups
            chain = self.__dict__.get("chain")
            for _slot, transform in chain if chain is not None else ():
                forget = getattr(transform, "_forget_parameters", None)
                stepped = transform.__dict__.get("_groups_in_play")
                if forget is not None and groups is not None and stepped is not None and (
                    stepped is groups
                    or [[id(p) for p in group["params"]] for group in stepped]
                    == [[id(p) for p in group["params"]] for group in groups]
                ):
                    forget()
        except Exception:  # noqa: BLE001 -- a finaliser must not raise
            pass


class _AsSaved:
    """A non-floating tensor of a transform's slot, hidden from torch's ``load_state_dict`` cast.

    torch casts every tensor of a parameter's state but ``"step"`` to a floating parameter's
    dtype (its own optimizers keep only floating state): a slot's counter or generator state
    (``int64``, ``uint8``) would come back as floats, rounded in 16 bits. Shielded before the
    cast (an object torch passes through as it is), the tensor keeps its dtype and is moved to
    the parameter's device, as torch moves the state of a non-floating parameter. So does a
    complex tensor on a real parameter (the cast would drop its imaginary part).
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    @staticmethod
    def _is_non_floating(value: Any) -> bool:
        """An integer, bool or complex tensor (a complex one would lose its imaginary part)."""
        return isinstance(value, torch.Tensor) and not value.is_floating_point()

    @staticmethod
    def _any(value: Any, test: Callable[[Any], bool]) -> bool:
        """Whether ``value`` or an item of it (in dicts, lists and tuples) passes ``test``."""
        if test(value):
            return True
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
        return any(_AsSaved._any(item, test) for item in items)

    @staticmethod
    def _map(value: Any, leaf: Callable[[Any], Any]) -> Any:
        """``value`` with ``leaf`` applied to everything but its dicts, lists and tuples."""
        if isinstance(value, dict):
            return {key: _AsSaved._map(item, leaf) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(_AsSaved._map(item, leaf) for item in value)
        return leaf(value)

    @staticmethod
    def needed(value: Any) -> bool:
        """Whether ``value`` holds a non-floating tensor."""
        return _AsSaved._any(value, _AsSaved._is_non_floating)

    @staticmethod
    def shield(value: Any) -> Any:
        return _AsSaved._map(value, lambda leaf: _AsSaved(leaf) if _AsSaved._is_non_floating(leaf) else leaf)

    @staticmethod
    def held(value: Any) -> bool:
        """Whether ``value`` holds a shielded tensor."""
        return _AsSaved._any(value, lambda leaf: isinstance(leaf, _AsSaved))

    @staticmethod
    def unshield(value: Any, device: torch.device | None) -> Any:
        """``value`` with each shielded tensor back, moved to ``device`` (as saved for ``None``)."""
        return _AsSaved._map(
            value, lambda leaf: (leaf.tensor if device is None else leaf.tensor.to(device=device)) if isinstance(leaf, _AsSaved) else leaf
        )


def _refuse_without_defaults(optimizer: Optimizer) -> None:
    """Raise ``TypeError`` if ``optimizer`` has no ``defaults`` of its own (an optimizer that
    forwards to another one, as ``torch.distributed.optim.PostLocalSGDOptimizer``)."""
    if not isinstance(getattr(optimizer, "defaults", None), dict):
        raise TypeError(
            f"inner must be a torch.optim.Optimizer with defaults and param_groups of its own, "
            f"got a {type(optimizer).__name__} without defaults (an optimizer that drives another "
            "one, which TransformingOptimizer cannot drive in turn)"
        )


def sam_optimizer(
    params: Iterable[Any],
    base_optimizer: type[Optimizer] | Callable[..., Optimizer],
    rho: float = 0.05,
    adaptive: bool = False,
    **kwargs: Any,
) -> TransformingOptimizer:
    """The familiar ``SAM(params, base_optimizer, rho=0.05, adaptive=False, **kwargs)`` constructor.

    Returns a :class:`TransformingOptimizer` with :class:`~samgria.SAM` (or :class:`~samgria.ASAM`
    with ``eta=0.01`` when ``adaptive=True``) around ``base_optimizer(params, **kwargs)``, so
    ``first_step``/``second_step`` loops written for the widely used PyTorch SAM keep working.
    That library reads ``adaptive`` per param group, as ``rho``: when a group sets its own
    ``"adaptive"``, the transform is :class:`~samgria.ASAM` with ``adaptive`` as the groups'
    default, so a group with ``"adaptive": False`` gets SAM's move (:math:`T_w = 1`) and one with
    ``True`` ASAM's. The transform is chosen here: with :class:`~samgria.SAM`, a group that sets
    ``"adaptive"`` later (``add_param_group``, an edit) is not read.

    Raises:
        TypeError: If ``adaptive`` is not a bool, ``rho`` not a real number, or
            ``base_optimizer`` neither a :class:`torch.optim.Optimizer` subclass nor a callable
            returning one.
        ValueError: If ``rho`` is negative or not finite; what ``base_optimizer`` raises for its
            own ``kwargs`` (``lr=-1.0``) and what :class:`TransformingOptimizer` raises otherwise
            are passed on.
    """
    adaptive = check_bool("adaptive", adaptive)
    if not isinstance(params, torch.Tensor):
        params = list(params)  # read once: a generator of groups is looked at, then handed on
    per_group = isinstance(params, list) and any(isinstance(group, Mapping) and "adaptive" in group for group in params)
    transform: Transform = ASAM(rho=rho, adaptive=adaptive) if adaptive or per_group else SAM(rho=rho)
    try:
        return TransformingOptimizer(params, base_optimizer, transforms=[transform], **kwargs)
    except (TypeError, ValueError) as error:
        # TransformingOptimizer's messages about its argument ``inner`` begin with its name:
        # here that argument is this function's base_optimizer.
        message = str(error)
        if type(error) in (TypeError, ValueError) and error.args == (message,) and message.startswith("inner "):
            raise type(error)("base_optimizer " + message[len("inner "):]) from None
        raise
