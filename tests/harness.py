"""Drive a ``WSMOptimizer`` on synthetic gradients and compare it with ``reference``.

Used by the property tests and by ``tests/report_errors.py``. Parameters are
plain tensors with seeded random gradients (no model), so a run of a few
hundred steps takes a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import reference as R
from wsm_optim import WSMOptimizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Relative error allowed for the fp32 readout against the float64 reference, per
#: param dtype. The fp32 accumulator rounds each of the k + 1 terms, so the
#: error is a few fp32 ulps of the elementwise scale ``max_j |theta_j|``.
FP32_READOUT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
FP32_TOL_ANY = max(FP32_READOUT_RTOL.values())
#: The default readout is in the param dtype: one more rounding (half an ulp,
#: relative to a value bounded by the scale) on top of the fp32 error.
NATIVE_READOUT_RTOL = {
    torch.float32: 1e-5,
    torch.bfloat16: 2.0**-8 + 1e-5,
    torch.float16: 2.0**-11 + 1e-5,
}
#: Absolute floor for subnormal rounding in the param dtype.
NATIVE_READOUT_ATOL = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-25}

INNERS = ("sgd", "sgd_momentum", "adam", "adamw")


def make_params(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype], seed: int) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype))
        for shape, dtype in zip(shapes, dtypes, strict=True)
    ]


def make_inner(kind: str, named_params: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
    """The inner optimizer; eps/lr chosen so fp16 params stay finite."""
    if kind == "sgd":
        return torch.optim.SGD(named_params, lr=0.05)
    if kind == "sgd_momentum":
        return torch.optim.SGD(named_params, lr=0.05, momentum=0.9, nesterov=True)
    if kind == "adam":
        return torch.optim.Adam(named_params, lr=0.02, eps=1e-3)
    if kind == "adamw":
        return torch.optim.AdamW(named_params, lr=0.02, eps=1e-3, weight_decay=0.1)
    raise ValueError(kind)


def set_grads(params: Sequence[Tensor], seed: int, step: int, missing_grads: bool = False) -> None:
    """Deterministic gradients for ``step`` (same in an interrupted and a straight run).

    With ``missing_grads``, some params get no gradient at some steps (the inner
    optimizer skips them; the merge must still count them at their constant value).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        p.grad = None if missing_grads and (step + i) % 3 == 0 else grad


def rel_error(got: Tensor, expected: Tensor, scale: Tensor, atol: float = 0.0) -> float:
    """``max_i (|got_i - expected_i| - atol)_+ / scale_i``; 0/0 counts as 0, x/0 as inf."""
    err = (got.to(R.F64) - expected).abs()
    err = (err - atol).clamp_min(0.0)
    ratio = torch.where(err == 0, torch.zeros_like(err), err / scale)
    return float(ratio.max()) if ratio.numel() else 0.0


@dataclass
class Case:
    shapes: list[tuple[int, ...]]
    dtype: torch.dtype | list[torch.dtype]  # one for all params, or one per param (mixed groups)
    merges: dict[str, R.Window]
    inner: str
    steps: int
    seed: int = 0
    single_api: bool = True  # one merge passed with the positional/keyword API
    abel_every: int = 1  # check the reference's two forms agree every this many steps
    missing_grads: bool = False  # see ``set_grads``
    backend: str = "foreach"

    @property
    def dtypes(self) -> list[torch.dtype]:
        return list(self.dtype) if isinstance(self.dtype, (list, tuple)) else [self.dtype] * len(self.shapes)


@dataclass
class Errors:
    """Largest relative errors seen (fp32 readout and param-dtype readout)."""

    fp32: float = 0.0
    native: float = 0.0
    checks: int = 0
    window_ends: int = 0
    details: list[str] = field(default_factory=list)


