"""Training across processes: the time of one iteration on 2 ranks against 1 rank, same global batch.

The script starts its own ranks: for each configuration it runs ``W`` copies of itself with
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ...), each
rank calls ``torch.distributed.init_process_group("gloo")`` (CPU), and rank 0 reports its
timings. Configurations are launched in turn, in a rotating order over ``--rounds`` rounds, and
the median over rounds of each launch's median iteration time is reported (wall clock: the ranks
are separate processes). Every rank runs ``--threads`` intra-op threads (default 1).

Sections (``--sections``):

* ``meta``: ``MetaTrainer.fit`` with second-order MAML (outer Adam, lr 1e-3) on the same global
  meta-batch, drawn from the same seeded sampler, by 1 rank (``distributed=False``: an ordinary
  single process) and by 2 ranks (``distributed=True``: each rank adapts half the tasks, the
  meta-gradient is all-reduced), plus, in full runs, 1 rank with 2 threads (the same 2 cores used
  by threads instead of processes). One launch per configuration runs every workload. Workloads:

  * ``sinusoid``: the MLP 1-40-40-1 of Finn et al. (2017), K=10 support and 10 query points, 5 inner
    SGD steps (inner lr 0.01), tasks adapted together with ``torch.func.vmap``
    (``vectorize=True``); meta-batch 32 (``--quick``: 16);
  * ``conv4``: four blocks Conv2d(C, 3x3) - ReLU - MaxPool2d(2) on 1x28x28 random inputs (no
    downloads), 5-way 1-shot with 15 queries per class, one inner step, the per-task loop
    (``vectorize=False``, faster than vmap for convolutions on CPU); C=32, meta-batch 16
    (``--quick``: C=8, meta-batch 8).

  Reported per configuration: ms per meta-iteration ``t`` (rank 0's time from one completed
  meta-update to the next, sampling included; the all-reduce synchronises the ranks every
  iteration, so this is the job's iteration time), the speedup ``t_1 / t`` and the **scaling
  efficiency** ``E = t_1 / (c * t)`` with ``c`` the cores used (ranks x threads): 1.0 is perfect
  scaling, 0.5 on two cores means no gain at all. ``t_1`` is the first configuration's time (1x1
  by default); where that configuration uses ``c_1`` cores (``--threads``, ``--configs``),
  ``E = c_1 * t_1 / (c * t)``, so the first row reads 1.0. ``reduce ms`` is the time per iteration rank 0
  spends in the meta-step's all-reduces, waiting for the other rank included; ``all-reduce ms``
  is one all-reduce of a buffer the meta-gradient's size with the ranks in step (a barrier
  first), the communication alone. ``CPU ms/iter`` is the CPU time per iteration summed over the
  ranks and ``work eff.`` the 1-rank CPU time over it: the work that distributing adds (the
  duplicated sampling, per-rank overheads, communication), which other processes' load on a shared
  machine distorts less than wall time; on an idle machine the wall-clock efficiency cannot exceed
  it by much. ``max|dg|`` compares the meta-gradient of the first meta-iteration with the 1-rank
  run's (the first configuration's); above ``META_GRAD_RTOL`` x its largest entry, or not finite,
  it fails the run. ``max|dw|`` compares
  the final weights with the 1-rank run's after the same iterations on the same tasks. They differ
  only because the sums over ranks are ordered differently: in float32, Adam amplifies that
  rounding over the iterations on conv4 (about 1e-2 after 23 iterations at C=32), while the same
  run in float64 agrees to 6e-16; it is checked finite only (Adam's steps are about lr whatever the
  gradient's scale, so the amplified rounding and a wrong meta-gradient move weights alike). A
  configuration whose meta-steps were skipped (a non-finite update) also fails the run.

* ``sam``: a SAM step (momentum SGD inside ``SAM(rho=0.05)``) against the plain two-pass step
  (two forward-backward passes and the inner step: SAM's floor) on an MLP, global batch 64, once
  in one ordinary process and once on 2 ranks over FSDP2 (``fully_shard`` per layer; gloo). The
  two kinds run interleaved in the same processes; reported: the median of the paired per-round
  ratios ``SAM / two-pass`` (the goal: FSDP2's ratio equals the single process's, within noise --
  the global norm costs one all-reduce of one number per step) and the **extra peak memory** of
  SAM's first step over the two-pass step's, on rank 0, in multiples of the rank's parameter
  (shard) bytes, counted as live tensor storages (``PeakBytes``; the perturbation buffers are
  sharded like the parameters, so this stays about 1x). Sizes: 4x1024 (``--quick``: 2x256). A SAM
  step skipped (non-finite gradients) or non-finite weights after the timed steps fail the run.

Usage::

    python benchmarks/distributed.py            # full: 3 rounds, 20 timed meta-iterations (a few minutes)
    python benchmarks/distributed.py --quick    # CI: < 60 s, 1 round, small sizes
    python benchmarks/distributed.py --workloads sinusoid --rounds 5
    python benchmarks/distributed.py --configs 1x1 2x1 --iters 10   # without the 2-thread row

Prints one table per workload; writes ``benchmarks/results/distributed.json`` and, when
matplotlib is importable, ``benchmarks/results/distributed.png``. A full run (not ``--quick``, every
section and workload) also copies the figure to ``docs/images/distributed.png`` for the docs'
benchmarks page.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the suite's rank launcher

from samgria.data import FewShotSampler, SinusoidTaskSampler  # noqa: E402
from samgria.data.sharding import shard_bounds  # noqa: E402
from samgria.meta import distributed as collectives  # noqa: E402
from samgria.meta.maml import MAML  # noqa: E402
from samgria.meta.trainer import MetaTrainer  # noqa: E402
from distributed_harness import launch_ranks  # noqa: E402
from _checks import int_at_least, require_close, require_steps_taken  # noqa: E402
from _process import load_average, progress  # noqa: E402
from _docs_figures import publish_figures  # noqa: E402

SCRIPT = Path(__file__).resolve()
RESULTS = SCRIPT.parent / "results"
#: Upper bound of one launch (a busy machine is slow, not failing).
LAUNCH_LIMIT_S = 1800
#: Tolerance of the first meta-iteration's meta-gradient against the baseline's, relative to its
#: largest entry (float32): the ranks adapt the same tasks with the same kernels (the per-task
#: loop) or in smaller vmap batches, and sum the tasks in another order; 2 threads round some
#: kernels differently. Measured <= 1.2e-7 (2x1 and 1x2, --quick and full sizes); 1e-3 leaves room
#: for a flipped ReLU or max-pool choice near a tie (as in meta_throughput.py). A wrong all-reduce
#: (a factor 1.5: 0.5; NaN) is far above it.
META_GRAD_RTOL = 1e-3


# -- launching ranks (shared by every section) -------------------------------------------------------
def launch(section: str, world_size: int, threads: int, config: dict[str, Any]) -> dict[str, Any]:
    """Run ``section``'s worker on ``world_size`` local ranks; return what rank 0 reported.

    Each rank is ``python distributed.py --worker SECTION --config JSON --out DIR`` with torchrun's
    environment and ``OMP_NUM_THREADS=threads``, started by the test suite's launcher
    (``tests/distributed_harness.py``). On a failure every rank's output is raised.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        command = [SCRIPT, "--worker", section, "--config", json.dumps(config), "--threads", str(threads), "--out", out_dir]
        run = launch_ranks(command, world_size, threads=threads, limit_s=LAUNCH_LIMIT_S)
        if run.failure:
            raise RuntimeError(run.report(f"{section} on {world_size} rank(s) x {threads} thread(s)"))
        result = json.loads((Path(out_dir) / "result.json").read_text())
        tensors = Path(out_dir) / "tensors.pt"
        if tensors.exists():
            result["tensors"] = torch.load(tensors)
        return result


