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

With ``distributed=True`` each process (rank) adapts its own share of the meta-batch and
``step`` all-reduces the outer gradient, weighted by each rank's tasks, before the outer
optimizer uses it (:mod:`samgria.meta.distributed`): the update equals one process adapting the
whole meta-batch.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from samgria._checks import check_bool, check_choice, check_optional_bool, check_real
from samgria._frameworks import accelerate_accumulation, refuse_closure_under_grad_scaler
from samgria._snapshot import StateStructure, StepSnapshot, ValuesOutsideState
from samgria._wrapper import (
    WrappingOptimizer,
    checks_before_writing,
    eager_under_compile,
    is_torch_optimizer,
    refuse_driven,
    warn_of_hooks_not_run,
)
from samgria.data.task import Task
from samgria.functional import all_finite
from samgria.meta import distributed as collectives
from samgria.meta import engine
from samgria.meta.engine import InnerLoop, InnerRegFn, check_inner_options, refuse_unvectorisable, vmap_blocker
from samgria.meta.functional import check_lr, check_steps, one_steps_argument
from samgria.meta.inner_optim import InnerStepFn, sgd_inner_step
from samgria.meta.learner import Learner
from samgria._frameworks import stacklevel_outside
from samgria.meta.paths import PathPolicy
from samgria.optim import TransformingOptimizer

__all__ = ["MetaOptimizer"]

LossFn = Callable[[Any, Any], torch.Tensor]

def rng_untouched(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """A fork of torch's global random state (the CPU's and that of every CUDA device ``model``
    is on) for an evaluation: dropout inside draws from the fork, so evaluating leaves the numbers
    that training draws next as they were."""
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    return torch.random.fork_rng(devices=cuda)


def _path_of(vectorize: Any) -> str | None:
    """The path a ``vectorize`` argument asks for (``None``: the policy chooses)."""
    vectorize = check_optional_bool("vectorize", vectorize)
    return None if vectorize is None else ("vmap" if vectorize else "loop")


def _check_weight(weight: Any, name: str = "weight") -> float:
    return check_real(name, weight, low=0.0)


def _refuse_truth_values(weights: Sequence[Any] | torch.Tensor) -> None:
    """Raise the ``TypeError`` that :func:`_check_weight` raises for a truth value, for the first
    ``bool`` among ``weights`` (a boolean tensor, or items that are ``bool`` or NumPy booleans):
    ``torch.as_tensor`` would read ``True`` as 1."""
    if isinstance(weights, torch.Tensor):
        if weights.dtype == torch.bool:
            raise TypeError(f"weights must be finite numbers >= 0, got a tensor of dtype torch.bool: {weights.tolist()}")
        return
    if not isinstance(weights, Iterable) or getattr(weights, "ndim", None) == 0:
        return  # a single number (or a 0-d array): the shape check names it
    for index, weight in enumerate(weights):
        numpy_bool = type(weight).__module__ == "numpy" and type(weight).__name__ in ("bool", "bool_")
        boolean = isinstance(weight, bool) or numpy_bool or (
            isinstance(weight, torch.Tensor) and weight.dtype == torch.bool
        )
        if boolean:
            _check_weight(weight, f"weights[{index}]")


def _weights_with_graph(weights: Sequence[Any] | torch.Tensor) -> torch.Tensor | None:
    """``weights`` as one tensor when it requires grad (a tensor, or a sequence holding tensors
    that do; learned task weights), so that the meta-loss is differentiated with respect to them
    too; ``None`` for weights that are constants."""
    if isinstance(weights, torch.Tensor):
        return weights if weights.requires_grad and not weights.is_complex() else None
    if not isinstance(weights, Sequence) or not any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in weights
    ):
        return None
    items = [x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64) for x in weights]
    if any(x.numel() != 1 or x.is_complex() for x in items):
        return None  # refused with the message of any other such weights
    device = next(x.device for x in items if x.requires_grad)
    return torch.stack([x.reshape(()).to(device=device, dtype=torch.float64) for x in items])


