"""benchmarks/generalization.py's statistics (the script itself is run by CI with --quick)."""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

pytest.importorskip("scipy", reason="the benchmark's extra (scikit-learn) brings scipy")


def _load_generalization():
    name = "_bench_generalization"
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / "generalization.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


# Two-sided 95% quantiles of Student's t (printed tables), by degrees of freedom.
T975 = {4: 2.776445, 11: 2.200985, 19: 2.093024, 30: 2.042272}


@pytest.mark.parametrize("df", sorted(T975))
def test_mean_ci_uses_students_t_for_every_seed_count(df: int) -> None:
    # 12 or more seeds (df >= 11) used the normal 1.96: an interval 5-12% too narrow.
    values = [0.9 + 0.01 * ((7 * i) % 5) for i in range(df + 1)]
    mean, half_width = _load_generalization().mean_ci(values)
    assert mean == pytest.approx(statistics.fmean(values))
    expected = T975[df] * statistics.stdev(values) / math.sqrt(len(values))
    assert half_width == pytest.approx(expected, rel=5e-4)


def test_mean_ci_of_one_seed_has_no_interval() -> None:
    mean, half_width = _load_generalization().mean_ci([0.5])
    assert mean == 0.5 and math.isnan(half_width)
