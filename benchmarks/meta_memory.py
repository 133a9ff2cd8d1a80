"""Memory and time of second-order MAML against the number of inner steps, with and without
checkpointing the inner steps (``MAML(..., checkpoint_inner_steps=True)``).

Workload: the few-shot conv4 model of ``meta_throughput.py`` (four Conv2d(3x3) - BatchNorm2d in
train mode - ReLU - MaxPool2d(2) blocks on 1x28x28 inputs, Linear head), 5-way 1-shot with 15
queries per class, random inputs, cross-entropy, second-order MAML with inner SGD (lr 0.01) and
outer Adam (lr 1e-3), meta-batch 4 (on the loop path memory does not grow with it), 64 channels
(``--channels``). For each ``inner_steps`` in 1, 5, 20, 50, two meta-optimizers on copies of the
same initial model, each driven by ``MetaTrainer(meta, cross_entropy, sampler,
vectorize=False).train_step(tasks)`` (the loop path: the only one that can checkpoint, and the one
the measured default takes with BatchNorm anyway), one plain and one with
``checkpoint_inner_steps=True``:

* **memory**: process peak (max RSS above the RSS after building model, tasks and optimizer),
  over ``--memory-steps`` meta-steps, in a fresh single-thread process per cell; absolute MiB
  and checkpointed/plain. Then, in the same process, the live-tensor peak of one more meta-step
  (bytes of the tensors allocated during it, tracked with ``sam_overhead.LiveBytes``): what
  checkpointing changes, without the allocator's heap layout. The same processes report their
  seconds and minor page faults per meta-step after the first (glibc malloc gives freed memory
  back and faults it in again, which costs time on its own; ``--retain-freed-memory`` asks it to
  keep freed memory);
* **time**: seconds per meta-iteration, plain and checkpointed timed interleaved in this process
  (median over rounds), and the own-process time ratio above; checkpointed/plain. Single-threaded
  (the default), both are CPU seconds of the process (user + sys, so page faults count), which
  other processes' load inflates less than wall time;
* **meta-gradient check**: max |meta-grad(checkpointed) - meta-grad(plain)| at the same initial
  weights on the same tasks (they should be identical: the checkpoint recomputes the same math);
  any difference, or a non-finite one, fails the run, as does a timed or own-process cell that
  skipped a meta-step (a non-finite update) or ended with non-finite weights.

Usage::

    python benchmarks/meta_memory.py            # full: inner steps 1 5 20 50 (about 5 minutes)
    python benchmarks/meta_memory.py --quick    # CI, < 60 s: inner steps 1 3, 4 channels
    python benchmarks/meta_memory.py --channels 32 --inner-steps 1 5 20 50 100

Prints a table; when matplotlib is importable writes ``benchmarks/results/meta_memory.json`` and
``benchmarks/results/meta_memory.png``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _checks import int_at_least, require_close, zero_or_int_at_least  # noqa: E402
from _docs_figures import publish_figures  # noqa: E402
from _process import apply_malloc_setting, load_average, progress  # noqa: E402
from meta_throughput import (  # noqa: E402
    FEW_SHOT_INNER_LR,
    QUERIES,
    RESULTS,
    SHOTS,
    WAYS,
    TrainerPath,
    check_steps_taken,
    clock_for,
    conv4,
    cross_entropy,
    few_shot_task,
    measure_steps,
    run_children,
    settled,
    time_paths,
    trainer_meta_gradient,
    warm_up,
)
from samgria.data.task import Task  # noqa: E402

VARIANTS = {"plain": False, "checkpointed": True}
#: Tolerance of the meta-gradient check: none. The checkpoint recomputes each inner step with the
#: same kernels on the same inputs, so the meta-gradients are bit-identical: measured 0.0 at
#: --quick sizes and at 64 channels for 1, 5, 20 and 50 inner steps (1 thread; 1, 5, 20 on 2).
GRAD_TOLERANCE = 0.0


@dataclass(frozen=True)
class Point:
    """One measurement point; rebuilt identically in every own process."""

    channels: int
    meta_batch: int
    inner_steps: int

    def model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return conv4(self.channels, batch_norm=True)

    def task_pool(self, size: int = 2, seed: int = 0) -> list[list[Task]]:
        gen = torch.Generator().manual_seed(seed)
        return [[few_shot_task((1, 28, 28), gen) for _ in range(self.meta_batch)] for _ in range(size)]

    def path(self, variant: str, model: torch.nn.Module) -> TrainerPath:
        return TrainerPath(
            model, cross_entropy, False, FEW_SHOT_INNER_LR, self.inner_steps,
            checkpoint_inner_steps=VARIANTS[variant],
        )  # fmt: skip


def gradient_difference(point: Point, tasks: list[Task]) -> float:
    """Max |meta-grad(checkpointed) - meta-grad(plain)| at the same weights and tasks."""
    grads = [
        trainer_meta_gradient(
            point.model(), tasks, cross_entropy, False, FEW_SHOT_INNER_LR, point.inner_steps,
            checkpoint_inner_steps=checkpoint,
        )  # fmt: skip
        for checkpoint in VARIANTS.values()
    ]
    difference = float((grads[1] - grads[0]).abs().max())
    require_close(f"inner_steps={point.inner_steps}: max|meta-grad(checkpointed) - meta-grad(plain)|", difference,
                  GRAD_TOLERANCE)  # fmt: skip
    return difference


def time_point(point: Point, rounds: int, clock: Callable[[], float]) -> dict[str, float]:
    """Seconds per meta-iteration of both variants, interleaved, after one warm-up step each."""
    pool = point.task_pool()
    base = point.model()
    paths = {variant: point.path(variant, copy.deepcopy(base)) for variant in VARIANTS}
    warm_up(paths, pool, {})
    seconds = time_paths(paths, pool, rounds, iters=1, clock=clock)
    for variant, path in paths.items():
        check_steps_taken(f"inner_steps={point.inner_steps}: {variant}", path)
    return seconds


def live_peak_mib(step: Callable[[], None]) -> float:
    """Peak bytes of tensors allocated during ``step()`` (``sam_overhead.LiveBytes``), in MiB."""
    from sam_overhead import LiveBytes

    gc.collect()
    with LiveBytes() as tracker:
        step()
        gc.collect()
    return tracker.peak / 2**20


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: peak RSS, seconds and page faults of ``spec["steps"]`` meta-steps of one
    variant, then the live-tensor peak of one more meta-step."""
    torch.set_num_threads(1)
    apply_malloc_setting(spec["retain_freed_memory"])
    point = Point(spec["channels"], spec["meta_batch"], spec["inner_steps"])
    pool = point.task_pool()
    path = point.path(spec["variant"], point.model())
    result = measure_steps(lambda i: path.iteration(pool[i % len(pool)]), spec["steps"])
    result["live_mib"] = live_peak_mib(lambda: path.iteration(pool[0]))
    check_steps_taken(f"inner_steps={point.inner_steps}: {spec['variant']} (own process)", path)
    return result


