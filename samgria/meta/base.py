"""``MetaOptimizer``: the base of every meta-learner, a ``torch.optim.Optimizer`` over meta-parameters.

A meta-optimizer holds a model whose parameters are the meta-parameters :math:`\\theta` and
an *outer* optimizer that updates them. It adds the inner loop:

* :meth:`MetaOptimizer.adapt` runs differentiable inner steps on a support-set closure and
  returns a :class:`~samgria.meta.learner.Learner` (the fast weights :math:`\\phi_i`);
* :meth:`MetaOptimizer.task_losses` adapts to a list of :class:`~samgria.data.task.Task` at
  once -- with :func:`torch.func.vmap` when the tasks have equal shapes -- and returns the
  post-adaptation query losses;
* :meth:`MetaOptimizer.step` follows the torch convention: the closure adapts per task,
  back-propagates the meta-loss and returns it; ``step`` passes it on to the outer optimizer.
  A closure is passed *through*, so an outer optimizer that evaluates it twice (SAM) works.

The outer optimizer is built from a class (``MAML(model, torch.optim.Adam, lr=1e-3)``) or
given already built (any :class:`torch.optim.Optimizer` over the model's parameters,
including a ``samgria.TransformingOptimizer``). :attr:`MetaOptimizer.param_groups` *is* the
outer optimizer's list, so learning-rate schedulers built on the meta-optimizer drive the outer
learning rate, and :meth:`~MetaOptimizer.state_dict` round-trips the outer state.

Each param group also configures the inner loop: ``inner_lr`` (its step size, default the
constructor's ``inner_lr``) and ``adapt`` (default ``True``; a group with ``adapt=False`` is
not adapted but still receives meta-gradients).

The model itself (parameters and buffers) is never modified by the inner loop; only ``step``
changes it. See :mod:`samgria.meta.functional` for the BatchNorm policy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from samgria._checks import check_real
from samgria._wrapper import WrappingOptimizer
from samgria.data.task import Task
from samgria.meta.functional import check_lr, check_steps
from samgria.meta.inner_optim import InnerStepFn
from samgria.meta.learner import InnerRegFn, Learner
from samgria.meta.vectorize import can_vectorize, second_order_vmap_blocker, vmap_task_losses

__all__ = ["MetaOptimizer"]

LossFn = Callable[[Any, Any], torch.Tensor]

def _check_weight(weight: Any, name: str = "weight") -> float:
    return check_real(name, weight, low=0.0)


class MetaOptimizer(WrappingOptimizer):
    """Base class of the meta-learners: an outer optimizer plus a differentiable inner loop.

    Args:
        model: The module to meta-train; its parameters are the meta-parameters.
        outer: An optimizer class, built as ``outer(param_groups, **outer_kwargs)``, or an
            already built optimizer over (a subset of) ``model``'s parameters.
        inner_lr: Default inner step size :math:`\\alpha \\ge 0` of every param group.
        inner_steps: Default number of inner steps (an ``int >= 0``).
        first_order: Drop second-order terms (do not differentiate through the support
            gradients).
        params: Parameters or param-group dicts of ``model`` to build the outer optimizer
            from (only with an optimizer class; default: all of ``model.parameters()``).
            Groups may carry ``inner_lr`` and ``adapt``.
        **outer_kwargs: Keyword arguments of the outer optimizer class (e.g. ``lr=1e-3``).

    Raises:
        TypeError: ``model`` is not a module, ``outer`` is neither an optimizer class nor an
            optimizer, ``outer_kwargs`` are given with a built optimizer, or an argument has
            the wrong type.
        ValueError: ``inner_lr`` or ``inner_steps`` is negative, or the outer optimizer holds a
            tensor that is not a parameter of ``model``.
    """

    #: Whether fast weights keep a graph to the meta-parameters (``False`` for Reptile).
    _track_graph: bool = True

    def __init__(
        self,
        model: nn.Module,
        outer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        params: Iterable[Any] | None = None,
        **outer_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        inner_lr = check_lr(inner_lr, "inner_lr")
        inner_steps = check_steps(inner_steps, "inner_steps")
        if not isinstance(first_order, bool):
            raise TypeError(f"first_order must be a bool, got {first_order!r}")
        if not any(True for _ in model.parameters()):
            raise ValueError("model has no parameters to meta-train")

        self.model = model
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order
        self._vectorize_failed = False

        if isinstance(outer, type) and issubclass(outer, torch.optim.Optimizer):
            if issubclass(outer, MetaOptimizer):
                raise TypeError(f"outer must be an ordinary optimizer, not a meta-optimizer, got {outer.__name__}")
            groups = self._initial_groups(params)
            built = outer(groups, **outer_kwargs)
        elif isinstance(outer, torch.optim.Optimizer):
            if isinstance(outer, MetaOptimizer):
                raise TypeError(f"outer must be an ordinary optimizer, not a meta-optimizer, got {type(outer).__name__}")
            if outer_kwargs:
                raise TypeError(
                    f"outer_kwargs {sorted(outer_kwargs)} can only be given when outer is an optimizer "
                    f"class; got an already built {type(outer).__name__}"
                )
            if params is not None:
                raise TypeError("params can only be given when outer is an optimizer class")
            built = outer
        else:
            raise TypeError(
                "outer must be a torch.optim.Optimizer subclass or instance, got "
                f"{outer!r} of type {type(outer).__name__}"
            )
        self._init_wrapper(built, {**built.defaults, "inner_lr": inner_lr, "adapt": True})
        for i, group in enumerate(self.outer.param_groups):
            self._fill_group(group, i)

    # ------------------------------------------------------------------ optimizer plumbing
    # param_groups (the outer optimizer's list), state, hooks, pickling and state_dict /
    # load_state_dict come from WrappingOptimizer: torch's own machinery, shared with
    # TransformingOptimizer.
    _driven_attr = "outer"

    def _initial_groups(self, params: Iterable[Any] | None) -> list[dict[str, Any]]:
        if params is None:
            return [{"params": list(self.model.parameters())}]
        if isinstance(params, torch.Tensor):
            raise TypeError(f"params must be an iterable of tensors or dicts, got a {type(params).__name__}")
        items = list(params)
        if not items:
            raise ValueError("params must not be empty")
        if not isinstance(items[0], dict):
            return [{"params": items}]
        return [dict(g) for g in items]

    def _extra_params(self) -> set[torch.Tensor]:
        """Meta-parameters that are not parameters of the model (Meta-SGD's rates)."""
        return set()

    def _fill_group(self, group: dict[str, Any], index: int) -> None:
        group.setdefault("inner_lr", self.inner_lr)
        group.setdefault("adapt", True)
        check_lr(group["inner_lr"], f"param_groups[{index}]['inner_lr']")
        if not isinstance(group["adapt"], bool):
            raise TypeError(f"param_groups[{index}]['adapt'] must be a bool, got {group['adapt']!r}")
        model_params = set(self.model.parameters()) | self._extra_params()
        for p in group["params"]:
            if p not in model_params:
                raise ValueError(
                    f"param_groups[{index}] holds a tensor of shape {tuple(p.shape)} that is not a "
                    f"parameter of model ({type(self.model).__name__})"
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (of the model's parameters) to the outer optimizer.

        ``inner_lr`` and ``adapt`` default to the constructor's values.
        """
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        self._fill_group(group, len(self.param_groups))
        self.outer.add_param_group(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the meta-parameters (delegates to the outer optimizer)."""
        self.outer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply the outer update.

        Args:
            closure: Zeroes the gradients, adapts per task, back-propagates the meta-loss and
                returns it. It is handed to the outer optimizer, which may evaluate it more
                than once (SAM). ``None``: the gradients were already computed by the caller.

        Returns:
            What the outer optimizer's ``step`` returns (the closure's loss).
        """
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable, got {closure!r}")
        return self._driven_step(closure)

    # ------------------------------------------------------------------ inner loop
    def _filter_adapt_names(self, names: list[str]) -> list[str]:
        """Hook for subclasses restricting the adapted parameters (ANIL)."""
        return names

    def _adapt_config(self) -> tuple[list[str], dict[str, float | torch.Tensor]]:
        """Return the adapted parameter names and their inner step sizes, from the groups."""
        name_of = {p: n for n, p in self.model.named_parameters()}
        names: list[str] = []
        lrs: dict[str, float | torch.Tensor] = {}
        for i, group in enumerate(self.param_groups):
            adapt = group.get("adapt", True)
            if not isinstance(adapt, bool):
                raise TypeError(f"param_groups[{i}]['adapt'] must be a bool, got {adapt!r}")
            if not adapt:
                continue
            lr = check_lr(group.get("inner_lr", self.inner_lr), f"param_groups[{i}]['inner_lr']")
            for p in group["params"]:
                n = name_of.get(p)
                if n is None or not p.requires_grad or n in lrs:
                    continue
                names.append(n)
                lrs[n] = lr
        names = self._filter_adapt_names(names)
        return names, {n: lrs[n] for n in names}

    def clone(
        self,
        *,
        inner_step_fn: InnerStepFn | None = None,
        inner_reg_fn: InnerRegFn | None = None,
        grad_transforms: Sequence[Any] | None = None,
    ) -> Learner:
        """Return a :class:`~samgria.meta.learner.Learner` starting at the current meta-parameters.

        The learner's fast weights start as the model's live parameters, so a ``backward()``
        through an adapted learner accumulates meta-gradients into the model.

        Args:
            inner_step_fn: Inner update rule (default: plain SGD with each group's ``inner_lr``).
            inner_reg_fn: ``inner_reg_fn(current_params, base_params) -> scalar`` added to the
                support loss at every inner step.
            grad_transforms: Inner-loop gradient transforms (e.g.
                :class:`~samgria.meta.inner_optim.InnerSAM`).

        Returns:
            A fresh learner.
        """
        names, lrs = self._adapt_config()
        return Learner(
            self.model,
            inner_lr=lrs,
            inner_steps=self.inner_steps,
            first_order=self.first_order,
            adapt_names=names,
            inner_step_fn=inner_step_fn,
            inner_reg_fn=inner_reg_fn,
            grad_transforms=grad_transforms,
            track_graph=self._track_graph,
        )

    def adapt(
        self,
        support_closure: Callable[[Callable[..., Any]], torch.Tensor],
        steps: int | None = None,
        *,
        inner_step_fn: InnerStepFn | None = None,
        inner_reg_fn: InnerRegFn | None = None,
        grad_transforms: Sequence[Any] | None = None,
        weight: float = 1.0,
    ) -> Learner:
        """Run the inner loop on one task and return the adapted learner.

        Args:
            support_closure: ``support_closure(f) -> scalar support loss``, where ``f(*inputs)``
                runs the model with the current fast weights.
            steps: Number of inner steps (default: ``inner_steps``).
            inner_step_fn: Inner update rule (default: plain SGD with each group's ``inner_lr``).
            inner_reg_fn: ``inner_reg_fn(current_params, base_params) -> scalar`` added to the
                support loss at every step.
            grad_transforms: Objects with ``transform_inner_grads(params, grads, loss_fn)``
                applied to the support gradients (e.g. :class:`~samgria.meta.inner_optim.InnerSAM`).
            weight: Task weight (``>= 0``). Used by Reptile's weighted mean; MAML-family
                meta-optimizers accept and ignore it (weights enter through the meta-loss, see
                :meth:`meta_loss`).

        Returns:
            The adapted :class:`~samgria.meta.learner.Learner`; ``learner(x)`` is the adapted
            forward pass and ``learner.params`` the adapted parameters.

        Raises:
            TypeError: ``support_closure`` is not callable or ``steps`` is not an int.
            ValueError: ``steps`` or ``weight`` is negative.
        """
        if not callable(support_closure):
            raise TypeError(f"support_closure must be callable, got {support_closure!r}")
        steps = self.inner_steps if steps is None else check_steps(steps, "steps")
        weight = _check_weight(weight)
        learner = self.clone(inner_step_fn=inner_step_fn, inner_reg_fn=inner_reg_fn, grad_transforms=grad_transforms)
        learner.adapt_closure(support_closure, steps)
        self._record(learner, weight)
        return learner

    def _record(self, learner: Learner, weight: float) -> None:
        """Hook: remember an adapted learner for ``step`` (Reptile). No-op here."""

    def _check_tasks(self, tasks: Any) -> list[Task]:
        if isinstance(tasks, Task) or not isinstance(tasks, Sequence):
            raise TypeError(f"tasks must be a sequence of Task, got {type(tasks).__name__}")
        tasks = list(tasks)
        if not tasks:
            raise ValueError("tasks must be a non-empty sequence of Task, got 0 tasks")
        for i, t in enumerate(tasks):
            if not isinstance(t, Task):
                raise TypeError(f"tasks[{i}] must be a Task, got {type(t).__name__}")
        return tasks

    def _run_tasks(
        self,
        tasks: list[Task],
        loss_fn: LossFn,
        steps: int,
        vectorize: bool | None,
        *,
        first_order: bool,
        track_graph: bool,
        return_params: bool,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]] | None]:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        if vectorize is not None and not isinstance(vectorize, bool):
            raise TypeError(f"vectorize must be None or a bool, got {vectorize!r}")
        names, lrs = self._adapt_config()
        equal = can_vectorize(tasks)
        if vectorize is True and not equal:
            raise ValueError("vectorize=True needs tasks whose tensors all have equal shapes, dtypes and devices")
        use_vmap = vectorize is True or (vectorize is None and equal and not self._vectorize_failed)
        second_order = track_graph and not first_order
        blocker = second_order_vmap_blocker(self.model) if (use_vmap and second_order) else None
        if blocker is not None:
            if vectorize is True:
                raise ValueError(
                    f"vectorize=True cannot be honoured: torch.func.vmap gives wrong second-order "
                    f"gradients through {blocker} (pytorch/functorch#534); use vectorize=None/False "
                    "or a first-order meta-learner"
                )
            use_vmap = False
        vmap_error: Exception | None = None
        if use_vmap:
            params = dict(self.model.named_parameters())
            vm_lrs = lrs
            if not track_graph:
                params = {n: p.detach() for n, p in params.items()}
                vm_lrs = {n: (v.detach() if isinstance(v, torch.Tensor) else v) for n, v in lrs.items()}
            try:
                with torch.set_grad_enabled(track_graph and torch.is_grad_enabled()):
                    losses, fast = vmap_task_losses(
                        self.model,
                        params,
                        names,
                        vm_lrs,
                        tasks,
                        loss_fn,
                        steps,
                        first_order=first_order or not track_graph,
                        return_params=return_params,
                    )
            except ValueError:
                raise
            except Exception as exc:  # maybe a model that cannot be vmapped: try the loop
                if vectorize is True:
                    raise RuntimeError(f"vectorize=True but vmap over tasks failed: {exc}") from exc
                vmap_error = exc
            else:
                per_task = None
                if return_params:
                    assert fast is not None
                    per_task = [{n: v[i] for n, v in fast.items()} for i in range(len(tasks))]
                return losses, per_task

        losses_list = []
        adapted: list[dict[str, torch.Tensor]] = []
        for i, task in enumerate(tasks):
            learner = Learner(
                self.model,
                inner_lr=lrs,
                inner_steps=steps,
                first_order=first_order,
                adapt_names=names,
                track_graph=track_graph,
            )
            learner.adapt_on(loss_fn, task.support_x, task.support_y, steps)
            with torch.set_grad_enabled(track_graph and torch.is_grad_enabled()):
                loss = loss_fn(learner(task.query_x), task.query_y)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"loss_fn must return a scalar per task, got {shape} for tasks[{i}]")
            losses_list.append(loss)
            if return_params:
                adapted.append({n: learner.params[n].detach() for n in names})
        if vmap_error is not None:
            # Only now, when the loop worked, is the error vmap's and not the user's loss_fn's.
            self._vectorize_failed = True
            warnings.warn(
                f"{type(self).__name__}: vmap over tasks failed ({type(vmap_error).__name__}: {vmap_error}); "
                "falling back to a per-task loop from now on (pass vectorize=False to skip the attempt)",
                RuntimeWarning,
                stacklevel=3,
            )
        return torch.stack(losses_list), (adapted if return_params else None)

    def task_losses(
        self,
        tasks: Sequence[Task],
        loss_fn: LossFn,
        *,
        steps: int | None = None,
        vectorize: bool | None = None,
        create_graph: bool | None = None,
    ) -> torch.Tensor:
        """Adapt to each task on its support set and return the query losses after adaptation.

        Args:
            tasks: The meta-batch (a non-empty sequence of :class:`~samgria.data.task.Task`).
            loss_fn: ``loss_fn(prediction, target) -> scalar``, used for support and query.
            steps: Number of inner steps (default: ``inner_steps``).
            vectorize: ``None`` uses :func:`torch.func.vmap` over tasks when all tasks have
                equal shapes, falling back (once, with a warning, remembered) to a loop if the
                model cannot be vmapped; ``True`` forces vmap (raises if impossible);
                ``False`` forces the loop.
            create_graph: Differentiate through the inner loop (second order). Default:
                ``not first_order``. ``False`` still gives first-order meta-gradients.

        Returns:
            A tensor of shape ``(len(tasks),)``, differentiable w.r.t. the meta-parameters.

        Raises:
            ValueError: ``tasks`` is empty, or ``vectorize=True`` with tasks of unequal shapes.
            TypeError: ``tasks`` holds something that is not a Task.
        """
        tasks = self._check_tasks(tasks)
        steps = self.inner_steps if steps is None else check_steps(steps, "steps")
        if create_graph is None:
            create_graph = not self.first_order
        if not isinstance(create_graph, bool):
            raise TypeError(f"create_graph must be None or a bool, got {create_graph!r}")
        losses, _ = self._run_tasks(
            tasks,
            loss_fn,
            steps,
            vectorize,
            first_order=not create_graph,
            track_graph=self._track_graph,
            return_params=False,
        )
        return losses

    @torch.no_grad()
    def evaluate(self, tasks: Sequence[Task], loss_fn: LossFn, steps: int | None = None) -> float:
        """Mean post-adaptation query loss over ``tasks``, without a meta-gradient graph.

        The inner loop runs on detached copies of the meta-parameters, so the model, its
        gradients and the outer optimizer are left untouched.

        Args:
            tasks: Held-out tasks (non-empty).
            loss_fn: ``loss_fn(prediction, target) -> scalar``.
            steps: Number of inner steps (default: ``inner_steps``).

        Returns:
            The mean query loss as a float.
        """
        tasks = self._check_tasks(tasks)
        steps = self.inner_steps if steps is None else check_steps(steps, "steps")
        losses, _ = self._run_tasks(
            tasks, loss_fn, steps, None, first_order=True, track_graph=False, return_params=False
        )
        return float(losses.mean())

    @staticmethod
    def meta_loss(losses: Sequence[torch.Tensor] | torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
        """Weighted mean of per-task query losses, :math:`\\sum_i w_i \\ell_i / \\sum_i w_i`.

        Args:
            losses: Per-task scalar losses (a 1-D tensor or a sequence of scalars).
            weights: Per-task weights ``>= 0`` (default: all equal), one per loss.

        Returns:
            The scalar meta-loss.

        Raises:
            ValueError: No losses, a count mismatch between ``losses`` and ``weights``, a
                negative weight, or weights summing to zero.
        """
        if isinstance(losses, torch.Tensor):
            if losses.dim() != 1:
                raise ValueError(f"losses must be 1-D (one per task), got shape {tuple(losses.shape)}")
            stacked = losses
        else:
            items = list(losses)
            if not items:
                raise ValueError("losses must hold at least one task loss, got 0")
            stacked = torch.stack([torch.as_tensor(v) for v in items])
        if stacked.numel() == 0:
            raise ValueError("losses must hold at least one task loss, got 0")
        if weights is None:
            return stacked.mean()
        w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device).detach()
        if w.dim() != 1 or w.numel() != stacked.numel():
            raise ValueError(
                f"weights must hold one weight per task loss: got {w.numel()} weights for {stacked.numel()} losses"
            )
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
        total = w.sum()
        if float(total) == 0.0:
            raise ValueError("weights must not all be 0")
        return (w * stacked).sum() / total

    def __repr__(self) -> str:
        groups = []
        for i, g in enumerate(self.param_groups):
            keys = ", ".join(f"{k}={g[k]!r}" for k in sorted(g) if k != "params")
            groups.append(f"  group {i}: {len(g['params'])} tensors, {keys}")
        body = "\n".join(groups)
        return (
            f"{type(self).__name__}(outer={type(self.outer).__name__}, inner_steps={self.inner_steps}, "
            f"first_order={self.first_order}\n{body}\n)"
        )
