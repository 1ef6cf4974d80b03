"""``merge_buffers=True``: the model's persistent floating-point buffers merged with the params' checkpoint weights.

Every readout is compared with the float64 reference (``tests/reference.py``)
applied to per-step snapshots of the whole ``model.state_dict()``: params and
merged buffers alike, the same weights. Integer and non-persistent buffers
stay live.
"""

import copy
import io
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from reference import Window, readout, readout_skipping, window_merge
from wsm_optim import NonFiniteMergeError, WSMOptimizer
from wsm_optim.integrations._final_weights import forget_final_weights, keep_final_weights

F64 = torch.float64


class Router(nn.Module):
    """A linear map with a routing bias that the optimizer's step pre-hook moves (as torchtitan's ``expert_bias``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 4)
        self.register_buffer("expert_bias", torch.zeros(4))
        self.register_buffer("tokens_per_expert", torch.zeros(4), persistent=False)  # stays live

    def forward(self, x):
        scores = self.proj(x) + self.expert_bias
        self.tokens_per_expert += scores.detach().softmax(-1).sum(0)
        return scores


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = Router()
        self.bn = nn.BatchNorm1d(4)  # running_mean/var merged, num_batches_tracked (int64) live
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.router(x))))


def update_bias(model: Net):
    """A step pre-hook: the bias moves before every inner step, from the tokens counted in the forward."""

    def hook(optimizer, args, kwargs):
        counts = model.router.tokens_per_expert
        with torch.no_grad():
            model.router.expert_bias.add_(1e-2 * torch.sign(counts.mean() - counts))
            counts.zero_()

    return hook


MERGED = ["router.expert_bias", "bn.running_mean", "bn.running_var"]
CONFIGS = {
    "plain": dict(window=4),
    "interval-start-keep": dict(window=6, interval=2, start=3, keep_last=True),
    "two-merges": dict(merges={"lin": dict(window=4, keep_last=True),
                               "cos": dict(schedule="cosine", window=9, interval=3, start=1)}),
}


def _windows(config) -> dict[str, Window]:
    if "merges" in config:
        return {n: Window(**m) for n, m in config["merges"].items()}
    return {"default": Window(**config)}


def _train(config, steps=17, *, seed=0, inner="adamw", resume_at=None, optimizer_first=False, each_step=None,
           **extra):
    """Train ``Net`` with merged buffers; returns (opt, model, float64 snapshots of the state dict per step)."""
    torch.manual_seed(seed)
    model = Net()
    opt = _optimizer(model, config, inner, **extra)
    keys = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    snaps = [{k: v.detach().to(F64, copy=True) for k, v in model.state_dict().items() if k in keys}]
    data = torch.randn(steps, 8, 6)
    for s in range(steps):
        model(data[s]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        snaps.append({k: v.detach().to(F64, copy=True) for k, v in model.state_dict().items() if k in keys})
        if resume_at == s + 1:
            opt, model = _resumed(opt, model, config, inner, optimizer_first, **extra)
        if each_step is not None:
            each_step(s + 1, opt, model, snaps)
    return opt, model, snaps


def _optimizer(model, config, inner="adamw", **extra):
    make = {"adamw": lambda: torch.optim.AdamW(model.named_parameters(), lr=0.05),
            "sgd": lambda: torch.optim.SGD(model.named_parameters(), lr=0.05)}[inner]
    opt = WSMOptimizer(make(), **config, model=model, merge_buffers=True, **extra)
    opt.register_step_pre_hook(update_bias(model))
    return opt


def _resumed(opt, model, config, inner, optimizer_first=False, **extra):
    """A fresh process's view: model and optimizer rebuilt, then loaded from ``torch.save`` bytes.

    ``optimizer_first``: the optimizer's state is loaded while the model still
    holds other values (a fresh init), then the model's.
    """
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=False)
    torch.manual_seed(1)
    fresh = Net()
    new = _optimizer(fresh, config, inner, **extra)
    if optimizer_first:
        new.load_state_dict(saved["opt"])
    fresh.load_state_dict(saved["model"])
    fresh.router.tokens_per_expert.copy_(model.router.tokens_per_expert)  # non-persistent: not in any checkpoint
    if not optimizer_first:
        new.load_state_dict(saved["opt"])
    return new, fresh


def _check_against_reference(opt, model, snaps, windows, s, *, completed=False, rtol=2e-6):
    for name, spec in windows.items():
        got = opt.merged_state_dict(merge=name, completed=completed)
        keys = list(snaps[0])
        columns = [[snap[k] for k in keys] for snap in snaps]
        if completed:
            m = (s - spec.start) // spec.window - 1
            want = window_merge(spec, columns, m)
        else:
            want = readout(spec, columns, s)
        for key, ref in zip(keys, want):
            scale = max(float(ref.abs().max()), 1.0)
            assert torch.allclose(got[key].to(F64), ref, rtol=0, atol=rtol * scale), (name, key, s)
        live = model.state_dict()
        assert torch.equal(got["bn.num_batches_tracked"], live["bn.num_batches_tracked"])
        assert "router.tokens_per_expert" not in got  # non-persistent: not model state


@pytest.mark.parametrize("extra", [dict(backend="foreach"), dict(offload="cpu")], ids=["foreach", "offload"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_merged_buffers_equal_the_explicit_merge_of_the_checkpoints_every_step(config, extra):
    windows = _windows(config)

    def check(s, opt, model, snaps):
        _check_against_reference(opt, model, snaps, windows, s)
        for name, spec in windows.items():
            if spec.keep_last and s > spec.start + spec.window:
                _check_against_reference(opt, model, snaps, {name: spec}, s, completed=True)

    opt, model, snaps = _train(config, each_step=check, **extra)
    # the buffers really moved, so the check above could fail
    for key in MERGED:
        assert not torch.equal(snaps[0][key], snaps[-1][key]), key


def test_offload_and_foreach_give_bit_identical_merged_buffers():
    config = CONFIGS["interval-start-keep"]
    a, _, _ = _train(config, backend="foreach")
    b, _, _ = _train(config, offload="cpu")
    want, got = a.merged_state_dict(), b.merged_state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


#: resume points: mid-window, and right where a window anchors at the next step() (the anchor then reads the
#: buffers' values saved in the state dict, whatever the order the model and the optimizer are loaded in)
RESUMES = [("plain", 7), ("plain", 8), ("interval-start-keep", 7), ("interval-start-keep", 9),
           ("two-merges", 8), ("two-merges", 10)]


@pytest.mark.parametrize("optimizer_first", [False, True], ids=["model-first", "optimizer-first"])
@pytest.mark.parametrize("name, at", RESUMES, ids=[f"{n}-{a}" for n, a in RESUMES])
def test_resume_continues_bit_exactly(name, at, optimizer_first):
    config = CONFIGS[name]
    reads = {}

    def record(tag):
        def each(s, opt, model, snaps):
            reads.setdefault(tag, []).append({m: opt.merged_state_dict(merge=m) for m in opt.merges})
        return each

    opt_a, _, _ = _train(config, each_step=record("straight"))
    opt_b, _, _ = _train(config, resume_at=at, optimizer_first=optimizer_first, each_step=record("resumed"))
    for s, (want, got) in enumerate(zip(reads["straight"], reads["resumed"]), 1):
        for m in want:
            for key in want[m]:
                assert torch.equal(want[m][key], got[m][key]), (s, m, key)
    state = opt_b.state_dict()
    merges = opt_b.merges
    assert state["wsm"]["buffers"] == MERGED
    assert {f"wsm_acc.{m}:{b}" for m in merges for b in MERGED} <= set(state["state"][0])
    assert {f"wsm_anchor:{b}" for b in MERGED} <= set(state["state"][0])
    assert not any(":" in k for entry in list(state["state"].values())[1:] for k in entry)  # one home only


def test_merged_weights_swaps_the_buffers_in_and_restores_them_bit_exactly():
    opt, model, _ = _train(CONFIGS["plain"], steps=6)
    merged = opt.merged_state_dict()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with opt.merged_weights():
        inside = model.state_dict()
        for key in MERGED:
            assert torch.equal(inside[key], merged[key]), key
            assert not torch.equal(inside[key], live[key]), key
        assert torch.equal(inside["bn.num_batches_tracked"], live["bn.num_batches_tracked"])
    after = model.state_dict()
    assert all(torch.equal(after[k], live[k]) for k in live)


def test_a_copy_of_the_model_gets_merged_buffers_by_name():
    opt, model, _ = _train(CONFIGS["plain"], steps=6)
    want = opt.merged_state_dict()
    got = opt.merged_state_dict(model=copy.deepcopy(model))
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_readout_without_a_model_names_the_merged_buffers():
    """With the optimizer's model dropped (DeepSpeed's attach, torchtitan's container), readouts keep the buffers."""
    opt, model, _ = _train(CONFIGS["plain"], steps=6)
    full = opt.merged_state_dict()
    opt.model = None
    bare = opt.merged_state_dict()
    assert set(bare) == {n for n, _ in model.named_parameters()} | set(MERGED)
    assert all(torch.equal(bare[k], full[k]) for k in bare)


