"""``TransformingOptimizer``: any torch optimizer plus a chain of pre- and post-step transforms."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import nn
from torch.optim import Optimizer

from samgria.functional._grouping import group_indices_by_device_and_dtype
from samgria.transforms.base import GradientTransform, ProtocolTransform, Transform, TransformContext
from samgria.transforms.sam import ASAM, SAM, Perturbation, PerturbationTransform

__all__ = ["TransformingOptimizer", "sam_optimizer"]

_NEEDS_CLOSURE_MESSAGE = (
    "{names} re-evaluate(s) the loss, so step() needs a closure: call optimizer.step(closure), or "
    "call optimizer.first_step() after the first backward and optimizer.second_step() after the "
    "second (loops without a closure, e.g. AMP)"
)


@dataclass
class _PendingStep:
    """What ``first_step`` left for ``second_step``: the perturbation and where to resume."""

    perturbation: Perturbation | None
    resume_at: int


def _as_transform(index: int, transform: Any) -> Transform:
    if isinstance(transform, Transform):
        return transform
    if isinstance(transform, type):
        raise TypeError(
            f"transforms[{index}] is the class {transform.__name__}; pass an instance, "
            f"e.g. {transform.__name__}()"
        )
    if isinstance(transform, GradientTransform):
        return ProtocolTransform(transform)
    raise TypeError(
        f"transforms[{index}] must be a samgria Transform or an object with "
        f"apply(model, loss_fn, batch) and post_step(model) methods, got {transform!r}"
    )


class TransformingOptimizer(Optimizer):
    r"""Wraps any optimizer and runs a chain of transforms around its step.

    ``loss = optimizer.step(closure)`` evaluates the closure (under grad mode) at the current
    weights, runs every transform's pre-step hook in list order (SAM perturbs, re-evaluates the
    closure and restores the weights exactly), steps the inner optimizer, runs every transform's
    post-step hook in list order (LAMP), and returns the loss of the first evaluation.

    The optimizer is a real :class:`torch.optim.Optimizer`: ``param_groups`` *are* the inner
    optimizer's (one list), so LR schedulers, ``add_param_group`` and ``lr`` edits reach it.
    Transform hyperparameters (``rho``, ``eta``, …) live in the param groups too: the transform's
    constructor values are the defaults and a group may override them. ``state[p]`` holds the
    transforms' per-parameter state; the inner optimizer keeps its own in ``inner.state``.
    ``state_dict()`` holds both, so a resumed run continues bit for bit.

    Args:
        params: Parameters or param-group dicts for the inner optimizer — or an already built
            optimizer to wrap (then ``inner`` and ``inner_kwargs`` must be omitted).
        inner: A :class:`torch.optim.Optimizer` subclass, or any callable returning an optimizer,
            called as ``inner(params, **inner_kwargs)``.
        transforms: Transforms in order (:class:`~samgria.SAM`, :class:`~samgria.ASAM`,
            :class:`~samgria.LAMP`, or any object with ``apply`` and ``post_step``).
        model: The module the closure evaluates; only handed to seed-protocol transforms.
        first_pass_context: Callable returning a context manager entered around the closure's
            first evaluation, e.g. ``ddp_model.no_sync`` so each replica perturbs with its own
            gradient (the SAM paper's m-sharpness; saves one all-reduce).
        reevaluation_context: Callable returning a context manager entered around every
            re-evaluation by a transform, e.g. ``lambda: frozen_bn_stats(model)``.
        transform_foreach: Use the ``torch._foreach_*`` kernels in transforms (default ``True``);
            ``False`` takes the per-tensor reference path.
        **inner_kwargs: Passed to ``inner`` (``lr``, ``momentum``, ``foreach``, …).

    Raises:
        TypeError: If ``inner`` is not an optimizer class or factory, or a transform lacks the hooks.
        ValueError: If a transform hyperparameter is invalid or a transform's param-group key
            collides with one of the inner optimizer's.
    """

    #: GradScaler calls ``step()`` even after an overflow and lets it unscale and skip (see
    #: :meth:`step`), so a skipped step still restores the weights perturbed by ``first_step``.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any] | Optimizer,
        inner: type[Optimizer] | Callable[..., Optimizer] | None = None,
        *,
        transforms: Sequence[Any] | Transform = (),
        model: nn.Module | None = None,
        first_pass_context: Callable[[], ContextManager[Any]] | None = None,
        reevaluation_context: Callable[[], ContextManager[Any]] | None = None,
        transform_foreach: bool | None = None,
        **inner_kwargs: Any,
    ) -> None:
        inner_optimizer = self._build_inner(params, inner, inner_kwargs)
        if isinstance(transforms, Transform) or (
            not isinstance(transforms, (list, tuple)) and isinstance(transforms, GradientTransform)
        ):
            transforms = [transforms]
        if not isinstance(transforms, Iterable):
            raise TypeError(f"transforms must be a sequence of transforms, got {transforms!r}")
        chain = [_as_transform(i, t) for i, t in enumerate(transforms)]
        transform_defaults = self._check_chain(chain, inner_optimizer)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {model!r}")
        for name, value in (
            ("first_pass_context", first_pass_context),
            ("reevaluation_context", reevaluation_context),
        ):
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be a callable returning a context manager, got {value!r}")
        self.transforms: list[Transform] = chain
        self._transform_defaults = transform_defaults
        # Validate every group before touching any of them: nothing half-applied on error.
        for group in inner_optimizer.param_groups:
            self._check_group(group)
        for group in inner_optimizer.param_groups:
            self._fill_group(group)

        self.inner = inner_optimizer
        self.model = model
        self.first_pass_context = first_pass_context
        self.reevaluation_context = reevaluation_context
        self.transform_foreach = True if transform_foreach is None else bool(transform_foreach)
        self._pending: _PendingStep | None = None
        # What torch.optim.Optimizer.__init__ sets up, minus building param groups: ours are the
        # inner optimizer's.
        self.defaults = {**inner_optimizer.defaults, **transform_defaults}
        self.state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        self._init_hooks()

    # -- construction helpers ------------------------------------------------------------------
    @staticmethod
    def _build_inner(params: Any, inner: Any, inner_kwargs: dict[str, Any]) -> Optimizer:
        if isinstance(params, Optimizer):
            if inner is not None or inner_kwargs:
                raise TypeError(
                    "when wrapping an existing optimizer, pass no inner optimizer or inner "
                    f"arguments; got inner={inner!r} and {sorted(inner_kwargs)}"
                )
            return params
        if inner is None:
            raise TypeError(
                "inner must be a torch.optim.Optimizer subclass or a callable returning one, got None "
                "(e.g. TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1))"
            )
        if isinstance(inner, Optimizer):
            raise TypeError(
                f"inner must be an optimizer class or factory, got the optimizer instance {inner!r}; "
                "to wrap an existing optimizer use TransformingOptimizer(optimizer, transforms=...)"
            )
        if isinstance(inner, type) and not issubclass(inner, Optimizer):
            raise TypeError(
                f"inner must be a torch.optim.Optimizer subclass or a callable returning one, got {inner!r}"
            )
        if not callable(inner):
            raise TypeError(
                f"inner must be a torch.optim.Optimizer subclass or a callable returning one, got {inner!r}"
            )
        built = inner(params, **inner_kwargs)
        if not isinstance(built, Optimizer):
            raise TypeError(f"inner must build a torch.optim.Optimizer, but {inner!r} returned {built!r}")
        return built

    @staticmethod
    def _check_chain(chain: list[Transform], inner: Optimizer) -> dict[str, Any]:
        defaults: dict[str, Any] = {}
        owner: dict[str, Transform] = {}
        prefixes: dict[str, Transform] = {}
        for transform in chain:
            for key, value in transform.group_defaults().items():
                if key in inner.defaults or key == "params":
                    raise ValueError(
                        f"{type(transform).__name__}'s param-group key {key!r} collides with a key of "
                        f"the inner optimizer {type(inner).__name__}; the two cannot share a param group"
                    )
                if key in defaults and defaults[key] != value:
                    raise ValueError(
                        f"{owner[key]!r} and {transform!r} both configure the param-group key {key!r} "
                        f"with different defaults ({defaults[key]!r} and {value!r})"
                    )
                defaults[key] = value
                owner[key] = transform
            prefix = transform.state_prefix
            if prefix is not None:
                if prefix in prefixes:
                    raise ValueError(
                        f"{prefixes[prefix]!r} and {transform!r} would share optimizer state "
                        f"(prefix {prefix!r}); use one of them"
                    )
                prefixes[prefix] = transform
        return defaults

    def _init_hooks(self) -> None:
        from collections import OrderedDict

        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._patch_step_function()

    # -- param groups are the inner optimizer's -------------------------------------------------
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner optimizer's param groups (the same list object)."""
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.inner.param_groups = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer, filling in and checking transform hyperparameters."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        self._check_group(param_group)
        self._fill_group(param_group)
        self.inner.add_param_group(param_group)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        """Validate a group's transform hyperparameters as they will be once defaults are filled in."""
        candidate = {**self._transform_defaults, **group}
        for transform in self.transforms:
            transform.validate_group(candidate)

    def _fill_group(self, group: dict[str, Any]) -> None:
        """Give a group every transform hyperparameter it does not set (the constructor's values)."""
        for key, value in self._transform_defaults.items():
            group.setdefault(key, value)

    # -- the step ----------------------------------------------------------------------------------
    def _context(self, reevaluate: Callable[[], Any] | None) -> TransformContext:
        return TransformContext(
            param_groups=self.param_groups,
            state=self.state,
            reevaluate=reevaluate,
            foreach=self.transform_foreach,
            model=self.model,
        )

    def _validate_groups(self) -> None:
        for group in self.param_groups:
            for transform in self.transforms:
                transform.validate_group(group)

    def _enter(self, factory: Callable[[], ContextManager[Any]] | None) -> ContextManager[Any]:
        return factory() if factory is not None else contextlib.nullcontext()

    def _amp_skip_or_unscale(self) -> bool:
        """Apply GradScaler's verdict when it called us: ``True`` means skip this step.

        ``torch.amp.GradScaler.step`` sets ``found_inf`` and ``grad_scale`` on an optimizer whose
        ``_step_supports_amp_scaling`` is true, and calls ``step()`` even after an overflow.
        """
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return False
        if float(found_inf) != 0.0:
            return True
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            inv_scale = grad_scale.double().reciprocal().float()
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            for (device, _dtype), indices in group_indices_by_device_and_dtype(grads).items():
                torch._foreach_mul_([grads[i] for i in indices], inv_scale.to(device))
        return False

    def _finish(self, ctx: TransformContext, resume_at: int) -> None:
        """Pre-step transforms from ``resume_at`` on, the inner step, the post-step transforms."""
        for transform in self.transforms[resume_at:]:
            transform.pre_update(ctx)
        self.inner.step()
        for transform in self.transforms:
            transform.post_update(ctx)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step.

        Args:
            closure: Re-evaluates the model: zero the gradients, compute the loss, call
                ``backward()`` and return the loss. Required when a transform re-evaluates (SAM,
                ASAM) unless :meth:`first_step` was called; then ``step()`` without a closure
                finishes the step like :meth:`second_step`.

        Returns:
            The closure's loss at the current weights (its first evaluation), or ``None``.
        """
        if self._pending is not None:
            if closure is not None:
                raise RuntimeError(
                    "first_step() was called: finish this step with second_step() (or step() "
                    "without a closure) before calling step(closure)"
                )
            pending, self._pending = self._pending, None
            if pending.perturbation is not None:
                pending.perturbation.restore()
            if self._amp_skip_or_unscale():
                return None
            with torch.no_grad():
                self._finish(self._context(None), pending.resume_at)
            return None

        self._validate_groups()
        if closure is None:
            needing = [t for t in self.transforms if t.needs_closure]
            if needing:
                names = ", ".join(type(t).__name__ for t in needing)
                raise RuntimeError(_NEEDS_CLOSURE_MESSAGE.format(names=names))
            if self._amp_skip_or_unscale():
                return None
            with torch.no_grad():
                self._finish(self._context(None), 0)
            return None

        with torch.enable_grad(), self._enter(self.first_pass_context):
            loss = closure()

        def reevaluate() -> Any:
            self.zero_grad(set_to_none=True)
            with torch.enable_grad(), self._enter(self.reevaluation_context):
                return closure()

        with torch.no_grad():
            self._finish(self._context(reevaluate), 0)
        return loss

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """First half of a step for loops without a closure (AMP, Hugging Face style).

        Call after the first ``backward()``: runs the pre-step transforms up to the re-evaluating
        one (SAM), which moves the weights to :math:`w + e`. The gradients of the perturbed
        parameters are consumed (set to ``None``). Then run the second forward and backward and
        call :meth:`second_step`. Equal bit for bit to ``step(closure)``.

        If the gradient norm is not finite (e.g. an fp16 overflow under ``GradScaler``), nothing
        is perturbed and the gradients are kept even with ``zero_grad=True``: the second backward
        accumulates onto them, so ``scaler.step`` sees the overflow, skips the step and backs off.

        Every gradient is cleared afterwards, as ``step(closure)`` clears them before its second
        evaluation, so the second backward starts from zero (otherwise a group with ``rho=0``
        would step with the sum of both passes' gradients).

        Args:
            zero_grad: Accepted for compatibility with the widely used PyTorch SAM; the gradients
                are cleared either way.
        """
        if self._pending is not None:
            raise RuntimeError(
                "first_step() was called twice; call second_step() in between, or cancel_step() "
                "to abandon the step"
            )
        self._validate_groups()
        reevaluating = [i for i, t in enumerate(self.transforms) if t.needs_closure]
        if len(reevaluating) > 1:
            raise RuntimeError(
                "first_step()/second_step() support one re-evaluating transform; this chain has "
                f"{len(reevaluating)}: use optimizer.step(closure)"
            )
        ctx = self._context(None)
        # Transforms before the re-evaluating one act on the first gradients; the rest act on the
        # second ones in second_step (all of them when nothing re-evaluates).
        split = reevaluating[0] if reevaluating else 0
        for transform in self.transforms[:split]:
            transform.pre_update(ctx)
        perturbation = None
        if reevaluating:
            transform = self.transforms[split]
            if not isinstance(transform, PerturbationTransform):
                raise RuntimeError(
                    f"{transform!r} does not support first_step()/second_step(); use step(closure)"
                )
            perturbation = transform.perturb(ctx)
        self._pending = _PendingStep(perturbation, split + 1 if reevaluating else 0)
        if perturbation is not None and perturbation.non_finite:
            # Keep the non-finite gradients: the second backward accumulates onto them, so the
            # step sees the overflow too (GradScaler skips it and backs off; without a scaler the
            # inner optimizer gets what it would have got without SAM).
            return
        # Like step(closure)'s re-evaluation: the second backward starts from empty gradients.
        self.zero_grad(set_to_none=True)

    def cancel_step(self) -> None:
        """Abandon a step begun by :meth:`first_step` (e.g. the second pass raised).

        Restores the weights exactly; the inner optimizer and the post-step transforms do not run.
        Does nothing when no step is pending.
        """
        pending, self._pending = self._pending, None
        if pending is not None and pending.perturbation is not None:
            pending.perturbation.restore()

    def second_step(self, zero_grad: bool = False) -> None:
        """Second half: restore the weights, step the inner optimizer, run post-step transforms.

        Call after the second ``backward()``. Goes through :meth:`step`, so step hooks run and an
        LR scheduler sees the optimizer step.

        Args:
            zero_grad: Clear every gradient afterwards.
        """
        if self._pending is None:
            raise RuntimeError("second_step() called without first_step()")
        self.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    # -- checkpoints -----------------------------------------------------------------------------
    def _ordered_params(self) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for group in self.param_groups:
            for param in group["params"]:
                seen.setdefault(id(param), param)
        return list(seen.values())

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's ``state_dict`` plus ``transform_state`` and ``transforms``.

        ``transform_state`` maps the parameter index (torch's numbering) to that parameter's
        transform state; ``transforms`` holds each transform's object-level state.
        """
        if self._pending is not None:
            raise RuntimeError("state_dict() between first_step() and second_step(): finish the step first")
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        inner_state = self.inner.state_dict()
        index_of = {id(p): i for i, p in enumerate(self._ordered_params())}
        transform_state = {
            index_of[id(param)]: dict(param_state)
            for param, param_state in self.state.items()
            if param_state and id(param) in index_of
        }
        state_dict = {
            "state": inner_state["state"],
            "param_groups": inner_state["param_groups"],
            "transform_state": transform_state,
            "transforms": [t.state_dict() for t in self.transforms],
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Load a checkpoint made by :meth:`state_dict` (or a plain inner optimizer's)."""
        if self._pending is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step()")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        params = self._ordered_params()
        transform_state = state_dict.get("transform_state", {})
        for index in transform_state:
            if not 0 <= int(index) < len(params):
                raise ValueError(
                    f"transform_state refers to parameter index {index}, but the optimizer has "
                    f"{len(params)} parameters"
                )
        saved_transforms = state_dict.get("transforms", [{} for _ in self.transforms])
        if len(saved_transforms) != len(self.transforms):
            raise ValueError(
                f"the checkpoint holds state for {len(saved_transforms)} transforms, this optimizer "
                f"has {len(self.transforms)}"
            )
        self.inner.load_state_dict({"state": state_dict["state"], "param_groups": state_dict["param_groups"]})
        for group in self.param_groups:
            self._fill_group(group)
        self.state = defaultdict(dict)
        for index, param_state in transform_state.items():
            param = params[int(index)]
            self.state[param] = {
                key: value.to(device=param.device).clone() if isinstance(value, torch.Tensor) else value
                for key, value in param_state.items()
            }
        for transform, saved in zip(self.transforms, saved_transforms):
            transform.load_state_dict(saved)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # -- pickling and printing -------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:  # type: ignore[override]
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        transforms = ", ".join(repr(t) for t in self.transforms)
        inner = "\n    ".join(repr(self.inner).splitlines())
        return f"{type(self).__name__}(\n  inner={inner},\n  transforms=[{transforms}]\n)"


def sam_optimizer(
    params: Iterable[Any],
    base_optimizer: type[Optimizer] | Callable[..., Optimizer],
    rho: float = 0.05,
    adaptive: bool = False,
    **kwargs: Any,
) -> TransformingOptimizer:
    """The familiar ``SAM(params, base_optimizer, rho=0.05, adaptive=False, **kwargs)`` constructor.

    Returns a :class:`TransformingOptimizer` with :class:`~samgria.SAM` (or :class:`~samgria.ASAM`
    with ``eta=0.01`` when ``adaptive=True``) around ``base_optimizer(params, **kwargs)``, so
    ``first_step``/``second_step`` loops written for the widely used PyTorch SAM keep working.
    """
    transform: Transform = ASAM(rho=rho) if adaptive else SAM(rho=rho)
    return TransformingOptimizer(params, base_optimizer, transforms=[transform], **kwargs)
