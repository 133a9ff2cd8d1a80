r"""Generalization benchmark: test accuracy of SGD and the SAM family on ``load_digits``, with label noise.

Protocol: scikit-learn's bundled ``load_digits`` (1797 grey 8×8 images, 10 classes, pixel values
0–16 scaled to [0, 1]), one fixed stratified split (70% train, 30% test, ``random_state=0``).
The training labels get 0% or 40% *symmetric* label noise: exactly
:math:`\lfloor 0.4\, n \rceil` training examples, chosen at random, are relabelled with a class
drawn uniformly from the nine *other* classes; the test labels stay clean. A small conv net
(conv 1→16, conv 16→32, both 3×3 with ReLU, 2×2 max-pool, linear 512→64, ReLU, linear 64→10;
about 38k parameters, no BatchNorm) is trained with cross-entropy for the same number of epochs
by every method:

* ``sgd``: momentum SGD (lr 0.05, momentum 0.9, weight decay 5e-4, batch 64, cosine learning
  rate schedule to 0 over the run), timed as ``torch.optim.SGD`` itself; the inner optimizer of
  every other method, which wraps it in ``TransformingOptimizer`` (with no transform the wrapper
  trains the same weights bit for bit: checked on the first seed of every run);
* ``sam``: ``SAM(rho=0.05)``;
* ``asam``: ``ASAM(rho=0.5, eta=0.01)``;
* ``gsam``: ``GSAM(rho=0.05, alpha=0.4)``;
* ``looksam``: ``LookSAM(rho=0.05, alpha=0.7, k=5)``;
* ``sam_lamp``: ``SAM(rho=0.05)`` followed by ``LAMP(eps=5e-3, rollback_len=10)``.

The hyperparameters are the papers' defaults for CIFAR-scale training, not tuned for this task
(samgria's ``SAM`` defaults to ``rho=0.01``; the other transforms' defaults are these). All methods take the same number of epochs, so SAM and its variants use about
twice the gradient computations of SGD (LookSAM about 1.2×). For each seed, every method starts
from the same initial weights and sees the same noisy labels and the same batch order (paired
comparison). Reported: final test accuracy (mean ± 95% confidence interval over seeds,
Student's t), its paired difference to SGD (mean ± 95% CI of the per-seed differences), the
accuracy on the (noisy) training labels, and wall and CPU time relative to SGD (medians of the
per-seed ratios; training only, single thread; CPU time is less affected by other processes on
a shared machine). A run whose optimizer skipped a step (non-finite gradients) or ended with
non-finite weights fails the benchmark. The plot shows the mean test accuracy after every epoch
and the final accuracies.

Usage::

    python benchmarks/generalization.py --quick     # CI: 1 seed, 3 epochs, < 60 s
    python benchmarks/generalization.py             # 5 seeds, 20 epochs (5 to 10 minutes on 2 cores)

Prints a table and (when matplotlib is importable) writes ``benchmarks/results/generalization.png``
and ``benchmarks/results/generalization.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from samgria import ASAM, GSAM, LAMP, SAM, LookSAM, Transform, TransformingOptimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checks import int_at_least, number_in, require_close, require_steps_taken  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LR, MOMENTUM, WEIGHT_DECAY, BATCH = 0.05, 0.9, 5e-4, 64
NOISE_LEVELS = (0.0, 0.4)

#: Method name -> the transforms around momentum SGD (a fresh list per run; ``seed`` for LAMP's noise);
#: "sgd" trains with ``torch.optim.SGD`` itself.
METHODS: dict[str, Callable[[int], list[Transform]]] = {
    "sgd": lambda seed: [],
    "sam": lambda seed: [SAM(rho=0.05)],
    "asam": lambda seed: [ASAM(rho=0.5, eta=0.01)],
    "gsam": lambda seed: [GSAM(rho=0.05, alpha=0.4)],
    "looksam": lambda seed: [LookSAM(rho=0.05, alpha=0.7, k=5)],
    "sam_lamp": lambda seed: [SAM(rho=0.05), LAMP(eps=5e-3, rollback_len=10, seed=seed)],
}
LABELS = {"sgd": "SGD (momentum)", "sam": "SAM", "asam": "ASAM", "gsam": "GSAM", "looksam": "LookSAM", "sam_lamp": "SAM + LAMP"}


# -- data ------------------------------------------------------------------------------------------
@dataclass
class Digits:
    """The fixed split: images ``(n, 1, 8, 8)`` in [0, 1] and clean integer labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_split() -> Digits:
    """``load_digits`` split 70/30, stratified, with ``random_state=0`` (the same split every run)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.3, stratify=labels, random_state=0)

    def as_images(array: Any) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0

    return Digits(as_images(x_train), torch.as_tensor(y_train), as_images(x_test), torch.as_tensor(y_test))


def symmetric_noise(labels: torch.Tensor, rate: float, generator: torch.Generator, classes: int = 10) -> torch.Tensor:
    r"""Relabel exactly ``round(rate * n)`` random examples with a uniformly drawn *other* class.

    Args:
        labels: Clean labels, shape ``(n,)``.
        rate: Fraction of labels to corrupt, in ``[0, 1]``.
        generator: The source of randomness (seeded per run).
        classes: Number of classes :math:`C`; a corrupted label is :math:`(y + s) \bmod C` with
            :math:`s \sim U\{1, \dots, C - 1\}`, i.e. uniform over the other classes.

    Returns:
        The noisy labels (a new tensor).
    """
    noisy = labels.clone()
    count = round(rate * len(labels))
    chosen = torch.randperm(len(labels), generator=generator)[:count]
    shift = torch.randint(1, classes, (count,), generator=generator)
    noisy[chosen] = (labels[chosen] + shift) % classes
    return noisy


# -- model and training ----------------------------------------------------------------------------
def make_model(seed: int) -> nn.Module:
    """The small conv net of the protocol, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


