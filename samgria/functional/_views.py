"""Views that let every kernel treat tensors alike: local shards, complex as pairs of reals, 16-bit widened."""

from __future__ import annotations

import torch

from samgria.functional._sharding import any_sharded, local_shard

__all__ = ["as_real", "all_as_real", "values_as_real", "widened_dtype", "LOW_PRECISION"]

#: Dtypes that cannot hold a large scalar operand or an intermediate product: computed in float32.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def as_real(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor every kernel works on: this rank's shard of a ``DTensor``, complex as pairs of
    reals (views, as torch.optim treats complex parameters)."""
    tensor = local_shard(tensor)
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def all_as_real(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`as_real` of every tensor; ``tensors`` itself when none is complex or sharded (the
    common case, answered by two passes over attributes instead of one call per tensor)."""
    if any_sharded(tensors) or any(dtype.is_complex for dtype in {tensor.dtype for tensor in tensors}):
        return [as_real(tensor) for tensor in tensors]
    return tensors


def values_as_real(tensor: torch.Tensor) -> torch.Tensor:
    """:func:`as_real` of a tensor's values: a sparse tensor's stored values (coalesced), so that a
    reduction over every element (a norm, a finiteness check) reads each value once."""
    return as_real(tensor.coalesce()._values() if tensor.is_sparse else tensor)


def widened_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for a 16-bit dtype, the dtype itself otherwise."""
    return torch.float32 if dtype in LOW_PRECISION else dtype
