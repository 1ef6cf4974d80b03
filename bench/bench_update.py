#!/usr/bin/env python
"""Benchmark the WSM streaming-merge update on CPU or CUDA, against baselines and the roofline.

One command per device::

    python bench/bench_update.py --device cpu      # ~3-5 min on 2 cores
    python bench/bench_update.py --device cuda     # GPU sections (bandwidth, step, end to end)
    python bench/bench_update.py --quick --out /tmp/x   # toy sizes, proves the script runs

Sections (each candidate timed in the same process, round-robin, median of rounds;
ratios are medians of per-round ratios, so load from other processes hits both sides):

1. update: one WSM checkpoint update ``A <- A + c * theta`` through each backend
   (``wsm_optim.core.backends``' ``accumulate``) over a real model's parameter list, against a
   single flat-tensor axpy over the same bytes, ``torch._foreach_lerp_`` EMA
   (``AveragedModel`` style, EMA in the params' dtype), NeMo-style
   ``_foreach_mul_`` + ``_foreach_add_``, and a per-tensor Python loop.
   Bytes per element per merge: ``param_bytes + 8`` (read theta, read+write fp32 A); the
   window-origin form training uses (``A <- A + c * (theta - theta_0)``) reads ``theta_0`` too:
   ``2 * param_bytes + 8``.
2. explicit (CPU): the paper's workflow, ``torch.save`` N checkpoints then load
   and average, against N streaming updates into one accumulator; time, disk,
   and peak RSS (each measured in a fresh subprocess).
3. step: ``WSMOptimizer.step()`` vs the inner AdamW step alone (fused on CUDA,
   foreach on CPU), interval 1 and 10.
4. e2e: a GPT-2 training step (bf16 autocast) with and without WSM, with and
   without ``overlap=True``. GPT-2-124M on CUDA; a toy config on CPU (code-path check only).
5. offload: ``offload="cpu"`` vs the inline fold (buffer bytes, step time).
6. origins: the window-origin form (what training runs) vs raw sums (runs resumed from
   format-1 state dicts): buffer bytes per param, ``step()`` at interval 1, same process.
7. moments: a moment merge (``moments=m``, the shape chosen after training) against one
   exact merge and against M exact merges (one per shape, the alternative for M shapes):
   buffer bytes per param, ``step()`` at interval 1, one readout; and the reconstruction's
   error bound per shape and ``m`` (from the weights alone).

Results go to ``<out>/RESULTS.md`` (this device's section is replaced, the
other's kept) and ``<out>/results_<device>_<section>.csv``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
if REPO not in sys.path:
    sys.path.insert(1, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import common as C  # noqa: E402
from wsm_optim import WSMOptimizer  # noqa: E402
from wsm_optim.core.backends import MergeUpdate, select  # noqa: E402
from wsm_optim.core.spec import MergeSpec  # noqa: E402
from wsm_optim.common.precision import accumulator_like  # noqa: E402
from wsm_optim.schedules import merge_coefficients  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: The speed and memory targets: id -> (where, measure, target text).
TARGETS = {
    "gpu_bw": ("GPU", "update bandwidth at >= 100M params", ">= 90% of HBM peak"),
    "gpu_ema": ("GPU", "speed vs `_foreach_lerp_` EMA", ">= 1.0x"),
    "gpu_step": ("GPU", "WSM step / fused AdamW step, interval 1", "<= 1.45x"),
    "gpu_e2e": ("GPU", "end-to-end step overhead, `overlap=True`", "<= 2%"),
    "cpu_flat": ("CPU", "update over a real model's parameter list", ">= 90% of a single flat axpy"),
    "cpu_explicit": ("CPU", "vs the explicit save-and-merge workflow (N = 10)", ">= 10x faster"),
}


# ------------------------------------------------------------------- backends


def select_backend(name: str, device: torch.device):
    """The backend object ``WSMOptimizer(..., backend=name)`` picks on ``device``, and its name.

    ``wsm_optim.core.backends.select``, the switch ``WSMOptimizer`` itself uses.
    """
    be = select(name, [device], [2])
    return be, be.name


def backend_names(device: torch.device) -> list[str]:
    # On CPU, triton only runs under TRITON_INTERPRET=1, which is a test path, not a speed path.
    return ["auto", "foreach", "triton"] if device.type == "cuda" else ["auto", "foreach"]


def available_backends(device: torch.device) -> tuple[list[tuple[str, object, str]], list[str]]:
    """[(label, backend object, resolved name)] without duplicates, and notes on unavailable ones."""
    out, notes, seen = [], [], set()
    for name in backend_names(device):
        try:
            be, resolved = select_backend(name, device)
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking the rest
            notes.append(f"backend {name!r} not available: {type(e).__name__}: {e}")
            continue
        if resolved in seen:
            continue
        seen.add(resolved)
        out.append((name if name == resolved else f"{name}->{resolved}", be, resolved))
    return out, notes


# ------------------------------------------------------------------- sections


def copy_bandwidth(args, device, timer) -> float:
    """Measured device-to-device copy bandwidth (GB/s): ``dst.copy_(src)``, 8 bytes per fp32 element."""
    n = 2**20 if args.quick else (2**28 if device.type == "cuda" else 2**26)
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    inner = 10 if device.type == "cuda" else 1
    s = C.interleaved({"copy": lambda: dst.copy_(src)}, timer, rounds=args.rounds, warmup=2, inner=inner)
    return 8 * n / C.median(s["copy"]) / 1e9


def calibrate_inner(timer, fn, target_s: float, cap: int = 100) -> int:
    fn()
    t = timer.time(fn)
    return max(1, min(cap, math.ceil(target_s / max(t, 1e-9))))


def checkpoint_target(backend, accs, coef, index=0):
    """A ``MergeUpdate`` that every backend applies as ``A += coef * theta``.

    The Triton kernel ignores ``coef`` and reads the weight from a device table
    at the index given by the device step counter: a one-update window
    (``k = 1``, weights ``(1 - coef, coef)``) with the counter at 1 makes it
    read ``coef`` (see ``bench_update``, which sets the counter).
    """
    spec = MergeSpec(schedule=[coef], window=1)  # decay w_1 = coef: c = (1 - coef, coef)
    return MergeUpdate(backend.plan(f"bench{index}", spec), coef, accs)


def bench_update(args, device, timer, peak, backends, model, dtype_name, rows, notes):
    """Section 1: one update pass over ``model``'s parameter list in ``dtype_name``."""
    dtype = DTYPES[dtype_name]
    shapes = C.MODELS[model]()
    n = C.numel(shapes)
    params = list(C.make_params(shapes, dtype, device).values())
    pbytes = params[0].element_size()
    accs = [accumulator_like(p) for p in params]
    origins = [p.detach().clone() for p in params]
    coef, decay = 1e-3, 0.999
    flat_p = torch.empty(n, dtype=dtype, device=device).normal_(0.0, 0.02)
    flat_acc = torch.zeros(n, dtype=torch.float32, device=device)
    ema = [p.clone() for p in params]  # AveragedModel keeps the EMA in the params' dtype
    extra_accs = [[accumulator_like(p) for p in params] for _ in range(args.multi - 1)]

    fns, nbytes, kind = {}, {}, {}
    fns["flat axpy (1 tensor)"] = lambda: flat_acc.add_(flat_p, alpha=coef)
    nbytes["flat axpy (1 tensor)"] = n * (pbytes + 8)
    kind["flat axpy (1 tensor)"] = "reference"
    wsm_auto = None
    for label, be, _ in backends:
        if be.clock is not None:
            be.clock.set(1)  # device counter at the first checkpoint of a k = 1 window
        targets = [checkpoint_target(be, accs, coef)]
        fn = functools.partial(be.accumulate, params, targets, cache={})  # tables built once, as in training
        try:
            with torch.no_grad():
                fn()
            timer.sync()
        except Exception as e:  # noqa: BLE001
            notes.append(f"update {model} {dtype_name}: backend {label} failed: {type(e).__name__}: {e}")
            continue
        name = f"WSM update [{label}]"
        fns[name], nbytes[name], kind[name] = fn, n * (pbytes + 8), "wsm"
        if wsm_auto is None:
            wsm_auto = name
        # what training runs: A += c (theta - theta_0), theta_0 in the params' dtype (one more read)
        with_origin = [MergeUpdate(targets[0].plan, coef, accs, origins=origins)]
        name_o = f"WSM update from window origins [{label}]"
        fns[name_o] = functools.partial(be.accumulate, params, with_origin, cache={})
        nbytes[name_o], kind[name_o] = n * (2 * pbytes + 8), "wsm-origin"
        if args.multi > 1:
            many = [checkpoint_target(be, a, coef, i) for i, a in enumerate([accs, *extra_accs])]
            name_m = f"WSM update, {args.multi} merges in one call [{label}]"
            fns[name_m] = functools.partial(be.accumulate, params, many, cache={})
            nbytes[name_m], kind[name_m] = n * (pbytes + 8 * args.multi), "wsm-multi"

    def loop():
        with torch.no_grad():
            for a, p in zip(accs, params):
                a.add_(p, alpha=coef)

    def nemo():
        torch._foreach_mul_(accs, decay)
        torch._foreach_add_(accs, params, alpha=1.0 - decay)

    fns["per-tensor loop acc.add_(p, alpha=c)"] = loop
    nbytes["per-tensor loop acc.add_(p, alpha=c)"] = n * (pbytes + 8)
    fns["EMA torch._foreach_lerp_ (AveragedModel)"] = lambda: torch._foreach_lerp_(ema, params, 1.0 - decay)
    nbytes["EMA torch._foreach_lerp_ (AveragedModel)"] = n * 3 * pbytes
    fns["NeMo-style _foreach_mul_ + _foreach_add_"] = nemo
    nbytes["NeMo-style _foreach_mul_ + _foreach_add_"] = n * (8 + pbytes + 8)
    for k in fns:
        kind.setdefault(k, "baseline")

    target_s = 0.002 if args.quick else (0.005 if device.type == "cuda" else 0.02)
    inner = calibrate_inner(timer, fns["flat axpy (1 tensor)"], target_s)
    cpu: dict[str, list[float]] = {}
    with torch.no_grad():
        s = C.interleaved(fns, timer, rounds=args.rounds, warmup=2, inner=inner, cpu_out=cpu)
    flat = s["flat axpy (1 tensor)"]
    for name, ts in s.items():
        med = C.median(ts)
        gbps = nbytes[name] / med / 1e9
        rows.append(
            {
                "model": model,
                "dtype": dtype_name,
                "params": n,
                "tensors": len(params),
                "variant": name,
                "kind": kind[name],
                "time_ms": med * 1e3,
                "min_ms": min(ts) * 1e3,
                "rounds": len(ts),
                "calls_per_sample": inner,
                "bytes_per_call": nbytes[name],
                "GB_per_s": gbps,
                "pct_of_peak": 100.0 * gbps / peak if peak else "",
                "flat_time_over_this": C.paired_ratio(flat, ts),
                "flat_cputime_over_this": C.paired_ratio(cpu["flat axpy (1 tensor)"], cpu[name]) if cpu else "",
                "this_time_over_wsm": C.paired_ratio(ts, s[wsm_auto]) if wsm_auto else float("nan"),
            }
        )


