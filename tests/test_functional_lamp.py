"""``samgria.functional.lamp``: LAMP's kernels (noise, scaled updates, running sums, means), both
paths against a float64 loop written here, and their checks of bad lists, dtypes and counts."""

from __future__ import annotations

import re

import pytest
import torch

from functional_helpers import assert_rounded_once
from samgria.functional import accumulate_, add_scaled_, assign_mean_, magnitude_noise

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64]


def _values(dtype: torch.dtype, seed: int = 0, *, coarse: bool = False) -> list[torch.Tensor]:
    """A transposed view, a strided column, a contiguous tensor, a scalar and an empty tensor.

    ``coarse``: multiples of 1/64 in [-1, 1] (exact in every dtype, and any product with a float
    of at most 17 significant bits is exact in float32)."""
    generator = torch.Generator().manual_seed(seed)
    real = torch.float32 if dtype.is_complex else dtype

    def draw(*shape: int) -> torch.Tensor:
        def part() -> torch.Tensor:
            if coarse:
                return (torch.randint(-64, 65, shape, generator=generator) / 64).to(real)
            return torch.randn(shape, generator=generator).to(real)

        return torch.complex(part(), part()) if dtype.is_complex else part()

    tensors = [draw(4, 3).t(), draw(5, 6)[:, 2], draw(7), draw(), draw(0)]
    assert not tensors[0].is_contiguous() and not tensors[1].is_contiguous()
    return tensors


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


def _pairwise_product(draw, param):
    """``draw * param`` element by element, a complex number as a pair of reals (each component
    times its own factor), as torch.optim treats complex parameters."""
    if param.is_complex():
        return torch.view_as_complex(torch.view_as_real(draw) * torch.view_as_real(param))
    return draw * param


# -- values -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_noise_is_the_weights_times_uniform_draws_in_order_on_both_paths(dtype):
    params = _values(dtype)
    results = {}
    for foreach in (True, False):
        generator = torch.Generator().manual_seed(7)
        noise = magnitude_noise(params, lambda device: generator, foreach=foreach)
        replay = torch.Generator().manual_seed(7)  # the same draws, tensor by tensor, in order
        for sample, param in zip(noise, params):
            draw = torch.empty_like(param, memory_format=torch.preserve_format).uniform_(-1.0, 1.0, generator=replay)
            assert bool((draw.real.abs() <= 1).all())
            assert_rounded_once(sample, _pairwise_product(draw.to(_wide(dtype)), param.to(_wide(dtype))), dtype)
        results[foreach] = noise
    for fast, reference in zip(results[True], results[False]):
        assert torch.equal(fast, reference)
    assert magnitude_noise([], lambda device: None, foreach=True) == []
    assert magnitude_noise([], lambda device: None, foreach=False) == []


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_scaled_equals_w_plus_alpha_u_in_float64_on_both_paths(dtype):
    updates = _values(dtype, seed=1, coarse=True)
    results = {}
    for foreach in (True, False):
        params = _values(dtype, coarse=True)
        exact = [w.to(_wide(dtype)) + 0.375 * u.to(_wide(dtype)) for w, u in zip(params, updates)]
        add_scaled_(params, updates, 0.375, foreach=foreach)
        for got, want in zip(params, exact):
            assert_rounded_once(got, want, dtype)
        results[foreach] = params
    for fast, reference in zip(results[True], results[False]):
        assert torch.equal(fast, reference)
    add_scaled_([], [], 0.5, foreach=True)
    add_scaled_([], [], 0.5, foreach=False)


