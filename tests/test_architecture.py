"""Defects the one-runtime-object / param-registry redesign removed (each test fails on v0.1).

Through the public API only: proxies built the way framework wrappers build
themselves, params that move or are replaced after wrapping, duplicate params,
and state dicts that must be refused whole.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import reference as R
from wsm_optim import WSMOptimizer

SPEC = dict(schedule="1-sqrt", window=6, interval=2, keep_last=True)


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _grads(model, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _train(model, opt, steps, first=0):
    for s in range(first, first + steps):
        _grads(model, s)
        opt.step()
        opt.zero_grad()


def _snapshot(model):
    return [p.detach().double().clone() for p in model.parameters()]


def _expected(snaps, steps, spec=SPEC):
    """Float64 explicit merge of stored checkpoints (tests/reference.py), one tensor per param."""
    w = R.Window(spec["schedule"], spec["window"], spec.get("interval", 1), spec.get("start", 0))
    return R.readout(w, snaps, steps)


def _assert_matches(merged, names, expected, rtol=1e-6):
    for name, e in zip(names, expected):
        torch.testing.assert_close(merged[name].double(), e, rtol=rtol, atol=1e-7)


# ------------------------------------------------------------------ 1. proxies
class _CopiedDictProxy:
    """What LightningOptimizer did up to 2.5: copy the wrapped optimizer's __dict__, subclass its class."""

    def __init__(self, optimizer):
        self.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k not in ("step", "__del__")}
        self.__class__ = type("Proxy" + optimizer.__class__.__name__, (self.__class__, optimizer.__class__), {})
        self._optimizer = optimizer

    def step(self, closure=None):
        return self._optimizer.step(closure)


def _proxies():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    return {"copied-dict": _CopiedDictProxy, "lightning": LightningOptimizer}


@pytest.mark.parametrize("kind", ["copied-dict", "lightning"])
def test_step_inside_merged_weights_is_refused_through_a_proxy(kind):
    model = _model()
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), **SPEC)
    proxy = _proxies()[kind](opt)
    # LightningOptimizer.step needs a Trainer's strategy: the Lightning proxy steps the optimizer itself
    stepper = proxy if kind == "copied-dict" else opt
    _train(model, stepper, 3)
    assert opt.steps == proxy.steps == 3
    before = _snapshot(model)
    with proxy.merged_weights():
        _grads(model, 99)
        with pytest.raises(RuntimeError, match=r"step\(\) called inside merged_weights"):
            stepper.step()
        with pytest.raises(RuntimeError, match=r"step\(\) called inside merged_weights"):
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model)))  # nothing lost on exit
    assert opt.steps == 3


@pytest.mark.parametrize("kind", ["copied-dict", "lightning"])
def test_add_param_group_through_a_proxy(kind):
    model = _model()
    extra = nn.Parameter(torch.randn(3))
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=4)
    proxy = _proxies()[kind](opt)
    stepper = proxy if kind == "copied-dict" else opt
    _train(model, stepper, 2)
    proxy.add_param_group({"params": [extra], "param_names": ["extra"]})
    merged = opt.merged_state_dict()
    assert torch.equal(merged["extra"], extra.detach())  # joined mid-window: constant since the anchor
    assert set(proxy.merged_state_dict()) == set(merged)
    _train(model, stepper, 2, first=2)
    extra.grad = None
    assert opt.steps == 4 and len(opt.state_dict()["state"]) == 5
    assert torch.equal(opt.merged_state_dict()["extra"], extra.detach())  # never stepped: constant


# ------------------------------------------------- 2. buffers follow their params
def test_buffers_are_created_at_the_first_step_where_the_params_are_then():
    model = _model()
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), **SPEC)
    model.double()  # after wrapping, before training (as Trainer moves a model to its device)
    snaps = [_snapshot(model)]
    for s in range(8):
        _train(model, opt, 1, first=s)
        snaps.append(_snapshot(model))
    state = opt.state_dict()["state"]
    assert all(state[i]["wsm_acc.default"].dtype == torch.float64 for i in range(4))
    names = [n for n, _ in model.named_parameters()]
    _assert_matches(opt.merged_state_dict(), names, _expected(snaps, 8), rtol=1e-12)


def test_meta_params_are_a_clear_error_not_a_copy_failure():
    with torch.device("meta"):
        model = nn.Linear(4, 3)
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=4)  # lazy: fine so far
    for call in (opt.step, opt.merged_state_dict, opt.state_dict):
        with pytest.raises(ValueError, match="is on the meta device. Build the inner optimizer and WSMOptimizer after"):
            call()


@pytest.mark.parametrize("backend", ["foreach", "triton"])
@pytest.mark.parametrize("change", ["storage", "dtype", "strides"])
def test_params_changing_storage_dtype_or_layout_mid_window(backend, change):
    model = _model()
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.5), backend=backend, **SPEC)
    snaps = [_snapshot(model)]
    for s in range(9):
        if s == 4:  # mid-window, between two checkpoints
            with torch.no_grad():
                for p in model.parameters():
                    if change == "storage":
                        p.data = p.data.clone()  # same values, new memory: stale pointers would corrupt
                    elif change == "dtype":
                        p.data = p.data.double()
                    elif p.ndim == 2:
                        p.data = p.data.t().contiguous().t()  # same values, transposed layout
            for buf in opt.state.values():
                buf["momentum_buffer"] = buf["momentum_buffer"].to(next(model.parameters()).dtype)
        _train(model, opt, 1, first=s)
        snaps.append(_snapshot(model))
    names = [n for n, _ in model.named_parameters()]
    _assert_matches(opt.merged_state_dict(torch.float64), names, _expected(snaps, 9))
    _assert_matches(opt.merged_state_dict(torch.float64, completed=True), names, _expected(snaps, 6))


