r"""Parameter constraints after the step: clamping and projection onto a ball around a centre.

Both run after the inner optimizer's step (like rai-toolbox's ``_post_step_transform_``) on every
parameter that has a gradient — a parameter without one was not moved by the inner step either,
so it is left alone — and read their hyperparameters from the param groups.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from samgria._checks import check_choice, check_real
from samgria.functional._views import as_real, widened_dtype
from samgria.functional.norms import _RECOMPUTE_BELOW
from samgria.transforms.base import Transform, TransformContext
from samgria.transforms.grad import _clamp_
from samgria.transforms.param_ndim import batched, check_param_ndim, ndim_entries

__all__ = ["ClampParams", "ProjectParams"]


class ClampParams(Transform):
    r"""Clamp every parameter element to ``[param_min, param_max]`` after the step.

    :math:`w \leftarrow \min(\max(w, a), b)` elementwise (so every ``param_ndim`` would give the
    same result, and the transform takes none). A bound may be infinite for a one-sided
    constraint: ``ClampParams(0.0, math.inf)`` keeps the weights non-negative; a bound beyond the
    range of a parameter's dtype (``1e5`` for float16) is taken as the value it rounds to there
    (``inf``). Complex parameters count as pairs of reals (each part is clamped).

    Args:
        param_min: Lower bound :math:`a` (per-group key ``"param_min"``), a real number
            ``< inf``.
        param_max: Upper bound :math:`b` (per-group key ``"param_max"``), a real number
            ``>= param_min`` and ``> -inf``.

    Raises:
        TypeError: If a bound is not a real number (a bool included).
        ValueError: If a bound is NaN, ``param_min`` is ``inf``, ``param_max`` is ``-inf`` or
            ``param_max < param_min``.
    """

    def __init__(self, param_min: float = -1.0, param_max: float = 1.0) -> None:
        self.validate_group({"param_min": param_min, "param_max": param_max})
        self.param_min, self.param_max = float(param_min), float(param_max)

    def group_defaults(self) -> dict[str, Any]:
        return {"param_min": self.param_min, "param_max": self.param_max}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        low = check_real("param_min", group["param_min"], high=math.inf, high_open=True, allow_inf=True)
        check_real("param_max", group["param_max"], low=-math.inf, low_open=True, allow_inf=True)
        check_real("param_max", group["param_max"], low=low, low_name="param_min", allow_inf=True)

    def post_update(self, ctx: TransformContext) -> None:
        for group in ctx.param_groups:
            params = [as_real(p) for p in group["params"] if p.grad is not None]
            if not params:
                continue
            _clamp_(params, float(group["param_min"]), float(group["param_max"]), ctx.foreach)


class ProjectParams(Transform):
    r"""Project parameters onto an :math:`L_2` or :math:`L_\infty` ball around a centre after the step.

    With centre :math:`c` (zero, or the weights before the first step) and radius :math:`r`, each
    sub-tensor :math:`w` (chosen by ``param_ndim``, see :mod:`samgria.transforms.param_ndim`)
    becomes its nearest point of the ball:

    .. math::

        p = 2:\quad w \leftarrow c + (w - c)\,\min\!\Big(1, \frac{r}{\lVert w - c \rVert_2}\Big),
        \qquad
        p = \infty:\quad w \leftarrow \min(\max(w, c - r), c + r).

    A sub-tensor already inside the ball is left bit for bit as it is. The default
    ``param_ndim=-1`` bounds the norm of each row of a ``Linear`` weight (each output filter of a
    convolution): the max-norm constraint on every unit's incoming weights, or on every example
    of a batch of adversarial perturbations (rai-toolbox's ``L2ProjectedOptim``); ``None`` bounds
    each whole parameter. The :math:`L_\infty` projection is elementwise, so its result does not
    depend on ``param_ndim``. Complex parameters count as pairs of reals. 16-bit parameters are
    projected in float32 (norms included) and rounded once. Where a float32 :math:`L_2` norm
    cannot be right -- infinite (squares beyond float32's range: finite weights near ``1e19``
    or beyond), or below ``1e-15`` (squares in float32's subnormal range) with a radius below
    ``1e-14`` -- or the factor :math:`r / \lVert w - c \rVert_2` is below float32's smallest
    normal number (a radius below ``1e-19`` or so, far from the weights), that sub-tensor is
    projected in float64 and rounded once, so finite weights always land on the nearest point of
    the ball (not on MPS, which has no float64); looking for such sub-tensors costs one host read
    per device and step. float64 parameters are projected in
    float64 alone (their squares overflow from about ``1e154``).

    Args:
        radius: :math:`r` (per-group key ``"radius"``), a finite number ``>= 0``.
        p: The ball's norm (per-group key ``"p"``): ``2`` or ``math.inf``.
        center: ``"zero"`` (default) or ``"initial"``: the weights as they are before the first
            step that updates them, stored per parameter in the transform's slot
            (``state[w]["project_params.center"]``, so checkpoints carry it) — a trust region
            around pretrained weights when fine-tuning. A parameter whose first gradient comes
            from the re-evaluation of a transform placed after this one (SAM's second pass, when
            the first pass did not use it) is centred where that first step left it; place
            ``ProjectParams`` after SAM to centre it before. A parameter converted since its
            centre was recorded (``model.half()``, ``.to(device)``) has the centre converted to
            its dtype on its device at its next step, as a checkpoint reloaded into a fresh
            optimizer has it.
        param_ndim: Dimension of the sub-tensors projected independently (per-group key
            ``"param_ndim"``), default ``-1``.

    Raises:
        ValueError: If ``radius`` is negative or not finite, ``p`` is a number other than ``2``
            and ``inf``, or ``center`` a string other than ``"zero"`` and ``"initial"``; at the
            step, if a group's ``param_ndim`` is outside :math:`[-n, n]` for one of its
            parameters; at ``load_state_dict``, if a checkpoint's centre is not a tensor of its
            parameter's shape (complex exactly when the parameter is), with nothing loaded.
        TypeError: If ``radius`` or ``p`` is not a real number (a string, a tensor, a ``bool``),
            ``center`` not a string, or ``param_ndim`` neither an integer nor ``None``.
    """

    supports_sharded_params = False  # per-tensor norms and ranks of a shard alone

    def __init__(self, radius: float = 1.0, p: float = 2.0, center: str = "zero", param_ndim: int | None = -1) -> None:
        self.radius = check_real("radius", radius, low=0.0)
        self.p = float(check_choice("p", p, (2, math.inf)))
        self.center = check_choice("center", center, ("zero", "initial"))
        self.param_ndim = check_param_ndim("param_ndim", param_ndim)
        #: The centre is recorded before the inner step, by assigning new tensors.
        self.saves_state_before_step = center == "initial"

    def group_defaults(self) -> dict[str, Any]:
        return {"radius": self.radius, "p": self.p, "param_ndim": self.param_ndim}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("radius", group["radius"], low=0.0)
        check_choice("p", group["p"], (2, math.inf))
        check_param_ndim("param_ndim", group["param_ndim"], group.get("params", ()))

    def settings(self) -> dict[str, Any]:
        return {"center": self.center}

    def _record_centers(self, ctx: TransformContext) -> None:
        if self.center != "initial":
            return
        for group in ctx.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    state = ctx.state[param]
                    if "center" not in state:
                        state["center"] = param.detach().clone(memory_format=torch.contiguous_format)
                    else:
                        _follow_conversion(state, param)

    def init_state(self, ctx: TransformContext) -> None:
        self._record_centers(ctx)

    def scales_with_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        return True  # its pre_update leaves the gradients alone

    def pre_update(self, ctx: TransformContext) -> None:
        ndim_entries(ctx)  # refuse a param_ndim that does not fit before the inner step
        self._record_centers(ctx)

    def check_loaded_state(self, ctx: TransformContext) -> None:
        """Raise ``ValueError`` unless every centre of the checkpoint fits its parameter."""
        self._check_loaded_tensors(ctx, "center")

    def post_update(self, ctx: TransformContext) -> None:
        retakes: list[_Retake] = []
        entries = ndim_entries(ctx)
        if self.center == "initial":
            unrecorded = [param for _, param, _ in entries if "center" not in ctx.state[param]]
            if unrecorded and ctx.standalone:
                raise RuntimeError(
                    f"{self!r} projects around the weights recorded by apply(), which was not called "
                    "for every parameter with a gradient: call apply() before post_step() (nothing was changed)"
                )
            for param in unrecorded:
                # Its first gradient came from a later transform's re-evaluation (SAM's second
                # pass), after pre_update: centred where this step left it (documented).
                ctx.state[param]["center"] = param.detach().clone(memory_format=torch.contiguous_format)
        for group, param, param_ndim in entries:
            if param.numel() == 0:
                continue
            radius = float(group["radius"])  # any real number validate_group accepts (Fraction, NumPy)
            center = _follow_conversion(ctx.state[param], param) if self.center == "initial" else None
            if group["p"] == math.inf:
                weights = as_real(param)
                if center is None:
                    _clamp_([weights], -radius, radius, foreach=False)
                else:
                    wide = widened_dtype(weights.dtype)
                    around = as_real(center).to(wide)
                    weights.copy_(torch.minimum(torch.maximum(weights.to(wide), around - radius), around + radius))
                continue
            with batched(param, param_ndim) as view:
                weights = as_real(view)
                wide = widened_dtype(weights.dtype)  # 16-bit: norm and projection in float32
                middle: torch.Tensor | None = None if center is None else as_real(center.reshape(view.shape)).to(wide)
                offset = weights.to(wide) if middle is None else weights.to(wide) - middle
                norm = torch.linalg.vector_norm(offset, dim=tuple(range(1, weights.ndim)), keepdim=True)
                outside = norm > radius
                inexact = _float32_norm_inexact(norm, float(radius))
                if inexact is not None:  # those rows are projected in float64 below, from as they are
                    outside &= ~inexact
                    retakes.append(_Retake(param, param_ndim, float(radius), center, inexact))
                projected = offset * (radius / norm)
                if middle is not None:
                    projected.add_(middle)
                weights.copy_(torch.where(outside, projected, weights))
        _project_in_float64(retakes)


def _follow_conversion(state: Any, param: torch.Tensor) -> torch.Tensor:
    """``param``'s centre, in its dtype on its device: one recorded before the parameter was
    converted (``model.half()``, ``.to(device)``) is replaced by a converted copy (a new tensor,
    so that a failed step's restore puts the old one back), as ``load_state_dict`` casts a
    checkpoint's."""
    center = state["center"]
    if center.dtype != param.dtype or center.device != param.device:
        center = state["center"] = center.to(device=param.device, dtype=param.dtype)
    return center


#: A radius from which a sub-tensor whose float32 L2 norm is below ``_RECOMPUTE_BELOW`` lies inside
#: the ball whatever float32 lost to subnormal squares (at most about n * 7e-46 on the squared norm,
#: under 1e-28 - 1e-30 for up to 1e17 elements): no retake is needed for it.
_SMALL_RADIUS = 1e-14


class _Retake(NamedTuple):
    """A parameter whose rows ``inexact`` (a ``(N, 1, ...)`` mask of its batched view) are projected in float64."""

    param: torch.Tensor
    param_ndim: int | None
    radius: float
    center: torch.Tensor | None
    inexact: torch.Tensor


def _float32_norm_inexact(norm: torch.Tensor, radius: float) -> torch.Tensor | None:
    """Where a float32 L2 norm may decide or compute the projection wrongly: infinite (squares that
    overflowed); when the radius is below :data:`_SMALL_RADIUS`, below ``1e-15`` (squares that fell
    into the subnormal range, perhaps to 0) or so far above the radius that the factor
    ``radius / norm`` falls below float32's smallest normal number (where it keeps few digits, or
    none); ``None`` for norms that are not float32 or are on MPS (no float64 there)."""
    if norm.dtype != torch.float32 or norm.device.type == "mps":
        return None
    inexact = norm.isinf()
    if radius < _SMALL_RADIUS:
        inexact |= norm < _RECOMPUTE_BELOW
        if radius > 0.0:  # a zero radius scales by exactly 0
            inexact |= norm > radius / torch.finfo(torch.float32).tiny
    return inexact


@torch.no_grad()
def _project_in_float64(retakes: list[_Retake]) -> None:
    """Project the flagged rows of every retake in float64, from their weights as they are (the float32
    pass left them alone), rounded once. Finding that no row is flagged costs one host read per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for retake in retakes:
        by_device.setdefault(retake.inexact.device, []).append(retake.inexact.any())
    if not any(bool(torch.stack(flags).any()) for flags in by_device.values()):  # the common case
        return
    for retake in retakes:
        where = retake.inexact.reshape(-1)
        if not bool(where.any()):
            continue
        with batched(retake.param, retake.param_ndim) as view:
            weights = as_real(view)
            rows = weights[where].to(torch.float64)
            offset = rows
            if retake.center is not None:
                middle = as_real(retake.center.reshape(view.shape))[where].to(torch.float64)
                offset = rows - middle
            # float32 (and 16-bit) values square well within float64's range
            norm = torch.linalg.vector_norm(offset, dim=tuple(range(1, rows.ndim)), keepdim=True)
            projected = offset * (retake.radius / norm)
            if retake.center is not None:
                projected.add_(middle)
            weights[where] = torch.where(norm > retake.radius, projected, rows).to(weights.dtype)
