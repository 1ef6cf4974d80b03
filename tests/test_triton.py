"""Triton backend against foreach and against an explicit float64 merge.

On a machine without a GPU this runs in Triton's interpreter (see conftest);
with a GPU the same tests run the compiled kernel on CUDA tensors.
"""

import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from wsm_optim import NonFiniteMergeError, WSMOptimizer
from wsm_optim import schedules as S
from wsm_optim.core.backends import triton as TB
from wsm_optim.core.spec import MergeSpec
from wsm_optim.core.window import Position

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = TB.TritonBackend().block
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}  # relative to max |theta|

MERGES = {
    "lin": dict(schedule="linear", window=4),
    "cos": dict(schedule="cosine", window=6, interval=2, start=1, keep_last=True),
    "sqrt": dict(schedule="1-sqrt", window=3, interval=3),
}


def make_params(dtype):
    """Shapes that stress the chunk table: 0-dim, 1 element, empty, odd, block +/- 1, views."""
    g = torch.Generator().manual_seed(0)

    def P(*shape):
        return torch.nn.Parameter(torch.randn(shape, generator=g).to(DEVICE, dtype))

    params = {
        "scalar": P(),
        "one": P(1),
        "empty": P(0, 3),
        "odd": P(7, 3),
        "block_minus_1": P(BLOCK - 1),
        "block_plus_1": P(BLOCK + 1),
        "two_blocks_odd": P(2 * BLOCK + 5),
        # dense but not contiguous: the kernel walks memory order
        "transposed": torch.nn.Parameter(torch.randn(6, 9, generator=g).to(DEVICE, dtype).t()),
        # 4 bytes past a 16-byte boundary: the kernel's unaligned (scalar-access) variant
        "offset": torch.nn.Parameter(torch.randn(BLOCK + 9, generator=g).to(DEVICE, dtype)[1:]),
        # not dense (gaps): handled by the foreach fallback
        "strided": torch.nn.Parameter(torch.randn(10, 12, generator=g).to(DEVICE, dtype)[:, ::3]),
    }
    assert not params["transposed"].is_contiguous() and TB.is_dense(params["transposed"])
    assert not TB.is_dense(params["strided"]) and params["offset"].data_ptr() % 16 != 0
    return params


def train(backend, dtype, steps, merges=MERGES, nonfinite="raise", poison=None, capturable=False, dense_only=False):
    """SGD with momentum on fixed random grads; returns (opt, params, snapshots[step] float64)."""
    params = make_params(dtype)
    if dense_only:  # the foreach fallback for non-dense params cannot be captured
        del params["strided"]
    opt = WSMOptimizer(
        torch.optim.SGD(list(params.items()), lr=0.1, momentum=0.9),
        backend=backend,
        merges=merges,
        nonfinite=nonfinite,
        capturable=capturable,
    )
    g = torch.Generator().manual_seed(1)
    snaps = [{n: p.detach().double().cpu().clone() for n, p in params.items()}]
    readouts = []
    for step in range(1, steps + 1):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g).to(DEVICE, dtype)
        if poison is not None and step == poison:
            params["odd"].grad[1, 1] = float("nan")
        opt.step()
        if poison is not None and step == poison:
            with torch.no_grad():  # the user repairs the params (and momentum) after the bad step
                params["odd"].copy_(snaps[-1]["odd"].to(dtype))
                opt.state[params["odd"]]["momentum_buffer"].nan_to_num_(0.0)
        snaps.append({n: p.detach().double().cpu().clone() for n, p in params.items()})
        if nonfinite == "raise" and poison is None:
            readouts.append({m: opt.merged_state_dict(torch.float32, merge=m) for m in merges})
    return opt, params, snaps, readouts


