"""Every bad input to WSMOptimizer fails at once with a message naming the argument and what is allowed."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from safetensors.torch import save_file

import harness as H
from wsm_optim import NonFiniteMergeError, WSMOptimizer
from wsm_optim.common import atomic
from wsm_optim import schedules
from wsm_optim.offline.merge import merge_checkpoints


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


# ------------------------------------------------ misuse table: the optimizer
def _trained(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), **{"window": 4, **kwargs})
    for _ in range(2):
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _copy_without_names():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = WSMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), window=4)
    return lambda: opt.merged_state_dict(model=copy.deepcopy(model))


MISUSE = [
    # (what, call, exception, fragments the message must contain)
    ("keep_last string", lambda: WSMOptimizer(_inner(), window=4, keep_last="False"), TypeError,
     ["keep_last must be a bool (True or False)", "str 'False'"]),
    ("keep_last 'no'", lambda: WSMOptimizer(_inner(), window=4, keep_last="no"), TypeError, ["keep_last must be a bool"]),
    ("keep_last int", lambda: WSMOptimizer(_inner(), window=4, keep_last=2), TypeError, ["keep_last must be a bool", "int 2"]),
    ("keep_last in merges", lambda: WSMOptimizer(_inner(), merges={"a": dict(window=4, keep_last="yes")}), TypeError,
     ["merges['a'].keep_last must be a bool"]),
    ("overlap string", lambda: WSMOptimizer(_inner(), window=4, overlap="no"), TypeError, ["overlap must be a bool"]),
    ("merges with a numpy schedule", lambda: WSMOptimizer(_inner(), schedule=np.array([0.5, 0.2]), merges={"a": dict(window=2)}),
     TypeError, ["either merges=", "not both"]),
    ("merges entry not a dict", lambda: WSMOptimizer(_inner(), merges={"a": 4}), TypeError,
     ["merges['a'] must be a dict or a MergeSpec", "int"]),
    ("dtype as a string", lambda: _trained()[1].merged_state_dict("float16"), TypeError,
     ["dtype must be a torch.dtype such as torch.bfloat16", "str 'float16'", "strings are not accepted"]),
    ("integer dtype", lambda: _trained()[1].merged_state_dict(torch.int32), ValueError,
     ["dtype must be a floating point", "torch.int32"]),
    ("model as a string", lambda: _trained()[1].merged_state_dict(model="m"), TypeError,
     ["model must be a torch.nn.Module or None", "str 'm'"]),
    ("a copy of the model, no names", _copy_without_names(), ValueError,
     ["4 trainable parameter(s) are not tracked by this optimizer", "'0.weight'", "named_parameters()"]),
    ("completed not a bool", lambda: _trained()[1].merged_state_dict(completed="yes"), TypeError,
     ["completed must be a bool"]),
    ("unknown backend", lambda: WSMOptimizer(_inner(), window=4, backend="cuda"), ValueError, ["backend must be one of"]),
]


@pytest.mark.parametrize("what, call, exc, needles", MISUSE, ids=[row[0] for row in MISUSE])
def test_misuse_is_a_clear_error(what, call, exc, needles):
    with pytest.raises(exc) as info:
        call()
    for needle in needles:
        assert needle in str(info.value), (what, needle, str(info.value))


def test_a_deepcopy_of_the_model_is_matched_by_name():
    model, opt = _trained(keep_last=True)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(100.0)  # evaluation copy drifted: its own values must not leak into the merge
    assert all(torch.equal(a, b) for a, b in zip(opt.merged_state_dict(model=clone).values(),
                                                 opt.merged_state_dict().values()))


def test_complex_params_refuse_a_real_dtype_and_merge_exactly():
    p = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    opt = WSMOptimizer(torch.optim.SGD([("z", p)], lr=0.1), window=2)
    snaps = [p.detach().clone().to(torch.complex128)]
    for _ in range(2):
        p.grad = torch.randn(4, dtype=torch.complex64)
        opt.step()
        snaps.append(p.detach().clone().to(torch.complex128))
    with pytest.raises(ValueError, match="would drop the imaginary part of the complex parameter 'z'"):
        opt.merged_state_dict(torch.float32)
    merged = opt.merged_state_dict(torch.complex128)["z"]
    torch.testing.assert_close(merged, sum(snaps) / 3, rtol=1e-6, atol=1e-7)  # linear: the mean
    assert opt.merged_state_dict()["z"].dtype == torch.complex64


def test_float64_params_keep_float64_range():
    p = nn.Parameter(torch.full((3,), 1e300, dtype=torch.float64))
    opt = WSMOptimizer(torch.optim.SGD([("big", p)], lr=1.0), window=2)
    for step in range(2):
        p.grad = torch.full((3,), 1e299 * (step + 1), dtype=torch.float64)
        opt.step()
    expected = (1e300 + (1e300 - 1e299) + (1e300 - 3e299)) / 3
    torch.testing.assert_close(opt.merged_state_dict()["big"], torch.full((3,), expected, dtype=torch.float64))
    assert opt.state_dict()["state"][0]["wsm_acc.default"].dtype == torch.float64


# ------------------------- misuse table: schedules.weights, offline merge, atomic_save
# Each row is (call, exception type, message fragment); the call takes pytest's tmp_path for
# rows that need real files.


def _ckpts(tmp_path, n):
    paths = []
    for j in range(n):
        paths.append(tmp_path / f"step_{j}.safetensors")
        save_file({"w": torch.full((3,), float(j))}, str(paths[-1]))
    return paths


def _random_pt(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    return path


_EDGE_ROWS = [
    (lambda p: schedules.merge_coefficients("linear", 10**12), ValueError,
     "k + 1 = 1000000000001 checkpoints exceeds TABLE_LIMIT = 1048576"),
    (lambda p: schedules.decay_weights("cosine", schedules.TABLE_LIMIT), ValueError, "use schedules.weights(schedule, k)"),
    (lambda p: schedules.weights("ema", 10**12).coefficients(), ValueError,
     "WindowWeights.coefficients(): k + 1 = 1000000000001"),
    (lambda p: schedules.weights(lambda: 1.0, 4), TypeError, "schedule: the callable '<lambda>' must take one argument t"),
    (lambda p: schedules.weights(lambda: 1.0, 10**12), TypeError, "schedule: the callable '<lambda>' must take one argument t"),
    (lambda p: schedules.decay_weights(lambda t, u: 1.0, 4), TypeError, "calling it with t = 0.0 raised TypeError"),
    (lambda p: schedules.weights(lambda t: 0.5, 10**12), ValueError, "callable must have f(0) == 1, got f(0) = 0.5"),
    (lambda p: schedules.weights(lambda t: 1.0 + t, 10**12), ValueError, "is outside [0, 1]"),
    (lambda p: schedules.weights("linear", 0), ValueError, "empty window: k = 0"),
    (lambda p: schedules.weights("linear", 10.0**12), TypeError, "k must be an int, got float"),
    (lambda p: schedules.weights("cosin", 10**12), ValueError, "unknown name 'cosin'"),
    (lambda p: schedules.weights(np.array([0.5, 0.2]), 3), ValueError, "explicit decay sequence has length 2, expected k = 3"),
    (lambda p: schedules.weights("linear", 4).c(5), IndexError, "WindowWeights.c: index 5 is outside 0..4"),
    (lambda p: schedules.weights("linear", 10**12).w(-1), IndexError, "WindowWeights.w: index -1 is outside 0..1000000000001"),
    (lambda p: schedules.weights("linear", 4).c(1.5), TypeError, "WindowWeights.c: index must be an int, got float"),
    (lambda p: setattr(schedules.weights("linear", 4), "k", 9), AttributeError, "WindowWeights is immutable"),
    (lambda p: merge_checkpoints(_ckpts(p, 2), weights=[1e308, 1e308], normalize=True, progress=False), ValueError,
     "--weights: the sum of the weights overflows float64"),
    (lambda p: merge_checkpoints(_ckpts(p, 2), weights=[float("inf"), 1.0], normalize=True, progress=False), ValueError,
     "c_0 = inf is negative or not finite"),
    (lambda p: merge_checkpoints([_random_pt(p)], progress=False), ValueError, "the file is corrupt or not a torch.save checkpoint"),
    (lambda p: merge_checkpoints([_random_pt(p)], unsafe_pickle=True, progress=False), ValueError,
     "the file is corrupt or not a torch.save checkpoint"),
    (lambda p: atomic.atomic_save({"w": torch.ones(1)}, p / "x.pt", format="npz"), ValueError, "format must be one of"),
]


@pytest.mark.parametrize("call,exc,fragment", _EDGE_ROWS)
def test_edge_misuse(tmp_path, call, exc, fragment):
    with pytest.raises(exc) as info:
        call(tmp_path)
    assert fragment in str(info.value), (fragment, str(info.value))
    if "corrupt" in fragment:
        assert "--unsafe-pickle" not in str(info.value)  # suggested only for well-formed pickles


def test_any_window_costs_o1_to_construct_train_save_and_read():
    """window=10**12 (a typo) answers at once: no O(k) work anywhere (counted through a callable schedule)."""
    calls = []

    def shape(t):
        calls.append(t)
        return 1.0 - t

    model, opt = _trained(window=10**12, schedule=shape, keep_last=True)
    sd = opt.state_dict()
    opt.merged_state_dict()
    fresh = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=10**12, schedule=shape,
                         keep_last=True)
    fresh.load_state_dict(sd)
    assert fresh.merge_status()["checkpoint"] == 2
    assert len(calls) < 20_000, len(calls)  # sampled validation and a few coefficients, never k


def test_triton_refuses_windows_past_its_device_table():
    with pytest.raises(ValueError, match=r"device table of at most schedules.TABLE_LIMIT = 1048576 entries"):
        WSMOptimizer(_inner(), window=10**9, backend="triton")
    assert WSMOptimizer(_inner(), window=10**9).backend == "foreach"  # auto falls back


# ---------------------------------------------------------- nonfinite errors


def test_skip_mode_error_blames_the_live_params():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = WSMOptimizer(torch.optim.SGD(H.named_groups(p), lr=0.1), window=4, nonfinite="skip")
    p.grad = torch.ones(2)
    opt.step()
    with torch.no_grad():
        p[0] = float("inf")
    with pytest.raises(NonFiniteMergeError, match="live params themselves are non-finite") as e:
        opt.merged_state_dict()
    assert "construct with nonfinite='skip'" not in str(e.value)
