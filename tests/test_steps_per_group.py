"""An engine that steps the optimizer one param group at a time (``param_groups`` cut to that group, as
DeepSpeed ZeRO-1/2 does) counts one merge step per round once it declared so through ``_bind_engine``;
without the declaration the cut is refused. Checked against the float64 explicit merge of snapshots taken
after every round, also when a round is skipped (an fp16 overflow) and across a resume.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reference as R
from wsm_optim import WSMOptimizer


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _groups(model: nn.Module, n_groups: int) -> list[dict]:
    named = list(model.named_parameters())
    cut = [named[i::n_groups] for i in range(n_groups)]
    return [{"params": [p for _, p in part], "param_names": [n for n, _ in part], "lr": 0.03 * (i + 1)}
            for i, part in enumerate(cut)]


def _engine_step(opt: WSMOptimizer, skip: bool = False) -> None:
    """What ZeRO's step does with its client optimizer: each group stepped alone, param_groups restored."""
    if skip:  # a loss-scale overflow: the optimizer is not reached
        return
    whole = opt.param_groups
    for group in list(whole):
        opt.param_groups = [group]
        opt.step()
        opt.param_groups = whole


def _grads(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for _, p in model.named_parameters()]


def test_a_cut_param_groups_is_refused_without_the_declaration():
    model = _model(0)
    opt = WSMOptimizer(torch.optim.SGD(_groups(model, 2)), window=4)
    with pytest.raises(RuntimeError, match=r"param_groups was cut to 1 of its 2 groups"):
        opt.param_groups = [opt.param_groups[0]]


@settings(max_examples=12, deadline=None)
@given(n_groups=st.integers(2, 4), window=st.sampled_from([2, 4, 6]), interval=st.sampled_from([1, 2]),
       schedule=st.sampled_from(["linear", "cosine", "1-sqrt"]), steps=st.integers(1, 14),
       skipped=st.sets(st.integers(0, 13), max_size=3), seed=st.integers(0, 5))
def test_one_merge_step_per_round_equals_the_explicit_merge(n_groups, window, interval, schedule, steps,
                                                           skipped, seed):
    if window % interval:
        return
    model = _model(seed)
    opt = WSMOptimizer(torch.optim.AdamW(_groups(model, n_groups), weight_decay=0.1), schedule=schedule,
                       window=window, interval=interval, keep_last=True)
    opt._bind_engine(steps_per_group=True)
    spec = R.Window(schedule=schedule, window=window, interval=interval, keep_last=True)
    snaps = [R.snapshot(_params(model))]
    names = [n for n, _ in model.named_parameters()]
    for step in range(steps):
        _grads(model, step)
        _engine_step(opt, skip=step in skipped)
        if step not in skipped:
            snaps.append(R.snapshot(_params(model)))
    counted = len(snaps) - 1
    assert opt.steps == counted
    got = opt.merged_state_dict()
    expected = R.readout(spec, snaps, counted)
    for name, exp, live in zip(names, expected, _params(model)):
        scale = (exp - live.double()).abs().max() + exp.abs().max() * 1e-6
        assert (got[name].double() - exp).abs().max() <= 1e-5 * scale + 1e-7, name
    if R.completed_windows(spec, counted):
        done = opt.merged_state_dict(completed=True)
        for name, exp in zip(names, R.window_merge(spec, snaps, R.completed_windows(spec, counted) - 1)):
            assert (done[name].double() - exp).abs().max() <= 1e-6 * (exp.abs().max() + 1), name


def test_a_resume_continues_bit_exactly():
    def run(stop_at: int | None):
        model = _model(1)
        opt = WSMOptimizer(torch.optim.AdamW(_groups(model, 3)), window=6, keep_last=True)
        opt._bind_engine(steps_per_group=True)
        for step in range(10):
            if step == stop_at:
                saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                         "opt": copy.deepcopy(opt.state_dict())}
                model = _model(7)
                opt = WSMOptimizer(torch.optim.AdamW(_groups(model, 3)), window=6, keep_last=True)
                opt._bind_engine(steps_per_group=True)
                model.load_state_dict(saved["model"])
                opt.load_state_dict(saved["opt"])
            _grads(model, step)
            _engine_step(opt)
        return opt.steps, opt.merged_state_dict(), opt.merged_state_dict(completed=True)

    steps, merged, completed = run(None)
    steps_r, merged_r, completed_r = run(4)
    assert steps == steps_r == 10
    for name in merged:
        assert torch.equal(merged[name], merged_r[name]) and torch.equal(completed[name], completed_r[name]), name


def test_a_round_counts_once_every_group_was_stepped():
    model = _model(2)
    opt = WSMOptimizer(torch.optim.SGD(_groups(model, 3)), window=4)
    opt._bind_engine(steps_per_group=True)
    whole = opt.param_groups
    _grads(model, 0)
    for i, group in enumerate(whole):
        opt.param_groups = [group]
        opt.step()
        opt.param_groups = whole
        assert opt.steps == (1 if i == len(whole) - 1 else 0)
    _grads(model, 1)
    opt.step()  # the engine steps every group at once: one merge step, as for a plain optimizer
    assert opt.steps == 2
