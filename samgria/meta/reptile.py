"""Reptile (Nichol, Achiam & Schulman, 2018, "On First-Order Meta-Learning Algorithms").

Each task is adapted with :math:`k` first-order inner steps from :math:`\\theta` to
:math:`\\theta'_i`; the outer update moves :math:`\\theta` towards their (weighted) mean. samgria
writes this as a pseudo-gradient handed to the outer optimizer,

.. math::

    g = \\theta - \\frac{\\sum_i w_i \\theta'_i}{\\sum_i w_i},

so an outer ``SGD(lr=β)`` gives exactly the paper's update
:math:`\\theta \\leftarrow \\theta + \\beta (\\bar\\theta' - \\theta)` and an outer Adam its
adaptive variant. No query set is needed; the query losses of
:meth:`Reptile.task_losses` are reported for monitoring only, and a task with an empty query set
(``k_query=0``) is scored on its support set, as ``meta_step`` scores a task without ``query``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from samgria.data.task import Task
from samgria.meta.base import MetaOptimizer, _SkippedByPolicy
from samgria.meta.functional import check_params
from samgria.optim import TransformingOptimizer

__all__ = ["Reptile"]


def _scored_on_support(task: Task) -> Task:
    """``task``, or when its query set is empty its support set in place of one."""
    if task.query_x.shape[:1] != (0,):
        return task
    return dataclasses.replace(task, query_x=task.support_x, query_y=task.support_y)


def _pseudo_gradient(
    theta: torch.Tensor, name: str, records: list[tuple[dict[str, torch.Tensor], float]], total: float
) -> torch.Tensor:
    """:math:`g = -\\sum_i (w_i / W) (\\theta'_i - \\theta)` of one parameter, ``W`` the weight total.

    Formed from the differences :math:`\\theta'_i - \\theta` (exact for nearby floats), not
    as :math:`\\theta - \\bar\\theta'`, whose weighted mean of large values loses the small
    update to rounding (in bfloat16, an error 22 times the exact value). A 16-bit parameter's
    differences are taken and summed in float32 (where they are exact) and the sum is rounded
    to the parameter's dtype once. A record of weight 0, or without ``name``, adds nothing
    (not even ``0 * nan``).
    """
    wide = torch.promote_types(theta.dtype, torch.float32)
    base = theta.to(wide)
    acc = torch.zeros_like(base)
    for rec, w in records:
        if w != 0 and name in rec:
            acc.add_(rec[name].to(wide) - base, alpha=w / total)
    return acc.neg_().to(theta.dtype)


def _maximizing(optimizer: torch.optim.Optimizer) -> str | None:
    """Where ``optimizer`` is set to maximise -- a param group's ``maximize``, or the attribute
    pytorch_optimizer's optimizers keep it in (also a ``TransformingOptimizer``'s inner
    optimizer's) -- or ``None``."""
    for index, group in enumerate(optimizer.param_groups):
        maximize = group.get("maximize")
        if maximize is not None and bool(maximize):
            return f"param_groups[{index}] has maximize={maximize!r}"
    driven = optimizer
    while isinstance(driven, TransformingOptimizer):
        driven = driven.inner
    if getattr(driven, "maximize", None) is True:
        return f"{type(driven).__name__} has maximize=True on itself"
    return None