def measure_own_processes(points: list[Point], steps: int, jobs: int,
                          retain: bool) -> dict[tuple[int, str], dict[str, float]]:  # fmt: skip
    """``{(inner_steps, variant): {"extra_mib", "live_mib", "seconds", "faults"}}``, a fresh process per cell."""
    specs = [
        {**asdict(p), "variant": v, "steps": steps, "retain_freed_memory": retain} for p in points for v in VARIANTS
    ]
    results = run_children(Path(__file__).resolve(), specs, jobs)
    return {
        (s["inner_steps"], s["variant"]): {
            "extra_mib": r["extra_mib"],
            "live_mib": r["live_mib"],
            "seconds": settled(r["step_seconds"], 1),  # the first step allocates Adam's state
            "faults": settled(r["step_faults"], 1),
        }
        for s, r in zip(specs, results)
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    channels = args.channels or (4 if args.quick else 64)
    steps_list = args.inner_steps or ([1, 3] if args.quick else [1, 5, 20, 50])
    rounds = args.rounds or (1 if args.quick else 3)
    points = [Point(channels, args.meta_batch, k) for k in steps_list]
    rows = {}
    for point in points:
        diff = gradient_difference(point, point.task_pool()[0])
        seconds = time_point(point, rounds, clock_for(args.threads)[0])
        rows[point.inner_steps] = {"seconds": seconds, "max_abs_grad_diff": diff}
        progress(f"inner_steps={point.inner_steps}: timed ({seconds['plain']:.2f} s plain)")
    progress(f"memory, {2 * len(points)} processes")
    jobs = args.jobs or (2 if args.quick else 1)
    own = measure_own_processes(points, args.memory_steps, jobs, args.retain_freed_memory) if args.memory_steps else {}
    for k, row in rows.items():
        row["time_ratio"] = row["seconds"]["checkpointed"] / row["seconds"]["plain"]
        if own:
            row["own_process"] = {v: own[(k, v)] for v in VARIANTS}
            row["memory_ratio"] = own[(k, "checkpointed")]["extra_mib"] / max(own[(k, "plain")]["extra_mib"], 1e-9)
            row["live_ratio"] = own[(k, "checkpointed")]["live_mib"] / max(own[(k, "plain")]["live_mib"], 1e-9)
            row["own_process_time_ratio"] = own[(k, "checkpointed")]["seconds"] / own[(k, "plain")]["seconds"]
    return {
        "channels": channels,
        "meta_batch": args.meta_batch,
        "rounds": rounds,
        "memory_steps": args.memory_steps,
        "threads": args.threads,
        "torch": torch.__version__,
        "rows": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    reduced = ", reduced from 64" if result["channels"] < 64 else ""
    print(
        f"\nsecond-order MAML, conv4 + BatchNorm ({result['channels']} channels{reduced}), {WAYS}-way {SHOTS}-shot, "
        f"{QUERIES} queries/class, meta-batch {result['meta_batch']}, MetaTrainer(vectorize=False); "
        f"torch {result['torch']}, {result['threads']} thread(s), {os.cpu_count()} CPUs"
    )
    print(
        f"{'':>5} {' own process per cell ':-^75} {' one process ':-^24}\n"
        f"{'inner':>5} {'plain MiB':>10} {'ckpt MiB':>9} {'ratio':>6} {'live MiB':>13} {'ratio':>6} "
        f"{'faults':>13} {'time ratio':>10} {'plain s':>8} {'ckpt s':>8} {'ratio':>6} {'max|dgrad|':>11}"
    )
    for k, row in result["rows"].items():
        if "own_process" in row:
            plain, ckpt = row["own_process"]["plain"], row["own_process"]["checkpointed"]
            live = f"{plain['live_mib']:.0f}/{ckpt['live_mib']:.0f}"
            faults = f"{plain['faults'] / 1e3:.0f}k/{ckpt['faults'] / 1e3:.0f}k"
            cells = (
                f"{plain['extra_mib']:>10.0f} {ckpt['extra_mib']:>9.0f} {row['memory_ratio']:>6.2f} "
                f"{live:>13} {row['live_ratio']:>6.2f} {faults:>13} {row['own_process_time_ratio']:>10.2f}"
            )
        else:
            cells = f"{'-':>10} {'-':>9} {'-':>6} {'-':>13} {'-':>6} {'-':>13} {'-':>10}"
        s = row["seconds"]
        print(
            f"{k:>5} {cells} {s['plain']:>8.3f} {s['checkpointed']:>8.3f} {row['time_ratio']:>6.2f} "
            f"{row['max_abs_grad_diff']:>11.1e}"
        )
    print(
        f"own process: a fresh single-thread process per cell running {result['memory_steps']} meta-steps; MiB: "
        f"process peak (max RSS) above the RSS after building model, tasks and optimizer; live MiB: peak bytes of "
        f"tensors allocated during one more meta-step (plain/checkpointed); faults: minor page faults per "
        f"meta-step (plain/checkpointed) and CPU-time ratio, after the first step. One process: plain and "
        f"checkpointed interleaved here, {clock_for(result['threads'])[1]} seconds per meta-iteration, median of "
        f"{result['rounds']} rounds. Ratios: checkpointed / plain."
    )


def write_results(result: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot or results written")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "meta_memory.json").write_text(json.dumps(result, indent=2))
    steps = list(result["rows"])
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    for variant in VARIANTS:
        if all("own_process" in result["rows"][k] for k in steps):
            mib = [result["rows"][k]["own_process"][variant]["extra_mib"] for k in steps]
            mem_ax.plot(steps, mib, "o-", label=variant)
        time_ax.plot(steps, [result["rows"][k]["seconds"][variant] for k in steps], "o-", label=variant)
    mem_ax.set(xlabel="inner steps", ylabel="extra peak RSS (MiB)", title="process peak memory")
    time_ax.set(xlabel="inner steps", ylabel="s / meta-iteration", title="time")
    mem_ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "meta_memory.png", dpi=110)
    print(f"\nwrote {RESULTS / 'meta_memory.json'} and {RESULTS / 'meta_memory.png'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI, < 60 s: inner steps 1 3, 4 channels")
    parser.add_argument("--inner-steps", type=int_at_least(1), nargs="+", default=None,
                        help="default 1 5 20 50 (quick: 1 3)")  # fmt: skip
    parser.add_argument("--channels", type=int_at_least(1), default=None, help="conv4 width (default 64; quick 4)")
    parser.add_argument("--meta-batch", type=int_at_least(1), default=4, help="tasks per meta-batch (default 4)")
    parser.add_argument("--rounds", type=int_at_least(1), default=None,
                        help="timing rounds of one iteration (default 3; quick 1)")  # fmt: skip
    # At least 2: the time and faults are of the steps after the first (which allocates Adam's state).
    parser.add_argument("--memory-steps", type=zero_or_int_at_least(2), default=3,
                        help="meta-steps per own process (default 3; 0: none, else at least 2)")  # fmt: skip
    parser.add_argument("--jobs", type=int_at_least(1), default=None, help="own processes run at a time (2 quick / 1)")
    parser.add_argument("--threads", type=int_at_least(1), default=1,
                        help="torch intra-op threads for the timings (default 1)")  # fmt: skip
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
    result = run(args)
    result["retain_freed_memory"] = retained
    result["load_average"] = [load_before, load_average()]
    print_table(result)
    print(
        f"total run time {time.perf_counter() - start:.0f} s; 1-minute load average at start and end: "
        f"{load_before:.2f}, {result['load_average'][1]:.2f} on {os.cpu_count()} CPUs; "
        + ("glibc malloc keeping freed memory" if retained else "default malloc settings")
    )
    write_results(result)
    # Only the documented full run refreshes the docs' figure: not a quick or partial one, nor one
    # with other settings (the page's numbers come from the run its figure shows).
    full = (
        not args.quick
        and result["channels"] == 64
        and list(args.inner_steps or [1, 5, 20, 50]) == [1, 5, 20, 50]
        and args.memory_steps > 0
        and args.meta_batch == 4
    )
    if full:
        publish_figures({RESULTS / "meta_memory.png": "meta_memory.png"})


if __name__ == "__main__":
    main()
