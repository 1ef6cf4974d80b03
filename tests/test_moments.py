"""Moment merges (``moments=m``): the decay shape chosen after training, against a float64 explicit merge.

The reference (``reference.moment_readout``) stores every snapshot and sums the
window's points with the chosen shape's Theorem 3.1 weights in float64. A
moment merge's readout must match it within the reconstruction's reported
bound (``shape_fit(...).error * sum w * max |Delta|``, per element) plus fp32
rounding; linear and 1-sqrt (bound ~1e-16) within fp32 rounding alone.

A declarative matrix over the conformance backends (foreach, Triton under the
interpreter, offload) x param dtypes x moment configurations checks every
step, the kept window, ``merged_weights`` and a mid-window resume (bit-exact);
a hypothesis property test covers random windows, intervals, starts, ``m``
and shapes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import harness as H
import reference as R
from test_conformance import BACKENDS, DTYPES, FOREACH, BackendCase, DtypeCase
from wsm_optim import WSMOptimizer, evaluate_merges, schedules
from wsm_optim.core.moments import EXPONENTS, MAX_MOMENTS, TOLERANCE, MomentFitWarning, fit_shape

READ_SHAPES = ("linear", "1-sqrt", "cosine", "ema", "inv-sqrt")
EXACT_SHAPES = ("linear", "1-sqrt")  # in the span of the moments from m = 2 on


def _hump(t: float) -> float:  # a callable shape (module level: the same object on resume)
    return 1.0 - t * t * (3.0 - 2.0 * t)


@dataclass(frozen=True)
class MomentConfig:
    """One moment merge (``Window`` + ``moments``), how long it runs and where it is interrupted."""

    name: str
    spec: R.Window
    moments: int
    steps: int
    resume_at: int
    shapes: tuple[Any, ...] = READ_SHAPES


CONFIGS = [
    MomentConfig("two-interval1", R.Window("linear", 6), 2, steps=14, resume_at=9, shapes=EXACT_SHAPES),
    MomentConfig("six-interval2-start-keep", R.Window("cosine", 8, 2, 3, keep_last=True), 6, steps=21, resume_at=14,
                 shapes=(*READ_SHAPES, _hump)),
    MomentConfig("eight-interval3", R.Window(_hump, 9, 3, 1, keep_last=True), MAX_MOMENTS, steps=20, resume_at=13),
]


def _build(params, spec: R.Window, moments: int, backend: BackendCase) -> WSMOptimizer:
    inner = H.make_inner("adamw", [(f"p{i}", p) for i, p in enumerate(params)])
    return WSMOptimizer(inner, merges={"post": dict(spec.as_kwargs(), moments=moments)}, **backend.kwargs)


def _tolerance(opt: WSMOptimizer, shape, steps, w, scale, rtol: float) -> list[torch.Tensor]:
    """Per element: the reported reconstruction bound, plus rounding amplified by the combination's coefficients."""
    fit = opt.shape_fit(shape, merge="post")
    amplification = 1.0 + float(np.abs(fit.coefficients).sum())
    return [fit.error * float(w.sum()) * d + rtol * amplification * s + 1e-30 for d, s in zip(steps, scale)]


def _check(opt, spec, snaps, s, shapes, dtype_case: DtypeCase, completed: bool = False) -> None:
    for shape in shapes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MomentFitWarning)
            got = opt.merged_state_dict(torch.float64 if dtype_case.dtype == torch.float64 else torch.float32,
                                        merge="post", shape=shape, completed=completed)
        expected, steps, w = R.moment_readout(shape, spec, snaps, s, completed)
        points = R.moment_points(spec, s, completed)
        scale = [torch.stack([snaps[j][i] for j in points]).abs().amax(0) for i in range(len(expected))]
        tol = _tolerance(opt, shape, steps, w, scale, dtype_case.acc_rtol)
        for i, (e, t) in enumerate(zip(expected, tol)):
            err = (got[f"p{i}"].to(torch.float64) - e).abs()
            worst = float((err / t).max())
            assert worst <= 1.0, (schedules.schedule_name(shape), s, completed, i, float(err.max()))


