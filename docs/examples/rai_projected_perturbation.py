"""Projected gradient ascent on a batch of perturbations, one L2 ball per example (param_ndim=-1).

rai-toolbox's ``L2ProjectedOptim``: normalise each example's gradient to unit L2 norm, step, and
project each example's perturbation back onto the ball of radius ``epsilon``.
"""

import torch
from torch import nn

from samgria import NormalizeGrad, ProjectParams, TransformingOptimizer

torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
images, labels = torch.randn(8, 3, 4, 4), torch.randint(0, 10, (8,))
epsilon = 0.5

delta = torch.zeros_like(images, requires_grad=True)  # one perturbation per example
optimizer = TransformingOptimizer(
    [delta],
    torch.optim.SGD,
    transforms=[NormalizeGrad(param_ndim=-1), ProjectParams(radius=epsilon, param_ndim=-1)],
    lr=0.2,
    maximize=True,  # ascend the loss
)


def closure():
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(images + delta), labels)
    loss.backward()
    return loss


clean = closure().item()
for _ in range(5):
    optimizer.step(closure)
norms = torch.linalg.vector_norm(delta.detach().flatten(1), dim=1)
print("per-example perturbation norms:", norms)
assert torch.all(norms <= epsilon + 1e-6)  # every example in its own ball
assert torch.allclose(norms, torch.full((8,), epsilon))  # 5 steps of 0.2 reach the boundary
assert closure().item() > clean  # the attack raised the loss
