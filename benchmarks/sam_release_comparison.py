"""SAM step time of this checkout against an earlier release of samgria, paired in one process.

``benchmarks/sam_overhead.py`` reports time ratios to a plain two-pass step; whether a change made
SAM's step faster or slower than a given release is a ratio of two such ratios, and both must come
from the same process: processes differ by more than most changes are worth (heap layout, other
work on the machine). This script extracts the package as it was at ``--rev`` (``git archive``,
renamed to ``samgria_at_<rev>`` with its own imports rewritten, into a temporary directory), adds
its ``TransformingOptimizer`` + ``SAM`` -- ``step(closure)`` and the two-call loop -- as variants
beside every variant of ``sam_overhead.py`` (the same models, data, inner optimizer, closure and
timing functions), and runs, in each of ``--processes`` fresh processes:

* the round-robin timing of ``sam_overhead.time_variants`` (``round_robin_times``: every step
  starts with the caches full of another variant's model), and
* ``--blocks`` rounds of the steady-state timing of ``sam_overhead.time_in_a_row``
  (``in_a_row_times``: 8 steps per variant and round, the first one untimed).

It prints, per process, each samgria variant's ratio to the floor and the paired ratio
*this checkout / the release* (median over rounds of the per-round quotient), then the range and
the median over processes. The default ``--rev`` is the release the core-contracts issue was filed on.

Usage::

    python benchmarks/sam_release_comparison.py --quick            # CI: one short process
    python benchmarks/sam_release_comparison.py --processes 5      # what docs/benchmarks.rst reports
    python benchmarks/sam_release_comparison.py --rev <commit> --model conv

Needs ``git`` and the revision in this clone; without them it says so and exits (with status 0
under ``--quick``, 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checks import int_at_least, number_in  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: The release the core-contracts issue (TransformingOptimizer keeps every torch.optim contract)
#: was filed on.
FILING_RELEASE = "f31c715"
_IMPORT = re.compile(r"^(\s*)(from|import)\s+samgria\b", re.MULTILINE)
#: (label, this checkout's variant, the release's variant)
PAIRS = [
    ("step(closure)", "samgria step(closure)", "release step(closure)"),
    ("two-call loop", "samgria first/second_step", "release first/second_step"),
]


def extract_release(rev: str, into: Path) -> str:
    """Write the ``samgria`` package at ``rev`` to ``into/samgria_at_<rev>``; return that name.

    Raises:
        RuntimeError: ``git`` failed (no git, not a clone, or ``rev`` unknown here).
    """
    name = "samgria_at_" + re.sub(r"\W", "_", rev)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "samgria"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {rev} failed: {archive.stderr.decode(errors='replace').strip()}")
    unpack = into / "unpack"
    unpack.mkdir()
    subprocess.run(["tar", "-x", "-C", str(unpack)], input=archive.stdout, check=True)
    package = into / name
    shutil.move(str(unpack / "samgria"), str(package))
    for source in package.rglob("*.py"):
        text = source.read_text()
        source.write_text(_IMPORT.sub(lambda match: f"{match[1]}{match[2]} {name}", text))
    return name


def _worker(package_dir: str, package: str, model: str, rounds: int, seconds: float, blocks: int) -> dict[str, Any]:
    """One process: every sam_overhead variant plus the release's, timed both ways."""
    import importlib

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, package_dir)
    import sam_overhead as harness

    release = importlib.import_module(package)

    class ReleaseClosure(harness.SamgriaClosure):
        def build(self) -> torch.optim.Optimizer:
            return release.TransformingOptimizer(
                self.model.parameters(),
                torch.optim.SGD,
                lr=harness.LR,
                momentum=harness.MOMENTUM,
                transforms=[release.SAM(rho=harness.RHO)],
            )

    class ReleaseTwoCall(ReleaseClosure):
        step = harness.SamgriaTwoCall.step

    harness.VARIANTS["release step(closure)"] = ReleaseClosure
    harness.VARIANTS["release first/second_step"] = ReleaseTwoCall
    variants = harness.build_variants(model)
    round_robin = harness.round_robin_times(variants, rounds, seconds, warmup=3, enough=lambda timed: timed >= 3)
    in_a_row = harness.in_a_row_times(variants, harness.IN_A_ROW, blocks, seconds=math.inf, min_rounds=blocks)
    return {
        "round_robin": _summary(round_robin, harness.BASELINE),
        "in_a_row": _summary(in_a_row, harness.BASELINE),
    }


