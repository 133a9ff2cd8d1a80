r"""Kernels for LAMP: magnitude-scaled uniform noise and running sums of weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from samgria.functional._grouping import group_indices_by_device_and_dtype

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
    ``generator_for(device)`` (``None``: the default generator).
    """
    noise = [
        torch.empty_like(param, memory_format=torch.preserve_format).uniform_(
            -1.0, 1.0, generator=generator_for(param.device)
        )
        for param in params
    ]
    if foreach:
        for indices in group_indices_by_device_and_dtype(params).values():
            torch._foreach_mul_([noise[i] for i in indices], [params[i] for i in indices])
        return noise
    for sample, param in zip(noise, params):
        sample.mul_(param)
    return noise


def add_scaled_(
    params: Sequence[torch.Tensor], updates: Sequence[torch.Tensor], alpha: float, *, foreach: bool = True
) -> None:
    r"""In place: :math:`w_i \leftarrow w_i + \alpha\, u_i`."""
    if foreach:
        for indices in group_indices_by_device_and_dtype(params).values():
            torch._foreach_add_(
                [params[i] for i in indices], [updates[i] for i in indices], alpha=alpha
            )
        return
    for param, update in zip(params, updates):
        param.add_(update, alpha=alpha)


def accumulate_(sums: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, foreach: bool = True) -> None:
    r"""In place: :math:`S_i \leftarrow S_i + w_i` (``S_i`` may be wider than ``w_i``)."""
    if foreach:
        for indices in group_indices_by_device_and_dtype(params).values():
            group_params = [params[i] for i in indices]
            if group_params[0].dtype != sums[indices[0]].dtype:
                group_params = [p.to(sums[indices[0]].dtype) for p in group_params]
            torch._foreach_add_([sums[i] for i in indices], group_params)
        return
    for total, param in zip(sums, params):
        total.add_(param.to(total.dtype))


def assign_mean_(
    params: Sequence[torch.Tensor], sums: Sequence[torch.Tensor], counts: Sequence[int], *, foreach: bool = True
) -> None:
    r"""In place: :math:`w_i \leftarrow S_i / n_i`, then :math:`S_i \leftarrow 0`."""
    if foreach:
        for indices in group_indices_by_device_and_dtype(params).values():
            group_sums = [sums[i] for i in indices]
            means = torch._foreach_div(group_sums, [float(counts[i]) for i in indices])
            torch._foreach_copy_([params[i] for i in indices], means)
            torch._foreach_zero_(group_sums)
        return
    for param, total, count in zip(params, sums, counts):
        param.copy_(total / float(count))
        total.zero_()
