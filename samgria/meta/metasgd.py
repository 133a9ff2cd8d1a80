"""Meta-SGD (Li, Zhou, Chen & Li, 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning").

Meta-SGD learns, together with the initialisation :math:`\\theta`, a step size for every
parameter entry, :math:`\\alpha` (a tensor shaped like :math:`\\theta`):

.. math::

    \\phi_i = \\theta - \\alpha \\odot \\nabla_\\theta \\mathcal{L}^s_i(\\theta), \\qquad
    \\min_{\\theta, \\alpha} \\sum_i \\mathcal{L}^q_i(\\phi_i).

The rates receive the meta-gradient
:math:`\\partial \\mathcal{L}^q_i / \\partial \\alpha = -\\nabla \\mathcal{L}^s_i(\\theta) \\odot
\\nabla \\mathcal{L}^q_i(\\phi_i)` (also in first-order mode) and are trained by the outer
optimizer, in a param group of their own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from samgria.meta.functional import check_lr
from samgria.meta.maml import MAML

__all__ = ["MetaSGD"]


class MetaSGD(MAML):
    """MAML with learnable per-parameter inner learning rates.

    ``meta.inner_lrs`` maps the name of every adapted parameter to a learnable tensor of the
    same shape, initialised to its group's ``inner_lr``. The rates form an extra param group
    of the outer optimizer (``meta.param_groups[-1]``, with ``adapt=False`` and
    ``inner_lrs=True``); ``outer_kwargs`` (e.g. the learning rate) apply to it as to the others
    and ``lrs_group`` can override its settings. :meth:`state_dict` also stores the rates.

    Args:
        model: The module to meta-train.
        outer: Outer optimizer class or an already built optimizer (the rates are added to it
            with ``add_param_group``).
        inner_lr: Initial value of every rate.
        inner_steps: Default number of inner steps.
        first_order: Drop second-order terms (the rates still get gradients).
        lrs_group: Extra options of the rates' param group (e.g. ``{"lr": 1e-4}``).
        **outer_kwargs: Forwarded to the outer optimizer class.

    Raises:
        TypeError: ``lrs_group`` is not a dict.
        ValueError: ``lrs_group['inner_lr']`` is negative (and as :class:`~samgria.meta.base.MetaOptimizer`).
    """

    def __init__(
        self,
        model: nn.Module,
        outer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        lrs_group: dict[str, Any] | None = None,
        **outer_kwargs: Any,
    ) -> None:
        if lrs_group is not None and not isinstance(lrs_group, dict):
            raise TypeError(f"lrs_group must be a dict of param-group options, got {lrs_group!r}")
        if lrs_group is not None and "inner_lr" in lrs_group:  # checked before outer is taken over
            check_lr(lrs_group["inner_lr"], "lrs_group['inner_lr']")
        self.inner_lrs: dict[str, nn.Parameter] = {}
        super().__init__(
            model, outer, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order, **outer_kwargs
        )
        names, lrs = super()._adapt_config()
        params = dict(model.named_parameters())
        self.inner_lrs = {
            n: nn.Parameter(torch.full_like(params[n].detach(), float(lrs[n]))) for n in names
        }
        group = {**(lrs_group or {}), "params": list(self.inner_lrs.values()), "adapt": False, "inner_lrs": True}
        self.add_param_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its adapted parameters get learnable rates (initialised to its ``inner_lr``)."""
        super().add_param_group(param_group)
        rates_group = next((g for g in self.param_groups if g.get("inner_lrs")), None)
        if rates_group is None or param_group.get("inner_lrs"):
            return  # the rates group itself, added by __init__
        names, lrs = MAML._adapt_config(self)
        params = dict(self.model.named_parameters())
        new = {
            n: nn.Parameter(torch.full_like(params[n].detach(), float(lrs[n])))
            for n in names if n not in self.inner_lrs
        }
        self.inner_lrs.update(new)
        rates_group["params"].extend(new.values())

    def _extra_params(self) -> set[torch.Tensor]:
        return set(self.inner_lrs.values())

    def _adapt_config(self) -> tuple[list[str], dict[str, float | torch.Tensor]]:
        names, lrs = super()._adapt_config()
        return names, {n: self.inner_lrs.get(n, lrs[n]) for n in names}

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch's state dict of this optimizer plus ``"inner_lrs"`` (cloned rate tensors)."""
        sd = super().state_dict()
        sd["inner_lrs"] = {n: v.detach().clone() for n, v in self.inner_lrs.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load the optimizer state and copy the stored rates into :attr:`inner_lrs` (in place).

        Load pre-hooks see the whole checkpoint, ``"inner_lrs"`` included, as torch's see theirs.
        """
        super().load_state_dict(state_dict)

    def _take_extras(self, state_dict: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        sd = dict(state_dict)
        rates = sd.pop("inner_lrs", None)
        if rates is not None:
            missing = sorted(set(self.inner_lrs) - set(rates))
            if missing:
                raise ValueError(f"state_dict['inner_lrs'] has no rates for {missing}")
            for n, v in rates.items():
                if n not in self.inner_lrs:
                    raise ValueError(f"state_dict['inner_lrs'] has a rate for an unknown parameter {n!r}")
                if tuple(v.shape) != tuple(self.inner_lrs[n].shape):
                    raise ValueError(
                        f"state_dict['inner_lrs'][{n!r}] has shape {tuple(v.shape)}, expected "
                        f"{tuple(self.inner_lrs[n].shape)}"
                    )
        return sd, rates

    def _load_extras(self, extras: Any) -> None:
        if extras is not None:
            with torch.no_grad():
                for n, v in extras.items():
                    self.inner_lrs[n].copy_(v)
