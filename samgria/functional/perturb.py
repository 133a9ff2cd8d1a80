r"""Kernels for weight perturbations (SAM, ASAM) on lists of tensors.

Every kernel has a ``foreach`` fast path (one ``torch._foreach_*`` call per device and dtype)
and a per-tensor reference path that performs the same arithmetic tensor by tensor, so the two
agree bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from samgria.functional._grouping import check_floating, check_lengths, group_indices_by_device_and_dtype
from samgria.functional._views import LOW_PRECISION, widened_dtype

__all__ = ["add_directions_", "perturbed_into_", "mul", "mul_", "adaptive_scaling"]


def perturbed_into_(
    buffers: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    scales: Sequence[float],
    *,
    foreach: bool = True,
) -> None:
    r"""Out of place into ``buffers``: :math:`b_i \leftarrow w_i + s_i\, d_i` (perturbed weights).

    ``buffers`` may be ``params`` themselves (in place). ``directions`` may be overwritten (they
    are consumed). Entries may share memory: each sees what the entries before it wrote, as with
    one ``torch.add`` after another. A direction wider than its parameter (float32 for a 16-bit one), and every
    16-bit parameter, is computed in float32 and rounded once: a 16-bit tensor cannot take a huge
    ``s_i`` as a scalar operand. Otherwise one fused ``torch.add(w, d, alpha=s, out=b)`` per
    tensor (the reference path, and large tensors on the CPU), or with ``foreach``
    ``_foreach_copy_`` and ``_foreach_add_(b, d, alpha=s)`` per list of tensors with the same
    scale: the same arithmetic (:math:`w + s\,d` with one rounding; bit for bit on the CPU, tested).
    The scales are not checked: they follow ``torch.add``'s ``alpha`` (IEEE arithmetic, so a NaN
    or infinite scale gives NaN or infinite weights; one beyond the range of the computing dtype
    raises torch's ``RuntimeError``).

    Raises:
        ValueError: If ``buffers``, ``directions`` or ``scales`` has another length than ``params``.
        TypeError: If a parameter or buffer is neither floating-point nor complex (an integer
            tensor would truncate the result).
    """
    check_lengths(len(params), "parameter", ("buffers", buffers), ("directions", directions), ("scales", scales))
    by_dtype = group_indices_by_device_and_dtype(params)
    check_floating("params", params, [dtype for _device, dtype in by_dtype])
    if buffers is not params:
        check_floating("buffers", buffers)
    groups = []
    for (device, dtype), indices in by_dtype.items():
        if dtype in LOW_PRECISION:
            plain, widened = [], indices
        else:
            plain = [i for i in indices if directions[i].dtype == dtype]
            widened = [i for i in indices if directions[i].dtype != dtype] if len(plain) < len(indices) else []
        for i in widened:
            wide = torch.promote_types(widened_dtype(params[i].dtype), widened_dtype(directions[i].dtype))
            buffers[i].copy_(torch.add(params[i].to(wide), directions[i].to(wide), alpha=scales[i]))
        if plain:
            groups.append((device, dtype, plain))
    for device, dtype, plain in groups:  # after every widened one, as before the grouping
        if not foreach:
            for i in plain:
                torch.add(params[i], directions[i], alpha=scales[i], out=buffers[i])
            continue
        size_limit = _CPU_LIST_NUMEL if device.type == "cpu" else None
        _perturbed_into_by_lists(buffers, params, directions, scales, plain, dtype, size_limit)


#: On the CPU, tensors of at most this many elements (64 KiB in float32: in cache) are perturbed by
#: ``torch._foreach_copy_`` and ``torch._foreach_add_`` (the CPU runs these lists tensor by tensor
#: in C++: one dispatch per list instead of one per tensor); larger ones by one
#: ``torch.add(..., out=)`` each, a single pass over memory that is not in cache. On other devices
#: the list kernels are fused and take every size.
_CPU_LIST_NUMEL = 1 << 14


def _storage(tensor: torch.Tensor) -> int:
    """Where ``tensor``'s storage starts: equal for tensors that may share memory."""
    return tensor.untyped_storage().data_ptr()


def _same_scale(first: Any, second: Any) -> bool:
    """Whether two scales are the same float, sign of zero included."""
    return (
        isinstance(first, float)
        and isinstance(second, float)
        and first == second
        and math.copysign(1.0, first) == math.copysign(1.0, second)
    )


