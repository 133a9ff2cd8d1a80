"""Small gradient transforms against torch's own functions, per param group."""

from __future__ import annotations

import decimal
import math
import re
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from samgria import ASAM, ClampGrad, ClipGradNorm, GradSign, NormalizeGrad, ScaleGrad, SparsifyGrad, Transform, TransformingOptimizer


def grads_after(transform, groups_kwargs=({}, {})):
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(4, 3, dtype=torch.float64)), nn.Parameter(torch.randn(5, dtype=torch.float64))
    groups = [{"params": [a], **groups_kwargs[0]}, {"params": [b], **groups_kwargs[1]}]
    optimizer = TransformingOptimizer(groups, torch.optim.SGD, lr=0.0, transforms=[transform])

    def closure():
        optimizer.zero_grad()
        loss = (a.sin() * 3).sum() + (b**3).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        raw_a, raw_b = torch.autograd.grad((a.sin() * 3).sum() + (b**3).sum(), [a, b])
    optimizer.step(closure)
    return (raw_a, raw_b), (a.grad, b.grad)


def test_clip_grad_norm_per_group_matches_torch():
    (raw_a, raw_b), (got_a, got_b) = grads_after(ClipGradNorm(0.5), ({}, {"max_grad_norm": 100.0}))
    expected_a = raw_a.clone().requires_grad_()
    expected_a.grad = raw_a.clone()
    nn.utils.clip_grad_norm_([expected_a], 0.5)
    torch.testing.assert_close(got_a, expected_a.grad, rtol=1e-12, atol=0)
    assert torch.equal(got_b, raw_b)  # below its group's threshold: untouched


def test_sign_normalize_scale_clamp():
    (raw_a, raw_b), got = grads_after(GradSign())
    assert torch.equal(got[0], raw_a.sign()) and torch.equal(got[1], raw_b.sign())
    (raw_a, raw_b), got = grads_after(NormalizeGrad())
    torch.testing.assert_close(got[0], raw_a / raw_a.norm(), rtol=1e-12, atol=0)
    assert got[1].norm().item() == pytest.approx(1.0, rel=1e-12)
    (raw_a, raw_b), got = grads_after(ScaleGrad(2.0, 0.5), ({}, {"grad_scale": -1.0}))
    torch.testing.assert_close(got[0], 2.0 * raw_a + 0.5, rtol=1e-12, atol=0)
    torch.testing.assert_close(got[1], -raw_b + 0.5, rtol=1e-12, atol=0)
    (raw_a, raw_b), got = grads_after(ClampGrad(-0.5, 1.0), ({}, {"grad_max": 2.0}))
    assert torch.equal(got[0], raw_a.clamp(-0.5, 1.0)) and torch.equal(got[1], raw_b.clamp(-0.5, 2.0))


def test_bad_group_values_are_rejected_at_construction_naming_the_group():
    param = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: grad_max must be a finite number >= grad_min = 0, got -1\.0$"):
        TransformingOptimizer([{"params": [param], "grad_max": -1.0}], torch.optim.SGD, lr=0.1, transforms=[ClampGrad(0.0, 1.0)])
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: max_grad_norm must be a finite number > 0, got -3$"):
        TransformingOptimizer([{"params": [param], "max_grad_norm": -3}], torch.optim.SGD, lr=0.1, transforms=[ClipGradNorm()])
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: grad_scale must be a finite number, got nan$"):
        TransformingOptimizer([{"params": [param], "grad_scale": float("nan")}], torch.optim.SGD, lr=0.1, transforms=[ScaleGrad()])
    with pytest.raises(TypeError, match=r"^param_groups\[0\]: grad_bias must be a finite number, got None$"):
        TransformingOptimizer([{"params": [param], "grad_bias": None}], torch.optim.SGD, lr=0.1, transforms=[ScaleGrad()])


