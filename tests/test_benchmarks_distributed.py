"""benchmarks/distributed.py's output (CI runs the script itself with --quick)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load_distributed() -> Any:
    name = "_bench_distributed"
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / "distributed.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def _meta_rows() -> dict[str, Any]:
    row = {"threads": 1, "speedup": 1.0, "cpu_ms_per_iteration": 10.0, "work_efficiency": 1.0, "max_dg": 0.0,
           "max_dw": 0.0, "local_tasks": 8}  # fmt: skip
    return {
        "1x1": {**row, "ranks": 1, "ms_per_iteration": 10.0, "efficiency": 1.0, "reduce_ms": None, "all_reduce_ms": None},
        "2x1": {**row, "ranks": 2, "ms_per_iteration": 8.0, "efficiency": 0.62, "reduce_ms": 1.0, "all_reduce_ms": 0.5},
    }


def test_quick_run_writes_the_files_a_full_run_writes_but_publishes_nothing(monkeypatch, tmp_path) -> None:
    # --quick (what CI runs) skipped write_results, so a broken figure or JSON surfaced only after a
    # full run of several minutes.
    distributed = _load_distributed()
    published: list[Any] = []
    meta = {"sinusoid": {"config": {}, "rows": _meta_rows(), "meta_grad_rtol": 1e-3}}
    sam = {"config": {}, "rows": {
        "1": {"ranks": 1, "ratio": 1.1, "extra_peak_shards": 1.0},
        "2": {"ranks": 2, "ratio": 1.0, "extra_peak_shards": 1.0},
    }}  # fmt: skip
    monkeypatch.setitem(distributed.SECTIONS, "meta", lambda args: meta)
    monkeypatch.setitem(distributed.SECTIONS, "sam", lambda args: sam)
    monkeypatch.setattr(distributed, "RESULTS", tmp_path)
    monkeypatch.setattr(distributed, "publish_figures", published.append)
    distributed.main(["--quick"])
    written = json.loads((tmp_path / "distributed.json").read_text())
    assert written["quick"] is True and written["meta"] == meta and written["sam"] == sam
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "distributed.png").stat().st_size > 0
    assert published == []  # the docs' figure comes from full runs only


def test_full_run_publishes_its_figure(monkeypatch, tmp_path) -> None:
    distributed = _load_distributed()
    published: list[Any] = []
    monkeypatch.setitem(distributed.SECTIONS, "meta", lambda args: {"sinusoid": {"rows": _meta_rows()}})
    monkeypatch.setitem(distributed.SECTIONS, "sam", lambda args: {"rows": {"1": {"ranks": 1, "ratio": 1.1,
                                                                                  "extra_peak_shards": 1.0}}})
    monkeypatch.setattr(distributed, "RESULTS", tmp_path)
    monkeypatch.setattr(distributed, "publish_figures", published.append)
    distributed.main([])
    assert published == [{tmp_path / "distributed.png": "distributed.png"}]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "distributed.png").is_file()
