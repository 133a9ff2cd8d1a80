"""Tests for samgria.data.sinusoid: shapes, the task function, ranges, seeding, validation."""

from __future__ import annotations

import math
import re

import pytest
import torch

from samgria.data import SinusoidTaskSampler, Task, TaskSampler, sinusoid


def test_is_a_task_sampler_with_documented_shapes():
    sampler = SinusoidTaskSampler(k_support=7, k_query=3, seed=0)
    assert isinstance(sampler, TaskSampler)
    tasks = sampler.sample(4)
    assert len(tasks) == 4
    for task in tasks:
        assert isinstance(task, Task)
        assert task.support_x.shape == (7, 1) and task.support_y.shape == (7, 1)
        assert task.query_x.shape == (3, 1) and task.query_y.shape == (3, 1)
        assert task.support_x.dtype == torch.get_default_dtype()


def test_tasks_compare_and_hash_by_identity_as_tensors_do():
    """The dataclass's field-wise == compared tensors, so `task in tasks` raised (a tensor of
    several values has no truth value) and a task could not key a dict."""
    tasks = SinusoidTaskSampler(k_support=5, k_query=5, seed=0).sample(3)
    assert tasks[2] not in tasks[:2] and tasks[1] in tasks
    weights = {task: float(i) for i, task in enumerate(tasks)}
    assert weights[tasks[1]] == 1.0
    same_tensors = Task(tasks[0].support_x, tasks[0].support_y, tasks[0].query_x, tasks[0].query_y)
    assert same_tensors != tasks[0] and tasks[0] == tasks[0]


def test_targets_follow_amplitude_times_sine_of_shifted_input():
    sampler = SinusoidTaskSampler(seed=1, dtype=torch.float64)
    tasks, amplitudes, phases = sampler.sample_with_params(5)
    for task, amplitude, phase in zip(tasks, amplitudes.tolist(), phases.tolist()):
        for x, y in ((task.support_x, task.support_y), (task.query_x, task.query_y)):
            expected = torch.tensor([amplitude * math.sin(v - phase) for v in x.flatten().tolist()], dtype=torch.float64)
            torch.testing.assert_close(y.flatten(), expected, rtol=1e-12, atol=1e-12)


def test_sinusoid_function_matches_math():
    x = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    expected = torch.tensor([2.0 * math.sin(v - 0.5) for v in (0.0, 1.0, -2.0)], dtype=torch.float64)
    torch.testing.assert_close(sinusoid(x, 2.0, 0.5), expected)


def test_samples_stay_in_ranges_and_cover_them():
    sampler = SinusoidTaskSampler(amp_range=(1.0, 2.0), phase_range=(0.5, 0.75), x_range=(-1.0, 3.0), seed=2)
    tasks, amplitudes, phases = sampler.sample_with_params(400)
    assert amplitudes.min() >= 1.0 and amplitudes.max() <= 2.0
    assert phases.min() >= 0.5 and phases.max() <= 0.75
    xs = torch.cat([torch.cat([t.support_x, t.query_x]) for t in tasks])
    assert xs.min() >= -1.0 and xs.max() <= 3.0
    # Uniform draws: the sample mean is near the middle of each range.
    assert abs(amplitudes.mean().item() - 1.5) < 0.05
    assert abs(xs.mean().item() - 1.0) < 0.05


def test_support_and_query_points_differ():
    task = SinusoidTaskSampler(seed=3).sample(1)[0]
    assert not torch.equal(task.support_x, task.query_x)


def test_seed_and_generator_are_reproducible():
    a = SinusoidTaskSampler(seed=7).sample(3)
    b = SinusoidTaskSampler(generator=torch.Generator().manual_seed(7)).sample(3)
    c = SinusoidTaskSampler(seed=8).sample(3)
    for ta, tb in zip(a, b):
        assert torch.equal(ta.support_x, tb.support_x) and torch.equal(ta.query_y, tb.query_y)
    assert not torch.equal(a[0].support_x, c[0].support_x)


