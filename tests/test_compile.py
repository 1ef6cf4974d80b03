"""``torch.compile`` of ``opt.step`` and of a whole train step: every step counts, merges stay exact, no recompiles.

Backends ``eager`` and ``aot_eager`` (dynamo tracing without code generation)
keep this fast on CPU; the inner optimizer is traced, the WSM bookkeeping runs
eagerly (``torch.compiler.disable``). ``CompileCounterWithBackend`` counts
frames compiled: after warm-up it must stay put whatever the schedule.
"""

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from wsm_optim import WSMOptimizer

STEPS = 12
SCHEDULES = {
    "uniform": dict(schedule="linear", window=6),
    "non-uniform": dict(schedule=[0.9, 0.7, 0.6, 0.3, 0.1], window=5, start=1, keep_last=True),
}


def _setup(spec, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    opt = WSMOptimizer(torch.optim.AdamW(model.named_parameters(), lr=0.01, foreach=True), **spec)
    data = [(torch.randn(16, 8), torch.randn(16, 4)) for _ in range(STEPS)]
    return model, opt, data


def _eager_run(spec):
    model, opt, data = _setup(spec)
    for x, y in data:
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("what", ["opt.step", "train step"])
def test_compiled_step_counts_every_step_and_does_not_recompile(backend, schedule, what):
    spec = SCHEDULES[schedule]
    model, opt, data = _setup(spec)
    counter = CompileCounterWithBackend(backend)
    if what == "opt.step":
        step = torch.compile(opt.step, backend=counter)

        def train_step(x, y):
            nn.functional.mse_loss(model(x), y).backward()
            step()
            opt.zero_grad()
    else:
        @torch.compile(backend=counter)
        def train_step(x, y):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

    frames = []
    for x, y in data:
        train_step(x, y)
        frames.append(counter.frame_count)
    assert opt.steps == STEPS
    assert opt.state_dict()["wsm"]["steps"] == STEPS
    assert frames[-1] == frames[2], f"recompiled after warm-up: frames compiled per step {frames}"
    assert frames[-1] <= 8
    reference = _eager_run(spec)
    for completed in (False, True) if spec.get("keep_last") else (False,):
        got = opt.merged_state_dict(completed=completed)
        want = reference.merged_state_dict(completed=completed)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{k} completed={completed}")
    mine, theirs = opt.merge_status(), reference.merge_status()
    assert (mine["weights"] == theirs["weights"]).all()
    assert {k: v for k, v in mine.items() if k != "weights"} == {k: v for k, v in theirs.items() if k != "weights"}
