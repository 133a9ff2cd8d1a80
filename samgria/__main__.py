"""Command line: ``python -m samgria demo`` trains a small classifier four ways and compares them.

The demo generates two interleaved spirals (1000 training points with 15% of their labels
flipped, 2000 clean held-out points), trains the same 2-256-256-2 ReLU MLP from the same
initialisation with momentum SGD alone, with SAM, with ASAM and with SAM + LAMP, and prints a table of the final training
loss (on the noisy training labels) and the accuracy on a clean held-out set. Progress goes to
stderr, one line per method every few epochs; the table goes to stdout; ``--plot PATH`` also
draws each method's decision regions (needs matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from samgria._checks import check_choice, check_int, check_real, check_seed
from samgria.optim import TransformingOptimizer
from samgria.transforms import ASAM, LAMP, SAM

__all__ = ["main", "make_spirals", "DemoResult", "run_demo", "plot_demo"]

METHODS = ("plain", "SAM", "ASAM", "SAM+LAMP")

#: ``torch.set_num_threads`` takes a C ``int``.
_MAX_THREADS = 2**31 - 1


def _check_demo_seed(name: str, value: Any) -> int:
    """A seed of the demo: an integer that ``torch.manual_seed`` takes (``None`` refused)."""
    number = check_int(name, value)
    check_seed(name, number)
    return number


def _offset_seed(seed: int, offset: int) -> int:
    """``seed + offset`` as ``torch.manual_seed`` reads it (modulo :math:`2^{64}`), so that every
    accepted seed has its derived seeds in range; the same seed as ``seed + offset`` wherever that
    one is in range."""
    return (seed + offset) % 2**64


def _check_sequence(name: str, value: Any, rule: str) -> tuple:
    """A non-empty sequence (not a ``str``), as a tuple; ``rule`` says what its items must be."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be {rule}, got {value!r}")
    if not value:
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return tuple(value)


def _check_image_path(name: str, path: Any) -> None:
    """Check, before anything is drawn, that matplotlib can write an image file at ``path``.

    Raises:
        TypeError: ``path`` is not a ``str`` or ``os.PathLike``.
        ImportError: matplotlib does not import.
        ValueError: ``path``'s folder does not exist, ``path`` is a folder, its suffix is not a format
            that matplotlib's ``savefig`` writes, it is ``.pgf`` and matplotlib's TeX program is
            missing, or no file can be written at ``path`` (the folder's permissions, a name too long).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {path!r}")
    file = Path(path)
    # os.path.isdir: False, not an OSError, for a name the system refuses (too long)
    if not os.path.isdir(file.parent):
        raise ValueError(f"{name} must be a file name in an existing folder, got {os.fspath(path)!r}")
    if os.path.isdir(file):
        raise ValueError(f"{name} must be a file name, not a folder, got {os.fspath(path)!r}")
    try:
        import matplotlib
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as error:
        raise ImportError(f"{name} {os.fspath(path)!r} needs matplotlib: pip install matplotlib ({error})") from None
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = file.suffix[1:].lower()
    if suffix not in formats:
        rule = "a file name ending in one of " + ", ".join(f".{format_}" for format_ in formats)
        raise ValueError(f"{name} must be {rule}, got {os.fspath(path)!r}")
    tex = matplotlib.rcParams["pgf.texsystem"]
    if suffix == "pgf" and shutil.which(tex) is None:
        raise ValueError(
            f"{name} must not end in .pgf without {tex} (matplotlib's pgf.texsystem) on PATH, "
            f"got {os.fspath(path)!r}"
        )
    # Whether the file can be made (the folder's permissions, the name's length, a read-only or
    # special file system): opened for appending, which leaves an existing file as it is; a file
    # made here is removed again.
    existed = os.path.lexists(file)
    try:
        with open(file, "ab"):
            pass
    except OSError as error:
        raise ValueError(
            f"{name} must be a file that can be written, got {os.fspath(path)!r} ({error.strerror or error})"
        ) from None
    if not existed:
        with contextlib.suppress(OSError):
            file.unlink()


def make_spirals(
    n_points: int, *, noise: float = 0.25, label_noise: float = 0.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Two interleaved spirals: ``n_points`` points in :math:`\mathbb{R}^2` and labels 0/1.

    Class :math:`c` has points :math:`r(\cos(t + c\pi), \sin(t + c\pi))` with
    :math:`t = 3\pi\sqrt{u}`, :math:`u \sim U(0, 1)` and :math:`r = t / 3\pi`, plus Gaussian
    noise of standard deviation ``noise`` times the spiral spacing. A share ``label_noise`` of
    the labels (exactly ``round(label_noise * n_points)`` of them) is flipped.

    Args:
        n_points: Number of points (even split between the classes).
        noise: Position noise (finite, ``>= 0``), relative to the distance between spiral arms.
        label_noise: Share of labels to flip, in ``[0, 1]``.
        seed: Seed of the generator, in :math:`[-2^{63}, 2^{64} - 1]`; equal seeds give equal data,
            and so do seeds equal modulo :math:`2^{32}` (torch's CPU generator reads the low 32 bits).

    Returns:
        ``(x, y)``: float32 points of shape ``(n_points, 2)`` and int64 labels, on the CPU whatever
        torch's default dtype and device.

    Raises:
        TypeError: If ``n_points`` or ``seed`` is not an integer, or ``noise`` or ``label_noise``
            not a real number.
        ValueError: If ``n_points < 2``, ``noise`` is negative or not finite, ``label_noise`` is
            outside ``[0, 1]``, or ``seed`` is out of range.
    """
    n_points = check_int("n_points", n_points, low=2)
    noise = check_real("noise", noise, low=0.0)
    label_noise = check_real("label_noise", label_noise, low=0.0, high=1.0)
    seed = _check_demo_seed("seed", seed)
    # float32 on the CPU whatever torch's default dtype and device: the same seed, the same data
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_points, device="cpu") % 2
    t = 3 * math.pi * torch.rand(n_points, generator=generator, dtype=torch.float32, device="cpu").sqrt()
    angle = t + math.pi * labels.to(torch.float32)
    radius = t / (3 * math.pi)
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    x = x + noise / 3 * torch.randn(n_points, 2, generator=generator, dtype=torch.float32, device="cpu")
    flipped = torch.randperm(n_points, generator=generator, device="cpu")[: round(label_noise * n_points)]
    labels = labels.clone()
    labels[flipped] = 1 - labels[flipped]
    return x, labels