def _child_cmd(*extra: str) -> list[str]:
    return [C.python_executable(), os.path.abspath(__file__), *extra]


def run_child(args, *extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = _child_cmd(*extra, "--threads", str(args.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"child {' '.join(extra)} failed (rc {res.returncode}): {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def explicit_merge(paths: list[str], c) -> dict[str, torch.Tensor]:
    """The offline workflow, memory-frugal form: load checkpoints one at a time, fp32 running sum.

    Uses the same fp32 ops as the foreach backend (copy, scale, then ``add_``
    with ``alpha=c_j``), so its result can be compared with the streaming one.
    """
    acc: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for j, path in enumerate(paths):
            sd = torch.load(path, map_location="cpu", weights_only=True)
            for name, v in sd.items():
                if j == 0:
                    acc[name] = v.to(torch.float32, copy=True).mul_(float(c[0]))
                else:
                    acc[name].add_(v, alpha=float(c[j]))
            del sd
    return acc


def bench_explicit(args, device, timer, backends, rows, notes):
    """Section 2 (CPU): save N checkpoints + load and average, vs N streaming updates."""
    model = args.models[0]
    named = C.make_params(C.MODELS[model](), torch.float32, device)
    plist = list(named.values())
    n_ckpt = args.n_ckpt
    c = merge_coefficients("linear", n_ckpt - 1)
    label, be, _ = backends[0]
    accs = [accumulator_like(p) for p in plist]
    tmp = tempfile.mkdtemp(prefix="wsm_bench_ckpt_", dir=args.tmp_dir)
    paths = [os.path.join(tmp, f"ckpt_{j:03d}.pt") for j in range(n_ckpt)]
    samples = {"save": [], "merge": [], "explicit": [], "wsm": []}
    max_diff = 0.0
    try:
        for _ in range(args.explicit_reps):
            t_save = t_wsm = 0.0
            for j in range(n_ckpt):
                with torch.no_grad():  # stand-in for the training steps between checkpoints (untimed)
                    torch._foreach_add_(plist, 1e-3)
                t0 = time.perf_counter()
                torch.save(named, paths[j])
                t_save += time.perf_counter() - t0
                t0 = time.perf_counter()
                if j == 0:
                    be.anchor(plist, [MergeUpdate(None, float(c[0]), accs)])
                else:
                    be.accumulate(plist, [MergeUpdate(None, float(c[j]), accs)])
                t_wsm += time.perf_counter() - t0
            t0 = time.perf_counter()
            merged = explicit_merge(paths, c)
            t_merge = time.perf_counter() - t0
            max_diff = max(
                max_diff, max(float((merged[k] - a).abs().max()) for k, a in zip(named, accs))
            )
            del merged
            samples["save"].append(t_save)
            samples["merge"].append(t_merge)
            samples["explicit"].append(t_save + t_merge)
            samples["wsm"].append(t_wsm)
        disk = sum(os.path.getsize(p) for p in paths)
        mem_explicit = run_child(args, "--child", "explicit-merge", "--ckpt-dir", tmp, "--n-ckpt", str(n_ckpt))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mem_wsm = run_child(args, "--child", "wsm-stream", "--models", model, "--n-ckpt", str(n_ckpt))
    n = C.numel(C.MODELS[model]())
    base = {"model": model, "params": n, "N": n_ckpt, "reps": args.explicit_reps}
    ratio = C.paired_ratio(samples["explicit"], samples["wsm"])
    gib = lambda b: round(C.gib(b), 3) if b != "" else ""  # noqa: E731
    rows += [
        {**base, "variant": f"explicit: torch.save x{n_ckpt}", "time_s": C.median(samples["save"]),
         "disk_bytes": disk, "peak_rss_delta_bytes": "", "time_over_wsm": C.paired_ratio(samples["save"], samples["wsm"])},
        {**base, "variant": f"explicit: load + average {n_ckpt} files", "time_s": C.median(samples["merge"]),
         "disk_bytes": "", "peak_rss_delta_bytes": mem_explicit["peak_rss_delta"],
         "time_over_wsm": C.paired_ratio(samples["merge"], samples["wsm"])},
        {**base, "variant": "explicit: total (save + merge)", "time_s": C.median(samples["explicit"]),
         "disk_bytes": disk, "peak_rss_delta_bytes": mem_explicit["peak_rss_delta"], "time_over_wsm": ratio},
        {**base, "variant": f"WSM streaming: anchor + {n_ckpt - 1} updates [{label}]",
         "time_s": C.median(samples["wsm"]), "disk_bytes": 0,
         "peak_rss_delta_bytes": mem_wsm["peak_rss_delta"], "time_over_wsm": 1.0},
    ]
    for r in rows[-4:]:
        r["disk_GiB"], r["peak_rss_delta_GiB"] = gib(r["disk_bytes"]), gib(r["peak_rss_delta_bytes"])
    notes.append(
        f"explicit vs streaming merged model: max |difference| = {max_diff:.3g} "
        f"(same fp32 ops, same order; params ~N(0, 0.02^2))"
    )
    notes.append(
        "explicit-merge child process: peak RSS above its post-import baseline while loading and "
        f"averaging = {C.gib(mem_explicit['peak_rss_delta']):.3f} GiB in {mem_explicit['seconds']:.2f} s; "
        f"WSM child: accumulator + {n_ckpt} passes = {C.gib(mem_wsm['peak_rss_delta']):.3f} GiB "
        f"(fp32 accumulator is {C.gib(4 * n):.3f} GiB)"
    )
    return max_diff


def bench_step(args, device, timer, model, rows, notes):
    """Section 3: WSM step vs inner AdamW step (fused on CUDA, foreach on CPU), interval 1 and 10."""
    cuda = device.type == "cuda"
    shapes = C.MODELS[model]()
    params = [nn.Parameter(t) for t in C.make_params(shapes, torch.float32, device).values()]
    for p in params:
        p.grad = torch.empty_like(p).normal_(0.0, 1e-3)
    inner = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=cuda or None, foreach=None if cuda else True)
    block = 10  # steps per sample: every sample of interval 10 holds exactly one checkpoint
    kmax = 4096  # > checkpoints taken while timing, so no window completes (anchor cost: once per window)
    seen = set()
    for name in backend_names(device):
        try:
            wsm = {i: WSMOptimizer(inner, window=i * kmax, interval=i, backend=name) for i in (1, 10)}
        except Exception as e:  # noqa: BLE001
            notes.append(f"step {model}: backend {name!r} not available: {type(e).__name__}: {e}")
            continue
        resolved = wsm[1].backend
        if resolved in seen:
            continue
        seen.add(resolved)
        label = name if name == resolved else f"{name}->{resolved}"
        fns = {"inner AdamW": inner.step, "WSM interval 1": wsm[1].step, "WSM interval 10": wsm[10].step}
        try:
            cpu: dict[str, list[float]] = {}
            s = C.interleaved(fns, timer, rounds=args.step_rounds, warmup=1, inner=block, cpu_out=cpu)
        except Exception as e:  # noqa: BLE001
            notes.append(f"step {model}: backend {label} failed: {type(e).__name__}: {e}")
            continue
        for v, ts in s.items():
            rows.append(
                {
                    "model": model,
                    "params": C.numel(shapes),
                    "inner": "AdamW fused" if cuda else "AdamW foreach",
                    "backend": label if v != "inner AdamW" else "",
                    "variant": v,
                    "step_ms": C.median(ts) * 1e3,
                    "min_ms": min(ts) * 1e3,
                    "rounds": len(ts),
                    "steps_per_sample": block,
                    "ratio_vs_inner": C.paired_ratio(ts, s["inner AdamW"]),
                    "ratio_vs_inner_cputime": C.paired_ratio(cpu[v], cpu["inner AdamW"]) if cpu else "",
                }
            )
        del wsm, fns


def bench_offload(args, device, timer, model, rows, notes):
    """Section 5: ``offload="cpu"`` vs the inline fold: buffer bytes per param and step time at interval 1/10/100."""
    cuda = device.type == "cuda"
    shapes = C.MODELS[model]()
    n = C.numel(shapes)
    params = [nn.Parameter(t) for t in C.make_params(shapes, torch.float32, device).values()]
    for p in params:
        p.grad = torch.empty_like(p).normal_(0.0, 1e-3)
    inner = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=cuda or None, foreach=None if cuda else True)
    kmax = 4096  # no window completes while timing

    def buffer_bytes(opt):
        sd = opt.state_dict()  # joins the worker; tensors are references to the live buffers
        where: dict[str, int] = {}
        for entry in sd["state"].values():
            for k, v in entry.items():
                if k.startswith("wsm_"):
                    where[v.device.type] = where.get(v.device.type, 0) + v.numel() * v.element_size()
        return where

    for keep in (False, True):  # memory per param and merge, by placement
        for offload in (None, "cpu"):
            base = torch.cuda.memory_allocated(device) if cuda else 0
            opt = WSMOptimizer(inner, window=kmax, keep_last=keep, offload=offload)
            opt.step()
            where = buffer_bytes(opt)
            gpu = (torch.cuda.memory_allocated(device) - base) if cuda else 0
            rows.append({"model": model, "variant": f"memory, keep_last={keep}, offload={offload}",
                         "host_B_per_param": where.get("cpu", 0) / n if (offload or not cuda) else 0.0,
                         "gpu_B_per_param": gpu / n if cuda else "",
                         "note": "host bytes of the merge's buffers (state_dict); GPU bytes by memory_allocated"})
            del opt
    for interval, block in ((1, 10), (10, 10), (100, 100)):
        variants = {"inline": WSMOptimizer(inner, window=interval * kmax, interval=interval),
                    "offload": WSMOptimizer(inner, window=interval * kmax, interval=interval, offload="cpu")}

        def steps(opt, count=block):  # a sample ends when the merge's work is done (state_dict joins)
            def run():
                for _ in range(count):
                    opt.step()
                opt.state_dict()
            return run

        fns = {"inner AdamW": steps(inner), **{k: steps(v) for k, v in variants.items()}}
        rounds = args.step_rounds or (3 if interval == 100 else 5)
        s = C.interleaved(fns, timer, rounds=rounds, warmup=1, inner=1, wall=True)
        for v, ts in s.items():
            rows.append({"model": model, "variant": f"interval {interval}: {v}", "step_ms": C.median(ts) / block * 1e3,
                         "ratio_vs_inner": C.paired_ratio(ts, s["inner AdamW"]),
                         "note": f"{block} steps per sample, {len(ts)} rounds, wall clock incl. the worker's fold"})
        del variants, fns
    if cuda:  # device-to-host bandwidth reached by the staging copy vs a plain pinned copy_ of the same bytes
        host = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in params]
        plain = lambda: torch._foreach_copy_(host, params, non_blocking=True)  # noqa: E731
        opt = WSMOptimizer(inner, window=kmax, offload="cpu")
        t = C.interleaved({"pinned copy_": plain, "offload step": opt.step, "inner AdamW": inner.step}, timer, rounds=10)
        nbytes = n * 4
        rows.append({"model": model, "variant": "D2H: pinned copy_", "GB_per_s": nbytes / C.median(t["pinned copy_"]) / 1e9})
        rows.append({"model": model, "variant": "D2H: offload step - AdamW step",
                     "GB_per_s": nbytes / max(C.median(t["offload step"]) - C.median(t["inner AdamW"]), 1e-9) / 1e9})