def test_normalize_eps_and_asam_adaptive_group_values_are_checked():
    param = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: eps must be a finite number >= 0, got -1\.0$"):
        TransformingOptimizer([{"params": [param], "eps": -1.0}], torch.optim.SGD, lr=0.1, transforms=[NormalizeGrad()])
    # Beside Adam (which has its own eps) NormalizeGrad's key is qualified, and so is the message.
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: normalize_grad\.eps must be a finite number >= 0, got -1\.0$"):
        TransformingOptimizer([{"params": [param], "normalize_grad.eps": -1.0}], torch.optim.Adam, lr=0.1, transforms=[NormalizeGrad()])
    with pytest.raises(TypeError, match=r"^param_groups\[0\]: adaptive must be a bool, got 'yes'$"):
        TransformingOptimizer([{"params": [param], "adaptive": "yes"}], torch.optim.SGD, lr=0.1, transforms=[ASAM()])


def test_normalize_grad_eps_is_read_per_group_under_short_or_qualified_key():
    (raw_a, raw_b), got = grads_after(NormalizeGrad(eps=0.25), ({}, {"eps": 2.0}))
    torch.testing.assert_close(got[0], raw_a / (raw_a.norm() + 0.25), rtol=1e-12, atol=0)
    torch.testing.assert_close(got[1], raw_b / (raw_b.norm() + 2.0), rtol=1e-12, atol=0)
    param = nn.Parameter(torch.ones(2))
    beside_adam = TransformingOptimizer([{"params": [param], "normalize_grad.eps": 0.5}], torch.optim.Adam, lr=0.1, transforms=[NormalizeGrad()])
    group = beside_adam.param_groups[0]
    assert (group["normalize_grad.eps"], group["eps"]) == (0.5, 1e-8)  # Adam's eps untouched


def test_normalize_grad_norm_order_per_group_matches_torch():
    # p is a per-group key; the default param_ndim=None normalises each whole gradient, as before.
    (raw_a, raw_b), got = grads_after(NormalizeGrad(eps=0.0, p=1), ({}, {"p": float("inf")}))
    torch.testing.assert_close(got[0], raw_a / torch.linalg.vector_norm(raw_a, ord=1), rtol=1e-14, atol=0)
    torch.testing.assert_close(got[1], raw_b / raw_b.abs().max(), rtol=1e-14, atol=0)
    # Per row of the (4, 3) gradient for group 0, whole for group 1.
    (raw_a, raw_b), got = grads_after(NormalizeGrad(eps=0.0), ({"param_ndim": -1}, {}))
    torch.testing.assert_close(got[0], raw_a / raw_a.norm(dim=1, keepdim=True), rtol=1e-14, atol=0)
    torch.testing.assert_close(got[1], raw_b / raw_b.norm(), rtol=1e-14, atol=0)


def test_sparsify_grad_keeps_the_largest_fraction_per_group():
    (raw_a, raw_b), got = grads_after(SparsifyGrad(q=0.25), ({}, {"q": 0.5}))
    for raw, grad, kept in ((raw_a, got[0], 3), (raw_b, got[1], 3)):  # ceil(0.25 * 12), ceil(0.5 * 5)
        top = raw.abs().flatten().topk(kept).indices
        expected = torch.zeros_like(raw).flatten()
        expected[top] = raw.flatten()[top]
        assert torch.equal(grad, expected.view_as(raw))


# -- 16-bit gradients: computed in float32, rounded once, the same on both paths ------------------------
SIXTEEN_BIT = [torch.float16, torch.bfloat16]


def grad_after_16_bit(transform, grad, *, foreach):
    """``transform``'s gradient for one 16-bit parameter whose gradient is ``grad`` (lr=0)."""
    param = nn.Parameter(torch.zeros_like(grad))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.0, transforms=[transform], transform_foreach=foreach)
    param.grad = grad.clone()
    optimizer.step()
    return param.grad


