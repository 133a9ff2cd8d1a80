"""``torch.amp.GradScaler`` with float16 ``autocast``: the two-call loop, and what is refused.

The scaler cannot run a closure (it checks and unscales the gradients before calling the
optimizer's step), so SAM under a loss scaler is the two-call loop: ``first_step()`` after the
first scaled backward, ``scaler.step(optimizer)`` after the second. Every other combination
raises before any weight changes. (float16 autocast on the CPU here; on a GPU use "cuda".)
"""

import torch
from torch import nn
from torch.nn import functional as F

from samgria import sam_optimizer

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
scaler = torch.amp.GradScaler("cpu")
x = torch.randn(64, 8)
y = x @ torch.randn(8, 1)


def scaled_backward():
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    return loss.detach()


losses = []
for step in range(20):
    losses.append(scaled_backward())
    optimizer.first_step(zero_grad=True)  # the loss scale cancels in SAM's perturbation
    scaled_backward()
    scaler.step(optimizer)  # restores w, then unscales and steps -- or skips on an overflow
    scaler.update()
    optimizer.zero_grad()
assert losses[-1] < 0.5 * losses[0]

# Refused, with the weights untouched: the scaler driving a closure, and a step without first_step().
weights = [p.detach().clone() for p in model.parameters()]
for attempt in (lambda: scaler.step(optimizer, lambda: None), lambda: scaler.step(optimizer)):
    scaled_backward()
    try:
        attempt()
    except RuntimeError as error:
        print("refused:", str(error).split(":")[0])
    else:
        raise AssertionError("not refused")
    optimizer.zero_grad()
assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