def worker_main(section: str, config: dict[str, Any], threads: int, out_dir: str) -> None:
    """One rank: set up the process group (several ranks only), run the section's worker, report."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        dist.init_process_group("gloo")
    try:
        result, tensors = WORKERS[section](config, world_size)
        # Free reference cycles that still hold the process group (optimizers, models wrapped
        # for DDP) while it is alive: destroyed at interpreter shutdown instead, gloo's threads
        # can abort a rank that has finished ("terminate called without an active exception").
        gc.collect()
        if world_size > 1:
            dist.barrier()
    finally:
        if world_size > 1:
            dist.destroy_process_group()
        gc.collect()
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(out_dir) / "result.json").write_text(json.dumps(result))
        if tensors is not None:
            torch.save(tensors, Path(out_dir) / "tensors.pt")




# -- the `meta` section --------------------------------------------------------------------------------
#: (world_size, threads) of the configurations; the first is the baseline.
META_CONFIGS = [(1, 1), (2, 1), (1, 2)]
WAYS, SHOTS, QUERIES = 5, 1, 15


def meta_workload(name: str, quick: bool) -> dict[str, Any]:
    """The configuration of a meta workload (sent to the workers as JSON)."""
    if name == "sinusoid":
        return {"workload": name, "meta_batch": 16 if quick else 32, "inner_steps": 5, "inner_lr": 0.01,
                "vectorize": True}  # fmt: skip
    return {"workload": name, "meta_batch": 8 if quick else 16, "channels": 8 if quick else 32,
            "inner_steps": 1, "inner_lr": 0.01, "vectorize": False}  # fmt: skip


def conv4(channels: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels, WAYS))


def meta_setup(config: dict[str, Any]) -> tuple[nn.Module, Callable, Any]:
    """Model (seeded), loss and sampler (seeded: the same global stream on every rank)."""
    torch.manual_seed(0)
    if config["workload"] == "sinusoid":
        model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
        return model, nn.functional.mse_loss, SinusoidTaskSampler(k_support=10, k_query=10, seed=0)
    model = conv4(config["channels"])
    generator = torch.Generator().manual_seed(0)
    classes, per_class = 20, SHOTS + QUERIES
    inputs = torch.randn(classes * per_class, 1, 28, 28, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return model, nn.functional.cross_entropy, FewShotSampler(inputs, labels, WAYS, SHOTS, QUERIES, seed=0)


def meta_worker(config: dict[str, Any], world_size: int) -> tuple[dict[str, Any], Any]:
    """Every workload of ``config["workloads"]`` in turn (one process start for all)."""
    results, tensors = {}, {}
    for workload in config["workloads"]:
        results[workload["workload"]], tensors[workload["workload"]] = meta_workload_run(workload, world_size)
    return results, tensors


def meta_workload_run(config: dict[str, Any], world_size: int) -> tuple[dict[str, Any], dict[str, list[torch.Tensor]]]:
    """Fit ``warmup + iters`` meta-iterations; rank 0's per-iteration times and reduce times, and
    its final weights and first meta-iteration's meta-gradient (the mean over every rank's tasks)."""
    model, loss_fn, sampler = meta_setup(config)
    meta = MAML(model, torch.optim.Adam, lr=1e-3, inner_lr=config["inner_lr"], inner_steps=config["inner_steps"],
                distributed=world_size > 1)  # fmt: skip
    trainer = MetaTrainer(meta, loss_fn, sampler, vectorize=config["vectorize"])
    reduce_seconds = []
    reduce = collectives.all_reduce_meta_gradients

    def timed_reduce(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return reduce(*args, **kwargs)
        finally:
            reduce_seconds.append(time.perf_counter() - start)

    collectives.all_reduce_meta_gradients = timed_reduce  # base.py looks it up at every step
    stamps, cpu_stamps = [time.perf_counter()], [time.process_time()]
    first_grad: list[torch.Tensor] = []

    def stamp(iteration: int, loss: float) -> None:
        stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())
        if len(stamps) == 2:  # after the first meta-step: .grad holds its (all-reduced) meta-gradient
            first_grad.extend(p.grad.detach().clone() for p in model.parameters())

    trainer.fit(config["warmup"] + config["iters"], config["meta_batch"], progress=False, callback=stamp)
    collectives.all_reduce_meta_gradients = reduce
    seconds = [b - a for a, b in zip(stamps, stamps[1:])][config["warmup"]:]
    cpu_seconds = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:])][config["warmup"]:]
    cpu_per_rank = [cpu_seconds]
    if world_size > 1:
        import torch.distributed as dist

        cpu_per_rank = [None] * world_size
        dist.all_gather_object(cpu_per_rank, cpu_seconds)
    result = {
        "seconds": seconds,
        "cpu_seconds_per_rank": cpu_per_rank,
        "reduce_seconds": reduce_seconds[config["warmup"]:],
        "comm_seconds": all_reduce_alone(model, world_size),
        "local_tasks": len(range(*shard_bounds(config["meta_batch"], meta.rank, world_size))),
        "skipped_steps": meta.skipped_steps,
    }
    return result, {"weights": [p.detach().clone() for p in model.parameters()], "first_grad": first_grad}


def max_abs(tensors: list[torch.Tensor]) -> float:
    """The largest absolute entry of ``tensors``; NaN if one is NaN (torch's max keeps it, Python's may not)."""
    return float(torch.stack([t.abs().max() for t in tensors]).max())


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Max |a - b| over the tensor pairs (NaN if an entry is NaN)."""
    return max_abs([x - y for x, y in zip(a, b)])


