"""A step is all or nothing; precision, concurrency and load validation hold in every mode.

Covered here: a step that fails half-way changes nothing, float64 precision
with ``nonfinite="skip"``, concurrent ``merged_weights()``, corrupt skip
counters refused at load, an overflowing cast reported as such (not as a
non-finite checkpoint).
"""

import copy
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from wsm_optim import NonFiniteMergeError, WSMOptimizer, schedules


# ---------------------------------------------------------------- one step, all or nothing
def _bad_at_three(k):
    """A decay valid where the weights are sampled, but w_3 = 2 (outside [0, 1]): c_2 cannot be computed."""
    def f(t):
        return 2.0 if abs(t * (k + 1) - 3) < 1e-6 else 1.0 - t
    return f


def test_a_weight_that_cannot_be_computed_raises_before_the_step_moves_anything():
    k = schedules.TABLE_LIMIT + 7  # past the limit: the callable is sampled, later points checked on use
    p = nn.Parameter(torch.arange(3.0))
    opt = WSMOptimizer(torch.optim.SGD([("p", p)], lr=0.1), schedule=_bad_at_three(k), window=k)
    p.grad = torch.ones(3)
    opt.step()  # anchor with c_0, fold c_1: fine; the next step needs c_2 = w_2 - w_3
    before = (p.detach().clone(), opt.steps, opt.merge_status(), copy.deepcopy(opt.state_dict()))
    for _ in range(3):  # a caller that catches the error and trains on
        p.grad = torch.ones(3)
        with pytest.raises(ValueError, match="w_3 = 2.0 is outside"):
            opt.step()
    assert torch.equal(p.detach(), before[0])  # the inner step did not run
    assert opt.steps == before[1] == 1
    status = opt.merge_status()
    assert (status["checkpoint"], status["steps_since_checkpoint"]) == (before[2]["checkpoint"], before[2]["steps_since_checkpoint"])
    np.testing.assert_array_equal(status["weights"], before[2]["weights"])
    assert status["weights"].sum() == pytest.approx(1.0, abs=1e-12)
    acc = opt.state_dict()["state"][0]["wsm_acc.default"]
    assert torch.equal(acc, before[3]["state"][0]["wsm_acc.default"])


# ---------------------------------------------------------------- precision of float64 merges
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_float64_merges_keep_float64_precision_in_every_mode(nonfinite, dtype):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64, dtype=dtype))
    window = 7
    opt = WSMOptimizer(torch.optim.SGD([("p", p)], lr=0.0123), schedule="cosine", window=window, nonfinite=nonfinite)
    checkpoints = [p.detach().clone()]
    for _ in range(window):
        p.grad = torch.randn_like(p)
        opt.step()
        checkpoints.append(p.detach().clone())
    c = schedules.merge_coefficients("cosine", window)
    expected = sum(float(cj) * x for cj, x in zip(c, checkpoints))  # float64 / complex128 arithmetic
    got = opt.merged_state_dict()["p"]
    assert got.dtype == dtype
    rel = float((got - expected).abs().max() / expected.abs().max())
    assert rel < 1e-13, rel  # a float32 coefficient and ledger give ~1e-8 here


def test_float64_skip_mode_renormalises_in_float64():
    c = schedules.merge_coefficients("linear", 4)
    torch.manual_seed(1)
    q = nn.Parameter(torch.randn(16, dtype=torch.float64))
    opt = WSMOptimizer(torch.optim.SGD([("q", q)], lr=0.05), window=4, nonfinite="skip")
    kept, weights = [q.detach().clone()], [float(c[0])]
    grads = [torch.randn(16, dtype=torch.float64) for _ in range(4)]
    for j, g in enumerate(grads, start=1):
        if j == 2:
            q.grad = torch.full_like(q, float("nan"))  # SGD makes the params NaN: checkpoint 2 is skipped
            opt.step()
            with torch.no_grad():
                q.copy_(kept[-1])  # recover, as a user restoring the last good params would
            continue
        q.grad = g
        opt.step()
        kept.append(q.detach().clone())
        weights.append(float(c[j]))
    expected = sum(w * x for w, x in zip(weights, kept)) / sum(weights)
    with pytest.warns(RuntimeWarning, match="1 checkpoint"):
        got = opt.merged_state_dict()["q"]
    rel = float((got - expected).abs().max() / expected.abs().max())
    assert rel < 1e-13, rel