@pytest.mark.parametrize("update_dtype", ["same", torch.float32])
@pytest.mark.parametrize("dtype", [torch.float16])
@pytest.mark.parametrize("foreach", [True, False])
def test_add_scaled_takes_an_alpha_beyond_the_16_bit_range_and_rounds_once(dtype, update_dtype, foreach):
    """With an ``alpha`` beyond float16's range a float16 weight is computed in float32 and
    rounded once (``7e4`` overflowed as a scalar operand: "value cannot be converted to type
    c10::Half without overflow"). An ``alpha`` within range keeps torch's fast list kernel."""
    params = _values(dtype, coarse=True)
    update_dtype = dtype if update_dtype == "same" else update_dtype
    # multiples of 2**-16 in [-1/16, 1/16]: exact in every dtype, and 7e4 * u exact in float32
    updates = [(u / 1024).to(update_dtype) for u in _values(torch.float32, seed=1, coarse=True)]
    exact = [w.double() + 7e4 * u.double() for w, u in zip(params, updates)]
    add_scaled_(params, updates, 7e4, foreach=foreach)
    for got, want in zip(params, exact):
        assert_rounded_once(got, want, dtype)


def test_add_scaled_gives_the_same_bits_on_both_paths_for_16_bit_weights_among_others():
    def world():
        generator = torch.Generator().manual_seed(3)
        params = [torch.randn(5, generator=generator).to(dtype) for dtype in (torch.float16, torch.float32, torch.bfloat16)]
        updates = [torch.randn(5, generator=generator) for _ in params]
        return params, updates

    fast, updates = world()
    add_scaled_(fast, updates, 1e5 / 3, foreach=True)
    reference, updates = world()
    add_scaled_(reference, updates, 1e5 / 3, foreach=False)
    for got, want in zip(fast, reference):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_adds_the_weights_to_wider_or_equal_sums_on_both_paths(dtype):
    params = _values(dtype)
    sum_dtypes = [_wide(dtype), dtype, _wide(dtype), dtype, dtype]  # mixed within one weight dtype
    results = {}
    for foreach in (True, False):
        sums = [s.to(d) for s, d in zip(_values(dtype, seed=2), sum_dtypes)]
        exact = [s.to(_wide(dtype)) + w.to(_wide(dtype)) for s, w in zip(sums, params)]
        accumulate_(sums, params, foreach=foreach)
        for got, want, sum_dtype in zip(sums, exact, sum_dtypes):
            assert_rounded_once(got, want, sum_dtype)
        results[foreach] = sums
    for fast, reference in zip(results[True], results[False]):
        assert torch.equal(fast, reference)
    accumulate_([], [], foreach=True)
    accumulate_([], [], foreach=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_assign_mean_writes_the_sum_over_the_count_and_zeroes_the_sums_on_both_paths(dtype):
    counts = [3, 1, 7, 2, 5]
    results = {}
    for foreach in (True, False):
        params = _values(dtype)
        sums = [s.to(_wide(dtype)) * 3 for s in _values(dtype, seed=4)]  # wider sums, as LAMP may keep
        exact = [s / n for s, n in zip(sums, counts)]
        assign_mean_(params, sums, counts, foreach=foreach)
        for got, want, total in zip(params, exact, sums):
            assert_rounded_once(got, want, dtype)
            assert torch.equal(total, torch.zeros_like(total))
        results[foreach] = params
    for fast, reference in zip(results[True], results[False]):
        assert torch.equal(fast, reference)
    assign_mean_([], [], [], foreach=True)
    assign_mean_([], [], [], foreach=False)


# -- bad inputs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [True, False])
def test_every_lamp_kernel_rejects_lists_of_other_lengths_before_writing(foreach):
    two = [torch.ones(2), torch.ones(2)]
    one = [torch.ones(2)]
    with pytest.raises(ValueError, match=r"^updates must have one entry per parameter, got 1 for 2$"):
        add_scaled_(two, one, 0.5, foreach=foreach)
    with pytest.raises(ValueError, match=r"^params must have one entry per sum, got 1 for 2$"):
        accumulate_(two, one, foreach=foreach)
    with pytest.raises(ValueError, match=r"^params must have one entry per sum, got 2 for 1$"):
        accumulate_(one, two, foreach=foreach)
    with pytest.raises(ValueError, match=r"^sums must have one entry per parameter, got 1 for 2$"):
        assign_mean_(two, one, [1, 1], foreach=foreach)
    with pytest.raises(ValueError, match=r"^counts must have one entry per parameter, got 3 for 2$"):
        assign_mean_(two, [torch.ones(2), torch.ones(2)], [1, 1, 1], foreach=foreach)
    for tensor in two + one:
        assert torch.equal(tensor, torch.ones(2))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("other", [(4,), (1,), (3, 1)], ids=["longer", "broadcast", "reshaped"])
def test_every_lamp_kernel_rejects_a_tensor_of_another_shape_before_writing(other, foreach):
    """A longer sum wrote the first weight (and zeroed its sum on the reference path) before torch
    refused it; one that broadcasts was taken silently."""
    def world():
        params = [torch.zeros(3), torch.zeros(3, dtype=torch.float64), torch.zeros(3)]
        sums = [torch.full((3,), 2.0), torch.full((3,), 2.0, dtype=torch.float64), torch.full(other, 2.0)]
        return params, sums

    shape = re.escape(repr(other))
    params, sums = world()
    with pytest.raises(ValueError, match=rf"^sums\[2\] must have the shape of params\[2\], \(3,\), got {shape}$"):
        assign_mean_(params, sums, [2, 2, 2], foreach=foreach)
    with pytest.raises(ValueError, match=rf"^params\[2\] must have the shape of sums\[2\], {shape}, got \(3,\)$"):
        accumulate_(sums, params, foreach=foreach)
    with pytest.raises(ValueError, match=rf"^updates\[2\] must have the shape of params\[2\], \(3,\), got {shape}$"):
        add_scaled_(params, sums, 0.5, foreach=foreach)
    untouched_params, untouched_sums = world()
    for got, want in zip(params + sums, untouched_params + untouched_sums):
        assert torch.equal(got, want)  # nothing written


@pytest.mark.parametrize("foreach", [True, False])
def test_add_scaled_and_accumulate_refuse_a_tensor_on_another_device_before_writing(foreach):
    """An update or weight on another device ("meta" here, as a CPU one for CUDA weights) wrote the
    entries before it, then failed in torch or, for "meta", was taken silently. A 0-dim CPU
    tensor, which torch takes with a tensor on any device, stays allowed."""
    params = [torch.ones(3), torch.ones(3)]
    others = [torch.ones(3), torch.ones(3, device="meta")]
    device_rule = r", cpu \(or be a 0-dim CPU tensor\), got a tensor on meta$"
    with pytest.raises(ValueError, match=r"^updates\[1\] must be on the device of params\[1\]" + device_rule):
        add_scaled_(params, others, 0.5, foreach=foreach)
    with pytest.raises(ValueError, match=r"^params\[1\] must be on the device of sums\[1\]" + device_rule):
        accumulate_(params, others, foreach=foreach)
    for tensor in params:
        assert torch.equal(tensor, torch.ones(3))  # nothing written
    meta = torch.empty((), device="meta")
    add_scaled_([meta], [torch.tensor(1.0)], 0.5, foreach=foreach)
    accumulate_([meta], [torch.tensor(1.0)], foreach=foreach)


@pytest.mark.parametrize("foreach", [True, False])
def test_every_lamp_kernel_refuses_a_tensor_or_a_number_for_a_list(foreach):
    """A tensor was taken as the list of its rows (magnitude_noise returned a list of rows), a
    number for the counts failed in len() naming nothing."""
    weights, other = torch.ones(2, 3), torch.full((2, 3), 2.0)
    rows = r"got a tensor of shape \(2, 3\)$"
    with pytest.raises(TypeError, match=r"^params must be a sequence of tensors, " + rows):
        magnitude_noise(weights, lambda device: None, foreach=foreach)
    with pytest.raises(TypeError, match=r"^updates must be a sequence of tensors, " + rows):
        add_scaled_([weights], other, 0.5, foreach=foreach)
    with pytest.raises(TypeError, match=r"^sums must be a sequence of tensors, " + rows):
        accumulate_(weights, [other], foreach=foreach)
    with pytest.raises(TypeError, match=r"^params must be a sequence of tensors, " + rows):
        assign_mean_(weights, other, [2, 2], foreach=foreach)
    with pytest.raises(TypeError, match=r"^counts must be a sequence of integers, got 2$"):
        assign_mean_([weights], [other], 2, foreach=foreach)
    assert torch.equal(weights, torch.ones(2, 3)) and torch.equal(other, torch.full((2, 3), 2.0))  # nothing written


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_every_lamp_kernel_rejects_integer_and_bool_tensors_it_writes(dtype, foreach):
    """They would truncate: ``accumulate_`` and ``assign_mean_`` left integer tensors unchanged."""
    bad = torch.tensor([1, 0], dtype=dtype)
    good = torch.ones(2)
    message = rf" must be a floating-point or complex tensor, got a {dtype} tensor$"
    with pytest.raises(TypeError, match=r"^params\[0\]" + message):
        magnitude_noise([bad], lambda device: None, foreach=foreach)
    with pytest.raises(TypeError, match=r"^params\[1\]" + message):
        add_scaled_([good, bad], [good, good], 0.5, foreach=foreach)
    with pytest.raises(TypeError, match=r"^sums\[0\]" + message):
        accumulate_([bad], [torch.full((2,), 0.5)], foreach=foreach)
    with pytest.raises(TypeError, match=r"^params\[0\]" + message):
        assign_mean_([bad], [torch.full((2,), 3.0)], [2], foreach=foreach)
    assert torch.equal(good, torch.ones(2))


def test_magnitude_noise_checks_before_drawing():
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    for foreach in (True, False):
        with pytest.raises(TypeError, match=r"^params\[1\] "):
            magnitude_noise([torch.ones(3), torch.ones(3, dtype=torch.int64)], lambda device: generator, foreach=foreach)
        assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "count, error, rule",
    [
        (0, ValueError, "an integer >= 1"),
        (-2, ValueError, "an integer >= 1"),
        (1.5, TypeError, "an integer >= 1"),
        (2.0, TypeError, "an integer >= 1"),
        (True, TypeError, "an integer >= 1"),
        (float("nan"), ValueError, "an integer >= 1"),
    ],
)
def test_assign_mean_rejects_counts_that_are_not_integers_of_at_least_one(count, error, rule, foreach):
    """A count of 0 gave inf and NaN weights (and zeroed the sums); a negative one flipped them."""
    params = [torch.ones(2), torch.ones(2)]
    sums = [torch.full((2,), 4.0), torch.full((2,), 6.0)]
    with pytest.raises(error, match=rf"^counts\[1\] must be {rule}, got {count!r}$"):
        assign_mean_(params, sums, [2, count], foreach=foreach)
    assert all(torch.equal(p, torch.ones(2)) for p in params)  # nothing written
    assert torch.equal(sums[0], torch.full((2,), 4.0)) and torch.equal(sums[1], torch.full((2,), 6.0))


