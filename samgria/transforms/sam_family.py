r"""The SAM family: GSAM, WSAM, FriendlySAM, LookSAM and ESAM's stochastic weight perturbation.

Each is a :class:`~samgria.PerturbationTransform` built from the same pieces as
:class:`~samgria.SAM` (``_collect``, ``_finite_norm``, ``_move_along``): it moves the weights to
:math:`w + e`, re-evaluates the closure there, restores :math:`w` bit for bit, and then *finishes*
the step — combines the first gradient :math:`g = \nabla L(w)` with the gradient at the perturbed
weights :math:`g_p = \nabla L(w + e)` (GSAM, WSAM, LookSAM) or commits the state it updated
(FriendlySAM's moving average, ESAM's random stream, LookSAM's stored direction and counter).

How a step finishes, in both of the optimizer's loops:

* ``step(closure)``: :meth:`pre_update` perturbs, re-evaluates, restores and finishes. If the
  re-evaluation raises (or its gradients are not finite, which the optimizer turns into a skipped
  step) the weights are restored and nothing is committed: the transform's state is as before.
* ``first_step()`` / ``second_step()``: the optimizer calls the perturbation's ``restore()`` once
  the second backward is done, before unscaling (``GradScaler``) and before it checks the
  gradients; the perturbation returned here finishes there, on the second pass's gradients.
  State is committed only when those gradients are finite (one extra norm, read on the host).

State is committed by assigning new objects, never by writing into a tensor that ``state``
holds, and these transforms declare ``saves_state_before_step``: the optimizer keeps the
references of its state at the start of the step (no tensor copies) and puts them back if
something later in the same step raises (a transform after it in the chain, the inner step, a
post-step transform), if the step is skipped, or if a two-call step is cancelled.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch

from samgria._checks import check_bool, check_int, check_real, check_seed
from samgria.functional import all_finite, global_norm, mul_
from samgria.functional._sharding import is_sharded, local_shard, reduce_partial_sums
from samgria.functional._views import LOW_PRECISION, as_real, widened_dtype
from samgria.functional.norms import _accumulation_dtype, scale_
from samgria.transforms.base import TransformContext
from samgria.transforms.lamp import _GeneratorCache, _as_generator_state
from samgria.transforms.sam import (
    _FLOAT32_MAX,
    Perturbation,
    PerturbationTransform,
    _fitting,
    _owns_storage,
    _partly_into,
    _RefusesOptimizerStyleCall,
    _times_power_of_two,
)

__all__ = ["GSAM", "WSAM", "FriendlySAM", "LookSAM", "ESAM"]

Finish = Callable[[bool], None]


# -- kernels: a foreach fast path and a per-tensor path with the same arithmetic ---------------------
def _out_of_place(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[tuple[Any, ...] | None],
    foreach_kernel: Callable[[list[int], tuple[Any, ...]], Sequence[torch.Tensor]],
    tensor_kernel: Callable[[int, tuple[Any, ...]], torch.Tensor],
    in_place: Callable[[list[torch.Tensor], list[int]], None],
    foreach: bool,
) -> list[torch.Tensor]:
    """New tensors, in the order of ``tensors``: the indices with a key (``keys[i]``, e.g. device
    and dtype) are grouped by it and computed out of place, one ``foreach_kernel(indices, key)``
    per group (``tensor_kernel(index, key)`` each without ``foreach``); the others (key ``None``)
    are cloned and ``in_place(clones, indices)`` writes the clones."""
    result: list[torch.Tensor | None] = [None] * len(tensors)
    copied: list[int] = []
    direct: dict[tuple[Any, ...], list[int]] = {}
    for index, key in enumerate(keys):
        if key is None:
            copied.append(index)
        else:
            direct.setdefault(key, []).append(index)
    for key, indices in direct.items():
        outputs = foreach_kernel(indices, key) if foreach else [tensor_kernel(index, key) for index in indices]
        for index, output in zip(indices, outputs):
            result[index] = output
    if copied:
        clones = [tensors[i].clone(memory_format=torch.preserve_format) for i in copied]
        in_place(clones, copied)
        for index, clone in zip(copied, clones):
            result[index] = clone
    return cast(list[torch.Tensor], result)


def _scaled(tensors: Sequence[torch.Tensor], scales: Sequence[float], foreach: bool) -> list[torch.Tensor]:
    r"""New tensors :math:`s_i\, t_i` (same kinds and dtypes as ``tensors``; the arithmetic of
    :func:`scale_`, on each clone's :func:`as_real` view, so that sharded and plain tensors mix).

    Plain real tensors of 32 or 64 bits are multiplied out of place, in one pass instead of a copy
    and a pass over the copy: the kernel :func:`scale_` runs in place, bit for bit."""
    keys = [
        None if t.dtype in LOW_PRECISION or t.is_complex() or is_sharded(t) else (t.device, t.dtype) for t in tensors
    ]
    return _out_of_place(
        tensors,
        keys,
        lambda indices, _: torch._foreach_mul([tensors[i] for i in indices], [scales[i] for i in indices]),
        lambda i, _: tensors[i].mul(scales[i]),
        lambda clones, copied: scale_([as_real(c) for c in clones], [scales[i] for i in copied], foreach=foreach),
        foreach,
    )


def _added(
    targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], scales: Sequence[float], foreach: bool
) -> list[torch.Tensor]:
    r"""New tensors :math:`t_i + s_i\, u_i`: :func:`_add_scaled_` on copies of ``targets`` (real
    dense tensors), bit for bit. A target of 32 or 64 bits with a source of its dtype and device
    is added out of place, in one pass instead of a copy and a pass over the copy."""
    keys = [
        None if t.dtype in LOW_PRECISION or u.dtype != t.dtype or u.device != t.device else (t.device, t.dtype, s)
        for t, u, s in zip(targets, sources, scales)
    ]
    return _out_of_place(
        targets,
        keys,
        lambda indices, key: torch._foreach_add(
            [targets[i] for i in indices], [sources[i] for i in indices], alpha=key[2]
        ),
        lambda i, key: torch.add(targets[i], sources[i], alpha=key[2]),  # the group's scale on both paths
        lambda clones, copied: _add_scaled_(clones, [sources[i] for i in copied], [scales[i] for i in copied], foreach),
        foreach,
    )


def _add_scaled_(
    targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], scales: Sequence[float], foreach: bool
) -> None:
    r"""In place: :math:`t_i \leftarrow t_i + s_i\, u_i` (``sources`` are left as they are).

    A 16-bit target is computed in float32 and rounded once, on both paths: ``add_`` refuses an
    ``alpha`` beyond the dtype's range (``LookSAM``'s :math:`\alpha \lVert g \rVert`) and the
    foreach kernel rounds it to the dtype first.
    """
    if foreach:
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, target in enumerate(targets):
            if target.dtype in LOW_PRECISION:
                _add_scaled_one_(target, sources[index], scales[index])
                continue
            groups.setdefault((target.device, target.dtype, scales[index]), []).append(index)
        for (_device, _dtype, scale), indices in groups.items():
            torch._foreach_add_([targets[i] for i in indices], [sources[i] for i in indices], alpha=scale)
        return
    for target, source, scale in zip(targets, sources, scales):
        _add_scaled_one_(target, source, scale)


def _add_scaled_one_(target: torch.Tensor, source: torch.Tensor, scale: float) -> None:
    """:func:`_add_scaled_` for one tensor."""
    if target.dtype in LOW_PRECISION:
        wide = torch.promote_types(widened_dtype(target.dtype), widened_dtype(source.dtype))
        target.copy_(torch.add(target.to(wide), source.to(wide), alpha=scale))
    else:
        target.add_(source, alpha=scale)


def _scale_and_add_(
    targets: Sequence[torch.Tensor],
    scales: Sequence[float],
    both: Sequence[int],
    sources: Sequence[torch.Tensor],
    source_scales: Sequence[float],
    foreach: bool,
) -> None:
    r"""In place: :math:`t_i \leftarrow a_i\, t_i + b_k\, u_k` for :math:`i` = ``both[k]``, and
    :math:`t_i \leftarrow a_i\, t_i` for the other :math:`i` (``sources`` are left as they are).

    A 16-bit target in ``both`` is computed in float32 and rounded once, on both paths: rounding
    :math:`a_i\, t_i` to its dtype first made it infinite where the sum fits (WSAM's
    :math:`a = 9` at :math:`\gamma = 0.9`) and rounded it twice. The other targets take
    :func:`scale_`, then :func:`_add_scaled_`: the same arithmetic on both paths.
    """
    paired = {i: k for k, i in enumerate(both)}
    at_once = {i for i in both if targets[i].dtype in LOW_PRECISION}
    for i in at_once:
        _scale_and_add_one_(targets[i], scales[i], sources[paired[i]], source_scales[paired[i]])
    rest = [i for i in range(len(targets)) if i not in at_once]
    scale_([targets[i] for i in rest], [scales[i] for i in rest], foreach=foreach)
    added = [i for i in both if i not in at_once]
    _add_scaled_(
        [targets[i] for i in added],
        [sources[paired[i]] for i in added],
        [source_scales[paired[i]] for i in added],
        foreach,
    )


def _scale_and_add_one_(target: torch.Tensor, scale: float, source: torch.Tensor, source_scale: float) -> None:
    """:func:`_scale_and_add_` for one 16-bit target with a source."""
    wide = torch.promote_types(widened_dtype(target.dtype), widened_dtype(source.dtype))
    target.copy_(torch.add(target.to(wide).mul_(scale), source.to(wide), alpha=source_scale))


def _dot(
    first: Sequence[torch.Tensor], second: Sequence[torch.Tensor], like: Sequence[torch.Tensor] | None = None
) -> float:
    r""":math:`\sum_i \langle a_i, b_i \rangle` (16-bit tensors in float32), summed in float64 per
    device and read on the host once per device; taken again with float64 products when float32
    products overflow or the result is below ``1e-30`` (they may have underflowed).

    Sharded tensors (``DTensor``s, or local shards of the sharded tensors ``like``) count whole:
    the per-shard partial sums are added across ranks (one ``all_reduce`` per device mesh).
    """
    total = _dot_in(first, second, like, lambda tensor: widened_dtype(tensor.dtype))
    narrow = any(widened_dtype(tensor.dtype) != torch.float64 for tensor in first)
    if narrow and not (math.isfinite(total) and abs(total) >= _DOT_RETAKE_BELOW):
        # Products float32 cannot hold (elements near 1e19 and beyond) or may have lost to
        # underflow (a result below 1e-30, as global_norm retakes norms below 1e-15): again in
        # the summing dtype (float64), which holds every product of float32 values. Non-finite
        # inputs stay so.
        total = _dot_in(
            first,
            second,
            like,
            lambda tensor: torch.promote_types(widened_dtype(tensor.dtype), _accumulation_dtype(tensor.device)),
        )
    return total


#: Below this, a dot product of float32 (or 16-bit) tensors is taken again with float64 products.
_DOT_RETAKE_BELOW = 1e-30


def _dot_in(
    first: Sequence[torch.Tensor],
    second: Sequence[torch.Tensor],
    like: Sequence[torch.Tensor] | None,
    wide_of: Callable[[torch.Tensor], torch.dtype],
) -> float:
    """:func:`_dot` with every product taken in ``wide_of(tensor)``."""
    sources = first if like is None else like
    partials = []
    for a, b in zip(first, second):
        a, b = local_shard(a), local_shard(b)
        wide = wide_of(a)
        # A step inside torch.autocast (Lightning's manual optimization runs it there) must not
        # let autocast take vecdot in a 16-bit dtype.
        with torch.autocast(a.device.type, enabled=False):
            value = torch.linalg.vecdot(a.reshape(-1).to(wide), b.reshape(-1).to(wide))
        partials.append(value.to(_accumulation_dtype(a.device)))
    if partials and any(is_sharded(source) for source in sources):
        device = partials[0].device
        return float(reduce_partial_sums(torch.stack([v.to(device) for v in partials]), sources).sum())
    totals: dict[torch.device, torch.Tensor] = {}
    for value in partials:
        totals[value.device] = value if value.device not in totals else totals[value.device] + value
    return sum(float(total) for total in totals.values())


#: Between these, a squared norm and a dot product of float64 tensors of that size are normal
#: numbers (float32 and 16-bit tensors have norms between them).
_SQUARE_SAFE = (2.0**-450, 2.0**450)


def _coefficient(
    first: Sequence[torch.Tensor], second: Sequence[torch.Tensor], norm: float, like: Sequence[torch.Tensor]
) -> float:
    r""":math:`\langle a, b \rangle / n^2` for a norm :math:`n > 0` (of ``first`` or ``second``):
    as :func:`_dot` and a square where :math:`n` is within :data:`_SQUARE_SAFE`, else with both
    sides scaled by :math:`2^{-k}`, :math:`k` the exponent of :math:`n`
    (:func:`~samgria.transforms.sam._times_power_of_two`, new memory): the same quotient, without
    the square overflowing (``OverflowError`` near 1e154) or flushing to zero."""
    if _SQUARE_SAFE[0] < norm < _SQUARE_SAFE[1]:
        return _dot(first, second, like=like) / norm**2
    shift = -math.frexp(norm)[1]
    scaled = math.ldexp(norm, shift)  # in [1/2, 1); exact unless the norm is subnormal
    first = [_times_power_of_two(tensor, shift) for tensor in first]
    second = [_times_power_of_two(tensor, shift) for tensor in second]
    return _dot(first, second, like=like) / scaled**2


def _norm(tensors: Sequence[torch.Tensor], foreach: bool, like: Sequence[torch.Tensor] | None = None) -> float:
    return float(global_norm([as_real(t) for t in tensors], foreach=foreach, like=tensors if like is None else like))


def _kept_past_backward(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``grads`` as they can be kept past the next backward: a gradient that does not own its
    storage (a local shard's, for a sharded one) is copied, the others are kept as they are.

    A gradient that is a view into a larger buffer may be written by the next backward: DDP with
    ``gradient_as_bucket_view=True`` back-propagates into the same bucket and points ``.grad`` at
    it, so a first-pass gradient kept by reference would turn into the second pass's. A gradient
    that owns its storage is safe without a copy: the optimizer clears ``.grad`` before the next
    backward, which then allocates anew.
    """
    return [
        grad if _owns_storage(local_shard(grad)) else grad.clone(memory_format=torch.preserve_format)
        for grad in grads
    ]


