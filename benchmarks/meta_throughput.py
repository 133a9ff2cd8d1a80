"""Meta-iteration throughput: per-task Python loop vs ``vmap`` vs ``torch.compile``.

The workload is one sinusoid MAML meta-iteration as in Finn et al. (2017): an MLP 1-40-40-1
with ReLU, a meta-batch of 25 tasks with K=10 support and 10 query points, 5 inner SGD steps
(inner lr 0.01), second order, outer Adam (lr 1e-3). Every path runs exactly this math on its
own copy of the same initial model:

* ``loop (hand-written)`` -- the baseline: a per-task Python loop with
  ``torch.autograd.grad(create_graph=True)`` and ``torch.func.functional_call``, as published
  meta-learning libraries do it;
* ``samgria loop`` -- ``MAML.task_losses(tasks, mse, vectorize=False)``;
* ``samgria vmap`` -- ``MAML.task_losses(tasks, mse)`` (tasks adapted together with
  ``torch.func.vmap``);
* ``samgria compiled`` -- the library's compiled path, ``MetaTrainer(..., compile=True)
  .meta_step(tasks)``: a :class:`samgria.meta.compiled.CompiledMetaLoss`
  (``torch.compile(torch.func.grad_and_value(...))`` of the vectorised inner loop
  :func:`samgria.meta.vectorize.batched_task_losses`) inside ``meta.step(closure)`` of the same
  ``MAML`` optimizer (full mode only, or ``--compile``).

Timings are interleaved over rounds (each round times every path in turn) and the median per
path is reported, with speed-ups relative to the hand-written loop measured in the same run.
Before timing, every path's meta-gradient at the shared initial weights is compared with the
hand-written loop's.

Usage::

    python benchmarks/meta_throughput.py            # full: more iterations + compiled path
    python benchmarks/meta_throughput.py --quick    # CI: < 60 s, no compile
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samgria.data.task import Task  # noqa: E402
from samgria.meta.maml import MAML  # noqa: E402
from samgria.meta.trainer import MetaTrainer  # noqa: E402

META_BATCH, K_SUPPORT, K_QUERY, INNER_STEPS, INNER_LR, OUTER_LR = 25, 10, 10, 5, 0.01, 1e-3
mse = nn.functional.mse_loss


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


class HandLoop:
    """Baseline: per-task Python loop, second order, outer Adam."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=OUTER_LR)

    def meta_grad(self, tasks: list[Task]) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        losses = []
        for t in tasks:
            fast = dict(params)
            for _ in range(INNER_STEPS):
                loss = mse(functional_call(self.model, fast, (t.support_x,)), t.support_y)
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {n: p - INNER_LR * g for (n, p), g in zip(fast.items(), grads)}
            losses.append(mse(functional_call(self.model, fast, (t.query_x,)), t.query_y))
        meta_loss = torch.stack(losses).mean()
        meta_loss.backward()
        return meta_loss

    def iteration(self, tasks: list[Task]) -> None:
        self.opt.zero_grad()
        self.meta_grad(tasks)
        self.opt.step()


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
    """The benchmark hands tasks to ``meta_step`` itself; the trainer never samples."""

    def sample(self, n: int) -> list[Task]:
        raise RuntimeError("not used")