def bench_origins(args, device, timer, model, rows, notes):
    """Section 6: window origins vs raw sums: buffer bytes per param, and step time at interval 1."""
    cuda = device.type == "cuda"
    shapes = C.MODELS[model]()
    n = C.numel(shapes)
    kmax = 4096  # no window completes while timing (its anchor runs once, in the warmup)

    def raw(opt):  # the arithmetic of a run resumed from a format-1 state dict
        opt._runtime.use_origins(False)
        return opt

    for dtype_name in ("fp32", "bf16"):
        params = [nn.Parameter(t) for t in C.make_params(shapes, DTYPES[dtype_name], device).values()]
        for p in params:
            p.grad = torch.empty_like(p).normal_(0.0, 1e-3)
        inner = torch.optim.SGD(params, lr=1e-5, foreach=True)
        for keep in (False, True):
            for form in ("raw sums", "origins"):
                opt = WSMOptimizer(inner, window=kmax, keep_last=keep)
                if form == "raw sums":
                    raw(opt)
                opt.step()
                sd = opt.state_dict()
                nbytes = sum(v.numel() * v.element_size() for e in sd["state"].values()
                             for k, v in e.items() if k.startswith("wsm_"))
                rows.append({"model": model, "dtype": dtype_name, "variant": f"memory, keep_last={keep}, {form}",
                             "B_per_param": nbytes / n, "note": "one merge; wsm_* buffers of state_dict()"})
                del opt, sd
        block = 10
        for name in backend_names(device):
            try:
                forms = {"origins": WSMOptimizer(inner, window=kmax, backend=name),
                         "raw sums": raw(WSMOptimizer(inner, window=kmax, backend=name))}
            except Exception as e:  # noqa: BLE001
                notes.append(f"origins {model}: backend {name!r} not available: {type(e).__name__}: {e}")
                continue
            label = forms["origins"].backend
            if name == "auto" and not cuda:
                continue  # the same as foreach on CPU
            fns = {"inner SGD": inner.step, "WSM interval 1, raw sums": forms["raw sums"].step,
                   "WSM interval 1, origins": forms["origins"].step}
            s = C.interleaved(fns, timer, rounds=args.step_rounds, warmup=1, inner=block)
            for v, ts in s.items():
                rows.append({"model": model, "dtype": dtype_name, "backend": label if v != "inner SGD" else "",
                             "variant": v, "step_ms": C.median(ts) * 1e3,
                             "ratio_vs_raw": C.paired_ratio(ts, s["WSM interval 1, raw sums"]),
                             "ratio_vs_inner": C.paired_ratio(ts, s["inner SGD"]),
                             "note": f"{block} steps per sample, {len(ts)} rounds"})
            del forms, fns
        del params, inner