def test_assign_mean_takes_numpy_integer_counts():
    numpy = pytest.importorskip("numpy")
    params = [torch.zeros(2)]
    assign_mean_(params, [torch.full((2,), 6.0)], [numpy.int64(4)])
    assert torch.equal(params[0], torch.full((2,), 1.5))


@pytest.mark.parametrize("foreach", [True, False])
def test_add_scaled_computes_16_bit_parameters_in_float32_and_rounds_once(foreach):
    """float16: -40000 + 2 * 40000 = 40000 fits, but torch's float16 add_ rounded 2 * 40000 to inf
    first; bfloat16: torch's add_ rounds alpha (0.3) to bfloat16 first."""
    half = [torch.tensor([-40000.0], dtype=torch.float16)]
    add_scaled_(half, [torch.tensor([40000.0], dtype=torch.float16)], 2.0, foreach=foreach)
    assert torch.equal(half[0], torch.tensor([40000.0], dtype=torch.float16))
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(1000, generator=generator).bfloat16()
    update = torch.randn(1000, generator=generator).bfloat16()
    params = [weights.clone()]
    add_scaled_(params, [update], 0.3, foreach=foreach)
    assert torch.equal(params[0], torch.add(weights.float(), update.float(), alpha=0.3).bfloat16())


@pytest.mark.parametrize("foreach", [True, False])
def test_magnitude_noise_treats_a_complex_parameter_as_a_pair_of_reals(foreach):
    """Each real component gets its own factor: |Re u| <= |Re w| and |Im u| <= |Im w| (the
    complex product rotated the noise: up to 1.41 |w| in either part)."""
    weights = torch.full((1000,), complex(0.6, -0.8), dtype=torch.complex64)
    noise = magnitude_noise([weights], lambda _device: torch.Generator().manual_seed(3), foreach=foreach)[0]
    factors = torch.empty_like(weights).uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(3))
    expected = torch.view_as_complex(torch.view_as_real(weights) * torch.view_as_real(factors))
    assert noise.dtype == torch.complex64 and torch.equal(noise, expected)
    assert float(noise.real.abs().max()) <= 0.6 and float(noise.imag.abs().max()) <= 0.8


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_lamp_kernel_refuses_a_complex_value_written_into_a_real_tensor_before_writing(dtype, foreach):
    """The cast (accumulate_), the copy (assign_mean_) and the widened 16-bit add (add_scaled_)
    kept the real part and dropped the imaginary one silently, where torch's add_ refuses it."""
    complex_ = torch.tensor([3 + 6j, 3 + 9j])
    first, real = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=dtype)
    ones = torch.ones(2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"^updates\[1\] must be real where params\[1\] is real, got a torch.complex64 tensor$"):
        add_scaled_([first, real], [ones, complex_], 1.0, foreach=foreach)
    with pytest.raises(TypeError, match=r"^params\[1\] must be real where sums\[1\] is real, got a torch.complex64 tensor$"):
        accumulate_([first, real], [ones, complex_], foreach=foreach)
    sums = [torch.full((2,), 3.0, dtype=torch.float64), complex_]
    with pytest.raises(TypeError, match=r"^sums\[1\] must be real where params\[1\] is real, got a torch.complex64 tensor$"):
        assign_mean_([first, real], sums, [3, 3], foreach=foreach)
    assert torch.equal(first, torch.zeros(2, dtype=torch.float64)) and torch.equal(real, torch.zeros(2, dtype=dtype))
    assert torch.equal(sums[0], torch.full((2,), 3.0, dtype=torch.float64))  # nothing written, nothing zeroed
    assert torch.equal(sums[1], torch.tensor([3 + 6j, 3 + 9j]))
    # A real tensor into a complex one stays allowed (torch promotes): exact sums.
    weights, totals = [complex_.clone()], [complex_.clone()]
    add_scaled_(weights, [torch.tensor([0.5, -0.25], dtype=dtype)], 2.0, foreach=foreach)
    accumulate_(totals, [torch.tensor([0.5, -0.25], dtype=dtype)], foreach=foreach)
    assert torch.equal(weights[0], torch.tensor([4 + 6j, 2.5 + 9j]))
    assert torch.equal(totals[0], torch.tensor([3.5 + 6j, 2.75 + 9j]))


