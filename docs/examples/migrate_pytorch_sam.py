"""From the SAM(params, base_optimizer) API (the widely used PyTorch SAM, pytorch_optimizer.SAM) to
samgria: the same two-call loop, the same weights.

The other side runs pytorch_optimizer.SAM, which has the widely used PyTorch SAM's constructor and
``first_step``/``second_step``; it is installed with samgria's test extra.
"""

import importlib.util
import os
import unittest

if importlib.util.find_spec("pytorch_optimizer") is None and not os.environ.get("SAMGRIA_REQUIRE_INTEGRATIONS"):
    raise unittest.SkipTest("needs pytorch_optimizer (pip install pytorch_optimizer)")

import pytorch_optimizer
import torch
from torch import nn

import samgria


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).double()


generator = torch.Generator().manual_seed(1)
batches = [(torch.randn(16, 6, generator=generator, dtype=torch.float64), torch.randn(16, 1, generator=generator, dtype=torch.float64)) for _ in range(5)]
criterion = nn.MSELoss()

# Before:  optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
their_model = make_model()
theirs = pytorch_optimizer.SAM(their_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
# After: the same call through samgria.sam_optimizer (samgria.SAM is the transform, SAM(rho=...)).
our_model = make_model()
ours = samgria.sam_optimizer(our_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
assert ours.base_optimizer is ours.inner  # the name that library gives the wrapped optimizer

for x, y in batches:  # the loop is unchanged
    for model, optimizer in ((their_model, theirs), (our_model, ours)):
        criterion(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        criterion(model(x), y).backward()
        optimizer.second_step(zero_grad=True)

for theirs_p, ours_p in zip(their_model.parameters(), our_model.parameters()):
    # Equal up to pytorch_optimizer's rounding: it accumulates the gradient norm in float32 and
    # adds perturb_eps=1e-12 to it (samgria: float64 for float64 weights, no epsilon).
    torch.testing.assert_close(ours_p, theirs_p, rtol=1e-6, atol=1e-8)

# The closure form: samgria's step(closure) evaluates the closure for both passes, like every
# torch optimizer, so do not compute a backward pass before calling it.
def closure():
    ours.zero_grad()
    loss = criterion(our_model(batches[0][0]), batches[0][1])
    loss.backward()
    return loss


ours.step(closure)
print("samgria.sam_optimizer follows pytorch_optimizer.SAM step for step")