def _zero_where_only_first(ctx: TransformContext, first: dict[int, torch.Tensor]) -> None:
    r"""Give a zero gradient to each parameter that had a first gradient but has none at
    :math:`w + e` (its part of the loss vanished there: a route not taken, a term switched off).

    Its :math:`g_p` is then :math:`0`, as for any function that does not depend on it, and the
    gradient that GSAM and WSAM combine keeps its :math:`g` term; left ``None``, the inner
    optimizer would not step it at all. (A parameter with no first gradient counts
    :math:`g = 0` in the same way.)
    """
    for group in ctx.param_groups:
        for param in group["params"]:
            if param.grad is None and id(param) in first:
                param.grad = torch.zeros_like(first[id(param)], memory_format=torch.preserve_format)


def _current_grads_finite(ctx: TransformContext) -> bool:
    """The non-finite policy's verdict on the current gradients (every element finite)."""
    grads = [p.grad for group in ctx.param_groups for p in group["params"] if p.grad is not None]
    return all_finite([as_real(grad) for grad in grads], foreach=ctx.foreach, like=grads)


class _Step(Perturbation):
    """A perturbation (possibly empty) and what finishes the step once the gradients at w + e are in.

    Args:
        moves: As for :class:`Perturbation`.
        finish: ``finish(checked)``; ``checked`` says the gradients are known to be finite.
        held: Parameters whose final gradients the finish puts back (LookSAM between its SAM
            steps): in the two-call loop the optimizer then resumes after this transform, as after
            a perturbation, instead of running the transforms before it again.
        mixes_first_pass: The finish combines the first pass's gradients (or quantities taken
            from them) with the current ones, so both must be in one loss scale (in the two-call
            loop under ``GradScaler``, the optimizer sees to it).
        scale_dependent: The move depends on the size of the first pass's gradients, not only
            on their direction (``MultiStepSAM(normalize=False)``): under a loss scale it would
            be wrong, so the optimizer refuses ``GradScaler``'s step.

    Attributes:
        scaled_with_gradients: Tensors the finish kept aside in the gradients' scale (decoupled
            WSAM's sharpness terms): in the two-call loop the optimizer unscales them with the
            gradients (``GradScaler``).
    """

    def __init__(
        self,
        moves: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]],
        finish: Finish | None = None,
        *,
        held: Sequence[torch.Tensor] = (),
        mixes_first_pass: bool = False,
        scale_dependent: bool = False,
    ) -> None:
        super().__init__(moves)
        self._finish = finish
        self._held = list(held)
        self.scaled_with_gradients: list[torch.Tensor] = []
        self.mixes_first_pass = mixes_first_pass
        self.scale_dependent = scale_dependent

    @property
    def params(self) -> list[torch.Tensor]:
        """The moved parameters, and those whose gradients the finish sets."""
        return [move[0] for move in self.moves] + self._held

    def restore_weights(self) -> dict[int, torch.Tensor]:
        """Put the original weights back (:meth:`Perturbation.restore`), finishing nothing."""
        return Perturbation.restore(self)

    def finish(self, checked: bool) -> None:
        """Combine the gradients / commit the state (once)."""
        finish, self._finish = self._finish, None
        if finish is not None:
            finish(checked)

    def restore(self) -> dict[int, torch.Tensor]:
        """What the optimizer calls in the two-call loop: restore the weights, then finish."""
        freed = super().restore()
        self.finish(checked=False)
        return freed