def grad_16_bit(dtype, size=1000, scale=0.1):
    return (torch.randn(size, generator=torch.Generator().manual_seed(1)) * scale).to(dtype)


def positive_grad_16_bit(dtype, size=1000):
    """Values in [0.05, 0.3]: ``1e5 * g - 7e4`` stays within float16's range."""
    return (torch.rand(size, generator=torch.Generator().manual_seed(1)) * 0.25 + 0.05).to(dtype)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
@pytest.mark.parametrize("scale,bias", [(1e5, 0.0), (1e-7, 0.0), (0.7, 0.01), (1e5, -7e4)])
def test_scale_grad_on_16_bit_gradients_is_computed_in_float32_and_rounded_once(foreach, dtype, scale, bias):
    grad = positive_grad_16_bit(dtype)
    expected = (grad.float() * scale + bias).to(dtype)
    assert torch.equal(grad_after_16_bit(ScaleGrad(scale, bias), grad, foreach=foreach), expected)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_clip_grad_norm_on_16_bit_gradients_is_computed_in_float32_and_rounded_once(foreach, dtype):
    grad = grad_16_bit(dtype, scale=1.0)
    norm = float(torch.linalg.vector_norm(grad.float()))  # 16-bit norms are taken in float32
    expected = (grad.float() * (0.3 / (norm + 1e-6))).to(dtype)
    assert torch.equal(grad_after_16_bit(ClipGradNorm(0.3), grad, foreach=foreach), expected)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize(
    "dtype,magnitude,max_norm",
    [(torch.float32, 3e38, 1e-6), (torch.float32, 3e38, 1.0), (torch.bfloat16, 3e38, 1e-5), (torch.float64, 1e306, 1e-6)],
    ids=["float32-zeroed", "float32", "bfloat16", "float64"],
)
def test_clip_grad_norm_by_a_factor_below_the_smallest_normal_number_keeps_its_precision(foreach, dtype, magnitude, max_norm):
    """c / ||g|| below float32's smallest normal number (float64's for float64 gradients) was a
    subnormal factor, rounded to a few digits or to 0: ClipGradNorm(1e-6) zeroed 100 float32
    gradients of 3e38 (norm 3e39) instead of scaling them to norm 1e-6."""
    generator = torch.Generator().manual_seed(0)
    grad = (torch.rand(100, generator=generator, dtype=torch.float64).add_(1.0) * (magnitude / 2)).to(dtype)
    param = nn.Parameter(torch.zeros_like(grad))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.0, transforms=[ClipGradNorm(max_norm)], transform_foreach=foreach)
    param.grad = grad.clone()
    optimizer.step()
    exact = [Decimal(float(x)) for x in grad.double()]
    norm = sum(x * x for x in exact).sqrt()
    expected = torch.tensor([float(x * Decimal(max_norm) / norm) for x in exact], dtype=torch.float64)
    torch.testing.assert_close(param.grad.double(), expected, rtol=torch.finfo(dtype).eps, atol=0)


NORMALIZE_16_BIT = [
    ("tiny", {}),  # ||g|| below float16's tiny: it used to be clamped up to it
    ("tiny", {"param_ndim": -1}),
    ("tiny", {"p": 1.0}),
    ("large", {}),  # ||g|| beyond 65504 (finite elements): it used to overflow, zeroing g
    ("large", {"param_ndim": -1}),
    ("large", {"p": 1.0}),
    ("large", {"p": math.inf}),
]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("size,kwargs", NORMALIZE_16_BIT, ids=[f"{s}-{k}" for s, k in NORMALIZE_16_BIT])
def test_normalize_grad_on_float16_takes_the_norm_in_float32(foreach, size, kwargs):
    values = torch.linspace(0.5, 1.0, 100).view(4, 25) * (1e-5 if size == "tiny" else 16000.0)
    grad = values.to(torch.float16)
    transform = NormalizeGrad(eps=0.0, **kwargs)
    wide = grad.float()
    dims = (1,) if kwargs.get("param_ndim") == -1 else (0, 1)
    norm = torch.linalg.vector_norm(wide, ord=kwargs.get("p", 2.0), dim=dims, keepdim=True)
    expected = (wide / norm.clamp_min(torch.finfo(torch.float32).tiny)).to(torch.float16)
    got = grad_after_16_bit(transform, grad, foreach=foreach)
    assert torch.equal(got, expected)
    # and, independently of float32: the float64 quotient, to float16's precision
    exact = grad.double() / torch.linalg.vector_norm(grad.double(), ord=kwargs.get("p", 2.0), dim=dims, keepdim=True)
    torch.testing.assert_close(got.double(), exact, rtol=2**-10, atol=0)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("low,high", [(-1e5, 1e5), (0.0, 1e5), (-7e4, 0.5)])