class CompiledPath:
    """The library's compiled path: ``MetaTrainer(meta, mse, sampler, compile=True).meta_step``."""

    def __init__(self, model: nn.Module) -> None:
        self.meta = MAML(model, torch.optim.Adam, inner_lr=INNER_LR, inner_steps=INNER_STEPS, lr=OUTER_LR)
        self.trainer = MetaTrainer(self.meta, mse, _NoSampler(), compile=True)

    def prime(self, tasks: list[Task]) -> None:
        """Compile with one meta-step, then restore the weights and the outer state."""
        weights = copy.deepcopy(self.meta.model.state_dict())
        outer_state = copy.deepcopy(self.meta.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback is a failure here
            self.trainer.meta_step(tasks)
        self.meta.model.load_state_dict(weights)
        self.meta.load_state_dict(outer_state)
        if self.trainer.compiled_loss is None:
            raise RuntimeError("MetaTrainer(compile=True) did not use the compiled path")

    def meta_grad(self, tasks: list[Task]) -> torch.Tensor:
        return self.trainer.compiled_loss.backward(tasks)

    def iteration(self, tasks: list[Task]) -> None:
        self.trainer.meta_step(tasks)


def check_gradients(paths: dict[str, object], tasks: list[Task]) -> dict[str, float]:
    """Max |meta-grad(path) - meta-grad(hand loop)| at the shared initial weights."""
    grads = {}
    for name, path in paths.items():
        model = path.model if isinstance(path, HandLoop) else path.meta.model
        for p in model.parameters():
            p.grad = None
        path.meta_grad(tasks)
        grads[name] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        for p in model.parameters():
            p.grad = None
    ref = grads["loop (hand-written)"]
    return {name: float((g - ref).abs().max()) for name, g in grads.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few iterations, no compile (CI, < 60 s)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3 quick / 7 full)")
    parser.add_argument("--iters", type=int, default=None, help="iterations per path per round (default 3 / 10)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None, help="time the compiled path")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled path")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: tiny ops)")
    parser.add_argument("--output", default="benchmarks/results", help="folder for results and plot")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    iters = args.iters or (3 if args.quick else 10)
    use_compile = (not args.quick) if args.compile is None else args.compile
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    pool = [sinusoid_tasks(META_BATCH, gen) for _ in range(8)]
    base = make_model()
    paths: dict[str, object] = {
        "loop (hand-written)": HandLoop(copy.deepcopy(base)),
        "samgria loop": SamgriaPath(copy.deepcopy(base), vectorize=False),
        "samgria vmap": SamgriaPath(copy.deepcopy(base), vectorize=True),
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

    diffs = check_gradients(paths, pool[0])

    for path in paths.values():  # warm-up (vmap and compile caches, allocator)
        path.iteration(pool[1])
    times: dict[str, list[float]] = {name: [] for name in paths}
    it = 0
    for _ in range(rounds):
        for name, path in paths.items():
            start = time.perf_counter()
            for j in range(iters):
                path.iteration(pool[(it + j) % len(pool)])
            times[name].append((time.perf_counter() - start) / iters * 1e3)
        it += iters

    ms = {name: statistics.median(v) for name, v in times.items()}
    base_ms = ms["loop (hand-written)"]
    print(
        f"\nsinusoid MAML meta-iteration: MLP 1-40-40-1, meta-batch {META_BATCH}, K={K_SUPPORT}+{K_QUERY}, "
        f"{INNER_STEPS} inner SGD steps, second order, Adam; torch {torch.__version__}, "
        f"{args.threads} thread(s), {os.cpu_count()} CPUs, {rounds} rounds x {iters} iterations"
    )
    print(f"{'path':<22}{'ms/iter':>10}{'speed-up':>10}{'max|dgrad|':>13}")
    for name in paths:
        print(f"{name:<22}{ms[name]:>10.2f}{base_ms / ms[name]:>9.1f}x{diffs[name]:>13.1e}")
    print("targets: vmap >= 5x the loop; compiled >= 20x")
    for note in notes:
        print(note)

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "ms_per_iteration": ms,
        "speedup_vs_hand_loop": {n: base_ms / v for n, v in ms.items()},
        "max_abs_grad_diff_vs_hand_loop": diffs,
        "rounds": rounds,
        "iters": iters,
        "threads": args.threads,
        "torch": torch.__version__,
        "notes": notes,
    }
    (out / "meta_throughput.json").write_text(json.dumps(result, indent=2))
    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(ms)
    ax.barh(names, [ms[n] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(ms[n], i, f" {base_ms / ms[n]:.1f}x", va="center")
    ax.set_xlabel("ms per meta-iteration (lower is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "meta_throughput.png", dpi=120)
    print(f"wrote {out / 'meta_throughput.json'} and {out / 'meta_throughput.png'}")


if __name__ == "__main__":
    main()
