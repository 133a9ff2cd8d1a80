"""``samgria.functional.norms``: ``all_finite`` (the non-finite policy's check) and ``global_norm``,
fast path against the per-tensor reference and against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from samgria.functional import all_finite, global_norm

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 3, 2), (0,), (1,)]
    return [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("foreach", [True, False])
def test_all_finite_finds_every_non_finite_value_wherever_it_is(dtype, foreach):
    tensors = _tensors(dtype)
    assert all_finite(tensors, foreach=foreach)
    for index, tensor in enumerate(tensors):
        for position in range(tensor.numel()):
            for value in (math.inf, -math.inf, math.nan):
                poisoned = [t.clone() for t in tensors]
                poisoned[index].view(-1)[position] = value
                assert not all_finite(poisoned, foreach=foreach), (index, position, value)


def test_all_finite_takes_mixed_dtypes_views_and_empty_lists():
    base = torch.randn(6, 4, dtype=torch.float64)
    mixed = [base.t(), base[:, 1], torch.randn(3, dtype=torch.float16), torch.randn(2, dtype=torch.bfloat16)]
    for foreach in (True, False):
        assert all_finite([], foreach=foreach)
        assert all_finite(mixed, foreach=foreach)
        base[4, 1] = math.nan  # seen through the transposed view and the column view alike
        assert not all_finite(mixed[:1], foreach=foreach)
        assert not all_finite(mixed[1:2], foreach=foreach)
        base[4, 1] = 0.0


def test_all_finite_leaves_every_value_bit_for_bit():
    """Denormals (also under flush-to-zero mode) and NaN payloads are not touched, in every dtype."""
    tensors = [
        torch.tensor([1e-40, 1.0, -0.0]),
        torch.zeros(100),
        torch.tensor([5e-324], dtype=torch.float64),
        torch.zeros(40, dtype=torch.bfloat16),
        torch.zeros(40, dtype=torch.float16),
    ]
    tensors[1].view(torch.int32)[[0, 37, 99]] = torch.tensor([0x7FC00123, 0x7F800001, -0x3FFFFF], dtype=torch.int32)
    tensors[3].view(torch.int16)[[0, 17]] = torch.tensor([0x7FC1, 0x7F81], dtype=torch.int16)  # NaNs
    tensors[4].view(torch.int16)[[0, 17]] = torch.tensor([0x7C01, -0x1FF], dtype=torch.int16)  # NaNs
    bits = [t.clone() for t in tensors]
    flushing = torch.set_flush_denormal(True)
    try:
        for tensor in tensors[1], tensors[3], tensors[4]:
            assert not all_finite([tensors[0], tensor, tensors[2]])
        assert all_finite([tensors[0], tensors[2]])
    finally:
        if flushing:
            torch.set_flush_denormal(False)
    for tensor, before in zip(tensors, bits):
        assert torch.equal(tensor.view(torch.uint8), before.view(torch.uint8))


def test_all_finite_checks_what_the_fused_kernel_refuses_one_by_one():
    """A gradient whose elements share memory (an expanded tensor) cannot be written to."""
    shared = torch.ones(1).expand(6)
    assert all_finite([torch.ones(3), shared])
    assert not all_finite([torch.ones(3), torch.full((1,), math.inf).expand(6)])
    assert not all_finite([torch.tensor([math.nan, 1.0]), shared])


def test_all_finite_does_not_depend_on_the_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert all_finite([torch.ones(3), torch.ones(2, dtype=torch.float32)])
        assert not all_finite([torch.tensor([1.0, math.inf])])
    finally:
        torch.set_default_dtype(previous)


def test_all_finite_rejects_a_like_of_another_length():
    with pytest.raises(ValueError, match="like must have one tensor per tensor, got 1 for 2"):
        all_finite([torch.ones(2), torch.ones(3)], like=[torch.ones(2)])


@pytest.mark.parametrize("foreach", [True, False])
def test_global_norm_equals_the_norm_of_all_elements_in_float64(foreach):
    tensors = _tensors(torch.float32) + [torch.randn(4, dtype=torch.float64)]
    expected = torch.cat([t.double().reshape(-1) for t in tensors]).norm()
    norm = global_norm(tensors, foreach=foreach)
    assert norm.dtype == torch.float64
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    assert global_norm([], foreach=foreach) == 0
