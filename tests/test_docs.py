"""The documentation is executed, complete and builds cleanly.

* every ``docs/examples/*.py`` runs (in-process; the DDP and FSDP2 examples as scripts with 2
  gloo ranks)
  and is shown in the guides through ``literalinclude``;
* every ``.. code-block:: python`` in ``README.rst`` and ``docs/*.rst`` runs;
* ``docs/api.rst`` documents every name of ``samgria.__all__`` (and nothing else), and the API
  reference (``docs/api.rst`` and ``docs/integrations.rst``) every name in the ``__all__`` of every
  public module (``samgria.__main__`` included);
* ``python -m sphinx -W --keep-going -b html docs <tmp>`` succeeds and renders every name, and
  every cross-reference of a guide to a samgria object resolves (Sphinx renders one it cannot
  resolve as plain text, without a warning: ``nitpicky`` is off);
* ``docs/getting_started.rst`` shows the README's two commands verbatim;
* the AMP example uses the recipe of ``tests/test_optim_amp.py`` unchanged.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pkgutil
import re
import runpy
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import pytest
import torch

import samgria

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))
GUIDES = sorted(DOCS.glob("*.rst"))
#: Examples that start processes: run as a script in a subprocess, not in-process.
SCRIPT_EXAMPLES = {"optim_ddp.py", "optim_fsdp.py"}

_CODE_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. (?:code-block|code|sourcecode):: (?:python3?|py)\s*$")
_API_DIRECTIVE = re.compile(
    r"^\.\. (?:autoclass|autofunction|autodata|py:data|py:class|py:function):: samgria\.(?P<name>\w+)\s*$",
    re.MULTILINE,
)
_LITERALINCLUDE = re.compile(r"^\s*\.\. literalinclude:: (?P<path>\S+)\s*$", re.MULTILINE)


def python_code_blocks(text: str) -> list[str]:
    """The bodies of every ``.. code-block:: python`` directive in an RST text, dedented."""
    lines = text.splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        match = _CODE_BLOCK.match(lines[index])
        index += 1
        if match is None:
            continue
        indent = len(match.group("indent").expandtabs())
        # Directive options (":caption: ...") and the blank line before the body.
        while index < len(lines) and (not lines[index].strip() or lines[index].strip().startswith(":")):
            index += 1
        body = []
        while index < len(lines) and (
            not lines[index].strip() or len(lines[index].expandtabs()) - len(lines[index].lstrip()) > indent
        ):
            body.append(lines[index])
            index += 1
        blocks.append(textwrap.dedent("\n".join(body)).strip() + "\n")
    return blocks


def _readme_commands() -> list[str]:
    """The shell commands of README.rst's literal blocks (the install-and-run lines)."""
    readme = (ROOT / "README.rst").read_text()
    return [m.group(1) for m in re.finditer(r"^ {4}(pip install .+?)\s*$", readme, re.MULTILINE)]


