"""Tests for ``python -m samgria`` (the demo command line) and its spiral data set."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import samgria.__main__
from samgria.__main__ import METHODS, DemoResult, format_table, main, make_spirals, plot_demo, run_demo

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The demo's models are tiny: extra threads only add synchronisation (and restore after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ROW = re.compile(r"^(plain|SAM|ASAM|SAM\+LAMP)\s+(\d+\.\d{4})\s+(\d+\.\d)%\s+(\d+\.\d)s$")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "samgria", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO_ROOT,
    )


# -- the command line, as a user runs it -----------------------------------------------------------
def test_demo_quick_prints_a_row_per_method_and_progress() -> None:
    completed = _run("demo", "--quick")
    assert completed.returncode == 0, completed.stderr
    rows = [ROW.match(line) for line in completed.stdout.splitlines()]
    rows = [row for row in rows if row is not None]
    assert [row.group(1) for row in rows] == list(METHODS)
    for row in rows:
        loss, accuracy = float(row.group(2)), float(row.group(3))
        assert 0.0 < loss < math.log(2) + 0.2, "about chance after 3 epochs, never diverged"
        assert 0.0 <= accuracy <= 100.0
    assert completed.stdout.splitlines()[0].split()[:2] == ["method", "final"]
    progress = [line for line in completed.stderr.splitlines() if re.match(r"\[\s*\S+\] epoch\s+\d+/3", line)]
    assert len(progress) == 3 * len(METHODS), completed.stderr


def test_bad_command_exits_nonzero_with_usage() -> None:
    completed = _run("bogus")
    assert completed.returncode == 2
    assert completed.stderr.startswith("usage: python -m samgria")
    assert "invalid choice: 'bogus'" in completed.stderr
    assert completed.stdout == ""


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+demo\s+train a small classifier", out, re.MULTILINE)


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any training fail loudly: an argument error must come before it."""

    def train(**kwargs: object) -> None:
        raise AssertionError(f"trained with {kwargs} despite a bad argument")

    monkeypatch.setattr(samgria.__main__, "run_demo", train)


