"""Few-shot tasks and the task-sampler protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from samgria._checks import check_bool

__all__ = [
    "Task",
    "TaskSampler",
    "GeneratorStateMixin",
    "generator_state_dict",
    "load_generator_state_dict",
    "load_sampler_state_dict",
    "sampler_state_dict",
]


@dataclass(eq=False)
class Task:
    """One few-shot task: a support split to adapt on and a query split to evaluate on.

    Tasks compare and hash by identity, as tensors do (a field-wise ``==`` of tensors has no
    single truth value), so ``task in tasks`` and a dict keyed by tasks work.

    Attributes:
        support_x: Support inputs, shape ``(K, ...)``.
        support_y: Support targets, shape ``(K, ...)``.
        query_x: Query inputs, shape ``(Q, ...)``.
        query_y: Query targets, shape ``(Q, ...)`` (``Q`` may be 0: no query set, as Reptile
            allows).

    Raises:
        TypeError: A field is not a tensor.
        ValueError: A field is a 0-dim tensor, the fields are on different devices, or
            ``support_x`` and ``support_y`` (or ``query_x`` and ``query_y``) differ in their first
            dimension. See :meth:`check`.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __post_init__(self) -> None:
        self.check()

    def check(self, name: str = "") -> None:
        """Raise if the fields are not tensors whose inputs and targets pair up row by row.

        An empty query set (``Q = 0`` rows, e.g. ``query_x[:0]``) is a valid split.

        Args:
            name: How the caller names this task in a message (``"tasks[2]"``): a field is then
                called ``tasks[2].support_x``; by default just ``support_x``.

        Raises:
            TypeError: A field is not a :class:`torch.Tensor`.
            ValueError: A field has no leading (example) dimension, the fields are on different
                devices, or the inputs and targets of a split disagree in the leading dimension
                (``support_x`` of 5 rows with ``support_y`` of 3).
        """
        prefix = f"{name}." if name else ""
        for field in ("support_x", "support_y", "query_x", "query_y"):
            value = getattr(self, field)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{prefix}{field} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() == 0:
                raise ValueError(
                    f"{prefix}{field} must have a leading dimension of examples, got a 0-dim tensor"
                )
        device = self.support_x.device
        for field in ("support_y", "query_x", "query_y"):
            if getattr(self, field).device != device:
                raise ValueError(
                    f"{prefix}support_x and {prefix}{field} must be on the same device, got {device} "
                    f"and {getattr(self, field).device}"
                )
        for split in ("support", "query"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{prefix}{split}_x and {prefix}{split}_y must have the same number of examples "
                    f"(first dimension), got {x.shape[0]} and {y.shape[0]} "
                    f"(shapes {tuple(x.shape)} and {tuple(y.shape)})"
                )

    def to(self, *args: Any, **kwargs: Any) -> "Task":
        """Return a copy with the tensors moved and cast as :meth:`torch.nn.Module.to` moves and
        casts a module's parameters and buffers.

        The device applies to every tensor; the dtype only to the floating-point and complex ones,
        so the integer class labels of a :class:`~samgria.FewShotSampler` task stay ``torch.long``
        (``task.to(torch.float64)`` casts the inputs, and ``cross_entropy`` still takes the
        labels); ``memory_format`` applies to the 4-D and 5-D tensors (the images of a task, not
        its labels). Tensors already as asked are handed on themselves, as :meth:`torch.Tensor.to`
        does, unless ``copy=True``.

        It takes what :meth:`torch.nn.Module.to` takes, and ``copy`` as :meth:`torch.Tensor.to`
        does::

            to(device=None, dtype=None, non_blocking=False, *, copy=False, memory_format=None)
            to(dtype, non_blocking=False, *, copy=False, memory_format=None)
            to(tensor, non_blocking=False, *, copy=False, memory_format=None)

        Raises:
            TypeError: The dtype is neither floating-point nor complex (``Module.to`` refuses it
                too: no tensor of a task would take it but its integer labels), ``copy`` is not a
                ``bool``, or torch refuses the arguments.
        """
        copy = check_bool("copy", kwargs.pop("copy", False))
        # Private torch API, here only: nn.Module.to parses its overloads with it, and taking the
        # same parser is what makes Task.to accept exactly what Module.to accepts.
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
            raise TypeError(
                "dtype must be a floating point or complex dtype (Task.to casts the floating-point "
                f"and complex tensors only, as nn.Module.to does), got {dtype}"
            )

        def convert(tensor: torch.Tensor) -> torch.Tensor:
            cast = dtype if tensor.is_floating_point() or tensor.is_complex() else None
            if memory_format is not None and tensor.dim() in (4, 5):
                return tensor.to(device, cast, non_blocking, copy, memory_format=memory_format)
            return tensor.to(device, cast, non_blocking, copy)

        return Task(*(convert(getattr(self, field)) for field in ("support_x", "support_y", "query_x", "query_y")))


