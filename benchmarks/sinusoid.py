"""Sinusoid regression benchmark: the MAML protocol of Finn et al. (2017), for every meta-learner.

Protocol (Finn et al., "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
ICML 2017, section 5.1): tasks y = A sin(x - phi), A ~ U[0.1, 5], phi ~ U[0, pi],
x ~ U[-5, 5]; a 1-40-40-1 ReLU MLP; K = 10 support points; meta-batch 25; outer Adam with
lr 1e-3; inner SGD with lr 0.01 and 1 inner step during training; 70 000 meta-iterations.
Evaluation: post-adaptation MSE after 0, 1 and 10 inner steps (SGD, lr 0.01) on a fixed set of
held-out tasks (K = 10 support points, 100 query points each).

Every algorithm is evaluated with the same test-time inner loop, plain SGD (lr 0.01) on every
parameter, the row each table compares; ANIL and MetaSGD get a second row with their own inner
loop (the head only; the learned per-parameter rates). Reptile trains with ``--reptile-inner-steps`` (default 5) inner steps,
because with a single step its update reduces to joint training (Nichol et al., 2018).

Usage::

    python benchmarks/sinusoid.py --quick                    # CI sanity check, < 60 s
    python benchmarks/sinusoid.py --algorithms maml          # full 70k-iteration protocol
    python benchmarks/sinusoid.py --iterations 10000 --algorithms maml fomaml
    python benchmarks/sinusoid.py --plot-from benchmarks/results/sinusoid.json   # redraw, no training

Prints a table of MSEs with ratios to our MAML and to the reference numbers, and (when
matplotlib is importable) writes ``benchmarks/results/sinusoid.png`` (adapted curves for one
held-out task), ``benchmarks/results/sinusoid_steps.png`` (post-adaptation MSE against inner
steps, one line per algorithm) and ``benchmarks/results/sinusoid.json`` (``--output`` changes the
stem). A run of the full protocol (70 000 iterations, every algorithm, not ``--quick``) also copies
both figures to ``docs/images/`` (``sinusoid.png``, ``sinusoid_steps.png``) for the docs'
benchmarks page. ``--plot-from PATH.json`` trains nothing: it draws the steps figure from the
results JSON of an earlier run, as ``<stem of PATH>_steps.png`` under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from samgria.data import SinusoidTaskSampler, sinusoid  # noqa: E402
from samgria.meta.anil import ANIL  # noqa: E402
from samgria.meta.maml import FOMAML, MAML  # noqa: E402
from samgria.meta.metasgd import MetaSGD  # noqa: E402
from samgria.meta.reptile import Reptile  # noqa: E402
from samgria.meta.trainer import MetaTrainer  # noqa: E402
from _checks import int_at_least  # noqa: E402
from _docs_figures import publish_figures  # noqa: E402

ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd", "anil")
#: Reference MSEs for MAML at K = 10 (careful independent run of the protocol).
REFERENCE = {"maml": {1: 0.33, 10: 0.10}}
EVAL_STEPS = (0, 1, 10)
#: Algorithms whose own test-time inner loop differs from plain SGD on every parameter.
OWN_INNER_LOOP = {"metasgd": "learned rates", "anil": "head only"}
RESULTS = Path(__file__).resolve().parent / "results"
FULL_ITERATIONS = 70_000


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def make_meta(name: str, model: nn.Sequential, args: argparse.Namespace):
    common = {"lr": args.outer_lr, "inner_lr": args.inner_lr}
    if name == "maml":
        return MAML(model, torch.optim.Adam, inner_steps=1, **common)
    if name == "fomaml":
        return FOMAML(model, torch.optim.Adam, inner_steps=1, **common)
    if name == "reptile":
        return Reptile(model, torch.optim.Adam, inner_steps=args.reptile_inner_steps, **common)
    if name == "metasgd":
        return MetaSGD(model, torch.optim.Adam, inner_steps=1, **common)
    if name == "anil":
        return ANIL(model, torch.optim.Adam, head=model[4], inner_steps=1, **common)
    raise ValueError(f"unknown algorithm {name!r}")


def train(name: str, args: argparse.Namespace) -> dict:
    model = make_model(args.seed)
    meta = make_meta(name, model, args)
    sampler = SinusoidTaskSampler(k_support=args.k, k_query=args.k, seed=args.seed + 1)
    trainer = MetaTrainer(meta, F.mse_loss, sampler)
    window: list[float] = []

    def log(iteration: int, loss: float) -> None:
        window.append(loss)
        if args.log_every and iteration % args.log_every == 0:
            print(f"  [{name}] iteration {iteration}: mean meta-loss {sum(window) / len(window):.4f}", flush=True)
            window.clear()

    start = time.perf_counter()
    trainer.fit(args.iterations, args.meta_batch, callback=log, progress=False if args.quick else None)
    return {"meta": meta, "model": model, "seconds": time.perf_counter() - start}


def sgd_evaluator(model: nn.Module, inner_lr: float) -> MAML:
    """The fixed test-time protocol: plain SGD with ``inner_lr`` on every parameter."""
    return MAML(model, torch.optim.SGD, lr=0.0, inner_lr=inner_lr, first_order=True)


def per_task_mse(meta, tasks, steps: int) -> torch.Tensor:
    """Post-adaptation query MSE of every task (no meta-gradient graph kept)."""
    return meta.task_losses(tasks, F.mse_loss, steps=steps, create_graph=False).detach()


def summarize(losses: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval over tasks."""
    return losses.mean().item(), 1.96 * losses.std().item() / len(losses) ** 0.5


