r"""Small gradient transforms: clipping, sign, normalisation, affine scaling and clamping.

Each runs before the inner step, rewrites ``p.grad`` in place (parameters whose grad is
``None`` are skipped) and reads its hyperparameters from the param groups, so they can differ
per group and be scheduled. Placed after :class:`~samgria.SAM` in a chain they act on the
gradient at :math:`w + e`; placed before, on the gradient SAM perturbs with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from samgria.functional import global_norm
from samgria.functional._grouping import group_indices_by_device_and_dtype
from samgria.transforms.base import Transform, TransformContext

__all__ = ["ClipGradNorm", "GradSign", "NormalizeGrad", "ScaleGrad", "ClampGrad"]


def _check_real(name: str, value: Any, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _grads_by_group(ctx: TransformContext) -> list[tuple[Mapping[str, Any], list[torch.Tensor]]]:
    result = []
    for group in ctx.param_groups:
        grads = [p.grad for p in group["params"] if p.grad is not None]
        for grad in grads:
            if grad.is_sparse:
                raise RuntimeError("gradient transforms do not support sparse gradients")
        if grads:
            result.append((group, grads))
    return result


def _foreach_or_loop(grads: list[torch.Tensor], foreach: bool, fast, slow) -> None:
    if foreach:
        for indices in group_indices_by_device_and_dtype(grads).values():
            fast([grads[i] for i in indices])
    else:
        for grad in grads:
            slow(grad)


class ClipGradNorm(Transform):
    r"""Clip the gradients of each group to a global L2 norm of at most ``max_grad_norm``.

    :math:`g \leftarrow g \cdot \min(1, c / \lVert g \rVert_2)` with one norm per group (as
    :func:`torch.nn.utils.clip_grad_norm_` on that group's parameters).

    Args:
        max_grad_norm: Default :math:`c > 0` (per-group key ``"max_grad_norm"``).
    """

    def __init__(self, max_grad_norm: float = 1.0) -> None:
        _check_real("max_grad_norm", max_grad_norm, positive=True)
        self.max_grad_norm = float(max_grad_norm)

    def group_defaults(self) -> dict[str, Any]:
        return {"max_grad_norm": self.max_grad_norm}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        _check_real("max_grad_norm", group["max_grad_norm"], positive=True)

    def pre_update(self, ctx: TransformContext) -> None:
        for group, grads in _grads_by_group(ctx):
            norm = float(global_norm(grads, foreach=ctx.foreach))
            factor = group["max_grad_norm"] / (norm + 1e-6)
            if factor < 1.0:
                _foreach_or_loop(grads, ctx.foreach, lambda gs: torch._foreach_mul_(gs, factor), lambda g: g.mul_(factor))


class GradSign(Transform):
    r"""Replace every gradient by its sign: :math:`g \leftarrow \operatorname{sign}(g)` (signSGD)."""

    def pre_update(self, ctx: TransformContext) -> None:
        for _, grads in _grads_by_group(ctx):
            _foreach_or_loop(grads, ctx.foreach, torch._foreach_sign_, lambda g: g.sign_())


class NormalizeGrad(Transform):
    r"""Normalise each parameter's gradient to unit L2 norm: :math:`g \leftarrow g / (\lVert g \rVert_2 + \epsilon)`.

    Args:
        eps: Added to the norm (per-group key ``"normalize_eps"``), ``>= 0``.
    """

    def __init__(self, eps: float = 1e-12) -> None:
        _check_real("eps", eps)
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.eps = float(eps)

    def group_defaults(self) -> dict[str, Any]:
        return {"normalize_eps": self.eps}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        _check_real("normalize_eps", group["normalize_eps"])
        if group["normalize_eps"] < 0:
            raise ValueError(f"normalize_eps must be >= 0, got {group['normalize_eps']!r}")

    def pre_update(self, ctx: TransformContext) -> None:
        for group, grads in _grads_by_group(ctx):
            eps = group["normalize_eps"]

            def fast(gs: list[torch.Tensor]) -> None:
                norms = torch._foreach_norm(gs)
                torch._foreach_add_(norms, eps)
                torch._foreach_div_(gs, norms)

            _foreach_or_loop(grads, ctx.foreach, fast, lambda g: g.div_(torch.linalg.vector_norm(g).add_(eps)))


class ScaleGrad(Transform):
    r"""Affine map of every gradient: :math:`g \leftarrow s\,g + b` (per-group keys ``"grad_scale"``, ``"grad_bias"``)."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0) -> None:
        _check_real("scale", scale)
        _check_real("bias", bias)
        self.scale, self.bias = float(scale), float(bias)

    def group_defaults(self) -> dict[str, Any]:
        return {"grad_scale": self.scale, "grad_bias": self.bias}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        _check_real("grad_scale", group["grad_scale"])
        _check_real("grad_bias", group["grad_bias"])

    def pre_update(self, ctx: TransformContext) -> None:
        for group, grads in _grads_by_group(ctx):
            scale, bias = group["grad_scale"], group["grad_bias"]

            def fast(gs: list[torch.Tensor]) -> None:
                torch._foreach_mul_(gs, scale)
                torch._foreach_add_(gs, bias)

            _foreach_or_loop(grads, ctx.foreach, fast, lambda g: g.mul_(scale).add_(bias))


class ClampGrad(Transform):
    r"""Clamp every gradient element to ``[grad_min, grad_max]`` (per-group keys of those names).

    Raises:
        ValueError: If ``grad_min > grad_max``.
    """

    def __init__(self, grad_min: float = -1.0, grad_max: float = 1.0) -> None:
        _check_real("grad_min", grad_min)
        _check_real("grad_max", grad_max)
        if grad_min > grad_max:
            raise ValueError(f"grad_min must be <= grad_max, got grad_min={grad_min!r}, grad_max={grad_max!r}")
        self.grad_min, self.grad_max = float(grad_min), float(grad_max)

    def group_defaults(self) -> dict[str, Any]:
        return {"grad_min": self.grad_min, "grad_max": self.grad_max}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        _check_real("grad_min", group["grad_min"])
        _check_real("grad_max", group["grad_max"])
        if group["grad_min"] > group["grad_max"]:
            raise ValueError(
                f"grad_min must be <= grad_max, got grad_min={group['grad_min']!r}, grad_max={group['grad_max']!r}"
            )

    def pre_update(self, ctx: TransformContext) -> None:
        for group, grads in _grads_by_group(ctx):
            low, high = group["grad_min"], group["grad_max"]

            def fast(gs: list[torch.Tensor]) -> None:
                torch._foreach_clamp_min_(gs, low)
                torch._foreach_clamp_max_(gs, high)

            _foreach_or_loop(grads, ctx.foreach, fast, lambda g: g.clamp_(low, high))