def test_successive_batches_differ():
    sampler = SinusoidTaskSampler(seed=0)
    first, second = sampler.sample(1)[0], sampler.sample(1)[0]
    assert not torch.equal(first.support_x, second.support_x)


def test_global_generator_used_without_seed():
    torch.manual_seed(11)
    a = SinusoidTaskSampler().sample(2)
    torch.manual_seed(11)
    b = SinusoidTaskSampler().sample(2)
    assert torch.equal(a[1].query_x, b[1].query_x)


def test_dtype_and_device_are_applied():
    sampler = SinusoidTaskSampler(seed=0, dtype=torch.float64, device="cpu")
    task = sampler.sample(1)[0]
    assert task.query_y.dtype == torch.float64 and task.query_y.device.type == "cpu"


def test_zero_tasks_and_zero_query_points():
    assert SinusoidTaskSampler(seed=0).sample(0) == []
    task = SinusoidTaskSampler(k_query=0, seed=0).sample(1)[0]
    assert task.query_x.shape == (0, 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k_support": 0}, ValueError, r"k_support must be an integer >= 1, got 0"),
        ({"k_support": 2.5}, TypeError, r"k_support must be an integer >= 1, got 2\.5"),
        ({"k_support": True}, TypeError, r"k_support must be an integer >= 1, got True"),
        ({"k_query": -1}, ValueError, r"k_query must be an integer >= 0, got -1"),
        ({"amp_range": (5.0, 1.0)}, ValueError, r"amp_range must satisfy low <= high, got \(5.0, 1.0\)"),
        ({"phase_range": (0.0, float("inf"))}, ValueError, r"phase_range\[1\] must be a finite number, got inf$"),
        ({"amp_range": "12"}, TypeError, r"amp_range must be a \(low, high\) pair of numbers, got '12'$"),
        ({"amp_range": (False, True)}, TypeError, r"amp_range\[0\] must be a finite number, got False$"),
        ({"amp_range": (10**400, 1)}, ValueError, r"amp_range\[0\] must be a finite number that fits in a float, got 1000"),
        ({"x_range": (-1e5, 1e5), "dtype": torch.float16}, ValueError,
         r"x_range must lie within \+-65504 \(the range of torch\.float16\), got \(-100000\.0, 100000\.0\)$"),
        ({"x_range": (-3.1e38, 3.1e38), "dtype": torch.float32}, ValueError,
         r"^x_range must be at most 3\.40282e\+38 wide \(high - low is computed in torch\.float32\), got \(-3\.1e\+38, 3\.1e\+38\)$"),
        ({"amp_range": (-1.7e308, 1.7e308), "dtype": torch.float64}, ValueError,
         r"^amp_range must be at most 1\.79769e\+308 wide \(high - low is computed in torch\.float64\)"),
        ({"x_range": (-3.3e38, 0.0), "phase_range": (0.0, 1e38), "dtype": torch.float32}, ValueError,
         r"^x_range and phase_range must keep x - phase within \+-3\.40282e\+38 \(the range of torch\.float32\), "
         r"got x_range=\(-3\.3e\+38, 0\.0\) and phase_range=\(0\.0, 1e\+38\)$"),
        ({"x_range": (-65504.0, 0.0), "phase_range": (0.0, 60.0), "dtype": torch.bfloat16}, None, None),
        ({"seed": 2**64}, ValueError, r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\], got 18446744073709551616$"),
        ({"x_range": 3.0}, TypeError, r"x_range must be a \(low, high\) pair of numbers, got 3.0"),
        ({"x_range": (1.0, 2.0, 3.0)}, TypeError, r"x_range must be a \(low, high\) pair"),
        ({"seed": 1, "generator": torch.Generator()}, ValueError, r"either generator or seed"),
        ({"generator": 3}, TypeError, r"generator must be a torch.Generator, got int"),
        ({"seed": "a"}, TypeError, r"seed must be an integer, got 'a'"),
        ({"dtype": torch.int64}, TypeError, r"dtype must be a floating torch.dtype, got torch.int64"),
    ],
)
def test_bad_arguments_are_rejected_with_named_message(kwargs, error, match):
    if error is None:  # a range near the edge that stays finite: accepted, and its draws finite
        tasks = SinusoidTaskSampler(seed=0, **kwargs).sample(20)
        assert all(torch.isfinite(t.support_x).all() and torch.isfinite(t.support_y).all() for t in tasks)
        return
    with pytest.raises(error, match=match):
        SinusoidTaskSampler(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_widest_accepted_ranges_give_finite_tasks(dtype):
    """A range as wide as ``dtype`` allows (and ``x - phase`` at the edge) draws finite inputs
    and targets: what the constructor accepts, sampling can hold."""
    largest = torch.finfo(dtype).max
    sampler = SinusoidTaskSampler(x_range=(-largest / 2, largest / 2), phase_range=(0.0, largest / 2), seed=0, dtype=dtype)
    for task in sampler.sample(20):
        for tensor in (task.support_x, task.support_y, task.query_x, task.query_y):
            assert torch.isfinite(tensor).all()


def test_ranges_given_as_tensors_or_decimals_are_ranges_of_their_values():
    import decimal

    assert SinusoidTaskSampler(amp_range=torch.tensor([0.5, 4.0])).amp_range == (0.5, 4.0)
    assert SinusoidTaskSampler(amp_range=(torch.tensor(0.5), torch.tensor(4))).amp_range == (0.5, 4.0)
    assert SinusoidTaskSampler(x_range=(decimal.Decimal("-2.5"), decimal.Decimal(3))).x_range == (-2.5, 3.0)
    with pytest.raises(TypeError, match=r"amp_range\[0\] must be a finite number, got tensor\(\[1\., 2\.\]\)$"):
        SinusoidTaskSampler(amp_range=(torch.tensor([1.0, 2.0]), 3.0))


def test_a_seeded_stream_is_amplitudes_then_phases_then_inputs_drawn_uniformly():
    """The stream a seed gives, by hand: ``n`` amplitudes, ``n`` phases, then every task's
    ``k_support + k_query`` inputs, each ``low + (high - low) * u`` with ``u = torch.rand``."""
    n, k_support, k_query = 4, 3, 2
    sampler = SinusoidTaskSampler(
        amp_range=(0.5, 2.0), phase_range=(0.0, 1.0), x_range=(-3.0, 3.0), k_support=k_support, k_query=k_query,
        seed=9, dtype=torch.float64,
    )
    tasks, amplitudes, phases = sampler.sample_with_params(n)
    generator = torch.Generator().manual_seed(9)
    expected_amplitudes = 0.5 + 1.5 * torch.rand(n, generator=generator, dtype=torch.float64)
    expected_phases = 0.0 + 1.0 * torch.rand(n, generator=generator, dtype=torch.float64)
    x = -3.0 + 6.0 * torch.rand(n, k_support + k_query, 1, generator=generator, dtype=torch.float64)
    assert torch.equal(amplitudes, expected_amplitudes) and torch.equal(phases, expected_phases)
    for i, task in enumerate(tasks):
        assert torch.equal(task.support_x, x[i, :k_support]) and torch.equal(task.query_x, x[i, k_support:])
        assert torch.equal(task.support_y, expected_amplitudes[i] * torch.sin(x[i, :k_support] - expected_phases[i]))


def test_sixteen_bit_tasks_are_float32_draws_rounded_once():
    """A 16-bit sampler draws in float32 (11 random bits would repeat inputs) and rounds once:
    its tasks are the float32 sampler's tasks, rounded."""
    for dtype in (torch.float16, torch.bfloat16):
        tasks, amplitudes, phases = SinusoidTaskSampler(seed=3, dtype=dtype).sample_with_params(200)
        reference, ref_amplitudes, ref_phases = SinusoidTaskSampler(seed=3, dtype=torch.float32).sample_with_params(200)
        assert torch.equal(amplitudes, ref_amplitudes.to(dtype)) and torch.equal(phases, ref_phases.to(dtype))
        assert all(torch.equal(t.support_x, r.support_x.to(dtype)) for t, r in zip(tasks, reference))
        assert all(t.support_y.dtype == dtype for t in tasks)
    # Edges of the float16 range stay finite.
    task = SinusoidTaskSampler(x_range=(-65504.0, 65504.0), seed=0, dtype=torch.float16).sample(50)
    assert all(torch.isfinite(t.support_x).all() and torch.isfinite(t.query_x).all() for t in task)


def test_bad_task_count_is_rejected():
    sampler = SinusoidTaskSampler(seed=0)
    with pytest.raises(ValueError, match=r"n must be an integer >= 0, got -2"):
        sampler.sample(-2)
    with pytest.raises(TypeError, match=r"n must be an integer >= 0, got 2\.0"):
        sampler.sample(2.0)


def test_repr_names_configuration():
    assert "k_support=10" in repr(SinusoidTaskSampler(seed=0))


# ------------------------------------------------------------------ NumPy integers
np = pytest.importorskip("numpy")


@pytest.mark.parametrize("integer", [np.int64, np.int32, np.uint8, np.intp])
def test_numpy_integers_are_accepted_wherever_an_int_is_and_give_the_same_tasks(integer):
    reference = SinusoidTaskSampler(k_support=5, k_query=3, seed=7, dtype=torch.float64)
    sampler = SinusoidTaskSampler(k_support=integer(5), k_query=integer(3), seed=integer(7), dtype=torch.float64)
    assert type(sampler.k_support) is int and type(sampler.k_query) is int
    assert sampler.k_support == 5 and sampler.k_query == 3
    assert repr(sampler) == repr(reference)
    tasks, amplitudes, phases = sampler.sample_with_params(integer(4))
    expected, expected_amplitudes, expected_phases = reference.sample_with_params(4)
    assert len(tasks) == 4
    assert torch.equal(amplitudes, expected_amplitudes) and torch.equal(phases, expected_phases)
    for task, ref in zip(tasks, expected):
        for field in ("support_x", "support_y", "query_x", "query_y"):
            assert torch.equal(getattr(task, field), getattr(ref, field))
    assert len(sampler.sample(integer(2))) == 2
    assert sampler.sample(integer(0)) == []


def test_numpy_zero_query_points_and_large_unsigned_seed():
    task = SinusoidTaskSampler(k_query=np.int64(0), seed=np.uint64(2**64 - 1)).sample(np.int64(1))[0]
    assert task.query_x.shape == (0, 1)
    reference = SinusoidTaskSampler(k_query=0, seed=2**64 - 1).sample(1)[0]
    assert torch.equal(task.support_x, reference.support_x)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k_support": np.int64(0)}, ValueError, r"k_support must be an integer >= 1, got np\.int64\(0\)|k_support must be an integer >= 1, got 0"),
        ({"k_query": np.int64(-1)}, ValueError, r"k_query must be an integer >= 0, got (np\.int64\()?-1"),
        ({"k_support": np.float64(5.0)}, TypeError, r"k_support must be an integer >= 1, got (np\.float64\()?5\.0"),
        ({"k_support": np.bool_(True)}, TypeError, r"k_support must be an integer >= 1, got (np\.)?True"),
        ({"k_query": False}, TypeError, r"k_query must be an integer >= 0, got False"),
        ({"seed": np.float32(1.0)}, TypeError, r"seed must be an integer, got (np\.float32\()?1\.0"),
        ({"seed": True}, TypeError, r"seed must be an integer, got True"),
        ({"seed": 1.0}, TypeError, r"seed must be an integer, got 1\.0"),
    ],
)
def test_numpy_bools_floats_and_out_of_range_integers_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        SinusoidTaskSampler(**kwargs)