class _FinishingTransform(PerturbationTransform):
    """Perturb, re-evaluate (only when something moved), restore, then finish the step."""

    saves_state_before_step = True
    # The built-in subclasses move the weights with _move_along (or, as MultiStepSAM's adversary,
    # put them back before raising): a perturb() that raises leaves them as they were, so nothing
    # is copied. Each declares it beside its own perturb(); a declaration here covers only
    # PerturbationTransform's.
    writes_weights_before_step = False

    def pre_update(self, ctx: TransformContext) -> None:
        self._require_reevaluate(ctx)
        # cast: this class's perturb() returns a _Step
        step = self._perturbed(ctx, lambda step: self._climb(ctx, cast(_Step, step)), finish=False)  # weights restored
        if step is None or step.non_finite:
            return
        assert isinstance(step, _Step)
        # Inside the optimizer a re-evaluation with non-finite gradients raises; standalone, not.
        step.finish(checked=not ctx.standalone)

    def _climb(self, ctx: TransformContext, step: _Step) -> None:
        """The re-evaluation at the moved weights (none when nothing moved)."""
        if step.moves:
            # cast: pre_update's _require_reevaluate has refused a context without one
            cast("Callable[[], Any]", ctx.reevaluate)()

    def _sam_moves(
        self,
        ctx: TransformContext,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        groups: list[Mapping[str, Any]],
        norm: float,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]]:
        r"""SAM's move, :math:`e = \rho\, g / \lVert g \rVert` per group, keeping ``grads`` intact."""
        moving = [i for i, group in enumerate(groups) if group["rho"] > 0]
        directions = [as_real(grads[i]) for i in moving]  # read, not written, by the move
        scales = [self._radius(groups[i]) for i in moving]
        return self._move_along([params[i] for i in moving], directions, scales, ctx.foreach, [norm] * len(moving)).moves

    def _sam_step(
        self, ctx: TransformContext, finish: Callable[[dict[int, torch.Tensor], bool], Sequence[torch.Tensor] | None]
    ) -> Perturbation | None:
        """SAM's perturbation; ``finish(first, checked)`` gets the first gradients by ``id(param)``
        and may return tensors it kept in the gradients' scale (``_Step.scaled_with_gradients``)."""
        gathered = self._gather(ctx)  # None also for g = 0: g_p = g, nothing to combine
        if not isinstance(gathered, tuple):
            return gathered
        params, grads, groups, norm = gathered
        first = {id(p): g for p, g in zip(params, _kept_past_backward(grads))}  # used after g_p's backward
        moves = self._sam_moves(ctx, params, grads, groups, norm)
        step = _Step(moves, None, mixes_first_pass=True)
        kept = step.scaled_with_gradients  # the list, not the step: no cycle through its finish

        def finish_step(checked: bool) -> None:
            kept.extend(finish(first, checked) or ())

        step._finish = finish_step
        return step

    def _first_and_perturbed(
        self, ctx: TransformContext, first: dict[int, torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Mapping[str, Any]], list[int], list[torch.Tensor]]:
        """The parameters with a gradient now (``g_p``), those gradients, their groups, the indices
        of those that also had a first gradient, and those first gradients (real views)."""
        params, perturbed, groups = self._collect(ctx)
        both = [i for i, param in enumerate(params) if id(param) in first]
        kept = [as_real(first[id(params[i])]) for i in both]
        return params, [as_real(g) for g in perturbed], groups, both, kept


