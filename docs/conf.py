"""Sphinx configuration of the samgria documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (warnings are errors).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import the package from this checkout (no install needed to build the docs).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import samgria  # noqa: E402

project = "samgria"
author = "the samgria authors"
copyright = "2025, the samgria authors"
release = samgria.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax bundled into the built pages (no CDN): the math renders offline.
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
]

# Google-style docstrings.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_include_init_with_doc = False
napoleon_use_rtype = False

autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
autodoc_default_options = {"show-inheritance": True}

# Unresolved cross-references (torch, typing) are not errors: no intersphinx (no network).
nitpicky = False

templates_path: list[str] = []
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "examples"]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
pygments_style = "sphinx"

html_theme = "sphinx_rtd_theme"
html_title = f"samgria {release}"
html_static_path: list[str] = []
html_theme_options = {"navigation_depth": 3}
