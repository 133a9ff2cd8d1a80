"""samgria is a typed package (PEP 561): a user's type checker reads its annotations.

* the installed package carries the marker ``samgria/py.typed``, and a wheel built from this tree
  ships it (``[options.package_data]`` in ``setup.cfg``);
* ``tests/data/typed_usage.py``, an annotated user script over the documented public API, runs,
  and mypy reports no error in it (each one would be a wrong annotation in samgria: an attribute
  set dynamically that the checker cannot see, a parameter annotated narrower than what the docs
  pass, a wrong return type), while a script with two typing mistakes gets exactly those two
  errors (so the annotations are really read, not taken as ``Any``).

mypy is in the ``test`` extra; without it the type check is skipped, except where the environment
variable ``CI`` is set: CI must run it.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
USAGE = ROOT / "tests" / "data" / "typed_usage.py"

#: What building the wheel reads besides the package (the optional ones where they exist).
PACKAGING_FILES = ("setup.cfg", "pyproject.toml", "README.rst")
OPTIONAL_PACKAGING_FILES = ("setup.py", "MANIFEST.in", "LICENSE", "LICENSE.txt")

#: Two typing mistakes, at known lines, against the annotations.
WRONG_USAGE = textwrap.dedent(
    """\
    from samgria import SAM, TransformingOptimizer


    def inner_of(optimizer: TransformingOptimizer) -> int:
        return optimizer.inner  # an Optimizer, not an int


    SAM(rho="large")  # rho is a float
    """
)
WRONG_USAGE_ERRORS = {(5, "return-value"), (8, "arg-type")}


def _with_root_on(variable: str) -> dict[str, str]:
    """The environment with the repository root first on the search path ``variable``."""
    env = dict(os.environ)
    env[variable] = os.pathsep.join(filter(None, [str(ROOT), env.get(variable)]))
    return env


def test_the_installed_package_carries_the_py_typed_marker():
    marker = importlib.resources.files("samgria").joinpath("py.typed")
    assert marker.is_file(), f"{marker} is missing: type checkers would ignore samgria's annotations (PEP 561)"


def _why_no_offline_wheel() -> str | None:
    """Why this environment cannot build samgria's wheel offline (``None``: it can).

    ``--no-build-isolation`` builds with what is installed: pyproject.toml's build requirements,
    setuptools >= 61 and wheel (setuptools >= 70.1 builds wheels on its own).
    """
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed"
    from setuptools import __version__ as version

    parts = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if parts < (61,):
        return f"setuptools {version} is older than 61 (pyproject.toml's build requirement)"
    if parts < (70, 1) and importlib.util.find_spec("wheel") is None:
        return f"wheel is not installed (setuptools {version} needs it to build wheels)"
    return None


def test_a_wheel_built_from_the_tree_ships_py_typed(tmp_path):
    reason = _why_no_offline_wheel()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"setuptools cannot build a wheel offline here, and CI must run this test: {reason}")
        pytest.skip(f"setuptools cannot build a wheel offline here: {reason}")
    # A copy of what the build reads: setuptools writes build/ and samgria.egg-info next to
    # setup.cfg, which must not land in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in PACKAGING_FILES + tuple(name for name in OPTIONAL_PACKAGING_FILES if (ROOT / name).exists()):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "samgria", source / "samgria", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    result = subprocess.run(
        [*command, "--wheel-dir", str(wheels), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout}\n{result.stderr}"
    (wheel,) = wheels.glob("samgria-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "samgria/__init__.py" in names and "samgria/meta/base.py" in names, sorted(names)
    shipped = sorted(name for name in names if not name.endswith(".py"))
    assert "samgria/py.typed" in names, f"{wheel.name} does not ship samgria/py.typed, only: {shipped}"


def test_the_typed_usage_script_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(USAGE)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=_with_root_on("PYTHONPATH"),  # this tree's samgria, as mypy checks it
    )
    assert result.returncode == 0, f"{USAGE.name} failed:\n{result.stdout}\n{result.stderr}"


def _require_mypy() -> None:
    if importlib.util.find_spec("mypy") is None:
        if os.environ.get("CI"):
            pytest.fail("mypy is not installed, and CI must run this test: pip install -e '.[test]'")
        pytest.skip("needs mypy (in the test extra: pip install -e '.[test]'); CI runs it")


@pytest.fixture(scope="module")
def mypy_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], list[tuple[str, int, str]], str]:
    """One mypy run over the package, the typed usage script and the script with two mistakes.

    One run instead of one per target: mypy analyses samgria in either case (the scripts import
    it), and that analysis is most of the time. ``--check-untyped-defs`` holds for all three (the
    scripts' module-level code is checked; samgria's functions are all annotated anyway).
    Returns the process, the errors as ``(file name, line, error code)`` and the printable output.
    """
    _require_mypy()
    directory = tmp_path_factory.mktemp("mypy")
    wrong = directory / "wrong_usage.py"
    wrong.write_text(WRONG_USAGE)
    command = [
        sys.executable, "-m", "mypy", "--check-untyped-defs", "--show-error-codes", "--no-color-output",
        "--cache-dir", str(directory / "mypy_cache"), "samgria", str(USAGE), str(wrong),
    ]  # fmt: skip
    start = time.perf_counter()
    # From the repository root: mypy reads the package's annotations from this tree's source (an
    # editable install would hide it behind an import hook).
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    elapsed = time.perf_counter() - start
    output = f"mypy ({elapsed:.1f} s, exit status {result.returncode}):\n{result.stdout}{result.stderr}"
    print(output)
    found = re.findall(r"^(.+?):(\d+): error: .*\[([a-z-]+)\]$", result.stdout, flags=re.MULTILINE)
    errors = [(path, int(line), code) for path, line, code in found]
    return result, errors, output


def test_mypy_finds_no_error_in_samgria_itself(mypy_run):
    """The package's code agrees with its own annotations (an annotation its code contradicts
    misleads its users' checkers, and mypy's errors inside the package were where ``None`` or a
    union went unhandled)."""
    result, errors, output = mypy_run
    in_package = [error for error in errors if Path(error[0]).parts[:1] == ("samgria",)]
    assert not in_package, f"mypy reports errors in samgria:\n{output}"
    assert "error:" not in result.stderr, output  # a crash or a configuration error


def test_mypy_finds_no_error_in_the_typed_usage_script(mypy_run):
    assert "type: ignore" not in USAGE.read_text(), f"{USAGE.name} must not silence mypy"
    result, errors, output = mypy_run
    in_usage = [line for path, line, _ in errors if Path(path).name == USAGE.name]
    in_wrong = {(line, code) for path, line, code in errors if Path(path).name == "wrong_usage.py"}
    assert not in_usage, f"mypy reports errors in {USAGE.name} (wrong annotations in samgria?)\n{output}"
    assert in_wrong == WRONG_USAGE_ERRORS, f"mypy does not read samgria's annotations as expected\n{output}"
    in_scripts = [error for error in errors if Path(error[0]).parts[:1] != ("samgria",)]
    assert result.returncode == 1 and len(in_scripts) == len(WRONG_USAGE_ERRORS), output
