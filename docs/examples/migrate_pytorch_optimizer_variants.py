"""From pytorch_optimizer's SAM variants (GSAM, WSAM, FriendlySAM) to samgria's transforms: each
variant becomes one transform in a TransformingOptimizer around the optimizer you already use,
and the weights follow pytorch_optimizer's step for step.

pytorch_optimizer is installed with samgria's test extra.
"""

import importlib.util
import os
import unittest

if importlib.util.find_spec("pytorch_optimizer") is None and not os.environ.get("SAMGRIA_REQUIRE_INTEGRATIONS"):
    raise unittest.SkipTest("needs pytorch_optimizer (pip install pytorch_optimizer)")

import pytorch_optimizer
import torch
from torch import nn

from samgria import GSAM, WSAM, FriendlySAM, TransformingOptimizer

criterion = nn.MSELoss()
generator = torch.Generator().manual_seed(1)
batches = [
    (torch.randn(16, 6, generator=generator, dtype=torch.float64), torch.randn(16, 1, generator=generator, dtype=torch.float64))
    for _ in range(5)
]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def make_closure(optimizer, model, x, y):
    """The usual closure: clear the gradients, forward, backward, return the loss."""

    def closure():
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        return loss

    return closure


def samgria_run(transform):
    """samgria: the optimizer you use, plus the variant as a transform; the usual closure."""
    model = make_model()
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, transforms=[transform], lr=0.1, momentum=0.9)
    for x, y in batches:
        optimizer.step(make_closure(optimizer, model, x, y))
    return model


def assert_same_weights(theirs, ours):
    # Equal up to pytorch_optimizer's rounding: it sums the squared gradient norms in float32.
    for their_p, our_p in zip(theirs.parameters(), ours.parameters()):
        torch.testing.assert_close(our_p, their_p, rtol=1e-6, atol=1e-8)


# WSAM. Before: WSAM(model, params, SGD, rho, gamma, decouple, ...); its step(closure) runs the
# first pass itself. After: transforms=[WSAM(rho, gamma=..., decouple=...)].
model = make_model()
theirs = pytorch_optimizer.WSAM(
    model, model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.8, decouple=True, eps=0.0, lr=0.1, momentum=0.9
)
for x, y in batches:
    theirs.step(make_closure(theirs, model, x, y))
assert_same_weights(model, samgria_run(WSAM(0.05, gamma=0.8, decouple=True)))

# FriendlySAM. Before: FriendlySAM(params, SGD, rho, sigma, lmbda, ...); the first backward runs
# before step(closure). After: transforms=[FriendlySAM(rho, sigma=..., lmbda=...)], and
# step(closure) evaluates both passes (do not run the first backward yourself).
model = make_model()
theirs = pytorch_optimizer.FriendlySAM(
    model.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.9, perturb_eps=0.0, lr=0.1, momentum=0.9
)
for x, y in batches:
    closure = make_closure(theirs, model, x, y)
    closure()
    theirs.step(closure)
assert_same_weights(model, samgria_run(FriendlySAM(0.05, sigma=1.0, lmbda=0.9)))


# GSAM. Before: GSAM(params, base_optimizer_instance, model, rho_scheduler, alpha) with a closure
# returning (outputs, loss). After: transforms=[GSAM(rho, alpha=...)]; rho is a param-group
# hyperparameter, scheduled like lr (a constant here, as the rho scheduler below).
class ConstantRho:
    def step(self):
        return 0.05


model = make_model()
base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
theirs = pytorch_optimizer.GSAM(model.parameters(), base, model, ConstantRho(), alpha=0.4, perturb_eps=0.0)
for x, y in batches:

    def closure():
        base.zero_grad()
        with torch.enable_grad():
            outputs = model(x)
            loss = criterion(outputs, y)
            loss.backward()
        return outputs, loss.detach()

    theirs.step(closure)
assert_same_weights(model, samgria_run(GSAM(0.05, alpha=0.4)))
print("samgria's GSAM, WSAM and FriendlySAM follow pytorch_optimizer's step for step")