@dataclass
class Run:
    """One training run: final accuracies, the test accuracy after every epoch, training seconds,
    the optimizer's skipped steps and the final weights."""

    test_accuracy: float
    train_accuracy: float
    curve: list[float]
    seconds: float
    cpu_seconds: float
    skipped_steps: int = 0
    weights: list[torch.Tensor] = field(default_factory=list, repr=False)


def train(method: str, data: Digits, labels: torch.Tensor, seed: int, epochs: int, wrap_sgd: bool = False) -> Run:
    """Train a fresh model (initialised from ``seed``) with ``method`` on ``labels`` for ``epochs``.

    "sgd" trains with ``torch.optim.SGD``, or with ``wrap_sgd`` with ``TransformingOptimizer`` and
    no transform (the check that both give the same weights).
    """
    model = make_model(seed)
    if method == "sgd" and not wrap_sgd:
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    else:
        optimizer = TransformingOptimizer(
            model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
            transforms=METHODS[method](seed),
        )  # fmt: skip
    batches_per_epoch = math.ceil(len(labels) / BATCH)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * batches_per_epoch)
    order = torch.Generator().manual_seed(seed)
    curve, seconds, cpu_seconds = [], 0.0, 0.0
    for _ in range(epochs):
        permutation = torch.randperm(len(labels), generator=order)
        start, cpu_start = time.perf_counter(), time.process_time()
        for first in range(0, len(labels), BATCH):
            index = permutation[first : first + BATCH]
            x, y = data.x_train[index], labels[index]

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            optimizer.step(closure)
            schedule.step()
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - cpu_start
        curve.append(accuracy(model, data.x_test, data.y_test))
    skipped = getattr(optimizer, "skipped_steps", 0)  # torch's SGD never skips
    weights = [p.detach().clone() for p in model.parameters()]
    return Run(curve[-1], accuracy(model, data.x_train, labels), curve, seconds, cpu_seconds, skipped, weights)


def check_sgd_baseline(data: Digits, labels: torch.Tensor, seed: int, epochs: int, sgd: Run) -> None:
    """Fail the run unless ``TransformingOptimizer`` with no transform trains the very weights of
    ``torch.optim.SGD`` (``sgd``): the SAM rows wrap the baseline's optimizer and nothing else."""
    wrapped = train("sgd", data, labels, seed, epochs, wrap_sgd=True)
    difference = float(torch.stack([(a - b).abs().max() for a, b in zip(sgd.weights, wrapped.weights)]).max())
    # Bit for bit: the wrapper calls the same SGD step on the same gradients.
    require_close("max|weights(torch.optim.SGD) - weights(TransformingOptimizer(SGD, transforms=[]))|", difference, 0.0)
    print(f"  torch.optim.SGD and TransformingOptimizer(SGD, transforms=[]): identical weights after {epochs} epochs",
          flush=True)  # fmt: skip


