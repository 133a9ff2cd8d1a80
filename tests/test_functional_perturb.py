"""``samgria.functional.perturb``: the weight-perturbation kernels, fast paths against a per-tensor
loop written here, and the grouping they share."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch

from functional_helpers import assert_rounded_once
from samgria.functional import adaptive_scaling, add_directions_, mul, mul_, perturbed_into_
from samgria.functional._grouping import group_indices_by_device_and_dtype
from samgria.functional.perturb import _CPU_LIST_NUMEL, _perturbed_into_by_lists, perturbed_into_private


def _case(dtype: torch.dtype = torch.float32):
    """Small tensors (the list kernels on the CPU) and large ones (one fused add each), with two
    scales, as SAM produces for two param groups with different ``rho``."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (_CPU_LIST_NUMEL + 1,), (5,), (2, _CPU_LIST_NUMEL), (1,), (0,)]
    params = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    directions = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    scales = [0.3, 0.3, 1e-3, 1e-3, 0.3, 0.3]
    return params, directions, scales


def _out_of_place_reference(buffers, params, directions, scales):
    """What one ``torch.add(w, d, alpha=s, out=b)`` per tensor, in order, leaves in each buffer."""
    expected = [buffer.clone() for buffer in buffers]
    params = [w.clone() for w in params]
    directions = [d.clone() for d in directions]
    for want, w, d, s in zip(expected, params, directions, scales):
        torch.add(w, d, alpha=s, out=want)
    return expected


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_perturbed_into_writes_w_plus_s_d_into_the_buffers_and_leaves_the_weights(foreach, dtype):
    params, directions, scales = _case(dtype)
    originals = [w.clone() for w in params]
    buffers = [torch.full_like(w, float("nan")) for w in params]
    expected = _out_of_place_reference(buffers, params, directions, scales)
    perturbed_into_(buffers, params, directions, scales, foreach=foreach)
    for buffer, want in zip(buffers, expected):
        assert torch.equal(buffer, want)  # bit for bit: the same arithmetic on both paths
    for param, original in zip(params, originals):
        assert torch.equal(param, original)


@torch.no_grad()
def test_the_list_path_without_a_size_limit_as_on_cuda_gives_the_same_bits():
    """Off the CPU every size takes the list kernels: the run logic, checked here on the CPU."""
    params, directions, scales = _case()
    buffers = [torch.full_like(w, float("nan")) for w in params]
    buffers[2] = params[2]  # one in place
    expected = _out_of_place_reference(buffers, params, directions, scales)
    _perturbed_into_by_lists(buffers, params, directions, scales, list(range(len(params))), torch.float32, None)
    for buffer, want in zip(buffers, expected):
        assert torch.equal(buffer, want)


def _private_case():
    """Entries as SAM hands them to :func:`perturbed_into_private`: small and large tensors whose
    scales alternate (two groups, not consecutive), zero scales of both signs on weights holding
    -0.0 (``-0.0 + 0.0`` is ``+0.0``, ``-0.0 + -0.0`` is ``-0.0``: runs of either sign must stay
    apart), 16-bit weights, a direction wider than its weights, float64, and a scale that is no float."""
    generator = torch.Generator().manual_seed(1)
    entries = [
        ((3, 4), torch.float32, torch.float32, 0.3),
        ((_CPU_LIST_NUMEL + 3,), torch.float32, torch.float32, 1e-3),
        ((5,), torch.float32, torch.float32, 1e-3),
        ((7,), torch.float32, torch.float32, 0.3),
        ((6,), torch.float32, torch.float32, 0.0),
        ((6,), torch.float32, torch.float32, -0.0),
        ((4, 4), torch.float16, torch.float16, 0.3),
        ((4,), torch.bfloat16, torch.float32, 1e4),
        ((3,), torch.float64, torch.float64, 0.3),
        ((2, 3), torch.float32, torch.float32, 2),
    ]
    params, directions, scales = [], [], []
    for shape, dtype, direction_dtype, scale in entries:
        weights = torch.randn(shape, generator=generator)
        if scale == 0.0:
            weights[::2] = -0.0
        params.append(weights.to(dtype))
        directions.append(torch.randn(shape, generator=generator).to(direction_dtype))
        scales.append(scale)
    return params, directions, scales


@torch.no_grad()
@pytest.mark.parametrize("foreach", [True, False])
def test_perturbed_into_private_equals_one_add_per_entry_in_the_wider_dtype_where_needed(foreach):
    params, directions, scales = _private_case()
    originals = [w.clone() for w in params]
    buffers = [torch.full_like(w, float("nan")) for w in params]
    perturbed_into_private(buffers, params, directions, scales, foreach=foreach)
    for buffer, w, d, s in zip(buffers, params, directions, scales):
        wide = torch.promote_types(torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype, d.dtype)
        want = torch.add(w.to(wide), d.to(wide), alpha=s).to(w.dtype)
        assert buffer.dtype == w.dtype
        assert torch.equal(buffer, want)
        assert torch.equal(buffer.signbit(), want.signbit())  # zeros of the right sign
    for param, original in zip(params, originals):
        assert torch.equal(param, original)


@torch.no_grad()
@pytest.mark.parametrize("foreach", [True, False])
def test_perturbed_into_private_takes_a_direction_that_is_its_buffer(foreach):
    """A direction computed in its buffer (ASAM's and FriendlySAM's, for a swapped parameter) is
    added to the weights there: w + s d as one torch.add into new memory gives, bit for bit. The
    small entries went into the run's copy, which overwrote the direction with the weights
    (w + s w) before it was added."""
    params, directions, scales = _private_case()
    wants = []
    buffers = []
    for index, (w, d, s) in enumerate(zip(params, directions, scales)):
        wide = torch.promote_types(torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype, d.dtype)
        wants.append(torch.add(w.to(wide), d.to(wide), alpha=s).to(w.dtype))
        if d.dtype == w.dtype and index % 3 != 2:  # some directions in their buffers, some not
            buffers.append(d)
        else:
            buffers.append(torch.full_like(w, float("nan")))
    originals = [w.clone() for w in params]
    perturbed_into_private(buffers, params, directions, scales, foreach=foreach)
    assert sum(buffer is direction for buffer, direction in zip(buffers, directions)) == 6
    for buffer, want in zip(buffers, wants):
        assert torch.equal(buffer, want)
        assert torch.equal(buffer.signbit(), want.signbit())
    for param, original in zip(params, originals):
        assert torch.equal(param, original)


def test_perturbed_into_private_under_grad_mode_refuses_weights_that_require_grad_as_torch_add_does():
    weights = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="out=... arguments don't support automatic differentiation"):
        perturbed_into_private([torch.empty(3)], [weights], [torch.ones(3)], [0.5])


