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

from samgria._checks import check_bool
from samgria.functional._grouping import (
    LARGEST,
    check_devices,
    check_writable,
    check_fits,
    check_fits_where_computed,
    check_floating,
    check_lengths,
    check_paired,
    check_real_where_real,
    check_scalars,
    check_sequence,
    check_shapes,
    check_tensors,
    group_indices_by_device_and_dtype,
)
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
    one ``torch.add`` after another -- and as there, a buffer that overlaps its own parameter or
    direction only in part (``x[1:4]`` for ``x[0:3]``) is refused by torch as that entry is
    reached, after the entries before it are written (not checked ahead: it would cost a look at
    the memory of every entry). A direction wider than its parameter (float32 for a 16-bit one), and every
    16-bit parameter, is computed in float32 and rounded once: a 16-bit tensor cannot take a huge
    ``s_i`` as a scalar operand. Otherwise one fused ``torch.add(w, d, alpha=s, out=b)`` per
    tensor (the reference path, large tensors on the CPU, and buffers laid out otherwise than
    their weights), or with ``foreach`` ``_foreach_copy_`` and ``_foreach_add_(b, d, alpha=s)``
    per list of tensors with the same scale: the same arithmetic (:math:`w + s\,d` with one
    rounding, on the CPU for a direction that is not broadcast, an ``expand`` view; bit for bit
    on the CPU, tested).
    A scale is a real number (Python or a NumPy scalar) or a 0-dim real tensor, as ``torch.add``'s
    ``alpha``, and follows IEEE arithmetic: a NaN or infinite scale gives NaN or infinite weights.
    Everything is checked before anything is written, each scale against the dtype its entry is
    computed in (:math:`w + s\,d` in float32 for float32 and 16-bit tensors, where torch would
    raise on a scale beyond float32's range after writing the entries before it).

    Raises:
        ValueError: If ``buffers``, ``directions`` or ``scales`` has another length than ``params``,
            a buffer or direction has another shape than its parameter, a parameter or direction is
            on another device than its buffer, unless a 0-dim CPU tensor (``"directions[i] must be
            on the device of buffers[i], cuda:0 (or be a 0-dim CPU tensor), got a tensor on cpu"``;
            torch would refuse it after writing the entries before it), a buffer (``params``
            when they are the buffers) is one torch cannot write with ``out=`` -- its elements share
            memory (an ``expand`` view), an inference tensor outside ``torch.inference_mode()``,
            or one that requires grad while grad mode is on: torch would refuse it after writing
            the entries before it --, or a scale is finite and
            beyond the range of the dtype its entry is computed in (``"scales[i] must fit in the
            dtype params[i] is computed in, torch.float32 (at most ... in magnitude, or infinite, or
            NaN), got {scale!r}"``) or of a float (an integer such as ``10**400``).
        TypeError: If a list is not a sequence (a tensor given for a list of tensors, a number for a
            list of numbers: see :func:`global_norm`), an entry of a list is not a tensor, a
            parameter or buffer is neither floating-point nor complex (an integer tensor would
            truncate the result), a parameter or direction is complex where its buffer is real (the
            imaginary part would be lost), or a scale is neither a real number nor a 0-dim real
            tensor (``"scales[i] must be a real number or a 0-dim real tensor, got {scale!r}"``; a
            ``bool`` or complex one included).
    """
    check_bool("foreach", foreach)
    check_sequence("params", params)
    if buffers is not params:
        check_sequence("buffers", buffers)
    check_sequence("directions", directions)
    check_sequence("scales", scales, "numbers")
    check_lengths(len(params), "parameter", ("buffers", buffers), ("directions", directions), ("scales", scales))
    check_tensors("params", params)
    check_tensors("directions", directions)
    if buffers is not params:
        check_tensors("buffers", buffers)
    scales = check_scalars("scales", scales)[0]
    by_dtype = group_indices_by_device_and_dtype(params)
    check_floating("params", params, [dtype for _device, dtype in by_dtype])
    # torch would broadcast a smaller direction silently, and the reference path's out= would
    # resize a wrongly shaped buffer where _foreach_copy_ refuses it: both are refused here.
    check_shapes("directions", directions, "params", params)
    if buffers is not params:
        check_floating("buffers", buffers)
        check_shapes("buffers", buffers, "params", params)
        check_devices("params", params, "buffers", buffers)
        check_real_where_real("params", params, "buffers", buffers, [dtype for _device, dtype in by_dtype])
    target_name = "buffers" if buffers is not params else "params"
    check_devices("directions", directions, target_name, buffers)
    check_writable(target_name, buffers, out=True)
    # The widened path's copy_ would discard an imaginary part that torch.add refuses to.
    check_real_where_real("directions", directions, target_name, buffers)
    check_fits_where_computed(params, directions, scales, [f"scales[{index}]" for index in range(len(scales))])
    widened: list[_Segment] = []
    plain: list[_Segment] = []
    for (device, dtype), indices in by_dtype.items():
        if dtype in LOW_PRECISION:
            widened.append((None, indices))
            continue
        same = [i for i in indices if directions[i].dtype == dtype]
        if len(same) < len(indices):
            widened.append((None, [i for i in indices if directions[i].dtype != dtype]))
        if same:
            plain.append(((device, dtype), same))
    segments = widened + plain
    if len(segments) > 1 and _reordered_onto_shared_memory(segments, buffers, params, directions):
        segments = _runs_in_order(segments, len(params))
    for kind, indices in segments:
        _perturb_segment(kind, indices, buffers, params, directions, scales, foreach)


#: Entries that one kernel perturbs: ``(None, indices)`` for entries computed in a wider dtype
#: (every 16-bit parameter, and a direction of another dtype than its parameter), one by one;
#: ``((device, dtype), indices)`` for parameters and directions of that device and dtype.
_Segment = tuple[tuple[torch.device, torch.dtype] | None, list[int]]


def _perturb_segment(
    kind: tuple[torch.device, torch.dtype] | None,
    indices: list[int],
    buffers: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    scales: Sequence[float],
    foreach: bool,
) -> None:
    """:func:`perturbed_into_` for the entries ``indices`` of one segment (see ``_Segment``), in order."""
    if kind is None:
        for i in indices:
            wide = torch.promote_types(widened_dtype(params[i].dtype), widened_dtype(directions[i].dtype))
            buffers[i].copy_(torch.add(params[i].to(wide), directions[i].to(wide), alpha=scales[i]))
        return
    device, dtype = kind
    if not foreach:
        for i in indices:
            torch.add(params[i], directions[i], alpha=scales[i], out=buffers[i])
        return
    size_limit = _CPU_LIST_NUMEL if device.type == "cpu" else None
    _perturbed_into_by_lists(buffers, params, directions, scales, indices, dtype, size_limit)


def _reordered_onto_shared_memory(
    segments: list[_Segment],
    buffers: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
) -> bool:
    """Whether perturbing ``segments`` one after another could differ from perturbing the entries in
    order: they take the entries out of order, and an entry writes a storage that an entry of
    another segment reads or writes (by storage, so views of one buffer count as shared)."""
    if [i for _kind, indices in segments for i in indices] == list(range(len(params))):
        return False
    owner: dict[int, int] = {}  # storage -> the one segment that touches it, or -1 for several
    written: set[int] = set()
    for number, (_kind, indices) in enumerate(segments):
        for i in indices:
            written.add(_storage(buffers[i]))
            for tensor in (buffers[i], params[i], directions[i]):
                if owner.setdefault(_storage(tensor), number) != number:
                    owner[_storage(tensor)] = -1
    return any(owner[at] == -1 for at in written if at)  # a storage at 0 holds no memory


def _runs_in_order(segments: list[_Segment], count: int) -> list[_Segment]:
    """``segments`` cut into runs of consecutive entries, in the order of the entries (each run is
    perturbed at its turn, with its segment's kernel)."""
    kind_of: list[Any] = [None] * count
    for kind, indices in segments:
        for i in indices:
            kind_of[i] = kind
    runs: list[_Segment] = []
    for i, kind in enumerate(kind_of):
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(i)
        else:
            runs.append((kind, [i]))
    return runs


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
            elif buffer.dtype == dtype and buffer_at != direction_at and buffer.stride() == param.stride():
                # The run copies every buffer before it adds: a copy must not read an earlier
                # buffer (not yet added to), nor write into an earlier buffer or direction.
                conflicts = param_at in written or buffer_at in written or buffer_at in directions_read
            else:
                # A wider buffer, one that is the direction, or one laid out otherwise than its
                # weight: torch.add's own arithmetic. (Copied, then added to in its own layout, it
                # could come out otherwise: with a broadcast direction, the CPU kernel rounds
                # w + s d differently in one layout than in another; tested.)
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


def perturbed_into_private(
    buffers: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    scales: Sequence[float],
    *,
    foreach: bool = True,
) -> None:
    """:func:`perturbed_into_` for buffers of the caller's own (SAM's weight backups): memory that
    no parameter or direction is, shares or views, each buffer of its parameter's shape, strides
    and dtype. The same kernels and rounding, entry by entry, as :func:`perturbed_into_`, without
    its checks and without its tracking of shared memory: no entry reads what another writes, so
    the small tensors with the same scale go into one ``_foreach_copy_``/``_foreach_add_`` pair
    per device and dtype, in any order (a step's host time is mostly per-tensor Python work).
    A direction may be its buffer itself (a direction the caller computed there): that entry is
    one ``torch.add(w, b, alpha=s, out=b)``, the arithmetic of every other path.
    """
    if not foreach or torch.is_grad_enabled():  # the reference path, and torch.add's refusals
        perturbed_into_(buffers, params, directions, scales, foreach=foreach)
        return
    runs: dict[tuple[Any, ...], list[int]] = {}
    for i, (param, direction, scale) in enumerate(zip(params, directions, scales)):
        dtype = param.dtype
        wider = dtype in LOW_PRECISION or direction.dtype != dtype
        if (
            wider
            or not isinstance(scale, float)
            or (param.device.type == "cpu" and param.numel() > _CPU_LIST_NUMEL)
            or direction is buffers[i]  # the run's copy would overwrite it
        ):
            # computed wider, or one torch.add(..., out=), as perturbed_into_ takes them
            _perturb_segment(None if wider else (param.device, dtype), [i], buffers, params, directions, scales, False)
        else:  # the sign of a zero scale keeps two runs apart, as _same_scale does
            runs.setdefault((param.device, dtype, scale, math.copysign(1.0, scale)), []).append(i)
    for (_device, _dtype, scale, _sign), indices in runs.items():
        run_buffers = [buffers[i] for i in indices]
        torch._foreach_copy_(run_buffers, [params[i] for i in indices])
        torch._foreach_add_(run_buffers, [directions[i] for i in indices], alpha=scale)


def add_directions_(
    params: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    scales: Sequence[float],
    *,
    foreach: bool = True,
) -> None:
    r"""In place: :math:`w_i \leftarrow w_i + s_i\, d_i` (a perturbation step).

    :func:`perturbed_into_` with the parameters as their own buffers (same kernels, same
    rounding, same checks). ``directions`` are only read.

    Raises:
        ValueError: If ``directions`` or ``scales`` has another length than ``params``, a
            direction has another shape or (unless a 0-dim CPU tensor) device than its parameter,
            a parameter is one torch cannot write (as in :func:`perturbed_into_`), or a scale is
            beyond the range of the dtype its entry is computed in (or of a float), as in
            :func:`perturbed_into_`.
        TypeError: If a list is not a sequence (a tensor given for a list of tensors, a number for a
            list of numbers: see :func:`global_norm`), an entry of a list is not a tensor, a
            parameter is neither floating-point nor complex, a direction is complex where its
            parameter is real, or a scale is neither a real number nor a 0-dim real tensor
            (``"scales[i] must be a real number or a 0-dim real tensor, got {scale!r}"``).
    """
    perturbed_into_(params, params, directions, scales, foreach=foreach)


def mul_(
    buffers: Sequence[torch.Tensor], factors: Sequence[torch.Tensor], *, foreach: bool = True
) -> None:
    r"""In place: :math:`b_i \leftarrow b_i \odot f_i` for every buffer.

    One ``torch._foreach_mul_`` per device and dtype of the buffers, or ``mul_`` tensor by tensor
    (``foreach=False``): the same arithmetic, bit for bit. An entry must not share memory with
    another entry of the call (a buffer read or written by another entry): the result is then
    unspecified, and may differ between the two paths (the foreach path takes the entries by
    device and dtype, and may run them in parallel on a GPU). Everything is checked before
    anything is written.

    Raises:
        ValueError: If ``factors`` has another length than ``buffers``, a factor another shape
            than its buffer (torch would broadcast it), or another device (unless a 0-dim CPU
            tensor; torch would refuse it after writing the entries before it), or a buffer is one
            torch cannot write in place (the same): its elements share memory (an ``expand``
            view), an inference tensor outside ``torch.inference_mode()``, or a leaf that requires
            grad (or a view of one) while grad mode is on.
        TypeError: If a list is not a sequence (a tensor given for a list of tensors, a number for a
            list of numbers: see :func:`global_norm`), an entry of either list is not a tensor
            (``"factors[i] must be a torch.Tensor, got 2.0"``), a buffer is neither floating-point
            nor complex, or a factor is complex where its buffer is real.
    """
    check_bool("foreach", foreach)
    check_paired("buffers", buffers, "buffer", "factors", factors)
    check_writable("buffers", buffers)
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
    complex parameter gives a real :math:`T_i` (its modulus). The etas follow ``torch.add`` (IEEE
    arithmetic: a NaN or infinite eta gives a NaN or infinite :math:`T_i`), except that a finite
    eta beyond the largest finite value of its :math:`T_i`'s dtype, which torch would round to
    infinity silently, is refused before anything is computed. An eta is a real number (Python or
    a NumPy scalar) or a 0-dim real tensor; with a tensor among them the entries are taken one by
    one (``torch._foreach_add_`` takes numbers or tensors, not both).

    Raises:
        ValueError: If ``etas`` has another length than ``params``, or an eta is finite and beyond
            the range of its parameter's (real) dtype (or of a float).
        TypeError: If a list is not a sequence (a tensor given for a list of tensors, a number for a
            list of numbers: see :func:`global_norm`), an entry of ``params`` is not a tensor, a
            parameter is neither floating-point nor complex, or an eta is neither a real number nor
            a 0-dim real tensor (``"etas[i] must be a real number or a 0-dim real tensor, got
            {eta!r}"``; a ``bool`` or complex one included).
    """
    check_bool("foreach", foreach)
    check_sequence("params", params)
    check_sequence("etas", etas, "numbers")
    check_lengths(len(params), "parameter", ("etas", etas))
    check_tensors("params", params)
    groups = group_indices_by_device_and_dtype(params)
    check_floating("params", params, [dtype for _device, dtype in groups])
    etas, some_tensor = check_scalars("etas", etas)
    _check_etas_fit(params, etas, groups)
    if foreach and not some_tensor:
        result: list[torch.Tensor | None] = [None] * len(params)
        for indices in groups.values():
            scaled = torch._foreach_abs([params[i] for i in indices])
            for index, tensor in zip(indices, scaled):
                result[index] = tensor
            # |w| + 0 is |w| itself (a zero of either sign): not added, on either path
            adding = [i for i in indices if etas[i] != 0]
            if adding:
                torch._foreach_add_([result[i] for i in adding], [etas[i] for i in adding])  # type: ignore[misc]
        return result  # type: ignore[return-value]
    # A zero number is not added here either (with torch.set_flush_denormal on, adding it would
    # flush a subnormal |w| to 0 on one path only). A tensor eta is added (no sync).
    return [
        param.abs() if not isinstance(eta, torch.Tensor) and eta == 0 else param.abs().add_(eta)
        for param, eta in zip(params, etas)
    ]


def _check_etas_fit(
    params: Sequence[torch.Tensor], etas: Sequence[float], groups: dict[tuple[torch.device, torch.dtype], list[int]]
) -> None:
    """Check that no eta is finite and beyond its parameter's range (one ``max`` per dtype group in
    the common case; the entries are read one by one only to name the first bad one).

    Raises:
        ValueError: ``"etas[i] must fit in params[i]'s dtype {dtype} (at most {largest} in
            magnitude, or infinite, or NaN), got {eta!r}"`` for the first such eta.
    """
    for (_device, dtype), indices in groups.items():
        largest = LARGEST.get(dtype)  # a complex dtype's ASAM operator is real: its parts' range
        if largest is not None and not max(map(abs, map(etas.__getitem__, indices)), default=0.0) <= largest:
            break  # a NaN may hide a larger eta from max: every entry is read below
    else:
        return
    for index, (param, eta) in enumerate(zip(params, etas)):
        check_fits(f"etas[{index}]", eta, param.dtype, f"params[{index}]'s dtype")


def mul(
    tensors: Sequence[torch.Tensor], factors: Sequence[torch.Tensor], *, foreach: bool = True
) -> list[torch.Tensor]:
    r"""Out of place: return :math:`t_i \odot f_i` for every tensor.

    One ``torch._foreach_mul`` per device and dtype of ``tensors``, or ``mul`` tensor by tensor
    (``foreach=False``): the same arithmetic, bit for bit.

    Raises:
        ValueError: If ``factors`` has another length than ``tensors``, or a factor another shape
            than its tensor (torch would broadcast it).
        TypeError: If a list is not a sequence (a tensor given for a list of tensors, a number for a
            list of numbers: see :func:`global_norm`), an entry of either list is not a tensor
            (``"factors[i] must be a torch.Tensor, got 2.0"``), or a tensor is neither
            floating-point nor complex.
    """
    check_bool("foreach", foreach)
    check_sequence("tensors", tensors)
    check_sequence("factors", factors)
    check_lengths(len(tensors), "tensor", ("factors", factors))
    check_tensors("tensors", tensors)
    check_tensors("factors", factors)
    check_shapes("factors", factors, "tensors", tensors)
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
