"""``MetaTrainer``: sample meta-batches, take meta-steps, evaluate on held-out tasks."""

import torch
from torch import nn
from torch.nn.functional import mse_loss

from samgria import FOMAML, MetaTrainer, SinusoidTaskSampler

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1))
meta = FOMAML(model, torch.optim.Adam, lr=1e-2, inner_lr=0.01, inner_steps=1)
trainer = MetaTrainer(meta, mse_loss, SinusoidTaskSampler(seed=0))
held_out = SinusoidTaskSampler(k_query=50, seed=1).sample(20)

before = trainer.evaluate(held_out)
history = trainer.fit(
    num_iterations=30,
    meta_batch_size=10,  # equal shapes: the loop and torch.func.vmap are timed, the faster kept
    eval_every=10,
    eval_tasks=held_out,
    progress=False,  # None: a progress bar on stderr when it is a terminal
)
assert len(history.meta_loss) == 30
assert history.eval_iterations == [10, 20, 30]
assert history.eval_loss[-1] < before, (before, history.eval_loss)
assert trainer.evaluate(held_out, inner_steps=1) < trainer.evaluate(held_out, inner_steps=0)  # one step helps
