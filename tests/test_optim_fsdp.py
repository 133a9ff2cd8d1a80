"""SAM, ASAM and LAMP over a model sharded with FSDP2 (``fully_shard``): gloo, 2 and 4 CPU processes.

The test starts this file as a script on 2 and on 4 ranks (``tests/distributed_harness.py``);
each run trains every configuration below, saves the full (gathered) weights, and also saves and
resumes a run through ``torch.distributed.checkpoint``. The pytest process compares them with
single-process references on the same global batch:

* SAM, ASAM, SAM with per-group ``rho``, SAM + LAMP without noise, ClipGradNorm + SAM, GSAM,
  WSAM, FriendlySAM and LookSAM: single-process samgria on the unsharded model (the norm is of the **global** gradient, so the weights agree to float32
  round-off);
* SAM + LAMP with noise: a hand-written LAMP after single-process SAM, which draws the noise of
  each shard (``torch.chunk`` along dim 0, as FSDP2 shards) from the documented per-shard stream
  (:func:`samgria.transforms.lamp.sharded_noise_seed`);
* a run checkpointed with DCP after ``RESUME_AT`` steps and resumed into a fresh model and
  optimizer continues bit for bit; a checkpoint of the 2-rank run loads on 4 ranks (resharding);
* on 4 ranks, HSDP (a 2x2 mesh: replicated over one dimension, sharded over the other) gives
  the one-process weights, and replicas hold identical shards (LAMP's noise included);
* on 2 ranks, SAM and GSAM in the two-call loop give the one-process weights, and a gradient
  that is not finite in rank 0's shard only (in either evaluation, in both loops) skips the step
  on every rank;
* on 2 ranks, EMA's and Lookahead's swap blocks over ``fully_shard``'s defaults (the root keeps
  its gathered weights after a forward without a backward): the outputs inside and after the
  block and the weights after one more step equal single-process samgria's.
"""

from __future__ import annotations

import argparse
import gc
import os
import warnings

import pytest
import torch
from distributed_harness import run_ranks, skip_without_gloo
from torch import nn

STEPS = 4
RESUME_AT = 2
LOCAL_BATCH = 4
GLOBAL_BATCH = 16
LR, MOMENTUM = 0.1, 0.9
ROLLBACK_LEN = 2
SEED = 7
SAM_FAMILY = ("gsam", "wsam", "friendly_sam", "looksam")
CONFIGS = ("sam", "asam", "sam_group_rho", "sam_lamp_no_noise", "sam_lamp", "clip_sam", *SAM_FAMILY)
#: Run on a 2x2 mesh (HSDP: replicated over dim 0, sharded over dim 1) in the 4-rank run.
HSDP_CONFIGS = ("sam_lamp_no_noise", "sam_lamp", "clip_sam")
LAMP_EPS = 0.01


def _make_model() -> nn.Module:
    torch.manual_seed(0)
    # Odd sizes: FSDP2 shards dim 0 unevenly (and 4 ranks leave one rank an empty bias shard).
    return nn.Sequential(nn.Linear(5, 13), nn.Tanh(), nn.Linear(13, 3))


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 5, generator=generator)
    y = torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)
    return x, y


def _local_batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _global_batch(step)
    rows = GLOBAL_BATCH // world_size
    return x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target)


def _optimizer(model: nn.Module, config: str):
    from samgria import ASAM, GSAM, LAMP, SAM, WSAM, ClipGradNorm, FriendlySAM, LookSAM, TransformingOptimizer

    params: object = model.parameters()
    transforms: list = [SAM(rho=0.05)]
    if config == "asam":
        transforms = [ASAM(rho=0.5, eta=0.01)]
    elif config == "sam_group_rho":
        params = [{"params": model[0].parameters(), "rho": 0.02}, {"params": model[2].parameters()}]
    elif config == "sam_lamp_no_noise":
        transforms = [SAM(rho=0.05), LAMP(eps=0.0, rollback_len=ROLLBACK_LEN)]
    elif config == "sam_lamp":
        transforms = [SAM(rho=0.05), LAMP(eps=LAMP_EPS, rollback_len=ROLLBACK_LEN, seed=SEED)]
    elif config == "clip_sam":  # clipping by the global norm (0.05 is below it: it clips)
        transforms = [ClipGradNorm(max_grad_norm=0.05), SAM(rho=0.05)]
    elif config in SAM_FAMILY:
        family = {"gsam": GSAM(rho=0.05, alpha=0.4), "wsam": WSAM(rho=0.05, gamma=0.8), "friendly_sam": FriendlySAM(rho=0.05), "looksam": LookSAM(rho=0.05, k=2, alpha=0.7)}
        transforms = [family[config]]
    return TransformingOptimizer(params, torch.optim.SGD, lr=LR, momentum=MOMENTUM, transforms=transforms)