@pytest.mark.parametrize(
    ("n", "error", "match"),
    [
        (np.int64(-2), ValueError, r"n must be an integer >= 0, got (np\.int64\()?-2"),
        (np.float64(2.0), TypeError, r"n must be an integer >= 0, got (np\.float64\()?2\.0"),
        (True, TypeError, r"n must be an integer >= 0, got True"),
        (np.bool_(False), TypeError, r"n must be an integer >= 0, got (np\.)?False"),
        ("2", TypeError, r"n must be an integer >= 0, got '2'"),
    ],
)
def test_bad_numpy_task_counts_are_rejected(n, error, match):
    sampler = SinusoidTaskSampler(seed=0)
    with pytest.raises(error, match=match):
        sampler.sample(n)
    with pytest.raises(error, match=match):
        sampler.sample_with_params(n)


_DEVICE_RULE = r"device must be a torch\.device, a device string such as 'cuda:0' or a device index"


@pytest.mark.parametrize(
    ("device", "error", "match"),
    [
        ("0.5", ValueError, rf"^{_DEVICE_RULE}, got '0\.5' \(torch: Invalid device string: '0\.5'\)$"),
        (1.5, TypeError, rf"^{_DEVICE_RULE}, got 1\.5$"),
        (True, TypeError, rf"^{_DEVICE_RULE}, got True$"),
        ([], TypeError, rf"^{_DEVICE_RULE}, got \[\]$"),
        (-1, ValueError, rf"^{_DEVICE_RULE}, got -1 \(torch: "),
        (10**400, ValueError, rf"^{_DEVICE_RULE}, got 1000+ \(torch: "),
    ],
    ids=["string", "float", "bool", "list", "negative", "huge"],
)
def test_a_device_that_torch_device_refuses_is_refused_naming_device(device, error, match):
    """torch's own errors ("Invalid device string", a long argument-list TypeError, "Overflow when
    unpacking long long") named no argument."""
    with pytest.raises(error, match=match):
        SinusoidTaskSampler(device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_cuda_device_without_cuda_is_refused_when_the_sampler_is_made():
    """It was accepted, and the first sample raised "Torch not compiled with CUDA enabled"."""
    for device in ("cuda:9", torch.device("cuda")):
        message = rf"^device must be a device available here, got {re.escape(repr(device))} \(CUDA is not available\)$"
        with pytest.raises(ValueError, match=message):
            SinusoidTaskSampler(device=device)


def test_a_cuda_index_beyond_the_devices_is_refused_when_the_sampler_is_made():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"^device must be a device available here, got 'cuda:{count}' \(there are {count} CUDA devices\)$"):
        SinusoidTaskSampler(device=f"cuda:{count}")
    task = SinusoidTaskSampler(device=f"cuda:{count - 1}", seed=0).sample(1)[0]
    assert task.support_x.device == torch.device("cuda", count - 1)