def test_clamp_grad_bounds_beyond_the_float16_range_clamp_exactly(foreach, low, high):
    """A bound above 65504 never changes a finite float16 value: no "cannot be converted" error."""
    grad = grad_16_bit(torch.float16, scale=15000.0)
    assert torch.isfinite(grad).all() and float(grad.abs().max()) > 30000.0
    expected = grad.double().clamp(low, high).to(torch.float16)
    assert torch.equal(grad_after_16_bit(ClampGrad(low, high), grad, foreach=foreach), expected)


# -- float32 norms that underflow or overflow: taken again in float64 --------------------------------
NORMALIZE_RANGE = [{}, {"param_ndim": -1}, {"p": 1.0}, {"p": 3.0}, {"p": 3.0, "param_ndim": -1}]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("magnitude", [1e-25, 1e-30, 1e19])
@pytest.mark.parametrize("kwargs", NORMALIZE_RANGE, ids=[str(k) for k in NORMALIZE_RANGE])
def test_normalize_grad_beyond_float32_squares_matches_a_float64_reference(foreach, dtype, magnitude, kwargs):
    # |g|^p of such gradients underflows or overflows float32: the float32 norm came out 0 (the
    # quotient then blew up by ~1e14 or lost digits) or inf (the quotient was 0).
    generator = torch.Generator().manual_seed(2)
    grad = (torch.randn(4, 250, generator=generator, dtype=torch.float64) * magnitude).to(dtype)
    p = kwargs.get("p", 2.0)
    dims = (1,) if kwargs.get("param_ndim") == -1 else (0, 1)
    exact = grad.double() / torch.linalg.vector_norm(grad.double(), ord=p, dim=dims, keepdim=True)
    got = grad_after_16_bit(NormalizeGrad(eps=0.0, **kwargs), grad, foreach=foreach)
    # float32: a few roundings in the norm's sum; bfloat16: the float32 quotient rounded once
    rtol = 16 * torch.finfo(torch.float32).eps if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), exact, rtol=rtol, atol=0)
    other = grad_after_16_bit(NormalizeGrad(eps=0.0, **kwargs), grad, foreach=not foreach)
    assert torch.equal(got, other)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("eps", [0.0, 1e-12])
def test_normalize_grad_retakes_only_the_rows_whose_norm_float32_cannot_hold(foreach, eps):
    # Rows of ordinary, tiny, zero and huge gradients; and a whole tiny gradient [3e-23, -4e-23, 0].
    generator = torch.Generator().manual_seed(3)
    scales = torch.tensor([[1.0], [1e-25], [0.0], [1e19]], dtype=torch.float64)
    grad = (torch.randn(4, 50, generator=generator, dtype=torch.float64) * scales).float()
    exact = grad.double() / (torch.linalg.vector_norm(grad.double(), dim=1, keepdim=True) + eps)
    got = grad_after_16_bit(NormalizeGrad(eps=eps, param_ndim=-1), grad, foreach=foreach)
    torch.testing.assert_close(got.double(), exact.nan_to_num(0.0), rtol=16 * torch.finfo(torch.float32).eps, atol=0)
    assert torch.equal(got[2], torch.zeros(50))
    ordinary = grad[:1] / torch.linalg.vector_norm(grad[:1], dim=1, keepdim=True).add(eps)
    assert torch.equal(got[:1], ordinary)  # float32 arithmetic, as before: not taken again
    tiny = torch.tensor([3e-23, -4e-23, 0.0])
    got = grad_after_16_bit(NormalizeGrad(eps=0.0), tiny, foreach=foreach)
    torch.testing.assert_close(got, torch.tensor([0.6, -0.8, 0.0]), rtol=torch.finfo(torch.float32).eps, atol=0)