@pytest.fixture(autouse=True)
def _one_thread():
    """The examples use tiny models: one intra-op thread is as fast and immune to a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- (1) the examples run ----------------------------------------------------------------------
def test_examples_are_found() -> None:
    names = {path.name for path in EXAMPLES}
    assert len(names) >= 10, names
    assert SCRIPT_EXAMPLES <= names


@pytest.mark.parametrize(
    "path", [p for p in EXAMPLES if p.name not in SCRIPT_EXAMPLES], ids=lambda p: p.stem
)
def test_example_runs(path: Path) -> None:
    # Examples assert their own results; a warning in an example is a defect too.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runpy.run_path(str(path), run_name="__main__")


def test_ddp_example_runs_with_two_gloo_processes() -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, str(DOCS / "examples" / "optim_ddp.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DDP SAM equals one process on the global batch" in result.stdout


def test_fsdp_example_runs_under_torchrun_with_two_gloo_ranks() -> None:
    from distributed_harness import run_ranks, skip_without_gloo

    skip_without_gloo()
    outputs = run_ranks(DOCS / "examples" / "optim_fsdp.py", 2)
    assert "FSDP2 SAM+LAMP on 2 ranks: the resumed run continued bit for bit" in outputs[0]


def test_every_example_is_shown_and_every_include_exists() -> None:
    included = set()
    for guide in GUIDES:
        for match in _LITERALINCLUDE.finditer(guide.read_text()):
            target = (guide.parent / match.group("path")).resolve()
            assert target.is_file(), f"{guide.name} includes a missing file {match.group('path')}"
            included.add(target)
    shown_nowhere = [path.name for path in EXAMPLES if path.resolve() not in included]
    assert not shown_nowhere, f"examples no guide shows: {shown_nowhere}"


# -- (2) every code block in README.rst and docs/*.rst runs ------------------------------------
def test_code_block_extraction() -> None:
    text = "Intro\n\n.. code-block:: python\n   :caption: x\n\n   a = 1\n\n   b = a + 1\n\nAfter\n"
    assert python_code_blocks(text) == ["a = 1\n\nb = a + 1\n"]
    assert python_code_blocks("::\n\n    pip install x\n") == []


def _documented_blocks() -> list[tuple[str, str]]:
    blocks = []
    for path in [ROOT / "README.rst", *GUIDES]:
        for number, block in enumerate(python_code_blocks(path.read_text())):
            blocks.append((f"{path.name}#{number}", block))
    return blocks


def test_readme_has_a_python_example() -> None:
    assert any(name.startswith("README.rst#") for name, _ in _documented_blocks())


@pytest.mark.parametrize("name,source", _documented_blocks(), ids=[n for n, _ in _documented_blocks()])
def test_code_block_runs(name: str, source: str) -> None:
    code = compile(source, name, "exec")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(code, {"__name__": "__main__"})


def test_docs_have_no_doctest_prompts() -> None:
    for path in GUIDES:
        assert ">>>" not in path.read_text(), f"{path.name}: examples live in docs/examples/, not doctests"


# -- (3) the API reference lists every public name ---------------------------------------------
#: Subpackages whose ``__all__`` holds names that ``samgria`` does not re-export.
_SUBPACKAGES = ("samgria.data", "samgria.functional", "samgria.meta", "samgria.transforms")
_AUTOMODULE = re.compile(r"^\.\. automodule:: (?P<module>[\w.]+)\n(?:   :[\w-]+:.*\n)*?   :members: (?P<members>.*)$", re.MULTILINE)


def _subpackage_only_names() -> list[str]:
    """``"samgria.sub.name"`` for each name of a subpackage's ``__all__`` not in ``samgria.__all__``."""
    names = []
    for module in _SUBPACKAGES:
        exported = importlib.import_module(module).__all__
        names += [f"{module}.{name}" for name in exported if name not in samgria.__all__]
    return names


