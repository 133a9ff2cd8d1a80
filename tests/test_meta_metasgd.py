"""MetaSGD: learnable per-parameter inner rates -- shapes, gradients (analytic and finite
differences), training by the outer optimizer, vmap path and state_dict."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from meta_helpers import finite_difference_grad
from state_helpers import assert_state_dicts_equal
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


@pytest.mark.parametrize(
    "lrs_group, error, message",
    [
        ({"lr": -1.0}, ValueError, r"^lrs_group\['lr'\] must be a finite number >= 0, got -1\.0$"),
        ({"lr": float("nan")}, ValueError, r"^lrs_group\['lr'\] must be a finite number >= 0, got nan$"),
        ({"lr": float("inf")}, ValueError, r"^lrs_group\['lr'\] must be a finite number >= 0, got inf$"),
        ({"lr": "x"}, TypeError, r"^lrs_group\['lr'\] must be a finite number >= 0, got 'x'$"),
        ({"lr": True}, TypeError, r"^lrs_group\['lr'\] must be a finite number >= 0, got True$"),
        ({"lr": torch.tensor(-1.0)}, ValueError, r"^lrs_group\['lr'\] must be a finite number >= 0, got -1\.0$"),
        ({"lr": torch.tensor([0.1, 0.2])}, TypeError, r"^lrs_group\['lr'\] must be a real number .* one-element real tensor"),
        ({"weight_decay": "a"}, TypeError, r"^lrs_group\['weight_decay'\] must be a real number .*, got 'a'$"),
        ({"params": []}, ValueError, r"^lrs_group must not set 'params': MetaSGD sets them itself"),
        ({"adapt": True}, ValueError, r"^lrs_group must not set 'adapt': MetaSGD sets them itself"),
        ({"inner_lrs": False, "params": []}, ValueError, r"^lrs_group must not set 'params', 'inner_lrs': MetaSGD sets"),
    ],
    ids=["negative", "nan", "inf", "str", "bool", "negative-tensor", "two-element-tensor", "weight-decay-str",
         "params", "adapt", "inner_lrs"],
)
@pytest.mark.parametrize("built", [False, True], ids=["class", "built"])
def test_lrs_group_is_checked_before_the_outer_optimizer_is_taken_over(lrs_group, error, message, built):
    """``{"lr": -1}`` built, and the first step moved the rates by gradient ascent; ``{"lr": "x"}``
    was refused only at the first step; ``params``/``adapt``/``inner_lrs`` were overwritten
    silently. A built outer optimizer is left as it was."""
    model = nn.Linear(3, 1).to(DT)
    outer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.0) if built else torch.optim.SGD
    kwargs = {} if built else {"lr": 0.1}
    with pytest.raises(error, match=message):
        MetaSGD(model, outer, lrs_group=lrs_group, **kwargs)
    if built:
        assert len(outer.param_groups) == 1 and "adapt" not in outer.param_groups[0]
        assert "inner_lr" not in outer.param_groups[0]


@pytest.mark.parametrize("lr", [0.5, np.float64(0.5), torch.tensor(0.5, dtype=DT)], ids=["float", "numpy", "tensor"])
def test_an_accepted_lrs_group_lr_steps_the_rates_by_gradient_descent(lr):
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    meta = MetaSGD(model, torch.optim.SGD, inner_lr=0.05, lr=0.1, lrs_group={"lr": lr, "note": "kept"})
    assert meta.param_groups[-1]["note"] == "kept"
    tasks = make_tasks()

    def closure():
        meta.zero_grad()
        loss = meta.task_losses(tasks, mse, vectorize=False).mean()
        loss.backward()
        return loss

    before = {n: r.detach().clone() for n, r in meta.inner_lrs.items()}
    meta.step(closure)
    for n, r in meta.inner_lrs.items():  # alpha <- alpha - 0.5 * dL/dalpha
        torch.testing.assert_close(r.detach(), before[n] - 0.5 * r.grad, rtol=0, atol=1e-15)


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


def test_a_parameter_adapted_only_after_construction_is_refused_not_adapted_at_a_fixed_rate():
    """Unfrozen (or its group switched to adapt=True) after the rates were made, a parameter was
    adapted with the group's plain inner_lr and never got a learned rate: plain MAML for it,
    without a word."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 1, dtype=DT)
    message = r"^MetaSGD has no learned rate for \['0\.weight'\]: rates are made for the parameters adapted when it is built"
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)).to(DT)
    model[0].weight.requires_grad_(False)
    meta = MetaSGD(model, torch.optim.SGD, lr=0.1, inner_lr=0.1)
    assert set(meta.inner_lrs) == {"0.bias", "1.weight", "1.bias"}
    model[0].weight.requires_grad_(True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        meta.adapt(lambda f: mse(f(x), y))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))

    flipped = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)).to(DT)
    outer = torch.optim.SGD([{"params": flipped[0].parameters(), "adapt": False}, {"params": flipped[1].parameters()}], lr=0.1)
    meta = MetaSGD(flipped, outer)
    meta.param_groups[0]["adapt"] = True
    with pytest.raises(ValueError, match=r"^MetaSGD has no learned rate for \['0\.weight', '0\.bias'\]"):
        meta.inner_loop()
    meta.param_groups[0]["adapt"] = False  # as built: adapts as before
    assert meta.inner_loop().adapt_names == ("1.weight", "1.bias")


