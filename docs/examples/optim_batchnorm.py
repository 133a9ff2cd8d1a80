"""BatchNorm: keep SAM's second forward pass from updating the running statistics."""

import copy

import torch
from torch import nn

from samgria import SAM, TransformingOptimizer, frozen_bn_stats

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
)
x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
reference = copy.deepcopy(model)

optimizer = TransformingOptimizer(
    model.parameters(),
    torch.optim.SGD,
    lr=0.1,
    transforms=[SAM(rho=0.05)],
    # Entered around every re-evaluation: BatchNorm normalises with the batch statistics as in
    # training, but running_mean, running_var and num_batches_tracked are left alone.
    reevaluation_context=lambda: frozen_bn_stats(model),
)


def closure():
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


optimizer.step(closure)

# The running statistics are those of one ordinary forward pass at w, as with a plain optimizer.
reference(x)
bn, reference_bn = model[1], reference[1]
assert bn.num_batches_tracked.item() == 1
assert torch.equal(bn.running_mean, reference_bn.running_mean)
assert torch.equal(bn.running_var, reference_bn.running_var)

# frozen_bn_stats is a plain context manager too, e.g. around an extra diagnostic forward pass.
with frozen_bn_stats(model):
    model(torch.randn(16, 3, 8, 8))
assert bn.num_batches_tracked.item() == 1
