"""ANIL, "Almost No Inner Loop" (Raghu, Raghu, Bengio & Vinyals, 2020, "Rapid Learning or
Feature Reuse? Towards Understanding the Effectiveness of MAML").

ANIL splits the meta-parameters into a body :math:`\\theta_b` and a head :math:`\\theta_h` and
adapts only the head in the inner loop,

.. math::

    \\phi_{h,i} = \\theta_h - \\alpha \\nabla_{\\theta_h} \\mathcal{L}^s_i(\\theta_b, \\theta_h),
    \\qquad \\min_{\\theta_b, \\theta_h} \\sum_i \\mathcal{L}^q_i(\\theta_b, \\phi_{h,i}),

so the body is shared unchanged by every task yet still receives (second-order) meta-gradients
through the head's adaptation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from samgria.meta.maml import MAML

__all__ = ["ANIL", "head_names"]


def head_names(model: nn.Module, head: nn.Module) -> list[str]:
    """Return the names (as seen from ``model``) of ``head``'s parameters.

    Args:
        model: The full model.
        head: A submodule of ``model`` (matched by identity).

    Returns:
        The parameter names, in ``model.named_parameters()`` order.

    Raises:
        TypeError: ``head`` is not a module.
        ValueError: ``head`` is not a submodule of ``model`` or has no parameters.
    """
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be a torch.nn.Module (a submodule of model), got {type(head).__name__}")
    if not any(m is head for m in model.modules()):
        raise ValueError(
            f"head must be a submodule of model, got a {type(head).__name__} that is not among "
            f"model.modules() of {type(model).__name__}"
        )
    owned = {id(p) for p in head.parameters()}
    names = [n for n, p in model.named_parameters() if id(p) in owned]
    if not names:
        raise ValueError(f"head must have parameters to adapt, got a {type(head).__name__} without any")
    return names


class ANIL(MAML):
    """MAML that adapts only the parameters of ``head`` in the inner loop.

    Param-group settings still apply: a head parameter in an ``adapt=False`` group (or in no
    group of the outer optimizer) is not adapted either, and an ANIL that adapts no head
    parameter at all is refused when it is used (:meth:`inner_loop` raises ``ValueError``).
    Everything else is as in :class:`~samgria.meta.maml.MAML`.

    Args:
        model: The full model to meta-train.
        outer: Outer optimizer class or an already built optimizer.
        head: A submodule of ``model`` (e.g. its last layer).
        inner_lr: Inner step size :math:`\\alpha \\ge 0`.
        inner_steps: Default number of inner steps.
        first_order: Drop second-order terms.
        **outer_kwargs: The outer optimizer class's keyword arguments (``lr``, ...) and
            :class:`~samgria.meta.base.MetaOptimizer`'s: ``params`` (the param groups, e.g. one
            with ``adapt=False``), ``non_finite``, ``distributed``, ``process_group`` and
            ``checkpoint_inner_steps``.

    Raises:
        TypeError: ``model`` or ``head`` is not a module (and as
            :class:`~samgria.meta.base.MetaOptimizer`).
        ValueError: ``head`` is not a submodule of ``model`` or has no parameters (and as
            :class:`~samgria.meta.base.MetaOptimizer`).
    """

    def __init__(
        self,
        model: nn.Module,
        outer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        *,
        head: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        **outer_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        names = head_names(model, head)
        super().__init__(
            model, outer, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order, **outer_kwargs
        )
        self.head = head
        self.head_names: list[str] = names
        self._head_set = frozenset(names)

    def _filter_adapt_names(self, names: list[str]) -> list[str]:
        return [n for n in names if n in self._head_set]

    def _why_nothing_is_adapted(self) -> str:
        adapted = {p for g in self.param_groups if g.get("adapt", True) for p in g["params"]}
        if not adapted:
            return super()._why_nothing_is_adapted()
        params = dict(self.model.named_parameters())
        if not any(params[n] in adapted for n in self.head_names):
            return (
                f"none of head's parameters {self.head_names} is in a param group with adapt=True "
                "(ANIL adapts only the head, and only those of its parameters that the outer optimizer holds)"
            )
        return f"none of head's parameters {self.head_names} in a param group with adapt=True requires grad"