def test_add_param_group_makes_rates_for_the_new_group_only_not_for_one_adapted_later():
    """A parameter of an earlier group unfrozen after construction got a rate (at its old group's
    inner_lr, placed before the new group's rates) from an add_param_group of another group, and
    was adapted after all instead of being refused."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)).to(DT)
    model[0].weight.requires_grad_(False)
    meta = MetaSGD(model, torch.optim.SGD, lr=0.1, inner_lr=0.3, params=model[0].parameters())
    model[0].weight.requires_grad_(True)
    meta.add_param_group({"params": model[1].parameters(), "inner_lr": 0.7})
    assert list(meta.inner_lrs) == ["0.bias", "1.weight", "1.bias"]
    assert [id(rate) for rate in meta.param_groups[1]["params"]] == [id(rate) for rate in meta.inner_lrs.values()]
    with pytest.raises(ValueError, match=r"^MetaSGD has no learned rate for \['0\.weight'\]"):
        meta.inner_loop()


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


_REFUSED_RATES = [
    # (id, checkpoint's inner_lrs -> replacement, error, match)
    ("list", lambda rates: list(rates.values()), TypeError,
     r"^state_dict\['inner_lrs'\] must be a dict of \{parameter name: rate tensor\}, got a list$"),
    ("sparse", lambda rates: {**rates, "0.weight": rates["0.weight"].to_sparse()}, ValueError,
     r"^state_dict\['inner_lrs'\]\['0.weight'\] must be a dense tensor holding values \(copied into the rate\), "
     r"got a torch.sparse_coo tensor$"),
    ("meta-device", lambda rates: {**rates, "0.bias": rates["0.bias"].to("meta")}, ValueError,
     r"^state_dict\['inner_lrs'\]\['0.bias'\] must be a dense tensor holding values \(copied into the rate\), "
     r"got a tensor on the meta device$"),
    ("quantized", lambda rates: {**rates, "0.weight": _quantized(rates["0.weight"])}, ValueError,
     r"^state_dict\['inner_lrs'\]\['0.weight'\] cannot be copied into the rate \(a plain tensor of dtype "
     r"torch.float64\): Copying from quantized Tensor"),
]


def _quantized(tensor):
    """A quantized copy of ``tensor``: real, dense and of its shape, but torch's copy_ refuses it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantized tensor creation
        return torch.quantize_per_tensor(tensor.float(), 0.01, 0, torch.qint8)


@pytest.mark.parametrize("replace, error, match", [r[1:] for r in _REFUSED_RATES], ids=[r[0] for r in _REFUSED_RATES])
def test_a_checkpoint_whose_rates_cannot_be_loaded_is_refused_before_anything_changes(replace, error, match):
    """The rates were copied in only after the outer optimizer's state had been loaded: a sparse
    or meta-device rate failed in copy_ with torch's error (the outer state already replaced),
    and a list of rates was reported as missing every rate."""
    tasks = make_tasks(2)

    def build(inner_lr):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 1)).to(DT)
        meta = MetaSGD(model, torch.optim.Adam, lr=0.1, inner_lr=inner_lr)

        def closure():
            meta.zero_grad()
            loss = meta.task_losses(tasks, mse).mean()
            loss.backward()
            return loss

        meta.step(closure)
        return meta

    saved = build(0.2).state_dict()
    saved["inner_lrs"] = {n: -rate for n, rate in saved["inner_lrs"].items()}  # negative: learned, loaded
    meta = build(0.1)
    before = copy.deepcopy(meta.state_dict())
    bad = copy.deepcopy(saved)
    bad["inner_lrs"] = replace(bad["inner_lrs"])
    with pytest.raises(error, match=match):
        meta.load_state_dict(bad)
    assert_state_dicts_equal(meta.state_dict(), before)
    assert all(torch.equal(meta.inner_lrs[n], before["inner_lrs"][n]) for n in meta.inner_lrs)
    meta.load_state_dict(copy.deepcopy(saved))  # the checkpoint as saved loads, negative rates included
    assert_state_dicts_equal(meta.state_dict(), saved)
    assert all(torch.equal(meta.inner_lrs[n], saved["inner_lrs"][n]) and (meta.inner_lrs[n] < 0).all() for n in meta.inner_lrs)


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


