"""Small gradient transforms against torch's own functions, per param group."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from samgria import ASAM, ClampGrad, ClipGradNorm, GradSign, NormalizeGrad, ScaleGrad, SparsifyGrad, TransformingOptimizer


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
