"""Grouping tensor lists by device and dtype for ``torch._foreach_*`` kernels, and the parameters
of param groups, each once."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["group_indices_by_device_and_dtype", "unique_params"]


def unique_params(param_groups: Sequence[Mapping[str, Any]]) -> list[torch.Tensor]:
    """Every parameter of ``param_groups`` once, in group order (a parameter listed twice counts once)."""
    return list({id(param): param for group in param_groups for param in group["params"]}.values())


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