SHAPES_READ = ("linear", "1-sqrt", "cosine", "ema", "inv-sqrt")
MOMENT_COUNTS = (2, 4, 6, 8)


def bench_moments(args, device, timer, model, rows, bound_rows, notes):
    """Section 7: a moment merge vs one and M exact merges: buffer bytes, step time, readout time; error bounds."""
    import warnings

    from wsm_optim.core.moments import EXPONENTS, fit_shape

    shapes = C.MODELS[model]()
    n = C.numel(shapes)
    kmax = 4096  # no window completes while timing
    params = [nn.Parameter(t) for t in C.make_params(shapes, torch.float32, device).values()]
    for i, p in enumerate(params):
        p.grad = torch.empty_like(p).normal_(0.0, 1e-3)
    inner = torch.optim.SGD([(f"p{i}", p) for i, p in enumerate(params)], lr=1e-5, foreach=True)
    variants = {"one exact merge": dict(window=kmax),
                f"{len(SHAPES_READ)} exact merges (one per shape)": dict(
                    merges={s: dict(window=kmax, schedule=s) for s in SHAPES_READ})}
    for m in MOMENT_COUNTS:
        variants[f"moments={m}"] = dict(window=kmax, moments=m)
    opts = {}
    for v, kwargs in variants.items():
        opt = WSMOptimizer(inner, **kwargs)
        opt.step()  # anchors; buffers placed
        sd = opt.state_dict()
        nbytes = sum(t.numel() * t.element_size() for e in sd["state"].values() for k, t in e.items()
                     if k.startswith("wsm_") and not k.startswith("wsm_origin."))
        # the state dict repeats a shared origin under each merge's name: count each origin tensor once
        origins = {id(t): t.numel() * t.element_size() for part in opt._runtime.merges
                   for t in (part.origin or {}).values()}
        nbytes += sum(origins.values())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = []
            for _ in range(3):  # the fastest of three: one readout is a few passes, noisy on a shared host
                t0 = time.perf_counter()
                opt.merged_state_dict(merge=None if len(opt.merges) == 1 else "linear", shape="cosine" if
                                      opt.is_moment_merge(opt.merges[0]) else None)
                times.append(time.perf_counter() - t0)
            readout = min(times)
        rows.append({"model": model, "backend": opt.backend, "variant": v, "B_per_param": nbytes / n,
                     "readout_ms": readout * 1e3, "note": "fp32 params; accumulators + shared window origin"})
        opts[v] = opt
        del sd
    block = 5
    fns = {"inner SGD": inner.step, **{v: o.step for v, o in opts.items()}}
    s = C.interleaved(fns, timer, rounds=args.step_rounds, warmup=1, inner=block)
    for v, ts in s.items():
        row = next((r for r in rows if r["variant"] == v and r["model"] == model), None)
        if row is None:
            row = {"model": model, "variant": v}
            rows.append(row)
        row.update(step_ms=C.median(ts) * 1e3, ratio_vs_one_exact=C.paired_ratio(ts, s["one exact merge"]),
                   ratio_vs_inner=C.paired_ratio(ts, s["inner SGD"]))
        row["note"] = (row.get("note", "") + f"; {block} steps per sample, {len(ts)} rounds").lstrip("; ")
    del opts, fns, params, inner
    for updates in (100, 1000, 10000):
        for m in range(1, len(EXPONENTS) + 1):
            bound_rows.append({"updates": updates, "moments": m, **{
                sh: f"{fit_shape(sh, updates, EXPONENTS[:m]).error:.1e}" for sh in SHAPES_READ}})


