"""Launch a gloo job as N local subprocesses with a hard timeout (tests only).

Every multi-rank test file runs its worker script through :func:`run_job`: one
launch per group of cases, ranks on a free port, all ranks killed when the
timeout expires, so a hang fails the test instead of CI. Each rank's output
goes to ``OUT_DIR/<scenario>-ws<world>-rank<r>.log`` and is quoted in the
failure message.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
JOB_TIMEOUT_S = 180


def worker_pythonpath() -> str:
    """``PYTHONPATH`` of every launched rank: the repository root (the checkout's ``wsm_optim``) and ``tests/``."""
    return os.pathsep.join(filter(None, [str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH")]))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(worker: str, scenario: str, world: int, out_dir: Path, attempts: int = 2,
            timeout_s: float = JOB_TIMEOUT_S, python: str | None = None) -> None:
    """Run ``world`` ranks of ``python tests/<worker> SCENARIO OUT_DIR``; fail with every rank's output on error.

    ``python``: the interpreter of the ranks (default: this one), e.g. a
    virtualenv with a framework this environment cannot install.
    The free port is found by binding port 0 and released before the ranks bind
    it; if another process grabs it in between, the job is retried on a new port.
    """
    for attempt in range(attempts):
        failure = _run_job_once(worker, scenario, world, out_dir, timeout_s, python or sys.executable)
        if failure is None:
            return
        if "address already in use" not in failure.lower() or attempt == attempts - 1:
            pytest.fail(failure)


def _run_job_once(worker: str, scenario: str, world: int, out_dir: Path, timeout_s: float,
                  python: str) -> str | None:
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=worker_pythonpath(),
        )
        log = open(out_dir / f"{scenario}-ws{world}-rank{rank}.log", "w+")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [python, str(HERE / worker), scenario, str(out_dir)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    timed_out = False
    try:
        for proc in procs:
            proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    outputs = []
    for rank, log in enumerate(logs):
        log.seek(0)
        outputs.append(f"--- rank {rank} (exit {procs[rank].returncode}) ---\n{log.read()[-4000:]}")
        log.close()
    if timed_out or any(p.returncode != 0 for p in procs):
        reason = f"timed out after {timeout_s}s" if timed_out else "failed"
        return f"{worker} {scenario} at world size {world} {reason}\n" + "\n".join(outputs)
    return None