@pytest.mark.parametrize("foreach", [True, False])
def test_add_directions_moves_the_weights_in_place(foreach):
    params, directions, scales = _case()
    storages = [w.data_ptr() for w in params]
    expected = _out_of_place_reference(params, params, directions, scales)
    add_directions_(params, directions, scales, foreach=foreach)
    for param, want, storage in zip(params, expected, storages):
        assert torch.equal(param, want)
        assert param.data_ptr() == storage


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_perturbed_into_computes_16_bit_weights_in_float32_and_rounds_once(dtype):
    params = [torch.tensor([1.0, -2.0, 0.5], dtype=dtype)]
    directions = [torch.tensor([1e-4, 2e-4, -1e-4], dtype=torch.float32)]
    scale = 1e6  # larger than float16 can hold as a scalar operand
    buffers = [torch.empty_like(params[0])]
    perturbed_into_(buffers, params, directions, [scale])
    want = (params[0].float() + scale * directions[0]).to(dtype)
    assert torch.equal(buffers[0], want)


@pytest.mark.parametrize("foreach", [True, False])
def test_perturbed_into_mixes_dtypes_in_place_entries_and_zero_scales_of_either_sign(foreach):
    generator = torch.Generator().manual_seed(1)
    params = [
        torch.randn(4, generator=generator),
        torch.randn(3, generator=generator, dtype=torch.float64),
        torch.tensor([-0.0, 0.0, 1.5]),
        torch.tensor([-0.0, 0.0, 1.5]),
        torch.randn(5, generator=generator),
        torch.randn(2, generator=generator),
    ]
    directions = [torch.randn(w.shape, generator=generator, dtype=w.dtype) for w in params]
    scales = [0.25, 0.25, 0.0, -0.0, 0.25, 0.5]
    buffers = [torch.empty_like(w) for w in params]
    buffers[4] = params[4]  # this one in place
    expected = _out_of_place_reference([b.clone() for b in buffers[:4]] + [params[4].clone(), buffers[5]], params, directions, scales)
    perturbed_into_(buffers, params, directions, scales, foreach=foreach)
    for buffer, want in zip(buffers, expected):
        assert buffer.dtype == want.dtype and torch.equal(buffer, want)
        assert torch.equal(torch.signbit(buffer), torch.signbit(want))  # -0.0 stays -0.0


def test_perturbed_into_with_a_wider_buffer_or_one_sharing_the_direction_matches_torch_add():
    weights = torch.tensor([1.0, 2.0])
    tiny = torch.tensor([1e-8, -1e-8])
    wide = torch.empty(2, dtype=torch.float64)
    perturbed_into_([wide], [weights], [tiny.clone()], [1.0])
    assert torch.equal(wide, torch.add(weights, tiny, alpha=1.0).double())  # float32 arithmetic

    direction = torch.tensor([2.0, 3.0])
    perturbed_into_([direction], [weights], [direction], [1.0])  # the buffer is the direction
    assert torch.equal(direction, torch.tensor([3.0, 5.0]))


@torch.no_grad()
def test_perturbed_into_a_buffer_laid_out_otherwise_than_its_weight_gives_torch_adds_bits():
    """A broadcast direction: copied into a transposed buffer and added to there, the CPU kernel
    rounds w + s d otherwise than ``torch.add(w, d, alpha=s, out=b)`` (the reference path)."""
    generator = torch.Generator().manual_seed(0)
    shape = (4, 5, 6, 7)
    for _ in range(3):
        weights = torch.randn(shape, generator=generator)
        direction = torch.randn(shape[-1], generator=generator).expand(shape)
        buffers = [torch.empty(shape[::-1]).permute(3, 2, 1, 0) for _ in range(2)]
        expected = _out_of_place_reference(buffers[:1], [weights], [direction], [0.3])[0]
        for buffer, foreach in zip(buffers, [True, False]):
            perturbed_into_([buffer], [weights], [direction], [0.3], foreach=foreach)
            assert torch.equal(buffer, expected)


def _aliased_world(pattern: str):
    """Entries whose buffers are other entries' weights, directions or buffers, as a caller of the
    public kernel may pass them: ``(buffers, params, directions, scales, tensors)``."""
    generator = torch.Generator().manual_seed(2)
    t = [torch.randn(4, generator=generator) for _ in range(5)]
    if pattern == "buffer is a later weight":  # b0 = w1: entry 1 reads what entry 0 wrote
        return [t[0], t[1]], [t[2], t[0]], [t[3], t[4]], [0.5, 0.5], t
    if pattern == "buffer is an earlier direction":  # b1 = d0: entry 0 reads it before it is written
        return [t[0], t[1]], [t[2], t[3]], [t[1], t[4]], [0.5, 0.5], t
    if pattern == "same buffer twice":  # the last write wins
        return [t[0], t[0]], [t[1], t[2]], [t[3], t[4]], [0.5, 0.5], t
    if pattern == "buffer is an earlier in-place weight":  # w0 += d0, then b1 = w1 + d1 overwrites w0
        return [t[0], t[0]], [t[0], t[1]], [t[2], t[3]], [0.5, 0.5], t
    if pattern == "weight is an earlier in-place weight":  # w0 += d0, then b1 = w0 + d1
        return [t[0], t[1]], [t[0], t[0]], [t[2], t[3]], [0.5, 0.5], t
    if pattern == "buffer is an earlier in-place direction":  # w0 += d0, then b1 = w1 + d1 into d0
        return [t[0], t[2]], [t[0], t[1]], [t[2], t[3]], [0.5, 0.5], t
    raise AssertionError(pattern)


ALIASING_PATTERNS = [
    "buffer is a later weight",
    "buffer is an earlier direction",
    "same buffer twice",
    "buffer is an earlier in-place weight",
    "weight is an earlier in-place weight",
    "buffer is an earlier in-place direction",
]


@torch.no_grad()
@pytest.mark.parametrize("path", ["foreach", "reference", "lists without a size limit"])
@pytest.mark.parametrize("pattern", ALIASING_PATTERNS)
def test_perturbed_into_with_entries_sharing_memory_equals_torch_add_in_order(pattern, path):
    """Each entry sees what the entries before it wrote, as one ``torch.add`` after another."""
    buffers, params, directions, scales, expected = _aliased_world(pattern)
    for b, w, d, s in zip(buffers, params, directions, scales):
        torch.add(w, d, alpha=s, out=b)
    buffers, params, directions, scales, tensors = _aliased_world(pattern)
    if path == "lists without a size limit":
        _perturbed_into_by_lists(buffers, params, directions, scales, [0, 1], torch.float32, None)
    else:
        perturbed_into_(buffers, params, directions, scales, foreach=path == "foreach")
    for got, want in zip(tensors, expected):
        assert torch.equal(got, want)


