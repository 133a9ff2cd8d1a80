r"""Sharpness-aware minimisation: SAM and ASAM.

Both transforms take the gradient :math:`g` at the current weights :math:`w`, move the weights
to the approximate worst case :math:`w + e` in a small neighbourhood, re-evaluate the closure
there, and put the original weights back, bit for bit. The inner optimizer then steps from
:math:`w` with the gradient :math:`\nabla L(w + e)`.

How the weights are moved and restored (why it is exact and cheap): the perturbed weights
:math:`w + e` are computed into the first gradient's own storage (that gradient is not needed
any more), and each parameter's ``.data`` is pointed at that storage; restoring points it back
at the untouched original storage. No copy of the weights is made, nothing is subtracted, so
the restored weights are the original tensors. Where a gradient's storage cannot be reused (a
view into a DDP bucket, a different memory layout) a new buffer is allocated instead.

A non-finite gradient norm skips the perturbation (with a warning): the inner optimizer then
sees exactly the gradients of the first evaluation, as it would without SAM. The norm is read
on the host once per step to take that decision.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from samgria.functional import adaptive_scaling, global_norm, mul, mul_, scale_and_add_
from samgria.transforms.base import Transform, TransformContext, check_non_negative

__all__ = ["SAM", "ASAM", "PerturbationTransform", "Perturbation"]


class Perturbation:
    """Weights moved away from their original storage, and the way back.

    ``restore()`` re-points every parameter at its original tensor: exact, and it cannot fail.
    ``non_finite`` is true when the perturbation was skipped because the gradient norm was not
    finite (then nothing was moved).
    """

    def __init__(
        self, params: list[torch.Tensor], originals: list[torch.Tensor], *, non_finite: bool = False
    ) -> None:
        self.params = params
        self.originals = originals
        self.non_finite = non_finite

    def restore(self) -> None:
        """Put the original weights back (idempotent)."""
        for param, original in zip(self.params, self.originals):
            param.data = original
        self.params, self.originals = [], []


def _reusable_storage(param: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether ``grad``'s storage can hold the perturbed weights in ``param``'s place."""
    return (
        grad._base is None
        and grad.grad_fn is None
        and grad.dtype == param.dtype
        and grad.device == param.device
        and grad.shape == param.shape
        and grad.stride() == param.stride()
        and grad.storage_offset() == param.storage_offset() == 0
    )


