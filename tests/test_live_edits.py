"""Live params edited between steps (a checkpoint or "best model" loaded mid-window) are detected;
normal training never trips the check. Also: GradScaler's fused path through the wrapper.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from wsm_optim import LiveParamsChangedWarning, WSMOptimizer


def _setup(window=10, keep_last=True, inner=None, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    inner = inner or (lambda params: torch.optim.AdamW(params, lr=0.05))
    opt = WSMOptimizer(inner(model.named_parameters()), window=window, keep_last=keep_last)
    return model, opt


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture
def no_live_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", LiveParamsChangedWarning)
        yield


def test_loading_older_weights_mid_window_warns_naming_the_param():
    model, opt = _setup()
    for s in range(13):  # window 0 complete at 10, 3 steps into window 1
        _step(model, opt, s)
        if s == 4:
            older = copy.deepcopy(model.state_dict())
    model.load_state_dict(older)  # what load_best_model_at_end does
    with pytest.warns(LiveParamsChangedWarning, match=r"parameter '0.weight' and 3 more changed in place") as rec:
        opt.merged_state_dict()
    assert "completed=True" in str(rec[0].message) and rec[0].filename == __file__
    with pytest.warns(LiveParamsChangedWarning, match="merged_weights"):
        with opt.merged_weights():
            pass
    with warnings.catch_warnings():  # the completed window does not use the live params
        warnings.simplefilter("error", LiveParamsChangedWarning)
        opt.merged_state_dict(completed=True)


def test_an_edit_at_a_window_end_or_before_the_anchor_is_not_mixed_in(no_live_warning):
    model, opt = _setup(window=5)
    for s in range(5):
        _step(model, opt, s)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    opt.merged_state_dict()  # window end: M = A, the live params have weight 0
    late = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=4, start=3)
    _step(model, late, 0)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    late.merged_state_dict()  # before the anchor the merge is the live model itself


def test_no_false_positive_in_normal_training(no_live_warning):
    """GradScaler, clipping, compile, the swap itself, add_param_group, resume."""
    model, opt = _setup(inner=lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    compiled_step = torch.compile(opt.step, backend="eager")
    for s in range(8):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        if s < 4:  # GradScaler (fused path) with clipping
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
        else:  # a compiled step with clipping
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            compiled_step()
        opt.zero_grad()
        opt.merged_state_dict()
        with opt.merged_weights():
            pass
        opt.merged_state_dict()
    assert opt.steps == 8
    extra = nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra], "param_names": ["extra"]})
    opt.merged_state_dict()
    saved = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    _, fresh = _setup(inner=lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True))
    fresh.add_param_group({"params": [nn.Parameter(torch.ones(2))], "param_names": ["extra"]})
    fresh.load_state_dict(saved)  # the optimizer first, then the model (Lightning's order)
    fresh_model = next(iter(fresh.param_groups))["params"]
    with torch.no_grad():
        for p, v in zip(fresh_model, weights.values()):
            p.copy_(v)
    fresh.merged_state_dict()


def test_fused_inner_optimizer_keeps_gradscalers_fast_path():
    """GradScaler hands a fused optimizer its scale and found_inf (no unscale pass, no host sync)."""
    def run(wrap):
        torch.manual_seed(0)
        model = nn.Linear(5, 3)
        inner = torch.optim.AdamW(model.named_parameters(), lr=0.05, fused=True)
        opt = WSMOptimizer(inner, window=4) if wrap else inner
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        for s in range(6):
            g = torch.Generator().manual_seed(s)
            loss = nn.functional.mse_loss(model(torch.randn(8, 5, generator=g)), torch.randn(8, 3, generator=g))
            scaler.scale(loss * (float("inf") if s == 2 else 1.0)).backward()  # an overflow: skipped inside
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return model, opt

    plain_model, _ = run(wrap=False)
    model, opt = run(wrap=True)
    assert opt._step_supports_amp_scaling is True
    assert not hasattr(opt.inner, "grad_scale") and not hasattr(opt.inner, "found_inf")  # GradScaler cleaned up
    for a, b in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)
    assert opt.steps == 6  # the overflow step reached step() and left the params unchanged
    assert not WSMOptimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), window=2)._step_supports_amp_scaling


def test_live_edits_stay_visible_across_regrouping_and_a_swap():
    p = torch.nn.Parameter(torch.ones(2))
    opt = WSMOptimizer(torch.optim.SGD([("p", p)], lr=0.1), window=4)
    p.grad = torch.ones(2)
    opt.step()
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "param_names": ["q"]})
    with torch.no_grad():
        p.fill_(100.0)
    with pytest.warns(LiveParamsChangedWarning, match="'p'"):
        opt.merged_state_dict()
    with pytest.warns(LiveParamsChangedWarning):
        with opt.merged_weights():
            pass
    with pytest.warns(LiveParamsChangedWarning, match="'p'"):  # the swap's own writes did not hide the edit
        opt.merged_state_dict()