@torch.no_grad()
@pytest.mark.parametrize("seed", range(4))
def test_perturbed_into_lists_with_small_and_large_entries_sharing_memory_equal_torch_add_in_order(seed):
    """Large entries are added at once, ahead of the run of small ones before them, unless they
    touch its memory: random entries over a few shared tensors of both sizes (each entry's
    buffer, weight and direction drawn from them) give what one ``torch.add`` after another gives."""
    rng = random.Random(seed)
    for _ in range(150):
        generator = torch.Generator().manual_seed(rng.randrange(2**31))
        small = [torch.randn(4, generator=generator) for _ in range(4)]
        large = [torch.randn(8, generator=generator) for _ in range(4)]  # above size_limit=4 below
        picks = []
        for _ in range(rng.randrange(1, 9)):
            pool = rng.choice((0, 1))
            picks.append((pool, rng.randrange(4), rng.randrange(4), rng.randrange(4), rng.choice((0.5, 0.25))))

        def world():
            tensors = ([t.clone() for t in small], [t.clone() for t in large])
            entries = [(tensors[p][b], tensors[p][w], tensors[p][d], s) for p, b, w, d, s in picks]
            return tensors, entries

        (expected_small, expected_large), entries = world()
        for b, w, d, s in entries:
            torch.add(w, d, alpha=s, out=b)
        (got_small, got_large), entries = world()
        buffers, params, directions, scales = (list(column) for column in zip(*entries))
        _perturbed_into_by_lists(buffers, params, directions, scales, list(range(len(entries))), torch.float32, 4)
        for got, want in zip(got_small + got_large, expected_small + expected_large):
            assert torch.equal(got, want), picks


def _one_entry_after_another(entries):
    """What :func:`perturbed_into_` promises, entry by entry in order: ``torch.add(w, d, alpha=s,
    out=b)``, or, for a 16-bit weight or a direction of another dtype, ``w + s d`` computed in the
    wider of their dtypes (float32 at least) and rounded once into ``b``."""
    for b, w, d, s in entries:
        if w.dtype in (torch.float16, torch.bfloat16) or d.dtype != w.dtype:
            wide = torch.promote_types(torch.promote_types(w.dtype, d.dtype), torch.float32)
            b.copy_(torch.add(w.to(wide), d.to(wide), alpha=s))
        else:
            torch.add(w, d, alpha=s, out=b)


@torch.no_grad()
@pytest.mark.parametrize("foreach", [True, False])
def test_perturbed_into_runs_entries_computed_wider_at_their_turn_among_the_others(foreach):
    """A direction wider than its weight is computed apart from the plain entries, but an entry
    still sees what the entries before it wrote, and not what the entries after it write."""
    x, b0, b1 = torch.arange(4.0), torch.zeros(4), torch.zeros(4)
    wider = torch.ones(4, dtype=torch.float64)
    perturbed_into_([b0, b1], [x, b0], [torch.ones(4), wider], [1.0, 1.0], foreach=foreach)
    assert torch.equal(b1, torch.tensor([2.0, 3.0, 4.0, 5.0]))  # it read b0 after entry 0 wrote it

    x, b0, y = torch.arange(4.0), torch.zeros(4), torch.full((4,), 10.0)
    perturbed_into_([b0, x], [x, y], [torch.ones(4), wider], [1.0, 1.0], foreach=foreach)
    assert torch.equal(b0, torch.tensor([1.0, 2.0, 3.0, 4.0]))  # it read x before entry 1 overwrote it
    assert torch.equal(x, torch.full((4,), 11.0))


@torch.no_grad()
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_perturbed_into_with_mixed_dtypes_sharing_memory_equals_one_entry_after_another(seed, foreach):
    """Random entries over a few tensors of every dtype -- 16-bit ones, float64 ones, float32 views
    of one buffer -- each entry's buffer, weight and direction drawn from them: the same bits as
    one entry after another."""
    rng = random.Random(seed)
    dtypes = [torch.float32, torch.float32, torch.float32, torch.float64, torch.float64, torch.float16, torch.bfloat16]
    for _ in range(100):
        generator = torch.Generator().manual_seed(rng.randrange(2**31))
        values = [torch.randn(4, generator=generator).to(dtype) for dtype in dtypes]
        picks = [
            (*(rng.randrange(len(dtypes)) for _ in range(3)), rng.choice((0.5, 0.25)))  # b, w, d, s
            for _ in range(rng.randrange(1, 7))
        ]

        def world():
            joined = torch.cat(values[:2])  # two float32 tensors: views of one storage
            tensors = [joined[:4], joined[4:]] + [t.clone() for t in values[2:]]
            return tensors, [(tensors[b], tensors[w], tensors[d], s) for b, w, d, s in picks]

        expected, entries = world()
        _one_entry_after_another(entries)
        got, entries = world()
        buffers, params, directions, scales = (list(column) for column in zip(*entries))
        perturbed_into_(buffers, params, directions, scales, foreach=foreach)
        for tensor, want in zip(got, expected):
            assert torch.equal(tensor, want), picks


@torch.no_grad()
def test_perturbed_into_keeps_one_list_per_dtype_unless_entries_taken_out_of_order_share_memory(monkeypatch):
    """Strict order (runs of consecutive entries) only where widened or other-dtype entries, taken
    apart, share a storage with the others: not for one dtype, nor for mixed dtypes apart."""
    import samgria.functional.perturb as perturb

    taken = []
    original = perturb._runs_in_order
    monkeypatch.setattr(perturb, "_runs_in_order", lambda *args: taken.append(1) or original(*args))
    params = [torch.ones(4), torch.ones(4, dtype=torch.float64), torch.ones(4), torch.ones(4, dtype=torch.float16)]
    directions = [torch.ones(4), torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), torch.ones(4)]
    perturbed_into_(params[:1] + params[2:3], params[:1] + params[2:3], directions[:1] * 2, [0.5, 0.5])
    perturbed_into_(params, params, directions, [0.5] * 4)  # in place, nothing shared
    perturbed_into_([torch.empty(4) for _ in params], params, directions, [0.5] * 4)
    assert taken == []
    perturbed_into_([params[1].float(), params[0]], [params[0], params[2]], directions[2:], [0.5, 0.5])
    assert taken == []  # both widened: taken in order
    perturbed_into_([torch.empty(4), params[0]], [params[0], params[2]], directions[::2], [0.5, 0.5])
    assert taken == [1]  # the widened entry 1 writes the weight that entry 0 reads


def test_perturbed_into_under_grad_mode_refuses_weights_that_require_grad_as_torch_add_does():
    weights = torch.ones(3, requires_grad=True)
    buffer = torch.empty(3)
    with pytest.raises(RuntimeError, match="don't support automatic differentiation"):
        perturbed_into_([buffer], [weights], [torch.ones(3)], [0.5])


def test_perturbed_into_rejects_lists_of_other_lengths():
    weights = [torch.zeros(2), torch.zeros(2)]
    with pytest.raises(ValueError, match=r"directions must have one entry per parameter, got 1 for 2"):
        perturbed_into_([torch.empty(2), torch.empty(2)], weights, [torch.ones(2)], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"scales must have one entry per parameter, got 3 for 2"):
        add_directions_(weights, [torch.ones(2), torch.ones(2)], [1.0, 1.0, 1.0])


