"""``schedules.weights``: the lazy Theorem 3.1 weights, bit-identical to the materialised arrays, O(1) in k."""

from __future__ import annotations

import copy
import hashlib
import math
import pickle
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsm_optim import schedules as S

NAMES = [*S.SHAPES, *S.ALIASES]
HUGE = 10**12


def bits(x: float) -> int:
    """The IEEE-754 bit pattern: equality of bits, not of values (0.0 != -0.0 here)."""
    return int(np.array([x], dtype=np.float64).view(np.uint64)[0])


def square(t: float) -> float:  # module level, so it pickles
    return (1.0 - t) ** 2


class CountingShape:
    """A schedule callable that counts its calls (to prove no O(k) work is done)."""

    def __init__(self, f):
        self.f, self.calls = f, 0
        self.__name__ = f"counting({getattr(f, '__name__', 'f')})"

    def __call__(self, t):
        self.calls += 1
        return self.f(t)


@st.composite
def schedules_and_k(draw):
    k = draw(st.integers(1, 3000))
    kind = draw(st.sampled_from(["name", "callable", "explicit"]))
    if kind == "name":
        return draw(st.sampled_from(NAMES)), k
    if kind == "callable":
        return draw(st.sampled_from([square, S.inv_sqrt(0.3), S.cosine, lambda t: 1.0 - t**3])), k
    raw = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).uniform(0, 1, size=k)
    return np.sort(raw)[::-1], k


@settings(deadline=None, max_examples=60, derandomize=True)
@given(schedules_and_k(), st.data())
def test_lazy_values_are_bit_identical_to_the_materialised_arrays(sk, data):
    schedule, k = sk
    mw = S.weights(schedule, k)
    c = S.merge_coefficients(schedule, k)
    w = S.decay_weights(schedule, k)
    assert mw.k == k and mw.name == S.schedule_name(schedule)
    assert [bits(mw.c(j)) for j in range(k + 1)] == [bits(x) for x in c]
    assert [bits(mw.w(i)) for i in range(1, k + 1)] == [bits(x) for x in w]
    assert mw.w(0) == 1.0 and mw.w(k + 1) == 0.0
    j = data.draw(st.integers(0, k))
    assert bits(mw.c(j)) == bits(float(c[j])) and bits(mw.c(j)) == bits(mw.w(j) - mw.w(j + 1))
    table = mw.coefficients()
    assert table.dtype == np.float64 and table.shape == (k + 1,)
    assert table.tobytes() == c.tobytes()
    # the digest that v0.1 state dicts store
    assert mw.digest() == hashlib.sha256(np.ascontiguousarray(c).tobytes()).hexdigest()[:16]


@settings(deadline=None, max_examples=60, derandomize=True)
@given(st.sampled_from(NAMES), st.integers(S.TABLE_LIMIT, 10**15), st.data())
def test_named_shapes_past_the_table_limit(name, k, data):
    """The definition w_i = f(i / (k + 1)), c_j = w_j - w_{j+1}, at k no array could hold; all valid."""
    f = S.SHAPES[S.ALIASES.get(name, name)]
    mw = S.weights(name, k)
    for j in (0, 1, k - 1, k, data.draw(st.integers(0, k)), data.draw(st.integers(0, k))):
        wj = 1.0 if j == 0 else float(f(j / (k + 1)))
        wj1 = 0.0 if j == k else float(f((j + 1) / (k + 1)))
        assert bits(mw.w(j)) == bits(wj) and bits(mw.w(j + 1)) == bits(wj1)
        assert bits(mw.c(j)) == bits(wj - wj1)
        assert 0.0 <= wj1 <= wj <= 1.0 and mw.c(j) >= 0.0


@pytest.mark.parametrize("name", sorted(S.SHAPES))
def test_named_shapes_are_valid_for_many_k(name):
    """weights() skips per-point validation of named shapes; decay_weights validates every point."""
    for k in [*range(1, 301), *np.random.default_rng(0).integers(301, S.TABLE_LIMIT, size=4), S.TABLE_LIMIT - 1]:
        w = S.decay_weights(name, int(k))  # raises on any point outside [0, 1] or increasing
        assert w.shape == (k,)


