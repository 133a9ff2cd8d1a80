"""Grouping tensor lists by device and dtype for ``torch._foreach_*`` kernels, the parameters of
param groups, each once, and the checks every kernel makes of its lists (lengths, dtypes, shapes,
nothing complex written into a real tensor)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence, Sized
from typing import Any

import torch

__all__ = [
    "group_indices_by_device_and_dtype",
    "unique_params",
    "check_lengths",
    "check_floating",
    "check_shapes",
    "check_real_where_real",
]


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


def check_lengths(count: int, per: str, *named: tuple[str, Sized | None], entry: str = "entry") -> None:
    """Check that every list in ``named`` (``(name, values)`` pairs; ``None`` values skipped) has
    ``count`` entries, one per ``per`` (``"parameter"``, ``"tensor"``): the one length check of the
    kernels, O(1) per list.

    Raises:
        ValueError: ``"{name} must have one {entry} per {per}, got {len(values)} for {count}"``.
    """
    for name, values in named:
        if values is not None and len(values) != count:
            raise ValueError(f"{name} must have one {entry} per {per}, got {len(values)} for {count}")


def check_floating(name: str, tensors: Sequence[torch.Tensor], dtypes: Iterable[torch.dtype] | None = None) -> None:
    """Check that every tensor of ``tensors`` is floating-point or complex (the kernels write
    fractional values: an integer or ``bool`` tensor would truncate them silently).

    ``dtypes``: the dtypes of ``tensors`` when known (the keys of
    :func:`group_indices_by_device_and_dtype`), so that the common case costs one check per dtype;
    the tensors are read one by one only to name the first bad one.

    Raises:
        TypeError: ``"{name}[i] must be a floating-point or complex tensor, got a {dtype} tensor"``
            for the first such tensor.
    """
    if dtypes is None:
        dtypes = {tensor.dtype for tensor in tensors}
    if all(dtype.is_floating_point or dtype.is_complex for dtype in dtypes):
        return
    for index, tensor in enumerate(tensors):
        if not (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
            raise TypeError(f"{name}[{index}] must be a floating-point or complex tensor, got a {tensor.dtype} tensor")


def check_shapes(name: str, tensors: Sequence[torch.Tensor], like_name: str, like: Sequence[torch.Tensor]) -> None:
    """Check that every tensor of ``tensors`` has the shape of its entry of ``like`` (lists of one
    length): one comparison of two lists of shapes in the common case, the entries read one by one
    only to name the first that differs.

    Raises:
        ValueError: ``"{name}[i] must have the shape of {like_name}[i], {shape}, got {shape}"``.
    """
    if [tensor.shape for tensor in tensors] == [tensor.shape for tensor in like]:
        return
    for index, (tensor, model) in enumerate(zip(tensors, like)):
        if tensor.shape != model.shape:
            raise ValueError(
                f"{name}[{index}] must have the shape of {like_name}[{index}], {tuple(model.shape)}, "
                f"got {tuple(tensor.shape)}"
            )


def check_real_where_real(
    name: str,
    tensors: Sequence[torch.Tensor],
    target_name: str,
    targets: Sequence[torch.Tensor],
    dtypes: Iterable[torch.dtype] | None = None,
) -> None:
    """Check that no tensor of ``tensors`` is complex where its entry of ``targets`` (the tensor it
    is written into; lists of one length) is real: torch's in-place arithmetic refuses that, but a
    cast or ``copy_`` discards the imaginary part silently. A real tensor into a complex one is
    fine (torch promotes it).

    ``dtypes``: the dtypes of ``tensors`` when known, as for :func:`check_floating`; the common case
    (nothing complex) costs one look at them, the entries are read one by one only when one is
    complex.

    Raises:
        TypeError: ``"{name}[i] must be real where {target_name}[i] is real, got a {dtype} tensor"``
            for the first such tensor.
    """
    if dtypes is None:
        dtypes = {tensor.dtype for tensor in tensors}
    if not any(dtype.is_complex for dtype in dtypes):
        return
    for index, (tensor, target) in enumerate(zip(tensors, targets)):
        if tensor.is_complex() and not target.is_complex():
            raise TypeError(
                f"{name}[{index}] must be real where {target_name}[{index}] is real, got a {tensor.dtype} tensor"
            )