def bench_e2e(args, device, timer, rows, notes):
    """Section 4: GPT-2 training step, bf16 autocast, with/without WSM and overlap."""
    cuda = device.type == "cuda"
    if cuda and not args.quick:
        cfg, batch, seq, label = C.GPTConfig(), args.e2e_batch, 1024, "gpt2-124m"
    else:
        cfg = C.GPTConfig(vocab=1024, n_ctx=64, d=128, n_layer=2, n_head=4)
        batch, seq, label = 4, 64, "gpt2-toy (code-path check, not the GPU target)"
    torch.manual_seed(0)
    model = C.GPT(cfg).to(device)
    data = torch.randint(0, cfg.vocab, (batch, seq + 1), device=device)
    x, y = data[:, :-1], data[:, 1:]
    inner = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=cuda or None,
                              foreach=None if cuda else True)

    def train_step(opt):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, cfg.vocab), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    variants = {}
    window = 4096  # > steps timed: one anchor, taken during warmup
    try:
        wsm = WSMOptimizer(inner, window=window, backend="auto")
        variants["WSM interval 1"] = functools.partial(train_step, wsm)
        backend = wsm.backend
    except Exception as e:  # noqa: BLE001
        notes.append(f"e2e: WSM (auto) not available: {type(e).__name__}: {e}")
        backend = ""
    overlap_note = ""
    try:
        wsm_ov = WSMOptimizer(inner, window=window, backend="auto", overlap=True)
        variants["WSM interval 1, overlap=True"] = functools.partial(train_step, wsm_ov)
    except TypeError as e:
        overlap_note = f"overlap not available (WSMOptimizer has no overlap= argument: {e})"
    except Exception as e:  # noqa: BLE001 - e.g. overlap refused on CPU
        overlap_note = f"overlap not supported here: {type(e).__name__}: {e}"
    if overlap_note:
        notes.append("e2e: " + overlap_note)
    # last: every WSMOptimizer is stepped before the plain AdamW steps the shared params (a WSMOptimizer
    # whose params move between backward passes before its first step() refuses to go on)
    variants["AdamW only"] = functools.partial(train_step, inner)
    block = 10 if cuda and not args.quick else 2
    s = C.interleaved(variants, timer, rounds=args.e2e_rounds, warmup=1, inner=block, wall=True)
    for v, ts in s.items():
        rows.append(
            {
                "model": label,
                "batch": batch,
                "seq": seq,
                "variant": v,
                "backend": backend if v != "AdamW only" else "",
                "step_ms": C.median(ts) * 1e3,
                "min_ms": min(ts) * 1e3,
                "rounds": len(ts),
                "steps_per_sample": block,
                "overhead_pct": 100.0 * (C.paired_ratio(ts, s["AdamW only"]) - 1.0),
            }
        )
    if overlap_note:
        rows.append({"model": label, "batch": batch, "seq": seq, "variant": "WSM interval 1, overlap=True",
                     "backend": "", "step_ms": "", "overhead_pct": "", "note": overlap_note})


def free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------- targets


