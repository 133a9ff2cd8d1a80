"""The transform protocol shared by every pre-step and post-step transform.

A transform runs around the inner optimizer's step inside
:class:`~samgria.TransformingOptimizer`:

* ``pre_update(ctx)`` runs after the closure's first evaluation and before the inner step; it may
  rewrite gradients or perturb the weights and re-evaluate the closure (SAM).
* ``post_update(ctx)`` runs after the inner step (LAMP).

Hyperparameters that may differ per param group are declared in :meth:`Transform.group_defaults`
and read from each param group; per-parameter state lives in ``ctx.state[p]`` (the wrapping
optimizer's ``state``), so it is checkpointed with :meth:`~torch.optim.Optimizer.state_dict`.

Every transform also speaks the seed protocol :class:`GradientTransform`
(``apply(model, loss_fn, batch)`` before descent and ``post_step(model)`` after it), so it can be
used beside a plain optimizer without the wrapper.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["GradientTransform", "Transform", "TransformContext", "ProtocolTransform", "check_non_negative"]


def check_non_negative(name: str, value: Any) -> None:
    """Raise unless ``value`` is a finite real number ``>= 0`` (messages name ``name`` and ``value``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@runtime_checkable
class GradientTransform(Protocol):
    """The seed protocol: any object with these two methods is a gradient transform.

    ``apply`` runs after ``loss.backward()`` and before ``optimizer.step()``; ``post_step`` runs
    after ``optimizer.step()``. Such an object can be used on its own beside any optimizer, or
    placed in ``TransformingOptimizer(..., transforms=[...])``.
    """

    def apply(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        batch: tuple[Any, ...],
    ) -> None:
        """Pre-descent hook: may rewrite gradients or perturb and re-evaluate."""
        ...

    def post_step(self, model: nn.Module) -> None:
        """Post-descent hook: may modify the updated parameters."""
        ...


@dataclass
class TransformContext:
    """What a transform sees during one optimizer step.

    Attributes:
        param_groups: The optimizer's param groups (dicts with ``"params"`` and hyperparameters).
        state: Per-parameter state, ``state[p]`` is a dict (the optimizer's ``state``).
        reevaluate: Re-runs the closure at the current weights (under grad mode) with the
            parameters' gradients cleared first, and returns its loss; ``None`` when the step
            has no closure (then a transform that needs one must raise).
        foreach: Whether to use the ``torch._foreach_*`` fast path.
        model: The module the closure evaluates, when known (used by protocol adapters).
    """

    param_groups: list[dict[str, Any]]
    state: Mapping[torch.Tensor, dict[str, Any]]
    reevaluate: Callable[[], Any] | None = None
    foreach: bool = True
    model: nn.Module | None = None
    standalone: bool = False


class Transform:
    """Base class of samgria transforms.

    Subclasses override :meth:`pre_update` and/or :meth:`post_update`, declare their per-group
    hyperparameters in :meth:`group_defaults` and check them in :meth:`validate_group`.

    Attributes:
        needs_closure: ``True`` when :meth:`pre_update` re-evaluates the closure.
        state_prefix: Prefix of the keys this transform writes into ``state[p]``; two transforms
            in one optimizer may not share a prefix. ``None`` for stateless transforms.
    """

    needs_closure: bool = False
    state_prefix: str | None = None

    # -- configuration -----------------------------------------------------------------------
    def group_defaults(self) -> dict[str, Any]:
        """Per-group hyperparameters and their defaults (the constructor's values)."""
        return {}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if a param group holds an invalid hyperparameter value."""

    # -- hooks inside TransformingOptimizer ----------------------------------------------------
    def pre_update(self, ctx: TransformContext) -> None:
        """Runs before the inner optimizer's step. Default: nothing."""

    def post_update(self, ctx: TransformContext) -> None:
        """Runs after the inner optimizer's step. Default: nothing."""

    def active(self, param_groups: Iterable[Mapping[str, Any]]) -> bool:
        """Whether the transform would do anything on these groups (e.g. ``rho > 0`` somewhere)."""
        return True

    # -- object-level state (not per parameter) ----------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Object-level state to checkpoint (per-parameter state lives in ``optimizer.state``)."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what :meth:`state_dict` returned."""

    # -- the seed protocol, for use beside a plain optimizer ---------------------------------
    def _standalone_context(
        self, model: nn.Module, reevaluate: Callable[[], Any] | None
    ) -> TransformContext:
        params = [p for p in model.parameters() if p.requires_grad]
        group = {"params": params, **self.group_defaults()}
        if not hasattr(self, "_standalone_state"):
            self._standalone_state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        return TransformContext([group], self._standalone_state, reevaluate, True, model, standalone=True)

    def apply(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        batch: tuple[Any, ...],
    ) -> None:
        """Seed protocol, pre-descent: call after ``loss.backward()``, before ``optimizer.step()``.

        Uses the constructor's hyperparameters for every parameter of ``model``. A transform that
        re-evaluates computes ``loss_fn(*batch).backward()`` itself (gradients cleared first).
        """

        def reevaluate() -> torch.Tensor:
            for param in model.parameters():
                param.grad = None
            with torch.enable_grad():
                loss = loss_fn(*batch)
                loss.backward()
            return loss

        with torch.no_grad():
            self.pre_update(self._standalone_context(model, reevaluate))

    def post_step(self, model: nn.Module) -> None:
        """Seed protocol, post-descent: call after ``optimizer.step()``."""
        with torch.no_grad():
            self.post_update(self._standalone_context(model, None))

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self._repr_items())
        return f"{type(self).__name__}({args})"

    def _repr_items(self) -> list[tuple[str, Any]]:
        return list(self.group_defaults().items())


