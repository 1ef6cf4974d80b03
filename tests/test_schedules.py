"""``wsm_optim.schedules`` against docs/method.md's check values and hand-computed closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsm_optim import schedules as S

VALID_NAMES = ["linear", "cosine", "1-sqrt", "inv-sqrt", "ema", "mean", "minus-sqrt"]

# docs/method.md, "Check values (k = 9, ten checkpoints, oldest first)".
CHECK_VALUES_K9 = {
    "ema": [0.126, 0.033, 0.041, 0.052, 0.065, 0.082, 0.103, 0.130, 0.163, 0.206],
    "linear": [0.1] * 10,
    "cosine": [0.024, 0.071, 0.111, 0.139, 0.155, 0.155, 0.139, 0.111, 0.071, 0.024],
    "1-sqrt": [0.316, 0.131, 0.101, 0.085, 0.075, 0.067, 0.062, 0.058, 0.054, 0.051],
}


@pytest.mark.parametrize("name", sorted(CHECK_VALUES_K9))
def test_method_check_values_k9(name):
    c = S.merge_coefficients(name, 9)
    assert c.shape == (10,) and c.dtype == np.float64
    np.testing.assert_array_equal(np.round(c, 3), CHECK_VALUES_K9[name])


# Hand-computed: k = 1 samples f at 1/2; k = 2 samples f at 1/3 and 2/3.
r = math.sqrt
HAND_C = {
    ("linear", 1): [1 / 2, 1 / 2],
    ("cosine", 1): [1 / 2, 1 / 2],  # f(1/2) = (1 + cos(pi/2)) / 2 = 1/2
    ("1-sqrt", 1): [r(1 / 2), 1 - r(1 / 2)],
    ("ema", 1): [0.1**0.5, 1 - 0.1**0.5],  # w_1 = 1 - 0.1^(1/2)
    ("inv-sqrt", 1): [1 - 1 / r(6), 1 / r(6)],  # 1/sqrt(1 + 0.5/0.1)
    ("linear", 2): [1 / 3, 1 / 3, 1 / 3],
    ("cosine", 2): [1 / 4, 1 / 2, 1 / 4],  # f(1/3) = 3/4, f(2/3) = 1/4
    ("1-sqrt", 2): [r(1 / 3), r(2 / 3) - r(1 / 3), 1 - r(2 / 3)],
    ("ema", 2): [0.1 ** (2 / 3), 0.1 ** (1 / 3) - 0.1 ** (2 / 3), 1 - 0.1 ** (1 / 3)],
    ("inv-sqrt", 2): [1 - 1 / r(1 + 10 / 3), 1 / r(1 + 10 / 3) - 1 / r(1 + 20 / 3), 1 / r(1 + 20 / 3)],
}


@pytest.mark.parametrize("name,k", sorted(HAND_C))
def test_hand_computed_merge_weights(name, k):
    np.testing.assert_allclose(S.merge_coefficients(name, k), HAND_C[(name, k)], rtol=0, atol=1e-15)
    # and the decay weights they come from: w_i = sum_{j >= i} c_j
    expected_w = np.cumsum(HAND_C[(name, k)][::-1])[::-1][1:]
    np.testing.assert_allclose(S.decay_weights(name, k), expected_w, rtol=0, atol=1e-15)


# Independent formulas f(t) (not the module's), to check the discretisation w_i = f(i / (k + 1)).
SHAPES_BY_HAND = {
    "linear": lambda t: 1 - t,
    "cosine": lambda t: (1 + math.cos(math.pi * t)) / 2,
    "1-sqrt": lambda t: 1 - math.sqrt(t),
    "ema": lambda t: 1 - 0.1 ** (1 - t),
    "inv-sqrt": lambda t: (1 + t / 0.1) ** -0.5,
}


@settings(deadline=None, max_examples=40, derandomize=True)
@given(st.sampled_from(sorted(SHAPES_BY_HAND)), st.integers(1, 500))
def test_discretisation_and_merge_is_a_valid_convex_combination(name, k):
    w = S.decay_weights(name, k)
    f = SHAPES_BY_HAND[name]
    np.testing.assert_allclose(w, [f(i / (k + 1)) for i in range(1, k + 1)], rtol=0, atol=1e-14)
    assert w.shape == (k,) and np.all(np.diff(w) <= 0) and np.all((0 <= w) & (w <= 1))
    c = S.coefficients_from_decay(w)
    assert c.shape == (k + 1,) and np.all(c >= 0)
    assert abs(c.sum() - 1.0) <= 1e-12
    # compact form of Theorem 3.1 with w_0 = 1, w_{k+1} = 0
    assert c[0] == pytest.approx(1 - w[0], abs=1e-15) and c[-1] == w[-1]


def test_aliases_and_names():
    for k in (1, 4, 37):
        np.testing.assert_array_equal(S.decay_weights("mean", k), S.decay_weights("linear", k))
        np.testing.assert_array_equal(S.decay_weights("minus-sqrt", k), S.decay_weights("1-sqrt", k))
    assert S.ALIASES == {"mean": "linear", "minus-sqrt": "1-sqrt"}
    assert S.schedule_name("mean") == "linear" and S.schedule_name("minus-sqrt") == "1-sqrt"
    assert S.schedule_name([0.5]) == "explicit"
    assert set(S.SHAPES) == {"linear", "cosine", "1-sqrt", "inv-sqrt", "ema"}


@pytest.mark.parametrize("k", [1, 2, 9, 100, 10_000])
def test_inv_sqrt_never_reaches_zero(k):
    w = S.decay_weights("inv-sqrt", k)
    c = S.coefficients_from_decay(w)
    assert w[-1] > 0 and c[-1] > 0 and c[-1] == w[-1]
    assert w[-1] == pytest.approx(1 / math.sqrt(1 + (k / (k + 1)) / S.INV_SQRT_TAU), rel=1e-14)
    # documented: about 0.30 for the default tau and long windows (limit 1/sqrt(11))
    if k >= 100:
        assert c[-1] == pytest.approx(1 / math.sqrt(11), abs=2e-3)


def test_inv_sqrt_time_constant():
    f = S.inv_sqrt(0.25)
    assert f(0.0) == 1.0 and f(0.75) == pytest.approx(0.5)  # halves at t = 3 tau
    np.testing.assert_allclose(S.decay_weights(f, 3), [1 / r(2), 1 / r(3), 1 / r(4)], atol=1e-15)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau"):
            S.inv_sqrt(bad)


# ------------------------------------------------------------------ Theorem 3.1
@st.composite
def decays(draw):
    values = draw(st.lists(st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0])), min_size=1, max_size=60))
    return np.array(sorted(values, reverse=True))


@st.composite
def merges(draw):
    raw = draw(st.lists(st.one_of(st.floats(0, 1), st.just(0.0)), min_size=2, max_size=60))
    c = np.array(raw)
    if c.sum() == 0:
        c[draw(st.integers(0, len(c) - 1))] = 1.0
    return c / c.sum()


@settings(deadline=None, max_examples=100, derandomize=True)
@given(decays())
def test_round_trip_decay_to_merge_to_decay(w):
    c = S.coefficients_from_decay(w)
    assert c.shape == (len(w) + 1,) and np.all(c >= 0) and abs(c.sum() - 1) <= 1e-12
    # c_j = w_j - w_{j+1}, computed here term by term
    padded = [1.0, *w, 0.0]
    np.testing.assert_array_equal(c, [padded[j] - padded[j + 1] for j in range(len(w) + 1)])
    np.testing.assert_allclose(S.decay_from_coefficients(c), w, rtol=0, atol=1e-12)


@settings(deadline=None, max_examples=100, derandomize=True)
@given(merges())
def test_round_trip_merge_to_decay_to_merge(c):
    w = S.decay_from_coefficients(c)
    assert w.shape == (len(c) - 1,)
    np.testing.assert_allclose(w, [sum(c[i:]) for i in range(1, len(c))], rtol=0, atol=1e-12)
    assert np.all(np.diff(w) <= 0)
    np.testing.assert_allclose(S.coefficients_from_decay(w), c, rtol=0, atol=1e-12)


@settings(deadline=None, max_examples=50, derandomize=True)
@given(decays(), st.integers(0, 2**31 - 1))
def test_theorem_3_1_merge_equals_anchor_minus_weighted_updates(w, seed):
    """sum_j c_j theta_j == theta_0 - sum_i w_i g_i for random checkpoints."""
    k = len(w)
    theta = np.random.default_rng(seed).normal(size=(k + 1, 3))
    c = S.coefficients_from_decay(w)
    merged = (c[:, None] * theta).sum(0)
    g = theta[:-1] - theta[1:]
    np.testing.assert_allclose(merged, theta[0] - (w[:, None] * g).sum(0), rtol=0, atol=1e-12)


# ------------------------------------------------------- callables and sequences
def test_callable_schedule():
    w = S.decay_weights(lambda t: (1 - t) ** 2, 4)
    np.testing.assert_allclose(w, [(1 - i / 5) ** 2 for i in range(1, 5)], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(S.decay_weights(S.inv_sqrt(), 7), S.decay_weights("inv-sqrt", 7))


@pytest.mark.parametrize("seq", [[1.0, 0.5, 0.5, 0.0], (0.9, 0.4, 0.2, 0.2), np.array([0.3, 0.3, 0.3, 0.3])])
def test_explicit_sequence_is_used_as_is(seq):
    w = S.decay_weights(seq, 4)
    np.testing.assert_array_equal(w, np.asarray(seq, dtype=np.float64))
    assert w.dtype == np.float64
    if isinstance(seq, np.ndarray):
        w[0] = 0.0  # a copy: the caller's array is untouched
        assert seq[0] == 0.3


# ------------------------------------------------------------------- validation
def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        S.decay_weights("cosinus", 5)
    msg = str(info.value)
    assert "'cosinus'" in msg
    for name in VALID_NAMES:
        assert repr(name) in msg, name


def test_non_increasing_names_first_offending_index_and_value():
    with pytest.raises(ValueError) as info:
        S.decay_weights([0.9, 0.5, 0.7, 0.8], 4)
    msg = str(info.value)
    assert "non-increasing" in msg and "w_3 = 0.7" in msg and "w_2 = 0.5" in msg
    with pytest.raises(ValueError, match=r"w_2 = 0\.6 > w_1 = 0\.5"):
        S.coefficients_from_decay([0.5, 0.6])


@pytest.mark.parametrize(
    "seq,needle",
    [([1.2, 0.5], "w_1 = 1.2"), ([0.5, -0.1], "w_2 = -0.1"), ([0.5, 0.5, 1.0000001], "w_3 = 1.0000001")],
)
def test_outside_unit_interval(seq, needle):
    with pytest.raises(ValueError) as info:
        S.decay_weights(seq, len(seq))
    assert needle in str(info.value) and "outside [0, 1]" in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_callable_returning_non_finite(bad):
    with pytest.raises(ValueError) as info:
        S.decay_weights(lambda t: bad if t > 0.5 else 1 - t, 3)
    msg = str(info.value)
    assert repr(bad) in msg and "t = 0.75" in msg  # the first t it fails at: 3/4


def test_explicit_non_finite():
    with pytest.raises(ValueError, match=r"w_2 = nan is not finite"):
        S.decay_weights([1.0, float("nan")], 2)


def test_callable_returning_non_number():
    with pytest.raises(ValueError, match="non-number"):
        S.decay_weights(lambda t: "x", 2)


def test_callable_f0_must_be_one():
    with pytest.raises(ValueError) as info:
        S.decay_weights(lambda t: 0.5 * (1 - t), 3)
    assert "f(0) == 1" in str(info.value) and "0.5" in str(info.value)
    S.decay_weights(lambda t: 1 - t + (1e-12 if t == 0 else 0.0), 3)  # within 1e-9 is accepted


@pytest.mark.parametrize("schedule", ["linear", lambda t: 1 - t, []])
def test_empty_window(schedule):
    with pytest.raises(ValueError, match="empty window"):
        S.decay_weights(schedule, 0)
    with pytest.raises(ValueError, match="empty window"):
        S.decay_weights(schedule, -3)


def test_empty_explicit_sequence():
    with pytest.raises(ValueError, match="empty window"):
        S.validate_decay([])
    with pytest.raises(ValueError, match="empty window"):
        S.coefficients_from_decay([])


def test_wrong_explicit_length():
    with pytest.raises(ValueError, match=r"length 2, expected k = 3"):
        S.decay_weights([0.5, 0.2], 3)


def test_bad_k_type_and_bad_spec_type():
    with pytest.raises(TypeError, match="k must be an int"):
        S.decay_weights("linear", 2.0)
    with pytest.raises(TypeError, match="k must be an int"):
        S.decay_weights("linear", True)
    with pytest.raises(TypeError, match="name, a callable"):
        S.decay_weights(object(), 2)
    with pytest.raises(ValueError, match="1-D"):
        S.decay_weights([[0.5, 0.2]], 2)


@pytest.mark.parametrize(
    "c,needle",
    [([0.5, 0.6], "sum to"), ([1.2, -0.2], "c_1 = -0.2"), ([1.0], "k + 1 >= 2"), ([0.5, float("nan")], "c_1")],
)
def test_decay_from_coefficients_validation(c, needle):
    with pytest.raises(ValueError) as info:
        S.decay_from_coefficients(c)
    assert needle in str(info.value)