def all_reduce_alone(model: nn.Module, world_size: int, repeats: int = 10) -> list[float]:
    """Seconds of one ``all_reduce`` of a buffer the size of the meta-gradient, the ranks in step
    (a barrier before each): the communication alone, without waiting for a slower rank."""
    if world_size == 1:
        return []
    import torch.distributed as dist

    flat = torch.zeros(sum(p.numel() for p in model.parameters()))
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat)
        seconds.append(time.perf_counter() - start)
    return seconds


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    rounds = args.rounds or (1 if args.quick else 3)
    iters = args.iters or (3 if args.quick else 20)
    warmup = 2 if args.quick else 3
    # 1 rank x 2 threads (full runs only): the same two cores used by threads instead of processes.
    chosen = args.configs or [f"{w}x{t}" for w, t in (META_CONFIGS[:2] if args.quick else META_CONFIGS)]
    configs = [(int(c.split("x")[0]), int(c.split("x")[1]) * args.threads) for c in chosen]
    workloads = [{**meta_workload(name, args.quick), "iters": iters, "warmup": warmup} for name in args.workloads]
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {c: [] for c in configs}
    for r in range(rounds):
        for world_size, threads in configs[r % len(configs):] + configs[: r % len(configs)]:
            progress(f"meta: round {r + 1}/{rounds}, {world_size} rank(s) x {threads} thread(s)")
            runs[(world_size, threads)].append(launch("meta", world_size, threads, {"workloads": workloads}))
    base = configs[0]
    results: dict[str, Any] = {}
    for config in workloads:
        name = config["workload"]

        def median_seconds(key: tuple[int, int], field: str = "seconds") -> float | None:
            values = [statistics.median(run[name][field]) for run in runs[key] if run[name][field]]
            return statistics.median(values) if values else None

        t_base = median_seconds(base)
        rows = {}
        for world_size, threads in configs:
            t = median_seconds((world_size, threads))
            reduce = median_seconds((world_size, threads), "reduce_seconds")
            comm = median_seconds((world_size, threads), "comm_seconds")
            cpu = statistics.median(
                sum(statistics.median(r) for r in run[name]["cpu_seconds_per_rank"]) for run in runs[(world_size, threads)]
            )
            cpu_base = statistics.median(
                sum(statistics.median(r) for r in run[name]["cpu_seconds_per_rank"]) for run in runs[base]
            )
            for run in runs[(world_size, threads)]:
                require_steps_taken(f"meta/{name} on {world_size} rank(s) x {threads} thread(s)",
                                    run[name]["skipped_steps"], run["tensors"][name]["weights"])  # fmt: skip
            last = runs[(world_size, threads)][-1]
            first_base = runs[base][-1]["tensors"][name]["first_grad"]
            max_dg = max_difference(last["tensors"][name]["first_grad"], first_base)
            require_close(f"meta/{name}: max|first meta-gradient({world_size}x{threads}) - "
                          f"first meta-gradient({base[0]}x{base[1]})|", max_dg,
                          META_GRAD_RTOL * max_abs(first_base))  # fmt: skip
            # Relative to the first configuration's cores: 1 by default, more with --threads or --configs.
            rows[f"{world_size}x{threads}"] = {
                "ranks": world_size, "threads": threads, "ms_per_iteration": 1e3 * t,
                "speedup": t_base / t, "efficiency": t_base * base[0] * base[1] / (world_size * threads * t),
                "reduce_ms": None if reduce is None else 1e3 * reduce,
                "all_reduce_ms": None if comm is None else 1e3 * comm,
                "cpu_ms_per_iteration": 1e3 * cpu, "work_efficiency": cpu_base / cpu,
                "max_dg": max_dg,
                "max_dw": max_difference(last["tensors"][name]["weights"], runs[base][-1]["tensors"][name]["weights"]),
                "local_tasks": last[name]["local_tasks"],
            }  # fmt: skip
        results[name] = {"config": config, "rows": rows, "meta_grad_rtol": META_GRAD_RTOL}
        print_meta(name, results[name])
    return results