def build(case: Case) -> tuple[list[nn.Parameter], WSMOptimizer]:
    params = make_params(case.shapes, case.dtypes, case.seed)
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    inner = make_inner(case.inner, named)
    if case.single_api:
        assert len(case.merges) == 1
        opt = WSMOptimizer(inner, backend=case.backend, **next(iter(case.merges.values())).as_kwargs())
    else:
        opt = WSMOptimizer(inner, backend=case.backend, merges={n: s.as_kwargs() for n, s in case.merges.items()})
    return params, opt


def run_case(case: Case) -> Errors:
    """Run ``case.steps`` steps; after every step compare every readout with the reference.

    Asserts (with a message naming merge, step and param) and returns the
    largest errors seen.
    """
    params, opt = build(case)
    names = [f"p{i}" for i in range(len(params))]
    snaps = [R.snapshot(params)]
    errs = Errors()
    window_cache: dict = {}

    for s in range(case.steps + 1):
        if s > 0:
            set_grads(params, case.seed, s, case.missing_grads)
            opt.step()
            opt.zero_grad()
            snaps.append(R.snapshot(params))
            assert all(torch.isfinite(x).all() for x in snaps[-1]), "inner optimizer diverged (test setup)"
        assert opt.steps == s
        for name, spec in case.merges.items():
            merge = None if case.single_api else name
            expected = R.readout(spec, snaps, s)
            scale = R.readout_scale(spec, snaps, s)
            if s % case.abel_every == 0 or R.at_window_end(spec, s):
                abel = R.abel_readout(spec, snaps, s)
                for i, (a, b, sc) in enumerate(zip(expected, abel, scale)):
                    assert rel_error(a, b, sc) <= 1e-12, f"reference forms disagree: {name} step {s} p{i}"
            got32 = opt.merged_state_dict(torch.float32, merge=merge)
            native = opt.merged_state_dict(merge=merge)
            assert list(got32) == names and list(native) == names
            for i, key in enumerate(names):
                dtype = case.dtypes[i]
                fp32_tol = FP32_READOUT_RTOL[dtype]
                nat_tol, nat_atol = NATIVE_READOUT_RTOL[dtype], NATIVE_READOUT_ATOL[dtype]
                g32, gnat = got32[key], native[key]
                assert g32.dtype == torch.float32 and g32.shape == params[i].shape
                assert gnat.dtype == dtype and gnat.shape == params[i].shape
                if R.position(spec, s) is None:  # before the first anchor: exactly the live params
                    assert torch.equal(g32, params[i].detach().float()), f"{name} step {s} {key}: not live"
                # The default readout is the fp32 readout rounded once to the param dtype.
                assert torch.equal(gnat, g32.to(dtype)), f"{name} step {s} {key}: dtype=None readout"
                e32 = rel_error(g32, expected[i], scale[i])
                enat = rel_error(gnat, expected[i], scale[i], nat_atol)
                errs.fp32, errs.native = max(errs.fp32, e32), max(errs.native, enat)
                errs.checks += 1
                assert e32 <= fp32_tol, (
                    f"merge {name} {spec} step {s} {key}: fp32 readout rel error {e32:.3g} > {fp32_tol}"
                )
                assert enat <= nat_tol, (
                    f"merge {name} {spec} step {s} {key}: native readout rel error {enat:.3g} > {nat_tol}"
                )
            _check_status(opt.merge_status(merge), spec, s, name)
            _check_completed(opt, spec, snaps, s, merge, names, FP32_TOL_ANY, errs, name, window_cache)
    return errs


