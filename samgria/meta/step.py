"""``meta_step`` / ``MetaStep``: build one meta-update task by task, with per-task weights.

The builder adds tasks one at a time and applies the outer update when the ``with`` block
ends::

    with meta_step(meta, loss_fn=F.mse_loss, inner_steps=5) as ms:
        for (x, y), (xq, yq) in tasks:
            ms.task(support=(x, y), query=(xq, yq), weight=1.0)
    # the outer update has been applied; ms.loss is the weighted meta-loss

For the MAML family (MAML, FOMAML, MetaSGD, ANIL) the meta-loss is the weighted mean of the
post-adaptation query losses,

.. math:: \\mathcal{L}(\\theta) = \\frac{\\sum_i w_i \\, \\mathcal{L}^q_i(\\phi_i(\\theta))}{\\sum_i w_i},

and for Reptile the outer pseudo-gradient moves towards the weighted mean of the adapted
weights, :math:`g = \\theta - \\sum_i w_i \\phi_i / \\sum_i w_i` (Nichol et al., 2018).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from samgria._checks import check_real

from samgria.meta.base import MetaOptimizer
from samgria.meta.engine import check_inner_options, check_scalar_loss
from samgria.meta.functional import check_steps
from samgria.meta.inner_optim import InnerStepFn
from samgria.meta.learner import InnerRegFn, Learner

__all__ = ["MetaStep", "meta_step"]

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class _TaskSpec:
    support: tuple[Any, Any]
    query: tuple[Any, Any] | None
    weight: float
    steps: int | None
    grad_transforms: list[Any] | None


def _check_pair(name: str, value: Any) -> tuple[Any, Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be an (inputs, targets) pair, got {type(value).__name__}")
    return value[0], value[1]


def _has_no_rows(inputs: Any) -> bool:
    """Whether ``inputs`` is a batch of no examples (a tensor with 0 rows)."""
    return isinstance(inputs, torch.Tensor) and inputs.dim() > 0 and inputs.shape[0] == 0


def _check_transforms(transforms: Any) -> list[Any] | None:
    """``None`` (use the default) or the checked transforms."""
    return None if transforms is None else list(check_inner_options(None, None, transforms))


class MetaStep:
    """Builder of one meta-update: add tasks with :meth:`task`, apply it with :meth:`step`.

    Used as a context manager (usually through :func:`meta_step`) the outer update is applied
    when the block exits normally. If the block raises, nothing is applied: the model is
    unchanged, the meta-parameters' gradients are reset and the exception propagates.

    Each :meth:`task` call adapts to the task at once (the inner loop, with the builder's
    ``inner_step_fn``, ``inner_reg_fn`` and gradient transforms) and returns the detached
    post-adaptation query loss. For the MAML family the weighted query loss is back-propagated
    immediately, so the autograd graph of each task is freed before the next one and memory
    does not grow with the number of tasks; at :meth:`step` the accumulated gradients are
    divided by :math:`\\sum_i w_i`. The weights enter scaled by a power of two that puts the
    largest in :math:`[1, 2)`, so the update does not depend on their scale (16-bit gradients
    neither underflow for tiny weights nor overflow for large ones). For Reptile the adapted
    weights are kept with their weight.

    :meth:`step` hands a closure to ``meta.step``. Its first call reuses the work done by
    :meth:`task`; an outer optimizer that evaluates the closure again (SAM on the outer loop,
    e.g. a ``TransformingOptimizer``) gets a full re-evaluation of every task at its current
    meta-parameters.

    The gradients of the meta-parameters are reset (``meta.zero_grad()``) when the first task
    of a meta-update is added.

    Args:
        meta: The meta-optimizer (MAML, FOMAML, Reptile, MetaSGD, ANIL, ...).
        loss_fn: ``loss_fn(prediction, target) -> scalar``, used for support and query losses.
        inner_steps: Default inner steps of every task (default: ``meta.inner_steps``).
        inner_step_fn: Differentiable inner update rule (default: plain SGD with each group's
            ``inner_lr``), e.g. :class:`~samgria.meta.inner_optim.MomentumInnerStep` or
            :class:`~samgria.meta.inner_optim.AdamInnerStep`.
        inner_reg_fn: ``inner_reg_fn(current_params, base_params) -> scalar`` added to the
            support loss at every inner step, e.g. an L2 pull towards the meta-parameters
            (iMAML-style proximal term).
        grad_transforms: Default inner-loop gradient transforms of every task (e.g.
            :class:`~samgria.meta.inner_optim.InnerSAM`).

    Attributes:
        losses: Detached post-adaptation query losses of the tasks added so far.
        weights: Their weights.
        loss: The weighted meta-loss returned by the last :meth:`step` (``None`` before). A task
            of weight 0 takes no part in the update nor in this loss, so its loss may be
            non-finite without skipping the step.

    Raises:
        TypeError: ``meta`` is not a ``MetaOptimizer`` or an argument has the wrong type.
        ValueError: ``inner_steps`` is negative.
    """

    def __init__(
        self,
        meta: MetaOptimizer,
        *,
        loss_fn: LossFn,
        inner_steps: int | None = None,
        inner_step_fn: InnerStepFn | None = None,
        inner_reg_fn: InnerRegFn | None = None,
        grad_transforms: Sequence[Any] | None = None,
    ) -> None:
        if not isinstance(meta, MetaOptimizer):
            raise TypeError(f"meta must be a samgria MetaOptimizer, got {type(meta).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        check_inner_options(inner_step_fn, inner_reg_fn, None)
        self.meta = meta
        self.loss_fn = loss_fn
        self.inner_steps = None if inner_steps is None else check_steps(inner_steps, "inner_steps")
        self.inner_step_fn = inner_step_fn
        self.inner_reg_fn = inner_reg_fn
        self.grad_transforms = _check_transforms(grad_transforms)
        self.loss: torch.Tensor | None = None
        # What the algorithm declares: is its outer update formed from the adapted weights?
        self._pseudo_gradient = meta.outer_update == "pseudo_gradient"
        self._active = False
        self._steps_in_block = 0
        self._reset()

    def _reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.weights: list[float] = []
        self._specs: list[_TaskSpec] = []
        self._learners: list[Learner] = []  # Reptile only: adapted (detached) learners
        # The weights are used times 2**_shift, which puts the largest so far in [1, 2): the
        # weighted mean does not depend on their scale, and a task's loss is back-propagated
        # times at most 2 (16-bit gradients neither overflow for large weights nor underflow
        # for small ones). None before the first task of weight > 0.
        self._shift: int | None = None

    def _scaled(self, weight: float) -> float:
        """``weight`` times ``2**self._shift`` (exact for normal floats; no power of two is
        formed, which a subnormal weight's shift would overflow)."""
        return 0.0 if self._shift is None else math.ldexp(weight, self._shift)

    def _scale_to(self, weight: float) -> None:
        """Take ``weight`` into the scale, rescaling the gradients accumulated so far (by a
        power of two, exact but for underflow) when it is the largest weight yet."""
        if weight == 0.0:
            return
        shift = 1 - math.frexp(weight)[1]  # weight * 2**shift in [1, 2)
        if self._shift is not None and shift >= self._shift:
            return
        if self._shift is not None:
            factor = math.ldexp(1.0, shift - self._shift)
            with torch.no_grad():
                for p in self._meta_params():
                    if p.grad is not None:
                        p.grad.mul_(factor)
        self._shift = shift

    # ------------------------------------------------------------------ tasks
    def _adapt(self, spec: _TaskSpec, record: bool) -> Learner:
        x, y = spec.support
        steps = spec.steps if spec.steps is not None else self.inner_steps
        transforms = spec.grad_transforms if spec.grad_transforms is not None else self.grad_transforms
        if record:
            return self.meta.adapt(
                lambda f: self.loss_fn(f(x), y),
                steps,
                weight=spec.weight,
                inner_step_fn=self.inner_step_fn,
                inner_reg_fn=self.inner_reg_fn,
                grad_transforms=transforms,
            )
        learner = self.meta.clone(
            inner_step_fn=self.inner_step_fn, inner_reg_fn=self.inner_reg_fn, grad_transforms=transforms
        )
        return learner.adapt_closure(lambda f: self.loss_fn(f(x), y), steps)

    def _task_loss(self, spec: _TaskSpec, learner: Learner, index: int) -> torch.Tensor:
        x, y = spec.query if spec.query is not None else spec.support
        with torch.enable_grad():
            loss = self.loss_fn(learner(x), y)
        check_scalar_loss(loss, f"the query loss of task {index}")
        return loss

    def _run_maml(self, spec: _TaskSpec, index: int, scale: float | None) -> torch.Tensor:
        """Adapt, compute the query loss and back-propagate ``scale * loss``; return it detached.

        ``scale=None``: the task's scaled weight (:meth:`_scaled`), its weight taken into the
        scale only once its loss is computed, so a task whose adaptation or loss raises leaves
        the scale and the gradients of the tasks added before it as they were.
        """
        learner = self._adapt(spec, record=False)
        loss = self._task_loss(spec, learner, index)
        if scale is None:
            self._scale_to(spec.weight)
            scale = self._scaled(spec.weight)
        if scale != 0.0 and loss.requires_grad:
            (loss * scale).backward()
        return loss.detach()

    def task(
        self,
        support: tuple[Any, Any],
        query: tuple[Any, Any] | None = None,
        *,
        weight: float = 1.0,
        inner_steps: int | None = None,
        grad_transforms: Sequence[Any] | None = None,
    ) -> torch.Tensor:
        """Adapt to one task and add it to the meta-update.

        Args:
            support: ``(inputs, targets)`` the inner loop adapts on.
            query: ``(inputs, targets)`` of the meta-loss. Required except for Reptile, which
                needs no query set (its reported loss is then the post-adaptation support
                loss).
            weight: Task weight :math:`w_i \\ge 0` in the weighted mean.
            inner_steps: Inner steps of this task (default: the builder's, then the
                meta-optimizer's).
            grad_transforms: Inner-loop gradient transforms of this task (default: the
                builder's).

        Returns:
            The detached post-adaptation query loss of the task (a 0-dim tensor).

        Raises:
            TypeError: ``support``/``query`` is not a pair, or ``weight``/``inner_steps`` has
                the wrong type.
            ValueError: ``query`` is missing or its inputs have no examples (a tensor with 0
                rows) for a MAML-family meta-optimizer, ``weight`` or ``inner_steps`` is
                negative, the support inputs have no examples while inner steps would adapt on
                them, or ``loss_fn`` does not return a scalar.
        """
        _check_pair("support", support)
        if query is None:
            if self.meta.needs_query:
                raise ValueError(
                    f"query is required for {type(self.meta).__name__} (the meta-loss is the query "
                    "loss); only Reptile can do without a query set"
                )
        else:
            query_inputs = _check_pair("query", query)[0]
            if self.meta.needs_query and _has_no_rows(query_inputs):
                raise ValueError(
                    f"query has no examples (inputs of shape {tuple(query_inputs.shape)}): "
                    f"{type(self.meta).__name__}'s meta-loss is the query loss (the loss of an "
                    "empty batch is nan); only Reptile can do without a query set"
                )
        check_real("weight", weight, low=0.0)
        steps = None if inner_steps is None else check_steps(inner_steps, "inner_steps")
        adapting = next(n for n in (steps, self.inner_steps, self.meta.inner_steps) if n is not None)
        inputs = support[0]
        if adapting > 0 and _has_no_rows(inputs):
            raise ValueError(
                f"support has no examples (inputs of shape {tuple(inputs.shape)}), on which "
                f"{type(self.meta).__name__} would take {adapting} inner step(s): the gradient of an "
                "empty loss is zero, so nothing would adapt; use inner_steps=0 to score a task "
                "without adapting"
            )
        spec = _TaskSpec(
            tuple(support), None if query is None else tuple(query), float(weight), steps,
            _check_transforms(grad_transforms),
        )
        if not self._specs:
            self.meta.zero_grad()
            self._shift = None  # not the scale of a task that raised before any was added
        index = len(self._specs)
        if self._pseudo_gradient:
            learner = self._adapt(spec, record=False)
            with torch.no_grad():
                loss = self._task_loss(spec, learner, index).detach()
            self._learners.append(learner)
        else:
            loss = self._run_maml(spec, index, None)
        self._specs.append(spec)
        self.losses.append(loss)
        self.weights.append(spec.weight)
        return loss

    # ------------------------------------------------------------------ outer update
    def _meta_params(self) -> list[torch.Tensor]:
        seen: set[int] = set()
        out = []
        for group in self.meta.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _weighted_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The weighted mean of the (detached) ``losses``, leaving out the tasks of weight 0.

        Those tasks take no part in the update, so their loss (``nan`` even) must not make the
        reported meta-loss non-finite and skip the step (``0 * nan`` is ``nan``).
        """
        kept = [(loss, w) for loss, w in zip(losses, self.weights) if w != 0.0]
        return MetaOptimizer.meta_loss(torch.stack([loss for loss, _ in kept]), [w for _, w in kept])

    def step(self) -> torch.Tensor:
        """Apply the outer update for the tasks added so far and start a new meta-update.

        Returns:
            The weighted meta-loss (detached), also stored in :attr:`loss`.

        Raises:
            ValueError: No task was added, or all task weights are 0 -- with a distributed
                meta-optimizer, on every rank (a rank may hold no task, or only tasks of weight
                0, and takes part in the update with weight 0). Nothing is applied then and the
                gradients are reset.
        """
        try:
            total = sum(self.weights)
            if self.meta.world_size == 1:
                if not self._specs:
                    raise ValueError("no task was added to the meta-step: call ms.task(...) at least once")
                if total <= 0:
                    raise ValueError(f"task weights must not all be 0, got {self.weights}")
            calls = 0

            def closure() -> torch.Tensor | None:
                nonlocal calls
                calls += 1
                if total <= 0:  # a rank without weighted tasks: it contributes nothing
                    self.meta.zero_grad(set_to_none=True)
                    return None
                if self._pseudo_gradient:
                    return self._reptile_closure(first=calls == 1)
                return self._maml_closure(first=calls == 1, total=sum(self._scaled(w) for w in self.weights))

            loss = self.meta.step(closure)
        except BaseException:
            self.meta.zero_grad()
            self._reset()
            raise
        self.loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
        self._reset()
        self._steps_in_block += 1
        return self.loss

    def _maml_closure(self, *, first: bool, total: float) -> torch.Tensor:
        """``total``: the sum of the scaled weights (:meth:`_scaled`), in ``[1, 2 * tasks)``."""
        for spec in self._specs:  # this rank's share of a distributed meta-step
            self.meta.add_task_weight(spec.weight)
        if first:
            with torch.no_grad():
                for p in self._meta_params():
                    if p.grad is not None:
                        p.grad.div_(total)
            return self._weighted_loss(self.losses)
        # Re-evaluation at the current meta-parameters (e.g. SAM's perturbed point).
        self.meta.zero_grad()
        losses = [self._run_maml(spec, i, self._scaled(spec.weight) / total) for i, spec in enumerate(self._specs)]
        return self._weighted_loss(losses)

    def _reptile_closure(self, *, first: bool) -> torch.Tensor:
        if first:
            for learner, spec in zip(self._learners, self._specs):
                self.meta.record_adaptation(learner.params, spec.weight)
            return self._weighted_loss(self.losses)
        losses = []
        for i, spec in enumerate(self._specs):
            learner = self._adapt(spec, record=True)
            with torch.no_grad():
                losses.append(self._task_loss(spec, learner, i).detach())
        return self._weighted_loss(losses)

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> MetaStep:
        if self._active:
            raise RuntimeError("this MetaStep is already in use; nested `with` blocks are not supported")
        if self._specs:
            raise RuntimeError(
                f"this MetaStep already holds {len(self._specs)} task(s) added outside the `with` "
                "block; call step() first"
            )
        self._active = True
        self._steps_in_block = 0
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._active = False
        if exc_type is not None:
            self.meta.zero_grad()
            self._reset()
            return
        if self._specs or self._steps_in_block == 0:
            self.step()  # raises if the block added no task at all

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(meta={type(self.meta).__name__}, tasks={len(self._specs)}, "
            f"inner_steps={self.inner_steps})"
        )


def meta_step(
    meta: MetaOptimizer,
    *,
    loss_fn: LossFn,
    inner_steps: int | None = None,
    inner_step_fn: InnerStepFn | None = None,
    inner_reg_fn: InnerRegFn | None = None,
    grad_transforms: Sequence[Any] | None = None,
) -> MetaStep:
    """Return a :class:`MetaStep` builder to use in a ``with`` block (the outer update on exit).

    Example::

        with meta_step(meta, loss_fn=F.mse_loss, inner_steps=5) as ms:
            for support, query in tasks:
                ms.task(support=support, query=query)

    Args:
        meta: The meta-optimizer.
        loss_fn: ``loss_fn(prediction, target) -> scalar``.
        inner_steps: Default inner steps of every task (default: ``meta.inner_steps``).
        inner_step_fn: Differentiable inner update rule (default plain SGD).
        inner_reg_fn: ``inner_reg_fn(current_params, base_params) -> scalar`` added to the
            support loss at every inner step.
        grad_transforms: Default inner-loop gradient transforms (e.g. ``InnerSAM``).

    Returns:
        A fresh :class:`MetaStep`.
    """
    return MetaStep(
        meta,
        loss_fn=loss_fn,
        inner_steps=inner_steps,
        inner_step_fn=inner_step_fn,
        inner_reg_fn=inner_reg_fn,
        grad_transforms=grad_transforms,
    )
