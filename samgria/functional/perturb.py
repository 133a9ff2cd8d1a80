r"""Kernels for weight perturbations (SAM, ASAM) on lists of tensors.

Every kernel has a ``foreach`` fast path (one ``torch._foreach_*`` call per device and dtype)
and a per-tensor reference path that performs the same arithmetic tensor by tensor, so the two
agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from samgria.functional._grouping import group_indices_by_device_and_dtype

__all__ = ["scale_and_add_", "mul", "mul_", "adaptive_scaling"]


def scale_and_add_(
    buffers: Sequence[torch.Tensor],
    scales: Sequence[float],
    addends: Sequence[torch.Tensor],
    *,
    foreach: bool = True,
) -> None:
    r"""In place: :math:`b_i \leftarrow a_i + s_i\, b_i` for every buffer.

    With ``b = g`` (a gradient) and ``a = w`` this writes the perturbed weights
    :math:`w + s\,g` into the gradient's storage, so a perturbation costs no new memory.

    16-bit tensors are computed in float32 and rounded once (the scale may exceed their range).
    Otherwise the reference path is one fused ``torch.add(a, b, alpha=s, out=b)`` per tensor (one pass
    over memory). The foreach path uses it too for CPU tensors — there a fused per-tensor pass
    beats two foreach passes (``mul_`` then ``add_``) — and the two foreach passes on other
    devices, where one kernel launch per tensor would dominate.
    """
    if foreach:
        for (device, dtype), indices in group_indices_by_device_and_dtype(buffers).items():
            if dtype in _LOW_PRECISION:
                for i in indices:
                    _scale_and_add_wide(buffers[i], scales[i], addends[i])
                continue
            if device.type == "cpu":
                for i in indices:
                    torch.add(addends[i], buffers[i], alpha=scales[i], out=buffers[i])
                continue
            group = [buffers[i] for i in indices]
            torch._foreach_mul_(group, [scales[i] for i in indices])
            torch._foreach_add_(group, [addends[i] for i in indices])
        return
    for buffer, scale, addend in zip(buffers, scales, addends):
        if buffer.dtype in _LOW_PRECISION:
            _scale_and_add_wide(buffer, scale, addend)
        else:
            torch.add(addend, buffer, alpha=scale, out=buffer)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _scale_and_add_wide(buffer: torch.Tensor, scale: float, addend: torch.Tensor) -> None:
    """``buffer <- addend + scale * buffer`` computed in float32 and rounded once.

    A 16-bit tensor cannot take ``scale`` as a scalar operand when it exceeds its range (a tiny
    gradient norm makes ``rho / norm`` huge), and the product would overflow anyway.
    """
    buffer.copy_(torch.add(addend.float(), buffer.float(), alpha=scale))


def mul_(
    buffers: Sequence[torch.Tensor], factors: Sequence[torch.Tensor], *, foreach: bool = True
) -> None:
    r"""In place: :math:`b_i \leftarrow b_i \odot f_i` for every buffer."""
    if foreach:
        for indices in group_indices_by_device_and_dtype(buffers).values():
            torch._foreach_mul_([buffers[i] for i in indices], [factors[i] for i in indices])
        return
    for buffer, factor in zip(buffers, factors):
        buffer.mul_(factor)


def adaptive_scaling(
    params: Sequence[torch.Tensor], etas: Sequence[float], *, foreach: bool = True
) -> list[torch.Tensor]:
    r"""Return the ASAM scaling operators :math:`T_i = |w_i| + \eta_i` (new tensors)."""
    if foreach:
        result: list[torch.Tensor | None] = [None] * len(params)
        for indices in group_indices_by_device_and_dtype(params).values():
            scaled = torch._foreach_abs([params[i] for i in indices])
            torch._foreach_add_(scaled, [etas[i] for i in indices])
            for index, tensor in zip(indices, scaled):
                result[index] = tensor
        return result  # type: ignore[return-value]
    return [param.abs().add_(eta) for param, eta in zip(params, etas)]


def mul(
    tensors: Sequence[torch.Tensor], factors: Sequence[torch.Tensor], *, foreach: bool = True
) -> list[torch.Tensor]:
    r"""Out of place: return :math:`t_i \odot f_i` for every tensor."""
    if foreach:
        result: list[torch.Tensor | None] = [None] * len(tensors)
        for indices in group_indices_by_device_and_dtype(tensors).values():
            products = torch._foreach_mul(
                [tensors[i] for i in indices], [factors[i] for i in indices]
            )
            for index, tensor in zip(indices, products):
                result[index] = tensor
        return result  # type: ignore[return-value]
    return [tensor.mul(factor) for tensor, factor in zip(tensors, factors)]
