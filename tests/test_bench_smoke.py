"""Smoke tests of the CPU benches (``bench/bench_update.py``, ``bench/bench_merge_buffers.py``) at toy sizes.

Asserts that every section ran and wrote well-formed results, and that the
streaming merge equals the explicit save-load-average merge; nothing about speed.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "bench_update.py")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cpu_bench_quick_runs_and_writes_results(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, SCRIPT, "--device", "cpu", "--quick", "--threads", "1", "--out", str(tmp_path),
         "--tmp-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    update = _rows(tmp_path / "results_cpu_update.csv")
    variants = {r["variant"] for r in update}
    for needle in ("flat axpy", "WSM update [", "merges in one call", "per-tensor loop", "_foreach_lerp_", "NeMo"):
        assert any(needle in v for v in variants), (needle, variants)
    for r in update:
        assert float(r["time_ms"]) > 0 and math.isfinite(float(r["GB_per_s"])), r

    explicit = {r["variant"].split(":")[0]: r for r in _rows(tmp_path / "results_cpu_explicit.csv")}
    assert set(explicit) == {"explicit", "WSM streaming"}
    rows = _rows(tmp_path / "results_cpu_explicit.csv")
    total = next(r for r in rows if r["variant"].startswith("explicit: total"))
    assert int(total["disk_bytes"]) > 0 and int(total["peak_rss_delta_bytes"]) >= 0
    # The N streaming updates must reproduce the explicit merge of the N saved checkpoints.
    diff_line = next(line for line in res.stdout.splitlines() if "max |difference|" in line)
    assert float(diff_line.split("=")[1].split()[0]) <= 1e-6, diff_line

    step = _rows(tmp_path / "results_cpu_step.csv")
    assert {r["variant"] for r in step} == {"inner AdamW", "WSM interval 1", "WSM interval 10"}
    e2e = _rows(tmp_path / "results_cpu_e2e.csv")
    assert {"AdamW only", "WSM interval 1"} <= {r["variant"] for r in e2e}

    targets = _rows(tmp_path / "results_cpu_targets.csv")
    assert [t["id"] for t in targets] == ["gpu_bw", "gpu_ema", "gpu_step", "gpu_e2e", "cpu_flat", "cpu_explicit"]
    assert all(t["status"] in ("pass", "fail", "not measured") for t in targets)
    assert all(t["status"] != "not measured" for t in targets if t["where"] == "CPU")

    report = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- BEGIN cpu -->" in report and "<!-- BEGIN cuda -->" in report
    assert "torch threads: 1" in report
    assert not list(tmp_path.glob("wsm_bench_ckpt_*")), "checkpoint temp dir left behind"


def test_merge_buffers_bench_runs_at_toy_size():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "bench_merge_buffers.py"), "--width", "8", "--blocks", "2",
         "--steps", "3", "--rounds", "1", "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 10 |")]
    assert len(rows) == 2 and all(float(r.split("|")[4]) > 0 for r in rows), res.stdout