def _sam_step(optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _loss(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)


# -- the worker (runs in a child process) ----------------------------------------------------------
def _sharded_model(hsdp: bool = False) -> nn.Module:
    """FSDP2 over all ranks, or HSDP on a 2x2 mesh (replicated over dim 0, sharded over dim 1)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")) if hsdp else None
    model = _make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _train(config: str, rank: int, world_size: int, steps: range, model=None, optimizer=None, hsdp: bool = False):
    model = _sharded_model(hsdp) if model is None else model
    optimizer = _optimizer(model, config) if optimizer is None else optimizer
    for step in steps:
        _sam_step(optimizer, model, *_local_batch(step, rank, world_size))
    return model, optimizer


#: (config, loop, evaluation whose gradient is NaN in one element of rank 0's shard at step 0).
ONE_SHARD_FAULTS = (("sam", "closure", 1), ("sam", "two_call", 2), ("gsam", "closure", 2), ("gsam", "two_call", 1))


def _two_call_or_faulty_run(config: str, rank: int, world_size: int, loop: str, fault_at: int | None) -> dict[str, object]:
    """Train ``config`` in ``loop``; with ``fault_at``, that evaluation of step 0 gives rank 0's
    shard of ``model[0].weight`` a NaN gradient in one element (the other rank's shard is
    finite). Returns the full weights, the skipped steps and whether this rank's shards of the
    faulty evaluation's gradients were finite."""
    model = _sharded_model()
    optimizer = _optimizer(model, config)
    local_finite: list[bool] = []
    for step in range(STEPS):
        x, y = _local_batch(step, rank, world_size)
        evaluations = [0]

        def backward() -> torch.Tensor:
            evaluations[0] += 1
            loss = _loss(model(x), y)
            if step == 0 and evaluations[0] == fault_at and rank == 0:
                corner = model[0].weight.to_local()[0, 0]
                loss = loss + (corner - corner.detach()) * float("nan")
            loss.backward()
            if step == 0 and evaluations[0] == fault_at:
                local_finite.append(all(bool(torch.isfinite(p.grad.to_local()).all()) for p in model.parameters()))
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the skipped step's
            if loop == "two_call":
                backward()
                optimizer.first_step(zero_grad=True)
                backward()
                optimizer.second_step(zero_grad=True)
            else:

                def closure() -> torch.Tensor:
                    optimizer.zero_grad()
                    return backward()

                optimizer.step(closure)
    return {"weights": _full(model), "skipped": optimizer.skipped_steps, "local_finite": local_finite}


def _checkpoint(model: nn.Module, optimizer, directory: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
        checkpoint_id=directory,
    )


def _resume(config: str, directory: str):
    """A fresh sharded model and optimizer, loaded from ``directory`` as DCP's docs show."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = _sharded_model()
    optimizer = _optimizer(model, config)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return model, optimizer


def _lamp_state(model: nn.Module, optimizer) -> dict[str, object]:
    """LAMP's state gathered whole: sums, counts and the object-level keys."""
    out: dict[str, object] = {}
    for index, param in enumerate(model.parameters()):
        entry = optimizer.state[param]
        out[f"{index}.sum"] = entry["lamp.sum"].full_tensor().clone()
        out[f"{index}.count"] = entry["lamp.count"]
        for key in ("lamp.cycle_step", "lamp.noise_draws"):
            if key in entry:
                out[key] = entry[key]
    return out


TP_TRANSFORMS = ("asam", "wsam", "gsam", "looksam")


def _tensor_parallel(name: str, sharded: bool) -> list[torch.Tensor]:
    """A column/row-parallel MLP written with DTensors (or plain tensors): the replicated bias
    meets a sharded activation, so its gradient comes back sharded (Shard(0)) while the bias is
    Replicate(); 3 steps of ``name`` with SGD."""
    from samgria import ASAM, GSAM, WSAM, LookSAM, TransformingOptimizer

    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(4, 5, generator=generator, dtype=torch.float64),
               torch.randn(4, generator=generator, dtype=torch.float64),
               torch.randn(3, 4, generator=generator, dtype=torch.float64)]
    batches = [(torch.randn(8, 5, generator=generator, dtype=torch.float64), torch.randn(8, 3, generator=generator, dtype=torch.float64)) for _ in range(3)]
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (2,))
        params = [nn.Parameter(distribute_tensor(w, mesh, [placement])) for w, placement in zip(weights, (Shard(0), Replicate(), Shard(1)))]
        batches = [tuple(distribute_tensor(t, mesh, [Replicate()]) for t in batch) for batch in batches]
    else:
        params = [nn.Parameter(w) for w in weights]
    transform = {"asam": ASAM(rho=0.5), "wsam": WSAM(rho=0.05, gamma=0.8), "gsam": GSAM(rho=0.05, alpha=0.4), "looksam": LookSAM(rho=0.05, k=2, alpha=0.7)}[name]
    optimizer = TransformingOptimizer(params, torch.optim.SGD, lr=LR, transforms=[transform])
    for x, y in batches:

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = ((torch.tanh(x @ params[0].T + params[1]) @ params[2].T - y) ** 2).mean()
            loss.backward()
            return loss

        optimizer.step(closure)
    return [p.full_tensor().detach().clone() if sharded else p.detach().clone() for p in params]


