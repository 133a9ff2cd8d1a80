"""SAM with an EMA of the weights and with Lookahead; evaluating the averaged weights."""

import copy

import torch
from torch import nn

from samgria import EMA, SAM, Lookahead, TransformingOptimizer

torch.manual_seed(0)
x = torch.randn(256, 10)
y = (x[:, 0] - x[:, 1] > 0).long()
x_test = torch.randn(256, 10)
y_test = (x_test[:, 0] - x_test[:, 1] > 0).long()
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
criterion = nn.CrossEntropyLoss()

# SAM rewrites the gradient before the step; the EMA reads the weights after it.
ema = EMA(decay=0.9)
optimizer = TransformingOptimizer(
    model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(rho=0.05), ema]
)


def closure():
    optimizer.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    return loss


@torch.no_grad()
def accuracy():
    return (model(x_test).argmax(dim=1) == y_test).float().mean().item()


for _ in range(40):
    optimizer.step(closure)

training_weights = copy.deepcopy(model.state_dict())
with ema.averaged_weights(optimizer):  # the model holds the averages inside the block
    averaged_accuracy = accuracy()
    averaged_model = copy.deepcopy(model)  # e.g. to save the averaged model
for name, tensor in model.state_dict().items():  # the training weights are back, bit for bit
    assert torch.equal(tensor, training_weights[name]), name
assert averaged_accuracy > 0.9, averaged_accuracy
assert not torch.equal(averaged_model[0].weight, model[0].weight)

# The averages are optimizer state: checkpointed with it, and a resumed run continues exactly.
assert "ema.average" in optimizer.state[model[0].weight]
checkpoint = optimizer.state_dict()

# Lookahead: the inner optimizer takes k steps, then the weights move alpha of the way from the
# slow weights towards them and both continue from there. alpha can differ per group.
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
lookahead = Lookahead(alpha=0.5, k=5)
optimizer = TransformingOptimizer(
    [
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "alpha": 0.8},
    ],
    torch.optim.SGD,
    lr=0.1,
    momentum=0.9,
    transforms=[SAM(rho=0.05), lookahead],
)
for _ in range(40):  # a multiple of k: the weights have just been synchronised
    optimizer.step(closure)
assert all(torch.equal(p, optimizer.state[p]["lookahead.slow"]) for p in model.parameters())
assert accuracy() > 0.9
for _ in range(3):
    optimizer.step(closure)
with lookahead.slow_weights(optimizer):  # evaluate at the slow weights between synchronisations
    slow_accuracy = accuracy()
assert slow_accuracy > 0.9
