"""``meta_step``: build one meta-update task by task, with per-task weights; the outer update is
applied when the ``with`` block ends."""

import torch
from torch import nn
from torch.nn.functional import mse_loss

from samgria import MAML, InnerSAM, MomentumInnerStep, SinusoidTaskSampler, meta_step

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))
meta = MAML(model, torch.optim.Adam, lr=1e-3, inner_lr=0.01, inner_steps=1)
tasks = SinusoidTaskSampler(k_support=10, k_query=10, seed=0).sample(4)
weights = [1.0, 1.0, 2.0, 0.5]
before = [p.detach().clone() for p in model.parameters()]

query_losses = []
with meta_step(meta, loss_fn=mse_loss, inner_steps=2) as ms:
    for task, weight in zip(tasks, weights):
        loss = ms.task(  # adapts at once and returns the detached post-adaptation query loss
            support=(task.support_x, task.support_y),
            query=(task.query_x, task.query_y),
            weight=weight,  # the meta-loss is the weighted mean of the query losses
        )
        query_losses.append(loss)
# Here the outer update has been applied; ms.loss is the weighted meta-loss.
expected = sum(w * loss for w, loss in zip(weights, query_losses)) / sum(weights)
torch.testing.assert_close(ms.loss, expected)
assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


# Inner-loop regularisation, a differentiable momentum inner optimizer and SAM inside the inner loop.
def proximal(current, base):  # an L2 pull towards the meta-parameters (iMAML-style)
    return 0.1 * sum(((current[n] - base[n]) ** 2).sum() for n in current)


with meta_step(
    meta,
    loss_fn=mse_loss,
    inner_steps=3,
    inner_step_fn=MomentumInnerStep(momentum=0.9),
    inner_reg_fn=proximal,
    grad_transforms=[InnerSAM(rho=0.05)],
) as ms:
    for task in tasks:
        ms.task(support=(task.support_x, task.support_y), query=(task.query_x, task.query_y))
assert torch.isfinite(ms.loss)

# An exception inside the block applies nothing: the model is left as it was.
snapshot = [p.detach().clone() for p in model.parameters()]
try:
    with meta_step(meta, loss_fn=mse_loss) as ms:
        ms.task(support=(tasks[0].support_x, tasks[0].support_y), query=(tasks[0].query_x, tasks[0].query_y))
        raise KeyboardInterrupt
except KeyboardInterrupt:
    pass
assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snapshot))
