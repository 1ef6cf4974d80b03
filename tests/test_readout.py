"""Readouts: what ``merged_state_dict`` / ``merged_weights`` return, and when they refuse.

The numbers of every readout at every step are checked against the float64
reference by the property tests (``test_optimizer.py``) and the backend
conformance matrix (``test_conformance.py``); here: the exact live readout
before ``start``, the completed window's readout in skip mode, and readouts
refused inside ``merged_weights()``.
"""

import warnings

import pytest
import torch

import harness as H
from wsm_optim import WSMOptimizer


def test_float64_live_readout_before_start_is_exact():
    p = torch.nn.Parameter(torch.full((2,), 1.0 + 1e-12, dtype=torch.float64))
    opt = WSMOptimizer(torch.optim.SGD(H.named_groups(p), lr=0.1), window=2, start=5)
    assert torch.equal(opt.merged_state_dict()["p0"], p.detach())


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


def test_readouts_inside_merged_weights_are_refused():
    p = torch.nn.Parameter(torch.ones(2))
    opt = WSMOptimizer(torch.optim.SGD([("p", p)], lr=0.1), window=4)
    p.grad = torch.ones(2)
    opt.step()
    with opt.merged_weights():
        with pytest.raises(RuntimeError, match=r"merged_state_dict\(\) of the current window called inside"):
            opt.merged_state_dict()
