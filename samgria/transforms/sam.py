r"""Sharpness-aware minimisation: SAM and ASAM.

Both transforms take the gradient :math:`g` at the current weights :math:`w`, move the weights
to the approximate worst case :math:`w + e` in a small neighbourhood, re-evaluate the closure
there, and put the original weights back, bit for bit. The inner optimizer then steps from
:math:`w` with the gradient :math:`\nabla L(w + e)`.

How the weights are moved and restored (why it is exact and cheap): the perturbed weights
:math:`w + e` are computed in one fused pass into a backup buffer that the transform keeps between
steps, and each parameter's ``.data`` is pointed at it; restoring points it back at the untouched
original storage, so the restored weights are the original tensors, bit for bit, without a copy.
The first gradient is read by that pass, not written, and each moved parameter's ``.grad`` is
released (set to ``None``) before the re-evaluation. A
parameter whose memory anything else also holds -- it is a view into other memory, or other
tensors view it (a flat buffer whose views the model reads, a Parameter tied to it through one
storage, an alias such as ``param.detach()`` kept elsewhere), which would go on reading the
unperturbed weights -- is perturbed in place instead and restored by copying its backup back; so
is every parameter where torch does not count a storage's references (older torch builds
without CUDA). Measured as process peak memory (``benchmarks/sam_overhead.py``), keeping the
buffer beats both writing :math:`w + e` into the first gradient's storage (which pinned memory
that autograd had allocated among the activations: +1.9× the parameter bytes on a GPT-style
model) and allocating a copy every step (a page fault per page on glibc).

Complex parameters are treated as pairs of reals (as torch.optim does): norms and the ASAM
operator act on ``torch.view_as_real`` views. 16-bit parameters are perturbed in float32 and
rounded once, so a tiny gradient norm does not overflow SAM's scale. ASAM divides
:math:`T \odot g` by its norm before multiplying by :math:`T` again: its :math:`T^2 \odot g`
is never formed, and the perturbation overflows only where :math:`\rho\, T` does.

Inside :class:`~samgria.TransformingOptimizer` non-finite gradients never reach SAM (the
optimizer skips such a step). Used on its own (seed protocol), a non-finite gradient norm skips
the perturbation with a warning. The norm is read on the host once per step.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar, cast

import torch

from samgria._frameworks import stacklevel_outside
from samgria._checks import check_bool, check_real
from samgria.functional._grouping import group_indices_by_device_and_dtype
from samgria.functional._sharding import is_sharded
from samgria.functional._views import LOW_PRECISION, all_as_real, as_real, widened_dtype
from samgria.functional import adaptive_scaling, add_directions_, global_norm, mul, mul_
from samgria.functional.perturb import _CPU_LIST_NUMEL, perturbed_into_private
from samgria.transforms.base import Transform, TransformContext, _derive_writes_weights

__all__ = ["SAM", "ASAM", "PerturbationTransform", "Perturbation"]


class Perturbation:
    r"""Moved weights and the way back.

    ``restore()`` re-points each swapped parameter at its untouched original storage, or copies
    the backup back into a parameter perturbed in place: exact, and it cannot fail.
    ``non_finite`` is true when the perturbation was skipped because the gradient norm was not
    finite (then nothing was moved).

    Args:
        moves: ``(param, original, buffer, swapped)`` per moved parameter, with ``param`` holding
            the moved weights :math:`w + e` now:

            * ``swapped=False`` (moved in place): ``original`` is a copy of :math:`w` (not
              ``param``, nor a view of it), which ``restore()`` copies back into ``param``;
            * ``swapped=True`` (``param.data`` was pointed at other memory holding
              :math:`w + e`): ``original`` is the tensor that held :math:`w` (the old
              ``param.data``), which ``restore()`` points ``param.data`` back at.

            ``buffer`` is memory laid out like ``param`` (its shape, dtype, device and strides)
            that nothing needs once the weights are back: ``restore()`` hands it to the optimizer,
            which writes its copy of the weights into it (``ctx.spare_buffers``). It must never be
            ``param`` itself, nor memory ``param`` holds after ``restore()`` (that copy would
            overwrite the restored weights: ``restore()`` keeps back a buffer that is ``param``
            or starts at its memory, but not one that overlaps it otherwise); for a move in place
            the backup (``original``) is the natural choice, for a swap the memory that held
            :math:`w + e`.
        non_finite: The gradient norm was not finite, so nothing was moved (``moves`` empty).
        scale_dependent: The move depends on the size of the first pass's gradients, not only on
            their direction (:math:`e = \rho\,g`, ``MultiStepSAM(normalize=False)``). Under
            ``torch.amp.GradScaler``'s two-call loop ``perturb`` sees those gradients multiplied by
            the loss scale, so such a move would be wrong by that factor: the optimizer then
            refuses ``scaler.step(optimizer)`` (``RuntimeError``, the weights restored). A move
            along :math:`g / \lVert g \rVert` (SAM, ASAM) keeps the default ``False``.
    """

    def __init__(
        self,
        moves: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]],
        *,
        non_finite: bool = False,
        scale_dependent: bool = False,
    ) -> None:
        self.moves = moves
        self.non_finite = non_finite
        self.scale_dependent = scale_dependent

    @property
    def params(self) -> list[torch.Tensor]:
        """The moved parameters."""
        return [move[0] for move in self.moves]

    @torch.no_grad()
    def restore(self) -> dict[int, torch.Tensor]:
        """Put the original weights back (idempotent: the moves are kept until all are undone,
        so a restore cut short by an interrupt may simply be called again).

        Returns:
            The backup buffers, by ``id(param)``: memory laid out like each parameter that is free
            until the next perturbation (the optimizer copies its pre-step snapshot of the
            weights into it instead of allocating) -- of every restore so far, so that a later
            call (the optimizer's, after the weights went back early) still hands them on.
        """
        freed = self.__dict__.setdefault("_freed", {})
        for param, original, buffer, swapped in self.moves:
            if swapped:
                param.data = original
            else:
                param.copy_(original)
            if not _is_weights_memory(buffer, param):  # a user's move that named the parameter
                freed[id(param)] = buffer
        self.moves = []
        return freed

    def restore_weights(self) -> dict[int, torch.Tensor]:
        """Put the original weights back and finish nothing: what abandoning a step calls
        (:meth:`restore`, also a subclass's; a perturbation that finishes the step in
        :meth:`restore` overrides this)."""
        return self.restore()


def _is_weights_memory(buffer: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether a move's ``buffer`` is the restored parameter's own memory (``param`` itself,
    ``param.data``, ``param.detach()``): not free, so not handed to the optimizer, whose copy of
    the weights would overwrite them (a sharded parameter: only ``param`` itself is recognised)."""
    if buffer is param:
        return True
    if is_sharded(param) or is_sharded(buffer) or buffer.device != param.device:
        return False
    return buffer.data_ptr() == param.data_ptr()


def _widened(tensor: torch.Tensor) -> torch.Tensor:
    """A 16-bit tensor as a float32 copy; other tensors as they are."""
    return tensor.to(widened_dtype(tensor.dtype))


def _owns_storage(param: torch.Tensor) -> bool:
    """Whether ``param`` is all of its storage (not a view into a flat buffer or another tensor).

    Only then may SAM point ``param.data`` elsewhere during the re-evaluation: a forward that
    reads the weights through the shared storage would otherwise not see the perturbation.
    """
    return _whole_storage(param) is not None


def _whole_storage(param: torch.Tensor) -> torch.UntypedStorage | None:
    """``param``'s storage when ``param`` is all of it (see :func:`_owns_storage`), else ``None``."""
    # A sharded parameter: FSDP2 all-gathers from its own shard storage, so that is perturbed in place.
    if is_sharded(param) or param._base is not None or param.storage_offset() != 0:
        return None
    storage = param.untyped_storage()
    return storage if storage.nbytes() == param.nbytes else None


def _storage_counter() -> tuple[Callable[[int], int], int] | None:
    """torch's count of the references to a storage, and what it reads for a storage that one
    tensor alone holds; ``None`` where this torch does not count them (or the count fails).

    The count is taken with the storage object held (as :func:`_swappable` holds it): whether a
    Python storage object counts as a reference differs between torch versions (torch 2.13 counts
    it: a parameter alone on its memory reads 2), and held, it counts alike for the probe and for
    a parameter.
    """
    # Private torch API, used here only: the reference count of a storage (torch's CUDA-graph
    # trees read it to learn whether memory is still in use). No public API tells whether other
    # tensors hold a parameter's memory (views of a flat buffer, a tied Parameter, a detach()
    # alias): only then may SAM point the parameter at other memory for the re-evaluation.
    # Older torch has it in CUDA builds only; without it every parameter is moved in place.
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    try:
        probe = torch.empty(1, device="cpu")  # no device is initialised at import
        storage = probe.untyped_storage()
        return count, int(count(storage._cdata))
    except (RuntimeError, TypeError, AttributeError):
        return None


_STORAGE_COUNTER = _storage_counter()


def _swappable(params: list[torch.Tensor]) -> list[bool]:
    """For each parameter, whether SAM may point its ``.data`` at a buffer of perturbed weights.

    Only when the parameter is all of its storage (:func:`_owns_storage`) and nothing else holds
    that storage, which torch's count of the storage's references tells (one call per
    parameter): not a flat buffer the parameter was carved from or whose views the model reads,
    not another Parameter tied to it (``head.weight.data = embedding.weight.data``, moved or not,
    frozen or in a ``rho=0`` group), not an alias (``param.detach()``) kept elsewhere. Those
    would read the unperturbed weights in the re-evaluation; such a parameter is perturbed in
    place, as is every one where torch does not count the references. Not counted: a Python
    storage object (``param.untyped_storage()``) kept elsewhere to make tensors from later --
    torch counts it once, however many names hold it.
    """
    counter = _STORAGE_COUNTER
    if counter is None:
        return [False] * len(params)
    count, alone = counter
    flags = []
    for param in params:
        storage = _whole_storage(param)
        flags.append(storage is not None and count(storage._cdata) == alone)
    return flags


def _check_first_pass(ctx: TransformContext) -> None:
    """Apply the optimizer's non-finite policy to the first pass's gradients, where it left that
    check to this transform (a transform that declares ``_checks_first_pass``, first in the chain):
    raises what skips the step when a gradient is not finite; nothing otherwise."""
    check = ctx.__dict__.get("_check_first_pass")
    if check is not None:
        check()


class _PreparedMove(NamedTuple):
    """What :meth:`PerturbationTransform._move_along` needs to know of the parameters it moves,
    taken before their directions are computed (:meth:`PerturbationTransform._prepare_move`).

    ``into[i]`` is the real view (:func:`as_real`) of ``backups[i]`` when a direction may be
    computed into it -- grad mode is off, the parameter is swapped (its backup is written only by
    the move), not 16-bit, and on the CPU with more than ``_CPU_LIST_NUMEL`` elements, where the
    move is one ``torch.add(w, d, alpha=s, out=backup)`` of its own: with ``d`` the backup itself,
    the same arithmetic in place, without a tensor of the parameter's size in new memory -- else
    ``None``. A direction computed there must have the view's dtype, device and strides (the
    move's layout; :func:`_fitting` picks the views whose operands do)."""

    backups: list[torch.Tensor]
    swappable: list[bool]
    into: list[torch.Tensor | None]

    def into_by_index(self, indices: Sequence[int]) -> dict[int, torch.Tensor]:
        """The ``into`` views that exist, keyed by ``indices`` (the caller's index of each moved
        parameter, in the order :meth:`PerturbationTransform._prepare_move` took them)."""
        return {index: view for index, view in zip(indices, self.into) if view is not None}


def _fitting(
    into: Mapping[int, torch.Tensor], indices: Sequence[int], *operands: Sequence[torch.Tensor]
) -> dict[int, torch.Tensor]:
    """The backup buffers a direction may be computed in (:class:`_PreparedMove`): position ``k``
    of ``indices`` → ``into[indices[k]]`` where that view exists and every ``operands[j][k]`` (the
    direction's operands) has its dtype, device and strides, the layout the move takes."""
    fitting = {}
    for k, index in enumerate(indices):
        view = into.get(index)
        if view is None:
            continue
        for tensors in operands:
            operand = tensors[k]
            if operand.dtype != view.dtype or operand.device != view.device or operand.stride() != view.stride():
                break
        else:
            fitting[k] = view
    return fitting


def _partly_into(
    count: int,
    buffers: Mapping[int, torch.Tensor],
    list_kernel: Callable[[list[int]], Sequence[torch.Tensor]],
    tensor_kernel: Callable[[int, torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """``count`` results in order: entry ``k`` computed by ``tensor_kernel(k, buffers[k])`` (into
    that buffer, ``out=``) where ``buffers`` has ``k``, the others by one ``list_kernel(rest)``
    (new memory): a direction computed in a backup buffer where the move can take it from there
    (:class:`_PreparedMove`), the same arithmetic elsewhere."""
    rest = [k for k in range(count) if k not in buffers]
    result: list[torch.Tensor | None] = [None] * count
    for k, tensor in zip(rest, list_kernel(rest)):
        result[k] = tensor
    for k, buffer in buffers.items():
        result[k] = tensor_kernel(k, buffer)
    return cast(list[torch.Tensor], result)


class PerturbationTransform(Transform):
    """Base of transforms that perturb the weights, re-evaluate the closure and restore.

    Subclasses implement :meth:`perturb`. :meth:`pre_update` perturbs, re-evaluates and always
    restores — also when the closure raises, or Ctrl-C interrupts the step anywhere (moves that
    ``_move_along`` made are registered until :meth:`perturb` returns them).

    A :meth:`perturb` that raises returns no :class:`Perturbation` to restore from, so weights
    it had already moved in place would stay moved. For a subclass that overrides
    :meth:`perturb`, the optimizer therefore copies the weights at the start of each step and
    writes them back if the step raises (``writes_weights_before_step`` is ``True``, with
    ``atomic=True``). A subclass whose :meth:`perturb` leaves the weights as they were whenever
    it raises (it moves them last, or puts them back before raising, as the built-in
    transforms' ``_move_along`` does) declares ``writes_weights_before_step = False`` in its
    class body to save that copy. A declaration covers the :meth:`perturb` of the class that
    makes it (and of its subclasses that do not override it): a subclass of :class:`SAM` that
    overrides :meth:`perturb` gets ``True`` unless it declares ``False`` itself.
    """

    needs_closure = True
    _writes_derived_from_own_hook = True  # from perturb(), below

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A perturb() that raises after moving weights in place leaves them moved.
        _derive_writes_weights(cls, PerturbationTransform, "perturb")

    def perturb(self, ctx: TransformContext) -> Perturbation | None:
        """Move the weights to :math:`w + e` and return how to restore them.

        Returns ``None`` when nothing is perturbed (no gradients, every ``rho`` zero, zero
        gradient), and an empty :class:`Perturbation` with ``non_finite=True`` when the gradient
        norm is not finite. If it raises, the weights must be as they were — the optimizer
        makes sure of it by copying them first unless the class declares
        ``writes_weights_before_step = False`` (see the class).
        """
        raise NotImplementedError

    def _require_reevaluate(self, ctx: TransformContext) -> None:
        """Raise, naming both remedies, when the optimizer cannot re-evaluate the closure."""
        if ctx.reevaluate is None:
            raise RuntimeError(
                f"{type(self).__name__} re-evaluates the loss and needs a closure: call "
                "optimizer.step(closure), or call optimizer.first_step() after the first "
                "backward and optimizer.second_step() after the second"
            )

    def pre_update(self, ctx: TransformContext) -> None:
        self._require_reevaluate(ctx)
        # cast: _require_reevaluate has refused a context without one
        self._perturbed(ctx, lambda perturbation: cast("Callable[[], Any]", ctx.reevaluate)(), finish=True)

    def _perturbed(
        self, ctx: TransformContext, climb: Callable[[Perturbation], Any], *, finish: bool
    ) -> Perturbation | None:
        """:meth:`perturb`, ``climb(perturbation)`` (the re-evaluations) when it moved anything,
        and the weights put back whatever raises, Ctrl-C (``KeyboardInterrupt``) included.

        Put back are the returned perturbation (by ``restore()``, which may finish the step, when
        ``finish``; else by ``restore_weights()``) and the moves that :meth:`_move_along`
        registered while :meth:`perturb` ran, which an interrupt before it returned would have
        left in place. A put-back that is itself interrupted is done once more (restoring is
        idempotent). Returns the perturbation, its weights restored.
        """
        self.__dict__.pop("_moving", None)  # a two-call step's (the optimizer restores its perturbation)
        perturbation = put_back = None
        try:
            try:
                perturbation = self.perturb(ctx)
                self.__dict__.pop("_moving", None)  # the perturbation returned holds the moves now
                if perturbation is not None and perturbation.params:
                    climb(perturbation)
            finally:
                self._put_back(ctx, perturbation, finish)
                put_back = True
        except BaseException:
            if not put_back:  # interrupted on the way back
                self._put_back(ctx, perturbation, finish)
            raise
        return perturbation

    def _put_back(self, ctx: TransformContext, perturbation: Perturbation | None, finish: bool) -> None:
        """Restore ``perturbation`` and the moves registered by :meth:`_move_along` (see :meth:`_perturbed`)."""
        if perturbation is not None and perturbation.params:
            ctx.spare_buffers.update(perturbation.restore() if finish else perturbation.restore_weights())
        moving = self.__dict__.get("_moving")
        if moving is not None:
            moving.restore()
            del self.__dict__["_moving"]

    def active(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        return any(group.get("rho", 0) > 0 for group in param_groups)

    @staticmethod
    def _radius(group: Mapping[str, Any]) -> float:
        """The group's ``rho`` with the sign of the climb: negative when the inner optimizer
        maximises (``maximize=True``: it minimises :math:`-L`, whose worst case within the radius
        lies down the gradient of :math:`L`). A float, whatever real number the group holds (a
        NumPy scalar would carry its own precision into the move's scale)."""
        rho = float(group["rho"])
        return -rho if group.get("maximize", False) else rho

    # -- helpers shared by SAM and ASAM --------------------------------------------------------
    def _collect(
        self, ctx: TransformContext
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Mapping[str, Any]]]:
        """Parameters with a gradient, their gradients and groups; sparse gradients raise.

        Remembers ``ctx``'s param groups (the optimizer's, or the model's in the seed protocol):
        the parameters whose backup buffers :meth:`_backups_of` keeps.
        """
        self.__dict__["_groups_in_play"] = ctx.raw_param_groups  # the optimizer's list (see _forget_parameters)
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        groups: list[Mapping[str, Any]] = []
        seen: set[int] = set()
        for group in ctx.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                key = id(param)
                if key in seen:
                    continue
                seen.add(key)
                params.append(param)
                grads.append(grad)
                groups.append(group)
        for param, grad in zip(params, grads):
            if grad.is_sparse:
                _check_first_pass(ctx)  # a step skipped for them before it is refused
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients (a parameter of shape "
                    f"{tuple(param.shape)} has one; a group with rho=0 does not exclude it): use a "
                    "dense embedding, or give that parameter to another optimizer"
                )
        return params, grads, groups

    def _gather(
        self, ctx: TransformContext
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Mapping[str, Any]], float] | Perturbation | None:
        """The prologue of a SAM-style perturbation: the parameters with a gradient, their
        gradients and groups, and the global gradient norm.

        Returns instead ``None`` when there is nothing to perturb (no gradient, every ``rho``
        zero, a zero gradient) and an empty non-finite :class:`Perturbation` when the norm is
        not finite (with the warning of :meth:`_finite_norm`).
        """
        params, grads, groups = self._collect(ctx)
        if not params or not self.active(groups):
            return None
        norm = self._finite_norm(grads, ctx.foreach, ctx.grad_norm)
        if norm is None:
            return Perturbation([], non_finite=True)
        if norm == 0.0:
            return None
        return params, grads, groups, norm

    def _finite_norm(
        self,
        directions: list[torch.Tensor],
        foreach: bool,
        known: float | None = None,
        like: list[torch.Tensor] | None = None,
        checks: TransformContext | None = None,
    ) -> float | None:
        """The global norm of the directions, or ``None`` (with a warning) when it is not finite.

        ``known``: the norm, when the optimizer already computed it over the same tensors.
        ``like``: the (possibly sharded) tensors that local ``directions`` were computed from.
        ``checks``: the context of a transform that checks the first pass itself
        (``_checks_first_pass``), whose directions are finite only if every gradient is: a norm
        that is not finite has the gradients checked first (:func:`_check_first_pass`).
        """
        if known is None:
            real = [as_real(d) for d in directions]
            known = float(global_norm(real, foreach=foreach, like=directions if like is None else like))
        norm = known
        if not math.isfinite(norm):
            if checks is not None:
                _check_first_pass(checks)  # raises when a gradient is not finite (the step is skipped)
            warnings.warn(
                f"{type(self).__name__}: the gradient norm is {norm}; the perturbation is skipped "
                "and the inner optimizer sees the unperturbed gradients",
                RuntimeWarning,
                stacklevel=stacklevel_outside(),
            )
            return None
        return norm

    def _backups_of(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The buffers that hold each parameter's original values while it is perturbed.

        Kept between steps (one buffer the size of the perturbed parameters, as the widely used
        PyTorch SAM keeps ``old_p``): allocating it afresh every step costs a page fault per page
        on glibc, which returns freed memory of that size to the operating system. Not part of
        the transform's state (it holds nothing between steps) and not pickled. A buffer is made
        anew when its parameter's dtype, shape, strides or device changed (``module.to()``,
        also when torch swaps the parameter's contents).

        Each buffer is kept with its parameter, by a strong reference as torch.optim holds its
        parameters: ``torch.utils.swap_tensors`` (``nn.Module._apply`` and ``load_state_dict``
        under ``torch.__future__.set_swap_module_params_on_conversion(True)``, and for every
        DTensor parameter) refuses a tensor that has a weak reference. The buffers of parameters
        that are no longer in the param groups the transform last collected from
        (:meth:`_collect`) are dropped when a parameter is moved for the first time, or when the
        groups hold fewer parameters than there are buffers (a group deleted from
        ``optimizer.param_groups``): those of parameters removed from the optimizer, or of a
        model the transform was applied to before. A parameter without a gradient at some steps
        (a mixture of experts' unused experts, stochastic depth) keeps its buffer. An optimizer
        that is freed drops them all (:meth:`_forget_parameters`).
        """
        backups = self.__dict__.get("_backups")
        if backups is None:
            backups = self.__dict__["_backups"] = {}  # id(param) -> (param, buffer)
        found = []
        new = False
        for param in params:
            held = backups.get(id(param))
            if held is not None:  # held[0] is param: it is alive, so no other object has its id
                backup = held[1]
                if (
                    backup.data_ptr() != param.data_ptr()  # not the weights themselves (an interrupted swap)
                    and backup.dtype == param.dtype
                    and backup.stride() == param.stride()
                    and backup.is_same_size(param)
                    and backup.device == param.device
                ):
                    found.append(backup)
                    continue
            else:
                new = True
            backup = torch.empty_like(param, memory_format=torch.preserve_format)
            if backup.stride() != param.stride():
                backup = torch.empty_strided(param.shape, param.stride(), dtype=param.dtype, device=param.device)
            backups[id(param)] = (param, backup)
            found.append(backup)
        groups = self.__dict__.get("_groups_in_play")
        if groups is not None and (
            (new and len(backups) > len(params)) or len(backups) > sum(len(group["params"]) for group in groups)
        ):
            in_play = {id(param) for group in groups for param in group["params"]}
            self.__dict__["_backups"] = {key: held for key, held in backups.items() if key in in_play}
        return found

    def _forget_parameters(self) -> None:
        """Drop the backup buffers and the param groups kept from the last step, with the
        parameters they hold: what the optimizer calls when it is freed; a transform object may
        outlive it, reused for the next model of a sweep. Not the moves of a perturbation in
        progress (``_moving``): another optimizer sharing this transform (a shallow copy) may be
        freed while it perturbs, and those are put back by the step itself."""
        for key in ("_backups", "_groups_in_play"):
            self.__dict__.pop(key, None)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_backups", None)
        state.pop("_moving", None)
        state.pop("_groups_in_play", None)
        return state

    def _prepare_move(self, params: list[torch.Tensor]) -> _PreparedMove:
        """The backup buffers of the parameters that :meth:`_move_along` will move, which of them
        are swapped, and where a direction may be computed into its buffer (:class:`_PreparedMove`).

        To be taken with no other reference to a parameter's memory held than at the move (a
        view of a parameter counts as one, see :func:`_swappable`), and passed to
        :meth:`_move_along` with the same parameters."""
        backups = self._backups_of(params)
        swappable = _swappable(params)
        in_buffers = not torch.is_grad_enabled()  # out= refuses tensors that require grad under it
        into: list[torch.Tensor | None] = [
            as_real(backup)
            if in_buffers
            and swapped
            and param.dtype not in LOW_PRECISION
            and param.device.type == "cpu"
            and param.numel() > _CPU_LIST_NUMEL
            else None
            for param, backup, swapped in zip(params, backups, swappable)
        ]
        return _PreparedMove(backups, swappable, into)

    def _move_along(
        self,
        params: list[torch.Tensor],
        directions: list[torch.Tensor],
        scales: list[float],
        foreach: bool,
        divisors: Sequence[float] | None = None,
        prepared: _PreparedMove | None = None,
    ) -> Perturbation:
        """Move each param to ``param + scale / divisor * direction`` (divisor 1 without
        ``divisors``); return how to put it back.

        ``directions`` are real views (of complex tensors), may be the gradients themselves (they
        are read, never written: the SAM family keeps its first gradients through the move without
        a copy) and may be wider than the parameters (float32 for 16-bit ones). Every moved
        parameter's gradient is cleared. ``prepared``: :meth:`_prepare_move` of ``params``, taken
        before the directions were computed; a direction may then be its ``into`` view (computed
        in the backup buffer), which the move overwrites with the perturbed weights.

        A parameter that alone holds its storage gets the perturbed weights computed into its
        backup buffer in one fused pass, and ``.data`` pointed at it; its own storage is
        untouched, so restoring re-points it, exactly and without a copy. A parameter whose
        memory anything else holds (:func:`_swappable`: a view into a flat parameter buffer or a
        parametrization, tied weights, views or aliases of it) is perturbed in place instead:
        its values are copied into the backup first and copied back to restore.

        The perturbation is registered on the transform before the first weight moves, so that
        :meth:`pre_update` puts the weights back also when an interrupt lands before
        :meth:`perturb` returns it (see :meth:`_perturbed`).
        """
        directions, scales = _scales_within_range(directions, scales, divisors)  # a tiny gradient norm
        if prepared is None:
            backups, swaps = self._backups_of(params), _swappable(params)
        else:
            backups, swaps = prepared.backups, prepared.swappable
        moves = []
        in_place = []
        for index, (param, backup, swappable) in enumerate(zip(params, backups, swaps)):
            if swappable:
                moves.append((param, param.data, backup, True))
            else:
                moves.append((param, backup, backup, False))
                in_place.append(index)
        swapped_params, swapped_backups, swapped_directions, swapped_scales = params, backups, directions, scales
        if in_place:  # not the common case, where every parameter owns its storage
            swapped = [i for i, move in enumerate(moves) if move[3]]
            swapped_params = [params[i] for i in swapped]
            swapped_backups = [backups[i] for i in swapped]
            swapped_directions = [directions[i] for i in swapped]
            swapped_scales = [scales[i] for i in swapped]
        if swapped_params:
            real_params = all_as_real(swapped_params)  # a backup is complex where its parameter is
            real_backups = swapped_backups if real_params is swapped_params else all_as_real(swapped_backups)
            if prepared is not None and real_backups is not swapped_backups:  # a direction is its buffer's view
                into = prepared.into if not in_place else [prepared.into[i] for i in swapped]
                real_backups = [
                    view if view is not None else backup for view, backup in zip(into, real_backups)
                ]
            perturbed_into_private(real_backups, real_params, swapped_directions, swapped_scales, foreach=foreach)
        if in_place:
            for i in in_place:
                backups[i].copy_(params[i])
        moved = Perturbation(moves)
        # From here the weights move: registered, so that pre_update puts them back also when an
        # interrupt (Ctrl-C) lands before perturb() returns (see _perturbed).
        self.__dict__["_moving"] = moved
        try:
            if in_place:
                add_directions_(
                    [as_real(params[i]) for i in in_place],
                    [directions[i] for i in in_place],
                    [scales[i] for i in in_place],
                    foreach=foreach,
                )
            for param, _original, backup, swapped_storage in moves:
                param.grad = None
                if swapped_storage:
                    param.data = backup
        except BaseException:  # nothing is returned to restore from (the two-call loop): put them back here
            moved.restore()
            raise
        return moved


_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _scales_within_range(
    directions: list[torch.Tensor], scales: Sequence[float], divisors: Sequence[float] | None = None
) -> tuple[list[torch.Tensor], list[float]]:
    """The directions and scales of the moves ``scale / divisor * direction`` (divisor 1 without
    ``divisors``), each scale within the range of the dtype the move computes its direction in
    (torch rounds a scale to it, and raises beyond it; 16-bit directions are computed in float32).

    The common case, every quotient ``scale / divisor`` zero or within float32's normal range,
    costs one ``max`` and one ``min`` and returns the quotients. A quotient beyond it
    (``rho / ‖g‖`` for a gradient norm below about ``rho / 3.4e38`` in float32, or below
    ``rho / 1.8e308`` in float64, where it would be infinite) is never formed, and one below
    the computing dtype's normal range (a norm above about ``rho / 1.2e-38`` in float32, where
    torch would round the scale to a subnormal number of a few bits) is not used: with
    ``scale = m_s 2^{e_s}`` and ``divisor = m_d 2^{e_d}`` (:func:`math.frexp`), the direction is
    replaced by its product with ``2^{e_s - e_d}``, exact and in new memory
    (:func:`_times_power_of_two`: the gradient stays as it was if the move fails; elements that
    fall below the normal range there round as the move's result would), and the scale by
    ``m_s / m_d``, in (1/2, 2).

    Raises:
        ValueError: If a scale or divisor beyond the range is not finite, or a divisor is not
            positive (nothing is written).
    """
    if divisors is None:
        quotients = list(scales)
    else:
        quotients = [scale / divisor for scale, divisor in zip(scales, divisors)]  # inf beyond float64
    if not quotients:
        return directions, quotients
    magnitudes = [abs(quotient) for quotient in quotients]
    if max(magnitudes) <= _FLOAT32_MAX and min(magnitude or _FLOAT32_TINY for magnitude in magnitudes) >= _FLOAT32_TINY:
        return directions, quotients
    replaced: dict[int, tuple[int, float]] = {}
    for index, (direction, quotient) in enumerate(zip(directions, quotients)):
        info = torch.finfo(widened_dtype(direction.dtype))
        if quotient == 0 or info.tiny <= abs(quotient) <= info.max:
            continue
        scale = float(scales[index])
        divisor = 1.0 if divisors is None else float(divisors[index])
        if not (math.isfinite(scale) and math.isfinite(divisor) and divisor > 0):
            raise ValueError(
                f"a move's scale / divisor must be finite with a positive divisor, got {scale} / {divisor}"
            )
        scale_mantissa, scale_exponent = math.frexp(scale)
        divisor_mantissa, divisor_exponent = math.frexp(divisor)
        replaced[index] = (scale_exponent - divisor_exponent, scale_mantissa / divisor_mantissa)
    directions = list(directions)
    for index, (exponent, scale) in replaced.items():
        directions[index] = _times_power_of_two(directions[index], exponent)
        quotients[index] = scale
    return directions, quotients


def _times_power_of_two(tensor: torch.Tensor, exponent: int) -> torch.Tensor:
    """``tensor * 2**exponent`` in new memory (16-bit tensors in float32), in at most
    ``ceil(|exponent| / (maxexp - 2))`` multiplications by powers of two within the dtype's
    range: exact, unless the result overflows or (for a negative ``exponent``) falls below the
    normal range."""
    dtype = widened_dtype(tensor.dtype)
    limit = math.frexp(torch.finfo(dtype).max)[1] - 2  # 2**limit is within the range (126 in float32)
    step = max(-limit, min(limit, exponent))
    result = tensor.to(dtype) * 2.0**step  # new memory, also when the dtype is the tensor's
    exponent -= step
    while exponent != 0:  # |exponent| shrinks by limit each time
        step = max(-limit, min(limit, exponent))
        result.mul_(2.0**step)
        exponent -= step
    return result


#: The argument names of the optimizer-style constructors (the widely used PyTorch SAM's,
#: pytorch_optimizer's) that no transform takes.
_OPTIMIZER_STYLE_KEYWORDS = ("params", "base_optimizer")


def _refuse_optimizer_style_call(
    cls: type[Any], args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None, *, sam_optimizer: bool = True
) -> None:
    """Point ``SAM(params, base_optimizer, ...)`` -- the widely used PyTorch SAM's constructor,
    also with its arguments named (``params=``, ``base_optimizer=``) -- to
    :func:`samgria.sam_optimizer` (``sam_optimizer=True``) or to
    :class:`~samgria.TransformingOptimizer` (pytorch_optimizer's SAM variants) instead of
    failing on the argument binding. A 0-dim tensor first argument is a hyperparameter (refused
    by the transform's own check, which names it), not parameters."""
    first = args[0] if args else None
    looks_like_params = (
        (isinstance(first, torch.Tensor) and first.dim() > 0)
        or isinstance(first, (dict, list, tuple, torch.nn.Module))
        or (first is not None and not isinstance(first, (str, bytes, torch.Tensor)) and hasattr(first, "__next__"))
    )
    # The second argument of that constructor is an optimizer class or a factory; ASAM's own
    # positional arguments (rho, eta, adaptive) are numbers and a bool.
    looks_like_base_optimizer = len(args) > 1 and callable(args[1])
    named = [key for key in _OPTIMIZER_STYLE_KEYWORDS if kwargs and key in kwargs]
    if named:  # a subclass may take an argument of that name itself
        named = [key for key in named if key not in inspect.signature(cls.__init__).parameters]
    if looks_like_params or looks_like_base_optimizer or named:
        name = cls.__name__
        if sam_optimizer:
            raise TypeError(
                f"samgria.{name} is a transform, not an optimizer: {name}(params, base_optimizer, ...) is "
                f"the constructor of the widely used PyTorch SAM. Use samgria.sam_optimizer(params, "
                f"base_optimizer, rho=..., adaptive=..., **base_kwargs), or "
                f"samgria.TransformingOptimizer(params, base_optimizer, transforms=[samgria.{name}(rho=...)], "
                "**base_kwargs)"
            )
        raise TypeError(
            f"samgria.{name} is a transform, not an optimizer (pytorch_optimizer's {name} takes the "
            f"params and a base optimizer): use samgria.TransformingOptimizer(params, base_optimizer, "
            f"transforms=[samgria.{name}(rho=...)], **base_kwargs)"
        )


class _InitSignature:
    """``cls.__signature__``: the signature of ``cls.__init__`` without ``self``.

    For a class whose ``__new__`` takes ``*args, **kwargs`` (to refuse an optimizer-style call),
    ``inspect.signature`` -- hence ``help()`` and the API reference -- would show that instead.
    """

    def __get__(self, instance: Any, owner: type[Any]) -> inspect.Signature:
        signature = inspect.signature(owner.__init__)
        return signature.replace(
            parameters=list(signature.parameters.values())[1:], return_annotation=inspect.Signature.empty
        )


_Self = TypeVar("_Self", bound="_RefusesOptimizerStyleCall")


class _RefusesOptimizerStyleCall:
    """Base of the transforms that other libraries build as optimizers: ``SAM(params,
    base_optimizer, ...)`` (the widely used PyTorch SAM's constructor; SAM and ASAM, whose class
    sets ``_points_to_sam_optimizer``) and ``GSAM(params, base_optimizer, ...)``
    (pytorch_optimizer's; GSAM, WSAM, FriendlySAM, LookSAM) raise a ``TypeError`` that points to
    :func:`~samgria.sam_optimizer` or :class:`~samgria.TransformingOptimizer` instead of failing on
    the argument binding, and ``help()`` shows the signature of ``__init__``."""

    #: Whether the refusal names :func:`~samgria.sam_optimizer` (the PyTorch SAM's call).
    _points_to_sam_optimizer: ClassVar[bool] = False

    __signature__ = _InitSignature()

    def __new__(cls: type[_Self], *args: Any, **kwargs: Any) -> _Self:
        _refuse_optimizer_style_call(cls, args, kwargs, sam_optimizer=cls._points_to_sam_optimizer)
        return super().__new__(cls)  # object.__new__: no arguments


class SAM(_RefusesOptimizerStyleCall, PerturbationTransform):
    r"""Sharpness-Aware Minimization (Foret et al., ICLR 2021).

    .. math::

        e = \rho\,\frac{g}{\lVert g \rVert_2}, \qquad
        w_{t+1} = \mathrm{inner\_step}\big(w_t,\ \nabla L(w_t + e)\big)

    One norm over every parameter that has a gradient; each group's part of :math:`e` is scaled
    by that group's ``rho``, and a group with ``rho=0`` is not perturbed. A group whose inner
    optimizer maximises (``maximize=True``, the objective :math:`-L`) is perturbed by
    :math:`-e`, as is every transform of the SAM family.

    Args:
        rho: Default neighbourhood radius :math:`\rho \ge 0` (per-group key ``"rho"``; default
            0.01; 0.05, the common choice, is the default of :func:`~samgria.sam_optimizer` and of
            the other transforms of the SAM family).

    Raises:
        TypeError: If ``rho`` is not a real number (a bool included).
        ValueError: If ``rho`` is negative or not finite.
    """

    # perturb() computes w + e into backup buffers and swaps them in only once nothing can
    # raise; views are moved in place and put back if that raises (_move_along).
    writes_weights_before_step = False

    _points_to_sam_optimizer = True

    def __init__(self, rho: float = 1e-2) -> None:
        self.rho = check_real("rho", rho, low=0.0)

    def group_defaults(self) -> dict[str, Any]:
        return {"rho": self.rho}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("rho", group["rho"], low=0.0)

    def perturb(self, ctx: TransformContext) -> Perturbation | None:
        gathered = self._gather(ctx)
        if not isinstance(gathered, tuple):
            return gathered
        params, grads, groups, norm = gathered
        moved, directions, scales = [], [], []
        group_seen, rho = None, 0.0
        for param, grad, group in zip(params, grads, groups):
            if group is not group_seen:  # one group's parameters are consecutive
                group_seen, rho = group, group["rho"]
                radius = self._radius(group)
            if rho > 0:
                moved.append(param)
                directions.append(grad)
                scales.append(radius)
        return self._move_along(moved, all_as_real(directions), scales, ctx.foreach, [norm] * len(moved))


def _divide_(tensors: list[torch.Tensor], divisor: float, foreach: bool) -> None:
    """In place: every tensor (float32 or float64) divided by ``divisor`` > 0; one
    ``torch._foreach_div_`` per device and dtype, or ``div_`` tensor by tensor
    (``foreach=False``): the same arithmetic, bit for bit.

    torch rounds the divisor to the tensors' dtype: one beyond its range (a norm taken again in
    float64), or below its smallest normal number (where it would keep only a few significant
    bits), is applied as two equal factors within it.
    """
    for (_device, dtype), indices in group_indices_by_device_and_dtype(tensors).items():
        group = [tensors[i] for i in indices]
        info = torch.finfo(dtype)
        factors = [divisor] if info.tiny <= divisor <= info.max else [math.sqrt(divisor)] * 2
        for factor in factors:
            if foreach:
                torch._foreach_div_(group, factor)
            else:
                for tensor in group:
                    tensor.div_(factor)


class ASAM(_RefusesOptimizerStyleCall, PerturbationTransform):
    r"""Adaptive SAM (Kwon et al., ICML 2021).

    With the normalisation operator :math:`T_w = |w| + \eta` (element-wise),

    .. math::

        e = \rho\,\frac{T_w^2 \odot g}{\lVert T_w \odot g \rVert_2}

    which makes the sharpness measure invariant to re-scaling of the weights. A group with
    ``adaptive=False`` uses :math:`T_w = 1` (plain SAM for that group — the reference code does
    this for biases). The seed library normalised :math:`|w|^2 \odot g` instead, which is not
    the paper's ASAM.

    Args:
        rho: Default radius :math:`\rho \ge 0` (per-group key ``"rho"``); the paper uses 0.5 to 2
            for SGD on CIFAR.
        eta: Default :math:`\eta \ge 0` (per-group key ``"eta"``).
        adaptive: Default of the per-group key ``"adaptive"``.

    Raises:
        TypeError: If ``rho`` or ``eta`` is not a real number (a bool included), or ``adaptive``
            is not a bool.
        ValueError: If ``rho`` or ``eta`` is negative or not finite.
    """

    writes_weights_before_step = False  # computes e in new tensors or backup buffers, then moves as SAM does

    _points_to_sam_optimizer = True

    # First in the chain (and without first_pass_context), the optimizer leaves the first pass's
    # non-finite check to perturb(): ‖T ⊙ g‖ (T = |w| + eta >= 0) is finite only if every gradient
    # is (a non-finite g gives an infinite or NaN product); where it is not, the gradients are read
    # (_check_first_pass). Read from this class's own namespace only: not a subclass's.
    _checks_first_pass = True

    def __init__(self, rho: float = 0.5, eta: float = 0.01, adaptive: bool = True) -> None:
        self.rho = check_real("rho", rho, low=0.0)
        self.eta = check_real("eta", eta, low=0.0)
        self.adaptive = check_bool("adaptive", adaptive)

    def group_defaults(self) -> dict[str, Any]:
        return {"rho": self.rho, "eta": self.eta, "adaptive": self.adaptive}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("rho", group["rho"], low=0.0)
        check_real("eta", group["eta"], low=0.0)
        check_bool("adaptive", group["adaptive"])

    def perturb(self, ctx: TransformContext) -> Perturbation | None:
        params, grads, groups = self._collect(ctx)
        if not params or not self.active(groups):
            _check_first_pass(ctx)
            return None
        moving = [i for i, group in enumerate(groups) if group["rho"] > 0]
        # Before any view of a parameter is held (a complex one's real view counts as a reference).
        prepared = self._prepare_move([params[i] for i in moving])
        into = prepared.into_by_index(moving)
        adaptive = [i for i, group in enumerate(groups) if group["adaptive"]]
        # Pairs of reals for complex tensors; float32 for 16-bit ones (T ⊙ g would overflow).
        weights = [_widened(as_real(params[i])) for i in adaptive]
        etas = [float(groups[i]["eta"]) for i in adaptive]  # any real number validate_group takes
        scalings = adaptive_scaling(weights, etas, foreach=ctx.foreach)
        del weights
        widened_grads = [_widened(as_real(grads[i])) for i in adaptive]
        # T ⊙ g in the backup buffer where the move can take it from there (in its layout), else
        # in new memory: the same products.
        scaled_grads = _partly_into(
            len(adaptive),
            _fitting(into, adaptive, widened_grads, scalings),
            lambda rest: mul([widened_grads[k] for k in rest], [scalings[k] for k in rest], foreach=ctx.foreach),
            lambda k, buffer: torch.mul(widened_grads[k], scalings[k], out=buffer),
        )
        widened_grads.clear()  # float32 copies of 16-bit gradients: freed now (the lambdas read the list)
        directions = [as_real(grad) for grad in grads]  # T ⊙ g for adaptive groups, g elsewhere
        for index, scaled in zip(adaptive, scaled_grads):
            directions[index] = scaled
        norm = self._finite_norm(directions, ctx.foreach, like=grads, checks=ctx)
        if norm is None or norm == 0.0:
            return None if norm == 0.0 else Perturbation([], non_finite=True)
        # T ⊙ (T ⊙ g / ‖T ⊙ g‖), in place: each element of the quotient is at most 1 in
        # magnitude, so the result is at most T in magnitude. T² ⊙ g first would
        # overflow float32 (also 16-bit parameters' widened values) from |w| near 1.8e19.
        _divide_(scaled_grads, norm, ctx.foreach)
        mul_(scaled_grads, scalings, foreach=ctx.foreach)
        scalings.clear()  # T: freed now (the lambdas above read the list)
        del scaled_grads
        adaptive_indices = set(adaptive)
        moved, moved_directions, scales, divisors = [], [], [], []
        for index in moving:
            moved.append(params[index])
            moved_directions.append(directions[index])
            divisors.append(1.0 if index in adaptive_indices else norm)  # adaptive ones are divided
            scales.append(self._radius(groups[index]))
        return self._move_along(moved, moved_directions, scales, ctx.foreach, divisors, prepared)
