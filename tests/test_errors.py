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


# ==========================================================================================
# Misuse outside the optimizer core: schedules.weights, offline merge, atomic_save.
# Self-contained block; each row is (call, exception type, message fragment), the call taking
# pytest's tmp_path for rows that need real files.
# ==========================================================================================
import numpy as _np  # noqa: E402
from safetensors.torch import save_file as _save_file  # noqa: E402

from wsm_optim import io as _wio  # noqa: E402
from wsm_optim import schedules as _S  # noqa: E402
from wsm_optim.offline import merge_checkpoints as _merge  # noqa: E402


def _ckpts(tmp_path, n):
    paths = []
    for j in range(n):
        paths.append(tmp_path / f"step_{j}.safetensors")
        _save_file({"w": torch.full((3,), float(j))}, str(paths[-1]))
    return paths


def _random_pt(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(_np.random.default_rng(1).bytes(4096))
    return path


_EDGE_ROWS = [
    (lambda p: _S.merge_coefficients("linear", 10**12), ValueError,
     "k + 1 = 1000000000001 checkpoints exceeds TABLE_LIMIT = 1048576"),
    (lambda p: _S.decay_weights("cosine", _S.TABLE_LIMIT), ValueError, "use schedules.weights(schedule, k)"),
    (lambda p: _S.weights("ema", 10**12).table(), ValueError, "MergeWeights.table(): k + 1 = 1000000000001"),
    (lambda p: _S.weights(lambda: 1.0, 4), TypeError, "schedule: the callable '<lambda>' must take one argument t"),
    (lambda p: _S.weights(lambda: 1.0, 10**12), TypeError, "schedule: the callable '<lambda>' must take one argument t"),
    (lambda p: _S.decay_weights(lambda t, u: 1.0, 4), TypeError, "calling it with t = 0.0 raised TypeError"),
    (lambda p: _S.weights(lambda t: 0.5, 10**12), ValueError, "callable must have f(0) == 1, got f(0) = 0.5"),
    (lambda p: _S.weights(lambda t: 1.0 + t, 10**12), ValueError, "is outside [0, 1]"),
    (lambda p: _S.weights("linear", 0), ValueError, "empty window: k = 0"),
    (lambda p: _S.weights("linear", 10.0**12), TypeError, "k must be an int, got float"),
    (lambda p: _S.weights("cosin", 10**12), ValueError, "unknown name 'cosin'"),
    (lambda p: _S.weights(_np.array([0.5, 0.2]), 3), ValueError, "explicit decay sequence has length 2, expected k = 3"),
    (lambda p: _S.weights("linear", 4).c(5), IndexError, "MergeWeights.c: index 5 is outside 0..4"),
    (lambda p: _S.weights("linear", 10**12).w(-1), IndexError, "MergeWeights.w: index -1 is outside 0..1000000000001"),
    (lambda p: _S.weights("linear", 4).c(1.5), TypeError, "MergeWeights.c: index must be an int, got float"),
    (lambda p: setattr(_S.weights("linear", 4), "k", 9), AttributeError, "MergeWeights is immutable"),
    (lambda p: _merge(_ckpts(p, 2), weights=[1e308, 1e308], normalize=True, progress=False), ValueError,
     "--weights: the sum of the weights overflows float64"),
    (lambda p: _merge(_ckpts(p, 2), weights=[float("inf"), 1.0], normalize=True, progress=False), ValueError,
     "c_0 = inf is negative or not finite"),
    (lambda p: _merge([_random_pt(p)], progress=False), ValueError, "the file is corrupt or not a torch.save checkpoint"),
    (lambda p: _merge([_random_pt(p)], unsafe_pickle=True, progress=False), ValueError,
     "the file is corrupt or not a torch.save checkpoint"),
    (lambda p: _wio.atomic_save({"w": torch.ones(1)}, p / "x.pt", format="npz"), ValueError, "format must be one of"),
]


@pytest.mark.parametrize("call,exc,fragment", _EDGE_ROWS)
def test_edge_misuse(tmp_path, call, exc, fragment):
    with pytest.raises(exc) as info:
        call(tmp_path)
    assert fragment in str(info.value), (fragment, str(info.value))
    if "corrupt" in fragment:
        assert "--unsafe-pickle" not in str(info.value)  # suggested only for well-formed pickles
