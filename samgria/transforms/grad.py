r"""Small gradient transforms: clipping, sign, normalisation, sparsification, affine scaling, clamping.

Each runs before the inner step, rewrites ``p.grad`` in place (parameters whose grad is
``None`` are skipped; complex gradients are treated as pairs of reals) and reads its hyperparameters from the param groups, so they can differ
per group and be scheduled. Placed after :class:`~samgria.SAM` in a chain they act on the
gradient at :math:`w + e`; placed before, on the gradient SAM perturbs with.

:class:`NormalizeGrad` and :class:`SparsifyGrad` act on sub-tensors chosen by ``param_ndim``
(see :mod:`samgria.transforms.param_ndim`; default ``None``: each parameter's whole gradient).
:class:`GradSign`, :class:`ScaleGrad` and :class:`ClampGrad` are elementwise, so every
``param_ndim`` gives them the same result: they take none, which leaves the short group key
``"param_ndim"`` to the one transform of a chain whose result depends on it.
:class:`ClipGradNorm` clips each group's global norm, as :func:`torch.nn.utils.clip_grad_norm_`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch

from samgria._checks import check_real
from samgria.functional import global_norm
from samgria.functional._views import LOW_PRECISION, as_real, widened_dtype
from samgria.functional._grouping import group_indices_by_device_and_dtype
from samgria.functional.norms import _FLOAT64_RECOMPUTE_BELOW, _RECOMPUTE_BELOW, scale_
from samgria.transforms.base import Transform, TransformContext
from samgria.transforms.param_ndim import batched, check_param_ndim, ndim_entries, refuse_sparse_gradients

__all__ = ["ClipGradNorm", "GradSign", "NormalizeGrad", "SparsifyGrad", "ScaleGrad", "ClampGrad"]


def _with_gradients(param_groups: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The groups with a parameter that has a gradient."""
    return [group for group in param_groups if any(p.grad is not None for p in group["params"])]