# -- GSAM ----------------------------------------------------------------------------------------------
class GSAM(_RefusesOptimizerStyleCall, _FinishingTransform):
    r"""Surrogate gap guided SAM (Zhuang et al., "Surrogate Gap Minimization Improves
    Sharpness-Aware Training", ICLR 2022), Algorithm 1.

    With :math:`g = \nabla L(w)`, the perturbed gradient :math:`g_p = \nabla L(w + e)` at SAM's
    :math:`e = \rho\, g / \lVert g \rVert_2`, and the component of :math:`g` orthogonal to
    :math:`g_p`,

    .. math::

        g_\perp = g - \frac{\langle g, g_p \rangle}{\lVert g_p \rVert_2^2}\, g_p, \qquad
        d = g_p - \alpha\, g_\perp,

    the inner optimizer steps with :math:`d`: it descends the perturbed loss and, along
    :math:`g_\perp`, ascends the loss :math:`L(w)`, which leaves the perturbed loss unchanged to
    first order and so lowers the surrogate gap :math:`L(w + e) - L(w)`. Norms and the inner
    product are global (over every parameter with a gradient); ``rho`` and ``alpha`` are
    per-group keys. The paper schedules :math:`\rho_t` with the learning rate :math:`\eta_t`,
    :math:`\rho_t = \rho_{\min} + (\rho_{\max} - \rho_{\min})\,
    (\eta_t - \eta_{\min}) / (\eta_{\max} - \eta_{\min})` (the authors' ``ProportionScheduler``;
    proportional where :math:`\rho_{\min} = \eta_{\min} = 0`), and keeps :math:`\alpha` fixed;
    assign ``group["rho"]`` each step to do the same. A parameter with a gradient at :math:`w` but
    none at :math:`w + e` (its part of the loss vanished there) counts :math:`g_p = 0` and steps
    with :math:`d = -\alpha g`; one with a gradient only at :math:`w + e` counts :math:`g = 0`.

    Args:
        rho: Default radius :math:`\rho \ge 0` (per-group key ``"rho"``).
        alpha: Default weight :math:`\alpha \ge 0` of the surrogate-gap ascent (per-group key
            ``"alpha"``); ``alpha=0`` is SAM.

    Raises:
        TypeError: If ``rho`` or ``alpha`` is not a real number (a bool included).
        ValueError: If ``rho`` or ``alpha`` is negative or not finite.
    """

    supports_local_first_pass = False  # the update mixes in the first-pass gradient
    combines_gradients = True  # (1 + alpha c) g_p - alpha g
    writes_weights_before_step = False  # SAM's move (_move_along)

    def __init__(self, rho: float = 0.05, alpha: float = 0.4) -> None:
        self.rho = check_real("rho", rho, low=0.0)
        self.alpha = check_real("alpha", alpha, low=0.0)

    def group_defaults(self) -> dict[str, Any]:
        return {"rho": self.rho, "alpha": self.alpha}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("rho", group["rho"], low=0.0)
        check_real("alpha", group["alpha"], low=0.0)

    def perturb(self, ctx: TransformContext) -> Perturbation | None:
        return self._sam_step(ctx, lambda first, checked: self._decompose(ctx, first))

    def _decompose(self, ctx: TransformContext, first: dict[int, torch.Tensor]) -> None:
        _zero_where_only_first(ctx, first)
        params, perturbed, groups, both, kept = self._first_and_perturbed(ctx, first)
        if not perturbed:
            return
        norm = _norm(perturbed, ctx.foreach, like=params)
        parallel = _coefficient(kept, [perturbed[i] for i in both], norm, [params[i] for i in both]) if norm > 0 else 0.0
        # d = g_p - alpha (g - c g_p) = (1 + alpha c) g_p - alpha g  (no first gradient: g = 0)
        _scale_and_add_(
            perturbed,
            [1.0 + float(group["alpha"]) * parallel for group in groups],
            both,
            kept,
            [-float(groups[i]["alpha"]) for i in both],
            ctx.foreach,
        )