@pytest.mark.parametrize("foreach", [True, False])
def test_assign_mean_refuses_a_count_beyond_a_float_before_writing(foreach):
    """``float(10**400)`` raised a bare OverflowError that named no argument."""
    params, sums = [torch.zeros(2), torch.zeros(2)], [torch.full((2,), 6.0), torch.full((2,), 6.0)]
    with pytest.raises(ValueError, match=r"^counts\[1\] must be an integer >= 1 that fits in a float, got 1000+$"):
        assign_mean_(params, sums, [2, 10**400], foreach=foreach)
    assert all(torch.equal(param, torch.zeros(2)) for param in params)
    assert all(torch.equal(total, torch.full((2,), 6.0)) for total in sums)  # not zeroed



@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
def test_assign_mean_refuses_a_count_beyond_the_dtype_its_mean_is_taken_in_before_writing(dtype, foreach):
    """A count beyond float32's range became an infinite divisor of a float32, 16-bit or complex64
    sum: 3e38 / 10**39 came out 0, not 0.3. A float64 sum takes it."""
    params = [torch.zeros(2, dtype=dtype), torch.zeros(2, dtype=dtype)]
    sums = [torch.ones(2, dtype=dtype), torch.full((2,), 3e38, dtype=dtype)]
    wide = torch.complex64 if dtype.is_complex else torch.float32
    with pytest.raises(
        ValueError,
        match=rf"^counts\[1\] must be an integer >= 1 that fits in the dtype the mean of sums\[1\] is taken in, "
        rf"{wide} \(at most 3.4028234663852886e\+38\), got 10{{39}}$",
    ):
        assign_mean_(params, sums, [2, 10**39], foreach=foreach)
    assert all(torch.equal(param, torch.zeros(2, dtype=dtype)) for param in params)
    assert torch.equal(sums[0], torch.ones(2, dtype=dtype))  # not zeroed
    params, sums = [torch.zeros(2, dtype=torch.float32)], [torch.full((2,), 3e38, dtype=torch.float64)]
    assign_mean_(params, sums, [10**39], foreach=foreach)
    assert torch.equal(params[0], torch.full((2,), 0.3, dtype=torch.float64).to(torch.float32))


