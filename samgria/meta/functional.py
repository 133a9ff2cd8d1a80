"""Functional core of the inner loop: stateless forward passes and differentiable steps.

Every meta-learner in :mod:`samgria.meta` is built on these few functions. A model's
parameters are handled as a ``{name: tensor}`` mapping (the *fast weights*) and the model is
run statelessly with :func:`torch.func.functional_call`, so the adapted weights stay in the
autograd graph of the meta-parameters and second-order meta-gradients flow through them.

One inner step of gradient descent (Finn et al., 2017) on a support loss
:math:`\\mathcal{L}_{\\text{sup}}` is

.. math::

    \\theta' = \\theta - \\alpha \\odot \\nabla_\\theta \\mathcal{L}_{\\text{sup}}(\\theta),

where :math:`\\alpha` is a scalar (MAML) or a tensor shaped like the parameter (Meta-SGD,
Li et al., 2017). With ``first_order=True`` the gradient is treated as a constant (FOMAML), so
:math:`\\partial \\theta' / \\partial \\theta = I`.

BatchNorm policy (running statistics):
    a functional forward never updates the model's buffers. When ``buffers`` is ``None`` every
    call runs on a *fresh copy* of the model's buffers, and the copy (with whatever BatchNorm
    wrote into it) is discarded. In train mode BatchNorm therefore normalises with the
    statistics of the batch it is given -- the support batch in the inner loop and the query
    batch afterwards (the transductive setting of the MAML reference code); in eval mode it
    uses the model's running statistics, read only. Because no tensor saved for backward is
    ever modified in place, second-order MAML through BatchNorm works (no in-place
    modification error), and the running statistics are not updated once per inner step.
    Only an ordinary forward of the model itself (``model(x)`` in train mode) updates them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import torch

from samgria._checks import check_bool, check_int, check_real
from samgria._wrapper import eager_under_compile
from samgria.meta.engine import (
    InnerLoop,
    apply_inner_update,
    check_support_loss,
    connected_support_grads,
    grads_of_loss,
    run_inner_loop,
    stateless_call,
)
from torch import nn

__all__ = [
    "LearningRate",
    "adapt",
    "adapt_params",
    "functional_forward",
    "inner_step",
    "named_buffers",
    "named_params",
]

#: An inner-loop step size (the type of ``lr`` and ``inner_lr``) -- one non-negative number for
#: every parameter, or a mapping from parameter name to a number or a tensor broadcastable to the
#: parameter's shape (Meta-SGD).
LearningRate = Union[float, Mapping[str, Union[float, torch.Tensor]]]


def named_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return a fresh ``{name: parameter}`` dict of ``model``.

    The values are the model's live :class:`~torch.nn.Parameter` leaves, so gradients that
    flow back into them accumulate into ``model.parameters()``'s ``.grad``.

    Args:
        model: Any module.

    Returns:
        A new dict (mutating it does not touch the model).

    Raises:
        TypeError: ``model`` is not a :class:`torch.nn.Module`.
    """
    _check_module(model)
    return dict(model.named_parameters())


def named_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return a fresh ``{name: buffer}`` dict of ``model`` (e.g. BatchNorm running statistics).

    Args:
        model: Any module.

    Returns:
        A new dict whose values are the model's live buffers.

    Raises:
        TypeError: ``model`` is not a :class:`torch.nn.Module`.
    """
    _check_module(model)
    return dict(model.named_buffers())


def copy_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return detached clones of ``model``'s buffers (the copies a functional forward runs on)."""
    return {name: buf.detach().clone() for name, buf in model.named_buffers()}


