"""Long windows (thousands of checkpoints) stay exact: readouts vs a float64 explicit merge of stored checkpoints.

The accumulator holds ``sum_j c_j (theta_j - theta_0)`` from the window's
origin, so its fp32 rounding is relative to the merge's displacement from the
live model, not to ``|theta|``. A sum of raw params loses about
``k * 1e-7 * |theta|``: at ``k = 1e4`` checkpoints and a displacement of
``1e-3 |theta|`` that was 6.5e-2 of the displacement.

Error measure: ``max |got - ref| / max |ref - live|`` (``ref``: the float64 merge,
``live``: the params at the readout). An fp32 readout cannot beat the rounding
of ``ref`` itself to fp32 (half an ulp of ``theta``, ~6e-5 of a ``1e-3``
displacement), so the property test bounds the error *beyond* that rounding,
``max(|got - ref| - ulp(ref) / 2) / max |ref - live|``; the fixed cases bound
the plain ratio too.

The parameters follow a random walk (SGD, ``lr = 1``, Gaussian gradients) that
moves them by about ``rho`` (relative to ``|theta| ~ 1``) over a window.
"""

from __future__ import annotations

import math
import os
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import reference as R
from wsm_optim import WSMOptimizer

F64 = torch.float64
HAS_CUDA = torch.cuda.is_available()
TOL = 1e-4  # of the displacement |merge - live|

_TRITON = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401
except ImportError:
    _TRITON = False

#: ``(name, WSMOptimizer kwargs, device, k)``. Triton's CPU interpreter runs a launch in
#: milliseconds, so it gets k = 600: the raw sum is already ~1e-3 off there (10x the bound),
#: and the kernel's arithmetic per checkpoint is the same whatever k.
BACKENDS = [
    pytest.param("foreach", dict(backend="foreach"), "cpu", 10_000, id="foreach"),
    pytest.param("offload", dict(backend="foreach", offload="cpu"), "cuda" if HAS_CUDA else "cpu", 10_000,
                 id="offload"),
    pytest.param("triton", dict(backend="triton"), "cuda" if HAS_CUDA else "cpu", 10_000 if HAS_CUDA else 600,
                 id="triton", marks=pytest.mark.skipif(not _TRITON, reason="triton, or CUDA/TRITON_INTERPRET=1")),
]


def walk(spec: R.Window, steps: int, rho: float, shape=(64,), seed: int = 0, device: str = "cpu",
         dtype=torch.float32, kwargs=None, reads=()):
    """Train ``steps`` steps of a random walk; returns ``(snapshots, {s: readouts})``.

    ``snapshots[s]``: ``[param]`` float64 after ``s`` steps. ``reads``: steps after
    which ``merged_state_dict`` is read (fp32), current window and, when one is
    readable, the completed one.
    """
    gen = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(shape, generator=gen, dtype=F64).to(device, dtype))
    opt = WSMOptimizer(torch.optim.SGD([("w", p)], lr=1.0), **spec.as_kwargs(), **(kwargs or {}))
    sigma = rho / math.sqrt(spec.k)  # a window of k checkpoints moves theta by about rho
    noise = (torch.randn((steps, *shape), generator=gen, dtype=F64) * sigma).to(device, dtype)
    snaps = [[p.detach().to(F64, copy=True).cpu()]]
    got = {}
    for s in range(1, steps + 1):
        p.grad = noise[s - 1]
        opt.step()
        snaps.append([p.detach().to(F64, copy=True).cpu()])
        if s in reads:
            out = {"current": opt.merged_state_dict(dtype=torch.float32)["w"].cpu().to(F64)}
            if opt.merge_status()["complete"] or opt.merge_status()["has_completed"]:
                out["completed"] = opt.merged_state_dict(dtype=torch.float32, completed=True)["w"].cpu().to(F64)
            got[s] = out
    return snaps, got


def errors(got: torch.Tensor, ref: torch.Tensor, live: torch.Tensor) -> tuple[float, float]:
    """``(max |got - ref|, max(|got - ref| - ulp32(ref) / 2))``, both over ``max |ref - live|``."""
    disp = float((ref - live).abs().max())
    a = ref.abs().to(torch.float32)
    half_ulp = (torch.nextafter(a, torch.full_like(a, math.inf)) - a).to(F64) / 2
    err = (got - ref).abs()
    return float(err.max()) / disp, float((err - half_ulp).clamp_min(0).max()) / disp


