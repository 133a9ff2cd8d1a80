"""One meta-batch, several processes: disjoint, reproducible shares of a global task stream.

Every rank holds the same sampler with the same seed and draws the same *global* meta-batch of
:math:`B` tasks; rank :math:`r` of :math:`W` keeps the contiguous block
:math:`[s_r, s_{r+1})` with

.. math:: s_r = r \\lfloor B / W \\rfloor + \\min(r, B \\bmod W),

so the first :math:`B \\bmod W` ranks hold one task more (the split of
:func:`torch.tensor_split`). The shares are disjoint, cover the meta-batch, and together are
exactly what one process draws with the same seed: a distributed run sees the tasks a
single-process run sees.

A sampler may implement ``sample_shard(n, rank, world_size)`` to draw the random numbers of all
``n`` tasks (cheap) but build only its own share (:class:`~samgria.FewShotSampler` gathers the
examples of its share only); any other sampler is asked for ``sample(n)`` and sliced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from samgria._checks import check_int
from samgria.data.task import Task, TaskSampler, load_sampler_state_dict, sampler_state_dict
from samgria.data._validation import check_sampler

__all__ = ["DistributedTaskSampler", "sample_shard", "shard_bounds"]

T = TypeVar("T")


def check_shard(rank: Any, world_size: Any) -> tuple[int, int]:
    """Check a ``(rank, world_size)`` pair and return it as Python ints.

    Raises:
        TypeError: ``rank`` or ``world_size`` is not an integer.
        ValueError: ``world_size < 1`` or ``rank`` is not in ``[0, world_size - 1]``.
    """
    world_size = check_int("world_size", world_size, low=1)
    number = check_int("rank", rank, low=0)
    if number >= world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size - 1}] (world_size={world_size}), got {rank!r}")
    return number, world_size


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous share of ``n`` items (see the module docs).

    Args:
        n: Number of items in the global batch (``>= 0``).
        rank: This process's rank, in ``[0, world_size - 1]``.
        world_size: Number of processes (``>= 1``).

    Returns:
        The half-open bounds; ``stop - start`` is ``n // world_size`` or one more.
    """
    n = check_int("n", n, low=0)
    rank, world_size = check_shard(rank, world_size)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


#: The methods a sampler's ``sample_shard`` stands for: a subclass that overrides one of them
#: below the class that wrote ``sample_shard`` draws other tasks than that ``sample_shard``.
_DRAWING_METHODS = ("sample", "sample_with_params", "sample_with_classes")


def _own_sample_shard(sampler: TaskSampler) -> Any:
    """``sampler.sample_shard``, unless there is none or a subclass overrides how tasks are drawn
    (:data:`_DRAWING_METHODS`) below the class that defines it (a subclass of
    ``SinusoidTaskSampler`` that adds noise in ``sample``: the shares would be the parent's
    tasks)."""
    own = getattr(sampler, "sample_shard", None)
    if not callable(own):
        return None
    for cls in type(sampler).__mro__:
        if "sample_shard" in vars(cls):
            return own
        if any(name in vars(cls) for name in _DRAWING_METHODS):
            return None
    return own  # set on the instance


def _global_generator_name(sampler: Any) -> str | None:
    """How ``sampler.generator`` names torch's global generator (``"None"``, what samgria's samplers
    draw from without ``seed`` or ``generator``, or ``"torch.default_generator"`` and the CUDA ones
    given by hand), else ``None``: a generator of its own, or no ``generator`` attribute."""
    if not hasattr(sampler, "generator"):
        return None
    generator = sampler.generator
    if generator is None:
        return "None"
    if generator is torch.default_generator:
        return "torch.default_generator"
    for index, default in enumerate(torch.cuda.default_generators):  # () until CUDA is initialised
        if generator is default:
            return f"torch.cuda.default_generators[{index}]"
    return None


def sample_shard(sampler: TaskSampler, n: int, rank: int, world_size: int) -> list[Task]:
    """Draw a global batch of ``n`` tasks from ``sampler`` and return rank ``rank``'s share.

    Uses ``sampler.sample_shard(n, rank, world_size)`` when the sampler has it (and its class
    does not override ``sample``, ``sample_with_params`` or ``sample_with_classes`` below the
    class that wrote it), else ``sampler.sample(n)[start:stop]``. Either way the sampler's random
    stream advances as for ``sample(n)``.

    Raises:
        ValueError: The sampler returned the wrong number of tasks.
    """
    start, stop = shard_bounds(n, rank, world_size)
    own = _own_sample_shard(sampler)
    if own is not None:
        tasks = list(own(n, rank, world_size))
        if len(tasks) != stop - start:
            raise ValueError(
                f"sampler.sample_shard({n}, {rank}, {world_size}) returned {len(tasks)} tasks, "
                f"expected {stop - start}"
            )
        return tasks
    tasks = list(sampler.sample(n))
    if len(tasks) != n:
        raise ValueError(f"sampler.sample({n}) returned {len(tasks)} tasks")
    return tasks[start:stop]