class _ParameterView(nn.Module):
    """Stands in for the model when a protocol transform runs inside the optimizer without one.

    ``parameters()`` / ``named_parameters()`` yield the optimizer's parameters; calling it raises.
    """

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        super().__init__()
        self._groups = param_groups

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):  # type: ignore[override]
        for group_index, group in enumerate(self._groups):
            for param_index, param in enumerate(group["params"]):
                yield f"{prefix}group{group_index}.{param_index}", param

    def parameters(self, recurse: bool = True):  # type: ignore[override]
        for _, param in self.named_parameters():
            yield param

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "this transform calls the model, but TransformingOptimizer was not given one: pass "
            "model=<your module> to TransformingOptimizer"
        )


class ProtocolTransform(Transform):
    """Adapts any :class:`GradientTransform` (``apply`` + ``post_step``) to the optimizer.

    Inside :meth:`TransformingOptimizer.step`, ``apply`` receives the optimizer's ``model`` (or a
    view of its parameters), a ``loss_fn`` that re-evaluates the closure — the closure already
    back-propagates, so the returned loss is detached and calling ``.backward()`` on it is a
    harmless no-op — and ``batch=()``.
    """

    def __init__(self, transform: GradientTransform) -> None:
        self.transform = transform

    def _model(self, ctx: TransformContext) -> nn.Module:
        return ctx.model if ctx.model is not None else _ParameterView(ctx.param_groups)

    def pre_update(self, ctx: TransformContext) -> None:
        def loss_fn(*_batch: Any) -> torch.Tensor:
            if ctx.reevaluate is None:
                raise RuntimeError(
                    f"{self.transform!r} re-evaluates the loss, which needs a closure: call "
                    "optimizer.step(closure), or use optimizer.first_step() / second_step()"
                )
            loss = ctx.reevaluate()
            if not isinstance(loss, torch.Tensor):
                loss = torch.as_tensor(loss)
            return loss.detach().requires_grad_(True)

        self.transform.apply(self._model(ctx), loss_fn, ())

    def post_update(self, ctx: TransformContext) -> None:
        self.transform.post_step(self._model(ctx))

    def state_dict(self) -> dict[str, Any]:
        method = getattr(self.transform, "state_dict", None)
        return dict(method()) if callable(method) else {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        method = getattr(self.transform, "load_state_dict", None)
        if callable(method):
            method(state_dict)

    def __repr__(self) -> str:
        return repr(self.transform)