def _fsdp1(rank: int, world_size: int) -> dict[str, object]:
    """FSDP1 (``FullyShardedDataParallel``) with and without ``use_orig_params``: a chain is
    refused (its error message); ``transforms=()`` steps as the bare inner optimizer does."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from samgria import SAM, TransformingOptimizer

    results: dict[str, object] = {}
    for orig in (True, False):
        model = FullyShardedDataParallel(_make_model(), use_orig_params=orig, device_id=torch.device("cpu"))
        try:
            TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=LR, transforms=[SAM(rho=0.05)])
            results[f"fsdp1.{orig}.error"] = None
        except ValueError as error:
            results[f"fsdp1.{orig}.error"] = str(error)
        bare_model = FullyShardedDataParallel(_make_model(), use_orig_params=orig, device_id=torch.device("cpu"))
        bare = torch.optim.SGD(bare_model.parameters(), lr=LR, momentum=MOMENTUM)
        wrapped = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, transforms=())
        for step in range(2):
            for optimizer, net in ((bare, bare_model), (wrapped, model)):
                optimizer.zero_grad()
                _loss(net(_local_batch(step, rank, world_size)[0]), _local_batch(step, rank, world_size)[1]).backward()
                optimizer.step()
        results[f"fsdp1.{orig}.same"] = all(torch.equal(a, b) for a, b in zip(model.parameters(), bare_model.parameters()))
    # Built before FSDP1 wraps the model (accelerate's order): with use_orig_params=True the same
    # parameters are flattened in place; the first step refuses them, nothing changed.
    plain = _make_model()
    early = TransformingOptimizer(plain.parameters(), torch.optim.SGD, lr=LR, transforms=[SAM(rho=0.05)])
    wrapped = FullyShardedDataParallel(plain, use_orig_params=True, device_id=torch.device("cpu"))
    before = [p.detach().clone() for p in wrapped.parameters()]
    x, y = _local_batch(0, rank, world_size)

    def closure() -> torch.Tensor:
        early.zero_grad()
        loss = _loss(wrapped(x), y)
        loss.backward()
        return loss

    try:
        early.step(closure)
        results["fsdp1.early.error"] = None
    except ValueError as error:
        results["fsdp1.early.error"] = str(error)
    results["fsdp1.early.unchanged"] = all(torch.equal(p, b) for p, b in zip(wrapped.parameters(), before))
    return results


#: The swap blocks' runs: EMA and Lookahead; the block before any forward, or after a no_grad
#: forward (a validation pass); the model known to the optimizer (``model=``), passed to the
#: block (``model=``), or the module of the seed protocol (``apply`` / ``post_step``).
AVERAGING = ("ema", "lookahead")
SWAP_ORDERS = ("block_first", "forward_first")
SWAP_OWNERS = ("optimizer", "keyword", "module")
EVAL_X = torch.randn(7, 5, generator=torch.Generator().manual_seed(11))


def _swap_model(sharded: bool) -> nn.Module:
    """fully_shard's defaults on the first layer and the root, which owns the last layer's
    parameters: the root does not reshard after the forward (reshard_after_forward=False)."""
    model = _make_model()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model)
    return model


def _swap_run(kind: str, order: str, owner: str, rank: int, world_size: int, sharded: bool) -> dict[str, list[torch.Tensor]]:
    """3 steps, then (after a no_grad forward, for ``forward_first``) the model's output inside
    and after the block, then one more step: its weights."""
    from samgria import EMA, SAM, Lookahead, TransformingOptimizer

    model = _swap_model(sharded)
    transform = EMA(decay=0.5) if kind == "ema" else Lookahead(alpha=0.5, k=2)  # k=2: the 4th step synchronises
    swap = transform.averaged_weights if kind == "ema" else transform.slow_weights

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _local_batch(step, rank, world_size) if sharded else _global_batch(step)

    if owner == "module":
        plain = torch.optim.SGD(model.parameters(), lr=LR)

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return _loss(model(x), y)

        def step(index: int) -> None:
            plain.zero_grad()
            loss_fn(*batch(index)).backward()
            transform.apply(model, loss_fn, batch(index))
            plain.step()
            transform.post_step(model)

        block = lambda: swap(model)  # noqa: E731
    else:
        optimizer = TransformingOptimizer(
            model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM,
            transforms=[SAM(rho=0.05), transform], model=model if owner == "optimizer" else None,
        )

        def step(index: int) -> None:
            _sam_step(optimizer, model, *batch(index))

        block = (lambda: swap(optimizer)) if owner == "optimizer" else (lambda: swap(optimizer, model=model))  # noqa: E731
    for index in range(3):
        step(index)
    with torch.no_grad():
        if order == "forward_first":
            model(EVAL_X)
        with block():
            inside = model(EVAL_X)
        after = model(EVAL_X)
    step(3)
    weights = [p.full_tensor().detach().clone() if sharded else p.detach().clone() for p in model.parameters()]
    return {"inside": [inside], "after": [after], "weights": weights}


def _swap_without_model(kind: str, rank: int, world_size: int) -> dict[str, object]:
    """Sharded parameters and no model to reshard: the block raises before it changes anything."""
    from samgria import EMA, SAM, Lookahead, TransformingOptimizer

    model = _swap_model(True)
    transform = EMA(decay=0.5) if kind == "ema" else Lookahead(alpha=0.5, k=2)
    optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=LR, transforms=[SAM(rho=0.05), transform])
    for index in range(3):
        _sam_step(optimizer, model, *_local_batch(index, rank, world_size))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    message = None
    with torch.no_grad():
        before = model(EVAL_X)
        shards = [p.to_local().clone() for p in params]
        try:
            with (transform.averaged_weights if kind == "ema" else transform.slow_weights)(optimizer):
                pass
        except ValueError as error:
            message = str(error)
        after = model(EVAL_X)
    unchanged = torch.equal(before, after) and all(torch.equal(p.to_local(), s) for p, s in zip(params, shards))
    return {"message": message, "unchanged": unchanged and transform._open_swaps == 0}


def _swap_results(rank: int, world_size: int) -> dict[str, object]:
    """Each run's results, or its error (printed too): the other runs go on."""
    results: dict[str, object] = {}
    runs = [
        *[(f"swap.{kind}.{order}.{owner}", lambda k=kind, o=order, w=owner: _swap_run(k, o, w, rank, world_size, True))
          for kind in AVERAGING for order in SWAP_ORDERS for owner in SWAP_OWNERS],
        *[(f"swap.{kind}.no_model", lambda k=kind: _swap_without_model(k, rank, world_size)) for kind in AVERAGING],
    ]
    for key, run in runs:
        try:
            results[key] = run()
        except Exception as error:  # the same on every rank: the runs are the same
            results[key] = f"{type(error).__name__}: {error}"
            print(f"[rank {rank}] {key}: {results[key]}", flush=True)
    return results


