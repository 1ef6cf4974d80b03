"""Every bad input to WSMOptimizer fails at once with a message naming the argument and what is allowed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsm_optim import WSMOptimizer


def _inner():
    return torch.optim.SGD(nn.Linear(2, 2).named_parameters(), lr=0.1)


@pytest.mark.parametrize(
    "kwargs,exc,needles",
    [
        (dict(window=10, interval=3), ValueError, ["window must be a positive multiple of interval", "window=10", "interval=3"]),
        (dict(window=0), ValueError, ["window must be >= 1", "got 0"]),
        (dict(window=-4), ValueError, ["window must be >= 1", "got -4"]),
        (dict(window=4, interval=0), ValueError, ["interval must be >= 1", "got 0"]),
        (dict(window=4, start=-1), ValueError, ["start must be >= 0", "got -1"]),
        (dict(window=4.0), TypeError, ["window must be an int", "float"]),
        (dict(window=True), TypeError, ["window must be an int", "bool"]),
        (dict(), TypeError, ["window is required"]),
        (dict(window=4, backend="cuda"), ValueError, ["backend must be one of", "'auto'", "'foreach'", "'cuda'"]),
        (dict(window=4, schedule="cosin"), ValueError, ["unknown name 'cosin'", "'linear'", "'1-sqrt'", "'ema'"]),
        (dict(window=4, schedule=[0.5, 0.4]), ValueError, ["length 2, expected k = 4"]),
        (dict(window=3, schedule=[0.5, 0.6, 0.1]), ValueError, ["w_2 = 0.6", "non-increasing"]),
        (dict(window=4, model="net"), TypeError, ["model must be a torch.nn.Module", "str"]),
        (dict(window=4, merges={"a": dict(window=4)}), TypeError, ["either merges=", "not both"]),
        (dict(merges={}), ValueError, ["merges must be a non-empty dict"]),
        (dict(merges={"a": dict(window=4, decay="linear")}), TypeError, ["merges['a']: unknown keys ['decay']", "allowed"]),
        (dict(merges={"a": dict(schedule="linear")}), TypeError, ["merges['a']: 'window' is required"]),
        (dict(merges={"a": dict(window=6, interval=4)}), ValueError, ["positive multiple of interval", "merge 'a'"]),
        (dict(merges={"a": dict(window=0)}), ValueError, ["merges['a'].window must be >= 1"]),
        (dict(merges={"": dict(window=2)}), ValueError, ["names must be non-empty strings"]),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, needles):
    with pytest.raises(exc) as info:
        WSMOptimizer(_inner(), **kwargs)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


@pytest.mark.parametrize("inner", [None, nn.Linear(2, 2), [torch.zeros(2)], "sgd"])
def test_inner_must_be_an_optimizer(inner):
    with pytest.raises(TypeError, match=r"inner must be a torch\.optim\.Optimizer, got"):
        WSMOptimizer(inner, window=4)


def test_wrapping_a_wsm_optimizer_is_refused():
    opt = WSMOptimizer(_inner(), window=4)
    with pytest.raises(TypeError, match="already a WSMOptimizer; use merges="):
        WSMOptimizer(opt, window=4)


def test_readout_errors_name_the_merges():
    opt = WSMOptimizer(_inner(), merges={"short": dict(window=2), "long": dict(window=8, keep_last=True)})
    assert opt.merges == ("short", "long")
    with pytest.raises(ValueError, match=r"several merges are tracked, name one of \['short', 'long'\]"):
        opt.merged_state_dict()
    with pytest.raises(ValueError, match=r"unknown name 'medium'; tracked merges are \['short', 'long'\]"):
        opt.merged_state_dict(merge="medium")
    with pytest.raises(RuntimeError, match="'long': no window has completed yet"):
        opt.merged_state_dict(merge="long", completed=True)
    with pytest.raises(ValueError, match="several merges"):
        with opt.merged_weights():
            pass
