"""``load_state_dict`` refuses values no WSMOptimizer could have saved, naming the key, and changes nothing.

Each of these loaded before and gave wrong readouts later: a kept completed
window that never completed read as zeros; a NaN accumulator was blamed on
finite checkpoints; a complex accumulator of a real param lost its imaginary part.
NaN/inf are refused with ``nonfinite="skip"``, where no non-finite checkpoint
reaches a merge's buffers; with ``nonfinite="raise"`` a window poisoned by a
non-finite checkpoint is a state training produces, and it loads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import harness as H
from wsm_optim import WSMOptimizer


def _run(steps: int = 2, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), schedule="linear", window=4, keep_last=True, **kw)
    for _ in range(steps):
        model(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _counters(sd: dict) -> list[dict]:
    found = [sd["wsm"]["merges"]["default"]["counters"]]
    found += [g["wsm"]["merges"]["default"]["counters"] for g in sd["param_groups"] if "wsm" in g]
    return found


def _refused(sd: dict, match: str, **kw) -> None:
    model, opt = _run(steps=6, **kw)  # mid-window of its second window, with a kept completed one
    before = (copy.deepcopy(opt.state_dict()), {n: p.detach().clone() for n, p in model.named_parameters()})
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    H.assert_state_unchanged(before[0], opt.state_dict())


@pytest.mark.parametrize("value, match", [
    (True, r"counters say a completed window is kept \(has_last = True\) but no window has completed \(windows_completed = 0\)"),
    ("False", r"counter has_last = 'False' must be a bool"),
    (1, r"counter has_last = 1 must be a bool"),
])
def test_has_last_must_be_a_bool_and_agree_with_the_counters(value, match):
    _, opt = _run(steps=2)  # first window, nothing completed yet
    sd = opt.state_dict()
    for counters in _counters(sd):
        counters["has_last"] = value
    _refused(sd, r"load_state_dict: merge 'default': " + match)


def test_anchored_must_be_a_bool():
    _, opt = _run(steps=2)
    sd = opt.state_dict()
    for counters in _counters(sd):
        counters["anchored"] = "True"
    _refused(sd, r"counter anchored = 'True' must be a bool")


@pytest.mark.parametrize("key", ["wsm_acc.default", "wsm_last.default"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_accumulators_are_refused_in_skip_mode_naming_the_key(key, bad):
    _, opt = _run(steps=6, nonfinite="skip")
    sd = opt.state_dict()
    sd["state"][0][key] = sd["state"][0][key].clone()
    sd["state"][0][key].view(-1)[1] = bad
    _refused(sd, rf"state\[0\]\['{key}'\] holds 1 NaN/inf value; with nonfinite='skip'", nonfinite="skip")


def test_a_window_poisoned_in_raise_mode_still_loads():
    _, opt = _run(steps=6)
    sd = opt.state_dict()
    sd["state"][0]["wsm_acc.default"] = sd["state"][0]["wsm_acc.default"].clone()
    sd["state"][0]["wsm_acc.default"].view(-1)[1] = float("nan")
    _, other = _run(steps=1)
    other.load_state_dict(sd)
    assert torch.isnan(other.state_dict()["state"][0]["wsm_acc.default"]).any()


def test_a_non_finite_merged_buffer_anchor_is_refused():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = WSMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), window=4, model=model, merge_buffers=True,
                       nonfinite="skip")
    for _ in range(2):
        model(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()
    (key,) = [k for k in sd["state"][0] if k.startswith("wsm_anchor:") and k.endswith("running_mean")]
    sd["state"][0][key] = torch.full_like(sd["state"][0][key], float("nan"))
    fresh = WSMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), window=4, model=model, merge_buffers=True,
                         nonfinite="skip")
    with pytest.raises(ValueError, match=rf"\['{key}'\] holds 4 NaN/inf values"):
        fresh.load_state_dict(sd)


def test_a_complex_accumulator_of_a_real_param_is_refused():
    _, opt = _run(steps=6)
    sd = opt.state_dict()
    sd["state"][0]["wsm_acc.default"] = sd["state"][0]["wsm_acc.default"].to(torch.complex64) * (1 + 1j)
    _refused(sd, r"state\[0\]\['wsm_acc.default'\] is complex \(torch.complex64\) but the parameter is real")


def test_valid_state_dicts_still_load_and_continue():
    model, opt = _run(steps=6)
    sd = copy.deepcopy(opt.state_dict())
    other_model, other = _run(steps=1)
    other_model.load_state_dict(model.state_dict())
    other.load_state_dict(sd)
    for a, b in zip(opt.merged_state_dict(completed=True).values(), other.merged_state_dict(completed=True).values()):
        assert torch.equal(a, b)