def describe(config: dict[str, Any]) -> str:
    if config["workload"] == "sinusoid":
        return (f"sinusoid MLP 1-40-40-1, 2nd-order MAML, {config['inner_steps']} inner steps, meta-batch "
                f"{config['meta_batch']}, vmap")  # fmt: skip
    return (f"conv4 (C={config['channels']}) 5-way 1-shot 15 queries, 2nd-order MAML, {config['inner_steps']} inner "
            f"step, meta-batch {config['meta_batch']}, per-task loop")  # fmt: skip


def print_meta(name: str, result: dict[str, Any]) -> None:
    config = result["config"]
    print(f"\nmeta/{name}: {describe(config)}; {config['iters']} timed meta-iterations per launch")
    print(f"{'ranks x threads':<16}{'tasks/rank':>11}{'ms/iter':>10}{'speedup':>9}{'efficiency':>12}"
          f"{'CPU ms/iter':>13}{'work eff.':>11}{'reduce ms':>11}{'all-reduce ms':>15}{'max|dg|':>10}"
          f"{'max|dw|':>10}")  # fmt: skip
    for key, row in result["rows"].items():
        reduce = "-" if row["reduce_ms"] is None else f"{row['reduce_ms']:.2f}"
        comm = "-" if row["all_reduce_ms"] is None else f"{row['all_reduce_ms']:.2f}"
        print(f"{key:<16}{row['local_tasks']:>11}{row['ms_per_iteration']:>10.1f}{row['speedup']:>9.2f}"
              f"{row['efficiency']:>12.2f}{row['cpu_ms_per_iteration']:>13.1f}{row['work_efficiency']:>11.2f}"
              f"{reduce:>11}{comm:>15}{row['max_dg']:>10.1e}{row['max_dw']:>10.1e}")  # fmt: skip
    print("efficiency = t(first row) x its cores / (ranks x threads x t): 1.0 is perfect scaling, 0.5 no gain on "
          "twice the first row's cores; work eff. = CPU time of the first row / CPU time of all ranks (the work "
          "distribution adds, whatever the load); "
          "reduce ms: in the meta-step's all-reduces per iteration, waiting for the other rank included; "
          "all-reduce ms: one all-reduce of the meta-gradient's size alone; max|dg|, max|dw|: the first "
          "meta-iteration's meta-gradient and the final weights against the first row's")  # fmt: skip