# -- statistics --------------------------------------------------------------------------------------
def mean_ci(values: list[float]) -> tuple[float, float]:
    r"""Mean and half-width of the 95% confidence interval, :math:`t_{0.975,\,n-1}\, s / \sqrt{n}`
    (NaN for a single value), with Student's t quantile for every ``n`` (``scipy``, which
    scikit-learn, the source of the data, depends on)."""
    from scipy.stats import t as student_t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    quantile = float(student_t.ppf(0.975, len(values) - 1))
    return mean, quantile * statistics.stdev(values) / math.sqrt(len(values))


def summarize(runs: dict[float, dict[str, list[Run]]]) -> dict[str, Any]:
    """Per noise level and method: accuracies with CIs, the paired difference to SGD, time ratio."""
    summary: dict[str, Any] = {}
    for noise, by_method in runs.items():
        baseline = by_method["sgd"]
        rows = {}
        for method, method_runs in by_method.items():
            test = [r.test_accuracy for r in method_runs]
            paired = [r.test_accuracy - b.test_accuracy for r, b in zip(method_runs, baseline)]
            rows[method] = {
                "test_accuracy": dict(zip(("mean", "ci95"), mean_ci(test))),
                "difference_to_sgd": dict(zip(("mean", "ci95"), mean_ci(paired))),
                "train_accuracy_on_noisy_labels": statistics.fmean(r.train_accuracy for r in method_runs),
                "time_vs_sgd": statistics.median(r.seconds / b.seconds for r, b in zip(method_runs, baseline)),
                "cpu_time_vs_sgd": statistics.median(r.cpu_seconds / b.cpu_seconds for r, b in zip(method_runs, baseline)),
                "seconds": [r.seconds for r in method_runs],
                "cpu_seconds": [r.cpu_seconds for r in method_runs],
                "per_seed_test_accuracy": test,
                "mean_curve": [statistics.fmean(c) for c in zip(*(r.curve for r in method_runs))],
            }
        summary[f"{noise:g}"] = rows
    return summary


# -- output ----------------------------------------------------------------------------------------
def percent(mean: float, ci: float) -> str:
    return f"{100 * mean:5.1f}" + (f" ± {100 * ci:4.1f}" if ci == ci else "       ")


def print_table(summary: dict[str, Any]) -> None:
    """Test accuracy and paired difference per noise level; fit of the noisiest training labels;
    wall and CPU time relative to SGD (averaged over the noise levels)."""
    noises = list(summary)
    header = f"{'method':<16}" + "".join(f"{f'test acc % ({float(n):.0%} noise)':>24}{'vs SGD':>14}" for n in noises)
    header += f"{f'train acc ({float(noises[-1]):.0%} noisy)':>23}{'wall / SGD':>12}{'CPU / SGD':>11}"
    print(header)
    print("-" * len(header))
    for method in summary[noises[0]]:
        cells = ""
        for noise in noises:
            row = summary[noise][method]
            acc, diff = row["test_accuracy"], row["difference_to_sgd"]
            delta = "—" if method == "sgd" else f"{100 * diff['mean']:+5.1f}" + (f" ± {100 * diff['ci95']:.1f}" if diff["ci95"] == diff["ci95"] else "")
            cells += f"{percent(acc['mean'], acc['ci95']):>24}{delta:>14}"
        noisy = summary[noises[-1]][method]["train_accuracy_on_noisy_labels"]
        wall = statistics.fmean(summary[n][method]["time_vs_sgd"] for n in noises)
        cpu = statistics.fmean(summary[n][method]["cpu_time_vs_sgd"] for n in noises)
        print(f"{LABELS[method]:<16}{cells}{100 * noisy:>22.1f}%{wall:>12.2f}{cpu:>11.2f}")


