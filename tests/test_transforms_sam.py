"""SAM and ASAM against an independent, hand-written float64 reference."""

from __future__ import annotations

import copy
import functools
import gc
import inspect
import linecache
import math
import pickle
import sys
import warnings
import weakref
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call
from transform_infos import assert_bitwise_equal, make_closure, make_data, make_model, params_of, step_installing

import samgria.transforms.ascent as ascent_module
import samgria.transforms.sam as sam_module
import samgria.transforms.sam_family as sam_family_module
from samgria import ASAM, ESAM, GSAM, SAM, WSAM, FriendlySAM, LookSAM, MultiStepSAM, TransformingOptimizer


# -- independent reference ------------------------------------------------------------------------
def reference_grads(model, weights, x, y):
    """Gradient of the MSE loss at ``weights`` (dict name -> tensor), None for untouched params."""
    trainable = {n: w.detach().clone().requires_grad_(p.requires_grad) for (n, p), w in zip(model.named_parameters(), weights.values())}
    loss = nn.functional.mse_loss(functional_call(model, trainable, (x,)), y)
    names = [n for n, t in trainable.items() if t.requires_grad]
    grads = torch.autograd.grad(loss, [trainable[n] for n in names], allow_unused=True)
    out = {n: None for n in trainable}
    out.update(dict(zip(names, grads)))
    return out


def reference_perturbation(weights, grads, rho_of, eta_of=None, adaptive_of=None):
    """e per parameter; SAM when ``eta_of`` is None, ASAM (T = |w| + eta) otherwise."""
    directions = {}
    for name, g in grads.items():
        if g is None:
            continue
        if eta_of is not None and adaptive_of(name):
            t = weights[name].abs() + eta_of(name)
            directions[name] = (t * g, t * t * g)
        else:
            directions[name] = (g, g)
    norm = math.sqrt(sum(float((d[0] ** 2).sum()) for d in directions.values()))
    return {name: rho_of(name) * d[1] / norm for name, d in directions.items()}


def reference_run(model, x, y, steps, inner, rho_of, eta_of=None, adaptive_of=None, lr=0.1):
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    momentum, exp_avg, exp_avg_sq = {}, {}, {}
    for t in range(1, steps + 1):
        grads = reference_grads(model, weights, x, y)
        e = reference_perturbation(weights, grads, rho_of, eta_of, adaptive_of)
        perturbed = {n: w + e.get(n, torch.zeros_like(w)) for n, w in weights.items()}
        sam_grads = reference_grads(model, perturbed, x, y)
        for name, g in sam_grads.items():
            if g is None:
                continue
            w = weights[name]
            if inner == "sgd_momentum":
                buf = g.clone() if name not in momentum else 0.9 * momentum[name] + g
                momentum[name] = buf
                weights[name] = w - lr * buf
            elif inner == "adamw":
                beta1, beta2, eps, wd = 0.9, 0.999, 1e-8, 1e-2
                w = w * (1 - lr * wd)
                m = beta1 * exp_avg.get(name, torch.zeros_like(w)) + (1 - beta1) * g
                v = beta2 * exp_avg_sq.get(name, torch.zeros_like(w)) + (1 - beta2) * g * g
                exp_avg[name], exp_avg_sq[name] = m, v
                denom = v.sqrt() / math.sqrt(1 - beta2**t) + eps
                weights[name] = w - (lr / (1 - beta1**t)) * m / denom
    return list(weights.values())


def run_samgria(model, x, y, steps, inner, transform, groups=None, lr=0.1):
    params = groups if groups is not None else model.parameters()
    if inner == "sgd_momentum":
        optimizer = TransformingOptimizer(params, torch.optim.SGD, lr=lr, momentum=0.9, transforms=[transform])
    else:
        optimizer = TransformingOptimizer(params, torch.optim.AdamW, lr=lr, weight_decay=1e-2, transforms=[transform])
    closure = make_closure(model, optimizer, x, y)
    for _ in range(steps):
        optimizer.step(closure)
    return params_of(model)


# -- SAM ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inner", ["sgd_momentum", "adamw"])
def test_sam_matches_reference(inner):
    x, y = make_data()
    lr = 0.1 if inner == "sgd_momentum" else 1e-2
    expected = reference_run(make_model(), x, y, 6, inner, rho_of=lambda n: 0.05, lr=lr)
    got = run_samgria(make_model(), x, y, 6, inner, SAM(rho=0.05), lr=lr)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_sam_per_group_rho_scales_each_groups_part_of_one_global_norm():
    x, y = make_data()
    model = make_model()
    first_layer = {"0.weight", "0.bias"}
    rho_of = lambda name: 0.2 if name in first_layer else 0.03  # noqa: E731
    expected = reference_run(model, x, y, 5, "sgd_momentum", rho_of=rho_of)
    model = make_model()
    groups = [
        {"params": list(model[0].parameters()), "rho": 0.2},
        {"params": [p for n, p in model.named_parameters() if n not in first_layer]},
    ]
    got = run_samgria(model, x, y, 5, "sgd_momentum", SAM(rho=0.03), groups=groups)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_group_with_rho_zero_is_not_perturbed_but_counts_in_the_norm():
    x, y = make_data()
    first_layer = {"0.weight", "0.bias"}
    rho_of = lambda name: 0.0 if name in first_layer else 0.1  # noqa: E731
    expected = reference_run(make_model(), x, y, 4, "sgd_momentum", rho_of=rho_of)
    model = make_model()
    groups = [
        {"params": list(model[0].parameters()), "rho": 0.0},
        {"params": [p for n, p in model.named_parameters() if n not in first_layer]},
    ]
    got = run_samgria(model, x, y, 4, "sgd_momentum", SAM(rho=0.1), groups=groups)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("transform", [SAM(rho=0.0), ASAM(rho=0.0)], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("inner,kwargs", [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.Adam, {"lr": 1e-2})])
def test_rho_zero_equals_bare_inner_optimizer_bitwise(transform, inner, kwargs):
    x, y = make_data()
    model_a, model_b = make_model(), make_model()
    wrapped = TransformingOptimizer(model_a.parameters(), inner, transforms=[transform], **kwargs)
    bare = inner(model_b.parameters(), **kwargs)
    calls = {"n": 0}
    closure_a = make_closure(model_a, wrapped, x, y)

    def counting():
        calls["n"] += 1
        return closure_a()

    closure_b = make_closure(model_b, bare, x, y)
    for _ in range(5):
        loss_a = wrapped.step(counting)
        loss_b = bare.step(closure_b)
        assert torch.equal(loss_a, loss_b)
    assert calls["n"] == 5  # nothing perturbed: no second evaluation
    assert_bitwise_equal(params_of(model_a), params_of(model_b))


def test_sam_step_returns_first_loss_and_evaluates_twice():
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    losses = []
    closure = make_closure(model, optimizer, x, y)

    def recording():
        loss = closure()
        losses.append(loss.detach())
        return loss

    returned = optimizer.step(recording)
    assert len(losses) == 2
    assert torch.equal(returned.detach(), losses[0])
    assert losses[1] > losses[0]  # the loss at w + e is higher: e ascends


def test_restoration_is_bitwise_even_when_w_plus_e_minus_e_is_not_w():
    # float32 weights of very different magnitudes: (w + e) - e != w in floating point.
    w = torch.tensor([1e8, 1.0, 3.3333333e-3], dtype=torch.float32)
    param = nn.Parameter(w.clone())
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.0, transforms=[SAM(rho=0.7)])
    seen = []

    def closure():
        optimizer.zero_grad()
        seen.append(param.detach().clone())
        loss = (param * torch.tensor([1.0, -2.0, 3.0])).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    e = 0.7 * torch.tensor([1.0, -2.0, 3.0]) / math.sqrt(14.0)
    assert not torch.equal((w + e) - e, w)
    torch.testing.assert_close(seen[1], w + e)
    assert torch.equal(param.detach(), w)


# -- ASAM -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("inner", ["sgd_momentum", "adamw"])
def test_asam_matches_paper_formula(inner):
    x, y = make_data()
    lr = 0.1 if inner == "sgd_momentum" else 1e-2
    expected = reference_run(make_model(), x, y, 5, inner, rho_of=lambda n: 0.5, eta_of=lambda n: 0.01, adaptive_of=lambda n: True, lr=lr)
    got = run_samgria(make_model(), x, y, 5, inner, ASAM(rho=0.5, eta=0.01), lr=lr)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_asam_is_not_the_seed_formula():
    # The seed normalised |w|^2 * g; the paper normalises T*g with T = |w| + eta.
    x, y = make_data()
    seedlike = reference_run(make_model(), x, y, 1, "sgd_momentum", rho_of=lambda n: 0.5, eta_of=lambda n: 0.0, adaptive_of=lambda n: True)
    got = run_samgria(make_model(), x, y, 1, "sgd_momentum", ASAM(rho=0.5, eta=0.01))
    assert any(not torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(got, seedlike))


