"""Where a full benchmark run publishes its figures: ``docs/images/`` (tracked in git), which the
docs' benchmarks page shows. Runs of part of a benchmark (``--quick``, one model) keep theirs under
``benchmarks/results/`` only, so the page never shows a partial run."""

from __future__ import annotations

import shutil
from pathlib import Path

DOCS_IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"


def publish_figures(figures: dict[Path, str]) -> None:
    """Copy each written figure (``{path under benchmarks/results: name under docs/images}``) to
    the docs' images; a figure that was not written (no matplotlib) is skipped."""
    written = {source: name for source, name in figures.items() if source.is_file()}
    if not written:
        return
    DOCS_IMAGES.mkdir(exist_ok=True)
    for source, name in written.items():
        shutil.copyfile(source, DOCS_IMAGES / name)
    print(f"copied to {DOCS_IMAGES}: {', '.join(written.values())}")
