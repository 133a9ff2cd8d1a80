"""Learners: ``meta.clone()``, ``learner.adapt(loss)`` (chainable) and ``learner.adapt_on(...)``."""

import torch
from torch import nn
from torch.nn.functional import mse_loss

from samgria import MAML, SinusoidTaskSampler

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
meta = MAML(model, torch.optim.SGD, lr=1e-3, inner_lr=0.05, inner_steps=3)
task = SinusoidTaskSampler(k_support=10, k_query=10, seed=0).sample(1)[0]
x, y = task.support_x, task.support_y

# One differentiable step per adapt(loss); the calls chain.
learner = meta.clone()
learner.adapt(mse_loss(learner(x), y)).adapt(mse_loss(learner(x), y))
assert learner.steps_taken == 2

# adapt_on recomputes the support loss at every step (default: meta.inner_steps steps).
other = meta.clone().adapt_on(mse_loss, x, y)
assert other.steps_taken == 3
assert mse_loss(other(x), y) < mse_loss(model(x), y)  # adaptation lowered the support loss

# The adapted forward pass is graph-connected to the meta-parameters (second order).
meta.zero_grad()
query_loss = mse_loss(other(task.query_x), task.query_y)
query_loss.backward()
assert all(p.grad is not None for p in model.parameters())