def _worker(out_dir: str, reshard_from: str | None) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results: dict[str, object] = {}
    try:
        for config in CONFIGS:
            model, optimizer = _train(config, rank, world_size, range(STEPS))
            results[config] = _full(model)
            if config == "sam":
                # The perturbation buffers are sharded like the parameters.
                backups = optimizer.transforms[0].__dict__["_backups"]
                results["backup_numel"] = sorted(buffer.to_local().numel() for _, buffer in backups.values())
                results["shard_numel"] = sorted(p.to_local().numel() for p in model.parameters())
        for config in ("sam_lamp", "sam_lamp_no_noise"):
            directory = os.path.join(out_dir, f"dcp-{config}-{world_size}")
            model, optimizer = _train(config, rank, world_size, range(RESUME_AT))
            _checkpoint(model, optimizer, directory)
            results[f"{config}.saved_lamp"] = _lamp_state(model, optimizer)
            _train(config, rank, world_size, range(RESUME_AT, STEPS), model, optimizer)
            results[f"{config}.uninterrupted"] = _full(model)
            model, optimizer = _resume(config, directory)
            results[f"{config}.loaded_lamp"] = _lamp_state(model, optimizer)
            _train(config, rank, world_size, range(RESUME_AT, STEPS), model, optimizer)
            results[f"{config}.resumed"] = _full(model)
            if reshard_from is not None:
                model, optimizer = _resume(config, os.path.join(reshard_from, f"dcp-{config}-2"))
                results[f"{config}.resharded_lamp"] = _lamp_state(model, optimizer)
                _train(config, rank, world_size, range(RESUME_AT, STEPS), model, optimizer)
                results[f"{config}.resharded"] = _full(model)
        # A checkpoint of one unsharded process (made by the test, see _unsharded_checkpoint).
        model, optimizer = _resume("sam_lamp_no_noise", os.path.join(out_dir, "dcp-unsharded"))
        _train("sam_lamp_no_noise", rank, world_size, range(RESUME_AT, STEPS), model, optimizer)
        results["sam_lamp_no_noise.from_unsharded"] = _full(model)
        if world_size == 2:
            for name in TP_TRANSFORMS:
                results[f"tp.{name}"] = _tensor_parallel(name, sharded=True)
            results.update(_fsdp1(rank, world_size))
            for config in ("sam", "gsam"):
                results[f"two_call.{config}"] = _two_call_or_faulty_run(config, rank, world_size, "two_call", None)
            for config, loop, fault_at in ONE_SHARD_FAULTS:
                results[f"fault.{config}.{loop}.{fault_at}"] = _two_call_or_faulty_run(config, rank, world_size, loop, fault_at)
            results.update(_swap_results(rank, world_size))
        if world_size == 4:
            for config in HSDP_CONFIGS:
                model, _ = _train(config, rank, world_size, range(STEPS), hsdp=True)
                results[f"hsdp.{config}"] = _full(model)
                results[f"hsdp.{config}.local"] = [p.to_local().detach().clone() for p in model.parameters()]
        # Free reference cycles (optimizers, DDP/FSDP modules) that still hold the process group
        # while it is alive: destroyed at interpreter exit instead, gloo's threads can abort a rank
        # that has finished (as benchmarks/distributed.py does).
        model = optimizer = None
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()
    torch.save(results, os.path.join(out_dir, f"rank{rank}-of-{world_size}.pt"))