@pytest.mark.filterwarnings("ignore:offload='cpu'")  # a checkpoint every step outpaces the host worker: it waits
@pytest.mark.parametrize("schedule", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("name, kwargs, device, k", BACKENDS)
def test_long_window_matches_float64_explicit_merge(name, kwargs, device, k, schedule):
    """k checkpoints (interval 1), rho = 1e-3: the window's end, then mid-way through the next
    window the current readout (live params mixed in) and the kept completed window."""
    spec = R.Window(schedule, window=k, interval=1, keep_last=True)
    began = time.perf_counter()
    snaps, got = walk(spec, k + k // 2, rho=1e-3, device=device, kwargs=kwargs, reads=(k, k + k // 2))
    cases = {
        "window end": (got[k]["completed"], R.window_merge(spec, snaps, 0)[0], snaps[k][0]),
        "mid-window, live mixed in": (got[k + k // 2]["current"], R.readout(spec, snaps, k + k // 2)[0],
                                      snaps[k + k // 2][0]),
        "kept completed window": (got[k + k // 2]["completed"], R.window_merge(spec, snaps, 0)[0], snaps[k][0]),
    }
    report = []
    for what, (value, ref, live) in cases.items():
        plain, beyond = errors(value, ref, live)
        report.append(f"{what} {plain:.2g} (beyond fp32 rounding {beyond:.2g})")
        # mid-window the displacement is smaller than the fp32 rounding floor allows at 1e-4: bound the excess only
        assert beyond <= TOL and (plain <= TOL or what.startswith("mid")), \
            f"{name} {schedule} k={k} {what}: {plain:.3g} / {beyond:.3g}"
    print(f"\n[wsm long window] {name} {schedule} k={k} rho=1e-3, error/|merge-live|: "
          + "; ".join(report) + f" ({time.perf_counter() - began:.1f} s)")


def test_long_window_with_skipped_checkpoints_and_a_skipped_anchor():
    """nonfinite='skip' over long windows: a NaN checkpoint mid-window and the NaN last checkpoint of the
    next are left out (weights renormalised; the kept window carries its origin with the weight it kept),
    and a window whose anchor is left out sums raw params (origin 0) and stays finite and close."""
    k = 4000
    spec = R.Window("linear", window=k, interval=1, keep_last=True)
    gen = torch.Generator().manual_seed(3)
    p = nn.Parameter(torch.randn(64, generator=gen, dtype=F64).float())
    opt = WSMOptimizer(torch.optim.SGD([("w", p)], lr=1.0), **spec.as_kwargs(), nonfinite="skip")
    end = 2 * k + k // 2
    noise = torch.randn((end, 64), generator=gen, dtype=F64).float() * (1e-3 / math.sqrt(k))
    poisoned = {k // 3, 2 * k}  # a checkpoint of window 0; window 1's last checkpoint, read again as window 2's anchor
    clean, snaps, reads = p.detach().clone(), [[p.detach().to(F64, copy=True)]], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skip warning
        for s in range(1, end + 1):
            p.grad = noise[s - 1].clone()
            if s in poisoned:
                p.grad[5] = float("nan")
            opt.step()
            clean = clean - noise[s - 1]  # what SGD makes of the finite gradient
            if s != 2 * k:  # the NaN of step 2k stays until the anchor of window 2 (step 2k + 1) has read it
                p.data.copy_(clean)
            snaps.append([clean.to(F64)])
            if s in (k, end):
                reads[s] = (opt.merged_state_dict(dtype=torch.float32)["w"].to(F64),
                            opt.merged_state_dict(dtype=torch.float32, completed=True)["w"].to(F64))
    ref0 = R.readout_skipping(spec, snaps, k, frozenset({k // 3}))[0][0]
    ref1 = R.readout_skipping(spec, snaps, 2 * k, frozenset({2 * k}))[0][0]
    left_out = {2 * k, 2 * k + 1}  # window 2's anchor and its first checkpoint (the NaN was still there)
    terms = [(idx, wt) for idx, wt, j in R.readout_terms(spec, end) if j is None or idx not in left_out]
    ref2 = sum((wt / sum(w for _, w in terms)) * snaps[idx][0] for idx, wt in terms)
    assert errors(reads[k][1], ref0, snaps[k][0])[1] <= TOL
    assert errors(reads[end][1], ref1, snaps[2 * k][0])[1] <= TOL
    plain, beyond = errors(reads[end][0], ref2, snaps[end][0])
    # raw sums over k / 2 checkpoints: the precision of a window without origin, still a merge
    assert torch.isfinite(reads[end][0]).all() and plain <= 1e-2, plain


@pytest.mark.filterwarnings("ignore:offload='cpu'")
@settings(deadline=None, max_examples=6, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    schedule=st.sampled_from(["linear", "cosine", "1-sqrt", "ema", "inv-sqrt"]),
    k=st.integers(2_000, 6_000),
    interval=st.sampled_from([1, 2]),
    rho=st.sampled_from([1e-3, 3e-3, 1e-2]),
    size=st.integers(1, 96),
    seed=st.integers(0, 2**16),
    offload=st.booleans(),
)
def test_long_windows_property(schedule, k, interval, rho, size, seed, offload):
    """Any schedule, window of 2e3..6e3 checkpoints, interval 1 or 2, any small shape: the completed window and a
    mid-window readout of the next are within 1e-4 of the displacement of the float64 explicit merge, beyond fp32
    rounding."""
    spec = R.Window(schedule, window=k * interval, interval=interval, keep_last=True)
    s_end, s_mid = spec.window, spec.window + interval * (k // 2) + 1
    kwargs = dict(backend="foreach", offload="cpu" if offload else None)
    snaps, got = walk(spec, s_mid, rho=rho, shape=(size,), seed=seed, kwargs=kwargs, reads=(s_end, s_mid))
    ref_end, live_end = R.window_merge(spec, snaps, 0)[0], snaps[s_end][0]
    for value in (got[s_end]["completed"], got[s_mid]["completed"]):
        assert errors(value, ref_end, live_end)[1] <= TOL
    assert errors(got[s_mid]["current"], R.readout(spec, snaps, s_mid)[0], snaps[s_mid][0])[1] <= TOL
