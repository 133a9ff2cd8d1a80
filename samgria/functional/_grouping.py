"""Grouping tensor lists by device and dtype for ``torch._foreach_*`` kernels, the parameters of
param groups, each once, and the checks every kernel makes of its lists (tensors, lengths, dtypes,
shapes, devices, nothing complex written into a real tensor) and of its scalars (real numbers
that fit)."""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence, Sized
from typing import Any

import torch

from samgria._checks import _is_torch_scalar, has_internal_overlap
from samgria.functional._views import widened_dtype

__all__ = [
    "group_indices_by_device_and_dtype",
    "unique_params",
    "check_sequence",
    "check_lengths",
    "check_floating",
    "check_shapes",
    "check_devices",
    "check_real_where_real",
    "check_tensors",
    "check_scalar",
    "check_scalars",
    "check_fits",
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


def check_sequence(name: str, values: Any, of: str = "tensors") -> None:
    """Check that ``values`` is a sequence (a list or tuple; for numbers, a 1-D tensor or array too):
    one ``isinstance`` in the common case, before its length is taken. A tensor passed as a list of
    tensors would be taken as the list of its rows (an out-of-place kernel would return rows, a
    0-dim one fails in ``len()`` naming nothing), a number as a list of numbers in ``len()``.

    ``of``: what the entries are, for the message (``"tensors"``, ``"numbers"``, ``"integers"``).

    Raises:
        TypeError: ``"{name} must be a sequence of {of}, got {value!r}"`` (a tensor named by its
            shape).
    """
    if type(values) is list:
        return
    if isinstance(values, torch.Tensor):
        if of == "tensors" or values.dim() == 0:
            raise TypeError(f"{name} must be a sequence of {of}, got a tensor of shape {tuple(values.shape)}")
        return
    if not isinstance(values, Sized) or not hasattr(values, "__getitem__") or isinstance(values, (str, bytes, Mapping)):
        raise TypeError(f"{name} must be a sequence of {of}, got {values!r}")


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


def check_writable(name: str, tensors: Sequence[torch.Tensor], *, out: bool = False) -> None:
    """Check that torch can write every tensor of ``tensors`` in place: torch refuses one only as
    it reaches it, after writing the entries before it. Refused: a tensor whose elements share
    memory (an ``expand`` view), an inference tensor outside ``torch.inference_mode()``, and, while
    grad mode is on, a leaf that requires grad or a view of one (any tensor that requires grad
    with ``out``: the caller writes with ``out=``, which autograd does not record).

    Raises:
        ValueError: ``"{name}[i] must be a tensor ..., got ..."`` for the first such tensor: ``whose
            elements do not share memory`` (with its shape and strides), ``that is not an
            inference tensor outside torch.inference_mode()``, or ``that does not require grad
            while grad mode is on``.
    """
    for index, tensor in enumerate(tensors):
        refusal = unwritable(tensor, out=out)
        if refusal is not None:
            raise ValueError(f"{name}[{index}] must be {refusal}")


def unwritable(tensor: torch.Tensor, *, out: bool = False) -> str | None:
    """Why torch would refuse to write ``tensor`` in place now, as the rule it breaks and what it
    is (``"a tensor whose ..., got ..."``: see :func:`check_writable`), or ``None`` when it can."""
    if has_internal_overlap(tensor):
        return (
            f"a tensor whose elements do not share memory, got one of shape {tuple(tensor.shape)} "
            f"and strides {tuple(tensor.stride())}"
        )
    if tensor.is_inference() and not torch.is_inference_mode_enabled():
        return (
            "a tensor that is not an inference tensor outside torch.inference_mode() (torch writes "
            "into one only inside it), got an inference tensor"
        )
    if torch.is_grad_enabled() and tensor.requires_grad:
        kind = "a leaf tensor" if tensor.is_leaf else "a view of a leaf" if _views_a_leaf(tensor) else None
        if kind is not None or out:
            return (
                "a tensor that does not require grad while grad mode is on (write under "
                f"torch.no_grad()), got {kind or 'a tensor'} that requires grad"
            )
    return None


def _views_a_leaf(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a view of a leaf (``leaf[0]``, ``leaf.view(-1)``), which torch does
    not write in place while the leaf requires grad and grad mode is on, as the leaf itself."""
    base = tensor._base if tensor._is_view() else None
    return base is not None and base.is_leaf and base.requires_grad


def check_devices(
    name: str, tensors: Sequence[torch.Tensor], target_name: str, targets: Sequence[torch.Tensor]
) -> None:
    """Check that every tensor of ``tensors`` is on the device of its entry of ``targets`` (the
    tensor it is computed into; lists of one length), or is a 0-dim CPU tensor (which torch takes
    with a tensor on any device): torch refuses another device only as it reaches that entry,
    after writing the entries before it. One set of devices in the common case (one device), the
    entries read one by one only when there are several.

    Raises:
        ValueError: ``"{name}[i] must be on the device of {target_name}[i], {device} (or be a 0-dim
            CPU tensor), got a tensor on {device}"`` for the first such tensor.
    """
    if len({tensor.device for tensor in targets}.union(tensor.device for tensor in tensors)) <= 1:
        return
    for index, (tensor, target) in enumerate(zip(tensors, targets)):
        if tensor.device != target.device and not (tensor.dim() == 0 and tensor.device.type == "cpu"):
            raise ValueError(
                f"{name}[{index}] must be on the device of {target_name}[{index}], {target.device} (or be a "
                f"0-dim CPU tensor), got a tensor on {tensor.device}"
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


def check_paired(
    target_name: str, targets: Sequence[Any], per: str, name: str, tensors: Sequence[Any]
) -> None:
    """Check two lists of tensors computed entry by entry, ``tensors`` into ``targets``: both
    sequences of tensors (:func:`check_sequence`, :func:`check_tensors`), of one length
    (:func:`check_lengths`, one entry ``per`` target), and each tensor of its target's shape and
    device, and real where its target is real (:func:`check_shapes`, :func:`check_devices`,
    :func:`check_real_where_real`). Raises what those raise, in that order."""
    check_sequence(target_name, targets)
    check_sequence(name, tensors)
    check_lengths(len(targets), per, (name, tensors))
    check_tensors(target_name, targets)
    check_tensors(name, tensors)
    check_shapes(name, tensors, target_name, targets)
    check_devices(name, tensors, target_name, targets)
    check_real_where_real(name, tensors, target_name, targets)


def check_tensors(name: str, tensors: Sequence[Any]) -> None:
    """Check that every entry of ``tensors`` is a tensor (one look at each entry's type).

    Raises:
        TypeError: ``"{name}[i] must be a torch.Tensor, got {value!r}"`` for the first other entry.
    """
    if all(isinstance(tensor, torch.Tensor) for tensor in tensors):
        return
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}[{index}] must be a torch.Tensor, got {tensor!r}")


#: The range of the integers torch takes as a scalar argument (a C++ ``int64_t``).
_INT64 = (-(2**63), 2**63 - 1)


def check_scalar(name: str, value: Any) -> Any:
    """Check a scalar a kernel passes to torch (``alpha``, a ``_foreach_add_`` scalar): a real
    number that fits in a float (``bool`` refused) or a 0-dim real tensor. Return it as torch
    takes it: as it is, or, for an integer beyond a 64-bit integer (which torch refuses: "int too
    big to convert"), as the float it rounds to.

    Raises:
        TypeError: ``"{name} must be a real number or a 0-dim real tensor, got {value!r}"``.
        ValueError: ``"{name} must be a real number that fits in a float or a 0-dim real tensor,
            got {value!r}"`` (an integer such as ``10**400``).
    """
    if isinstance(value, torch.Tensor):
        ok = value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool
    else:
        ok = _is_torch_scalar(value)
    if not ok:
        raise TypeError(f"{name} must be a real number or a 0-dim real tensor, got {value!r}")
    if isinstance(value, numbers.Integral) and not _INT64[0] <= int(value) <= _INT64[1]:
        try:
            return float(value)
        except OverflowError:
            raise ValueError(
                f"{name} must be a real number that fits in a float or a 0-dim real tensor, got {value!r}"
            ) from None
    return value


#: The one type of the scalars in the common case (see :func:`check_scalars`).
_FLOATS = frozenset((float,))


def check_scalars(name: str, values: Sequence[Any]) -> tuple[Sequence[Any], bool]:
    """:func:`check_scalar` of every entry of ``values`` (named ``"{name}[i]"``), before anything is
    written. Return the entries as torch takes them (``values`` itself unless an integer was
    converted) and whether one is a tensor; one look at each entry's type in the common case (every
    entry a float).
    """
    if _FLOATS.issuperset(map(type, values)):  # every entry a float: one pass in C
        return values, False
    checked = [check_scalar(f"{name}[{index}]", value) for index, value in enumerate(values)]
    some_tensor = any(isinstance(value, torch.Tensor) for value in checked)
    if all(new is old for new, old in zip(checked, values)):
        return values, some_tensor
    return checked, some_tensor


#: The largest finite value of each dtype narrower than a Python float (a complex dtype: its parts').
LARGEST = {dtype: torch.finfo(dtype).max for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.complex64)}


def check_fits(name: str, value: Any, dtype: torch.dtype, where: str) -> None:
    """Check that a scalar checked by :func:`check_scalar` is not finite and beyond the largest
    finite value of ``dtype``, the dtype it is computed in (torch raises "value cannot be converted
    to type float without overflow", or rounds it to infinity silently).

    Raises:
        ValueError: ``"{name} must fit in {where} {dtype} (at most {largest} in magnitude, or
            infinite, or NaN), got {value!r}"``.
    """
    largest = LARGEST.get(dtype)
    if largest is not None and math.isfinite(value) and abs(value) > largest:
        raise ValueError(
            f"{name} must fit in {where} {dtype} (at most {largest!r} in magnitude, or infinite, or NaN), got {value!r}"
        )


def check_fits_where_computed(
    params: Sequence[torch.Tensor], others: Sequence[torch.Tensor], values: Sequence[Any], names: Sequence[str]
) -> None:
    """Check that no ``values[i]`` (named ``names[i]``) is finite and beyond the range of the dtype
    its entry is computed in, ``promote_types`` of ``params[i]``'s and ``others[i]``'s (16-bit ones
    as float32): torch raises on such a value only as it writes that entry. One pass over the
    values in the common case (every value a float within float32's range)."""
    largest = LARGEST[torch.float32]
    if all(type(value) is float and -largest <= value <= largest for value in values):
        return
    for index, (param, other, value, name) in enumerate(zip(params, others, values, names)):
        wide = torch.promote_types(widened_dtype(param.dtype), widened_dtype(other.dtype))
        check_fits(name, value, wide, f"the dtype params[{index}] is computed in,")