# -- the `sam` section -------------------------------------------------------------------------------------
#: world sizes of the configurations: 1 is an ordinary single process (no FSDP), the baseline ratio.
SAM_WORLD_SIZES = [1, 2]


def sam_workload(quick: bool) -> dict[str, Any]:
    """An MLP ``depth`` x ``width`` (GELU), global batch 64, momentum SGD inside SAM(rho=0.05)."""
    return {"width": 256 if quick else 1024, "depth": 2 if quick else 4, "global_batch": 64,
            "rounds": 6 if quick else 40, "warmup": 2 if quick else 5}  # fmt: skip


class PeakBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the context and alive at the same time.

    Counts every storage an operator allocates (a ``DTensor``'s local shard, FSDP2's all-gathered
    parameters, gradients, activations, optimizer state, SAM's buffers) once, until it is freed;
    views and in-place results (which return an input's memory) and storages that existed before
    the context do not count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[Any, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for key in [key for key in self.live if key.expired()]:
            self.current -= self.live.pop(key)
        if any(ret.alias_info is not None for ret in func._schema.returns):
            return out  # a view or an in-place result: the memory of an input, not new memory
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            tensor = getattr(tensor, "_local_tensor", tensor)  # a DTensor's shard
            if type(tensor) not in (torch.Tensor, nn.Parameter):
                continue
            storage = tensor.untyped_storage()
            key = StorageWeakRef(storage)
            if key not in self.live:
                self.live[key] = storage.nbytes()
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def sam_model(config: dict[str, Any], world_size: int) -> nn.Module:
    torch.manual_seed(0)
    width = config["width"]
    layers: list[nn.Module] = []
    for _ in range(config["depth"]):
        layers += [nn.Linear(width, width), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    if world_size > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    return model


def sam_step_fn(config: dict[str, Any], world_size: int,
                kind: str) -> tuple[nn.Module, Callable[[], None], torch.optim.Optimizer]:  # fmt: skip
    """A fresh (sharded) model, one training step of ``kind`` ("sam" or "two-pass": the floor, two
    forward-backward passes and the inner step, no perturbation) and the step's optimizer."""
    from samgria import SAM, TransformingOptimizer

    model = sam_model(config, world_size)
    rank = int(os.environ.get("RANK", "0"))
    rows = config["global_batch"] // world_size
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(config["global_batch"], config["width"], generator=generator)[rank * rows : (rank + 1) * rows]
    y = torch.randint(0, 10, (config["global_batch"],), generator=generator)[rank * rows : (rank + 1) * rows]
    if kind == "sam":
        optimizer = TransformingOptimizer(model.parameters(), torch.optim.SGD, lr=0.01, momentum=0.9,
                                          transforms=[SAM(rho=0.05)])  # fmt: skip
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def step() -> None:
        if kind == "sam":
            optimizer.step(closure)
        else:
            closure()
            closure()
            optimizer.step()

    return model, step, optimizer


def sam_worker(config: dict[str, Any], world_size: int) -> tuple[dict[str, Any], Any]:
    """Interleaved step times of SAM and of the two-pass floor; peak extra bytes of SAM's first step."""
    import torch.distributed as dist

    def barrier() -> None:
        if world_size > 1:
            dist.barrier()

    kinds = ("two-pass", "sam")
    models, steps, optimizers = {}, {}, {}
    for kind in kinds:
        models[kind], steps[kind], optimizers[kind] = sam_step_fn(config, world_size, kind)
    for _ in range(config["warmup"]):
        for kind in kinds:
            steps[kind]()
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(config["rounds"]):
        for kind in kinds:
            barrier()
            start = time.perf_counter()
            steps[kind]()
            barrier()
            seconds[kind].append(time.perf_counter() - start)
    # Steps taken: SAM's skipped steps (non-finite gradients; the same on every rank) and the sum of
    # |weights| over every rank's shard, finite exactly when every weight is (barring overflow).
    skipped = {kind: getattr(optimizers[kind], "skipped_steps", 0) for kind in kinds}
    abs_sums = torch.stack([
        sum(getattr(p, "_local_tensor", p).detach().abs().sum() for p in models[kind].parameters()) for kind in kinds
    ])  # fmt: skip
    if world_size > 1:
        dist.all_reduce(abs_sums)
    # Memory: the first step of a fresh model and optimizer (state and SAM's buffers are created in it).
    peaks = {}
    for kind in kinds:
        model, step, _ = sam_step_fn(config, world_size, kind)
        barrier()
        with PeakBytes() as tracker:
            step()
        peaks[kind] = tracker.peak
        shard_bytes = sum(getattr(p, "_local_tensor", p).numel() * p.element_size() for p in model.parameters())
    result = {"seconds": seconds, "peak_bytes": peaks, "shard_bytes": shard_bytes,
              "params": sum(p.numel() for p in models["sam"].parameters()), "skipped_steps": skipped,
              "weights_abs_sum": dict(zip(kinds, abs_sums.tolist()))}  # fmt: skip
    return result, None


def run_sam(args: argparse.Namespace) -> dict[str, Any]:
    config = sam_workload(args.quick)
    rows = {}
    for world_size in SAM_WORLD_SIZES:
        progress(f"sam: {world_size} rank(s), {'FSDP2' if world_size > 1 else 'one process'}")
        run = launch("sam", world_size, args.threads, config)
        for kind, skipped in run["skipped_steps"].items():
            require_steps_taken(f"sam on {world_size} rank(s): {kind}", skipped,
                                [torch.tensor(run["weights_abs_sum"][kind])])  # fmt: skip
        t_floor = statistics.median(run["seconds"]["two-pass"])
        t_sam = statistics.median(run["seconds"]["sam"])
        paired = [s / f for s, f in zip(run["seconds"]["sam"], run["seconds"]["two-pass"])]
        rows[str(world_size)] = {
            "ranks": world_size, "ms_two_pass": 1e3 * t_floor, "ms_sam": 1e3 * t_sam,
            "ratio": statistics.median(paired),
            "ratio_iqr": statistics.quantiles(paired, n=4)[::2] if len(paired) >= 4 else None,
            "extra_peak_shards": (run["peak_bytes"]["sam"] - run["peak_bytes"]["two-pass"]) / run["shard_bytes"],
            "shard_bytes": run["shard_bytes"], "params": run["params"],
        }  # fmt: skip
    result = {"config": config, "rows": rows}
    print_sam(result)
    return result


def print_sam(result: dict[str, Any]) -> None:
    config, rows = result["config"], result["rows"]
    params = next(iter(rows.values()))["params"]
    print(f"\nsam: MLP {config['depth']}x{config['width']} (GELU; {params / 1e6:.2f}M parameters), global batch "
          f"{config['global_batch']}, momentum SGD in SAM(rho=0.05); {config['rounds']} interleaved rounds")  # fmt: skip
    print(f"{'ranks':<22}{'two-pass ms':>12}{'SAM ms':>9}{'SAM / two-pass':>16}{'IQR':>16}{'extra peak':>12}")
    for key, row in rows.items():
        label = "1 (one process)" if row["ranks"] == 1 else f"{row['ranks']} (FSDP2, gloo)"
        iqr = "-" if row["ratio_iqr"] is None else f"[{row['ratio_iqr'][0]:.2f}, {row['ratio_iqr'][1]:.2f}]"
        print(f"{label:<22}{row['ms_two_pass']:>12.1f}{row['ms_sam']:>9.1f}{row['ratio']:>16.3f}{iqr:>16}"
              f"{row['extra_peak_shards']:>11.2f}x")  # fmt: skip
    print("SAM / two-pass: median of paired per-round ratios; extra peak: SAM's first step over the two-pass "
          "step's, live tensor bytes on rank 0, in multiples of the rank's parameter (shard) bytes")


#: Section name -> driver (runs in the launching process, returns the section's results).
SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"meta": run_meta, "sam": run_sam}
#: Section name -> worker (runs on every rank).
WORKERS: dict[str, Callable[[dict[str, Any], int], tuple[dict[str, Any], Any]]] = {"meta": meta_worker, "sam": sam_worker}


# -- results ---------------------------------------------------------------------------------------------
def write_results(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(results, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\nwrote {RESULTS / 'distributed.json'} (matplotlib not importable: no plot)")
        return
    panels = list(results.get("meta", {}).items())
    sam = results.get("sam")
    if not panels and sam is None:
        return
    fig, axes = plt.subplots(len(panels) + (sam is not None), 1, figsize=(7, 1.9 * (len(panels) + (sam is not None))), squeeze=False)
    if sam is not None:
        ax = axes[-1, 0]
        rows = list(sam["rows"].values())
        labels = ["1 process" if r["ranks"] == 1 else f"{r['ranks']} ranks, FSDP2" for r in rows]
        ax.barh(labels, [r["ratio"] for r in rows], color="tab:orange")
        for i, row in enumerate(rows):
            ax.text(row["ratio"], i, f" {row['ratio']:.2f}, +{row['extra_peak_shards']:.2f}x shard bytes", va="center")
        ax.set_title("sam: SAM step / plain two-pass step (and extra peak memory)")
        ax.set_xlim(0, 2.2 * max(r["ratio"] for r in rows))  # room for the labels
        ax.invert_yaxis()
    for ax, (name, result) in zip(axes[:, 0], panels):
        rows = result["rows"]
        labels = [f"{r['ranks']} rank(s) x {r['threads']} thread(s)" for r in rows.values()]
        ms = [r["ms_per_iteration"] for r in rows.values()]
        ax.barh(labels, ms, color="tab:blue")
        for i, row in enumerate(rows.values()):
            ax.text(ms[i], i, f" E={row['efficiency']:.2f}", va="center")
        ax.set_xlim(0, 1.2 * max(ms))
        ax.set_title(f"meta/{name}: ms per meta-iteration (E: scaling efficiency)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(RESULTS / "distributed.png", dpi=110)
    print(f"\nwrote {RESULTS / 'distributed.json'} and {RESULTS / 'distributed.png'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI, < 60 s: 1 round, 3 timed iterations, small sizes, no 2-thread row")  # fmt: skip
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                        help="what to run (default: all)")  # fmt: skip
    parser.add_argument("--workloads", nargs="+", default=["sinusoid", "conv4"], choices=["sinusoid", "conv4"],
                        help="meta workloads (default: both)")  # fmt: skip
    parser.add_argument("--rounds", type=int_at_least(1), default=None, help="launches per configuration (1 quick / 3)")
    parser.add_argument("--iters", type=int_at_least(1), default=None, help="timed meta-iterations per launch (3 / 20)")
    parser.add_argument("--threads", type=int_at_least(1), default=1, help="intra-op threads of each rank (default 1)")
    parser.add_argument("--configs", nargs="+", default=None, metavar="RANKSxTHREADS",
                        choices=[f"{w}x{t}" for w, t in META_CONFIGS],
                        help="meta configurations, the first is the baseline (default 1x1 2x1 1x2; quick 1x1 2x1)")  # fmt: skip
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker, json.loads(args.config), args.threads, args.out)
        return
    start, load_before = time.perf_counter(), load_average()
    results: dict[str, Any] = {"torch": torch.__version__, "cpus": os.cpu_count(), "quick": args.quick}
    for section in args.sections:
        results[section] = SECTIONS[section](args)
    results["load_average"] = [load_before, load_average()]
    print(f"\ntotal run time {time.perf_counter() - start:.0f} s; 1-minute load average at start and end: "
          f"{load_before:.2f}, {results['load_average'][1]:.2f} on {os.cpu_count()} CPUs")  # fmt: skip
    write_results(results)  # also from --quick, so that CI draws the figure a full run draws
    full = not args.quick and set(args.sections) == set(SECTIONS) and set(args.workloads) == {"sinusoid", "conv4"}
    if full:  # every section and workload
        publish_figures({RESULTS / "distributed.png": "distributed.png"})


if __name__ == "__main__":
    main()