def exact_lp_quotients(grad, p, param_ndim):
    """``grad / ||grad||_p`` per row (``param_ndim=-1``) or whole, the norms in 60-digit decimals
    (no range limit), each quotient rounded to float64 once."""
    rows = grad.double().reshape(grad.shape[0], -1) if param_ndim == -1 else grad.double().reshape(1, -1)
    out = torch.zeros_like(rows)
    with decimal.localcontext() as context:
        context.prec = 60
        for index, row in enumerate(rows.tolist()):
            norm = sum(abs(Decimal(v)) ** Decimal(p) for v in row) ** (Decimal(1) / Decimal(p))
            out[index] = torch.tensor([float(Decimal(v) / norm) if norm else 0.0 for v in row], dtype=torch.float64)
    return out.reshape(grad.shape)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("magnitude", [1e19, 1e30, 1e-19, 1e-30])
@pytest.mark.parametrize("p,param_ndim", [(20.0, None), (20.0, -1), (50.0, None), (7.0, -1)])
def test_normalize_grad_large_p_beyond_float64_powers_matches_an_exact_reference(foreach, dtype, magnitude, p, param_ndim):
    # |g|^p leaves even float64's range ((1e19)^20 = 1e380, (1e-19)^20 = 1e-380): the float64
    # retake of the norm came out inf (a zero quotient) or 0 (an infinite quotient) as well.
    generator = torch.Generator().manual_seed(5)
    scales = torch.tensor([[1.0], [3.0], [0.0], [0.25]], dtype=torch.float64) * magnitude  # a zero row
    grad = (torch.randn(4, 30, generator=generator, dtype=torch.float64) * scales).to(dtype)
    transform = NormalizeGrad(eps=0.0, p=p, param_ndim=param_ndim)
    got = grad_after_16_bit(transform, grad, foreach=foreach)
    # the quotients are computed in float64 and rounded once
    torch.testing.assert_close(got.double(), exact_lp_quotients(grad, p, param_ndim), rtol=torch.finfo(dtype).eps, atol=0)
    assert torch.equal(got, grad_after_16_bit(NormalizeGrad(eps=0.0, p=p, param_ndim=param_ndim), grad, foreach=not foreach))


# -- hyperparameters of any real type act as the equal float ------------------------------------------
REAL_HYPERPARAMETERS = [
    (lambda: ClipGradNorm(), "max_grad_norm", Fraction(1, 3)),
    (lambda: NormalizeGrad(), "eps", Fraction(1, 3)),
    (lambda: NormalizeGrad(), "p", Fraction(3, 2)),
    (lambda: NormalizeGrad(param_ndim=-1), "p", Fraction(5, 2)),
    (lambda: SparsifyGrad(), "q", Fraction(1, 3)),
    (lambda: ScaleGrad(), "grad_scale", Fraction(-2, 3)),
    (lambda: ScaleGrad(), "grad_bias", Fraction(1, 7)),
    (lambda: ClampGrad(-1.0, 1.0), "grad_min", Fraction(-1, 3)),
    (lambda: ClampGrad(-1.0, 1.0), "grad_max", Fraction(2, 7)),
]