def _check_completed(opt, spec: R.Window, snaps, s: int, merge, names, tol: float, errs: Errors, name, cache) -> None:
    """``completed=True``: the last finished window's explicit merge, or a clear error."""
    done = R.completed_windows(spec, s)
    at_end = R.at_window_end(spec, s)
    if done == 0 or not (at_end or spec.keep_last):
        # before any window finished, or after it was replaced without keep_last
        expected = "no window has completed" if done == 0 else "keep_last=True"
        with pytest.raises(RuntimeError, match=expected):
            opt.merged_state_dict(torch.float32, merge=merge, completed=True)
        return
    m = done - 1
    if (name, m) not in cache:  # a finished window's merge never changes
        cache[(name, m)] = (R.window_merge(spec, snaps, m), R.window_scale(spec, snaps, m))
    expected, scale = cache[(name, m)]
    got = opt.merged_state_dict(torch.float32, merge=merge, completed=True)
    if at_end:  # the window that just finished *is* the current readout
        current = opt.merged_state_dict(torch.float32, merge=merge)
        assert all(torch.equal(got[key], current[key]) for key in names), f"{name} step {s}"
    for i, key in enumerate(names):
        e = rel_error(got[key], expected[i], scale[i])
        errs.fp32 = max(errs.fp32, e)
        assert e <= tol, f"merge {name} {spec} step {s} {key}: completed window {m} rel error {e:.3g}"
    if at_end:
        errs.window_ends += 1


def _check_status(status: dict, spec: R.Window, s: int, name: str) -> None:
    """``merge_status`` counters and readout weights agree with the reference's window model."""
    where = f"merge {name} {spec} step {s}: merge_status {status}"
    assert status["k"] == spec.k and status["windows_completed"] == R.completed_windows(spec, s), where
    assert abs(float(status["weights"].sum()) - 1.0) <= 1e-12, where
    pos = R.position(spec, s)
    if pos is None:
        # at s == start the anchor is taken lazily by the next step(); the readout is live either way
        assert status["window_index"] == -1 and not status["anchored"], where
        assert list(status["weights"]) == [1.0], where
        return
    m, t, r = pos
    assert status["anchored"] and status["window_index"] == m, where
    assert status["checkpoint"] == t and status["steps_since_checkpoint"] == r, where
    assert status["complete"] == (t == spec.k), where
    w, c = spec.decay(), spec.merge()
    expected = [*c[: t + 1], w[t] if t < spec.k else 0.0]
    np.testing.assert_allclose(status["weights"], expected, rtol=0, atol=1e-15, err_msg=where)


# ------------------------------------------- a tiny model, for behaviour tests
#: A merge with interval > 1 and keep_last, the default of the tiny-model tests.
TINY_SPEC = dict(schedule="1-sqrt", window=6, interval=2, keep_last=True)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``Linear(4, 5) -> Tanh -> Linear(5, 3)``: four params, named ``0.weight`` .. ``2.bias``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def model_grads(model: nn.Module, step: int) -> None:
    """Seeded gradients for ``step`` (the same in every run)."""
    g = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def train_model(model: nn.Module, opt, steps: int, first: int = 0) -> None:
    """``steps`` steps with :func:`model_grads` of steps ``first ..``."""
    for s in range(first, first + steps):
        model_grads(model, s)
        opt.step()
        opt.zero_grad()


def model_snapshot(model: nn.Module) -> list[Tensor]:
    return [p.detach().double().clone() for p in model.parameters()]


def model_readout(snaps, steps: int, spec: dict = TINY_SPEC) -> list[Tensor]:
    """Float64 explicit merge of stored checkpoints (``reference.readout``), one tensor per param."""
    w = R.Window(spec["schedule"], spec["window"], spec.get("interval", 1), spec.get("start", 0))
    return R.readout(w, snaps, steps)


def assert_matches(merged: dict, names, expected, rtol: float = 1e-6) -> None:
    for name, e in zip(names, expected):
        torch.testing.assert_close(merged[name].double(), e, rtol=rtol, atol=1e-7)


def named_groups(*params: Tensor) -> list[dict]:
    """One param group naming ``params`` ``p0, p1, ...`` (readouts keyed by those names)."""
    return [{"params": list(params), "param_names": [f"p{i}" for i in range(len(params))]}]


def assert_state_unchanged(before: dict, after: dict) -> None:
    """A refused ``load_state_dict`` changed nothing: the WSM counters and every state tensor, bit for bit."""
    assert after["wsm"] == before["wsm"]
    for key, entry in before["state"].items():
        for field_name, value in entry.items():
            assert torch.equal(after["state"][key][field_name], value), (key, field_name)