# -- single-process references ---------------------------------------------------------------------
def _reference(config: str) -> list[torch.Tensor]:
    """Single-process samgria on the unsharded model and the global batch."""
    model = _make_model()
    optimizer = _optimizer(model, config)
    for step in range(STEPS):
        _sam_step(optimizer, model, *_global_batch(step))
    return [p.detach().clone() for p in model.parameters()]


def _reference_sharded_lamp(world_size: int) -> list[torch.Tensor]:
    """SAM (single-process samgria), then LAMP written out by hand with per-shard noise streams."""
    from samgria import SAM, TransformingOptimizer
    from samgria.transforms.lamp import sharded_noise_seed

    model = _make_model()
    optimizer = TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, transforms=[SAM(rho=0.05)]
    )
    params = list(model.parameters())
    sums = [torch.zeros_like(p) for p in params]
    counts = 0
    for step in range(STEPS):
        _sam_step(optimizer, model, *_global_batch(step))
        with torch.no_grad():
            noise = [torch.empty_like(p) for p in params]
            for shard in range(world_size):
                generator = torch.Generator().manual_seed(sharded_noise_seed(SEED, step, (shard,)))
                for p, u in zip(params, noise):
                    chunks = torch.chunk(p, world_size, dim=0)
                    if shard < len(chunks):
                        rows = chunks[shard]
                        start = sum(c.shape[0] for c in chunks[:shard])
                        u[start : start + rows.shape[0]] = rows * torch.empty_like(rows).uniform_(-1, 1, generator=generator)
            norm = torch.sqrt(sum((u.double() ** 2).sum() for u in noise))
            for p, u in zip(params, noise):
                p.add_(u, alpha=LAMP_EPS / float(norm))
            for total, p in zip(sums, params):
                total.add_(p)
            counts += 1
            if (step + 1) % (ROLLBACK_LEN + 1) == 0:
                for total, p in zip(sums, params):
                    p.copy_(total / counts)
                    total.zero_()
                counts = 0
    return [p.detach().clone() for p in params]


