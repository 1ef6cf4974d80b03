"""``evaluate_merges`` (choose a merge) and ``unwrap`` (find the WSMOptimizer in wrappers)."""

import copy

import pytest
import torch
from torch import nn

from wsm_optim import WSMOptimizer
from wsm_optim.selection import evaluate_merges
from wsm_optim import unwrap

MERGES = {"lin4": dict(window=4), "sqrt6": dict(schedule="1-sqrt", window=6, keep_last=True), "lin2": dict(window=2)}


def _trained(steps=9, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = WSMOptimizer(torch.optim.AdamW(model.named_parameters(), lr=0.05), merges=MERGES)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    for _ in range(steps):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt, (x, y)


def _loss(model, data):
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(data[0]), data[1]))


@pytest.mark.parametrize("completed", [False, True])
def test_scores_equal_separate_evaluation_and_live_restored_bitwise(completed):
    model, opt, data = _trained(steps=12)  # 12 = a window end for all three merges
    live = {k: v.clone() for k, v in model.state_dict().items()}
    result = evaluate_merges(opt, lambda: _loss(model, data), completed=completed, include_live=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    assert list(result.scores) == list(MERGES)
    for name in MERGES:
        other = copy.deepcopy(model)
        other.load_state_dict(opt.merged_state_dict(merge=name, completed=completed, model=model))
        assert result.scores[name] == _loss(other, data), name
    assert result.live == _loss(model, data)
    assert result.best == min(result.scores, key=result.scores.get)
    assert result.best_score == min(result.scores.values())


def test_mode_max_and_subset():
    model, opt, data = _trained()
    res = evaluate_merges(opt, lambda: -_loss(model, data), merges=["lin2", "lin4"], mode="max")
    assert list(res.scores) == ["lin2", "lin4"] and res.live is None
    assert res.best == max(res.scores, key=res.scores.get)


def test_restores_live_weights_when_evaluate_raises():
    model, opt, data = _trained()
    live = [p.detach().clone() for p in model.parameters()]

    def boom():
        raise RuntimeError("eval failed")

    with pytest.raises(RuntimeError, match="eval failed"):
        evaluate_merges(opt, boom)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), live))
    opt.step()  # not stuck in the swapped state


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mode="best"), ValueError, "mode must be 'min' or 'max'"),
        (dict(merges=["nope"]), ValueError, "unknown names"),
        (dict(merges=[]), ValueError, "at least one"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model, opt, data = _trained(steps=2)
    with pytest.raises(error, match=match):
        evaluate_merges(opt, lambda: _loss(model, data), **kwargs)


def test_evaluate_must_return_a_number():
    model, opt, _ = _trained(steps=2)
    with pytest.raises(TypeError, match="must return a number"):
        evaluate_merges(opt, lambda: "low")
    with pytest.raises(ValueError, match="NaN"):
        evaluate_merges(opt, lambda: float("nan"))


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_unwrap_framework_wrappers(accelerator):
    from accelerate.optimizer import AcceleratedOptimizer
    from lightning.pytorch.core.optimizer import LightningOptimizer

    _, opt, _ = _trained(steps=1)
    assert unwrap(opt) is opt
    assert unwrap(LightningOptimizer(opt)) is opt
    accelerated = AcceleratedOptimizer(opt, device_placement=False)
    assert unwrap(accelerated) is opt
    assert unwrap(LightningOptimizer(accelerated)) is opt
    with pytest.raises(TypeError, match="no WSMOptimizer inside LightningSGD -> SGD"):
        unwrap(LightningOptimizer(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)))


def test_evaluate_merges_through_a_wrapper(accelerator):
    from accelerate.optimizer import AcceleratedOptimizer

    model, opt, data = _trained()
    direct = evaluate_merges(opt, lambda: _loss(model, data))
    wrapped = evaluate_merges(AcceleratedOptimizer(opt, device_placement=False), lambda: _loss(model, data))
    assert wrapped == direct


def _distance_to(model, target):
    """A real score: how far the model's weights are from ``target`` (0 at the target)."""
    with torch.no_grad():
        return float(sum((p - target[n]).abs().sum() for n, p in model.named_parameters()))


@pytest.mark.parametrize("mode", ["min", "max"])
def test_says_when_the_live_weights_beat_every_merge(mode):
    model, opt, _ = _trained()
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    sign = 1.0 if mode == "min" else -1.0
    res = evaluate_merges(opt, lambda: sign * _distance_to(model, live), include_live=True, mode=mode)
    assert res.live == 0.0 and all(abs(s) > 0 for s in res.scores.values())
    assert res.live_wins is True and res.mode == mode
    text = str(res)
    assert text == res.summary()
    assert f"best merge {res.best!r}: {res.best_score:.6g}" in text
    assert f"the live weights scored better: {res.live:.6g}" in text and "no tracked merge beats" in text


def test_says_when_a_merge_beats_the_live_weights_and_when_live_was_not_scored():
    model, opt, _ = _trained()
    target = opt.merged_state_dict(merge="lin4", model=model)
    res = evaluate_merges(opt, lambda: _distance_to(model, target), include_live=True)
    assert res.best == "lin4" and res.best_score == 0.0 and res.live > 0
    assert res.live_wins is False
    assert str(res) == f"best merge 'lin4': 0; live weights: {res.live:.6g}"
    unscored = evaluate_merges(opt, lambda: _distance_to(model, target))
    assert unscored.live is None and unscored.live_wins is None
    assert "live weights not scored; include_live=True compares them" in str(unscored)