def _summary(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    result = {}
    for label, ours, theirs in PAIRS:
        result[label] = {
            "samgria": statistics.median(a / b for a, b in zip(times[ours], times[baseline])),
            "release": statistics.median(a / b for a, b in zip(times[theirs], times[baseline])),
            "paired": statistics.median(a / b for a, b in zip(times[ours], times[theirs])),
        }
    return result


def _run_process(package_dir: Path, package: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--worker", str(package_dir), package,
        "--model", args.model, "--rounds", str(args.rounds), "--seconds", str(args.seconds),
        "--blocks", str(args.blocks),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"a measuring process failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_process(index: int, result: dict[str, Any]) -> None:
    for timing in ("round_robin", "in_a_row"):
        for label, _, _ in PAIRS:
            row = result[timing][label]
            print(
                f"process {index}  {timing:11s}  {label:14s}  samgria {row['samgria']:.3f}  "
                f"release {row['release']:.3f}  paired samgria/release {row['paired']:.3f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short process (CI)")
    parser.add_argument("--rev", default=FILING_RELEASE, help=f"the release to compare with (default {FILING_RELEASE})")
    parser.add_argument("--model", choices=["mlp", "conv"], default="mlp")
    parser.add_argument("--processes", type=int_at_least(1), default=None, help="fresh processes (default 3, 1 quick)")
    parser.add_argument("--rounds", type=int_at_least(1), default=None,
                        help="most round-robin rounds per process (default 200, 4 quick)")  # fmt: skip
    parser.add_argument("--seconds", type=number_in(0.0), default=None,
                        help="round-robin time budget per process (default 60, 5 quick)")  # fmt: skip
    parser.add_argument("--blocks", type=int_at_least(1), default=None, help="in-a-row rounds per process (default 30, 1 quick)")
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: one process
    args = parser.parse_args(argv)
    args.processes = args.processes or (1 if args.quick else 3)
    args.rounds = args.rounds or (4 if args.quick else 200)
    args.seconds = args.seconds if args.seconds is not None else (5.0 if args.quick else 60.0)
    args.blocks = args.blocks or (1 if args.quick else 30)
    if args.worker is not None:
        package_dir, package = args.worker
        print(json.dumps(_worker(package_dir, package, args.model, args.rounds, args.seconds, args.blocks)))
        return 0

    with tempfile.TemporaryDirectory() as scratch:
        try:
            package = extract_release(args.rev, Path(scratch))
        except (RuntimeError, OSError) as error:
            print(f"cannot compare with {args.rev}: {error}")
            return 0 if args.quick else 1
        print(
            f"{args.model}: this checkout against samgria at {args.rev}, {args.processes} process(es), "
            f"up to {args.rounds} round-robin rounds and {args.blocks} in-a-row rounds each"
        )
        results = []
        for index in range(args.processes):
            results.append(_run_process(Path(scratch), package, args))
            _print_process(index, results[-1])
    print("\n".join(over_processes(results)))
    return 0


def over_processes(results: list[dict[str, Any]]) -> list[str]:
    """The summary lines: per timing, pair and ratio, its range and median over the processes."""
    lines = ["range over processes (min-max) and median:"]
    for timing in ("round_robin", "in_a_row"):
        for label, _, _ in PAIRS:
            parts = []
            for key in ("samgria", "release", "paired"):
                values = [result[timing][label][key] for result in results]
                parts.append(f"{key} {min(values):.3f}-{max(values):.3f} ({statistics.median(values):.3f})")
            lines.append(f"  {timing:11s}  {label:14s}  " + "  ".join(parts))
    return lines


if __name__ == "__main__":
    sys.exit(main())