def _evaluates_before_writing(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is one of torch.optim's own, which evaluate the closure once, before
    they write, and check a param group's inputs before writing its tensors -- but LBFGS, which
    steps between evaluations, and Adafactor and Muon (``checks_before_writing``). Nothing is
    assumed of any other optimizer."""
    return checks_before_writing(optimizer) and not isinstance(optimizer, torch.optim.LBFGS)


class _WholeStepUndo:
    """Copies of the weights and of the outer state (a :class:`StepSnapshot`) and, for a driven
    optimizer that is not one of torch.optim's own, its param groups' values and its instance
    attributes: such an optimizer may count in its groups (``group["step"] += 1``, ScheduleFree's
    ``weight_sum``) or on itself (StableSPAM's ``total_step``, in its checkpoints) before it fails
    (torch's keep nothing there)."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        state: Any,
        groups: Sequence[dict[str, Any]],
        driven: torch.optim.Optimizer,
    ) -> None:
        self._snapshot = StepSnapshot(params, state)
        self._outside_state = None if is_torch_optimizer(driven) else ValuesOutsideState(groups, driven)

    def restore(self) -> None:
        self._snapshot.restore()
        if self._outside_state is not None:
            self._outside_state.restore()


class _SkippedByPolicy(FloatingPointError):
    """The ``FloatingPointError`` of ``non_finite="raise"``: the meta-step was judged and skipped
    (what it consumes -- Reptile's record of adapted tasks, the task weight -- is consumed, as by
    a skipped step), unlike a step that failed on its own."""


class _NonFiniteMetaStep(Exception):
    """Raised inside the closure to abort an outer step before it changes anything."""

    def __init__(self, problem: str, loss: Any) -> None:
        super().__init__(problem)
        self.problem, self.loss = problem, loss


class MetaOptimizer(WrappingOptimizer):
    """Base class of the meta-learners: an outer optimizer plus a differentiable inner loop.

    Args:
        model: The module to meta-train; its parameters are the meta-parameters.
        outer: An optimizer class, built as ``outer(param_groups, **outer_kwargs)``, or an
            already built optimizer over (a subset of) ``model``'s parameters. A built one is
            taken over (its state and groups become the meta-optimizer's) only once every
            argument and group is checked: a constructor that raises leaves it as it was.
            Hooks registered on it before are not run by the meta-optimizer (it steps, saves
            and loads with its own: register them there); a ``UserWarning`` says so. One with
            ``maximize=True`` ascends the meta-loss the closure back-propagates (the inner loop
            still descends the support loss); Reptile refuses it.
        inner_lr: Default inner step size :math:`\\alpha \\ge 0` of every param group.
        inner_steps: Default number of inner steps (an ``int >= 0``).
        first_order: Drop second-order terms (do not differentiate through the support
            gradients).
        params: Parameters or param-group dicts of ``model`` to build the outer optimizer
            from (only with an optimizer class; default: all of ``model.parameters()``).
            Groups may carry ``inner_lr`` and ``adapt``.
        checkpoint_inner_steps: Recompute each second-order inner step in the backward pass
            instead of storing its activations (:func:`torch.utils.checkpoint.checkpoint`): the
            live tensor memory of a meta-step grows by one set of weights per inner step instead
            of a whole step's activations and graph (0.21x at 50 steps on conv4), for a
            recomputed forward and backward per step (1.2-1.9x the time). Same meta-gradient,
            bit for bit. Runs on the loop path. See the benchmarks page for process memory.
            The recomputation calls the support closure of :meth:`adapt` again, in the
            backward pass: it must compute the same loss then (bind a loop variable,
            ``lambda f, task=task: ...``); one that does not raises ``RuntimeError`` there.
        non_finite: ``"skip"`` (default): a meta-step whose update is not finite -- the
            meta-loss or a meta-gradient of the MAML family, Reptile's pseudo-gradient (its loss
            is monitoring only) -- is skipped whole (weights and outer state untouched, whatever
            the outer optimizer, LBFGS included) with a ``RuntimeWarning``, counted in
            :attr:`skipped_steps`; ``"raise"`` raises :class:`FloatingPointError` instead
            (nothing applied either).
        distributed: Meta-train across the processes of a ``torch.distributed`` process group
            (which must be initialised): each rank adapts its own tasks, and every outer step
            replaces the gradients by their task-weighted mean over the ranks,
            :math:`g = \\sum_r W_r g_r / \\sum_r W_r` with :math:`W_r` the summed weights of the
            tasks rank :math:`r` adapted in the step (:meth:`add_task_weight`), before the
            non-finite check and the outer optimizer; the returned meta-loss is the same mean.
            :meth:`evaluate` returns the mean over every rank's tasks. Building the
            meta-optimizer copies rank 0's parameters and buffers to every rank (as
            ``DistributedDataParallel`` does), so every rank must build it. Default ``False``:
            one process, no collectives.
        process_group: The process group of ``distributed=True`` (default ``None``: the default
            group). Not pickled (a copy uses the default group).
        **outer_kwargs: Keyword arguments of the outer optimizer class (e.g. ``lr=1e-3``).

    Attributes:
        outer_update: What the algorithm hands the outer optimizer (a class attribute):
            ``"meta_gradient"`` -- the gradient of the query loss through the inner loop (MAML
            family) -- or ``"pseudo_gradient"`` -- :math:`\\theta - \\bar\\theta'` from the
            adapted weights, which need no graph to the meta-parameters (Reptile).
        needs_query: Whether the meta-loss needs a query set (a class attribute).
        skipped_steps: Meta-steps skipped because of a non-finite update (see ``non_finite``).
        path_policy: The :class:`~samgria.meta.paths.PathPolicy` that picks the loop, vmap or
            compiled path for this meta-optimizer.
        distributed: Whether outer steps and evaluations are reduced over a process group.
        process_group: That process group (``None``: the default one).

    Raises:
        TypeError: ``model`` is not a module, ``outer`` is neither an optimizer class nor an
            optimizer, ``outer_kwargs`` are given with a built optimizer, or an argument (or a
            group's ``adapt``) has the wrong type.
        ValueError: ``inner_lr`` (or a group's) or ``inner_steps`` is negative, the outer
            optimizer holds a tensor that is not a parameter of ``model``, ``distributed=True``
            without an initialised process group, or ``process_group`` without
            ``distributed=True``.
    """

    # The outer optimizer (``meta.outer``), set by ``_init_wrapper`` under ``_driven_attr``:
    # declared here so that type checkers know the attribute.
    outer: torch.optim.Optimizer
    outer_update: ClassVar[str] = "meta_gradient"
    #: Param-group keys that mark a group's role (a checkpoint's group without them keeps those
    #: of the group at its position).
    _group_markers: ClassVar[tuple[str, ...]] = ()
    _weight_dropped_by_failure = False  # the last step raised with a task weight counted
    needs_query: ClassVar[bool] = True
    _dropped_on_pickle = ("process_group",)
    _needed_from_pickle = ("checkpoint_inner_steps",)  # absent from 0.1.0's pickles

    def __init__(
        self,
        model: nn.Module,
        outer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        params: Iterable[Any] | None = None,
        checkpoint_inner_steps: bool = False,
        non_finite: str = "skip",
        distributed: bool = False,
        process_group: Any = None,
        **outer_kwargs: Any,
    ) -> None:
        checkpoint_inner_steps = check_bool("checkpoint_inner_steps", checkpoint_inner_steps)
        check_choice("non_finite", non_finite, ("skip", "raise"))
        distributed, process_group = collectives.check_distributed(distributed, process_group)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        inner_lr = check_lr(inner_lr, "inner_lr")
        inner_steps = check_steps(inner_steps, "inner_steps")
        first_order = check_bool("first_order", first_order)
        if not any(True for _ in model.parameters()):
            raise ValueError("model has no parameters to meta-train")

        self.model = model
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.checkpoint_inner_steps = checkpoint_inner_steps
        self.non_finite = non_finite
        self.skipped_steps = 0
        self.path_policy = PathPolicy(type(self).__name__)
        self.distributed = distributed
        self.process_group = process_group
        self._task_weight = 0.0

        if isinstance(outer, type) and issubclass(outer, torch.optim.Optimizer):
            if issubclass(outer, MetaOptimizer):
                raise TypeError(f"outer must be an ordinary optimizer, not a meta-optimizer, got {outer.__name__}")
            groups = self._initial_groups(params)
            built = outer(groups, **outer_kwargs)
            refuse_driven(built, "outer")
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
            refuse_driven(outer, "outer")
            warn_of_hooks_not_run(outer, "outer", type(self).__name__)
            built = outer
        else:
            raise TypeError(
                "outer must be a torch.optim.Optimizer subclass or instance, got "
                f"{outer!r} of type {type(outer).__name__}"
            )
        for i, group in enumerate(built.param_groups):  # a rejected optimizer is left as it was
            self._check_group(group, i)
        self._check_outer(built)
        self._add_own_groups(built)  # refused by built: built is left as it was too
        self._init_wrapper(built, {**built.defaults, "inner_lr": inner_lr, "adapt": True})
        for group in self.outer.param_groups:  # checked above
            self._fill_group(group)
        if self.distributed:
            collectives.broadcast_module(model, process_group)

    # ------------------------------------------------------------------ processes
    @property
    def world_size(self) -> int:
        """Number of processes meta-training together (1 without ``distributed=True``)."""
        return collectives.world(self.process_group)[1] if self.distributed else 1

    @property
    def rank(self) -> int:
        """This process's rank in the process group (0 without ``distributed=True``)."""
        return collectives.world(self.process_group)[0] if self.distributed else 0

    def add_task_weight(self, weight: float = 1.0) -> None:
        """Count one adapted task of weight ``weight`` in this rank's share of the meta-step.

        :meth:`record_adaptation` calls it for every task adapted through :meth:`adapt`,
        :meth:`task_losses`, ``meta_step`` or ``MetaTrainer``; call it yourself for each task
        a closure adapts another way (through :meth:`clone` and a
        :class:`~samgria.meta.learner.Learner`). With ``distributed=True`` the sum :math:`W_r`
        weights this rank's gradient in the all-reduce of :meth:`step`; it restarts at 0 with
        every evaluation of the closure and after every step. Without ``distributed`` it has no
        effect on the update.

        Args:
            weight: The task's weight (``>= 0``), as in :meth:`meta_loss`.
        """
        self._task_weight += _check_weight(weight)

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

    def _check_outer(self, outer: torch.optim.Optimizer) -> None:
        """Raise if ``outer`` (its groups checked one by one already) cannot be this
        meta-optimizer's outer optimizer; change nothing (default: any can)."""

    def _add_own_groups(self, built: torch.optim.Optimizer) -> None:
        """Add to ``built``, before it is taken over, the param groups a subclass keeps in the
        outer optimizer (Meta-SGD's rates), with ``built.add_param_group``: a group it refuses
        leaves an already built optimizer as it was (default: none)."""

    def _check_group(self, group: Mapping[str, Any], index: int, groups: str = "param_groups") -> None:
        """Raise if param group ``index`` (of ``groups``, as the message names them) cannot be a
        meta-optimizer's group; change nothing. Its ``params`` may be ``(name, tensor)`` pairs,
        which torch's ``add_param_group`` takes (``model.named_parameters()``)."""
        check_lr(group.get("inner_lr", self.inner_lr), f"{groups}[{index}]: inner_lr")
        check_bool(f"{groups}[{index}]: adapt", group.get("adapt", True))
        model_params = set(self.model.parameters()) | self._extra_params()
        for entry in group["params"]:
            p = entry[1] if isinstance(entry, tuple) and len(entry) == 2 else entry
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"{groups}[{index}]: params must hold tensors (or (name, tensor) pairs), got {entry!r}"
                )
            if p not in model_params:
                raise ValueError(
                    f"param_groups[{index}] holds a tensor of shape {tuple(p.shape)} that is not a "
                    f"parameter of model ({type(self.model).__name__})"
                )

    def _prepare_loaded(self, state: Any, groups: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
        """A checkpoint's groups are checked as the constructor's, before anything changes; a
        group without ``inner_lr`` or ``adapt`` (a plain outer optimizer's checkpoint) keeps the
        values of the group at its position (torch pairs groups by position)."""
        for index, group in enumerate(groups):
            self._complete_loaded_group(group, index, self.param_groups)
        return super()._prepare_loaded(state, groups)

    def _complete_loaded_group(self, group: dict[str, Any], index: int, previous: Sequence[Mapping[str, Any]]) -> None:
        """Give a checkpoint's group the ``inner_lr`` and ``adapt`` it lacks from ``previous[index]``
        (else the constructor's) and check it."""
        current = previous[index] if index < len(previous) else {}
        for key in self._group_markers:  # e.g. MetaSGD's rates group: its place is fixed
            if key in group and index < len(previous) and bool(group[key]) != bool(current.get(key, False)):
                raise ValueError(
                    f"the checkpoint's param_groups[{index}] has {key}={group[key]!r}, but "
                    f"param_groups[{index}] of this {type(self).__name__} has "
                    f"{key}={current.get(key, False)!r}: the checkpoint's groups are in another "
                    "order (torch pairs groups by position)"
                )
        for key in ("inner_lr", "adapt", *self._group_markers):  # markers: e.g. MetaSGD's rates group
            if key not in group and key in current:
                group[key] = current[key]
        self._check_group(group, index, "the checkpoint's param_groups")
        self._fill_group(group)

    def _fill_group(self, group: dict[str, Any]) -> None:
        """Give a (checked) param group the default ``inner_lr`` and ``adapt`` (``adapt`` a
        ``bool``: a NumPy bool, which the check accepts, is stored as one)."""
        group.setdefault("inner_lr", self.inner_lr)
        group["adapt"] = bool(group.get("adapt", True))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (of the model's parameters) to the outer optimizer.

        A key the group does not set takes the value of :attr:`defaults` where that was edited
        since construction (as torch fills a group from ``optimizer.defaults``), else the outer
        optimizer's default; ``inner_lr`` and ``adapt`` default to the constructor's values.
        """
        group = dict(self._with_edited_defaults(param_group))
        params = group["params"]
        if isinstance(params, (set, frozenset)):  # as torch refuses one
            raise TypeError(
                f"param_groups[{len(self.param_groups)}]: params must be an ordered collection (a list "
                "or tuple), got a set, whose order changes between runs (checkpoints pair state "
                "with parameters by position)"
            )
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        self._check_group(group, len(self.param_groups))
        self._fill_group(group)
        self.outer.add_param_group(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the meta-parameters (delegates to the outer optimizer)."""
        self.outer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply the outer update.

        Args:
            closure: Zeroes the gradients, adapts per task, back-propagates the meta-loss and
                returns it. It is handed to the outer optimizer, which may evaluate it more
                than once (SAM, LBFGS); if an evaluation raises, the step leaves the weights
                and the outer state as they were. ``None``: the gradients were already computed
                by the caller.

        Returns:
            What the outer optimizer's ``step`` returns (the closure's loss; with
            ``distributed=True`` a scalar loss -- a one-element tensor, or a number such as
            ``loss.item()``, returned as a float -- is replaced by its task-weighted mean over
            the ranks).

        Raises:
            FloatingPointError: ``non_finite="raise"`` and the update is not finite (see
                ``non_finite``; nothing is applied).
            ValueError: ``distributed=True`` and no rank counted a task in the step (raised on
                every rank; nothing is applied).
            RuntimeError: The outer optimizer re-evaluates the loss (SAM) and no closure is given,
                a framework accumulated micro-batches outside the closure (Lightning's
                ``accumulate_grad_batches > 1``, accelerate's ``accumulate()``), or
                ``torch.amp.GradScaler.step`` passes the closure (as accelerate's
                ``step(closure)`` does under fp16: the scaler unscaled the gradients the closure
                computes anew, scaled); nothing is applied.
        """
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable, got {closure!r}")
        self._refuse_unsupported_closure(closure)
        return self._guarded_step(closure)

    def _refuse_unsupported_closure(self, closure: Callable[[], Any] | None) -> None:
        """Raise before anything changes when accelerate steps the optimizer under
        ``gradient_accumulation_steps > 1`` and ``closure`` is given; when the outer optimizer
        re-evaluates the loss (SAM) and ``closure`` is Lightning's under
        ``accumulate_grad_batches > 1`` (its second pass would see the last micro-batch only),
        or is not given; when ``torch.amp.GradScaler.step`` hands it ``closure`` (it unscaled
        the gradients the closure computes anew, scaled).

        accelerate's ``accumulate()`` calls the optimizer on the last micro-batch only, so a
        closure would adapt and back-propagate that micro-batch's tasks alone; nothing here can
        tell it from a closure that runs every micro-batch itself (see
        :func:`samgria._frameworks.accelerate_accumulation`), so both are refused.
        """
        outer = self.outer
        if isinstance(outer, TransformingOptimizer) and outer._pending is not None:
            name = type(self).__name__
            raise RuntimeError(
                f"{name}.step() found its outer optimizer's two-call step begun (outer.first_step() "
                f"was called): {name} does not finish it, since its non-finite check, task weights "
                "and all-reduce would not cover the first pass (and Reptile forms its "
                f"pseudo-gradient inside step(), so first_step() perturbed nothing). Call "
                f"outer.cancel_step() to put the weights back, then {name}.step(closure), which "
                "runs both passes"
            )
        if isinstance(outer, TransformingOptimizer):
            if closure is not None:
                # The outer optimizer gets the guarded closure, not the framework's: it is shown
                # the framework's here (SAM under Lightning's accumulate_grad_batches).
                outer._refuse_framework_accumulation(closure)
            else:
                needing = outer._reevaluating_names()
                if needing and not self._is_state_init_step():
                    name = type(self).__name__
                    raise RuntimeError(
                        f"{name}.step() got no closure, but its outer optimizer runs "
                        f"{', '.join(needing)}, which re-evaluate(s) the loss: pass the closure "
                        f"that adapts and back-propagates the tasks, {name}.step(closure). A "
                        "training loop that steps the optimizer without a closure cannot drive "
                        "it (Hugging Face's Trainer and SAMTrainer, a loss scaler's "
                        "scaler.step(optimizer) as in Lightning's precision='16-mixed' and "
                        "SAMMixedPrecision); Lightning's automatic optimization in '32-true' or "
                        "'bf16-mixed' precision passes one"
                    )
        if closure is not None:
            # The scaler unscaled the gradients the closure computes anew, scaled.
            refuse_closure_under_grad_scaler(type(self).__name__)
        setting = accelerate_accumulation() if closure is not None else None
        if setting is not None:
            raise RuntimeError(
                f"{type(self).__name__}.step got a closure under {setting}: under accumulate() "
                "the closure covers the last micro-batch's tasks alone. Adapt and back-propagate "
                "each micro-batch yourself (accelerator.backward; Reptile records each "
                "adaptation) and call step() without a closure; or, for a closure that runs every "
                "micro-batch itself, set gradient_accumulation_steps=1 (accumulate() is not needed)"
            )

    def _guarded_step(self, closure: Callable[[], Any] | None) -> Any:
        """The outer step, skipped whole when what the update uses is not finite.

        The check runs inside every evaluation of the closure. What a step that raises or is
        skipped changed is put back (:meth:`_outer_step_undo`): copies of the weights and of the
        outer state where the outer optimizer may have written before it failed. With
        ``distributed=True`` the gradients and the loss are all-reduced first, so every rank
        takes the same decision.

        The task weight counted so far (:meth:`add_task_weight`) restarts at 0 after the step,
        also one that raises (it pairs with gradients that ``zero_grad()`` then discards;
        Reptile, whose weight pairs with its record of adapted tasks, keeps both on a failure).
        """
        failed_with_weight = self._task_weight != 0.0
        try:
            result = self._checked_outer_step(closure)
        except BaseException:
            self._task_weight = 0.0
            self._weight_dropped_by_failure = failed_with_weight
            raise
        self._task_weight = 0.0
        self._weight_dropped_by_failure = False
        return result

    def _checked_outer_step(self, closure: Callable[[], Any] | None) -> Any:
        """The body of :meth:`_guarded_step`."""
        self._check_driven_group_kinds()
        if closure is None:
            self._reduce_across_ranks(None)
            problem = self._non_finite(None)
            if problem is not None:
                return self._skip(problem, None)
            undo = self._outer_step_undo(closure_given=False)
            try:
                result = self._driven_step(None)
            except BaseException:
                if undo is not None:
                    undo.restore()
                raise
            self._loaded_state_unstepped = False
            return result

        undo = self._outer_step_undo(closure_given=True)
        taken_after_closure: list[StepSnapshot | StateStructure] = []

        def checked_closure() -> Any:
            self._task_weight = 0.0
            loss = self._reduce_across_ranks(closure())
            problem = self._non_finite(loss)
            if problem is not None:
                raise _NonFiniteMetaStep(problem, loss)
            if undo is None and not taken_after_closure and _evaluates_before_writing(self.outer):
                # torch's own optimizer has its gradients now and has written nothing yet.
                taken_after_closure.append(self._groups_undo())
            return loss

        try:
            result = self._driven_step(checked_closure)
        except BaseException as error:
            for taken in (undo, *taken_after_closure):
                if taken is not None:
                    taken.restore()
            if isinstance(error, _NonFiniteMetaStep):
                return self._skip(error.problem, error.loss)
            raise
        self._loaded_state_unstepped = False
        return result

    def _outer_step_undo(self, closure_given: bool) -> _WholeStepUndo | StepSnapshot | StateStructure | None:
        """What puts the weights and the outer state back if the outer step raises or is
        skipped, taken before it.

        An atomic ``TransformingOptimizer`` undoes its own step: nothing. torch's own optimizers
        but LBFGS evaluate the closure once, before they write, and check a param group's inputs
        before they write its tensors, but step the groups one after another
        (:meth:`_groups_undo`; given a closure, taken once it has computed the gradients).
        Everything is copied (:class:`_WholeStepUndo`: also the param groups' values and the
        instance attributes of an optimizer that is not torch's) for any other optimizer (LBFGS
        steps between evaluations), for a ``TransformingOptimizer`` with ``atomic=False`` given a
        closure (its evaluations are undone, not its inner step), and after a load (its tensors
        may not fit the parameters, which torch's optimizers find out only while they write).
        """
        outer = self.outer
        if isinstance(outer, TransformingOptimizer):
            if outer.atomic or not closure_given:
                return None
            self._adopt_driven_state()
            return _WholeStepUndo(self._unique_params(), self.state, self.param_groups, outer.inner)
        self._adopt_driven_state()  # the state the outer optimizer is about to use
        if self._loaded_state_unstepped or not _evaluates_before_writing(outer):
            return _WholeStepUndo(self._unique_params(), self.state, self.param_groups, outer)
        return None if closure_given else self._groups_undo()

    def _reduce_across_ranks(self, loss: Any) -> Any:
        """All-reduce the outer gradients (and a scalar loss) over the ranks; return the loss.

        A no-op with one process. Raises when no rank adapted a task.
        """
        if self.world_size == 1:
            return loss
        number = isinstance(loss, (int, float)) and not isinstance(loss, bool)  # loss.item()
        scalar = loss if number or (isinstance(loss, torch.Tensor) and loss.numel() == 1) else None
        total, mean_loss = collectives.all_reduce_meta_gradients(
            self._unique_params(), self._task_weight, scalar, self.process_group
        )
        if total == 0.0:
            retried = ""
            if self._weight_dropped_by_failure:
                retried = (
                    "; this rank's previous step raised, which drops the task weights counted for "
                    "it (they pair with gradients that zero_grad() discards): zero the gradients "
                    "and adapt the tasks again"
                )
            raise ValueError(
                f"{type(self).__name__}.step found no adapted tasks on any of the {self.world_size} ranks "
                "(their task weights sum to 0): adapt through meta.adapt, meta.task_losses, meta_step or "
                "MetaTrainer, which count each task, or count tasks adapted another way with "
                "meta.add_task_weight(weight)" + retried
            )
        if mean_loss is None:
            return loss
        if loss is None:  # a rank without tasks gets the mean loss of the others, as they do
            first = self._unique_params()[0]
            return torch.tensor(mean_loss, dtype=first.dtype if first.is_floating_point() else None, device=first.device)
        if scalar is None:
            return loss
        if number:
            return mean_loss
        return torch.tensor(mean_loss, dtype=scalar.dtype, device=scalar.device).reshape(scalar.shape)

    def _non_finite(self, loss: Any) -> str | None:
        """Say what is not finite in what the update uses, or ``None``.

        The MAML family differentiates the meta-loss: it and every meta-gradient are checked. A
        pseudo-gradient algorithm (Reptile) updates with its pseudo-gradient alone; its loss is
        monitoring only and is not judged.
        """
        meta_gradient = self.outer_update == "meta_gradient"
        if (
            meta_gradient
            and isinstance(loss, torch.Tensor)
            and loss.numel()
            and not bool(torch.isfinite(loss.detach()).all())
        ):
            return f"the meta-loss is {loss.detach().flatten()[0].item()}"
        grads, sources = self._grads()
        if not all_finite(grads, like=sources):
            return "a meta-gradient is not finite" if meta_gradient else "the pseudo-gradient is not finite"
        return None

    def _skip(self, problem: str, loss: Any) -> Any:
        message = f"{type(self).__name__}: {problem}; the meta-step is skipped (weights and outer state unchanged)"
        if self.non_finite == "raise":
            raise _SkippedByPolicy(message + "; non_finite='raise' was set")
        self.skipped_steps += 1
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel_outside())
        return loss

    # ------------------------------------------------------------------ inner loop
    def _filter_adapt_names(self, names: list[str]) -> list[str]:
        """Hook for subclasses restricting the adapted parameters (ANIL)."""
        return names

    def _adapt_config(self) -> tuple[list[str], dict[str, float | torch.Tensor]]:
        """Return the adapted parameter names and their inner step sizes, from the groups."""
        return self._adapt_config_of(self.param_groups)

    def _adapt_config_of(
        self, param_groups: Sequence[Mapping[str, Any]]
    ) -> tuple[list[str], dict[str, float | torch.Tensor]]:
        """:meth:`_adapt_config` read from ``param_groups`` (those of an optimizer not taken
        over yet, too)."""
        name_of = {p: n for n, p in self.model.named_parameters()}
        names: list[str] = []
        lrs: dict[str, float | torch.Tensor] = {}
        for i, group in enumerate(param_groups):
            if not check_bool(f"param_groups[{i}]: adapt", group.get("adapt", True)):
                continue
            lr = check_lr(group.get("inner_lr", self.inner_lr), f"param_groups[{i}]: inner_lr")
            for p in group["params"]:
                n = name_of.get(p)
                if n is None or not p.requires_grad or n in lrs:
                    continue
                names.append(n)
                lrs[n] = lr
        names = self._filter_adapt_names(names)
        return names, {n: lrs[n] for n in names}

    def _why_nothing_is_adapted(self) -> str:
        """Why :meth:`_adapt_config` finds no parameter to adapt (for the message of :meth:`inner_loop`)."""
        if not any(g.get("adapt", True) for g in self.param_groups):
            return "every param group has adapt=False"
        return "no parameter of the model in a param group with adapt=True requires grad"

    def inner_loop(
        self,
        inner_steps: int | None = None,
        *,
        inner_step_fn: InnerStepFn | None = None,
        inner_reg_fn: InnerRegFn | None = None,
        grad_transforms: Sequence[Any] | None = None,
        create_graph: bool | None = None,
        track_graph: bool | None = None,
    ) -> InnerLoop:
        """Describe the inner loop this meta-optimizer runs now (read from its param groups).

        Every path (loop, vmap, compiled) and every entry point runs this description.

        Args:
            inner_steps: Number of inner steps (default: :attr:`inner_steps`).
            inner_step_fn: Update rule (default: plain SGD with each group's ``inner_lr``).
            inner_reg_fn: ``inner_reg_fn(current, base) -> scalar`` added to the support loss.
            grad_transforms: Inner-loop gradient transforms (e.g.
                :class:`~samgria.meta.inner_optim.InnerSAM`).
            create_graph: Differentiate through the support gradients (default:
                ``not first_order``).
            track_graph: Keep a graph to the meta-parameters (default: whether
                :attr:`outer_update` is ``"meta_gradient"``).

        Returns:
            The :class:`~samgria.meta.engine.InnerLoop`.

        Raises:
            TypeError: An argument is of the wrong kind (``create_graph`` or ``track_graph`` not a
                bool, ``inner_steps`` not an integer, an option not callable).
            ValueError: ``inner_steps`` is negative, or no parameter is adapted -- every param
                group has ``adapt=False``, the parameters of the ``adapt=True`` groups do not
                require grad, or (ANIL) no head parameter is in such a group. The param groups
                are read at each call (they may change with :meth:`add_param_group`), so this is
                checked here, before anything runs, and not at construction.
        """
        steps = self.inner_steps if inner_steps is None else check_steps(inner_steps, "inner_steps")
        transforms = check_inner_options(inner_step_fn, inner_reg_fn, grad_transforms)
        if create_graph is None:
            create_graph = not self.first_order
        create_graph = check_bool("create_graph", create_graph)
        if track_graph is None:
            track_graph = self.outer_update == "meta_gradient"
        track_graph = check_bool("track_graph", track_graph)
        names, lrs = self._adapt_config()
        if not names:
            raise ValueError(
                f"{type(self).__name__} adapts no parameter in the inner loop: {self._why_nothing_is_adapted()}; "
                "give the parameters to adapt a param group with adapt=True (add_param_group adds one); to "
                "train without adaptation, keep such a group and use inner_steps=0"
            )
        return InnerLoop(
            adapt_names=tuple(names),
            lrs=lrs,
            inner_steps=steps,
            first_order=not create_graph,
            track_graph=track_graph,
            inner_step_fn=inner_step_fn if inner_step_fn is not None else sgd_inner_step,
            inner_reg_fn=inner_reg_fn,
            grad_transforms=transforms,
            checkpoint=self.checkpoint_inner_steps,
        )

    def clone(
        self,
        *,
        inner_step_fn: InnerStepFn | None = None,
        inner_reg_fn: InnerRegFn | None = None,
        grad_transforms: Sequence[Any] | None = None,
    ) -> Learner:
        """Return a :class:`~samgria.meta.learner.Learner` starting at the current meta-parameters.

        The learner's fast weights start as the model's live parameters, so a ``backward()``
        through an adapted learner accumulates meta-gradients into the model -- except for an
        algorithm whose outer update keeps no graph to the meta-parameters (Reptile,
        ``outer_update == "pseudo_gradient"``): its learner starts from detached copies, and a
        ``backward()`` through it reaches no parameter of the model.

        Args:
            inner_step_fn: Inner update rule (default: plain SGD with each group's ``inner_lr``).
            inner_reg_fn: ``inner_reg_fn(current_params, base_params) -> scalar`` added to the
                support loss at every inner step.
            grad_transforms: Inner-loop gradient transforms (e.g.
                :class:`~samgria.meta.inner_optim.InnerSAM`).

        Returns:
            A fresh learner.
        """
        loop = self.inner_loop(inner_step_fn=inner_step_fn, inner_reg_fn=inner_reg_fn, grad_transforms=grad_transforms)
        return Learner(
            self.model,
            inner_lr=dict(loop.lrs),
            inner_steps=loop.inner_steps,
            first_order=loop.first_order,
            adapt_names=loop.adapt_names,
            inner_step_fn=loop.inner_step_fn,
            inner_reg_fn=loop.inner_reg_fn,
            grad_transforms=loop.grad_transforms,
            track_graph=loop.track_graph,
            checkpoint=loop.checkpoint,
        )

    @eager_under_compile
    def adapt(
        self,
        support_closure: Callable[[Callable[..., Any]], torch.Tensor],
        inner_steps: int | None = None,
        *,
        inner_step_fn: InnerStepFn | None = None,
        inner_reg_fn: InnerRegFn | None = None,
        grad_transforms: Sequence[Any] | None = None,
        weight: float = 1.0,
        steps: int | None = None,
    ) -> Learner:
        """Run the inner loop on one task and return the adapted learner.

        Args:
            support_closure: ``support_closure(f) -> scalar support loss``, where ``f(*inputs)``
                runs the model with the current fast weights.
            inner_steps: Number of inner steps (default: :attr:`inner_steps`).
            inner_step_fn: Inner update rule (default: plain SGD with each group's ``inner_lr``).
            inner_reg_fn: ``inner_reg_fn(current_params, base_params) -> scalar`` added to the
                support loss at every step.
            grad_transforms: Objects with ``transform_inner_grads(params, grads, grad_fn)``
                applied to the support gradients (e.g. :class:`~samgria.meta.inner_optim.InnerSAM`).
            weight: Task weight :math:`w_i \\ge 0`, counted in this rank's share of the step
                (:meth:`add_task_weight`). Reptile moves towards the weighted mean of the
                adapted weights. For the MAML family the meta-gradient is whatever the closure
                back-propagates, so weight tasks in the meta-loss too (:meth:`meta_loss`): with
                one process ``weight`` then changes nothing; with ``distributed=True`` the
                weights of a rank's tasks sum to :math:`W_r`, and :meth:`step` reduces the
                ranks' gradients to :math:`\\sum_r W_r g_r / \\sum_r W_r` -- the weighted mean
                over every task when each rank's closure back-propagates
                :math:`\\sum_i w_i \\mathcal{L}^q_i / W_r` with the same weights; with an
                unweighted mean over its tasks instead, the weights still weight the ranks
                (a task of rank :math:`r` counts :math:`W_r / (|\\mathcal{B}_r| \\sum_s W_s)`).
            steps: Former name of ``inner_steps`` (still accepted).

        Returns:
            The adapted :class:`~samgria.meta.learner.Learner`; ``learner(x)`` is the adapted
            forward pass and ``learner.params`` the adapted parameters.

        Raises:
            TypeError: ``support_closure`` is not callable or ``inner_steps`` is not an int.
            ValueError: ``inner_steps`` or ``weight`` is negative, or the support loss depends
                on none of the fast weights (nothing is recorded).
        """
        if not callable(support_closure):
            raise TypeError(f"support_closure must be callable, got {support_closure!r}")
        inner_steps = one_steps_argument(inner_steps, steps)
        inner_steps = self.inner_steps if inner_steps is None else check_steps(inner_steps, "inner_steps")
        weight = _check_weight(weight)
        learner = self.clone(inner_step_fn=inner_step_fn, inner_reg_fn=inner_reg_fn, grad_transforms=grad_transforms)
        learner.adapt_closure(support_closure, inner_steps)
        self.record_adaptation(learner.params, weight)
        return learner

    def record_adaptation(self, adapted: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        """Remember one task's adapted weights for the outer update.

        Called for every adapted task by :meth:`adapt`, :meth:`task_losses` and the
        ``meta_step`` builder. Algorithms whose outer update is formed from the adapted weights
        (``outer_update == "pseudo_gradient"``, Reptile) keep them; the MAML family, whose
        meta-gradient flows through the query loss, ignores them. Every algorithm counts the
        task's weight (:meth:`add_task_weight`).

        Args:
            adapted: ``{name: adapted weight}`` (at least the adapted names).
            weight: The task's weight ``>= 0``.
        """
        self.add_task_weight(weight)

    def _check_tasks(self, tasks: Any, inner_steps: int | None = None) -> list[Task]:
        """``tasks`` as a checked list; ``inner_steps``: how many steps adapt them (default
        :attr:`inner_steps`), which an empty support set refuses."""
        if inner_steps is None:
            inner_steps = self.inner_steps
        if isinstance(tasks, Task) or not isinstance(tasks, Sequence):
            raise TypeError(f"tasks must be a sequence of Task, got {type(tasks).__name__}")
        tasks = list(tasks)
        if not tasks:
            raise ValueError("tasks must be a non-empty sequence of Task, got 0 tasks")
        for i, t in enumerate(tasks):
            if not isinstance(t, Task):
                raise TypeError(f"tasks[{i}] must be a Task, got {type(t).__name__}")
            t.check(f"tasks[{i}]")  # its fields may have been reassigned since it was built
            if self.needs_query and t.query_x.shape[:1] == (0,):
                raise ValueError(
                    f"tasks[{i}] has an empty query set (query_x of shape {tuple(t.query_x.shape)}): "
                    f"{type(self).__name__}'s meta-loss is the query loss; only Reptile can do without "
                    "a query set"
                )
            if inner_steps > 0 and t.support_x.shape[:1] == (0,):
                raise ValueError(
                    f"tasks[{i}] has an empty support set (support_x of shape "
                    f"{tuple(t.support_x.shape)}), on which {type(self).__name__} would take "
                    f"{inner_steps} inner step(s): the gradient of an empty loss is zero, so nothing "
                    "would adapt; use inner_steps=0 to score tasks without adapting"
                )
        return tasks

    def _meta_params(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())

    def default_path(self, loop: InnerLoop, tasks: Sequence[Task]) -> str:
        """The path :meth:`task_losses` takes with ``vectorize=None``: vmap where it applies
        and has not failed before, else the loop."""
        if vmap_blocker(self.model, loop, tasks) is None and "vmap" not in self.path_policy.failed:
            return "vmap"
        return "loop"

    def _scored_tasks(self, tasks: list[Task]) -> list[Task]:
        """The tasks as :meth:`run_tasks` adapts and scores them (a subclass may substitute a
        query set)."""
        return tasks

    def run_tasks(
        self,
        tasks: Sequence[Task],
        loss_fn: LossFn,
        loop: InnerLoop,
        *,
        path: str | None = None,
        backward_weights: Sequence[float] | None = None,
        record: bool = True,
    ) -> tuple[torch.Tensor, str]:
        """Adapt to every task with ``loop`` on a path and return the query losses.

        The one entry to the engine's dispatcher (:func:`samgria.meta.engine.task_losses`)
        for this meta-optimizer: it applies the fallback policy and records the adapted
        weights (:meth:`record_adaptation`).

        Args:
            tasks: The meta-batch (checked).
            loss_fn: ``loss_fn(prediction, target) -> scalar``.
            loop: The inner loop (see :meth:`inner_loop`).
            path: ``"loop"`` or ``"vmap"``; ``None`` picks :meth:`default_path` and falls
                back to the loop (once, with a warning) if vmap fails on this model.
            backward_weights: Back-propagate :math:`\\sum_i w_i \\ell_i` inside (per task on
                the loop path) and return detached losses.
            record: Hand every task's adapted weights to :meth:`record_adaptation`.

        Returns:
            ``(losses, path_used)``.
        """
        tasks = self._scored_tasks(self._check_tasks(tasks, loop.inner_steps))
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        check_choice("path", path, (None, "loop", "vmap"))
        explicit = path is not None
        if path == "vmap":
            refuse_unvectorisable(self.model, loop, tasks)
        chosen = path if path is not None else self.default_path(loop, tasks)
        params = self._meta_params()

        def run(which: str) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
            return engine.task_losses(
                self.model, loop, params, tasks, loss_fn, path=which, backward_weights=backward_weights
            )

        (losses, adapted), used = self.path_policy.run(chosen, "loop", run, explicit=explicit)
        if record:
            for fast in adapted:
                self.record_adaptation(fast, 1.0)
        return losses, used

    def task_losses(
        self,
        tasks: Sequence[Task],
        loss_fn: LossFn,
        *,
        inner_steps: int | None = None,
        vectorize: bool | None = None,
        create_graph: bool | None = None,
        inner_step_fn: InnerStepFn | None = None,
        inner_reg_fn: InnerRegFn | None = None,
        grad_transforms: Sequence[Any] | None = None,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Adapt to each task on its support set and return the query losses after adaptation.

        Args:
            tasks: The meta-batch (a non-empty sequence of :class:`~samgria.data.task.Task`).
            loss_fn: ``loss_fn(prediction, target) -> scalar``, used for support and query.
            inner_steps: Number of inner steps (default: :attr:`inner_steps`).
            vectorize: ``None`` uses :func:`torch.func.vmap` over tasks when it applies,
                falling back (once, with a warning, remembered) to a loop if the model cannot
                be vmapped; ``True`` forces vmap (raises if impossible); ``False`` forces the
                loop. The losses' backward runs outside this call, so it cannot time the
                paths: :class:`~samgria.meta.trainer.MetaTrainer` with ``vectorize=None``
                chooses by measuring whole meta-steps (vmap is slower than the loop for
                convolutional models on the CPU; see the benchmarks page).
            create_graph: Differentiate through the inner loop (second order). Default:
                ``not first_order``. ``False`` still gives first-order meta-gradients.
            inner_step_fn: Inner update rule (default plain SGD), on every path.
            inner_reg_fn: Inner-loop regulariser, on every path.
            grad_transforms: Inner-loop gradient transforms (e.g. ``InnerSAM``), on every path.
            steps: Former name of ``inner_steps`` (still accepted).

        Returns:
            A tensor of shape ``(len(tasks),)``, differentiable w.r.t. the meta-parameters
            (detached for Reptile, whose outer update uses the recorded adapted weights).

        Raises:
            ValueError: ``tasks`` is empty, a task's query set is empty (except for Reptile,
                which scores such a task on its support set), a task's support set is empty
                while inner steps would adapt on it, or ``vectorize=True`` with tasks
                of unequal shapes or a second-order loop through a normalisation layer.
            TypeError: ``tasks`` holds something that is not a Task.
        """
        loop = self.inner_loop(
            one_steps_argument(inner_steps, steps),
            inner_step_fn=inner_step_fn,
            inner_reg_fn=inner_reg_fn,
            grad_transforms=grad_transforms,
            create_graph=create_graph,
        )
        path = _path_of(vectorize)
        losses, _ = self.run_tasks(tasks, loss_fn, loop, path=path)
        return losses if self.outer_update == "meta_gradient" else losses.detach()

    @torch.no_grad()
    def evaluate(
        self,
        tasks: Sequence[Task],
        loss_fn: LossFn,
        inner_steps: int | None = None,
        *,
        vectorize: bool | None = None,
        inner_step_fn: InnerStepFn | None = None,
        inner_reg_fn: InnerRegFn | None = None,
        grad_transforms: Sequence[Any] | None = None,
        steps: int | None = None,
    ) -> float:
        """Mean post-adaptation query loss over ``tasks``, without a meta-gradient graph.

        The inner loop runs on detached copies of the meta-parameters, so the model, its
        gradients, the outer optimizer and any recorded adaptations are left untouched; so is
        torch's global random state (dropout, run in whatever mode the model is in, draws from
        a fork of it), so evaluating does not change what training draws next.

        With ``distributed=True`` this is a collective (every rank calls it): ``tasks`` are this
        rank's share (possibly empty) and every rank returns the mean over the tasks of all ranks,
        :math:`\\sum_r \\sum_{i \\in \\mathcal{B}_r} \\ell_i / \\sum_r |\\mathcal{B}_r|`.

        Args:
            tasks: Held-out tasks (non-empty; with ``distributed=True``, non-empty on some rank).
            loss_fn: ``loss_fn(prediction, target) -> scalar``.
            inner_steps: Number of inner steps (default: :attr:`inner_steps`).
            vectorize: As in :meth:`task_losses`.
            inner_step_fn: Inner update rule (default plain SGD).
            inner_reg_fn: Inner-loop regulariser.
            grad_transforms: Inner-loop gradient transforms.
            steps: Former name of ``inner_steps`` (still accepted).

        Returns:
            The mean query loss as a float.

        Raises:
            ValueError: As :meth:`task_losses`.
            TypeError: As :meth:`task_losses`.
        """
        loop = self.inner_loop(
            one_steps_argument(inner_steps, steps),
            inner_step_fn=inner_step_fn,
            inner_reg_fn=inner_reg_fn,
            grad_transforms=grad_transforms,
            create_graph=False,
            track_graph=False,
        )
        path = _path_of(vectorize)
        if self.world_size > 1 and isinstance(tasks, Sequence) and not isinstance(tasks, Task) and len(tasks) == 0:
            return self.mean_query_loss(None)
        with rng_untouched(self.model):
            losses, _ = self.run_tasks(tasks, loss_fn, loop, path=path, record=False)
        return self.mean_query_loss(losses)

    def mean_query_loss(self, losses: torch.Tensor | None) -> float:
        """The mean of per-task losses, over every rank's tasks with ``distributed=True``.

        Args:
            losses: This rank's per-task losses (1-D), or ``None`` for a rank without tasks.

        Returns:
            ``losses.mean()`` with one process; with several, :math:`\\sum_r s_r / \\sum_r n_r`
            from each rank's sum :math:`s_r` and count :math:`n_r` (the same on every rank).

        Raises:
            ValueError: No task on any rank.
        """
        if self.world_size == 1:
            if losses is None or losses.numel() == 0:
                raise ValueError("tasks must be a non-empty sequence of Task, got 0 tasks")
            return float(losses.mean())
        total = 0.0 if losses is None else float(losses.detach().double().sum())
        count = 0 if losses is None else losses.numel()
        return collectives.mean_over_ranks(total, count, self.process_group, self._unique_params()[0].device)

    @staticmethod
    def meta_loss(losses: Sequence[torch.Tensor] | torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
        """Weighted mean of per-task query losses, :math:`\\sum_i w_i \\ell_i / \\sum_i w_i`.

        A task of weight 0 still enters the sum as :math:`0 \\cdot \\ell_i`, so a non-finite
        loss of such a task makes the meta-loss non-finite (:math:`0 \\cdot \\text{nan}` is
        ``nan``) and a ``non_finite="skip"`` step is skipped. Dropping it here would not make the
        update exact: once its loss is in ``losses`` (e.g. a row of :meth:`task_losses`), the
        backward pass sends :math:`0` through its graph, which makes the meta-gradient ``nan``
        all the same. Leave such a task out of ``losses`` instead (the ``meta_step`` builder
        leaves weight-0 tasks out of its loss and never back-propagates them).

        The weights are checked as given (in float64) and the weighted mean is computed in
        float32 at least, so weights beyond the range or precision of 16-bit losses count as
        given; it is returned in the losses' dtype. Weights that require grad (learned task
        weights: a tensor, or tensors among them) are differentiated through, as the losses are.

        Args:
            losses: Per-task scalar losses (a 1-D tensor or a sequence of scalars).
            weights: Per-task weights ``>= 0`` (default: all equal), one per loss.

        Returns:
            The scalar meta-loss.

        Raises:
            TypeError: A weight that is a truth value (``bool``, a boolean tensor), as
                everywhere a task weight is given, or ``weights`` that are not numbers
                (``["a", "b"]``).
            ValueError: No losses, weights that are not 1-D, a count mismatch between ``losses``
                and ``weights``, a negative or non-finite weight (NaN, ``±inf``), or weights
                summing to zero.
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
        _refuse_truth_values(weights)
        try:  # checked as given: in float64, on the CPU (a few numbers, which the checks read)
            graph = _weights_with_graph(weights)
            w = (graph if graph is not None else torch.as_tensor(weights, dtype=torch.float64, device="cpu")).detach()
            w = w.to(device="cpu", dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):  # strings, None, complex numbers, ragged lists
            raise TypeError(
                f"weights must be a 1-D sequence of finite numbers >= 0, one per task loss, got {weights!r}"
            ) from None
        if w.dim() != 1:
            raise ValueError(
                f"weights must be a 1-D sequence of one weight per task loss, got shape {tuple(w.shape)}"
            )
        if w.numel() != stacked.numel():
            raise ValueError(
                f"weights must hold one weight per task loss: got {w.numel()} weights for {stacked.numel()} losses"
            )
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
        largest = float(w.max())
        if largest == 0.0:
            raise ValueError("weights must not all be 0")
        # Weighed in float32 at least (16-bit losses: weights beyond their range or precision),
        # after a power-of-two scale that puts the largest weight in [0.5, 1) -- it changes no
        # rounding, and the weights and their sum then fit the computing dtype -- and rounded
        # to the losses' dtype once.
        computing = torch.promote_types(stacked.dtype, torch.float32)
        # (each weight by math.ldexp: 2**shift itself overflows a float when the largest is subnormal)
        shift = -math.frexp(largest)[1]
        if graph is None:
            scaled = torch.tensor([math.ldexp(x, shift) for x in w.tolist()], dtype=torch.float64)
        else:  # weights that require grad keep their graph: the same numbers, times a power of two
            scaled = graph.to(torch.float64)
            for part in (shift // 2, shift - shift // 2):  # each factor a float64 (subnormal weights)
                scaled = scaled * math.ldexp(1.0, part)
        scaled = scaled.to(device=stacked.device, dtype=computing)
        mean = (scaled * stacked.to(computing)).sum() / scaled.sum()
        return mean.to(stacked.dtype) if stacked.is_floating_point() else mean

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