def test_final_weights_kept_aside_include_the_merged_buffers():
    """A trainer loading other weights after the run (load_best_model_at_end) leaves the run's merge readable."""
    opt, model, _ = _train(CONFIGS["plain"], steps=6)  # mid-window: readouts use the live buffers
    before = opt.merged_state_dict()
    keep_final_weights(opt)
    other = Net().state_dict()
    model.load_state_dict(other)
    after = opt.merged_state_dict()
    merged = [n for n, _ in model.named_parameters()] + MERGED  # num_batches_tracked is live: the loaded one
    assert all(torch.equal(after[k], before[k]) for k in merged)
    assert torch.equal(model.bn.running_mean, other["bn.running_mean"])  # the loaded weights are back after it
    forget_final_weights(opt)


def test_buffers_replaced_by_a_cast_keep_their_merge():
    """``model.double()`` replaces every buffer tensor (params keep theirs): the merge follows them by name."""
    config = CONFIGS["interval-start-keep"]
    windows = _windows(config)
    torch.manual_seed(0)
    model = Net()
    opt = _optimizer(model, config, "sgd")
    keys = [k for k, v in model.state_dict().items() if v.is_floating_point()]

    def snap():
        return {k: v.detach().to(F64, copy=True) for k, v in model.state_dict().items() if k in keys}

    snaps = [snap()]
    dtype = torch.float32
    for s in range(15):
        if s == 8:  # mid-window (window 6, interval 2, start 3: steps 4..9 are window 0)
            before = model.bn.running_mean
            model.double()
            dtype = torch.float64
            assert model.bn.running_mean is not before
        model(torch.randn(8, 6, dtype=dtype)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        snaps.append(snap())
        _check_against_reference(opt, model, snaps, windows, s + 1)
    assert opt.merged_state_dict()["bn.running_mean"].dtype == torch.float64


def test_skip_mode_leaves_out_a_checkpoint_whose_buffer_is_not_finite():
    spec = Window(window=4)
    bad = 6  # checkpoint 2 of window 1 (steps 5..8)

    def poison(optimizer, args, kwargs):  # after step 6's forward, before its checkpoint
        if optimizer.steps == bad - 1:
            model.router.expert_bias[1] = float("nan")

    torch.manual_seed(0)
    model = Net()
    opt = _optimizer(model, dict(window=4, nonfinite="skip"))
    opt.register_step_pre_hook(poison)
    keys = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    snaps = [{k: v.detach().to(F64, copy=True) for k, v in model.state_dict().items() if k in keys}]
    for s in range(1, 13):
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        snaps.append({k: v.detach().to(F64, copy=True) for k, v in model.state_dict().items() if k in keys})
        if s == bad:  # the user repairs the live buffer before the next forward; the checkpoint stays bad
            with torch.no_grad():
                model.router.expert_bias.nan_to_num_(0.0)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the renormalisation warning
            got = opt.merged_state_dict()
        columns = [[snap[k] for k in keys] for snap in snaps]
        want, _ = readout_skipping(spec, columns, s, bad_steps={bad})
        for key, ref in zip(keys, want):
            assert torch.allclose(got[key].to(F64), ref, atol=2e-6 * max(float(ref.abs().max()), 1.0)), (s, key)
    assert torch.isnan(snaps[bad]["router.expert_bias"]).any()  # the checkpoint was really bad
    assert all(torch.isfinite(v).all() for v in snaps[bad].values() if v is not snaps[bad]["router.expert_bias"])


def test_raise_mode_names_the_buffer_that_made_the_merge_non_finite():
    torch.manual_seed(0)
    model = Net()
    opt = _optimizer(model, dict(window=4))
    for s in range(3):
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if s == 1:
            with torch.no_grad():
                model.bn.running_var[0] = float("inf")
    with pytest.raises(NonFiniteMergeError, match="bn.running_var"):
        opt.merged_state_dict()


# ---------------------------------------------------------------- refusals
def _plain(net, **kwargs):
    return WSMOptimizer(torch.optim.SGD(net.named_parameters(), lr=0.1), window=4, **kwargs)


def test_merge_buffers_needs_a_model_and_a_bool():
    with pytest.raises(ValueError, match=r"merge_buffers=True needs model="):
        _plain(Net(), merge_buffers=True)
    with pytest.raises(TypeError, match=r"merge_buffers must be a bool"):
        model = Net()
        _plain(model, model=model, merge_buffers="yes")


def test_merge_buffers_refuses_capturable():
    model = Net()
    with pytest.raises(ValueError, match="merge_buffers=True cannot be combined with capturable=True"):
        WSMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), window=4, backend="triton", capturable=True,
                     model=model, merge_buffers=True)


