"""Adapting a meta-batch of equal-shape tasks at once with :func:`torch.func.vmap`.

The per-task computation -- ``inner_steps`` gradient steps on the support set followed by the
query loss -- is written once for a single task with :func:`torch.func.grad` and vectorised
over the task axis with :func:`torch.func.vmap`. The meta-parameters enter unbatched, so a
single ordinary ``backward()`` of the stacked query losses gives the exact (second-order, unless
``first_order``) meta-gradient, the same as a Python loop over tasks, at a fraction of the
interpreter overhead.

Buffers (BatchNorm statistics) are given to every task as its own fresh copy (batched along the
task axis), following the policy of :mod:`samgria.meta.functional`: the model's buffers are
never updated. Randomness (dropout) differs across tasks (``randomness="different"``).

Not every model can be vmapped (data-dependent Python control flow, ``.item()``, some custom
ops); :meth:`samgria.meta.base.MetaOptimizer.task_losses` falls back to a loop in that case.

Known torch limitation: the batching rules of the *double* backward of batch/instance
normalisation with batch statistics and of affine layer normalisation give wrong values
(pytorch/functorch#534; checked against a loop and finite differences with torch 2.13). A
second-order inner loop through such a module is therefore never vmapped
(:func:`second_order_vmap_blocker` names the module); first-order and evaluation runs are exact
and still vectorised. Normalisation written with functional calls inside a custom module cannot
be detected: pass ``vectorize=False`` for such models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from samgria.data.task import Task

__all__ = [
    "batched_task_losses",
    "can_vectorize",
    "second_order_vmap_blocker",
    "stack_tasks",
    "vmap_task_losses",
]


def second_order_vmap_blocker(model: nn.Module) -> str | None:
    """Name a submodule whose second-order gradient torch's ``vmap`` gets wrong, or ``None``.

    These are BatchNorm/InstanceNorm layers normalising with batch statistics (train mode or
    ``track_running_stats=False``) and LayerNorm layers (see the module docstring).

    Args:
        model: The module to inspect (its current train/eval mode counts).

    Returns:
        ``"name (TypeName)"`` of the first such submodule, or ``None``.
    """
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    for name, module in model.named_modules():
        if isinstance(module, norm_types):
            if module.training or not module.track_running_stats:
                return f"{name or '<model>'} ({type(module).__name__})"
        elif isinstance(module, nn.LayerNorm):
            return f"{name or '<model>'} ({type(module).__name__})"
    return None


def _signature(t: torch.Tensor) -> tuple[Any, ...]:
    return (tuple(t.shape), t.dtype, t.device)


def can_vectorize(tasks: Sequence[Task]) -> bool:
    """Return ``True`` when every task's four tensors have the same shapes, dtypes and devices."""
    if not tasks:
        return False
    first = tasks[0]
    fields = ("support_x", "support_y", "query_x", "query_y")
    if not all(isinstance(getattr(first, f, None), torch.Tensor) for f in fields):
        return False
    ref = [_signature(getattr(first, f)) for f in fields]
    for task in tasks[1:]:
        for f, r in zip(fields, ref):
            value = getattr(task, f, None)
            if not isinstance(value, torch.Tensor) or _signature(value) != r:
                return False
    return True


def stack_tasks(tasks: Sequence[Task]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack equal-shape tasks into ``(support_x, support_y, query_x, query_y)`` with a task axis."""
    return (
        torch.stack([t.support_x for t in tasks]),
        torch.stack([t.support_y for t in tasks]),
        torch.stack([t.query_x for t in tasks]),
        torch.stack([t.query_y for t in tasks]),
    )


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
        tasks: Equal-shape tasks (see :func:`can_vectorize`).
        loss_fn: ``loss_fn(prediction, target) -> scalar``.
        steps: Number of inner steps.
        first_order: Treat the support gradients as constants (FOMAML / Reptile).
        return_params: Also return the adapted parameters, each with a leading task axis.

    Returns:
        ``(losses, adapted)`` where ``losses`` has shape ``(len(tasks),)`` and ``adapted`` is a
        ``{name: tensor}`` of batched adapted parameters, or ``None`` unless ``return_params``.

    Raises:
        ValueError: The tasks are not of equal shape or ``loss_fn`` does not return a scalar
            per task.
        RuntimeError: The model cannot be vmapped (raised by :func:`torch.func.vmap`).
    """
    if not can_vectorize(tasks):
        raise ValueError("vmap over tasks needs tasks whose tensors all have equal shapes, dtypes and devices")
    return batched_task_losses(
        model,
        params,
        adapt_names,
        lrs,
        *stack_tasks(tasks),
        loss_fn,
        steps,
        first_order=first_order,
        return_params=return_params,
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
    """The vectorised inner loop on stacked task tensors (leading axis: task).

    For task :math:`i` with support loss :math:`\\mathcal{L}^s_i` and query loss
    :math:`\\mathcal{L}^q_i` this computes

    .. math::

        \\phi_i^{(0)} = \\theta, \\quad
        \\phi_i^{(k+1)} = \\phi_i^{(k)} - \\alpha \\odot \\nabla \\mathcal{L}^s_i(\\phi_i^{(k)}), \\quad
        \\ell_i = \\mathcal{L}^q_i(\\phi_i^{(\\text{steps})}),

    for all tasks in one vectorised program. The function is pure (no Python-side state), so
    it can be wrapped in :func:`torch.func.grad_and_value` and :func:`torch.compile` (see
    ``benchmarks/meta_throughput.py``).

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
        ValueError: ``loss_fn`` does not return a scalar per task.
    """
    adapt_set = set(adapt_names)
    adapted = {n: params[n] for n in adapt_names}
    fixed = {n: p for n, p in params.items() if n not in adapt_set}
    n_tasks = support_x.shape[0]
    buffers = {
        n: b.detach().unsqueeze(0).expand(n_tasks, *b.shape).clone() for n, b in model.named_buffers()
    }
    sx, sy, qx, qy = support_x, support_y, query_x, query_y

    def forward(fast: dict[str, torch.Tensor], bufs: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
        # A fresh copy per forward (the policy of samgria.meta.functional): BatchNorm may write
        # into it, and nothing captured by a grad transform is mutated.
        fresh = {n: b.clone() for n, b in bufs.items()}
        return functional_call(model, ({**fixed, **fast}, fresh), (x,))

    def one_task(
        fast: dict[str, torch.Tensor],
        bufs: dict[str, torch.Tensor],
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        query_y: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        def support_loss(current: dict[str, torch.Tensor]) -> torch.Tensor:
            return loss_fn(forward(current, bufs, support_x), support_y)

        for _ in range(steps):
            g = grad(support_loss)(fast)
            if first_order:
                g = {n: v.detach() for n, v in g.items()}
            fast = {n: fast[n] - lrs[n] * g[n] for n in fast}
        loss = loss_fn(forward(fast, bufs, query_x), query_y)
        return loss, (fast if return_params else {})

    losses, fast = vmap(one_task, in_dims=(None, 0, 0, 0, 0, 0), randomness="different")(
        adapted, buffers, sx, sy, qx, qy
    )
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (n_tasks,):
        shape = tuple(losses.shape[1:]) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"loss_fn must return a scalar per task, got shape {shape}")
    return losses, (fast if return_params else None)
