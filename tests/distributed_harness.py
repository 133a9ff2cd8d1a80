"""Start a test script on several CPU processes (gloo), the way ``torchrun`` would.

Each rank is ``python <script> <args>`` with torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so a worker calls
``torch.distributed.init_process_group("gloo")`` exactly as a user's torchrun script does.

Robust to a busy machine: the only limit is a generous overall one (minutes, not seconds).
When one rank fails, the others (which would wait in a collective until the process group's
own timeout) are stopped after a grace period; on any failure the output of every rank is
reported. :func:`launch_ranks` (no pytest) is also what ``benchmarks/distributed.py`` starts its
ranks with.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Upper bound for one multi-process run: generous, so a busy machine is slow, not failing.
RUN_LIMIT_S = 900
#: How long the other ranks may go on after one rank failed (they are usually stuck in a collective).
GRACE_AFTER_FAILURE_S = 30


def gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def skip_without_gloo() -> None:
    """Skip the calling test when this torch build has no ``torch.distributed`` gloo backend."""
    import pytest

    if not gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")


@contextlib.contextmanager
def one_rank_gloo_group() -> Iterator[None]:
    """A gloo process group of one rank in this process, for a test (skipped without gloo, or
    when a process group is already initialised here); destroyed on exit."""
    import pytest
    import torch.distributed as dist

    skip_without_gloo()
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: Variables of an enclosing torchrun/elastic agent that would make rank 0 join another store.
_ELASTIC_PREFIXES = ("TORCHELASTIC_", "GROUP_", "ROLE_")


def _rank_env(rank: int, world_size: int, port: int, threads: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(_ELASTIC_PREFIXES)}
    repo_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
    )
    return env


@dataclass
class RankRun:
    """What :func:`launch_ranks` saw: each rank's exit code and output, and what went wrong."""

    returncodes: list[int]
    outputs: list[str]
    failure: str

    def report(self, what: str) -> str:
        """``what``, the failure and the output of every rank."""
        parts = [f"{what}: {self.failure}"]
        for rank, (code, output) in enumerate(zip(self.returncodes, self.outputs)):
            parts.append(f"----- rank {rank} (exit code {code}) -----\n{output.rstrip()}")
        return "\n".join(parts)


def launch_ranks(
    argv: Sequence[str], world_size: int, *, threads: int = 1, limit_s: float = RUN_LIMIT_S
) -> RankRun:
    """Run ``python *argv`` on ``world_size`` local processes with torchrun's environment.

    Args:
        argv: The script and its arguments.
        world_size: Number of ranks.
        threads: ``OMP_NUM_THREADS`` of each rank.
        limit_s: Upper bound of the whole run (generous: a busy machine is slow, not failing).

    Returns:
        The exit codes and outputs; ``failure`` is empty when every rank exited with 0. A run
        whose store port was taken in the meantime (another run picked the same free port) is
        retried on another port, twice at most.
    """
    for _attempt in range(3):
        run = _launch_once(argv, world_size, threads, limit_s, _free_port())
        if not (run.failure and any("Address already in use" in output for output in run.outputs)):
            break
    return run


def _launch_once(argv: Sequence[str], world_size: int, threads: int, limit_s: float, port: int) -> RankRun:
    logs = []
    processes = []
    for rank in range(world_size):
        log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed below)
        logs.append(log)
        processes.append(
            subprocess.Popen(
                [sys.executable, *map(str, argv)],
                env=_rank_env(rank, world_size, port, threads),
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    started = time.monotonic()
    failed_at: float | None = None
    failure = ""
    try:
        while any(process.poll() is None for process in processes):
            now = time.monotonic()
            if failed_at is None and any(process.returncode not in (None, 0) for process in processes):
                failed_at = now
            if failed_at is not None and now - failed_at > GRACE_AFTER_FAILURE_S:
                failure = "a rank failed; the others were stopped"
                break
            if now - started > limit_s:
                failure = f"the ranks did not finish within {limit_s:.0f} s"
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if not failure and any(process.returncode != 0 for process in processes):
        failure = "a rank failed"
    return RankRun([process.returncode for process in processes], outputs, failure)


def run_ranks(script: str | Path, world_size: int, args: Sequence[str] = ()) -> list[str]:
    """Run ``script`` on ``world_size`` local processes; return each rank's output.

    Fails the calling test, with the output of every rank, when a rank exits with an error or the
    run exceeds :data:`RUN_LIMIT_S`.
    """
    import pytest

    run = launch_ranks([script, *args], world_size)
    if run.failure:
        pytest.fail(run.report(f"{Path(script).name} on {world_size} ranks"), pytrace=False)
    return run.outputs
