"""Hugging Face accelerate: ``SAMAccelerator`` gives prepared samgria optimizers the two-call loop
(and ``step(closure)`` under ``mixed_precision="fp16"``, where the loss scaler finishes each step).

Needs ``accelerate`` (``pip install 'samgria[integrations]'``).
"""

import contextlib
import importlib.util
import os
import unittest

if importlib.util.find_spec("accelerate") is None and not os.environ.get("SAMGRIA_REQUIRE_INTEGRATIONS"):
    raise unittest.SkipTest("needs accelerate: pip install 'samgria[integrations]'")

import torch
from torch import nn
from torch.nn import functional as F

from samgria import sam_optimizer
from samgria.integrations.accelerate import SAMAccelerator

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
x = torch.randn(256, 8)
y = x @ torch.randn(8, 1) + 0.1 * torch.randn(256, 1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

accelerator = SAMAccelerator(cpu=True)  # on a GPU e.g. SAMAccelerator(mixed_precision="fp16")
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
before = F.mse_loss(model(x), y).item()

for epoch in range(3):
    for inputs, targets in loader:
        accelerator.backward(F.mse_loss(model(inputs), targets))
        optimizer.first_step(zero_grad=True)  # w -> w + e
        accelerator.backward(F.mse_loss(model(inputs), targets))
        optimizer.second_step(zero_grad=True)  # restore w, step (through the scaler under fp16)

# Gradient accumulation: accelerate's accumulate() steps on the last micro-batch only, so SAM
# refuses it there. Loop over the micro-batches in both passes instead; no_sync skips the
# all-reduce of all but the last backward of each pass under DDP.
for inputs, targets in loader:
    micro_batches = list(zip(inputs.chunk(4), targets.chunk(4)))
    for second_pass in (False, True):
        for index, (mx, my) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                accelerator.backward(F.mse_loss(model(mx), my) / len(micro_batches))
        if not second_pass:
            optimizer.first_step(zero_grad=True)
    optimizer.second_step(zero_grad=True)

after = F.mse_loss(model(x), y).item()
print(f"loss {before:.3f} -> {after:.3f}")
assert after < 0.5 * before
