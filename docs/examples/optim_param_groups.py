"""Per-group hyperparameters: no SAM perturbation (and no weight decay) on norms and biases."""

import torch
from torch import nn

from samgria import ASAM, SAM, TransformingOptimizer

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 2))
weights = [p for p in model.parameters() if p.ndim > 1]
norms_and_biases = [p for p in model.parameters() if p.ndim <= 1]

optimizer = TransformingOptimizer(
    [
        {"params": weights},  # rho=0.05 (the transform's default), weight_decay=5e-4
        {"params": norms_and_biases, "rho": 0.0, "weight_decay": 0.0},  # never perturbed
    ],
    torch.optim.SGD,
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    transforms=[SAM(rho=0.05)],
)
assert [group["rho"] for group in optimizer.param_groups] == [0.05, 0.0]

# Record the parameters each time the closure runs: at w, then at w + e.
x, y = torch.randn(64, 10), torch.randint(0, 2, (64,))
seen = []


def closure():
    seen.append([p.detach().clone() for p in model.parameters()])
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


optimizer.step(closure)
at_w, at_w_plus_e = seen
for p, before, during in zip(model.parameters(), at_w, at_w_plus_e):
    if p.ndim > 1:
        assert not torch.equal(before, during)  # weight matrices were perturbed
    else:
        assert torch.equal(before, during)  # norms and biases were not

# Hyperparameters can be changed (or scheduled) per group during training, like ``lr``.
optimizer.param_groups[0]["rho"] = 0.1

# ASAM: the normalisation T_w = |w| + eta per group; ``adaptive=False`` gives plain SAM for a
# group (the ASAM reference code does this for biases).
asam = TransformingOptimizer(
    [
        {"params": weights, "eta": 0.01},
        {"params": norms_and_biases, "adaptive": False, "rho": 0.05},
    ],
    torch.optim.SGD,
    lr=0.1,
    transforms=[ASAM(rho=0.5, eta=0.01)],
)
assert [(g["rho"], g["eta"], g["adaptive"]) for g in asam.param_groups] == [
    (0.5, 0.01, True),
    (0.05, 0.01, False),
]