def grads_with_value(make, key, value, *, when, dtype):
    """Gradients after one step of ``[ScaleGrad(0.5), make()]`` (``ClampGrad(-3, 3)`` first for a
    ``ScaleGrad``) with ``key`` set to ``value`` in the param groups ``when`` the optimizer is built
    or after it (a step-time edit)."""
    generator = torch.Generator().manual_seed(4)
    params = [nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in ((6, 5), (7,))]
    groups = [{"params": params, **({key: value} if when == "built" else {})}]
    transform = make()
    before = ClampGrad(-3.0, 3.0) if isinstance(transform, ScaleGrad) else ScaleGrad(0.5)
    optimizer = TransformingOptimizer(groups, torch.optim.SGD, lr=0.0, transforms=[before, transform])
    if when == "edited":
        optimizer.param_groups[0][key] = value
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator, dtype=dtype)
    optimizer.step()
    return [param.grad for param in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("when", ["built", "edited"])
@pytest.mark.parametrize("kind", [Fraction, np.float64, np.float32], ids=["Fraction", "float64", "float32"])
@pytest.mark.parametrize(
    "make,key,fraction", REAL_HYPERPARAMETERS, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(REAL_HYPERPARAMETERS)]
)
def test_real_hyperparameters_of_any_type_act_as_the_equal_float(make, key, fraction, kind, when, dtype):
    value = fraction if kind is Fraction else kind(fraction)
    expected = grads_with_value(make, key, float(value), when=when, dtype=dtype)
    got = grads_with_value(make, key, value, when=when, dtype=dtype)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("kind", [Fraction, np.float64, np.float32], ids=["Fraction", "float64", "float32"])
def test_constructor_hyperparameters_of_any_real_type_are_kept_as_floats(kind):
    def real(fraction):
        return fraction if kind is Fraction else kind(fraction)

    transforms = [
        ClipGradNorm(real(Fraction(1, 3))),
        NormalizeGrad(eps=real(Fraction(1, 3)), p=real(Fraction(3, 2))),
        SparsifyGrad(q=real(Fraction(1, 3))),
        ScaleGrad(real(Fraction(-2, 3)), real(Fraction(1, 7))),
        ClampGrad(real(Fraction(-1, 3)), real(Fraction(2, 7))),
    ]
    for transform in transforms:
        for key, value in transform.group_defaults().items():
            assert value is None or type(value) is float, (transform, key, value)
    assert NormalizeGrad(param_ndim=np.int64(-1)).group_defaults()["param_ndim"] == -1


# -- subnormal and huge norms, float32 and float64: unit norm for every p ----------------------------
EXTREME = [
    (torch.float32, 1e-40),  # subnormal elements: the norm is subnormal too (it was clamped up to tiny)
    (torch.float32, 1e-30),
    (torch.float32, 1e30),
    (torch.float64, 1e-310),  # subnormal elements (squares, cubes: 0)
    (torch.float64, 1e-160),  # squares subnormal (digits lost), cubes 0
    (torch.float64, 1e150),  # cubes beyond float64
    (torch.float64, 1e300),  # squares beyond float64
]
EXTREME_ROW_SCALES = [[1.0], [0.3], [0.0], [2.5]]  # a zero row


def extreme_grad(dtype, magnitude, seed=6):
    generator = torch.Generator().manual_seed(seed)
    scales = torch.tensor(EXTREME_ROW_SCALES, dtype=torch.float64) * magnitude
    return (torch.randn(4, 6, generator=generator, dtype=torch.float64) * scales).to(dtype)


def decimal_rows(grad, param_ndim):
    """The rows normalised independently (the whole gradient for ``param_ndim=None``), as exact decimals."""
    rows = grad.reshape(grad.shape[0], -1) if param_ndim == -1 else grad.reshape(1, -1)
    return [[Decimal(v) for v in row] for row in rows.double().tolist()]


