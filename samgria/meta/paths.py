"""Which path (loop, vmap, compiled) runs a meta-batch: one policy for every entry point.

A path is either asked for explicitly (``vectorize=True``/``False``, ``compile=True``), in which
case a failure raises, or chosen by the policy:

* a path that cannot apply (unequal task shapes, a second-order loop through BatchNorm,
  checkpointed steps under vmap) is never tried -- :func:`~samgria.meta.engine.vmap_blocker`
  says why;
* a path that raised an error other than ``ValueError`` once is given up for good, but only
  after the fallback path succeeded on the same input (otherwise the error was the user's, not
  the path's), with one warning;
* between paths that can all run, the policy can measure: the first ``trials`` uses of each
  (interleaved) are timed, and the fastest is used from then on. On 2 CPU cores the vmap path
  is several times faster than the loop for small models and slower for convolutional ones
  (see the benchmarks page), so no fixed rule is right for both. Measurements are kept per key
  (the trainer's: training or evaluation, meta-batch size, task shapes, inner steps, order) for
  the ``max_keys`` most recently used keys, so that variable task shapes do not make them grow.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

from samgria._checks import check_int
from samgria._frameworks import stacklevel_outside

__all__ = ["PathPolicy"]

T = TypeVar("T")


def _note_once(error: BaseException, note: str) -> None:
    """Add ``note`` to ``error``'s notes (Python 3.11+) unless it is there already (a path run
    inside another one's)."""
    if hasattr(error, "add_note") and note not in getattr(error, "__notes__", ()):
        error.add_note(note)


class PathPolicy:
    """Fallback after failures and choice by measurement, shared by a meta-optimizer's users.

    Measurements are kept for the ``max_keys`` most recently used keys; using a new key beyond
    them forgets the least recently used one (measured again if it comes back). A few fixed
    shapes (training and evaluation, say) are measured once and keep their choice. With more
    distinct keys in rotation than ``max_keys`` (variable-shot episodes, sizes drawn at random)
    a key is rarely seen ``trials`` times per candidate before it is forgotten, so such keys
    mostly run on the candidate measured first (the loop); the timings, like the checkpoints
    holding them, stay bounded: at most ``max_keys`` keys of at most ``trials`` durations per
    path.

    Args:
        owner: Name used in warnings (e.g. ``"MAML"``).
        trials: Timed uses of each candidate path before the choice is fixed.
        max_keys: Keys whose measurements are kept (the least recently used go first).

    Raises:
        TypeError: ``owner`` is not a ``str``, or ``trials`` or ``max_keys`` is not an integer.
        ValueError: ``trials`` or ``max_keys`` is below 1 (or NaN or infinite).

    Attributes:
        failed: ``{path: reason}`` of the paths given up after an error.
        timings: ``{key: {path: [seconds, ...]}}`` of the measured uses (the first ``trials`` of
            each path), least recently used key first.
    """

    #: The default, and what a policy pickled before ``max_keys`` existed (inside a
    #: meta-optimizer) keeps.
    max_keys: int = 32

    def __init__(self, owner: str, trials: int = 2, max_keys: int = max_keys) -> None:
        if not isinstance(owner, str):  # it names the optimizer in warnings and errors
            raise TypeError(f"owner must be a str, got {owner!r}")
        self.owner = owner
        self.trials = check_int("trials", trials, low=1)
        self.max_keys = check_int("max_keys", max_keys, low=1)
        self.failed: dict[str, str] = {}
        self.timings: dict[Hashable, dict[str, list[float]]] = {}

    def _measurements(self, key: Hashable) -> dict[str, list[float]]:
        """The timings of ``key`` (created if new), made the most recently used; beyond
        ``max_keys`` keys the least recently used are forgotten."""
        times = self.timings.pop(key, None)
        self.timings[key] = times = {} if times is None else times
        while len(self.timings) > self.max_keys:
            del self.timings[next(iter(self.timings))]
        return times

    def usable(self, candidates: Sequence[str]) -> list[str]:
        """The candidates that have not failed."""
        return [c for c in candidates if c not in self.failed]

    def _left(self, candidates: Sequence[str]) -> list[str]:
        """The candidates :meth:`choose` picks among: those that have not failed, or the last
        one when all have.

        Raises:
            ValueError: ``candidates`` is empty.
        """
        if not candidates:
            raise ValueError(f"candidates must name at least one path, got {list(candidates)!r}")
        return self.usable(candidates) or list(candidates[-1:])

    def choose(self, key: Hashable, candidates: Sequence[str]) -> str:
        """The next path to use for ``key``: the least measured one, then the fastest (the last
        candidate when every one has failed).

        Raises:
            ValueError: ``candidates`` is empty.
        """
        usable = self._left(candidates)
        if len(usable) == 1:
            return usable[0]
        times = self._measurements(key)
        least = min(usable, key=lambda c: len(times.get(c, ())))
        if len(times.get(least, ())) < self.trials:
            return least
        return min(usable, key=lambda c: min(times[c]))

    def decided(self, key: Hashable, candidates: Sequence[str]) -> str | None:
        """The path :meth:`choose` settles on for ``key`` once measured (``None`` while
        measuring).

        Raises:
            ValueError: ``candidates`` is empty.
        """
        usable = self._left(candidates)
        if len(usable) == 1:
            return usable[0]
        times = self.timings.get(key, {})
        if all(len(times.get(c, ())) >= self.trials for c in usable):
            return min(usable, key=lambda c: min(times[c]))
        return None

    def timed(self, key: Hashable, path: str, run: Callable[[], T]) -> T:
        """Run ``run()`` and record its duration for ``key`` and ``path`` -- only the first
        ``trials`` uses, all the choice reads, for the ``max_keys`` most recently used keys, so
        that the timings (and the checkpoints holding them) do not grow with the length of the
        run, whatever the keys."""
        times = self._measurements(key).setdefault(path, [])
        if len(times) >= self.trials:
            return run()
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
        return result

    def run(
        self,
        path: str,
        fallback: str,
        run: Callable[[str], T],
        *,
        explicit: bool,
    ) -> tuple[T, str]:
        """Run ``run(path)``; if it fails (not with ``ValueError``), run ``run(fallback)``.

        Args:
            path: The path to try.
            fallback: The path that always applies (the loop).
            run: Does the work on a given path.
            explicit: The user asked for ``path``: its failure raises the error as raised (with
                a note naming the path, on Python 3.11+), not the fallback.

        Returns:
            ``(result, path_used)``.
        """
        if path == fallback:
            return run(path), path
        if path in self.failed:
            if explicit:
                raise RuntimeError(f"{self.owner}: the {path} path failed earlier ({self.failed[path]})")
            return run(fallback), fallback
        try:
            return run(path), path
        except ValueError:
            raise
        except Exception as error:  # maybe a model that this path cannot handle: try the fallback
            if explicit:  # the error as raised (an OutOfMemoryError stays one), saying where
                _note_once(error, f"{self.owner}: raised on the {path} path, which was asked for")
                raise
            result = run(fallback)
            # Only now, when the fallback worked, is the error the path's and not the user's.
            self.failed[path] = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"{self.owner}: the {path} path failed ({self.failed[path]}); this step ran on the "
                f"{fallback} path, and the {path} path is not tried again",
                RuntimeWarning,
                stacklevel=stacklevel_outside(),
            )
            return result, fallback

    def __repr__(self) -> str:
        return (
            f"PathPolicy(owner={self.owner!r}, failed={sorted(self.failed)}, trials={self.trials}, "
            f"max_keys={self.max_keys})"
        )

