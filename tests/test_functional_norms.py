"""``samgria.functional.norms``: ``all_finite`` (the non-finite policy's check) and ``global_norm``,
fast path against the per-tensor reference and against values computed by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from samgria.functional import all_finite, global_norm
from samgria.functional.norms import scale_

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("exponent", [66, 100, -84, -120])
def test_global_norm_is_exact_where_float32_squares_overflow_or_underflow(dtype, exponent):
    """Four elements of 2**e have the norm 2**(e+1): float32 squares overflowed to inf above about
    1.8e19 and flushed to 0 below about 1e-23. Both paths give it, bit for bit."""
    value = 2.0**exponent
    if dtype.is_complex:  # two elements of 2**e (1 + 1j): the same squared norm
        tensors = [torch.full((2,), complex(value, value), dtype=dtype)]
    else:
        tensors = [torch.full((4,), value, dtype=dtype)]
    for foreach in (True, False):
        norm = global_norm(tensors, foreach=foreach)
        assert norm.dtype == torch.float64 and norm.item() == 2.0 ** (exponent + 1)


@pytest.mark.parametrize("foreach", [True, False])
def test_global_norm_of_huge_or_tiny_float32_values_among_others_equals_a_float64_norm(foreach):
    generator = torch.Generator().manual_seed(1)
    for scale in (1e20, 1e30, 1e-20, 1e-25, 1e-40):
        tensors = [
            torch.randn(4, 3, generator=generator).mul_(scale).t(),  # non-contiguous
            torch.randn(6, generator=generator).to(torch.bfloat16).mul_(scale),
            torch.randn(5, generator=generator, dtype=torch.float64).mul_(scale),
            torch.zeros(0),
        ]
        expected = torch.cat([t.double().reshape(-1) for t in tensors]).norm()
        norm = global_norm(tensors, foreach=foreach)
        assert math.isfinite(norm.item()) and norm.item() > 0, scale
        torch.testing.assert_close(norm, expected, rtol=1e-12, atol=0)
        assert torch.equal(norm, global_norm(tensors, foreach=not foreach))


def test_global_norm_of_tiny_values_in_a_huge_tensor_keeps_float32_precision():
    """1e5 elements of 1e-20: float32 squares are subnormal, and their sum lost five digits."""
    tensors = [torch.full((100_000,), 1e-20)]
    expected = math.sqrt(100_000) * torch.tensor(1e-20).item()
    for foreach in (True, False):
        assert global_norm(tensors, foreach=foreach).item() == pytest.approx(expected, rel=1e-12, abs=0)


def test_global_norm_is_infinite_or_nan_only_where_an_element_is():
    for foreach in (True, False):
        assert global_norm([torch.ones(3), torch.tensor([1e20, math.inf])], foreach=foreach).item() == math.inf
        assert math.isnan(global_norm([torch.full((3,), 1e30), torch.tensor([1.0, math.nan])], foreach=foreach).item())
        assert global_norm([torch.zeros(3), torch.zeros(2, 2)], foreach=foreach).item() == 0.0
        # float64 squares beyond float64's range: the norm is finite while it is
        huge = [torch.full((2,), 1e200, dtype=torch.float64)]
        assert global_norm(huge, foreach=foreach).item() == math.hypot(1e200, 1e200)
        assert global_norm([torch.full((4,), 1e308, dtype=torch.float64)], foreach=foreach).item() == math.inf
        huge = [torch.full((2,), complex(1e200, 1e200), dtype=torch.complex128)]
        assert global_norm(huge, foreach=foreach).item() == 2e200
        assert global_norm([torch.tensor([1e300, math.inf], dtype=torch.float64)], foreach=foreach).item() == math.inf
        assert math.isnan(global_norm([torch.tensor([1e300, math.nan], dtype=torch.float64)], foreach=foreach).item())
        assert math.isnan(global_norm([torch.tensor([1e-300, math.nan], dtype=torch.float64)], foreach=foreach).item())


def _float64_cases(dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    """Lists whose float64 squares overflow or underflow, in each tensor or only once combined."""
    generator = torch.Generator().manual_seed(3)

    def full(count: int, value: float, kind: torch.dtype = dtype) -> torch.Tensor:
        return torch.full((count,), complex(value, value / 2) if kind.is_complex else value, dtype=kind)

    def drawn(scale: float) -> list[torch.Tensor]:
        def draw(*shape: int) -> torch.Tensor:
            real, imaginary = (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale for _ in "ri")
            return torch.complex(real, imaginary) if dtype.is_complex else real

        return [draw(4, 3).t(), draw(5, 6)[:, 2]]  # non-contiguous

    return {
        "huge elements": [full(4, 1e200)],
        "tiny elements": [full(4, 1e-200)],
        "elements whose squares are subnormal": [full(8, 1e-160)],
        "subnormal elements": [full(9, 5e-324)],
        "huge norms": [full(1, 1e200), full(1, 3e200), full(0, 0.0)],
        "tiny norms": [full(1, 1e-170), full(1, 3e-170), full(3, 0.0)],
        "tiny norms of every width": [full(1, 1e-170), full(3, 1e-30, torch.float32), full(2, 1e-20, torch.bfloat16)],
        "huge float64 and float32 norms": [full(2, 1e300), full(3, 1e30, torch.float32)],
        "huge drawn values": drawn(1e250),
        "tiny drawn values": drawn(1e-300),
        "tiny and huge": [full(3, 1e-300), full(2, 1e300)],
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_global_norm_is_exact_where_float64_squares_overflow_or_underflow(dtype):
    """``[1e200] * 4`` gave inf, ``[1e-200] * 4`` gave 0 and ``[1e-160] * 8`` erred by 6e-6: the
    norm of every element, by ``math.hypot`` (scaled, and exact to an ulp), on both paths alike."""
    for case, tensors in _float64_cases(dtype).items():
        elements = [
            value
            for tensor in tensors
            for value in (torch.view_as_real(tensor) if tensor.is_complex() else tensor.double()).reshape(-1).tolist()
        ]
        norms = [global_norm(tensors, foreach=foreach) for foreach in (True, False)]
        assert torch.equal(norms[0], norms[1]), case
        assert norms[0].dtype == torch.float64
        assert norms[0].item() == pytest.approx(math.hypot(*elements), rel=1e-15, abs=0), case


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64])
def test_global_norm_of_each_dtype_equals_a_float64_loop_on_both_paths(dtype):
    generator = torch.Generator().manual_seed(2)
    real = torch.float32 if dtype.is_complex else dtype
    base = torch.randn(5, 6, generator=generator).to(real)
    tensors = [base.t(), base[:, 1], torch.randn(3, generator=generator).to(real), torch.zeros(0, dtype=real)]
    if dtype.is_complex:
        tensors = [torch.complex(t, t * 0.5) for t in tensors]
    total = 0.0
    for tensor in tensors:  # by hand, in float64
        for element in tensor.reshape(-1).tolist():
            total += abs(complex(element)) ** 2
    norms = [global_norm(tensors, foreach=foreach) for foreach in (True, False)]
    assert torch.equal(norms[0], norms[1])
    assert norms[0].item() == pytest.approx(math.sqrt(total), rel=1e-6, abs=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("foreach", [True, False])
def test_scale_with_shifts_computes_16_bit_tensors_in_float32_and_rounds_once(dtype, foreach):
    # s t + b in float32, rounded once to the dtype: not s t rounded to the dtype, then + b.
    generator = torch.Generator().manual_seed(3)
    tensors = [(torch.randn(shape, generator=generator) * 3).to(dtype) for shape in [(256,), (4, 8), (0,)]]
    scales, shifts = [1 / 3, -2.5, 7.0], [0.1, 1e-3, -4.0]
    expected = [(t.float() * s + b).to(dtype) for t, s, b in zip(tensors, scales, shifts)]
    twice = [(t * s + b) for t, s, b in zip(tensors, scales, shifts)]  # rounded after each operation
    assert any(not torch.equal(a, b) for a, b in zip(expected, twice))  # the case tells them apart
    scale_(tensors, scales, shifts, foreach=foreach)
    for got, want in zip(tensors, expected):
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()


def test_scale_rejects_scales_or_shifts_of_another_length():
    with pytest.raises(ValueError, match=r"^scales must have one entry per tensor, got 1 for 2$"):
        scale_([torch.ones(2), torch.ones(2)], [0.5])
    with pytest.raises(ValueError, match=r"^shifts must have one entry per tensor, got 3 for 2$"):
        scale_([torch.ones(2), torch.ones(2)], [0.5, 0.5], [0.0, 0.0, 0.0])



@pytest.mark.parametrize("foreach", [True, False])
def test_scale_checks_its_lists_flag_entries_and_dtypes_before_writing(foreach):
    """It checked only the lengths: a flag of another kind was taken as true or false, and a list
    that is not one, an entry that is not a tensor, an integer tensor (after the tensors before it
    were written) or a scale that is not a number failed in torch, naming none of them."""
    first = torch.ones(2, dtype=torch.float64)
    cases = [
        (r"^foreach must be a bool, got 'yes'$", lambda: scale_([first], [2.0], foreach="yes")),
        (r"^tensors must be a sequence of tensors, got a tensor of shape \(2,\)$", lambda: scale_(first, [2.0, 2.0], foreach=foreach)),
        (r"^scales must be a sequence of numbers, got 2.0$", lambda: scale_([first], 2.0, foreach=foreach)),  # type: ignore[arg-type]
        (r"^shifts must be a sequence of numbers, got 0.0$", lambda: scale_([first], [2.0], 0.0, foreach=foreach)),  # type: ignore[arg-type]
        (r"^tensors\[1\] must be a torch.Tensor, got 1.0$", lambda: scale_([first, 1.0], [2.0, 2.0], foreach=foreach)),  # type: ignore[list-item]
        (
            r"^tensors\[1\] must be a floating-point or complex tensor, got a torch.int64 tensor$",
            lambda: scale_([first, torch.ones(2, dtype=torch.int64)], [2.0, 0.5], foreach=foreach),
        ),
        (r"^scales\[0\] must be a real number or a 0-dim real tensor, got 'x'$", lambda: scale_([first], ["x"], foreach=foreach)),  # type: ignore[list-item]
        (r"^shifts\[0\] must be a real number or a 0-dim real tensor, got 'x'$", lambda: scale_([first], [2.0], ["x"], foreach=foreach)),  # type: ignore[list-item]
    ]
    for message, call in cases:
        with pytest.raises(TypeError, match=message):
            call()
        assert torch.equal(first, torch.ones(2, dtype=torch.float64)), message
    scale_((first,), (2.0,), (1.0,), foreach=foreach)  # tuples are sequences
    assert torch.equal(first, torch.full((2,), 3.0, dtype=torch.float64))

@pytest.mark.parametrize("foreach", [True, False])
def test_global_norm_names_an_integer_tensor_as_the_other_kernels_do(foreach):
    """torch's own message ("linalg.vector_norm: Expected a floating point or complex tensor")
    named no argument and no index."""
    with pytest.raises(TypeError, match=r"^tensors\[1\] must be a floating-point or complex tensor, got a torch.int64 tensor$"):
        global_norm([torch.ones(3), torch.ones(2, dtype=torch.int64)], foreach=foreach)


def test_global_norm_rejects_a_like_of_another_length():
    with pytest.raises(ValueError, match=r"^like must have one tensor per tensor, got 3 for 2$"):
        global_norm([torch.ones(2), torch.ones(3)], like=[torch.ones(2)] * 3)


def test_global_norm_takes_no_float64_norm_of_zero_tensors(monkeypatch):
    """A zero global norm is exact: the float64 recomputation skips tensors that are all zero
    (a frozen layer's gradients) and takes only the nonzero ones whose squares underflowed."""
    calls = []
    original = torch.linalg.vector_norm

    def counting(tensor, *args, **kwargs):
        if kwargs.get("dtype") in (torch.float64, torch.complex128):
            calls.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "vector_norm", counting)
    zeros = [torch.zeros(64, 64), torch.zeros(3)]
    assert global_norm(zeros).item() == 0.0 and calls == []
    tiny = torch.full((5,), 1e-25)
    assert global_norm(zeros + [tiny]).item() == pytest.approx(tiny.double().norm().item(), rel=1e-12, abs=0)
    assert calls == [(5,)]


