"""Property tests: WSMOptimizer against the float64 explicit-merge reference.

Every readout (current window at every step, the completed window, the
default param-dtype readout) is compared with ``tests/reference.py``; see
``harness.run_case`` for the checks and ``harness`` for the tolerance table.
(Every backend, dtype and nonfinite mode: ``test_conformance.py``.)

Last section: ``WSMOptimizer`` as a ``torch.optim.Optimizer`` seen through
framework proxies (Lightning's ``LightningOptimizer``) and copies.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import harness as H
import reference as R
from wsm_optim import WSMOptimizer

NAMED = ["linear", "mean", "cosine", "1-sqrt", "minus-sqrt", "inv-sqrt", "ema"]
SHAPES = [(), (1,), (1, 1), (5,), (2, 3), (3, 1, 2)]

#: Largest relative errors the property tests have shown, per param dtype.
MAX_ERRORS: dict[str, dict[str, float]] = {}

PROPERTY = settings(
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # same examples on every run: CI failures reproduce
)


def _square(t: float) -> float:
    return (1.0 - t) ** 2


@st.composite
def schedules_for(draw, k: int):
    """A named shape, a callable, or a random valid explicit ``w_1..w_k``."""
    kind = draw(st.sampled_from(["named", "named", "callable", "explicit"]))
    if kind == "named":
        return draw(st.sampled_from(NAMED))
    if kind == "callable":
        return _square
    values = draw(
        st.lists(
            st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0])), min_size=k, max_size=k
        )
    )
    return sorted(values, reverse=True)


@st.composite
def windows(draw, max_k: int = 30, max_interval: int = 6, max_start: int = 6):
    interval = draw(st.integers(1, max_interval))
    k = draw(st.integers(1, max_k))
    return R.Window(
        schedule=draw(schedules_for(k)),
        window=k * interval,
        interval=interval,
        start=draw(st.integers(0, max_start)),
        keep_last=draw(st.booleans()),
    )


@st.composite
def cases(draw, max_steps: int = 400):
    dtype = draw(st.sampled_from(list(H.DTYPES.values())))
    n_merges = draw(st.integers(1, 3))
    merges = {f"m{i}": draw(windows()) for i in range(n_merges)}
    # 0..3 full windows of the slowest merge (tumbling), then a partial one.
    slowest = max(merges.values(), key=lambda s: s.start + s.window)
    full = draw(st.integers(0, 3))
    partial = draw(st.integers(0, slowest.window - 1))
    steps = max(1, min(max_steps, slowest.start + full * slowest.window + partial))
    return H.Case(
        shapes=draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3)),
        dtype=dtype,
        merges=merges,
        inner=draw(st.sampled_from(H.INNERS)),
        steps=steps,
        seed=draw(st.integers(0, 2**20)),
        single_api=n_merges == 1 and draw(st.booleans()),
        missing_grads=draw(st.booleans()),
    )


def _record(case: H.Case, errs: H.Errors) -> None:
    if isinstance(case.dtype, list):
        return
    name = {v: k for k, v in H.DTYPES.items()}[case.dtype]
    entry = MAX_ERRORS.setdefault(name, {"fp32_readout": 0.0, "native_readout": 0.0})
    entry["fp32_readout"] = max(entry["fp32_readout"], errs.fp32)
    entry["native_readout"] = max(entry["native_readout"], errs.native)


@PROPERTY
@given(cases())
def test_matches_reference_every_step(case: H.Case) -> None:
    errs = H.run_case(case)
    slowest_windows = min(R.completed_windows(s, case.steps) for s in case.merges.values())
    event(f"windows completed by every merge: {min(slowest_windows, 3)}")
    event(f"dtype {case.dtype}, inner {case.inner}")
    assert errs.checks == (case.steps + 1) * len(case.shapes) * len(case.merges)
    _record(case, errs)


@settings(deadline=None, max_examples=6, derandomize=True)
@given(
    st.sampled_from([(200, 1), (200, 2), (200, 8), (150, 1)]),
    st.sampled_from(NAMED),
    st.sampled_from(list(H.DTYPES.values())),
    st.sampled_from(H.INNERS),
    st.integers(0, 3),
)
def test_long_windows_two_full_windows(window_interval, schedule, dtype, inner, start) -> None:
    """Windows up to 200 steps (k up to 200): two full windows and a partial third."""
    window, interval = window_interval
    spec = R.Window(schedule, window, interval, start, keep_last=True)
    case = H.Case(
        shapes=[(), (4,)],
        dtype=dtype,
        merges={"long": spec},
        inner=inner,
        steps=start + 2 * window + window // 3,
        seed=window + start,
        abel_every=17,
    )
    errs = H.run_case(case)
    assert errs.window_ends == 2
    _record(case, errs)


def test_every_named_schedule_and_inner_fp32() -> None:
    """A deterministic sweep so every named shape meets every inner optimizer."""
    for i, schedule in enumerate(NAMED):
        for j, inner in enumerate(H.INNERS):
            spec = R.Window(schedule, window=6, interval=2, start=1 + (i + j) % 3, keep_last=(i + j) % 2 == 0)
            case = H.Case(
                shapes=[(), (1,), (2, 2)],
                dtype=torch.float32,
                merges={"m": spec},
                inner=inner,
                steps=spec.start + 2 * spec.window + 3,
                seed=10 * i + j,
            )
            errs = H.run_case(case)
            assert errs.window_ends == 2
            _record(case, errs)


def test_three_merges_side_by_side_each_match_their_reference() -> None:
    merges = {
        "mean": R.Window("linear", 8, 1, 0),
        "sqrt": R.Window("1-sqrt", 12, 3, 2, keep_last=True),
        "ema": R.Window("ema", 5, 5, 7),
    }
    case = H.Case(
        shapes=[(3,), ()], dtype=torch.bfloat16, merges=merges, inner="adamw", steps=40, single_api=False
    )
    errs = H.run_case(case)
    _record(case, errs)


def test_mixed_dtypes_in_one_optimizer_and_missing_grads() -> None:
    """fp32, bf16 and fp16 params side by side (one foreach group per dtype); some steps without grads."""
    merges = {"a": R.Window("cosine", 6, 2, 1, keep_last=True), "b": R.Window("inv-sqrt", 4, 1, 0)}
    case = H.Case(
        shapes=[(3,), (), (2, 2), (1,)],
        dtype=[torch.float32, torch.bfloat16, torch.float16, torch.bfloat16],
        merges=merges,
        inner="adamw",
        steps=25,
        single_api=False,
        missing_grads=True,
    )
    H.run_case(case)


def test_report_max_errors(capsys) -> None:
    """Print the largest errors against the float64 reference (run with ``-s`` to see them)."""
    if not MAX_ERRORS:  # run on its own: compute a small sample
        test_three_merges_side_by_side_each_match_their_reference()
    with capsys.disabled():
        for dtype, e in sorted(MAX_ERRORS.items()):
            print(
                f"\n[wsm max rel error vs float64] {dtype}: fp32 readout {e['fp32_readout']:.3g}, "
                f"param-dtype readout {e['native_readout']:.3g}"
            )


# -------- WSMOptimizer as a torch.optim.Optimizer: framework proxies, copies


class _CopiedDictProxy:
    """What LightningOptimizer did up to 2.5: copy the wrapped optimizer's __dict__, subclass its class."""

    def __init__(self, optimizer):
        self.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k not in ("step", "__del__")}
        self.__class__ = type("Proxy" + optimizer.__class__.__name__, (self.__class__, optimizer.__class__), {})
        self._optimizer = optimizer

    def step(self, closure=None):
        return self._optimizer.step(closure)


