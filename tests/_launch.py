"""Launch a test worker on N local ranks (torch.distributed environment, gloo) and collect its JSON results.

For workers that run all their cases in one process per rank (DeepSpeed,
accelerate: their start-up dominates, and they keep process-wide state) and
write ``OUT_DIR/<prefix>-rank<r>.json``. A hang fails the test after a hard
timeout (every rank killed) instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from _dist_launch import run_job

LAUNCH_TIMEOUT_S = 600


def launch(worker: str, world: int, out_dir: Path, prefix: str) -> list[dict]:
    """Run ``world`` ranks of ``worker`` (argv: ``PREFIX OUT_DIR``); each rank's results, or a failure with every rank's output."""
    run_job(worker, prefix, world, out_dir, timeout_s=LAUNCH_TIMEOUT_S)
    results = []
    for rank in range(world):
        path = out_dir / f"{prefix}-rank{rank}.json"
        if not path.exists():
            pytest.fail(f"{worker} rank {rank} exited without writing {path.name}")
        results.append(json.loads(path.read_text()))
    return results


def run_cases(cases: dict[str, Callable[[str], Any]]) -> None:
    """The worker's side of :func:`launch`: run every case with ``OUT_DIR``, keep its result or its traceback.

    Writes ``OUT_DIR/<PREFIX>-rank<r>.json`` (argv: ``PREFIX OUT_DIR``); a failing
    case does not stop the others, and the test names the one that failed. Then
    ends the process without interpreter teardown (see :func:`_exit`).
    """
    prefix, out_dir = sys.argv[-2], sys.argv[-1]
    results = {}
    for key, case in cases.items():
        try:
            results[key] = case(out_dir)
        except Exception:
            results[key] = {"error": traceback.format_exc()}
    rank = int(os.environ.get("RANK", 0))
    Path(out_dir, f"{prefix}-rank{rank}.json").write_text(json.dumps(results, indent=1))
    _exit()


def _exit() -> None:
    """Leave a worker whose results are on disk: process group destroyed, then ``os._exit(0)``.

    The process groups here are made by DeepSpeed/accelerate, which never
    destroy them; at interpreter teardown a thread they leave (gloo, the
    TCPStore) was once still joinable and the rank died with SIGABRT
    ("terminate called without an active exception") after every case had
    passed, failing CI. Nothing is left to run, so teardown is skipped.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
