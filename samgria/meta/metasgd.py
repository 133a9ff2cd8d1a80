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
optimizer, in a param group of their own. The rates are real step sizes: those of a complex
parameter have its real dtype (``complex64`` -> ``float32``), as a complex rate would rotate the
gradient instead of scaling it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from samgria._checks import check_like_default, check_real
from samgria._wrapper import WrappingOptimizer, is_torch_optimizer
from samgria.functional._sharding import is_sharded
from samgria.meta.functional import check_lr
from samgria.meta.maml import MAML

__all__ = ["MetaSGD"]


def _rate_like(param: torch.Tensor, value: float) -> nn.Parameter:
    """A learnable rate shaped like ``param``, filled with ``value``, of ``param``'s real dtype
    (a complex parameter's rate is real: ``complex64`` -> ``float32``, ``complex128`` -> ``float64``)."""
    param = param.detach()
    dtype = param.real.dtype if param.is_complex() else param.dtype
    return nn.Parameter(torch.full_like(param, value, dtype=dtype))


def _one_group_only(outer: Any) -> str | None:
    """The name of the optimizer ``outer`` builds or drives when its ``step`` supports a single
    param group (``torch.optim.LBFGS`` and subclasses), else ``None``. A built optimizer is
    looked through the wrappers that drive it (metadata only: nothing is built)."""
    if isinstance(outer, type):
        return outer.__name__ if issubclass(outer, torch.optim.LBFGS) else None
    while isinstance(outer, WrappingOptimizer):
        outer = outer.__dict__.get(outer._driven_attr)
    return type(outer).__name__ if isinstance(outer, torch.optim.LBFGS) else None


#: The keys of the rates' param group that MetaSGD sets itself.
_SET_BY_METASGD = ("params", "param_names", "adapt", "inner_lrs")


def _rate_name(name: str) -> str:
    """The name of the rate of parameter ``name`` in a named rates group (``param_names``)."""
    return f"inner_lrs.{name}"


def _torch_defaults(outer: Any) -> dict[str, Any]:
    """The param-group defaults of the ``torch.optim`` optimizer ``outer`` is, builds (its
    constructor's defaults, as torch's optimizers store them) or drives; empty for another
    optimizer, whose rules are its own."""
    if isinstance(outer, type):
        module = outer.__module__
        if not (module == "torch.optim" or module.startswith("torch.optim.")):
            return {}
        try:
            parameters = inspect.signature(outer).parameters
        except (TypeError, ValueError):
            return {}
        return {n: p.default for n, p in parameters.items() if p.default is not inspect.Parameter.empty}
    while isinstance(outer, WrappingOptimizer):
        outer = outer.__dict__.get(outer._driven_attr)
    return dict(outer.defaults) if is_torch_optimizer(outer) else {}


def _check_lrs_group(lrs_group: Any, outer: Any) -> None:
    """Refuse an ``lrs_group`` that is not a dict, sets a key MetaSGD sets itself, or holds an
    ``lr`` (a finite number ``>= 0``, as torch's constructors check it), ``inner_lr`` or, for
    ``torch.optim``'s optimizers, a value of another kind than the optimizer's default (as
    ``check_like_default`` checks a group before a step); change nothing."""
    if not isinstance(lrs_group, dict):
        raise TypeError(f"lrs_group must be a dict of param-group options, got {lrs_group!r}")
    reserved = [key for key in _SET_BY_METASGD if key in lrs_group]
    if reserved:
        raise ValueError(
            f"lrs_group must not set {', '.join(map(repr, reserved))}: MetaSGD sets them itself (params: "
            f"the rates; param_names: theirs, where the groups are named; adapt=False; inner_lrs=True), got {lrs_group!r}"
        )
    if "inner_lr" in lrs_group:
        check_lr(lrs_group["inner_lr"], "lrs_group['inner_lr']")
    if "lr" in lrs_group:
        lr = lrs_group["lr"]
        if isinstance(lr, torch.Tensor):  # torch takes a one-element real tensor
            check_like_default("lrs_group['lr']", lr, 0.0)
            lr = lr.item()
        check_real("lrs_group['lr']", lr, low=0.0)
    defaults = _torch_defaults(outer)
    for key, value in lrs_group.items():
        if key not in ("lr", "inner_lr") and key in defaults:
            check_like_default(f"lrs_group[{key!r}]", value, defaults[key])


