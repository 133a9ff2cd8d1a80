"""Checkpoints: ``state_dict()`` holds the inner optimizer's state and every transform's slot, so
a resumed run continues bit for bit."""

import io

import torch
from torch import nn

from samgria import LAMP, SAM, TransformingOptimizer


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = TransformingOptimizer(
        model.parameters(),
        torch.optim.SGD,
        lr=0.05,
        momentum=0.9,
        # seed=...: LAMP's noise generator is part of the checkpoint too.
        transforms=[SAM(rho=0.05), LAMP(eps=5e-3, rollback_len=3, seed=0)],
    )
    return model, optimizer


def train(model, optimizer, steps):
    for step in steps:
        generator = torch.Generator().manual_seed(step)  # the data of step ``step``
        x, y = torch.randn(16, 6, generator=generator), torch.randn(16, 1, generator=generator)

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)


# One run of 10 steps, with a checkpoint after step 5 (mid-way through a LAMP cycle).
model, optimizer = make()
train(model, optimizer, range(5))
buffer = io.BytesIO()
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
train(model, optimizer, range(5, 10))

# A fresh process would do this: build the same objects, load, continue.
resumed_model, resumed_optimizer = make()
buffer.seek(0)
checkpoint = torch.load(buffer, weights_only=True)
resumed_model.load_state_dict(checkpoint["model"])
resumed_optimizer.load_state_dict(checkpoint["optimizer"])
train(resumed_model, resumed_optimizer, range(5, 10))

for p, q in zip(model.parameters(), resumed_model.parameters()):
    assert torch.equal(p, q)
# The checkpoint is torch's layout: every transform's state sits in its slot of ``state``.
assert set(checkpoint["optimizer"]) == {"state", "param_groups"}
first = checkpoint["optimizer"]["state"][0]
assert {"momentum_buffer", "lamp.sum", "lamp.count", "lamp.cycle_step", "lamp.rng_state"} <= set(first)
assert checkpoint["optimizer"]["param_groups"][0]["transform_chain"] == (
    "sam=SAM()",
    "lamp=LAMP(rollback_len=3, seed=0)",
)
