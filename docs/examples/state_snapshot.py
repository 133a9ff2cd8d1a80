"""Manual control of the inner loop (meta-RL style): adapt the model in place with any optimizer,
then roll back bit for bit with ``save_state`` / ``restore_state`` or ``ParameterSnapshot``."""

import torch
from torch import nn

from samgria import ParameterSnapshot, restore_state, save_state

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
inner = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(16, 4), torch.randn(16, 1)
original = {k: v.clone() for k, v in model.state_dict().items()}

snapshot = save_state(model)  # parameters and buffers (BatchNorm statistics), cloned
for _ in range(3):  # adapt in place
    inner.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    inner.step()
assert not torch.equal(model[0].weight, original["0.weight"])
restore_state(model, snapshot)  # in place: the optimizer's Parameter objects stay valid
assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())

with ParameterSnapshot(model):  # restores on exit, also when the block raises
    inner.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    inner.step()
assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