def evaluate_targets(args, device, results) -> list[dict]:
    """One row per (target, case): measured value and pass / fail / not measured."""
    cuda = device.type == "cuda"
    quick = " (quick sizes: not meaningful)" if args.quick else ""
    rows = []

    def add(tid, case, measured, ok):
        where, measure, target = TARGETS[tid]
        status = "not measured" if ok is None else ("pass" if ok else "fail")
        rows.append({"id": tid, "where": where, "measure": measure, "target": target, "case": case + quick,
                     "measured": measured, "status": status})

    def not_here(tid):
        if TARGETS[tid][0] == "GPU":
            why = "not measured: no GPU run yet" if not torch.cuda.is_available() else "not measured in this run (--device cuda)"
        else:
            why = "not measured in this run (--device cpu)"
        add(tid, "", why, None)

    upd = results["update"]
    wsm_rows = [r for r in upd if r["kind"] == "wsm"]

    def auto_row(model, dtype):
        rs = [r for r in wsm_rows if r["model"] == model and r["dtype"] == dtype]
        return rs[0] if rs else None  # the first backend listed is "auto"

    if cuda:
        cases = list(dict.fromkeys((r["model"], r["dtype"]) for r in wsm_rows))  # run order: fp32 first
        big = [(m, d) for m, d in cases if C.numel(C.MODELS[m]()) >= 100_000_000 or args.quick]
        for model, dt in big:
            r = auto_row(model, dt)
            add("gpu_bw", f"{model} {dt}, backend {r['variant'].split('[')[-1].rstrip(']')}, peak {results['peak_label']}",
                f"{r['pct_of_peak']:.1f}% ({r['GB_per_s']:.0f} GB/s)", r["pct_of_peak"] >= 90.0)
        if not big:
            add("gpu_bw", "", "not measured: no model >= 100M params in --models", None)
        for model, dt in cases:
            r = auto_row(model, dt)
            ema = [x for x in upd if x["model"] == model and x["dtype"] == dt and x["variant"].startswith("EMA")]
            note = "" if dt == "fp32" else f" (EMA in {dt} moves {3 * DTYPES[dt].itemsize} B/elem vs WSM {DTYPES[dt].itemsize + 8})"
            add("gpu_ema", f"{model} {dt}{note}", f"{ema[0]['this_time_over_wsm']:.2f}x",
                ema[0]["this_time_over_wsm"] >= 1.0)
        steps = [r for r in results["step"] if r["variant"] == "WSM interval 1"]
        for r in steps:
            add("gpu_step", f"{r['model']} fp32, backend {r['backend']}", f"{r['ratio_vs_inner']:.3f}x",
                r["ratio_vs_inner"] <= 1.45)
        if not steps:
            add("gpu_step", "", "not measured: step section failed", None)
        ov = [r for r in results["e2e"] if r["variant"] == "WSM interval 1, overlap=True"]
        if ov and ov[0]["overhead_pct"] != "":
            r = ov[0]
            add("gpu_e2e", f"{r['model']} batch {r['batch']}x{r['seq']}, bf16 autocast", f"{r['overhead_pct']:+.2f}%",
                r["overhead_pct"] <= 2.0)
        else:
            add("gpu_e2e", "", "not measured: " + (ov[0].get("note", "") if ov else "e2e section failed"), None)
        not_here("cpu_flat")
        not_here("cpu_explicit")
    else:
        for t in ("gpu_bw", "gpu_ema", "gpu_step", "gpu_e2e"):
            not_here(t)
        model = args.models[0]
        r = auto_row(model, "fp32")
        if r:
            add("cpu_flat", f"{model} fp32 ({r['tensors']} tensors), {r['variant']}",
                f"{100 * r['flat_time_over_this']:.1f}%", r["flat_time_over_this"] >= 0.90)
        else:
            add("cpu_flat", "", "not measured: no fp32 update row", None)
        tot = [r for r in results["explicit"] if r["variant"].startswith("explicit: total")]
        if tot:
            r = tot[0]
            add("cpu_explicit", f"{r['model']} fp32, N = {r['N']}, median of {r['reps']}",
                f"{r['time_over_wsm']:.1f}x", r["time_over_wsm"] >= 10.0)
        else:
            add("cpu_explicit", "", "not measured: explicit section failed", None)
    return rows


# ------------------------------------------------------------------- report

SECTION_COLS = {
    "update": ["model", "dtype", "variant", "time_ms", "GB_per_s", "pct_of_peak", "flat_time_over_this",
               "flat_cputime_over_this", "this_time_over_wsm"],
    "explicit": ["variant", "time_s", "time_over_wsm", "disk_GiB", "peak_rss_delta_GiB"],
    "step": ["model", "backend", "variant", "step_ms", "ratio_vs_inner", "ratio_vs_inner_cputime"],
    "e2e": ["model", "batch", "seq", "variant", "backend", "step_ms", "overhead_pct", "note"],
    "offload": ["model", "variant", "host_B_per_param", "gpu_B_per_param", "step_ms", "ratio_vs_inner", "GB_per_s",
                "note"],
    "origins": ["model", "dtype", "backend", "variant", "B_per_param", "step_ms", "ratio_vs_raw", "ratio_vs_inner",
                "note"],
    "moments": ["model", "backend", "variant", "B_per_param", "step_ms", "ratio_vs_one_exact", "ratio_vs_inner",
                "readout_ms", "note"],
    "moment_bounds": ["updates", "moments", *SHAPES_READ],
}

SECTION_TEXT = {
    "update": (
        "### 1. One update pass over a parameter list\n\n"
        "Bytes per call: WSM / flat axpy / loop `(param_bytes + 8) * n`; EMA lerp `3 * param_bytes * n`; "
        "NeMo `(param_bytes + 16) * n`; k merges in one call `(param_bytes + 8k) * n`. "
        "WSM from window origins `(2 * param_bytes + 8) * n`. `flat_time_over_this` = time of one flat-tensor axpy over the same number of elements / this "
        "time (1.0 = as fast as the flat axpy). `this_time_over_wsm` = this time / the first WSM backend's "
        "time (>1: WSM is faster). `pct_of_peak` is against the peak named above."
    ),
    "explicit": (
        "### 2. Explicit save-and-merge vs streaming\n\n"
        "Explicit: `torch.save` of the param dict at each of N checkpoints, then a merge that loads the "
        "files one at a time and keeps an fp32 running sum (the memory-frugal way; loading all N at once "
        "needs N x model size). Files go to the page cache (no fsync) and are read back from it, which "
        "flatters the explicit side. WSM: anchor + N-1 `accumulate` passes into one fp32 accumulator. "
        "Peak RSS deltas are measured in fresh subprocesses (RSS sampled every 2 ms and `ru_maxrss`), "
        "above the RSS just before the measured work."
    ),
    "step": (
        "### 3. Step overhead\n\n"
        "`WSMOptimizer(inner).step()` vs `inner.step()` on the same params and fixed grads; one inner "
        "AdamW shared by all wrappers. Each sample is 10 consecutive steps, so interval 10 holds exactly "
        "one checkpoint update per sample. The window is longer than the run, so the per-window anchor "
        "pass (one more update pass per window) is not in these numbers. Bandwidth bound: an fp32 AdamW "
        "step moves 28 B/param (param r+w, grad r, m r+w, v r+w); a WSM checkpoint adds 12 (param r, "
        "accumulator r+w), so 40/28 = 1.43x at interval 1 and 1.04x at interval 10. "
        "`ratio_vs_inner_cputime` (CPU only) uses process CPU time, which excludes time this process "
        "spent descheduled by other processes on a shared machine."
    ),
    "offload": (
        "### 5. Accumulators on the host (`offload=\"cpu\"`)\n\n"
        "Buffer bytes per parameter by placement (one merge, with and without `keep_last`), then step time "
        "of the inline fold vs `offload=\"cpu\"` vs the inner AdamW alone, at interval 1, 10 and 100. A "
        "sample is a block of steps followed by `state_dict()`, which waits for the worker, so the host "
        "fold's time is inside the sample; on a CPU-only machine the worker competes with training for the "
        "same cores. On CUDA: GPU bytes by `torch.cuda.memory_allocated`, and the device-to-host bandwidth "
        "of the staging copy vs a plain pinned `copy_` of the same bytes."
    ),
    "origins": (
        "### 6. Window origins: what the precise form costs\n\n"
        "Training folds `A += c_j (theta_j - theta_0)` from each window's origin `theta_0` (state-dict "
        "format 2); runs resumed from format 1 keep raw sums `A += c_j theta_j`. Buffer bytes per param of "
        "one merge (from `state_dict()`), then `WSMOptimizer.step()` at interval 1 with origins vs raw sums, "
        "same process, round-robin (`ratio_vs_raw` = paired median of origins / raw)."
    ),
    "moments": (
        "### 7. Moment merges: choosing the shape after training\n\n"
        "`WSMOptimizer(moments=m)` keeps `m` fp32 moments (plus the window origin) and is read with any "
        "shape afterwards; the alternative for `M` shapes is `M` exact merges. Buffer bytes per param from "
        "`state_dict()`; `WSMOptimizer.step()` at interval 1, same process, round-robin "
        "(`ratio_vs_one_exact` = paired median over one exact merge); `readout_ms`: one `merged_state_dict()` (fastest of three)."
    ),
    "moment_bounds": (
        "#### Reconstruction error bound per shape and `m`\n\n"
        "`sum |w - w_hat| / sum w` of the fitted decay weights over a window of `updates` updates "
        "(`WSMOptimizer.shape_fit`); `|merge_hat - merge| <= bound * sum w * max |Delta|` per element."
    ),
    "e2e": (
        "### 4. End to end\n\n"
        "Forward + backward (bf16 autocast) + step + zero_grad, eager mode. Wall clock with a full "
        "device sync around each sample (side streams included). `overhead_pct` = paired median of "
        "(WSM step time / AdamW-only step time) - 1."
    ),
}


