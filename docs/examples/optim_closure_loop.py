"""SAM as a drop-in optimizer: the usual ``loss = optimizer.step(closure)`` loop."""

import torch
from torch import nn

from samgria import SAM, TransformingOptimizer

torch.manual_seed(0)
x = torch.randn(128, 10)
y = (x[:, 0] + x[:, 1] > 0).long()
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
criterion = nn.CrossEntropyLoss()

# Builds torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) and runs SAM around its step.
optimizer = TransformingOptimizer(
    model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(rho=0.05)]
)


def closure():
    optimizer.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    return loss


first_loss = optimizer.step(closure)  # the loss at w, before the step
for _ in range(30):
    loss = optimizer.step(closure)  # evaluate at w, perturb, evaluate at w + e, restore, step

assert loss < 0.5 * first_loss, (float(first_loss), float(loss))

# An optimizer that already exists can be wrapped as well (here AdamW with its own groups).
adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
wrapped = TransformingOptimizer(adamw, transforms=[SAM(rho=0.05)])
assert wrapped.param_groups is adamw.param_groups  # one list: lr edits reach AdamW
