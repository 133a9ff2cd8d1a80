"""The functional core every meta-learner is built on: fast weights as a ``{name: tensor}`` dict."""

import torch
from torch import nn
from torch.nn.functional import mse_loss

from samgria import adapt_params, functional_forward, inner_step, named_buffers, named_params

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
x, y = torch.randn(10, 1), torch.randn(10, 1)
x_query, y_query = torch.randn(10, 1), torch.randn(10, 1)

params = named_params(model)  # the live Parameters: gradients flow back into the model
assert named_buffers(model) == {}  # no BatchNorm here

# One differentiable step by hand: theta' = theta - lr * grad.
loss = mse_loss(functional_forward(model, params, x), y)
stepped = inner_step(params, loss, lr=0.1)
grads = torch.autograd.grad(mse_loss(model(x), y), list(model.parameters()))
for (name, p), g in zip(model.named_parameters(), grads):
    torch.testing.assert_close(stepped[name], p - 0.1 * g)

# The whole inner loop, then a query loss whose gradient is the exact second-order meta-gradient.
adapted = adapt_params(model, params, lambda p: mse_loss(functional_forward(model, p, x), y), inner_lr=0.1, inner_steps=3)
mse_loss(functional_forward(model, adapted, x_query), y_query).backward()
assert all(p.grad is not None for p in model.parameters())

# ANIL-style: adapt only the last layer.
head_only = adapt_params(
    model, params, lambda p: mse_loss(functional_forward(model, p, x), y), inner_lr=0.1, adapt_names=["2.weight", "2.bias"]
)
assert head_only["0.weight"] is params["0.weight"]