@pytest.mark.parametrize("saved_with, loaded_with", [(True, False), (False, True)])
def test_a_state_saved_with_other_merged_buffers_is_refused_and_nothing_changes(saved_with, loaded_with):
    model = Net()
    src = _plain(model, model=model, merge_buffers=saved_with)
    model(torch.randn(8, 6)).sum().backward()
    src.step()
    state = copy.deepcopy(src.state_dict())
    dst_model = Net()
    dst = _plain(dst_model, model=dst_model, merge_buffers=loaded_with)
    before = copy.deepcopy(dst.state_dict())
    with pytest.raises(ValueError, match="merged model buffers differ"):
        dst.load_state_dict(state)
    after = dst.state_dict()
    assert after["wsm"] == before["wsm"] and after["state"].keys() == before["state"].keys()


def test_a_missing_buffer_entry_is_refused_naming_it():
    model = Net()
    opt = _plain(model, model=model, merge_buffers=True)
    model(torch.randn(8, 6)).sum().backward()
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    del state["state"][0]["wsm_acc.default:bn.running_var"]
    with pytest.raises(ValueError, match=r"wsm_acc.default:bn.running_var.*merged buffer 'bn.running_var'"):
        _plain(model, model=model, merge_buffers=True).load_state_dict(state)


def test_a_buffer_removed_or_reshaped_after_wrapping_is_named():
    model = Net()
    opt = _plain(model, model=model, merge_buffers=True)
    model.router.expert_bias = torch.zeros(5)  # a buffer attribute: replaced, new shape
    with pytest.raises(ValueError, match=r"'router.expert_bias' changed shape from \(4,\) to \(5,\)"):
        opt.step()
    model = Net()
    opt = _plain(model, model=model, merge_buffers=True)
    model.bn.running_mean = None
    with pytest.raises(RuntimeError, match="'bn.running_mean' was removed"):
        opt.step()


