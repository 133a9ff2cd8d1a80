"""Differentiable inner-loop optimizers and inner-loop gradient transforms.

An inner step function maps the fast weights and their support gradients to new fast
weights with ordinary (differentiable) tensor operations, so the meta-gradient flows through
the whole inner trajectory, optimizer state included. Stateful step functions keep their
state (momentum buffers, Adam moments) in a ``state`` dict that the inner loop creates empty
for every adaptation, so one step-function object can be shared by every task and every
meta-iteration.

The protocol is :class:`InnerStepFn`::

    new = step_fn(params, grads, lrs, state)

where ``params``, ``grads`` and ``lrs`` are mappings over the same adapted names and the
returned mapping holds the new value of each of them.

Gradient transforms act on the support gradients before the step (``grad_transforms=`` of
:meth:`samgria.meta.base.MetaOptimizer.adapt`); :class:`InnerSAM` is sharpness-aware
minimisation inside the inner loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast, runtime_checkable

import torch

from samgria._checks import check_bool, check_real

__all__ = [
    "AdamInnerStep",
    "InnerGradTransform",
    "InnerSAM",
    "InnerStepFn",
    "MomentumInnerStep",
    "adam_inner_step",
    "momentum_inner_step",
    "sgd_inner_step",
]

Tensors = Mapping[str, torch.Tensor]
Rates = Mapping[str, "float | torch.Tensor"]


@runtime_checkable
class InnerStepFn(Protocol):
    """A differentiable inner-loop update rule.

    ``__call__(params, grads, lrs, state)`` receives the adapted fast weights, their support
    gradients and their step sizes (mappings over the same names) and a ``state`` dict that
    is empty at the start of each adaptation and kept between its steps. It returns a new
    mapping ``{name: updated tensor}`` built with out-of-place operations.
    """

    def __call__(
        self, params: Tensors, grads: Tensors, lrs: Rates, state: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Return the updated fast weights."""
        ...