def _cases():
    for backend in BACKENDS:
        for d, dtype_case in enumerate(DTYPES):
            for c, config in enumerate(CONFIGS):
                if backend.covering and (d + c) % 2:
                    continue
                marks = [] if backend.available else [pytest.mark.skip(reason=backend.reason)]
                yield pytest.param(backend, dtype_case, config, id=f"{backend.name}-{dtype_case.name}-{config.name}",
                                   marks=marks)


def _run(backend: BackendCase, dtype_case: DtypeCase, config: MomentConfig, check: bool,
         resume: tuple[bytes, list[torch.Tensor]] | None = None):
    """Train ``config.steps`` steps (from ``config.resume_at`` with ``resume``: saved state and live params)."""
    shapes = [(3, 4), (5,)]
    params = [p.to(backend.device) if backend.device != "cpu" else p
              for p in H.make_params(shapes, [dtype_case.dtype] * 2, seed=7)]
    params = [torch.nn.Parameter(p.detach()) for p in params]
    opt = _build(params, config.spec, config.moments, backend)
    snaps = [R.snapshot(params)]
    first = 0
    if resume is not None:
        state, live = resume
        with torch.no_grad():
            for p, value in zip(params, live):
                p.copy_(value)
        opt.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
        first = config.resume_at
    saved = None
    for s in range(first + 1, config.steps + 1):
        H.set_grads(params, seed=11, step=s)
        opt.step()
        snaps.append(R.snapshot(params))
        if check:
            _check(opt, config.spec, snaps, s, config.shapes, dtype_case)
            if config.spec.keep_last and R.completed_windows(config.spec, s) >= 1:
                _check(opt, config.spec, snaps, s, config.shapes, dtype_case, completed=True)
        if s == config.resume_at:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            saved = (buf.getvalue(), [p.detach().clone() for p in params])
    return opt, params, snaps, saved


@pytest.mark.parametrize("backend,dtype_case,config", list(_cases()))
def test_moment_merge_matches_the_explicit_merge_of_every_shape(backend, dtype_case, config):
    opt, params, snaps, saved = _run(backend, dtype_case, config, check=True)
    with torch.no_grad():  # merged_weights swaps the param-dtype readout in and restores the live values
        before = [p.detach().clone() for p in params]
        expected = opt.merged_state_dict(merge="post", shape="1-sqrt")
        with opt.merged_weights(merge="post", shape="1-sqrt"):
            for i, p in enumerate(params):
                assert torch.equal(p.detach().cpu(), expected[f"p{i}"].cpu())
        assert all(torch.equal(a, b) for a, b in zip(before, params))
    # resume mid-window: a fresh optimizer from the saved state continues bit-exactly
    resumed = _run(backend, dtype_case, config, check=False, resume=saved)[0]
    for shape in config.shapes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MomentFitWarning)
            a = opt.merged_state_dict(merge="post", shape=shape)
            b = resumed.merged_state_dict(merge="post", shape=shape)
        assert all(torch.equal(a[n], b[n]) for n in a), schedules.schedule_name(shape)


def test_linear_and_1_sqrt_equal_the_exact_streaming_merges():
    """At a window's end the moment merge read as linear / 1-sqrt is the exact merge of that shape."""
    params = [torch.nn.Parameter(p.detach()) for p in H.make_params([(6, 5), (7,)], [torch.float32] * 2, seed=3)]
    inner = H.make_inner("adamw", [(f"p{i}", p) for i, p in enumerate(params)])
    window = dict(window=12, interval=2, start=2)
    opt = WSMOptimizer(inner, merges={"post": dict(window, moments=3), "linear": dict(window),
                                      "1-sqrt": dict(window, schedule="1-sqrt")})
    for s in range(1, 2 + 2 * 12 + 1):
        H.set_grads(params, seed=5, step=s)
        opt.step()
        if s in (14, 26):  # window ends
            for shape in EXACT_SHAPES:
                exact = opt.merged_state_dict(merge=shape)
                moment = opt.merged_state_dict(merge="post", shape=shape)
                for n in exact:
                    torch.testing.assert_close(moment[n], exact[n], rtol=2e-6, atol=2e-7)


