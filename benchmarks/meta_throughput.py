"""Meta-iteration throughput (and memory): a hand-written per-task loop against samgria's paths.

Every path runs the same math on its own copy of the same initial model. Paths are timed
interleaved (each round times every path in turn, in a rotating order) and the median per path
is reported, with its ratio to a hand-written per-task loop measured in the same run: a Python
loop over tasks with ``torch.autograd.grad(create_graph=True)`` and
``torch.func.functional_call``, as published meta-learning libraries do it, all tasks
back-propagated together at the end. For the few-shot workloads the ratio is the median over
rounds of the row's time divided by the hand loop's in the same round (load from other
processes hits both alike), over at least ``--rounds-few-shot`` rounds and as many more as fit in
``--seconds-few-shot`` (60 s per workload; the budget adds rounds up to 30 in all).
Before timing, every path's meta-gradient at the shared initial weights is compared with the
hand-written loop's (``max|dgrad|``; ``vectorize=None``: the largest over its trial meta-steps on
each path and the first on the path it keeps); a difference above the tolerance (relative to the
hand loop's largest entry: 1e-4 on the sinusoid, 1e-2 on the few-shot models; see
``SINUSOID_GRAD_RTOL``) or not finite fails the run, as does a timed row that skipped a meta-step
(a non-finite update) or ended with non-finite weights.

1. **Sinusoid MLP** (Finn et al., 2017): an MLP 1-40-40-1 with ReLU, a meta-batch of 25 tasks
   with K=10 support and 10 query points, 5 inner SGD steps (inner lr 0.01), second order, outer
   Adam (lr 1e-3). Rows: the hand-written loop; ``MAML.task_losses(tasks, mse,
   vectorize=False)`` (samgria loop) and ``vectorize=True`` (tasks adapted together with
   ``torch.func.vmap``), inside ``meta.step(closure)``; ``MetaTrainer(..., vectorize=None)
   .train_step`` (the measured default; timed after 5 warm-up meta-steps, the path it chose in
   brackets); and the compiled path, ``MetaTrainer(..., compile=True).train_step``
   (``torch.compile`` of the vectorised inner loop; full mode only, or ``--compile``).

2. **Few-shot classification**, second-order MAML, one inner SGD step (inner lr 0.01), outer Adam
   (lr 1e-3), cross-entropy, 5-way 1-shot with 15 queries per class, meta-batch 32, random
   inputs (no downloads), on three models:

   * ``conv4-bn``: the standard few-shot model, four blocks of Conv2d(64, 3x3, padding=1) -
     BatchNorm2d (train mode: batch statistics) - ReLU - MaxPool2d(2) on 1x28x28 inputs, then a
     Linear head;
   * ``conv4``: the same without BatchNorm, where vmap applies;
   * ``transformer``: ``nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=128,
     dropout=0, batch_first=True)`` over 16 random token features, mean-pooled, Linear head.

   Rows: the hand-written loop (the baseline: one backward over all tasks); the same loop with
   each task back-propagated as soon as it is adapted (``hand, per-task bwd``: the memory
   behaviour of samgria's loop path and of learn2learn's examples, so the like-for-like time
   baseline of that path); ``MetaTrainer(meta, cross_entropy, sampler, vectorize=False)
   .train_step(tasks)`` (per-task loop, each task back-propagated as soon as it is adapted);
   ``vectorize=True`` (vmap; only where it applies: vmap's second-order gradients through
   BatchNorm and LayerNorm in train mode are wrong, so the library refuses them);
   ``vectorize=None``, the measured default (its first 4 meta-steps alternate loop and vmap, then
   it keeps the faster; timed after 5 warm-up meta-steps; ``trainer.path`` is reported).

   Each row also runs in **its own fresh single-thread process** (``--memory-steps`` meta-steps,
   one process at a time), which reports: the **process peak memory**, the max RSS above the RSS
   after building the model, the tasks and the optimizer (for ``vectorize=None`` its timed trials
   of both paths included; CPU PyTorch has no allocator statistics: the peak is the process's
   ``VmHWM``, reset with ``/proc/self/clear_refs`` once everything is built, or ``ru_maxrss``
   elsewhere); and the seconds and minor page faults per meta-step after the first
   (``vectorize=None``: after its trials). The two timings differ because glibc malloc returns
   freed memory at the top of its heap to the system: a path that frees its graph task by task
   faults those pages in again for every task, unless a bigger allocation earlier in the same
   process (another row's) left the heap fragmented and kept. ``--retain-freed-memory`` asks glibc
   to keep freed memory (as jemalloc and tcmalloc do), in this process and every own process.

Everything runs single-threaded by default (``--threads``) and is then timed in CPU time of the
process (user + sys, so page faults count), which other processes' load on a shared machine
inflates less than wall time; with ``--threads`` above 1, in wall time.

Usage::

    python benchmarks/meta_throughput.py            # full (10 to 20 minutes on 2 cores)
    python benchmarks/meta_throughput.py --quick    # CI: < 60 s; meta-batch 4, 8 channels, no compile,
                                                    # own-process rows for conv4 only
    python benchmarks/meta_throughput.py --workloads conv4-bn conv4 --rounds-few-shot 5

Prints one table per workload; when matplotlib is importable writes
``benchmarks/results/meta_throughput.json`` and ``benchmarks/results/meta_throughput.png``. A run
without ``--quick`` also copies the figure to ``docs/images/meta_throughput.png`` for the docs'
benchmarks page.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samgria.data.task import Task  # noqa: E402
from samgria.meta.engine import second_order_vmap_blocker  # noqa: E402
from samgria.meta.maml import MAML  # noqa: E402
from samgria.meta.trainer import MetaTrainer  # noqa: E402
from _checks import int_at_least, number_in, require_close, require_steps_taken, zero_or_int_at_least  # noqa: E402
from _process import (  # noqa: E402
    apply_malloc_setting,
    load_average,
    minor_faults,
    peak_rss_bytes,
    progress,
    reset_peak_rss,
    rss_bytes,
)
from _docs_figures import publish_figures  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
META_BATCH, K_SUPPORT, K_QUERY, INNER_STEPS, INNER_LR, OUTER_LR = 25, 10, 10, 5, 0.01, 1e-3
WAYS, SHOTS, QUERIES = 5, 1, 15
FEW_SHOT_INNER_STEPS, FEW_SHOT_INNER_LR = 1, 0.01
SEQ_LEN, D_MODEL = 16, 32
HAND = "loop (hand-written)"
HAND_PER_TASK = "loop (hand, per-task bwd)"
mse = nn.functional.mse_loss
cross_entropy = nn.functional.cross_entropy
#: Tolerances of the meta-gradient checks, on max|meta-grad(path) - meta-grad(hand loop)| relative
#: to max|meta-grad(hand loop)|, float32. The paths run the same math in another order (vmap
#: batches the tasks, torch.compile fuses), so they differ by float32 rounding: measured <= 2e-7 on
#: the sinusoid MLP (loop 0, vmap 1.5e-7, compiled 1.8e-7), whose sizes --quick keeps. The few-shot
#: models measured <= 8e-7 at --quick sizes, but at the full sizes (64 channels, meta-batch 32)
#: vmap's convolutions round differently enough to flip a ReLU or a max-pool choice near a tie,
#: which moves a few entries by up to 1.3e-4 (the float32 hand loop itself is 3e-4 off float64
#: there): 1e-2 keeps a margin over that. A wrong meta-gradient (a factor 1.5: 0.5; NaN) fails both.
SINUSOID_GRAD_RTOL = 1e-4
FEW_SHOT_GRAD_RTOL = 1e-2


# -- the paths compared ----------------------------------------------------------------------------
class HandLoop:
    """Baseline: per-task Python loop, second order, outer Adam; one backward over all tasks."""

    def __init__(self, model: nn.Module, loss_fn: Callable = mse, inner_lr: float = INNER_LR,
                 inner_steps: int = INNER_STEPS) -> None:  # fmt: skip
        self.model, self.loss_fn, self.inner_lr, self.inner_steps = model, loss_fn, inner_lr, inner_steps
        self.opt = torch.optim.Adam(model.parameters(), lr=OUTER_LR)

    def adapted_query_loss(self, params: dict[str, torch.Tensor], task: Task) -> torch.Tensor:
        fast = dict(params)
        for _ in range(self.inner_steps):
            loss = self.loss_fn(functional_call(self.model, fast, (task.support_x,)), task.support_y)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - self.inner_lr * g for (n, p), g in zip(fast.items(), grads)}
        return self.loss_fn(functional_call(self.model, fast, (task.query_x,)), task.query_y)

    def meta_grad(self, tasks: list[Task]) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        # The fused attention kernels' backward cannot be differentiated again: math backend.
        with sdpa_kernel([SDPBackend.MATH]):
            meta_loss = torch.stack([self.adapted_query_loss(params, t) for t in tasks]).mean()
            meta_loss.backward()
        return meta_loss

    def iteration(self, tasks: list[Task]) -> None:
        self.opt.zero_grad()
        self.meta_grad(tasks)
        self.opt.step()


class HandLoopPerTask(HandLoop):
    """The hand-written loop, each task back-propagated as soon as it is adapted (as learn2learn's
    examples do, and as samgria's loop path does): one task's graph alive at a time."""

    def meta_grad(self, tasks: list[Task]) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        losses = []
        with sdpa_kernel([SDPBackend.MATH]):
            for task in tasks:
                loss = self.adapted_query_loss(params, task) / len(tasks)
                loss.backward()
                losses.append(loss.detach())
        return torch.stack(losses).sum()


class SamgriaPath:
    """``MAML.task_losses`` inside ``meta.step(closure)``; ``vectorize`` picks loop or vmap."""

    def __init__(self, model: nn.Module, vectorize: bool | None) -> None:
        self.meta = MAML(model, torch.optim.Adam, inner_lr=INNER_LR, inner_steps=INNER_STEPS, lr=OUTER_LR)
        self.vectorize = vectorize

    def meta_grad(self, tasks: list[Task]) -> torch.Tensor:
        loss = self.meta.task_losses(tasks, mse, vectorize=self.vectorize).mean()
        loss.backward()
        return loss

    def iteration(self, tasks: list[Task]) -> None:
        def closure() -> torch.Tensor:
            self.meta.zero_grad()
            return self.meta_grad(tasks)

        self.meta.step(closure)


class _NoSampler:
    """The benchmark hands tasks to ``train_step`` itself; the trainer never samples."""

    def sample(self, n: int) -> list[Task]:
        raise RuntimeError("not used")


class TrainerPath:
    """``MetaTrainer(MAML(model, outer), loss_fn, sampler, vectorize=...).train_step(tasks)``."""

    def __init__(self, model: nn.Module, loss_fn: Callable, vectorize: bool | None, inner_lr: float,
                 inner_steps: int, outer: type[torch.optim.Optimizer] = torch.optim.Adam,
                 lr: float = OUTER_LR, **maml_options: Any) -> None:  # fmt: skip
        self.meta = MAML(model, outer, lr=lr, inner_lr=inner_lr, inner_steps=inner_steps, **maml_options)
        self.trainer = MetaTrainer(self.meta, loss_fn, _NoSampler(), vectorize=vectorize)

    def iteration(self, tasks: list[Task]) -> None:
        self.trainer.train_step(tasks)

    def measured(self) -> dict[str, float]:
        """The fastest of the trainer's timed trials per path (empty when it did not measure)."""
        timings = self.meta.path_policy.timings
        trials = {path: min(t) for key in timings for path, t in timings[key].items()}
        return trials if len(trials) > 1 else {}


class CompiledPath:
    """The library's compiled path: ``MetaTrainer(meta, mse, sampler, compile=True).train_step``."""

    def __init__(self, model: nn.Module) -> None:
        self.meta = MAML(model, torch.optim.Adam, inner_lr=INNER_LR, inner_steps=INNER_STEPS, lr=OUTER_LR)
        self.trainer = MetaTrainer(self.meta, mse, _NoSampler(), compile=True)

    def prime(self, tasks: list[Task]) -> None:
        """Compile with one meta-step, then restore the weights and the outer state."""
        weights = copy.deepcopy(self.meta.model.state_dict())
        outer_state = copy.deepcopy(self.meta.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback is a failure here
            self.trainer.train_step(tasks)
        self.meta.model.load_state_dict(weights)
        self.meta.load_state_dict(outer_state)
        if self.trainer.compiled_loss is None:
            raise RuntimeError("MetaTrainer(compile=True) did not use the compiled path")

    def meta_grad(self, tasks: list[Task]) -> torch.Tensor:
        return self.trainer.compiled_loss.backward(tasks)

    def iteration(self, tasks: list[Task]) -> None:
        self.trainer.train_step(tasks)


# -- measuring ---------------------------------------------------------------------------------------
def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def trainer_meta_gradient(model: nn.Module, tasks: list[Task], loss_fn: Callable, vectorize: bool | None,
                          inner_lr: float, inner_steps: int, **maml_options: Any) -> torch.Tensor:  # fmt: skip
    """The meta-gradient a trainer's meta-step computes (outer SGD with lr 0 leaves it in ``.grad``)."""
    path = TrainerPath(model, loss_fn, vectorize, inner_lr, inner_steps, outer=torch.optim.SGD, lr=0.0, **maml_options)
    path.iteration(tasks)
    return flat_grad(model)


def auto_gradient_diff(model: nn.Module, tasks: list[Task], loss_fn: Callable, inner_lr: float,
                       inner_steps: int, reference: torch.Tensor) -> float:  # fmt: skip
    """Max |meta-grad - reference| over the first ``AUTO_TRIALS + 1`` meta-steps of
    ``MetaTrainer(vectorize=None)``: its trial steps on each path and the first on the path it keeps
    (outer SGD with lr 0: every step at the same weights); NaN when one is not finite."""
    path = TrainerPath(model, loss_fn, None, inner_lr, inner_steps, outer=torch.optim.SGD, lr=0.0)
    diffs = []
    for _ in range(AUTO_TRIALS + 1):
        path.iteration(tasks)
        diffs.append((flat_grad(model) - reference).abs().max())
    return float(torch.stack(diffs).max())  # torch's max keeps a NaN (Python's may not)


def check_steps_taken(what: str, path: Any) -> None:
    """Fail the run if the timed row ``path`` skipped a meta-step or ended with non-finite weights."""
    if isinstance(path, HandLoop):  # torch's Adam never skips
        require_steps_taken(what, 0, path.model.parameters())
    else:
        require_steps_taken(what, path.meta.skipped_steps, path.meta.model.parameters())


def clock_for(threads: int) -> tuple[Callable[[], float], str]:
    """The clock of the timings: single-threaded, this process's CPU time (user + sys, page faults
    included), which other processes' load inflates less than wall time; else wall time."""
    return (time.process_time, "CPU") if threads == 1 else (time.perf_counter, "wall")


def time_rounds(paths: dict[str, Any], pool: list[list[Task]], rounds: int, iters: int,
                clock: Callable[[], float] = time.perf_counter, budget_s: float = 0.0,
                max_rounds: int | None = None) -> dict[str, list[float]]:  # fmt: skip
    """Mean seconds per iteration of every path, per round; paths interleaved, order rotating.

    Runs ``rounds`` rounds, then more while less than ``budget_s`` wall seconds have passed (up
    to ``max_rounds``), so that cheap workloads get enough rounds for a stable median.
    """
    times: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    it, started, r = 0, time.perf_counter(), 0
    while r < rounds or (time.perf_counter() - started < budget_s and (max_rounds is None or r < max_rounds)):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = clock()
            for j in range(iters):
                paths[name].iteration(pool[(it + j) % len(pool)])
            times[name].append((clock() - start) / iters)
        it += iters
        r += 1
    return times


def time_paths(paths: dict[str, Any], pool: list[list[Task]], rounds: int, iters: int,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:  # fmt: skip
    """Median over ``rounds`` of the mean seconds per iteration; paths interleaved, order rotating."""
    return {name: statistics.median(v) for name, v in time_rounds(paths, pool, rounds, iters, clock).items()}


def paired_ratios(times: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Median over rounds of each path's time / the baseline's time in the same round (load from
    other processes during a round hits numerator and denominator alike)."""
    return {
        name: statistics.median(t / b for t, b in zip(values, times[baseline])) for name, values in times.items()
    }


def warm_up(paths: dict[str, Any], pool: list[list[Task]], steps: dict[str, int]) -> None:
    for name, path in paths.items():
        for i in range(steps.get(name, 1)):
            path.iteration(pool[i % len(pool)])








def measure_steps(step: Callable[[int], None], steps: int) -> dict[str, Any]:
    """Run ``step(i)`` ``steps`` times in a fresh single-thread process: the peak RSS above the RSS
    before the first step in MiB, and each step's CPU seconds, wall seconds and minor page faults."""
    gc.collect()
    rss0 = rss_bytes()
    peak0 = rss0 if reset_peak_rss() else peak_rss_bytes()
    cpu, wall, faults = [], [], []
    for i in range(steps):
        faults0, cpu0, wall0 = minor_faults(), time.process_time(), time.perf_counter()
        step(i)
        cpu.append(time.process_time() - cpu0)
        wall.append(time.perf_counter() - wall0)
        faults.append(minor_faults() - faults0)
    return {
        "extra_mib": (peak_rss_bytes() - peak0) / 2**20,
        "rss0_mib": rss0 / 2**20,
        "step_seconds": cpu,
        "step_wall_seconds": wall,
        "step_faults": faults,
    }


def settled(values: list[float], skip: int) -> float:
    """Median of ``values`` after the first ``skip`` (warm-up) entries."""
    return statistics.median(values[skip:] or values[-1:])



def run_children(script: Path, specs: list[dict[str, Any]], jobs: int) -> list[dict[str, Any]]:
    """Run ``script --memory-child SPEC`` in a fresh single-thread process per spec; parse its last line."""

    def run(spec: dict[str, Any]) -> dict[str, Any]:
        command = [sys.executable, str(script), "--memory-child", json.dumps(spec)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"memory child {spec} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(run, specs))


# -- 1. sinusoid MLP ---------------------------------------------------------------------------------
def sinusoid_tasks(n: int, generator: torch.Generator) -> list[Task]:
    """``n`` tasks y = A sin(x - phi), A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5]."""
    tasks = []
    for _ in range(n):
        amp = 0.1 + 4.9 * torch.rand((), generator=generator)
        phase = math.pi * torch.rand((), generator=generator)
        x = -5.0 + 10.0 * torch.rand(K_SUPPORT + K_QUERY, 1, generator=generator)
        y = amp * torch.sin(x - phase)
        tasks.append(Task(x[:K_SUPPORT], y[:K_SUPPORT], x[K_SUPPORT:], y[K_SUPPORT:]))
    return tasks


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def check_gradients(paths: dict[str, Any], tasks: list[Task], base: nn.Module) -> dict[str, float]:
    """Max |meta-grad(path) - meta-grad(hand loop)| at the shared initial weights (``base``'s); fails
    the run where it is above ``SINUSOID_GRAD_RTOL`` x max|meta-grad(hand loop)| or not finite."""
    grads = {}
    for name, path in paths.items():
        if not hasattr(path, "meta_grad"):
            continue
        model = path.model if isinstance(path, HandLoop) else path.meta.model
        for p in model.parameters():
            p.grad = None
        path.meta_grad(tasks)
        grads[name] = flat_grad(model)
        for p in model.parameters():
            p.grad = None
    ref = grads[HAND]
    diffs = {name: float((g - ref).abs().max()) for name, g in grads.items()}
    diffs["trainer vectorize=None"] = auto_gradient_diff(copy.deepcopy(base), tasks, mse, INNER_LR, INNER_STEPS, ref)
    tolerance = SINUSOID_GRAD_RTOL * float(ref.abs().max())
    for name, diff in diffs.items():
        require_close(f"sinusoid: max|meta-grad({name}) - meta-grad(hand loop)|", diff, tolerance)
    return diffs


def run_sinusoid(args: argparse.Namespace) -> dict[str, Any]:
    rounds = args.rounds or (3 if args.quick else 7)
    iters = args.iters or (3 if args.quick else 10)
    use_compile = (not args.quick) if args.compile is None else args.compile
    gen = torch.Generator().manual_seed(0)
    pool = [sinusoid_tasks(META_BATCH, gen) for _ in range(8)]
    base = make_model()
    paths: dict[str, Any] = {
        HAND: HandLoop(copy.deepcopy(base)),
        "samgria loop": SamgriaPath(copy.deepcopy(base), vectorize=False),
        "samgria vmap": SamgriaPath(copy.deepcopy(base), vectorize=True),
        "trainer vectorize=None": TrainerPath(copy.deepcopy(base), mse, None, INNER_LR, INNER_STEPS),
    }
    notes = []
    if use_compile:
        start = time.perf_counter()
        try:
            compiled = CompiledPath(copy.deepcopy(base))
            compiled.prime(pool[0])  # compile now, outside the timings
            paths["samgria compiled"] = compiled
            notes.append(f"compile time: {time.perf_counter() - start:.1f} s (one-off, not in the timings)")
        except Exception as exc:  # report honestly, keep the other numbers
            notes.append(f"compiled path failed after {time.perf_counter() - start:.1f} s: {type(exc).__name__}: {exc}")
    else:
        notes.append("compiled path skipped (--quick or --no-compile)")

    diffs = check_gradients(paths, pool[0], base)
    warm_up(paths, pool[1:], {"trainer vectorize=None": 5})  # vmap/compile caches; the trainer decides
    clock, clock_name = clock_for(args.threads)
    seconds = time_paths(paths, pool, rounds, iters, clock=clock)
    for name, path in paths.items():
        check_steps_taken(f"sinusoid: {name}", path)
    ms = {name: 1e3 * s for name, s in seconds.items()}
    chosen = paths["trainer vectorize=None"].trainer.path
    base_ms = ms[HAND]
    print(
        f"\nsinusoid MAML meta-iteration: MLP 1-40-40-1, meta-batch {META_BATCH}, K={K_SUPPORT}+{K_QUERY}, "
        f"{INNER_STEPS} inner SGD steps, second order, Adam; torch {torch.__version__}, "
        f"{args.threads} thread(s), {os.cpu_count()} CPUs, {rounds} rounds x {iters} iterations, {clock_name} time"
    )
    print(f"{'path':<32}{'ms/iter':>10}{'speed-up':>10}{'max|dgrad|':>13}")
    for name in paths:
        label = f"{name} ({chosen})" if name == "trainer vectorize=None" else name
        diff = f"{diffs[name]:>13.1e}" if name in diffs else f"{'-':>13}"
        print(f"{label:<32}{ms[name]:>10.2f}{base_ms / ms[name]:>9.1f}x{diff}")
    print("targets: vmap >= 5x the loop; compiled >= 20x")
    for note in notes:
        print(note)
    return {
        "ms_per_iteration": ms,
        "speedup_vs_hand_loop": {n: base_ms / v for n, v in ms.items()},
        "max_abs_grad_diff_vs_hand_loop": diffs,
        "grad_check_rtol": SINUSOID_GRAD_RTOL,
        "trainer_vectorize_none_path": chosen,
        "rounds": rounds,
        "iters": iters,
        "clock": clock_name,
        "notes": notes,
    }


# -- 2. few-shot classification ------------------------------------------------------------------------
def conv4(channels: int, batch_norm: bool) -> nn.Module:
    """Four Conv2d(3x3, padding 1) [- BatchNorm2d] - ReLU - MaxPool2d(2) blocks, 1x28x28 -> Linear."""
    layers: list[nn.Module] = []
    c_in = 1
    for _ in range(4):
        layers.append(nn.Conv2d(c_in, channels, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(channels))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c_in = channels
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels, WAYS))  # 28 -> 14 -> 7 -> 3 -> 1


class TinyTransformer(nn.Module):
    """One post-norm TransformerEncoderLayer (LayerNorm) over token features, mean-pooled, Linear."""

    def __init__(self, d_model: int = D_MODEL, heads: int = 4) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(d_model, WAYS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


@dataclass(frozen=True)
class Workload:
    title: str
    build: Callable[[int], nn.Module]  # channels -> model
    input_shape: tuple[int, ...]


WORKLOADS = {
    "conv4-bn": Workload("conv4 + BatchNorm (train mode)", lambda c: conv4(c, batch_norm=True), (1, 28, 28)),
    "conv4": Workload("conv4 without BatchNorm", lambda c: conv4(c, batch_norm=False), (1, 28, 28)),
    "transformer": Workload(
        f"TransformerEncoderLayer(d_model={D_MODEL}, nhead=4) + mean-pool + Linear, {SEQ_LEN} tokens",
        lambda c: TinyTransformer(),
        (SEQ_LEN, D_MODEL),
    ),
}
#: Few-shot rows: key -> (label, ``vectorize`` of the trainer); "hand" is the baseline.
KINDS = {
    "hand": (HAND, None),
    "hand_per_task": (HAND_PER_TASK, None),
    "loop": ("trainer vectorize=False", False),
    "vmap": ("trainer vectorize=True", True),
    "auto": ("trainer vectorize=None", None),
}
MAX_ROUNDS = 30  # few-shot timing rounds at most (cheap workloads stop here, within the time budget)
AUTO_TRIALS = 4  # the measured default times 2 meta-steps on each path, then keeps the faster
WARMUP = {"auto": AUTO_TRIALS + 1}  # the others warm up with one meta-step


def few_shot_task(input_shape: tuple[int, ...], generator: torch.Generator) -> Task:
    """A WAYS-way SHOTS-shot task with QUERIES queries per class; random inputs."""
    support_y = torch.arange(WAYS).repeat_interleave(SHOTS)
    query_y = torch.arange(WAYS).repeat_interleave(QUERIES)
    support_x = torch.randn(len(support_y), *input_shape, generator=generator)
    query_x = torch.randn(len(query_y), *input_shape, generator=generator)
    return Task(support_x, support_y, query_x, query_y)


@dataclass(frozen=True)
class FewShotSetup:
    """One few-shot workload at one size; rebuilt identically in every own process."""

    workload: str
    channels: int
    meta_batch: int
    pool_size: int = 3

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return WORKLOADS[self.workload].build(self.channels)

    def task_pool(self, seed: int = 0) -> list[list[Task]]:
        gen = torch.Generator().manual_seed(seed)
        shape = WORKLOADS[self.workload].input_shape
        return [[few_shot_task(shape, gen) for _ in range(self.meta_batch)] for _ in range(self.pool_size)]

    def path(self, kind: str, model: nn.Module) -> Any:
        if kind in ("hand", "hand_per_task"):
            hand = HandLoop if kind == "hand" else HandLoopPerTask
            return hand(model, cross_entropy, FEW_SHOT_INNER_LR, FEW_SHOT_INNER_STEPS)
        return TrainerPath(model, cross_entropy, KINDS[kind][1], FEW_SHOT_INNER_LR, FEW_SHOT_INNER_STEPS)

    def kinds(self) -> tuple[list[str], str | None]:
        """The rows that apply, and why vmap does not (or ``None``)."""
        blocker = second_order_vmap_blocker(self.model())
        kinds = ["hand", "hand_per_task", "loop", "vmap", "auto"]
        return ([kind for kind in kinds if kind != "vmap"] if blocker else kinds), blocker


def few_shot_gradient_diffs(setup: FewShotSetup, kinds: list[str], tasks: list[Task]) -> dict[str, float]:
    """Max |meta-grad - hand loop's| of every row at the initial weights (``vectorize=None``: over its
    trials and first kept step); fails the run where it is above ``FEW_SHOT_GRAD_RTOL`` x
    max|meta-grad(hand loop)| or not finite."""
    hand = HandLoop(setup.model(), cross_entropy, FEW_SHOT_INNER_LR, FEW_SHOT_INNER_STEPS)
    hand.meta_grad(tasks)
    ref = flat_grad(hand.model)
    diffs = {"hand": 0.0}
    if "hand_per_task" in kinds:
        per_task = HandLoopPerTask(setup.model(), cross_entropy, FEW_SHOT_INNER_LR, FEW_SHOT_INNER_STEPS)
        per_task.meta_grad(tasks)
        diffs["hand_per_task"] = float((flat_grad(per_task.model) - ref).abs().max())
    for kind in kinds:
        if kind in ("loop", "vmap"):
            grad = trainer_meta_gradient(
                setup.model(), tasks, cross_entropy, KINDS[kind][1], FEW_SHOT_INNER_LR, FEW_SHOT_INNER_STEPS
            )
            diffs[kind] = float((grad - ref).abs().max())
    if "auto" in kinds:
        diffs["auto"] = auto_gradient_diff(
            setup.model(), tasks, cross_entropy, FEW_SHOT_INNER_LR, FEW_SHOT_INNER_STEPS, ref
        )
    tolerance = FEW_SHOT_GRAD_RTOL * float(ref.abs().max())
    for kind, diff in diffs.items():
        require_close(f"{setup.workload}: max|meta-grad({KINDS[kind][0]}) - meta-grad(hand loop)|", diff, tolerance)
    return diffs


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: peak RSS, seconds and page faults of ``spec["steps"]`` meta-steps of one row."""
    torch.set_num_threads(1)
    apply_malloc_setting(spec["retain_freed_memory"])
    setup = FewShotSetup(spec["workload"], spec["channels"], spec["meta_batch"])
    pool = setup.task_pool()
    path = setup.path(spec["kind"], setup.model())
    result = measure_steps(lambda i: path.iteration(pool[i % len(pool)]), spec["steps"])
    check_steps_taken(f"{spec['workload']}: {KINDS[spec['kind']][0]} (own process)", path)
    if spec["kind"] == "auto":
        result["path"] = path.trainer.path
    return result


def few_shot_memory(setup: FewShotSetup, kinds: list[str], steps: int, jobs: int,
                    retain: bool) -> dict[str, dict[str, Any]]:  # fmt: skip
    """One fresh process per row: peak MiB, and seconds and page faults per settled meta-step."""
    specs = [{**asdict(setup), "kind": kind, "steps": steps, "retain_freed_memory": retain} for kind in kinds]
    for spec in specs:
        del spec["pool_size"]
    rows = dict(zip(kinds, run_children(Path(__file__).resolve(), specs, jobs)))
    for kind, row in rows.items():
        skip = AUTO_TRIALS if kind == "auto" else 1  # the first step allocates Adam's state
        row["seconds"] = settled(row["step_seconds"], skip)
        row["faults"] = settled(row["step_faults"], skip)
    return rows


def run_few_shot(setup: FewShotSetup, rounds: int, budget_s: float, memory_steps: int, jobs: int, retain: bool,
                 clock: Callable[[], float]) -> dict[str, Any]:  # fmt: skip
    kinds, blocker = setup.kinds()
    pool = setup.task_pool()
    progress(f"{setup.workload}: gradient check")
    diffs = few_shot_gradient_diffs(setup, kinds, pool[0])
    paths = {kind: setup.path(kind, setup.model()) for kind in kinds}
    progress(f"{setup.workload}: warm-up")
    warm_up(paths, pool[1:], WARMUP)
    progress(f"{setup.workload}: timing at least {rounds} rounds, up to {budget_s:.0f} s")
    per_round = time_rounds(paths, pool, rounds, iters=1, clock=clock, budget_s=budget_s, max_rounds=MAX_ROUNDS)
    for kind, path in paths.items():
        check_steps_taken(f"{setup.workload}: {KINDS[kind][0]}", path)
    seconds = {kind: statistics.median(values) for kind, values in per_round.items()}
    rounds = len(per_round["hand"])
    auto: TrainerPath = paths["auto"]
    memory = {}
    if memory_steps > 0:
        progress(f"{setup.workload}: own processes, {len(kinds)}")
        memory = few_shot_memory(setup, kinds, memory_steps, jobs, retain)
    own = {k: m["seconds"] for k, m in memory.items()}
    return {
        "setup": asdict(setup),
        "title": WORKLOADS[setup.workload].title,
        "vmap_blocker": blocker,
        "seconds": seconds,
        "time_ratio": paired_ratios(per_round, "hand"),
        "seconds_per_round": per_round,
        "max_abs_grad_diff_vs_hand_loop": diffs,
        "grad_check_rtol": FEW_SHOT_GRAD_RTOL,
        "memory": memory,
        "memory_ratio": {k: m["extra_mib"] / max(memory["hand"]["extra_mib"], 1e-9) for k, m in memory.items()},
        "own_process_time_ratio": {k: s / own["hand"] for k, s in own.items()},
        "auto_path": auto.trainer.path,
        "auto_trials_s": auto.measured(),
        "auto_steps": WARMUP["auto"] + rounds,
        "rounds": rounds,
        "memory_steps": memory_steps,
    }


def print_few_shot(result: dict[str, Any], threads: int, clock_name: str) -> None:
    setup = result["setup"]
    width = f" ({setup['channels']} channels)" if setup["workload"].startswith("conv4") else ""
    print(
        f"\n{setup['workload']}: {result['title']}{width}; second-order MAML, {WAYS}-way {SHOTS}-shot, "
        f"{QUERIES} queries/class, meta-batch {setup['meta_batch']}, {FEW_SHOT_INNER_STEPS} inner step, "
        f"cross-entropy, Adam; {threads} thread(s)"
    )
    print(
        f"{'':<32}{' one process ':-^16}{' own process per row ':-^42}\n"
        f"{'path':<32}{'s/iter':>9}{'ratio':>7}{'s/iter':>10}{'ratio':>7}{'faults':>9}{'peak MiB':>9}"
        f"{'ratio':>7}{'max|dgrad|':>12}"
    )
    memory, diffs = result["memory"], result["max_abs_grad_diff_vs_hand_loop"]
    for kind, (label, _) in KINDS.items():
        if kind == "auto":
            label = f"{label} -> {result['auto_path']}"
        if kind not in result["seconds"]:
            print(f"{label:<32}{'n/a':>9}   (second order through {result['vmap_blocker']}: wrong under vmap)")
            continue
        if memory:
            m = memory[kind]
            own = (
                f"{m['seconds']:>10.3f}{result['own_process_time_ratio'][kind]:>7.2f}{m['faults'] / 1e3:>8.0f}k"
                f"{m['extra_mib']:>9.0f}{result['memory_ratio'][kind]:>7.2f}"
            )
        else:
            own = f"{'-':>10}{'-':>7}{'-':>9}{'-':>9}{'-':>7}"
        diff = f"{diffs[kind]:>12.1e}" if kind in diffs else f"{'-':>12}"
        print(f"{label:<32}{result['seconds'][kind]:>9.3f}{result['time_ratio'][kind]:>7.2f}{own}{diff}")
    trials = result["auto_trials_s"]
    if trials:
        measured = ", ".join(f"{p} {s:.3f} s" for p, s in sorted(trials.items()))
        print(f"vectorize=None measured (fastest trial per path): {measured}; chose {result['auto_path']}")
    else:
        print(f"vectorize=None did not measure (only the loop applies); path after {result['auto_steps']} meta-steps: "
              f"{result['auto_path']}")  # fmt: skip
    print(
        f"one process: all rows interleaved in this process, {clock_name} seconds, median of {result['rounds']} "
        f"rounds; ratio: median over rounds of the row's time / the hand loop's in the same round"
    )
    if memory:
        trials_note = f", {AUTO_TRIALS} trial steps of both paths included in its peak" if trials else ""
        print(
            f"own process: a fresh single-thread process per row, {result['memory_steps']} meta-steps; s/iter (CPU "
            f"seconds) and minor page faults per meta-step: median after the first step (vectorize=None: after its "
            f"trials); "
            f"peak MiB: max RSS above the RSS after building model, tasks and optimizer "
            f"(vectorize=None there ended on {memory['auto'].get('path')}{trials_note})"
        )
    else:
        print("own process: not measured (--quick measures it for conv4 only; --memory-steps N forces it)")


# -- output ------------------------------------------------------------------------------------------
def write_results(results: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot or results written")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "meta_throughput.json").write_text(json.dumps(results, indent=2))
    # (title, ms per path, ratio per path): the sinusoid's ratio of medians, the few-shot rows'
    # paired ratios (the median of per-round ratios, as the printed tables)
    sinusoid = results.get("sinusoid")
    panels = (
        [("sinusoid", sinusoid["ms_per_iteration"],
          {n: v / sinusoid["ms_per_iteration"][HAND] for n, v in sinusoid["ms_per_iteration"].items()})]
        if sinusoid else []
    ) + [
        (name, {KINDS[k][0]: s * 1e3 for k, s in r["seconds"].items()},
         {KINDS[k][0]: v for k, v in r["time_ratio"].items()})
        for name, r in results["few_shot"].items()
    ]  # fmt: skip
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), squeeze=False)
    for ax, (title, ms, ratios) in zip(axes[:, 0], panels):
        names = list(ms)
        ax.barh(names, [ms[n] for n in names], color="tab:blue")
        for i, n in enumerate(names):
            ratio = ratios[n]
            speedup = f" ({1 / ratio:.1f}x faster)" if ratio < 0.5 else ""
            ax.text(ms[n], i, f" {ratio:.2f}x{speedup}", va="center")
        ax.set_xlim(0, 1.3 * max(ms.values()))
        ax.set_title(f"{title}: ms per meta-iteration (x hand loop)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(RESULTS / "meta_throughput.png", dpi=110)
    print(f"\nwrote {RESULTS / 'meta_throughput.json'} and {RESULTS / 'meta_throughput.png'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI, < 60 s: small sizes, few iterations, no compile")
    parser.add_argument("--workloads", nargs="+", default=["sinusoid", *WORKLOADS],
                        choices=["sinusoid", *WORKLOADS], help="what to run (default: all)")  # fmt: skip
    parser.add_argument("--rounds", type=int_at_least(1), default=None,
                        help="sinusoid timing rounds (default 3 quick / 7 full)")  # fmt: skip
    parser.add_argument("--iters", type=int_at_least(1), default=None,
                        help="sinusoid iterations per path per round (3 / 10)")  # fmt: skip
    parser.add_argument("--compile", dest="compile", action="store_true", default=None, help="time the compiled path")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled path")
    parser.add_argument("--rounds-few-shot", type=int_at_least(1), default=None,
                        help="few-shot rounds of 1 iteration, at least (1 / 3)")  # fmt: skip
    parser.add_argument("--seconds-few-shot", type=number_in(0.0), default=None,
                        help="few-shot: more rounds while under this many seconds per workload (0 quick / 60)")
    parser.add_argument("--meta-batch", type=int_at_least(1), default=None, help="few-shot meta-batch (default 4 quick / 32)")
    parser.add_argument("--channels", type=int_at_least(1), default=None, help="conv4 width (default 8 quick / 64)")
    # At least one meta-step after vectorize=None's trials: its row reports the steps after them.
    parser.add_argument("--memory-steps", type=zero_or_int_at_least(AUTO_TRIALS + 1), default=None,
                        help=f"meta-steps per own-process row (default 6: the measured default's {AUTO_TRIALS} "
                             f"trials and 2 more; 0 skips those columns, else at least {AUTO_TRIALS + 1})")  # fmt: skip
    parser.add_argument("--jobs", type=int_at_least(1), default=None, help="own-process rows run at a time (2 quick / 1)")
    parser.add_argument("--threads", type=int_at_least(1), default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="ask glibc malloc to keep freed memory (no trimming), here and in every own process")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    torch.set_num_threads(args.threads)
    start, load_before = time.perf_counter(), load_average()
    retained = apply_malloc_setting(args.retain_freed_memory)
    clock, clock_name = clock_for(args.threads)
    results: dict[str, Any] = {
        "torch": torch.__version__, "threads": args.threads, "clock": clock_name,
        "retain_freed_memory": retained, "few_shot": {},
    }  # fmt: skip
    if "sinusoid" in args.workloads:
        results["sinusoid"] = run_sinusoid(args)
    rounds = args.rounds_few_shot or (1 if args.quick else 3)
    budget_s = args.seconds_few_shot if args.seconds_few_shot is not None else (0.0 if args.quick else 60.0)
    memory_steps = 6 if args.memory_steps is None else args.memory_steps
    jobs = args.jobs or (2 if args.quick else 1)
    for name in (w for w in args.workloads if w in WORKLOADS):
        setup = FewShotSetup(
            name, args.channels or (8 if args.quick else 64), args.meta_batch or (4 if args.quick else 32)
        )
        # --quick: own processes (a few seconds each to start) only for conv4, which has every kind of row.
        steps = 0 if args.quick and args.memory_steps is None and name != "conv4" else memory_steps
        results["few_shot"][name] = run_few_shot(
            setup, rounds, budget_s, steps, jobs, args.retain_freed_memory, clock
        )
        print_few_shot(results["few_shot"][name], args.threads, clock_name)
    results["load_average"] = [load_before, load_average()]
    malloc = "glibc malloc keeping freed memory" if retained else "default malloc settings"
    print(f"\ntotal run time {time.perf_counter() - start:.0f} s; 1-minute load average at start and end: "
          f"{load_before:.2f}, {results['load_average'][1]:.2f} on {os.cpu_count()} CPUs; {malloc}")  # fmt: skip
    write_results(results)
    full = not args.quick and set(args.workloads) == {"sinusoid", *WORKLOADS}
    if full:  # every workload
        publish_figures({RESULTS / "meta_throughput.png": "meta_throughput.png"})


if __name__ == "__main__":
    main()