class Reptile(MetaOptimizer):
    """Reptile as a ``torch.optim.Optimizer``: adapt per task, step towards the adapted weights.

    The closure calls :meth:`adapt` (or :meth:`task_losses`) for each task and returns a
    monitoring loss; it need not call ``backward``. :meth:`step` then sets, for every adapted
    parameter, ``p.grad = θ − mean_i(θ'_i)`` (weighted by each task's ``weight``), sets the
    gradient of every non-adapted meta-parameter to ``None``, calls the outer optimizer and
    clears the record. Without a closure, ``step()`` uses the tasks adapted since the last step;
    with one, those and the tasks the closure adapts.

    A learner of :meth:`clone` (learn2learn's ``clone()`` / ``adapt(loss)``) records nothing:
    hand its adapted weights to :meth:`record_adaptation` (``meta.record_adaptation(learner.params,
    weight)``). Likewise, steps taken with ``learner.adapt(loss)`` on a learner that :meth:`adapt`
    returned are not in its record, which holds the weights :meth:`adapt` reached.

    :meth:`adapt` records every adaptation (the adapted weights) for the next step, so adapt
    for evaluation or at test time with :meth:`evaluate` or a learner (:meth:`clone`), which
    record nothing, or drop the record with :meth:`clear_records`: otherwise the records stay in
    memory, and the next step moves towards those tasks too.

    The inner loop is always first order and keeps no graph to the meta-parameters (Reptile
    needs only the values of :math:`\\theta'_i`); the learners returned by :meth:`adapt` are
    therefore detached.

    No query set is needed. The losses of :meth:`task_losses`, :meth:`evaluate` and
    ``MetaTrainer`` are for monitoring; a task with an empty query set (``k_query=0``) is scored
    on its support set (its post-adaptation support loss), as ``meta_step`` scores a task
    without ``query``. The non-finite policy (``non_finite``) judges the pseudo-gradient, which
    is what the update uses, never the monitoring loss.

    With ``distributed=True`` each rank forms the pseudo-gradient of its own tasks and
    :meth:`step` all-reduces it weighted by the ranks' task weights, which gives
    :math:`\\theta - \\sum_i w_i \\theta'_i / \\sum_i w_i` over the tasks of every rank; a rank
    may adapt no task in a step.

    Args:
        model: The module to meta-train.
        outer: Outer optimizer class (``torch.optim.SGD`` with ``lr=β`` is the paper's update)
            or an already built optimizer.
        inner_lr: Inner step size :math:`\\alpha \\ge 0`.
        inner_steps: Default number of inner steps :math:`k`.
        **outer_kwargs: The outer optimizer class's keyword arguments (``lr``, ...) and
            :class:`~samgria.meta.base.MetaOptimizer`'s: ``params`` (the param groups, e.g. one
            with ``adapt=False``), ``non_finite``, ``distributed``, ``process_group`` and
            ``checkpoint_inner_steps``.

    Raises:
        TypeError: ``first_order`` is given (Reptile is always first order), or as
            :class:`~samgria.meta.base.MetaOptimizer`.
        ValueError: The outer optimizer maximizes (``maximize=True`` in a param group, or on
            the optimizer as pytorch_optimizer's keep it): it would move :math:`\\theta` away
            from the adapted weights. Or as :class:`~samgria.meta.base.MetaOptimizer` (a negative
            ``inner_lr`` or ``inner_steps``, a tensor of the outer optimizer that is not a
            parameter of ``model``, ...).
    """

    outer_update = "pseudo_gradient"
    needs_query = False

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
            raise TypeError(f"Reptile is always first order; got first_order={outer_kwargs['first_order']!r}")
        super().__init__(model, outer, inner_lr=inner_lr, inner_steps=inner_steps, first_order=True, **outer_kwargs)
        self._records: list[tuple[dict[str, torch.Tensor], float]] = []

    def _check_outer(self, outer: torch.optim.Optimizer) -> None:
        """Refuse an outer optimizer that maximises: the pseudo-gradient is no gradient of a
        loss, and a maximising optimizer would move :math:`\\theta` away from the adapted
        weights."""
        where = _maximizing(outer)
        if where is not None:
            raise ValueError(
                f"Reptile cannot drive an outer optimizer that maximizes ({where}): its "
                "pseudo-gradient theta - mean(adapted theta) is no gradient of a loss, so a "
                "maximizing optimizer would move theta away from the adapted weights, whatever the "
                "objective. Use maximize=False; to maximise a reward, adapt on its negative (the "
                "support closure returns -reward)"
            )

    def record_adaptation(self, adapted: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        """Keep one task's adapted weights (those of the adapted names) for :meth:`step`.

        Raises:
            TypeError: ``adapted`` is not a mapping of parameter names to tensors, or ``weight``
                is not a real number.
            ValueError: An adapted weight has another shape than its parameter, or ``weight``
                is negative or not finite. Nothing is recorded or counted then.
        """
        adapted = check_params(adapted, "adapted")
        names = self._adapt_config()[0]
        params = dict(self.model.named_parameters())
        for n in names:
            if n in adapted and adapted[n].shape != params[n].shape:
                raise ValueError(
                    f"adapted[{n!r}] must be a tensor of its parameter's shape {tuple(params[n].shape)}, "
                    f"got one of shape {tuple(adapted[n].shape)}"
                )
        super().record_adaptation(adapted, weight)  # counts the weight: after every check
        self._records.append(({n: adapted[n].detach() for n in names if n in adapted}, weight))

    def _scored_tasks(self, tasks: list[Task]) -> list[Task]:
        """A task with an empty query set is scored on its support set."""
        return [_scored_on_support(task) for task in tasks]

    @property
    def num_recorded(self) -> int:
        """Number of tasks adapted since the last :meth:`step`."""
        return len(self._records)

    def clear_records(self) -> None:
        """Forget the tasks adapted since the last :meth:`step` (adaptations for evaluation),
        their weights included."""
        self._task_weight -= sum(weight for _, weight in self._records)
        self._records.clear()

    @torch.no_grad()
    def _set_pseudo_grads(self) -> None:
        if self.world_size > 1 and sum(w for _, w in self._records) <= 0:
            # A rank without (weighted) tasks contributes nothing; step raises if no rank had any.
            for p in self._unique_params():
                p.grad = None
            return
        if not self._records:
            raise ValueError(
                "Reptile.step found no adapted tasks: call meta.adapt(...) or meta.task_losses(...) "
                "for at least one task, inside the closure or before step(); a learner of meta.clone() "
                "is not recorded: hand its adapted weights to meta.record_adaptation(learner.params)"
            )
        largest = max(w for _, w in self._records)
        if largest <= 0:
            raise ValueError(
                f"Reptile task weights must not all be 0, got {[w for _, w in self._records]}"
            )
        # Only the ratios of the weights count: scaled by a power of two (which changes no
        # rounding) so that the largest is in [0.5, 1), their sum is a float whatever they are.
        shift = -math.frexp(largest)[1]
        records = [(rec, math.ldexp(w, shift)) for rec, w in self._records]
        total = sum(w for _, w in records)
        params = dict(self.model.named_parameters())
        adapted_names = set().union(*(rec.keys() for rec, _ in records))
        for name in adapted_names:
            params[name].grad = _pseudo_gradient(params[name].detach(), name, records, total)
        adapted_ids = {id(params[n]) for n in adapted_names}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in adapted_ids:
                    p.grad = None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Set the Reptile pseudo-gradient and apply the outer update.

        Args:
            closure: Adapts per task (via :meth:`adapt` / :meth:`task_losses`) and returns a
                loss. Handed to the outer optimizer (which may call it more than once); each
                call starts from the tasks adapted before ``step()`` was called (none, unless a
                framework ran earlier micro-batches outside it, as Lightning's
                ``accumulate_grad_batches`` does), and the update is over those and the ones it
                adapts.

        Returns:
            What the outer optimizer's ``step`` returns.

        Raises:
            ValueError: No task was adapted, all task weights are 0, or the outer optimizer
                maximizes (``maximize=True`` set in a param group or on it since construction).
            RuntimeError: Tasks were adapted before ``step(closure)`` and the outer optimizer
                evaluates the closure more than once (SAM, LBFGS), or the closure is given under
                accelerate's gradient accumulation. A step that raises leaves the weights, the
                outer state and the record of adapted tasks (with their weights) as they were --
                except the ``FloatingPointError`` of ``non_finite="raise"``, which consumes the
                record as a skipped step does.
        """
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable, got {closure!r}")
        self._check_outer(self.outer)  # maximize may have been set since construction
        self._refuse_unsupported_closure(closure)
        # Tasks adapted before step() count too, once: a framework may run the closures of
        # earlier micro-batches outside the optimizer (Lightning's accumulate_grad_batches) or
        # hand step() a closure that adapts nothing (Lightning's manual optimization).
        adapted_before, weight_before = list(self._records), self._task_weight
        try:
            if closure is None:
                if self._is_state_init_step():
                    # torch.distributed.checkpoint creates a fresh optimizer's state by a step
                    # at lr 0 with zero gradients: the outer optimizer's, on those gradients. A
                    # save is no step: tasks adapted before it stay recorded for the next one.
                    return self._driven_step(None)
                self._set_pseudo_grads()
                result = self._guarded_step(None)
                self._records.clear()
                return result
            evaluations = 0

            def reptile_closure() -> Any:
                nonlocal evaluations
                evaluations += 1
                if adapted_before and evaluations > 1:
                    raise RuntimeError(
                        f"Reptile: {len(adapted_before)} task(s) were adapted before step(), from "
                        "the weights at its start, and the outer optimizer evaluates the closure "
                        "again (SAM, LBFGS), at weights where their pseudo-gradient would be wrong: "
                        "adapt every task inside the closure (with Lightning, one micro-batch per "
                        "step), and drop adaptations made for evaluation with meta.clear_records() "
                        "(they stay recorded until a step)"
                    )
                # Each evaluation starts from the tasks adapted before step(), weights counted.
                self._records[:] = adapted_before
                for _, weight in adapted_before:
                    self.add_task_weight(weight)
                loss = closure()
                self._set_pseudo_grads()
                return loss

            result = self._guarded_step(reptile_closure)
        except _SkippedByPolicy:  # non_finite="raise": judged and skipped, the record consumed
            self._records.clear()
            raise
        except BaseException:  # a step that raises changes nothing: the record and its weight stay
            self._records[:] = adapted_before
            self._task_weight = weight_before
            raise
        self._records.clear()
        return result
