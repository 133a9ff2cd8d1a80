"""Adapting a meta-batch at once with ``torch.func.vmap``: ``meta.task_losses(tasks, loss_fn)``."""

import torch
from torch import nn
from torch.nn.functional import mse_loss

from samgria import MAML, SinusoidTaskSampler

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1)).double()
meta = MAML(model, torch.optim.Adam, lr=1e-3, inner_lr=0.01, inner_steps=5)
tasks = SinusoidTaskSampler(seed=0, dtype=torch.float64).sample(8)  # equal shapes


def meta_gradient(vectorize):
    meta.zero_grad()
    losses = meta.task_losses(tasks, mse_loss, vectorize=vectorize)  # shape (8,)
    losses.mean().backward()  # second-order meta-gradient
    return losses.detach(), [p.grad.clone() for p in model.parameters()]


vmap_losses, vmap_grads = meta_gradient(vectorize=True)  # one vectorised program
loop_losses, loop_grads = meta_gradient(vectorize=False)  # a Python loop over tasks
torch.testing.assert_close(vmap_losses, loop_losses)
for g_vmap, g_loop in zip(vmap_grads, loop_grads):
    torch.testing.assert_close(g_vmap, g_loop)


# In a closure (vectorize=None, the default, uses vmap when the tasks allow it).
def closure():
    meta.zero_grad()
    loss = meta.task_losses(tasks, mse_loss).mean()
    loss.backward()
    return loss


meta.step(closure)