def test_global_norm_without_exact_reads_nothing_on_the_host_and_keeps_float32s_range():
    assert global_norm([torch.full((4,), 1e20)], exact=False).item() == math.inf
    assert global_norm([torch.full((4,), 1e20)]).item() == torch.full((4,), 1e20).double().norm().item()
    compiled = torch.compile(lambda tensors: global_norm(tensors, exact=False), fullgraph=True, backend="eager")
    assert compiled([torch.full((4,), 2.0)]).item() == 4.0



@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "scale, dtype",
    [(1.0, torch.float32), (1e-30, torch.float32), (1e25, torch.float32), (1e-200, torch.float64), (1e200, torch.float64)],
)
def test_global_norm_of_tensors_that_require_grad_warns_nothing_and_keeps_their_gradient(scale, dtype, foreach):
    """Its host read (float(norm)) gave torch's "Converting a tensor with requires_grad=True to a
    scalar" warning; the norm it returns is differentiable: d‖w‖/dw = w / ‖w‖."""
    weights = (torch.tensor([3.0, 4.0], dtype=torch.float64) * scale).to(dtype).requires_grad_()
    frozen = torch.zeros(2, dtype=dtype, requires_grad=True)
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch gives that warning once per process otherwise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            norm = global_norm([weights, frozen], foreach=foreach)
    finally:
        torch.set_warn_always(warn_always)
    assert norm.requires_grad
    want = math.hypot(*weights.detach().double().tolist())
    assert math.isclose(norm.item(), want, rel_tol=1e-6)
    norm.backward()
    torch.testing.assert_close(weights.grad, torch.tensor([0.6, 0.8], dtype=dtype))
    assert torch.equal(frozen.grad, torch.zeros(2, dtype=dtype))