def _proxies():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    return {"copied-dict": _CopiedDictProxy, "lightning": LightningOptimizer}


@pytest.mark.parametrize("kind", ["copied-dict", "lightning"])
def test_step_inside_merged_weights_is_refused_through_a_proxy(kind):
    model = H.tiny_model()
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), **H.TINY_SPEC)
    proxy = _proxies()[kind](opt)
    # LightningOptimizer.step needs a Trainer's strategy: the Lightning proxy steps the optimizer itself
    stepper = proxy if kind == "copied-dict" else opt
    H.train_model(model, stepper, 3)
    assert opt.steps == proxy.steps == 3
    before = H.model_snapshot(model)
    with proxy.merged_weights():
        H.model_grads(model, 99)
        with pytest.raises(RuntimeError, match=r"step\(\) called inside merged_weights"):
            stepper.step()
        with pytest.raises(RuntimeError, match=r"step\(\) called inside merged_weights"):
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, H.model_snapshot(model)))  # nothing lost on exit
    assert opt.steps == 3


@pytest.mark.parametrize("kind", ["copied-dict", "lightning"])
def test_add_param_group_through_a_proxy(kind):
    model = H.tiny_model()
    extra = nn.Parameter(torch.randn(3))
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=4)
    proxy = _proxies()[kind](opt)
    stepper = proxy if kind == "copied-dict" else opt
    H.train_model(model, stepper, 2)
    proxy.add_param_group({"params": [extra], "param_names": ["extra"]})
    merged = opt.merged_state_dict()
    assert torch.equal(merged["extra"], extra.detach())  # joined mid-window: constant since the anchor
    assert set(proxy.merged_state_dict()) == set(merged)
    H.train_model(model, stepper, 2, first=2)
    extra.grad = None
    assert opt.steps == 4 and len(opt.state_dict()["state"]) == 5
    assert torch.equal(opt.merged_state_dict()["extra"], extra.detach())  # never stepped: constant


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


def test_cutting_param_groups_to_a_subset_is_refused_naming_the_deepspeed_fix():
    """ZeRO-1/2 set ``optimizer.param_groups = [group]`` per group: without ``attach`` each would count a step."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = WSMOptimizer(torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1), window=4)
    groups = opt.param_groups
    with pytest.raises(RuntimeError, match="attach\\(engine\\)"):
        opt.param_groups = [groups[1]]
    assert opt.param_groups is groups and len(opt.param_groups) == 2
    opt.param_groups = [groups[1], groups[0]]  # reordering or replacing groups stays allowed
    opt.param_groups = groups
