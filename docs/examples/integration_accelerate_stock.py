"""Hugging Face accelerate, the stock ``Accelerator``: ``sam_accelerated`` gives the optimizer it
prepared SAM's two-call loop (and ``step(closure)`` under ``mixed_precision="fp16"``).

For an ``Accelerator`` you cannot replace by ``SAMAccelerator``: your own subclass, or one that
another library builds. Needs ``accelerate`` (``pip install 'samgria[integrations]'``).
"""

import importlib.util
import os
import unittest

if importlib.util.find_spec("accelerate") is None and not os.environ.get("SAMGRIA_REQUIRE_INTEGRATIONS"):
    raise unittest.SkipTest("needs accelerate: pip install 'samgria[integrations]'")

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn import functional as F

from samgria import sam_optimizer
from samgria.integrations.accelerate import SAMAcceleratedOptimizer, sam_accelerated

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
x = torch.randn(256, 8)
y = x @ torch.randn(8, 1) + 0.1 * torch.randn(256, 1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

accelerator = Accelerator(cpu=True)  # the stock class, e.g. built by another library
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
optimizer = sam_accelerated(optimizer)  # the same object, now with first_step / second_step
assert isinstance(optimizer, SAMAcceleratedOptimizer) and accelerator._optimizers[0] is optimizer
before = F.mse_loss(model(x), y).item()

for epoch in range(3):
    for inputs, targets in loader:
        accelerator.backward(F.mse_loss(model(inputs), targets))
        optimizer.first_step(zero_grad=True)  # w -> w + e
        accelerator.backward(F.mse_loss(model(inputs), targets))
        optimizer.second_step(zero_grad=True)  # restore w, step (through the scaler under fp16)

after = F.mse_loss(model(x), y).item()
print(f"loss {before:.3f} -> {after:.3f}")
assert after < 0.5 * before