def test_group_indices_by_device_and_dtype_keeps_each_dtype_apart_in_order():
    tensors = [torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.zeros(2), torch.zeros(1, dtype=torch.float16)]
    groups = group_indices_by_device_and_dtype(tensors)
    cpu = torch.device("cpu")
    assert groups == {(cpu, torch.float32): [0, 2], (cpu, torch.float64): [1], (cpu, torch.float16): [3]}
    assert group_indices_by_device_and_dtype(tensors[:1] + tensors[2:3]) == {(cpu, torch.float32): [0, 1]}
    assert group_indices_by_device_and_dtype([]) == {}


# -- mul, mul_, adaptive_scaling: values against a float64 loop written here, both paths --------------------------
VALUE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64]


def _values(dtype: torch.dtype, seed: int = 3) -> list[torch.Tensor]:
    """A list with a transposed view, a strided column, a contiguous tensor, a scalar and an empty
    tensor: every layout a caller may pass."""
    generator = torch.Generator().manual_seed(seed)
    real = torch.float32 if dtype.is_complex else dtype

    def draw(*shape: int) -> torch.Tensor:
        values = torch.randn(*shape, generator=generator).to(real)
        if dtype.is_complex:
            values = torch.complex(values, torch.randn(*shape, generator=generator).to(real))
        return values

    matrix, grid = draw(4, 3), draw(5, 6)
    tensors = [matrix.t(), grid[:, 2], draw(7), draw(()), draw(0)]
    assert not tensors[0].is_contiguous() and not tensors[1].is_contiguous()
    return tensors


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
def test_mul_and_mul_in_place_equal_a_float64_product_on_both_paths(dtype):
    tensors, factors = _values(dtype), _values(dtype, seed=4)
    wide = torch.complex128 if dtype.is_complex else torch.float64
    exact = [t.to(wide) * f.to(wide) for t, f in zip(tensors, factors)]
    results = {}
    for foreach in (True, False):
        originals = [t.clone() for t in tensors]
        products = mul(tensors, factors, foreach=foreach)
        for tensor, original in zip(tensors, originals):
            assert torch.equal(tensor, original)  # out of place
        buffers = [t.clone() for t in tensors]
        mul_(buffers, factors, foreach=foreach)
        for got, in_place, want in zip(products, buffers, exact):
            assert_rounded_once(got, want, dtype)
            assert_rounded_once(in_place, want, dtype)
        results[foreach] = products, buffers
    for fast, reference in zip(results[True], results[False]):
        for fast_tensor, reference_tensor in zip(fast, reference):
            assert torch.equal(fast_tensor, reference_tensor)  # bit for bit
    assert mul([], [], foreach=True) == mul([], [], foreach=False) == []
    mul_([], [], foreach=True)
    mul_([], [], foreach=False)


def test_mul_in_place_writes_through_a_non_contiguous_view():
    for foreach in (True, False):
        base = torch.arange(12.0).reshape(3, 4)
        mul_([base.t(), base[0]], [torch.full((4, 3), 2.0), torch.full((4,), 3.0)], foreach=foreach)
        want = torch.arange(12.0).reshape(3, 4) * 2
        want[0] *= 3
        assert torch.equal(base, want)


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
def test_adaptive_scaling_equals_abs_plus_eta_in_float64_on_both_paths(dtype):
    params = _values(dtype)
    etas = [0.5, 0.125, 0.25, 0.0, 1.0]  # exact in every dtype: |w| + eta rounds once
    results = {}
    for foreach in (True, False):
        scalings = adaptive_scaling(params, etas, foreach=foreach)
        for got, param, eta in zip(scalings, params, etas):
            exact = param.to(torch.complex128 if dtype.is_complex else torch.float64).abs() + eta
            real = torch.float32 if dtype.is_complex else dtype  # |w| of a complex w is real
            assert got.dtype == real
            if dtype.is_complex:  # the modulus itself is rounded: close, not equal
                torch.testing.assert_close(got, exact.to(real), rtol=2e-7, atol=0)
            else:
                assert torch.equal(got, exact.to(real))
        results[foreach] = scalings
    for fast, reference in zip(results[True], results[False]):
        assert torch.equal(fast, reference)
    assert adaptive_scaling([], [], foreach=True) == adaptive_scaling([], [], foreach=False) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("foreach", [True, False])
def test_add_directions_equals_a_float64_sum_in_16_bit_and_complex_dtypes(dtype, foreach):
    params, directions = _values(dtype), _values(dtype, seed=5)
    scales = [0.5, 0.25, 2.0, 1.0, 0.5]  # powers of two: s * d is exact
    wide = torch.complex128 if dtype.is_complex else torch.float64
    exact = [w.to(wide) + s * d.to(wide) for w, d, s in zip(params, directions, scales)]
    add_directions_(params, directions, scales, foreach=foreach)
    for got, want in zip(params, exact):
        assert_rounded_once(got, want, dtype)
    add_directions_([], [], [], foreach=foreach)


# -- bad inputs: one message shape from one helper -----------------------------------------------------------------
@pytest.mark.parametrize("foreach", [True, False])
def test_every_perturbation_kernel_rejects_lists_of_other_lengths(foreach):
    two = [torch.ones(2), torch.ones(2)]
    one = [torch.ones(2)]
    with pytest.raises(ValueError, match=r"^factors must have one entry per tensor, got 1 for 2$"):
        mul(two, one, foreach=foreach)
    with pytest.raises(ValueError, match=r"^factors must have one entry per buffer, got 1 for 2$"):
        mul_(two, one, foreach=foreach)
    with pytest.raises(ValueError, match=r"^factors must have one entry per buffer, got 2 for 1$"):
        mul_(one, two, foreach=foreach)
    with pytest.raises(ValueError, match=r"^etas must have one entry per parameter, got 1 for 2$"):
        adaptive_scaling(two, [0.1], foreach=foreach)
    with pytest.raises(ValueError, match=r"^buffers must have one entry per parameter, got 1 for 2$"):
        perturbed_into_(one, two, two, [1.0, 1.0], foreach=foreach)
    assert torch.equal(two[0], torch.ones(2)) and torch.equal(two[1], torch.ones(2))  # nothing written


