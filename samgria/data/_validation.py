"""Argument checks shared by the task samplers."""

from __future__ import annotations

import math

import torch

__all__ = ["check_int", "check_range", "make_generator"]


def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an ``int`` (not ``bool``) ``>= minimum``, else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_range(name: str, value: object) -> tuple[float, float]:
    """Return ``value`` as a ``(low, high)`` pair of finite floats with ``low <= high``."""
    try:
        low, high = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low > high:
        raise ValueError(f"{name} must satisfy low <= high, got {value!r}")
    return low, high


def make_generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator | None:
    """Resolve the ``generator`` / ``seed`` pair of a sampler (at most one may be given)."""
    if generator is not None and seed is not None:
        raise ValueError(
            f"pass either generator or seed, not both (got generator={generator!r}, seed={seed!r})"
        )
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        return torch.Generator().manual_seed(seed)
    return None
