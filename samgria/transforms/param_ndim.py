r"""``param_ndim``: how a transform broadcasts over a parameter, and the per-parameter hook base class.

Following rai-toolbox's ``ParamTransformingOptimizer``, a transform with a ``param_ndim``
hyperparameter acts on each parameter (and its gradient) reshaped to ``(N, *sub)``, where the
sub-tensor ``sub`` holds the last :math:`k` dimensions of the parameter and :math:`N` counts the
sub-tensors; the transform is applied to every sub-tensor independently. For a parameter with
:math:`n` dimensions (a 0-dim parameter counts as shape ``(1,)``):

* ``param_ndim = k >= 0``: sub-tensors of :math:`k` dimensions; ``0`` is elementwise (shape
  ``(numel, 1)``), ``n`` is the whole tensor (shape ``(1, *shape)``);
* ``param_ndim = -j < 0``: :math:`k = n - j`, so ``-1`` (rai's default) broadcasts over the
  leading dimension: each row of a ``Linear`` weight, each output filter of a convolution, each
  example of a batch of perturbations; on a 1-dim parameter (a bias) it is elementwise;
* ``param_ndim = None``: the whole tensor, whatever its dimension.

Values outside :math:`[-n, n]` for some parameter of the group (a group may hold parameters of
different dimensions, so the range is known only per parameter) are refused wherever the group is
checked -- when the optimizer is built, by ``add_param_group`` and ``load_state_dict``, and at every
step (a group edited since) before any transform runs -- with a ``ValueError`` naming the group
key, the parameter and the value.

Like every transform hyperparameter, ``param_ndim`` is a per-group key (``"param_ndim"``, or
``"<slot>.param_ndim"`` when another transform of the chain owns one too), defaulting to the
transform's constructor value.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch

from samgria._checks import check_int
from samgria.transforms.base import Transform, TransformContext, _derive_writes_weights

__all__ = ["ParamTransform"]


def check_param_ndim(name: str, value: Any, params: Iterable[Any] = ()) -> int | None:
    """Check a ``param_ndim`` value: an integer (NumPy integers accepted, ``bool`` refused) or ``None``,
    in :math:`[-n, n]` for every tensor of ``params`` with :math:`n` dimensions (a 0-dim one counts
    as 1; entries that are not tensors are left to the optimizer to refuse).

    Raises:
        TypeError: ``"param_ndim must be an integer or None, got 1.0"``.
        ValueError: ``"param_ndim must be None or an integer in [-1, 1] for params[2] of shape
            (8,), got 2"``, or a non-finite float.
    """
    if value is None:
        return None
    try:
        number = check_int(name, value)
    except TypeError:
        raise TypeError(f"{name} must be an integer or None, got {value!r}") from None
    except ValueError:  # a non-finite float
        raise ValueError(f"{name} must be an integer or None, got {value!r}") from None
    for position, param in enumerate(params):
        if not isinstance(param, torch.Tensor):
            continue
        ndim = max(param.ndim, 1)
        if not -ndim <= number <= ndim:
            raise ValueError(
                f"{name} must be None or an integer in [{-ndim}, {ndim}] for params[{position}] "
                f"of shape {tuple(param.shape)}, got {value!r}"
            )
    return number


def _sub_ndim(param_ndim: int | None, ndim: int) -> int:
    """The number :math:`k` of trailing dimensions a sub-tensor holds (``ndim`` already >= 1)."""
    if param_ndim is None:
        return ndim
    return param_ndim + ndim if param_ndim < 0 else param_ndim


def batch_shape(shape: torch.Size | tuple[int, ...], param_ndim: int | None) -> tuple[int, ...]:
    """The ``(N, *sub)`` shape a tensor of ``shape`` is seen with under ``param_ndim``.

    ``(2, 3, 4)`` gives ``(24, 1)`` for ``0``, ``(6, 4)`` for ``1`` or ``-2``, ``(2, 3, 4)`` for
    ``-1``, ``(1, 2, 3, 4)`` for ``3`` or ``None``. ``param_ndim`` must lie in ``[-n, n]``.
    """
    shape = tuple(shape) or (1,)
    k = _sub_ndim(param_ndim, len(shape))
    if not 0 <= k <= len(shape):
        raise ValueError(f"param_ndim must be None or an integer in [{-len(shape)}, {len(shape)}], got {param_ndim!r}")
    if k == 0:
        return (math.prod(shape), 1)
    return (math.prod(shape[: len(shape) - k]), *shape[len(shape) - k :])


@contextlib.contextmanager
def batched(tensor: torch.Tensor, param_ndim: int | None) -> Iterator[torch.Tensor]:
    """``tensor`` seen with shape :func:`batch_shape`, for in-place changes.

    A view when the tensor's layout allows one (always for contiguous tensors); otherwise (a
    ``channels_last`` weight flattened elementwise, say) a copy that is written back into
    ``tensor`` when the block exits without an exception.
    """
    shape = batch_shape(tensor.shape, param_ndim)
    try:
        view = tensor.view(shape)
    except RuntimeError:
        copy = tensor.reshape(shape).clone()
        yield copy
        tensor.copy_(copy.view(tensor.shape))
    else:
        yield view


def refuse_sparse_gradients(transform: Transform, params: Iterable[torch.Tensor]) -> None:
    """Refuse a sparse gradient of one of ``params``, for ``transform`` that reads gradient values.

    Call it before changing anything (it raises at the first such parameter).

    Raises:
        RuntimeError: ``"ClipGradNorm does not support sparse gradients (a parameter of shape
            (6, 3) has one): use a dense embedding, or give that parameter to another optimizer"``.
    """
    for param in params:
        if param.grad is not None and param.grad.is_sparse:
            raise RuntimeError(
                f"{type(transform).__name__} does not support sparse gradients (a parameter of shape "
                f"{tuple(param.shape)} has one): use a dense embedding, or give that parameter to "
                "another optimizer"
            )


def _group_key(group: Mapping[str, Any], key: str) -> str:
    """The key the group stores a hyperparameter under (``"param_ndim"`` or ``"<slot>.param_ndim"``)."""
    keys = getattr(group, "_keys", None)
    return keys.get(key, key) if keys is not None else key


def ndim_entries(
    ctx: TransformContext, key: str = "param_ndim"
) -> list[tuple[Mapping[str, Any], torch.Tensor, int | None]]:
    """``(group, param, param_ndim)`` for every parameter with a gradient, in group order.

    Checks first that the ``param_ndim`` of every group fits every parameter of that group (with or
    without a gradient), so a transform that calls it before writing changes nothing on error. (Inside
    the optimizer, :meth:`ParamTransform.validate_group` has refused such a value before any transform
    of the step ran; this check covers the seed protocol and subclasses that replace that method.)
    A gradient may be sparse: a transform that uses only the weights (``ProjectParams``) accepts
    it, one that reads the gradients refuses it with :func:`refuse_sparse_gradients`.

    Raises:
        ValueError: ``"param_groups[0]: param_ndim must be None or an integer in [-1, 1] for
            params[2] of shape (8,), got 2"``.
    """
    entries: list[tuple[Mapping[str, Any], torch.Tensor, int | None]] = []
    for index, group in enumerate(ctx.param_groups):
        param_ndim = group[key]
        try:
            check_param_ndim(_group_key(group, key), param_ndim, group["params"])
        except ValueError as error:
            raise ValueError(f"param_groups[{index}]: {error}") from None
        for param in group["params"]:
            if param.grad is None:
                continue
            entries.append((group, param, None if param_ndim is None else int(param_ndim)))
    return entries


class ParamTransform(Transform):
    r"""Base class for transforms written as two per-parameter hooks, as in rai-toolbox.

    Override :meth:`pre_step_transform_` (runs before the inner optimizer's step: change
    ``param.grad`` and/or ``param`` in place) and/or :meth:`post_step_transform_` (runs after
    it: constrain ``param`` in place). samgria calls them for every parameter that has a
    gradient, with ``param`` and ``param.grad`` reshaped to ``(N, *sub)`` according to the
    group's ``param_ndim`` (see :mod:`samgria.transforms.param_ndim`): write the hook so that it
    acts on each of the ``N`` sub-tensors independently (reduce over ``dim=1`` onwards, keep the
    leading dimension), and it works for every ``param_ndim``. The hooks run under
    :func:`torch.no_grad`; a parameter without a gradient is left alone (the inner optimizer does
    not move it either), and a sparse gradient is refused (``RuntimeError`` naming the subclass
    and the parameter's shape) before any hook runs.

    Hooks must work **in place**: ``param.grad.mul_(...)``, ``param.grad /= ...``,
    ``torch.sign(param.grad, out=param.grad)``, ``param.clamp_(...)``. Assigning a new tensor to
    ``param.grad``, ``param.grad.data`` or ``param.data`` would change a temporary view only, so
    it raises a ``RuntimeError`` naming the hook.

    ``param_ndim`` is a per-group key (constructor default ``-1``, rai's); a subclass with
    hyperparameters of its own extends :meth:`group_defaults` and :meth:`validate_group` with
    ``super()``'s (one whose :meth:`group_defaults` leaves ``param_ndim`` out uses the instance's
    value for every group; a value that does not fit one of a group's parameters is refused at
    the step, before any hook runs). Only the hooks a subclass overrides run, so a transform
    with only a pre-step hook is a pure pre-step transform (the optimizer takes no copy of the weights
    before its inner step, see :class:`~samgria.TransformingOptimizer`). Because a pre-step hook
    may change ``param``, the optimizer copies the weights at the start of each step for a
    subclass that overrides it, to put them back if the step raises or is skipped
    (:attr:`~samgria.transforms.Transform.writes_weights_before_step`); a subclass whose
    pre-step hook changes only ``param.grad`` sets ``writes_weights_before_step = False`` in its
    class body to save that copy.

    Args:
        param_ndim: Default dimension of the sub-tensors (per-group key ``"param_ndim"``): an
            integer in :math:`[-n, n]` for every parameter of :math:`n` dimensions of the group,
            or ``None`` for the whole tensor.

    Raises:
        TypeError: If ``param_ndim`` is neither an integer nor ``None``.
    """

    supports_sharded_params = False  # param_ndim reshapes would act on a shard's rows only

    #: The default when a subclass's ``__init__`` does not call ``super().__init__()``.
    param_ndim: int | None = -1

    def __init__(self, param_ndim: int | None = -1) -> None:
        self.param_ndim = check_param_ndim("param_ndim", param_ndim)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass without a post-step hook must not look like a post-step transform: the
        # optimizer copies the weights before the inner step for those (atomicity).
        defines = cls.post_step_transform_ is not ParamTransform.post_step_transform_
        if not defines and cls.post_update is ParamTransform.post_update:
            cls.post_update = Transform.post_update  # type: ignore[method-assign]
        elif defines and cls.post_update is Transform.post_update:  # reset by a parent class
            cls.post_update = ParamTransform.post_update  # type: ignore[method-assign]
        # A pre-step hook may write ``param``.
        _derive_writes_weights(cls, ParamTransform, "pre_step_transform_")

    def group_defaults(self) -> dict[str, Any]:
        return {"param_ndim": self.param_ndim}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        # A subclass whose group_defaults leaves the key out: the instance's value, for every group.
        param_ndim = group["param_ndim"] if "param_ndim" in self.group_defaults() else self.param_ndim
        check_param_ndim("param_ndim", param_ndim, group.get("params", ()))

    def pre_step_transform_(self, param: torch.Tensor, group: Mapping[str, Any]) -> None:
        """Change ``param.grad`` (and/or ``param``) in place, before the inner step (default: nothing).

        Args:
            param: The parameter as a shape-``(N, *sub)`` view, ``sub`` holding ``param_ndim``
                dimensions; ``param.grad`` is its gradient, viewed the same way.
            group: The parameter's group, hyperparameters by their short names
                (``group["param_ndim"]``, ``group["lr"]``).
        """

    def post_step_transform_(self, param: torch.Tensor, group: Mapping[str, Any]) -> None:
        """Change ``param`` in place, after the inner step (default: nothing).

        Same arguments as :meth:`pre_step_transform_`.
        """

    def _run_hook(self, ctx: TransformContext, name: str) -> None:
        if getattr(type(self), name) is getattr(ParamTransform, name):
            return  # not overridden: nothing to do
        hook = getattr(self, name)
        if "param_ndim" in self.group_defaults():
            entries = ndim_entries(ctx)
        else:  # a subclass that dropped the key: the instance's value for every group
            for index, checked in enumerate(ctx.param_groups):  # before any hook runs
                try:
                    check_param_ndim("param_ndim", self.param_ndim, checked["params"])
                except ValueError as error:
                    raise ValueError(f"param_groups[{index}]: {error}") from None
            entries = [(g, p, self.param_ndim) for g in ctx.param_groups for p in g["params"] if p.grad is not None]
        refuse_sparse_gradients(self, (param for _, param, _ in entries))  # the hooks see param.grad
        for group, param, param_ndim in entries:
            # cast: entries hold parameters with a gradient
            with batched(param, param_ndim) as view, batched(cast(torch.Tensor, param.grad), param_ndim) as grad:
                view.grad = grad
                address, shape = view.data_ptr(), view.shape
                grad_address, grad_shape = grad.data_ptr(), grad.shape
                hook(view, group)
                replaced = [
                    what
                    for what, bad in (
                        ("param.grad", view.grad is not grad),
                        ("param.grad.data", grad.data_ptr() != grad_address or grad.shape != grad_shape),
                        ("param.data", view.data_ptr() != address or view.shape != shape),
                    )
                    if bad
                ]
                view.grad = None
                if replaced:
                    raise RuntimeError(
                        f"{type(self).__name__}.{name} assigned a new tensor to {' and '.join(replaced)}, "
                        "which changes a temporary view only: change it in place instead "
                        "(param.grad.mul_(...), param.grad /= ..., torch.sign(param.grad, out=param.grad), "
                        "param.grad.copy_(new), param.clamp_(...))"
                    )

    def scales_with_gradients(self, param_groups: Sequence[Mapping[str, Any]]) -> bool:
        # Without a pre-step hook, pre_update leaves the gradients alone.
        return type(self).pre_step_transform_ is ParamTransform.pre_step_transform_

    def pre_update(self, ctx: TransformContext) -> None:
        self._run_hook(ctx, "pre_step_transform_")

    def post_update(self, ctx: TransformContext) -> None:
        self._run_hook(ctx, "post_step_transform_")