def test_no_O_k_work_for_a_named_shape(monkeypatch):
    counting = CountingShape(S.cosine)
    monkeypatch.setitem(S.SHAPES, "cosine", counting)
    tracemalloc.start()
    try:
        mw = S.weights("cosine", HUGE)
        assert counting.calls == 0
        mw.c(HUGE // 2)
        assert counting.calls == 2
        digest = mw.digest()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the documented 1025 sampled c_j (j = 0 and j = k included), two w each but the constants w_0, w_{k+1}
    assert counting.calls == 2 + 2 * 1025 - 2
    assert peak < 1 << 20  # bytes: nothing of size k
    assert len(digest) == 16 and int(digest, 16) >= 0
    mw.digest()
    assert counting.calls == 2 + 2 * 1025 - 2  # cached


def test_no_O_k_work_for_a_callable_past_the_table_limit():
    f = CountingShape(square)
    mw = S.weights(f, HUGE)
    assert f.calls <= 1 + 2 * S.CALLABLE_SAMPLE_POINTS  # f(0) and the documented sample
    before = f.calls
    assert bits(mw.c(7)) == bits(square(7 / (HUGE + 1)) - square(8 / (HUGE + 1)))
    assert f.calls == before + 2


def test_callable_up_to_the_limit_is_validated_at_every_point():
    f = CountingShape(square)
    k = 5000
    mw = S.weights(f, k)
    assert f.calls == k + 1  # f(0) and every w_i, evaluated once and kept
    mw.c(10), mw.w(3), mw.coefficients()
    assert f.calls == k + 1


def test_digest_past_the_table_limit_follows_its_documented_formula():
    k = S.TABLE_LIMIT
    mw = S.weights("1-sqrt", k)
    h = hashlib.sha256(f"wsm_optim.MergeWeights/v1|1-sqrt|k={k}|".encode())
    js = [(s * k) // 1024 for s in range(1025)]
    h.update(np.array([1.0 - math.sqrt(j / (k + 1)) if j else 1.0 for j in js]) - np.array(
        [1.0 - math.sqrt((j + 1) / (k + 1)) if j < k else 0.0 for j in js]
    ))
    assert mw.digest() == h.hexdigest()[:16]
    assert S.weights("1-sqrt", k + 1).digest() != mw.digest()
    assert S.weights("linear", k).digest() != mw.digest()
    # explicit sequences hash every value
    w = np.linspace(1.0, 0.0, k + 2)[1:-1]
    e = S.weights(w, k)
    h = hashlib.sha256(f"wsm_optim.MergeWeights/v1|explicit|k={k}|".encode())
    h.update(w.tobytes())
    assert e.digest() == h.hexdigest()[:16]


def test_materialised_forms_refuse_past_the_table_limit():
    k = S.TABLE_LIMIT  # k + 1 = TABLE_LIMIT + 1
    for call in (lambda: S.decay_weights("linear", k), lambda: S.merge_coefficients("cosine", k),
                 lambda: S.weights("ema", k).coefficients()):
        with pytest.raises(ValueError, match=rf"TABLE_LIMIT = {S.TABLE_LIMIT}.*schedules\.weights"):
            call()
    counting = CountingShape(square)
    with pytest.raises(ValueError, match="TABLE_LIMIT"):
        S.decay_weights(counting, HUGE)  # refused before any call
    assert counting.calls == 0
    assert S.weights("ema", k).c(k) > 0.0  # the lazy form still answers


def test_callable_past_the_limit_checks_f0_and_a_sample():
    with pytest.raises(ValueError, match=r"f\(0\) == 1.*0\.5"):
        S.weights(lambda t: 0.5 * (1 - t), HUGE)
    with pytest.raises(ValueError, match=r"w_1 = 1\.5.*outside \[0, 1\]"):
        S.weights(lambda t: 1.0 if t == 0 else 1.5, HUGE)
    with pytest.raises(ValueError, match=r"not non-increasing"):
        S.weights(lambda t: 1.0 if t == 0 else 0.1 + 0.5 * t, HUGE)
    with pytest.raises(ValueError, match=r"returned nan"):
        S.weights(lambda t: float("nan") if t > 0.5 else 1 - t, HUGE)
    # increasing only between sampled points: caught when c(j) reads it, never returned
    k = HUGE
    bump = (k // 2048, k // 2048 + 10)  # strictly inside the first gap of the sample

    def sneaky(t):
        i = round(t * (k + 1))
        return 0.5 if bump[0] < i < bump[1] else 0.4 if t > 0 else 1.0

    mw = S.weights(sneaky, k)
    assert mw.c(0) == pytest.approx(0.6)
    with pytest.raises(ValueError, match=rf"not non-increasing: w_{bump[0] + 1} = 0\.5 > w_{bump[0]} = 0\.4"):
        mw.c(bump[0])


def test_callable_without_argument_is_a_clear_error():
    for call in (lambda: S.weights(lambda: 1.0, 5), lambda: S.decay_weights(lambda: 1.0, 5),
                 lambda: S.weights(lambda: 1.0, HUGE)):
        with pytest.raises(TypeError, match=r"^schedule: the callable '<lambda>' must take one argument t"):
            call()


def test_explicit_numpy_schedule():
    seq = np.array([0.9, 0.5, 0.5, 0.1])
    mw = S.weights(seq, 4)
    assert mw.name == "explicit"
    assert mw.coefficients().tobytes() == S.merge_coefficients(seq, 4).tobytes()
    seq[0] = 0.0  # the caller's array may change: the weights do not
    assert mw.w(1) == 0.9
    with pytest.raises(ValueError, match="length 4, expected k = 3"):
        S.weights(seq, 3)
    with pytest.raises(ValueError, match=r"w_2 = 0\.6 > w_1 = 0\.5"):
        S.weights(np.array([0.5, 0.6]), 2)


def test_indices_types_and_immutability():
    mw = S.weights("linear", 4)
    for bad in (-1, 5):
        with pytest.raises(IndexError, match=rf"index {bad} is outside 0\.\.4"):
            mw.c(bad)
    with pytest.raises(IndexError, match=r"outside 0\.\.5"):
        mw.w(6)
    assert mw.w(5) == 0.0 and mw.c(np.int64(2)) == mw.c(2)
    with pytest.raises(TypeError, match="index must be an int"):
        mw.c(1.0)
    with pytest.raises(AttributeError, match="immutable"):
        mw.k = 5
    for bad_k, exc in ((0, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="empty window|k must be an int"):
            S.weights("linear", bad_k)
    with pytest.raises(ValueError, match="unknown name 'cosin'"):
        S.weights("cosin", 3)


@pytest.mark.parametrize("schedule", ["cosine", "mean", square, np.array([0.7, 0.2])])
def test_copy_and_pickle(schedule):
    for k in (2, HUGE):
        if isinstance(schedule, np.ndarray) and k != len(schedule):
            continue
        mw = S.weights(schedule, k)
        for other in (copy.copy(mw), copy.deepcopy(mw), pickle.loads(pickle.dumps(mw))):
            assert (other.k, other.name) == (mw.k, mw.name)
            assert [bits(other.c(j)) for j in (0, 1, k)] == [bits(mw.c(j)) for j in (0, 1, k)]
            assert other.digest() == mw.digest()
        if isinstance(schedule, str):
            assert len(pickle.dumps(mw)) < 250  # the name (and digest), not a table


def test_copies_keep_the_computed_digest(monkeypatch):
    mw = S.weights("cosine", 1000)
    digest = mw.digest()
    counting = CountingShape(S.cosine)
    monkeypatch.setitem(S.SHAPES, "cosine", counting)
    for other in (copy.deepcopy(mw), pickle.loads(pickle.dumps(mw))):
        assert other.digest() == digest
    assert counting.calls == 0  # not rebuilt
    assert S.weights("cosine", 1000).digest() == digest and counting.calls == 1000
