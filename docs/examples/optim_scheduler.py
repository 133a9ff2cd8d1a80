"""Learning-rate schedulers work on a TransformingOptimizer as on any torch optimizer."""

import math
import warnings

import torch
from torch import nn

from samgria import SAM, TransformingOptimizer

torch.manual_seed(0)
model = nn.Linear(4, 1)
x, y = torch.randn(32, 4), torch.randn(32, 1)
optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=[SAM(rho=0.05)])
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
rho_schedule = [0.05 * (1 + step / 10) for step in range(10)]  # any key can be scheduled by hand


def closure():
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss


with warnings.catch_warnings():
    warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
    for step in range(5):
        optimizer.param_groups[0]["rho"] = rho_schedule[step]
        optimizer.step(closure)
        scheduler.step()

expected = 0.1 * (1 + math.cos(math.pi * 5 / 10)) / 2
assert math.isclose(optimizer.param_groups[0]["lr"], expected)
assert optimizer.inner.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]  # the same dict
