"""``merge_buffers=True`` against an explicit float64 merge of per-step snapshots (plain torch).

Regression: a window's anchor must take the buffers as they stood when the
previous step ended (checkpoint ``s`` of the window), not after the next
step's forward had already updated them (which counted that forward twice and
the anchor's own value never).
"""

import copy

import pytest
import torch
from torch import nn

from reference import Window, readout, snapshot, window_merge
from wsm_optim import WSMOptimizer
from wsm_optim.integrations._final_weights import forget_final_weights, keep_final_weights

class Net(nn.Module):
    """Linear -> BatchNorm -> Linear, plus a float buffer updated in forward (a routing-bias stand-in)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("cache", torch.zeros(2), persistent=False)  # non-persistent: stays live

    def forward(self, x):
        h = self.body[0](x)
        if self.training:
            self.scale.mul_(0.5).add_(h.detach().abs().mean(0), alpha=0.5)
            self.cache.add_(1.0)
        return self.body[2](self.body[1](h * self.scale))


def _buffers(model):
    return [model.body[1].running_mean, model.body[1].running_var, model.scale]


def _step(model, wsm, seed):
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(seed))
    model(x).pow(2).mean().backward()
    wsm.step()
    wsm.zero_grad()


def _wsm(model, spec):
    inner = torch.optim.SGD(model.named_parameters(), lr=0.1)
    return WSMOptimizer(inner, model=model, merge_buffers=True, **spec.as_kwargs())


KEYS = ["body.1.running_mean", "body.1.running_var", "scale"]


@pytest.mark.parametrize("spec", [Window("linear", window=3), Window("1-sqrt", window=4, interval=2, start=1,
                                                                       keep_last=True)])
def test_merged_buffers_equal_explicit_float64_merge_of_step_snapshots(spec):
    torch.manual_seed(0)
    model = Net()
    wsm = _wsm(model, spec)
    snaps = [snapshot(_buffers(model))]  # snapshots[s]: buffers after s steps (s = 0: when wrapped)
    params = [snapshot(list(model.parameters()))]
    for s in range(1, 10):
        _step(model, wsm, s)
        snaps.append(snapshot(_buffers(model)))
        params.append(snapshot(list(model.parameters())))
        merged = wsm.merged_state_dict()
        for key, expected in zip(KEYS, readout(spec, snaps, s)):
            torch.testing.assert_close(merged[key].double(), expected, rtol=1e-6, atol=1e-7, msg=f"{key} step {s}")
        for key, expected in zip(["body.0.weight", "body.0.bias"], readout(spec, params, s)):
            torch.testing.assert_close(merged[key].double(), expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(merged["body.1.num_batches_tracked"], model.body[1].num_batches_tracked)  # live
        assert "cache" not in merged
        if spec.keep_last and s >= spec.start + spec.window:  # the last completed window
            m = (s - spec.start) // spec.window - 1
            done = wsm.merged_state_dict(completed=True)
            for key, expected in zip(KEYS, window_merge(spec, snaps, m)):
                torch.testing.assert_close(done[key].double(), expected, rtol=1e-6, atol=1e-7)
        with wsm.merged_weights():  # the swap puts the same merged buffers in the module
            for key, b in zip(KEYS, _buffers(model)):
                assert torch.equal(b, merged[key])
        assert all(torch.equal(b.double(), v) for b, v in zip(_buffers(model), snaps[-1]))  # live ones back


def test_resume_right_before_an_anchor_is_exact():
    """Saved at a window's end: the loaded optimizer anchors the next window at the loaded model's buffers."""
    spec = Window("linear", window=2)
    torch.manual_seed(0)
    model_a = Net()
    wsm_a = _wsm(model_a, spec)
    for s in range(1, 5):
        _step(model_a, wsm_a, s)
    saved_model, saved_opt = copy.deepcopy(model_a.state_dict()), copy.deepcopy(wsm_a.state_dict())
    torch.manual_seed(1)
    model_b = Net()
    model_b.load_state_dict(saved_model)
    wsm_b = _wsm(model_b, spec)
    wsm_b.load_state_dict(saved_opt)
    assert sorted(wsm_b.state_dict()["wsm"]["buffers"]) == sorted(KEYS)
    for s in range(5, 8):
        _step(model_a, wsm_a, s)
        _step(model_b, wsm_b, s)
        a, b = wsm_a.merged_state_dict(), wsm_b.merged_state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_readout_without_model_names_the_merged_buffers():
    """With the optimizer's model dropped (as DeepSpeed's attach does), readouts still give the merged buffers."""
    torch.manual_seed(0)
    model = Net()
    wsm = _wsm(model, Window("linear", window=3))
    for s in range(1, 3):
        _step(model, wsm, s)
    full = wsm.merged_state_dict()
    wsm.model = None
    bare = wsm.merged_state_dict()
    assert set(bare) == {n for n, _ in model.named_parameters()} | set(KEYS)
    assert all(torch.equal(bare[k], full[k]) for k in bare)


def test_final_weights_kept_aside_include_merged_buffers():
    """A trainer loading other weights after the run (load_best_model_at_end) leaves the run's merge readable."""
    torch.manual_seed(0)
    model = Net()
    wsm = _wsm(model, Window("linear", window=4))
    for s in range(1, 3):  # mid-window: readouts use the live buffers as their newest term
        _step(model, wsm, s)
    before = wsm.merged_state_dict()
    keep_final_weights(wsm)
    other = Net().state_dict()
    model.load_state_dict(other)
    after = wsm.merged_state_dict()
    merged = [n for n, _ in model.named_parameters()] + KEYS  # num_batches_tracked is live: the loaded one
    assert all(torch.equal(after[k], before[k]) for k in merged)
    assert torch.equal(model.scale, other["scale"])  # the loaded weights are back after the readout
    forget_final_weights(wsm)