@pytest.mark.parametrize("foreach", [True, False])
def test_perturbed_into_refuses_buffers_and_directions_of_another_shape_on_both_paths(foreach):
    """The reference path's out= resized a (12,) buffer to (3, 4) where the foreach path raised
    torch's size error, and a (1,) direction was broadcast over its parameter on both paths."""
    weights = torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"^buffers\[0\] must have the shape of params\[0\], \(3, 4\), got \(12,\)$"):
        perturbed_into_([torch.zeros(12)], [weights], [torch.ones(3, 4)], [1.0], foreach=foreach)
    with pytest.raises(ValueError, match=r"^directions\[1\] must have the shape of params\[1\], \(3, 4\), got \(1,\)$"):
        add_directions_([torch.ones(2), weights], [torch.ones(2), torch.full((1,), 2.0)], [1.0, 1.0], foreach=foreach)
    assert torch.equal(weights, torch.ones(3, 4))  # nothing written


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_every_perturbation_kernel_rejects_integer_and_bool_tensors(dtype, foreach):
    """An integer weight would truncate ``w + s d`` silently (``[1, 2] + 0.5 [1, 1]`` left ``[1, 2]``)."""
    bad = torch.tensor([1, 0], dtype=dtype)
    good = torch.ones(2)
    name = str(dtype)
    with pytest.raises(TypeError, match=rf"^params\[1\] must be a floating-point or complex tensor, got a {name} tensor$"):
        add_directions_([good.clone(), bad], [torch.ones(2), torch.ones(2)], [0.5, 0.5], foreach=foreach)
    with pytest.raises(TypeError, match=rf"^params\[0\] must be a floating-point or complex tensor, got a {name} tensor$"):
        perturbed_into_([torch.empty(2)], [bad], [torch.ones(2)], [0.5], foreach=foreach)
    with pytest.raises(TypeError, match=rf"^buffers\[0\] must be a floating-point or complex tensor, got a {name} tensor$"):
        perturbed_into_([bad.clone()], [good], [torch.ones(2)], [0.5], foreach=foreach)
    with pytest.raises(TypeError, match=rf"^tensors\[0\] must be a floating-point or complex tensor, got a {name} tensor$"):
        mul([bad], [good], foreach=foreach)
    with pytest.raises(TypeError, match=rf"^buffers\[1\] must be a floating-point or complex tensor, got a {name} tensor$"):
        mul_([good, bad], [good, good], foreach=foreach)
    with pytest.raises(TypeError, match=rf"^params\[0\] must be a floating-point or complex tensor, got a {name} tensor$"):
        adaptive_scaling([bad], [0.1], foreach=foreach)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "dtype, eta, largest",
    [
        (torch.float16, 1e5, "65504.0"),
        (torch.float16, -65520.0, "65504.0"),
        (torch.bfloat16, 1e39, "3.3895313892515355e+38"),
        (torch.float32, 1e39, "3.4028234663852886e+38"),
        (torch.complex64, -1e39, "3.4028234663852886e+38"),
    ],
)
def test_adaptive_scaling_refuses_a_finite_eta_beyond_its_weights_dtype(dtype, eta, largest, foreach):
    """torch rounded it to infinity silently (float16: ``|w| + 1e5`` was ``inf``)."""
    params = [torch.ones(2), torch.ones(3, dtype=dtype), torch.ones(2, dtype=dtype)]
    message = (
        rf"^etas\[1\] must fit in params\[1\]'s dtype {dtype} \(at most {re.escape(largest)} in magnitude, "
        rf"or infinite, or NaN\), got {re.escape(repr(eta))}$"
    )
    with pytest.raises(ValueError, match=message):
        adaptive_scaling(params, [0.5, eta, 0.5], foreach=foreach)
    with pytest.raises(ValueError, match=message):  # a NaN eta before it does not hide it
        adaptive_scaling(params, [0.5, eta, math.nan], foreach=foreach)


@pytest.mark.parametrize("foreach", [True, False])
def test_adaptive_scaling_takes_etas_within_range_and_non_finite_ones_as_torch_add(foreach):
    half = torch.ones(2, dtype=torch.float16)
    largest, = adaptive_scaling([half * 0], [65504.0], foreach=foreach)
    assert torch.equal(largest, torch.full((2,), 65504.0, dtype=torch.float16))
    wide, = adaptive_scaling([torch.ones(2, dtype=torch.float64)], [1e300], foreach=foreach)  # any float fits
    assert torch.equal(wide, torch.full((2,), 1e300, dtype=torch.float64))
    infinite, not_a_number = adaptive_scaling([half, half], [math.inf, math.nan], foreach=foreach)
    assert bool(torch.isposinf(infinite).all()) and bool(torch.isnan(not_a_number).all())


def test_add_directions_names_the_first_integer_weight_among_mixed_dtypes():
    params = [torch.ones(2), torch.ones(2, dtype=torch.float64), torch.tensor([1, 2]), torch.tensor([1], dtype=torch.int32)]
    before = [p.clone() for p in params]
    for foreach in (True, False):
        with pytest.raises(TypeError, match=r"^params\[2\] must be .*, got a torch.int64 tensor$"):
            add_directions_(params, [torch.ones_like(p, dtype=torch.float32) for p in params], [0.5] * 4, foreach=foreach)
        for param, original in zip(params, before):
            assert torch.equal(param, original)  # checked before anything is written


# -- complex values into real tensors, shapes of factors, etas that are not real numbers ---------------------------
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_perturbation_kernels_refuse_a_complex_value_written_into_a_real_tensor_before_writing(dtype, foreach):
    """A 16-bit weight (and a float32 one on the widened path) kept the real part of a complex
    direction and dropped the imaginary one silently, where torch's add_ refuses it."""
    complex_ = torch.tensor([1 + 5j, 2 + 7j])
    first, real = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=dtype)
    message = r"^directions\[1\] must be real where params\[1\] is real, got a torch.complex64 tensor$"
    with pytest.raises(TypeError, match=message):
        add_directions_([first, real], [torch.ones(2, dtype=torch.float64), complex_], [1.0, 1.0], foreach=foreach)
    buffers = [torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=dtype)]
    with pytest.raises(TypeError, match=message.replace("params", "buffers")):
        perturbed_into_(buffers, [first, real], [torch.ones(2, dtype=torch.float64), complex_], [1.0, 1.0], foreach=foreach)
    with pytest.raises(TypeError, match=r"^params\[1\] must be real where buffers\[1\] is real, got a torch.complex64 tensor$"):
        perturbed_into_(buffers, [first, complex_], [torch.ones(2, dtype=torch.float64), torch.ones(2)], [1.0, 1.0], foreach=foreach)
    with pytest.raises(TypeError, match=r"^factors\[1\] must be real where buffers\[1\] is real, got a torch.complex64 tensor$"):
        mul_([first, real], [torch.ones(2, dtype=torch.float64), complex_], foreach=foreach)
    for tensor in [first, real] + buffers:
        assert torch.equal(tensor, torch.zeros(2, dtype=tensor.dtype))  # nothing written
    # A real direction into a complex weight stays allowed (torch promotes): w + s d exactly.
    weights = [torch.tensor([1 + 5j, 2 + 7j])]
    add_directions_(weights, [torch.tensor([0.5, -0.25], dtype=dtype)], [2.0], foreach=foreach)
    assert torch.equal(weights[0], torch.tensor([2 + 5j, 1.5 + 7j]))


