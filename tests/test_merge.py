"""``wsm_optim.core.merge``: the window arithmetic, incremental and closed form, against each other and the reference.

The reference (``tests/reference.py``) models the windows from the method note,
not from the code; here the state machine's counters and readout weights are
checked against it at every step, for random specs.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
from wsm_optim.core.spec import MergeSpec
from wsm_optim.core.window import Position

SHAPES = ["linear", "cosine", "1-sqrt", "inv-sqrt", "ema"]


@st.composite
def specs(draw):
    interval = draw(st.integers(1, 4))
    k = draw(st.integers(1, 6))
    return MergeSpec(
        schedule=draw(st.sampled_from(SHAPES)),
        window=interval * k,
        interval=interval,
        start=draw(st.integers(0, 7)),
        keep_last=draw(st.booleans()),
    )


def _counters(m: Position):
    return (m.anchored, m.t, m.r, m.windows_completed, m.has_completed, m.complete, m.window_index)


@settings(max_examples=150, deadline=None)
@given(specs(), st.integers(1, 60))
def test_incremental_and_closed_form_agree_at_every_step(spec, steps):
    live = Position(spec)
    coefficients = {}  # step -> coefficient the incremental machine folds in
    for s in range(steps):
        if live.anchor_due(s):
            coefficients[(s, "anchor")] = live.begin_window()
        c = live.advance()
        if c is not None:
            coefficients[(s + 1, "checkpoint")] = c
        shadow = Position(spec)
        shadow.set_position(s + 1)
        assert _counters(shadow) == _counters(live), (spec, s + 1)
    # what the kernel computes on the device from the step count alone (kernels/wsm_update.py)
    c = R.Window(spec.schedule, spec.window, spec.interval, spec.start).merge()
    for (s, phase), coef in coefficients.items():
        u = s - spec.start
        if phase == "anchor":
            assert u >= 0 and u % spec.window == 0 and coef == c[0]
        else:
            assert u > 0 and u % spec.interval == 0
            assert coef == c[(u // spec.interval - 1) % spec.k + 1]


@settings(max_examples=100, deadline=None)
@given(specs(), st.integers(0, 60))
def test_readout_weights_match_the_reference_terms(spec, steps):
    m = Position(spec)
    m.set_position(steps)
    got = m.readout_weights()
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    w = R.Window(spec.schedule, spec.window, spec.interval, spec.start)
    if steps <= spec.start:
        assert got.tolist() == [1.0]
        return
    # reference: M = sum_{j<=t} c_j theta_{ckpt j} + w_{t+1} theta_now
    u = steps - spec.start
    within = (u - 1) % spec.window + 1
    t = within // spec.interval
    expected = list(w.merge()[: t + 1]) + [0.0 if t == spec.k else float(w.decay()[t])]
    np.testing.assert_array_equal(got, np.array(expected))


def test_spec_normalises_numpy_values_and_validates():
    spec = MergeSpec("cosine", np.int64(6), np.int32(2), np.uint8(1), np.bool_(True))
    assert (spec.window, spec.interval, spec.start, spec.keep_last, spec.k) == (6, 2, 1, True, 3)
    assert all(type(v) in (int, bool) for v in (spec.window, spec.interval, spec.start, spec.keep_last))
    assert spec.weights.c(0) == R.Window("cosine", 6, 2).merge()[0]
    with pytest.raises(TypeError, match="keep_last must be a bool"):
        MergeSpec(window=4, keep_last="False")
    with pytest.raises(ValueError, match="merges\\['a'\\].window must be >= 1"):
        MergeSpec.named("a", {"window": 0})
    assert MergeSpec.named("a", spec) is spec