def write_results(summary: dict[str, Any], config: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("matplotlib not importable: no plot or results written")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    noises = list(summary)
    methods = list(summary[noises[0]])
    fig, axes = plt.subplots(1, len(noises) + 1, figsize=(5 * (len(noises) + 1), 3.8))
    for ax, noise in zip(axes, noises):
        for method in methods:
            curve = summary[noise][method]["mean_curve"]
            ax.plot(range(1, len(curve) + 1), [100 * a for a in curve], label=LABELS[method])
        ax.set_title(f"{float(noise):.0%} label noise: mean test accuracy")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    bars = axes[-1]
    width = 0.8 / len(noises)
    for offset, noise in enumerate(noises):
        means = [100 * summary[noise][m]["test_accuracy"]["mean"] for m in methods]
        errors = [100 * summary[noise][m]["test_accuracy"]["ci95"] for m in methods]
        errors = [e if e == e else 0.0 for e in errors]
        positions = [i + (offset - (len(noises) - 1) / 2) * width for i in range(len(methods))]
        bars.bar(positions, means, width, yerr=errors, capsize=3, label=f"{float(noise):.0%} noise")
    bars.set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=30, ha="right", fontsize=8)
    low = min(100 * summary[n][m]["test_accuracy"]["mean"] for n in noises for m in methods)
    bars.set_ylim(max(0.0, low - 10), 100)
    bars.set_title(f"final test accuracy (95% CI, {config['seeds']} seeds)")
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "generalization.png", dpi=100)
    (RESULTS / "generalization.json").write_text(json.dumps({"config": config, "results": summary}, indent=2))
    print(f"\nwrote {RESULTS / 'generalization.png'} and {RESULTS / 'generalization.json'}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, < 60 s (CI)")
    parser.add_argument("--seeds", type=int_at_least(1), default=None,
                        help="seeds per method and noise level (default 5, 1 quick)")  # fmt: skip
    parser.add_argument("--epochs", type=int_at_least(1), default=None, help="epochs per run (default 20, 3 quick)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="sgd is always run")
    parser.add_argument("--noise", nargs="+", type=number_in(0.0, 1.0), default=list(NOISE_LEVELS),
                        help="label-noise rates, each in [0, 1] (default 0 0.4)")  # fmt: skip
    args = parser.parse_args(argv)
    # A repeated rate or method would run the same seeds twice and count them as more seeds
    # (narrower CIs; a repeated method's runs would also be paired with the wrong SGD seeds).
    if len(set(args.noise)) != len(args.noise):
        parser.error(f"argument --noise: each rate at most once, got {args.noise}")
    if len(set(args.methods)) != len(args.methods):
        parser.error(f"argument --methods: each method at most once, got {args.methods}")
    seeds = args.seeds or (1 if args.quick else 5)
    epochs = args.epochs or (3 if args.quick else 20)
    methods = ["sgd", *[m for m in args.methods if m != "sgd"]]
    torch.set_num_threads(1)

    data = load_split()
    config = {
        "command": " ".join(sys.argv), "seeds": seeds, "epochs": epochs, "batch": BATCH, "lr": LR,
        "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "train": len(data.y_train), "test": len(data.y_test),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }  # fmt: skip
    print(
        f"generalization benchmark: load_digits ({config['train']} train / {config['test']} test), "
        f"{seeds} seed(s), {epochs} epochs, noise {args.noise}, torch {torch.__version__}, 1 thread",
        flush=True,
    )
    runs: dict[float, dict[str, list[Run]]] = {noise: {m: [] for m in methods} for noise in args.noise}
    started = time.perf_counter()
    for noise in args.noise:
        for seed in range(seeds):
            labels = symmetric_noise(data.y_train, noise, torch.Generator().manual_seed(1000 + seed))
            for method in methods:
                run = train(method, data, labels, seed, epochs)
                runs[noise][method].append(run)
                print(f"  noise {noise:.0%} seed {seed} {method:<9} test {100 * run.test_accuracy:5.1f}%  "
                      f"train(noisy) {100 * run.train_accuracy:5.1f}%  {run.seconds:6.1f} s", flush=True)
                require_steps_taken(f"noise {noise:.0%} seed {seed} {method}", run.skipped_steps, run.weights)
                if method == "sgd" and noise == args.noise[0] and seed == 0:
                    check_sgd_baseline(data, labels, seed, epochs, run)
    summary = summarize(runs)
    print(f"\nFinal test accuracy (mean ± 95% CI over {seeds} seed(s)); 'vs SGD': paired difference in points; "
          f"total {time.perf_counter() - started:.0f} s\n")
    print_table(summary)
    write_results(summary, config)
    return summary


if __name__ == "__main__":
    main()