class MetaSGD(MAML):
    """MAML with learnable per-parameter inner learning rates.

    ``meta.inner_lrs`` maps the name of every adapted parameter to a learnable tensor of the
    same shape, initialised to its group's ``inner_lr`` (real: a complex parameter's rate has its
    real dtype). The rates form an extra param group of the outer optimizer, marked
    ``inner_lrs=True`` (and ``adapt=False``): the last group when it is built; a group added later
    with :meth:`add_param_group` is appended after it, as torch appends (LR schedulers and
    checkpoints pair groups by position). An already built outer optimizer is offered the group
    before it is taken over, so one that refuses it is left as it was. Where the groups are named
    (torch's ``(name, tensor)`` pairs, ``model.named_parameters()``), the rates are named
    ``"inner_lrs.<parameter name>"`` in ``param_names``. ``outer_kwargs`` (e.g. the learning rate)
    apply to it as to the others and ``lrs_group`` can override its settings.
    :meth:`state_dict` also stores the rates. Rates are made for the parameters adapted when the
    optimizer is built or their group is added: one adapted only later (unfrozen, or its group
    switched to ``adapt=True``) is refused when the inner loop is described, not adapted at a
    fixed rate.

    Args:
        model: The module to meta-train.
        outer: Outer optimizer class or an already built optimizer (the rates are added to it
            with ``add_param_group``); one that supports a single param group (LBFGS) cannot
            hold the rates' group.
        inner_lr: Initial value of the rates of every group that sets no ``inner_lr`` of its own
            (a group's ``inner_lr`` initialises its rates; editing it later changes nothing,
            since the learned rates are the step sizes).
        inner_steps: Default number of inner steps.
        first_order: Drop second-order terms (the rates still get gradients).
        lrs_group: Extra options of the rates' param group (e.g. ``{"lr": 1e-4}``), checked
            now: ``lr`` a finite number ``>= 0``; for ``torch.optim``'s optimizers, every option
            of the kind of the optimizer's default; not ``params``, ``param_names``, ``adapt`` or
            ``inner_lrs``, which MetaSGD sets.
        **outer_kwargs: The outer optimizer class's keyword arguments (``lr``, ...) and
            :class:`~samgria.meta.base.MetaOptimizer`'s: ``params`` (the param groups, e.g. one
            with ``adapt=False``), ``non_finite``, ``distributed``, ``process_group`` and
            ``checkpoint_inner_steps``.

    Raises:
        TypeError: ``lrs_group`` is not a dict, or an option of it is of the wrong kind.
        ValueError: ``lrs_group['lr']`` or ``lrs_group['inner_lr']`` is negative or not finite,
            ``lrs_group`` sets ``params``, ``param_names``, ``adapt`` or ``inner_lrs``, ``outer`` is
            (or builds) an LBFGS, which supports one param group only (and as
            :class:`~samgria.meta.base.MetaOptimizer`);
            when used, a parameter is adapted that has no learned rate.
    """

    _group_markers = ("inner_lrs",)  # the group of the learned rates

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
        if lrs_group is not None:  # checked before outer is taken over
            _check_lrs_group(lrs_group, outer)
        single = _one_group_only(outer)
        if single is not None:  # refused before a built outer is taken over
            shown = f"outer={single}" if isinstance(outer, type) else f"outer=an already built {single}"
            raise ValueError(
                f"{type(self).__name__} cannot drive {shown}: {single} supports exactly one param group, and "
                f"{type(self).__name__} trains its inner rates in a param group of their own; use another "
                "outer optimizer (e.g. torch.optim.SGD or Adam)"
            )
        self.inner_lrs: dict[str, nn.Parameter] = {}
        self._lrs_group = dict(lrs_group or {})
        super().__init__(
            model, outer, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order, **outer_kwargs
        )
        del self._lrs_group

    def _add_own_groups(self, built: torch.optim.Optimizer) -> None:
        """Make the rates and add their group to ``built`` before it is taken over (named, as
        ``"inner_lrs.<parameter name>"``, when its groups are: torch refuses to mix named and
        unnamed groups): a group it refuses leaves it as it was, and makes no rates."""
        names, lrs = MAML._adapt_config_of(self, built.param_groups)
        params = dict(self.model.named_parameters())
        rates = {n: _rate_like(params[n], float(lrs[n])) for n in names}
        entries: list[Any] = list(rates.values())
        if any("param_names" in group for group in built.param_groups):
            entries = [(_rate_name(n), rate) for n, rate in rates.items()]
        group = {**self._lrs_group, "params": entries, "adapt": False, "inner_lrs": True}
        self.inner_lrs = rates  # the rates are meta-parameters: the group's check knows them
        try:
            self._check_group(group, len(built.param_groups))
            built.add_param_group(group)
        except BaseException:
            self.inner_lrs = {}
            raise

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of the model's parameters, appended as torch appends; its adapted
        parameters get learnable rates (initialised to its ``inner_lr``), added to the rates'
        group (the one marked ``inner_lrs=True``; named ``"inner_lrs.<parameter name>"`` in its
        ``param_names`` when the groups are named)."""
        super().add_param_group(param_group)
        rates_group = next((g for g in self.param_groups if g.get("inner_lrs")), None)
        if rates_group is None or param_group.get("inner_lrs"):
            return  # no rates group to extend (a group marked as one was added by the caller)
        # Rates for the new group's (the last one's) parameters only: one of an earlier group
        # adapted only since its rates were made (unfrozen, switched to adapt=True) stays refused.
        names, lrs = MAML._adapt_config_of(self, self.param_groups[-1:])
        params = dict(self.model.named_parameters())
        new = {n: _rate_like(params[n], float(lrs[n])) for n in names if n not in self.inner_lrs}
        self.inner_lrs.update(new)
        rates_group["params"].extend(new.values())
        if "param_names" in rates_group:
            rates_group["param_names"].extend(_rate_name(n) for n in new)

    def _extra_params(self) -> set[torch.Tensor]:
        return set(self.inner_lrs.values())

    def _adapt_config(self) -> tuple[list[str], dict[str, float | torch.Tensor]]:
        names, _ = super()._adapt_config()
        without = [n for n in names if n not in self.inner_lrs]
        if without:
            # Adapting them with the group's fixed inner_lr would run plain MAML for them, and a
            # rate made now would sit in the rates group in another order than in a run built
            # with them adapted (the outer optimizer's state of the rates is by position).
            raise ValueError(
                f"MetaSGD has no learned rate for {without}: rates are made for the parameters adapted "
                "when it is built or their group is added (add_param_group), and these were not (they "
                "did not require grad, or their group had adapt=False); build the MetaSGD once they are adapted"
            )
        return names, {n: self.inner_lrs[n] for n in names}

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch's state dict of this optimizer plus ``"inner_lrs"`` (cloned rate tensors), which
        the state-dict post-hooks see, as torch's see the whole checkpoint."""
        return super().state_dict()

    def _pack_extras(self) -> dict[str, Any]:
        return {"inner_lrs": {n: v.detach().clone() for n, v in self.inner_lrs.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load the optimizer state and copy the stored rates into :attr:`inner_lrs` (in place,
        cast to their dtype, as torch casts the state). The rates are checked, and copied into
        staging tensors of the rates' own kind, before anything changes: a refused load leaves
        the optimizer and the rates as they were. A learned rate may be negative (or anything
        the outer optimizer made of it): its values are loaded as saved.

        Load pre-hooks see the whole checkpoint, ``"inner_lrs"`` included, as torch's see theirs.

        Raises:
            TypeError: ``state_dict["inner_lrs"]`` is not a dict.
            ValueError: ``state_dict`` has no ``"inner_lrs"``, or they lack a rate or hold one
                for an unknown parameter, or a rate is not a real, dense tensor with values (not
                sparse, nested or on the meta device) of its parameter's shape, or cannot be
                copied into the rate (a ``DTensor`` for a plain rate, or the reverse); and as
                :meth:`MetaOptimizer.load_state_dict <samgria.meta.base.MetaOptimizer.load_state_dict>`.
        """
        super().load_state_dict(state_dict)

    def _take_extras(self, state_dict: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        sd = dict(state_dict)
        rates = sd.pop("inner_lrs", None)
        if rates is None:
            raise ValueError(
                "state_dict has no 'inner_lrs' (the learned rates, which MetaSGD.state_dict() saves "
                "beside 'state' and 'param_groups'): the rates would keep their values while the "
                "outer optimizer's state for them is loaded"
            )
        if not isinstance(rates, Mapping):
            raise TypeError(
                f"state_dict['inner_lrs'] must be a dict of {{parameter name: rate tensor}}, got a "
                f"{type(rates).__name__}"
            )
        missing = sorted(set(self.inner_lrs) - set(rates))
        if missing:
            raise ValueError(f"state_dict['inner_lrs'] has no rates for {missing}")
        staged: dict[str, torch.Tensor] = {}
        for n, v in rates.items():
            if n not in self.inner_lrs:
                raise ValueError(f"state_dict['inner_lrs'] has a rate for an unknown parameter {n!r}")
            rate = self.inner_lrs[n]
            where = f"state_dict['inner_lrs'][{n!r}]"
            if not isinstance(v, torch.Tensor) or v.is_complex() or v.dtype == torch.bool:
                what = f"a tensor of dtype {v.dtype}" if isinstance(v, torch.Tensor) else repr(v)
                raise ValueError(
                    f"{where} must be a real tensor (the rates are real step sizes, "
                    f"loaded as {rate.dtype}), got {what}"
                )
            if v.is_nested or v.layout != torch.strided or v.is_meta:
                what = "a nested tensor" if v.is_nested else "a tensor on the meta device" if v.is_meta else f"a {v.layout} tensor"
                raise ValueError(f"{where} must be a dense tensor holding values (copied into the rate), got {what}")
            if tuple(v.shape) != tuple(rate.shape):
                raise ValueError(f"{where} has shape {tuple(v.shape)}, expected {tuple(rate.shape)}")
            # The copy the load makes, made now: whatever torch refuses to copy into the rate
            # (a DTensor into a plain tensor, ...) fails the load before anything changes.
            staged[n] = torch.empty_like(rate, requires_grad=False)
            try:
                with torch.no_grad():
                    staged[n].copy_(v)
            except (RuntimeError, NotImplementedError) as error:
                kind = "a DTensor" if is_sharded(rate) else "a plain tensor"
                raise ValueError(f"{where} cannot be copied into the rate ({kind} of dtype {rate.dtype}): {error}") from error
        return sd, staged

    def _load_extras(self, extras: Any) -> None:
        with torch.no_grad():
            for n, v in extras.items():
                self.inner_lrs[n].copy_(v)  # staged as the rate: of its kind, dtype and shape
