"""SAM on the outer loop: pass a ``TransformingOptimizer`` as MAML's outer optimizer."""

import torch
from torch import nn
from torch.nn.functional import mse_loss

from samgria import MAML, SAM, SinusoidTaskSampler, TransformingOptimizer

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))
outer = TransformingOptimizer(model.parameters(), torch.optim.Adam, lr=1e-3, transforms=[SAM(rho=0.05)])
meta = MAML(model, outer, inner_lr=0.01, inner_steps=1)
tasks = SinusoidTaskSampler(seed=0).sample(4)
calls = 0


def closure():
    global calls
    calls += 1
    meta.zero_grad()
    loss = meta.task_losses(tasks, mse_loss).mean()
    loss.backward()
    return loss


loss = meta.step(closure)
assert calls == 2  # the meta-loss at theta, then at theta + e (SAM's re-evaluation)
assert meta.param_groups is outer.param_groups  # schedulers on meta drive the outer lr