def decimal_lp_norm(values, p):
    """``||values||_p`` in the current decimal context (no range limit)."""
    if math.isinf(p):
        return max(abs(v) for v in values)
    return sum(abs(v) ** Decimal(p) for v in values) ** (Decimal(1) / Decimal(p))


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("dtype,magnitude", EXTREME, ids=[f"{d}-{m}" for d, m in EXTREME])
@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("param_ndim", [None, -1], ids=["whole", "rows"])
def test_normalize_grad_eps_zero_gives_unit_norm_at_extreme_magnitudes(foreach, dtype, magnitude, p, param_ndim):
    # A subnormal norm was clamped up to the dtype's smallest normal number (1e-40 in float32 with
    # p=inf: norm 0.0085), and float64 norms whose powers under- or overflow float64 were used as they
    # were (1e-310: 0 before the clamp; 1e-160 with p=2: 1.0000056).
    grad = extreme_grad(dtype, magnitude)
    got = grad_after_16_bit(NormalizeGrad(eps=0.0, p=p, param_ndim=param_ndim), grad, foreach=foreach)
    assert torch.equal(got, grad_after_16_bit(NormalizeGrad(eps=0.0, p=p, param_ndim=param_ndim), grad, foreach=not foreach))
    tolerance = Decimal(4 * torch.finfo(dtype).eps)  # a few ulps of the gradient's dtype
    with decimal.localcontext() as context:
        context.prec = 60
        for row, result in zip(decimal_rows(grad, param_ndim), decimal_rows(got, param_ndim)):
            norm = decimal_lp_norm(row, p)
            if not norm:  # a zero gradient (row) stays zero
                assert all(v == 0 for v in result)
                continue
            assert abs(decimal_lp_norm(result, p) - 1) <= tolerance
            for value, quotient in zip(row, result):
                exact = value / norm
                assert abs(quotient - exact) <= tolerance * abs(exact), (value, quotient, exact)


