"""Peak RAM and wall time of ``wsm-optim merge`` (streaming) against loading whole checkpoints.

Writes ``--files`` fp32 checkpoints of a ``--params``-parameter GPT-style state
dict to a temporary directory, in pieces (never a whole checkpoint in memory),
in one of four layouts:

* ``safetensors`` / ``pt``: one file per checkpoint;
* ``hf``: ``save_pretrained``-style folders, ``model-0000i-of-0000n.safetensors`` + index (``--shard-size``);
* ``dcp``: ``torch.distributed.checkpoint`` directories, every tensor saved as
  ``--dcp-ranks`` row shards (the layout an FSDP run of that many ranks writes);
* ``megatron``: a Megatron run folder of ``iter_XXXXXXX`` folders, the same DCP
  files (``--dcp-ranks`` row chunks: tensor-parallel ranks of column-parallel
  layers) plus ``metadata.json``, ``common.pt`` and the tracker; the streaming
  merge writes a Megatron iteration folder with the same chunking.

Then, each in a fresh child process reporting its peak resident set (VmHWM)
once torch and the library are imported ("start") and at the end; "peak above
start" is the difference, what the merge itself added:

* ``read``: the raw bytes of every checkpoint read once, in 128 KiB reads as ``cat`` does
  (on a warm page cache 8 MiB reads are ~4x slower here: the buffer no longer stays in the CPU cache);
* ``streaming``: ``merge_checkpoints(dir, schedule="1-sqrt", out=...)`` (``--block-size``);
* ``workers``: the same with ``--workers`` processes (``--workers 1`` skips it); each worker's own
  VmHWM, and its RssAnon / RssFile / RssShmem when its sampled RSS peaked, read from /proc every 10 ms;
* ``whole``: one whole checkpoint loaded at a time into a whole-model fp32 accumulator
  (the previous single-file merge; safetensors/pt/hf: ``load_file``/``torch.load``, dcp: ``dcp.load``);
* ``naive`` (``safetensors``/``pt`` only): every checkpoint loaded first.

Outputs are compared (max abs difference); the checkpoints are deleted at the
end (unless ``--keep`` or ``--ckpts``). ``--ckpts DIR`` reuses checkpoints kept
from an earlier run; ``--repo PATH`` imports ``wsm_optim`` from another checkout
(before/after comparisons on the same files). ``--cold``: before each mode, the
checkpoint files are written back (``sync``) and dropped from the page cache
with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (no root needed for clean pages),
so ``read`` and every merge read from disk alike. Linux only (reads /proc/self/status).

    PYTHONPATH=. python bench/bench_offline_merge.py                                  # 10 x 100M params, safetensors
    PYTHONPATH=. python bench/bench_offline_merge.py --format pt                      # torch.save files
    PYTHONPATH=. python bench/bench_offline_merge.py --format dcp --params 270000000 --workers 2
    PYTHONPATH=. python bench/bench_offline_merge.py --format hf --params 270000000 --workers 2
    PYTHONPATH=. python bench/bench_offline_merge.py --format megatron --params 270000000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, resource, sys, time
import torch, safetensors.torch, tqdm.auto
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from wsm_optim import schedules as S
from wsm_optim.offline.merge import merge_checkpoints, resolve_inputs

def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

def cpu():
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))

mode, fmt, ckpt_dir, out, block_size, workers = sys.argv[1:7]

# Each worker's own VmHWM and, at its largest sampled VmRSS, the split RssAnon / RssFile / RssShmem (MiB).
# Not RUSAGE_CHILDREN's ru_maxrss: a spawned process's maxrss starts at its parent's VmHWM (vfork + exec
# records the old address space's high-water mark), so it never reads below the parent's ~0.27 GiB.
import os, threading
KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
children_peak, sampling = {}, threading.Event()

def sample_children():
    me = str(os.getpid())
    while not sampling.wait(0.01):
        for pid in os.listdir("/proc"):
            try:
                if not pid.isdigit() or open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1] != me:
                    continue
                with open(f"/proc/{pid}/status") as f:
                    st = {l.split(":")[0]: int(l.split()[1]) >> 10 for l in f if l.split(":")[0] in KEYS}
            except (OSError, IndexError, ValueError):
                continue
            old = children_peak.get(pid)
            if old is None or st["VmRSS"] >= old["VmRSS"]:
                children_peak[pid] = {**st, "VmHWM": max(st["VmHWM"], old["VmHWM"] if old else 0)}
            else:
                old["VmHWM"] = max(old["VmHWM"], st["VmHWM"])

if mode == "workers":
    threading.Thread(target=sample_children, daemon=True).start()
before = hwm()
t0, c0 = time.perf_counter(), cpu()
paths = resolve_inputs(ckpt_dir)
nbytes = 0

def load_whole(p):
    if fmt in ("dcp", "megatron"):
        md = dcp.FileSystemReader(str(p)).read_metadata().state_dict_metadata
        sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.items()}
        dcp.load(sd, checkpoint_id=str(p), no_dist=True)
        return sd
    if fmt == "hf":
        sd = {}
        for f in sorted(p.glob("*.safetensors")):
            sd.update(load_file(f))
        return sd
    return load_file(p) if fmt == "safetensors" else torch.load(p, map_location="cpu", weights_only=True)

if mode == "read":
    buf = bytearray(128 << 10)
    for p in paths:
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            with open(f, "rb", buffering=0) as fh:
                while (n := fh.readinto(buf)):
                    nbytes += n
elif mode in ("streaming", "workers"):
    merge_checkpoints(ckpt_dir, schedule="1-sqrt", out=out, progress=False, verbose=False, block_size=block_size,
                      workers=int(workers) if mode == "workers" else 1)
else:
    c = S.merge_coefficients("1-sqrt", len(paths) - 1)
    states = [load_whole(p) for p in paths] if mode == "naive" else None   # every checkpoint in RAM
    acc = {}
    for j, p in enumerate(paths):
        sd = states[j] if states else load_whole(p)
        for k, v in sd.items():
            if v.is_floating_point():
                acc.setdefault(k, torch.zeros(v.shape, dtype=torch.float32)).add_(v, alpha=float(c[j]))
            elif j == len(paths) - 1:
                acc[k] = v.clone()
        del sd
    save_file(acc, out) if out.endswith(".safetensors") else torch.save(acc, out)
sampling.set()
workers_peak = max(children_peak.values(), key=lambda st: st["VmHWM"], default={})  # the largest worker's
import wsm_optim
print(json.dumps({"module": wsm_optim.__file__, "before": before, "after": hwm(), "seconds": time.perf_counter() - t0, "bytes": nbytes,
                  "worker": workers_peak, "cpu": cpu() - c0}))
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


def _blocks(shapes: dict, seed: int, cuts: dict):
    """Random fp32 rows ``(name, start, stop, tensor)`` for every tensor, cut at ``cuts[name]``; then the int step."""
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        bounds = cuts[name]
        for a, b in zip(bounds, bounds[1:]):
            yield name, a, b, torch.randn((b - a, *shape[1:]), generator=g)
    yield "step", 0, 1, torch.tensor(1000 * (seed + 1))


def write_checkpoints(directory: Path, shapes: dict, n: int, fmt: str, shard_size: str, ranks: int) -> int:
    """``n`` checkpoints, written in pieces (about 64 MiB at a time); returns the bytes of one."""
    from safetensors.torch import save_file

    from wsm_optim.offline import writers as W

    def cuts(rows: int, parts: int) -> list[int]:
        return sorted({round(rows * i / parts) for i in range(parts + 1)})

    nbytes = 0
    for j in range(n):
        name = f"iter_{1000 * (j + 1):07d}" if fmt == "megatron" else f"step_{1000 * (j + 1)}"
        if fmt in ("safetensors", "pt"):
            g = torch.Generator().manual_seed(j)
            sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
            sd["step"] = torch.tensor(1000 * (j + 1))  # an int buffer: copied from the newest, not averaged
            path = directory / f"{name}.{'safetensors' if fmt == 'safetensors' else 'pt'}"
            save_file(sd, str(path)) if fmt == "safetensors" else torch.save(sd, path)
            del sd
        else:
            lay = [(k, s, torch.float32) for k, s in shapes.items()] + [("step", (), torch.int64)]
            if fmt == "hf":
                row_cuts = {k: cuts(s[0], -(-torch.Size(s).numel() * 4 // (64 << 20))) for k, s in shapes.items()}
                path = directory / name
                W.ShardedOutput(path, lay, W.parse_size(shard_size)).write(_blocks(shapes, j, row_cuts))
            else:
                row_cuts = {k: cuts(s[0], ranks) for k, s in shapes.items()}
                blocks = [(k, a, b) for k, bounds in row_cuts.items() for a, b in zip(bounds, bounds[1:])]
                path = directory / name
                W.DCPOutput(path, lay, [*blocks, ("step", 0, 1)], sidecar=None).write(_blocks(shapes, j, row_cuts))
                if fmt == "megatron":  # what megatron-core adds to its DCP files, and Megatron-LM's tracker
                    torch.save({"iteration": 1000 * (j + 1), "checkpoint_version": 3.0}, path / "common.pt")
                    (path / "metadata.json").write_text(json.dumps({
                        "sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                        "common_backend_version": 1}))
                    (directory / "latest_checkpointed_iteration.txt").write_text(str(1000 * (j + 1)))
        nbytes = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
        print(f"  wrote {path.name} ({nbytes / 1e6:.0f} MB)", flush=True)
    return nbytes


def evict(root: Path) -> int:
    """Drop ``root``'s files from the page cache (after writing them back); returns their bytes."""
    os.sync()
    total = 0
    for f in [root] if root.is_file() else sorted(root.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def cached_kib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Cached:"))


def run_child(mode: str, fmt: str, ckpt_dir: Path, out: Path, block_size: str, workers: int, repo: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    # cwd: ``python -c`` puts the working directory first on sys.path, ahead of PYTHONPATH
    r = subprocess.run([sys.executable, "-c", CHILD, mode, fmt, str(ckpt_dir.resolve()), str(out.resolve()), block_size,
                        str(workers)], capture_output=True, text=True, env=env, cwd=repo)
    if r.returncode:
        raise SystemExit(f"{mode} merge failed:\n{r.stderr}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    if not Path(result["module"]).resolve().is_relative_to(repo):
        raise SystemExit(f"the child imported {result['module']}, not wsm_optim from {repo}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=100_000_000)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--format", choices=["safetensors", "pt", "hf", "dcp", "megatron"], default="safetensors")
    ap.add_argument("--workers", type=int, default=1, help="also run the streaming merge with this many workers")
    ap.add_argument("--block-size", default="64MiB", help="merge_checkpoints(block_size=...)")
    ap.add_argument("--shard-size", default="500MB", help="hf: largest shard")
    ap.add_argument("--dcp-ranks", type=int, default=8, help="dcp: row shards per tensor")
    ap.add_argument("--dir", help="parent of the temporary checkpoint directory (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint files")
    ap.add_argument("--ckpts", help="reuse the checkpoints in this folder (written by --keep; --format must match)")
    ap.add_argument("--repo", default=str(REPO), help="the checkout whose wsm_optim the children import")
    ap.add_argument("--cold", action="store_true", help="drop the checkpoints from the page cache before each mode")
    ap.add_argument("--modes", default="read,streaming,workers,whole,naive",
                    help="comma-separated subset of the modes to run (read is always run)")
    args = ap.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("Linux only (reads VmHWM from /proc/self/status)")

    big = args.params >= 200_000_000  # a 1B-class layout: d = 1024, 16 blocks
    shapes = (layout(args.params, d=1024, layers=16, ff=4096) if big
              else layout(args.params, layers=min(12, args.params // 8_000_000)))
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    largest = max(torch.Size(s).numel() for s in shapes.values()) * 4
    tmp = Path(tempfile.mkdtemp(prefix="wsm_bench_", dir=args.dir))
    repo = Path(args.repo).resolve()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}, python {platform.python_version()}; wsm_optim from {repo}")
    try:
        if args.ckpts:
            ckpts = Path(args.ckpts)
            first = sorted(p for p in ckpts.iterdir() if p.name != "latest_checkpointed_iteration.txt")[0]
            one = sum(f.stat().st_size for f in ([first] if first.is_file() else first.rglob("*")) if f.is_file())
            print(f"reusing the checkpoints in {ckpts} ({args.format})")
        else:
            ckpts = tmp / "ckpts"
            ckpts.mkdir()
            print(f"writing {args.files} fp32 checkpoints of {numel:,} params ({args.format}) to {ckpts}; "
                  f"largest tensor {largest / 2**20:.0f} MiB")
            t0 = time.perf_counter()
            one = write_checkpoints(ckpts, shapes, args.files, args.format, args.shard_size, args.dcp_ranks)
            print(f"  {time.perf_counter() - t0:.0f} s")
        suffix = ".pt" if args.format == "pt" else ".safetensors"
        wanted = set(args.modes.split(","))
        modes = ["read", *(m for m in ("streaming", "workers", "whole") if m in wanted
                           and (m != "workers" or args.workers > 1)),
                 *(["naive"] if "naive" in wanted and args.format in ("safetensors", "pt") else [])]
        results = {}
        for mode in modes:
            # a Megatron merge goes to a run folder in Megatron's layout; the reference "whole" one to safetensors
            out = tmp / f"merged_{mode}{'' if args.format == 'megatron' and mode != 'whole' else suffix}"
            if args.cold:
                dropped = evict(ckpts)
                print(f"{'':>10}  (cold: {dropped / 1e9:.1f} GB of checkpoints dropped from the page cache; "
                      f"{cached_kib() / 2**20:.1f} GiB cached in all)", flush=True)
            load = os.getloadavg()[0]
            results[mode] = r = run_child(mode, args.format, ckpts, out, args.block_size, args.workers, repo)
            extra = r["after"] - r["before"]
            what = f" ({r['bytes'] / r['seconds'] / 1e9:.2f} GB/s)" if mode == "read" else ""
            label = f"workers={args.workers}" if mode == "workers" else mode
            ratio = "" if mode == "read" else f" = {r['seconds'] / results['read']['seconds']:.2f}x the raw read"
            w = r["worker"]
            worker = f" (+ {args.workers} workers of VmHWM {w.get('VmHWM')} MiB each at most; at its peak RSS " \
                f"anon {w.get('RssAnon')} / file {w.get('RssFile')} / shmem {w.get('RssShmem')} MiB; " \
                f"{r['before'] / 2**20:.0f} MiB the parent's after imports)" if mode == "workers" else ""
            print(f"{label:>10}: peak RSS {r['after'] / 2**30:.2f} GiB total, {extra / 2**20:.0f} MiB above start "
                  f"= {extra / one:.1%} of one checkpoint{worker}; {r['seconds']:.1f} s{ratio}{what}; "
                  f"CPU {r['cpu']:.1f} s; load {load:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
        from safetensors.torch import load_file

        def load(p: Path) -> dict:
            if p.is_dir():  # a Megatron run folder: its iteration folder, through dcp.load
                folder = next(p.glob("iter_*"))
                md = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
                sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.items() if hasattr(m, "size")}
                dcp.load(sd, checkpoint_id=str(folder), no_dist=True)
                return sd
            return load_file(p) if suffix == ".safetensors" else torch.load(p, weights_only=True)

        def output(mode: str) -> Path:
            return next(tmp.glob(f"merged_{mode}*"))

        ref_mode = "whole" if "whole" in modes else "streaming"
        ref = load(output(ref_mode)) if ref_mode in modes else None  # not with --modes read,workers
        for mode in (m for m in modes[1:] if m != ref_mode and ref is not None):
            got = load(output(mode))
            diff = max((got[k].float() - ref[k].float()).abs().max().item() for k in ref)
            print(f"max |{mode} - {ref_mode}| = {diff:.3g}", end="; ")
        print(f"one checkpoint: {one / 2**30:.2f} GiB ({one / 1e6:.0f} MB)")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
