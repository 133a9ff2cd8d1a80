"""N-way K-shot classification tasks drawn from any labelled tensor data set."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from samgria._checks import check_bool
from samgria._checks import check_int as check_integer
from samgria.data._validation import check_device, check_int, make_generator
from samgria.data.sharding import shard_bounds
from samgria.data.task import GeneratorStateMixin, Task

__all__ = ["FewShotSampler"]


class FewShotSampler(GeneratorStateMixin):
    r"""Sample N-way K-shot classification tasks from a labelled tensor data set.

    A task draws ``n_way`` distinct classes uniformly at random, then ``k_shot + k_query``
    distinct examples of each class (without replacement); ``k_shot`` of them form the support
    set and ``k_query`` the query set. Labels are remapped per task to ``0 .. n_way - 1`` in
    the random order the classes were drawn, so a model cannot memorise class identities
    (Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016; the protocol
    of Finn et al., 2017). Within each split the examples are shuffled.

    Task tensors: ``support_x`` has shape ``(n_way * k_shot, *inputs.shape[1:])`` and
    ``support_y`` shape ``(n_way * k_shot,)`` with dtype ``torch.long``; likewise the query
    split with ``k_query``.

    In ``DataLoader`` workers each worker holds a copy of the sampler with its generator in the
    same state, so with ``seed`` or ``generator`` every worker draws the same tasks; wrap it in
    :class:`~samgria.DistributedTaskSampler` with ``rank=info.id, world_size=info.num_workers``
    (``info = torch.utils.data.get_worker_info()``) for disjoint shares (see "Tasks and samplers"
    in the meta-learning guide).

    Args:
        inputs: Tensor of examples, first dimension indexes examples.
        labels: 1-D integer tensor of class labels, one per example.
        n_way: Classes per task (``>= 1``).
        k_shot: Support examples per class (``>= 1``).
        k_query: Query examples per class (``>= 0``).
        classes: Optional subset of distinct class labels to draw from (e.g. the meta-training
            classes of a class split); default all classes present in ``labels``.
        drop_small_classes: If ``False`` (default), a class with fewer than
            ``k_shot + k_query`` examples is an error; if ``True`` such classes are skipped
            with a warning.
        generator: Optional ``torch.Generator`` (on the CPU) for reproducible sampling.
        seed: Convenience seed for a private generator; not together with ``generator``.
        device: Device to move each task's tensors to, anything ``torch.device`` takes on a
            backend available here (default: where ``inputs`` live).

    Raises:
        TypeError: ``inputs``/``labels`` are not tensors, ``labels`` is not an integer tensor,
            ``classes`` is not a sequence (or 1-D tensor or array) of integers,
            ``drop_small_classes`` is not a ``bool``, a count is not an int, ``generator`` is not
            a ``torch.Generator``, or ``device`` is not a device, a device string or an index.
        ValueError: ``labels`` is not 1-D or its length differs from ``inputs``, ``classes`` is a
            tensor or array that is not 1-D or repeats a label, a count is out of range,
            ``classes`` names a label that does not occur, a class has too few examples, fewer
            than ``n_way`` classes are usable, a usable label does not fit in ``torch.long``,
            ``seed`` is beyond what ``torch.Generator`` takes, both ``generator`` and ``seed``
            are given, ``generator`` is not on the CPU, or ``torch.device`` refuses ``device`` or
            its backend is not available here.

    Attributes:
        classes: 1-D tensor of the class labels tasks are drawn from.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        n_way: int,
        k_shot: int,
        k_query: int,
        *,
        classes: Sequence[int] | torch.Tensor | None = None,
        drop_small_classes: bool = False,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.dim() != 1:
            raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
        if inputs.dim() == 0 or inputs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"inputs and labels must have the same number of examples, got inputs of shape "
                f"{tuple(inputs.shape)} and labels of shape {tuple(labels.shape)}"
            )
        drop_small_classes = check_bool("drop_small_classes", drop_small_classes)
        self.n_way = check_int("n_way", n_way, 1)
        self.k_shot = check_int("k_shot", k_shot, 1)
        self.k_query = check_int("k_query", k_query, 0)
        self.generator = make_generator(generator, seed)
        if self.generator is not None and self.generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU generator, got one on {self.generator.device}")
        self.inputs = inputs
        self.labels = labels
        self.device = check_device("device", device) if device is not None else inputs.device

        labels_cpu = labels.detach().cpu()
        present, counts = torch.unique(labels_cpu, return_counts=True)
        count_of = dict(zip(present.tolist(), counts.tolist()))
        if classes is None:
            wanted = present.tolist()
        else:
            wanted = _class_labels(classes)
            seen: set[int] = set()
            for label in wanted:  # a class listed twice would still be drawn as one
                if label in seen:
                    raise ValueError(f"classes must hold distinct labels, got {label} more than once")
                seen.add(label)
            missing = sorted({c for c in wanted if c not in count_of})
            if missing:
                raise ValueError(f"classes contains labels that do not occur in labels: {missing}")
            wanted = sorted(wanted)

        per_task = self.k_shot + self.k_query
        small = [c for c in wanted if count_of[c] < per_task]
        if small:
            detail = ", ".join(f"{c} ({count_of[c]})" for c in small[:10])
            more = f" and {len(small) - 10} more" if len(small) > 10 else ""
            message = (
                f"{len(small)} class(es) have fewer than k_shot + k_query = {per_task} examples: "
                f"{detail}{more}"
            )
            if not drop_small_classes:
                raise ValueError(message + "; pass drop_small_classes=True to skip them")
            warnings.warn(message + "; they are skipped", stacklevel=2)
            wanted = [c for c in wanted if count_of[c] >= per_task]
        if len(wanted) < self.n_way:
            raise ValueError(
                f"n_way must be <= the number of usable classes ({len(wanted)}), got {self.n_way}"
            )
        too_large = [c for c in wanted if not -(2**63) <= c < 2**63]
        if too_large:  # (uint64 labels) sample_with_classes returns them as torch.long
            raise ValueError(f"labels must fit in torch.long (below 2**63), got {too_large[0]}")
        self.classes = torch.tensor(wanted, dtype=torch.long, device="cpu")
        # Example indices of each usable class, on the CPU (indices are drawn there).
        self._indices = [torch.nonzero(labels_cpu == c).flatten() for c in wanted]

    def _draw(self, count: int) -> torch.Tensor:
        return torch.randperm(count, generator=self.generator, device="cpu")

    def _draw_task(self) -> tuple[torch.Tensor, ...]:
        """Draw one task's random numbers: the chosen class positions and, per split, the
        example indices (into ``inputs``) and the remapped labels, shuffled."""
        chosen = self._draw(len(self._indices))[: self.n_way]
        support_idx, query_idx = [], []
        for position in chosen.tolist():
            pool = self._indices[position]
            picked = pool[self._draw(pool.numel())[: self.k_shot + self.k_query]]
            support_idx.append(picked[: self.k_shot])
            query_idx.append(picked[self.k_shot :])
        support_index, support_labels = self._shuffled(torch.cat(support_idx), self.k_shot)
        query_index, query_labels = self._shuffled(torch.cat(query_idx), self.k_query)
        return chosen, support_index, support_labels, query_index, query_labels

    def _shuffled(self, index: torch.Tensor, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Shuffle a class-major index together with its remapped labels."""
        remapped = torch.arange(self.n_way, device="cpu").repeat_interleave(per_class)
        order = self._draw(index.numel())
        return index[order], remapped[order]

    def _task(self, draw: tuple[torch.Tensor, ...]) -> Task:
        """Gather the examples of one drawn task (no random numbers are used here)."""
        _, support_index, support_labels, query_index, query_labels = draw
        return Task(
            self.inputs[support_index.to(self.inputs.device)].to(self.device),
            support_labels.to(self.device),
            self.inputs[query_index.to(self.inputs.device)].to(self.device),
            query_labels.to(self.device),
        )

    def sample_with_classes(self, n: int) -> tuple[list[Task], torch.Tensor]:
        """Draw ``n`` tasks and return them with their original class labels.

        Args:
            n: Number of tasks (``>= 0``).

        Returns:
            ``(tasks, classes)``: a list of ``n`` :class:`~samgria.data.Task` and a CPU long tensor
            of shape ``(n, n_way)`` whose row ``i``, column ``j`` is the original label that
            task ``i`` maps to label ``j``.
        """
        n = check_int("n", n, 0)
        draws = [self._draw_task() for _ in range(n)]
        tasks = [self._task(draw) for draw in draws]
        if not draws:
            return tasks, torch.empty(0, self.n_way, dtype=torch.long, device="cpu")
        return tasks, torch.stack([self.classes[draw[0]] for draw in draws])

    def sample(self, n: int) -> list[Task]:
        """Return ``n`` freshly sampled N-way K-shot tasks (``n >= 0``)."""
        return self.sample_with_classes(n)[0]

    def sample_shard(self, n: int, rank: int, world_size: int) -> list[Task]:
        """Rank ``rank``'s share of the ``n`` tasks :meth:`sample` would draw.

        The indices of all ``n`` tasks are drawn (the stream advances as for ``sample(n)``);
        only the share's examples are gathered and moved to ``device``. Equal, bit for bit, to
        ``sample(n)[start:stop]`` with the bounds of
        :func:`~samgria.data.sharding.shard_bounds`.

        Args:
            n: Tasks in the global batch (``>= 0``).
            rank: This process's rank, in ``[0, world_size - 1]``.
            world_size: Number of processes (``>= 1``).
        """
        n = check_int("n", n, 0)
        start, stop = shard_bounds(n, rank, world_size)
        draws = [self._draw_task() for _ in range(n)]
        return [self._task(draw) for draw in draws[start:stop]]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_way={self.n_way}, k_shot={self.k_shot}, "
            f"k_query={self.k_query}, classes={len(self.classes)}, examples={self.labels.numel()})"
        )


def _class_labels(classes: object) -> list[int]:
    """The labels of ``classes`` (an integer tensor or array, or a sequence of integers) as a list."""
    if not isinstance(classes, torch.Tensor) and hasattr(classes, "__array__"):  # a NumPy array
        classes = torch.as_tensor(classes)
    if isinstance(classes, torch.Tensor):
        if classes.dtype.is_floating_point or classes.dtype.is_complex or classes.dtype == torch.bool:
            raise TypeError(f"classes must hold integer labels, got a tensor of dtype {classes.dtype}")
        if classes.dim() != 1:  # a list of lists (or a bare label) is refused too
            raise ValueError(f"classes must be a 1-D tensor or array of labels, got one of shape {tuple(classes.shape)}")
        return classes.tolist()
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise TypeError(f"classes must be a sequence or tensor of integer labels, got {classes!r}")
    return [check_integer(f"classes[{i}]", _label(label)) for i, label in enumerate(classes)]


def _label(value: object) -> object:
    """A one-element integer tensor (``labels[i]``) as its Python int; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not (
        value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool
    ):
        return value.item()
    return value
