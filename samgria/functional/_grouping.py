"""Grouping tensor lists by device and dtype for ``torch._foreach_*`` kernels."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

__all__ = ["group_indices_by_device_and_dtype"]


def group_indices_by_device_and_dtype(
    tensors: Sequence[torch.Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Return ``{(device, dtype): [indices]}`` so each foreach call sees one device and dtype."""
    dtypes = {tensor.dtype for tensor in tensors}
    if len(dtypes) == 1:  # the common case: one dtype, then (checked) one device
        devices = {tensor.device for tensor in tensors}
        if len(devices) == 1:
            return {(devices.pop(), dtypes.pop()): list(range(len(tensors)))}
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for index, tensor in enumerate(tensors):
        groups[(tensor.device, tensor.dtype)].append(index)
    return dict(groups)