@pytest.mark.parametrize("foreach", [True, False])
def test_assign_mean_takes_a_count_of_exactly_float32s_largest_and_refuses_the_next_float(foreach):
    """The bound is inclusive: a count equal to float32's largest finite value divides a float32
    sum (f32max / f32max = 1), also where another count (beyond float32, of a float64 sum) has
    every count checked one by one; the next float64 above it is refused before anything is written."""
    largest = int(torch.finfo(torch.float32).max)
    params = [torch.zeros(2), torch.zeros(2, dtype=torch.float64)]
    sums = [torch.full((2,), torch.finfo(torch.float32).max), torch.full((2,), 3e38, dtype=torch.float64)]
    assign_mean_(params, sums, [largest, 10**39], foreach=foreach)
    assert torch.equal(params[0], torch.ones(2)) and torch.equal(params[1], torch.full((2,), 3e38 / 1e39, dtype=torch.float64))
    above = largest + 2**75  # the next float64
    params, sums = [torch.zeros(2), torch.zeros(2, dtype=torch.float64)], [torch.ones(2), torch.ones(2, dtype=torch.float64)]
    with pytest.raises(ValueError, match=rf"^counts\[0\] must be an integer >= 1 that fits in the dtype the mean of sums\[0\] is taken in, torch.float32 \(at most 3.4028234663852886e\+38\), got {above}$"):
        assign_mean_(params, sums, [above, 10**39], foreach=foreach)
    assert all(torch.equal(p, torch.zeros(2, dtype=p.dtype)) for p in params) and all(torch.equal(t, torch.ones(2, dtype=t.dtype)) for t in sums)