def functional_forward(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    *args: Any,
    buffers: Mapping[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> Any:
    """Run ``model`` statelessly with the given parameters (and buffers).

    Parameters missing from ``params`` are taken from the model. See the module docstring
    for the BatchNorm policy.

    Args:
        model: The module whose architecture defines the forward pass.
        params: Mapping of parameter name to tensor, as returned by :func:`named_params` or
            by an inner step (or a ``torch.nn.ParameterDict``).
        *args: Positional arguments of ``model.forward``.
        buffers: Mapping of buffer name to tensor. ``None`` (the default) runs on a fresh
            copy of the model's buffers, so the model's running statistics are never updated.
            Pass tensors explicitly to let the forward write into them.
        **kwargs: Keyword arguments of ``model.forward``.

    Returns:
        Whatever ``model.forward`` returns.

    Raises:
        TypeError: ``model`` is not a module, or ``params`` is not a mapping of names to tensors.
    """
    _check_module(model)
    params = check_params(params)
    if buffers is None:
        buffers = copy_buffers(model)
    return stateless_call(model, params, buffers, args, kwargs)


def check_lr(lr: Any, name: str = "lr") -> float:
    """Validate a scalar step size: a finite real number ``>= 0`` (``bool`` is rejected)."""
    return check_real(name, lr, low=0.0)


def check_steps(steps: Any, name: str = "inner_steps") -> int:
    """Validate a number of inner steps: an integer ``>= 0`` (``bool`` and floats are rejected)."""
    return check_int(name, steps, low=0)


def one_steps_argument(inner_steps: Any, steps: Any) -> Any:
    """Merge ``inner_steps`` with its former name ``steps`` (at most one may be given); a value
    given as ``steps`` is checked under that name (as :func:`check_steps`)."""
    if steps is None:
        return inner_steps
    if inner_steps is not None:
        raise TypeError(
            f"give inner_steps or its former name steps, not both; got inner_steps={inner_steps!r}, steps={steps!r}"
        )
    return check_steps(steps, "steps")


def resolve_lrs(
    lr: LearningRate,
    names: Iterable[str],
    arg: str = "lr",
    params: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float | torch.Tensor]:
    """Expand a step size (the argument called ``arg``) into a ``{name: lr}`` mapping over ``names``.

    A number must be finite and ``>= 0``. A tensor rate :math:`\\alpha_p` must broadcast to its
    parameter :math:`p` without changing ``p``'s shape (checked when ``params`` is given), so
    :math:`p - \\alpha_p \\odot g` is shaped like ``p``. A fixed tensor rate must hold finite
    numbers ``>= 0``, like a number (one host sync for all of them). A *learned* rate -- an
    :class:`~torch.nn.Parameter` or a tensor that requires grad, as Meta-SGD's -- may take any
    value (training can drive a Meta-SGD rate negative; Li et al. allow either sign) and its
    values are not read.

    Args:
        lr: A number, or a mapping from every name in ``names`` to a number or a tensor.
        names: The adapted parameter names.
        arg: The argument's name in messages (``"inner_lr"``).
        params: ``{name: parameter}`` for the shape check of tensor rates (default: not checked).

    Raises:
        TypeError: A rate is neither a real number nor a real tensor (a ``bool`` is not a number).
        ValueError: ``lr`` is a mapping without an entry for an adapted name, a number or an
            entry of a fixed tensor rate is negative or not finite, or a tensor rate does not
            broadcast to its parameter's shape.
    """
    names = list(names)
    if not isinstance(lr, Mapping):
        rate = check_lr(lr, arg)
        return {n: rate for n in names}
    missing = [n for n in names if n not in lr]
    if missing:
        raise ValueError(f"{arg} has no entry for the adapted parameters {missing}")
    out: dict[str, float | torch.Tensor] = {}
    fixed: list[tuple[str, torch.Tensor]] = []
    for n in names:
        value, name = lr[n], f"{arg}[{n!r}]"
        if not isinstance(value, torch.Tensor):
            out[n] = check_lr(value, name)
            continue
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number or a real tensor, got a tensor of dtype {value.dtype}")
        if params is not None and n in params:
            _check_rate_shape(name, value, params[n])
        if not (isinstance(value, nn.Parameter) or value.requires_grad):
            fixed.append((name, value))
        out[n] = value
    _check_fixed_rates(fixed)
    return out


def _check_rate_shape(name: str, rate: torch.Tensor, param: torch.Tensor) -> None:
    """Refuse a rate whose broadcast with ``param`` is not ``param``'s shape (metadata only)."""
    try:
        fits = torch.broadcast_shapes(rate.shape, param.shape) == param.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"{name} must be a number or a tensor broadcastable to its parameter's shape "
            f"{tuple(param.shape)}, got a tensor of shape {tuple(rate.shape)}"
        )
    promoted = torch.result_type(param, rate)
    if promoted != param.dtype:
        raise ValueError(
            f"{name} must be a tensor that keeps its parameter's dtype {param.dtype} (a 0-dim tensor, "
            f"or one of that dtype), got a tensor of dtype {rate.dtype}, which would make it {promoted}"
        )
    if rate.device != param.device and not (rate.dim() == 0 and rate.device.type == "cpu"):
        raise ValueError(
            f"{name} must be on its parameter's device {param.device} (or a 0-dim CPU tensor), got "
            f"a tensor on {rate.device}"
        )


def _check_fixed_rates(rates: list[tuple[str, torch.Tensor]]) -> None:
    """Refuse a fixed tensor rate with a negative or non-finite entry (one host sync for all)."""
    if not rates:
        return
    with torch.no_grad():
        flags = [((r < 0) | ~torch.isfinite(r)).any() for _, r in rates]
        if any(f.device != flags[0].device for f in flags):
            flags = [f.cpu() for f in flags]
        bad = torch.stack(flags)
    if not bool(bad.any()):
        return
    name, rate = rates[int(bad.to(torch.uint8).argmax())]
    raise ValueError(f"{name} must be a tensor of finite numbers >= 0, got {rate.detach()!r}")


def check_params(params: Any, name: str = "params") -> dict[str, torch.Tensor]:
    """``params`` as a dict, refused with a ``TypeError`` naming the argument (or the entry) and
    the value unless it maps parameter names to tensors: a mapping, or anything whose
    ``items()`` gives ``(name, tensor)`` pairs (a ``torch.nn.ParameterDict``)."""
    items = getattr(params, "items", None)
    if not callable(items):
        raise TypeError(f"{name} must be a mapping of parameter names to tensors, got {params!r}")
    try:
        pairs = dict(items())
    except (TypeError, ValueError):  # items() that are not (name, tensor) pairs
        raise TypeError(f"{name} must be a mapping of parameter names to tensors, got {params!r}") from None
    for key, value in pairs.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} must be a mapping of parameter names to tensors, got the key {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}[{key!r}] must be a tensor, got {value!r}")
    return pairs


