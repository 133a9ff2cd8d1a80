"""The BatchNorm policy: the inner loop never updates the model's running statistics, and
second-order MAML through BatchNorm works."""

import torch
from torch import nn
from torch.nn.functional import mse_loss

from samgria import MAML, SinusoidTaskSampler

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
meta = MAML(model, torch.optim.Adam, lr=1e-3, inner_lr=0.01, inner_steps=3)  # second order
tasks = SinusoidTaskSampler(seed=0).sample(4)
running_mean = model[1].running_mean.clone()


def closure():
    meta.zero_grad()
    losses = []
    for task in tasks:
        # In train mode BatchNorm normalises with the support batch's statistics in the inner
        # loop and with the query batch's afterwards (the transductive MAML setting).
        learner = meta.adapt(lambda f: mse_loss(f(task.support_x), task.support_y))
        losses.append(mse_loss(learner(task.query_x), task.query_y))
    loss = torch.stack(losses).mean()
    loss.backward()  # no in-place-modification error
    return loss


meta.step(closure)
assert model[1].weight.grad is not None  # BatchNorm's affine parameters are meta-trained
assert torch.equal(model[1].running_mean, running_mean)  # not updated 12 times, not at all
assert model[1].num_batches_tracked.item() == 0

# Only an ordinary forward pass of the model itself updates the statistics.
model(tasks[0].query_x)
assert model[1].num_batches_tracked.item() == 1
