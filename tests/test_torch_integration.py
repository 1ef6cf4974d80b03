"""WSMOptimizer inside ordinary torch code: LR schedulers, GradScaler, param groups, swaps, state dicts."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import harness as H
import reference as R
from wsm_optim import WSMOptimizer

FP32_TOL = H.FP32_READOUT_RTOL[torch.float32]


def _check_against_reference(got: dict[str, torch.Tensor], expected, scale, names, what: str) -> None:
    for i, key in enumerate(names):
        e = H.rel_error(got[key], expected[i], scale[i])
        assert e <= FP32_TOL, f"{what} {key}: rel error {e:.3g}"


def test_is_a_torch_optimizer_and_delegates_state():
    model = nn.Linear(3, 2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = WSMOptimizer(inner, window=4)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state and opt.defaults is inner.defaults
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    assert set(opt.state) == set(model.parameters())  # momentum buffers, visible through the wrapper
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_step_hooks_run_once_per_step():
    model = nn.Linear(3, 2)
    opt = WSMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), window=4)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    assert calls == ["pre", "post"]


def test_lambda_lr_warmup_then_constant_through_the_wrapper():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    base_lr, warmup = 0.2, 4
    inner = torch.optim.SGD(model.parameters(), lr=base_lr)
    opt = WSMOptimizer(inner, "linear", window=3)
    factor = lambda s: min(1.0, (s + 1) / warmup)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        seen = []
        for s in range(8):
            seen.append(inner.param_groups[0]["lr"])
            opt.zero_grad()
            model(torch.randn(5, 4)).pow(2).mean().backward()
            before = model.weight.detach().clone()
            grad = model.weight.grad.clone()
            opt.step()
            # plain SGD: the step really used the scheduled LR of the inner group
            torch.testing.assert_close(model.weight.detach(), before - seen[-1] * grad, rtol=0, atol=1e-7)
            sched.step()
    assert seen == pytest.approx([base_lr * factor(s) for s in range(8)], rel=1e-12)
    assert seen[0] < seen[1] < seen[2] < seen[3] == seen[4] == seen[7] == pytest.approx(base_lr)
    assert opt.steps == 8


# ------------------------------------------------------------------ GradScaler
def _scaler_run(skip_batch: int | None, inject_inf: bool):
    """AdamW on a tiny MLP under ``GradScaler("cpu")``; batch ``skip_batch`` is poisoned or left out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    inner = torch.optim.AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    opt = WSMOptimizer(inner, "1-sqrt", window=4, interval=2, start=1, keep_last=True)
    scaler = torch.amp.GradScaler("cpu")
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(14)]
    status_around_skip = None
    for b, (x, y) in enumerate(batches):
        if b == skip_batch and not inject_inf:
            continue
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if b == skip_batch:
            model[0].weight.grad[0, 0] = float("inf")
            before = (opt.steps, opt.merge_status(), opt.merged_state_dict(torch.float32))
        scaler.step(opt)
        scaler.update()
        if b == skip_batch:
            status_around_skip = before, (opt.steps, opt.merge_status(), opt.merged_state_dict(torch.float32))
    return model, opt, scaler, status_around_skip


def test_grad_scaler_skipped_step_does_not_count():
    assert hasattr(torch.amp, "GradScaler")
    skip = 6  # steps 0..5 done: inside window 1 (anchored at step 5), between checkpoints
    m_a, opt_a, scaler_a, around = _scaler_run(skip, inject_inf=True)
    m_b, opt_b, scaler_b, _ = _scaler_run(skip, inject_inf=False)
    assert scaler_a.get_scale() == scaler_b.get_scale() / 2  # the inf really made the scaler skip
    (steps0, status0, merged0), (steps1, status1, merged1) = around
    assert steps1 == steps0 == skip
    assert {k: v for k, v in status0.items() if k != "weights"} == {
        k: v for k, v in status1.items() if k != "weights"
    }
    assert np.array_equal(status0["weights"], status1["weights"])
    assert all(torch.equal(merged0[k], merged1[k]) for k in merged0)
    # afterwards: the poisoned run equals the run without that batch, bitwise
    assert opt_a.steps == opt_b.steps == 13
    for (ka, pa), (kb, pb) in zip(m_a.named_parameters(), m_b.named_parameters()):
        assert torch.equal(pa, pb), ka
    for completed in (False, True):
        a = opt_a.merged_state_dict(torch.float32, completed=completed)
        b = opt_b.merged_state_dict(torch.float32, completed=completed)
        assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------- add_param_group
