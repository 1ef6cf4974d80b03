"""Resume mid-window: save, rebuild, load, continue == an uninterrupted run, bitwise (CPU).

Also the state dict itself: config mismatches named, hooks, numpy config
values, duplicate params numbered as torch numbers them, v0.1 state dicts,
and validate-then-load (a bad state dict changes nothing).
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
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


# ---- state-dict hooks, numpy config values, duplicate params, v0.1 state dicts


def test_state_dict_hooks_registered_on_the_wrapper_run():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = WSMOptimizer(torch.optim.SGD(H.named_groups(p), lr=0.1), window=2)
    ran = []
    opt.register_state_dict_pre_hook(lambda o: ran.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: (ran.append("sd_post"), sd.setdefault("extra", 1))[0])
    opt.register_load_state_dict_pre_hook(lambda o, sd: ran.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: ran.append("load_post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert ran == ["sd_pre", "sd_post", "load_pre", "load_post"]


def test_numpy_int_config_loads_with_weights_only():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = WSMOptimizer(torch.optim.SGD(H.named_groups(p), lr=0.1), window=np.int64(4), interval=np.int32(2),
                       start=np.int64(1))
    p.grad = torch.ones(2)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    again = WSMOptimizer(torch.optim.SGD(H.named_groups(p), lr=0.1), window=4, interval=2, start=1)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.steps == 1


def test_duplicate_params_are_numbered_as_torch_numbers_them_and_resume_exactly():
    def build():
        model = H.tiny_model()
        ps = list(model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the duplicate and accepts it
            inner = torch.optim.SGD([{"params": [ps[0], ps[1], ps[0]]}, {"params": ps[2:]}], lr=0.1, momentum=0.9)
        return model, WSMOptimizer(inner, window=4, keep_last=True, model=model)

    model, opt = build()
    H.train_model(model, opt, 5)
    sd = opt.state_dict()
    numbering = {k for k, v in opt.inner.state_dict()["state"].items()}
    assert {k for k, v in sd["state"].items() if "momentum_buffer" in v} == numbering
    for key, entry in sd["state"].items():
        assert entry["wsm_acc.default"].shape == entry["momentum_buffer"].shape, key
    saved = copy.deepcopy(sd)
    H.train_model(model, opt, 4, first=5)

    resumed_model, resumed = build()
    resumed_model.load_state_dict(_model_at(5))
    resumed.load_state_dict(saved)
    H.train_model(resumed_model, resumed, 4, first=5)
    for (k, a), (_, b) in zip(opt.merged_state_dict().items(), resumed.merged_state_dict().items()):
        assert torch.equal(a, b), k


def _model_at(steps):
    model = H.tiny_model()
    ps = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner = torch.optim.SGD([{"params": [ps[0], ps[1], ps[0]]}, {"params": ps[2:]}], lr=0.1, momentum=0.9)
    H.train_model(model, inner, steps)
    return model.state_dict()


def test_v01_state_dicts_with_a_duplicated_param_still_load():
    """v0.1 numbered WSM buffers by position among distinct params, torch numbers the inner state."""
    def build():
        torch.manual_seed(0)
        p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inner = torch.optim.SGD([{"params": [p, q, p], "param_names": ["p", "q", "p"]}], lr=0.1, momentum=0.9)
        return (p, q), WSMOptimizer(inner, window=4)

    (p, q), opt = build()
    for s in range(3):
        p.grad, q.grad = torch.full((3,), float(s + 1)), torch.full((2,), -1.0)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    legacy = copy.deepcopy(sd)
    buffers = [{k: v for k, v in legacy["state"][i].items() if k.startswith("wsm_")} for i in (2, 1)]  # p, q
    for entry in legacy["state"].values():
        for k in [k for k in entry if k.startswith("wsm_")]:
            del entry[k]
    for i, extra in enumerate(buffers):  # distinct params in order: p -> 0, q -> 1
        legacy["state"].setdefault(i, {}).update(extra)
    for saved in (sd, legacy):
        (p2, q2), fresh = build()
        fresh.load_state_dict(saved)
        with torch.no_grad():
            p2.copy_(p)
            q2.copy_(q)
        got, want = fresh.merged_state_dict(), opt.merged_state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


# --------------------- validate, then load: a bad state dict changes nothing


def _trained_state():
    model = H.tiny_model()
    opt = WSMOptimizer(torch.optim.AdamW(model.named_parameters(), lr=0.05), merges={
        "a": dict(schedule="1-sqrt", window=6, interval=2, keep_last=True), "b": dict(window=4)})
    H.train_model(model, opt, 9)
    return model, opt


def _corrupt(sd, how):
    sd = copy.deepcopy(sd)
    if how == "missing counters key":
        del sd["wsm"]["merges"]["a"]["counters"]["t"]
    elif how == "counter out of range":
        sd["wsm"]["merges"]["a"]["counters"]["t"] = 7
    elif how == "counters disagree with steps":
        sd["wsm"]["steps"] = 8
    elif how == "negative steps":
        sd["wsm"]["steps"] = -1
    elif how == "accumulator shape":
        sd["state"][1]["wsm_acc.b"] = torch.zeros(2)
    elif how == "missing accumulator":
        del sd["state"][3]["wsm_acc.a"]
    elif how == "missing completed window":
        del sd["state"][0]["wsm_last.a"]
    elif how == "missing state":
        del sd["state"]
    elif how == "fewer params":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    elif how == "accumulator not a tensor":
        sd["state"][2]["wsm_acc.a"] = [1.0, 2.0]
    elif how == "meta accumulator":
        sd["state"][2]["wsm_acc.a"] = torch.empty(sd["state"][2]["wsm_acc.a"].shape, device="meta")
    elif how == "skipped not numbers":
        sd["wsm"]["merges"]["b"]["counters"]["skipped"] = ["x", 1]
    elif how == "inner state refused":
        sd["state"][0]["step"] = "three"
    return sd


@pytest.mark.parametrize("how, needle", [
    ("missing counters key", "lack 't'"),
    ("counter out of range", "counter t = 7 is outside 0..3"),
    ("counters disagree with steps", "do not match steps = 8"),
    ("negative steps", "'steps'] = -1"),
    ("accumulator shape", "state[1]['wsm_acc.b']: accumulator shape mismatch: saved (2,), parameter (5,)"),
    ("missing accumulator", "parameter 3 has no 'wsm_acc.a' entry"),
    ("missing completed window", "parameter 0 has no 'wsm_last.a' entry"),
    ("missing state", "lacks the key 'state'"),
    ("fewer params", "3 parameters in its param_groups, this optimizer 4"),
    ("accumulator not a tensor", "is a list, expected a tensor"),
    ("meta accumulator", "state[2]['wsm_acc.a'] is a meta tensor"),
    ("skipped not numbers", "counters['skipped'] = ['x', 1] must be [weight, count]"),
    ("inner state refused", "the inner AdamW refused its part"),
])
def test_a_bad_state_dict_changes_nothing(how, needle):
    model, opt = _trained_state()
    good = copy.deepcopy(opt.state_dict())
    _, target = _trained_state()
    H.train_model(model, target, 1, first=9)  # a different state, to see that nothing of it changes
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError) as info:
        target.load_state_dict(_corrupt(good, how))
    assert needle in str(info.value)
    after = target.state_dict()
    H.assert_state_unchanged(before, after)
    assert after["param_groups"] == before["param_groups"]


# --------------------- state dicts written by earlier releases (committed fixtures)
@pytest.mark.parametrize("release", ["v0.1", "v0.2"])
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_state_dicts_of_earlier_releases_load_and_continue_bit_exactly(release, nonfinite):
    """``tests/fixtures/make_state_dicts.py`` run by each release: save mid-window, continue, record readouts."""
    import importlib.util
    from pathlib import Path

    fixtures = Path(__file__).resolve().parent / "fixtures"
    spec = importlib.util.spec_from_file_location("make_state_dicts", fixtures / "make_state_dicts.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    saved = torch.load(fixtures / f"state_{release}_{nonfinite}.pt", weights_only=True)
    expected = torch.load(fixtures / f"continued_{release}_{nonfinite}.pt", weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as when the fixtures were written
    try:
        net = make.model()
        net.load_state_dict(saved["model"])
        opt = make.optimizer(net, nonfinite)
        opt.load_state_dict(saved["optim"])
        assert opt.steps == make.SAVE_AT
        make.train(net, opt, make.SAVE_AT, make.TOTAL)
        got = make.readouts(opt)
    finally:
        torch.set_num_threads(threads)
    assert opt.steps == expected["steps"]
    for merge, want in expected["readouts"].items():
        for key, value in want.items():
            assert torch.equal(got[merge][key], value), (release, merge, key)
    for key, value in expected["model"].items():
        assert torch.equal(net.state_dict()[key], value), key
