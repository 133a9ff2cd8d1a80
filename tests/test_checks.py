"""The argument checks of ``samgria._checks``: one message shape, the right exception type."""

import math

import numpy as np
import pytest

from samgria._checks import check_int


@pytest.mark.parametrize(
    "kwargs, rule",
    [
        ({}, "an integer"),
        ({"low": 1}, "an integer >= 1"),
        ({"high": 5}, "an integer <= 5"),
        ({"low": 0, "high": 5}, r"an integer in \[0, 5\]"),
    ],
)
def test_check_int_states_its_rule_for_every_refusal(kwargs, rule):
    with pytest.raises(TypeError, match=rf"^n must be {rule}, got 1\.5$"):
        check_int("n", 1.5, **kwargs)
    with pytest.raises(TypeError, match=rf"^n must be {rule}, got True$"):
        check_int("n", True, **kwargs)
    with pytest.raises(ValueError, match=rf"^n must be {rule}, got nan$"):
        check_int("n", math.nan, **kwargs)


def test_check_int_bounds_are_inclusive():
    assert check_int("n", 0, low=0, high=5) == 0
    assert check_int("n", np.int64(5), low=0, high=5) == 5
    assert type(check_int("n", np.int64(5), high=5)) is int
    with pytest.raises(ValueError, match=r"^n must be an integer in \[0, 5\], got 6$"):
        check_int("n", 6, low=0, high=5)
    with pytest.raises(ValueError, match=r"^n must be an integer in \[0, 5\], got -1$"):
        check_int("n", -1, low=0, high=5)
    with pytest.raises(ValueError, match=rf"^n must be an integer <= 5, got {2**70}$"):
        check_int("n", 2**70, high=5)


def test_check_int_states_where_its_upper_bound_comes_from():
    with pytest.raises(ValueError, match=r"^n must be an integer in \[0, 5\] \(five at most\), got 6$"):
        check_int("n", 6, low=0, high=5, high_reason=" (five at most)")
    assert check_int("n", 5, low=0, high=5, high_reason=" (five at most)") == 5