@runtime_checkable
class TaskSampler(Protocol):
    """Anything with ``sample(n) -> list[Task]`` that draws ``n`` tasks from p(T).

    Two optional methods, which the samplers of :mod:`samgria.data` have, are used where present
    (they are not part of the protocol, so ``isinstance`` checks only ``sample``):

    * ``sample_shard(n, rank, world_size) -> list[Task]``: the tasks of rank ``rank``'s
      contiguous share (:func:`samgria.data.sharding.shard_bounds`) of the global batch that
      ``sample(n)`` would draw, advancing the random stream exactly as ``sample(n)`` does.
      Without it, :class:`~samgria.DistributedTaskSampler` calls ``sample(n)`` and slices.
    * ``state_dict()`` / ``load_state_dict(state)``: the position in the random stream, which
      :meth:`samgria.MetaTrainer.state_dict` checkpoints. Without them a sampler's
      ``generator`` attribute, when it is a :class:`torch.Generator`, is saved instead.
    """

    def sample(self, n: int) -> list[Task]:
        """Return ``n`` freshly sampled tasks."""
        ...


def _cpu_random_state(name: str, state: Any) -> torch.Tensor:
    """``state`` as :meth:`torch.Generator.set_state` and :func:`torch.set_rng_state` take it: a
    contiguous ``uint8`` tensor on the CPU.

    A checkpoint read with ``torch.load(path, map_location="cuda")`` holds its random states on
    the GPU, where torch refuses them ("RNG state must be a torch.ByteTensor"); they are moved
    back, as torch's optimizers take their loaded state to their parameters' device.

    Args:
        name: How the caller names ``state`` in a message (``"state_dict['rng']"``).
        state: A state from ``get_state()`` / :func:`torch.get_rng_state`, on any device.

    Raises:
        TypeError: ``state`` is not a 1-D ``torch.uint8`` tensor.
    """
    rule = "a random state (a 1-D torch.uint8 tensor)"
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{name} must be {rule}, got {type(state).__name__}")
    if state.dtype != torch.uint8:
        raise TypeError(f"{name} must be {rule}, got a tensor of dtype {state.dtype}")
    if state.dim() != 1:
        raise TypeError(f"{name} must be {rule}, got a tensor of shape {tuple(state.shape)}")
    return state.to("cpu").contiguous()


def generator_state_dict(generator: torch.Generator | None) -> dict[str, Any]:
    """A sampler's state: ``{"generator": generator.get_state()}`` (``None`` for torch's global one)."""
    return {"generator": None if generator is None else generator.get_state()}


def load_generator_state_dict(generator: torch.Generator | None, state: Any, owner: str) -> None:
    """Restore a state from :func:`generator_state_dict` into ``generator``.

    The saved state may be on another device (``torch.load(map_location=...)``): it is moved
    to the CPU, where torch sets it from.

    Raises:
        TypeError: ``state`` is not a dict with a ``"generator"`` entry, or that entry is
            neither ``None`` nor a generator state (a 1-D ``torch.uint8`` tensor).
        ValueError: The state and the sampler disagree on having a generator of their own, or
            the sampler's generator refuses the state (one of another kind of generator, such as
            a CUDA generator's, or a corrupt one); the generator is then left as it was.
    """
    if not isinstance(state, dict) or "generator" not in state:
        raise TypeError(f"state must be a dict with a 'generator' entry (from {owner}.state_dict()), got {state!r}")
    saved = state["generator"]
    if (saved is None) != (generator is None):
        mine = "torch's global generator" if generator is None else "a generator of its own"
        raise ValueError(
            f"state['generator'] must match the sampler, which uses {mine}; got "
            f"{'None' if saved is None else 'a generator state'}"
        )
    if generator is not None:
        try:  # torch checks the state whole before it sets any of it
            generator.set_state(_cpu_random_state("state['generator']", saved))
        except RuntimeError as error:  # a state of another kind of generator, or a corrupt one
            raise ValueError(
                f"state['generator'] must be a state of the sampler's {generator.device.type} generator, got a "
                f"state torch refuses (torch: {error})"
            ) from None


class GeneratorStateMixin:
    """``state_dict``/``load_state_dict`` of a sampler whose randomness is its ``generator``."""

    generator: torch.Generator | None

    def state_dict(self) -> dict[str, Any]:
        """``{"generator": state}`` of the sampler's generator (``None`` with torch's global one)."""
        return generator_state_dict(self.generator)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the random stream from a :meth:`state_dict`.

        Raises:
            TypeError: ``state`` is not such a dict.
            ValueError: ``state`` and this sampler disagree on having a generator of their own,
                or its generator refuses the state (see :func:`load_generator_state_dict`).
        """
        load_generator_state_dict(self.generator, state, type(self).__name__)


def sampler_state_dict(sampler: Any) -> Any:
    """The state of any sampler: its ``state_dict()``, else its ``generator``'s, else ``None``."""
    own = getattr(sampler, "state_dict", None)
    if callable(own):
        return own()
    generator = getattr(sampler, "generator", None)
    if isinstance(generator, torch.Generator):
        return generator_state_dict(generator)
    return None


def load_sampler_state_dict(sampler: Any, state: Any) -> None:
    """Restore what :func:`sampler_state_dict` returned (``None``: nothing to restore).

    Raises:
        ValueError: ``state`` is not ``None`` but the sampler can restore nothing.
    """
    if state is None:
        return
    own = getattr(sampler, "load_state_dict", None)
    if callable(own):
        own(state)
        return
    generator = getattr(sampler, "generator", None)
    if isinstance(generator, torch.Generator):
        load_generator_state_dict(generator, state, type(sampler).__name__)
        return
    raise ValueError(
        f"sampler must have load_state_dict or a torch.Generator 'generator' to restore a saved state, "
        f"got {type(sampler).__name__}"
    )
