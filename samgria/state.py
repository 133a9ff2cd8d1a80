"""Bit-exact snapshots of a model's parameters and buffers."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from types import TracebackType

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from samgria._checks import has_internal_overlap

__all__ = ["ParameterSnapshot", "restore_state", "save_state"]


def _detached_clones(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in named.items()}


def _check_holds_values(kind: str, named: Mapping[str, torch.Tensor]) -> None:
    """Refuse a model's lazy (uninitialised) or meta tensors: they hold no values to capture, and a
    copy into one writes nothing (a meta tensor) or fails (a lazy one)."""
    for name, tensor in named.items():
        if is_lazy(tensor):
            raise ValueError(
                f"model must have initialised {kind}, got the lazy {kind[:-1]} {name!r} (not "
                "initialised yet): run one forward first"
            )
        if tensor.is_meta:
            raise ValueError(f"model must hold the values of its {kind}, got {kind[:-1]} {name!r} on the meta device")


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values, a NaN equal to a NaN."""
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def _writable(
    kind: str, name: str, target: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of ``target`` that owns its memory and the values to copy into it.

    A tensor expanded along a dimension (stride 0, such as a buffer registered as
    ``torch.zeros(1).expand(3)``) holds one element for all the positions along it, and ``copy_``
    refuses to write into it: the copy goes to its first position along each such dimension, which
    needs the snapshot's values to be the same along it. Checked for every tensor before anything is
    written, so that a restore that cannot complete writes nothing. A tensor of another layout
    than strided (sparse) has no strides to share: ``copy_`` takes it as it is.
    """
    if target.layout != torch.strided:
        return target, value
    for dim, (size, stride) in enumerate(zip(target.shape, target.stride())):
        if stride == 0 and size > 1:
            target, first = target.narrow(dim, 0, 1), value.narrow(dim, 0, 1)
            if not _same_values(first.expand_as(value), value):
                raise ValueError(
                    f"{kind[:-1]} {name!r} of the model is expanded along dimension {dim} (one element "
                    "for all its positions), but the snapshot's values differ along it"
                )
            value = first
    if has_internal_overlap(target):  # which copy_ refuses
        raise ValueError(
            f"{kind[:-1]} {name!r} of the model has elements that share memory (strides "
            f"{tuple(target.stride())}), so it cannot take the snapshot's values"
        )
    return target, value


class ParameterSnapshot:
    """A cloned copy of a model's parameters and buffers that can be written back exactly.

    The snapshot holds detached clones of ``model.named_parameters()`` and
    ``model.named_buffers()`` (e.g. BatchNorm running statistics). :meth:`restore` copies
    them back **in place** into the same tensor objects, so the ``nn.Parameter`` objects an
    optimizer holds stay valid, and the values are bit-for-bit those at capture time. It is
    meant for manual control of the inner loop (meta-RL style: adapt the model in place with
    any optimizer, evaluate, then roll back).

    Used as a context manager it restores on exit, also when the block raises::

        with ParameterSnapshot(model):
            inner_optimizer.step()   # mutate the model freely
        # the model is back to its state at the start of the block

    Gradients (``.grad``), ``requires_grad`` flags and optimizer state are not captured.

    Args:
        model: The module to capture; a lazy module after its first forward.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: A parameter or buffer of ``model`` holds no values: a lazy one not initialised
            yet, or one on the meta device.

    Attributes:
        parameters: ``{name: tensor}`` clones of the parameters.
        buffers: ``{name: tensor}`` clones of the buffers.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        _check_holds_values("parameters", params)
        _check_holds_values("buffers", buffers)
        self.model = model
        self.parameters = _detached_clones(params)
        self.buffers = _detached_clones(buffers)

    def _check(
        self, kind: str, saved: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Raise unless every tensor of ``saved`` can be written into ``live``; return the writes
        (:func:`_writable`'s target and values, in ``saved``'s order)."""
        missing = sorted(set(saved) - set(live))
        extra = sorted(set(live) - set(saved))
        if missing or extra:
            raise ValueError(
                f"model {kind} do not match the snapshot: missing from the model {missing}, "
                f"not in the snapshot {extra}"
            )
        _check_holds_values(kind, live)
        writes = []
        for name, value in saved.items():
            target = live[name]
            if target.shape != value.shape:
                raise ValueError(
                    f"{kind[:-1]} {name!r} has shape {tuple(target.shape)} in the model but "
                    f"{tuple(value.shape)} in the snapshot"
                )
            if target.dtype != value.dtype:
                raise ValueError(
                    f"{kind[:-1]} {name!r} has dtype {target.dtype} in the model but "
                    f"{value.dtype} in the snapshot"
                )
            writes.append(_writable(kind, name, target, value))
        return writes

    @torch.no_grad()
    def restore(self, model: nn.Module | None = None) -> None:
        """Copy the snapshot back into ``model`` (default: the captured model), in place.

        Every name, shape and dtype is checked before anything is written, so a mismatch
        leaves the model untouched. A tensor of the model expanded along a dimension (stride 0,
        one element for all its positions, e.g. a buffer registered as ``torch.zeros(1).expand(3)``)
        takes the snapshot's values when they are the same along that dimension, as they are when
        it was captured so. An inference tensor (made under ``torch.inference_mode()``) is written
        too, also outside inference mode.

        Args:
            model: Module to restore into; it must have the same parameter and buffer names,
                shapes and dtypes as the captured one (its device may differ).

        Raises:
            TypeError: ``model`` is not an ``nn.Module``.
            ValueError: The names, shapes or dtypes do not match the snapshot, a parameter or
                buffer of ``model`` holds no values to write into (lazy, or on the meta device), or
                one whose elements share memory cannot take the snapshot's values.
        """
        model = self.model if model is None else model
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        writes = self._check("parameters", self.parameters, params) + self._check("buffers", self.buffers, buffers)
        for target, value in writes:
            # torch writes into an inference tensor (one made under torch.inference_mode(), such as a
            # buffer a module caches in its first forward) only inside inference mode
            with torch.inference_mode() if target.is_inference() else contextlib.nullcontext():
                target.copy_(value)

    def __enter__(self) -> ParameterSnapshot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.restore()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.parameters)} parameters, "
            f"{len(self.buffers)} buffers)"
        )


def save_state(model: nn.Module) -> ParameterSnapshot:
    """Capture ``model``'s parameters and buffers; see :class:`ParameterSnapshot`.

    Args:
        model: The module to capture.

    Returns:
        A :class:`ParameterSnapshot` with detached clones of every parameter and buffer.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: A parameter or buffer of ``model`` is lazy and not initialised yet, or on the
            meta device.
    """
    return ParameterSnapshot(model)


def restore_state(model: nn.Module, snapshot: ParameterSnapshot) -> None:
    """Write ``snapshot`` back into ``model`` in place, bit for bit.

    The parameter objects are kept (optimizers holding them stay valid); names, shapes and
    dtypes are checked first, so on error the model is unchanged.

    Args:
        model: Module to restore.
        snapshot: A snapshot from :func:`save_state` of this model (or one with the same
            parameter and buffer names, shapes and dtypes).

    Raises:
        TypeError: ``snapshot`` is not a :class:`ParameterSnapshot` or ``model`` is not a module
            (``None`` included: unlike :meth:`ParameterSnapshot.restore`'s, this ``model`` has no
            default).
        ValueError: The names, shapes or dtypes do not match, or a parameter or buffer of
            ``model`` holds no values (lazy, or on the meta device).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(snapshot, ParameterSnapshot):
        raise TypeError(f"snapshot must be a ParameterSnapshot, got {type(snapshot).__name__}")
    snapshot.restore(model)
