"""Meta-training across processes: the collectives of a meta-optimizer with ``distributed=True``.

A meta-batch is split across :math:`W` processes (ranks); rank :math:`r` adapts its tasks
:math:`\\mathcal{B}_r` with task weights :math:`w_i` (1 by default) and forms its outer
gradient :math:`g_r` -- the weighted mean over its own tasks of the MAML family's meta-gradient,
:math:`g_r = \\sum_{i \\in \\mathcal{B}_r} w_i \\nabla_\\theta \\mathcal{L}^q_i / W_r`, or Reptile's
pseudo-gradient :math:`g_r = \\theta - \\sum_{i \\in \\mathcal{B}_r} w_i \\theta'_i / W_r`, with
:math:`W_r = \\sum_{i \\in \\mathcal{B}_r} w_i`. The outer update of the whole meta-batch uses

.. math::

    g = \\frac{\\sum_r W_r \\, g_r}{\\sum_r W_r}, \\qquad
    \\mathcal{L} = \\frac{\\sum_r W_r \\, \\mathcal{L}_r}{\\sum_r W_r},

the weighted mean over every task of every rank, which is what one process adapting the whole
meta-batch computes, also when the ranks hold different numbers of tasks. Both sums are
``torch.distributed.all_reduce`` (``SUM``) calls: one small ``float64`` buffer with
:math:`W_r`, :math:`W_r \\mathcal{L}_r` and which parameters have a gradient, then one flat
buffer of :math:`(W_r / \\sum_s W_s) \\, g_r` per device and dtype of the meta-parameters: each
rank's gradient scaled by its share of the weight, at most 1, so that 16-bit gradients neither
overflow for large task weights nor underflow for small ones. Every rank ends with the same
gradients and loss, so decisions taken afterwards (the non-finite skip) agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from samgria._checks import check_bool

__all__ = [
    "all_reduce_meta_gradients",
    "broadcast_index",
    "broadcast_module",
    "mean_over_ranks",
]


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def check_distributed(distributed: Any, process_group: Any) -> tuple[bool, Any]:
    """Check the ``distributed`` / ``process_group`` arguments of a meta-optimizer.

    Raises:
        TypeError: ``distributed`` is not a bool.
        ValueError: ``process_group`` without ``distributed=True``, or ``distributed=True``
            without an initialised ``torch.distributed`` process group.
    """
    check_bool("distributed", distributed)
    if not distributed:
        if process_group is not None:
            raise ValueError(f"process_group needs distributed=True, got distributed=False and process_group={process_group!r}")
        return False, None
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group (call "
            "torch.distributed.init_process_group first, e.g. under torchrun), got distributed=True "
            "with none initialised"
        )
    return True, process_group


def world(process_group: Any) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``process_group`` (``None``: the default group)."""
    dist = _dist()
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def _source_rank(process_group: Any) -> int:
    """The global rank of the group's rank 0."""
    return 0 if process_group is None else _dist().get_global_rank(process_group, 0)


@torch.no_grad()
def broadcast_module(module: nn.Module, process_group: Any) -> None:
    """Copy rank 0's parameters and buffers to every rank, in place (as ``DistributedDataParallel``
    does when it is built), so the replicas start identical."""
    dist = _dist()
    source = _source_rank(process_group)
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=source, group=process_group)


def broadcast_index(index: int, process_group: Any, device: torch.device | None = None) -> int:
    """Rank 0's ``index`` (a small integer, e.g. of a choice), on every rank."""
    buffer = torch.tensor([index], dtype=torch.int64, device=torch.device("cpu") if device is None else device)
    _dist().broadcast(buffer, src=_source_rank(process_group), group=process_group)
    return int(buffer.item())


def _scalar_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


@torch.no_grad()
def all_reduce_meta_gradients(
    params: Sequence[torch.Tensor],
    weight: float,
    loss: torch.Tensor | float | None,
    process_group: Any,
) -> tuple[float, float | None]:
    """Replace every ``p.grad`` by the task-weighted mean over the ranks (see the module docs).

    Args:
        params: The meta-parameters, in the same order on every rank.
        weight: This rank's task weight :math:`W_r` (0 for a rank without tasks).
        loss: This rank's scalar meta-loss :math:`\\mathcal{L}_r` (a one-element tensor or a
            number), or ``None``.
        process_group: The group (``None``: the default group).

    Returns:
        ``(total_weight, loss)``: :math:`\\sum_r W_r` and the weighted mean loss over the ranks
        that reported one (``None`` if none did). With a total weight of 0 the gradients are
        left as they are.

    Raises:
        ValueError: A meta-parameter has a sparse gradient.
    """
    dist = _dist()
    if not params:
        raise ValueError("params must hold the meta-parameters, got none")
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError(f"distributed meta-steps need dense gradients, got a sparse one of shape {tuple(p.shape)}")
    device = params[0].device
    has_loss = loss is not None
    if isinstance(loss, torch.Tensor):
        loss_value = float(loss.detach().reshape(()))
    else:
        loss_value = 0.0 if loss is None else float(loss)
    scalars = torch.tensor(
        [weight, weight * loss_value if has_loss else 0.0, weight if has_loss else 0.0]
        + [1.0 if p.grad is not None else 0.0 for p in params],
        dtype=_scalar_dtype(device),
        device=device,
    )
    dist.all_reduce(scalars, group=process_group)
    total, weighted_loss, loss_weight = (float(v) for v in scalars[:3].tolist())
    present = scalars[3:].tolist()
    if total == 0.0:
        return total, None
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p, flag in zip(params, present):
        if flag > 0:
            buckets.setdefault((p.device, p.dtype), []).append(p)
    # Each rank's share W_r / sum_r W_r (at most 1, in float64) scales its gradient before the
    # sum: the buffer holds a convex combination of the ranks' gradients, within their range.
    # Scaling by W_r and dividing the sum afterwards overflowed 16-bit gradients for large task
    # weights (W_r g_r beyond 65504 in float16: a skipped step) and rounded them to subnormal
    # numbers, or to 0, for small ones.
    share = weight / total
    for members in buckets.values():
        flat = torch.cat(
            [
                (p.grad * share if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in members
            ]
        )
        dist.all_reduce(flat, group=process_group)
        offset = 0
        for p in members:
            mean = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = mean.clone()
            else:
                p.grad.copy_(mean)
    return total, (weighted_loss / loss_weight if loss_weight > 0 else None)


def mean_over_ranks(total: float, count: int, process_group: Any, device: torch.device | None = None) -> float:
    """The mean over all ranks of per-rank sums: :math:`\\sum_r s_r / \\sum_r n_r`.

    Args:
        total: This rank's sum :math:`s_r` (e.g. of query losses).
        count: The number of terms :math:`n_r` in it (0 for a rank without any).
        process_group: The group (``None``: the default group).
        device: Where the reduced buffer lives (the backend's device; default CPU).

    Raises:
        ValueError: No rank had any term.
    """
    dist = _dist()
    device = torch.device("cpu") if device is None else device
    buffer = torch.tensor([total, float(count)], dtype=_scalar_dtype(device), device=device)
    dist.all_reduce(buffer, group=process_group)
    total_sum, total_count = buffer.tolist()
    if total_count == 0:
        raise ValueError("tasks must hold at least one task on some rank, got 0 tasks on every rank")
    return total_sum / total_count
