"""Launch a test worker on N local ranks (torch.distributed environment, gloo) and collect its JSON results.

For workers that run all their cases in one process per rank (DeepSpeed,
accelerate: their start-up dominates, and they keep process-wide state) and
write ``OUT_DIR/<prefix>-rank<r>.json``. A hang fails the test after a hard
timeout (every rank killed) instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
LAUNCH_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker: str, world: int, out_dir: Path, prefix: str) -> list[dict]:
    """Run ``world`` ranks of ``worker``; each rank's results, or a failure with every rank's output."""
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        env = dict(
            os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])),
        )
        log = open(out_dir / f"{prefix}-rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(HERE / worker), str(out_dir)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            proc.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    results = []
    for rank, log in enumerate(logs):
        log.seek(0)
        output = log.read()[-6000:]
        log.close()
        path = out_dir / f"{prefix}-rank{rank}.json"
        if procs[rank].returncode != 0 or not path.exists():
            pytest.fail(f"{worker} rank {rank} exited {procs[rank].returncode}:\n{output}")
        results.append(json.loads(path.read_text()))
    return results


