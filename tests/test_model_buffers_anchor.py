"""Regression: a window's anchor reads the merged buffers at the last checkpoint, not after the next forward.

A window is anchored at the start of the ``step()`` after its first
checkpoint. Params have not moved then, but buffers have: the forward of that
step updated BatchNorm's running statistics, and a step pre-hook (torchtitan's
``_update_expert_bias``) moved the routing bias. Before the fix the anchor read
those next-step values (readout at step 1 of a ``window=4`` linear merge: bias
0.0100 instead of the explicit merge's 0.0080). Compared here with the float64
explicit merge of per-step ``state_dict`` snapshots, every step, and across a
``torch.save`` resume taken where an anchor is due next, with the optimizer
loaded before the model (the saved ``wsm_prev`` entry, not the live buffer,
gives the anchor).
"""

from __future__ import annotations

import io

import torch
from torch import nn

import reference as R
from wsm_optim import WSMOptimizer

F64 = torch.float64
MERGES = {
    "lin": dict(schedule="linear", window=4, keep_last=True),
    "sq": dict(schedule="1-sqrt", window=6, interval=2, start=1),
}
STEPS = 13


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 4)
        self.register_buffer("expert_bias", torch.zeros(4))
        self.bn = nn.BatchNorm1d(4)  # running_mean/var: moved by every forward

    def forward(self, x):
        return self.bn(self.proj(x) + self.expert_bias)


def _bias_hook(model: Net):
    def hook(optimizer, args, kwargs):  # as torchtitan's _update_expert_bias: before the step, after the forward
        with torch.no_grad():
            sign = (-1) ** optimizer.steps * (optimizer.steps % 3 + 1)
            model.expert_bias.add_(torch.tensor([1e-2, -1e-2, 2e-2, 0.0]) * sign)

    return hook


def _build(seed: int = 0):
    torch.manual_seed(seed)
    model = Net()
    opt = WSMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), merges=MERGES, model=model, merge_buffers=True)
    opt.register_step_pre_hook(_bias_hook(model))
    return model, opt


def _snap(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(F64, copy=True) for k, v in model.state_dict().items() if v.is_floating_point()}


def _check(opt, model, snaps, s) -> None:
    keys = list(snaps[0])
    columns = [[snap[k] for k in keys] for snap in snaps]
    for merge, config in MERGES.items():
        spec = R.Window(**config)
        got = opt.merged_state_dict(merge=merge)
        for key, want in zip(keys, R.readout(spec, columns, s)):
            torch.testing.assert_close(got[key].to(F64), want, rtol=0, atol=2e-6, msg=f"{merge} step {s} {key}")
        assert torch.equal(got["bn.num_batches_tracked"], model.bn.num_batches_tracked)  # integer: live


def _train(model, opt, first: int, last: int, snaps: list) -> None:
    for step in range(first, last):
        model(torch.randn(8, 5, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        snaps.append(_snap(model))
        _check(opt, model, snaps, step + 1)


def test_anchor_reads_the_buffers_at_the_last_checkpoint_every_step():
    model, opt = _build()
    snaps = [_snap(model)]
    _train(model, opt, 0, STEPS, snaps)
    # the buffers did move, both ways (else the check above proves nothing)
    assert not torch.equal(snaps[4]["bn.running_mean"], snaps[5]["bn.running_mean"])
    assert not torch.equal(snaps[4]["expert_bias"], snaps[5]["expert_bias"])


def test_resume_where_an_anchor_is_due_is_exact_whatever_the_load_order():
    at = 8  # "lin" completes window 1 at step 8: its next anchor is due at the next step()
    model, opt = _build()
    snaps = [_snap(model)]
    _train(model, opt, 0, at, snaps)
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, blob)
    _train(model, opt, at, STEPS, snaps)

    blob.seek(0)
    saved = torch.load(blob, weights_only=False)
    fresh, fresh_opt = _build(seed=1)
    fresh_opt.load_state_dict(saved["opt"])  # before the model: the live buffers are not the checkpoint yet
    fresh.load_state_dict(saved["model"])
    resumed = snaps[: at + 1]
    _train(fresh, fresh_opt, at, STEPS, resumed)
    for merge in MERGES:
        a, b = fresh_opt.merged_state_dict(merge=merge), opt.merged_state_dict(merge=merge)
        assert all(torch.equal(a[k], b[k]) for k in a), merge


def test_state_dict_holds_the_last_checkpoint_of_each_buffer():
    model, opt = _build()
    snaps = [_snap(model)]
    _train(model, opt, 0, 3, snaps)
    home = opt.state_dict()["state"][0]
    for name in ("expert_bias", "bn.running_mean", "bn.running_var"):
        assert torch.equal(home[f"wsm_prev:{name}"], model.state_dict()[name]), name
