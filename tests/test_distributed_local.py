"""Single-process checks of the DCP glue (no process group needed): fast, run everywhere."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("torch.distributed.checkpoint.state_dict")
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from wsm_optim import WSMOptimizer  # noqa: E402

MERGES = {"a": dict(schedule="linear", window=4, interval=2, keep_last=True), "b": dict(schedule="ema", window=3)}


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), merges=MERGES)
    return model, opt


def train(model, opt, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_dcp_init_step_is_not_a_wsm_step():
    # DCP's _init_optim_state calls opt.step() (zero grads, lr=0) on an optimizer
    # without state; it must create the inner state and nothing else.
    model, opt = make()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    sd = get_optimizer_state_dict(model, opt)
    assert opt.steps == 0
    assert not any(opt.merge_status(n)["anchored"] for n in MERGES)
    assert len(opt.inner.state) == 4  # momentum buffers exist
    assert sd["param_groups"][0]["wsm"]["steps"] == 0
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k])
    # A real step right after still anchors and counts.
    train(model, opt, range(1))
    assert opt.steps == 1 and opt.merge_status("a")["anchored"]


@pytest.mark.parametrize("full_state_dict", [False, True])
def test_dcp_round_trip_mid_window_continues_exactly(full_state_dict):
    options = StateDictOptions(full_state_dict=full_state_dict)
    model, opt = make()
    train(model, opt, range(5))  # "a": t=1, r=1 of its 2nd window; "b": t=2 of its 2nd window
    # deepcopy: like opt.state_dict(), the result references the live buffers.
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))
    assert "weight" not in saved["state"] and "0.weight" in saved["state"]  # name-keyed by DCP
    model_sd = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, opt, range(5, 11))
    want = {n: opt.merged_state_dict(torch.float32, merge=n) for n in MERGES}
    want_last = opt.merged_state_dict(torch.float32, merge="a", completed=True)

    model2, opt2 = make(seed=1)  # different init: everything must come from the checkpoint
    model2.load_state_dict(model_sd)
    set_optimizer_state_dict(model2, opt2, saved, options=options)
    assert opt2.steps == 5
    train(model2, opt2, range(5, 11))
    for n in MERGES:
        got = opt2.merged_state_dict(torch.float32, merge=n)
        for k in want[n]:
            assert torch.equal(got[k], want[n][k]), (n, k)
    got_last = opt2.merged_state_dict(torch.float32, merge="a", completed=True)
    for k in want_last:
        assert torch.equal(got_last[k], want_last[k]), k


def test_flattened_dcp_state_dict_is_refused_clearly():
    model, opt = make()
    train(model, opt, range(2))
    flat = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    model2, opt2 = make()
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict"):
        set_optimizer_state_dict(model2, opt2, flat, options=StateDictOptions(flatten_optimizer_state_dict=True))


def test_state_dict_carries_wsm_in_param_groups_and_loads_without_top_level():
    model, opt = make()
    train(model, opt, range(3))
    sd = opt.state_dict()
    assert sd["wsm"] == sd["param_groups"][0]["wsm"]
    without_top = {k: v for k, v in sd.items() if k != "wsm"}
    model2, opt2 = make()
    opt2.load_state_dict(without_top)
    assert opt2.steps == 3
    assert all("wsm" not in g for g in opt2.inner.param_groups)  # not leaked into the inner optimizer


@pytest.mark.parametrize("kwargs", [dict(rank0_only=True), dict(cpu_offload=True)])
def test_gather_options_need_full(kwargs):
    model, opt = make()
    with pytest.raises(ValueError, match="full=True"):
        opt.merged_state_dict(merge="a", **kwargs)


def test_full_readout_of_plain_params_equals_default_readout():
    model, opt = make()
    train(model, opt, range(3))
    plain = opt.merged_state_dict(merge="b", model=model)
    full = opt.merged_state_dict(merge="b", model=model, full=True, rank0_only=True, cpu_offload=True)
    assert full.keys() == plain.keys()
    for k in plain:
        assert torch.equal(full[k], plain[k]), k
