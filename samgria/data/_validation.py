"""Argument checks shared by the task samplers.

Counts and seeds go through :func:`samgria._checks.check_int`, so they accept any integer
(Python ``int`` or a NumPy integer such as ``np.int64(5)``), refuse ``bool`` and floats, and
fail with the project's message shape ``"{name} must be {rule}, got {value!r}"``.
"""

from __future__ import annotations

import decimal
import numbers
from typing import cast

import torch

from samgria._checks import check_int as _check_integer
from samgria._checks import check_real, check_seed

__all__ = ["MOST_TENSOR_BYTES", "check_int", "most_elements", "check_range", "check_device", "check_sampler", "check_span", "finite_in", "make_generator"]


def check_int(name: str, value: object, minimum: int, maximum: int | None = None, reason: str = "") -> int:
    """Return ``value`` as a Python ``int`` if it is an integer ``>= minimum`` (and ``<= maximum``
    when given), else raise.

    Python and NumPy integers are accepted; ``bool`` and floats are not.

    Args:
        reason: Why ``maximum`` is the bound, for the message (``" (the points ...)"``).

    Raises:
        TypeError: ``value`` is not an integer (``"{name} must be an integer >= {minimum}, got ..."``).
        ValueError: ``value`` is below ``minimum`` (same message), or above ``maximum``
            (``"{name} must be an integer in [{minimum}, {maximum}]{reason}, got ..."``).
    """
    number = _check_integer(name, value, low=minimum)  # a wrong kind: the short rule
    if maximum is None:
        return number
    return _check_integer(name, value, low=minimum, high=maximum, high_reason=reason)


#: torch's bound on the bytes of one tensor's storage ("Storage size calculation overflowed").
MOST_TENSOR_BYTES = 2**63 - 1


def most_elements(dtype: torch.dtype) -> int:
    """The most elements of ``dtype`` one tensor holds (:data:`MOST_TENSOR_BYTES` of them)."""
    return MOST_TENSOR_BYTES // dtype.itemsize


def check_range(name: str, value: object, dtype: torch.dtype | None = None) -> tuple[float, float]:
    """Return ``value`` as a ``(low, high)`` pair of finite floats with ``low <= high``.

    Each bound is checked like a hyperparameter (:func:`samgria._checks.check_real`: a real
    number, not a ``bool`` or a string). With ``dtype``, both bounds must also be finite in it
    (``(-1e5, 1e5)`` is not a range of ``float16`` values).
    """
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a (low, high) pair of numbers, got {value!r}")
    try:
        bounds = list(value)  # type: ignore[call-overload]
    except TypeError:  # a 0-dim tensor or array: "iteration over a 0-d tensor"
        raise TypeError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if len(bounds) != 2:
        raise TypeError(f"{name} must be a (low, high) pair of numbers, got {value!r}")
    low, high = (check_real(f"{name}[{i}]", _plain_number(bound)) for i, bound in enumerate(bounds))
    if low > high:
        raise ValueError(f"{name} must satisfy low <= high, got {value!r}")
    if dtype is not None:
        largest = torch.finfo(dtype).max
        if max(abs(low), abs(high)) > largest:
            raise ValueError(f"{name} must lie within +-{largest:g} (the range of {dtype}), got {value!r}")
    return low, high


def finite_in(value: float, dtype: torch.dtype) -> bool:
    """Whether the float ``value`` rounds to a finite number of ``dtype``."""
    return bool(torch.isfinite(torch.tensor(value, dtype=torch.float64, device="cpu").to(dtype)))


def check_span(name: str, low: float, high: float, value: object, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` unless ``high - low`` is finite in ``dtype``: a uniform draw
    ``low + (high - low) * u`` computed in ``dtype`` would otherwise be infinite everywhere."""
    if not finite_in(high - low, dtype):
        raise ValueError(
            f"{name} must be at most {torch.finfo(dtype).max:g} wide (high - low is computed in {dtype}), "
            f"got {value!r}"
        )


def _plain_number(value: object) -> object:
    """A one-element real tensor as its Python number and a ``Decimal`` as a float (what a range
    given as ``torch.tensor([low, high])`` or in decimals holds); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not (value.dtype.is_complex or value.dtype == torch.bool):
        return value.item()
    if isinstance(value, decimal.Decimal):
        return float(value)
    return value


_DEVICE_RULE = "a torch.device, a device string such as 'cuda:0' or a device index"


def check_device(name: str, value: object) -> torch.device:
    """Return ``value`` as a ``torch.device``: what ``torch.device`` takes (a ``torch.device``, a
    string such as ``"cpu"`` or ``"cuda:0"``, or an accelerator index; a ``bool`` refused), on a
    backend that is available here (a CUDA device that exists, MPS where it is available), so a
    sampler is refused when it is made rather than when it first samples.

    Raises:
        TypeError: ``value`` is of none of those kinds (``"{name} must be {rule}, got {value!r}"``).
        ValueError: ``torch.device`` refuses the value (``"0.5"``, ``-1``, ``10**400``; torch's
            reason is added), or the device's backend or index is not available here.
    """
    if isinstance(value, torch.device):
        device = value
    elif isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise TypeError(f"{name} must be {_DEVICE_RULE}, got {value!r}")
    else:
        try:
            device = torch.device(value if isinstance(value, str) else int(value))
        except (RuntimeError, ValueError, TypeError) as error:
            raise ValueError(f"{name} must be {_DEVICE_RULE}, got {value!r} (torch: {error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} must be a device available here, got {value!r} (CUDA is not available)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name} must be a device available here, got {value!r} (there are {count} CUDA devices)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name} must be a device available here, got {value!r} (MPS is not available)")
    return device


def check_sampler(name: str, sampler: object) -> None:
    """Refuse anything but an object with a callable ``sample`` (a sampler class is not one)."""
    if isinstance(sampler, type) or not callable(getattr(sampler, "sample", None)):
        kind = f"the class {sampler.__name__}" if isinstance(sampler, type) else type(sampler).__name__
        raise TypeError(f"{name} must have a sample(n) -> list[Task] method, got {kind}")


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
        # check_seed returns an int for a seed that is not None
        return torch.Generator().manual_seed(cast(int, check_seed("seed", seed)))
    return None
