"""Argument checks: the one place that validates hyperparameters, with one message shape.

Every failed check raises with the message ``"{name} must be {rule}, got {value!r}"``:

* ``TypeError`` when the value is not of the expected kind (a ``bool`` is not a number);
* ``ValueError`` when it is of the right kind but outside the rule — NaN and ±inf included,
  so the same bad value gives the same exception type everywhere.

The rule in a message is always true of the accepted values (never "``>= 0``" for a check
that also refuses ``inf``).

:func:`check_loaded_tensor` checks a transform's per-parameter tensor in a checkpoint being
loaded (a ``ValueError`` naming the transform, slot, key and shapes or dtypes).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = [
    "check_real",
    "check_int",
    "check_seed",
    "check_bool",
    "check_choice",
    "check_like_default",
    "check_loaded_tensor",
    "has_internal_overlap",
]


def _fail_type(name: str, rule: str, value: Any) -> TypeError:
    return TypeError(f"{name} must be {rule}, got {value!r}")


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
    low_name: str | None = None,
) -> float:
    """Check a real hyperparameter and return it as a ``float``.

    Args:
        name: The argument's name as the user wrote it (``"rho"``, ``"param_groups[1]['rho']"``).
        value: The value to check (a Python or NumPy real, or a 0-dim real tensor's ``item()``).
        low: Lower bound, inclusive unless ``low_open``.
        high: Upper bound, inclusive unless ``high_open``.
        allow_inf: Accept ``±inf`` (still subject to the bounds).
        low_name: Name of the argument that ``low`` comes from, for the message
            (``"grad_max must be a finite number >= grad_min = 1, got 0.0"``).

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN, infinite (unless allowed), out of bounds, or beyond the range
            of a float (an integer such as ``10**400``).
    """
    rule = _real_rule(low, high, low_open, high_open, allow_inf)
    if low_name is not None and low is not None and high is None:
        rule = rule.replace(f" {_bound(low)}", f" {low_name} = {_bound(low)}", 1)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail_type(name, rule, value)
    try:
        number = float(value)
    except OverflowError:  # a huge integer (or Fraction): no float holds it
        raise ValueError(f"{name} must be {rule} that fits in a float, got {value!r}") from None
    bad = math.isnan(number) or (not allow_inf and math.isinf(number))
    if low is not None:
        bad = bad or (number <= low if low_open else number < low)
    if high is not None:
        bad = bad or (number >= high if high_open else number > high)
    if bad:
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return number


def _bound(value: float) -> str:
    """A bound as the message states it: short when exact, else every digit (never rounded)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def _real_rule(
    low: float | None, high: float | None, low_open: bool, high_open: bool, allow_inf: bool
) -> str:
    kind = "a real number" if allow_inf else "a finite number"
    if low is not None and high is not None:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        return f"{kind} in {left}{_bound(low)}, {_bound(high)}{right}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {_bound(low)}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {_bound(high)}"
    return kind


def check_int(
    name: str, value: Any, *, low: int | None = None, high: int | None = None, high_reason: str = ""
) -> int:
    """Check an integer hyperparameter (``bool`` refused, NumPy integers accepted).

    ``low`` and ``high`` are inclusive bounds; ``high_reason`` says where ``high`` comes from, in
    the rule (``" (a task's points are drawn as one tensor)"``). A non-integral number is of the
    wrong kind (``TypeError``), except NaN and ±inf, which raise ``ValueError`` as they do from
    every other check.
    """
    if low is not None and high is not None:
        rule = f"an integer in [{low}, {high}]"
    elif low is not None:
        rule = f"an integer >= {low}"
    elif high is not None:
        rule = f"an integer <= {high}"
    else:
        rule = "an integer"
    if high is not None:
        rule += high_reason
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        if not math.isfinite(float(value)):  # NaN and ±inf: a ValueError, as from every check
            raise ValueError(f"{name} must be {rule}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail_type(name, rule, value)
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return number


def check_seed(name: str, value: Any) -> int | None:
    """Check a random seed: ``None``, or an integer that ``torch.Generator.manual_seed`` takes,
    :math:`[-2^{63}, 2^{64} - 1]` (a negative seed counts modulo :math:`2^{64}`).

    Raises:
        TypeError: ``value`` is neither ``None`` nor an integer.
        ValueError: ``value`` is outside that range.
    """
    if value is None:
        return None
    number = check_int(name, value)
    if not -(2**63) <= number <= 2**64 - 1:
        raise ValueError(f"{name} must be an integer in [-2**63, 2**64 - 1], got {value!r}")
    return number


def check_bool(name: str, value: Any) -> bool:
    """Check a ``bool`` flag (a NumPy bool is one too, as a NumPy integer is an integer)."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    raise _fail_type(name, "a bool", value)


def check_optional_bool(name: str, value: Any) -> bool | None:
    """``None``, or ``value`` as a ``bool`` (a NumPy bool is one, as for :func:`check_bool`).

    Raises:
        TypeError: Anything else (``"vectorize must be None or a bool, got 'yes'"``).
    """
    if value is None:
        return None
    try:
        return check_bool(name, value)
    except TypeError:
        raise TypeError(f"{name} must be None or a bool, got {value!r}") from None


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> Any:
    """Check that ``value`` is one of ``choices`` and return it.

    A value of none of the choices' kinds (a ``str`` or a tensor where the choices are numbers, a
    number where they are names) is of the wrong kind; a number is any real but a ``bool``, so
    ``2.0`` and ``numpy.float64(2)`` are the choice ``2``.

    Raises:
        TypeError: ``value`` is of none of the choices' kinds (``"p must be one of 2, inf, got '2'"``).
        ValueError: ``value`` is of a choice's kind but none of the choices (NaN included).
    """
    rule = "one of " + ", ".join(repr(choice) for choice in choices)
    if not any(_same_kind(value, choice) for choice in choices):
        raise _fail_type(name, rule, value)
    if value not in choices:
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def _same_kind(value: Any, choice: Any) -> bool:
    """Whether ``value`` is of ``choice``'s kind: both ``None``, both ``bool``, both real numbers
    (``bool`` excluded), or ``value`` an instance of ``choice``'s type."""
    if choice is None or value is None:
        return value is choice
    if isinstance(choice, bool) or isinstance(value, bool):
        return isinstance(choice, bool) and isinstance(value, bool)
    if isinstance(choice, numbers.Real):
        return isinstance(value, numbers.Real)
    return isinstance(value, type(choice))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_torch_scalar(value: Any) -> bool:
    """A number every torch optimizer computes with: an ``int`` or ``float`` (not a ``bool``), a
    NumPy integer or float scalar of at most 64 bits (not an array), or a one-element real
    tensor."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    if type(value).__module__ == "numpy" and type(value).__name__ != "ndarray":
        dtype = getattr(value, "dtype", None)
        return getattr(dtype, "kind", None) in ("f", "i", "u") and getattr(dtype, "itemsize", 16) <= 8
    return False


def check_like_default(name: str, value: Any, default: Any) -> None:
    """Check a torch optimizer's param-group value against its default's kind, before a step
    that would otherwise fail half-way (torch's optimizers step the groups, and the tensors in a
    group, one after another, and use such a value only as they write).

    Where ``default`` is a real number, ``value`` must be an ``int`` or ``float``, a NumPy
    integer or float scalar (not an array), or a one-element real tensor; where it is a tuple
    with real numbers, a tuple or list as long, with such a number wherever the default has a
    real number. Any other default (a flag, ``None``, a string) accepts anything. A tensor passes
    on its element count alone: some of torch's code paths take none for some keys (NAdam's
    ``foreach`` path and tensor ``betas``), and refuse it only as they write.

    Raises:
        TypeError: ``value`` is not of ``default``'s kind (message as every check's).
    """
    number = "a real number (Python or a NumPy scalar) or a one-element real tensor"
    if _is_real(default):
        if not _is_torch_scalar(value):
            raise _fail_type(name, number, value)
    elif isinstance(default, tuple) and any(_is_real(entry) for entry in default):
        numbered = [i for i, entry in enumerate(default) if _is_real(entry)]
        rule = f"a sequence of {len(default)} with {number} at {', '.join(map(str, numbered))}"
        if not isinstance(value, (tuple, list)) or len(value) != len(default):
            raise _fail_type(name, rule, value)
        if any(not _is_torch_scalar(value[i]) for i in numbered):
            raise _fail_type(name, rule, value)


def check_loaded_tensor(owner: str, slot: str, key: str, value: Any, param: Any) -> None:
    """Check a per-parameter tensor of a checkpoint's slot against its parameter, before the load commits.

    It must be a tensor of the parameter's shape, complex exactly when the parameter is (torch's
    ``load_state_dict`` has cast it to a floating parameter's dtype already, but leaves the dtype
    of a complex parameter's state as it was), and a ``DTensor`` exactly when the parameter is
    one (an in-memory checkpoint of sharded parameters loaded into unsharded ones).

    Args:
        owner: The transform's class name (``"EMA"``).
        slot: The slot's name (``"ema"``).
        key: The per-parameter key (``"average"``).

    Raises:
        ValueError: ``"the checkpoint's EMA slot 'ema' holds 'average' of shape (2, 3) for a
            parameter of shape (3, 2)"`` (or of dtype ``torch.float32`` for one of dtype
            ``torch.complex64``, or ``= [1.0]``, not a tensor, or as a DTensor for a
            parameter that is a plain tensor).
    """
    where = f"the checkpoint's {owner} slot {slot!r} holds {key!r}"
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where} = {value!r}, not a tensor, for a parameter of shape {tuple(param.shape)}")
    if value.shape != param.shape:
        raise ValueError(f"{where} of shape {tuple(value.shape)} for a parameter of shape {tuple(param.shape)}")
    # Imported here: samgria.functional imports this module.
    from samgria.functional._sharding import is_sharded

    if is_sharded(value) != is_sharded(param):
        held, wanted = ("a DTensor", "a plain tensor") if is_sharded(value) else ("a plain tensor", "a DTensor")
        raise ValueError(
            f"{where} as {held} for a parameter that is {wanted} (a checkpoint moves between "
            "sharded and unsharded parameters through torch.distributed.checkpoint's dcp.save and "
            "dcp.load)"
        )
    if value.is_complex() != param.is_complex():
        raise ValueError(f"{where} of dtype {value.dtype} for a parameter of dtype {param.dtype}")


def has_internal_overlap(tensor: torch.Tensor) -> bool:
    """Whether some elements of ``tensor`` share memory (an ``expand`` view: stride 0 along a
    dimension of size > 1), so that torch refuses to write into it -- as it reaches it, after
    writing what came before."""
    # Private torch API, used here only: torch has no public way to ask whether a tensor's elements
    # overlap, which the in-place kernels and restore_state need to refuse such a target before
    # they write anything. 1 is MemOverlap::Yes, what torch's in-place ops refuse (2, "too hard to
    # tell", they let through). Only a strided tensor has elements at strides: a sparse one's
    # (which torch's kernels write like any other) has none to share, and CSR has no strides.
    if tensor.layout != torch.strided:
        return False
    return bool(torch._debug_has_internal_overlap(tensor) == 1)