# -- alpha and the entries: checked before anything is written ----------------------------------------------------
def _two_groups():
    """A float64 entry (written first, as its own dtype group) and a float32 one."""
    return [torch.zeros(2, dtype=torch.float64), torch.zeros(3)], [torch.ones(2, dtype=torch.float64), torch.ones(3)]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("alpha", ["x", True, 1j, None, torch.tensor([1.0]), torch.tensor(True)], ids=repr)
def test_add_scaled_names_an_alpha_that_is_not_a_real_number(alpha, foreach):
    """torch's own error ("add(): argument 'alpha' must be Number, not str") named no argument."""
    params, updates = _two_groups()
    with pytest.raises(TypeError, match=rf"^alpha must be a real number or a 0-dim real tensor, got {re.escape(repr(alpha))}$"):
        add_scaled_(params, updates, alpha, foreach=foreach)
    assert torch.equal(params[0], torch.zeros(2, dtype=torch.float64)) and torch.equal(params[1], torch.zeros(3))


@pytest.mark.parametrize("foreach", [True, False])
def test_add_scaled_refuses_an_alpha_beyond_a_float_or_the_computing_dtype_before_writing(foreach):
    """``10**400`` raised torch's OverflowError; 1e300 wrote the float64 entry, then raised torch's
    "value cannot be converted to type float without overflow" at the float32 one."""
    params, updates = _two_groups()
    with pytest.raises(ValueError, match=r"^alpha must be a real number that fits in a float or a 0-dim real tensor, got 1000+$"):
        add_scaled_(params, updates, 10**400, foreach=foreach)
    rule = r"\(at most 3\.4028234663852886e\+38 in magnitude, or infinite, or NaN\)"
    with pytest.raises(ValueError, match=rf"^alpha must fit in the dtype params\[1\] is computed in, torch.float32 {rule}, got 1e\+300$"):
        add_scaled_(params, updates, 1e300, foreach=foreach)
    assert torch.equal(params[0], torch.zeros(2, dtype=torch.float64)) and torch.equal(params[1], torch.zeros(3))
    wide = [torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float16)]  # float16 + float64: in float64
    add_scaled_(wide, [torch.ones(2, dtype=torch.float64)] * 2, 1e300, foreach=foreach)
    assert torch.equal(wide[0], torch.full((2,), 1e300, dtype=torch.float64))
    assert bool(torch.isposinf(wide[1]).all())  # 1e300 rounded once to float16, as torch.add(...).half()