# ---------------------------------------------------------------- one swap at a time
def _trained():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = WSMOptimizer(torch.optim.AdamW(model.named_parameters(), lr=0.1), window=8)
    for _ in range(5):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_a_second_swap_from_another_thread_is_refused_at_once():
    model, opt = _trained()
    live = copy.deepcopy(model.state_dict())
    inside, release, errors = threading.Event(), threading.Event(), []

    def hold():
        with opt.merged_weights():
            inside.set()
            release.wait(10)

    def second():
        try:
            with opt.merged_weights():
                pass
        except RuntimeError as e:
            errors.append(str(e))

    a = threading.Thread(target=hold)
    a.start()
    assert inside.wait(10)
    b = threading.Thread(target=second)
    b.start()
    b.join(10)
    release.set()
    a.join(10)
    assert len(errors) == 1 and "already active" in errors[0] and "another" in errors[0]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in live.items())


def test_racing_swaps_always_leave_the_live_weights():
    model, opt = _trained()
    live = copy.deepcopy(model.state_dict())
    for _ in range(5):
        start = threading.Barrier(2)

        def swap():
            start.wait()
            try:
                with opt.merged_weights():
                    pass
            except RuntimeError:
                pass

        threads = [threading.Thread(target=swap) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in live.items())
    with opt.merged_weights():  # the lock was released
        pass


def test_nested_swap_is_refused_and_the_outer_one_restores():
    model, opt = _trained()
    live = copy.deepcopy(model.state_dict())
    with opt.merged_weights():
        with pytest.raises(RuntimeError, match="already active"):
            with opt.merged_weights():
                pass
    assert all(torch.equal(model.state_dict()[k], v) for k, v in live.items())


# ---------------------------------------------------------------- skip counters are range-checked
def _skip_state():
    p = nn.Parameter(torch.ones(3))
    opt = WSMOptimizer(torch.optim.SGD([("p", p)], lr=0.1), window=4, nonfinite="skip", keep_last=True)
    for _ in range(6):
        p.grad = torch.ones(3)
        opt.step()
    return p, opt


@pytest.mark.parametrize("key", ["skipped", "last_skipped"])
@pytest.mark.parametrize("pair", [[-0.5, 1], [0.2, -1], [1.5, 1], [0.1, 0.5], [0.1, 0], [0.1, 6]])
def test_corrupt_skip_counters_are_refused_and_change_nothing(key, pair):
    p, opt = _skip_state()
    sd = copy.deepcopy(opt.state_dict())
    before = opt.merged_state_dict(completed=True)["p"]
    for where in [sd["wsm"]] + [g["wsm"] for g in sd["param_groups"]]:
        where["merges"]["default"]["counters"][key] = pair
    with pytest.raises(ValueError, match=f"counters\\['{key}'\\]"):
        opt.load_state_dict(sd)
    assert torch.equal(opt.merged_state_dict(completed=True)["p"], before)


def test_valid_skip_counters_load():
    p, opt = _skip_state()
    sd = copy.deepcopy(opt.state_dict())
    for where in [sd["wsm"]] + [g["wsm"] for g in sd["param_groups"]]:
        where["merges"]["default"]["counters"]["skipped"] = [0.25, 1]
    opt.load_state_dict(sd)


# ---------------------------------------------------------------- what an overflowing cast says
def test_a_finite_merge_that_overflows_its_cast_says_so():
    p = nn.Parameter(torch.full((4,), 1.0e5))
    opt = WSMOptimizer(torch.optim.SGD([("big.weight", p)], lr=0.1), window=2)
    p.grad = torch.ones(4)
    opt.step()
    with pytest.raises(NonFiniteMergeError) as info:
        opt.merged_state_dict(dtype=torch.float16)
    message = str(info.value)
    assert "overflows when cast to torch.float16" in message and "'big.weight'" in message
    assert "nonfinite='skip'" not in message
    assert torch.isfinite(opt.merged_state_dict()["big.weight"]).all()


# ---------------------------------------------------------------- a merge that never stepped
def test_readouts_warn_when_another_optimizer_trained_the_params():
    """The HF Trainer + DeepSpeed case without wrap_trainer: the WSMOptimizer is built but never stepped."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    wsm = WSMOptimizer(torch.optim.AdamW(model.named_parameters(), lr=0.1), window=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wsm.merged_state_dict()  # untouched: nothing to say
    other = torch.optim.SGD(model.parameters(), lr=0.5)  # what DeepSpeed would step instead
    model(torch.randn(4, 3)).sum().backward()
    other.step()
    with pytest.warns(RuntimeWarning, match="counted no step\\(\\).*wrap_trainer"):
        wsm.merged_state_dict()
    wsm.step()  # once it steps itself, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wsm.merged_state_dict()


def test_a_cast_or_move_of_the_model_after_wrapping_is_not_taken_for_training():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    wsm = WSMOptimizer(torch.optim.AdamW(model.named_parameters(), lr=0.1), window=4)
    model.to(torch.bfloat16)  # e.g. a precision plugin after the optimizer was built
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wsm.merged_state_dict()
