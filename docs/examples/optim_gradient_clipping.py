"""Gradient clipping with SAM: clip the gradient the inner optimizer steps with, the second pass's.

Clipping inside the closure, between the second backward and ``second_step()`` (under a
``GradScaler``: after ``scaler.unscale_``), and ``ClipGradNorm`` after SAM in the chain give the
same update.
"""

import copy

import torch
from torch import nn

from samgria import SAM, ClipGradNorm, TransformingOptimizer

torch.manual_seed(0)
initial = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
max_norm = 0.1  # small enough to clip every step


def make(transforms):
    model = copy.deepcopy(initial)
    return model, TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, transforms=transforms)


# 1. step(closure): clip after backward() in the closure. Both passes are clipped; SAM uses only
#    the direction of the first pass's gradient, which clipping by norm keeps.
in_closure, optimizer = make([SAM(rho=0.1)])


def closure():
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(in_closure(x), y)
    loss.backward()
    nn.utils.clip_grad_norm_(in_closure.parameters(), max_norm)
    return loss


for _ in range(3):
    optimizer.step(closure)

# 2. The two-call loop: clip after the second backward, before second_step().
two_call, optimizer = make([SAM(rho=0.1)])
for _ in range(3):
    nn.functional.cross_entropy(two_call(x), y).backward()
    optimizer.first_step(zero_grad=True)
    nn.functional.cross_entropy(two_call(x), y).backward()
    nn.utils.clip_grad_norm_(two_call.parameters(), max_norm)
    optimizer.second_step(zero_grad=True)

# 3. Under a GradScaler: unscale after the second backward only, then clip.
scaled, optimizer = make([SAM(rho=0.1)])
scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
for _ in range(3):
    scaler.scale(nn.functional.cross_entropy(scaled(x), y)).backward()
    optimizer.first_step(zero_grad=True)  # the loss scale cancels in SAM's perturbation
    scaler.scale(nn.functional.cross_entropy(scaled(x), y)).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(scaled.parameters(), max_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()

# 4. In the chain: ClipGradNorm after SAM clips the gradient at w + e (one norm per param group;
#    clip_grad_norm_ takes one over all the parameters it is given: the same here, one group).
in_chain, optimizer = make([SAM(rho=0.1), ClipGradNorm(max_norm)])


def chain_closure():
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(in_chain(x), y)
    loss.backward()
    return loss


for _ in range(3):
    optimizer.step(chain_closure)

for model in (two_call, scaled, in_chain):
    for p, q in zip(model.parameters(), in_closure.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # equal to float32 rounding
print("clipping in the closure, between the passes, under a GradScaler and in the chain: the same steps")
