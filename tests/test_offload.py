"""``offload="cpu"``: host-resident buffers folded by a worker thread, bit-identical to foreach.

On a CPU-only machine the staging copy is a host copy and the worker folds it
while training goes on; on CUDA (``cuda`` marker) the merge takes no GPU memory.
"""

import copy
import threading
import warnings

import pytest
import torch
from torch import nn

from wsm_optim import WSMOptimizer

CONFIGS = [
    dict(window=6),
    dict(window=6, interval=2, start=3, keep_last=True),
    dict(merges={"a": dict(window=4, schedule="cosine", keep_last=True), "b": dict(window=9, interval=3, start=1)}),
    dict(window=4, nonfinite="skip", keep_last=True),
]


def _run(dtype, config, steps=21, nan_at=(), **extra):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    # plain SGD for a NaN injection: no optimizer state carries the NaN past the restored params
    inner = (torch.optim.SGD(model.named_parameters(), lr=0.05) if nan_at
             else torch.optim.AdamW(model.named_parameters(), lr=0.05))
    opt = WSMOptimizer(inner, **config, **extra)
    merges = opt.merges
    reads = []
    for s in range(steps):
        model(torch.randn(2, 5, dtype=dtype)).sum().backward()
        if s in nan_at:
            model[0].weight.grad[0, 0] = float("nan")
        opt.step()
        opt.zero_grad()
        if s in nan_at:  # recover the live params; the NaN checkpoint itself was skipped
            with torch.no_grad():
                model[0].weight.nan_to_num_(0.0)
            opt.step()  # a step with no gradients: re-counts the restored params as the live term

        with warnings.catch_warnings():  # the skip mode's renormalisation warning: same on both paths
            warnings.simplefilter("ignore", RuntimeWarning)
            reads.append({m: opt.merged_state_dict(merge=m, dtype=torch.float32) for m in merges})
    return reads, opt, model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "interval-start-keep", "two-merges", "skip"])
def test_offload_is_bit_identical_to_foreach(dtype, config):
    nan_at = (5,) if config.get("nonfinite") == "skip" else ()
    want, ref, _ = _run(dtype, config, nan_at=nan_at, backend="foreach")
    got, opt, _ = _run(dtype, config, nan_at=nan_at, offload="cpu")
    assert opt.backend == "offload"
    for step, (a, b) in enumerate(zip(want, got)):
        for merge in a:
            for key in a[merge]:
                assert torch.equal(a[merge][key], b[merge][key]), (step, merge, key)
    sd = opt.state_dict()
    buffers = [v for entry in sd["state"].values() for k, v in entry.items() if k.startswith("wsm_")]
    assert buffers and all(b.device.type == "cpu" for b in buffers)


@pytest.mark.parametrize("direction", ["offload->inline", "inline->offload"])
def test_state_dicts_move_between_placements_mid_window_bit_exactly(direction):
    config = dict(window=8, interval=2, keep_last=True)
    first, second = (dict(offload="cpu"), {}) if direction == "offload->inline" else ({}, dict(offload="cpu"))
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = [torch.randn(2, 4) for _ in range(30)]
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), **config, **first)
    reference = copy.deepcopy(model)
    ref_opt = WSMOptimizer(torch.optim.SGD(reference.named_parameters(), lr=0.1, momentum=0.9), **config)
    for x in data[:13]:  # 13: mid-window, between two checkpoints
        for m, o in ((model, opt), (reference, ref_opt)):
            m(x).sum().backward()
            o.step()
            o.zero_grad()
    saved = copy.deepcopy(opt.state_dict())
    resumed = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), **config, **second)
    resumed.load_state_dict(saved)
    for x in data[13:]:
        for m, o in ((model, resumed), (reference, ref_opt)):
            m(x).sum().backward()
            o.step()
            o.zero_grad()
        for completed in (False, True):
            a = resumed.merged_state_dict(completed=completed)
            b = ref_opt.merged_state_dict(completed=completed)
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_fold_runs_on_a_worker_thread_and_readouts_wait_for_it():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(1 << 16))
    opt = WSMOptimizer(torch.optim.SGD([("p", p)], lr=0.1), window=3, offload="cpu")
    checkpoints = [p.detach().clone()]
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
        checkpoints.append(p.detach().clone())
    assert any(t.name.startswith("wsm-offload") for t in threading.enumerate())
    from wsm_optim import schedules

    c = schedules.merge_coefficients("linear", 3)
    expected = sum(float(cj) * x.double() for cj, x in zip(c, checkpoints))
    torch.testing.assert_close(opt.merged_state_dict()["p"].double(), expected, rtol=1e-6, atol=1e-6)


