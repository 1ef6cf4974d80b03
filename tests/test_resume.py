"""Resume mid-window: save, rebuild, load, continue == an uninterrupted run, bitwise (CPU)."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import harness as H
import reference as R
from wsm_optim import WSMOptimizer


def _readouts(opt: WSMOptimizer, case: H.Case) -> dict[str, dict[str, torch.Tensor]]:
    """Every readout the optimizer offers now, in fp32 (plus the completed window when readable)."""
    out = {}
    for name, spec in case.merges.items():
        merge = None if case.single_api else name
        out[name] = opt.merged_state_dict(torch.float32, merge=merge)
        if spec.keep_last and R.completed_windows(spec, opt.steps) > 0:
            out[name + "/completed"] = opt.merged_state_dict(torch.float32, merge=merge, completed=True)
    return out


def _step(params, opt, case: H.Case, s: int) -> None:
    H.set_grads(params, case.seed, s, case.missing_grads)
    opt.step()
    opt.zero_grad()


def _save(params, opt) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": {f"p{i}": p.detach() for i, p in enumerate(params)}, "opt": opt.state_dict()}, buf)
    return buf.getvalue()


def _restore(case: H.Case, blob: bytes, warm_steps: int):
    """A fresh model/optimizer (different init, possibly already stepped), then load ``blob``."""
    other = H.Case(**{**case.__dict__, "seed": case.seed + 7919})
    params, opt = H.build(other)
    for s in range(1, warm_steps + 1):  # stale state that loading must overwrite completely
        _step(params, opt, other, s)
    saved = torch.load(io.BytesIO(blob), weights_only=True)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(saved["model"][f"p{i}"])
    opt.load_state_dict(saved["opt"])
    return params, opt


def _max_abs_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for key in a:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}/{name} differs after resume"
            worst = max(worst, float((a[key][name].double() - b[key][name].double()).abs().max()))
    return worst


def check_resume(case: H.Case, interrupt_at: int, warm_steps: int = 0) -> float:
    """Run straight and interrupted at ``interrupt_at``; assert bitwise equality after every later step."""
    params, opt = H.build(case)
    straight = {}
    blob = None
    for s in range(1, case.steps + 1):
        if s - 1 == interrupt_at:
            blob = _save(params, opt)
        _step(params, opt, case, s)
        straight[s] = ([p.detach().clone() for p in params], _readouts(opt, case), opt.state_dict())
    if blob is None:
        blob = _save(params, opt)

    params2, opt2 = _restore(case, blob, warm_steps)
    assert opt2.steps == interrupt_at
    worst = 0.0
    for s in range(interrupt_at + 1, case.steps + 1):
        _step(params2, opt2, case, s)
        ref_params, ref_readouts, ref_state = straight[s]
        assert opt2.steps == s
        for a, b in zip(ref_params, params2):
            assert torch.equal(a, b), f"params differ at step {s}"
        worst = max(worst, _max_abs_diff(ref_readouts, _readouts(opt2, case)))
    if case.steps > interrupt_at:
        assert opt2.state_dict()["wsm"] == ref_state["wsm"]  # counters and config
        for name in case.merges:
            merge = None if case.single_api else name
            assert opt.merge_status(merge)["checkpoint"] == opt2.merge_status(merge)["checkpoint"]
    return worst


@st.composite
def resume_cases(draw):
    n = draw(st.integers(1, 2))
    merges = {}
    for i in range(n):
        interval = draw(st.integers(1, 4))
        k = draw(st.integers(1, 6))
        merges[f"m{i}"] = R.Window(
            schedule=draw(st.sampled_from(["linear", "cosine", "1-sqrt", "ema", "inv-sqrt"])),
            window=k * interval,
            interval=interval,
            start=draw(st.integers(0, 5)),
            keep_last=draw(st.booleans()),
        )
    longest = max(s.start + s.window for s in merges.values())
    steps = draw(st.integers(1, 3 * longest))
    case = H.Case(
        shapes=[(), (1,), (2, 3)],
        dtype=draw(st.sampled_from(list(H.DTYPES.values()))),
        merges=merges,
        inner=draw(st.sampled_from(H.INNERS)),
        steps=steps,
        seed=draw(st.integers(0, 1000)),
        single_api=n == 1 and draw(st.booleans()),
        missing_grads=draw(st.booleans()),
    )
    return case, draw(st.integers(0, steps)), draw(st.integers(0, 5))


@settings(deadline=None, max_examples=40, derandomize=True)
@given(resume_cases())
def test_resume_anywhere_is_bitwise(args):
    case, interrupt_at, warm_steps = args
    assert check_resume(case, interrupt_at, warm_steps) == 0.0


@pytest.mark.parametrize("inner", H.INNERS)
def test_resume_mid_window_interval_start_keep_last_two_merges(inner, capsys):
    """interval > 1, start > 0, keep_last, two merges; interrupted between two checkpoints of window 1."""
    merges = {
        "a": R.Window("1-sqrt", window=12, interval=3, start=4, keep_last=True),
        "b": R.Window("ema", window=5, interval=1, start=2),
    }
    case = H.Case(shapes=[(), (4,)], dtype=torch.float32, merges=merges, inner=inner, steps=50, single_api=False)
    interrupt_at = 4 + 12 + 7  # window 1 of "a", one step after its checkpoint 2
    worst = check_resume(case, interrupt_at, warm_steps=3)
    assert worst == 0.0
    if inner == "adamw":
        with capsys.disabled():
            print(
                f"\n[wsm resume] AdamW, merge 'a' (1-sqrt, window 12, interval 3, start 4): "
                f"interrupted after step {interrupt_at} (window 1, checkpoint 2 of 4, 1 step past it), "
                f"continued to step {case.steps}: max abs diff of every readout and param = {worst}"
            )


# --------------------------------------------------------------- config mismatch
def _state_after(spec: R.Window, steps: int = 5) -> dict:
    case = H.Case(shapes=[(2,)], dtype=torch.float32, merges={"m": spec}, inner="sgd", steps=steps)
    params, opt = H.build(case)
    for s in range(1, steps + 1):
        _step(params, opt, case, s)
    return torch.load(io.BytesIO(_save(params, opt)), weights_only=True)["opt"]


@pytest.mark.parametrize(
    "changed,field,saved_value,new_value",
    [
        (dict(schedule="cosine"), "schedule", "'linear'", "'cosine'"),
        (dict(window=8), "window", "6", "8"),
        (dict(window=6, interval=3), "interval", "2", "3"),
        (dict(start=2), "start", "1", "2"),
    ],
)
def test_load_with_different_config_names_the_mismatch(changed, field, saved_value, new_value):
    base = R.Window("linear", window=6, interval=2, start=1)
    sd = _state_after(base)
    spec = R.Window(**{**base.__dict__, **changed})
    case = H.Case(shapes=[(2,)], dtype=torch.float32, merges={"m": spec}, inner="sgd", steps=0)
    _, opt = H.build(case)
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(sd)
    msg = str(info.value)
    assert f"{field} mismatch" in msg and saved_value in msg and new_value in msg, msg


def test_load_with_different_explicit_weights_or_callable_is_refused():
    sd = _state_after(R.Window([0.9, 0.5, 0.1], window=3))
    _, opt = H.build(H.Case([(2,)], torch.float32, {"m": R.Window([0.9, 0.5, 0.2], window=3)}, "sgd", 0))
    with pytest.raises(ValueError, match="weights_sha256 mismatch"):
        opt.load_state_dict(sd)
    sd = _state_after(R.Window(lambda t: 1 - t, window=3))
    _, opt = H.build(H.Case([(2,)], torch.float32, {"m": R.Window(lambda t: (1 - t) ** 2, window=3)}, "sgd", 0))
    with pytest.raises(ValueError, match="mismatch"):
        opt.load_state_dict(sd)


def test_load_with_different_merge_names_or_plain_state():
    sd = _state_after(R.Window("linear", window=4))
    case = H.Case([(2,)], torch.float32, {"x": R.Window("linear", 4), "y": R.Window("linear", 4)}, "sgd", 0)
    _, opt = H.build(H.Case(**{**case.__dict__, "single_api": False}))
    with pytest.raises(ValueError, match=r"merge names differ: saved \['default'\], this optimizer \['x', 'y'\]"):
        opt.load_state_dict(sd)
    params, opt = H.build(H.Case([(2,)], torch.float32, {"m": R.Window("linear", 4)}, "sgd", 0))
    with pytest.raises(ValueError, match="not a WSMOptimizer state dict"):
        opt.load_state_dict(opt.inner.state_dict())


def test_keep_last_may_change_on_resume():
    """Turning keep_last off drops the kept window; turning it on keeps the next one, not a past one."""
    model = torch.nn.Linear(3, 2)

    def make(keep):
        return WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=3, keep_last=keep)

    def train(opt, steps):
        for _ in range(steps):
            model(torch.ones(2, 3)).sum().backward()
            opt.step()
            opt.zero_grad()

    kept = make(True)
    train(kept, 5)  # window 0 finished at step 3 and was kept
    dropped = make(False)
    dropped.load_state_dict(kept.state_dict())
    with pytest.raises(RuntimeError, match="overwritten when the next window began"):
        dropped.merged_state_dict(completed=True)

    plain = make(False)
    train(plain, 4)
    enabled = make(True)
    enabled.load_state_dict(plain.state_dict())
    with pytest.raises(RuntimeError, match="was not kept .*the next window to complete will be"):
        enabled.merged_state_dict(completed=True)
    train(enabled, 2)  # window 1 completes at step 6
    finished = enabled.merged_state_dict(torch.float32)
    train(enabled, 1)  # the next step anchors window 2 and keeps window 1
    kept_now = enabled.merged_state_dict(torch.float32, completed=True)
    assert kept_now.keys() == finished.keys()
    assert all(torch.equal(kept_now[k], finished[k]) for k in finished)
    assert not torch.equal(enabled.merged_state_dict(torch.float32)["weight"], finished["weight"])