def test_asam_per_group_eta_rho_and_non_adaptive_group():
    x, y = make_data()
    first = {"0.weight", "0.bias"}
    expected = reference_run(
        make_model(), x, y, 4, "sgd_momentum",
        rho_of=lambda n: 1.0 if n in first else 0.5,
        eta_of=lambda n: 0.1 if n in first else 0.01,
        adaptive_of=lambda n: n not in {"4.bias"},
    )
    model = make_model()
    named = dict(model.named_parameters())
    groups = [
        {"params": [named["0.weight"], named["0.bias"]], "rho": 1.0, "eta": 0.1},
        {"params": [named["4.bias"]], "adaptive": False},
        {"params": [p for n, p in named.items() if n not in first | {"4.bias"}]},
    ]
    # reference orders weights by model.named_parameters(); compare by name
    optimizer = TransformingOptimizer(groups, torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[ASAM(rho=0.5, eta=0.01)])
    closure = make_closure(model, optimizer, x, y)
    for _ in range(4):
        optimizer.step(closure)
    torch.testing.assert_close(params_of(model), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [SAM, ASAM])
def test_the_pytorch_sam_constructor_with_named_arguments_points_to_sam_optimizer_and_a_tensor_rho_is_named(cls):
    """``SAM(params=..., base_optimizer=...)`` said "unexpected keyword argument 'params'" where the
    positional call points to sam_optimizer; ``SAM(torch.tensor(0.05))`` was told it is that
    constructor, where ``SAM(rho=torch.tensor(0.05))`` says what is wrong with rho."""
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match=rf"^samgria\.{cls.__name__} is a transform, not an optimizer: .* Use samgria\.sam_optimizer\("):
        cls(params=model.parameters(), base_optimizer=torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match=rf"^samgria\.{cls.__name__} is a transform, not an optimizer"):
        cls(model.parameters(), base_optimizer=torch.optim.SGD)
    for call in (lambda: cls(torch.tensor(0.05)), lambda: cls(rho=torch.tensor(0.05))):
        with pytest.raises(TypeError, match=r"^rho must be a finite number >= 0, got tensor\(0\.0500\)$"):
            call()

    class Keyed(cls):  # a subclass's own argument of that name is its own
        def __init__(self, rho=0.1, params=None):
            super().__init__(rho)
            self.params = params

    assert Keyed(params=[1]).params == [1]


def test_asam_is_invariant_to_rescaling_a_relu_layer_pair():
    # f(x) = W2 relu(W1 x): scaling W1 by a and W2 by 1/a leaves f unchanged; with eta=0 the
    # ASAM perturbed loss is also unchanged (scale invariance), SAM's is not.
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)

    def perturbed_loss(transform, scale):
        model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 1, bias=False)).double()
        torch.manual_seed(1)
        with torch.no_grad():
            model[0].weight.copy_(torch.randn(4, 3, dtype=torch.float64) * scale)
            model[2].weight.copy_(torch.randn(1, 4, dtype=torch.float64) / scale)
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.0, transforms=[transform])
        losses = []

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            losses.append(loss.item())
            return loss

        optimizer.step(closure)
        return losses[1]

    assert perturbed_loss(ASAM(rho=0.5, eta=0.0), 1.0) == pytest.approx(perturbed_loss(ASAM(rho=0.5, eta=0.0), 7.0), rel=1e-10)
    assert perturbed_loss(SAM(rho=0.5), 1.0) != pytest.approx(perturbed_loss(SAM(rho=0.5), 7.0), rel=1e-3)


# -- invariants -----------------------------------------------------------------------------------
def _inf_in_a_rho_zero_group(transform, non_finite="skip", inf_on_call=1):
    """A momentum SGD over two groups after one good step; the ``inf_on_call``-th evaluation of
    the next step's closure gives the ``rho=0`` group an infinite gradient."""
    torch.manual_seed(0)
    good = nn.Parameter(torch.randn(3, dtype=torch.float64))
    bad = nn.Parameter(torch.randn(2, dtype=torch.float64))
    optimizer = TransformingOptimizer(
        [{"params": [good]}, {"params": [bad], "rho": 0.0}],
        torch.optim.SGD,
        lr=0.1,
        momentum=0.9,
        transforms=[transform],
        non_finite=non_finite,
    )
    calls = {"n": 0, "poison": False}

    def closure():
        calls["n"] += 1
        optimizer.zero_grad()
        scale = float("inf") if calls["poison"] and calls["n"] == inf_on_call else 1.0
        loss = (good**2).sum() + (bad * scale).sum()
        loss.backward()
        return loss

    optimizer.step(closure)  # a good step: momentum buffers exist
    calls["n"], calls["poison"] = 0, True
    return optimizer, closure, calls, (good, bad)


@pytest.mark.parametrize("inf_on_call,which", [(1, "first"), (2, "second")])
@pytest.mark.parametrize("transform", [SAM(rho=0.05), ASAM(rho=0.5)], ids=["SAM", "ASAM"])
def test_non_finite_gradient_skips_the_whole_step(transform, inf_on_call, which):
    # One rho=0 group gets an inf gradient, in the first evaluation or in the re-evaluation at
    # w + e: the whole step is skipped -- no weight moves, no momentum buffer changes.
    optimizer, closure, calls, params = _inf_in_a_rho_zero_group(transform, inf_on_call=inf_on_call)
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(optimizer.state_dict())
    with pytest.warns(RuntimeWarning, match=rf"the gradients of the {which} evaluation are not finite: the step is skipped"):
        optimizer.step(closure)
    assert calls["n"] == inf_on_call  # a first pass with inf gradients is not re-evaluated
    assert optimizer.skipped_steps == 1
    assert_bitwise_equal(before_params, [p.detach().clone() for p in params])
    after_state = optimizer.state_dict()
    for index, entry in before_state["state"].items():
        assert_bitwise_equal(list(entry.values()), list(after_state["state"][index].values()))
    # The next good step is taken as usual.
    calls["poison"] = False
    optimizer.step(closure)
    assert optimizer.skipped_steps == 1
    assert not torch.equal(params[0].detach(), before_params[0])


@pytest.mark.parametrize("inf_on_call", [1, 2])
def test_non_finite_raise_policy_raises_and_changes_nothing(inf_on_call):
    optimizer, closure, _, params = _inf_in_a_rho_zero_group(SAM(rho=0.05), non_finite="raise", inf_on_call=inf_on_call)
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(FloatingPointError, match="not finite"):
        optimizer.step(closure)
    assert optimizer.skipped_steps == 0
    assert_bitwise_equal(before_params, [p.detach().clone() for p in params])
    after_state = optimizer.state_dict()
    for index, entry in before_state["state"].items():
        assert_bitwise_equal(list(entry.values()), list(after_state["state"][index].values()))


