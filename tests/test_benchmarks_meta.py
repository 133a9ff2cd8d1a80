"""benchmarks/meta_throughput.py and meta_memory.py: their own-process step counts (CI runs the
scripts themselves with --quick)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(script: str) -> Any:
    name = f"_bench_{script}"
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.mark.parametrize(("script", "least"), [("meta_throughput", 5), ("meta_memory", 2)])
def test_memory_steps_too_few_for_what_the_row_reports_are_refused(script: str, least: int, capsys) -> None:
    # meta_throughput reports vectorize=None's steps after its 4 trials, both report the steps
    # after the first: with fewer steps (1 to 4) they printed a trial or the first step under
    # that label.
    module = _load(script)
    with pytest.raises(SystemExit):
        module.parse_args(["--memory-steps", str(least - 1)])
    assert f"argument --memory-steps: must be 0 or an integer >= {least}, got {least - 1}" in capsys.readouterr().err
    assert module.parse_args(["--memory-steps", str(least)]).memory_steps == least
    assert module.parse_args(["--memory-steps", "0"]).memory_steps == 0  # skips the own processes