def test_a_window_of_t_checkpoints_is_an_exact_merge_of_that_length():
    """Read at step 6 of a 20-step window, the moment merge equals an exact merge whose window is 6 steps."""
    params = [torch.nn.Parameter(p.detach()) for p in H.make_params([(4, 4)], [torch.float32], seed=1)]
    inner = H.make_inner("sgd_momentum", [("p0", params[0])])
    opt = WSMOptimizer(inner, merges={"post": dict(window=20, moments=2), "six": dict(window=6, schedule="1-sqrt")})
    for s in range(1, 7):
        H.set_grads(params, seed=2, step=s)
        opt.step()
    torch.testing.assert_close(opt.merged_state_dict(merge="post", shape="1-sqrt")["p0"],
                               opt.merged_state_dict(merge="six")["p0"], rtol=2e-6, atol=2e-7)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 10), interval=st.integers(1, 3), start=st.integers(0, 4), moments=st.integers(1, MAX_MOMENTS),
    extra=st.integers(0, 12), shape=st.sampled_from([*READ_SHAPES, _hump]), seed=st.integers(0, 2**16),
)
def test_random_moment_merges_stay_within_their_bound(k, interval, start, moments, extra, shape, seed):
    spec = R.Window("linear", k * interval, interval, start)
    params = [torch.nn.Parameter(p.detach()) for p in H.make_params([(3, 3), (4,)], [torch.float32] * 2, seed=seed)]
    opt = _build(params, spec, moments, FOREACH)
    snaps = [R.snapshot(params)]
    shapes = (shape, "linear") if moments >= 2 else (shape,)
    for s in range(1, start + k * interval + extra + 1):
        H.set_grads(params, seed=seed, step=s)
        opt.step()
        snaps.append(R.snapshot(params))
        _check(opt, spec, snaps, s, shapes, DTYPES[0])


# --------------------------------------------------------------- the fit
@pytest.mark.parametrize("end", [1, 2, 7, 100, 10_000])
def test_linear_and_1_sqrt_are_in_the_span(end):
    for m in range(2, MAX_MOMENTS + 1):
        for shape in EXACT_SHAPES:
            assert fit_shape(shape, end, EXPONENTS[:m]).error < 1e-12, (shape, m)


def test_the_bound_is_what_the_weights_say():
    """``error`` is sum |w - w_hat| / sum w of the fitted weights, recomputed here by hand."""
    end, exps = 50, EXPONENTS[:4]
    fit = fit_shape("cosine", end, exps)
    s = np.arange(1, end + 1) / (end + 1)
    w_hat = 1.0 + sum(b * s**p for b, p in zip(fit.coefficients, exps))
    w = np.array([(1 + np.cos(np.pi * x)) / 2 for x in s])
    assert fit.error == pytest.approx(np.abs(w - w_hat).sum() / w.sum(), rel=1e-9)
    assert fit.error > 1e-4  # cosine is not in the span of four moments
    assert fit_shape("cosine", end, EXPONENTS[:7]).error < fit.error / 4  # more moments fit it more closely


def test_short_windows_are_interpolated_exactly():
    for shape in READ_SHAPES:
        assert fit_shape(shape, 3, EXPONENTS[:3]).error < 1e-12


# --------------------------------------------------------------- the API
def _trained(moments=4, steps=8, **kwargs):
    model = torch.nn.Linear(4, 3)
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=8, moments=moments, **kwargs)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt, x