def test_sparse_gradient_raises_clear_error_and_leaves_weights():
    embedding = nn.Embedding(10, 3, sparse=True).double()
    optimizer = TransformingOptimizer(embedding.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    before = embedding.weight.detach().clone()

    def closure():
        optimizer.zero_grad()
        loss = embedding(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step(closure)
    assert torch.equal(embedding.weight.detach(), before)


def test_no_state_is_kept_between_sam_steps():
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    storages = {id(p): p.data_ptr() for p in model.parameters()}
    closure = make_closure(model, optimizer, x, y)
    for _ in range(3):
        optimizer.step(closure)
    assert len(optimizer.state) == 0
    assert {id(p): p.data_ptr() for p in model.parameters()} == storages  # original storages back


def test_rho_is_read_from_param_groups_each_step():
    x, y = make_data()
    model_a, model_b = make_model(), make_model()
    opt_a = TransformingOptimizer(model_a.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    opt_b = TransformingOptimizer(model_b.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.3)])
    for group in opt_a.param_groups:
        group["rho"] = 0.3  # e.g. a rho schedule
    for opt, model in ((opt_a, model_a), (opt_b, model_b)):
        closure = make_closure(model, opt, x, y)
        for _ in range(3):
            opt.step(closure)
    assert_bitwise_equal(params_of(model_a), params_of(model_b))
    opt_a.param_groups[0]["rho"] = -0.1
    with pytest.raises(ValueError, match=r"rho must be a finite number >= 0, got -0\.1"):
        opt_a.step(make_closure(model_a, opt_a, x, y))


@pytest.mark.parametrize("transform", [SAM(0.1), ASAM(0.5)], ids=["SAM", "ASAM"])
def test_standalone_apply_with_nan_gradient_warns_and_leaves_weights_and_gradients(transform):
    # The seed protocol has no step to skip: the perturbation is skipped, the gradients are kept.
    param = nn.Parameter(torch.ones(2))
    evaluations = []

    def loss_fn():
        evaluations.append(1)
        return (param * float("nan")).sum()

    loss_fn().backward()
    grad = param.grad.clone()
    model = nn.Module()
    model.param = param
    with pytest.warns(RuntimeWarning, match=r"the gradient norm is nan; the perturbation is skipped"):
        transform.apply(model, loss_fn, ())
    assert len(evaluations) == 1  # no re-evaluation
    assert torch.equal(param.detach(), torch.ones(2))
    torch.testing.assert_close(param.grad, grad, rtol=0, atol=0, equal_nan=True)


def test_nan_gradient_inside_the_optimizer_skips_the_step_instead():
    param = nn.Parameter(torch.ones(2))
    optimizer = TransformingOptimizer([param], torch.optim.SGD, lr=0.1, transforms=[SAM(0.1)])

    def closure():
        optimizer.zero_grad()
        loss = (param * float("nan")).sum()
        loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = optimizer.step(closure)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "the gradients of the first evaluation are not finite: the step is skipped" in messages[0]
    assert "perturbation" not in messages[0]
    assert torch.isnan(loss)  # the first loss is still returned
    assert torch.equal(param.detach(), torch.ones(2)) and optimizer.skipped_steps == 1


# -- parameters tied through one storage ---------------------------------------------------------------
class _StorageTied(nn.Module):
    """An embedding and an output layer tied the old way: two Parameters over one storage."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(6, 4).double()
        self.head = nn.Linear(4, 6, bias=False).double()
        self.head.weight.data = self.embedding.weight.data
        self.tied_in_forward: list[bool] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tied_in_forward.append(torch.equal(self.embedding.weight, self.head.weight))
        return self.head(torch.tanh(self.embedding(tokens)))


TIED_TOKENS = torch.tensor([0, 3, 5, 1, 3])
TIED_TARGETS = torch.tensor([2, 2, 4, 0, 1])


def _tied_loss(model: nn.Module) -> torch.Tensor:
    return nn.functional.cross_entropy(model(TIED_TOKENS), TIED_TARGETS)


def _tied_reference(steps: int, rho: float, lr: float) -> torch.Tensor:
    """SAM written out on the shared memory, as torch's in-place updates treat it: each
    Parameter moves the memory by its own part of the step."""
    model = _StorageTied()
    params = [model.embedding.weight, model.head.weight]
    for _ in range(steps):
        grads = torch.autograd.grad(_tied_loss(model), params)
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        kept = params[0].detach().clone()
        with torch.no_grad():
            for param, grad in zip(params, grads):
                param.add_(grad, alpha=rho / norm.item())
        grads = torch.autograd.grad(_tied_loss(model), params)
        with torch.no_grad():
            params[0].copy_(kept)
            for param, grad in zip(params, grads):
                param.add_(grad, alpha=-lr)
    return params[0].detach().clone()


@pytest.mark.parametrize("mode", ["closure", "two-call"])
def test_parameters_tied_through_one_storage_stay_tied_and_match_the_in_place_reference(mode):
    """Before, each Parameter's .data was pointed at its own perturbed buffer, so the
    second pass saw two different weights where the model has one."""
    model = _StorageTied()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    for _ in range(3):
        if mode == "closure":

            def closure():
                optimizer.zero_grad()
                loss = _tied_loss(model)
                loss.backward()
                return loss

            optimizer.step(closure)
        else:
            _tied_loss(model).backward()
            optimizer.first_step(zero_grad=True)
            _tied_loss(model).backward()
            optimizer.second_step(zero_grad=True)
    assert model.tied_in_forward == [True] * 6
    assert model.head.weight.data_ptr() == model.embedding.weight.data_ptr()
    torch.testing.assert_close(model.embedding.weight.detach(), _tied_reference(3, 0.05, 0.1), rtol=1e-12, atol=1e-14)


def test_a_failure_while_perturbing_in_place_puts_the_weights_back(monkeypatch):
    """Parameters perturbed in place (views, tied storage, shards) are restored also when the
    in-place move itself raises halfway (they kept the perturbation before)."""
    real_add = sam_module.add_directions_

    def halfway(params, directions, scales, foreach):
        real_add(params[:1], directions[:1], scales[:1], foreach=foreach)
        raise MemoryError("injected after the first tensor")

    model = _StorageTied()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    before = params_of(model)
    monkeypatch.setattr(sam_module, "add_directions_", halfway)

    def closure():
        optimizer.zero_grad()
        loss = _tied_loss(model)
        loss.backward()
        return loss

    with pytest.raises(MemoryError, match="injected"):
        optimizer.step(closure)
    assert_bitwise_equal(before, params_of(model))
    assert model.head.weight.data_ptr() == model.embedding.weight.data_ptr()


# -- memory that other tensors hold; parameters whose contents torch swaps -----------------------------
def _in_place_sam(params, rhos, grads_at, steps, lr):
    """SAM written out per tensor on the weights' own memory, so that every tensor holding that
    memory sees the move: :math:`e = \\rho\\, g / \\lVert g \\rVert` (one norm over all gradients,
    a tensor with ``rho=0`` not moved), the gradients at :math:`w + e`, the weights copied back, an
    SGD step. ``grads_at()`` evaluates the loss at the current weights and returns the gradients
    of ``params``."""
    for _ in range(steps):
        grads = grads_at()
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        kept = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g, rho in zip(params, grads, rhos):
                if rho > 0:
                    p.add_(g * (rho / norm))
        grads = grads_at()
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)
            for p, g in zip(params, grads):
                p.sub_(lr * g)


def _flat_model():
    """A Linear whose weight and bias are views of one flat Parameter, which the optimizer
    holds (the contiguous_params pattern): the model reads the flat Parameter's memory."""
    torch.manual_seed(0)
    flat = nn.Parameter(torch.randn(10, dtype=torch.float64))
    lin = nn.Linear(4, 2).double()
    lin.weight.data = flat.data[:8].view(2, 4)
    lin.bias.data = flat.data[8:]
    return flat, lin


FLAT_X = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _flat_loss_and_grad(lin):
    lin.zero_grad()
    loss = torch.tanh(lin(FLAT_X)).pow(2).mean()
    loss.backward()
    return loss, torch.cat([lin.weight.grad.flatten(), lin.bias.grad])


def test_a_parameter_whose_memory_the_model_reads_through_views_is_perturbed_where_they_see_it():
    """Before, the flat Parameter's .data was pointed at a buffer of w + e and the views the
    model reads kept the unperturbed weights: SAM took plain SGD's step."""
    flat, lin = _flat_model()
    optimizer = TransformingOptimizer([flat], torch.optim.SGD, lr=0.1, transforms=[SAM(rho=0.5)])
    seen = []

    def closure():
        optimizer.zero_grad()
        seen.append(lin.weight.detach().clone())
        loss, flat.grad = _flat_loss_and_grad(lin)
        return loss

    for _ in range(3):
        optimizer.step(closure)

    ref_flat, ref_lin = _flat_model()
    _in_place_sam([ref_flat], [0.5], lambda: [_flat_loss_and_grad(ref_lin)[1]], 3, 0.1)
    torch.testing.assert_close(flat.detach(), ref_flat.detach(), rtol=1e-12, atol=1e-14)
    assert not torch.equal(seen[0], seen[1])  # the second pass saw w + e
    assert lin.weight.data_ptr() == flat.data_ptr() and lin.bias.data_ptr() == flat.data_ptr() + 8 * 8

    # Restored bit for bit (an inner step of size 0 leaves every weight as it was).
    flat, lin = _flat_model()
    optimizer = TransformingOptimizer([flat], torch.optim.SGD, lr=0.0, transforms=[SAM(rho=0.5)])
    before = flat.detach().clone()
    optimizer.step(closure)
    assert torch.equal(flat.detach(), before)
    assert torch.equal(lin.weight.detach().flatten(), before[:8]) and lin.weight.data_ptr() == flat.data_ptr()


@pytest.mark.parametrize("other", ["frozen", "rho-zero group"])
def test_a_parameter_tied_to_one_not_moved_is_perturbed_in_place_and_matches_the_in_place_reference(other):
    """Two Parameters over one storage, only the embedding moved (the head frozen, or in a group
    with rho=0): before, the embedding's .data was swapped and the head kept reading w."""
    def build():
        model = _StorageTied()
        if other == "frozen":
            model.head.weight.requires_grad_(False)
            params, rhos = [model.embedding.weight], [0.05]
            groups = [{"params": params}]
        else:
            params, rhos = [model.embedding.weight, model.head.weight], [0.05, 0.0]
            groups = [{"params": params[:1]}, {"params": params[1:], "rho": 0.0}]
        return model, params, rhos, groups

    model, params, _, groups = build()
    optimizer = TransformingOptimizer(groups, torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])

    def closure():
        optimizer.zero_grad()
        loss = _tied_loss(model)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    assert model.tied_in_forward == [True] * 6
    assert model.head.weight.data_ptr() == model.embedding.weight.data_ptr()

    ref_model, ref_params, ref_rhos, _ = build()
    _in_place_sam(ref_params, ref_rhos, lambda: torch.autograd.grad(_tied_loss(ref_model), ref_params), 3, 0.1)
    torch.testing.assert_close(model.embedding.weight.detach(), ref_model.embedding.weight.detach(), rtol=1e-12, atol=1e-14)

    # Restored bit for bit (an inner step of size 0 leaves every weight as it was).
    model, params, _, groups = build()
    optimizer = TransformingOptimizer(groups, torch.optim.SGD, lr=0.0, transforms=[SAM(0.05)])
    before = params_of(model)
    optimizer.step(closure)
    assert_bitwise_equal(before, params_of(model))
    assert model.head.weight.data_ptr() == model.embedding.weight.data_ptr()