def _unsharded_checkpoint(directory: str) -> None:
    """One unsharded process trains ``RESUME_AT`` steps on the global batch and saves with DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = _make_model()
    optimizer = _optimizer(model, "sam_lamp_no_noise")
    for step in range(RESUME_AT):
        _sam_step(optimizer, model, *_global_batch(step))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP notes that it runs without a process group
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
            checkpoint_id=directory,
        )


# -- the tests -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    skip_without_gloo()
    out_dir = tmp_path_factory.mktemp("fsdp")
    _unsharded_checkpoint(str(out_dir / "dcp-unsharded"))
    run_ranks(__file__, 2, ["--out", str(out_dir)])
    run_ranks(__file__, 4, ["--out", str(out_dir), "--reshard-from", str(out_dir)])
    return {n: [torch.load(out_dir / f"rank{r}-of-{n}.pt") for r in range(n)] for n in (2, 4)}


def _assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("config", ["sam", "asam", "sam_group_rho", "sam_lamp_no_noise", "clip_sam", *SAM_FAMILY])
def test_sharded_weights_equal_one_process_on_the_global_batch(runs: dict, world_size: int, config: str) -> None:
    reference = _reference(config)
    for rank_results in runs[world_size]:
        _assert_close(rank_results[config], reference)
    assert not torch.equal(reference[0], _make_model()[0].weight), "it trained"


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_lamp_noise_follows_the_documented_per_shard_stream(runs: dict, world_size: int) -> None:
    _assert_close(runs[world_size][0]["sam_lamp"], _reference_sharded_lamp(world_size))
    # ... and the noise is really there: without it the weights differ.
    differences = [(a - b).abs().max() for a, b in zip(runs[world_size][0]["sam_lamp"], _reference("sam_lamp_no_noise"))]
    assert max(differences) > 1e-5


@pytest.mark.parametrize("config", ["sam", "gsam"])
def test_the_two_call_loop_over_fsdp2_equals_one_process(runs: dict, config: str) -> None:
    reference = _reference(config)
    for rank_results in runs[2]:
        _assert_close(rank_results[f"two_call.{config}"]["weights"], reference)


def _reference_without_step_0(config: str) -> list[torch.Tensor]:
    model = _make_model()
    optimizer = _optimizer(model, config)
    for step in range(1, STEPS):
        _sam_step(optimizer, model, *_global_batch(step))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(("config", "loop", "fault_at"), ONE_SHARD_FAULTS)
def test_a_gradient_not_finite_in_one_ranks_shard_skips_the_step_on_every_rank(
    runs: dict, config: str, loop: str, fault_at: int
) -> None:
    """Rank 0's shard holds the NaN, rank 1's shards are finite: both ranks skip step 0 (a rank
    stepping alone would pair its norm's all_reduce with the other's next step) and then train
    as one process from step 1 on."""
    results = [rank_results[f"fault.{config}.{loop}.{fault_at}"] for rank_results in runs[2]]
    assert [r["local_finite"] for r in results] == [[False], [True]], "the NaN is in rank 0's shard only"
    assert [r["skipped"] for r in results] == [1, 1]
    reference = _reference_without_step_0(config)
    for r in results:
        _assert_close(r["weights"], reference)
    for a, b in zip(results[0]["weights"], results[1]["weights"]):
        assert torch.equal(a, b)


def test_the_global_norm_is_not_the_local_one(runs: dict) -> None:
    """Guard against a test that cannot fail: a per-shard norm gives other weights."""
    local_norm = _local_norm_reference()
    differences = [(a - b).abs().max() for a, b in zip(runs[2][0]["sam"], local_norm)]
    assert max(differences) > 1e-4


def _local_norm_reference() -> list[torch.Tensor]:
    """SAM on 2 ranks if each rank normalised its shards by their own norm (a local norm)."""
    model = _make_model()
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    buffers: list[torch.Tensor] = []
    for step in range(STEPS):
        x, y = _global_batch(step)
        grads = torch.autograd.grad(_loss(model(x), y), params)
        shards = [torch.chunk(g, 2, dim=0) for g in grads]
        local_norms = [torch.sqrt(sum((chunks[r] ** 2).sum() for chunks in shards)) for r in range(2)]
        perturbed = [
            (p.detach() + 0.05 * torch.cat([chunks[r] / local_norms[r] for r in range(2)])).requires_grad_()
            for p, chunks in zip(params, shards)
        ]
        outputs = torch.func.functional_call(model, dict(zip(names, perturbed)), (x,))
        grads = torch.autograd.grad(_loss(outputs, y), perturbed)
        buffers = list(grads) if step == 0 else [MOMENTUM * b + g for b, g in zip(buffers, grads)]
        with torch.no_grad():
            for p, b in zip(params, buffers):
                p.sub_(LR * b)
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("config", ["sam_lamp", "sam_lamp_no_noise"])
def test_dcp_resume_continues_bit_for_bit(runs: dict, world_size: int, config: str) -> None:
    for rank_results in runs[world_size]:
        for a, b in zip(rank_results[f"{config}.resumed"], rank_results[f"{config}.uninterrupted"]):
            assert torch.equal(a, b)
        saved, loaded = rank_results[f"{config}.saved_lamp"], rank_results[f"{config}.loaded_lamp"]
        assert saved.keys() == loaded.keys() and "lamp.cycle_step" in saved
        for key in saved:
            assert torch.equal(torch.as_tensor(saved[key]), torch.as_tensor(loaded[key])), key
    if config == "sam_lamp":
        assert runs[world_size][0][f"{config}.saved_lamp"]["lamp.noise_draws"] == RESUME_AT


@pytest.mark.parametrize("config", ["sam_lamp", "sam_lamp_no_noise"])
def test_dcp_checkpoint_of_2_ranks_loads_on_4(runs: dict, config: str) -> None:
    saved = runs[2][0][f"{config}.saved_lamp"]
    for rank_results in runs[4]:
        loaded = rank_results[f"{config}.resharded_lamp"]
        for key in saved:
            assert torch.equal(torch.as_tensor(saved[key]), torch.as_tensor(loaded[key])), key
    if config == "sam_lamp_no_noise":  # deterministic: equals the uninterrupted one-process run
        _assert_close(runs[4][0][f"{config}.resharded"], _reference(config))


@pytest.mark.parametrize("world_size", [2, 4])
def test_an_unseeded_lamp_checkpoint_of_one_unsharded_process_resumes_sharded(runs: dict, world_size: int) -> None:
    """A sharded LAMP used to keep a draw counter also without a seed, so DCP asked an
    unsharded checkpoint for 'lamp.noise_draws' and refused to load it."""
    for rank_results in runs[world_size]:
        _assert_close(rank_results["sam_lamp_no_noise.from_unsharded"], _reference("sam_lamp_no_noise"))


@pytest.mark.parametrize("name", TP_TRANSFORMS)
def test_a_gradient_placed_unlike_its_parameter_is_redistributed_first(runs: dict, name: str) -> None:
    """Tensor parallelism: the replicated bias gets a Shard(0) gradient. Before, the
    transforms combined the local shards as if they lined up (ASAM, GSAM, LookSAM gave other
    weights; WSAM made the replicated bias differ between ranks)."""
    reference = _tensor_parallel(name, sharded=False)
    for rank_results in runs[2]:
        _assert_close(rank_results[f"tp.{name}"], reference)
        torch.testing.assert_close(rank_results[f"tp.{name}"], reference, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("config", ["sam_lamp_no_noise", "clip_sam"])
def test_hsdp_weights_equal_one_process_on_the_global_batch(runs: dict, config: str) -> None:
    """On a 2x2 mesh the norms are summed over the sharded dimension only, not the replicas."""
    reference = _reference(config)
    for rank_results in runs[4]:
        _assert_close(rank_results[f"hsdp.{config}"], reference)


@pytest.mark.parametrize("config", HSDP_CONFIGS)
def test_hsdp_replicas_hold_identical_shards(runs: dict, config: str) -> None:
    """Ranks r and r + 2 hold the same shard (replicated over mesh dim 0): LAMP's noise too."""
    for rank in (0, 1):
        first, replica = runs[4][rank][f"hsdp.{config}.local"], runs[4][rank + 2][f"hsdp.{config}.local"]
        assert all(torch.equal(a, b) for a, b in zip(first, replica))
    # ... and the two shards are really different halves.
    assert not torch.equal(runs[4][0][f"hsdp.{config}.local"][0], runs[4][1][f"hsdp.{config}.local"][0])


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_fsdp1_flattened_parameters_refuse_a_chain_and_step_bare_without_one(runs: dict, use_orig_params: bool) -> None:
    """FSDP1's flat pieces carry no sharding metadata: SAM would take one rank's norm and its
    perturbation would not reach the forward (with use_orig_params=True it moved the weights
    with lr=0). Refused at construction on every rank; transforms=() equals the bare optimizer."""
    for rank_results in runs[2]:
        message = rank_results[f"fsdp1.{use_orig_params}.error"]
        assert message is not None and message.startswith("param_groups[0]: the parameters are flattened by FSDP1 (FullyShardedDataParallel)")
        assert "FSDP2 (torch.distributed.fsdp.fully_shard)" in message
        assert rank_results[f"fsdp1.{use_orig_params}.same"]


