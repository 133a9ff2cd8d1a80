"""Global L2 norm of a list of tensors, as one scalar, and whether every element is finite.

Each tensor's norm is taken in its own dtype (16-bit tensors in float32: casting every float32
gradient to float64 first costs several times the norm itself on the CPU), and the per-tensor
norms are combined in float64 (float32 on devices without float64), so a model mixing bfloat16,
float32 and float64 parameters gets one accurate norm. Where float32 arithmetic cannot give it --
squares that overflow (a norm above about 1.8e19 comes out infinite) or that fall into float32's
subnormal range (a norm below about 1e-19 comes out inaccurate or 0) -- the norm comes out
infinite or below 1e-15, and the norms of the float32 and 16-bit tensors are
taken again in float64: the common case pays one read of the result, which every caller makes
anyway. float64 arithmetic meets the same limits further out (squares beyond about 1.8e308, or
below 2.2e-308): float64 and complex128 norms, and their combination, that come out infinite or
below 1e-140 are taken again scaled by a power of two. Sharded tensors (``DTensor``) count whole:
the per-shard squared norms are summed across ranks (see :mod:`samgria.functional._sharding`).

:func:`scale_` rescales tensors by one number each (what clipping and normalising by a norm do),
16-bit tensors in float32 with one rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from samgria._checks import check_bool
from samgria.functional._grouping import (
    check_floating,
    check_lengths,
    check_scalars,
    check_sequence,
    check_tensors,
    group_indices_by_device_and_dtype,
)
from samgria.functional._sharding import any_sharded, local_shard, reduce_partial_sums
from samgria.functional._views import LOW_PRECISION, widened_dtype

__all__ = ["global_norm", "all_finite", "scale_"]


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def global_norm(
    tensors: Sequence[torch.Tensor],
    *,
    foreach: bool = True,
    like: Sequence[torch.Tensor] | None = None,
    exact: bool = True,
) -> torch.Tensor:
    r"""Return :math:`\sqrt{\sum_i \lVert t_i \rVert_2^2}` over every tensor in ``tensors``.

    Sharded tensors (``DTensor``, e.g. the parameters and gradients of a model sharded with
    FSDP2's ``fully_shard``) count whole: each rank takes the norm of its shards, and the squared
    norms are summed across ranks with one ``all_reduce`` per device mesh, so every rank gets the
    norm of the global tensors.

    Args:
        tensors: Dense tensors of any shapes, devices and floating dtypes, or ``DTensor`` objects.
        foreach: Use one ``torch._foreach_norm`` per (device, dtype) group; ``False`` takes the
            per-tensor reference path. Both give the same value.
        like: When ``tensors`` are local shards computed from sharded tensors (e.g. ASAM's
            :math:`T \odot g` from a ``DTensor`` gradient), the sharded tensors they are shards
            of, one per entry: their sharding decides the reduction.
        exact: Read the result on the host once (a device synchronisation) and, when float32
            arithmetic overflowed or flushed it to the subnormal range (infinite, or below
            1e-15), take the norms of the float32 and 16-bit tensors concerned again in float64
            (not on MPS, which has no float64), and those of the float64 and complex128 tensors
            (and their combination) that overflowed or fell below 1e-140 again scaled by a power
            of two, on both paths alike; zero tensors are skipped.
            ``False``: no host read (asynchronous, and traceable by ``torch.compile`` from torch
            2.9; earlier releases break the graph at the sharding check), with float32's range,
            as ``torch.nn.utils.clip_grad_norm_`` has.

    Returns:
        A 0-dim tensor on the device of the first (local) tensor, in float64 (float32 on MPS).
        The norm of an empty list is 0. With ``exact``, it is infinite or NaN only when some
        element is, or when the true norm is beyond float64's range. Differentiable: for tensors
        that require grad it carries their graph (the host reads of ``exact`` are detached).

    Raises:
        ValueError: If ``like`` has another length than ``tensors``.
        TypeError: If ``tensors`` or ``like`` is not a sequence (a tensor given for it is refused,
            not taken as the list of its rows: ``"tensors must be a sequence of tensors, got a
            tensor of shape (3, 3)"``), an entry of either is not a tensor (``"tensors[i] must be a
            torch.Tensor, got 1.0"``), a tensor is neither floating-point nor complex, or
            ``foreach`` or ``exact`` is not a ``bool``.
    """
    check_bool("foreach", foreach)
    check_bool("exact", exact)
    _check_tensors_and_like(tensors, like)
    if len(tensors) == 0:
        return torch.zeros((), dtype=torch.float64)
    sources = tensors if like is None else like
    sharded = any_sharded(sources)
    if sharded:
        tensors = [local_shard(tensor) for tensor in tensors]
    out_device = tensors[0].device
    acc_dtype = _accumulation_dtype(out_device)
    stacked = _stacked_norms(tensors, foreach, out_device, acc_dtype)
    norm = _combined(stacked, sources if sharded else None)
    if not exact or acc_dtype != torch.float64:
        return norm
    # One read of the result (a device sync the caller makes anyway); detached, as the norm of
    # tensors that require grad is returned with its graph, read without autograd's warning.
    value = float(norm.detach())
    if not (math.isinf(value) or value < _RECOMPUTE_BELOW):
        return norm
    recomputed = False
    beyond_float64 = False  # whether a norm or the combined one may be beyond float64's squares
    for index, (tensor, per_tensor) in enumerate(zip(tensors, stacked.detach().tolist())):  # both paths alike
        if tensor.device.type == "mps":
            continue
        if tensor.dtype in _FLOAT64_DTYPES:
            beyond_float64 = True
            below = _FLOAT64_RECOMPUTE_BELOW
        elif tensor.dtype in _WIDE:
            below = _RECOMPUTE_BELOW
        else:
            continue
        if not math.isinf(per_tensor) and (per_tensor >= below or not bool(tensor.any())):
            continue  # accurate already, or exactly zero (a frozen layer's gradient)
        if tensor.dtype in _FLOAT64_DTYPES:
            scale = _SCALE_DOWN if math.isinf(per_tensor) else _SCALE_UP
            wide_norm = torch.linalg.vector_norm(tensor * scale, 2) / scale
        else:
            wide_norm = torch.linalg.vector_norm(tensor, 2, dtype=_WIDE[tensor.dtype])
        stacked[index] = wide_norm.to(out_device, acc_dtype)
        recomputed = True
    # Sharded: every rank entered here (the global value), so every rank reduces again.
    if recomputed or sharded:
        norm = _combined(stacked, sources if sharded else None)
        if beyond_float64:
            value = float(norm.detach())
    if beyond_float64 and (math.isinf(value) or value < _FLOAT64_RECOMPUTE_BELOW):
        scale = _SCALE_DOWN if math.isinf(value) else _SCALE_UP  # float64 norms' squares: out of range
        norm = _combined(stacked * scale, sources if sharded else None) / scale
    return norm


#: A global norm below this, or an infinite one, is taken again with the norms of float32 and
#: 16-bit tensors in float64. Below it, float32 squares may have fallen into the subnormal range
#: (below about 1.2e-38) and lost digits: n such squares err by at most about n * 7e-46, under
#: float32's precision relative to a squared norm of at least 1e-30 for tensors of up to 1e8
#: elements. Above it, and finite, the float32 norms are as accurate as float32 arithmetic allows.
_RECOMPUTE_BELOW = 1e-15

#: A float64 or complex128 norm below this, or an infinite one, is taken again scaled by a power of
#: two (``_SCALE_UP`` or ``_SCALE_DOWN``: exact), and so is the combination of the per-tensor norms.
#: Below it every element is below it too (a larger one's square is a normal float64), so that scaled
#: by ``_SCALE_UP`` every element squares into float64's normal range without overflow; above it the
#: squares lost no digit that counts (subnormal squares err by at most 2.5e-324 each, under
#: float64's precision relative to a squared norm of 1e-280). An infinite norm is taken again scaled
#: by ``_SCALE_DOWN``: every finite element then squares below 1e256, and an element whose scaled
#: square underflows is below 1e27, negligible next to a squared norm beyond 1.8e308.
_FLOAT64_RECOMPUTE_BELOW = 1e-140
_SCALE_UP = 2.0**600
_SCALE_DOWN = 2.0**-600

#: The dtypes whose norms are taken in float64 arithmetic (see ``_FLOAT64_RECOMPUTE_BELOW``).
_FLOAT64_DTYPES = (torch.float64, torch.complex128)

#: The dtype a tensor's norm is taken again in (see ``_RECOMPUTE_BELOW``).
_WIDE = {
    torch.float32: torch.float64,
    torch.float16: torch.float64,
    torch.bfloat16: torch.float64,
    torch.complex64: torch.complex128,
}


def _check_tensors_and_like(tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor] | None) -> None:
    """The list checks of :func:`global_norm` and :func:`all_finite`: ``tensors`` (and ``like``,
    when given) a sequence of tensors, ``like`` of the same length."""
    check_sequence("tensors", tensors)
    if like is not None:
        check_sequence("like", like)
    check_lengths(len(tensors), "tensor", ("like", like), entry="tensor")
    check_tensors("tensors", tensors)
    if like is not None:
        check_tensors("like", like)


def _combined(stacked: torch.Tensor, sources: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """The L2 norm of the per-tensor norms; with ``sources`` (sharded), summed across ranks."""
    if sources is not None:
        return reduce_partial_sums(stacked.square(), sources).sum().sqrt()
    return torch.linalg.vector_norm(stacked, 2)


def _stacked_norms(
    tensors: Sequence[torch.Tensor], foreach: bool, out_device: torch.device, acc_dtype: torch.dtype
) -> torch.Tensor:
    """Each tensor's L2 norm (in its own dtype, 16-bit in float32), as one 1-D tensor."""
    norms: list[torch.Tensor | None] = [None] * len(tensors)
    if foreach:
        groups = group_indices_by_device_and_dtype(tensors)
        check_floating("tensors", tensors, [dtype for _device, dtype in groups])
        if len(groups) == 1:  # the common case: one stack, one cast
            ((_device, dtype),) = groups
            group_norms = torch._foreach_norm(list(tensors), 2, dtype=widened_dtype(dtype))
            return torch.stack(group_norms).to(out_device, acc_dtype)
        for (_device, dtype), indices in groups.items():
            group_norms = torch._foreach_norm([tensors[i] for i in indices], 2, dtype=widened_dtype(dtype))
            for index, norm in zip(indices, group_norms):
                norms[index] = norm
    else:
        check_floating("tensors", tensors)
        for index, tensor in enumerate(tensors):
            norms[index] = torch.linalg.vector_norm(tensor, 2, dtype=widened_dtype(tensor.dtype))
    return torch.stack([norm.to(out_device, acc_dtype) for norm in norms])  # type: ignore[union-attr]


def scale_(
    tensors: Sequence[torch.Tensor],
    scales: Sequence[float],
    shifts: Sequence[float] | None = None,
    *,
    foreach: bool = True,
) -> None:
    r"""In place: :math:`t_i \leftarrow s_i\, t_i` (:math:`s_i\, t_i + b_i` with ``shifts``).

    A 16-bit tensor is computed in float32 and rounded once, on both paths: ``torch._foreach_mul_``
    and ``torch._foreach_add_`` with a scalar round the scalar to the tensor's dtype first
    (PyTorch 2.x, CPU), so a scale beyond 65504 made float16 values infinite and every other one
    rounded differently from the per-tensor kernel. Other dtypes take one ``torch._foreach_mul_``
    (and ``torch._foreach_add_``) per device and dtype, or ``mul_`` (and ``add_``) tensor by
    tensor: the same arithmetic. Both paths agree bit for bit.

    Everything torch would refuse only as it reaches an entry is checked before anything is
    written, except what costs a look at each tensor: a tensor whose elements share memory (an
    ``expand`` view), an inference tensor outside ``torch.inference_mode()``, or a leaf that requires
    grad while grad mode is on is refused by torch as it writes that tensor, after the entries
    written before it (tensor by tensor, or one device and dtype after another). The other
    in-place kernels (:func:`~samgria.functional.add_scaled_` for one) check those first too.
    A scale or shift is a real number (Python or a NumPy scalar) or a 0-dim real tensor; with a
    tensor among them the entries are taken one by one.

    Args:
        tensors: Real dense tensors, rewritten in place.
        scales: :math:`s_i`, one per tensor.
        shifts: :math:`b_i`, one per tensor, or ``None`` for none.
        foreach: Use the ``torch._foreach_*`` kernels for the tensors that are not 16-bit.

    Raises:
        ValueError: If ``scales`` or ``shifts`` has another length than ``tensors``, or a scale or
            shift is an integer beyond the range of a float.
        TypeError: If a list is not a sequence (a tensor given for a list of tensors, a number for a
            list of numbers: see :func:`global_norm`), an entry of ``tensors`` is not a tensor
            (``"tensors[i] must be a torch.Tensor, got 1.0"``), a tensor is neither floating-point
            nor complex (an integer one would truncate the result), ``foreach`` is not a ``bool``,
            or a scale or shift is neither a real number nor a 0-dim real tensor (``"scales[i] must
            be a real number or a 0-dim real tensor, got {scale!r}"``; a ``bool`` or complex one
            included).
    """
    check_bool("foreach", foreach)
    check_sequence("tensors", tensors)
    check_sequence("scales", scales, "numbers")
    if shifts is not None:
        check_sequence("shifts", shifts, "numbers")
    check_lengths(len(tensors), "tensor", ("scales", scales), ("shifts", shifts))
    scales, some_tensor = check_scalars("scales", scales)
    if shifts is not None:
        shifts, some_tensor_shift = check_scalars("shifts", shifts)
        some_tensor = some_tensor or some_tensor_shift
    try:
        groups = group_indices_by_device_and_dtype(tensors)
        check_floating("tensors", tensors, [dtype for _device, dtype in groups])
    except AttributeError:  # an entry that is not a tensor: named (at no cost to the common case)
        check_tensors("tensors", tensors)
        raise
    if not foreach or some_tensor:  # torch's list kernels take numbers or tensors, not both
        for i, tensor in enumerate(tensors):
            _scale_one_(tensor, scales[i], None if shifts is None else shifts[i])
        return
    for (_device, dtype), indices in groups.items():
        if dtype in LOW_PRECISION:
            for i in indices:
                _scale_one_(tensors[i], scales[i], None if shifts is None else shifts[i])
            continue
        chunk = [tensors[i] for i in indices]
        torch._foreach_mul_(chunk, [scales[i] for i in indices])
        if shifts is not None:
            torch._foreach_add_(chunk, [shifts[i] for i in indices])


def _scale_one_(tensor: torch.Tensor, scale: float, shift: float | None) -> None:
    """:func:`scale_`'s per-tensor path (and its 16-bit tensors on the foreach path)."""
    if shift is None:
        tensor.mul_(scale)  # a 16-bit tensor's kernel multiplies in float32 and rounds once
    elif tensor.dtype in LOW_PRECISION:
        tensor.copy_(tensor.to(widened_dtype(tensor.dtype)).mul_(scale).add_(shift))
    else:
        tensor.mul_(scale).add_(shift)


#: Dtypes and devices that take torch's fused non-finite check (the one ``GradScaler`` runs). It
#: hands float32 and float64 values back bit for bit; 16-bit NaNs can come back as other NaNs,
#: and CUDA has no bfloat16 kernel, so 16-bit tensors take the per-tensor path.
_FUSED_DTYPES = frozenset((torch.float32, torch.float64))
_FUSED_DEVICES = ("cpu", "cuda")


def all_finite(
    tensors: Sequence[torch.Tensor], *, foreach: bool = True, like: Sequence[torch.Tensor] | None = None
) -> bool:
    r"""Whether every element of every tensor is finite (no :math:`\pm\infty`, no NaN).

    Reads every element once and changes no value, but the fused check of ``foreach`` writes
    every float32 and float64 value it reads back as it was: a tensor on memory that must not be
    written (``torch.frombuffer`` of a read-only buffer, which torch warns about) takes
    ``foreach=False`` (on a read-only memory map the process is killed). Sharded tensors
    (``DTensor``) count whole: the per-shard verdicts are combined across ranks, so every rank gets
    the same answer.

    Args:
        tensors: Real dense tensors of any shapes, devices and floating dtypes, or ``DTensor``\ s.
        foreach: float32 and float64 tensors on the CPU and CUDA take one call per device of the
            check ``torch.amp.GradScaler`` runs on gradients
            (``torch._amp_foreach_non_finite_check_and_unscale_`` with an unscale factor of 1,
            which leaves every value as it was, bit for bit); other tensors, and every tensor with
            ``False``, take the per-tensor reference path (``torch.isfinite(t).all()``). Both agree.
        like: As in :func:`global_norm`: the sharded tensors that local ``tensors`` stand for.

    Returns:
        ``True`` when no element is infinite or NaN (also for an empty list).

    Raises:
        ValueError: If ``like`` has another length than ``tensors``.
        TypeError: If a list is not a sequence (a tensor given for a list of tensors, a number for a
            list of numbers: see :func:`global_norm`), an entry of ``tensors`` or ``like`` is not a
            tensor, or ``foreach`` is not a ``bool``.
    """
    check_bool("foreach", foreach)
    _check_tensors_and_like(tensors, like)
    sources = tensors if like is None else like
    if any_sharded(sources):
        local = [local_shard(tensor) for tensor in tensors]
        flags = [(~torch.isfinite(tensor)).any().to(torch.float32) for tensor in local]
        device = local[0].device  # not empty: some tensor is sharded
        stacked = torch.stack([flag.to(device) for flag in flags])
        return not bool(reduce_partial_sums(stacked, sources).any())
    if not foreach:
        return _each_finite(tensors)
    fusable: dict[torch.device, list[torch.Tensor]] = {}
    others: list[torch.Tensor] = []
    for (device, dtype), indices in group_indices_by_device_and_dtype(tensors).items():
        group = [tensors[i] for i in indices]
        if dtype in _FUSED_DTYPES and device.type in _FUSED_DEVICES:
            fusable.setdefault(device, []).extend(group)
        else:
            others.extend(group)
    checked: list[torch.Tensor] = []
    for device, group in fusable.items():
        found = _fused_non_finite_check(group, device)
        if found is None:
            others.extend(group)
        else:
            checked.append(found)
    return _each_finite(others) and not any(bool(found) for found in checked)


def _each_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """The reference path of :func:`all_finite`: one ``torch.isfinite`` per tensor."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


def _fused_non_finite_check(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """A one-element tensor, non-zero when some element of ``tensors`` (float32/float64 on one
    device) is not finite; ``None`` where torch's kernel refuses them (torch < 2.3 on the CPU, a
    gradient whose elements share memory): then the caller checks them one by one."""
    found = torch.zeros(1, dtype=torch.float32, device=device)
    try:
        # Private torch API, used here only: torch's one fused non-finite check (GradScaler's).
        # The public torch.isfinite(t).all() makes a bool tensor per gradient and costs about 15x
        # more on the CPU. With an unscale factor of exactly 1 the kernel writes every float32 and
        # float64 value back as it was, bit for bit (denormals under set_flush_denormal and NaN
        # payloads too; tested).
        torch._amp_foreach_non_finite_check_and_unscale_(
            tensors, found, torch.ones(1, dtype=torch.float32, device=device)
        )
    except (RuntimeError, NotImplementedError):
        return None
    return found
