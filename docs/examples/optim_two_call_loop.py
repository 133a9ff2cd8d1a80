"""Loops without a closure: ``first_step()`` after the first backward, ``second_step()`` after
the second. The result equals ``step(closure)`` bit for bit."""

import torch
from torch import nn

from samgria import SAM, TransformingOptimizer, sam_optimizer


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(rho=0.05)]
    )
    return model, optimizer


criterion = nn.CrossEntropyLoss()
batches = [(torch.randn(32, 10), torch.randint(0, 2, (32,))) for _ in range(5)]

# The two-call loop (Hugging Face / davda54 style).
model, optimizer = make()
for x, y in batches:
    criterion(model(x), y).backward()
    optimizer.first_step(zero_grad=True)  # w -> w + e
    criterion(model(x), y).backward()  # the gradient at w + e
    optimizer.second_step(zero_grad=True)  # restore w, inner step with that gradient

# The closure loop, for comparison.
reference, reference_optimizer = make()
for x, y in batches:

    def closure():
        reference_optimizer.zero_grad()
        loss = criterion(reference(x), y)
        loss.backward()
        return loss

    reference_optimizer.step(closure)

for p, q in zip(model.parameters(), reference.parameters()):
    assert torch.equal(p, q)

# The constructor of the widely used PyTorch SAM, SAM(params, base_optimizer, rho, adaptive, **kwargs),
# builds the same TransformingOptimizer, so loops written for it keep working.
davda54_style = sam_optimizer(model.parameters(), torch.optim.SGD, rho=0.05, adaptive=False, lr=0.1, momentum=0.9)
assert isinstance(davda54_style, TransformingOptimizer) and davda54_style.param_groups[0]["rho"] == 0.05
