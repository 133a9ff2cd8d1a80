"""Small utilities: flat gradient vectors and control of norm layers' running statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from samgria.functional._grouping import check_tensors, unwritable

__all__ = ["get_grad", "set_grad", "frozen_bn_stats"]


def get_grad(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Flatten every parameter's ``.grad`` into one 1-D vector (zeros where a grad is ``None``).

    A sparse gradient (``nn.Embedding(..., sparse=True)``) counts as the dense tensor it stands for
    (``to_dense()``: duplicate indices summed).

    Args:
        params: Parameters, e.g. ``model.parameters()``; a single tensor counts as ``[tensor]`` (as in
            ``torch.nn.utils.clip_grad_norm_``), not as the iterable of its rows.

    Returns:
        A vector of length ``sum(p.numel())``, in the dtype and on the device of the first parameter.

    Raises:
        TypeError: If ``params`` is neither a tensor nor an iterable, an item of it is not a tensor,
            or the first parameter is real and a later one complex (the cast would discard the
            imaginary parts).
        ValueError: If ``params`` is empty.
    """
    params = _as_list(params)
    if not params:
        raise ValueError("get_grad needs at least one parameter, got an empty iterable")
    check_tensors("params", params)
    first = params[0]
    if not first.is_complex():
        for index, param in enumerate(params):
            if param.is_complex():
                raise TypeError(
                    f"params[{index}] is complex ({param.dtype}) but params[0] is {first.dtype}: the "
                    "vector takes the first parameter's dtype, and a real one would discard the "
                    "imaginary parts; put a complex parameter first"
                )
    pieces = [_dense(p.grad if p.grad is not None else torch.zeros_like(p)) for p in params]
    return torch.cat([piece.reshape(-1).to(first.device, first.dtype) for piece in pieces])