def test_every_device_torch_device_takes_on_an_available_backend_is_accepted():
    for device in ("cpu", "cpu:0", torch.device("cpu"), "meta"):
        sampler = SinusoidTaskSampler(device=device, seed=0)
        assert sampler.device == torch.device(device)
        assert sampler.sample(1)[0].support_x.device.type == torch.device(device).type
    if torch.cuda.is_available():  # an index is an accelerator's
        assert SinusoidTaskSampler(device=np.int64(0)).device == torch.device(0)


@pytest.mark.parametrize("bad", [torch.tensor(0.5), "np0d"])
def test_a_0_dim_range_is_refused_naming_the_range(bad):
    """``list()`` of a 0-dim tensor raised "iteration over a 0-d tensor"."""
    value = np.array(0.5) if bad == "np0d" else bad
    with pytest.raises(TypeError, match=r"^amp_range must be a \(low, high\) pair of numbers, got (tensor\(0\.5000\)|array\(0\.5\))$"):
        SinusoidTaskSampler(amp_range=value)


# ------------------------------------------------------------------ counts beyond a tensor
_MOST_BYTES = 2**63 - 1  # torch's bound on one tensor's storage ("Storage size calculation overflowed")


@pytest.mark.parametrize(
    ("kwargs", "name", "most"),
    [
        ({"k_support": 2**70}, "k_support", _MOST_BYTES // 4),
        ({"k_support": _MOST_BYTES // 4 + 1, "k_query": 0}, "k_support", _MOST_BYTES // 4),
        ({"k_support": 10, "k_query": 2**63 - 1}, "k_query", _MOST_BYTES // 4 - 10),
        ({"k_support": 10, "k_query": _MOST_BYTES // 8 - 9, "dtype": torch.float64}, "k_query", _MOST_BYTES // 8 - 10),
        ({"k_support": _MOST_BYTES // 4 + 1, "dtype": torch.float16}, "k_support", _MOST_BYTES // 4),  # drawn in float32
    ],
)
def test_points_per_task_beyond_what_one_tensor_holds_are_refused_at_construction(kwargs, name, most):
    """k_support=2**70 was accepted and the first sample raised torch's TypeError 'Overflow when
    unpacking long long' (and k_support + k_query past torch's bound on one tensor a RuntimeError
    'Storage size calculation overflowed'), naming no argument."""
    low = 1 if name == "k_support" else 0
    value = kwargs[name]
    with pytest.raises(ValueError, match=rf"^{name} must be an integer in \[{low}, {most}\] \(a task's k_support \+ "
                       rf"k_query points are drawn as one torch\.float(32|64) tensor, of at most 2\*\*63 - 1 bytes\), "
                       rf"got {value}$"):
        SinusoidTaskSampler(**kwargs)
    draw_dtype = torch.float64 if kwargs.get("dtype") == torch.float64 else torch.float32
    points = kwargs.get("k_support", 10) + kwargs.get("k_query", 10)
    with pytest.raises((RuntimeError, TypeError)):  # torch cannot describe such a draw, even on the meta device
        torch.empty((1, points, 1), dtype=draw_dtype, device="meta")
    largest = dict(kwargs, **{name: most}, **({"k_query": 0} if name == "k_support" else {}))
    accepted = SinusoidTaskSampler(**largest)  # the largest count is accepted...
    points = accepted.k_support + accepted.k_query
    torch.empty((1, points, 1), dtype=draw_dtype, device="meta")  # ...and one tensor holds its points


@pytest.mark.parametrize("n", [2**70, _MOST_BYTES // (4 * 20) + 1])
def test_a_task_count_beyond_what_one_tensor_holds_is_refused_naming_n(n):
    """sample(2**70) raised torch's TypeError 'Overflow when unpacking long long', and a count whose
    points overflow a tensor's storage a RuntimeError, naming no argument."""
    sampler = SinusoidTaskSampler(k_support=10, k_query=10, seed=0)
    before = sampler.generator.get_state()
    most = _MOST_BYTES // (4 * 20)
    for draw in (sampler.sample, sampler.sample_with_params, lambda n: sampler.sample_shard(n, 0, 2)):
        with pytest.raises(ValueError, match=rf"^n must be an integer in \[0, {most}\] \(the n \* \(k_support \+ "
                           rf"k_query\) = n \* 20 points are drawn as one torch\.float32 tensor, of at most 2\*\*63 - 1 "
                           rf"bytes\), got {n}$"):
            draw(n)
    assert torch.equal(sampler.generator.get_state(), before)  # nothing drawn


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float8_dtype_is_refused_naming_dtype(dtype):
    """float8 dtypes are floating, but torch computes neither the draw nor the sine in them:
    the sampler raised torch's NotImplementedError ("isfinite"/"add_stub" not implemented)."""
    with pytest.raises(TypeError, match=rf"^dtype must be a floating torch.dtype torch computes a sine in "
                       rf"\(float16, bfloat16, float32 or float64\), got {re.escape(repr(dtype))}$"):
        SinusoidTaskSampler(dtype=dtype)