@runtime_checkable
class InnerGradTransform(Protocol):
    """Rewrites support gradients inside the inner loop (e.g. :class:`InnerSAM`).

    ``transform_inner_grads(params, grads, grad_fn)`` receives the adapted fast weights, their
    support gradients and ``grad_fn(weights) -> gradients``, the support gradient at other fast
    weights (same names), computed the way the running path computes gradients (autograd on
    the loop path, :func:`torch.func.grad` under vmap), so one transform works on every path.
    It returns the new gradients for the same names, using out-of-place tensor operations and
    no data-dependent Python control flow (so that it can be vmapped).
    """

    def transform_inner_grads(
        self,
        params: Tensors,
        grads: Tensors,
        grad_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Return transformed gradients."""
        ...


def sgd_inner_step(
    params: Tensors, grads: Tensors, lrs: Rates, state: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Plain gradient descent, :math:`p' = p - \\alpha_p \\odot g_p` (the MAML inner step).

    Args:
        params: Adapted fast weights.
        grads: Their support gradients.
        lrs: Their step sizes (numbers, or tensors for Meta-SGD).
        state: Unused (plain SGD is stateless).

    Returns:
        The updated fast weights.
    """
    return {n: params[n] - lrs[n] * grads[n] for n in grads}


def _real_view(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor``, or a complex one as pairs of reals (``torch.optim``'s treatment)."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float64 (complex128 for a complex one)."""
    return tensor.to(torch.complex128 if tensor.is_complex() else torch.float64)


def _check_unit_interval(value: Any, name: str) -> float:
    return check_real(name, value, low=0.0, high=1.0, high_open=True)


class MomentumInnerStep:
    """Differentiable SGD with (heavy-ball or Nesterov) momentum, as ``torch.optim.SGD``.

    With gradient :math:`g_t` at inner step :math:`t` (first step :math:`b_1 = g_1`):

    .. math::

        b_t = \\mu b_{t-1} + (1 - \\tau) g_t, \\qquad
        p_t = p_{t-1} - \\alpha \\, (g_t + \\mu b_t \\text{ if Nesterov else } b_t).

    Args:
        momentum: :math:`\\mu \\in [0, 1)`.
        dampening: :math:`\\tau \\in [0, 1)`.
        nesterov: Use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).

    Raises:
        TypeError: An argument is of the wrong type (a bool where a number is expected included).
        ValueError: An argument is out of range.
    """

    def __init__(self, momentum: float = 0.9, dampening: float = 0.0, nesterov: bool = False) -> None:
        self.momentum = _check_unit_interval(momentum, "momentum")
        self.dampening = _check_unit_interval(dampening, "dampening")
        nesterov = check_bool("nesterov", nesterov)
        if nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                f"nesterov=True needs momentum > 0 and dampening == 0, got momentum={momentum!r}, "
                f"dampening={dampening!r}"
            )
        self.nesterov = nesterov

    def __call__(
        self, params: Tensors, grads: Tensors, lrs: Rates, state: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Return the updated fast weights; momentum buffers live in ``state["momentum"]``."""
        buffers: dict[str, torch.Tensor] = state.setdefault("momentum", {})
        new = {}
        for n, g in grads.items():
            if n in buffers:
                buf = self.momentum * buffers[n] + (1.0 - self.dampening) * g
            else:
                buf = g
            buffers[n] = buf
            direction = g + self.momentum * buf if self.nesterov else buf
            new[n] = params[n] - lrs[n] * direction
        return new

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(momentum={self.momentum}, dampening={self.dampening}, "
            f"nesterov={self.nesterov})"
        )


class AdamInnerStep:
    """Differentiable Adam (Kingma & Ba, 2015) for the inner loop, as ``torch.optim.Adam``.

    .. math::

        m_t = \\beta_1 m_{t-1} + (1 - \\beta_1) g_t, \\quad
        v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2, \\quad
        p_t = p_{t-1} - \\alpha \\frac{m_t / (1 - \\beta_1^t)}{\\sqrt{v_t / (1 - \\beta_2^t)} + \\epsilon}.

    The square root is taken of :math:`\\max(\\hat v_t, \\text{tiny})` so its derivative stays
    finite where a gradient is exactly zero (dead ReLU units); the value differs from Adam's
    only below the smallest normal float (in float16, whose smallest normal is 6.1e-5, that
    is where a gradient is below about 7.8e-3).

    Args:
        betas: :math:`(\\beta_1, \\beta_2)`, each in ``[0, 1)``.
        eps: :math:`\\epsilon > 0`.

    Raises:
        TypeError: An argument is of the wrong type (a bool where a number is expected included).
        ValueError: An argument is out of range.
    """

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        self.betas = (_check_unit_interval(betas[0], "betas[0]"), _check_unit_interval(betas[1], "betas[1]"))
        self.eps = check_real("eps", eps, low=0.0, low_open=True)

    def __call__(
        self, params: Tensors, grads: Tensors, lrs: Rates, state: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Return the updated fast weights.

        The moments live in ``state["exp_avg"]`` and ``state["exp_avg_sq"]`` and the step counts
        in ``state["step"]``, each a dict by name. As in ``torch.optim.Adam``, every weight
        counts its own steps: one without a gradient at this step (not in ``grads``) neither
        moves nor advances its count, so its first gradient later gets the bias correction of
        a first step. A complex weight is a pair of real weights (its real and imaginary
        parts), as in ``torch.optim.Adam``: its moments are kept as real tensors with a last
        axis of size 2.
        """
        beta1, beta2 = self.betas
        exp_avg: dict[str, torch.Tensor] = state.setdefault("exp_avg", {})
        steps: dict[str, int] = state.setdefault("step", {})
        if not isinstance(steps, dict):  # the one count of earlier versions: every moment has it
            steps = state["step"] = {n: int(steps) for n in exp_avg}
        exp_avg_sq: dict[str, torch.Tensor] = state.setdefault("exp_avg_sq", {})
        new = {}
        for n, g in grads.items():
            step = steps.get(n, 0) + 1
            steps[n] = step
            bias1 = 1.0 - beta1**step
            bias2 = 1.0 - beta2**step
            g_real = _real_view(g)
            m = (1.0 - beta1) * g_real if n not in exp_avg else beta1 * exp_avg[n] + (1.0 - beta1) * g_real
            v = (1.0 - beta2) * g_real * g_real
            if n in exp_avg_sq:
                v = beta2 * exp_avg_sq[n] + v
            exp_avg[n], exp_avg_sq[n] = m, v
            v_hat = (v / bias2).clamp_min(torch.finfo(v.dtype).tiny)
            direction = (m / bias1) / (v_hat.sqrt() + self.eps)
            if g.is_complex():
                direction = torch.complex(direction[..., 0], direction[..., 1])
            new[n] = params[n] - lrs[n] * direction
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}(betas={self.betas}, eps={self.eps})"


#: Shared default instances (stateless objects: their state lives in the per-adaptation dict).
momentum_inner_step = MomentumInnerStep()
adam_inner_step = AdamInnerStep()


class InnerSAM:
    """Sharpness-aware minimisation inside the inner loop (Foret et al., 2021).

    Given the support gradient :math:`g` at the fast weights :math:`\\phi`, the gradient used
    for the inner step is the one at the worst-case neighbour

    .. math::

        \\epsilon = \\rho \\frac{g}{\\lVert g \\rVert_2}, \\qquad
        \\tilde g = \\nabla \\mathcal{L}_{\\text{sup}}(\\phi + \\epsilon),

    with :math:`\\epsilon` treated as a constant (as in SAM). The norm is global over the
    adapted parameters. In a second-order inner loop :math:`\\tilde g` carries its graph to
    the meta-parameters; in a first-order loop it does not. It runs on every path (loop, vmap,
    compiled).

    Args:
        rho: Neighbourhood radius :math:`\\rho \\ge 0`.

    Raises:
        TypeError: ``rho`` is not a real number (a bool included).
        ValueError: ``rho`` is negative or not finite.
    """

    def __init__(self, rho: float = 0.05) -> None:
        self.rho = check_real("rho", rho, low=0.0)

    def transform_inner_grads(
        self,
        params: Tensors,
        grads: Tensors,
        grad_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Return the support gradients at the perturbed fast weights.

        The norm of a complex gradient counts its real and imaginary parts. Where the
        gradient norm is zero or not finite the gradient is re-evaluated at the same weights,
        bit for bit; written without data-dependent control flow so that it runs under
        :func:`torch.func.vmap`.
        """
        names = list(grads)
        if not names or self.rho == 0.0:
            return dict(grads)
        with torch.no_grad():
            # ``names`` is not empty, so the sum is a tensor (never the start value 0).
            squares = sum((_real_view(grads[n].detach()).double() ** 2).sum() for n in names)
            norm = torch.sqrt(cast(torch.Tensor, squares))
            usable = torch.isfinite(norm) & (norm > 0)
            scale = self.rho / torch.where(usable, norm, torch.ones_like(norm))
        # A non-finite gradient times any scale is NaN: select the weights themselves instead.
        # The step rho * g / ||g|| is formed in float64, where it is at most rho: in a 16-bit
        # dtype the scale rho / ||g|| alone overflows to inf once ||g|| < rho / 65504 (float16).
        perturbed = {
            n: torch.where(usable, params[n] + (_wide(grads[n].detach()) * scale).to(grads[n].dtype), params[n])
            for n in names
        }
        return dict(grad_fn(perturbed))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rho={self.rho})"