@pytest.mark.parametrize("foreach", [True, False])
def test_global_norm_and_all_finite_name_an_entry_that_is_not_a_tensor(foreach):
    """A number raised AttributeError ("'float' object has no attribute 'dtype'")."""
    with pytest.raises(TypeError, match=r"^tensors\[1\] must be a torch.Tensor, got 1.0$"):
        global_norm([torch.ones(2), 1.0], foreach=foreach)
    with pytest.raises(TypeError, match=r"^tensors\[0\] must be a torch.Tensor, got None$"):
        all_finite([None], foreach=foreach)
    with pytest.raises(TypeError, match=r"^like\[0\] must be a torch.Tensor, got 'w'$"):
        global_norm([torch.ones(2)], like=["w"], foreach=foreach)


@pytest.mark.parametrize("foreach", [True, False])
def test_global_norm_and_all_finite_refuse_a_tensor_or_a_non_sequence_for_the_list(foreach):
    """A tensor was taken as the list of its rows (a norm of per-row 0-dim tensors; a 0-dim one
    failed in len() naming nothing), None or a generator failed in len() naming nothing."""
    for value, shown in [(torch.ones(3, 3), r"a tensor of shape \(3, 3\)"), (torch.ones(()), r"a tensor of shape \(\)"),
                         (None, "None")]:
        with pytest.raises(TypeError, match=rf"^tensors must be a sequence of tensors, got {shown}$"):
            global_norm(value, foreach=foreach)
        with pytest.raises(TypeError, match=rf"^tensors must be a sequence of tensors, got {shown}$"):
            all_finite(value, foreach=foreach)
    with pytest.raises(TypeError, match=r"^like must be a sequence of tensors, got a tensor of shape \(2,\)$"):
        global_norm([torch.ones(2)], like=torch.ones(2), foreach=foreach)
    with pytest.raises(TypeError, match=r"^tensors must be a sequence of tensors, got <generator"):
        global_norm((t for t in [torch.ones(2)]), foreach=foreach)
    assert float(global_norm((torch.tensor([3.0]), torch.tensor([4.0])), foreach=foreach)) == 5.0  # a tuple is one