def _closure_that_records(model, optimizer, x, y, record):
    """A closure (MSE loss) that calls ``record()`` first, at the weights it evaluates."""

    def closure():
        record()
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def test_an_alias_of_a_parameter_kept_elsewhere_sees_the_perturbation():
    """A ``param.detach()`` kept by the user (or a module's cache) reads the parameter's memory:
    the parameter is perturbed in place, and the step is SAM's."""
    x, y = make_data()
    model = make_model()
    aliases = [p.detach() for p in model.parameters()]
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(0.05)])
    agree = []
    closure = _closure_that_records(model, optimizer, x, y, lambda: agree.append(all(torch.equal(a, p) for a, p in zip(aliases, model.parameters()))))
    for _ in range(3):
        optimizer.step(closure)
    assert agree == [True] * 6
    expected = reference_run(make_model(), x, y, 3, "sgd_momentum", rho_of=lambda n: 0.05)
    torch.testing.assert_close(params_of(model), expected, rtol=1e-12, atol=1e-12)


class _Symmetric(nn.Module):
    """A parametrization: the symmetric matrix of a square weight's upper triangle."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.triu() + weight.triu(1).transpose(-1, -2)


def _wrapped_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Linear(3, 3).double()
    if kind == "parametrize":
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", _Symmetric())
    elif kind == "weight_norm":
        layer = torch.nn.utils.parametrizations.weight_norm(layer)
    elif kind == "spectral_norm":  # a power iteration per forward, on buffers
        layer = torch.nn.utils.parametrizations.spectral_norm(layer)
    elif kind == "orthogonal":
        layer = torch.nn.utils.parametrizations.orthogonal(layer)
    else:  # forward hooks that read the weights, and a functional call in the closure
        layer.register_forward_hook(lambda module, args, out: out * module.bias.tanh().sum())
        layer.register_forward_pre_hook(lambda module, args: (args[0] + module.weight.mean(),))
    return layer


WRAPPED_X = torch.randn(6, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)


def _wrapped_loss(layer: nn.Module, kind: str, held: torch.Tensor) -> torch.Tensor:
    if kind == "hooks":
        out = functional_call(layer, dict(layer.named_parameters()), (WRAPPED_X,))
    else:
        out = layer(WRAPPED_X)
    return torch.tanh(out).pow(2).mean() + 0.1 * held.sum()  # held: a Parameter taken before the steps


@pytest.mark.parametrize("kind", ["parametrize", "weight_norm", "spectral_norm", "orthogonal", "hooks"])
def test_the_swap_of_parameter_memory_is_invisible_to_parametrizations_hooks_and_held_parameters(kind):
    """Every parameter here is alone on its memory, so the second pass runs with ``.data`` pointed
    at the buffer of w + e: parametrizations (whose forward reads ``original``), forward hooks, a
    functional call and a Parameter object held by the closure all see the move, and the steps are
    SAM's, written out in place on the weights' own memory."""
    layer = _wrapped_layer(kind)
    params = list(layer.parameters())
    held = params[-1]
    optimizer = TransformingOptimizer(params, torch.optim.SGD, lr=0.1, transforms=[SAM(0.2)])
    own = [p.data_ptr() for p in params]
    pointers = []

    def closure():
        pointers.append([p.data_ptr() for p in params])
        optimizer.zero_grad()
        loss = _wrapped_loss(layer, kind, held)
        loss.backward()
        return loss

    for _ in range(2):
        optimizer.step(closure)
    assert all(a != b for ptrs in pointers[1::2] for a, b in zip(ptrs, own))  # the swap path ran
    assert pointers[0::2] == [own] * 2 and [p.data_ptr() for p in params] == own

    reference = _wrapped_layer(kind)
    ref_params = list(reference.parameters())
    _in_place_sam(
        ref_params,
        [0.2] * len(ref_params),
        lambda: torch.autograd.grad(_wrapped_loss(reference, kind, ref_params[-1]), ref_params),
        2,
        0.1,
    )
    torch.testing.assert_close(params_of(layer), params_of(reference), rtol=1e-12, atol=1e-14)
    for got, want in zip(layer.buffers(), reference.buffers()):  # spectral_norm's power iteration
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("counted", [True, False], ids=["counted", "not counted"])
def test_parameters_alone_on_their_memory_are_swapped_and_without_the_count_all_move_in_place(counted, monkeypatch):
    """Where torch counts a storage's references, a parameter that alone holds its memory is
    pointed at its buffer of w + e (its own memory untouched in the second pass); where it does
    not (older torch builds without CUDA), every parameter is moved in place. Both are SAM."""
    if not counted:
        monkeypatch.delattr(torch._C, "_storage_Use_Count")
        assert sam_module._storage_counter() is None
        monkeypatch.setattr(sam_module, "_STORAGE_COUNTER", None)
    elif sam_module._STORAGE_COUNTER is None:
        pytest.skip("this torch does not count a storage's references")
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(0.05)])
    trained = [p for p in model.parameters() if p.requires_grad and p is not model.unused]
    own = [p.data_ptr() for p in trained]
    pointers = []
    closure = _closure_that_records(model, optimizer, x, y, lambda: pointers.append([p.data_ptr() for p in trained]))
    for _ in range(3):
        optimizer.step(closure)
    second_passes = pointers[1::2]
    if counted:
        assert all(a != b for ptrs in second_passes for a, b in zip(ptrs, own))
    else:
        assert second_passes == [own] * 3
    assert [p.data_ptr() for p in trained] == own
    expected = reference_run(make_model(), x, y, 3, "sgd_momentum", rho_of=lambda n: 0.05)
    torch.testing.assert_close(params_of(model), expected, rtol=1e-12, atol=1e-12)


def _conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 1))


CONV_X = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(4))
CONV_Y = torch.randn(5, 1, generator=torch.Generator().manual_seed(5))


def _conv_loss(model):
    return nn.functional.mse_loss(model(CONV_X.to(model[0].weight.dtype)), CONV_Y.to(model[0].weight.dtype))


_CONVERSIONS = {
    "to float64": lambda model: model.to(torch.float64),
    "channels_last": lambda model: model.to(memory_format=torch.channels_last),
    "load_state_dict": lambda model: model.load_state_dict({k: v + 0.25 for k, v in model.state_dict().items()}),
}


@pytest.mark.parametrize("conversion", list(_CONVERSIONS))
def test_module_conversions_that_swap_parameters_work_after_sam_steps(conversion):
    """With torch.__future__.set_swap_module_params_on_conversion(True) (always for DTensor
    parameters) torch swaps each parameter's contents with torch.utils.swap_tensors, which
    refuses a tensor that has a weak reference; SAM's backup buffers were kept by one ("Cannot
    swap t1 because it has weakref associated with it"). Now the conversion works, and the next
    SAM steps (with buffers of the new dtype or layout) match the reference."""
    convert = _CONVERSIONS[conversion]
    dtype = torch.float32 if conversion == "to float64" else torch.float64
    model = _conv_model().to(dtype)
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])

    def closure():
        optimizer.zero_grad()
        loss = _conv_loss(model)
        loss.backward()
        return loss

    reference = _conv_model().to(dtype)
    ref_params = list(reference.parameters())

    def ref_grads():
        return torch.autograd.grad(_conv_loss(reference), ref_params)

    optimizer.step(closure)
    _in_place_sam(ref_params, [0.05] * len(ref_params), ref_grads, 1, 0.1)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        convert(model)
        convert(reference)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert list(model.parameters()) == optimizer.param_groups[0]["params"]  # the same objects, swapped
    for _ in range(2):
        optimizer.step(closure)
    _in_place_sam(ref_params, [0.05] * len(ref_params), ref_grads, 2, 0.1)
    torch.testing.assert_close(params_of(model), params_of(reference), rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6 if dtype == torch.float32 else 1e-14)
    for param, ref in zip(model.parameters(), reference.parameters()):
        assert param.dtype == ref.dtype and param.stride() == ref.stride()
        assert not weakref.getweakrefs(param)


def test_kept_buffers_hold_no_parameter_past_their_use_and_are_not_copied():
    """The backup buffers keep their parameters by a strong reference (torch.optim's way): they
    go with the optimizer, are dropped when the transform moves another model's parameters, and
    are not pickled or deep-copied (with the optimizer, or with a SAM used on its own)."""
    x, y = make_data()
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    optimizer.step(make_closure(model, optimizer, x, y))
    twin = copy.deepcopy(optimizer)
    assert "_backups" not in vars(twin.transforms[0]) and "_backups" not in vars(pickle.loads(pickle.dumps(optimizer)).transforms[0])
    watched = weakref.ref(model[0].weight)
    del model, optimizer, twin
    gc.collect()
    assert watched() is None  # the optimizer (and its SAM) held the parameter, nothing else

    sam = SAM(0.05)
    first, second = make_model(), make_model(seed=1)
    for model in (first, second):
        loss_fn = functools.partial(lambda model: nn.functional.mse_loss(model(x), y), model)
        loss_fn().backward()
        sam.apply(model, loss_fn, ())
    for copied in (copy.deepcopy(sam), pickle.loads(pickle.dumps(sam))):
        assert "_backups" not in vars(copied) and "_groups_in_play" not in vars(copied)
    watched = weakref.ref(first[0].weight)
    del first, model, loss_fn
    gc.collect()
    assert watched() is None  # dropped when the SAM moved the second model's parameters


# -- Ctrl-C anywhere in a step -------------------------------------------------------------------------
_INTERRUPTED = {
    "SAM": lambda: SAM(0.05),
    "ASAM": lambda: ASAM(0.05),
    "GSAM": lambda: GSAM(0.05),
    "WSAM": lambda: WSAM(0.05),
    "FriendlySAM": lambda: FriendlySAM(0.05),
    "LookSAM": lambda: LookSAM(0.05, k=2),  # the interrupted step (the third) is a SAM step
    "ESAM": lambda: ESAM(0.05, seed=0),
    "MultiStepSAM": lambda: MultiStepSAM(0.05, ascent_steps=2),
    "MultiStepSAM-adversary": lambda: MultiStepSAM(
        0.05, ascent_steps=2, adversary=functools.partial(torch.optim.SGD, momentum=0.9), reset_state=False
    ),
}


def _interrupt_at(event: int, files: set[str], step: Callable[[], Any]) -> list[tuple[str, int]]:
    """Run ``step`` with a KeyboardInterrupt raised at its ``event``-th line event in ``files``
    (none when ``event`` is past the last); return the line events up to it."""
    seen: list[tuple[str, int]] = []

    def local(frame, event_name, arg):
        if event_name == "line":
            seen.append((frame.f_code.co_filename, frame.f_lineno))
            if len(seen) == event + 1:
                raise KeyboardInterrupt
        return local

    def tracer(frame, event_name, arg):
        return local if frame.f_code.co_filename in files else None

    # The garbage of earlier trials (kept in cycles by their KeyboardInterrupt's traceback) is
    # not collected while the step runs: an optimizer's finaliser that the collector ran inside
    # the step (its transforms' _forget_parameters, in sam.py) would add line events.
    collecting = gc.isenabled()
    gc.disable()
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        step()
    finally:
        sys.settrace(previous)
        if collecting:
            gc.enable()
    return seen


@pytest.mark.parametrize("name", list(_INTERRUPTED))
def test_an_interrupt_at_any_line_of_a_step_leaves_the_weights_as_they_were(name):
    """Ctrl-C landing anywhere in a SAM-family step (while perturb() runs, after it returned and
    before the re-evaluation's try, while a _Step is built, inside restore()) left the weights at
    w + e, parameters pointing at the backup buffers for good: every later step differed. Now,
    injected at every line that sam.py, sam_family.py and ascent.py execute in one step (one run
    per line event, a parameter that is a view perturbed in place among swapped ones), the
    weights are bit for bit and storage for storage those before the step, and the next steps
    equal those of a twin that never took it."""
    files = {sam_module.__file__, sam_family_module.__file__, ascent_module.__file__}
    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(1)), torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    flat = torch.zeros(3)
    flat[1:] = model[2].bias.detach()
    model[2].bias.data = flat[1:]  # a view: perturbed in place, restored by a copy
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[_INTERRUPTED[name]()]
    )

    def closure_for(model, optimizer):
        return make_closure(model, optimizer, x, y)

    for _ in range(2):  # state exists (momentum, averages, LookSAM's direction, the adversary's)
        optimizer.step(closure_for(model, optimizer))
    twin_model, twin = copy.deepcopy((model, optimizer))
    for _ in range(2):
        twin.step(closure_for(twin_model, twin))
    expected = params_of(twin_model)
    trial_model, trial = copy.deepcopy((model, optimizer))
    events = _interrupt_at(-1, files, lambda: trial.step(closure_for(trial_model, trial)))
    lines = {(file.rsplit("/", 1)[-1], linecache.getline(file, line).strip()) for file, line in events}
    assert ("sam.py", "param.data = original") in lines  # restore() is among the lines interrupted
    if not name.startswith("MultiStepSAM-"):
        assert ("sam.py", "param.data = backup") in lines  # so is _move_along's swap
    assert len(events) > 100
    failures = []
    for event in range(len(events)):
        file, line = events[event]
        if linecache.getline(file, line).lstrip().startswith("with "):
            # A with-line's event also comes as its block exits, before __exit__ runs: an
            # interrupt there skips __exit__ (Python's limit, not samgria's), and for
            # torch.autocast(enabled=False) it leaves autocast's nesting raised for the rest of the
            # process (its weight cache is then never cleared, which breaks later autocast runs).
            continue
        trial_model, trial = copy.deepcopy((model, optimizer))
        weights = params_of(trial_model)
        pointers = [p.data_ptr() for p in trial_model.parameters()]
        with pytest.raises(KeyboardInterrupt):
            _interrupt_at(event, files, lambda: trial.step(closure_for(trial_model, trial)))
        where = f"{file.rsplit('/', 1)[-1]}:{line} {linecache.getline(file, line).strip()!r}"
        if [p.data_ptr() for p in trial_model.parameters()] != pointers or not all(
            torch.equal(a, b) for a, b in zip(weights, params_of(trial_model))
        ):
            failures.append(f"moved: {where}")
            continue
        for _ in range(2):
            trial.step(closure_for(trial_model, trial))
        if not all(torch.equal(a, b) for a, b in zip(expected, params_of(trial_model))):
            failures.append(f"differs from the twin: {where}")
    assert not failures, f"{len(failures)} of {len(events)} interrupts:\n" + "\n".join(failures)



def test_a_sparse_gradient_is_refused_naming_the_parameter_also_in_a_rho_zero_group():
    """A group with rho=0 does not exclude a parameter from SAM's gradient collection: the
    message says so and names the way out; nothing moves."""
    embedding = torch.nn.Embedding(6, 3, sparse=True)
    head = torch.nn.Linear(3, 1)
    optimizer = TransformingOptimizer(
        [{"params": head.parameters()}, {"params": embedding.parameters(), "rho": 0.0}],
        torch.optim.SGD,
        lr=0.1,
        transforms=[SAM(0.05)],
    )
    before = [p.detach().clone() for p in (*head.parameters(), *embedding.parameters())]

    def closure():
        optimizer.zero_grad()
        loss = head(embedding(torch.tensor([1, 4]))).sum()
        loss.backward()
        return loss

    with pytest.raises(
        RuntimeError,
        match=r"^SAM does not support sparse gradients \(a parameter of shape \(6, 3\) has one; a group with "
        r"rho=0 does not exclude it\): use a dense embedding, or give that parameter to another optimizer$",
    ):
        optimizer.step(closure)
    assert all(torch.equal(p, b) for p, b in zip((*head.parameters(), *embedding.parameters()), before))


def test_a_parameter_without_a_gradient_at_some_steps_keeps_its_backup_buffer():
    """A mixture of experts routes each step to some experts: the others have no gradient and are
    not moved. Their backup buffers were dropped whenever a parameter was moved for the first
    time, so every step allocated buffers anew (a page fault per page on glibc); they are kept
    while the parameters are in the optimizer."""
    torch.manual_seed(0)
    experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
    optimizer = TransformingOptimizer(experts.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(0.05)])
    x = torch.randn(4, 8)
    sam = optimizer.transforms[0]
    held = {}
    for step in range(8):
        routed = [experts[step % 4], experts[(step + 1) % 4]]

        def closure():
            optimizer.zero_grad()
            loss = sum(expert(x).pow(2).mean() for expert in routed)
            loss.backward()
            return loss

        optimizer.step(closure)
        if step == 3:
            held = {key: buffer for key, (_param, buffer) in sam._backups.items()}
    assert len(held) == 8
    assert {key: buffer for key, (_param, buffer) in sam._backups.items()} == held
    assert all(sam._backups[key][1] is buffer for key, buffer in held.items())


@pytest.mark.parametrize("kind", ["numpy-longdouble", "fraction"])
def test_asam_takes_every_real_eta_its_group_check_accepts(kind):
    """A group eta that validate_group accepts (any real number) was refused by the scaling
    kernel at the first step; it steps as the float of the same value."""
    eta = pytest.importorskip("numpy").longdouble(0.01) if kind == "numpy-longdouble" else Fraction(1, 100)

    def run(group_eta):
        torch.manual_seed(0)
        model = nn.Linear(2, 1)
        optimizer = TransformingOptimizer(
            [{"params": model.parameters(), "eta": group_eta}], torch.optim.SGD, lr=0.1, transforms=[ASAM(0.5)]
        )

        def closure():
            optimizer.zero_grad()
            loss = model(torch.ones(3, 2)).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(2):
            optimizer.step(closure)
        return [p.detach().clone() for p in model.parameters()]

    for got, want in zip(run(eta), run(0.01)):
        assert torch.equal(got, want)


# -- a float64 gradient whose norm is tiny: rho / |g| beyond float64 -------------------------------
def _perturbation_with_gradients(transform, value, loop):
    """The move e (the weights at the second pass minus w = 1) of one step whose passes' float64
    gradients are all ``value``."""
    param = nn.Parameter(torch.ones(7, dtype=torch.float64))
    optimizer = TransformingOptimizer(torch.optim.SGD([param], lr=1e-3), transforms=[transform])
    at_second_pass = []

    def install():
        at_second_pass.append(param.detach().clone())
        param.grad = torch.full((7,), value, dtype=torch.float64)

    step_installing(optimizer, install, loop)
    return at_second_pass[1] - 1.0


@pytest.mark.parametrize("loop", ["closure", "two-call"])
@pytest.mark.parametrize("rho", [0.05, 10.0])
def test_sam_moves_by_rho_along_a_float64_gradient_whose_norm_is_tiny(rho, loop):
    """|g| = 1e-310 sqrt(7): rho / |g| is beyond float64 (infinite), and splitting it into factors
    never ended (the step hung). e = rho g / |g| = rho / sqrt(7) per element, as for 1e-300."""
    e = _perturbation_with_gradients(SAM(rho), 1e-310, loop)
    expected = torch.full((7,), rho / math.sqrt(7.0), dtype=torch.float64)
    torch.testing.assert_close(e, expected, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(e, _perturbation_with_gradients(SAM(rho), 1e-300, loop), rtol=1e-12, atol=0.0)


def test_scales_within_range_moves_by_a_quotient_beyond_float64_and_refuses_a_non_finite_scale():
    """scale / divisor = 1e300 / 1e-20 is infinite in float64, the move (1e-30 times it) is not:
    it is 1e290, up to rounding. An infinite scale is refused (it looped forever)."""
    direction = torch.full((3,), 1e-30, dtype=torch.float64)
    directions, scales = sam_module._scales_within_range([direction], [1e300], [1e-20])
    assert directions[0] is not direction and torch.equal(direction, torch.full((3,), 1e-30, dtype=torch.float64))
    assert math.isfinite(scales[0]) and 0.5 < abs(scales[0]) < 2.0
    expected = torch.full((3,), (1e-30 / 1e-20) * 1e300, dtype=torch.float64)
    torch.testing.assert_close(directions[0] * scales[0], expected, rtol=1e-14, atol=0.0)
    with pytest.raises(ValueError, match="must be finite"):
        sam_module._scales_within_range([direction], [math.inf])


@pytest.mark.parametrize("loop", ["closure", "two-call"])
@pytest.mark.parametrize("size", [7, 4096])
def test_sam_moves_by_rho_along_a_float32_gradient_whose_norm_is_huge(size, loop):
    """||g|| near 1e38 * sqrt(n) makes rho / ||g|| fall below float32's normal range, where torch
    rounded the scale to a subnormal number of a few bits (3e-5 relative error at n = 4096): the
    move must be e = rho g / ||g|| to float32 rounding. Reference: float64."""
    param = nn.Parameter(torch.zeros(size))
    optimizer = TransformingOptimizer(torch.optim.SGD([param], lr=0.0), transforms=[SAM(0.05)])
    at_second_pass = []

    def install():
        at_second_pass.append(param.detach().clone())
        param.grad = torch.full((size,), 1e38)

    step_installing(optimizer, install, loop)
    expected = torch.full((size,), 0.05 / math.sqrt(size), dtype=torch.float64)
    torch.testing.assert_close(at_second_pass[1].double(), expected, rtol=2 * torch.finfo(torch.float32).eps, atol=0)


def test_asam_with_eta_zero_is_the_widely_used_sams_adaptive_mode():
    """Migration guide: that library's ``adaptive=True`` normalises ``|w| * g`` with no offset, which
    is ``ASAM(rho, eta=0.0)`` (``sam_optimizer(adaptive=True)`` is ASAM's ``eta=0.01``). Reference:
    pytorch_optimizer.SAM(adaptive=True), which has that constructor and loop, to its rounding (a
    float32 gradient norm plus perturb_eps)."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).double()

    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=generator, dtype=torch.float64), torch.randn(16, 1, generator=generator, dtype=torch.float64)) for _ in range(5)]
    models = [make() for _ in range(3)]
    optimizers = [
        pytorch_optimizer.SAM(models[0].parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1, momentum=0.9),
        TransformingOptimizer(models[1].parameters(), torch.optim.SGD, transforms=[ASAM(rho=0.5, eta=0.0)], lr=0.1, momentum=0.9),
        TransformingOptimizer(models[2].parameters(), torch.optim.SGD, transforms=[ASAM(rho=0.5)], lr=0.1, momentum=0.9),
    ]
    for x, y in batches:
        for model, optimizer in zip(models, optimizers):
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.first_step(zero_grad=True)
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.second_step(zero_grad=True)
    for theirs, ours in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    assert max((a - b).abs().max().item() for a, b in zip(models[0].parameters(), models[2].parameters())) > 1e-4  # eta matters


