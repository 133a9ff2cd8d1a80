"""MAML with the closure API: ``meta.adapt(support_closure)`` per task inside ``meta.step(closure)``."""

import torch
from torch import nn
from torch.nn.functional import mse_loss

from samgria import MAML, SinusoidTaskSampler

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1))
meta = MAML(model, torch.optim.Adam, lr=1e-2, inner_lr=0.01, inner_steps=1)  # second order
sampler = SinusoidTaskSampler(k_support=10, k_query=10, seed=0)
held_out = SinusoidTaskSampler(k_support=10, k_query=50, seed=1).sample(20)


def closure():
    meta.zero_grad()
    losses = []
    for task in tasks:
        # The inner loop: f runs the model with the current fast weights.
        learner = meta.adapt(lambda f: mse_loss(f(task.support_x), task.support_y))
        losses.append(mse_loss(learner(task.query_x), task.query_y))  # graph-connected to model
    loss = torch.stack(losses).mean()
    loss.backward()  # second-order meta-gradient into model.parameters()
    return loss


before = meta.evaluate(held_out, mse_loss)  # mean post-adaptation query loss, no graph
for _ in range(25):
    tasks = sampler.sample(5)
    meta.step(closure)
after = meta.evaluate(held_out, mse_loss)
assert after < before, (before, after)

# adapt() never changes the model: only step() does.
snapshot = [p.detach().clone() for p in model.parameters()]
learner = meta.adapt(lambda f: mse_loss(f(tasks[0].support_x), tasks[0].support_y), inner_steps=5)
assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snapshot))
assert set(learner.params) == {name for name, _ in model.named_parameters()}