def test_an_optimizer_built_before_fsdp1_wraps_the_model_refuses_its_first_step(runs: dict) -> None:
    """accelerate builds the optimizer first and FSDP1 (use_orig_params=True) flattens the same
    parameters in place afterwards: SAM moved the weights wrongly (0.73 off after 3 steps);
    the step refuses them, before anything changes."""
    for rank_results in runs[2]:
        message = rank_results["fsdp1.early.error"]
        assert message is not None and message.startswith("param_groups[0]: the parameters are flattened by FSDP1")
        assert rank_results["fsdp1.early.unchanged"]


@pytest.mark.parametrize("owner", SWAP_OWNERS)
@pytest.mark.parametrize("order", SWAP_ORDERS)
@pytest.mark.parametrize("kind", AVERAGING)
def test_swap_blocks_over_fsdp2_equal_one_process(runs: dict, kind: str, order: str, owner: str) -> None:
    """fully_shard's root keeps its gathered weights after a forward without a backward: the
    block wrote the shards only, so the forward after it ran at the averages (2.8e-2 off), the
    next step trained from them, and a block after a no_grad forward evaluated the training
    weights. The block reshards the model on entry and on exit."""
    reference = _swap_run(kind, order, "optimizer" if owner == "keyword" else owner, 0, 1, sharded=False)
    assert (reference["inside"][0] - reference["after"][0]).abs().max() > 1e-3, "the block swaps"
    for rank_results in runs[2]:
        result = rank_results[f"swap.{kind}.{order}.{owner}"]
        assert isinstance(result, dict), result
        for key in ("inside", "after", "weights"):
            _assert_close(result[key], reference[key])


@pytest.mark.parametrize("kind", AVERAGING)
def test_a_swap_block_over_sharded_parameters_without_a_model_is_refused(runs: dict, kind: str) -> None:
    name = {"ema": "EMA", "lookahead": "Lookahead"}[kind]
    for rank_results in runs[2]:
        result = rank_results[f"swap.{kind}.no_model"]
        assert isinstance(result, dict), result
        assert result["message"] == (
            "model must be the fully_shard-ed model when the parameters are sharded (DTensor), got None: "
            f"the {name} block reshards it, so that the forward inside and after the block gathers the "
            "swapped weights; pass model= (or build the TransformingOptimizer with model=)"
        )
        assert result["unchanged"]


def test_perturbation_buffers_stay_sharded(runs: dict) -> None:
    for n in (2, 4):
        for rank_results in runs[n]:
            assert rank_results["backup_numel"] == rank_results["shard_numel"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of tests/test_optim_fsdp.py")
    parser.add_argument("--out", required=True)
    parser.add_argument("--reshard-from", default=None)
    arguments = parser.parse_args()
    _worker(arguments.out, arguments.reshard_from)
