"""What the tests of ``samgria.functional`` share: the check that a kernel rounded once."""

from __future__ import annotations

import torch


def assert_rounded_once(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    """``got`` is ``exact`` (computed exactly in float64/complex128) rounded once to ``dtype``:
    bit for bit for real dtypes, close for complex ones (a complex product rounds its parts)."""
    assert got.dtype == dtype and got.shape == exact.shape
    if dtype.is_complex:
        torch.testing.assert_close(got, exact.to(dtype), rtol=2e-7, atol=0)
    else:
        assert torch.equal(got, exact.to(dtype))