# -- directions computed in the backup buffers ------------------------------------------------------
def _large_mixed_params() -> list[nn.Parameter]:
    """Parameters above the size whose move is one ``torch.add(..., out=backup)`` of its own (where
    ASAM and FriendlySAM compute the direction in the backup buffer), and the ones that keep
    their directions in new memory: 16-bit, a view (moved in place), a small one; the last is for a
    ``rho=0`` group."""
    generator = torch.Generator().manual_seed(3)
    shape = (2, sam_module._CPU_LIST_NUMEL // 2 + 8)
    flat = torch.randn(2 * shape[0] * shape[1], generator=generator)
    return [
        nn.Parameter(torch.randn(shape, generator=generator)),
        nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64)),
        nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.complex64)),
        nn.Parameter(torch.randn(shape[::-1], generator=generator).t()),  # owns its storage, transposed
        nn.Parameter(torch.randn(shape[::-1], generator=generator).t()),  # its gradient contiguous (below)
        nn.Parameter(torch.randn(shape, generator=generator).bfloat16()),
        nn.Parameter(flat[: shape[0] * shape[1]].view(shape)),
        nn.Parameter(torch.randn(5, generator=generator)),
        nn.Parameter(torch.randn(shape, generator=generator)),
    ]


def _mixed_loss(params: list[nn.Parameter], step: int) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for param in params:
        if param.is_complex():
            total = total + ((param.abs() ** 2).sum() * 0.3 + torch.sin(param.real).sum()).double()
        else:
            total = total + (torch.sin(param.float() * 1.3 + step) * param.float()).sum().double()
    return total


