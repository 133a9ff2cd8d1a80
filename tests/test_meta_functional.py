"""Tests of samgria.meta.functional against hand-written references and analytic results."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

from samgria.meta.functional import (
    adapt,
    functional_forward,
    inner_step,
    named_buffers,
    named_params,
)

DT = torch.float64


def linear_problem(seed: int = 0, d: int = 3, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=DT))
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randn(n, 1, generator=g, dtype=DT)
    return model, x, y


def analytic_grad(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of mean((x w^T - y)^2) w.r.t. w (shape (1, d))."""
    n = x.shape[0]
    return (2.0 / n) * ((x @ w.T - y).T @ x)


def test_named_params_and_buffers_are_fresh_dicts_of_live_tensors():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    params = named_params(model)
    assert list(params) == [n for n, _ in model.named_parameters()]
    assert params["0.weight"] is model[0].weight
    params.pop("0.weight")
    assert "0.weight" in named_params(model)
    buffers = named_buffers(model)
    assert set(buffers) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert buffers["1.running_mean"] is model[1].running_mean


def test_named_params_rejects_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        named_params([1, 2])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got int"):
        named_buffers(3)


def test_functional_forward_matches_model_and_uses_given_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    x = torch.randn(5, 2, dtype=DT)
    assert torch.equal(functional_forward(model, named_params(model), x), model(x))
    # Other weights: compare with a deep copy holding those weights.
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-0.5)
    new_params = {n: p.detach().clone() for n, p in other.named_parameters()}
    assert torch.equal(functional_forward(model, new_params, x), other(x))
    # Partial mapping: missing names come from the model.
    partial = {"2.bias": torch.full((1,), 3.0, dtype=DT)}
    expected = model[2](model[1](model[0](x))) - model[2].bias + 3.0
    torch.testing.assert_close(functional_forward(model, partial, x), expected)


def test_functional_forward_kwargs_are_forwarded():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x, scale=1.0):
            return self.lin(x) * scale

    model = Scaled()
    x = torch.randn(3, 2)
    out = functional_forward(model, named_params(model), x, scale=2.0)
    torch.testing.assert_close(out, model(x) * 2.0)


def test_functional_forward_never_updates_model_buffers_by_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    x = torch.randn(8, 2)
    out = functional_forward(model, named_params(model), x)
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    # Train mode: normalised with the batch statistics of x.
    h = model[0](x)
    expected = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + model[1].eps)
    expected = expected * model[1].weight + model[1].bias
    torch.testing.assert_close(out, expected)
    # Explicit buffers are written into, the model's still are not.
    explicit = {n: b.clone() for n, b in model.named_buffers()}
    functional_forward(model, named_params(model), x, buffers=explicit)
    assert explicit["1.num_batches_tracked"].item() == 1
    assert model[1].num_batches_tracked.item() == 0


def test_inner_step_equals_analytic_sgd_step():
    model, x, y = linear_problem()
    params = named_params(model)
    loss = nn.functional.mse_loss(functional_forward(model, params, x), y)
    new = inner_step(params, loss, 0.1)
    expected = model.weight - 0.1 * analytic_grad(model.weight.detach(), x, y)
    torch.testing.assert_close(new["weight"], expected, rtol=0, atol=1e-12)
    assert new is not params and params["weight"] is model.weight


def test_inner_step_second_order_jacobian_is_identity_minus_lr_hessian():
    model, x, y = linear_problem(d=2)
    params = named_params(model)
    lr = 0.2
    loss = nn.functional.mse_loss(functional_forward(model, params, x), y)
    new = inner_step(params, loss, lr)
    n = x.shape[0]
    hessian = (2.0 / n) * x.T @ x
    jac = torch.stack(
        [torch.autograd.grad(new["weight"][0, i], model.weight, retain_graph=True)[0][0] for i in range(2)]
    )
    torch.testing.assert_close(jac, torch.eye(2, dtype=DT) - lr * hessian, rtol=0, atol=1e-12)


def test_inner_step_first_order_jacobian_is_identity():
    model, x, y = linear_problem(d=2)
    params = named_params(model)
    loss = nn.functional.mse_loss(functional_forward(model, params, x), y)
    new = inner_step(params, loss, 0.2, first_order=True)
    jac = torch.stack(
        [torch.autograd.grad(new["weight"][0, i], model.weight, retain_graph=True)[0][0] for i in range(2)]
    )
    torch.testing.assert_close(jac, torch.eye(2, dtype=DT), rtol=0, atol=0)


