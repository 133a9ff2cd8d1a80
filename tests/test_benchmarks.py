"""The benchmark scripts' own computations and outputs (CI runs each script itself with --quick):
``distributed.py``'s files, ``generalization.py``'s intervals, ``meta_throughput.py`` and
``meta_memory.py``'s step counts, ``sam_overhead.py``'s units and ``sam_release_comparison.py``'s
summary."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(script: str) -> ModuleType:
    """``benchmarks/<script>.py`` as a module (once per session), with ``benchmarks/`` on the path
    while it runs its imports (its helper modules, ``_checks`` and the like)."""
    name = f"_bench_{script}"
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{script}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it runs
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


# -- distributed.py ----------------------------------------------------------------------------------
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
    distributed = load_benchmark("distributed")
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
    distributed = load_benchmark("distributed")
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


# -- generalization.py -------------------------------------------------------------------------------
def _generalization() -> ModuleType:
    pytest.importorskip("scipy", reason="generalization.py's intervals need scipy (the bench extra)")
    return load_benchmark("generalization")


# Two-sided 95% quantiles of Student's t (printed tables), by degrees of freedom.
T975 = {4: 2.776445, 11: 2.200985, 19: 2.093024, 30: 2.042272}


@pytest.mark.parametrize("df", sorted(T975))
def test_mean_ci_uses_students_t_for_every_seed_count(df: int) -> None:
    # 12 or more seeds (df >= 11) used the normal 1.96: an interval 5-12% too narrow.
    values = [0.9 + 0.01 * ((7 * i) % 5) for i in range(df + 1)]
    mean, half_width = _generalization().mean_ci(values)
    assert mean == pytest.approx(statistics.fmean(values))
    expected = T975[df] * statistics.stdev(values) / math.sqrt(len(values))
    assert half_width == pytest.approx(expected, rel=5e-4)


def test_mean_ci_of_one_seed_has_no_interval() -> None:
    mean, half_width = _generalization().mean_ci([0.5])
    assert mean == 0.5 and math.isnan(half_width)


# -- meta_throughput.py, meta_memory.py ---------------------------------------------------------------
@pytest.mark.parametrize(("script", "least"), [("meta_throughput", 5), ("meta_memory", 2)])
def test_memory_steps_too_few_for_what_the_row_reports_are_refused(script: str, least: int, capsys) -> None:
    # meta_throughput reports vectorize=None's steps after its 4 trials, both report the steps
    # after the first: with fewer steps (1 to 4) they printed a trial or the first step under
    # that label.
    module = load_benchmark(script)
    with pytest.raises(SystemExit):
        module.parse_args(["--memory-steps", str(least - 1)])
    assert f"argument --memory-steps: must be 0 or an integer >= {least}, got {least - 1}" in capsys.readouterr().err
    assert module.parse_args(["--memory-steps", str(least)]).memory_steps == least
    assert module.parse_args(["--memory-steps", "0"]).memory_steps == 0  # skips the own processes


# -- sam_overhead.py ---------------------------------------------------------------------------------
def test_parameter_size_is_labelled_in_the_unit_it_is_computed_in(capsys) -> None:
    # bytes / 2**20 was printed as "MB" (5.03 "MB" for the MLP's 5.27 MB): 2**20 bytes are a MiB.
    sam_overhead = load_benchmark("sam_overhead")
    row = {"peak_x_params": [1.0], "peak_over_plain_x_params": 0.0, "live_peak_over_plain_x_params": 0.0,
           "live_kept_over_plain_x_params": 0.0, "ms": 1.0, "time_ratio": 1.0}  # fmt: skip
    sam_overhead.print_process_peaks({"param_bytes": 5 * 2**20, "reps": 1, "steps": 1, "variants": {"x": row}})
    assert "5.00 MiB of parameters" in capsys.readouterr().out


# -- sam_release_comparison.py -----------------------------------------------------------------------
def test_summary_gives_the_median_over_processes_the_docs_quote() -> None:
    # docs/benchmarks.rst quotes medians over processes; the summary printed only min-max.
    comparison = load_benchmark("sam_release_comparison")
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