@pytest.mark.parametrize("foreach", [True, False])
def test_perturbation_kernels_refuse_a_tensor_on_another_device_before_writing(foreach):
    """A direction on another device ("meta" here, as a CPU one for CUDA weights) failed in torch
    after the entries before it were perturbed; a factor there was taken silently. A 0-dim CPU
    tensor, which torch takes with a tensor on any device, stays allowed."""
    weights, buffers = [torch.ones(3), torch.ones(3)], [torch.zeros(3), torch.zeros(3)]
    directions = [torch.ones(3), torch.ones(3, device="meta")]
    device_rule = r"\(or be a 0-dim CPU tensor\), got a tensor on "
    with pytest.raises(ValueError, match=r"^directions\[1\] must be on the device of params\[1\], cpu " + device_rule + "meta$"):
        add_directions_(weights, directions, [1.0, 1.0], foreach=foreach)
    with pytest.raises(ValueError, match=r"^directions\[1\] must be on the device of buffers\[1\], cpu " + device_rule + "meta$"):
        perturbed_into_(buffers, weights, directions, [1.0, 1.0], foreach=foreach)
    with pytest.raises(ValueError, match=r"^params\[1\] must be on the device of buffers\[1\], meta " + device_rule + "cpu$"):
        perturbed_into_([buffers[0], torch.empty(3, device="meta")], weights, weights, [1.0, 1.0], foreach=foreach)
    with pytest.raises(ValueError, match=r"^factors\[1\] must be on the device of buffers\[1\], cpu " + device_rule + "meta$"):
        mul_(weights, [torch.full((3,), 2.0), torch.ones(3, device="meta")], foreach=foreach)
    assert all(torch.equal(w, torch.ones(3)) for w in weights)  # nothing written
    assert all(torch.equal(b, torch.zeros(3)) for b in buffers)
    meta = torch.empty((), device="meta")
    add_directions_([meta], [torch.tensor(1.0)], [1.0], foreach=foreach)
    mul_([meta], [torch.tensor(2.0)], foreach=foreach)


@pytest.mark.parametrize("foreach", [True, False])
def test_in_place_kernels_refuse_a_target_whose_elements_share_memory_before_writing(foreach):
    """An ``expand`` view (one element for every position along a dimension) among the tensors
    written was refused by torch as it reached it, after the entries before it were written."""
    expanded = torch.zeros(1).expand(3)
    rule = r" must be a tensor whose elements do not share memory, got one of shape \(3,\) and strides \(0,\)$"
    weights, buffers = [torch.ones(3), torch.ones(3)], [torch.zeros(3), expanded]
    with pytest.raises(ValueError, match=r"^buffers\[1\]" + rule):
        perturbed_into_(buffers, weights, weights, [1.0, 1.0], foreach=foreach)
    with pytest.raises(ValueError, match=r"^params\[1\]" + rule):
        add_directions_([weights[0], expanded], weights, [1.0, 1.0], foreach=foreach)
    with pytest.raises(ValueError, match=r"^buffers\[1\]" + rule):
        mul_([weights[0], expanded], [torch.full((3,), 2.0)] * 2, foreach=foreach)
    assert all(torch.equal(w, torch.ones(3)) for w in weights)  # nothing written
    assert torch.equal(buffers[0], torch.zeros(3)) and torch.equal(expanded, torch.zeros(3))
    readable = [torch.ones(1).expand(3)]  # read only (a broadcast direction or weight): allowed
    out = [torch.zeros(3)]
    perturbed_into_(out, readable, readable, [2.0], foreach=foreach)
    assert torch.equal(out[0], torch.full((3,), 3.0))


@pytest.mark.parametrize("foreach", [True, False])
def test_in_place_kernels_refuse_a_target_torch_cannot_write_before_writing(foreach):
    """An inference tensor outside ``torch.inference_mode()``, and a leaf that requires grad while
    grad mode is on (any tensor that requires grad for the ``out=`` kernels), among the targets:
    torch refused it as it reached it, after the entries before it were written."""
    with torch.inference_mode():
        inference = torch.zeros(3)
    leaf = torch.zeros(3, requires_grad=True)
    graph_output = leaf * 1.0  # not a leaf: mul_ writes it (recorded), torch.add(out=) cannot
    inference_rule = r" must be a tensor that is not an inference tensor outside torch.inference_mode\(\)"
    grad_rule = r" must be a tensor that does not require grad while grad mode is on \(write under torch.no_grad\(\)\), got "
    weights, buffers = [torch.ones(3), torch.ones(3)], [torch.zeros(3), torch.zeros(3)]
    for target, name, rule in [
        (inference, "buffers", inference_rule),
        (leaf, "buffers", grad_rule + "a leaf tensor that requires grad$"),
        (graph_output, "buffers", grad_rule + "a tensor that requires grad$"),
    ]:
        with pytest.raises(ValueError, match=r"^" + name + r"\[1\]" + rule):
            perturbed_into_([buffers[0], target], weights, weights, [1.0, 1.0], foreach=foreach)
    with pytest.raises(ValueError, match=r"^params\[1\]" + inference_rule):
        add_directions_([weights[0], inference], weights, [1.0, 1.0], foreach=foreach)
    with pytest.raises(ValueError, match=r"^params\[1\]" + grad_rule + "a leaf tensor that requires grad$"):
        add_directions_([weights[0], leaf], weights, [1.0, 1.0], foreach=foreach)
    with pytest.raises(ValueError, match=r"^buffers\[1\]" + inference_rule):
        mul_([weights[0], inference], [torch.full((3,), 2.0)] * 2, foreach=foreach)
    with pytest.raises(ValueError, match=r"^buffers\[1\]" + grad_rule + "a leaf tensor that requires grad$"):
        mul_([weights[0], leaf], [torch.full((3,), 2.0)] * 2, foreach=foreach)
    assert all(torch.equal(w, torch.ones(3)) for w in weights)  # nothing written
    assert torch.equal(buffers[0], torch.zeros(3))
    # What torch writes stays allowed: under no_grad, inside inference_mode, and mul_ into a
    # non-leaf that requires grad (autograd records it).
    with torch.no_grad():
        add_directions_([weights[0], leaf], [torch.ones(3)] * 2, [1.0, 1.0], foreach=foreach)
    with torch.inference_mode():
        add_directions_([inference], [torch.ones(3)], [2.0], foreach=foreach)
    mul_([graph_output], [torch.full((3,), 2.0)], foreach=foreach)
    assert torch.equal(leaf.detach(), torch.ones(3)) and torch.equal(inference, torch.full((3,), 2.0))
    assert graph_output.grad_fn is not None and torch.equal(graph_output.detach(), torch.zeros(3))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize("foreach", [True, False])
def test_in_place_kernels_write_sparse_targets_as_torch_does(foreach):
    """A sparse COO target was refused as "elements that share memory" (torch reports strides 0 for
    it) and a CSR one raised torch's "Sparse CSR tensors do not have strides"; torch writes both."""
    for to_layout in (torch.Tensor.to_sparse, torch.Tensor.to_sparse_csr):
        dense = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
        sparse = to_layout(dense.clone())
        mul_([torch.ones(2), sparse], [torch.full((2,), 3.0), to_layout(torch.full((2, 2), 3.0))], foreach=foreach)
        assert torch.equal(sparse.to_dense(), dense * 3)
        add_directions_([sparse], [to_layout(dense.clone())], [0.5], foreach=foreach)
        assert torch.equal(sparse.to_dense(), dense * 3.5)