EXTREME_EPS = [(1e-310, 1e-300), (1e-310, 1e-12), (1e-310, 1.0), (1e-160, 1e-300), (1e-160, 1e-155), (1e150, 1e-12), (1e150, 1e140)]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("magnitude,eps", EXTREME_EPS, ids=[f"{m}-{e}" for m, e in EXTREME_EPS])
@pytest.mark.parametrize("p", [0.5, 2.0, 3.0, math.inf])
def test_normalize_grad_eps_at_extreme_float64_magnitudes_matches_an_exact_reference(foreach, magnitude, eps, p):
    # g / (||g||_p + eps), also where eps and the norm are of the same order (1e-310 with eps=1e-300:
    # the norm of 0 was off by 1e-10 relative).
    grad = extreme_grad(torch.float64, magnitude, seed=7)
    got = grad_after_16_bit(NormalizeGrad(eps=eps, p=p, param_ndim=-1), grad, foreach=foreach)
    assert torch.equal(got, grad_after_16_bit(NormalizeGrad(eps=eps, p=p, param_ndim=-1), grad, foreach=not foreach))
    tolerance = Decimal(4 * torch.finfo(torch.float64).eps)
    with decimal.localcontext() as context:
        context.prec = 60
        for row, result in zip(decimal_rows(grad, -1), decimal_rows(got, -1)):
            divisor = decimal_lp_norm(row, p) + Decimal(eps)
            for value, quotient in zip(row, result):
                exact = value / divisor
                assert abs(quotient - exact) <= tolerance * abs(exact), (value, quotient, exact)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_normalize_grad_row_with_an_infinite_element_is_divided_by_its_norm_as_it_is(foreach, dtype):
    # A transform before it overflows one element (the optimizer skips steps whose own gradients
    # are not finite, and those ScaleGrad overflows: this one declares nothing). An infinite norm
    # of an infinite element has not overflowed: no scaled retake (which gave NaN for every
    # element of the row); a row whose squares overflow is retaken.
    big = 1e300 if dtype == torch.float64 else 1e36

    class Overflowing(Transform):
        def pre_update(self, ctx):
            for group in ctx.param_groups:
                for p in group["params"]:
                    p.grad.mul_(big)

    grad = torch.tensor([[1e10, 1.0, -2.0], [3.0, 4.0, 0.0]], dtype=dtype)  # 1e10 * big: inf
    param = nn.Parameter(torch.zeros_like(grad))
    transforms = [Overflowing(), NormalizeGrad(eps=0.0, param_ndim=-1)]
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.0, transforms=transforms, transform_foreach=foreach)
    param.grad = grad.clone()
    optimizer.step()
    expected = torch.tensor([[math.nan, 0.0, -0.0], [0.6, 0.8, 0.0]], dtype=dtype)
    torch.testing.assert_close(param.grad, expected, rtol=torch.finfo(dtype).eps, atol=0, equal_nan=True)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_normalize_grad_keeps_a_zero_gradient_zero_with_eps_zero_when_subnormals_are_flushed(dtype, foreach):
    """e3b52bf clamped the divisor to the smallest subnormal number, which reads as 0 under
    torch.set_flush_denormal(True): a zero row became 0 / 0 = NaN, and so did the weights."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormal numbers")
    try:
        weight = nn.Parameter(torch.zeros(2, 3, dtype=dtype))
        weight.grad = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]], dtype=dtype)
        optimizer = TransformingOptimizer(
            [weight], torch.optim.SGD, lr=0.1, transforms=[NormalizeGrad(eps=0.0, param_ndim=-1)],
            transform_foreach=foreach,
        )
        optimizer.step()
    finally:
        torch.set_flush_denormal(False)
    expected = torch.tensor([[0.0, 0.0, 0.0], [1 / 3, 2 / 3, 2 / 3]], dtype=torch.float64).to(dtype)
    assert torch.equal(weight.grad, expected)
    assert torch.isfinite(weight).all()


@pytest.mark.parametrize(
    "transform",
    [ClipGradNorm(1.0), ClampGrad(-0.5, 0.5), ScaleGrad(2.0), GradSign(), NormalizeGrad(), SparsifyGrad(0.5)],
    ids=lambda transform: type(transform).__name__,
)
@pytest.mark.parametrize("embedding_first", [True, False], ids=["embedding-first", "embedding-second"])
def test_a_sparse_gradient_is_refused_naming_the_transform_and_the_parameter_with_nothing_changed(transform, embedding_first):
    """The refusal said "gradient transforms do not support sparse gradients" (or "param_ndim
    transforms ..."), naming neither the transform nor the parameter; SAM's message shape."""
    torch.manual_seed(0)
    embedding, linear = nn.Embedding(6, 3, sparse=True), nn.Linear(3, 1)
    groups = [{"params": embedding.parameters()}, {"params": linear.parameters()}]
    optimizer = TransformingOptimizer(
        groups if embedding_first else groups[::-1], torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[transform]
    )
    optimizer.zero_grad()
    linear(embedding(torch.tensor([0, 2, 2]))).sum().backward()
    weights = [p.detach().clone() for p in (*embedding.parameters(), *linear.parameters())]
    grads = [linear.weight.grad.clone(), linear.bias.grad.clone(), embedding.weight.grad.to_dense()]
    message = (
        f"{type(transform).__name__} does not support sparse gradients (a parameter of shape (6, 3) has one): "
        "use a dense embedding, or give that parameter to another optimizer"
    )
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        optimizer.step()
    for param, before in zip((*embedding.parameters(), *linear.parameters()), weights):
        assert torch.equal(param.detach(), before)
    assert torch.equal(linear.weight.grad, grads[0]) and torch.equal(linear.bias.grad, grads[1])
    assert torch.equal(embedding.weight.grad.to_dense(), grads[2])
    assert not any(optimizer.state.values())  # no momentum buffer, no transform state