@pytest.mark.parametrize("foreach", [True, False])
def test_add_scaled_takes_numpy_tensor_and_huge_integer_alphas_as_torch_add(foreach):
    """An integer beyond int64 (torch: "int too big to convert") counts as the float it rounds to."""
    numpy = pytest.importorskip("numpy")
    for alpha in (numpy.float32(0.5), numpy.int64(-3), torch.tensor(0.25, dtype=torch.float64), 2**70):
        params = [torch.tensor([1.0, 2.0], dtype=torch.float64)]
        add_scaled_(params, [torch.tensor([0.5, -1.0], dtype=torch.float64)], alpha, foreach=foreach)
        want = torch.tensor([1.0, 2.0], dtype=torch.float64) + float(alpha) * torch.tensor([0.5, -1.0], dtype=torch.float64)
        assert torch.equal(params[0], want)


@pytest.mark.parametrize("foreach", [True, False])
def test_every_lamp_kernel_names_an_entry_that_is_not_a_tensor(foreach):
    """A number among the tensors raised AttributeError ("'float' object has no attribute 'shape'")."""
    params, updates = _two_groups()
    with pytest.raises(TypeError, match=r"^updates\[1\] must be a torch.Tensor, got 1.0$"):
        add_scaled_(params, [updates[0], 1.0], 1.0, foreach=foreach)
    with pytest.raises(TypeError, match=r"^params\[0\] must be a torch.Tensor, got 2.0$"):
        accumulate_(params, [2.0, updates[1]], foreach=foreach)
    with pytest.raises(TypeError, match=r"^sums\[1\] must be a torch.Tensor, got None$"):
        assign_mean_(params, [updates[0], None], [1, 1], foreach=foreach)
    with pytest.raises(TypeError, match=r"^params\[0\] must be a torch.Tensor, got 'w'$"):
        magnitude_noise(["w"], lambda _device: None, foreach=foreach)
    assert torch.equal(params[0], torch.zeros(2, dtype=torch.float64)) and torch.equal(params[1], torch.zeros(3))
    assert torch.equal(updates[0], torch.ones(2, dtype=torch.float64))  # not zeroed


