"""Views that let every kernel treat tensors alike: complex as pairs of reals, 16-bit widened."""

from __future__ import annotations

import torch

__all__ = ["as_real", "widened_dtype", "LOW_PRECISION"]

#: Dtypes that cannot hold a large scalar operand or an intermediate product: computed in float32.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def as_real(tensor: torch.Tensor) -> torch.Tensor:
    """A complex tensor as pairs of reals (a view, as torch.optim treats complex parameters)."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def widened_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for a 16-bit dtype, the dtype itself otherwise."""
    return torch.float32 if dtype in LOW_PRECISION else dtype