@pytest.mark.parametrize("foreach", [True, False])
def test_mul_and_mul_in_place_refuse_a_factor_of_another_shape_before_writing(foreach):
    """A (1,) factor was broadcast silently; a longer one failed after the entries before it were
    multiplied."""
    first, second = torch.ones(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"^factors\[0\] must have the shape of buffers\[0\], \(3,\), got \(1,\)$"):
        mul_([first, second], [torch.full((1,), 5.0), torch.ones(3)], foreach=foreach)
    with pytest.raises(ValueError, match=r"^factors\[1\] must have the shape of buffers\[1\], \(3,\), got \(2,\)$"):
        mul_([first, second], [torch.full((3,), 5.0), torch.ones(2)], foreach=foreach)
    assert torch.equal(first, torch.ones(3)) and torch.equal(second, torch.ones(3))  # nothing written
    with pytest.raises(ValueError, match=r"^factors\[0\] must have the shape of tensors\[0\], \(3,\), got \(1,\)$"):
        mul([first], [torch.full((1,), 5.0)], foreach=foreach)
    with pytest.raises(ValueError, match=r"^factors\[0\] must have the shape of tensors\[0\], \(\), got \(3,\)$"):
        mul([torch.ones(())], [torch.ones(3)], foreach=foreach)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "eta", ["0.1", True, 1j, None, torch.tensor([0.1]), torch.tensor(1j), torch.tensor(True)], ids=repr
)
def test_adaptive_scaling_names_an_eta_that_is_neither_a_real_number_nor_a_0_dim_real_tensor(eta, foreach):
    """A string reached abs() ("bad operand type for abs(): 'str'") or torch's own message."""
    message = rf"^etas\[1\] must be a real number or a 0-dim real tensor, got {re.escape(repr(eta))}$"
    with pytest.raises(TypeError, match=message):
        adaptive_scaling([torch.ones(2), torch.ones(2, dtype=torch.float64)], [0.5, eta], foreach=foreach)


@pytest.mark.parametrize("foreach", [True, False])
def test_adaptive_scaling_refuses_an_integer_eta_beyond_a_float(foreach):
    with pytest.raises(ValueError, match=r"^etas\[0\] must be a real number that fits in a float or a 0-dim real tensor, got 1000"):
        adaptive_scaling([torch.ones(2, dtype=torch.float64)], [10**400], foreach=foreach)


@pytest.mark.parametrize("foreach", [True, False])
def test_adaptive_scaling_takes_0_dim_tensor_etas_among_numbers(foreach):
    """The foreach path refused a list mixing numbers and tensors (torch's "expected Tensor")."""
    numpy = pytest.importorskip("numpy")
    params = [torch.tensor([-1.5, 2.0]), torch.tensor([3.0]), torch.tensor(-0.5, dtype=torch.float64)]
    etas = [0.25, torch.tensor(0.5, dtype=torch.float64), numpy.float32(0.125)]  # one float32 group
    scalings = adaptive_scaling(params, etas, foreach=foreach)
    want = [torch.tensor([1.75, 2.25]), torch.tensor([3.5]), torch.tensor(0.625, dtype=torch.float64)]
    for got, expected in zip(scalings, want):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


# -- scales: checked, every one, before anything is written --------------------------------------------------------
def _two_groups():
    """A float64 entry (written first, as its own dtype group) and a float32 one."""
    params = [torch.zeros(2, dtype=torch.float64), torch.zeros(3)]
    directions = [torch.ones(2, dtype=torch.float64), torch.ones(3)]
    return params, directions


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("scale", ["x", True, 1j, None, torch.tensor([1.0]), torch.tensor(True)], ids=repr)
def test_perturbation_kernels_name_a_scale_that_is_not_a_real_number_before_writing(scale, foreach):
    """The first dtype group was written, then torch raised its own error ("add(): argument
    'alpha' must be Number, not str"; "Boolean alpha only supported ..." for ``True``)."""
    message = rf"^scales\[1\] must be a real number or a 0-dim real tensor, got {re.escape(repr(scale))}$"
    params, directions = _two_groups()
    with pytest.raises(TypeError, match=message):
        add_directions_(params, directions, [1.0, scale], foreach=foreach)
    buffers = [torch.full((2,), 7.0, dtype=torch.float64), torch.full((3,), 7.0)]
    with pytest.raises(TypeError, match=message):
        perturbed_into_(buffers, params, directions, [1.0, scale], foreach=foreach)
    assert torch.equal(params[0], torch.zeros(2, dtype=torch.float64)) and torch.equal(params[1], torch.zeros(3))
    assert torch.equal(buffers[0], torch.full((2,), 7.0, dtype=torch.float64)) and torch.equal(buffers[1], torch.full((3,), 7.0))


@pytest.mark.parametrize("foreach", [True, False])
def test_perturbation_kernels_refuse_a_scale_beyond_a_float_or_the_computing_dtype_before_writing(foreach):
    """``10**400`` raised torch's OverflowError, and 1e300 for a float32 (or 16-bit) entry
    torch's "value cannot be converted to type float without overflow", after the first dtype
    group was written."""
    params, directions = _two_groups()
    with pytest.raises(ValueError, match=r"^scales\[1\] must be a real number that fits in a float or a 0-dim real tensor, got 1000+$"):
        add_directions_(params, directions, [1.0, 10**400], foreach=foreach)
    rule = r"\(at most 3\.4028234663852886e\+38 in magnitude, or infinite, or NaN\)"
    with pytest.raises(ValueError, match=rf"^scales\[1\] must fit in the dtype params\[1\] is computed in, torch.float32 {rule}, got -1e\+300$"):
        add_directions_(params, directions, [1.0, -1e300], foreach=foreach)
    half = [torch.zeros(2, dtype=torch.float64), torch.zeros(3, dtype=torch.float16)]
    buffers = [torch.full((2,), 7.0, dtype=torch.float64), torch.full((3,), 7.0, dtype=torch.float16)]
    half_directions = [torch.ones(2, dtype=torch.float64), torch.ones(3, dtype=torch.float16)]
    with pytest.raises(ValueError, match=rf"^scales\[1\] must fit in the dtype params\[1\] is computed in, torch.float32 {rule}, got 1e\+39$"):
        perturbed_into_(buffers, half, half_directions, [1.0, 1e39], foreach=foreach)
    assert torch.equal(params[0], torch.zeros(2, dtype=torch.float64)) and torch.equal(params[1], torch.zeros(3))
    assert torch.equal(half[0], torch.zeros(2, dtype=torch.float64)) and torch.equal(half[1], torch.zeros(3, dtype=torch.float16))
    assert torch.equal(buffers[0], torch.full((2,), 7.0, dtype=torch.float64))
    assert torch.equal(buffers[1], torch.full((3,), 7.0, dtype=torch.float16))


