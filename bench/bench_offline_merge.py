"""Peak RAM of ``wsm-optim merge`` (streaming) vs loading every checkpoint first (naive).

Writes ``--files`` fp32 checkpoints of a ``--params``-parameter transformer-like
state dict to a temporary directory, then merges them twice, each time in a
fresh child process that reports its peak resident set (VmHWM) before and after
the merge:

* streaming: ``wsm_optim.merge_checkpoints(dir, schedule="1-sqrt", out=...)``
* naive:     load all files into a list, then ``sum_j c_j * theta_j`` in fp32, save.

The two outputs are compared, and the checkpoints are deleted at the end
(unless ``--keep``). Linux only (reads /proc/self/status).

    PYTHONPATH=. python bench/bench_offline_merge.py                 # 10 x 100M params, safetensors
    PYTHONPATH=. python bench/bench_offline_merge.py --format pt     # torch.save files (mmap loading)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import torch, safetensors.torch, tqdm.auto
from safetensors.torch import load_file, save_file
from wsm_optim import schedules as S
from wsm_optim.offline import merge_checkpoints, resolve_inputs

def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

mode, ckpt_dir, out = sys.argv[1:4]
before = hwm()
t0 = time.perf_counter()
if mode == "streaming":
    merge_checkpoints(ckpt_dir, schedule="1-sqrt", out=out, progress=False, verbose=False)
else:
    paths = resolve_inputs(ckpt_dir)
    c = S.merge_coefficients("1-sqrt", len(paths) - 1)
    load = load_file if out.endswith(".safetensors") else (lambda p: torch.load(p, map_location="cpu", weights_only=True))
    states = [load(p) for p in paths]                       # every checkpoint in RAM
    merged = {}
    for k, v in states[-1].items():
        if v.is_floating_point():
            acc = torch.zeros(v.shape, dtype=torch.float32)
            for cj, s in zip(c, states):
                acc.add_(s[k], alpha=float(cj))
            merged[k] = acc.to(v.dtype)
        else:
            merged[k] = v.clone()
    (save_file(merged, out) if out.endswith(".safetensors") else torch.save(merged, out))
print(json.dumps({"before": before, "after": hwm(), "seconds": time.perf_counter() - t0}))
"""


def layout(params: int, d: int = 768, layers: int = 12, ff: int = 3072) -> dict[str, tuple[int, ...]]:
    """A GPT-style layout of ``layers`` blocks; the embedding takes what is left to reach ``params``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        p = f"blocks.{i}."
        shapes.update({
            p + "ln1.weight": (d,), p + "ln1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
            p + "attn.out.weight": (d, d), p + "attn.out.bias": (d,),
            p + "ln2.weight": (d,), p + "ln2.bias": (d,),
            p + "mlp.fc.weight": (ff, d), p + "mlp.fc.bias": (ff,),
            p + "mlp.proj.weight": (d, ff), p + "mlp.proj.bias": (d,),
        })
    used = sum(torch.Size(s).numel() for s in shapes.values())
    rows, rest = divmod(params - used, d)
    if rows < 1:
        raise SystemExit(f"--params {params} is too small for this layout ({used} in the blocks)")
    shapes["embed.weight"] = (rows, d)
    if rest:
        shapes["pad"] = (rest,)
    return shapes


def write_checkpoints(directory: Path, shapes: dict, n: int, fmt: str) -> int:
    from safetensors.torch import save_file

    nbytes = 0
    for j in range(n):
        g = torch.Generator().manual_seed(j)
        sd = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
        sd["step"] = torch.tensor(1000 * (j + 1))  # an int buffer: copied from the newest, not averaged
        path = directory / f"step_{1000 * (j + 1)}.{'safetensors' if fmt == 'safetensors' else 'pt'}"
        save_file(sd, str(path)) if fmt == "safetensors" else torch.save(sd, path)
        nbytes = path.stat().st_size
        del sd
        print(f"  wrote {path.name} ({nbytes / 1e6:.0f} MB)", flush=True)
    return nbytes


def run_child(mode: str, ckpt_dir: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(ckpt_dir), str(out)],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{mode} merge failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=100_000_000)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--format", choices=["safetensors", "pt"], default="safetensors")
    ap.add_argument("--dir", help="parent of the temporary checkpoint directory (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint files")
    args = ap.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("Linux only (reads VmHWM from /proc/self/status)")

    # 12 GPT-2-small blocks for 100M; fewer for small smoke runs
    shapes = layout(args.params, layers=min(12, args.params // 8_000_000))
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    tmp = Path(tempfile.mkdtemp(prefix="wsm_bench_", dir=args.dir))
    try:
        ckpts = tmp / "ckpts"
        ckpts.mkdir()
        print(f"writing {args.files} fp32 checkpoints of {numel:,} params ({args.format}) to {ckpts}")
        t0 = time.perf_counter()
        file_bytes = write_checkpoints(ckpts, shapes, args.files, args.format)
        print(f"  {time.perf_counter() - t0:.0f} s")
        suffix = ".safetensors" if args.format == "safetensors" else ".pt"
        results = {}
        for mode in ("streaming", "naive"):
            out = tmp / f"merged_{mode}{suffix}"
            results[mode] = r = run_child(mode, ckpts, out)
            extra = r["after"] - r["before"]
            print(f"{mode:>9}: peak RSS {r['after'] / 2**30:.2f} GiB total, {extra / 2**30:.2f} GiB for the merge "
                  f"= {extra / file_bytes:.2f} x one file; {r['seconds']:.1f} s", flush=True)
        load = (lambda p: __import__("safetensors.torch").torch.load_file(str(p))) if suffix == ".safetensors" \
            else (lambda p: torch.load(p, weights_only=True))
        a, b = load(tmp / f"merged_streaming{suffix}"), load(tmp / f"merged_naive{suffix}")
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        print(f"one file: {file_bytes / 2**30:.2f} GiB ({file_bytes / 1e6:.0f} MB); "
              f"max |streaming - naive| = {diff:.3g}; step buffer = {int(a['step'])}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
