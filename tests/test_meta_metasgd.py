"""MetaSGD: learnable per-parameter inner rates -- shapes, gradients (analytic and finite
differences), training by the outer optimizer, vmap path and state_dict."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from meta_helpers import finite_difference_grad
from samgria.data.task import Task
from samgria.meta.metasgd import MetaSGD

DT = torch.float64
mse = nn.functional.mse_loss


def make_tasks(n=3, d=3, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Task(*(torch.randn(k, s, generator=g, dtype=DT) for s in (d, 1, d, 1))) for _ in range(n)]


def ls_grad(w, x, y):
    return (2.0 / x.shape[0]) * ((x @ w.T - y).T @ x)


def test_inner_lrs_are_learnable_tensors_in_an_extra_outer_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    meta = MetaSGD(model, torch.optim.Adam, inner_lr=0.05, lr=1e-3)
    assert set(meta.inner_lrs) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        rate = meta.inner_lrs[n]
        assert rate.shape == p.shape and rate.requires_grad
        assert torch.equal(rate, torch.full_like(p, 0.05))
    last = meta.param_groups[-1]
    assert last["inner_lrs"] is True and last["adapt"] is False and last["lr"] == 1e-3
    assert {id(t) for t in last["params"]} == {id(t) for t in meta.inner_lrs.values()}
    assert len(meta.param_groups) == 2


def test_rates_gradient_equals_analytic_formula_one_step():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).to(DT)
    tasks = make_tasks()
    meta = MetaSGD(model, torch.optim.SGD, inner_lr=0.1, lr=0.5)
    with torch.no_grad():
        meta.inner_lrs["weight"].copy_(torch.tensor([[0.05, 0.1, 0.2]], dtype=DT))
    alpha = meta.inner_lrs["weight"].detach().clone()
    meta.zero_grad()
    meta.task_losses(tasks, mse, vectorize=False).mean().backward()
    w = model.weight.detach()
    exp_alpha = torch.zeros_like(w)
    exp_w = torch.zeros_like(w)
    for t in tasks:
        g_s = ls_grad(w, t.support_x, t.support_y)
        g_q = ls_grad(w - alpha * g_s, t.query_x, t.query_y)
        exp_alpha += -g_s * g_q / 3
        a_s = (2.0 / 5) * t.support_x.T @ t.support_x
        exp_w += g_q @ (torch.eye(3, dtype=DT) - torch.diag(alpha[0]) @ a_s) / 3
    torch.testing.assert_close(meta.inner_lrs["weight"].grad, exp_alpha, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.weight.grad, exp_w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("vectorize", [False, True])
def test_meta_gradients_of_params_and_rates_match_finite_differences(vectorize):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    tasks = make_tasks(n=2)
    meta = MetaSGD(model, torch.optim.SGD, inner_lr=0.1, inner_steps=2, lr=0.1)
    meta.zero_grad()
    meta.task_losses(tasks, mse, vectorize=vectorize).mean().backward()
    tensors = list(model.parameters()) + list(meta.inner_lrs.values())
    analytic = [t.grad.clone() for t in tensors]
    fd = finite_difference_grad(lambda: meta.evaluate(tasks, mse), tensors)
    for a, f in zip(analytic, fd):
        torch.testing.assert_close(a, f, rtol=1e-6, atol=1e-8)


def test_first_order_rates_still_receive_gradients():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).to(DT)
    tasks = make_tasks()
    meta = MetaSGD(model, torch.optim.SGD, inner_lr=0.1, first_order=True, lr=0.5)
    meta.task_losses(tasks, mse).mean().backward()
    w = model.weight.detach()
    exp_w = sum(ls_grad(w - 0.1 * ls_grad(w, t.support_x, t.support_y), t.query_x, t.query_y) for t in tasks) / 3
    exp_a = sum(
        -ls_grad(w, t.support_x, t.support_y) * ls_grad(w - 0.1 * ls_grad(w, t.support_x, t.support_y), t.query_x, t.query_y)
        for t in tasks
    ) / 3
    torch.testing.assert_close(model.weight.grad, exp_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(meta.inner_lrs["weight"].grad, exp_a, rtol=0, atol=1e-12)


def test_step_trains_the_rates_with_the_outer_optimizer():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    tasks = make_tasks()
    meta = MetaSGD(model, torch.optim.SGD, inner_lr=0.1, lr=0.5)

    def closure():
        meta.zero_grad()
        loss = meta.task_losses(tasks, mse).mean()
        loss.backward()
        return loss

    before = {n: r.detach().clone() for n, r in meta.inner_lrs.items()}
    meta.step(closure)
    for n, r in meta.inner_lrs.items():
        torch.testing.assert_close(r.detach(), before[n] - 0.5 * r.grad, rtol=0, atol=1e-15)
        assert not torch.equal(r.detach(), before[n])


def test_already_built_outer_gets_the_rates_group_and_options():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)
    meta = MetaSGD(model, outer, inner_lr=0.02, lrs_group={"lr": 1e-4})
    assert meta.outer is outer and len(outer.param_groups) == 2
    assert outer.param_groups[1]["lr"] == 1e-4
    with pytest.raises(TypeError, match="lrs_group must be a dict"):
        MetaSGD(model, torch.optim.SGD, lrs_group=[1], lr=0.1)


def test_only_adapted_groups_get_rates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)).to(DT)
    outer = torch.optim.SGD(
        [{"params": model[0].parameters(), "adapt": False}, {"params": model[1].parameters(), "inner_lr": 0.3}], lr=0.1
    )
    meta = MetaSGD(model, outer)
    assert set(meta.inner_lrs) == {"1.weight", "1.bias"}
    assert torch.equal(meta.inner_lrs["1.bias"], torch.full((1,), 0.3, dtype=DT))
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 1, dtype=DT)
    learner = meta.adapt(lambda f: mse(f(x), y))
    assert learner.params["0.weight"] is model[0].weight


def test_add_param_group_gives_new_parameters_learnable_rates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    meta = MetaSGD(model, torch.optim.SGD, lr=0.1, params=[{"params": model[2].parameters()}])
    assert set(meta.inner_lrs) == {"2.weight", "2.bias"}
    meta.add_param_group({"params": model[0].parameters(), "inner_lr": 0.05})
    assert set(meta.inner_lrs) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    _, lrs = meta._adapt_config()
    assert all(isinstance(v, torch.Tensor) and v.requires_grad for v in lrs.values())
    torch.testing.assert_close(meta.inner_lrs["0.weight"], torch.full_like(model[0].weight, 0.05))


def test_state_dict_round_trips_rates_and_outer_state():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    tasks = make_tasks()
    meta = MetaSGD(model, torch.optim.Adam, inner_lr=0.1, lr=1e-2)

    def closure(m):
        def run():
            m.zero_grad()
            loss = m.task_losses(tasks, mse).mean()
            loss.backward()
            return loss

        return run

    meta.step(closure(meta))
    twin_model = copy.deepcopy(model)
    twin = MetaSGD(twin_model, torch.optim.Adam, inner_lr=0.9, lr=1e-2)
    twin.load_state_dict(copy.deepcopy(meta.state_dict()))
    for n in meta.inner_lrs:
        assert torch.equal(twin.inner_lrs[n], meta.inner_lrs[n])
    meta.step(closure(meta))
    twin.step(closure(twin))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)
    bad = meta.state_dict()
    bad["inner_lrs"]["weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"state_dict\['inner_lrs'\]\['weight'\] has shape \(2,\), expected \(1, 3\)"):
        twin.load_state_dict(bad)


def test_a_load_pre_hook_sees_and_may_rename_the_stored_rates():
    """As torch hands its load pre-hooks the whole checkpoint: a hook that renames parameters can
    rename the rates too (they were taken out and checked before any hook ran)."""
    torch.manual_seed(0)
    source = MetaSGD(nn.Sequential(nn.Linear(2, 1)), torch.optim.Adam, lr=0.1, inner_lr=0.3)
    saved = source.state_dict()
    target = MetaSGD(nn.Sequential(nn.Sequential(nn.Linear(2, 1))), torch.optim.Adam, lr=0.1, inner_lr=0.1)
    seen = []

    def rename(_optimizer, state_dict):
        seen.append(sorted(state_dict))
        state_dict["inner_lrs"] = {"0." + name: rate for name, rate in state_dict["inner_lrs"].items()}

    target.register_load_state_dict_pre_hook(rename)
    target.load_state_dict(saved)
    assert seen == [["inner_lrs", "param_groups", "state"]]
    assert sorted(target.inner_lrs) == ["0.0.bias", "0.0.weight"]
    assert all(torch.equal(target.inner_lrs["0." + n], r) for n, r in source.inner_lrs.items())