class DistributedTaskSampler:
    """This rank's share of a global task stream: ``sample(n)`` returns its part of ``n`` tasks.

    The task-sampler counterpart of :class:`torch.utils.data.distributed.DistributedSampler`:
    wrap the same sampler, built with the same seed, on every rank. ``sample(n)`` draws the
    global meta-batch of ``n`` tasks and returns this rank's contiguous share (see
    :mod:`samgria.data.sharding`), so the shares of all ranks are disjoint and together are the
    tasks one process would draw. Shares differ by at most one task when ``n`` is not a
    multiple of the world size (a meta-optimizer with ``distributed=True`` weights each rank by
    its tasks, so the meta-update is still the mean over all ``n``).

    :class:`~samgria.MetaTrainer` wraps its sampler in one when its meta-optimizer is
    distributed; the closure API uses one directly.

    Args:
        sampler: The global task stream (anything with ``sample(n)``), seeded alike on every
            rank; one whose ``generator`` attribute is torch's global generator (``None``, as in
            samgria's samplers built without ``seed`` or ``generator``, or
            ``torch.default_generator`` itself) is refused for more than one rank.
        rank: This process's rank (default: ``torch.distributed.get_rank()``).
        world_size: Number of processes (default: ``torch.distributed.get_world_size()``).

    Raises:
        TypeError: ``sampler`` has no ``sample`` method, or ``rank``/``world_size`` is not an
            integer.
        ValueError: ``rank`` is out of range, ``rank``/``world_size`` is ``None`` without an
            initialised ``torch.distributed`` process group, ``sampler`` draws from torch's
            global generator and ``world_size > 1``, or ``sampler`` is itself a
            ``DistributedTaskSampler`` of more than one rank (shard its sampler once, with
            ``rank=rank * K + k`` and ``world_size=world_size * K`` for ``K`` shares of each
            rank's).
    """

    def __init__(self, sampler: TaskSampler, *, rank: int | None = None, world_size: int | None = None) -> None:
        check_sampler("sampler", sampler)
        if rank is None or world_size is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    "rank=None and world_size=None are read from torch.distributed, which has no "
                    f"initialised process group; pass both or call init_process_group first, got rank={rank!r}, "
                    f"world_size={world_size!r}"
                )
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        rank, world_size = check_shard(rank, world_size)
        if isinstance(sampler, DistributedTaskSampler) and sampler.world_size > 1:
            raise ValueError(
                f"sampler must not be a DistributedTaskSampler of several ranks (rank {sampler.rank} of "
                f"{sampler.world_size}), whose sample(n) returns a share of n tasks, got {sampler!r}; wrap its "
                "sampler once, with rank=rank * K + k and world_size=world_size * K for K shares of each "
                "rank's (k: the share's index, e.g. a DataLoader worker's id)"
            )
        global_name = _global_generator_name(sampler)
        if world_size > 1 and global_name is not None:
            raise ValueError(
                f"sampler must draw from a generator of its own when it is shared by {world_size} ranks, got "
                f"a {type(sampler).__name__} that draws from torch's global generator "
                f"(generator={global_name}): the ranks' global random streams drift apart (dropout, say, "
                "draws as many numbers as a rank has tasks), and each rank would take its share of another "
                "batch; give it seed=... (the same on every rank) or a generator=... of its own"
            )
        self.sampler = sampler
        self.rank: int = rank
        self.world_size: int = world_size

    def bounds(self, n: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's share of ``n`` items (:func:`shard_bounds`)."""
        return shard_bounds(n, self.rank, self.world_size)

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of ``items`` (e.g. held-out tasks, the same list on every rank).

        Raises:
            TypeError: ``items`` is not a sequence (or another iterable).
        """
        if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
            raise TypeError(f"items must be a sequence, got {type(items).__name__}")
        items = list(items)
        start, stop = self.bounds(len(items))
        return items[start:stop]

    def sample(self, n: int) -> list[Task]:
        """Draw the global meta-batch of ``n`` tasks (``n >= 0``) and return this rank's share."""
        return sample_shard(self.sampler, n, self.rank, self.world_size)

    def state_dict(self) -> dict[str, Any] | None:
        """The wrapped sampler's state (see :func:`samgria.data.task.sampler_state_dict`)."""
        return sampler_state_dict(self.sampler)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the wrapped sampler's state from :meth:`state_dict`."""
        load_sampler_state_dict(self.sampler, state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sampler!r}, rank={self.rank}, world_size={self.world_size})"
