"""Backend conformance matrix: every backend x param dtype x merge configuration x nonfinite mode.

Declarative, in the style of optimi's per-optimizer test declarations: four
small tables (``BACKENDS``, ``DTYPES``, ``CONFIGS``, ``MODES``) and one runner.
Each matrix row trains a few params on seeded synthetic gradients through the
public API only and checks, after **every** step and for every merge:

* the current-window readout at the accumulator's precision and in the param
  dtype against ``tests/reference.py`` (the float64 explicit merge of stored
  checkpoints), within the row's dtype tolerance; the param-dtype readout is the
  full-precision one rounded once;
* the completed-window readout (``completed=True``): the explicit merge of the
  last finished window while it is readable, a ``RuntimeError`` while it is not;
* ``merge_status`` against the reference's window model, ``steps``, ``backend``;
* ``nonfinite="raise"`` with a NaN injected into a checkpoint: readouts of the
  windows that folded it raise ``NonFiniteMergeError`` naming merge and window,
  every other readout is exact; ``nonfinite="skip"``: the bad checkpoints are
  left out, the rest renormalised, and a ``RuntimeWarning`` names how many were
  skipped exactly when the window read has one (no other warning, ever);
* ``merged_weights()`` at the resume point and at the end: the params inside
  are the param-dtype readout and come back bit-exactly;
* resume: ``state_dict()`` saved mid-window (``torch.save``/``torch.load``
  with ``weights_only=True``), loaded into a fresh optimizer, continues
  **bit-exactly** (every readout, skip warning and raise at every later step,
  and the final ``state_dict()["wsm"]``).

``test_agrees_with_foreach`` then compares every backend's readouts with the
foreach backend's on the same row: bit-for-bit for entries flagged
``bitwise_with_foreach``, else within twice the dtype tolerance.
``test_random_configurations_conform`` runs the same checks on random merge
configurations, poison and resume steps (hypothesis, 30 examples) for every
backend that is not ``covering``.

ADDING A BACKEND is one ``BackendCase`` entry in ``BACKENDS``: its constructor
kwargs (anything ``WSMOptimizer`` takes besides the merge configuration), the
device its params live on, whether it is available here, what ``opt.backend``
reports, and whether it must agree with foreach bit-for-bit. The offload entry::

    BackendCase("offload", dict(backend="foreach", offload="cpu"), device="cuda" if HAS_CUDA else "cpu",
                reports="offload", bitwise_with_foreach=True)

A bug the matrix finds is an entry of ``KNOWN_BUGS`` (its rows ``xfail(strict=True)``)
until fixed.

Size (CPU, no GPU): foreach and offload run all 16 rows (4 dtypes x 4
configurations, the nonfinite mode rotating as a Latin square so every dtype
and every configuration meets every mode once); Triton under
``TRITON_INTERPRET=1`` runs the covering half (8 rows: every dtype,
configuration and mode twice) because the interpreter costs ~0.1 s per kernel
launch; with a CUDA GPU it runs all 16. 67 tests, ~24 s of CPU in all.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import harness as H
import reference as R
from wsm_optim import NonFiniteMergeError, WSMOptimizer

HAS_CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------- backends
@dataclass(frozen=True)
class BackendCase:
    """One backend under test.

    ``kwargs``: passed to ``WSMOptimizer`` as they are (``backend=...`` and any
    extra constructor option). ``device``: where the params live. ``available``
    / ``reason``: skip the backend's rows when False. ``reports``: the expected
    ``opt.backend`` (None: not checked). ``bitwise_with_foreach``: its readouts
    must equal the foreach backend's bit for bit. ``covering``: run only the
    covering half of the rows (for slow backends such as an interpreter).
    """

    name: str
    kwargs: dict[str, Any]
    available: bool = True
    reason: str = ""
    device: str = "cpu"
    reports: str | None = None
    bitwise_with_foreach: bool = False
    covering: bool = False


_TRITON = importlib.util.find_spec("triton") is not None and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1")

BACKENDS = [
    BackendCase("foreach", dict(backend="foreach"), reports="foreach", bitwise_with_foreach=True),
    BackendCase(
        "triton", dict(backend="triton"), available=_TRITON,
        reason="triton is not installed, or neither CUDA nor TRITON_INTERPRET=1",
        device="cuda" if HAS_CUDA else "cpu", reports="triton", covering=not HAS_CUDA,
    ),
    BackendCase("offload", dict(backend="foreach", offload="cpu"), device="cuda" if HAS_CUDA else "cpu",
                reports="offload", bitwise_with_foreach=True),
]
FOREACH = BACKENDS[0]


# ------------------------------------------------------------------- dtypes
@dataclass(frozen=True)
class DtypeCase:
    """A param dtype and its tolerances against the float64 reference.

    Errors are relative to the elementwise scale ``max_j |theta_j|`` over the
    checkpoints the readout uses (``reference.readout_skipping``).
    ``acc``: the accumulator's dtype (the full-precision readout ``dtype=acc``);
    ``acc_rtol``: its error (a few ulps of ``acc`` over ``k + 1`` terms).
    ``native_rtol`` / ``native_atol``: the default (param-dtype) readout, one
    more rounding to the param dtype (half an ulp), plus a subnormal floor.
    """

    name: str
    dtype: torch.dtype
    acc: torch.dtype
    acc_rtol: float
    native_rtol: float
    native_atol: float = 0.0


DTYPES = [
    DtypeCase("fp32", torch.float32, torch.float32, 1e-5, 1e-5),
    DtypeCase("bf16", torch.bfloat16, torch.float32, 1e-5, 2.0**-8 + 1e-5),
    DtypeCase("fp16", torch.float16, torch.float32, 1e-5, 2.0**-11 + 1e-5, 2.0**-25),
    DtypeCase("fp64", torch.float64, torch.float64, 1e-12, 1e-12),
]


# ---------------------------------------------------- merge configurations
def _square(t: float) -> float:  # a callable schedule (module level: the same object on resume)
    return (1.0 - t) ** 2


@dataclass(frozen=True)
class MergeConfig:
    """The merges of one run, how long it runs, where it is interrupted and poisoned.

    ``resume_at``: the state dict is saved after this many steps (mid-window for
    every merge) and a fresh optimizer continues from it. ``poison``: steps whose
    gradient carries a NaN in the ``+nan`` modes (the params are repaired right
    after the step); a poisoned step that is not a checkpoint of a merge must
    leave that merge untouched. ``single_api``: one merge passed with the
    positional/keyword arguments instead of ``merges=``.
    """

    name: str
    merges: dict[str, R.Window]
    steps: int
    resume_at: int
    poison: tuple[int, ...]
    single_api: bool = False


CONFIGS = [
    # interval 1, start 0; poison a checkpoint mid-window; resumed right after it
    MergeConfig("one-merge", {"default": R.Window("linear", 4)}, steps=10, resume_at=6, poison=(6,),
                single_api=True),
    # interval > 1, start > 0, keep_last; poison checkpoints in windows 0 and 1 (5, 11) and a step between
    # checkpoints (12); resumed with a skipped checkpoint in the current window
    MergeConfig("interval-start-keep", {"default": R.Window("1-sqrt", 6, 2, 3, keep_last=True)}, steps=19,
                resume_at=12, poison=(5, 11, 12), single_api=True),
    # three merges side by side; 7, 9 and 13 are window ends of one merge, mid-window of another;
    # resumed with a skipped checkpoint in b's current window and in c's kept window
    MergeConfig("three-merges", {
        "a": R.Window("cosine", 6, 3, 1, keep_last=True),
        "b": R.Window("ema", 4, 1, 0),
        "c": R.Window("inv-sqrt", 4, 2, 5, keep_last=True),
    }, steps=18, resume_at=10, poison=(7, 9, 13)),
    # explicit decay weights (with a repeated value) and a callable shape; resumed with a skipped
    # checkpoint in both current windows
    MergeConfig("explicit-and-callable", {
        "explicit": R.Window([0.9, 0.6, 0.6, 0.2], 4, 1, 2, keep_last=True),
        "callable": R.Window(_square, 3, 1, 0),
    }, steps=13, resume_at=8, poison=(4, 7, 10)),
]

#: nonfinite mode, and whether a NaN is injected at the configuration's poison steps
MODES = [("raise", False), ("skip", False), ("raise", True), ("skip", True)]


def _mode_name(mode: tuple[str, bool]) -> str:
    return mode[0] + ("+nan" if mode[1] else "")


# --------------------------------------------------------------- the matrix
@dataclass(frozen=True)
class Row:
    dtype: DtypeCase
    config: MergeConfig
    nonfinite: str
    inject_nan: bool
    inner: str
    covering: bool  # in the covering half run by slow backends

    @property
    def id(self) -> str:
        return f"{self.dtype.name}-{self.config.name}-{_mode_name((self.nonfinite, self.inject_nan))}"

    @property
    def bad_steps(self) -> frozenset[int]:
        return frozenset(self.config.poison) if self.inject_nan else frozenset()


def _rows() -> list[Row]:
    """Latin square: dtype i x configuration j runs mode (i + j) % 4 (every dtype and every
    configuration meets every mode once). The covering half (j in {i, i + 1}) still has every
    dtype, configuration and mode twice."""
    rows = []
    for i, dt in enumerate(DTYPES):
        for j, cfg in enumerate(CONFIGS):
            nonfinite, nan = MODES[(i + j) % len(MODES)]
            rows.append(Row(dt, cfg, nonfinite, nan, H.INNERS[(2 * i + j) % len(H.INNERS)],
                            covering=(j - i) % len(CONFIGS) in (0, 1)))
    return rows


ROWS = _rows()


#: Library bugs this matrix found: ``(predicate(backend, row), reason)``; matching rows are
#: ``xfail(strict=True)``, so the fix must delete the entry.
KNOWN_BUGS: list = []  # cases that are known to fail, each with its reason; none today


def _matrix():
    for b in BACKENDS:
        for row in ROWS:
            if b.covering and not row.covering:
                continue
            marks = [] if b.available else [pytest.mark.skip(reason=f"{b.name}: {b.reason}")]
            marks += [pytest.mark.xfail(strict=True, reason=why) for bug, why in KNOWN_BUGS if bug(b, row)]
            yield pytest.param(b, row, id=f"{b.name}-{row.id}", marks=marks)


MATRIX = list(_matrix())
SHAPES = [(), (3,), (4, 5)]
POISONED = 1  # index of the param whose gradient carries the NaN


# ------------------------------------------------------------------ runner
NONFINITE = "nonfinite"  # sentinel: the readout raised NonFiniteMergeError
UNREADABLE = "unreadable"  # sentinel: completed=True raised RuntimeError (not readable now)


@dataclass
class Run:
    """What one row recorded: readouts and their reference scales per step (for resume and cross-backend checks)."""

    readouts: dict[int, dict[str, Any]] = field(default_factory=dict)
    scales: dict[int, dict[str, list[Tensor]]] = field(default_factory=dict)
    final_wsm: dict | None = None


def _build(backend: BackendCase, row: Row, seed: int) -> tuple[list[nn.Parameter], WSMOptimizer]:
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(backend.device, row.dtype.dtype)) for s in SHAPES]
    inner = H.make_inner(row.inner, [(f"p{i}", p) for i, p in enumerate(params)])
    cfg = row.config
    if cfg.single_api:
        (spec,) = cfg.merges.values()
        opt = WSMOptimizer(inner, **spec.as_kwargs(), nonfinite=row.nonfinite, **backend.kwargs)
    else:
        opt = WSMOptimizer(inner, merges={n: s.as_kwargs() for n, s in cfg.merges.items()},
                           nonfinite=row.nonfinite, **backend.kwargs)
    return params, opt


def _step(params, opt, row: Row, s: int, prev: list[Tensor]) -> None:
    """One training step with the row's gradients; a NaN at poisoned steps, repaired after the step."""
    gen = torch.Generator().manual_seed(1_000_003 + s)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
    poisoned = s in row.bad_steps
    if poisoned:
        params[POISONED].grad.view(-1)[0] = float("nan")
    opt.step()
    opt.zero_grad()
    if poisoned:  # the user repairs the params and the inner state; p.data: not a live-param edit
        params[POISONED].data.copy_(prev[POISONED].to(params[POISONED].dtype))
        for state in opt.state.values():
            for v in state.values():
                if isinstance(v, Tensor) and v.is_floating_point():
                    v.data.nan_to_num_(0.0, 0.0, 0.0)