def test_a_checkpoint_without_the_rates_is_refused_and_changes_nothing():
    """A checkpoint without "inner_lrs" loaded the outer optimizer's state for the rates while
    the rates kept their values."""
    torch.manual_seed(0)
    source = MetaSGD(nn.Linear(2, 1), torch.optim.Adam, lr=1e-3, inner_lr=0.5)
    saved = source.state_dict()
    del saved["inner_lrs"]
    target = MetaSGD(nn.Linear(2, 1), torch.optim.Adam, lr=1e-2, inner_lr=0.01)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"^state_dict has no 'inner_lrs' \(the learned rates"):
        target.load_state_dict(saved)
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["inner_lrs"][n], r) for n, r in before["inner_lrs"].items())


def test_a_checkpoint_whose_rates_group_is_elsewhere_is_refused_and_changes_nothing():
    """The model's group and the rates' group hold as many tensors: a checkpoint with its groups
    swapped loaded, marked the model's group as the rates' (adapt=False), and the next step
    raised "adapts no parameter in the inner loop", which names the wrong cause."""
    torch.manual_seed(0)
    source = MetaSGD(nn.Linear(2, 1), torch.optim.Adam, lr=1e-3, inner_lr=0.5)
    saved = source.state_dict()
    saved["param_groups"] = saved["param_groups"][::-1]
    target = MetaSGD(nn.Linear(2, 1), torch.optim.Adam, lr=1e-2, inner_lr=0.01)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(
        ValueError,
        match=r"^the checkpoint's param_groups\[0\] has inner_lrs=True, but param_groups\[0\] of this MetaSGD "
        r"has inner_lrs=False: the checkpoint's groups are in another order",
    ):
        target.load_state_dict(saved)
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["inner_lrs"][n], r) for n, r in before["inner_lrs"].items())


def test_state_dict_post_hooks_see_the_rates_and_load_post_hooks_run_once_they_are_loaded():
    """torch runs state-dict post-hooks on the whole checkpoint and load post-hooks once the load
    is done. The rates were added after the post-hooks ran (a hook that moves or filters the
    checkpoint skipped them) and copied in after the load post-hooks (which saw the old rates,
    and whose edits of them were overwritten)."""
    torch.manual_seed(0)
    source = MetaSGD(nn.Linear(2, 1), torch.optim.Adam, lr=1e-3, inner_lr=0.5)
    packed_keys = []

    def halve_rates(_optimizer, state_dict):
        packed_keys.append(sorted(state_dict))
        state_dict["inner_lrs"] = {name: rate / 2 for name, rate in state_dict["inner_lrs"].items()}

    source.register_state_dict_post_hook(halve_rates)
    saved = source.state_dict()
    assert packed_keys == [["inner_lrs", "param_groups", "state"]]
    assert all(torch.equal(saved["inner_lrs"][name], rate / 2) for name, rate in source.inner_lrs.items())

    target = MetaSGD(nn.Linear(2, 1), torch.optim.Adam, lr=1e-3, inner_lr=0.01)
    seen = []

    def clamp_rates(optimizer):
        seen.append({name: rate.clone() for name, rate in optimizer.inner_lrs.items()})
        for rate in optimizer.inner_lrs.values():
            rate.data.clamp_(max=0.1)

    target.register_load_state_dict_post_hook(clamp_rates)
    target.load_state_dict(saved)
    assert len(seen) == 1 and all(torch.equal(seen[0][name], rate) for name, rate in saved["inner_lrs"].items())
    assert all(torch.equal(rate, torch.full_like(rate, 0.1)) for rate in target.inner_lrs.values())


# ---------------------------------------------------------------- complex parameters: real rates