def _run_on_large_mixed_params(transform, foreach: bool, two_call: bool, steps: int = 3, in_buffer: bool = True):
    """``steps`` steps; returns the weights each evaluation saw (with the first pass's gradients),
    the final weights and state, and what ``_prepare_move`` offered to compute in the buffers."""
    params = _large_mixed_params()
    offered = []
    prepare = transform._prepare_move

    def prepare_move(moved):
        prepared = prepare(moved)
        offered.append([view is not None for view in prepared.into])
        return prepared if in_buffer else prepared._replace(into=[None] * len(moved))

    transform._prepare_move = prepare_move
    optimizer = TransformingOptimizer(
        [{"params": params[:-1]}, {"params": params[-1:], "rho": 0.0}],
        torch.optim.SGD,
        lr=0.01,
        momentum=0.9,
        transforms=[transform],
        transform_foreach=foreach,
    )
    seen = []
    for step in range(steps):

        def closure():
            optimizer.zero_grad()
            loss = _mixed_loss(params, step)
            loss.backward()
            params[4].grad = params[4].grad.contiguous()  # laid out otherwise than its parameter
            seen.append([(p.detach().clone(), p.grad.clone()) for p in params])
            return loss

        if two_call:
            closure()
            optimizer.first_step()
            closure()
            optimizer.second_step()
        else:
            optimizer.step(closure)
    state = [value.clone() for p in params for value in optimizer.state[p].values() if isinstance(value, torch.Tensor)]
    return seen, [p.detach().clone() for p in params], state, offered


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    real = torch.view_as_real(tensor) if tensor.is_complex() else tensor
    return real.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[real.element_size()])