@pytest.mark.parametrize("join_at", [0, 1, 2, 4, 5, 6, 7, 9, 12, 13])
def test_add_param_group_after_wrapping(join_at):
    """A param added mid-run is merged from then on, as if constant at its join value since the anchor.

    Window 4 steps, interval 2, start 1: anchors at steps 1, 5, 9, 13. ``join_at``
    covers before the first anchor, at an anchor, between checkpoints, at a
    checkpoint, right after a window end, and after the completed window was
    moved into the keep_last buffer.
    """
    spec = R.Window("cosine", window=4, interval=2, start=1, keep_last=True)
    gen = torch.Generator().manual_seed(join_at)
    params = [nn.Parameter(torch.randn(3, generator=gen)), nn.Parameter(torch.randn((), generator=gen))]
    late = nn.Parameter(torch.randn(2, 2, generator=gen))
    inner = torch.optim.Adam([("a", params[0]), ("b", params[1])], lr=0.05)
    opt = WSMOptimizer(inner, **spec.as_kwargs())
    snaps = [R.snapshot(params)]
    names = ["a", "b"]
    for s in range(1, 20):
        if s - 1 == join_at:
            opt.add_param_group({"params": [late], "param_names": ["late"], "lr": 0.2})
            params.append(late)
            names.append("late")
            join_value = R.snapshot([late])[0]
            for snap in snaps:  # constant at its join value until it joined
                snap.append(join_value)
            # joining does not move the readout of the params already there, and adds the new one as is
            got = opt.merged_state_dict(torch.float32)
            assert list(got) == names
            torch.testing.assert_close(got["late"], late.detach(), rtol=1e-6, atol=0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        snaps.append(R.snapshot(params))
        got = opt.merged_state_dict(torch.float32)
        assert list(got) == names
        _check_against_reference(got, R.readout(spec, snaps, s), R.readout_scale(spec, snaps, s), names, f"step {s}")
        if R.completed_windows(spec, s):
            m = R.completed_windows(spec, s) - 1
            _check_against_reference(
                opt.merged_state_dict(torch.float32, completed=True),
                R.window_merge(spec, snaps, m),
                R.window_scale(spec, snaps, m),
                names,
                f"step {s} completed window {m}",
            )
    assert inner.param_groups[1]["lr"] == 0.2


# ---------------------------------------------------------------- merged_weights
def _trained(dtype=torch.float32, steps=7, **kw):
    gen = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(3, 2), (), (1,)]]
    opt = WSMOptimizer(torch.optim.SGD([(f"p{i}", p) for i, p in enumerate(params)], lr=0.1, momentum=0.5), **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_weights_swaps_and_restores_bit_exactly(dtype):
    params, opt = _trained(dtype, schedule="ema", window=5, interval=1, start=1)
    live = [p.detach().clone() for p in params]
    merged = opt.merged_state_dict()
    assert any(not torch.equal(merged[f"p{i}"], live[i]) for i in range(len(params)))  # not a no-op
    with opt.merged_weights() as same:
        assert same is opt
        for i, p in enumerate(params):
            assert torch.equal(p.detach(), merged[f"p{i}"])
        with pytest.raises(RuntimeError, match=r"step\(\) called inside merged_weights"):
            opt.step()
        with pytest.raises(RuntimeError, match="already active"):
            with opt.merged_weights():
                pass
    for p, v in zip(params, live):
        assert torch.equal(p.detach(), v)
    assert opt.steps == 7
    opt.step()  # usable again after the block


def test_merged_weights_restores_on_exception():
    params, opt = _trained(schedule="linear", window=4, interval=2, start=0, keep_last=True)
    live = [p.detach().clone() for p in params]
    with pytest.raises(KeyError, match="boom"):
        with opt.merged_weights(completed=True):
            completed = opt.merged_state_dict(completed=True)
            for i, p in enumerate(params):
                assert torch.equal(p.detach(), completed[f"p{i}"])
            raise KeyError("boom")
    for p, v in zip(params, live):
        assert torch.equal(p.detach(), v)
    opt.step()  # the swap flag was cleared


# ------------------------------------------------- merged_state_dict(model=...)
class TiedNet(nn.Module):
    """Embedding tied to the output head, LayerNorm, BatchNorm buffers and a frozen layer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.norm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.frozen(self.bn(self.norm(self.emb(idx)))))


@pytest.mark.parametrize("model_at", ["constructor", "call"])
def test_merged_state_dict_with_model_loads_strict(model_at):
    torch.manual_seed(0)
    net = TiedNet()
    trainable = [p for p in net.parameters() if p.requires_grad]  # no names on purpose
    inner = torch.optim.Adam(trainable, lr=0.05)
    spec = R.Window("1-sqrt", window=3)
    opt = WSMOptimizer(inner, **spec.as_kwargs(), model=net if model_at == "constructor" else None)
    kwargs = {"model": net} if model_at == "call" else {}
    if model_at == "call":
        with pytest.raises(ValueError, match="needs parameter names"):
            opt.merged_state_dict()
    snaps = [R.snapshot(trainable)]
    for _ in range(spec.window):
        opt.zero_grad()
        nn.functional.cross_entropy(net(torch.randint(0, 6, (8,))), torch.randint(0, 6, (8,))).backward()
        opt.step()
        snaps.append(R.snapshot(trainable))
    live = net.state_dict()
    sd = opt.merged_state_dict(**kwargs)
    assert list(sd) == list(live)
    assert sd["bn.num_batches_tracked"].dtype == torch.int64 and int(sd["bn.num_batches_tracked"]) == 3
    for key in ("bn.running_mean", "bn.running_var", "frozen.weight", "frozen.bias"):
        assert torch.equal(sd[key], live[key]), key
    assert torch.equal(sd["emb.weight"], sd["head.weight"])  # tied: one merged value under both keys
    expected = R.window_merge(spec, snaps, 0)
    by_param = {id(p): i for i, p in enumerate(trainable)}
    for key, value in net.state_dict(keep_vars=True).items():
        if id(value) in by_param:
            i = by_param[id(value)]
            e = H.rel_error(sd[key], expected[i], R.window_scale(spec, snaps, 0)[i])
            assert e <= FP32_TOL, key
            assert not torch.equal(sd[key], value.detach()), key  # really merged, not live
    fresh = TiedNet()
    fresh.load_state_dict(sd, strict=True)
    sd_fp16 = opt.merged_state_dict(torch.float16, **kwargs)
    assert sd_fp16["emb.weight"].dtype == torch.float16
    assert sd_fp16["bn.num_batches_tracked"].dtype == torch.int64  # buffers keep their dtype
    # new tensors, not views of live state
    sd["bn.running_mean"].add_(1.0)
    assert not torch.equal(sd["bn.running_mean"], net.bn.running_mean)


def test_merged_state_dict_without_names_or_model_fails_clearly():
    model = nn.Linear(2, 2)
    opt = WSMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), window=2)
    with pytest.raises(ValueError) as info:
        opt.merged_state_dict()
    assert "named_parameters()" in str(info.value) and "model=" in str(info.value)


def test_readout_dtypes():
    params, opt = _trained(torch.bfloat16, steps=5, schedule="cosine", window=8, interval=1)
    native = opt.merged_state_dict()
    full = opt.merged_state_dict(torch.float32)
    assert all(v.dtype == torch.bfloat16 for v in native.values())
    assert all(v.dtype == torch.float32 for v in full.values())
    # fp32 readout keeps precision a bf16 value cannot hold (mid-window merge of bf16 values)
    assert any(not torch.equal(full[k], full[k].to(torch.bfloat16).float()) for k in full)
    assert all(torch.equal(native[k], full[k].to(torch.bfloat16)) for k in full)
    assert all(v.dtype == torch.float64 for v in opt.merged_state_dict(torch.float64).values())


# ------------------------------------------------------------------- closures
def test_closure_returns_loss_and_counts_once():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    returned = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()  # needs grad enabled although WSMOptimizer.step runs under no_grad
        returned.append(loss)
        return loss

    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=2)
    loss = opt.step(closure)
    assert loss is returned[-1] and opt.steps == 1
    assert opt.step() is None and opt.steps == 2  # no closure: what SGD.step() returns

    opt = WSMOptimizer(torch.optim.LBFGS(model.named_parameters(), lr=0.5, max_iter=5), window=2)
    returned.clear()
    first = opt.step(closure)
    assert len(returned) > 1 and first is returned[0]  # LBFGS returns the first evaluation
    assert opt.steps == 1 and opt.merge_status()["checkpoint"] == 1
    assert returned[-1].item() < returned[0].item()
