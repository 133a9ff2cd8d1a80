"""benchmarks/sam_overhead.py's printed units (CI runs the script itself with --quick)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load() -> Any:
    name = "_bench_sam_overhead"
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / "sam_overhead.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_parameter_size_is_labelled_in_the_unit_it_is_computed_in(capsys) -> None:
    # bytes / 2**20 was printed as "MB" (5.03 "MB" for the MLP's 5.27 MB): 2**20 bytes are a MiB.
    sam_overhead = _load()
    row = {"peak_x_params": [1.0], "peak_over_plain_x_params": 0.0, "live_peak_over_plain_x_params": 0.0,
           "live_kept_over_plain_x_params": 0.0, "ms": 1.0, "time_ratio": 1.0}  # fmt: skip
    sam_overhead.print_process_peaks({"param_bytes": 5 * 2**20, "reps": 1, "steps": 1, "variants": {"x": row}})
    assert "5.00 MiB of parameters" in capsys.readouterr().out
