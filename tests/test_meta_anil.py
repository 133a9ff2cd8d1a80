"""ANIL: only the head is adapted; the body still gets exact meta-gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from samgria.data.task import Task
from samgria.meta.anil import ANIL, head_names

DT = torch.float64
mse = nn.functional.mse_loss


def make_tasks(n=2, d=3, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Task(*(torch.randn(k, s, generator=g, dtype=DT) for s in (d, 1, d, 1))) for _ in range(n)]


def model_with_head(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def test_head_names_and_only_head_adapted():
    model = model_with_head()
    assert head_names(model, model[2]) == ["2.weight", "2.bias"]
    meta = ANIL(model, torch.optim.SGD, head=model[2], inner_lr=0.1, inner_steps=2, lr=0.1)
    assert meta.head is model[2]
    t = make_tasks(n=1)[0]
    learner = meta.adapt(lambda f: mse(f(t.support_x), t.support_y))
    assert learner.params["0.weight"] is model[0].weight
    assert learner.params["0.bias"] is model[0].bias
    # Head: two SGD steps on the head only, with the body's features fixed.
    feats = model[1](model[0](t.support_x)).detach()
    w, b = model[2].weight.detach(), model[2].bias.detach()
    for _ in range(2):
        resid = feats @ w.T + b - t.support_y
        gw = (2.0 / 5) * resid.T @ feats
        gb = (2.0 / 5) * resid.sum(0)
        w, b = w - 0.1 * gw, b - 0.1 * gb
    torch.testing.assert_close(learner.params["2.weight"], w, rtol=0, atol=1e-12)
    torch.testing.assert_close(learner.params["2.bias"], b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("vectorize", [False, True])
def test_body_gets_meta_gradients_matching_finite_differences(vectorize):
    model = model_with_head()
    tasks = make_tasks()
    meta = ANIL(model, torch.optim.SGD, head=model[2], inner_lr=0.2, inner_steps=2, lr=0.1)
    meta.zero_grad()
    meta.task_losses(tasks, mse, vectorize=vectorize).mean().backward()
    params = list(model.parameters())
    analytic = [p.grad.clone() for p in params]
    assert analytic[0].abs().sum() > 0  # the body receives meta-gradients
    h = 1e-6
    with torch.no_grad():
        for p, a in zip(params, analytic):
            flat = p.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + h
                up = meta.evaluate(tasks, mse)
                flat[i] = old - h
                down = meta.evaluate(tasks, mse)
                flat[i] = old
                assert a.view(-1)[i].item() == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-8)


def test_anil_differs_from_adapting_everything():
    model = model_with_head()
    tasks = make_tasks()
    meta = ANIL(model, torch.optim.SGD, head=model[2], inner_lr=0.2, lr=0.1)
    anil_loss = meta.task_losses(tasks, mse).mean().item()
    from samgria.meta.maml import MAML

    full_loss = MAML(model, torch.optim.SGD, inner_lr=0.2, lr=0.1).task_losses(tasks, mse).mean().item()
    assert anil_loss != pytest.approx(full_loss, rel=1e-9)


def test_head_must_be_a_submodule():
    model = model_with_head()
    with pytest.raises(ValueError, match="head must be a submodule of model, got a Linear that is not among"):
        ANIL(model, torch.optim.SGD, head=nn.Linear(4, 1), lr=0.1)
    with pytest.raises(TypeError, match="head must be a torch.nn.Module"):
        ANIL(model, torch.optim.SGD, head="2", lr=0.1)
    with pytest.raises(ValueError, match="head must have parameters to adapt, got a Tanh"):
        ANIL(model, torch.optim.SGD, head=model[1], lr=0.1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got NoneType"):
        ANIL(None, torch.optim.SGD, head=model[2], lr=0.1)
    with pytest.raises(ValueError, match="inner_lr must be a finite number >= 0, got -1"):
        ANIL(model, torch.optim.SGD, head=model[2], inner_lr=-1, lr=0.1)


class ListSampler:
    def __init__(self, tasks):
        self.tasks = tasks

    def sample(self, n):
        return list(self.tasks[:n])


HEAD_NOT_ADAPTED = (
    r"^ANIL adapts no parameter in the inner loop: none of head's parameters \['2\.weight', '2\.bias'\] "
    r"is in a param group with adapt=True \(ANIL adapts only the head, and only those of its parameters "
    r"that the outer optimizer holds\); give the parameters to adapt a param group with adapt=True "
    r"\(add_param_group adds one\); to train without adaptation, keep such a group and use inner_steps=0$"
)


@pytest.mark.parametrize("where", ["not-in-optimizer", "adapt-false-group"])
def test_an_anil_whose_head_is_not_adapted_is_refused_at_use(where):
    """The head outside every adapted group built an ANIL that adapted nothing (adapt_names == ())
    and task_losses silently returned the un-adapted losses. Refused at use (the groups may still
    change, see the next test), by every entry point, before anything runs."""
    from samgria.meta.trainer import MetaTrainer

    model = model_with_head()
    if where == "not-in-optimizer":
        params = [{"params": model[0].parameters()}]
    else:
        params = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "adapt": False}]
    meta = ANIL(model, torch.optim.SGD, head=model[2], lr=0.1, params=params)
    tasks = make_tasks()
    before = [p.detach().clone() for p in model.parameters()]
    calls = [
        lambda: meta.inner_loop(),
        lambda: meta.task_losses(tasks, mse),
        lambda: meta.evaluate(tasks, mse),
        lambda: meta.adapt(lambda f: mse(f(tasks[0].support_x), tasks[0].support_y)),
        lambda: MetaTrainer(meta, mse, ListSampler(tasks)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=HEAD_NOT_ADAPTED):
            call()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_an_anil_whose_head_does_not_require_grad_says_so():
    model = model_with_head()
    for p in model[2].parameters():
        p.requires_grad_(False)
    meta = ANIL(model, torch.optim.SGD, head=model[2], lr=0.1)
    with pytest.raises(
        ValueError,
        match=r"^ANIL adapts no parameter in the inner loop: none of head's parameters \['2\.weight', '2\.bias'\] "
        r"in a param group with adapt=True requires grad; ",
    ):
        meta.task_losses(make_tasks(), mse)
    other = model_with_head()
    every_group_off = ANIL(other, torch.optim.SGD, head=other[2], lr=0.1)
    every_group_off.param_groups[0]["adapt"] = False
    with pytest.raises(ValueError, match=r"^ANIL adapts no parameter in the inner loop: every param group has adapt=False; "):
        every_group_off.task_losses(make_tasks(), mse)


def test_a_head_added_later_with_add_param_group_is_adapted():
    """Why the refusal is at use and not at construction: the head may join the outer optimizer
    later. The ANIL then adapts exactly the head: two hand-written SGD steps on it, body fixed."""
    model = model_with_head()
    meta = ANIL(model, torch.optim.SGD, head=model[2], inner_lr=0.1, inner_steps=2, lr=0.1, params=model[0].parameters())
    meta.add_param_group({"params": model[2].parameters()})
    assert meta.inner_loop().adapt_names == ("2.weight", "2.bias")
    t = make_tasks(n=1)[0]
    learner = meta.adapt(lambda f: mse(f(t.support_x), t.support_y))
    feats = model[1](model[0](t.support_x)).detach()
    w, b = model[2].weight.detach(), model[2].bias.detach()
    for _ in range(2):
        resid = feats @ w.T + b - t.support_y
        w, b = w - 0.1 * (2.0 / 5) * resid.T @ feats, b - 0.1 * (2.0 / 5) * resid.sum(0)
    torch.testing.assert_close(learner.params["2.weight"], w, rtol=0, atol=1e-12)
    torch.testing.assert_close(learner.params["2.bias"], b, rtol=0, atol=1e-12)
    assert learner.params["0.weight"] is model[0].weight


def test_an_anil_with_part_of_its_head_in_an_adapted_group_says_that_part_does_not_require_grad():
    """One head parameter in an adapt=True group that does not require grad, the other in an
    adapt=False group: the head has a parameter in an adapted group, so the reason named is
    that it does not require grad (not that none is in such a group)."""
    model = model_with_head()
    model[2].weight.requires_grad_(False)
    others = [p for n, p in model.named_parameters() if n != "2.bias"]
    meta = ANIL(model, torch.optim.SGD, head=model[2], lr=0.1,
                params=[{"params": others}, {"params": [model[2].bias], "adapt": False}])
    with pytest.raises(
        ValueError,
        match=r"^ANIL adapts no parameter in the inner loop: none of head's parameters \['2\.weight', '2\.bias'\] "
        r"in a param group with adapt=True requires grad; ",
    ):
        meta.task_losses(make_tasks(), mse)