def test_a_param_changing_shape_is_a_clear_error():
    model = _model()
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=4)
    _train(model, opt, 2)
    model[0].bias.data = torch.zeros(7)
    with pytest.raises(ValueError, match=r"changed shape from \(5,\) to \(7,\)"):
        opt.step()


@pytest.mark.cuda
def test_buffers_follow_a_model_moved_to_the_gpu_after_wrapping():
    model = _model()
    opt = WSMOptimizer(torch.optim.AdamW(model.named_parameters(), lr=0.01), window=4)
    reference = copy.deepcopy(model).cuda()
    ref_opt = WSMOptimizer(torch.optim.AdamW(reference.named_parameters(), lr=0.01), window=4)
    model.cuda()  # Hugging Face order: optimizer built on the CPU model, then the Trainer moves the model
    for s in range(6):
        for m, o in ((model, opt), (reference, ref_opt)):
            _grads(m, s)
            for p in m.parameters():
                p.grad = p.grad.cuda()
            o.step()
        if s == 2:  # and back and forth mid-window
            model.cpu()
            opt.step  # noqa: B018
            model.cuda()
    got, want = opt.merged_state_dict(), ref_opt.merged_state_dict()
    assert all(v.is_cuda for v in got.values()) and opt.backend == ref_opt.backend
    for k in want:
        torch.testing.assert_close(got[k], want[k])


# ------------------------------------------- 3. params replaced, count unchanged
@pytest.mark.parametrize("how", ["in-group", "setter"])
def test_a_param_replaced_by_another_object_is_adopted(how):
    model = _model()
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=4)
    _train(model, opt, 2)
    new = nn.Parameter(torch.randn(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "in-group":
            opt.param_groups[0]["params"][3] = new
        else:
            groups = [dict(g) for g in opt.param_groups]
            groups[0]["params"] = list(groups[0]["params"][:3]) + [new]
            opt.param_groups = groups
        merged = opt.merged_state_dict()
    assert any("replaced by new tensor objects" in str(w.message) for w in caught)
    assert torch.equal(merged["2.bias"], new.detach())  # its merge starts at its value
    _grads(model, 2)
    new.grad = torch.ones(3)
    opt.step()
    assert "2.bias" in opt.merged_state_dict()
    assert len(opt.state_dict()["state"]) == 4


# ------------------------------------------------------------ 4. duplicate params
def test_duplicate_params_are_numbered_as_torch_numbers_them_and_resume_exactly():
    def build():
        model = _model()
        ps = list(model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the duplicate and accepts it
            inner = torch.optim.SGD([{"params": [ps[0], ps[1], ps[0]]}, {"params": ps[2:]}], lr=0.1, momentum=0.9)
        return model, WSMOptimizer(inner, window=4, keep_last=True, model=model)

    model, opt = build()
    _train(model, opt, 5)
    sd = opt.state_dict()
    numbering = {k for k, v in opt.inner.state_dict()["state"].items()}
    assert {k for k, v in sd["state"].items() if "momentum_buffer" in v} == numbering
    for key, entry in sd["state"].items():
        assert entry["wsm_acc.default"].shape == entry["momentum_buffer"].shape, key
    saved = copy.deepcopy(sd)
    _train(model, opt, 4, first=5)

    resumed_model, resumed = build()
    resumed_model.load_state_dict(_model_at(5))
    resumed.load_state_dict(saved)
    _train(resumed_model, resumed, 4, first=5)
    for (k, a), (_, b) in zip(opt.merged_state_dict().items(), resumed.merged_state_dict().items()):
        assert torch.equal(a, b), k


def _model_at(steps):
    model = _model()
    ps = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner = torch.optim.SGD([{"params": [ps[0], ps[1], ps[0]]}, {"params": ps[2:]}], lr=0.1, momentum=0.9)
    _train(model, inner, steps)
    return model.state_dict()


# ------------------------------------------------------ validate, then load
def _trained_state():
    model = _model()
    opt = WSMOptimizer(torch.optim.AdamW(model.named_parameters(), lr=0.05), merges={
        "a": dict(schedule="1-sqrt", window=6, interval=2, keep_last=True), "b": dict(window=4)})
    _train(model, opt, 9)
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
    _train(model, target, 1, first=9)  # a different state, to see that nothing of it changes
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError) as info:
        target.load_state_dict(_corrupt(good, how))
    assert needle in str(info.value)
    after = target.state_dict()
    assert after["wsm"] == before["wsm"]
    for key, entry in before["state"].items():
        for field, value in entry.items():
            assert torch.equal(after["state"][key][field], value), (key, field)
    assert after["param_groups"] == before["param_groups"]