def test_merged_weights_and_add_param_group_with_offload():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    extra = nn.Parameter(torch.ones(2))
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=4, offload="cpu")
    ref = WSMOptimizer(torch.optim.SGD(copy.deepcopy(model).named_parameters(), lr=0.1), window=4)
    live = copy.deepcopy(model.state_dict())
    for o in (opt,):
        model(torch.randn(2, 3)).sum().backward()
        o.step()
    opt.add_param_group({"params": [("extra", extra)], "lr": 0.1})
    extra.grad = torch.ones(2)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    merged = opt.merged_state_dict()
    assert merged["extra"].device.type == "cpu" and set(merged) == {"weight", "bias", "extra"}
    before = copy.deepcopy(model.state_dict())
    with opt.merged_weights():
        assert torch.equal(model.weight, merged["weight"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    del ref, live


@pytest.mark.parametrize("kwargs,needle", [
    (dict(offload="gpu"), "offload must be one of (None, 'cpu'), got 'gpu'"),
    (dict(offload=True), "offload must be one of (None, 'cpu'), got True"),
    (dict(offload="cpu", backend="triton"), "cannot be combined with backend='triton'"),
    (dict(offload="cpu", overlap=True), "overlap=True"),
])
def test_offload_refusals(kwargs, needle):
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError) as info:
        WSMOptimizer(torch.optim.SGD([p], lr=0.1), window=2, **kwargs)
    assert needle in str(info.value)


def test_offload_with_capturable_is_refused():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="capturable=True"):
        WSMOptimizer(torch.optim.SGD([p], lr=0.1), window=2, offload="cpu", capturable=True, backend="auto")


def test_a_copy_of_an_offloaded_optimizer_works():
    p = nn.Parameter(torch.ones(3))
    opt = WSMOptimizer(torch.optim.SGD([("p", p)], lr=0.1), window=2, offload="cpu")
    p.grad = torch.ones(3)
    opt.step()
    twin = copy.deepcopy(opt)
    assert torch.equal(twin.merged_state_dict()["p"], opt.merged_state_dict()["p"])


@pytest.mark.cuda
def test_offload_takes_no_gpu_memory_and_matches_gpu_foreach():
    torch.manual_seed(0)
    model = nn.Linear(256, 256).cuda()
    twin = copy.deepcopy(model)
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=4, keep_last=True, offload="cpu")
    ref = WSMOptimizer(torch.optim.SGD(twin.named_parameters(), lr=0.1), window=4, keep_last=True, backend="foreach")
    x = torch.randn(8, 256, device="cuda")
    model(x).sum().backward()  # gradients exist before we measure
    twin(x).sum().backward()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for _ in range(9):
        opt.step()
        ref.step()
    opt.state_dict()  # joins the worker
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - base == 0
    a, b = opt.merged_state_dict(), ref.merged_state_dict()
    assert all(a[k].device.type == "cpu" for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k].cpu(), rtol=0, atol=0)


@pytest.mark.cuda
def test_offload_follows_a_model_moved_to_the_gpu_after_wrapping():
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=4, offload="cpu")
    model.cuda()
    for _ in range(5):
        model(torch.randn(2, 8, device="cuda")).sum().backward()
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()
    assert all(v.device.type == "cpu" and v.is_pinned() for e in sd["state"].values() for k, v in e.items()
               if k.startswith("wsm_"))


def test_fsdp2_offload_is_sharded_exact_and_resumes_across_placements_with_dcp(tmp_path):
    """2 gloo ranks: host DTensor shards, bit-identical to inline, DCP resume offload <-> inline."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _dist_launch import run_job

    run_job("_offload_dist_worker.py", "fsdp2", 2, tmp_path)
    assert (tmp_path / "ok").exists()


def test_compiled_step_with_offload_equals_the_eager_inline_merge():
    torch._dynamo.reset()
    runs = {}
    for name, extra, compiled in (("inline", {}, False), ("offload", dict(offload="cpu"), True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
        opt = WSMOptimizer(torch.optim.AdamW(model.named_parameters(), lr=0.01, foreach=True), window=6,
                           keep_last=True, backend="foreach", **extra)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for s in range(13):
            g = torch.Generator().manual_seed(s)
            nn.functional.mse_loss(model(torch.randn(16, 8, generator=g)), torch.randn(16, 4, generator=g)).backward()
            step()
            opt.zero_grad()
        runs[name] = (opt.steps, opt.merged_state_dict(), opt.merged_state_dict(completed=True))
    torch._dynamo.reset()
    assert runs["inline"][0] == runs["offload"][0] == 13
    for a, b in zip(runs["inline"][1:], runs["offload"][1:]):
        for k in a:  # compiled vs eager AdamW may differ by rounding: the merge of the same params must not
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_offload_buffers_stay_on_the_host_when_the_param_dtype_changes():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=4, offload="cpu")
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    before = opt.merged_state_dict(dtype=torch.float64)
    model.double()  # after wrapping: the accumulators follow to float64, and stay on the host
    sd = opt.state_dict()
    buffers = [v for e in sd["state"].values() for k, v in e.items() if k.startswith("wsm_")]
    assert buffers and all(b.device.type == "cpu" and b.dtype == torch.float64 for b in buffers)
    # same values; the readout is now computed in float64 instead of rounded in float32 first
    torch.testing.assert_close(opt.merged_state_dict(), before, rtol=1e-6, atol=0)
    model(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    assert opt.merged_state_dict()["weight"].dtype == torch.float64


@pytest.mark.parametrize("integration", ["lightning", "transformers"])
def test_integrations_pass_offload_through(integration, tmp_path):
    if integration == "lightning":
        from wsm_optim.integrations.lightning import WSMCallback

        config = WSMCallback(window=4, offload="cpu")._config
    else:
        from transformers import Trainer, TrainingArguments

        from wsm_optim.integrations.transformers import wrap_trainer

        trainer = Trainer(model=nn.Linear(2, 2), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
        config = wrap_trainer(trainer, window=4, offload="cpu")._wsm_config
    p = nn.Parameter(torch.ones(2))
    opt = WSMOptimizer(torch.optim.SGD([("p", p)], lr=0.1), **config)
    assert opt.backend == "offload"