class ComplexModel(nn.Module):
    """A complex weight ``w`` and a real weight ``v``; a real output."""

    def __init__(self, dtype=torch.complex128):
        super().__init__()
        real = torch.empty((), dtype=dtype).real.dtype
        self.w = nn.Parameter(torch.randn(2, dtype=dtype))
        self.v = nn.Parameter(torch.randn(2, dtype=real))

    def forward(self, x):
        return (x.to(self.w.dtype) * self.w).sum(-1, keepdim=True).abs() + (x * self.v).sum(-1, keepdim=True)


def complex_tasks(n=3, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Task(*(torch.randn(k, s, generator=g, dtype=DT) for s in (2, 1, 2, 1))) for _ in range(n)]


def complex_reference(model, rates, tasks):
    """Per-task hand-written Meta-SGD (one second-order step, phi = theta - alpha * g): the mean
    query loss's gradients w.r.t. w, v and the rates, and the per-task query losses."""
    w, v = (p.detach().clone().requires_grad_(True) for p in (model.w, model.v))
    a = {n: r.detach().clone().requires_grad_(True) for n, r in rates.items()}

    def f(w_, v_, x):
        return (x.to(w_.dtype) * w_).sum(-1, keepdim=True).abs() + (x * v_).sum(-1, keepdim=True)

    losses = []
    for t in tasks:
        gw, gv = torch.autograd.grad(mse(f(w, v, t.support_x), t.support_y), (w, v), create_graph=True)
        losses.append(mse(f(w - a["w"] * gw, v - a["v"] * gv, t.query_x), t.query_y))
    losses = torch.stack(losses)
    grads = torch.autograd.grad(losses.mean(), (w, v, a["w"], a["v"]))
    return losses.detach(), dict(zip(("w", "v", "rate_w", "rate_v"), grads))


@pytest.mark.parametrize("dtype, real", [(torch.complex64, torch.float32), (torch.complex128, torch.float64)])
def test_a_complex_parameter_gets_real_rates_of_its_real_dtype(dtype, real):
    torch.manual_seed(0)
    model = ComplexModel(dtype)
    meta = MetaSGD(model, torch.optim.SGD, lr=0.1, inner_lr=0.2)
    assert meta.inner_lrs["w"].dtype == real and meta.inner_lrs["v"].dtype == real
    assert meta.inner_lrs["w"].shape == model.w.shape
    assert torch.equal(meta.inner_lrs["w"], torch.full((2,), 0.2, dtype=real))
    x, y = torch.randn(4, 2, dtype=real), torch.randn(4, 1, dtype=real)
    learner = meta.adapt(lambda f: mse(f(x), y))  # refused complex rates before
    assert learner.params["w"].dtype == dtype


