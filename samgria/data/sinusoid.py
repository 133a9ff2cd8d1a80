"""Few-shot sinusoid regression tasks (Finn et al., 2017)."""

from __future__ import annotations

import math

import torch

from samgria.data._validation import (
    check_device,
    check_int,
    check_range,
    check_span,
    finite_in,
    make_generator,
    most_elements,
)
from samgria.data.sharding import shard_bounds
from samgria.data.task import GeneratorStateMixin, Task

__all__ = ["SinusoidTaskSampler", "sinusoid"]

#: The dtypes a sampler draws its tasks in.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def sinusoid(x: torch.Tensor, amplitude: float | torch.Tensor, phase: float | torch.Tensor) -> torch.Tensor:
    r"""Evaluate the task function :math:`y = A \sin(x - \varphi)`.

    Args:
        x: Inputs of any shape.
        amplitude: :math:`A`, a number or a tensor broadcastable against ``x``.
        phase: :math:`\varphi`, a number or a tensor broadcastable against ``x``.

    Returns:
        ``amplitude * sin(x - phase)``.
    """
    return amplitude * torch.sin(x - phase)


class SinusoidTaskSampler(GeneratorStateMixin):
    r"""Sample few-shot sinusoid regression tasks, the MAML benchmark.

    Each task is a sine wave :math:`y = A \sin(x - \varphi)` with
    :math:`A \sim U(\text{amp\_range})`, :math:`\varphi \sim U(\text{phase\_range})`;
    the ``k_support`` support and ``k_query`` query inputs are drawn independently from
    :math:`U(\text{x\_range})`. Inputs and targets have shape ``(K, 1)``, ready for a
    ``Linear(1, ...)`` model. With the defaults this is the protocol of Finn et al.,
    "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks" (ICML 2017).

    Sampling is reproducible: pass ``seed`` (a private generator is created) or your own
    ``generator``; with neither, torch's global generator is used. Random numbers are drawn on
    the generator's device in ``dtype`` (in ``float32`` for a 16-bit ``dtype``, then rounded
    once), so one seed gives different task streams in ``float32`` and ``float64``; the tasks
    are then moved to ``device``.

    In ``DataLoader`` workers each worker holds a copy of the sampler with its generator in the
    same state, so with ``seed`` or ``generator`` every worker draws the same tasks; wrap it in
    :class:`~samgria.DistributedTaskSampler` with ``rank=info.id, world_size=info.num_workers``
    (``info = torch.utils.data.get_worker_info()``) for disjoint shares (see "Tasks and samplers"
    in the meta-learning guide).

    Args:
        amp_range: ``(low, high)`` range of the amplitude :math:`A`.
        phase_range: ``(low, high)`` range of the phase :math:`\varphi`.
        x_range: ``(low, high)`` range of the inputs.
        k_support: Number of support points per task (``>= 1``).
        k_query: Number of query points per task (``>= 0``). A task's ``k_support + k_query``
            points are drawn as one tensor, so they must fit in one: at most
            ``(2**63 - 1) // 4`` points in ``float32`` and 16-bit dtypes (drawn in ``float32``),
            ``(2**63 - 1) // 8`` in ``float64``.
        generator: Optional ``torch.Generator`` for reproducible sampling.
        seed: Convenience seed for a private generator; not together with ``generator``.
        device: Device of the sampled tensors, anything ``torch.device`` takes on a backend
            available here (default: the generator's device, or CPU).
        dtype: Dtype of the sampled tensors: ``torch.float16``, ``torch.bfloat16``,
            ``torch.float32`` or ``torch.float64`` (default: ``torch.get_default_dtype()``).

    Raises:
        TypeError: A count is not an int, a range is not a pair of numbers, ``dtype`` is not
            one of those four (an integer or a float8 dtype), ``generator`` is not a
            ``torch.Generator``, or ``device`` is not a device, a device string or an index.
        ValueError: A count is out of range (``k_support + k_query`` included), a range has ``low > high``, is not finite, lies
            beyond what ``dtype`` holds or is wider than it (as is ``x - phase``), a ``seed`` is
            beyond what ``torch.Generator`` takes, both ``generator`` and ``seed`` are given, or
            ``torch.device`` refuses ``device`` or its backend is not available here.
    """

    def __init__(
        self,
        amp_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        k_support: int = 10,
        k_query: int = 10,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if dtype is None:
            dtype = torch.get_default_dtype()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if dtype not in _DTYPES:  # float8: torch draws, adds and takes sines in none of them
            raise TypeError(
                f"dtype must be a floating torch.dtype torch computes a sine in (float16, bfloat16, float32 "
                f"or float64), got {dtype!r}"
            )
        self.dtype = dtype
        self.amp_range = check_range("amp_range", amp_range, dtype)
        self.phase_range = check_range("phase_range", phase_range, dtype)
        self.x_range = check_range("x_range", x_range, dtype)
        # The draws are low + (high - low) * u and the targets A sin(x - phase): both finite.
        draw_dtype = dtype if torch.finfo(dtype).bits >= 32 else torch.float32
        for name, value, bounds in (
            ("amp_range", amp_range, self.amp_range),
            ("phase_range", phase_range, self.phase_range),
            ("x_range", x_range, self.x_range),
        ):
            check_span(name, *bounds, value, draw_dtype)
        (x_low, x_high), (phase_low, phase_high) = self.x_range, self.phase_range
        if not (finite_in(x_low - phase_high, dtype) and finite_in(x_high - phase_low, dtype)):
            raise ValueError(
                f"x_range and phase_range must keep x - phase within +-{torch.finfo(dtype).max:g} (the "
                f"range of {dtype}), got x_range={x_range!r} and phase_range={phase_range!r}"
            )
        # 16-bit uniforms have 8 to 11 random bits: draw in float32 and round the result once.
        self._draw_dtype = draw_dtype
        # A task's points are one (k_support + k_query)-long row of the draw: what one tensor holds.
        most = most_elements(draw_dtype)
        points = (
            f" (a task's k_support + k_query points are drawn as one {draw_dtype} tensor, of at most "
            "2**63 - 1 bytes)"
        )
        self.k_support = check_int("k_support", k_support, 1, most, points)
        self.k_query = check_int("k_query", k_query, 0, most - self.k_support, points)
        self.generator = make_generator(generator, seed)
        self._draw_device = self.generator.device if self.generator is not None else torch.device("cpu")
        self.device = check_device("device", device) if device is not None else self._draw_device

    def _check_count(self, n: object) -> int:
        """``n`` as an int if the points of ``n`` tasks fit in one tensor of the draw, else raise."""
        points = self.k_support + self.k_query
        return check_int(
            "n", n, 0, most_elements(self._draw_dtype) // points,
            f" (the n * (k_support + k_query) = n * {points} points are drawn as one {self._draw_dtype} "
            "tensor, of at most 2**63 - 1 bytes)",
        )

    def _uniform(self, size: tuple[int, ...], bounds: tuple[float, float]) -> torch.Tensor:
        low, high = bounds
        u = torch.rand(size, generator=self.generator, device=self._draw_device, dtype=self._draw_dtype)
        return (low + (high - low) * u).to(device=self.device, dtype=self.dtype)

    def _draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The random numbers of ``n`` tasks: amplitudes ``(n,)``, phases ``(n,)``, inputs ``(n, K, 1)``."""
        amplitudes = self._uniform((n,), self.amp_range)
        phases = self._uniform((n,), self.phase_range)
        x = self._uniform((n, self.k_support + self.k_query, 1), self.x_range)
        return amplitudes, phases, x

    def _tasks(self, amplitudes: torch.Tensor, phases: torch.Tensor, x: torch.Tensor) -> list[Task]:
        n = amplitudes.shape[0]
        y = sinusoid(x, amplitudes.view(n, 1, 1), phases.view(n, 1, 1))
        ks = self.k_support
        return [Task(x[i, :ks], y[i, :ks], x[i, ks:], y[i, ks:]) for i in range(n)]

    def sample_with_params(self, n: int) -> tuple[list[Task], torch.Tensor, torch.Tensor]:
        """Draw ``n`` tasks and return them with their amplitudes and phases.

        Useful for plotting the true curve beside an adapted model's prediction
        (see :func:`sinusoid`).

        Args:
            n: Number of tasks (``>= 0``, and few enough that the ``n * (k_support + k_query)``
                points of the draw fit in one tensor).

        Returns:
            ``(tasks, amplitudes, phases)``: a list of ``n`` :class:`~samgria.data.Task` and two
            tensors of shape ``(n,)`` with each task's :math:`A` and :math:`\\varphi`.
        """
        n = self._check_count(n)
        amplitudes, phases, x = self._draw(n)
        return self._tasks(amplitudes, phases, x), amplitudes, phases

    def sample_shard(self, n: int, rank: int, world_size: int) -> list[Task]:
        """Rank ``rank``'s share of the ``n`` tasks :meth:`sample` would draw.

        The random numbers of all ``n`` tasks are drawn (the stream advances as for
        ``sample(n)``); only the share's targets are computed. Equal, bit for bit, to
        ``sample(n)[start:stop]`` with the bounds of
        :func:`~samgria.data.sharding.shard_bounds`.

        Args:
            n: Tasks in the global batch (``>= 0``).
            rank: This process's rank, in ``[0, world_size - 1]``.
            world_size: Number of processes (``>= 1``).
        """
        n = self._check_count(n)
        start, stop = shard_bounds(n, rank, world_size)
        amplitudes, phases, x = self._draw(n)
        return self._tasks(amplitudes[start:stop], phases[start:stop], x[start:stop])

    def sample(self, n: int) -> list[Task]:
        """Return ``n`` freshly sampled sinusoid tasks (``n >= 0``)."""
        return self.sample_with_params(n)[0]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(amp_range={self.amp_range}, phase_range={self.phase_range}, "
            f"x_range={self.x_range}, k_support={self.k_support}, k_query={self.k_query}, "
            f"device={self.device}, dtype={self.dtype})"
        )
