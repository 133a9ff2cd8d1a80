"""Meta-training across processes: each rank adapts its share of every meta-batch.

Run it with ``torchrun --nproc-per-node 2 docs/examples/meta_distributed.py`` (gloo on the CPU;
use "nccl" and move the model to the GPU on GPUs), or as ``python
docs/examples/meta_distributed.py`` on one process. Every rank builds the same sampler with the
same seed; the trainer draws the global meta-batch of 16 tasks on every rank and adapts only this
rank's share, and the meta-optimizer all-reduces the meta-gradient weighted by each rank's tasks.
The checkpoint is the same on every rank: rank 0 writes it, every rank reads it.
"""

import gc
import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.functional import mse_loss

from samgria import MAML, MetaTrainer, SinusoidTaskSampler


def build(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1))
    # distributed=True: rank 0's initial weights are copied to every rank (as DDP does).
    meta = MAML(model, torch.optim.Adam, lr=1e-2, inner_lr=0.01, distributed=True)
    return MetaTrainer(meta, mse_loss, SinusoidTaskSampler(seed=seed))


def main():
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")
    else:  # one process: a process group of one
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    held_out = SinusoidTaskSampler(k_query=50, seed=1).sample(20)  # the same list on every rank

    trainer = build(seed=0)
    before = trainer.evaluate(held_out)  # each rank evaluates 20 / world_size tasks: the mean of all 20
    trainer.fit(5, meta_batch_size=16, progress=False)

    directory = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(directory)  # one checkpoint file for every rank
    path = os.path.join(directory[0], "trainer.pt")
    if rank == 0:
        torch.save(trainer.state_dict(), path)
    dist.barrier()
    trainer.fit(5, meta_batch_size=16, progress=False)

    resumed = build(seed=123)  # e.g. a new job: other weights, another seed
    resumed.load_state_dict(torch.load(path, weights_only=True))  # model, outer Adam, sampler stream, history, count
    resumed.fit(5, meta_batch_size=16, progress=False)
    assert resumed.iteration == trainer.iteration == 10
    assert resumed.history == trainer.history
    for p, q in zip(trainer.meta.model.parameters(), resumed.meta.model.parameters()):
        assert torch.equal(p, q)

    after = trainer.evaluate(held_out)
    assert after < before, (before, after)
    print(f"rank {rank} of {world_size}: held-out loss {before:.3f} -> {after:.3f}; the resumed run continued bit for bit")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Free reference cycles that still hold the process group (optimizer hooks, the trainer)
    # while the interpreter is alive: destroyed during interpreter shutdown instead, gloo's
    # worker threads can abort the process ("terminate called without an active exception").
    gc.collect()