def _assert_same_runs(first, second) -> None:
    seen, weights, state, _offered = first
    seen_too, weights_too, state_too, _ = second
    pairs = [pair for a, b in zip(seen, seen_too) for pair in zip(a, b)]
    for (w, g), (w_too, g_too) in pairs:
        assert w.stride() == w_too.stride() and torch.equal(_bits(w), _bits(w_too))
        assert torch.equal(_bits(g), _bits(g_too))
    for a, b in zip(weights + state, weights_too + state_too, strict=True):
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("two_call", [False, True])
@pytest.mark.parametrize("foreach", [True, False])
def test_asam_computing_its_directions_in_the_backup_buffers_moves_the_weights_as_a_hand_loop_bit_for_bit(foreach, two_call):
    """ASAM computes T ⊙ g (then divided by its norm, multiplied by T) in the backup buffer of
    each large float32/float64/complex parameter it swaps, and moves it there with one
    torch.add(w, b, alpha=rho, out=b): the weights every evaluation sees, the final weights and
    the state are those of the directions kept in new memory, bit for bit (16-bit, views, small
    parameters, a gradient laid out otherwise and a rho=0 group among them), and the first move
    is the paper's e = rho T² g / ‖T g‖ (hand loop in float64)."""
    got = _run_on_large_mixed_params(ASAM(rho=0.05, eta=0.01), foreach, two_call)
    assert got[3][0] == [True, True, True, True, True, False, False, False]  # rho=0 is not moved
    _assert_same_runs(got, _run_on_large_mixed_params(ASAM(rho=0.05, eta=0.01), foreach, two_call, in_buffer=False))
    first, perturbed = got[0][0], got[0][1]
    scaled = []
    for w, g in first:
        t = (torch.view_as_real(w) if w.is_complex() else w).double().abs() + 0.01
        scaled.append(t * (torch.view_as_real(g) if g.is_complex() else g).double())
    norm = math.sqrt(sum(float((s**2).sum()) for s in scaled))
    for k, ((w, g), (moved, _)) in enumerate(zip(first[:-1], perturbed[:-1])):
        real = torch.view_as_real(w) if w.is_complex() else w
        t = real.double().abs() + 0.01
        want = real.double() + 0.05 * t * scaled[k] / norm
        torch.testing.assert_close((torch.view_as_real(moved) if moved.is_complex() else moved).double(), want, rtol=1e-5 if w.dtype != torch.bfloat16 else 1e-2, atol=1e-6)
    assert torch.equal(perturbed[-1][0], first[-1][0])  # rho=0


@pytest.mark.parametrize("two_call", [False, True])
@pytest.mark.parametrize("foreach", [True, False])
def test_friendly_sam_computing_its_directions_in_the_backup_buffers_moves_the_weights_as_a_hand_loop_bit_for_bit(foreach, two_call):
    """FriendlySAM computes d = g - sigma m in the backup buffer of each large
    float32/float64/complex parameter it swaps and moves it there: the weights every evaluation
    sees, the final weights and the averages are those of d kept in new memory, bit for bit, and
    the second step's move is rho d / ‖d‖ with d = g_2 - sigma g_1 (hand loop in float64)."""
    got = _run_on_large_mixed_params(FriendlySAM(0.05, sigma=0.7, lmbda=0.9), foreach, two_call)
    assert got[3][0] == [True, True, True, True, True, False, False, False]
    _assert_same_runs(got, _run_on_large_mixed_params(FriendlySAM(0.05, sigma=0.7, lmbda=0.9), foreach, two_call, in_buffer=False))
    averages, first, perturbed = got[0][0], got[0][2], got[0][3]  # the average after step 1 is g_1

    def real(tensor):
        return (torch.view_as_real(tensor) if tensor.is_complex() else tensor).double()

    directions = [real(g) - 0.7 * real(m) for (_w, g), (_v, m) in zip(first, averages)]
    norm = math.sqrt(sum(float((d**2).sum()) for d in directions))
    for (w, g), (moved, _), d in zip(first[:-1], perturbed[:-1], directions):
        torch.testing.assert_close(real(moved), real(w) + 0.05 * d / norm, rtol=1e-5 if w.dtype != torch.bfloat16 else 1e-2, atol=1e-6)
    assert torch.equal(perturbed[-1][0], first[-1][0])  # rho=0


@pytest.mark.parametrize("name", ["ASAM", "FriendlySAM"])
def test_an_interrupt_while_directions_are_computed_in_the_backup_buffers_leaves_the_weights_as_they_were(name):
    """ASAM and FriendlySAM compute a large swapped parameter's direction in its backup buffer
    before anything moves: Ctrl-C at any line of perturb() from the buffers' preparation to the
    move, or at the swap (one run per line event), leaves the weights bit for bit and storage for storage as they were, and
    the next steps (whose moves overwrite the buffers) equal those of a twin that never took it."""
    files = {sam_module.__file__, sam_family_module.__file__}
    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(1)), torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    width = math.isqrt(sam_module._CPU_LIST_NUMEL) + 2  # the middle weight is moved in its buffer
    model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2))
    flat = torch.zeros(3)
    flat[1:] = model[4].bias.detach()
    model[4].bias.data = flat[1:]  # a view: perturbed in place
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[_INTERRUPTED[name]()]
    )
    for _ in range(2):  # the averages exist
        optimizer.step(make_closure(model, optimizer, x, y))
    twin_model, twin = copy.deepcopy((model, optimizer))
    for _ in range(2):
        twin.step(make_closure(twin_model, twin, x, y))
    expected = params_of(twin_model)
    trial_model, trial = copy.deepcopy((model, optimizer))
    events = _interrupt_at(-1, files, lambda: trial.step(make_closure(trial_model, trial, x, y)))
    lines = [linecache.getline(file, line).strip() for file, line in events]
    start = next(i for i, line in enumerate(lines) if line.startswith("prepared = self._prepare_move("))
    swap = lines.index("param.data = backup")
    kernel = "torch.mul(widened_grads[k], scalings[k], out=buffer)" if name == "ASAM" else "real_olds[k], alpha="
    assert any(kernel in line and "out=buffer" in line for line in lines[start:swap])  # the in-buffer kernel ran
    perturb_lines = {
        (code.co_filename, line)
        for code in (
            inspect.unwrap(type(optimizer.transforms[0]).perturb).__code__,
            sam_module._fitting.__code__,
            sam_module._partly_into.__code__,
        )
        for _start, _end, line in code.co_lines()
        if line is not None
    }
    # The lines of perturb() (where the directions are computed, with the lambdas it hands to
    # _partly_into) and of _fitting and _partly_into, from the preparation to the move, and the swap
    chosen = [event for event in range(start, swap) if events[event] in perturb_lines] + [swap]
    assert len(chosen) > 20
    failures = []
    for event in chosen:
        trial_model, trial = copy.deepcopy((model, optimizer))
        weights = params_of(trial_model)
        pointers = [p.data_ptr() for p in trial_model.parameters()]
        with pytest.raises(KeyboardInterrupt):
            _interrupt_at(event, files, lambda: trial.step(make_closure(trial_model, trial, x, y)))
        if [p.data_ptr() for p in trial_model.parameters()] != pointers or not all(
            torch.equal(a, b) for a, b in zip(weights, params_of(trial_model))
        ):
            failures.append(f"moved: {lines[event]!r}")
            continue
        for _ in range(2):
            trial.step(make_closure(trial_model, trial, x, y))
        if not all(torch.equal(a, b) for a, b in zip(expected, params_of(trial_model))):
            failures.append(f"differs from the twin: {lines[event]!r}")
    assert not failures, f"{len(failures)} of {len(chosen)} interrupts:\n" + "\n".join(failures)