def _grads_by_group(
    ctx: TransformContext, transform: Transform
) -> list[tuple[Mapping[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
    """Per group with gradients: the group, the gradients as the kernels see them (local shards,
    complex as pairs of reals) and the gradients themselves (whose sharding a norm follows).

    Raises:
        RuntimeError: If a gradient is sparse (naming ``transform``), before anything changes.
    """
    refuse_sparse_gradients(transform, (p for group in ctx.param_groups for p in group["params"]))
    result: list[tuple[Mapping[str, Any], list[torch.Tensor], list[torch.Tensor]]] = []
    for group in ctx.param_groups:
        sources = [p.grad for p in group["params"] if p.grad is not None]
        # Complex gradients as pairs of reals, as torch.optim treats complex parameters.
        grads = [as_real(g) for g in sources]
        if grads:
            result.append((group, grads, sources))
    return result


def _foreach_or_loop(grads: list[torch.Tensor], foreach: bool, fast, slow) -> None:
    if foreach:
        for indices in group_indices_by_device_and_dtype(grads).values():
            fast([grads[i] for i in indices])
    else:
        for grad in grads:
            slow(grad)


def _div_(tensor: torch.Tensor, divisor: torch.Tensor) -> None:
    """In place: ``tensor / divisor`` (a norm in :func:`widened_dtype`); a 16-bit tensor is divided
    in the divisor's float32 and rounded once, so a norm beyond its range still divides."""
    if tensor.dtype in LOW_PRECISION:
        tensor.copy_(tensor.to(divisor.dtype).div_(divisor))
    else:
        tensor.div_(divisor)


def _clamp_bound(value: float, dtype: torch.dtype) -> float:
    """A clamp bound as tensors of ``dtype`` take it: the value itself, or the value it rounds to in
    ``dtype`` when it lies beyond the dtype's largest finite value (torch refuses such a scalar).

    Clamping to a bound rounded to the nearest value of the dtype gives the exact clamp rounded
    once: a bound above 65504 never changes a finite float16 value and turns ``inf`` into the
    bound's rounding (``inf`` from 65520 up).
    """
    if not dtype.is_floating_point or math.isinf(value) or abs(value) <= torch.finfo(dtype).max:
        return value
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


def _clamp_(tensors: list[torch.Tensor], low: float, high: float, foreach: bool) -> None:
    """In place: every element of every (real) tensor clamped to ``[low, high]`` (see :func:`_clamp_bound`)."""
    if foreach:
        for (_device, dtype), indices in group_indices_by_device_and_dtype(tensors).items():
            chunk = [tensors[i] for i in indices]
            torch._foreach_clamp_min_(chunk, _clamp_bound(low, dtype))
            torch._foreach_clamp_max_(chunk, _clamp_bound(high, dtype))
    else:
        for tensor in tensors:
            tensor.clamp_(_clamp_bound(low, tensor.dtype), _clamp_bound(high, tensor.dtype))


class ClipGradNorm(Transform):
    r"""Clip the gradients of each group to a global L2 norm of at most ``max_grad_norm``.

    :math:`g \leftarrow g \cdot \min(1, c / (\lVert g \rVert_2 + 10^{-6}))` with one norm per group (as
    :func:`torch.nn.utils.clip_grad_norm_` on that group's parameters). A factor below the smallest
    normal number of the dtype the gradients are multiplied in (float32 for float32 and 16-bit
    gradients: norms beyond about :math:`8.5 \cdot 10^{37}\,c`; float64 for float64 ones), which
    would keep few digits or none, is applied in float64 as a power of two and a normal factor,
    rounded once (not on MPS, which has no float64).

    Args:
        max_grad_norm: Default :math:`c > 0` (per-group key ``"max_grad_norm"``), finite.

    Raises:
        TypeError: If ``max_grad_norm`` is not a real number (a bool included).
        ValueError: If ``max_grad_norm`` is not positive and finite.
    """

    def __init__(self, max_grad_norm: float = 1.0) -> None:
        self.max_grad_norm = check_real("max_grad_norm", max_grad_norm, low=0.0, low_open=True)

    def group_defaults(self) -> dict[str, Any]:
        return {"max_grad_norm": self.max_grad_norm}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("max_grad_norm", group["max_grad_norm"], low=0.0, low_open=True)

    def keeps_direction_of_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        # One group with gradients: one factor; several: one each, whose ratios s changes.
        return len(_with_gradients(param_groups)) <= 1

    def pre_update(self, ctx: TransformContext) -> None:
        for group, grads, sources in _grads_by_group(ctx, self):
            norm = float(global_norm(grads, foreach=ctx.foreach, like=sources))
            max_norm = float(group["max_grad_norm"])
            factor = max_norm / (norm + 1e-6)
            if not factor < 1.0:
                continue
            if factor >= _FLOAT32_TINY:  # the common case: a normal factor in every dtype
                scale_(grads, [factor] * len(grads), foreach=ctx.foreach)
                continue
            subnormal = [_subnormal_factor(grad, factor, norm) for grad in grads]
            normal = [grad for grad, tiny in zip(grads, subnormal) if not tiny]
            scale_(normal, [factor] * len(normal), foreach=ctx.foreach)
            for grad, tiny in zip(grads, subnormal):
                if tiny:
                    _scale_by_tiny_factor_(grad, max_norm, norm)


#: float32's smallest normal number (float64's is smaller).
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _subnormal_factor(grad: torch.Tensor, factor: float, norm: float) -> bool:
    """Whether :class:`ClipGradNorm` scales ``grad`` by ``factor`` outside its kernel's normal range:
    below the smallest normal number of the dtype it multiplies in (float64 for float64 gradients,
    float32 for float32 and 16-bit ones), where the factor keeps few digits or none. A norm that
    overflowed (``inf``) scales by 0, as :func:`torch.nn.utils.clip_grad_norm_`; on MPS (no float64)
    the kernel's factor is used as it is."""
    if math.isinf(norm) or grad.device.type == "mps":
        return False
    return factor < torch.finfo(torch.float64 if grad.dtype == torch.float64 else torch.float32).tiny


def _scale_by_tiny_factor_(grad: torch.Tensor, max_norm: float, norm: float) -> None:
    r"""In place: ``grad`` times :math:`c / (\lVert g \rVert + 10^{-6})` for a factor below the
    smallest normal number (:func:`_subnormal_factor`), in float64 and rounded once: with
    :math:`\lVert g \rVert + 10^{-6} = m\,2^e` (:math:`m \in [0.5, 1)`), first by the power of two
    :math:`2^{-e}` (exact, but for products in the subnormal range) and then by :math:`c / m`
    (a normal number for a normal :math:`c`)."""
    mantissa, exponent = math.frexp(norm + 1e-6)
    wide = grad if grad.dtype == torch.float64 else grad.to(torch.float64)
    wide.mul_(math.ldexp(1.0, -exponent)).mul_(max_norm / mantissa)
    if wide is not grad:
        grad.copy_(wide)


class GradSign(Transform):
    r"""Replace every gradient by its sign: :math:`g \leftarrow \operatorname{sign}(g)` (signSGD)."""

    def keeps_direction_of_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        return True  # sign(s g) = sign(g)

    def pre_update(self, ctx: TransformContext) -> None:
        for _, grads, _ in _grads_by_group(ctx, self):
            _foreach_or_loop(grads, ctx.foreach, torch._foreach_sign_, lambda g: g.sign_())


class NormalizeGrad(Transform):
    r"""Normalise gradients by their :math:`L_p` norm: :math:`g \leftarrow g / (\lVert g \rVert_p + \epsilon)`.

    By default each parameter's whole gradient gets unit L2 norm (``p=2``, ``param_ndim=None``).
    With ``param_ndim`` (see :mod:`samgria.transforms.param_ndim`) the norm is taken over each
    sub-tensor instead: ``-1`` normalises every row of a ``Linear`` weight's gradient (every
    output filter of a convolution's), ``0`` every element (:math:`g / (|g| + \epsilon)`, the
    sign for ``eps=0``). :math:`\lVert g \rVert_p = (\sum_i |g_i|^p)^{1/p}` for ``p > 0``
    (a quasi-norm below 1) and :math:`\max_i |g_i|` for ``p=inf``; complex gradients count as
    pairs of reals. A zero gradient (sub-tensor) stays zero, also with ``eps=0``.

    Norms of 16-bit gradients are taken in float32 and the quotient rounded once. A float32 norm
    that overflowed, or is small enough that the powers :math:`|g_i|^p` may have underflowed
    (below ``1e-15`` for ``p=2``), is taken again in float64 with its quotient, for that gradient
    (sub-tensor) alone, divided first by its largest magnitude :math:`m` so that no power leaves
    float64's range either: :math:`(g / m) / (\lVert g / m \rVert_p + \epsilon / m)`, rounded
    once. A float64 norm that overflowed, or is below ``1e-140`` for ``p=2`` (its powers may have
    underflowed), is taken again the same way in float64. So elements near ``1e19`` (``1e150``
    in float64) still give unit norm, for every ``p`` (``p=20`` included), and so do elements near
    ``1e-25`` (``1e-310``, subnormal, in float64) with ``eps=0`` (or an ``eps`` far below their
    norm; the default ``1e-12`` dominates it). A gradient (sub-tensor) with an infinite or NaN
    element is divided by its norm as it is. Both ``transform_foreach`` paths give the same bits.

    Args:
        eps: Added to the norm (per-group key ``"eps"``, or ``"normalize_grad.eps"`` beside
            another ``eps`` such as Adam's), a finite number ``>= 0``.
        p: The norm's order (per-group key ``"p"``): a real number ``> 0``, ``math.inf``
            included (``1``: L1, ``2``: L2, ``inf``: L∞).
        param_ndim: Dimension of the sub-tensors normalised independently (per-group key
            ``"param_ndim"``); ``None`` (the default) for the whole gradient of each parameter.

    Raises:
        ValueError: If ``eps`` is negative or not finite, or ``p`` is not ``> 0``; wherever a
            group is checked (before any transform of a step runs), if its ``param_ndim`` is
            outside :math:`[-n, n]` for one of its parameters.
        TypeError: If ``eps`` or ``p`` is not a real number (a bool included), or ``param_ndim``
            is neither an integer nor ``None``.
    """

    supports_sharded_params = False  # per-tensor norms and ranks of a shard alone

    def __init__(self, eps: float = 1e-12, p: float = 2.0, param_ndim: int | None = None) -> None:
        self.eps = check_real("eps", eps, low=0.0)
        self.p = check_real("p", p, low=0.0, low_open=True, allow_inf=True)
        self.param_ndim = check_param_ndim("param_ndim", param_ndim)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle. Release 0.1.0's NormalizeGrad had only ``eps`` (its first step here raised
        ``AttributeError``): ``p`` and ``param_ndim`` then take the defaults it computed with, the
        L2 norm of each whole gradient."""
        self.__dict__.update({"p": 2.0, "param_ndim": None, **state})

    def group_defaults(self) -> dict[str, Any]:
        return {"eps": self.eps, "p": self.p, "param_ndim": self.param_ndim}

    def keeps_direction_of_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        # s g / (s ||g|| + eps) = g / (||g|| + eps / s): the same for every s only with eps=0
        # (with eps > 0, the (sub-)tensors whose norm is near eps change their share).
        return all(float(group["eps"]) == 0.0 for group in _with_gradients(param_groups))

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("eps", group["eps"], low=0.0)
        check_real("p", group["p"], low=0.0, low_open=True, allow_inf=True)
        check_param_ndim("param_ndim", group["param_ndim"], group.get("params", ()))

    def pre_update(self, ctx: TransformContext) -> None:
        entries = ndim_entries(ctx)  # checks every group's param_ndim before any change
        whole_l2 = {id(g) for g in ctx.param_groups if g["param_ndim"] is None and float(g["p"]) == 2.0}
        with contextlib.ExitStack() as views:  # copies of non-viewable layouts go back on exit
            quotients: list[_Quotients] = []
            # The whole gradient's L2 norm (the default): torch._foreach_norm on the fast path.
            for group, grads, _ in _grads_by_group(ctx, self):
                if id(group) not in whole_l2:
                    continue
                eps = float(group["eps"])
                if ctx.foreach:
                    for indices in group_indices_by_device_and_dtype(grads).values():
                        chunk = [grads[i] for i in indices]
                        norms = list(torch._foreach_norm(chunk, 2, dtype=widened_dtype(chunk[0].dtype)))
                        quotients.append(_Quotients(chunk, norms, 2.0, eps, fused=True))
                else:
                    for grad in grads:
                        norm = torch.linalg.vector_norm(grad, dtype=widened_dtype(grad.dtype))
                        quotients.append(_Quotients([grad], [norm], 2.0, eps))
            # Any other norm or param_ndim: one tensor at a time, on both paths.
            # cast: ndim_entries holds parameters with a gradient
            for group, param, param_ndim in entries:
                if id(group) in whole_l2 or cast(torch.Tensor, param.grad).numel() == 0:
                    continue
                grad = as_real(views.enter_context(batched(cast(torch.Tensor, param.grad), param_ndim)))
                p = float(group["p"])
                dims = tuple(range(1, grad.ndim))
                norm = torch.linalg.vector_norm(grad, ord=p, dim=dims, keepdim=True, dtype=widened_dtype(grad.dtype))
                quotients.append(_Quotients([grad], [norm], p, float(group["eps"])))
            _normalize_(quotients)


class _Quotients(NamedTuple):
    """Gradients (each seen as ``(N, *sub)`` with ``(N, 1, ...)`` norms, or whole with 0-dim norms)
    that :func:`_normalize_` divides by ``norms + eps``; ``fused``: with one ``torch._foreach_*``
    call each (one device and dtype)."""

    grads: list[torch.Tensor]
    norms: list[torch.Tensor]
    p: float
    eps: float
    fused: bool = False


def _recompute_below(p: float, dtype: torch.dtype) -> float:
    r"""The float32 or float64 (``dtype``) :math:`L_p` norm below which :class:`NormalizeGrad` takes
    it again, in float64 and scaled (:func:`_scaled_quotients`).

    As :func:`~samgria.functional.global_norm` for L2 norms (below ``1e-15`` in float32, ``1e-140``
    in float64): under ``1e-30`` (``1e-280``) for the sum :math:`\lVert g \rVert_p^p`, the terms
    :math:`|g_i|^p` that fell into the subnormal range (or to 0) may have lost more than the
    dtype's precision; a norm under ``1e-30`` (``1e-280``) is itself near that range. The
    :math:`L_\infty` norm (a maximum) is exact, but one below the dtype's smallest normal number
    is subnormal, which the divisor's clamp to the smallest normal number (:func:`_normalize_`)
    would raise.
    """
    if math.isinf(p):
        return torch.finfo(dtype).tiny
    floor = (_RECOMPUTE_BELOW if dtype == torch.float32 else _FLOAT64_RECOMPUTE_BELOW) ** 2
    return max(floor ** (1.0 / p), floor)


def _inexact(norms: torch.Tensor, p: float) -> torch.Tensor:
    """Where float32 or float64 norms may be wrong: infinite (overflowed terms) or below :func:`_recompute_below`."""
    return (norms < _recompute_below(p, norms.dtype)) | norms.isinf()


def _normalize_(quotients: list[_Quotients]) -> None:
    """Divide every gradient (sub-tensor) by its norm plus ``eps``, at least the norm dtype's
    smallest normal number ``finfo.tiny``, so that a zero gradient stays zero with ``eps=0``
    (``0 / tiny``; a subnormal bound would read as 0 under ``torch.set_flush_denormal(True)``, and
    ``0 / 0`` is NaN); a nonzero norm below it is taken again scaled (:func:`_inexact` flags it),
    so the clamp never raises one. 16-bit gradients in float32, rounded once.

    float32 and float64 norms that overflowed or may have underflowed (see
    :func:`_recompute_below`) are taken again in float64, scaled, with their quotients, for those
    gradients (rows) alone (not on MPS, which has no float64); finding that none did costs one
    host read per device.
    """
    retaken = _float64_quotients(quotients)  # from the gradients as they are now
    for quotient in quotients:
        tiny = torch.finfo(quotient.norms[0].dtype).tiny
        if quotient.fused:
            torch._foreach_add_(quotient.norms, quotient.eps)
            torch._foreach_clamp_min_(quotient.norms, tiny)
            if quotient.norms[0].dtype == quotient.grads[0].dtype:
                torch._foreach_div_(quotient.grads, quotient.norms)
                continue
        else:
            for norm in quotient.norms:
                norm.add_(quotient.eps).clamp_min_(tiny)
        for grad, norm in zip(quotient.grads, quotient.norms):
            _div_(grad, norm)
    for rows, where, value in retaken:
        rows[where] = value


def _float64_quotients(quotients: list[_Quotients]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(rows, where, quotient)`` for the rows of the gradients (``(1, *shape)`` for a whole one)
    whose float32 or float64 norm :func:`_inexact` flags and that are finite and not all zero:
    ``rows[where]``'s quotient by its norm plus ``eps`` (:func:`_scaled_quotients`), computed in
    float64 and rounded once. Call before the gradients change."""
    candidates = [
        (grad, norm, quotient)
        for quotient in quotients
        for grad, norm in zip(quotient.grads, quotient.norms)
        if norm.dtype in (torch.float32, torch.float64) and norm.device.type != "mps"
    ]
    by_device_order_and_dtype: dict[tuple[torch.device, float, torch.dtype], list[torch.Tensor]] = {}
    for _grad, norm, quotient in candidates:
        by_device_order_and_dtype.setdefault((norm.device, quotient.p, norm.dtype), []).append(norm.reshape(-1))
    found: dict[torch.device, list[torch.Tensor]] = {}
    for (device, p, _dtype), norms in by_device_order_and_dtype.items():
        found.setdefault(device, []).append(_inexact(torch.cat(norms), p).any())
    if not any(bool(torch.stack(flags).any()) for flags in found.values()):  # the common case
        return []
    result = []
    for grad, norm, quotient in candidates:
        where = _inexact(norm, quotient.p).reshape(-1)
        if not bool(where.any()):
            continue
        rows = grad.unsqueeze(0) if norm.ndim == 0 else grad
        # An infinite or NaN element: the norm is infinite (or NaN) as it is, not overflowed.
        where &= rows.reshape(rows.shape[0], -1).isfinite().all(dim=1)
        wide = rows[where].to(torch.float64)
        if not bool(wide.any()):  # zero stays zero, in float32 too
            continue
        result.append((rows, where, _scaled_quotients(wide, quotient.p, quotient.eps).to(grad.dtype)))
    return result


def _scaled_quotients(rows: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    r""":math:`g / (\lVert g \rVert_p + \epsilon)` for finite float64 rows (``(N, ...)``) as
    :math:`(g / m) / (\lVert g / m \rVert_p + \epsilon / m)`, :math:`m` the row's largest magnitude
    (1 for a zero row, which stays zero).

    Every :math:`|g_i / m|^p` is then at most 1 and the largest exactly 1, so the sum lies in
    :math:`[1, n]` for every ``p``: no power overflows float64 (``p=20`` of elements near
    ``1e19``), those that underflow are negligible next to 1, and the quotients of subnormal
    elements (near ``1e-310``) keep float64's precision. Where :math:`\epsilon / m` overflows
    (:math:`\epsilon` beyond :math:`1.8 \cdot 10^{308}\,m` dominates the norm),
    :math:`g / (m \lVert g / m \rVert_p + \epsilon)`.
    """
    dims = tuple(range(1, rows.ndim))
    peak = rows.abs().amax(dim=dims, keepdim=True)
    peak = torch.where(peak > 0, peak, 1.0)
    unit = rows / peak
    norm = torch.linalg.vector_norm(unit, ord=p, dim=dims, keepdim=True)  # 0, or in [1, n^(1/p)]
    if eps == 0.0:
        return unit / norm.clamp_min_(torch.finfo(torch.float64).tiny)  # a zero row: 0 / tiny; others >= 1
    shift = torch.full_like(peak, eps).div_(peak)  # not eps / peak: torch takes that as eps * (1 / peak)
    return torch.where(shift.isinf(), rows / (peak * norm + eps), unit / (norm + shift))


def kept_count(q: float, size: int) -> int:
    r"""How many of ``size`` elements :class:`SparsifyGrad` keeps: :math:`\lceil q \cdot size \rceil`.

    Computed with a relative tolerance of ``1e-12``, so that ``q=0.1`` of 30 elements keeps 3
    (``0.1 * 30`` is ``3.0000000000000004`` in floating point).
    """
    return min(size, max(1, math.ceil(q * size * (1.0 - 1e-12))))


class SparsifyGrad(Transform):
    r"""Top-q sparsification: keep the largest-magnitude fraction ``q`` of each gradient, zero the rest.

    In each sub-tensor of :math:`m` elements (the whole gradient of a parameter by default, see
    ``param_ndim``), let :math:`\tau` be the :math:`k`-th largest magnitude,
    :math:`k = \lceil q\, m \rceil`; then :math:`g_i \leftarrow g_i\, \mathbb{1}[|g_i| \ge \tau]`.
    Elements tied with :math:`\tau` are all kept, so ties may keep more than :math:`k`; ``q=1``
    leaves the gradient untouched. Complex gradients count as pairs of reals (each real and
    imaginary part is an element).

    Followed by :class:`GradSign` and ``NormalizeGrad(p=1)`` with the same ``param_ndim``, this is
    the chain of rai-toolbox's ``L1qNormedGradientOptim`` (whose ``q`` is the fraction *dropped*:
    its ``q=0.9`` is ``SparsifyGrad(q=0.1)``; its random ``dq`` is not provided) except for the
    count kept: rai keeps exactly :math:`\operatorname{round}((1 - q_{rai})\, m)` elements (Python's
    ``round``, halves to even; none when that is 0; ties broken by ``torch.topk``), this
    :math:`\lceil q\, m \rceil` (at least one, every tie): 3 of 30 for both, but of 11 elements
    rai's ``q=0.9`` keeps 1 and ``SparsifyGrad(q=0.1)`` 2.

    Args:
        q: Fraction of the elements kept (per-group key ``"q"``), in :math:`(0, 1]`.
        param_ndim: Dimension of the sub-tensors sparsified independently (per-group key
            ``"param_ndim"``); ``None`` (the default) for each parameter's whole gradient.

    Raises:
        ValueError: If ``q`` is outside :math:`(0, 1]`; wherever a group is checked (before any
            transform of a step runs), if its ``param_ndim`` is outside :math:`[-n, n]` for one of
            its parameters.
        TypeError: If ``q`` is not a real number or ``param_ndim`` neither an integer nor ``None``.
    """

    supports_sharded_params = False  # per-tensor norms and ranks of a shard alone

    def __init__(self, q: float = 0.1, param_ndim: int | None = None) -> None:
        self.q = check_real("q", q, low=0.0, high=1.0, low_open=True)
        self.param_ndim = check_param_ndim("param_ndim", param_ndim)

    def scales_with_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        return True  # the kept elements are chosen by relative magnitude

    def group_defaults(self) -> dict[str, Any]:
        return {"q": self.q, "param_ndim": self.param_ndim}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("q", group["q"], low=0.0, high=1.0, low_open=True)
        check_param_ndim("param_ndim", group["param_ndim"], group.get("params", ()))

    def pre_update(self, ctx: TransformContext) -> None:
        entries = ndim_entries(ctx)
        refuse_sparse_gradients(self, (param for _, param, _ in entries))
        for group, param, param_ndim in entries:
            # cast: ndim_entries holds parameters with a gradient
            with batched(cast(torch.Tensor, param.grad), param_ndim) as view:
                grad = as_real(view)
                rows = grad.shape[0]
                size = grad.numel() // rows if rows else 0
                kept = kept_count(float(group["q"]), size) if size else 0
                if kept >= size:
                    continue
                magnitude = grad.abs()
                threshold = magnitude.reshape(rows, size).topk(kept, dim=1, sorted=False).values.amin(dim=1)
                grad.masked_fill_(magnitude < threshold.view(rows, *[1] * (grad.ndim - 1)), 0)


class ScaleGrad(Transform):
    r"""Affine map of every gradient: :math:`g \leftarrow s\,g + b` (per-group keys ``"grad_scale"``, ``"grad_bias"``).

    A 16-bit gradient is mapped in float32 and rounded once, on both paths (a scale or bias
    beyond 65504 is taken as it is, not rounded to float16 first).

    Args:
        scale: Default :math:`s` (per-group key ``"grad_scale"``), a finite number.
        bias: Default :math:`b` (per-group key ``"grad_bias"``), a finite number.

    Raises:
        TypeError: If ``scale`` or ``bias`` is not a real number (a bool included).
        ValueError: If ``scale`` or ``bias`` is not finite.
    """

    def __init__(self, scale: float = 1.0, bias: float = 0.0) -> None:
        self.scale = check_real("scale", scale)
        self.bias = check_real("bias", bias)

    def scales_with_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        return all(group["grad_bias"] == 0 for group in param_groups)

    def can_overflow_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        # s g + b overflows where |s| > 1 or b moves a large g further out (fp16: beyond 65504):
        # the optimizer checks the result, so that such a step is skipped rather than stepped
        # with inf. |s g| <= |g| for |s| <= 1, also rounded once from float32 to 16 bits.
        return any(abs(float(group["grad_scale"])) > 1 or float(group["grad_bias"]) != 0 for group in param_groups)

    def group_defaults(self) -> dict[str, Any]:
        return {"grad_scale": self.scale, "grad_bias": self.bias}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("grad_scale", group["grad_scale"])
        check_real("grad_bias", group["grad_bias"])

    def pre_update(self, ctx: TransformContext) -> None:
        for group, grads, _ in _grads_by_group(ctx, self):
            count = len(grads)
            scale_(grads, [float(group["grad_scale"])] * count, [float(group["grad_bias"])] * count, foreach=ctx.foreach)


class ClampGrad(Transform):
    r"""Clamp every gradient element to ``[grad_min, grad_max]`` (per-group keys of those names).

    A bound beyond the range of a gradient's dtype (``1e5`` for float16) is taken as the value it
    rounds to there (``inf``), which leaves every finite element on that side as it is.

    Raises:
        TypeError: If a bound is not a real number (a bool included).
        ValueError: If a bound is not finite or ``grad_min > grad_max``.
    """

    def __init__(self, grad_min: float = -1.0, grad_max: float = 1.0) -> None:
        self.validate_group({"grad_min": grad_min, "grad_max": grad_max})
        self.grad_min, self.grad_max = float(grad_min), float(grad_max)

    def group_defaults(self) -> dict[str, Any]:
        return {"grad_min": self.grad_min, "grad_max": self.grad_max}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        low = check_real("grad_min", group["grad_min"])
        check_real("grad_max", group["grad_max"], low=low, low_name="grad_min")

    def pre_update(self, ctx: TransformContext) -> None:
        for group, grads, _ in _grads_by_group(ctx, self):
            _clamp_(grads, float(group["grad_min"]), float(group["grad_max"]), ctx.foreach)