# -- WSAM ----------------------------------------------------------------------------------------------
class WSAM(_RefusesOptimizerStyleCall, _FinishingTransform):
    r"""Weighted SAM (Yue et al., "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
    Regularization Term", KDD 2023).

    WSAM minimises :math:`L(w) + \frac{\gamma}{1-\gamma}\big(L(w + e) - L(w)\big)` with SAM's
    :math:`e = \rho\, g / \lVert g \rVert_2`, whose gradient is

    .. math::

        \frac{1 - 2\gamma}{1 - \gamma}\, g + \frac{\gamma}{1 - \gamma}\, g_p,
        \qquad g = \nabla L(w),\ g_p = \nabla L(w + e).

    ``decouple=True`` (the default) is the paper's weight-decoupled form: the inner optimizer
    steps with :math:`g` alone and the sharpness term is applied afterwards as a plain step,

    .. math::

        w \leftarrow \mathrm{inner\_step}(w, g) - \eta\,\frac{\gamma}{1 - \gamma}\,(g_p - g)

    with the group's learning rate :math:`\eta` (``group["lr"]``), the way AdamW decouples weight
    decay; with plain SGD both forms are the same update. ``decouple=False`` gives the inner
    optimizer the gradient above, so that :math:`\gamma = 1/2` is SAM (decoupled, only where the
    two forms agree); :math:`\gamma = 0` is the inner optimizer alone in both. ``rho`` and
    ``gamma`` are per-group keys. A parameter with a gradient at :math:`w` but none at
    :math:`w + e` (its part of the loss vanished there) counts :math:`g_p = 0`, one with a
    gradient only at :math:`w + e` counts :math:`g = 0`: both forms step it as the formulas above
    say.

    Args:
        rho: Default radius :math:`\rho \ge 0` (per-group key ``"rho"``).
        gamma: Default weight :math:`\gamma \in [0, 1)` of the sharpness (per-group key
            ``"gamma"``).
        decouple: Apply the sharpness term after the inner step (a setting of the transform).

    Raises:
        ValueError: If ``rho`` is negative or not finite, or ``gamma`` is outside ``[0, 1)``; at
            a step with ``decouple=True``, before anything moves, if a group with
            :math:`\gamma > 0` has no ``"lr"`` (an inner optimizer that names its step size
            otherwise).
        TypeError: If ``rho`` or ``gamma`` is not a real number (a bool included), or
            ``decouple`` is not a bool.
    """

    supports_local_first_pass = False  # the update mixes in the first-pass gradient
    writes_weights_before_step = False  # SAM's move (_move_along); its decoupled term is post-step

    def __init__(self, rho: float = 0.05, gamma: float = 0.9, *, decouple: bool = True) -> None:
        self.rho = check_real("rho", rho, low=0.0)
        self.gamma = check_real("gamma", gamma, low=0.0, high=1.0, high_open=True)
        self.decouple = check_bool("decouple", decouple)
        self.combines_gradients = not self.decouple  # a g_p + (1 - a) g; decoupled: g itself
        # Between the finish and post_update of one step, per slot (one object may hold several):
        # the sharpness terms (param, g_p - g, weight).
        self._pending: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}

    def group_defaults(self) -> dict[str, Any]:
        return {"rho": self.rho, "gamma": self.gamma}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("rho", group["rho"], low=0.0)
        check_real("gamma", group["gamma"], low=0.0, high=1.0, high_open=True)

    def settings(self) -> dict[str, Any]:
        return {"decouple": self.decouple}

    def active(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        return super().active(param_groups) and any(group["gamma"] > 0 for group in param_groups)

    def perturb(self, ctx: TransformContext) -> Perturbation | None:
        if ctx.standalone and self.decouple:
            raise RuntimeError(
                "WSAM(decouple=True) applies its sharpness term with the group's learning rate, "
                "which the seed protocol does not know: use it inside TransformingOptimizer, or "
                "use WSAM(decouple=False)"
            )
        self._pending.pop(ctx.slot, None)
        if self.decouple:  # before anything moves: the sharpness step needs each group's lr
            for index, group in enumerate(ctx.param_groups):
                if group["gamma"] > 0 and "lr" not in group:
                    raise ValueError(
                        f"WSAM(decouple=True) steps along its sharpness term with the group's "
                        f"learning rate, but the inner optimizer's param_groups[{index}] has no 'lr' "
                        f"(its keys: {sorted(k for k in group if k != 'params')}): use "
                        f"WSAM(decouple=False), which needs none"
                    )
        return self._sam_step(ctx, lambda first, checked: self._weigh(ctx, first, checked))

    def _weigh(self, ctx: TransformContext, first: dict[int, torch.Tensor], checked: bool) -> list[torch.Tensor]:
        """Combine g and g_p, or (decoupled) put g back and keep the sharpness terms; returns the
        tensors kept in the gradients' scale (for the optimizer to unscale with them)."""
        _zero_where_only_first(ctx, first)
        params, perturbed, groups, both, kept = self._first_and_perturbed(ctx, first)
        weights = [float(group["gamma"]) / (1.0 - float(group["gamma"])) for group in groups]
        if not self.decouple:
            # a g_p + (1 - a) g with a = gamma / (1 - gamma)  (no first gradient: g = 0)
            _scale_and_add_(perturbed, weights, both, kept, [1.0 - weights[i] for i in both], ctx.foreach)
            return []
        if not (checked or _current_grads_finite(ctx)):
            # Two-call loop, non-finite second pass: leave g_p in place for the optimizer's
            # check (or GradScaler's) to skip the step; putting the finite g back would hide it.
            return []
        # The sharpness s = g_p - g is computed in the perturbed gradient's memory (16-bit ones:
        # in float32, as g_p - g may leave the dtype's range where neither does); the inner
        # optimizer gets g back (zero where there was no first gradient).
        perturbed = [grad.float() if grad.dtype in LOW_PRECISION else grad for grad in perturbed]
        kept = [grad.float() if grad.dtype in LOW_PRECISION else grad for grad in kept]
        _add_scaled_([perturbed[i] for i in both], kept, [-1.0] * len(both), ctx.foreach)
        gradients = [first[id(p)] if id(p) in first else torch.zeros_like(p) for p in params]
        for param, grad in zip(params, gradients):
            param.grad = grad
        sharpness = [(p, s, a) for p, s, a in zip(params, perturbed, weights) if a]
        self._pending[ctx.slot] = sharpness
        # Two-call loop (finished by restore()): under GradScaler the optimizer unscales these
        # with the gradients, after this.
        return [s for _, s, _ in sharpness]

    @property
    def _post_update_runs(self) -> bool:
        """Whether :meth:`post_update` can do anything: coupled, the whole update is the inner
        optimizer's (the optimizer then neither calls it nor takes a copy before the inner step
        for it). Read only for this :meth:`post_update`, not for one a subclass or the instance
        puts in its place."""
        return self.decouple

    @torch.no_grad()
    def post_update(self, ctx: TransformContext) -> None:
        """Decoupled sharpness step: :math:`w \\leftarrow w - \\eta\\,\\frac{\\gamma}{1-\\gamma}(g_p - g)` (``+`` when the inner optimizer maximises)."""
        sharpness = self._pending.pop(ctx.slot, [])
        if not sharpness:
            return
        # A descent step on the sharpness; an ascent when the inner optimizer maximises (the
        # objective is then -L, whose sharpness term has the gradient -(g_p - g)).
        step_of = {
            id(p): float(group["lr"]) if group.get("maximize", False) else -float(group["lr"])
            for group in reversed(ctx.param_groups)
            for p in group["params"]
        }
        _add_scaled_(
            [as_real(param) for param, _, _ in sharpness],
            [grad for _, grad, _ in sharpness],
            [step_of[id(param)] * weight for param, _, weight in sharpness],
            ctx.foreach,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_pending={})
        return state


# -- FriendlySAM ---------------------------------------------------------------------------------------
class FriendlySAM(_RefusesOptimizerStyleCall, _FinishingTransform):
    r"""Friendly SAM (Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024).

    The full-gradient component of :math:`g` does not help generalisation; F-SAM removes an
    estimate of it — an exponential moving average :math:`m` of past gradients — from the
    perturbation direction, keeping the batch-specific part:

    .. math::

        d_t = g_t - \sigma\, m_{t-1}, \qquad
        m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_t, \qquad
        e = \rho\, \frac{d_t}{\lVert d_t \rVert_2},

    and the inner optimizer steps with :math:`\nabla L(w + e)`. The order is the authors' code's
    (which pytorch_optimizer follows), not the paper's equations: the average of the previous
    steps is removed, then updated with :math:`g_t`, where the paper writes
    :math:`d_t = g_t - \sigma\, m_t` with the updated average (a direction that differs by
    :math:`\sigma (1 - \lambda)\, g_t`); as in the code, a parameter's first step starts the
    average at :math:`m = g` and perturbs along :math:`g`.
    ``rho``, ``sigma`` and ``lmbda`` are per-group keys; the norm is global. The average is kept
    in the slot (``"momentum"``, in the parameter's dtype) and updated also when nothing is
    perturbed (``rho=0``).

    Args:
        rho: Default radius :math:`\rho \ge 0` (per-group key ``"rho"``).
        sigma: Default weight :math:`\sigma \ge 0` of the average removed (key ``"sigma"``);
            ``sigma=0`` is SAM.
        lmbda: Default decay :math:`\lambda \in [0, 1]` of the average (key ``"lmbda"``).

    Raises:
        TypeError: If a value is not a real number (a bool included).
        ValueError: If a value is negative or not finite, or ``lmbda > 1``.
    """

    writes_weights_before_step = False  # m in new tensors, d too or in backup buffers, then SAM's move

    # First in the chain, perturb() checks the first pass (see ASAM): d = g - sigma m is finite
    # only if g is (a finite average), its norm taken over every gradient, also in rho=0 groups.
    _checks_first_pass = True

    def __init__(self, rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.9) -> None:
        self.rho = check_real("rho", rho, low=0.0)
        self.sigma = check_real("sigma", sigma, low=0.0)
        self.lmbda = check_real("lmbda", lmbda, low=0.0, high=1.0)

    def group_defaults(self) -> dict[str, Any]:
        return {"rho": self.rho, "sigma": self.sigma, "lmbda": self.lmbda}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("rho", group["rho"], low=0.0)
        check_real("sigma", group["sigma"], low=0.0)
        check_real("lmbda", group["lmbda"], low=0.0, high=1.0)

    def perturb(self, ctx: TransformContext) -> Perturbation | None:
        params, grads, groups = self._collect(ctx)
        if not params:
            return None
        moving = [i for i, group in enumerate(groups) if group["rho"] > 0]
        prepared = self._prepare_move([params[i] for i in moving]) if moving else None
        into = {} if prepared is None else prepared.into_by_index(moving)
        averages = [ctx.state[p].get("momentum") for p in params]
        old = [i for i, m in enumerate(averages) if m is not None]
        # A parameter's first step: m = g and d = g. Later: m_t = lmbda m + (1 - lmbda) g and
        # d = g - sigma m, both in new memory (the gradients stay g until something moves; the
        # average is committed once the step is through), d in the parameter's backup buffer
        # where the move can take it from there (_prepare_move).
        new_averages = [grad.clone() if m is None else None for grad, m in zip(grads, averages)]
        directions = [as_real(grad) for grad in grads]
        if old:
            olds = [cast(torch.Tensor, averages[i]) for i in old]  # cast: old holds the set ones
            updated = _scaled(olds, [float(groups[i]["lmbda"]) for i in old], ctx.foreach)
            mix = [1.0 - float(groups[i]["lmbda"]) for i in old]
            _add_scaled_([as_real(m) for m in updated], [directions[i] for i in old], mix, ctx.foreach)
            real_olds = [as_real(m) for m in olds]
            shifted = _partly_into(
                len(old),
                _fitting(into, old, [directions[i] for i in old], real_olds),
                lambda rest: _added(
                    [directions[old[k]] for k in rest],
                    [real_olds[k] for k in rest],
                    [-float(groups[old[k]]["sigma"]) for k in rest],
                    ctx.foreach,
                ),
                # torch.add, as _added's for these dtypes
                lambda k, buffer: torch.add(
                    directions[old[k]], real_olds[k], alpha=-float(groups[old[k]]["sigma"]), out=buffer
                ),
            )
            for k, i in enumerate(old):
                new_averages[i] = updated[k]
                directions[i] = shifted[k]

        def commit(checked: bool) -> None:
            if checked or _current_grads_finite(ctx):
                for param, average in zip(params, new_averages):
                    ctx.state[param]["momentum"] = average

        norm = self._finite_norm(directions, ctx.foreach, like=grads, checks=ctx)
        if norm is None:
            return Perturbation([], non_finite=True)
        if norm == 0.0 or not moving:
            return _Step([], commit)
        scales = [self._radius(groups[i]) for i in moving]
        moved = [params[i] for i in moving]
        moves = self._move_along(
            moved, [directions[i] for i in moving], scales, ctx.foreach, [norm] * len(moving), prepared
        )
        return _Step(moves.moves, commit)

    @torch.no_grad()
    def init_state(self, ctx: TransformContext) -> None:
        for group in ctx.param_groups:
            for param in group["params"]:
                if param.grad is not None and "momentum" not in ctx.state[param]:
                    ctx.state[param]["momentum"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def check_loaded_state(self, ctx: TransformContext) -> None:
        """Raise ``ValueError`` unless every moving average fits its parameter."""
        self._check_loaded_tensors(ctx, "momentum")


# -- LookSAM -------------------------------------------------------------------------------------------
def _divide_in_range_(values: list[torch.Tensor], size: float, foreach: bool) -> None:
    """Divide ``values`` by ``size > 0`` in place. Where ``1 / size`` is beyond float32's range (a
    subnormal norm: infinite in float64, or not representable in the float32 a float32 or 16-bit
    scaling computes in), with ``size = m 2^e`` (:func:`math.frexp`) the values are multiplied by
    ``2^{-e}`` in steps within that range, exact, and then by ``1 / m``, in (1, 2]."""
    count = len(values)
    inverse = 1.0 / size
    if inverse <= _FLOAT32_MAX:
        scale_(values, [inverse] * count, foreach=foreach)
        return
    mantissa, exponent = math.frexp(size)
    remaining = -exponent  # > 0: size < 1 here
    while remaining > 0:  # the values grow towards at most 1 (each is at most the norm)
        step = min(remaining, 120)
        scale_(values, [2.0**step] * count, foreach=foreach)
        remaining -= step
    scale_(values, [1.0 / mantissa] * count, foreach=foreach)


class LookSAM(_RefusesOptimizerStyleCall, _FinishingTransform):
    r"""LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR
    2022), Algorithm 1: a SAM step every ``k`` steps, a reused sharpness direction in between.

    Every ``k``-th step (the first one included) is a SAM step that also stores the component of
    the SAM gradient :math:`g_s = \nabla L(w + e)`, :math:`e = \rho\, g / \lVert g \rVert_2`,
    orthogonal to :math:`g = \nabla L(w)`:

    .. math::

        g_v = g_s - \frac{\langle g, g_s \rangle}{\lVert g \rVert_2^2}\, g .

    The ``k - 1`` steps in between do not re-evaluate the closure; the inner optimizer steps with

    .. math::

        g_s = g + \alpha\, \frac{\lVert g \rVert_2}{\lVert g_v \rVert_2}\, g_v ,

    so a step costs one forward-backward pass, and LookSAM costs about :math:`(1 + 1/k)` times a
    plain step instead of SAM's two. As in the paper, :math:`g` and :math:`g_v` are whole-model
    vectors (global norms and inner product); ``rho`` and ``alpha`` are per-group keys. A
    parameter with a gradient at :math:`w` but none at :math:`w + e` (its part of the loss
    vanished there) counts :math:`g_s = 0` in :math:`g_v`; the SAM step leaves it alone, as
    :class:`~samgria.SAM` does.

    State in the slot: per parameter ``"g_v"``, the direction :math:`g_v / \lVert g_v \rVert_2`
    (in the parameter's dtype); on the first parameter ``"step"``, the steps taken.

    As in the paper, :math:`g_v` is normalised whatever its size, so the steps in between add
    :math:`\alpha \lVert g \rVert_2` along it however small ``rho`` is: LookSAM does not tend to
    the inner optimizer's step as ``rho`` goes to 0. A SAM step that moves nothing (``rho=0`` in
    every group, or a zero gradient) has :math:`g_s = g`, hence :math:`g_v = 0`, and stores a zero
    direction: the steps up to the next SAM step add nothing to :math:`g` (also where an earlier
    SAM step had stored one, e.g. with ``rho`` scheduled down to 0), so ``rho=0`` is the inner
    optimizer's step. Where :math:`g_s` is (nearly) parallel to :math:`g` --
    a linear model, a tiny ``rho``, 16-bit gradients -- :math:`g_v` is mostly rounding, and so is
    the direction that is reused.

    LookSAM refuses ``first_pass_context`` (DDP ``no_sync``, m-sharpness): its steps in between
    use the first pass's gradient, and its direction :math:`g_v` is computed from it, so with
    each rank's own gradient the replicas would drift apart. The two-call loop (``first_step()`` / ``second_step()``) works, but its second
    pass is wasted on the steps in between (their gradients are those of the first pass).

    Args:
        rho: Default radius :math:`\rho \ge 0` of the SAM steps (per-group key ``"rho"``).
        alpha: Default weight :math:`\alpha \ge 0` of the reused direction (key ``"alpha"``).
        k: A SAM step every ``k`` steps, an integer ``>= 1`` (a setting; ``k=1`` is SAM).

    Raises:
        ValueError: If ``rho`` or ``alpha`` is negative or not finite, or ``k < 1``.
        TypeError: If ``rho`` or ``alpha`` is not a real number (a bool included), or ``k`` is
            not an integer.
    """

    supports_local_first_pass = False  # the steps in between and g_v use the first-pass gradient
    combines_gradients = True  # the steps in between: g + alpha |g| g_v
    writes_weights_before_step = False  # SAM's move (_move_along); in between only gradients change

    def __init__(self, rho: float = 0.05, alpha: float = 0.7, k: int = 5) -> None:
        self.rho = check_real("rho", rho, low=0.0)
        self.alpha = check_real("alpha", alpha, low=0.0)
        self.k = check_int("k", k, low=1)

    def group_defaults(self) -> dict[str, Any]:
        return {"rho": self.rho, "alpha": self.alpha}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("rho", group["rho"], low=0.0)
        check_real("alpha", group["alpha"], low=0.0)

    def settings(self) -> dict[str, Any]:
        return {"k": self.k}

    @staticmethod
    def _count(ctx: TransformContext) -> None:
        slot = ctx.slot_state(keys=("step",))
        if slot is not None:
            slot["step"] = slot.get("step", 0) + 1

    def perturb(self, ctx: TransformContext) -> Perturbation | None:
        slot = ctx.slot_state(keys=("step",))
        params, grads, groups = self._collect(ctx)
        if not params or slot is None:
            return None
        norm = self._finite_norm(grads, ctx.foreach, ctx.grad_norm)
        if norm is None:
            return Perturbation([], non_finite=True)

        if slot.get("step", 0) % self.k == 0:  # a SAM step
            if norm == 0.0 or not self.active(groups):  # nothing to perturb: g_s = g, so g_v = 0

                def count(checked: bool) -> None:
                    if checked or _current_grads_finite(ctx):
                        self._clear_direction(ctx)
                        self._count(ctx)

                return _Step([], count)
            first = {id(p): g for p, g in zip(params, _kept_past_backward(grads))}  # used after g_s's backward
            moves = self._sam_moves(ctx, params, grads, groups, norm)
            return _Step(moves, lambda checked: self._store_direction(ctx, first, norm), mixes_first_pass=True)

        # In between: g + alpha |g| g_v / |g_v|, no re-evaluation. In the two-call loop these
        # gradients are put back after the caller's second backward.
        if ctx.reevaluate is None:
            grads = _kept_past_backward(grads)
        units = [ctx.state[p].get("g_v") for p in params]
        chosen = [i for i, unit in enumerate(units) if unit is not None and groups[i]["alpha"] != 0]
        scales = [float(groups[i]["alpha"]) * norm for i in chosen]
        # cast: chosen holds the set units
        _add_scaled_(
            [as_real(grads[i]) for i in chosen],
            [as_real(cast(torch.Tensor, units[i])) for i in chosen],
            scales,
            ctx.foreach,
        )

        def reinstall(checked: bool) -> None:
            # Two-call loop: the second pass repeated the first; its gradients give way to these,
            # unless they are not finite: left in place, the optimizer's check (or GradScaler's)
            # skips the step, as it skips every other step with a non-finite pass.
            if not (checked or _current_grads_finite(ctx)):
                return
            for param, grad in zip(params, grads):
                param.grad = grad
            self._count(ctx)

        return _Step([], reinstall, held=params, mixes_first_pass=True)

    @staticmethod
    def _clear_direction(ctx: TransformContext) -> None:
        """Store :math:`g_v = 0` (a SAM step that moved nothing, where :math:`g_s = g`): the steps
        up to the next SAM step add nothing. New tensors, as every commit (the stored ones may be
        the optimizer's references to put back)."""
        for group in ctx.param_groups:
            for param in group["params"]:
                entry = ctx.state[param] if param in ctx.state else {}
                if "g_v" in entry:
                    entry["g_v"] = torch.zeros_like(entry["g_v"], memory_format=torch.preserve_format)

    def _store_direction(self, ctx: TransformContext, first: dict[int, torch.Tensor], norm: float) -> None:
        params, perturbed, _groups, both, kept = self._first_and_perturbed(ctx, first)
        # A first gradient with none at w + e (its part of the loss vanished there): g_s = 0,
        # so g_v = -c g. The SAM step itself leaves such a parameter alone, as SAM does.
        with_now = set(map(id, params))
        only_first = [p for group in ctx.param_groups for p in group["params"] if id(p) in first and id(p) not in with_now]
        parallel = _coefficient(kept, [perturbed[i] for i in both], norm, [params[i] for i in both])
        # g_v = g_s - c g, in the first gradient's memory (no first gradient: g_v = g_s).
        count = len(kept)
        _scale_and_add_(kept, [-parallel] * count, range(count), [perturbed[i] for i in both], [1.0] * count, ctx.foreach)
        directions = {id(params[i]): first[id(params[i])] for i in both}
        # cast: _first_and_perturbed returns the parameters that have a gradient now
        values = [directions[id(p)] if id(p) in directions else cast(torch.Tensor, p.grad).clone() for p in params]
        values += _scaled([first[id(p)] for p in only_first], [-parallel] * len(only_first), ctx.foreach)
        params = params + only_first
        size = _norm(values, ctx.foreach)
        if not (math.isfinite(parallel) and math.isfinite(size)):
            return  # non-finite gradients at w + e: the step is skipped, the state kept
        if size > 0:
            _divide_in_range_([as_real(v) for v in values], size, ctx.foreach)
        params_now = set(map(id, params))
        for group in ctx.param_groups:
            for param in group["params"]:
                if id(param) not in params_now and param in ctx.state and "g_v" in ctx.state[param]:
                    del ctx.state[param]["g_v"]
        for param, value in zip(params, values):
            ctx.state[param]["g_v"] = value
        self._count(ctx)

    @torch.no_grad()
    def init_state(self, ctx: TransformContext) -> None:
        for group in ctx.param_groups:
            for param in group["params"]:
                if param.grad is not None and "g_v" not in ctx.state[param]:
                    ctx.state[param]["g_v"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        slot = ctx.slot_state(keys=("step",))
        if slot is not None:
            slot.setdefault("step", 0)

    def check_loaded_state(self, ctx: TransformContext) -> None:
        """Raise ``ValueError`` unless every stored direction fits its parameter and the step
        counter is an integer >= 0."""
        self._check_loaded_tensors(ctx, "g_v")
        slot = ctx.slot_state(keys=("step",))
        if slot is not None and "step" in slot:  # a None there too: the step counts on from it
            step = slot["step"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"the checkpoint's LookSAM slot {ctx.slot!r} holds step={step!r}, not an integer >= 0")


# -- ESAM's stochastic weight perturbation ---------------------------------------------------------------
class ESAM(_FinishingTransform):
    r"""Stochastic weight perturbation of ESAM (Du et al., "Efficient Sharpness-aware Minimization
    for Improved Training of Neural Networks", ICLR 2022).

    SAM's perturbation on a random subset of the weights: every element is kept with probability
    :math:`\beta` (a Bernoulli mask :math:`m`, drawn afresh each step) and the perturbation is
    scaled by :math:`1/\beta`, so that it equals SAM's in expectation:

    .. math::

        e = \frac{\rho}{\beta}\, \frac{m \odot g}{\lVert g \rVert_2}, \qquad
        m_i \sim \mathrm{Bernoulli}(\beta).

    The mask is element-wise, as the paper defines it (the authors' code draws one bit per
    parameter tensor, to skip whole gradients in its first backward pass, which a closure here
    computes anyway, and takes the norm over the kept tensors only, so that its
    :math:`\lVert e \rVert_2 = \rho / \beta`; here the norm is the whole gradient's, as in the
    formula above). ESAM's other half, sharpness-sensitive data selection, changes the batch
    of the second pass and belongs in the closure. ``rho`` and ``beta`` are per-group keys
    (``beta=1`` is SAM, without drawing).

    Random numbers: one draw per element, tensor by tensor in param-group order. With ``seed``,
    they come from generators of this transform (one per device), whose states are kept in the
    slot (``"rng_state"``, on the first parameter of each device) and checkpointed, so a resumed
    run draws the same masks. ``seed=None`` uses PyTorch's default generator.

    Args:
        rho: Default radius :math:`\rho \ge 0` (per-group key ``"rho"``).
        beta: Default probability :math:`\beta \in (0, 1]` of perturbing a weight (key ``"beta"``).
        seed: Seed of the transform's generators, or ``None``.

    Raises:
        ValueError: If ``rho`` is negative or not finite, ``beta`` is outside ``(0, 1]``, or
            ``seed`` is outside :math:`[-2^{63}, 2^{64} - 1]` (what ``torch.Generator.manual_seed``
            takes).
        TypeError: If ``rho`` or ``beta`` is not a real number (a bool included), or ``seed``
            is not an integer.
    """

    # Its random selection would come from per-rank generators whose states a distributed
    # checkpoint cannot hold apart; refused with sharded parameters until it draws per shard.
    supports_sharded_params = False
    writes_weights_before_step = False  # masks the direction, then SAM's move (_move_along)

    def __init__(self, rho: float = 0.05, beta: float = 0.5, *, seed: int | None = None) -> None:
        self.rho = check_real("rho", rho, low=0.0)
        self.beta = check_real("beta", beta, low=0.0, high=1.0, low_open=True)
        self.seed = check_seed("seed", seed)

    def group_defaults(self) -> dict[str, Any]:
        return {"rho": self.rho, "beta": self.beta}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("rho", group["rho"], low=0.0)
        check_real("beta", group["beta"], low=0.0, high=1.0, low_open=True)

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def _generators(self, ctx: TransformContext) -> _GeneratorCache | None:
        return None if self.seed is None else _GeneratorCache(ctx, self.seed)

    def perturb(self, ctx: TransformContext) -> Perturbation | None:
        gathered = self._gather(ctx)
        if not isinstance(gathered, tuple):
            return gathered
        params, grads, groups, norm = gathered
        generators = self._generators(ctx)
        moving = [i for i, group in enumerate(groups) if group["rho"] > 0]
        directions = [as_real(grads[i]) for i in moving]  # consumed by the move
        masked = [k for k, i in enumerate(moving) if groups[i]["beta"] < 1.0]
        masks = []
        for k in masked:  # one draw per element, tensor by tensor
            generator = None if generators is None else generators.get(directions[k].device)
            mask = torch.empty_like(directions[k], memory_format=torch.preserve_format)
            masks.append(mask.bernoulli_(float(groups[moving[k]]["beta"]), generator=generator))
        mul_([directions[k] for k in masked], masks, foreach=ctx.foreach)
        del masks
        scales, divisors = [], []
        for i in moving:  # rho / (beta |g|); rho / beta over |g| where beta |g| is not a normal number
            beta = float(groups[i]["beta"])
            divisor = beta * norm
            normal = divisor >= sys.float_info.min
            scales.append(self._radius(groups[i]) / (1.0 if normal else beta))
            divisors.append(divisor if normal else norm)
        moves = self._move_along([params[i] for i in moving], directions, scales, ctx.foreach, divisors).moves

        def commit(checked: bool) -> None:  # the generators advance only with a step taken
            if generators is not None and (checked or _current_grads_finite(ctx)):
                generators.save()

        return _Step(moves, commit)

    @torch.no_grad()
    def init_state(self, ctx: TransformContext) -> None:
        generators = self._generators(ctx)
        if generators is not None:
            for group in ctx.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        generators.get(param.device)
            generators.save()

    def check_loaded_state(self, ctx: TransformContext) -> None:
        """Raise ``ValueError`` unless every generator state in the slot is valid (cast back to bytes)."""
        for group in ctx.param_groups:
            for param in group["params"]:
                if param not in ctx.state or "rng_state" not in ctx.state[param]:
                    continue
                entry = ctx.state[param]
                try:
                    restored = _as_generator_state(entry["rng_state"])
                    torch.Generator(device=param.device).set_state(restored)
                except (RuntimeError, TypeError, ValueError, AttributeError) as error:
                    raise ValueError(
                        f"the checkpoint's ESAM slot {ctx.slot!r} holds an invalid generator state "
                        f"for device {param.device}: {error}"
                    ) from None
                entry["rng_state"] = restored