def _model(seed: int, width: int) -> nn.Module:
    # Initialised from ``seed`` on a fork of the default generator: the caller's stream goes on
    # as if the demo had not run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # float32 on the CPU, as the data, whatever torch's default dtype and device
        kind: dict[str, Any] = {"device": "cpu", "dtype": torch.float32}
        return nn.Sequential(
            nn.Linear(2, width, **kind),
            nn.ReLU(),
            nn.Linear(width, width, **kind),
            nn.ReLU(),
            nn.Linear(width, 2, **kind),
        )


def _optimizer(method: str, model: nn.Module, lr: float, seed: int) -> TransformingOptimizer:
    transforms: dict[str, list] = {
        "plain": [],
        "SAM": [SAM(rho=0.05)],
        "ASAM": [ASAM(rho=0.5, eta=0.01)],
        "SAM+LAMP": [SAM(rho=0.05), LAMP(eps=5e-3, rollback_len=10, seed=seed)],
    }
    return TransformingOptimizer(
        model.parameters(), torch.optim.SGD, lr=lr, momentum=0.9, transforms=transforms[method]
    )


@dataclass
class DemoResult:
    """One method's outcome: final loss on the (noisy) training set and held-out accuracy."""

    method: str
    train_loss: float
    test_accuracy: float
    seconds: float
    #: The trained classifier (for :func:`plot_demo`); not part of the comparison or the repr.
    model: nn.Module | None = field(default=None, repr=False, compare=False)


