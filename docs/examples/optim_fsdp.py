"""SAM + LAMP over a model sharded with FSDP2, checkpointed with torch.distributed.checkpoint.

Run it with ``torchrun --nproc-per-node 2 docs/examples/optim_fsdp.py`` (gloo on the CPU; use
"nccl" and move the model to the GPU on GPUs). SAM perturbs with the norm of the global
gradient, so the weights equal single-process SAM on the global batch; the resumed run continues
bit for bit.
"""

import gc
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from samgria import LAMP, SAM, TransformingOptimizer


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)  # every parameter is now a DTensor sharded over the ranks
    optimizer = TransformingOptimizer(
        model.parameters(),
        torch.optim.SGD,
        lr=0.05,
        momentum=0.9,
        transforms=[SAM(rho=0.05), LAMP(eps=1e-3, rollback_len=3, seed=0)],
    )
    return model, optimizer


def train(model, optimizer, steps):
    rank = dist.get_rank()
    for step in steps:
        generator = torch.Generator().manual_seed(1000 * step + rank)  # this rank's data
        x = torch.randn(16, 8, generator=generator)
        y = torch.randint(0, 4, (16,), generator=generator)

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)


def main():
    dist.init_process_group("gloo")
    model, optimizer = build()
    train(model, optimizer, range(4))

    directory = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(directory)  # one checkpoint directory for every rank
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory[0])
    train(model, optimizer, range(4, 8))

    resumed_model, resumed_optimizer = build()  # e.g. a new job
    model_state, optim_state = get_state_dict(resumed_model, resumed_optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=directory[0])
    set_state_dict(resumed_model, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(resumed_model, resumed_optimizer, range(4, 8))

    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor())
    if dist.get_rank() == 0:
        print(f"FSDP2 SAM+LAMP on {dist.get_world_size()} ranks: the resumed run continued bit for bit")
    dist.barrier()  # neither rank tears down while the other still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Free reference cycles that still hold the process group (optimizer hooks, the trainer)
    # while the interpreter is alive: destroyed during interpreter shutdown instead, gloo's
    # worker threads can abort the process ("terminate called without an active exception").
    gc.collect()
