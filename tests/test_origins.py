"""Window origins: shared between merges anchored together, saved as ``wsm_origin.<merge>`` (format 2), validated
on load; format-1 state dicts keep raw sums for the rest of their run (also through DCP)."""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import harness as H
import reference as R
from wsm_optim import WSMOptimizer

HAS_CUDA = torch.cuda.is_available()
_TRITON = importlib.util.find_spec("triton") is not None and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = [
    pytest.param(dict(backend="foreach"), "cpu", id="foreach"),
    pytest.param(dict(backend="foreach", offload="cpu"), DEVICE, id="offload"),
    pytest.param(dict(backend="triton"), DEVICE, id="triton",
                 marks=pytest.mark.skipif(not _TRITON, reason="triton, or CUDA/TRITON_INTERPRET=1")),
]
#: two merges anchored at the same steps (one origin), one that is not
SHARED = {
    "lin": R.Window("linear", 6, 1, 1, keep_last=True),
    "sq": R.Window("1-sqrt", 6, 2, 1, keep_last=True),
    "cos": R.Window("cosine", 4, 1, 0, keep_last=True),
}


def _opt(params, kwargs=None, nonfinite="raise"):
    inner = torch.optim.SGD([(f"p{i}", p) for i, p in enumerate(params)], lr=0.1, momentum=0.9)
    return WSMOptimizer(inner, merges={n: s.as_kwargs() for n, s in SHARED.items()}, nonfinite=nonfinite,
                        **(kwargs or {}))


