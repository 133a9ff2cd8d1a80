"""Contracts every transform keeps, driven by the TransformInfo registry."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transform_infos import (
    TRANSFORM_INFOS,
    assert_bitwise_equal,
    make_closure,
    make_data,
    make_model,
    params_of,
)

from samgria import GradientTransform, TransformingOptimizer

INFOS = {info.name: info for info in TRANSFORM_INFOS}


def assert_state_equal(actual, expected):
    """Nested dicts/lists equal, tensors bit for bit (a printed comparison would round)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_state_equal(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, b in zip(actual, expected):
            assert_state_equal(a, b)
    else:
        assert actual == expected
names = pytest.mark.parametrize("name", list(INFOS))


def build(name: str, inner=torch.optim.SGD, dtype=torch.float64, foreach=True, **inner_kwargs):
    model = make_model(dtype)
    inner_kwargs = inner_kwargs or {"lr": 0.1, "momentum": 0.9}
    optimizer = TransformingOptimizer(
        model.parameters(), inner, transforms=[INFOS[name].make()], transform_foreach=foreach, **inner_kwargs
    )
    return model, optimizer


@names
def test_bad_constructor_inputs_name_argument_and_value(name):
    info = INFOS[name]
    assert info.error_inputs
    for error in info.error_inputs:
        with pytest.raises(error.error_type, match=error.error_regex):
            info.make(**error.kwargs)


@names
def test_is_a_gradient_transform_and_owns_declared_group_keys(name):
    info = INFOS[name]
    transform = info.make()
    assert isinstance(transform, GradientTransform)
    assert tuple(transform.group_defaults()) == info.group_keys
    assert transform.needs_closure is info.needs_closure
    _, optimizer = build(name)
    for group in optimizer.param_groups:
        for key in info.group_keys:
            assert key in group


@names
@pytest.mark.parametrize("inner,inner_kwargs", [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.AdamW, {"lr": 1e-2})])
def test_foreach_path_equals_reference_path_bitwise(name, inner, inner_kwargs):
    x, y = make_data()
    results = []
    for foreach in (True, False):
        model, optimizer = build(name, inner, foreach=foreach, **inner_kwargs)
        closure = make_closure(model, optimizer, x, y)
        for _ in range(5):
            optimizer.step(closure)
        results.append(params_of(model))
    assert_bitwise_equal(*results)


@names
def test_two_call_mode_equals_step_closure_bitwise(name):
    x, y = make_data()
    model_a, opt_a = build(name)
    model_b, opt_b = build(name)
    closure = make_closure(model_a, opt_a, x, y)
    for _ in range(5):
        opt_a.step(closure)

        loss = nn.functional.mse_loss(model_b(x), y)
        loss.backward()
        opt_b.first_step(zero_grad=True)
        nn.functional.mse_loss(model_b(x), y).backward()
        opt_b.second_step(zero_grad=True)
    assert_bitwise_equal(params_of(model_a), params_of(model_b))


@names
def test_checkpoint_resume_continues_bitwise(name):
    x, y = make_data()
    model_a, opt_a = build(name)
    closure_a = make_closure(model_a, opt_a, x, y)
    for _ in range(4):
        opt_a.step(closure_a)
    checkpoint = copy.deepcopy({"model": model_a.state_dict(), "optimizer": opt_a.state_dict()})
    for _ in range(5):
        opt_a.step(closure_a)

    model_b, opt_b = build(name)
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["optimizer"])
    closure_b = make_closure(model_b, opt_b, x, y)
    for _ in range(5):
        opt_b.step(closure_b)
    assert_bitwise_equal(params_of(model_a), params_of(model_b))


