r"""Kernels for LAMP: magnitude-scaled uniform noise and running sums of weights.

Every kernel has a ``foreach`` fast path (``torch._foreach_*`` calls per device and dtype) and a
per-tensor reference path that performs the same arithmetic tensor by tensor, so the two agree
bit for bit. The lists a kernel writes into must be floating-point or complex (an integer tensor
would truncate silently), every list must have one entry per parameter, the tensors a kernel
combines must have one shape (torch would broadcast a smaller one silently, or fail after writing
the entries before it), the tensors :func:`add_scaled_` and :func:`accumulate_` add must be on
one device (unless a 0-dim CPU tensor; torch would fail after writing the entries before it), and
no complex tensor may be written into a real one (a cast would discard its imaginary part); each
is checked once per list (or per device and dtype), before anything is written. An entry must
not share memory with another entry of the call (a tensor one entry writes, read or written by
another): the result is then unspecified, and may differ between the two paths (the foreach path
takes the entries by device and dtype, and may run them in parallel on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from samgria._checks import check_bool, check_int
from samgria.functional._grouping import (
    LARGEST,
    check_fits_where_computed,
    check_floating,
    check_lengths,
    check_paired,
    check_real_where_real,
    check_scalar,
    check_sequence,
    check_shapes,
    check_tensors,
    check_writable,
    group_indices_by_device_and_dtype,
)
from samgria.functional._views import LOW_PRECISION, widened_dtype

__all__ = ["magnitude_noise", "add_scaled_", "accumulate_", "assign_mean_"]


def magnitude_noise(
    params: Sequence[torch.Tensor],
    generator_for: Callable[[torch.device], torch.Generator | None],
    *,
    foreach: bool = True,
) -> list[torch.Tensor]:
    r"""Return :math:`u_i = w_i \odot r_i` with :math:`r_i \sim U(-1, 1)` element-wise.

    Because :math:`r` is symmetric, :math:`w \odot r` has the same distribution as the seed's
    :math:`|w| \odot r` and saves a temporary copy of every parameter. Random numbers are drawn
    tensor by tensor in the order of ``params`` (so both paths draw the same numbers) from
    ``generator_for(device)`` (``None``: the default generator), in each parameter's dtype. A
    complex parameter is a pair of reals, as in torch.optim: its real and imaginary parts each get
    their own factor, :math:`\operatorname{Re} u = \operatorname{Re} w \cdot r',
    \operatorname{Im} u = \operatorname{Im} w \cdot r''` (not the complex product).

    Raises:
        TypeError: If a list is not a sequence (a tensor given for a list of tensors, a number for a
            list of numbers: see :func:`global_norm`), an entry of ``params`` is not a tensor, or a
            parameter is neither floating-point nor complex (before anything is drawn).
    """
    check_bool("foreach", foreach)
    check_sequence("params", params)
    check_tensors("params", params)
    groups = group_indices_by_device_and_dtype(params) if foreach else None
    check_floating("params", params, None if groups is None else [dtype for _device, dtype in groups])
    noise = [
        torch.empty_like(param, memory_format=torch.preserve_format).uniform_(
            -1.0, 1.0, generator=generator_for(param.device)
        )
        for param in params
    ]
    real_noise, real_params = _complex_as_real(noise), _complex_as_real(params)
    if groups is not None:
        for indices in groups.values():
            torch._foreach_mul_([real_noise[i] for i in indices], [real_params[i] for i in indices])
        return noise
    for sample, param in zip(real_noise, real_params):
        sample.mul_(param)
    return noise


def _complex_as_real(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """Complex tensors as their real views (``(..., 2)``), the others as they are."""
    if not any(tensor.is_complex() for tensor in tensors):
        return tensors
    return [torch.view_as_real(tensor) if tensor.is_complex() else tensor for tensor in tensors]


def add_scaled_(
    params: Sequence[torch.Tensor], updates: Sequence[torch.Tensor], alpha: float, *, foreach: bool = True
) -> None:
    r"""In place: :math:`w_i \leftarrow w_i + \alpha\, u_i`.

    One ``torch._foreach_add_`` per device and dtype, or ``add_`` tensor by tensor
    (``foreach=False``): the same arithmetic, bit for bit. A 16-bit parameter is computed in
    float32 (wider if its update is) and rounded once, on both paths: torch's 16-bit ``add_``
    rounds :math:`\alpha u` (float16: to infinity where the sum fits) or :math:`\alpha` itself
    (bfloat16) to the dtype first. ``alpha`` is a real number (Python or a NumPy scalar) or a
    0-dim real tensor, as ``torch.add``'s, and follows IEEE arithmetic (a NaN or infinite
    ``alpha`` gives NaN or infinite weights); it is checked, with everything else, before anything
    is written, against the dtype each entry is computed in (float32 for float32 and 16-bit
    tensors: torch would raise on an ``alpha`` beyond its range after writing the entries before).
    An entry must not share memory with another entry of the call (the result is then
    unspecified; see the module's docstring).

    Raises:
        ValueError: If ``updates`` has another length than ``params``, an update another shape or
            (unless a 0-dim CPU tensor) device than its parameter, a parameter is one torch cannot
            write in place (as in :func:`accumulate_`), or ``alpha`` is finite and beyond
            the range of the dtype an entry is computed in (``"alpha must fit in the dtype params[i]
            is computed in, torch.float32 (at most ... in magnitude, or infinite, or NaN), got
            {alpha!r}"``) or of a float.
        TypeError: If a list is not a sequence (a tensor given for a list of tensors, a number for a
            list of numbers: see :func:`global_norm`), an entry of either list is not a tensor, a
            parameter is neither floating-point nor complex, an update is complex where its
            parameter is real, or ``alpha`` is neither a real number nor a 0-dim real tensor
            (``"alpha must be a real number or a 0-dim real tensor, got {alpha!r}"``; a ``bool`` or
            complex one included).
    """
    check_bool("foreach", foreach)
    check_paired("params", params, "parameter", "updates", updates)
    check_writable("params", params)
    alpha = check_scalar("alpha", alpha)
    check_fits_where_computed(params, updates, [alpha] * len(params), ["alpha"] * len(params))
    if foreach:
        groups = group_indices_by_device_and_dtype(params)
        check_floating("params", params, [dtype for _device, dtype in groups])
        for (_device, dtype), indices in groups.items():
            if _needs_widening(dtype, alpha):
                for i in indices:
                    _add_scaled_one_(params[i], updates[i], alpha)
                continue
            torch._foreach_add_([params[i] for i in indices], [updates[i] for i in indices], alpha=alpha)
        return
    check_floating("params", params)
    for param, update in zip(params, updates):
        _add_scaled_one_(param, update, alpha)


def _needs_widening(dtype: torch.dtype, alpha: float) -> bool:
    """Whether :func:`add_scaled_` computes a ``dtype`` tensor in float32: every 16-bit one."""
    return dtype in LOW_PRECISION


def _add_scaled_one_(param: torch.Tensor, update: torch.Tensor, alpha: float) -> None:
    """:func:`add_scaled_`'s per-tensor path (and, on the foreach path, 16-bit parameters)."""
    if _needs_widening(param.dtype, alpha):
        wide = torch.promote_types(widened_dtype(param.dtype), widened_dtype(update.dtype))
        param.copy_(torch.add(param.to(wide), update.to(wide), alpha=alpha))
    else:
        param.add_(update, alpha=alpha)


def accumulate_(sums: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, foreach: bool = True) -> None:
    r"""In place: :math:`S_i \leftarrow S_i + w_i` (``S_i`` may be wider than ``w_i``).

    Each parameter is cast to its sum's dtype, then added: one ``torch._foreach_add_`` per device
    and dtype of the sums, or ``add_`` tensor by tensor (``foreach=False``), bit for bit alike.
    An entry must not share memory with another entry of the call (the result is then
    unspecified; see the module's docstring).

    Raises:
        ValueError: If ``params`` has another length than ``sums``, a parameter another shape
            or (unless a 0-dim CPU tensor) device than its sum, or a sum is one torch cannot write
            in place (torch would refuse it after writing the entries before it): its elements
            share memory (an ``expand`` view), an inference tensor outside
            ``torch.inference_mode()``, or a leaf that requires grad (or a view of one) while grad mode is on.
        TypeError: If a list is not a sequence (a tensor given for a list of tensors, a number for a
            list of numbers: see :func:`global_norm`), an entry of either list is not a tensor, a
            sum is neither floating-point nor complex, or a parameter is complex where its sum is
            real.
    """
    check_bool("foreach", foreach)
    check_paired("sums", sums, "sum", "params", params)
    check_writable("sums", sums)
    if foreach:
        groups = group_indices_by_device_and_dtype(sums)
        check_floating("sums", sums, [dtype for _device, dtype in groups])
        for (_device, dtype), indices in groups.items():
            group_params = [params[i] if params[i].dtype == dtype else params[i].to(dtype) for i in indices]
            torch._foreach_add_([sums[i] for i in indices], group_params)
        return
    check_floating("sums", sums)
    for total, param in zip(sums, params):
        total.add_(param.to(total.dtype))


def assign_mean_(
    params: Sequence[torch.Tensor], sums: Sequence[torch.Tensor], counts: Sequence[int], *, foreach: bool = True
) -> None:
    r"""In place: :math:`w_i \leftarrow S_i / n_i`, then :math:`S_i \leftarrow 0`.

    The mean is taken in the sum's dtype and rounded once to the parameter's: one
    ``torch._foreach_div``, ``_foreach_copy_`` and ``_foreach_zero_`` per device and dtype of the
    parameters, or tensor by tensor (``foreach=False``), bit for bit alike. Everything is checked
    before anything is written. No tensor may share memory with another of the call, a parameter
    with its own sum included (the sum is zeroed after): the result is then unspecified (see the
    module's docstring).

    Raises:
        ValueError: If ``sums`` or ``counts`` has another length than ``params``, a sum another
            shape than its parameter, a parameter or sum is one torch cannot write in place (as in
            :func:`accumulate_`), or a count is below 1 (a mean of nothing) or beyond the
            range of a float (``"counts[i] must be an integer >= 1 that fits in a float, got
            {count!r}"``) or of the dtype the mean is taken in (float32 for float32, 16-bit and
            complex64 sums: torch would divide by infinity and write 0).
        TypeError: If a list is not a sequence (a tensor given for a list of tensors, a number for a
            list of numbers: see :func:`global_norm`), an entry of ``params`` or ``sums`` is not a
            tensor, a count is not an integer (``bool`` refused), a parameter is neither
            floating-point nor complex, or a sum is complex where its parameter is real.
    """
    check_bool("foreach", foreach)
    check_sequence("params", params)
    check_sequence("sums", sums)
    check_sequence("counts", counts, "integers")
    check_lengths(len(params), "parameter", ("sums", sums), ("counts", counts))
    check_tensors("params", params)
    check_tensors("sums", sums)
    check_shapes("sums", sums, "params", params)
    check_real_where_real("sums", sums, "params", params)
    check_writable("params", params)
    check_writable("sums", sums)
    divisors = _divisors(counts, sums)
    if foreach:
        groups = group_indices_by_device_and_dtype(params)
        check_floating("params", params, [dtype for _device, dtype in groups])
        for indices in groups.values():
            group_sums = [sums[i] for i in indices]
            means = torch._foreach_div(group_sums, [divisors[i] for i in indices])
            torch._foreach_copy_([params[i] for i in indices], means)
            torch._foreach_zero_(group_sums)
        return
    check_floating("params", params)
    for param, total, divisor in zip(params, sums, divisors):
        param.copy_(total / divisor)
        total.zero_()


def _divisors(counts: Sequence[int], sums: Sequence[torch.Tensor]) -> list[float]:
    """The counts as floats, each checked to be an integer >= 1 within the range of the dtype its
    mean is taken in (a float; float32 for float32, 16-bit and complex64 sums, where torch takes a
    larger divisor as infinite and the mean comes out 0); one pass in the common case."""
    if all(type(count) is int and 1 <= count <= _FLOAT32_LARGEST for count in counts):
        return [float(count) for count in counts]
    divisors = []
    for i, count in enumerate(counts):
        number = check_int(f"counts[{i}]", count, low=1)
        try:
            divisor = float(number)
        except OverflowError:  # a huge integer: no float holds it
            raise ValueError(f"counts[{i}] must be an integer >= 1 that fits in a float, got {count!r}") from None
        largest = LARGEST.get(widened_dtype(sums[i].dtype))
        if largest is not None and divisor > largest:
            raise ValueError(
                f"counts[{i}] must be an integer >= 1 that fits in the dtype the mean of sums[{i}] is taken "
                f"in, {widened_dtype(sums[i].dtype)} (at most {largest!r}), got {count!r}"
            )
        divisors.append(divisor)
    return divisors


#: The largest finite float32: a larger count is refused where the mean is taken in float32.
_FLOAT32_LARGEST = torch.finfo(torch.float32).max
