"""Start a test script on several CPU processes (gloo), the way ``torchrun`` would.

Each rank is ``python <script> <args>`` with torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so a worker calls
``torch.distributed.init_process_group("gloo")`` exactly as a user's torchrun script does.

Robust to a busy machine: the only limit is a generous overall one (minutes, not seconds).
When one rank fails, the others (which would wait in a collective until the process group's
own timeout) are stopped after a grace period; on any failure the output of every rank is
reported.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

#: Upper bound for one multi-process run: generous, so a busy machine is slow, not failing.
RUN_LIMIT_S = 900
#: How long the other ranks may go on after one rank failed (they are usually stuck in a collective).
GRACE_AFTER_FAILURE_S = 30


def gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def skip_without_gloo() -> None:
    """Skip the calling test when this torch build has no ``torch.distributed`` gloo backend."""
    if not gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    repo_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    return env


def _report(what: str, processes: Sequence[subprocess.Popen], outputs: Sequence[str]) -> str:
    parts = [what]
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        parts.append(f"----- rank {rank} (exit code {process.returncode}) -----\n{output.rstrip()}")
    return "\n".join(parts)


def run_ranks(script: str | Path, world_size: int, args: Sequence[str] = ()) -> list[str]:
    """Run ``script`` on ``world_size`` local processes; return each rank's output.

    Fails the calling test, with the output of every rank, when a rank exits with an error or the
    run exceeds :data:`RUN_LIMIT_S`.
    """
    port = _free_port()
    logs = []
    processes = []
    for rank in range(world_size):
        log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed below)
        logs.append(log)
        processes.append(
            subprocess.Popen(
                [sys.executable, str(script), *args],
                env=_rank_env(rank, world_size, port),
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
            if now - started > RUN_LIMIT_S:
                failure = f"the ranks did not finish within {RUN_LIMIT_S} s"
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
    if failure:
        pytest.fail(_report(f"{Path(script).name} on {world_size} ranks: {failure}", processes, outputs), pytrace=False)
    return outputs

