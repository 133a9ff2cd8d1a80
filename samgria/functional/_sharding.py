"""Parameters sharded as ``DTensor`` (FSDP2's ``fully_shard``, tensor parallelism).

Every samgria kernel runs on plain tensors: a ``DTensor`` enters as its local shard
(:func:`local_shard`, a view of the same memory, so in-place updates land in the sharded
parameter), elementwise work stays on the shard and costs no communication. What is not
elementwise is a sum over the whole tensor -- a norm or an inner product. Its per-shard partial
sums are added across the ranks that hold the other shards (:func:`reduce_partial_sums`: one
``all_reduce`` of all the partial sums of one kind of sharding, per sharded mesh dimension);
replicated mesh dimensions hold the same values and are not summed over.

This is the one module that knows about ``DTensor``; without ``torch.distributed`` nothing here
is ever sharded.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor



#: ``(DTensor, Shard)`` once found (see :func:`_dtensor_types`).
_TYPES: tuple[type, type] | None = None
#: Plain tensors: never sharded (checked first: the common case costs one ``type`` lookup).
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_PLAIN_SET = frozenset(_PLAIN)


def _dtensor_types() -> tuple[type, type] | None:
    """``(DTensor, Shard)``, once ``torch.distributed.tensor`` has been imported by someone.

    A ``DTensor`` cannot exist before its module is imported, so until then nothing is sharded
    and ``import samgria`` does not pay for importing it.
    """
    global _TYPES
    if _TYPES is not None:
        return _TYPES
    if "torch.distributed.tensor" not in sys.modules and "torch.distributed._tensor" not in sys.modules:
        return None
    try:  # torch >= 2.5 exports DTensor publicly; earlier releases keep it under _tensor
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - depends on the torch build
        try:
            from torch.distributed._tensor import DTensor, Shard  # type: ignore[no-redef]
        except ImportError:
            return None
    _TYPES = (DTensor, Shard)
    return _TYPES


__all__ = [
    "is_sharded",
    "is_fsdp1_flattened",
    "any_sharded",
    "local_shard",
    "shard_key",
    "may_have_replicas",
    "shard_coordinates",
    "reduce_partial_sums",
]


def is_sharded(tensor: Any) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a ``DTensor`` (sharded or replicated over a device mesh)."""
    if type(tensor) in _PLAIN:
        return False
    types = _dtensor_types()
    return types is not None and isinstance(tensor, types[0])


def is_fsdp1_flattened(tensor: Any) -> bool:
    """Whether ``tensor`` is a parameter that FSDP1 (``FullyShardedDataParallel``) has flattened.

    That is its ``FlatParameter`` or, with ``use_orig_params=True``, an original parameter that is
    now a view of one rank's piece of it: plain tensors that carry no sharding metadata (a norm
    of one is a norm of a rank's piece, and FSDP1 gathers the weights from the flat parameter,
    not from ``param.data``). FSDP1 marks them with the private attribute ``_fsdp_flattened``
    (``torch.distributed.fsdp._common_utils.FSDP_FLATTENED``; FSDP2 does not set it); this is the
    one place that reads it.
    """
    return getattr(tensor, "_fsdp_flattened", False) is True


def any_sharded(tensors: Sequence[Any]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor`` (one set comparison when all are plain)."""
    if _PLAIN_SET.issuperset(map(type, tensors)):
        return False
    return any(map(is_sharded, tensors))


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds: a ``DTensor``'s local tensor, any other tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_key(tensor: torch.Tensor) -> tuple[Any, tuple[int, ...]] | None:
    """``(mesh, sharded mesh dims)`` of a ``DTensor`` split over some mesh dimension, else ``None``.

    Tensors with the same key need the same reduction; a ``DTensor`` replicated over its whole
    mesh holds the whole value on every rank and needs none.
    """
    if not is_sharded(tensor):
        return None
    if any(placement.is_partial() for placement in tensor.placements):
        raise ValueError(
            f"a DTensor with placements {tensor.placements} holds partial values; samgria needs "
            "sharded or replicated gradients and parameters (reduce the partial values first)"
        )
    shard_type = _dtensor_types()[1]  # type: ignore[index]
    dims = tuple(dim for dim, placement in enumerate(tensor.placements) if isinstance(placement, shard_type))
    return (tensor.device_mesh, dims) if dims else None


def may_have_replicas(tensor: torch.Tensor) -> bool:
    """Whether other ranks may hold a copy of this rank's part of ``tensor`` (no communication): a
    plain tensor (it cannot tell a ``DistributedDataParallel`` replica from a tensor no other
    rank holds) or a ``DTensor`` replicated along a mesh dimension of several ranks (HSDP, tensor
    parallelism's replicated bias)."""
    if not is_sharded(tensor):
        return True
    key = shard_key(tensor)
    sharded_dims = key[1] if key is not None else ()
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    return any(mesh.size(dim) > 1 for dim in range(mesh.ndim) if dim not in sharded_dims)


def shard_coordinates(tensor: torch.Tensor) -> tuple[int, ...]:
    """Which shard of ``tensor`` this rank holds: its coordinate along each mesh dimension that
    shards ``tensor``, and -1 along each that replicates it (``()`` for an unsharded tensor).

    Ranks that hold the same shard (replicas, e.g. HSDP's) get the same coordinates; tensors
    sharded along different mesh dimensions get different ones. On a 1-D mesh (FSDP2's default)
    this is ``(rank,)``.
    """
    key = shard_key(tensor)
    if key is None:
        return ()
    mesh, dims = key
    coordinates = mesh.get_coordinate()
    return tuple(coordinates[dim] if dim in dims else -1 for dim in range(mesh.ndim))


def reduce_partial_sums(partial: torch.Tensor, like: Sequence[torch.Tensor]) -> torch.Tensor:
    """Add up per-shard partial sums across ranks: one ``all_reduce`` per distinct sharding.

    Args:
        partial: 1-D tensor, one partial sum (over this rank's shard) per entry of ``like``.
        like: The tensors the partial sums were taken over (``DTensor``s or plain tensors).

    Returns:
        ``partial`` with each entry of a sharded tensor summed over the ranks holding its other
        shards; entries of plain or replicated tensors are unchanged.
    """
    import torch.distributed as dist

    groups: dict[Any, list[int]] = {}
    for index, tensor in enumerate(like):
        key = shard_key(tensor)
        if key is not None:
            groups.setdefault(key, []).append(index)
    if not groups:
        return partial
    result = partial.clone()
    for (mesh, dims), indices in groups.items():
        where = torch.tensor(indices, device=partial.device)
        values = result.index_select(0, where)
        for dim in dims:
            dist.all_reduce(values, group=mesh.get_group(dim))
        result.index_copy_(0, where, values)
    return result