def test_prepare_move_offers_the_backup_buffer_only_above_the_size_the_move_takes_alone():
    """The direction goes into the backup buffer exactly where the move is one torch.add(...,
    out=backup) of its own (perturbed_into_private: a CPU parameter of more than _CPU_LIST_NUMEL
    elements, not 16-bit), the buffer being the parameter's own, under no_grad, and the parameter
    swapped (one that does not own its storage is moved in place); elsewhere None."""
    limit = sam_module._CPU_LIST_NUMEL
    owner = torch.zeros(2 * limit + 2)
    params = [
        nn.Parameter(torch.zeros(limit + 1)),
        nn.Parameter(torch.zeros(limit)),
        nn.Parameter(torch.zeros(limit + 1, dtype=torch.float64)),
        nn.Parameter(torch.zeros(limit + 1, dtype=torch.complex64)),
        nn.Parameter(torch.zeros(limit + 1, dtype=torch.bfloat16)),
        nn.Parameter(torch.zeros(limit + 1, dtype=torch.float16)),
        nn.Parameter(owner[: limit + 1]),  # a view: moved in place
        nn.Parameter(torch.zeros(limit + 1, device="meta")),
    ]
    transform = ASAM(0.05)
    with torch.no_grad():
        prepared = transform._prepare_move(params)
    assert [view is not None for view in prepared.into] == [True, False, True, True, False, False, False, False]
    assert prepared.swappable[:6] == [True] * 6 and not prepared.swappable[6]
    for view, backup in zip(prepared.into, prepared.backups):
        if view is not None:  # the real view of the parameter's own buffer
            assert view.data_ptr() == backup.data_ptr() and view.dtype == backup.real.dtype
            assert view.shape == (backup.shape if not backup.is_complex() else (*backup.shape, 2))
    with torch.enable_grad():  # out= refuses tensors that require grad under it
        assert all(view is None for view in transform._prepare_move(params[:1]).into)


def test_partly_into_computes_the_buffered_entries_only_in_their_buffers_and_the_rest_in_one_list_call():
    """Entry k is tensor_kernel(k, buffers[k]) where buffers has k, the others one
    list_kernel(rest) (in order): no entry is computed twice, nor in new memory where it has a buffer."""
    buffers = {1: torch.zeros(2), 3: torch.zeros(2)}
    lists, singles = [], []

    def list_kernel(rest):
        lists.append(list(rest))
        return [torch.full((2,), float(k)) for k in rest]

    def tensor_kernel(k, buffer):
        singles.append(k)
        return buffer.fill_(10.0 + k)

    result = sam_module._partly_into(5, buffers, list_kernel, tensor_kernel)
    assert lists == [[0, 2, 4]] and sorted(singles) == [1, 3]
    assert result[1] is buffers[1] and result[3] is buffers[3]
    assert [float(t[0]) for t in result] == [0.0, 11.0, 2.0, 13.0, 4.0]


def test_prepared_move_into_by_index_keys_each_buffer_view_by_the_callers_index():
    views = [torch.zeros(1), None, torch.zeros(2)]
    prepared = sam_module._PreparedMove([torch.zeros(1)] * 3, [True] * 3, views)
    got = prepared.into_by_index([2, 5, 7])
    assert list(got) == [2, 7] and got[2] is views[0] and got[7] is views[2]


def _run_in_and_out_of_buffers(name, make_params, groups_of, in_buffer):
    """Two steps of ``name`` first in the chain; the weights each evaluation saw and the final
    ones, and what ``_prepare_move`` offered to compute in the buffers (``in_buffer=False``: the
    directions all in new memory, the reference)."""
    params = make_params()
    transform = ASAM(0.05) if name == "ASAM" else FriendlySAM(0.05)
    prepare = transform._prepare_move
    offered = []

    def prepare_move(moved):
        prepared = prepare(moved)
        offered.append([view is not None for view in prepared.into])
        return prepared if in_buffer else prepared._replace(into=[None] * len(moved))

    transform._prepare_move = prepare_move
    optimizer = TransformingOptimizer(groups_of(params), torch.optim.SGD, lr=0.1, transforms=[transform])
    seen = []
    for step in range(2):

        def closure():
            optimizer.zero_grad()
            loss = sum((torch.sin(torch.view_as_real(p) if p.is_complex() else p) * 1.3 + step).sum() ** 2 for p in params)
            loss.backward()
            seen.append([p.detach().clone() for p in params])
            return loss

        optimizer.step(closure)
    return seen + [[p.detach().clone() for p in params]], offered


def _assert_in_buffer_run_is_the_reference(name, make_params, groups_of, offered_as):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, offered = _run_in_and_out_of_buffers(name, make_params, groups_of, True)
    assert offered == [offered_as] * 2
    want, _ = _run_in_and_out_of_buffers(name, make_params, groups_of, False)
    assert all(torch.equal(_bits(a), _bits(b)) for row, row_too in zip(got, want, strict=True) for a, b in zip(row, row_too, strict=True))


@pytest.mark.parametrize("name", ["ASAM", "FriendlySAM"])
def test_a_rho_zero_group_before_the_moved_ones_leaves_each_direction_in_its_own_buffer(name):
    """The buffers are keyed by the chain's index of each moved parameter: with a rho=0 group
    first, a parameter's direction went into the next one's buffer (of another length: resized,
    with torch's warning). Each is computed with its own group's hyperparameters (eta, sigma
    differ from the first group's). Reference: the same steps with every direction in new
    memory, bit for bit."""
    limit = sam_module._CPU_LIST_NUMEL
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(limit + extra, generator=generator) for extra in (5, 1, 3)]
    other = {"eta": 0.5} if name == "ASAM" else {"sigma": 0.5}
    _assert_in_buffer_run_is_the_reference(
        name,
        lambda: [nn.Parameter(value.clone()) for value in values],
        lambda params: [{"params": params[:1], "rho": 0.0, **other}, {"params": params[1:]}],
        [True, True],
    )


@pytest.mark.parametrize("name", ["ASAM", "FriendlySAM"])
def test_a_parameter_moved_in_place_before_swapped_ones_leaves_each_direction_in_its_own_buffer(name):
    """A view (moved in place, no buffer of its own to compute in) before a complex and a real
    swapped parameter: the views of the swapped ones' buffers are matched to them, not shifted by
    the one moved in place. Reference: every direction in new memory, bit for bit."""
    limit = sam_module._CPU_LIST_NUMEL
    generator = torch.Generator().manual_seed(1)
    flat = torch.randn(limit + 9, generator=generator)
    complex_value = torch.randn(limit + 3, generator=generator, dtype=torch.complex64)
    real_value = torch.randn(limit + 7, generator=generator)

    def make_params():
        return [nn.Parameter(flat.clone()[1:]), nn.Parameter(complex_value.clone()), nn.Parameter(real_value.clone())]

    _assert_in_buffer_run_is_the_reference(name, make_params, lambda params: [{"params": params}], [False, True, True])
