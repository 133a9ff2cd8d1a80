"""Argument checks shared by the task samplers.

Counts and seeds go through :func:`samgria._checks.check_int`, so they accept any integer
(Python ``int`` or a NumPy integer such as ``np.int64(5)``), refuse ``bool`` and floats, and
fail with the project's message shape ``"{name} must be {rule}, got {value!r}"``.
"""

from __future__ import annotations

import math

import torch

from samgria._checks import check_int as _check_integer

__all__ = ["check_int", "check_range", "make_generator"]


def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as a Python ``int`` if it is an integer ``>= minimum``, else raise.

    Python and NumPy integers are accepted; ``bool`` and floats are not.

    Raises:
        TypeError: ``value`` is not an integer (``"{name} must be an integer >= {minimum}, got ..."``).
        ValueError: ``value`` is below ``minimum`` (same message).
    """
    return _check_integer(name, value, low=minimum)


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
    """Resolve the ``generator`` / ``seed`` pair of a sampler (at most one may be given).

    ``seed`` may be a Python or NumPy integer (not a ``bool`` or a float).
    """
    if generator is not None and seed is not None:
        raise ValueError(
            f"pass either generator or seed, not both (got generator={generator!r}, seed={seed!r})"
        )
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    if seed is not None:
        return torch.Generator().manual_seed(_check_integer("seed", seed))
    return None