def _weight_buffer(param: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``direction`` itself when it can become ``param``'s storage, else a copy laid out like ``param``."""
    if _reusable_storage(param, direction):
        return direction
    return torch.empty_like(param).copy_(direction)


class PerturbationTransform(Transform):
    """Base of transforms that perturb the weights, re-evaluate the closure and restore.

    Subclasses implement :meth:`perturb`. :meth:`pre_update` perturbs, re-evaluates and always
    restores — also when the closure raises.
    """

    needs_closure = True

    def perturb(self, ctx: TransformContext) -> Perturbation | None:
        """Move the weights to :math:`w + e` and return how to restore them.

        Returns ``None`` when nothing is perturbed (no gradients, every ``rho`` zero, zero
        gradient), and an empty :class:`Perturbation` with ``non_finite=True`` when the gradient
        norm is not finite.
        """
        raise NotImplementedError

    def pre_update(self, ctx: TransformContext) -> None:
        if ctx.reevaluate is None:
            raise RuntimeError(
                f"{type(self).__name__} re-evaluates the loss and needs a closure: call "
                "optimizer.step(closure), or call optimizer.first_step() after the first "
                "backward and optimizer.second_step() after the second"
            )
        perturbation = self.perturb(ctx)
        if perturbation is None or not perturbation.params:
            return
        try:
            ctx.reevaluate()
        finally:
            perturbation.restore()

    def active(self, param_groups: Iterable[Mapping[str, Any]]) -> bool:
        return any(group.get("rho", 0) > 0 for group in param_groups)

    # -- helpers shared by SAM and ASAM --------------------------------------------------------
    @staticmethod
    def _collect(
        ctx: TransformContext,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Mapping[str, Any]]]:
        """Parameters with a gradient, their gradients and groups; sparse gradients raise."""
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        groups: list[Mapping[str, Any]] = []
        seen: set[int] = set()
        for group in ctx.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is None or id(param) in seen:
                    continue
                seen.add(id(param))
                if grad.is_sparse:
                    raise RuntimeError(
                        "SAM and ASAM do not support sparse gradients (a parameter of shape "
                        f"{tuple(param.shape)} has one); use a dense embedding or exclude it"
                    )
                params.append(param)
                grads.append(grad)
                groups.append(group)
        return params, grads, groups

    def _finite_norm(self, directions: list[torch.Tensor], foreach: bool) -> float | None:
        """The global norm of the directions, or ``None`` (with a warning) when it is not finite."""
        norm = float(global_norm(directions, foreach=foreach))
        if not math.isfinite(norm):
            warnings.warn(
                f"{type(self).__name__}: the gradient norm is {norm}; the perturbation is skipped "
                "and the inner optimizer sees the unperturbed gradients",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        return norm

    @staticmethod
    def _move(
        params: list[torch.Tensor],
        buffers: list[torch.Tensor],
        scales: list[float],
        foreach: bool,
    ) -> Perturbation:
        """Compute ``buffers <- scales * buffers + params`` and point each param at its buffer."""
        scale_and_add_(buffers, scales, params, foreach=foreach)
        originals = []
        for param, buffer in zip(params, buffers):
            originals.append(param.data)
            param.grad = None
            param.data = buffer
        return Perturbation(params, originals)


class SAM(PerturbationTransform):
    r"""Sharpness-Aware Minimization (Foret et al., ICLR 2021).

    .. math::

        e = \rho\,\frac{g}{\lVert g \rVert_2}, \qquad
        w_{t+1} = \mathrm{inner\_step}\big(w_t,\ \nabla L(w_t + e)\big)

    One norm over every parameter that has a gradient; each group's part of :math:`e` is scaled
    by that group's ``rho``, and a group with ``rho=0`` is not perturbed.

    Args:
        rho: Default neighbourhood radius :math:`\rho \ge 0` (per-group key ``"rho"``).

    Raises:
        ValueError: If ``rho`` is negative or not finite.
    """

    def __init__(self, rho: float = 1e-2) -> None:
        check_non_negative("rho", rho)
        self.rho = float(rho)

    def group_defaults(self) -> dict[str, Any]:
        return {"rho": self.rho}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_non_negative("rho", group["rho"])

    def perturb(self, ctx: TransformContext) -> Perturbation | None:
        params, grads, groups = self._collect(ctx)
        if not params or not self.active(groups):
            return None
        norm = self._finite_norm(grads, ctx.foreach)
        if norm is None or norm == 0.0:
            return None if norm == 0.0 else Perturbation([], [], non_finite=True)
        moved, buffers, scales = [], [], []
        for param, grad, group in zip(params, grads, groups):
            if group["rho"] > 0:
                moved.append(param)
                buffers.append(_weight_buffer(param, grad))
                scales.append(group["rho"] / norm)
        return self._move(moved, buffers, scales, ctx.foreach)


class ASAM(PerturbationTransform):
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
        ValueError: If ``rho`` or ``eta`` is negative or not finite.
    """

    def __init__(self, rho: float = 0.5, eta: float = 0.01, adaptive: bool = True) -> None:
        check_non_negative("rho", rho)
        check_non_negative("eta", eta)
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
        self.rho = float(rho)
        self.eta = float(eta)
        self.adaptive = adaptive

    def group_defaults(self) -> dict[str, Any]:
        return {"rho": self.rho, "eta": self.eta, "adaptive": self.adaptive}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        check_non_negative("rho", group["rho"])
        check_non_negative("eta", group["eta"])
        if not isinstance(group["adaptive"], bool):
            raise TypeError(f"adaptive must be a bool, got {group['adaptive']!r}")

    def perturb(self, ctx: TransformContext) -> Perturbation | None:
        params, grads, groups = self._collect(ctx)
        if not params or not self.active(groups):
            return None
        adaptive = [i for i, group in enumerate(groups) if group["adaptive"]]
        scalings = adaptive_scaling(
            [params[i] for i in adaptive], [groups[i]["eta"] for i in adaptive], foreach=ctx.foreach
        )
        scaled_grads = mul([grads[i] for i in adaptive], scalings, foreach=ctx.foreach)
        directions = list(grads)  # T ⊙ g for adaptive groups, g elsewhere
        for index, scaled in zip(adaptive, scaled_grads):
            directions[index] = scaled
        norm = self._finite_norm(directions, ctx.foreach)
        if norm is None or norm == 0.0:
            return None if norm == 0.0 else Perturbation([], [], non_finite=True)
        mul_(scaled_grads, scalings, foreach=ctx.foreach)  # T² ⊙ g, in place
        del scalings
        moved, buffers, scales = [], [], []
        for index, (param, group) in enumerate(zip(params, groups)):
            if group["rho"] > 0:
                moved.append(param)
                buffers.append(_weight_buffer(param, directions[index]))
                scales.append(group["rho"] / norm)
        return self._move(moved, buffers, scales, ctx.foreach)