def adapted_curve(meta, task, steps: int, grid: torch.Tensor) -> torch.Tensor:
    """Prediction on ``grid`` after ``steps`` inner steps on the task's support set."""
    learner = meta.adapt(lambda f: F.mse_loss(f(task.support_x), task.support_y), steps=steps)
    with torch.no_grad():
        return learner(grid).detach()


def fmt(value: float) -> str:
    return f"{value:.3f}" if value == value else "diverged"


def plot_steps(summary: dict, path: Path) -> None:
    """Post-adaptation MSE against inner steps, one line per row of ``summary["results"]``.

    ``summary`` is the results JSON the benchmark writes. A mean that is not finite (an adaptation
    that diverged on some task) is left out of its line, and named in the legend like a mean whose
    95% CI is wider than itself (a few tasks' huge errors).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    all_steps: set[int] = set()
    for label, row in summary["results"].items():
        points = sorted((int(s), cell["mean"], cell.get("ci95")) for s, cell in row["mse"].items())
        all_steps.update(s for s, _, _ in points)
        finite = [(s, m, c) for s, m, c in points if m is not None and math.isfinite(m)]
        # Diverged on some tasks: a mean that is not finite (left out), or a CI wider than the mean.
        diverged = [s for s, m, c in points if m is None or not math.isfinite(m) or (c is not None and c >= m)]
        if diverged:
            label = f"{label}: some tasks diverge at {', '.join(map(str, diverged))} steps"
        if not finite:
            continue
        steps, means, cis = zip(*finite)
        # 95% CI as error bars, clipped above zero for the log axis.
        errors = None if any(c is None for c in cis) else [[min(c, 0.999 * m) for m, c in zip(means, cis)], list(cis)]
        ax.errorbar(steps, means, yerr=errors, marker="o", capsize=3,
                    linestyle="--" if "(" in label else "-", label=label)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xscale("symlog", linthresh=1.0)  # 0, 1 and 10 steps evenly spaced
    ax.set_xticks(sorted(all_steps), [str(s) for s in sorted(all_steps)])
    ax.set_xlabel(f"inner steps at test time (solid: SGD lr {summary.get('inner_lr', 0.01):g} on all weights; "
                  "dashed: own inner loop)", fontsize=8)
    ax.set_ylabel("post-adaptation MSE (held-out tasks)")
    reference = summary.get("reference_maml") or {}
    for s, value in reference.items():
        ax.plot([int(s)], [value], "k*", markersize=10, label="reference MAML" if s == min(reference) else None)
    ax.set_title(
        f"sinusoid, K={summary.get('k')}: {summary.get('iterations')} meta-iterations, "
        f"{summary.get('eval_tasks')} held-out tasks (95% CI)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few hundred iterations, < 60 s (CI)")
    parser.add_argument("--iterations", type=int_at_least(1), default=None,
                        help="meta-iterations (default 70000, 300 with --quick)")  # fmt: skip
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--eval-tasks", type=int_at_least(1), default=None,
                        help="held-out tasks (default 600, 100 with --quick)")  # fmt: skip
    parser.add_argument("--meta-batch", type=int_at_least(1), default=25)
    parser.add_argument("--k", type=int_at_least(1), default=10, help="support (and training query) points per task")
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--outer-lr", type=float, default=1e-3)
    parser.add_argument("--reptile-inner-steps", type=int_at_least(1), default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int_at_least(1), default=None,
                        help="print the mean meta-loss every N iterations")  # fmt: skip
    parser.add_argument("--threads", type=int_at_least(1), default=1,
                        help="torch.set_num_threads (1 is fastest for this tiny MLP)")  # fmt: skip
    parser.add_argument("--output", default=None,
                        help="file stem of the plots and JSON under benchmarks/results/ (default sinusoid; "
                             "with --plot-from, the JSON's stem)")  # fmt: skip
    parser.add_argument("--plot-from", default=None, metavar="PATH.json",
                        help="train nothing: draw the MSE-against-inner-steps figure from an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.plot_from is not None:
        source = Path(args.plot_from)
        summary = json.loads(source.read_text())
        if importlib.util.find_spec("matplotlib") is None:
            print("matplotlib not importable: no plot written")
            return 1
        target = RESULTS / f"{args.output or source.stem}_steps.png"
        plot_steps(summary, target)
        print(f"wrote {target} from {source}")
        return 0
    if args.output is None:
        args.output = "sinusoid"
    if args.iterations is None:
        args.iterations = 300 if args.quick else FULL_ITERATIONS
    if args.eval_tasks is None:
        args.eval_tasks = 100 if args.quick else 600
    torch.set_num_threads(args.threads)

    # Fixed held-out tasks: their own seed, K support points, 100 query points.
    eval_tasks = SinusoidTaskSampler(k_support=args.k, k_query=100, seed=12345).sample(args.eval_tasks)
    print(
        f"sinusoid benchmark: {args.iterations} meta-iterations, meta-batch {args.meta_batch}, K={args.k}, "
        f"inner lr {args.inner_lr} (1 training step; Reptile {args.reptile_inner_steps}), outer Adam "
        f"{args.outer_lr}, {args.eval_tasks} held-out tasks, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
        flush=True,
    )
    rows: list[tuple[str, dict]] = []
    runs = {}
    for name in args.algorithms:
        run = train(name, args)
        runs[name] = run
        evaluator = sgd_evaluator(run["model"], args.inner_lr)
        run["mse"] = {s: summarize(per_task_mse(evaluator, eval_tasks, s)) for s in EVAL_STEPS}
        rows.append((name, run))
        if name in OWN_INNER_LOOP:  # also its own test-time inner loop (learned rates / head only)
            own = {"seconds": run["seconds"], "mse": {s: summarize(per_task_mse(run["meta"], eval_tasks, s)) for s in EVAL_STEPS}}
            run["own"] = own
            rows.append((f"{name} ({OWN_INNER_LOOP[name]})", own))
        print(f"  {name}: trained in {run['seconds']:.1f} s; MSE after 0/1/10 steps "
              + "/".join(fmt(run["mse"][s][0]) for s in EVAL_STEPS), flush=True)

    base = runs.get("maml")
    print("\nPost-adaptation MSE on held-out tasks (mean +- 95% CI over tasks); test-time inner loop: "
          f"plain SGD, lr {args.inner_lr}, all parameters, unless noted")
    header = (f"{'algorithm':<24} " + " ".join(f"{f'MSE@{s}':>15}" for s in EVAL_STEPS)
              + f" {'@1 / MAML':>10} {'@10 / MAML':>10} {'time / MAML':>11}")
    print(header)
    print("-" * len(header))
    for label, run in rows:
        mse = run["mse"]
        cells = " ".join(f"{fmt(mse[s][0]):>8} +-{mse[s][1]:5.3f}" if mse[s][0] == mse[s][0] else f"{'diverged':>15}" for s in EVAL_STEPS)
        r1 = f"{mse[1][0] / base['mse'][1][0]:.2f}" if base else "-"
        r10 = f"{mse[10][0] / base['mse'][10][0]:.2f}" if base else "-"
        rt = f"{run['seconds'] / base['seconds']:.2f}" if base else "-"
        print(f"{label:<24} {cells} {r1:>10} {r10:>10} {rt:>11}")
    if base:
        ref = REFERENCE["maml"]
        print(f"\nreference MAML, K=10, full protocol (independent run): MSE@1 {ref[1]:.2f}, MSE@10 {ref[10]:.2f}; "
              f"ours / reference: @1 {base['mse'][1][0] / ref[1]:.2f}, @10 {base['mse'][10][0] / ref[10]:.2f}")
    if args.iterations < FULL_ITERATIONS:
        print(f"note: {args.iterations} < {FULL_ITERATIONS} meta-iterations, so the reference numbers do not apply.")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot or results written")
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot_tasks, amplitudes, phases = SinusoidTaskSampler(k_support=args.k, k_query=1, seed=2024).sample_with_params(1)
    task = plot_tasks[0]
    grid = torch.linspace(-5.0, 5.0, 200).unsqueeze(1)
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.5), squeeze=False)
    for ax, (name, run) in zip(axes[0], runs.items()):
        evaluator = sgd_evaluator(run["model"], args.inner_lr)
        ax.plot(grid, sinusoid(grid, amplitudes[0], phases[0]), "k-", label="true")
        ax.plot(task.support_x, task.support_y, "k^", label=f"support (K={args.k})")
        for steps, style in zip(EVAL_STEPS, (":", "--", "-")):
            ax.plot(grid, adapted_curve(evaluator, task, steps, grid), style, label=f"{steps} steps")
        if name in OWN_INNER_LOOP:
            own_curve = adapted_curve(run["meta"], task, 1, grid)
            ax.plot(grid, own_curve, "-.", label=f"1 step ({OWN_INNER_LOOP[name]})")
            ax.legend(fontsize=7)
        ax.set_title(f"{name} ({args.iterations} it.)")
        ax.set_ylim(-6, 6)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.output}.png", dpi=100)

    def as_json(run: dict) -> dict:
        return {"seconds": run["seconds"], "mse": {str(s): {"mean": m, "ci95": c} for s, (m, c) in run["mse"].items()}}

    summary = {
        "command": " ".join(sys.argv),
        "iterations": args.iterations,
        "meta_batch": args.meta_batch,
        "k": args.k,
        "inner_lr": args.inner_lr,
        "eval_tasks": args.eval_tasks,
        "reptile_inner_steps": args.reptile_inner_steps,
        "reference_maml": {str(s): v for s, v in REFERENCE["maml"].items()},
        "results": {label: as_json(run) for label, run in rows},
    }
    (RESULTS / f"{args.output}.json").write_text(json.dumps(summary, indent=2))
    plot_steps(summary, RESULTS / f"{args.output}_steps.png")
    print(f"wrote {RESULTS / (args.output + '.png')}, {RESULTS / (args.output + '_steps.png')} and "
          f"{RESULTS / (args.output + '.json')}")
    full = not args.quick and args.iterations == FULL_ITERATIONS and set(args.algorithms) == set(ALGORITHMS)
    if full:  # the full protocol
        publish_figures(
            {RESULTS / f"{args.output}.png": "sinusoid.png", RESULTS / f"{args.output}_steps.png": "sinusoid_steps.png"}
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
