"""Multi-step adversarial ascent (optax's ``sam``): MultiStepSAM, its adversary and its state."""

import copy
import functools
import io

import torch
from torch import nn

from samgria import SAM, MultiStepSAM, TransformingOptimizer, frozen_bn_stats

torch.manual_seed(0)
x, y = torch.randn(64, 8), torch.randn(64, 1)
initial = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
passes = []


def make(transform, model):
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, transforms=[transform],
        # The closure runs 1 + ascent_steps times per step; BatchNorm's running statistics are
        # updated by the first pass only (what optax's opaque mode is for).
        reevaluation_context=lambda: frozen_bn_stats(model),
    )

    def closure():
        passes.append(1)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return optimizer, closure


def train(transform, steps):
    model = copy.deepcopy(initial)
    optimizer, closure = make(transform, model)
    for _ in range(steps):
        optimizer.step(closure)
    return model, optimizer, closure


# The default, one normalised ascent step, is SAM bit for bit.
sam_model, _, _ = train(SAM(rho=0.05), 5)
one_step_model, _, _ = train(MultiStepSAM(rho=0.05), 5)
for a, b in zip(sam_model.parameters(), one_step_model.parameters()):
    assert torch.equal(a, b)

# Three ascent steps, a_{i+1} = a_i + rho g_i / |g_i|: four forward-backward passes per step,
# like optax.contrib.sam(..., sync_period=4, opaque_mode=True).
passes.clear()
train(MultiStepSAM(rho=0.05, ascent_steps=3), 5)
assert len(passes) == 5 * 4

# Any torch optimizer can take the ascent steps. It is built for each step over the moved
# parameters, each group's lr set to its rho, and handed the (normalised) gradient of -L;
# reset_state=False keeps its state (here the momentum buffers) from step to step, in the slot.
def adversarial():
    momentum_sgd = functools.partial(torch.optim.SGD, momentum=0.9)
    return MultiStepSAM(rho=0.02, ascent_steps=2, adversary=momentum_sgd, reset_state=False)


model, optimizer, closure = train(adversarial(), 3)
assert "multi_step_sam.momentum_buffer" in optimizer.state[model[0].weight]

# That state is checkpointed like any optimizer state: a resumed run continues bit for bit.
buffer = io.BytesIO()
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
for _ in range(3):  # the run goes on...
    optimizer.step(closure)

buffer.seek(0)
checkpoint = torch.load(buffer, weights_only=True)
resumed = copy.deepcopy(initial)
resumed.load_state_dict(checkpoint["model"])
resumed_optimizer, resumed_closure = make(adversarial(), resumed)
resumed_optimizer.load_state_dict(checkpoint["optimizer"])
for _ in range(3):  # ...and so does the resumed one
    resumed_optimizer.step(resumed_closure)
for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
    assert torch.equal(a, b)