def _perturbed_into_by_lists(
    buffers: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    scales: Sequence[float],
    indices: list[int],
    dtype: torch.dtype,
    size_limit: int | None,
) -> None:
    """:func:`perturbed_into_`'s foreach path for ``indices`` (tensors of ``dtype`` on one device,
    directions of the same dtype), in order: consecutive tensors (of at most ``size_limit``
    elements) with the same float scale go through ``_foreach_copy_`` and ``_foreach_add_`` with
    ``alpha`` together -- the arithmetic of ``torch.add(w, d, alpha=s)``, one rounding -- every
    other one through ``torch.add(..., out=)``. Under grad mode every tensor does (its refusal
    of inputs that require grad is kept)."""
    if torch.is_grad_enabled():
        for i in indices:
            torch.add(params[i], directions[i], alpha=scales[i], out=buffers[i])
        return
    run: list[int] = []
    written: set[int] = set()  # the storages of the run's buffers
    directions_read: set[int] = set()  # of its directions
    params_read: set[int] = set()  # and of its parameters

    def flush() -> None:
        copied = [i for i in run if buffers[i] is not params[i]]
        if copied:
            torch._foreach_copy_([buffers[i] for i in copied], [params[i] for i in copied])
        torch._foreach_add_([buffers[i] for i in run], [directions[i] for i in run], alpha=scales[run[0]])
        run.clear()
        written.clear()
        directions_read.clear()
        params_read.clear()

    for i in indices:
        buffer, param, direction, scale = buffers[i], params[i], directions[i], scales[i]
        buffer_at, param_at, direction_at = _storage(buffer), _storage(param), _storage(direction)
        if isinstance(scale, float) and (size_limit is None or param.numel() <= size_limit):
            if buffer is param:  # in place: added at its turn, after the earlier entries
                conflicts = False
            elif buffer.dtype == dtype and buffer_at != direction_at:
                # The run copies every buffer before it adds: a copy must not read an earlier
                # buffer (not yet added to), nor write into an earlier buffer or direction.
                conflicts = param_at in written or buffer_at in written or buffer_at in directions_read
            else:  # a wider buffer, or one that is the direction: torch.add's own arithmetic
                conflicts = None
            if conflicts is not None:
                if run and (conflicts or not _same_scale(scales[run[0]], scale)):
                    flush()
                run.append(i)
                written.add(buffer_at)
                directions_read.add(direction_at)
                params_read.add(param_at)
                continue
        # Added now, before the run's earlier entries, unless it touches their memory: the small
        # tensors between large ones (a network's biases) then still go in one run.
        if run and (
            param_at in written
            or direction_at in written
            or buffer_at in written
            or buffer_at in directions_read
            or buffer_at in params_read
        ):
            flush()
        torch.add(param, direction, alpha=scale, out=buffer)
    if run:
        flush()


def add_directions_(
    params: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    scales: Sequence[float],
    *,
    foreach: bool = True,
) -> None:
    r"""In place: :math:`w_i \leftarrow w_i + s_i\, d_i` (a perturbation step).

    :func:`perturbed_into_` with the parameters as their own buffers (same kernels, same
    rounding, same checks). ``directions`` may be overwritten (they are consumed).

    Raises:
        ValueError: If ``directions`` or ``scales`` has another length than ``params``.
        TypeError: If a parameter is neither floating-point nor complex.
    """
    perturbed_into_(params, params, directions, scales, foreach=foreach)


def mul_(
    buffers: Sequence[torch.Tensor], factors: Sequence[torch.Tensor], *, foreach: bool = True
) -> None:
    r"""In place: :math:`b_i \leftarrow b_i \odot f_i` for every buffer.

    One ``torch._foreach_mul_`` per device and dtype of the buffers, or ``mul_`` tensor by tensor
    (``foreach=False``): the same arithmetic, bit for bit.

    Raises:
        ValueError: If ``factors`` has another length than ``buffers``.
        TypeError: If a buffer is neither floating-point nor complex.
    """
    check_lengths(len(buffers), "buffer", ("factors", factors))
    if foreach:
        groups = group_indices_by_device_and_dtype(buffers)
        check_floating("buffers", buffers, [dtype for _device, dtype in groups])
        for indices in groups.values():
            torch._foreach_mul_([buffers[i] for i in indices], [factors[i] for i in indices])
        return
    check_floating("buffers", buffers)
    for buffer, factor in zip(buffers, factors):
        buffer.mul_(factor)


def adaptive_scaling(
    params: Sequence[torch.Tensor], etas: Sequence[float], *, foreach: bool = True
) -> list[torch.Tensor]:
    r"""Return the ASAM scaling operators :math:`T_i = |w_i| + \eta_i` (new tensors).

    One ``torch._foreach_abs`` and ``torch._foreach_add_`` per device and dtype, or
    ``abs().add_()`` tensor by tensor (``foreach=False``): the same arithmetic, bit for bit. A
    complex parameter gives a real :math:`T_i` (its modulus). The etas are not checked: they
    follow ``torch.add`` (IEEE arithmetic; one beyond the parameter's dtype raises torch's
    ``RuntimeError``).

    Raises:
        ValueError: If ``etas`` has another length than ``params``.
        TypeError: If a parameter is neither floating-point nor complex.
    """
    check_lengths(len(params), "parameter", ("etas", etas))
    if foreach:
        result: list[torch.Tensor | None] = [None] * len(params)
        groups = group_indices_by_device_and_dtype(params)
        check_floating("params", params, [dtype for _device, dtype in groups])
        for indices in groups.values():
            scaled = torch._foreach_abs([params[i] for i in indices])
            torch._foreach_add_(scaled, [etas[i] for i in indices])
            for index, tensor in zip(indices, scaled):
                result[index] = tensor
        return result  # type: ignore[return-value]
    check_floating("params", params)
    return [param.abs().add_(eta) for param, eta in zip(params, etas)]


def mul(
    tensors: Sequence[torch.Tensor], factors: Sequence[torch.Tensor], *, foreach: bool = True
) -> list[torch.Tensor]:
    r"""Out of place: return :math:`t_i \odot f_i` for every tensor.

    One ``torch._foreach_mul`` per device and dtype of ``tensors``, or ``mul`` tensor by tensor
    (``foreach=False``): the same arithmetic, bit for bit.

    Raises:
        ValueError: If ``factors`` has another length than ``tensors``.
        TypeError: If a tensor is neither floating-point nor complex.
    """
    check_lengths(len(tensors), "tensor", ("factors", factors))
    if foreach:
        result: list[torch.Tensor | None] = [None] * len(tensors)
        groups = group_indices_by_device_and_dtype(tensors)
        check_floating("tensors", tensors, [dtype for _device, dtype in groups])
        for indices in groups.values():
            products = torch._foreach_mul(
                [tensors[i] for i in indices], [factors[i] for i in indices]
            )
            for index, tensor in zip(indices, products):
                result[index] = tensor
        return result  # type: ignore[return-value]
    check_floating("tensors", tensors)
    return [tensor.mul(factor) for tensor, factor in zip(tensors, factors)]