@pytest.mark.parametrize("kwargs, device", BACKENDS)
def test_merges_sharing_an_origin_match_the_float64_reference(kwargs, device):
    """A shared origin is overwritten at each anchor only after every merge has folded its finished window."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in [(5,), (2, 3)]]
    opt = _opt(params, kwargs)
    state = opt.state_dict()["state"][0]
    assert state["wsm_origin.lin"] is state["wsm_origin.sq"] and state["wsm_origin.cos"] is not state["wsm_origin.lin"]
    assert state["wsm_origin.lin"].dtype == params[0].dtype and opt.state_dict()["wsm"]["version"] == 2
    snaps = [R.snapshot([p.cpu() for p in params])]
    for s in range(1, 20):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        opt.step()
        snaps.append(R.snapshot([p.cpu() for p in params]))
        for name, spec in SHARED.items():
            got = opt.merged_state_dict(merge=name, dtype=torch.float64)
            for i, want in enumerate(R.readout(spec, snaps, s)):
                assert torch.allclose(got[f"p{i}"].cpu(), want, rtol=0, atol=1e-6), (name, s, i)
            done = R.completed_windows(spec, s)
            if done:
                got = opt.merged_state_dict(merge=name, dtype=torch.float64, completed=True)
                for i, want in enumerate(R.window_merge(spec, snaps, done - 1)):
                    assert torch.allclose(got[f"p{i}"].cpu(), want, rtol=0, atol=1e-6), (name, s, i, "completed")


def _trained(nonfinite="raise"):
    gen = torch.Generator().manual_seed(1)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(5,), (2, 3)]]
    opt = _opt(params, nonfinite=nonfinite)
    for _ in range(9):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def _bad(sd, how):
    sd = copy.deepcopy(sd)
    if how == "missing origin":
        del sd["state"][1]["wsm_origin.cos"]
    elif how == "origin shape":
        sd["state"][1]["wsm_origin.lin"] = torch.zeros(4)
    elif how == "origin would round":
        sd["state"][0]["wsm_origin.cos"] = sd["state"][0]["wsm_origin.cos"].double() + 1e-12
    elif how == "origin not a tensor":
        sd["state"][0]["wsm_origin.sq"] = [0.0]
    elif how.startswith("non-finite origin"):
        sd["state"][0]["wsm_origin.cos"][1] = float("inf")
    elif how == "unknown version":
        sd["wsm"]["version"] = 3
        for g in sd["param_groups"]:
            g["wsm"]["version"] = 3
    return sd


@pytest.mark.parametrize("how, needle", [
    ("missing origin", "parameter 1 has no 'wsm_origin.cos' entry, which a version 2 state dict has"),
    ("origin shape", "state[1]['wsm_origin.lin']: accumulator shape mismatch: saved (4,), parameter (2, 3)"),
    ("origin would round", "state[0]['wsm_origin.cos'] has dtype torch.float64, which would round"),
    ("origin not a tensor", "state[0]['wsm_origin.sq'] is a list, expected a tensor"),
    ("non-finite origin (skip)", "state[0]['wsm_origin.cos'] holds 1 NaN/inf value; with nonfinite='skip'"),
    ("unknown version", "unsupported wsm state version 3"),
])
def test_a_bad_origin_is_refused_and_changes_nothing(how, needle):
    nonfinite = "skip" if "skip" in how else "raise"
    _, opt = _trained(nonfinite)
    good = opt.state_dict()
    _, target = _trained(nonfinite)
    for _ in range(2):
        target.step()  # a different state, to see that nothing of it changes
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError) as info:
        target.load_state_dict(_bad(good, how))
    assert needle in str(info.value)
    after = target.state_dict()
    H.assert_state_unchanged(before, after)


def _fixtures():
    fixtures = Path(__file__).resolve().parent / "fixtures"
    spec = importlib.util.spec_from_file_location("make_state_dicts", fixtures / "make_state_dicts.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    return fixtures, make


def test_a_format_1_run_keeps_raw_sums_and_saves_format_1():
    """A v0.2 state dict resumed, then saved and resumed again, still continues as v0.2 computed it; a fresh
    optimizer loading that state takes its format (no origins), and loading a format-2 state brings them back."""
    fixtures, make = _fixtures()
    saved = torch.load(fixtures / "state_v0.2_raise.pt", weights_only=True)
    expected = torch.load(fixtures / "continued_v0.2_raise.pt", weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as when the fixtures were written
    try:
        net = make.model()
        net.load_state_dict(saved["model"])
        opt = make.optimizer(net, "raise")
        opt.load_state_dict(saved["optim"])
        make.train(net, opt, make.SAVE_AT, 13)
        again = copy.deepcopy(opt.state_dict())
        assert again["wsm"]["version"] == 1 and not any(k.startswith("wsm_origin") for k in again["state"][0])
        net2 = make.model()
        net2.load_state_dict(net.state_dict())
        opt2 = make.optimizer(net2, "raise")
        opt2.load_state_dict(again)
        make.train(net2, opt2, 13, make.TOTAL)
        got = make.readouts(opt2)
    finally:
        torch.set_num_threads(threads)
    for merge, want in expected["readouts"].items():
        for key, value in want.items():
            assert torch.equal(got[merge][key], value), (merge, key)
    fresh = make.optimizer(make.model(), "raise").state_dict()
    opt2.load_state_dict(fresh)
    assert opt2.state_dict()["wsm"]["version"] == 2 and "wsm_origin.lin" in opt2.state_dict()["state"][0]


def test_a_format_1_dcp_checkpoint_loads_with_partial_load_and_continues_bit_exactly(tmp_path):
    """A fresh optimizer's DCP template has ``wsm_origin.*`` entries that a format-1 checkpoint lacks."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    fixtures, make = _fixtures()
    saved = torch.load(fixtures / "state_v0.2_skip.pt", weights_only=True)
    expected = torch.load(fixtures / "continued_v0.2_skip.pt", weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP's single-process warnings
            net = make.model()
            net.load_state_dict(saved["model"])
            opt = make.optimizer(net, "skip")
            opt.load_state_dict(saved["optim"])
            path = tmp_path / "v1"
            dcp.save({"optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=str(path))
            net2 = make.model()
            net2.load_state_dict(saved["model"])
            opt2 = make.optimizer(net2, "skip")
            template = {"optim": get_optimizer_state_dict(net2, opt2)}
            dcp.load(template, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
            set_optimizer_state_dict(net2, opt2, template["optim"])
        make.train(net2, opt2, make.SAVE_AT, make.TOTAL)
        got = make.readouts(opt2)
    finally:
        torch.set_num_threads(threads)
    assert opt2.state_dict()["wsm"]["version"] == 1
    for merge, want in expected["readouts"].items():
        for key, value in want.items():
            assert torch.equal(got[merge][key], value), (merge, key)
