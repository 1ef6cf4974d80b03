"""Time and peak memory of the merge weights for huge windows: ``schedules.weights`` and ``wsm-optim weights``.

For each window k (updates per window) two measurements, each in a fresh child
process with a data-size cap (``--mem-cap-gib``, RLIMIT_DATA: a runaway
allocation fails there instead of swapping a shared machine) and a wall-clock
limit (``--timeout``):

* construction: this checkout's ``schedules.weights(schedule, k)`` plus
  ``c(0)``, ``c(k)`` and ``digest()``; with ``--old-root``, that tree's
  ``decay_weights`` + ``merge_weights`` instead (what ``WSMOptimizer`` built at
  construction before the lazy form). Time measured inside the child; peak
  memory = tracemalloc peak (Python allocations) and the child's max RSS.
* CLI: ``wsm_optim.cli.main(["weights", "--schedule", S, "--window", k])`` in a
  fresh interpreter: end-to-end wall time (interpreter start and the package
  import, i.e. ``import torch``, included), the import and the command timed
  apart; stdout counted and discarded.

    PYTHONPATH=. python bench/bench_weights.py                      # this checkout
    git archive b617618 | tar -x -C /tmp/old_wsm
    PYTHONPATH=. python bench/bench_weights.py --old-root /tmp/old_wsm --label "before (b617618)"

Prints a markdown table; ``--out FILE`` also writes it (appending a section).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONSTRUCT = r"""
import importlib.util, json, sys, time, tracemalloc
root, schedule, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = importlib.util.spec_from_file_location("schedules_under_test", root + "/wsm_optim/schedules.py")
S = importlib.util.module_from_spec(spec)
spec.loader.exec_module(S)  # numpy only: no torch, no package __init__


def build():
    if hasattr(S, "weights"):
        mw = S.weights(schedule, k)
        return mw, (mw.c(0), mw.c(k))
    c = S.coefficients_from_decay(S.decay_weights(schedule, k))
    return None, (float(c[0]), float(c[-1]))


out = {}
t0 = time.perf_counter()
mw, _ = build()
out["seconds"] = time.perf_counter() - t0
if mw is not None:
    t0 = time.perf_counter()
    mw.digest()
    out["digest_seconds"] = time.perf_counter() - t0
tracemalloc.start()  # second, separate pass: tracing slows allocation-heavy code, so it is not timed
mw, _ = build()
if mw is not None:
    mw.digest()
out["traced_peak"] = tracemalloc.get_traced_memory()[1]
print(json.dumps(out))
"""

CLI = r"""
import contextlib, io, json, sys, time
t0 = time.perf_counter()
from wsm_optim import cli
t1 = time.perf_counter()
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = cli.main(sys.argv[1:])
t2 = time.perf_counter()
import os; assert cli.__file__.startswith(os.environ["PYTHONPATH"]), cli.__file__  # the tree under test
print(json.dumps({"import_seconds": t1 - t0, "run_seconds": t2 - t1, "rc": rc, "lines": buf.getvalue().count("\n")}))
"""


def _limit(cap_bytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_DATA, (cap_bytes, cap_bytes))

    return apply


def run_child(argv: list[str], env: dict, timeout: float, cap_bytes: int) -> dict:
    """Run ``argv`` under the cap and time limit: wall seconds, return code, stdout, last stderr line."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_limit(cap_bytes),
        cwd=env["PYTHONPATH"],  # `python -c` puts the cwd first on sys.path: it must be the tree under test
    )
    killed = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        killed = True
    wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "rc": proc.returncode,
        "killed": killed,
        "stdout": out,
        "stderr_tail": err.decode(errors="replace").strip().splitlines()[-1:] if err else [],
    }


def measure(argv: list[str], env: dict, timeout: float, cap_bytes: int) -> dict:
    """``run_child`` in a grandchild so its max RSS is its own (RUSAGE_CHILDREN of a fresh process)."""
    code = (
        "import json, resource, sys; sys.path.insert(0, sys.argv[1]); import bench_weights as B; "
        "r = B.run_child(json.loads(sys.argv[2]), json.loads(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])); "
        "out = r.pop('stdout'); r['lines'] = out.count(b'\\n'); r['bytes'] = len(out); "
        "r['last_line'] = out.decode(errors='replace').strip().splitlines()[-1:] ; "
        "r['maxrss'] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024; print(json.dumps(r))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), json.dumps(argv), json.dumps(env), str(timeout),
         str(cap_bytes)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout)


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _outcome(r: dict, timeout: float, cap: int) -> str:
    if r["killed"]:
        return f"killed after {timeout:g} s (not finished)"
    if r["rc"] != 0:
        tail = " ".join(r["stderr_tail"])[:80]
        return f"failed after {r['wall']:.1f} s: {tail}" + (f" (cap {_fmt_bytes(cap)})" if "Memory" in tail else "")
    return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old-root", help="measure the wsm_optim tree under this directory instead of this checkout")
    p.add_argument("--label", default=None, help="name of this run in the table")
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--windows", default="1000,1000000,1000000000,1000000000000")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per child (default 20)")
    p.add_argument("--mem-cap-gib", type=float, default=2.0, help="RLIMIT_DATA of each child (default 2)")
    p.add_argument("--out", help="append the markdown section to this file")
    args = p.parse_args()
    root = Path(args.old_root).resolve() if args.old_root else REPO
    label = args.label or ("after (this checkout)" if not args.old_root else f"before ({root})")
    cap = int(args.mem_cap_gib * 2**30)
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    rows = []
    for k in [int(x) for x in args.windows.split(",")]:
        con = measure([sys.executable, "-c", CONSTRUCT, str(root), args.schedule, str(k)], env, args.timeout, cap)
        cli = measure([sys.executable, "-c", CLI, "weights", "--schedule", args.schedule, "--window", str(k)],
                      env, args.timeout, cap)
        con_text = _outcome(con, args.timeout, cap)
        if not con_text:
            inner = json.loads(con["last_line"][0])
            con_text = f"{inner['seconds'] * 1e3:.2f} ms"
            if "digest_seconds" in inner:
                con_text += f" (+ digest() {inner['digest_seconds'] * 1e3:.1f} ms)"
            con_text += f", traced peak {_fmt_bytes(inner['traced_peak'])}"
        cli_text = _outcome(cli, args.timeout, cap)
        if not cli_text:
            inner = json.loads(cli["last_line"][0])
            cli_text = (
                f"{cli['wall']:.2f} s (import {inner['import_seconds']:.2f} s, "
                f"command {inner['run_seconds'] * 1e3:.1f} ms), {inner['lines']} lines"
            )
        rows.append(
            f"| {label} | {k:.0e} | {con_text} | {_fmt_bytes(con['maxrss'])} | {cli_text} | {_fmt_bytes(cli['maxrss'])} |"
        )
        print(rows[-1], flush=True)
    header = [
        f"### {label}: schedule {args.schedule!r}, timeout {args.timeout:g} s, data cap {_fmt_bytes(cap)} per child",
        "",
        "| code | window k | construction (in process) | its max RSS | `wsm-optim weights` | its max RSS |",
        "|---|---|---|---|---|---|",
    ]
    text = "\n".join([*header, *rows, ""])
    print()
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