def reference(spec, snaps, steps, skip=()):
    """Explicit merge of stored checkpoints (float64): the readout after ``steps`` steps."""
    start, window, interval = spec.get("start", 0), spec["window"], spec.get("interval", 1)
    k = window // interval
    w = S.decay_weights(spec["schedule"], k)
    c = S.coefficients_from_decay(w)
    u = steps - start
    if u <= 0:
        return snaps[steps]
    n = (u - 1) // window
    anchor = start + n * window
    t = (steps - anchor) // interval
    terms = [(c[j], anchor + j * interval) for j in range(t + 1)]
    if t < k:
        terms.append((w[t], steps))  # live params stand in for the next checkpoint
    kept = [(cj, s) for cj, s in terms if s not in skip]
    total = sum(cj for cj, _ in kept)
    return {name: sum(cj * snaps[s][name] for cj, s in kept) / total for name in snaps[0]}


def assert_close(got, ref, dtype, what):
    for name, r in ref.items():
        g = got[name].double().cpu()
        scale = max(r.abs().max().item() if r.numel() else 0.0, 1.0)
        err = (g - r).abs().max().item() if r.numel() else 0.0
        assert err <= TOL[dtype] * scale, f"{what}: {name}: error {err:.3g} > {TOL[dtype] * scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_reference_and_foreach_every_step(dtype):
    steps = 14
    opt_t, _, snaps, reads_t = train("triton", dtype, steps)
    opt_f, _, snaps_f, reads_f = train("foreach", dtype, steps)
    assert opt_t.backend == "triton" and opt_f.backend == "foreach"
    for s in range(1, steps + 1):
        for m, spec in MERGES.items():
            ref = reference(spec, snaps, s)
            assert_close(reads_t[s - 1][m], ref, dtype, f"triton step {s} merge {m}")
            assert_close(reads_f[s - 1][m], ref, dtype, f"foreach step {s} merge {m}")
    # the last completed window of the keep_last merge (cos: start 1, window 6 -> ends at 13)
    done = opt_t.merged_state_dict(torch.float32, merge="cos", completed=True)
    assert_close(done, reference(MERGES["cos"], snaps, 13), dtype, "triton completed window")


def test_many_tensors_one_launch_per_group(monkeypatch):
    """520 tensors in two dtype groups: each checkpoint is one launch per group."""
    launches = []
    real = TB.wsm_update_kernel

    class Counting:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs["PHASE"])
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(TB, "wsm_update_kernel", Counting())
    g = torch.Generator().manual_seed(0)
    shapes = [(random.Random(i).randint(1, 40),) for i in range(520)]
    params = [
        torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE, torch.float32 if i % 2 else torch.bfloat16))
        for i, s in enumerate(shapes)
    ]
    merges = {"a": dict(schedule="linear", window=2), "b": dict(schedule="ema", window=4)}
    opt = WSMOptimizer(torch.optim.SGD([(f"p{i}", p) for i, p in enumerate(params)], lr=0.1),
                       backend="triton", merges=merges)
    copies = [p.detach().clone().requires_grad_() for p in params]
    ref = WSMOptimizer(torch.optim.SGD([(f"p{i}", p) for i, p in enumerate(copies)], lr=0.1),
                       backend="foreach", merges=merges)
    for _ in range(4):
        for p, q in zip(params, ref.inner.param_groups[0]["params"]):
            p.grad = torch.randn(p.shape, generator=g).to(DEVICE, p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    # per step: anchor (steps 0, 2 for a; 0 for b) and one checkpoint, each 2 launches (two groups)
    assert launches == [0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1]
    for m in merges:
        got, want = opt.merged_state_dict(torch.float32, merge=m), ref.merged_state_dict(torch.float32, merge=m)
        assert list(got) == list(want) == [f"p{i}" for i in range(len(params))]
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["foreach", "triton"])
def test_nan_is_reported_with_window_and_name(backend):
    poison = random.Random(7).randint(2, 9)
    opt, *_ = train(backend, torch.float32, 10, merges={"lin": dict(schedule="linear", window=12)}, poison=poison)
    with pytest.raises(NonFiniteMergeError, match=r"merge 'lin', window 0 \(steps 0\.\.12\).*'odd'"):
        opt.merged_state_dict()
    with pytest.raises(NonFiniteMergeError, match="'odd'"):
        with opt.merged_weights():
            pass
    if backend == "triton":  # the kernel saw the NaN in the same pass, at that step
        with pytest.raises(NonFiniteMergeError, match=f"at steps {poison}\\.\\.{poison}"):
            opt.merged_state_dict()