def test_integer_and_non_persistent_buffers_are_not_merged():
    model = Net()
    opt = _plain(model, model=model, merge_buffers=True)
    model(torch.randn(8, 6)).sum().backward()
    opt.step()
    assert opt.state_dict()["wsm"]["buffers"] == MERGED


# ------------------------------------------------------------ property test
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schedule=st.sampled_from(["linear", "cosine", "1-sqrt", "inv-sqrt"]),
    k=st.integers(1, 4),
    interval=st.integers(1, 3),
    start=st.integers(0, 4),
    steps=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_property_merged_buffers_match_the_float64_reference(schedule, k, interval, start, steps, seed):
    config = dict(schedule=schedule, window=k * interval, interval=interval, start=start)
    windows = {"default": Window(**config)}

    def check(s, opt, model, snaps):
        if s == steps:
            _check_against_reference(opt, model, snaps, windows, s)

    _train(config, steps=steps, seed=seed, each_step=check)


# ------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("extra", [dict(backend="triton"), dict(backend="triton", overlap=True), dict(offload="cpu")],
                         ids=["triton", "triton-overlap", "offload"])
def test_cuda_merged_buffers_equal_inline_foreach_whatever_the_params_backend(extra):
    """On CUDA the params may fold on a side stream or the host; merged buffers still fold inline, before the next
    forward changes them: the readouts equal the foreach run's (params within fp32 rounding, buffers exactly)."""
    config = CONFIGS["interval-start-keep"]

    def run(**options):
        torch.manual_seed(0)
        model = Net().cuda()
        opt = _optimizer(model, config, **options)
        data = torch.randn(17, 8, 6, device="cuda")
        for s in range(17):
            model(data[s]).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return {k: v.cpu() for k, v in opt.merged_state_dict().items()}

    want, got = run(backend="foreach"), run(**extra)
    for key in want:
        if key in MERGED or not want[key].is_floating_point():
            assert torch.equal(got[key], want[key]), key
        else:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)