def test_inner_step_adapt_names_and_per_name_tensor_lr():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    params = named_params(model)
    x, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    loss = nn.functional.mse_loss(functional_forward(model, params, x), y)
    g_w, g_b = torch.autograd.grad(loss, [model.weight, model.bias], retain_graph=True)
    only_bias = inner_step(params, loss, 0.5, adapt_names=["bias"])
    assert only_bias["weight"] is model.weight
    torch.testing.assert_close(only_bias["bias"], model.bias - 0.5 * g_b)
    rate = torch.tensor([0.1, 0.3], dtype=DT)
    per_name = inner_step(params, loss, {"weight": 0.2, "bias": rate})
    torch.testing.assert_close(per_name["weight"], model.weight - 0.2 * g_w)
    torch.testing.assert_close(per_name["bias"], model.bias - rate * g_b)


def test_inner_step_unused_parameter_is_left_alone():
    model = nn.ModuleDict({"used": nn.Linear(2, 1), "unused": nn.Linear(2, 1)})
    params = named_params(model)
    x = torch.randn(3, 2)
    loss = functional_forward(model["used"], {"weight": params["used.weight"], "bias": params["used.bias"]}, x).sum()
    new = inner_step(params, loss, 0.1)
    assert new["unused.weight"] is params["unused.weight"]
    assert not torch.equal(new["used.weight"], params["used.weight"])
    with pytest.raises(RuntimeError):
        inner_step(params, loss, 0.1, allow_unused=False)