@pytest.mark.parametrize("backend", ["foreach", "triton"])
def test_nan_skip_leaves_the_checkpoint_out(backend):
    poison = random.Random(3).randint(2, 9)
    spec = dict(schedule="cosine", window=12)
    opt, _, snaps, _ = train(backend, torch.float32, 10, merges={"c": spec}, nonfinite="skip", poison=poison)
    with pytest.warns(RuntimeWarning, match="1 checkpoint"):
        got = opt.merged_state_dict(torch.float32)
    assert_close(got, reference(spec, snaps, 10, skip={poison}), torch.float32, "skip")


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter path")
def test_capturable_mode_equals_host_scheduled_mode():
    a, _, snaps, reads_a = train("triton", torch.float32, 13, capturable=True, dense_only=True)
    b, _, _, reads_b = train("triton", torch.float32, 13, dense_only=True)
    for ra, rb in zip(reads_a, reads_b):
        for m in MERGES:
            for name in ra[m]:
                assert torch.equal(ra[m][name], rb[m][name])
    assert a.sync_steps() == 13


def test_closed_form_position_matches_state_machine():
    """The device decides from the step count alone; the optimizer's counters must agree at every step."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        interval = int(rng.integers(1, 4))
        spec_kw = dict(schedule="linear", window=interval * int(rng.integers(1, 5)), interval=interval,
                       start=int(rng.integers(0, 5)), keep_last=True)
        p = torch.nn.Parameter(torch.zeros(2))
        opt = WSMOptimizer(torch.optim.SGD([("p", p)], lr=0.1), **spec_kw)
        shadow = Position(MergeSpec(**spec_kw))
        for step in range(1, 25):
            p.grad = torch.ones(2)
            opt.step()
            shadow.set_position(step)
            live = opt.merge_status()
            assert (shadow.anchored, shadow.t, shadow.r, shadow.windows_completed, shadow.has_completed) == (
                live["anchored"], live["checkpoint"], live["steps_since_checkpoint"], live["windows_completed"],
                live["has_completed"],
            ), (spec_kw, step)


def test_bad_backend_arguments():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="backend must be one of"):
        WSMOptimizer(torch.optim.SGD([p], lr=0.1), window=2, backend="cuda")
    with pytest.raises(ValueError, match="nonfinite must be 'raise' or 'skip'"):
        WSMOptimizer(torch.optim.SGD([p], lr=0.1), window=2, nonfinite="ignore")
    with pytest.raises(ValueError, match="capturable=True needs backend='triton'"):
        WSMOptimizer(torch.optim.SGD([p], lr=0.1), window=2, backend="foreach", capturable=True)
    with pytest.raises(ValueError, match="overlap=True needs CUDA"):
        WSMOptimizer(torch.optim.SGD([p], lr=0.1), window=2, overlap=True)
    if DEVICE == "cpu":  # under the interpreter: the kernel cannot take a non-dense view
        strided = torch.nn.Parameter(torch.zeros(4, 6)[:, ::2])
        with pytest.raises(ValueError, match=r"capturable=True: a parameter of shape \(4, 3\)"):
            WSMOptimizer(torch.optim.SGD([strided], lr=0.1), window=2, backend="triton", capturable=True)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU-only refusal")
def test_triton_on_cpu_without_interpreter_is_refused():
    code = (
        "import torch, wsm_optim\n"
        "p = torch.nn.Parameter(torch.zeros(3))\n"
        "try:\n"
        "    wsm_optim.WSMOptimizer(torch.optim.SGD([p], lr=0.1), window=2, backend='triton')\n"
        "except ValueError as e:\n"
        "    print('REFUSED', e)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "REFUSED backend='triton' needs CUDA parameters" in out.stdout, out.stderr


@pytest.mark.cuda
def test_cuda_graph_capture_replays_with_device_coefficients():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3000, device="cuda"))
    q = torch.nn.Parameter(p.detach().clone())
    spec = dict(schedule="cosine", window=6, interval=2)
    graphed = WSMOptimizer(torch.optim.SGD([("w", p)], lr=0.1), backend="triton", capturable=True, **spec)
    eager = WSMOptimizer(torch.optim.SGD([("w", q)], lr=0.1), backend="triton", **spec)
    grads = [torch.randn(3000, device="cuda") for _ in range(15)]
    static_grad = torch.zeros(3000, device="cuda")
    p.grad = static_grad
    # warm up on a side stream (as CUDA graphs require), then capture one step
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        static_grad.copy_(grads[0])
        graphed.step()
    torch.cuda.current_stream().wait_stream(s)
    q.grad = grads[0].clone()
    eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for g in grads[1:]:
        static_grad.copy_(g)
        graph.replay()
        q.grad = g.clone()
        eager.step()
    torch.cuda.synchronize()
    graphed.sync_steps()
    assert graphed.steps == eager.steps == 15
    torch.testing.assert_close(
        graphed.merged_state_dict(torch.float32)["w"],
        eager.merged_state_dict(torch.float32)["w"],
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.cuda
def test_overlap_equals_no_overlap():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (5000, 77, 1)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a = WSMOptimizer(torch.optim.AdamW([(f"p{i}", p) for i, p in enumerate(ps)], lr=1e-2), window=5,
                     overlap=True, keep_last=True)
    b = WSMOptimizer(torch.optim.AdamW([(f"p{i}", q) for i, q in enumerate(qs)], lr=1e-2), window=5, keep_last=True)
    for _ in range(12):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for completed in (False, True):
        ma = a.merged_state_dict(torch.float32, completed=completed)
        mb = b.merged_state_dict(torch.float32, completed=completed)
        assert list(ma) == list(mb) == ["p0", "p1", "p2"]
        for name in ma:
            assert torch.equal(ma[name], mb[name])


def test_triton_resume_mid_window_is_bitwise():
    """load_state_dict must restore the device step counter the kernel reads its weights with."""
    def fresh():
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(n, generator=g).to(DEVICE)) for n in (5, BLOCK + 3)]
        opt = WSMOptimizer(torch.optim.Adam([("a", ps[0]), ("b", ps[1])], lr=0.05), backend="triton", merges=MERGES)
        return ps, opt

    grads = [[torch.randn(n, generator=torch.Generator().manual_seed(100 + s)).to(DEVICE) for n in (5, BLOCK + 3)]
             for s in range(11)]

    def run(ps, opt, steps):
        for s in steps:
            for p, gr in zip(ps, grads[s]):
                p.grad = gr.clone()
            opt.step()

    ps_a, a = fresh()
    run(ps_a, a, range(11))
    ps_b, b = fresh()
    run(ps_b, b, range(7))  # stop mid-window for every merge
    saved = b.state_dict()
    ps_c, c = fresh()
    with torch.no_grad():
        for p, q in zip(ps_c, ps_b):
            p.copy_(q)
    c.load_state_dict(saved)
    run(ps_c, c, range(7, 11))
    for m in MERGES:
        got, want = c.merged_state_dict(torch.float32, merge=m), a.merged_state_dict(torch.float32, merge=m)
        for name in ("a", "b"):
            assert torch.equal(got[name], want[name]), m


# The core suite's property test, run through the Triton backend: random shapes, dtypes,
# schedules (named, explicit, callable), windows, intervals, starts, 1-3 merges, inner
# optimizers; every readout after every step against the float64 reference.
import dataclasses  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402

import harness as H  # noqa: E402
from test_optimizer import cases  # noqa: E402


@settings(deadline=None, max_examples=40, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cases(max_steps=40))
def test_triton_property_matches_reference_every_step(case):
    case = dataclasses.replace(case, backend="triton")
    errs = H.run_case(case)
    assert errs.checks == (case.steps + 1) * len(case.shapes) * len(case.merges)
