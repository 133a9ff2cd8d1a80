"""Adapting a meta-batch of equal-shape tasks at once with :func:`torch.func.vmap`.

The functions here are the public face of the vmap path of the inner-loop engine
(:mod:`samgria.meta.engine`): the per-task computation -- inner steps on the support set,
then the query loss -- is the engine's one inner loop, vectorised over the task axis. The
meta-parameters enter unbatched, so one ordinary ``backward()`` of the stacked query losses
gives the exact (second-order, unless ``first_order``) meta-gradient, the same as a Python loop
over tasks.

Buffers (BatchNorm statistics) are given to every task as its own fresh copy, following the
policy of :mod:`samgria.meta.functional`: the model's buffers are never updated. Randomness
(dropout) differs across tasks (``randomness="different"``).

Known torch limitation: the batching rules of the *double* backward of batch/instance
normalisation with batch statistics and of affine layer normalisation give wrong values
(pytorch/functorch#534). A second-order inner loop whose support gradient back-propagates
through such a module (:func:`second_order_vmap_blocker` names the candidates;
:func:`~samgria.meta.engine.vmap_blocker` lets through those an ``nn.Sequential`` runs before
its first adapted child) is never vmapped; first-order and evaluation runs are exact and still
vectorised. Normalisation written with functional calls inside a custom module cannot be
detected: pass ``vectorize=False`` for such models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from samgria._checks import check_int
from samgria.data.task import Task
from samgria.meta.functional import check_adapt_names, sequence_as_list
from samgria.meta.engine import (
    InnerLoop,
    can_vectorize,
    second_order_vmap_blocker,
    stack_tasks,
    vmap_blocker,
    vmapped_task_losses,
)

__all__ = [
    "batched_task_losses",
    "can_vectorize",
    "second_order_vmap_blocker",
    "stack_tasks",
    "vmap_task_losses",
]


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` (a step size to its parameter)."""
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def vmap_task_losses(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    adapt_names: Sequence[str],
    lrs: Mapping[str, float | torch.Tensor],
    tasks: Sequence[Task],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    steps: int,
    *,
    first_order: bool = False,
    return_params: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Adapt to every task with plain SGD and return the post-adaptation query losses.

    Stacks the tasks (:func:`stack_tasks`) and calls :func:`batched_task_losses`.

    Args:
        model: The module (run with :func:`torch.func.functional_call`).
        params: All parameters, ``{name: tensor}``; those in ``adapt_names`` are adapted, the
            others enter every task unchanged (and still receive meta-gradients).
        adapt_names: Names of the adapted parameters.
        lrs: Step size per adapted name (number or tensor, e.g. Meta-SGD rates).
        tasks: Equal-shape tasks (see :func:`can_vectorize`): a sequence, or any iterable of them.
        loss_fn: ``loss_fn(prediction, target) -> scalar``.
        steps: Number of inner steps.
        first_order: Treat the support gradients as constants (FOMAML / Reptile).
        return_params: Also return the adapted parameters, each with a leading task axis.

    Returns:
        ``(losses, adapted)`` where ``losses`` has shape ``(len(tasks),)`` and ``adapted`` is a
        ``{name: tensor}`` of batched adapted parameters, or ``None`` unless ``return_params``.

    Raises:
        ValueError: ``tasks`` is empty or not of equal shapes, dtypes and devices, or as
            :func:`batched_task_losses` raises.
        TypeError: ``tasks`` is no iterable of tasks, or as :func:`batched_task_losses` raises.
        RuntimeError: The model cannot be vmapped (raised by :func:`torch.func.vmap`).
    """
    listed = sequence_as_list("tasks", tasks, "Task", refused=(Task,))
    if not listed:
        raise ValueError(f"tasks must be a non-empty sequence of Task, got {tasks!r}")
    return batched_task_losses(
        model, params, adapt_names, lrs, *stack_tasks(listed), loss_fn, steps,
        first_order=first_order, return_params=return_params,
    )


def batched_task_losses(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    adapt_names: Sequence[str],
    lrs: Mapping[str, float | torch.Tensor],
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    steps: int,
    *,
    first_order: bool = False,
    return_params: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """The vectorised inner loop with plain SGD on stacked task tensors (leading axis: task).

    For task :math:`i` with support loss :math:`\\mathcal{L}^s_i` and query loss
    :math:`\\mathcal{L}^q_i` this computes

    .. math::

        \\phi_i^{(0)} = \\theta, \\quad
        \\phi_i^{(k+1)} = \\phi_i^{(k)} - \\alpha \\odot \\nabla \\mathcal{L}^s_i(\\phi_i^{(k)}), \\quad
        \\ell_i = \\mathcal{L}^q_i(\\phi_i^{(\\text{steps})}),

    for all tasks in one vectorised program. The function is pure (no Python-side state), so
    it can be wrapped in :func:`torch.func.grad_and_value` and :func:`torch.compile`. Other
    update rules, regularisers and gradient transforms: build an
    :class:`~samgria.meta.engine.InnerLoop` and call
    :func:`samgria.meta.engine.vmapped_task_losses`.

    Args:
        model: The module.
        params: All parameters (see :func:`vmap_task_losses`).
        adapt_names: Names of the adapted parameters.
        lrs: Step size per adapted name.
        support_x: Support inputs, shape ``(T, K, ...)``.
        support_y: Support targets, shape ``(T, K, ...)``.
        query_x: Query inputs, shape ``(T, Q, ...)``.
        query_y: Query targets, shape ``(T, Q, ...)``.
        loss_fn: ``loss_fn(prediction, target) -> scalar``.
        steps: Number of inner steps.
        first_order: Treat the support gradients as constants.
        return_params: Also return the batched adapted parameters.

    Returns:
        ``(losses, adapted)`` as in :func:`vmap_task_losses`.

    Raises:
        ValueError: ``steps`` is negative, an adapted name is no entry of ``params`` or has no
            entry in ``lrs``, a step size is negative or not finite, a tensor step size does not
            broadcast to its parameter's shape, ``loss_fn`` returns a tensor with a dimension per
            task, or ``first_order=False`` with a module whose second-order gradient vmap gets
            wrong (:func:`second_order_vmap_blocker`: BatchNorm in train mode, LayerNorm).
        TypeError: ``steps`` is not an integer, ``params`` or ``lrs`` is not a mapping, a step
            size is neither a real number nor a real tensor, or ``loss_fn`` returns something
            other than a tensor.
    """
    names = tuple(check_adapt_names(adapt_names))
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping from parameter names to tensors, got {params!r}")
    unknown = [name for name in names if name not in params]
    if unknown:
        raise ValueError(f"adapt_names must name entries of params ({list(params)}), got {unknown}")
    # InnerLoop refuses an lrs that is no mapping, naming it; dict() would raise first.
    loop = InnerLoop(names, dict(lrs) if isinstance(lrs, Mapping) else lrs, check_int("steps", steps, low=0), first_order=first_order)
    for name in names:
        lr, param = loop.lrs[name], params[name]
        if isinstance(lr, torch.Tensor) and not _broadcasts_to(lr.shape, param.shape):
            raise ValueError(
                f"lrs[{name!r}] must be a number or a tensor that broadcasts to the parameter's shape "
                f"{tuple(param.shape)}, got a tensor of shape {tuple(lr.shape)}"
            )
    blocker = vmap_blocker(model, loop)
    if blocker is not None:
        raise ValueError(
            f"this inner loop cannot be vmapped: {blocker}; adapt task by task instead "
            "(samgria.meta.engine.task_losses with path='loop'), or pass first_order=True"
        )
    losses, fast = vmapped_task_losses(model, loop, dict(params), support_x, support_y, query_x, query_y, loss_fn)
    return losses, (fast if return_params else None)