def section_markdown(args, env, results, notes, targets, failures) -> str:
    dev = env["device_kind"]
    out = [f"<!-- BEGIN {dev} -->", f"## {dev.upper()} run" + (" (QUICK: toy sizes, not meaningful)" if args.quick else "")]
    out += [
        "",
        f"- Command: `{env['command']}`",
        f"- Date: {env['date']}",
        f"- Device: {env['device']}",
        f"- torch threads: {env['threads']} (`torch.set_num_threads`); CPUs visible: {env['cpus']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- CPU: {env['cpu']}",
        f"- git: {env['git']}",
        f"- Load average (1/5/15 min) at start: {env['load_start']}; at end: {env['load_end']}",
        f"- Peak bandwidth used for % of peak: {results.get('peak_label', 'n/a')}; measured copy "
        f"bandwidth: {results.get('copy_gbps', float('nan')):.1f} GB/s",
        f"- Wall time of this run: {env['elapsed_s']:.0f} s",
        "",
        "### Targets (this run)",
        "",
        C.md_table(targets, ["where", "measure", "target", "case", "measured", "status"]),
        "",
    ]
    for sec, cols in SECTION_COLS.items():
        out += [SECTION_TEXT[sec], ""]
        if results.get(sec):
            used = [c for c in cols if any(r.get(c, "") != "" for r in results[sec])]
            out += [C.md_table(results[sec], used), ""]
        else:
            if sec in failures:
                why = f"FAILED: {failures[sec]}"
            elif sec not in args.sections:
                why = "not run: not in --sections"
            elif sec == "explicit" and dev == "cuda":
                why = "CPU only: run with --device cpu"
            else:
                why = "no rows"
            out += [why, ""]
    if notes:
        out += ["### Notes", ""] + [f"- {n}" for n in notes] + [""]
    out.append(f"<!-- END {dev} -->")
    return "\n".join(out)


def placeholder(dev: str) -> str:
    what = "no GPU run yet" if dev == "cuda" else "no CPU run recorded"
    return "\n".join([f"<!-- BEGIN {dev} -->", f"## {dev.upper()} run", "",
                      f"Not measured: {what}. Command: `python bench/bench_update.py --device {dev}`", "",
                      f"<!-- END {dev} -->"])


def write_report(out_dir: str, dev: str, section: str) -> str:
    path = os.path.join(out_dir, "RESULTS.md")
    sections = {"cpu": placeholder("cpu"), "cuda": placeholder("cuda"), "notes": ""}
    if os.path.exists(path):
        text = open(path).read()
        for d in sections:  # keep the other device's section and the hand-written notes block
            b, e = f"<!-- BEGIN {d} -->", f"<!-- END {d} -->"
            if b in text and e in text:
                sections[d] = text[text.index(b): text.index(e) + len(e)]
    sections[dev] = section
    combined = []
    for d, where in (("cuda", "GPU"), ("cpu", "CPU")):
        csv_path = os.path.join(out_dir, f"results_{d}_targets.csv")
        got = [r for r in C.read_csv(csv_path) if r["where"] == where] if os.path.exists(csv_path) else []
        if got:
            combined += [{**r, "run": f"{d} section"} for r in got]
        else:
            for tid, (w, measure, target) in TARGETS.items():
                if w == where:
                    combined.append({"where": w, "measure": measure, "target": target, "case": "",
                                     "measured": "not measured: no GPU run yet" if d == "cuda" else "not measured",
                                     "status": "not measured", "run": ""})
    text = "\n".join([
        "# wsm_optim benchmark results",
        "",
        "Generated by `bench/bench_update.py`; each device's section below is replaced by that device's",
        "latest run (`--out` directory). The targets are checked by the benchmark output only.",
        "",
        "## Targets (latest run of each device)",
        "",
        C.md_table(combined, ["where", "measure", "target", "case", "measured", "status"]),
        "",
        sections["notes"] or "<!-- BEGIN notes -->\n<!-- END notes -->",
        "",
        sections["cuda"],
        "",
        sections["cpu"],
        "",
    ])
    with open(path, "w") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------- child


def child_main(args) -> int:
    """Peak-RSS measurements in a fresh process; prints one JSON line."""
    if args.child == "explicit-merge":
        paths = sorted(os.path.join(args.ckpt_dir, f) for f in os.listdir(args.ckpt_dir) if f.endswith(".pt"))
        c = merge_coefficients("linear", len(paths) - 1)
        t0 = time.perf_counter()
        with C.RssPeak() as r:
            merged = explicit_merge(paths, c)
        seconds = time.perf_counter() - t0
        del merged
    elif args.child == "wsm-stream":
        plist = list(C.make_params(C.MODELS[args.models[0]](), torch.float32, torch.device("cpu")).values())
        be, _ = select_backend("auto", torch.device("cpu"))
        c = merge_coefficients("linear", args.n_ckpt - 1)
        t0 = time.perf_counter()
        with C.RssPeak() as r:
            accs = [accumulator_like(p) for p in plist]
            be.anchor(plist, [MergeUpdate(None, float(c[0]), accs)])
            for j in range(1, args.n_ckpt):
                be.accumulate(plist, [MergeUpdate(None, float(c[j]), accs)])
        seconds = time.perf_counter() - t0
    else:
        raise SystemExit(f"--child must be explicit-merge or wsm-stream, got {args.child!r}")
    print(json.dumps({"peak_rss_delta": r.delta, "peak_rss": r.peak, "rss_before": r.before, "seconds": seconds}))
    return 0