def test_complex_parameter_rates_agree_on_every_path_and_with_finite_differences():
    from samgria.meta.step import meta_step

    torch.manual_seed(0)
    tasks = complex_tasks()
    model = ComplexModel()
    meta = MetaSGD(model, torch.optim.SGD, lr=0.1, inner_lr=0.2)
    assert meta.inner_lrs["w"].dtype == DT
    with torch.no_grad():
        meta.inner_lrs["w"].copy_(torch.tensor([0.15, 0.3], dtype=DT))
        meta.inner_lrs["v"].copy_(torch.tensor([0.05, 0.25], dtype=DT))
    ref_losses, ref = complex_reference(model, meta.inner_lrs, tasks)
    assert ref["rate_w"].dtype == DT and ref["w"].dtype == torch.complex128

    def grads():
        out = {"w": model.w.grad, "v": model.v.grad, "rate_w": meta.inner_lrs["w"].grad, "rate_v": meta.inner_lrs["v"].grad}
        return {k: g.clone() for k, g in out.items()}

    def check(got, losses=None):
        for k in ref:
            assert got[k].dtype == ref[k].dtype, k
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-12, msg=k)
        if losses is not None:
            torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-12)

    for vectorize in (False, True):
        meta.zero_grad()
        losses = meta.task_losses(tasks, mse, vectorize=vectorize)
        losses.mean().backward()
        check(grads(), losses.detach())

    meta.zero_grad()  # meta.adapt, one learner per task
    losses = []
    for t in tasks:
        learner = meta.adapt(lambda f, t=t: mse(f(t.support_x), t.support_y))
        losses.append(mse(learner(t.query_x), t.query_y))
    torch.stack(losses).mean().backward()
    check(grads(), torch.stack(losses).detach())

    meta.zero_grad()  # clone().adapt_closure
    losses = []
    for t in tasks:
        learner = meta.clone().adapt_closure(lambda f, t=t: mse(f(t.support_x), t.support_y))
        losses.append(mse(learner(t.query_x), t.query_y))
    torch.stack(losses).mean().backward()
    check(grads(), torch.stack(losses).detach())

    # the rates' meta-gradient is real and is the central finite difference of the meta-loss
    fd = finite_difference_grad(lambda: meta.evaluate(tasks, mse), [meta.inner_lrs["w"], meta.inner_lrs["v"]])
    torch.testing.assert_close(ref["rate_w"], fd[0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ref["rate_v"], fd[1], rtol=1e-6, atol=1e-8)

    # meta_step applies the same update (SGD, lr=0.1) to the weights and to the real rates
    before = {"w": model.w.detach().clone(), "v": model.v.detach().clone(),
              "rate_w": meta.inner_lrs["w"].detach().clone(), "rate_v": meta.inner_lrs["v"].detach().clone()}
    with meta_step(meta, loss_fn=mse) as ms:
        for t in tasks:
            ms.task(support=(t.support_x, t.support_y), query=(t.query_x, t.query_y))
    torch.testing.assert_close(ms.loss, ref_losses.mean(), rtol=0, atol=1e-12)
    after = {"w": model.w.detach(), "v": model.v.detach(), "rate_w": meta.inner_lrs["w"].detach(),
             "rate_v": meta.inner_lrs["v"].detach()}
    for k in ref:
        assert after[k].dtype == before[k].dtype, k
        torch.testing.assert_close(after[k], before[k] - 0.1 * ref[k], rtol=0, atol=1e-12, msg=k)


def test_a_checkpoint_with_complex_rates_is_refused_before_anything_changes():
    torch.manual_seed(0)
    meta = MetaSGD(ComplexModel(), torch.optim.Adam, lr=0.1, inner_lr=0.2)
    saved = meta.state_dict()
    assert saved["inner_lrs"]["w"].dtype == DT
    twin = MetaSGD(ComplexModel(), torch.optim.Adam, lr=0.1, inner_lr=0.3)
    twin.load_state_dict(copy.deepcopy(saved))
    assert torch.equal(twin.inner_lrs["w"], saved["inner_lrs"]["w"])
    fresh = MetaSGD(ComplexModel(), torch.optim.Adam, lr=0.5, inner_lr=0.3)
    old = copy.deepcopy(saved)  # as saved when the rates were complex
    old["inner_lrs"]["w"] = old["inner_lrs"]["w"].to(torch.complex128) * (1 + 1j)
    with pytest.raises(ValueError, match=r"state_dict\['inner_lrs'\]\['w'\] must be a real tensor .*complex128"):
        fresh.load_state_dict(old)
    assert torch.equal(fresh.inner_lrs["w"], torch.full((2,), 0.3, dtype=DT))
    assert all(g["lr"] == 0.5 for g in fresh.param_groups)


# ---------------------------------------------------------------- LBFGS: one param group only


class MyLBFGS(torch.optim.LBFGS):
    pass


@pytest.mark.parametrize("outer", [torch.optim.LBFGS, MyLBFGS])
def test_an_lbfgs_outer_class_is_refused_at_construction(outer):
    model = nn.Linear(3, 1).to(DT)
    with pytest.raises(ValueError, match=rf"outer={outer.__name__}: {outer.__name__} supports exactly one param group"):
        MetaSGD(model, outer, lr=0.1)


def test_an_already_built_lbfgs_is_refused_and_left_as_it_was():
    model = nn.Linear(3, 1).to(DT)
    outer = torch.optim.LBFGS(model.parameters(), lr=0.1)
    state_type = type(outer.state)
    with pytest.raises(ValueError, match=r"outer=an already built LBFGS: LBFGS supports exactly one param group"):
        MetaSGD(model, outer)
    assert len(outer.param_groups) == 1 and type(outer.state) is state_type
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 1, dtype=DT)

    def closure():
        outer.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        return loss

    outer.step(closure)  # still usable on its own


class _OneGroupSGD(torch.optim.SGD):
    """An optimizer whose own add_param_group refuses another group (as a third-party one may)."""

    def add_param_group(self, param_group):
        if self.param_groups:
            raise RuntimeError("this optimizer takes no further param groups")
        super().add_param_group(param_group)


