#!/usr/bin/env python
"""Peak host memory of WSM readouts (``merged_state_dict``, ``merged_weights``) on CPU.

Each measurement runs in a fresh subprocess: build a model of ``--params``
parameters (one tensor of ``--largest`` of them, the rest in equal tensors),
train three steps into a window, reset the peak-RSS counter
(``/proc/self/clear_refs``), run one readout, and report the peak resident
memory above the level just before it. Bounds:

* ``merged_state_dict(dtype)``: output size + one fp32 copy of the largest param;
* ``merged_weights()``: one copy of the params in their dtype + one fp32 copy of the largest param.

``--repo`` points at another checkout to measure it the same way (e.g. an
older release for a before/after table)::

    python bench/bench_readout_memory.py                       # this checkout
    python bench/bench_readout_memory.py --repo /tmp/v0.1      # another one
    python bench/bench_readout_memory.py --markdown            # table for RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 2**20
CASES = (  # (param dtype, readout, readout dtype)
    ("fp32", "merged_state_dict", None),
    ("fp32", "merged_weights", None),
    ("bf16", "merged_state_dict", None),
    ("bf16", "merged_state_dict", "fp32"),
    ("bf16", "merged_weights", None),
)


def _hwm_and_rss() -> tuple[int, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                values[line.split(":")[0]] = int(line.split()[1]) * 1024
    return values["VmHWM"], values["VmRSS"]


def child(args) -> dict:
    import torch

    from wsm_optim import WSMOptimizer

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    dtype = dtypes[args.dtype]
    rest = args.params - args.largest
    sizes = [args.largest] + [rest // args.tensors] * args.tensors
    params = [torch.nn.Parameter(torch.ones(n, dtype=dtype)) for n in sizes]
    opt = WSMOptimizer(torch.optim.SGD([(f"p{i}", p) for i, p in enumerate(params)], lr=0.0), window=8)
    for _ in range(3):  # no grads: SGD leaves the params, WSM anchors and folds (mid-window)
        opt.step()
    out_dtype = dtypes.get(args.out_dtype)
    if not open("/proc/self/clear_refs", "w").write("5"):
        raise RuntimeError("cannot reset the peak-RSS counter")
    _, before = _hwm_and_rss()
    if args.readout == "merged_state_dict":
        result = opt.merged_state_dict(out_dtype)
        out_bytes = sum(v.numel() * v.element_size() for v in result.values())
    else:
        with opt.merged_weights():
            pass
        out_bytes = 0
    peak, _ = _hwm_and_rss()
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    largest_fp32 = args.largest * 4
    bound = out_bytes + largest_fp32 if args.readout == "merged_state_dict" else model_bytes + largest_fp32
    return dict(
        dtype=args.dtype, readout=args.readout + (f"({args.out_dtype})" if args.out_dtype else "()"),
        model_mib=model_bytes / MiB, output_mib=out_bytes / MiB, largest_fp32_mib=largest_fp32 / MiB,
        peak_mib=(peak - before) / MiB, bound_mib=bound / MiB, peak_over_model=(peak - before) / model_bytes,
    )


def measure(repo: str, dtype: str, readout: str, out_dtype: str | None, params: int, largest: int,
            tensors: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--dtype", dtype, "--readout", readout,
           "--params", str(params), "--largest", str(largest), "--tensors", str(tensors)]
    if out_dtype:
        cmd += ["--out-dtype", out_dtype]
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               # a fixed mmap threshold: every tensor is its own mapping, returned to the OS when freed,
               # so RSS follows live memory (glibc's sliding threshold would keep freed blocks resident)
               MALLOC_MMAP_THRESHOLD_="131072")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=os.path.dirname(HERE), help="checkout whose wsm_optim is measured")
    ap.add_argument("--params", type=int, default=64 * 2**20, help="parameters in all (default 64Mi)")
    ap.add_argument("--largest", type=int, default=16 * 2**20, help="parameters of the largest tensor")
    ap.add_argument("--tensors", type=int, default=12, help="other tensors sharing the rest")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    ap.add_argument("--readout", choices=["merged_state_dict", "merged_weights"], help=argparse.SUPPRESS)
    ap.add_argument("--out-dtype", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = [measure(args.repo, d, r, o, args.params, args.largest, args.tensors) for d, r, o in CASES]
    if not args.markdown:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"repo: `{args.repo}`, {args.params / 2**20:.0f}Mi params, largest {args.largest / 2**20:.0f}Mi\n")
    print("| params | readout | model MiB | output MiB | peak MiB | bound MiB | peak / model |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['readout']} | {r['model_mib']:.0f} | {r['output_mib']:.0f} | "
              f"{r['peak_mib']:.0f} | {r['bound_mib']:.0f} | {r['peak_over_model']:.2f}x |")


if __name__ == "__main__":
    main()