# ----------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device to benchmark (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="toy sizes and few repeats (smoke test); writes files only if --out is given")
    p.add_argument("--out", default=None, help="directory for RESULTS.md and CSVs (default: bench/; none with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: os.cpu_count())")
    p.add_argument("--models", default=None,
                   help=f"comma list from {sorted(C.MODELS)} (default: cpu gpt2-124m; cuda gpt2-124m,llama-1b)")
    p.add_argument("--dtypes", default=None, help="param dtypes for section 1, from fp32,bf16,fp16 "
                   "(default: cpu fp32; cuda fp32,bf16)")
    p.add_argument("--sections", default="update,explicit,step,e2e,offload,origins,moments",
                   help="comma list of sections to run")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds in section 1")
    p.add_argument("--step-rounds", type=int, default=None, help="timed rounds in section 3")
    p.add_argument("--e2e-rounds", type=int, default=None, help="timed rounds in section 4")
    p.add_argument("--e2e-batch", type=int, default=8, help="GPT-2 batch size on CUDA (sequence 1024)")
    p.add_argument("--n-ckpt", type=int, default=10, help="checkpoints N in section 2")
    p.add_argument("--explicit-reps", type=int, default=None, help="repeats of section 2")
    p.add_argument("--multi", type=int, default=3, help="merges updated in one call in section 1 (1 = skip)")
    p.add_argument("--tmp-dir", default=None, help="where section 2 writes its checkpoints (default: system temp)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    if args.models is None:
        args.models = "gpt2-tiny" if args.quick else ("gpt2-124m,llama-1b" if cuda else "gpt2-124m")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in C.MODELS:
            p.error(f"--models: unknown model {m!r}; choose from {sorted(C.MODELS)}")
    args.dtypes = [d.strip() for d in (args.dtypes or ("fp32,bf16" if cuda else "fp32")).split(",") if d.strip()]
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in args.sections:
        if s not in SECTION_COLS:
            p.error(f"--sections: unknown section {s!r}; choose from {list(SECTION_COLS)}")
    q = args.quick
    args.rounds = args.rounds or (3 if q else (20 if cuda else 15))
    args.step_rounds = args.step_rounds or (2 if q else (10 if cuda else 4))
    args.e2e_rounds = args.e2e_rounds or (2 if q else (10 if cuda else 3))
    args.explicit_reps = args.explicit_reps or (2 if q else 3)
    if args.n_ckpt < 2:
        p.error(f"--n-ckpt must be >= 2, got {args.n_ckpt}")
    if args.multi < 1:
        p.error(f"--multi must be >= 1, got {args.multi}")
    args.threads = args.threads or os.cpu_count() or 1
    if args.out is None and not q:
        args.out = HERE
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        return child_main(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    dev = device.type
    env = {
        "device_kind": dev,
        "command": "python bench/bench_update.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": C.device_name(device),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "versions": C.versions(),
        "cpu": C.cpu_model(),
        "git": C.git_revision(REPO),
        "load_start": C.loadavg(),
    }
    print(f"[bench] {env['device']} | threads {env['threads']} | load {env['load_start']} | models {args.models}", flush=True)
    timer = C.Timer(device)
    results = {s: [] for s in SECTION_COLS}
    notes: list[str] = []
    failures: dict[str, str] = {}

    results["copy_gbps"] = copy_bandwidth(args, device, timer)
    spec = C.peak_bandwidth_gbps(env["device"]) if dev == "cuda" else None
    if spec:
        results["peak"], results["peak_label"] = spec[0], f"{spec[1]} spec sheet"
    elif dev == "cuda":
        results["peak"] = results["copy_gbps"]
        results["peak_label"] = f"measured copy bandwidth {results['copy_gbps']:.0f} GB/s (device not in the peak table)"
    else:
        # A CPU has no useful spec-sheet roofline here; section 1 compares with the flat axpy instead.
        results["peak"], results["peak_label"] = None, "none on CPU (compare with the flat axpy)"
    backends, bnotes = available_backends(device)
    notes += bnotes
    print(f"[bench] backends: {[b[0] for b in backends]}; peak: {results['peak_label']}", flush=True)

    def run(section, fn):
        if section not in args.sections:
            return
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - keep the other sections, report the failure
            failures[section] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        print(f"[bench] {section}: {time.perf_counter() - t0:.1f} s (load {C.loadavg()})", flush=True)

    def sec_update():
        for model in args.models:
            for dt in args.dtypes:
                bench_update(args, device, timer, results["peak"], backends, model, dt, results["update"], notes)
                free(device)  # the section's tensors died with its frame

    run("update", sec_update)
    if dev == "cpu":
        run("explicit", lambda: bench_explicit(args, device, timer, backends, results["explicit"], notes))
    else:
        notes.append("section 2 (explicit save-and-merge) runs on CPU only")
    def sec_step():
        for model in args.models:
            bench_step(args, device, timer, model, results["step"], notes)
            free(device)

    run("step", sec_step)
    run("e2e", lambda: bench_e2e(args, device, timer, results["e2e"], notes))

    def sec_offload():
        for model in args.models:
            bench_offload(args, device, timer, model, results["offload"], notes)
            free(device)

    run("offload", sec_offload)
    free(device)

    def sec_origins():
        for model in args.models:
            bench_origins(args, device, timer, model, results["origins"], notes)
            free(device)

    run("origins", sec_origins)
    free(device)

    def sec_moments():
        for model in args.models:
            bench_moments(args, device, timer, model, results["moments"], results["moment_bounds"], notes)
            free(device)

    run("moments", sec_moments)
    free(device)

    env["load_end"] = C.loadavg()
    env["elapsed_s"] = time.perf_counter() - t_start
    targets = evaluate_targets(args, device, results)
    for name, msg in failures.items():
        notes.append(f"section {name} FAILED: {msg}")

    print()
    print(C.md_table(targets, ["where", "measure", "target", "case", "measured", "status"]))
    for sec in SECTION_COLS:
        if results[sec]:
            print(f"\n[{sec}]")
            print(C.md_table(results[sec], SECTION_COLS[sec]))
    for n in notes:
        print("note:", n)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for sec in SECTION_COLS:
            C.write_csv(os.path.join(args.out, f"results_{dev}_{sec}.csv"), results[sec])
        C.write_csv(os.path.join(args.out, f"results_{dev}_targets.csv"), targets)
        path = write_report(args.out, dev, section_markdown(args, env, results, notes, targets, failures))
        print(f"[bench] wrote {path} and results_{dev}_*.csv", flush=True)
    else:
        print("[bench] --quick without --out: no files written", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
