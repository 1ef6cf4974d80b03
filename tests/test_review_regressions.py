"""Regressions from a review of the wrapper's torch.optim behaviour and edge sequences."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch

from wsm_optim import NonFiniteMergeError, WSMOptimizer


def _named(*params):
    return [{"params": list(params), "param_names": [f"p{i}" for i in range(len(params))]}]


@pytest.mark.parametrize("backend", ["foreach", "triton"])
def test_param_added_after_a_skipped_checkpoint_reads_its_own_value(backend):
    a = torch.nn.Parameter(torch.ones(3))
    opt = WSMOptimizer(torch.optim.SGD(_named(a), lr=0.1), window=4, nonfinite="skip", backend=backend,
                       keep_last=True)
    for i in range(6):  # window 0 ends at step 4 with a skipped checkpoint; window 1 has one too
        a.grad = torch.ones(3)
        if i in (0, 4):
            with torch.no_grad():
                a[0] = float("nan")
        opt.step()
        if i in (0, 4):
            with torch.no_grad():
                a[0] = 1.0
    b = torch.nn.Parameter(torch.full((2,), 5.0))
    opt.add_param_group({"params": [b], "param_names": ["b"], "lr": 0.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skip warning itself is tested elsewhere
        assert opt.merged_state_dict(torch.float32)["b"].tolist() == [5.0, 5.0]
        assert opt.merged_state_dict(torch.float32, completed=True)["b"].tolist() == [5.0, 5.0]


def test_numpy_int_config_loads_with_weights_only():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = WSMOptimizer(torch.optim.SGD(_named(p), lr=0.1), window=np.int64(4), interval=np.int32(2),
                       start=np.int64(1))
    p.grad = torch.ones(2)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    again = WSMOptimizer(torch.optim.SGD(_named(p), lr=0.1), window=4, interval=2, start=1)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.steps == 1


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_with_an_lr_scheduler_attached_steps_the_copy(how):
    model = torch.nn.Linear(2, 1)
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.5), window=3)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # wraps opt.step on the instance
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    else:
        twin = pickle.loads(pickle.dumps(opt))
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in twin_params]
    for p in twin_params:
        p.grad = torch.ones_like(p)
    twin.step()
    assert (twin.steps, opt.steps) == (1, 0)
    assert all(not torch.equal(p, q) for p, q in zip(twin_params, before))


def test_state_dict_hooks_registered_on_the_wrapper_run():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = WSMOptimizer(torch.optim.SGD(_named(p), lr=0.1), window=2)
    ran = []
    opt.register_state_dict_pre_hook(lambda o: ran.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: (ran.append("sd_post"), sd.setdefault("extra", 1))[0])
    opt.register_load_state_dict_pre_hook(lambda o, sd: ran.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: ran.append("load_post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert ran == ["sd_pre", "sd_post", "load_pre", "load_post"]


def test_skip_mode_error_blames_the_live_params():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = WSMOptimizer(torch.optim.SGD(_named(p), lr=0.1), window=4, nonfinite="skip")
    p.grad = torch.ones(2)
    opt.step()
    with torch.no_grad():
        p[0] = float("inf")
    with pytest.raises(NonFiniteMergeError, match="live params themselves are non-finite") as e:
        opt.merged_state_dict()
    assert "construct with nonfinite='skip'" not in str(e.value)


def test_float64_live_readout_before_start_is_exact():
    p = torch.nn.Parameter(torch.full((2,), 1.0 + 1e-12, dtype=torch.float64))
    opt = WSMOptimizer(torch.optim.SGD(_named(p), lr=0.1), window=2, start=5)
    assert torch.equal(opt.merged_state_dict()["p0"], p.detach())


def test_param_appended_to_param_groups_directly_is_merged():
    a = torch.nn.Parameter(torch.zeros(2))
    opt = WSMOptimizer(torch.optim.SGD(_named(a), lr=0.1), window=2)
    b = torch.nn.Parameter(torch.full((3,), 2.0))
    opt.param_groups[0]["params"].append(b)
    opt.param_groups[0]["param_names"].append("b")
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    merged = opt.merged_state_dict(torch.float32)
    # linear, k = 2: after one step M = 1/3 * anchor + 2/3 * live
    torch.testing.assert_close(merged["b"], torch.full((3,), 2.0 - 2 / 3 * 0.1))


# ------------------------------------------------ second review (after the redesign)
from wsm_optim import LiveParamsChangedWarning  # noqa: E402


@pytest.mark.parametrize("keep_last", [False, True])
def test_skip_mode_completed_readout_at_a_window_end_uses_that_windows_skips(keep_last):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = WSMOptimizer(torch.optim.SGD([("p", p)], lr=1.0), window=4, nonfinite="skip", keep_last=keep_last)
    for s in range(1, 5):  # checkpoints 0, 1, (2 skipped), 3, 4 of a linear window
        p.grad = torch.tensor([float("nan")]) if s == 2 else torch.tensor([-1.0])
        opt.step()
        if s == 2:
            with torch.no_grad():
                p.fill_(2.0)
    with pytest.warns(RuntimeWarning, match="1 checkpoint"):
        assert opt.merged_state_dict()["p"].item() == pytest.approx(2.0)  # mean of 0, 1, 3, 4
    with pytest.warns(RuntimeWarning, match="1 checkpoint"):
        assert opt.merged_state_dict(completed=True)["p"].item() == pytest.approx(2.0)
    if keep_last:
        for _ in range(4):  # a clean second window: 4, 5, 6, 7, 8 -> 6
            p.grad = torch.tensor([-1.0])
            opt.step()
        p.grad = torch.tensor([-1.0])
        opt.step()
        with warnings.catch_warnings():  # the kept window is the clean second one: nothing to renormalise
            warnings.simplefilter("error", RuntimeWarning)
            assert opt.merged_state_dict(completed=True)["p"].item() == pytest.approx(6.0)


def test_a_refused_add_param_group_leaves_the_inner_optimizer_as_it_was():
    p = torch.nn.Parameter(torch.ones(2))
    opt = WSMOptimizer(torch.optim.SGD([("p", p)], lr=0.1), window=2)
    with pytest.raises(TypeError, match="dtype torch.int64 cannot be merged"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.int64)]})
    assert len(opt.inner.param_groups) == 1
    p.grad = torch.ones(2)
    opt.step()
    assert opt.steps == 1


def test_a_refused_param_groups_edit_loses_nothing():
    p, q = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = WSMOptimizer(torch.optim.SGD(_named(p, q), lr=0.1), window=4)
    for _ in range(2):
        p.grad, q.grad = torch.ones(1), torch.ones(1)
        opt.step()
    before = opt.merged_state_dict()
    group = opt.param_groups[0]
    keep = list(group["params"])
    group["params"][0] = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(TypeError, match="cannot be merged"):
        opt.merged_state_dict()
    group["params"][:] = keep
    after = opt.merged_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_readouts_inside_merged_weights_are_refused():
    p = torch.nn.Parameter(torch.ones(2))
    opt = WSMOptimizer(torch.optim.SGD([("p", p)], lr=0.1), window=4)
    p.grad = torch.ones(2)
    opt.step()
    with opt.merged_weights():
        with pytest.raises(RuntimeError, match=r"merged_state_dict\(\) of the current window called inside"):
            opt.merged_state_dict()


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
