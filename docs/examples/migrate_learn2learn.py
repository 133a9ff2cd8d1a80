"""From learn2learn's MAML (``maml.clone()``, ``learner.adapt(loss)``, ``first_order=``) to samgria.

learn2learn::

    maml = l2l.algorithms.MAML(model, lr=0.1, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    for task in tasks:
        learner = maml.clone()
        learner.adapt(loss_fn(learner(xs), ys))
        loss_fn(learner(xq), yq).backward()
    opt.step()

samgria keeps the learner idiom and makes the meta-learner the optimizer (the outer optimizer
inside it), so ``meta.step()`` applies the outer update:
"""

import torch
from torch import nn
from torch.func import functional_call

from samgria import MAML, SinusoidTaskSampler

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1)).double()
meta = MAML(model, torch.optim.Adam, lr=1e-3, inner_lr=0.1, first_order=False)
tasks = SinusoidTaskSampler(k_support=5, k_query=10, seed=0, dtype=torch.float64).sample(4)
loss_fn = nn.MSELoss()

meta.zero_grad()
for task in tasks:
    learner = meta.clone()  # learn2learn: maml.clone()
    learner.adapt(loss_fn(learner(task.support_x), task.support_y))  # the same one-step adapt
    (loss_fn(learner(task.query_x), task.query_y) / len(tasks)).backward()
grads = [p.grad.clone() for p in model.parameters()]

# The same meta-gradient by hand (second order through the inner step).
weights = dict(model.named_parameters())
expected = [torch.zeros_like(p) for p in model.parameters()]
for task in tasks:
    support = loss_fn(functional_call(model, weights, (task.support_x,)), task.support_y)
    inner = torch.autograd.grad(support, list(weights.values()), create_graph=True)
    adapted = {n: w - 0.1 * g for (n, w), g in zip(weights.items(), inner)}
    query = loss_fn(functional_call(model, adapted, (task.query_x,)), task.query_y) / len(tasks)
    for total, g in zip(expected, torch.autograd.grad(query, list(weights.values()))):
        total += g
for got, want in zip(grads, expected):
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
meta.step()  # learn2learn: opt.step()

# first_order=True is FOMAML, as in learn2learn; meta.adapt(closure) runs several steps at once.
fomaml = MAML(model, torch.optim.SGD, lr=0.01, inner_lr=0.02, inner_steps=3, first_order=True)
task = tasks[0]
with torch.no_grad():
    before = loss_fn(model(task.support_x), task.support_y).item()
learner = fomaml.adapt(lambda f: loss_fn(f(task.support_x), task.support_y))
after = loss_fn(learner(task.support_x), task.support_y).item()
assert after < before
print(f"support loss {before:.3f} -> {after:.3f} after 3 first-order steps")