@pytest.mark.parametrize("flag", ["yes", None, 1])
def test_every_lamp_kernel_refuses_a_foreach_that_is_not_a_bool(flag):
    params, updates = _two_groups()
    message = rf"^foreach must be a bool, got {re.escape(repr(flag))}$"
    for call in (
        lambda: add_scaled_(params, updates, 1.0, foreach=flag),
        lambda: accumulate_(params, updates, foreach=flag),
        lambda: assign_mean_(params, updates, [1, 1], foreach=flag),
        lambda: magnitude_noise(params, lambda _device: None, foreach=flag),
    ):
        with pytest.raises(TypeError, match=message):
            call()
    assert torch.equal(params[0], torch.zeros(2, dtype=torch.float64)) and torch.equal(params[1], torch.zeros(3))


@pytest.mark.parametrize("foreach", [True, False])
def test_lamp_kernels_refuse_a_target_torch_cannot_write_before_writing(foreach):
    """add_scaled_, accumulate_ and assign_mean_ with a later target an expand view, an inference
    tensor outside inference mode or a leaf that requires grad while grad mode is on: torch raised
    as it reached it, after the first entry was written."""
    with torch.inference_mode():
        inference = torch.zeros(3)
    unwritable = [
        (torch.zeros(1).expand(3), r" must be a tensor whose elements do not share memory, got one of shape \(3,\) and strides \(0,\)$"),
        (inference, r" must be a tensor that is not an inference tensor outside torch.inference_mode\(\)"),
        (torch.zeros(3, requires_grad=True), r" must be a tensor that does not require grad while grad mode is on"),
    ]
    first = torch.ones(3)
    ones = [torch.ones(3), torch.ones(3)]
    for target, rule in unwritable:
        with pytest.raises(ValueError, match=r"^params\[1\]" + rule):
            add_scaled_([first, target], ones, alpha=1.0, foreach=foreach)
        with pytest.raises(ValueError, match=r"^sums\[1\]" + rule):
            accumulate_([first, target], ones, foreach=foreach)
        with pytest.raises(ValueError, match=r"^params\[1\]" + rule):
            assign_mean_([first, target], ones, [1, 1], foreach=foreach)
        sums = [torch.ones(3), target]  # zeroed after the mean: checked as well
        with pytest.raises(ValueError, match=r"^sums\[1\]" + rule):
            assign_mean_([first, torch.ones(3)], sums, [2, 2], foreach=foreach)
        assert torch.equal(first, torch.ones(3)) and torch.equal(sums[0], torch.ones(3))  # nothing written


@pytest.mark.parametrize("foreach", [True, False])
def test_in_place_kernels_refuse_a_view_of_a_leaf_that_requires_grad_before_writing(foreach):
    """A later target that is a view of a leaf requiring grad (``leaf[:3]``, ``leaf.view(-1)``)
    while grad mode is on: torch refused it as it reached it ('a view of a leaf Variable that
    requires grad is being used in an in-place operation'), after the first entry was written
    (foreach=False, or another dtype before it)."""
    from samgria.functional import mul_

    leaf = torch.zeros(2, 3, requires_grad=True)
    rule = r"\[1\] must be a tensor that does not require grad while grad mode is on \(write under torch.no_grad\(\)\), got a view of a leaf that requires grad$"
    for view in (leaf[1], leaf.view(-1)[:3]):
        first = torch.ones(3, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"^params" + rule):
            add_scaled_([first, view], [torch.ones(3, dtype=torch.float64), torch.ones(3)], alpha=1.0, foreach=foreach)
        with pytest.raises(ValueError, match=r"^sums" + rule):
            accumulate_([first, view], [torch.ones(3, dtype=torch.float64), torch.ones(3)], foreach=foreach)
        with pytest.raises(ValueError, match=r"^buffers" + rule):
            mul_([first, view], [torch.full((3,), 2.0, dtype=torch.float64), torch.ones(3)], foreach=foreach)
        assert torch.equal(first, torch.ones(3, dtype=torch.float64))  # nothing written
    # A view of a tensor that is not a leaf is written (autograd records it), as torch does.
    graph_output = leaf * 1.0
    accumulate_([graph_output[0]], [torch.ones(3)], foreach=foreach)
    assert torch.equal(graph_output.detach()[0], torch.ones(3)) and graph_output.grad_fn is not None