@pytest.mark.parametrize("foreach", [True, False])
def test_perturbation_kernels_take_every_scale_torch_add_computes_with(foreach):
    """NumPy scalars, 0-dim tensors, NaN and inf, 1e300 where the entry is computed in float64
    (a float64 direction), and an integer beyond int64 (torch: "int too big to convert") as the
    float it rounds to: each entry as one ``torch.add`` in float64 writes it."""
    numpy = pytest.importorskip("numpy")
    params = [torch.full((2,), 0.5) for _ in range(6)] + [torch.zeros(2, dtype=torch.float64)]
    directions = [torch.tensor([1.0, -2.0])] * 6 + [torch.tensor([1.0, -2.0], dtype=torch.float64)]
    directions[4] = torch.tensor([1.0, -2.0], dtype=torch.float64)  # float32 + s * float64: in float64
    scales = [numpy.float64(0.25), torch.tensor(-3.0), math.nan, math.inf, 1e300, numpy.int64(3), 2**70]
    want = [torch.add(p.double(), d.double(), alpha=float(s)).to(p.dtype) for p, d, s in zip(params, directions, scales)]
    add_directions_(params, directions, scales, foreach=foreach)
    for got, expected in zip(params, want):
        assert torch.equal(got, expected) or (bool(got.isnan().all()) and bool(expected.isnan().all()))


@pytest.mark.parametrize("foreach", [True, False])
def test_perturbation_kernels_refuse_a_tensor_or_a_number_for_a_list(foreach):
    """A tensor was taken as the list of its rows (mul returned a list of rows), a number for the
    scales or etas failed in len() naming nothing. A 1-D tensor of scales stays one per entry."""
    weights, other = torch.ones(2, 3), torch.full((2, 3), 2.0)
    rows = r"got a tensor of shape \(2, 3\)$"
    with pytest.raises(TypeError, match=r"^tensors must be a sequence of tensors, " + rows):
        mul(weights, other, foreach=foreach)
    with pytest.raises(TypeError, match=r"^factors must be a sequence of tensors, " + rows):
        mul_([weights], other, foreach=foreach)
    with pytest.raises(TypeError, match=r"^params must be a sequence of tensors, " + rows):
        add_directions_(weights, other, [1.0, 1.0], foreach=foreach)
    with pytest.raises(TypeError, match=r"^buffers must be a sequence of tensors, " + rows):
        perturbed_into_(other, [weights], [weights], [1.0], foreach=foreach)
    with pytest.raises(TypeError, match=r"^params must be a sequence of tensors, " + rows):
        adaptive_scaling(weights, [0.1, 0.1], foreach=foreach)
    with pytest.raises(TypeError, match=r"^scales must be a sequence of numbers, got 0.5$"):
        add_directions_([weights], [other], 0.5, foreach=foreach)
    with pytest.raises(TypeError, match=r"^scales must be a sequence of numbers, got a tensor of shape \(\)$"):
        add_directions_([weights], [other], torch.tensor(0.5), foreach=foreach)
    with pytest.raises(TypeError, match=r"^etas must be a sequence of numbers, got 0.1$"):
        adaptive_scaling([weights], 0.1, foreach=foreach)
    assert torch.equal(weights, torch.ones(2, 3)) and torch.equal(other, torch.full((2, 3), 2.0))  # nothing written
    add_directions_([weights], [other], torch.tensor([0.5]), foreach=foreach)
    assert torch.equal(weights, torch.full((2, 3), 2.0))


@pytest.mark.parametrize("foreach", [True, False])
def test_mul_and_mul_in_place_name_a_factor_that_is_not_a_tensor(foreach):
    """A number among the factors raised AttributeError ("'float' object has no attribute 'shape'")."""
    buffers = [torch.ones(2), torch.ones(3)]
    with pytest.raises(TypeError, match=r"^factors\[1\] must be a torch.Tensor, got 3.0$"):
        mul(buffers, [torch.ones(2), 3.0], foreach=foreach)
    with pytest.raises(TypeError, match=r"^factors\[0\] must be a torch.Tensor, got 2.0$"):
        mul_(buffers, [2.0, torch.ones(3)], foreach=foreach)
    with pytest.raises(TypeError, match=r"^buffers\[1\] must be a torch.Tensor, got \[1.0\]$"):
        mul_([torch.ones(2), [1.0]], [torch.ones(2), torch.ones(1)], foreach=foreach)
    with pytest.raises(TypeError, match=r"^directions\[0\] must be a torch.Tensor, got 1.0$"):
        add_directions_(buffers, [1.0, torch.ones(3)], [1.0, 1.0], foreach=foreach)
    with pytest.raises(TypeError, match=r"^params\[0\] must be a torch.Tensor, got None$"):
        adaptive_scaling([None], [0.1], foreach=foreach)
    assert torch.equal(buffers[0], torch.ones(2)) and torch.equal(buffers[1], torch.ones(3))


@pytest.mark.parametrize("flag", ["yes", None, 1])
def test_perturbation_kernels_refuse_a_foreach_that_is_not_a_bool(flag):
    """Any truthy value took the foreach path, any falsy one the reference path."""
    params, directions = _two_groups()
    message = rf"^foreach must be a bool, got {re.escape(repr(flag))}$"
    for call in (
        lambda: add_directions_(params, directions, [1.0, 1.0], foreach=flag),
        lambda: perturbed_into_(params, params, directions, [1.0, 1.0], foreach=flag),
        lambda: mul_(params, directions, foreach=flag),
        lambda: mul(params, directions, foreach=flag),
        lambda: adaptive_scaling(params, [0.1, 0.1], foreach=flag),
    ):
        with pytest.raises(TypeError, match=message):
            call()
    assert torch.equal(params[0], torch.zeros(2, dtype=torch.float64)) and torch.equal(params[1], torch.zeros(3))


def test_adaptive_scaling_paths_agree_bitwise_with_zero_etas_under_flush_denormal():
    """A zero eta is not added (|w| + 0 is |w|) on the foreach path: the per-tensor path must not
    add it either, or torch.set_flush_denormal(True) flushes a subnormal |w| to 0 on one path only."""
    # built before the mode is on (the conversion from Python floats would flush them); 16 elements:
    # torch's vectorised abs keeps a subnormal (its scalar loop may flush it)
    params = [torch.tensor([1e-40, -1e-41, 1.0] * 16), torch.tensor([2e-40, 3.0] * 8), torch.full((16,), -1e-40)]
    if not torch.set_flush_denormal(True):
        pytest.skip("no flush-denormal mode on this CPU")
    try:
        if any(p.abs().count_nonzero() != p.count_nonzero() for p in params):
            pytest.skip("torch's abs flushes subnormals on this CPU")
        for etas in ([0.0, 0.0, 0.0], [0.0, 0.5, -0.0]):
            fast = adaptive_scaling(params, etas, foreach=True)
            slow = adaptive_scaling(params, etas, foreach=False)
            for a, b, p, eta in zip(fast, slow, params, etas):
                expected = p.abs() if eta == 0 else p.abs() + eta
                assert torch.equal(a.view(torch.int32), expected.view(torch.int32))
                assert torch.equal(b.view(torch.int32), expected.view(torch.int32))
    finally:
        torch.set_flush_denormal(False)