def test_integrations_page_documents_every_integration_name() -> None:
    """Each name in an integration module's ``__all__`` has its autodoc directive on the
    integrations page. ``__all__`` is read from the source (ast), so the check runs without the
    frameworks installed."""
    import ast

    text = (DOCS / "integrations.rst").read_text()
    documented = set(re.findall(r"^\.\. auto(?:class|function):: ([\w.]+)$", text, re.MULTILINE))
    expected = set()
    for path in sorted((ROOT / "samgria" / "integrations").glob("[!_]*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                expected |= {f"samgria.integrations.{path.stem}.{name}" for name in ast.literal_eval(node.value)}
    assert len(expected) >= 7  # lightning, transformers and accelerate export these
    missing = sorted(expected - documented)
    assert not missing, f"integration names missing from docs/integrations.rst: {missing}"


def test_api_reference_lists_every_subpackage_name() -> None:
    text = (DOCS / "api.rst").read_text()
    documented = {
        f"{match['module']}.{name.strip()}" for match in _AUTOMODULE.finditer(text) for name in match["members"].split(",")
    }
    missing = sorted(set(_subpackage_only_names()) - documented)
    assert not missing, f"subpackage names missing from docs/api.rst: {missing}"


def test_api_reference_lists_every_public_name() -> None:
    documented = _API_DIRECTIVE.findall((DOCS / "api.rst").read_text())
    missing = sorted(set(samgria.__all__) - set(documented))
    unknown = sorted(set(documented) - set(samgria.__all__))
    duplicated = sorted({name for name in documented if documented.count(name) > 1})
    assert not missing, f"public names missing from docs/api.rst: {missing}"
    assert not unknown, f"docs/api.rst documents names that are not in samgria.__all__: {unknown}"
    assert not duplicated, f"documented twice: {duplicated}"


#: An autodoc (or ``py:``) directive naming an object by its dotted path.
_OBJECT_DIRECTIVE = re.compile(
    r"^[ \t]*\.\. (?:auto(?:class|function|data|exception)|py:(?:class|function|data))::[ \t]*(?P<path>[\w.]+)[ \t]*$",
    re.MULTILINE,
)


def _public_modules() -> list[str]:
    """``samgria``, ``samgria.__main__`` (``python -m samgria``, whose functions its ``__all__`` offers
    to Python callers) and every module under ``samgria`` without an underscore-prefixed component."""
    names = ["samgria", "samgria.__main__"]

    def refuse(name: str) -> None:
        raise ImportError(f"pkgutil.walk_packages could not import {name}")

    for info in pkgutil.walk_packages(samgria.__path__, "samgria.", onerror=refuse):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def _resolve(path: str) -> object:
    """The object a dotted path names, as autodoc finds it: each part an attribute of the one
    before (``samgria.data.sinusoid`` is the function), a submodule where it is none."""
    parts = path.split(".")
    target: object = importlib.import_module(parts[0])
    for index, part in enumerate(parts[1:], start=2):
        if hasattr(target, part):
            target = getattr(target, part)
        else:
            target = importlib.import_module(".".join(parts[:index]))
    return target


def _reference_paths() -> set[str]:
    """The dotted paths the API reference documents: the directives of ``docs/api.rst`` and
    ``docs/integrations.rst`` and the ``:members:`` of their ``automodule`` directives."""
    paths = set()
    for page in ("api.rst", "integrations.rst"):
        text = (DOCS / page).read_text()
        paths |= {match["path"] for match in _OBJECT_DIRECTIVE.finditer(text)}
        paths |= {
            f"{match['module']}.{name.strip()}" for match in _AUTOMODULE.finditer(text) for name in match["members"].split(",")
        }
    return paths


def test_api_reference_documents_the_all_of_every_public_module() -> None:
    """Every name in the ``__all__`` of a public module has an entry in the API reference, under its
    own path or under another path with the same last name that is the same object
    (``samgria.meta.engine.InnerLoop`` as ``samgria.InnerLoop``)."""
    modules = _public_modules()
    assert len(modules) >= 30 and "samgria.transforms.chain" in modules, modules
    documented: dict[str, list[object]] = {}
    for path in _reference_paths():
        documented.setdefault(path.rsplit(".", 1)[-1], []).append(_resolve(path))
    missing = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            if not any(value is entry for entry in documented.get(name, ())):
                missing.append(f"{module_name}.{name}")
    assert not missing, (
        "names in a public module's __all__ with no entry in docs/api.rst or docs/integrations.rst "
        f"(document them, or take internal helpers out of __all__): {missing}"
    )


# -- (4) the site builds with warnings as errors -----------------------------------------------
#: A cross-reference role to a samgria object: ``:func:`~samgria.inner_step```, ``:mod:`samgria.meta```.
_SAMGRIA_ROLE = re.compile(r":(?:py:)?(?:mod|func|class|meth|attr|data|obj|exc):`~?(?P<target>samgria(?:\.\w+)*)`")


def _inventory_python_names(path: Path) -> set[str]:
    """The Python objects a built site registers in its ``objects.inv`` (version 2: four header
    lines, then zlib-compressed ``name domain:role priority uri dispname`` lines), canonical paths
    included: the names a ``:func:`` or ``:class:`` role resolves to."""
    with path.open("rb") as stream:
        for _ in range(4):
            stream.readline()
        lines = zlib.decompress(stream.read()).decode().splitlines()
    return {match[1] for match in (re.match(r"(\S+) py:\w+ ", line) for line in lines) if match}


def test_role_extraction() -> None:
    text = ":func:`~samgria.inner_step`, :mod:`samgria.meta` and :class:`torch.optim.SGD`"
    assert [m["target"] for m in _SAMGRIA_ROLE.finditer(text)] == ["samgria.inner_step", "samgria.meta"]


def test_sphinx_build_has_no_warnings(tmp_path: Path) -> None:
    if importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("sphinx_rtd_theme") is None:
        pytest.skip("sphinx and sphinx-rtd-theme are not installed (pip install -e '.[docs]')")
    out = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (out / "api.html").read_text()
    not_rendered = [name for name in samgria.__all__ if f'id="samgria.{name}"' not in api]
    not_rendered += [name for name in _subpackage_only_names() if f'id="{name}"' not in api]
    assert not not_rendered, f"api.html has no entry for {not_rendered}"
    for page in ("index", "getting_started", "optimizer_guide", "meta_guide", "benchmarks"):
        assert (out / f"{page}.html").is_file(), page
    # A role Sphinx cannot resolve renders as plain text, silently: a function documented as
    # samgria.inner_step is not found as samgria.meta.functional.inner_step.
    registered = _inventory_python_names(out / "objects.inv")
    assert "samgria.inner_step" in registered and "samgria.meta.learner.Learner" in registered
    unresolved = sorted(
        {
            f"{guide.name}: {match['target']}"
            for guide in GUIDES
            for match in _SAMGRIA_ROLE.finditer(guide.read_text())
            if match["target"] not in registered
        }
    )
    assert not unresolved, f"cross-references to no documented object (rendered as plain text): {unresolved}"
    # The math renders offline: MathJax is bundled into the build, never loaded from a CDN.
    guide = (out / "meta_guide.html").read_text()
    scripts = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', guide, flags=re.IGNORECASE)
    assert scripts, "meta_guide.html loads no MathJax"
    for src in scripts:
        assert not src.startswith(("http:", "https:", "//")), src
        assert (out / src).is_file(), src


# -- (5) getting started shows the README's commands -------------------------------------------
def test_getting_started_shows_the_readme_commands_verbatim() -> None:
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert "python -m samgria demo" in commands[0]
    assert "python -m pytest" in commands[1]
    page = (DOCS / "getting_started.rst").read_text()
    for command in commands:
        assert command in page, f"getting_started.rst lacks {command!r}"


# -- the AMP example is the tested recipe ------------------------------------------------------
def _function_source(path: Path, name: str) -> str:
    source = path.read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(source, node) or ""
    raise AssertionError(f"{path.name} defines no {name}()")


def test_amp_example_uses_the_tested_recipe() -> None:
    tested = _function_source(ROOT / "tests" / "test_optim_amp.py", "amp_sam_step")
    shown = _function_source(DOCS / "examples" / "optim_amp.py", "amp_sam_step")
    assert shown == tested


#: Run in a second process while this one runs the other methods (one thread each: the demo's
#: numbers are those of one thread, and the suite's process leaves the second core idle then).
_DEMO_IN_SECOND_PROCESS = ("SAM+LAMP", "plain")
_DEMO_CHILD = textwrap.dedent(
    """\
    import json, sys
    import torch
    torch.set_num_threads(1)
    from samgria.__main__ import run_demo
    results = run_demo(methods=json.loads(sys.argv[1]))
    print(json.dumps([[r.method, r.train_loss, r.test_accuracy] for r in results]))
    """
)


def test_getting_started_shows_the_demo_table_of_the_default_run() -> None:
    """The page says its table's losses and accuracies are the same on every run: they must be
    those of ``python -m samgria demo`` (run_demo's defaults, seed 0, one thread), rounded as the
    demo prints them. Every method trains alone from the same seed, so the methods are split
    between this process and a second one."""
    import json

    from samgria.__main__ import METHODS, run_demo

    text = (DOCS / "getting_started.rst").read_text()
    rows = re.findall(r"^\s+(plain|SAM|ASAM|SAM\+LAMP)\s+(\d\.\d{4})\s+(\d+\.\d)%\s+\d+\.\ds$", text, re.MULTILINE)
    assert [method for method, _, _ in rows] == list(METHODS) == ["plain", "SAM", "ASAM", "SAM+LAMP"], rows
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen(
        [sys.executable, "-c", _DEMO_CHILD, json.dumps(_DEMO_IN_SECOND_PROCESS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = [method for method in METHODS if method not in _DEMO_IN_SECOND_PROCESS]
        results = {r.method: (r.train_loss, r.test_accuracy) for r in run_demo(methods=here)}
    finally:
        torch.set_num_threads(threads)
        out, err = child.communicate()
    assert child.returncode == 0, f"the demo's second process failed:\n{out}\n{err}"
    results.update({method: (loss, accuracy) for method, loss, accuracy in json.loads(out)})
    shown = [(method, loss, accuracy) for method, loss, accuracy in rows]
    ran = [(method, f"{results[method][0]:.4f}", f"{100 * results[method][1]:.1f}") for method in METHODS]
    assert shown == ran
