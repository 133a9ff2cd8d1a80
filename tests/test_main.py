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

from samgria.__main__ import METHODS, DemoResult, format_table, main, make_spirals, run_demo

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


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], r"the following arguments are required: command"),
        (["demo", "--epochs", "0"], r"--epochs must be >= 1, got 0"),
        (["demo", "--threads", "0"], r"--threads must be >= 1, got 0"),
        (["demo", "--methods", "Adam"], r"invalid choice: 'Adam'"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m samgria")
    assert re.search(message, err)


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
    "kwargs, message",
    [
        ({"n_points": 1}, r"n_points must be >= 2, got 1"),
        ({"n_points": 10, "label_noise": 1.5}, r"label_noise must be in \[0, 1\], got 1\.5"),
        ({"n_points": 10, "label_noise": -0.1}, r"label_noise must be in \[0, 1\], got -0\.1"),
    ],
)
def test_spirals_reject_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_spirals(**kwargs)


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
    with pytest.raises(ValueError, match=r"unknown methods \['Adam'\]; choose from \['plain', 'SAM', 'ASAM', 'SAM\+LAMP'\]"):
        run_demo(methods=["Adam"], **_TINY)


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
    from samgria.__main__ import plot_demo

    with pytest.raises(ValueError, match="plot_demo needs the results of run_demo, with their models"):
        plot_demo([DemoResult("plain", 0.5, 0.9, 1.0)], tmp_path / "demo.png")


def test_run_demo_results_carry_their_trained_models() -> None:
    (result,) = run_demo(methods=["plain"], **_TINY)
    x_test, y_test = make_spirals(64, seed=8)
    with torch.no_grad():
        accuracy = float((result.model(x_test).argmax(1) == y_test).float().mean())
    assert accuracy == result.test_accuracy