def _snapshot(params) -> list[Tensor]:
    return [p.detach().to("cpu", R.F64, copy=True) for p in params]


def _read(opt, merge, dtype, completed=False):
    """``(value or sentinel, number of checkpoints the skip warning names or 0)``; no other warning allowed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = opt.merged_state_dict(dtype, merge=merge, completed=completed)
            value = {k: v.cpu() for k, v in value.items()}
        except NonFiniteMergeError as e:
            value = (NONFINITE, str(e))
        except RuntimeError as e:
            assert completed, e
            value = (UNREADABLE, str(e))
    skips = [w for w in caught if issubclass(w.category, RuntimeWarning) and "skipped" in str(w.message)]
    others = [w for w in caught if w not in skips]
    assert not others, [str(w.message) for w in others]
    assert len(skips) <= 1, [str(w.message) for w in skips]
    n = int(re.search(r"(\d+) checkpoint", str(skips[0].message)).group(1)) if skips else 0
    return value, n


def _check_value(got, expected, scale, rtol, atol, what):
    assert isinstance(got, dict), f"{what}: expected values, got {got}"
    for i in range(len(SHAPES)):
        key = f"p{i}"
        assert got[key].shape == expected[i].shape, what
        e = H.rel_error(got[key], expected[i], scale[i], atol)
        assert e <= rtol, f"{what} {key}: rel error {e:.3g} > {rtol}"


def _check_step(opt, params, snaps, row: Row, s: int, backend: BackendCase, scales: dict) -> dict[str, Any]:
    """Every readout after ``s`` steps against the reference; returns them (for resume / cross-backend).

    ``scales`` receives the reference scale of each readout (the cross-backend check's error scale).
    """
    dt, cfg, bad = row.dtype, row.config, row.bad_steps
    record = {}
    assert opt.steps == s
    if backend.reports is not None:
        assert opt.backend == backend.reports
    for name, spec in cfg.merges.items():
        merge = None if cfg.single_api else name
        where = f"{backend.name} {row.id} merge {name} step {s}"
        n_bad = R.skipped_checkpoints(spec, s, bad)
        expected, scale = R.readout_skipping(spec, snaps, s, bad)
        if not bad:  # the skip-aware reference is the plain one
            for a, b in zip(expected, R.readout(spec, snaps, s)):
                assert torch.allclose(a, b, rtol=1e-13, atol=0), where

        full, n_full = _read(opt, merge, dt.acc)
        native, n_native = _read(opt, merge, None)
        if n_bad and row.nonfinite == "raise":
            m = R.position(spec, s)[0]
            for got in (full, native):
                assert got[0] == NONFINITE and f"merge '{name}', window {m} " in got[1], (where, got)
        else:
            assert n_full == n_native == (n_bad if row.nonfinite == "skip" else 0), (where, n_full, n_native)
            _check_value(full, expected, scale, dt.acc_rtol, 0.0, where + " full precision")
            _check_value(native, expected, scale, dt.native_rtol, dt.native_atol, where + " param dtype")
            for i, p in enumerate(params):
                key = f"p{i}"
                assert full[key].dtype == dt.acc and native[key].dtype == dt.dtype, where
                assert torch.equal(native[key], full[key].to(dt.dtype)), f"{where} {key}: not rounded once"
                if R.position(spec, s) is None:  # before the first anchor: the live params, exactly
                    assert torch.equal(native[key], p.detach().cpu()), f"{where} {key}: not the live params"
        record[name] = (full, n_full)
        record[name + "/native"] = (native, n_native)
        scales[name] = scales[name + "/native"] = scale

        done = R.completed_windows(spec, s)
        got, n_done = _read(opt, merge, dt.acc, completed=True)
        if done == 0 or not (R.at_window_end(spec, s) or spec.keep_last):
            needle = "no window has completed" if done == 0 else "keep_last=True"
            assert got[0] == UNREADABLE and needle in got[1], (where, got)
        else:
            end = R.window_end(spec, done - 1)
            n_bad_done = R.skipped_checkpoints(spec, end, bad)
            if n_bad_done and row.nonfinite == "raise":
                assert got[0] == NONFINITE and f"merge '{name}', window {done - 1} " in got[1], (where, got)
            else:
                assert n_done == (n_bad_done if row.nonfinite == "skip" else 0), (where, n_done)
                want, want_scale = R.readout_skipping(spec, snaps, end, bad)
                _check_value(got, want, want_scale, dt.acc_rtol, 0.0, where + f" completed window {done - 1}")
                scales[name + "/completed"] = want_scale
                if R.at_window_end(spec, s):  # the window that just finished is the current readout
                    assert all(torch.equal(got[k], full[k]) for k in got), where
        record[name + "/completed"] = (got, n_done)
        H._check_status(opt.merge_status(merge), spec, s, name)
    return record


def _check_merged_weights(opt, params, row: Row, record, where):
    """Inside ``merged_weights()`` the params are the param-dtype readout; restored bit-exactly after."""
    before = [p.detach().clone() for p in params]
    for name in row.config.merges:
        merge = None if row.config.single_api else name
        native = record[name + "/native"][0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the skip warning: checked by _read
            if isinstance(native, tuple):
                with pytest.raises(NonFiniteMergeError):
                    with opt.merged_weights(merge=merge):
                        pass
            else:
                with opt.merged_weights(merge=merge):
                    for i, p in enumerate(params):
                        assert torch.equal(p.detach().cpu(), native[f"p{i}"]), f"{where} {name} p{i}"
        assert all(torch.equal(a, b) for a, b in zip(before, params)), f"{where} {name}: not restored"


def _same(a, b) -> bool:
    """Two recorded readouts are identical: same sentinel, or bitwise-equal tensors."""
    (va, na), (vb, nb) = a, b
    if na != nb or isinstance(va, tuple) != isinstance(vb, tuple):
        return False
    if isinstance(va, tuple):
        return va[0] == vb[0]
    return va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)


_RUNS: dict[tuple[str, str], Run] = {}


def _save(params, opt) -> bytes:
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    return buf.getvalue()


def run_row(backend: BackendCase, row: Row, cache: bool = True) -> Run:
    """Train the row straight, checking every step, then resume from ``resume_at`` and compare bitwise."""
    key = (backend.name, row.id)
    if cache and key in _RUNS:
        return _RUNS[key]
    cfg = row.config
    params, opt = _build(backend, row, seed=0)
    snaps = [_snapshot(params)]
    run = Run()
    run.readouts[0] = _check_step(opt, params, snaps, row, 0, backend, run.scales.setdefault(0, {}))
    blob = _save(params, opt) if cfg.resume_at == 0 else None
    for s in range(1, cfg.steps + 1):
        _step(params, opt, row, s, snaps[-1])
        snaps.append(_snapshot(params))
        assert all(torch.isfinite(x).all() for x in snaps[-1]), "params diverged (test setup)"
        run.readouts[s] = _check_step(opt, params, snaps, row, s, backend, run.scales.setdefault(s, {}))
        if s == cfg.resume_at:
            blob = _save(params, opt)
            _check_merged_weights(opt, params, row, run.readouts[s], f"{backend.name} {row.id} step {s}")
    _check_merged_weights(opt, params, row, run.readouts[cfg.steps], f"{backend.name} {row.id} end")
    run.final_wsm = opt.state_dict()["wsm"]

    # resume: a fresh optimizer (other init), params and state loaded, the same steps continued
    params2, opt2 = _build(backend, row, seed=1)
    saved = torch.load(io.BytesIO(blob), weights_only=True)
    with torch.no_grad():
        for p, v in zip(params2, saved["params"]):
            p.copy_(v)
    opt2.load_state_dict(saved["opt"])
    assert opt2.steps == cfg.resume_at
    snaps2 = [None] * cfg.resume_at + [_snapshot(params2)]
    for s in range(cfg.resume_at + 1, cfg.steps + 1):
        _step(params2, opt2, row, s, snaps2[-1])
        snaps2.append(_snapshot(params2))
        assert all(torch.equal(a, b) for a, b in zip(snaps2[s], snaps[s])), f"params differ after resume, step {s}"
        assert opt2.steps == s
        for name, spec in cfg.merges.items():
            merge = None if cfg.single_api else name
            got = {
                name: _read(opt2, merge, row.dtype.acc),
                name + "/native": _read(opt2, merge, None),
                name + "/completed": _read(opt2, merge, row.dtype.acc, completed=True),
            }
            for k, v in got.items():
                assert _same(v, run.readouts[s][k]), f"{backend.name} {row.id}: {k} differs after resume, step {s}"
            H._check_status(opt2.merge_status(merge), spec, s, name)
    assert opt2.state_dict()["wsm"] == run.final_wsm
    if cache:
        _RUNS[key] = run
    return run


@pytest.mark.parametrize("backend, row", MATRIX)
def test_conforms(backend: BackendCase, row: Row) -> None:
    run_row(backend, row)


@pytest.mark.parametrize("backend, row", [p for p in MATRIX if p.values[0] is not FOREACH])
def test_agrees_with_foreach(backend: BackendCase, row: Row) -> None:
    ours, theirs = run_row(backend, row), run_row(FOREACH, row)
    dt = row.dtype
    for s, record in ours.readouts.items():
        for key, (value, n) in record.items():
            other, n_other = theirs.readouts[s][key]
            where = f"{backend.name} vs foreach, {row.id} step {s} {key}"
            assert n == n_other and isinstance(value, tuple) == isinstance(other, tuple), where
            if isinstance(value, tuple):
                assert value[0] == other[0], where
                continue
            if backend.bitwise_with_foreach:
                assert all(torch.equal(value[k], other[k]) for k in other), where
                continue
            # both within tolerance of the reference: within twice of each other (an ulp apart in the param dtype)
            tol, atol = (2 * dt.native_rtol, 2 * dt.native_atol) if key.endswith("/native") else (2 * dt.acc_rtol, 0.0)
            for i, k in enumerate(other):
                e = H.rel_error(value[k], other[k].to(R.F64), theirs.scales[s][key][i], atol)
                assert e <= tol, f"{where} {k}: {e:.3g} > {tol}"


def test_matrix_covers_every_pairing() -> None:
    """The covering design: every (dtype, mode) and (configuration, mode) pair, for every backend's row set."""
    for b in BACKENDS:
        rows = [r for r in ROWS if not b.covering or r.covering]
        pairs_d = {(r.dtype.name, _mode_name((r.nonfinite, r.inject_nan))) for r in rows}
        pairs_c = {(r.config.name, _mode_name((r.nonfinite, r.inject_nan))) for r in rows}
        need = 2 if b.covering else 4
        assert len(pairs_d) == len(DTYPES) * need and len(pairs_c) == len(CONFIGS) * need, b.name
        assert {r.dtype.name for r in rows} == {d.name for d in DTYPES}
        assert {r.config.name for r in rows} == {c.name for c in CONFIGS}
        assert {_mode_name(m) for m in MODES} == {_mode_name((r.nonfinite, r.inject_nan)) for r in rows}


# ------------------------------------------------- random configurations
@st.composite
def random_rows(draw) -> Row:
    """A random row: 1-3 merges (named shapes, interval, start, keep_last), dtype, mode, poison and resume steps."""
    merges = {}
    for i in range(draw(st.integers(1, 3))):
        interval = draw(st.integers(1, 3))
        merges[f"m{i}"] = R.Window(
            schedule=draw(st.sampled_from(["linear", "cosine", "1-sqrt", "inv-sqrt", "ema"])),  # all have c_0 > 0
            window=interval * draw(st.integers(1, 4)), interval=interval, start=draw(st.integers(0, 4)),
            keep_last=draw(st.booleans()),
        )
    slowest = max(s.start + 2 * s.window for s in merges.values())
    steps = draw(st.integers(1, min(24, slowest + 3)))
    single = len(merges) == 1 and draw(st.booleans())
    if single:
        merges = {"default": merges["m0"]}
    cfg = MergeConfig("random", merges, steps=steps, resume_at=draw(st.integers(0, steps)),
                      poison=tuple(draw(st.sets(st.integers(1, steps), max_size=3))), single_api=single)
    nonfinite, nan = draw(st.sampled_from(MODES))
    return Row(draw(st.sampled_from(DTYPES)), cfg, nonfinite, nan, draw(st.sampled_from(H.INNERS)), covering=True)


@pytest.mark.parametrize("backend", [pytest.param(b, id=b.name) for b in BACKENDS if b.available and not b.covering])
@settings(deadline=None, max_examples=30, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(row=random_rows())
def test_random_configurations_conform(backend: BackendCase, row: Row) -> None:
    """The same checks as ``test_conforms`` on random merge configurations, poison and resume steps."""
    assume(not any(bug(backend, row) for bug, _ in KNOWN_BUGS))
    run_row(backend, row, cache=False)