def run_demo(
    *,
    n_train: int = 1000,
    n_test: int = 2000,
    epochs: int = 150,
    batch_size: int = 64,
    lr: float = 0.05,
    width: int = 256,
    label_noise: float = 0.15,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    log: Callable[[str], None] | None = None,
    log_every: int = 25,
) -> list[DemoResult]:
    """Train one MLP per method on the spirals and evaluate it; deterministic for a given seed.

    Data and models are float32 on the CPU, whatever torch's default dtype and device.

    Args:
        n_train: Training points (a share ``label_noise`` of their labels is flipped).
        n_test: Clean held-out points.
        epochs: Passes over the training set.
        batch_size: Mini-batch size.
        lr: Learning rate of the momentum SGD (momentum 0.9) inside every method.
        width: Hidden width of the 2-hidden-layer ReLU MLP.
        label_noise: Share of flipped training labels.
        seed: Seed of the data, the initialisation (the same for every method) and the shuffling, in
            :math:`[-2^{63}, 2^{64} - 1]` (what ``torch.manual_seed`` takes); seeds equal modulo
            :math:`2^{32}` give the same run (torch's CPU generator reads the low 32 bits).
        methods: A non-empty sequence of ``"plain"``, ``"SAM"``, ``"ASAM"``, ``"SAM+LAMP"``.
        log: Called with a progress line every ``log_every`` epochs and at the last epoch.
        log_every: Epochs between progress lines.

    Returns:
        One :class:`DemoResult` per method, in order.

    Raises:
        TypeError: If an argument is of the wrong kind (``methods`` a ``str`` or holding a
            method that is not one, a count not an integer, ``log`` not callable, ...).
        ValueError: If ``n_train`` or ``n_test`` is below 2, ``epochs``, ``batch_size``, ``width``
            or ``log_every`` below 1, ``lr`` negative or not finite, ``label_noise`` outside
            ``[0, 1]``, ``seed`` out of range, ``methods`` empty or a method unknown.
    """
    n_train = check_int("n_train", n_train, low=2)
    n_test = check_int("n_test", n_test, low=2)
    epochs = check_int("epochs", epochs, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    lr = check_real("lr", lr, low=0.0)
    width = check_int("width", width, low=1)
    label_noise = check_real("label_noise", label_noise, low=0.0, high=1.0)
    seed = _check_demo_seed("seed", seed)
    methods = _check_sequence("methods", methods, f"a non-empty sequence of names from {list(METHODS)}")
    for index, method in enumerate(methods):
        check_choice(f"methods[{index}]", method, METHODS)
    if log is not None and not callable(log):
        raise TypeError(f"log must be a callable or None, got {log!r}")
    log_every = check_int("log_every", log_every, low=1)
    x_train, y_train = make_spirals(n_train, label_noise=label_noise, seed=seed)
    x_test, y_test = make_spirals(n_test, seed=_offset_seed(seed, 1))
    _warm_up(methods, x_train[:batch_size], y_train[:batch_size], lr, width, seed)
    results = []
    for method in methods:
        start = time.perf_counter()
        model = _model(seed, width)
        optimizer = _optimizer(method, model, lr, seed)
        shuffle = torch.Generator().manual_seed(_offset_seed(seed, 2))
        for epoch in range(1, epochs + 1):
            model.train()
            total, count = 0.0, 0
            for rows in torch.randperm(n_train, generator=shuffle, device="cpu").split(batch_size):
                xb, yb = x_train[rows], y_train[rows]

                def closure() -> torch.Tensor:
                    optimizer.zero_grad()
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    return loss

                loss = optimizer.step(closure)
                total += float(loss.detach()) * len(rows)
                count += len(rows)
            if log is not None and (epoch % log_every == 0 or epoch == epochs):
                log(
                    f"[{method:>8}] epoch {epoch:>3}/{epochs}  running train loss {total / count:.4f}  "
                    f"({time.perf_counter() - start:.1f} s)"
                )
        model.eval()
        with torch.no_grad():
            train_loss = float(F.cross_entropy(model(x_train), y_train))
            accuracy = float((model(x_test).argmax(dim=1) == y_test).float().mean())
        results.append(DemoResult(method, train_loss, accuracy, time.perf_counter() - start, model))
    return results


def _warm_up(
    methods: Sequence[str], x: torch.Tensor, y: torch.Tensor, lr: float, width: int, seed: int, steps: int = 3
) -> None:
    """A few untimed steps of every method on throwaway models, so that one-off costs (kernel
    selection, allocator growth, first-call dispatch) do not land on whichever method is timed
    first."""
    for method in methods:
        model = _model(seed, width)
        optimizer = _optimizer(method, model, lr, seed)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(steps):
            optimizer.step(closure)


def plot_demo(
    results: Sequence[DemoResult],
    path: str | Path,
    *,
    seed: int = 0,
    n_points: int = 1000,
    label_noise: float = 0.15,
) -> None:
    """Draw each method's decision regions over the noisy training spirals into an image file.

    One panel per method (title: held-out accuracy); needs matplotlib. The figure is drawn without
    pyplot: matplotlib's backend and pyplot's open figures are left as they are.

    Args:
        results: What :func:`run_demo` returned (each with its ``model``).
        path: The image file to write, in an existing folder (its suffix picks the format, e.g.
            ``.png``; any format that matplotlib's ``savefig`` writes).
        seed: The seed the demo ran with (the training points drawn are the same).
        n_points: Training points the demo used.
        label_noise: Share of flipped training labels the demo used (the points' colours are
            their training labels).

    Raises:
        ImportError: If matplotlib is not installed.
        TypeError: If ``results`` is not a sequence of :class:`DemoResult`, ``path`` not a path,
            ``seed`` or ``n_points`` not an integer, or ``label_noise`` not a real number.
        ValueError: If ``results`` is empty, a result has no model, ``path`` is not a file matplotlib
            can write (see above) or no file can be written there, ``n_points < 2``, ``seed`` is out
            of range or ``label_noise`` outside ``[0, 1]``.
    """
    results = _check_sequence("results", results, "a non-empty sequence of DemoResult (what run_demo returns)")
    for index, result in enumerate(results):
        if not isinstance(result, DemoResult):
            raise TypeError(f"results[{index}] must be a DemoResult, got {result!r}")
        if result.model is None:
            raise ValueError(
                f"results[{index}] must be a DemoResult with its model (as run_demo returns it), got {result!r}"
            )
    seed = _check_demo_seed("seed", seed)
    n_points = check_int("n_points", n_points, low=2)
    label_noise = check_real("label_noise", label_noise, low=0.0, high=1.0)
    _check_image_path("path", path)
    # A Figure of its own, not pyplot's: the caller's backend (a notebook's inline one) and figures
    # stay as they are.
    from matplotlib.figure import Figure

    x, y = make_spirals(n_points, label_noise=label_noise, seed=seed)
    extent = 1.05 * float(x.abs().max())
    grid = torch.linspace(-extent, extent, 241, dtype=torch.float32, device="cpu")
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    fig = Figure(figsize=(3.2 * len(results), 3.4))
    axes = fig.subplots(1, len(results), squeeze=False)
    for ax, result in zip(axes[0], results):
        with torch.no_grad():
            region = result.model(points).argmax(dim=1).reshape(xx.shape)  # type: ignore[misc]
        ax.contourf(xx, yy, region, levels=[-0.5, 0.5, 1.5], colors=["#c6dbef", "#fdd0a2"])
        ax.scatter(x[:, 0], x[:, 1], c=["#08519c" if label == 0 else "#d94801" for label in y.tolist()], s=3)
        ax.set_title(f"{result.method}: {100 * result.test_accuracy:.1f}% held-out", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"decision regions after training on spirals with {100 * label_noise:g}% flipped labels", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def format_table(results: Sequence[DemoResult]) -> str:
    """The results as a plain-text table (one row per method)."""
    lines = [
        f"{'method':<10} {'final train loss':>16} {'held-out accuracy':>17} {'time':>7}",
        "-" * 53,
    ]
    for result in results:
        lines.append(
            f"{result.method:<10} {result.train_loss:>16.4f} {100 * result.test_accuracy:>16.1f}% "
            f"{result.seconds:>6.1f}s"
        )
    return "\n".join(lines)


def _check_demo_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse, with ``parser``'s usage line and exit status 2, the arguments that would only fail
    during or after the training."""
    try:
        if args.epochs is not None:
            check_int("--epochs", args.epochs, low=1)
        if not 1 <= args.threads <= _MAX_THREADS:
            raise ValueError(f"--threads must be an integer in [1, 2**31 - 1], got {args.threads!r}")
        _check_demo_seed("--seed", args.seed)
        if args.plot is not None:
            _check_image_path("--plot", args.plot)
    except (TypeError, ValueError, ImportError) as error:
        parser.error(str(error))


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _check_demo_args(args, parser)
    settings: dict = dict(n_train=400, n_test=400, epochs=3, width=64, log_every=1) if args.quick else {}
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    settings["seed"] = args.seed

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    width = settings.get("width", 256)
    log(
        f"samgria demo: two spirals, {settings.get('n_train', 1000)} training points with 15% flipped labels, "
        f"a 2-{width}-{width}-2 ReLU MLP; momentum SGD as {', '.join(args.methods)}"
    )
    # The model is tiny: more threads only add synchronisation. The caller's count comes back after
    # (main called from Python, e.g. in a notebook).
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run_demo(methods=args.methods, log=log, **settings)
    finally:
        torch.set_num_threads(threads)
    print(format_table(results))
    if args.plot is not None:
        plot_demo(results, args.plot, seed=args.seed, n_points=settings.get("n_train", 1000))
        log(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m samgria`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m samgria",
        description="samgria: sharpness-aware training and meta-learning in torch.optim style.",
    )
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train a small classifier with plain SGD, SAM, ASAM and SAM+LAMP and compare them",
        description=(
            "Train a 2-256-256-2 MLP on two spirals with noisy training labels, with momentum SGD "
            "alone and inside SAM, ASAM and SAM+LAMP; print the final training loss and the "
            "held-out accuracy. Takes about 30 s on 2 CPU cores (one thread; measured 29 s with the machine shared)."
        ),
    )
    demo.add_argument("--quick", action="store_true", help="a few seconds: fewer points and epochs, a 2-64-64-2 MLP")
    demo.add_argument("--epochs", type=int, default=None, help="epochs per method (default 150, 3 with --quick)")
    demo.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the model is tiny)")
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help=(
            "seed of data, initialisation and shuffling, in [-2**63, 2**64 - 1] "
            "(seeds equal modulo 2**32 give the same run)"
        ),
    )
    demo.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to train (default: all)"
    )
    demo.add_argument(
        "--plot",
        metavar="PATH",
        default=None,
        help=(
            "also draw each method's decision regions into an image file in an existing folder; "
            "its suffix picks the format (.png, .pdf, .svg, ...; needs matplotlib)"
        ),
    )
    demo.set_defaults(handler=functools.partial(_demo, parser=demo))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Called from Python, it leaves torch's thread count (``--threads``) as it found it.
    """
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
