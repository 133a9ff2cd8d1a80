"""SAM under DistributedDataParallel: 2 CPU processes with the gloo backend.

Run it as a script: ``python docs/examples/optim_ddp.py``. Each rank trains on its half of the
global batch; the result equals one process trained on the whole batch. With
``first_pass_context=ddp_model.no_sync`` each replica instead perturbs with its own gradient
(the SAM paper's m-sharpness) and the first pass saves one all-reduce.
"""

import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from samgria import SAM, TransformingOptimizer

WORLD_SIZE, STEPS, LOCAL_BATCH = 2, 3, 8


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def global_batch(step):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(WORLD_SIZE * LOCAL_BATCH, 5, dtype=torch.float64, generator=generator)
    return x, torch.randint(0, 3, (WORLD_SIZE * LOCAL_BATCH,), generator=generator)


def train(model, optimizer, batches):
    for x, y in batches:

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)


def train_ddp(rank, m_sharpness):
    model = make_model()
    ddp_model = DistributedDataParallel(model)
    optimizer = TransformingOptimizer(
        ddp_model.parameters(),
        torch.optim.SGD,
        lr=0.1,
        momentum=0.9,
        transforms=[SAM(rho=0.05)],
        # m-sharpness: the first pass runs under no_sync, so each replica perturbs with its local
        # gradient; the second pass is all-reduced as usual.
        first_pass_context=ddp_model.no_sync if m_sharpness else None,
    )
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    train(ddp_model, optimizer, [tuple(t[rows] for t in global_batch(step)) for step in range(STEPS)])
    return [p.detach() for p in model.parameters()]


def worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    results = {"synced": train_ddp(rank, False), "m_sharpness": train_ddp(rank, True)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # neither rank tears down while the other still talks to it
    dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(free_port(), out_dir), nprocs=WORLD_SIZE)
        return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=True) for rank in range(WORLD_SIZE)]


if __name__ == "__main__":
    if not dist.is_available():
        sys.exit("torch.distributed is not available in this build")
    # One process on the global batch, the reference.
    model = make_model()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, transforms=[SAM(rho=0.05)]
    )
    train(model, optimizer, [global_batch(step) for step in range(STEPS)])
    single = [p.detach() for p in model.parameters()]

    ranks = run_ranks()
    for result in ranks:
        for p, q in zip(result["synced"], single):
            torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-12)

    m_sharp = [result["m_sharpness"] for result in ranks]
    assert all(torch.equal(p, q) for p, q in zip(*m_sharp))  # the replicas stay identical
    assert any(not torch.allclose(p, q) for p, q in zip(m_sharp[0], single))  # a different update
    print("DDP SAM equals one process on the global batch; m-sharpness ran")
