"""Global L2 norm of a list of tensors, as one scalar.

Each tensor's norm is taken in its own dtype (16-bit tensors in float32: casting every float32
gradient to float64 first costs several times the norm itself on the CPU), and the per-tensor
norms are combined in float64 (float32 on devices without float64), so a model mixing bfloat16,
float32 and float64 parameters gets one accurate norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from samgria.functional._grouping import group_indices_by_device_and_dtype
from samgria.functional._views import widened_dtype

__all__ = ["global_norm"]


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def global_norm(tensors: Sequence[torch.Tensor], *, foreach: bool = True) -> torch.Tensor:
    r"""Return :math:`\sqrt{\sum_i \lVert t_i \rVert_2^2}` over every tensor in ``tensors``.

    Args:
        tensors: Dense tensors of any shapes, devices and floating dtypes.
        foreach: Use one ``torch._foreach_norm`` per (device, dtype) group; ``False`` takes the
            per-tensor reference path. Both give the same value.

    Returns:
        A 0-dim tensor on the device of the first tensor, in float64 (float32 on MPS).
        The norm of an empty list is 0.
    """
    if len(tensors) == 0:
        return torch.zeros((), dtype=torch.float64)
    out_device = tensors[0].device
    acc_dtype = _accumulation_dtype(out_device)
    norms: list[torch.Tensor | None] = [None] * len(tensors)
    if foreach:
        groups = group_indices_by_device_and_dtype(tensors)
        if len(groups) == 1:  # the common case: one stack, one cast
            ((_device, dtype),) = groups
            group_norms = torch._foreach_norm(list(tensors), 2, dtype=widened_dtype(dtype))
            return torch.linalg.vector_norm(torch.stack(group_norms).to(out_device, acc_dtype), 2)
        for (_device, dtype), indices in groups.items():
            group_norms = torch._foreach_norm([tensors[i] for i in indices], 2, dtype=widened_dtype(dtype))
            for index, norm in zip(indices, group_norms):
                norms[index] = norm
    else:
        for index, tensor in enumerate(tensors):
            norms[index] = torch.linalg.vector_norm(tensor, 2, dtype=widened_dtype(tensor.dtype))
    stacked = torch.stack([norm.to(out_device, acc_dtype) for norm in norms])  # type: ignore[union-attr]
    return torch.linalg.vector_norm(stacked, 2)