def test_a_poorly_reconstructed_shape_warns_and_a_good_one_does_not():
    _, opt, _ = _trained(moments=2)
    with pytest.warns(MomentFitWarning, match=r"'cosine'.*relative error bound"):
        opt.merged_state_dict(shape="cosine")
    assert opt.shape_fit("cosine").error > TOLERANCE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.merged_state_dict(shape="1-sqrt")


def test_a_list_of_shapes_gives_one_state_dict_per_shape():
    _, opt, _ = _trained()
    out = opt.merged_state_dict(shape=["linear", "1-sqrt", _hump])
    assert list(out) == ["linear", "1-sqrt", "_hump"]
    for name, shape in [("linear", "linear"), ("_hump", _hump)]:
        single = opt.merged_state_dict(shape=shape)
        assert all(torch.equal(out[name][k], single[k]) for k in single)


def test_evaluate_merges_ranks_shapes_after_training():
    model, opt, x = _trained(moments=6)
    shapes = ["linear", "1-sqrt", "cosine"]

    def loss():
        with torch.no_grad():
            return float(model(x).pow(2).mean())

    scores = evaluate_merges(opt, loss, shapes=shapes, include_live=True)
    assert list(scores.scores) == [f"default:{s}" for s in shapes]
    for shape in shapes:
        with opt.merged_weights(shape=shape):
            assert scores.scores[f"default:{shape}"] == loss()
    assert scores.best == min(scores.scores, key=scores.scores.get)
    assert scores.bounds == {f"default:{s}": opt.shape_fit(s).error for s in shapes}
    assert scores.bounds["default:linear"] < 1e-12 < scores.bounds["default:cosine"]


def test_moment_merges_save_and_state_dict_names(tmp_path):
    _, opt, _ = _trained(moments=3)
    path = opt.save_merged(tmp_path / "m.safetensors", shape="1-sqrt")
    from safetensors.torch import load_file

    saved = load_file(path)
    assert all(torch.equal(saved[k], v) for k, v in opt.merged_state_dict(shape="1-sqrt").items())
    assert opt.merges == ("default",) and opt.is_moment_merge()
    state = opt.state_dict()  # one part per moment, saved as any merge is
    assert list(state["wsm"]["merges"]) == ["default~0", "default~1", "default~2"]
    assert {k for k in state["state"][0] if k.startswith("wsm_acc.")} == {
        "wsm_acc.default~0", "wsm_acc.default~1", "wsm_acc.default~2"}


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(moments=0), ValueError, r"moments must be >= 1"),
    (dict(moments=MAX_MOMENTS + 1), ValueError, r"moments must be None or an int in 1\.\.8"),
    (dict(moments=True), TypeError, r"moments must be an int"),
    (dict(moments=3, schedule=[0.9, 0.5, 0.1] + [0.0] * 5), ValueError, r"explicit weights"),
    (dict(moments=3, nonfinite="skip"), ValueError, r"nonfinite='skip'"),
])
def test_bad_moment_options_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        WSMOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), window=8, **kwargs)


def test_bad_moment_readouts_are_refused():
    _, opt, _ = _trained()
    with pytest.raises(ValueError, match=r"unknown|shape"):
        opt.merged_state_dict(shape="cosinus")
    with pytest.raises(TypeError, match=r"one shape at a time"):
        with opt.merged_weights(shape=["linear", "cosine"]):
            pass
    with pytest.raises(TypeError, match=r"explicit weights"):
        opt.merged_state_dict(shape=np.array([0.5, 0.2]))
    model = torch.nn.Linear(2, 2)
    exact = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=4)
    with pytest.raises(ValueError, match=r"exact merge of its own schedule"):
        exact.merged_state_dict(shape="cosine")
    with pytest.raises(ValueError, match=r"none of the merges .* is a moment merge"):
        evaluate_merges(exact, lambda: 0.0, shapes=["linear"])
    with pytest.raises(ValueError, match=r"exact merge"):
        exact.shape_fit("cosine")