@names
def test_closure_raising_in_second_pass_leaves_model_and_state_untouched(name):
    x, y = make_data()
    model, optimizer = build(name)
    closure = make_closure(model, optimizer, x, y)
    for _ in range(2):
        optimizer.step(closure)
    before_params = params_of(model)
    before_state = copy.deepcopy(optimizer.state_dict())
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("data loader died")
        return closure()

    if INFOS[name].needs_closure:
        with pytest.raises(KeyError, match="data loader died"):
            optimizer.step(flaky)
        assert calls["n"] == 2
    else:  # a post-step transform never re-evaluates: make the first evaluation fail instead
        with pytest.raises(KeyError):
            optimizer.step(lambda: (_ for _ in ()).throw(KeyError("data loader died")))
    assert_bitwise_equal(before_params, params_of(model))
    assert_state_equal(optimizer.state_dict(), before_state)


@names
def test_parameters_without_grad_are_left_alone(name):
    x, y = make_data()
    model, optimizer = build(name)
    frozen, unused = model[2].bias, model.unused
    frozen_before, unused_before = frozen.detach().clone(), unused.detach().clone()
    closure = make_closure(model, optimizer, x, y)
    for _ in range(6):
        optimizer.step(closure)
    assert torch.equal(frozen, frozen_before)
    assert torch.equal(unused, unused_before)
    assert frozen not in optimizer.state or "lamp_sum" not in optimizer.state[frozen]


@names
def test_mixed_float64_float32_bfloat16_parameters(name):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4).to(torch.float64), nn.Linear(4, 4).to(torch.float32), nn.Linear(4, 1).to(torch.bfloat16)]
    x = torch.randn(16, 4, dtype=torch.float64)

    def run(foreach, steps):
        models = copy.deepcopy(layers)
        params = [p for m in models for p in m.parameters()]
        optimizer = TransformingOptimizer(params, torch.optim.SGD, lr=0.05, transforms=[INFOS[name].make()], transform_foreach=foreach)

        def closure():
            optimizer.zero_grad()
            h = torch.tanh(models[0](x)).float()
            h = torch.tanh(models[1](h)).bfloat16()
            loss = models[2](h).float().square().mean()
            loss.backward()
            return loss

        for _ in range(steps):
            optimizer.step(closure)
        return [p.detach().clone() for p in params]

    initial = [p.detach().clone() for m in layers for p in m.parameters()]
    # One step: the float64/float32 parameters agree bit for bit between the two paths; torch's
    # foreach and per-tensor bfloat16 kernels may round differently, so bfloat16 gets a tolerance.
    fast, reference = run(True, 1), run(False, 1)
    assert [p.dtype for p in fast] == [torch.float64] * 2 + [torch.float32] * 2 + [torch.bfloat16] * 2
    assert_bitwise_equal(fast[:4], reference[:4])
    torch.testing.assert_close(fast[4:], reference[4:])
    assert all(not torch.equal(a, b) for a, b in zip(fast[:4], initial[:4]))
    fast, reference = run(True, 4), run(False, 4)
    assert all(torch.isfinite(p.float()).all() for p in fast)
    # Later steps see the bfloat16 rounding through the loss: bfloat16-sized tolerances.
    torch.testing.assert_close(fast, reference, rtol=1.6e-2, atol=1e-3)


@names
def test_standalone_seed_protocol_equals_optimizer_step(name):
    x, y = make_data()
    model_a, opt_a = build(name, momentum=0.0, lr=0.1)
    closure = make_closure(model_a, opt_a, x, y)

    model_b = make_model()
    plain = torch.optim.SGD([p for p in model_b.parameters()], lr=0.1, momentum=0.0)
    transform = INFOS[name].make()

    def loss_fn(inputs, targets):
        return nn.functional.mse_loss(model_b(inputs), targets)

    for _ in range(5):
        opt_a.step(closure)
        plain.zero_grad()
        loss_fn(x, y).backward()
        transform.apply(model_b, loss_fn, (x, y))
        plain.step()
        transform.post_step(model_b)
    assert_bitwise_equal(params_of(model_a), params_of(model_b))
