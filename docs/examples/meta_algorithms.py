"""The five meta-learners and per-group inner-loop settings."""

import torch
from torch import nn
from torch.nn.functional import mse_loss

from samgria import ANIL, FOMAML, MAML, MetaSGD, Reptile, SinusoidTaskSampler


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))


tasks = SinusoidTaskSampler(k_support=10, k_query=10, seed=0).sample(4)


def maml_closure(meta):
    def closure():
        meta.zero_grad()
        losses = []
        for task in tasks:
            learner = meta.adapt(lambda f: mse_loss(f(task.support_x), task.support_y))
            losses.append(mse_loss(learner(task.query_x), task.query_y))
        loss = torch.stack(losses).mean()
        loss.backward()
        return loss

    return closure


# MAML (second order) and FOMAML (= MAML(..., first_order=True)).
for meta in (
    MAML(make_model(), torch.optim.Adam, lr=1e-3, inner_lr=0.01, inner_steps=2),
    FOMAML(make_model(), torch.optim.Adam, lr=1e-3, inner_lr=0.01, inner_steps=2),
):
    assert torch.isfinite(meta.step(maml_closure(meta)))

# Meta-SGD: one learnable inner rate per parameter entry, trained by the outer optimizer.
model = make_model()
meta = MetaSGD(model, torch.optim.Adam, lr=1e-3, inner_lr=0.01)
assert meta.inner_lrs["0.weight"].shape == model[0].weight.shape
meta.step(maml_closure(meta))
assert not torch.all(meta.inner_lrs["0.weight"] == 0.01)  # the rates moved

# ANIL: only the head is adapted; the body still receives meta-gradients.
model = make_model()
meta = ANIL(model, torch.optim.Adam, head=model[2], lr=1e-3, inner_lr=0.1)
learner = meta.adapt(lambda f: mse_loss(f(tasks[0].support_x), tasks[0].support_y))
assert learner.params["0.weight"] is model[0].weight  # the body is not adapted
assert not torch.equal(learner.params["2.weight"], model[2].weight)  # the head is
mse_loss(learner(tasks[0].query_x), tasks[0].query_y).backward()
assert model[0].weight.grad is not None

# Reptile: step() sets the pseudo-gradient theta - mean(theta'_i) and calls the outer optimizer,
# so SGD(lr=beta) is the paper's update theta <- theta + beta * (mean(theta'_i) - theta).
model = make_model()
meta = Reptile(model, torch.optim.SGD, lr=0.5, inner_lr=0.01, inner_steps=5)
theta = {name: p.detach().clone() for name, p in model.named_parameters()}
adapted = []


def reptile_closure():
    adapted.clear()
    losses = []
    for task in tasks:
        learner = meta.adapt(lambda f: mse_loss(f(task.support_x), task.support_y))
        adapted.append(learner.params)
        losses.append(mse_loss(learner(task.query_x), task.query_y))
    return torch.stack(losses).mean()  # for monitoring only: no backward() needed


meta.step(reptile_closure)
for name, p in model.named_parameters():
    mean_adapted = torch.stack([params[name] for params in adapted]).mean(0)
    torch.testing.assert_close(p.detach(), theta[name] + 0.5 * (mean_adapted - theta[name]))

# Param groups configure the inner loop: a per-group inner_lr, and adapt=False.
model = make_model()
meta = MAML(
    model,
    torch.optim.Adam,
    params=[
        {"params": model[0].parameters(), "adapt": False},  # body: not adapted (ANIL by hand)
        {"params": model[2].parameters(), "inner_lr": 0.1, "lr": 1e-4},  # head: its own rates
    ],
    lr=1e-3,
    inner_lr=0.01,
)
learner = meta.adapt(lambda f: mse_loss(f(tasks[0].support_x), tasks[0].support_y))
assert learner.params["0.weight"] is model[0].weight
assert [(g["adapt"], g["inner_lr"], g["lr"]) for g in meta.param_groups] == [(False, 0.01, 1e-3), (True, 0.1, 1e-4)]