def test_inner_step_and_adapt_refuse_frozen_adapt_names_and_nothing_to_adapt():
    """A named parameter that does not require grad was dropped, so inner_step returned it
    unchanged as if adapted; adapt_names=None over tensors none of which requires grad adapted
    nothing. Both are refused; an explicit empty adapt_names still adapts nothing on request."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 1, dtype=DT)
    params = named_params(model)
    frozen = {**params, "bias": params["bias"].detach()}
    loss = nn.functional.mse_loss(functional_forward(model, frozen, x), y)
    message = r"^adapt_names contains parameters that do not require grad, which cannot be adapted: \['bias'\]$"
    with pytest.raises(ValueError, match=message):
        inner_step(frozen, loss, 0.1, adapt_names=["weight", "bias"])
    with pytest.raises(ValueError, match=message):
        adapt(model, frozen, lambda p: nn.functional.mse_loss(functional_forward(model, p, x), y), adapt_names=["bias"])
    detached = {n: p.detach() for n, p in params.items()}
    with pytest.raises(ValueError, match=r"^no parameter to adapt: adapt_names=None adapts the tensors that require grad, and none of the 2 does$"):
        adapt(model, detached, lambda p: nn.functional.mse_loss(functional_forward(model, p, x), y))
    assert inner_step(params, loss, 0.1, adapt_names=[])["bias"] is params["bias"]


def test_inner_step_errors_name_argument_and_value():
    model, x, y = linear_problem()
    params = named_params(model)
    loss = nn.functional.mse_loss(functional_forward(model, params, x), y)
    with pytest.raises(ValueError, match=r"lr must be a finite number >= 0, got -1\.0"):
        inner_step(params, loss, -1.0)
    with pytest.raises(TypeError, match="lr must be a finite number >= 0, got True"):
        inner_step(params, loss, True)
    with pytest.raises(ValueError, match=r"adapt_names contains names that are not in params: \['nope'\]"):
        inner_step(params, loss, 0.1, adapt_names=["nope"])
    with pytest.raises(ValueError, match=r"support loss must be a scalar tensor, got shape \(6, 1\)"):
        inner_step(params, functional_forward(model, params, x), 0.1)
    with pytest.raises(ValueError, match="does not depend on any parameter"):
        inner_step(params, torch.tensor(1.0, dtype=DT), 0.1)
    with pytest.raises(ValueError, match=r"^lr has no entry for the adapted parameters \['weight'\]$"):
        inner_step(params, loss, {"other": 0.1})
    # A flag that is not a bool would have been read by truth value ("False" is first order).
    for flag, value in (("first_order", "False"), ("first_order", float("nan")), ("allow_unused", -1), ("allow_unused", None)):
        with pytest.raises(TypeError, match=rf"^{flag} must be a bool, got {re.escape(repr(value))}$"):
            inner_step(params, loss, 0.1, **{flag: value})


def test_adapt_equals_hand_written_loop():
    model, x, y = linear_problem()
    lr, steps = 0.05, 3

    def build_loss(p):
        return nn.functional.mse_loss(functional_forward(model, p, x), y)

    out = adapt(model, named_params(model), build_loss, lr=lr, inner_steps=steps)
    w = model.weight.detach().clone()
    for _ in range(steps):
        w = w - lr * analytic_grad(w, x, y)
    torch.testing.assert_close(out["weight"], w, rtol=0, atol=1e-12)
    # Graph-connected to the model: the meta-gradient exists.
    out["weight"].sum().backward()
    assert model.weight.grad is not None


def test_adapt_is_differentiable_twice_through_weight_norm():
    """torch._weight_norm (dim 0) runs a fused kernel whose double backward is wrong; the inner
    loop computes g v / ||v|| instead. Reference: the normalisation written out, by
    torch.func.functional_call and torch.autograd.grad(create_graph=True)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    plain = copy.deepcopy(model)
    nn.utils.parametrizations.weight_norm(model[0])
    g_name, v_name = "0.parametrizations.weight.original0", "0.parametrizations.weight.original1"
    gen = torch.Generator().manual_seed(1)
    x, y, qx, qy = (torch.randn(5, d, generator=gen, dtype=DT) for d in (3, 1, 3, 1))
    lr, steps = 0.3, 2
    mse = nn.functional.mse_loss

    params = named_params(model)
    out = adapt(model, params, lambda p: mse(functional_forward(model, p, x), y), inner_lr=lr, inner_steps=steps)
    got = torch.autograd.grad(mse(functional_forward(model, out, qx), qy), list(params.values()))

    def forward(w, inputs):
        v = w[v_name]
        weights = {"0.weight": w[g_name] * v / v.norm(dim=1, keepdim=True), "0.bias": w["0.bias"],
                   "2.weight": w["2.weight"], "2.bias": w["2.bias"]}
        return torch.func.functional_call(plain, weights, (inputs,))

    fast = dict(params)
    for _ in range(steps):
        grads = torch.autograd.grad(mse(forward(fast, x), y), list(fast.values()), create_graph=True)
        fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
    expected = torch.autograd.grad(mse(forward(fast, qx), qy), list(params.values()))
    for name, a, b in zip(params, got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_adapt_zero_steps_returns_a_copy_of_params():
    model, x, y = linear_problem()
    params = named_params(model)
    out = adapt(model, params, lambda p: p["weight"].sum(), inner_steps=0)
    assert out is not params and out["weight"] is model.weight


def test_adapt_under_no_grad_still_adapts():
    model, x, y = linear_problem()
    with torch.no_grad():
        out = adapt(
            model,
            named_params(model),
            lambda p: nn.functional.mse_loss(functional_forward(model, p, x), y),
            lr=0.1,
        )
    expected = model.weight.detach() - 0.1 * analytic_grad(model.weight.detach(), x, y)
    torch.testing.assert_close(out["weight"].detach(), expected, rtol=0, atol=1e-12)


def test_adapt_errors_name_argument_and_value():
    model, x, y = linear_problem()
    params = named_params(model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        adapt("model", params, lambda p: p["weight"].sum())
    with pytest.raises(TypeError, match="build_loss must be callable, got 3"):
        adapt(model, params, 3)
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 0, got -2"):
        adapt(model, params, lambda p: p["weight"].sum(), inner_steps=-2)
    with pytest.raises(TypeError, match="inner_steps must be an integer >= 0, got True"):
        adapt(model, params, lambda p: p["weight"].sum(), inner_steps=True)
    with pytest.raises(TypeError, match=r"inner_steps must be an integer >= 0, got 1\.5"):
        adapt(model, params, lambda p: p["weight"].sum(), inner_steps=1.5)
    with pytest.raises(ValueError, match=r"^lr must be a finite number >= 0, got -0\.1"):
        adapt(model, params, lambda p: p["weight"].sum(), lr=-0.1)
    with pytest.raises(ValueError, match=r"^inner_lr must be a finite number >= 0, got -0\.1"):
        adapt(model, params, lambda p: p["weight"].sum(), inner_lr=-0.1)
    with pytest.raises(TypeError, match=r"^first_order must be a bool, got 'no'$"):
        adapt(model, params, lambda p: p["weight"].sum(), first_order="no")


@pytest.mark.parametrize("first_order, inner_steps", [(True, 1), (False, 2)])
def test_adapt_refuses_a_support_loss_computed_with_the_model_instead_of_its_argument(first_order, inner_steps):
    """build_loss = lambda p: loss(model(x)) ignores the fast weights: adapt_params adapted nothing
    (first order) or took one step of inner_steps (second order) without a word, where the
    Learner and meta.adapt refuse the same loss."""
    model, x, y = linear_problem()
    with pytest.raises(ValueError, match=r"the support loss depends on none of the 1 adapted weights \(weight\)"):
        adapt(
            model, named_params(model), lambda p: nn.functional.mse_loss(model(x), y),
            inner_lr=0.1, inner_steps=inner_steps, first_order=first_order,
        )
    # The loss built from its argument adapts as before.
    out = adapt(
        model, named_params(model), lambda p: nn.functional.mse_loss(functional_forward(model, p, x), y),
        inner_lr=0.1, first_order=first_order,
    )
    expected = model.weight.detach() - 0.1 * analytic_grad(model.weight.detach(), x, y)
    torch.testing.assert_close(out["weight"].detach(), expected, rtol=0, atol=1e-12)


def test_helpers_copy_buffers_resolve_lrs_and_checks():
    from samgria.meta.functional import check_lr, check_steps, copy_buffers, resolve_lrs

    model = nn.BatchNorm1d(2)
    copies = copy_buffers(model)
    assert copies["running_mean"] is not model.running_mean
    assert torch.equal(copies["running_var"], model.running_var)
    rate = torch.ones(2)
    assert resolve_lrs(0.5, ["a", "b"]) == {"a": 0.5, "b": 0.5}
    assert resolve_lrs({"a": rate, "b": 1}, ["a"]) == {"a": rate}
    with pytest.raises(ValueError, match=r"lr\['b'\] must be a finite number >= 0, got -1"):
        resolve_lrs({"b": -1}, ["b"])
    assert check_lr(3) == 3.0 and check_steps(2) == 2
    with pytest.raises(ValueError, match=r"inner_lr must be a finite number >= 0, got nan"):
        check_lr(float("nan"), "inner_lr")


@pytest.mark.parametrize("names", ["2.weight", b"weight", "weight"], ids=["dotted", "bytes", "one-name"])
def test_adapt_names_given_as_one_string_is_refused_naming_the_argument(names):
    """A string is a sequence of characters: it was read as the names '2', '.', 'w', ... (and a
    one-character parameter name would have been adapted silently)."""
    model, x, y = linear_problem()
    params = named_params(model)
    loss = nn.functional.mse_loss(functional_forward(model, params, x), y)
    message = "^" + re.escape(f"adapt_names must be a sequence of parameter names, got {names!r}") + "$"
    with pytest.raises(TypeError, match=message):
        inner_step(params, loss, 0.1, adapt_names=names)
    with pytest.raises(TypeError, match=message):
        adapt(model, params, lambda p: nn.functional.mse_loss(functional_forward(model, p, x), y), adapt_names=names)
    # The sequence of that one name adapts it.
    step = inner_step(params, loss, 0.1, adapt_names=["weight"])
    expected = model.weight.detach() - 0.1 * analytic_grad(model.weight.detach(), x, y)
    torch.testing.assert_close(step["weight"].detach(), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- tensor step sizes
def layer_problem(seed: int = 0):
    """A ``Linear(3, 4)`` (weight ``(4, 3)``, bias ``(4,)``), its support data and loss gradients."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(3, 4).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    x, y = torch.randn(5, 3, generator=g, dtype=DT), torch.randn(5, 4, generator=g, dtype=DT)
    return model, x, y


def layer_loss(model, params, x, y):
    return nn.functional.mse_loss(functional_forward(model, params, x), y)


def both_entry_points(model, x, y, lr):
    """``inner_step`` (argument ``lr``) and ``adapt_params`` (argument ``inner_lr``) with ``lr``."""
    params = named_params(model)
    yield "lr", lambda: inner_step(params, layer_loss(model, params, x, y), lr)
    yield "inner_lr", lambda: adapt(model, params, lambda p: layer_loss(model, p, x, y), inner_lr=lr)


BAD_SHAPES = [
    # (rate shape for the bias of shape (4,), why): each would give an adapted bias of another shape
    ((3,), "not broadcastable"),
    ((2, 4), "broadcasts to (2, 4)"),
    ((4, 1), "broadcasts to (4, 4)"),
]


@pytest.mark.parametrize("shape", [s for s, _ in BAD_SHAPES], ids=[why for _, why in BAD_SHAPES])
@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned"])
def test_a_tensor_rate_that_would_change_its_parameters_shape_is_refused(shape, learned):
    """The rate entered p - rate * g unchecked: a bias of shape (4,) was adapted to shape (2, 4).
    The shape check applies to learned rates (Meta-SGD's, requiring grad) as well."""
    model, x, y = layer_problem()
    rate = torch.full(shape, 0.1, dtype=DT, requires_grad=learned)
    for arg, call in both_entry_points(model, x, y, {"weight": 0.1, "bias": rate}):
        message = (
            f"{arg}['bias'] must be a number or a tensor broadcastable to its parameter's shape (4,), "
            f"got a tensor of shape {shape}"
        )
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            call()


def test_rates_of_shape_3_and_2_by_1_for_a_bias_of_shape_1_are_refused():
    model = nn.Linear(2, 1)
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    params = named_params(model)
    with pytest.raises(ValueError, match=r"^lr\['bias'\] must be .* its parameter's shape \(1,\), got a tensor of shape \(3,\)$"):
        inner_step(params, nn.functional.mse_loss(model(x), y), {"weight": 0.1, "bias": torch.ones(3)})
    with pytest.raises(ValueError, match=r"^lr\['bias'\] must be .* its parameter's shape \(1,\), got a tensor of shape \(2, 1\)$"):
        inner_step(params, nn.functional.mse_loss(model(x), y), {"weight": 0.1, "bias": torch.ones(2, 1)})


@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned"])
def test_a_tensor_rate_that_would_change_its_parameters_dtype_is_refused(learned):
    """A float32 rate tensor for a float64 parameter would be fine (float64 wins), but a float64
    rate of shape (4,) for a float32 bias made the adapted bias float64 and the next forward
    failed naming no rate; a 0-dim float64 rate keeps the parameter's dtype and is fine."""
    model, x, y = layer_problem()
    model, x, y = model.float(), x.float(), y.float()
    rate = torch.full((4,), 0.1, dtype=torch.float64, requires_grad=learned)
    message = (
        "['bias'] must be a tensor that keeps its parameter's dtype torch.float32 (a 0-dim tensor, or "
        "one of that dtype), got a tensor of dtype torch.float64, which would make it torch.float64"
    )
    for arg, call in both_entry_points(model, x, y, {"weight": 0.1, "bias": rate}):
        with pytest.raises(ValueError, match="^" + re.escape(arg + message) + "$"):
            call()
    params = named_params(model)
    adapted = inner_step(params, layer_loss(model, params, x, y), {"weight": 0.1, "bias": torch.tensor(0.1, dtype=torch.float64)})
    assert adapted["bias"].dtype == torch.float32


@pytest.mark.parametrize("shape", [(), (4,)], ids=["0-dim", "shaped"])
def test_a_tensor_rate_on_another_device_is_refused_unless_a_0_dim_cpu_tensor(shape):
    """torch lets a 0-dim CPU tensor meet tensors on any device, not the reverse: a rate on
    another device (here "meta") failed inside the inner step naming nothing."""
    model, x, y = layer_problem()
    rate = torch.full(shape, 0.1, dtype=DT, device="meta")
    for arg, call in both_entry_points(model, x, y, {"weight": 0.1, "bias": rate}):
        message = f"{arg}['bias'] must be on its parameter's device cpu (or a 0-dim CPU tensor), got a tensor on meta"
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            call()


@pytest.mark.parametrize(
    "entries",
    [[0.1, -0.2, 0.3, 0.4], [0.1, float("nan"), 0.3, 0.4], [0.1, 0.2, float("inf"), 0.4]],
    ids=["negative", "nan", "inf"],
)
def test_a_fixed_tensor_rate_with_a_negative_or_non_finite_entry_is_refused_like_a_number(entries):
    """A negative float rate was refused but a negative tensor rate was not."""
    model, x, y = layer_problem()
    rate = torch.tensor(entries, dtype=DT)
    for arg, call in both_entry_points(model, x, y, {"weight": 0.1, "bias": rate}):
        message = f"{arg}['bias'] must be a tensor of finite numbers >= 0, got {rate!r}"
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            call()
    for arg, call in both_entry_points(model, x, y, {"weight": 0.1, "bias": -0.2}):  # the number's message
        with pytest.raises(ValueError, match="^" + re.escape(f"{arg}['bias'] must be a finite number >= 0, got -0.2") + "$"):
            call()


def test_a_bool_tensor_rate_is_refused_as_not_a_number():
    model, x, y = layer_problem()
    for arg, call in both_entry_points(model, x, y, {"weight": 0.1, "bias": torch.ones(4, dtype=torch.bool)}):
        with pytest.raises(TypeError, match=r"^" + re.escape(arg) + r"\['bias'\] must be a real number or a real tensor, got a tensor of dtype torch\.bool$"):
            call()


def test_a_rate_mapping_without_an_adapted_name_is_a_value_error_naming_the_argument():
    model, x, y = layer_problem()
    for arg, call in both_entry_points(model, x, y, {"weight": 0.1}):
        with pytest.raises(ValueError, match="^" + re.escape(f"{arg} has no entry for the adapted parameters ['bias']") + "$"):
            call()


def test_broadcastable_scalar_and_zero_tensor_rates_step_each_entry_by_its_rate():
    """Valid tensor rates: a scalar tensor, a (1,) rate on the (4,) bias, a per-row (4, 1) rate on
    the (4, 3) weight, zero entries. Reference: each entry stepped by hand, p_ij - a_ij g_ij."""
    model, x, y = layer_problem()
    params = named_params(model)
    g_w, g_b = torch.autograd.grad(layer_loss(model, params, x, y), [model.weight, model.bias])
    cases = [
        (torch.tensor(0.2, dtype=DT), torch.tensor([0.3], dtype=DT)),
        (torch.tensor([[0.0], [0.1], [0.2], [0.5]], dtype=DT), torch.tensor([0.0, 0.1, 0.0, 0.4], dtype=DT)),
    ]
    for rate_w, rate_b in cases:
        new = inner_step(params, layer_loss(model, params, x, y), {"weight": rate_w, "bias": rate_b})
        assert new["weight"].shape == (4, 3) and new["bias"].shape == (4,)
        full_w, full_b = rate_w.expand(4, 3), rate_b.expand(4)
        for i in range(4):
            assert new["bias"][i].item() == model.bias[i].item() - full_b[i].item() * g_b[i].item()
            for j in range(3):
                assert new["weight"][i, j].item() == model.weight[i, j].item() - full_w[i, j].item() * g_w[i, j].item()
        out = adapt(model, params, lambda p: layer_loss(model, p, x, y), inner_lr={"weight": rate_w, "bias": rate_b})
        assert torch.equal(out["weight"], new["weight"]) and torch.equal(out["bias"], new["bias"])


@pytest.mark.parametrize("kind", ["parameter", "requires_grad"])
def test_a_learned_rate_may_be_negative_and_receives_its_gradient(kind):
    """Meta-SGD's rates are learned and may go negative (Li et al., 2017): they are not refused and
    their values are not read. d(sum p')/d(rate) = -g."""
    model, x, y = layer_problem()
    params = named_params(model)
    values = torch.tensor([0.1, -0.2, 0.3, -0.4], dtype=DT)
    rate = nn.Parameter(values.clone()) if kind == "parameter" else values.clone().requires_grad_(True)
    loss = layer_loss(model, params, x, y)
    (g_b,) = torch.autograd.grad(loss, [model.bias], retain_graph=True)
    new = inner_step(params, loss, {"weight": 0.1, "bias": rate}, first_order=True)
    for i in range(4):
        assert new["bias"][i].item() == model.bias[i].item() - values[i].item() * g_b[i].item()
    (d_rate,) = torch.autograd.grad(new["bias"].sum(), [rate])
    assert torch.equal(d_rate, -g_b)


def _layer_applied_twice(seed: int = 0) -> tuple[nn.Module, nn.Linear]:
    torch.manual_seed(seed)
    layer = nn.Linear(3, 3).to(DT)
    return nn.Sequential(layer, nn.Tanh(), layer), layer


def test_functional_forward_leaves_a_module_registered_under_two_names_as_it_was():
    """torch's functional_call swaps a module registered under two names twice and puts the
    first swap's tensors back as the originals: the model kept the fast weights, as plain tensors
    the optimizer does not hold."""
    model, layer = _layer_applied_twice()
    weight, bias = layer.weight, layer.bias
    saved = [weight.detach().clone(), bias.detach().clone()]
    fast = {"0.weight": 2 * weight, "0.bias": bias + 1}
    x = torch.randn(4, 3, dtype=DT)
    out = functional_forward(model, fast, x)
    expected = torch.tanh(x @ fast["0.weight"].T + fast["0.bias"]) @ fast["0.weight"].T + fast["0.bias"]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    assert layer.weight is weight and layer.bias is bias
    assert [p is q for p, q in zip(model.parameters(), (weight, bias))] == [True, True]
    assert torch.equal(weight, saved[0]) and torch.equal(bias, saved[1])
    out.sum().backward()  # the fast weights' graph reaches the model's parameters
    assert weight.grad is not None and bias.grad is not None


def test_functional_forward_leaves_a_reused_module_as_it_was_when_the_forward_raises():
    model, layer = _layer_applied_twice()
    weight = layer.weight
    with pytest.raises(RuntimeError):
        functional_forward(model, {"0.weight": 2 * weight}, torch.randn(4, 5, dtype=DT))  # wrong width
    assert layer.weight is weight and isinstance(layer.weight, nn.Parameter)


def _weight_norm_double_grad() -> torch.Tensor:
    """d/dv of <grad_v(sum(w * c)), d> for w = torch._weight_norm(v, g, 0), at fixed values."""
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(4, 3, dtype=DT, generator=gen, requires_grad=True)
    g = torch.randn(4, 1, dtype=DT, generator=gen, requires_grad=True)
    c, d = torch.randn(4, 3, dtype=DT, generator=gen), torch.randn(4, 3, dtype=DT, generator=gen)
    (grad_v,) = torch.autograd.grad((torch._weight_norm(v, g, 0) * c).sum(), v, create_graph=True)
    (second,) = torch.autograd.grad((grad_v * d).sum(), v)
    return second


def test_twice_differentiable_forward_substitutes_weight_norm_only_for_a_model_that_has_one():
    """The composite weight norm costs a Python call per torch function, so the mode is entered
    for a model with a weight-normalised layer (or no model given), not for others; the
    second derivative then comes from g v / ||v|| (a finite-difference check tells them apart)."""
    from samgria.meta.engine import twice_differentiable_forward, weight_normalised_modules

    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    normalised = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.utils.parametrizations.weight_norm(nn.Linear(4, 1)))
    with warnings.catch_warnings():  # deprecated in favour of the parametrization, still used
        warnings.simplefilter("ignore", FutureWarning)
        hooked = nn.utils.weight_norm(nn.Linear(3, 2))
    assert weight_normalised_modules(plain) == []
    assert [name for name, _ in weight_normalised_modules(normalised)] == ["2"]
    assert [name for name, _ in weight_normalised_modules(hooked)] == [""]

    fused = _weight_norm_double_grad()
    with twice_differentiable_forward(True, plain):
        assert torch.equal(_weight_norm_double_grad(), fused), "no mode for a model without weight norm"
    composites = []
    for model in (normalised, hooked, None):
        with twice_differentiable_forward(True, model):
            composites.append(_weight_norm_double_grad())
    with twice_differentiable_forward(False, normalised):
        assert torch.equal(_weight_norm_double_grad(), fused), "first order: nothing changes"

    # The composite's second derivative is the right one: central differences of grad_v.
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(4, 3, dtype=DT, generator=gen)
    g = torch.randn(4, 1, dtype=DT, generator=gen)
    c, d = torch.randn(4, 3, dtype=DT, generator=gen), torch.randn(4, 3, dtype=DT, generator=gen)

    def directional(at: torch.Tensor) -> torch.Tensor:
        at = at.clone().requires_grad_(True)
        w = g * at / at.norm(dim=1, keepdim=True)
        (grad_v,) = torch.autograd.grad((w * c).sum(), at)
        return (grad_v * d).sum()

    step = 1e-6
    numeric = torch.zeros_like(v)
    for index in range(v.numel()):
        bump = torch.zeros(v.numel(), dtype=DT)
        bump[index] = step
        bump = bump.view_as(v)
        numeric.view(-1)[index] = (directional(v + bump) - directional(v - bump)) / (2 * step)
    for composite in composites:
        torch.testing.assert_close(composite, numeric, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(fused, numeric, rtol=1e-6, atol=1e-8), "torch's fused double backward is still wrong"


NOT_PARAMS = [
    ([1], r"^params must be a mapping of parameter names to tensors, got \[1\]$"),
    ("weight", r"^params must be a mapping of parameter names to tensors, got 'weight'$"),
    ({"weight": 0.1}, r"^params\['weight'\] must be a tensor, got 0\.1$"),
    ({0: torch.zeros(1, 3)}, r"^params must be a mapping of parameter names to tensors, got the key 0$"),
]


@pytest.mark.parametrize("params, message", NOT_PARAMS, ids=["list", "str", "float-value", "int-key"])
def test_params_that_are_not_a_mapping_of_names_to_tensors_are_refused_naming_params(params, message):
    """``adapt(m, [1], build)`` raised ``AttributeError: 'list' object has no attribute 'items'``,
    ``functional_forward`` torch's own error, naming no argument."""
    model, x, y = linear_problem()
    loss = nn.functional.mse_loss(model(x), y)
    with pytest.raises(TypeError, match=message):
        adapt(model, params, lambda p: p["weight"].sum())
    with pytest.raises(TypeError, match=message):
        inner_step(params, loss, 0.1)
    with pytest.raises(TypeError, match=message):
        functional_forward(model, params, x)


@pytest.mark.parametrize("names", [3, 1.5, None.__class__, torch.tensor(1)], ids=["int", "float", "type", "tensor"])
def test_adapt_names_that_are_not_a_sequence_of_names_are_refused_naming_adapt_names(names):
    """``adapt_names=3`` raised ``'int' object is not iterable``."""
    model, x, y = linear_problem()
    params = named_params(model)
    loss = nn.functional.mse_loss(functional_forward(model, params, x), y)
    message = rf"^adapt_names must be a sequence of parameter names, got {re.escape(repr(names))}$"
    with pytest.raises(TypeError, match=message):
        inner_step(params, loss, 0.1, adapt_names=names)
    with pytest.raises(TypeError, match=message):
        adapt(model, params, lambda p: p["weight"].sum(), adapt_names=names)
    # a sequence of names still adapts them: w - lr * grad
    stepped = inner_step(params, loss, 0.1, adapt_names=("weight",))
    w = model.weight.detach()
    torch.testing.assert_close(stepped["weight"], w - 0.1 * analytic_grad(w, x, y), rtol=1e-12, atol=1e-14)


class _NameSet:
    """Map-style names: ``__len__`` and ``__getitem__`` (IndexError at the end), no ``__iter__``."""

    def __init__(self, names):
        self.names = list(names)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        return self.names[index]


def test_a_parameter_dict_is_params_and_adapt_names_may_be_map_style():
    """``functional_forward``, ``inner_step`` and ``adapt`` refused a ``torch.nn.ParameterDict``
    (not a ``collections.abc.Mapping``) and ``adapt_names`` with ``__getitem__`` but no
    ``__iter__``, which ``list()`` takes; both worked before the argument checks."""
    model, x, y = linear_problem()
    w = model.weight.detach()
    params = nn.ParameterDict({"weight": nn.Parameter(w.clone())})
    torch.testing.assert_close(functional_forward(model, params, x), x @ w.T, rtol=0, atol=0)
    loss = nn.functional.mse_loss(functional_forward(model, params, x), y)
    stepped = inner_step(params, loss, 0.1, adapt_names=_NameSet(["weight"]))
    expected = w - 0.1 * analytic_grad(w, x, y)
    torch.testing.assert_close(stepped["weight"], expected, rtol=1e-12, atol=1e-14)

    def build(p):
        return nn.functional.mse_loss(functional_forward(model, p, x), y)

    adapted = adapt(model, params, build, inner_lr=0.1, inner_steps=1, adapt_names=_NameSet(["weight"]))
    torch.testing.assert_close(adapted["weight"], expected, rtol=1e-12, atol=1e-14)
    # a string is still not a sequence of names, and a bad ParameterDict-like value is still named
    with pytest.raises(TypeError, match=r"^adapt_names must be a sequence of parameter names, got 'weight'$"):
        inner_step(params, loss, 0.1, adapt_names="weight")
    with pytest.raises(TypeError, match=r"^params must be a mapping of parameter names to tensors, got "):
        functional_forward(model, [("weight", w)], x)