def _as_list(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``params`` as a list; a single tensor as ``[tensor]`` (iterating over it would give its rows).

    Raises:
        TypeError: ``params`` is neither a tensor nor an iterable.
    """
    if isinstance(params, torch.Tensor):
        return [params]
    if not isinstance(params, Iterable):
        raise TypeError(f"params must be a tensor or an iterable of tensors, got {params!r}")
    return list(params)


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as it is if strided, else as the dense tensor it stands for."""
    return tensor if tensor.layout == torch.strided else tensor.to_dense()


@torch.no_grad()
def set_grad(grads: torch.Tensor, params: Iterable[torch.Tensor]) -> None:
    """Scatter a flat vector (as made by :func:`get_grad`) into each parameter's ``.grad``.

    Each slice is reshaped to the parameter's shape and cast to its device and dtype, then copied
    into the parameter's ``.grad``; a parameter whose ``.grad`` is ``None`` or sparse gets a new
    dense one, as does one that cannot be written in place (an ``expand`` view, an inference
    tensor outside inference mode). Everything is checked before any gradient is written. A single tensor as
    ``params`` counts as ``[tensor]``, as in :func:`get_grad`.

    Raises:
        TypeError: If ``grads`` or an item of ``params`` is not a tensor, ``params`` is neither a
            tensor nor an iterable, or ``grads`` is complex with a non-zero imaginary part in the
            slice of a real parameter (``"grads must be real where params[i] is real, got a
            {dtype} tensor with non-zero imaginary parts there"``: the cast would discard them). A
            complex vector that :func:`get_grad` made for a mix of complex and real parameters is
            real in the real ones' slices and is taken.
        ValueError: If ``grads`` is not 1-D or its length differs from the parameters' total size.
    """
    if not isinstance(grads, torch.Tensor):
        raise TypeError(f"grads must be a torch.Tensor, got {type(grads).__name__}")
    params = _as_list(params)
    check_tensors("params", params)
    total = sum(p.numel() for p in params)
    if grads.dim() != 1 or grads.numel() != total:
        raise ValueError(
            f"grads must be a 1-D tensor of length {total} (the parameters' total size), "
            f"got shape {tuple(grads.shape)}"
        )
    pieces = []
    offset = 0
    for index, param in enumerate(params):
        piece = grads[offset : offset + param.numel()].view_as(param)
        if piece.is_complex() and not param.is_complex():
            if bool(piece.imag.ne(0).any()):
                raise TypeError(
                    f"grads must be real where params[{index}] is real, got a {grads.dtype} tensor with "
                    "non-zero imaginary parts there"
                )
            piece = piece.real
        pieces.append(piece)
        offset += param.numel()
    for param, piece in zip(params, pieces):
        piece = piece.to(param.device, param.dtype)
        grad = param.grad
        if grad is not None and _writable(grad):
            grad.copy_(piece)
        else:
            param.grad = piece.clone()


def _writable(grad: torch.Tensor) -> bool:
    """Whether ``grad`` takes a copy in place: not sparse, and nothing torch would refuse only as
    it reached it, after writing the gradients before it (:func:`unwritable`: an ``expand`` view,
    an inference tensor outside inference mode)."""
    return grad.layout == torch.strided and unwritable(grad) is None


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Run forward passes in train mode without touching the running statistics of norm layers.

    Inside the block every BatchNorm layer of ``model`` normalises with the batch statistics, as
    in training, but its ``running_mean``, ``running_var`` and ``num_batches_tracked`` stay
    exactly as they were. Use it for SAM's second forward pass so that the running statistics
    match a plain optimizer step's (one update per step), e.g.
    ``TransformingOptimizer(..., reevaluation_context=lambda: frozen_bn_stats(model))``; in the
    two-call loop, around the second forward and its backward (with activation checkpointing the
    backward runs the forward again).

    BatchNorm layers (also ``SyncBatchNorm``) stop tracking for the block. An ``InstanceNorm``
    layer with ``track_running_stats=True`` updates its running statistics in train mode whatever
    that flag says, so its statistics are copied on entry and written back on exit instead. So
    are the vectors :math:`u, v` of spectral normalisation
    (``torch.nn.utils.parametrizations.spectral_norm`` and the older
    ``torch.nn.utils.spectral_norm``), whose power iteration runs in every train-mode forward:
    inside the block the forwards normalise as in training, and on exit :math:`u, v` are those of
    the last forward before the block (one power iteration per step, at :math:`w`).

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: If a lazy norm layer of ``model`` has not run a forward yet.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {model!r}")
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.modules.batchnorm._LazyNormBase)
            and module.track_running_stats
            and module.has_uninitialized_params()
        ):
            # Without running statistics to keep, its first forward would create none and leave
            # the layer half-initialised for good.
            raise ValueError(
                f"frozen_bn_stats: {name or 'model'} is a lazy norm layer ({type(module).__name__}) that "
                "has not run a forward yet (it has no running statistics to keep): run one forward before "
                "the block"
            )
    tracking = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    switched = [m for m in tracking if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # Every other norm layer with running statistics (InstanceNorm): copies to write back.
    kept = [
        (buffer, buffer.clone())
        for m in tracking
        if not isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buffer is not None
    ]
    kept += [(vector, vector.clone()) for vector in _power_iteration_vectors(model)]
    for layer in switched:
        layer.track_running_stats = False
    try:
        yield model
    finally:
        for layer in switched:
            layer.track_running_stats = True
        with torch.no_grad():
            for buffer, value in kept:
                # Only what the block changed: a write bumps the buffer's version, and a graph that
                # saved the buffer itself (the hook-based spectral norm in eval mode saves u and v)
                # could then not be back-propagated after the block.
                if not torch.equal(buffer, value):
                    buffer.copy_(value)


def _power_iteration_vectors(model: nn.Module) -> list[torch.Tensor]:
    """The buffers that spectral normalisation's power iteration updates in place in every
    train-mode forward of ``model``: the ``_u``/``_v`` of each
    ``torch.nn.utils.parametrizations.spectral_norm`` parametrization (none for a 1-D weight,
    which is divided by its norm) and the ``<name>_u``/``<name>_v`` of each module with the older
    hook-based ``torch.nn.utils.spectral_norm``."""
    # torch names the parametrization's class privately (_SpectralNorm), and the older form is
    # recognised by its forward pre-hook in the module's private hook dictionary: the one place
    # samgria reads either, as torch offers no public way to find them.
    from torch.nn.utils.parametrizations import _SpectralNorm
    from torch.nn.utils.spectral_norm import SpectralNorm

    vectors: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, _SpectralNorm):
            vectors += [buffer for name, buffer in module.named_buffers(recurse=False) if name in ("_u", "_v")]
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, SpectralNorm):
                vectors += [getattr(module, hook.name + "_u"), getattr(module, hook.name + "_v")]
    return vectors
