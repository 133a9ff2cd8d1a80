"""benchmarks/sam_release_comparison.py's summary over processes (CI runs the script with --quick)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load() -> Any:
    name = "_bench_sam_release_comparison"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / "sam_release_comparison.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_summary_gives_the_median_over_processes_the_docs_quote() -> None:
    # docs/benchmarks.rst quotes medians over processes; the summary printed only min-max.
    comparison = _load()
    paired = [1.10, 1.04, 1.09, 1.05, 1.08]  # median 1.08
    results = [
        {timing: {label: {"samgria": 1.1 + i / 100, "release": 1.0, "paired": p} for label, _, _ in comparison.PAIRS}
         for timing in ("round_robin", "in_a_row")}
        for i, p in enumerate(paired)
    ]  # fmt: skip
    lines = comparison.over_processes(results)
    rows = [line for line in lines if "step(closure)" in line]
    assert len(rows) == 2  # round-robin and in a row
    for row in rows:
        assert "paired 1.040-1.100 (1.080)" in row
        assert "samgria 1.100-1.140 (1.120)" in row
        assert "release 1.000-1.000 (1.000)" in row