@pytest.mark.parametrize("name, value", [("foreach", "yes"), ("foreach", None), ("foreach", 1), ("exact", None), ("exact", "no")])
def test_global_norm_and_all_finite_refuse_flags_that_are_not_bools(name, value):
    """Any truthy value took the foreach path (or the exact recomputation), any falsy one the other."""
    tensors = [torch.ones(2), torch.ones(3)]
    with pytest.raises(TypeError, match=rf"^{name} must be a bool, got {value!r}$"):
        global_norm(tensors, **{name: value})
    if name == "foreach":
        with pytest.raises(TypeError, match=rf"^foreach must be a bool, got {value!r}$"):
            all_finite(tensors, foreach=value)


def test_global_norm_and_all_finite_take_numpy_bools():
    numpy = pytest.importorskip("numpy")
    tensors = [torch.tensor([3.0]), torch.tensor([4.0], dtype=torch.float64)]  # sqrt(9 + 16) = 5, exactly
    for flag in (numpy.bool_(True), numpy.bool_(False)):
        assert float(global_norm(tensors, foreach=flag, exact=flag)) == 5.0
        assert all_finite(tensors, foreach=flag)


@pytest.mark.parametrize("foreach", [True, False])
def test_scale_takes_numbers_numpy_scalars_and_0_dim_tensors_mixed_in_one_list(foreach):
    """A scale or shift may be a Python or NumPy number or a 0-dim real tensor, mixed in one list
    and within one device and dtype (torch's list kernels take numbers or tensors, not both: such
    a call goes tensor by tensor), and an integer beyond int64 is taken as the float it rounds to.
    Reference: s t + b in float64, exact for these values in every dtype."""
    np = pytest.importorskip("numpy")
    cases = [
        ([2.0, torch.tensor(0.5, dtype=torch.float64), np.float32(4.0), torch.tensor(2), 0.25], None),
        ([2.0, 0.5, 4.0, 1.0, 0.5], [1.0, torch.tensor(-2.0), np.int64(3), torch.tensor(0.5), 1.0]),  # among the shifts only
        ([2**70, 1.0, np.int32(2), 2**70, 1.0], [torch.tensor(1, dtype=torch.int64), 2**70, 0.0, 1.0, -(2**70)]),
    ]
    for scales, shifts in cases:
        tensors = [
            torch.arange(-3.0, 3.0),
            torch.arange(-2.0, 2.0),
            torch.arange(-2.0, 2.0, dtype=torch.float64),
            torch.arange(0.0, 3.0, dtype=torch.float64),
            torch.arange(-2.0, 2.0).bfloat16(),
        ]
        expected = [
            (t.double() * float(s) + (0.0 if shifts is None else float(shifts[i]))).to(t.dtype)
            for i, (t, s) in enumerate(zip(tensors, scales))
        ]
        scale_(tensors, scales, shifts, foreach=foreach)
        for got, want in zip(tensors, expected):
            assert got.dtype == want.dtype and torch.equal(got, want), (scales, shifts, got, want)
