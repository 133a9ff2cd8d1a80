"""Checks a benchmark makes before it publishes a number: a printed correctness figure must be able
to fail the run, and a timed row must have taken real steps (a skipped step is cheaper than a step).
Also the ``argparse`` types of the scripts' counts and budgets, so that a nonsense value (a negative
count, zero rounds) is refused when the arguments are parsed, naming the option and the value,
instead of crashing after minutes of measuring or silently measuring nothing."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable

import torch


class BenchmarkCheckError(RuntimeError):
    """A benchmark's correctness check failed: its timings and ratios are not published."""


def require_close(what: str, difference: float, tolerance: float) -> None:
    """Fail the run unless ``difference`` is finite and at most ``tolerance``.

    Args:
        what: The check, as the message names it (which paths, which quantity).
        difference: The measured difference (e.g. a max absolute difference of two gradients).
        tolerance: The largest ``difference`` accepted, finite and ``>= 0``.

    Raises:
        BenchmarkCheckError: ``difference`` is NaN, infinite or above ``tolerance``.
        ValueError: ``tolerance`` is negative or not finite.
    """
    if not (math.isfinite(difference) and difference <= tolerance):
        raise BenchmarkCheckError(
            f"check failed: {what} = {difference:.3e}, tolerance {tolerance:.3e}"
            + ("" if math.isfinite(difference) else " (not finite)")
        )
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r} (check: {what})")


def require_steps_taken(what: str, skipped_steps: int, weights: Iterable[torch.Tensor]) -> None:
    """Fail the run if a timed row skipped steps (a non-finite update, which samgria skips) or
    ended with non-finite weights: its time would not be the time of the step it names.

    Args:
        what: The row, as the message names it.
        skipped_steps: The row optimizer's ``skipped_steps`` (0 for an optimizer that never skips).
        weights: The row's weights after its timed steps.

    Raises:
        BenchmarkCheckError: ``skipped_steps`` is not 0, or a weight is not finite.
    """
    if skipped_steps:
        raise BenchmarkCheckError(f"check failed: {what} skipped {skipped_steps} step(s) (non-finite update)")
    require_finite(f"{what}: its weights after the timed steps", weights)


def require_finite(what: str, tensors: Iterable[torch.Tensor]) -> None:
    """Fail the run unless every entry of ``tensors`` is finite.

    Raises:
        BenchmarkCheckError: An entry is NaN or infinite.
    """
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise BenchmarkCheckError(f"check failed: {what}: not all finite")


def int_at_least(low: int) -> Callable[[str], int]:
    """An ``argparse`` type: an integer ``>= low``.

    A value that is not one is refused at parsing: ``argument --rounds: must be an integer >= 1,
    got 0``.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def zero_or_int_at_least(low: int) -> Callable[[str], int]:
    """An ``argparse`` type: 0 (the measurement is skipped) or an integer ``>= low`` (enough for
    what it reports, e.g. the steps after the warm-up ones that are not counted).

    A value that is neither is refused at parsing: ``argument --memory-steps: must be 0 or an
    integer >= 5, got 3``.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be 0 or an integer >= {low}, got {text!r}") from None
        if value != 0 and value < low:
            raise argparse.ArgumentTypeError(f"must be 0 or an integer >= {low}, got {value}")
        return value

    return parse


def number_in(low: float, high: float = math.inf) -> Callable[[str], float]:
    """An ``argparse`` type: a number in ``[low, high]`` (NaN is refused; ``inf`` only where
    ``high`` is infinite, e.g. a time budget that never runs out).

    A value that is not one is refused at parsing: ``argument --seconds: must be a number >= 0,
    got -1.0``.
    """
    rule = f"a number >= {low:g}" if high == math.inf else f"a number in [{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value!r}")
        return value

    return parse
