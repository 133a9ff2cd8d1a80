"""MAML and FOMAML (Finn, Abbeel & Levine, 2017, "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks").

For tasks :math:`\\mathcal{T}_i` with support loss :math:`\\mathcal{L}^s_i` and query loss
:math:`\\mathcal{L}^q_i`, MAML adapts with :math:`k` inner steps

.. math::

    \\phi_i^{(0)} = \\theta, \\qquad
    \\phi_i^{(j+1)} = \\phi_i^{(j)} - \\alpha \\nabla_{\\phi} \\mathcal{L}^s_i(\\phi_i^{(j)}),

and minimises the post-adaptation query loss
:math:`\\mathcal{L}(\\theta) = \\frac{1}{n} \\sum_i \\mathcal{L}^q_i(\\phi_i^{(k)}(\\theta))` with the
outer optimizer. The exact meta-gradient (second order) is

.. math::

    \\nabla_\\theta \\mathcal{L}^q_i(\\phi_i) = \\prod_{j=0}^{k-1}
    \\big(I - \\alpha \\nabla^2 \\mathcal{L}^s_i(\\phi_i^{(j)})\\big) \\, \\nabla \\mathcal{L}^q_i(\\phi_i^{(k)}).

FOMAML drops the Hessian terms: its meta-gradient is the query gradient at the adapted weights,
:math:`\\nabla \\mathcal{L}^q_i(\\phi_i^{(k)})`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from samgria.meta.base import MetaOptimizer

__all__ = ["FOMAML", "MAML"]


class MAML(MetaOptimizer):
    """Model-agnostic meta-learning as a ``torch.optim.Optimizer`` over a model's parameters.

    Typical use::

        meta = MAML(model, torch.optim.Adam, inner_lr=0.01, inner_steps=1, lr=1e-3)

        def closure():
            meta.zero_grad()
            losses = []
            for task in tasks:
                learner = meta.adapt(lambda f: mse(f(task.support_x), task.support_y))
                losses.append(mse(learner(task.query_x), task.query_y))
            loss = torch.stack(losses).mean()
            loss.backward()
            return loss

        meta.step(closure)

    or, vectorised over equal-shape tasks, ``meta.task_losses(tasks, mse).mean()`` inside the
    closure.

    Args:
        model: The module to meta-train.
        outer: Outer optimizer class (built with ``outer_kwargs``) or an already built optimizer.
        inner_lr: Inner step size :math:`\\alpha \\ge 0` (default of every param group).
        inner_steps: Default number of inner steps :math:`k \\ge 0`.
        first_order: Drop second-order terms (FOMAML).
        **outer_kwargs: The outer optimizer class's keyword arguments (``lr``, ...) and
            :class:`~samgria.meta.base.MetaOptimizer`'s: ``params`` (the param groups, e.g. one
            with ``adapt=False``), ``non_finite``, ``distributed``, ``process_group`` and
            ``checkpoint_inner_steps``.
    """

    def __init__(
        self,
        model: nn.Module,
        outer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        **outer_kwargs: Any,
    ) -> None:
        super().__init__(
            model, outer, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order, **outer_kwargs
        )


class FOMAML(MAML):
    """First-order MAML: ``FOMAML(...)`` is ``MAML(..., first_order=True)``.

    The meta-gradient of each task is the query gradient at the adapted weights,
    :math:`\\nabla \\mathcal{L}^q_i(\\phi_i)`, which costs no second-order backward pass.

    Args:
        model: The module to meta-train.
        outer: Outer optimizer class or an already built optimizer.
        inner_lr: Inner step size :math:`\\alpha \\ge 0`.
        inner_steps: Default number of inner steps.
        **outer_kwargs: The outer optimizer class's keyword arguments (``lr``, ...) and
            :class:`~samgria.meta.base.MetaOptimizer`'s: ``params`` (the param groups, e.g. one
            with ``adapt=False``), ``non_finite``, ``distributed``, ``process_group`` and
            ``checkpoint_inner_steps``.

    Raises:
        TypeError: ``first_order`` is passed (FOMAML is always first order).
    """

    def __init__(
        self,
        model: nn.Module,
        outer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        **outer_kwargs: Any,
    ) -> None:
        if "first_order" in outer_kwargs:
            raise TypeError(
                f"FOMAML is always first order; got first_order={outer_kwargs['first_order']!r} "
                "(use MAML(..., first_order=...) instead)"
            )
        super().__init__(model, outer, inner_lr=inner_lr, inner_steps=inner_steps, first_order=True, **outer_kwargs)