def _exit_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``main(argv)``, check it exits with status 2 and prints nothing to stdout; the stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_missing_command_gives_the_top_level_usage(capsys: pytest.CaptureFixture[str]) -> None:
    err = _exit_message([], capsys)
    assert err.startswith("usage: python -m samgria [-h] command ...\n")
    assert err.endswith("python -m samgria: error: the following arguments are required: command\n")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
        (["--epochs", "-1"], "--epochs must be an integer >= 1, got -1"),
        (["--threads", "0"], "--threads must be an integer in [1, 2**31 - 1], got 0"),
        (["--threads", str(2**31)], f"--threads must be an integer in [1, 2**31 - 1], got {2**31}"),
        (["--seed", str(2**64)], f"--seed must be an integer in [-2**63, 2**64 - 1], got {2**64}"),
        (["--seed", str(-(2**63) - 1)], f"--seed must be an integer in [-2**63, 2**64 - 1], got {-(2**63) - 1}"),
        (["--methods", "Adam"], "argument --methods: invalid choice: 'Adam'"),
        (
            ["--plot", "/nonexistent/folder/demo.png"],
            "--plot must be a file name in an existing folder, got '/nonexistent/folder/demo.png'",
        ),
        (["--plot", "."], "--plot must be a file name, not a folder, got '.'"),
    ],
)
def test_bad_demo_arguments_exit_with_the_demo_usage_before_training(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    err = _exit_message(["demo", *argv], capsys)
    assert err.startswith("usage: python -m samgria demo [-h] [--quick]")
    # argparse's own messages go on (the choices) in a wording that varies between Python versions
    assert err.splitlines()[-1].startswith(f"python -m samgria demo: error: {message}"), err
    assert err.endswith(f"python -m samgria demo: error: {message}\n") or message.startswith("argument "), err


def test_seed_range_is_what_torch_manual_seed_takes() -> None:
    """The range the demo states is exactly the one torch accepts."""
    torch.manual_seed(2**64 - 1)
    torch.manual_seed(-(2**63))
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises((ValueError, RuntimeError, OverflowError)):
            torch.manual_seed(seed)
    torch.manual_seed(0)


def test_plot_without_matplotlib_exits_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" now raises ImportError
    path = str(tmp_path / "demo.png")
    err = _exit_message(["demo", "--plot", path], capsys)
    assert err.startswith("usage: python -m samgria demo [-h]")
    assert f"python -m samgria demo: error: --plot {path!r} needs matplotlib: pip install matplotlib (" in err


@pytest.mark.parametrize("name", ["demo.xyz", "demo"])
def test_plot_format_must_be_one_matplotlib_writes(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    figure = pytest.importorskip("matplotlib.figure")
    formats = sorted(figure.Figure().canvas.get_supported_filetypes())
    assert "png" in formats and "xyz" not in formats
    path = str(tmp_path / name)
    err = _exit_message(["demo", "--plot", path], capsys)
    suffixes = ", ".join("." + format_ for format_ in formats)
    assert err.endswith(f"error: --plot must be a file name ending in one of {suffixes}, got {path!r}\n"), err


def test_plot_pgf_needs_the_tex_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    monkeypatch.setenv("PATH", str(tmp_path))  # no TeX program on it
    path = str(tmp_path / "demo.pgf")
    err = _exit_message(["demo", "--plot", path], capsys)
    tex = matplotlib.rcParams["pgf.texsystem"]
    assert err.endswith(
        f"error: --plot must not end in .pgf without {tex} (matplotlib's pgf.texsystem) on PATH, got {path!r}\n"
    )


def test_main_demo_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "--epochs", "1", "--methods", "plain", "SAM", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    assert [m.group(1) for m in map(ROW.match, captured.out.splitlines()) if m] == ["plain", "SAM"]
    assert "epoch   1/1" in captured.err


# -- the data set -------------------------------------------------------------------------------------
def test_spirals_lie_on_their_arms() -> None:
    """Without noise, class c has angle 3*pi*r + c*pi (mod 2*pi) at radius r."""
    x, y = make_spirals(400, noise=0.0, seed=1)
    assert x.shape == (400, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert int(y.sum()) == 200, "balanced classes"
    radius = x.double().norm(dim=1)
    angle = torch.atan2(x[:, 1].double(), x[:, 0].double())
    expected = 3 * math.pi * radius + math.pi * y.double()
    difference = torch.remainder(angle - expected + math.pi, 2 * math.pi) - math.pi
    assert difference.abs().max() < 1e-4
    assert float(radius.max()) <= 1.0 + 1e-6


def test_spirals_label_noise_flips_exactly_the_requested_share() -> None:
    x_clean, y_clean = make_spirals(500, label_noise=0.0, seed=4)
    x_noisy, y_noisy = make_spirals(500, label_noise=0.2, seed=4)
    assert torch.equal(x_clean, x_noisy), "label noise does not move the points"
    assert int((y_clean != y_noisy).sum()) == 100
    assert torch.equal(make_spirals(500, label_noise=0.2, seed=4)[1], y_noisy), "deterministic"
    assert not torch.equal(make_spirals(500, seed=5)[0], x_clean), "the seed matters"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"n_points": 1}, ValueError, "n_points must be an integer >= 2, got 1"),
        ({"n_points": 10.0}, TypeError, "n_points must be an integer >= 2, got 10.0"),
        ({"n_points": 10, "label_noise": 1.5}, ValueError, "label_noise must be a finite number in [0, 1], got 1.5"),
        ({"n_points": 10, "label_noise": -0.1}, ValueError, "label_noise must be a finite number in [0, 1], got -0.1"),
        ({"n_points": 10, "noise": -0.5}, ValueError, "noise must be a finite number >= 0, got -0.5"),
        ({"n_points": 10, "noise": math.nan}, ValueError, "noise must be a finite number >= 0, got nan"),
        ({"n_points": 10, "noise": "0.2"}, TypeError, "noise must be a finite number >= 0, got '0.2'"),
        ({"n_points": 10, "seed": None}, TypeError, "seed must be an integer, got None"),
        ({"n_points": 10, "seed": 2**64}, ValueError, f"seed must be an integer in [-2**63, 2**64 - 1], got {2**64}"),
    ],
)
def test_spirals_reject_bad_input(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        make_spirals(**kwargs)
    assert str(info.value) == message


# -- the training loop -------------------------------------------------------------------------------
_TINY = dict(n_train=96, n_test=64, epochs=2, batch_size=32, width=8, seed=7)


def test_plain_method_is_momentum_sgd() -> None:
    """The "plain" row equals a hand-written torch.optim.SGD loop with the same data and init."""
    (result,) = run_demo(methods=["plain"], **_TINY)

    x, y = make_spirals(96, label_noise=0.15, seed=7)
    x_test, y_test = make_spirals(64, seed=8)
    torch.manual_seed(7)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    shuffle = torch.Generator().manual_seed(9)
    for _ in range(2):
        for rows in torch.randperm(96, generator=shuffle).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            optimizer.step()
    with torch.no_grad():
        assert result.train_loss == float(F.cross_entropy(model(x), y))
        assert result.test_accuracy == float((model(x_test).argmax(1) == y_test).float().mean())


def test_run_demo_is_deterministic_and_methods_differ() -> None:
    first = run_demo(**_TINY)
    second = run_demo(**_TINY)
    assert [(r.method, r.train_loss, r.test_accuracy) for r in first] == [
        (r.method, r.train_loss, r.test_accuracy) for r in second
    ]
    assert len({r.train_loss for r in first}) == len(METHODS), "each method trains differently"


def test_run_demo_logs_progress_and_rejects_unknown_methods() -> None:
    lines: list[str] = []
    run_demo(methods=["SAM"], log=lines.append, log_every=1, **_TINY)
    assert [line.split("running")[0].strip() for line in lines] == ["[     SAM] epoch   1/2", "[     SAM] epoch   2/2"]
    with pytest.raises(ValueError) as info:
        run_demo(methods=["SAM", "Adam"], **_TINY)
    assert str(info.value) == "methods[1] must be one of 'plain', 'SAM', 'ASAM', 'SAM+LAMP', got 'Adam'"


_METHODS_RULE = "methods must be a non-empty sequence of names from ['plain', 'SAM', 'ASAM', 'SAM+LAMP']"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"n_train": 1}, ValueError, "n_train must be an integer >= 2, got 1"),
        ({"n_train": 96.0}, TypeError, "n_train must be an integer >= 2, got 96.0"),
        ({"n_test": 1}, ValueError, "n_test must be an integer >= 2, got 1"),
        ({"epochs": 0}, ValueError, "epochs must be an integer >= 1, got 0"),
        ({"epochs": True}, TypeError, "epochs must be an integer >= 1, got True"),
        ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1, got 0"),
        ({"batch_size": -1}, ValueError, "batch_size must be an integer >= 1, got -1"),
        ({"lr": -0.1}, ValueError, "lr must be a finite number >= 0, got -0.1"),
        ({"lr": math.inf}, ValueError, "lr must be a finite number >= 0, got inf"),
        ({"lr": "0.05"}, TypeError, "lr must be a finite number >= 0, got '0.05'"),
        ({"width": 0}, ValueError, "width must be an integer >= 1, got 0"),
        ({"label_noise": 1.5}, ValueError, "label_noise must be a finite number in [0, 1], got 1.5"),
        ({"seed": 2**64}, ValueError, f"seed must be an integer in [-2**63, 2**64 - 1], got {2**64}"),
        ({"seed": -(2**63) - 1}, ValueError, f"seed must be an integer in [-2**63, 2**64 - 1], got {-(2**63) - 1}"),
        ({"seed": None}, TypeError, "seed must be an integer, got None"),
        ({"methods": "SAM"}, TypeError, f"{_METHODS_RULE}, got 'SAM'"),
        ({"methods": {"SAM"}}, TypeError, f"{_METHODS_RULE}, got {{'SAM'}}"),
        ({"methods": []}, ValueError, f"{_METHODS_RULE}, got []"),
        ({"methods": ["sam"]}, ValueError, "methods[0] must be one of 'plain', 'SAM', 'ASAM', 'SAM+LAMP', got 'sam'"),
        ({"log": "stderr"}, TypeError, "log must be a callable or None, got 'stderr'"),
        ({"log_every": 0}, ValueError, "log_every must be an integer >= 1, got 0"),
    ],
)
def test_run_demo_rejects_bad_arguments_before_training(
    kwargs: dict, error: type[Exception], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_training(*args: object) -> None:
        raise AssertionError("built a model despite a bad argument")

    monkeypatch.setattr(samgria.__main__, "_model", no_training)
    with pytest.raises(error) as info:
        run_demo(**{**_TINY, "methods": ["plain"], **kwargs})
    assert str(info.value) == message


def test_run_demo_takes_every_seed_torch_takes() -> None:
    """torch reads seeds modulo 2**64: the largest seed trains exactly as -1 does (no overflow of a
    seed derived from it)."""
    assert torch.Generator().manual_seed(-1).initial_seed() == 2**64 - 1
    settings = {**_TINY, "epochs": 1, "methods": ["plain"]}
    (largest,) = run_demo(**{**settings, "seed": 2**64 - 1})
    (minus_one,) = run_demo(**{**settings, "seed": -1})
    assert (largest.train_loss, largest.test_accuracy) == (minus_one.train_loss, minus_one.test_accuracy)
    (smallest,) = run_demo(**{**settings, "seed": -(2**63)})
    assert math.isfinite(smallest.train_loss)


def test_format_table() -> None:
    table = format_table([DemoResult("SAM", 0.12345, 0.875, 1.25)])
    header, rule, row = table.splitlines()
    assert header.split() == ["method", "final", "train", "loss", "held-out", "accuracy", "time"]
    assert set(rule) == {"-"}
    assert ROW.match(row).groups() == ("SAM", "0.1235", "87.5", "1.2")


# -- the picture ------------------------------------------------------------------------------------
def test_plot_draws_the_decision_regions_of_the_trained_models(tmp_path, capsys) -> None:
    path = tmp_path / "demo.png"
    assert main(["demo", "--quick", "--methods", "plain", "SAM", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {path}" in capsys.readouterr().err


def test_plot_needs_the_models_of_run_demo(tmp_path) -> None:
    with pytest.raises(ValueError) as info:
        plot_demo([DemoResult("plain", 0.5, 0.9, 1.0)], tmp_path / "demo.png")
    assert str(info.value) == (
        "results[0] must be a DemoResult with its model (as run_demo returns it), "
        "got DemoResult(method='plain', train_loss=0.5, test_accuracy=0.9, seconds=1.0)"
    )


def _trained_result() -> DemoResult:
    return DemoResult("plain", 0.5, 0.9, 1.0, torch.nn.Linear(2, 2))


_RESULTS_RULE = "results must be a non-empty sequence of DemoResult (what run_demo returns)"
_SEED_RULE = "seed must be an integer in [-2**63, 2**64 - 1]"


@pytest.mark.parametrize(
    "results, path, kwargs, error, message",
    [
        ([], "demo.png", {}, ValueError, f"{_RESULTS_RULE}, got []"),
        (None, "demo.png", {}, TypeError, f"{_RESULTS_RULE}, got None"),
        ([object], "demo.png", {}, TypeError, f"results[0] must be a DemoResult, got {object!r}"),
        ([_trained_result()], 3, {}, TypeError, "path must be a str or os.PathLike, got 3"),
        (
            [_trained_result()],
            "no/such/folder/demo.png",
            {},
            ValueError,
            "path must be a file name in an existing folder, got '{tmp}/no/such/folder/demo.png'",
        ),
        ([_trained_result()], "demo.png", {"n_points": 1}, ValueError, "n_points must be an integer >= 2, got 1"),
        ([_trained_result()], "demo.png", {"seed": 2**64}, ValueError, f"{_SEED_RULE}, got {2**64}"),
        (
            [_trained_result()],
            "demo.png",
            {"label_noise": 1.5},
            ValueError,
            "label_noise must be a finite number in [0, 1], got 1.5",
        ),
        (
            [_trained_result()],
            "x" * 300 + ".png",
            {},
            ValueError,
            "path must be a file that can be written, got '{tmp}/" + "x" * 300 + ".png' (File name too long)",
        ),
    ],
)
def test_plot_demo_rejects_bad_arguments_before_drawing(
    results: list, path: object, kwargs: dict, error: type[Exception], message: str, tmp_path: Path
) -> None:
    if isinstance(path, str):
        path = str(tmp_path / path)
    with pytest.raises(error) as info:
        plot_demo(results, path, **kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message.format(tmp=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_plot_demo_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = str(tmp_path / "demo.png")
    with pytest.raises(ImportError) as info:
        plot_demo([_trained_result()], path)
    assert str(info.value).startswith(f"path {path!r} needs matplotlib: pip install matplotlib (")


def test_plot_demo_suffix_is_case_insensitive(tmp_path: Path) -> None:
    """matplotlib reads ``.PNG`` as png: so does the check."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo.PNG"
    plot_demo([_trained_result()], path, n_points=20)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_demo_results_carry_their_trained_models() -> None:
    (result,) = run_demo(methods=["plain"], **_TINY)
    x_test, y_test = make_spirals(64, seed=8)
    with torch.no_grad():
        accuracy = float((result.model(x_test).argmax(1) == y_test).float().mean())
    assert accuracy == result.test_accuracy


def test_plot_path_that_cannot_be_created_exits_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    """A path the folder check passes but no file can be made at (here a name too long for the file
    system; also a folder the user may not write into) failed with a traceback after the training."""
    pytest.importorskip("matplotlib")
    path = str(tmp_path / ("x" * 300 + ".png"))
    err = _exit_message(["demo", "--plot", path], capsys)
    assert f"python -m samgria demo: error: --plot must be a file that can be written, got {path!r} (" in err
    assert list(tmp_path.iterdir()) == []


def test_plot_check_leaves_no_file_behind(tmp_path: Path, no_training: None) -> None:
    """The writability check of a new path removes the file it made (training fails here)."""
    pytest.importorskip("matplotlib")
    with pytest.raises(AssertionError, match="despite a bad argument"):
        main(["demo", "--plot", str(tmp_path / "demo.png")])
    assert list(tmp_path.iterdir()) == []


def test_run_demo_leaves_the_global_rng_as_it_was() -> None:
    """run_demo seeds its models' initialisation without touching the caller's default generator."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_demo(methods=["plain"], **{**_TINY, "epochs": 1})
    assert torch.equal(torch.rand(3), expected)


def test_plot_demo_draws_the_training_labels_of_the_given_label_noise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The panels show the training points of a run with ``label_noise`` (their labels as colours) and
    the title says the share."""
    figure_module = pytest.importorskip("matplotlib.figure")
    figures = []
    savefig = figure_module.Figure.savefig

    def record(figure: object, *args: object, **kwargs: object) -> None:
        figures.append(figure)
        savefig(figure, *args, **kwargs)

    monkeypatch.setattr(figure_module.Figure, "savefig", record)
    plot_demo([_trained_result()], tmp_path / "demo.png", n_points=40, seed=3, label_noise=0.5)
    (figure,) = figures
    assert "with 50% flipped labels" in figure._suptitle.get_text()
    (points,) = figure.axes[0].collections[-1:]
    orange = torch.tensor([tuple(color) != (8 / 255, 81 / 255, 156 / 255, 1.0) for color in points.get_facecolors()])
    _, labels = make_spirals(40, label_noise=0.5, seed=3)
    assert torch.equal(orange, labels == 1)


@pytest.fixture
def default_float64_on_meta() -> Iterator[None]:
    """torch's default dtype float64 and default device "meta" (a stand-in for "cuda" here), as a
    user's session may have set them; restored after."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)
        torch.set_default_dtype(dtype)


def test_demo_ignores_torch_default_dtype_and_device(request: pytest.FixtureRequest) -> None:
    """The same seed gave other points under a float64 default (the draws were float64) and the
    demo failed (float32 data, float64 model); under a default device the data followed it. The
    demo is float32 on the CPU whatever the defaults."""
    x, y = make_spirals(50, label_noise=0.2, seed=3)
    settings = {**_TINY, "epochs": 1, "methods": ["plain", "SAM+LAMP"]}
    expected = [(r.method, r.train_loss, r.test_accuracy) for r in run_demo(**settings)]
    request.getfixturevalue("default_float64_on_meta")
    x64, y64 = make_spirals(50, label_noise=0.2, seed=3)
    assert (x64.dtype, x64.device, y64.device) == (torch.float32, torch.device("cpu"), torch.device("cpu"))
    assert torch.equal(x64, x) and torch.equal(y64, y)
    results = run_demo(**settings)
    assert [(r.method, r.train_loss, r.test_accuracy) for r in results] == expected
    assert {p.device.type for r in results for p in r.model.parameters()} == {"cpu"}


def test_plot_demo_leaves_the_callers_matplotlib_backend_and_figures(tmp_path: Path) -> None:
    """plot_demo switched matplotlib to Agg (in a notebook: no more inline figures after it)."""
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    plt.switch_backend("svg")
    figure = plt.figure()
    open_figures = plt.get_fignums()
    try:
        plot_demo([_trained_result()], tmp_path / "demo.png", n_points=20)
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == open_figures
    finally:
        plt.close(figure)
        plt.switch_backend(backend)
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_gives_back_the_callers_thread_count(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """main(["demo", ...]) called from Python left torch at --threads (default 1) for the rest of
    the session, also when the training raised."""
    torch.set_num_threads(2)  # the autouse fixture restores the original count after
    seen = []

    def trained(**kwargs: object) -> list[DemoResult]:
        seen.append(torch.get_num_threads())
        return [DemoResult("plain", 0.5, 0.9, 1.0)]

    monkeypatch.setattr(samgria.__main__, "run_demo", trained)
    assert main(["demo"]) == 0
    assert (seen, torch.get_num_threads()) == ([1], 2), "trained with --threads' default 1"

    def interrupted(**kwargs: object) -> None:
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt

    monkeypatch.setattr(samgria.__main__, "run_demo", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["demo", "--threads", "3"])
    assert (seen, torch.get_num_threads()) == ([1, 3], 2)


def test_demo_help_and_header_say_what_runs(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """--quick's help left out its narrower model, and the header named all four methods whatever
    --methods chose."""
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # as argparse wraps it for any width
    assert "--quick a few seconds: fewer points and epochs, a 2-64-64-2 MLP --epochs" in help_text
    monkeypatch.setattr(samgria.__main__, "run_demo", lambda **kwargs: [DemoResult("SAM", 0.5, 0.9, 1.0)])
    assert main(["demo", "--quick", "--methods", "plain", "SAM"]) == 0
    header = capsys.readouterr().err.splitlines()[0]
    assert header.endswith("a 2-64-64-2 ReLU MLP; momentum SGD as plain, SAM"), header


def test_seeds_equal_modulo_2_32_give_the_same_data() -> None:
    """What the seed's documentation says: torch's CPU generator reads a seed's low 32 bits."""
    x, y = make_spirals(20, label_noise=0.5, seed=5)
    for seed in (5 + 2**32, 5 - 2**32, 5 + 2**63):
        other_x, other_y = make_spirals(20, label_noise=0.5, seed=seed)
        assert torch.equal(other_x, x) and torch.equal(other_y, y)
    assert not torch.equal(make_spirals(20, seed=6)[0], x)


def test_plot_demo_ignores_torch_default_dtype_and_device(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The evaluation grid is float32 on the CPU, as the data and models: under a float64 default
    dtype and another default device the same image is drawn (a grid that followed the defaults
    fed float64 "meta" points to the float32 CPU model)."""
    pytest.importorskip("matplotlib")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        result = DemoResult("plain", 0.5, 0.9, 1.0, torch.nn.Linear(2, 2))
    plot_demo([result], tmp_path / "defaults.png", n_points=20)
    request.getfixturevalue("default_float64_on_meta")
    plot_demo([result], tmp_path / "float64-meta.png", n_points=20)
    assert (tmp_path / "float64-meta.png").read_bytes() == (tmp_path / "defaults.png").read_bytes()
