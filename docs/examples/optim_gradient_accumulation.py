"""Gradient accumulation: SAM over k micro-batches equals SAM on their concatenation.

Both passes must see every micro-batch: the perturbation uses the gradient of the whole batch,
and so does the step taken at the perturbed weights.
"""

import torch
from torch import nn

from samgria import sam_optimizer

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).double()
micro_batches = [(torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)) for _ in range(3)]
start = [p.detach().clone() for p in model.parameters()]


def reset():
    with torch.no_grad():
        for p, value in zip(model.parameters(), start):
            p.copy_(value)


# 1. A closure that loops over the micro-batches (each loss divided by their number).
optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)


def closure():
    optimizer.zero_grad()
    total = 0.0
    for x, y in micro_batches:
        loss = nn.functional.mse_loss(model(x), y) / len(micro_batches)
        loss.backward()
        total += loss.detach()
    return total


optimizer.step(closure)
with_closure = [p.detach().clone() for p in model.parameters()]

# 2. The two-call loop: accumulate the first pass, first_step(), accumulate the second pass,
#    second_step().
reset()
optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
optimizer.zero_grad()
for x, y in micro_batches:
    (nn.functional.mse_loss(model(x), y) / len(micro_batches)).backward()
optimizer.first_step(zero_grad=True)
for x, y in micro_batches:
    (nn.functional.mse_loss(model(x), y) / len(micro_batches)).backward()
optimizer.second_step(zero_grad=True)
two_calls = [p.detach().clone() for p in model.parameters()]

# 3. The same SAM step on the concatenated batch.
reset()
optimizer = sam_optimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
x_all = torch.cat([x for x, _ in micro_batches])
y_all = torch.cat([y for _, y in micro_batches])


def whole_batch():
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x_all), y_all)
    loss.backward()
    return loss


optimizer.step(whole_batch)
for a, b, c in zip(with_closure, two_calls, model.parameters()):
    torch.testing.assert_close(a, c.detach(), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(b, c.detach(), rtol=1e-13, atol=1e-15)
print("micro-batch SAM equals whole-batch SAM")