def sequence_as_list(name: str, value: Any, items: str, refused: tuple[type, ...] = ()) -> list[Any]:
    """``value`` as a list: an iterable (a list, a generator), or a map-style container without
    ``__iter__`` (a ``torch.utils.data.Dataset``: ``__len__`` and ``__getitem__``, read at
    ``range(len(value))`` as torch's samplers read it, so its ``__getitem__`` need not stop past
    the end). A ``str``, ``bytes`` or tensor (whose items would be characters or rows), an
    instance of ``refused``, or anything else is refused with ``TypeError: "{name} must be a
    sequence of {items}, got {value!r}"`` (an error raised by the items themselves is not renamed)."""
    if isinstance(value, (str, bytes, torch.Tensor, *refused)):
        raise TypeError(f"{name} must be a sequence of {items}, got {value!r}")
    if not hasattr(value, "__iter__") and hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        return [value[index] for index in range(len(value))]
    try:
        iterator = iter(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of {items}, got {value!r}") from None
    return list(iterator)


def check_adapt_names(adapt_names: Iterable[str]) -> list[str]:
    """``adapt_names`` as a list (:func:`sequence_as_list`: ``list("2.weight")`` would be its
    characters)."""
    return sequence_as_list("adapt_names", adapt_names, "parameter names")


def resolve_adapt_names(
    params: Mapping[str, torch.Tensor], adapt_names: Iterable[str] | None, where: str = "in params"
) -> list[str]:
    """The names to adapt: ``adapt_names`` checked against ``params``, or (``None``) every name
    whose tensor requires grad.

    A named parameter that does not require grad is refused, not dropped: it cannot be adapted,
    and dropping it would adapt less than asked without a word. So is ``adapt_names=None`` when
    no tensor requires grad (nothing would be adapted). ``where`` says in messages where the names
    were looked up (``"in params"``, ``"parameters of model"``).
    """
    if adapt_names is None:
        names = [n for n, p in params.items() if p.requires_grad]
        if params and not names:
            raise ValueError(
                "no parameter to adapt: adapt_names=None adapts the tensors that require grad, and "
                f"none of the {len(params)} does"
            )
        return names
    names = check_adapt_names(adapt_names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"adapt_names contains names that are not {where}: {unknown}")
    frozen = [n for n in names if not params[n].requires_grad]
    if frozen:
        raise ValueError(
            f"adapt_names contains parameters that do not require grad, which cannot be adapted: {frozen}"
        )
    return names


def inner_step(
    params: Mapping[str, torch.Tensor],
    loss: torch.Tensor,
    lr: LearningRate,
    *,
    first_order: bool = False,
    adapt_names: Iterable[str] | None = None,
    allow_unused: bool = True,
) -> dict[str, torch.Tensor]:
    """Take one differentiable gradient-descent step on ``params``.

    Computes :math:`g = \\partial \\mathcal{L} / \\partial p` and returns
    :math:`p' = p - \\alpha_p \\odot g` for every adapted parameter; the others are passed
    through unchanged.

    ``loss`` is computed before this function sees it, so its forward is the caller's: for a
    second-order step through fused attention or weight normalisation, whose double backward
    torch gets wrong, compute it inside
    :func:`twice_differentiable_forward(True, model) <samgria.meta.engine.twice_differentiable_forward>`
    (:func:`adapt_params`, :class:`~samgria.meta.learner.Learner` and the meta-optimizers do).

    Args:
        params: Current parameter mapping (the point at which ``loss`` was computed).
        loss: Scalar support loss, differentiable w.r.t. ``params``.
        lr: Step size: a number ``>= 0`` or a mapping from every adapted name to a number or a
            tensor that broadcasts to the parameter's shape (Meta-SGD); see :func:`resolve_lrs`.
        first_order: If ``True`` the gradient is not differentiated through (FOMAML); the
            result is still connected to ``params`` through :math:`p' = p - \\alpha g`.
        adapt_names: Names of the parameters to update (ANIL adapts only the head), a
            sequence of names (not one name as a string). ``None`` updates every parameter
            that requires grad.
        allow_unused: Passed to :func:`torch.autograd.grad`: ``True`` leaves a parameter the
            loss does not depend on unchanged (zero gradient), ``False`` raises.

    Returns:
        A new mapping with the adapted parameters.

    Raises:
        TypeError: ``params`` is not a mapping of names to tensors, ``adapt_names`` is not a
            sequence of names (a string, a number), a rate is not a real number or tensor, or
            ``first_order`` or ``allow_unused`` is not a bool.
        ValueError: ``lr`` is negative or not finite (a number, or an entry of a tensor that does
            not require grad), a tensor rate does not broadcast to its parameter's shape, would
            change its dtype or is on another device (a 0-dim CPU tensor may be), a mapping
            ``lr`` lacks an adapted name, ``loss`` is not a differentiable scalar, or
            ``adapt_names`` names an unknown parameter or one that does not require grad (or is
            ``None`` and no tensor of ``params`` requires grad).
    """
    params = check_params(params)
    first_order = check_bool("first_order", first_order)
    allow_unused = check_bool("allow_unused", allow_unused)
    names = resolve_adapt_names(params, adapt_names)
    loop = InnerLoop(tuple(names), resolve_lrs(lr, names, "lr", params), 1, first_order=first_order)
    if not names:
        check_support_loss(loss)  # a bad loss is refused also when nothing is adapted
        return dict(params)
    current = {n: params[n] for n in names}
    grads = grads_of_loss(loss, current, not first_order, allow_unused)  # checks the loss
    return {**params, **apply_inner_update(loop, current, grads, {}, not first_order, None)}


@eager_under_compile
def adapt_params(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    build_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    *,
    inner_lr: LearningRate | None = None,
    inner_steps: int = 1,
    first_order: bool = False,
    adapt_names: Iterable[str] | None = None,
    allow_unused: bool = True,
    lr: LearningRate | None = None,
) -> dict[str, torch.Tensor]:
    """Run the whole inner loop and return the adapted parameters :math:`\\theta'`.

    Repeats ``params = inner_step(params, build_loss(params), inner_lr, ...)`` ``inner_steps``
    times, with the engine's one inner loop. Also available as ``adapt`` (its former name).

    Args:
        model: The module whose architecture defines the forward pass (checked to be a module;
            ``build_loss`` usually calls :func:`functional_forward` on it).
        params: Starting parameter mapping :math:`\\theta`.
        build_loss: Callable mapping a parameter dict to the scalar support loss.
        inner_lr: Inner step size (default 0.01), see :func:`inner_step`.
        inner_steps: Number of gradient steps (``>= 0``).
        first_order: See :func:`inner_step`.
        adapt_names: See :func:`inner_step`.
        allow_unused: Kept for compatibility; a parameter the loss does not depend on is
            always left unchanged (but a loss that depends on none of them is refused).
        lr: Former name of ``inner_lr``.

    Returns:
        The adapted parameter mapping (``params`` itself, copied, when ``inner_steps == 0``).

    Raises:
        TypeError: ``model`` is not a module, ``params`` is not a mapping of names to tensors,
            ``build_loss`` is not callable, ``inner_steps`` is not an int, ``first_order`` is not
            a bool, or ``adapt_names`` is not a sequence of names (a string, a number).
        ValueError: ``inner_steps`` is negative, ``inner_lr`` is refused (as ``lr`` of
            :func:`inner_step`), ``adapt_names`` is refused (see :func:`inner_step`), or a
            support loss depends on none of the adapted parameters ``build_loss`` is given (it
            would adapt nothing): one computed with the model instead of them, say, raises at
            once with ``first_order=True``, which differentiates detached copies, and from the
            second step in second order, whose first step starts at ``params`` themselves.
    """
    _check_module(model)
    params = check_params(params)
    if not callable(build_loss):
        raise TypeError(f"build_loss must be callable, got {build_loss!r}")
    steps = check_steps(inner_steps)
    first_order = check_bool("first_order", first_order)
    lr_name = "inner_lr"
    if lr is not None:
        if inner_lr is not None:
            raise TypeError(f"give inner_lr or its former name lr, not both; got inner_lr={inner_lr!r}, lr={lr!r}")
        inner_lr, lr_name = lr, "lr"
    if inner_lr is None:
        inner_lr = 0.01
    names = resolve_adapt_names(params, adapt_names)
    loop = InnerLoop(tuple(names), resolve_lrs(inner_lr, names, lr_name, params), steps, first_order=first_order)
    with torch.enable_grad():
        return run_inner_loop(loop, params, build_loss, connected_support_grads, model=model)


#: Former name of :func:`adapt_params`.
adapt = adapt_params


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
