r"""Small gradient transforms: clipping, sign, normalisation, affine scaling and clamping.

Each runs before the inner step, rewrites ``p.grad`` in place (parameters whose grad is
``None`` are skipped; complex gradients are treated as pairs of reals) and reads its hyperparameters from the param groups, so they can differ
per group and be scheduled. Placed after :class:`~samgria.SAM` in a chain they act on the
gradient at :math:`w + e`; placed before, on the gradient SAM perturbs with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from samgria._checks import check_real
from samgria.functional import global_norm
from samgria.functional._views import as_real
from samgria.functional._grouping import group_indices_by_device_and_dtype
from samgria.transforms.base import Transform, TransformContext

__all__ = ["ClipGradNorm", "GradSign", "NormalizeGrad", "ScaleGrad", "ClampGrad"]


def _grads_by_group(ctx: TransformContext) -> list[tuple[Mapping[str, Any], list[torch.Tensor]]]:
    result = []
    for group in ctx.param_groups:
        grads = [p.grad for p in group["params"] if p.grad is not None]
        for grad in grads:
            if grad.is_sparse:
                raise RuntimeError("gradient transforms do not support sparse gradients")
        # Complex gradients as pairs of reals, as torch.optim treats complex parameters.
        grads = [as_real(g) for g in grads]
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
        self.max_grad_norm = check_real("max_grad_norm", max_grad_norm, low=0.0, low_open=True)

    def group_defaults(self) -> dict[str, Any]:
        return {"max_grad_norm": self.max_grad_norm}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("max_grad_norm", group["max_grad_norm"], low=0.0, low_open=True)

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

    A zero gradient stays zero (also with ``eps=0``).

    Args:
        eps: Added to the norm (per-group key ``"eps"``, or ``"normalize_grad.eps"`` beside
            another ``eps`` such as Adam's), a finite number ``>= 0``.
    """

    def __init__(self, eps: float = 1e-12) -> None:
        self.eps = check_real("eps", eps, low=0.0)

    def group_defaults(self) -> dict[str, Any]:
        return {"eps": self.eps}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("eps", group["eps"], low=0.0)

    def pre_update(self, ctx: TransformContext) -> None:
        for group, grads in _grads_by_group(ctx):
            eps = group["eps"]

            def fast(gs: list[torch.Tensor]) -> None:
                norms = torch._foreach_norm(gs)
                torch._foreach_add_(norms, eps)
                torch._foreach_clamp_min_(norms, torch.finfo(gs[0].dtype).tiny)
                torch._foreach_div_(gs, norms)

            def slow(g: torch.Tensor) -> None:
                g.div_(torch.linalg.vector_norm(g).add_(eps).clamp_min_(torch.finfo(g.dtype).tiny))

            _foreach_or_loop(grads, ctx.foreach, fast, slow)


class ScaleGrad(Transform):
    r"""Affine map of every gradient: :math:`g \leftarrow s\,g + b` (per-group keys ``"grad_scale"``, ``"grad_bias"``)."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0) -> None:
        self.scale = check_real("scale", scale)
        self.bias = check_real("bias", bias)

    def group_defaults(self) -> dict[str, Any]:
        return {"grad_scale": self.scale, "grad_bias": self.bias}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_real("grad_scale", group["grad_scale"])
        check_real("grad_bias", group["grad_bias"])

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
        for group, grads in _grads_by_group(ctx):
            low, high = group["grad_min"], group["grad_max"]

            def fast(gs: list[torch.Tensor]) -> None:
                torch._foreach_clamp_min_(gs, low)
                torch._foreach_clamp_max_(gs, high)

            _foreach_or_loop(grads, ctx.foreach, fast, lambda g: g.clamp_(low, high))