@pytest.mark.parametrize("kind", ["transforming", "own-refusal"])
def test_a_rates_group_the_built_outer_refuses_leaves_it_as_it_was(kind):
    """The rates' group was added after the outer optimizer was taken over: one it refused (a
    TransformingOptimizer's SAM refusing lrs_group={"rho": -1}, an optimizer that takes no more
    groups) left it with inner_lr and adapt in its groups and its state shown through the
    meta-optimizer, and a TransformingOptimizer could not be driven again ('driven by a wrapping
    optimizer, deleted since'). The group is now offered before the takeover."""
    from samgria.optim import TransformingOptimizer
    from samgria.transforms import SAM

    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    if kind == "transforming":
        outer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(rho=0.05)])
        refused, lrs_group, message = ValueError, {"rho": -1.0}, r"rho must be a finite number >= 0, got -1\.0"
    else:
        outer = _OneGroupSGD(model.parameters(), lr=0.1)
        refused, lrs_group, message = RuntimeError, None, "takes no further param groups"
    keys, state_type = [sorted(g) for g in outer.param_groups], type(outer.state)
    with pytest.raises(refused, match=message):
        MetaSGD(model, outer, lrs_group=lrs_group)
    assert [sorted(g) for g in outer.param_groups] == keys and type(outer.state) is state_type
    if kind == "transforming":
        meta = MetaSGD(model, outer, lrs_group={"rho": 0.01})  # a corrected retry drives it
        assert meta.outer is outer and outer.param_groups[1]["rho"] == 0.01
        meta.step(_closure(meta, make_tasks()))


# ---------------------------------------------------------------- add_param_group: rates stay last


def _two_stage(outer=torch.optim.Adam):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    meta = MetaSGD(model, outer, lr=1e-2, inner_lr=0.1, params=[{"params": model[2].parameters()}])
    return model, meta


def _closure(meta, tasks):
    def run():
        meta.zero_grad()
        loss = meta.task_losses(tasks, mse).mean()
        loss.backward()
        return loss

    return run


def test_add_param_group_appends_as_torch_and_adds_rates_to_the_rates_group():
    """The new group is appended (torch's order, which LR schedulers and checkpoints pair by
    position); its rates join the group marked ``inner_lrs``, which the docs name so."""
    model, meta = _two_stage()
    tasks = make_tasks()
    meta.step(_closure(meta, tasks))
    state_before = {p: {k: v.clone() for k, v in meta.state[p].items()} for p in meta.state}
    rates_group = meta.param_groups[-1]
    assert rates_group["inner_lrs"] is True and rates_group["adapt"] is False
    meta.add_param_group({"params": model[0].parameters(), "inner_lr": 0.05})
    groups = meta.param_groups
    assert len(groups) == 3 and groups[1] is rates_group
    assert {id(p) for p in rates_group["params"]} == {id(r) for r in meta.inner_lrs.values()}
    assert [id(p) for p in groups[2]["params"]] == [id(model[0].weight), id(model[0].bias)]
    assert groups[2]["lr"] == 1e-2 and groups[2]["betas"] == (0.9, 0.999) and groups[2]["adapt"] is True
    assert "inner_lrs" not in groups[2] or groups[2]["inner_lrs"] is not True
    for p, entry in state_before.items():  # the outer state is kept
        assert all(torch.equal(meta.state[p][k], v) for k, v in entry.items())
    # torch's duplicate check still applies, and a refused group changes nothing
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        meta.add_param_group({"params": [model[0].weight]})
    assert len(meta.param_groups) == 3 and meta.param_groups[1] is rates_group
    assert len(meta.inner_lrs) == 4
    before = model[0].weight.detach().clone()
    meta.step(_closure(meta, tasks))  # training continues, the new group too
    assert not torch.equal(model[0].weight, before)


def test_state_dict_after_add_param_group_resumes_bit_for_bit_in_a_fresh_twin():
    tasks = make_tasks()
    model, meta = _two_stage()
    meta.step(_closure(meta, tasks))
    meta.add_param_group({"params": model[0].parameters(), "inner_lr": 0.05})
    meta.step(_closure(meta, tasks))
    saved = copy.deepcopy(meta.state_dict())
    assert saved["param_groups"][1]["inner_lrs"] is True

    twin_model, twin = _two_stage()
    twin.add_param_group({"params": twin_model[0].parameters(), "inner_lr": 0.05})
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(saved)
    assert twin.param_groups[1]["inner_lrs"] is True
    for _ in range(2):
        meta.step(_closure(meta, tasks))
        twin.step(_closure(twin, tasks))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)
    for n, r in meta.inner_lrs.items():
        assert torch.equal(twin.inner_lrs[n], r)
    a, b = meta.state_dict(), twin.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert all(torch.equal(a["state"][k][s], b["state"][k][s]) for s in a["state"][k])
