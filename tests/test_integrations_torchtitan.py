"""torchtitan 0.3.0: ``wsm_optim.integrations.torchtitan`` with torchtitan's own components on CPU.

torchtitan's ``Trainer`` needs an accelerator (its device falls back to
``"cuda"``), so the tests drive what it drives: a llama3 model from its
registry (``debugmodel`` shrunk), ``parallelize_llama`` (FSDP2 on gloo ranks),
the optimizer container built from its config, ``LRSchedulersContainer`` and
``CheckpointManager`` (``tests/_titan_worker.py``). One-process tests run the
same components unparallelised; one two-rank job and one one-rank job cover
FSDP2, checkpoint resume and resharding, compared with a float64 explicit
merge of the gathered checkpoints (``tests/reference.py``).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchtitan", reason="needs torchtitan (pip install 'wsm-optim[torchtitan]')")

from torchtitan.components.optimizer import (  # noqa: E402
    LRSchedulersContainer,
    OptimizersContainer,
    ParamGroupConfig,
    default_adamw,
)
from torchtitan.components.optimizer.utils import init_optim_state  # noqa: E402

from wsm_optim import WSMOptimizer  # noqa: E402
from wsm_optim.integrations.torchtitan import WSMConfig, WSMOptimizersContainer, with_wsm  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _titan_worker as W  # noqa: E402
from _dist_launch import run_job as launch  # noqa: E402
import reference as R  # noqa: E402

JOB_TIMEOUT_S = 300
#: fp32 accumulation of a handful of checkpoints against float64, relative to max |checkpoint|
REFERENCE_RTOL = 1e-5


# ------------------------------------------------------------------ config
def test_with_wsm_is_one_config_entry_that_torchtitan_builds():
    base = default_adamw(lr=1e-3, weight_decay=0.0)
    base.implementation = "foreach"
    config = with_wsm(base, schedule="1-sqrt", window=4, keep_last=True)
    assert isinstance(config, OptimizersContainer.Config)  # fits Trainer.Config.optimizer
    assert config.param_groups == base.param_groups and config.implementation == "foreach"
    assert config.wsm == WSMConfig(schedule="1-sqrt", window=4, keep_last=True)

    _, _, model = W.build_local_model()
    optimizers = config.build(model_parts=[model])  # what torchtitan's Trainer calls
    assert type(optimizers) is WSMOptimizersContainer
    assert all(type(o) is WSMOptimizer for o in optimizers.optimizers)
    inner = optimizers.optimizers[0].inner
    assert type(inner) is torch.optim.AdamW and inner.param_groups[0]["foreach"] is True
    names = [n for o in optimizers for g in o.param_groups for n in g["param_names"]]
    assert names == [n for n, _ in model.named_parameters()]
    assert optimizers.merges == ("default",) and optimizers.steps == 0


def test_config_errors_name_the_argument():
    with pytest.raises(TypeError, match="window is required"):
        with_wsm(default_adamw())
    with pytest.raises(ValueError, match="window"):
        with_wsm(default_adamw(), window=0)
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['windw'\]; allowed: .*'window'"):
        with_wsm(default_adamw(), windw=4)
    with pytest.raises(TypeError, match="already has WSM"):
        with_wsm(with_wsm(default_adamw(), window=4), window=8)
    with pytest.raises(TypeError, match="OptimizersContainer.Config"):
        with_wsm({"lr": 1e-3}, window=4)
    with pytest.raises(ValueError, match="WSMConfig.nonfinite must be 'raise' or 'skip', got 'ignore'"):
        WSMConfig(window=4, nonfinite="ignore")
    with pytest.raises(ValueError, match=r"WSMConfig.backend must be one of \('auto', 'foreach', 'triton'\), got 'cuda'"):
        WSMConfig(window=4, backend="cuda")
    with pytest.raises(TypeError, match="WSMConfig.overlap must be a bool .*got str 'no'"):
        WSMConfig(window=4, overlap="no")
    with pytest.raises(TypeError, match="config.wsm must be a WSMConfig"):
        WSMOptimizersContainer(default_adamw(), model_parts=[torch.nn.Linear(2, 2)])


# ------------------------------------------------- one process, no parallelism
@pytest.fixture()
def local_run(tmp_path):
    return W.build_run(tmp_path, None, seed=0)


def test_init_optim_state_before_the_first_step_does_not_count(local_run):
    """torchtitan's zero-gradient lr=0 step (before save and load) is no merge step and leaves params as they were."""
    optimizers, model = local_run.optimizers, local_run.model
    before = W.full_params(model)
    optimizers.state_dict()  # runs init_optim_state on the empty optimizer state
    init_optim_state(optimizers.optimizers[0])  # torchtitan's own call, now a no-op: the state exists
    assert optimizers.steps == 0
    assert optimizers.merge_status("lin")["anchored"] is False
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    W.train(local_run, 0, 3, {}, {})
    assert optimizers.steps == 3
    status = optimizers.merge_status("lin")
    assert (status["anchored"], status["checkpoint"]) == (True, 3)


def test_init_optim_state_called_on_a_wsm_optimizer_itself_does_not_count():
    """torchtitan's ``init_optim_state`` on a bare ``WSMOptimizer`` (as its torchft optimizer calls it), not
    through the container: no merge step; the merge then equals a float64 explicit merge from the live start."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    spec = R.Window(schedule="1-sqrt", window=4, interval=2)
    opt = WSMOptimizer(torch.optim.AdamW(model.named_parameters(), lr=0.05), **spec.as_kwargs())
    snapshots = [R.snapshot(list(model.parameters()))]
    init_optim_state(opt)  # empty state: a zero-gradient step at lr = 0
    assert opt.steps == 0 and opt.merge_status()["anchored"] is False and len(opt.inner.state) == 2
    assert all(torch.equal(a, b.float()) for a, b in zip(model.parameters(), snapshots[0]))
    for s in range(1, 7):
        model(torch.randn(3, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        snapshots.append(R.snapshot(list(model.parameters())))
        merged = opt.merged_state_dict(torch.float64)
        for (name, _), ref in zip(model.named_parameters(), R.readout(spec, snapshots, s)):
            scale = max(1.0, float(ref.abs().max()))
            assert float((merged[name] - ref).abs().max()) < REFERENCE_RTOL * scale, (s, name)
    assert opt.steps == 6


def test_flat_state_dict_round_trips_the_merge_by_param_fqn(local_run, tmp_path):
    W.train(local_run, 0, 3, {}, {})
    flat = local_run.optimizers.state_dict()
    fqn = "layers.0.attention.qkv_linear.wqkv.weight"
    assert {f"state.{fqn}.wsm_acc.lin", f"state.{fqn}.wsm_acc.sq", f"state.{fqn}.wsm_last.sq",
            f"state.{fqn}.exp_avg", f"param_groups.{fqn}.wsm"} <= flat.keys()
    assert flat[f"param_groups.{fqn}.wsm"]["steps"] == 3
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in flat.items()}

    other = W.build_run(tmp_path / "other", None, seed=1)
    other.model.load_state_dict(local_run.model.state_dict())
    other.optimizers.load_state_dict(saved)
    assert other.optimizers.steps == 3
    for merge in ("lin", "sq"):
        mine, theirs = (r.optimizers.merge_status(merge) for r in (local_run, other))
        np.testing.assert_array_equal(mine.pop("weights"), theirs.pop("weights"))
        assert mine == theirs
    other.schedulers.load_state_dict(local_run.schedulers.state_dict())
    for run in (local_run, other):
        W.train(run, 3, 4, {}, {})
    for merge in ("lin", "sq"):
        mine, theirs = (r.optimizers.merged_state_dict(merge=merge) for r in (local_run, other))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_two_optimizer_types_each_merge_their_params_and_save_together():
    """Param groups with different optimizers (torchtitan builds one optimizer per type): one merge each."""
    groups = [
        ParamGroupConfig(pattern=r"norm", optimizer_name="Adam", optimizer_kwargs={"lr": 1e-2}),
        ParamGroupConfig(pattern=r".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 3e-3, "weight_decay": 0.1}),
    ]
    config = with_wsm(OptimizersContainer.Config(param_groups=groups, implementation="for-loop"),
                      schedule="cosine", window=3)
    _, _, model = W.build_local_model()
    optimizers = config.build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.0).build(
        optimizers=optimizers, training_steps=5
    )
    run = types.SimpleNamespace(model=model, optimizers=optimizers, schedulers=schedulers, state=W.TrainState())
    assert [type(o.inner) for o in run.optimizers] == [torch.optim.Adam, torch.optim.AdamW]
    snapshots = {0: W.full_params(model)}
    for step in range(1, 6):
        W.train_step(run, step)
        snapshots[step] = W.full_params(model)
    names = list(snapshots[0])
    want = R.readout(R.Window(schedule="cosine", window=3), [[snapshots[s][n].double() for n in names]
                                                              for s in range(6)], 5)
    merged = run.optimizers.merged_state_dict()
    assert list(merged) == [n for n in names if "norm" in n] + [n for n in names if "norm" not in n]
    for name, value in zip(names, want):
        torch.testing.assert_close(merged[name].double(), value, rtol=1e-6, atol=1e-7)
    flat = run.optimizers.state_dict()
    assert flat["param_groups.norm.weight.wsm"]["steps"] == flat["param_groups.lm_head.weight.wsm"]["steps"] == 5
    assert "state.norm.weight.wsm_acc.default" in flat and "state.lm_head.weight.wsm_acc.default" in flat


def test_loading_a_checkpoint_saved_without_wsm_names_the_missing_key(local_run, tmp_path):
    _, _, model = W.build_local_model(seed=3)
    plain = default_adamw(lr=1e-3).build(model_parts=[model])
    flat = plain.state_dict()
    missing = r"no 'param_groups\.tok_embeddings\.weight\.wsm' \(a checkpoint saved without WSM"
    with pytest.raises(KeyError, match=missing):
        local_run.optimizers.load_state_dict(flat)


def test_merged_model_exports_in_torchtitan_and_hf_naming(local_run):
    W.train(local_run, 0, 3, {}, {})
    optimizers, model = local_run.optimizers, local_run.model
    live = W.full_params(model)
    merged = optimizers.merged_state_dict(merge="lin")
    exported = optimizers.merged_model_state_dict(merge="lin")
    assert exported.keys() == model.state_dict().keys()  # the keys torchtitan's checkpoint holds under MODEL
    check_loads_as_merged(exported, merged)
    assert all(torch.equal(live[n], p) for n, p in model.named_parameters())  # live weights restored

    adapter = local_run.checkpointer.sd_adapter
    hf = optimizers.merged_hf_state_dict(adapter, merge="lin")
    assert hf.keys() == adapter.to_hf(model.state_dict()).keys()
    assert "model.layers.0.self_attn.q_proj.weight" in hf
    assert all(torch.equal(hf[k], v) for k, v in adapter.to_hf(exported).items())
    with pytest.raises(TypeError, match="sd_adapter must be a torchtitan state-dict adapter"):
        optimizers.merged_hf_state_dict(None)


def check_loads_as_merged(exported: dict, merged: dict) -> None:
    """``exported`` (model state-dict keys) is the merged model: a fresh model loads it and holds ``merged``.

    Loading runs the model's own hooks (llama3 fuses ``wq``/``wk``/``wv`` back into ``wqkv``).
    """
    _, _, model = W.build_local_model(seed=5)
    model.load_state_dict(exported, strict=True)
    params = dict(model.named_parameters())
    assert params.keys() == merged.keys()
    for name, value in merged.items():
        assert torch.equal(params[name], value), name


# ------------------------------------------------- FSDP2 on gloo ranks
def run_job(scenario: str, world: int, out_dir: Path) -> dict:
    """Run ``world`` ranks of ``_titan_worker.py scenario``; rank 0's record, or fail with every rank's log."""
    launch("_titan_worker.py", scenario, world, out_dir, timeout_s=JOB_TIMEOUT_S)
    return torch.load(out_dir / f"{scenario}-ws{world}.pt", weights_only=False)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Train on 2 FSDP2 ranks (save mid-window, resume in place), then resume that checkpoint on 1 rank."""
    out = tmp_path_factory.mktemp("titan")
    train = run_job("train", 2, out)
    reshard = run_job("reshard", 1, out)
    return out, train, reshard


def expected_status(merge: str, step: int) -> tuple:
    spec = W.SPECS[merge]
    u = (step - 1) % spec.window + 1
    return u // spec.interval, (step - spec.start) // spec.window


def test_fsdp2_init_optim_state_at_the_seed_checkpoint_does_not_count(jobs):
    _, train, _ = jobs
    after = train["after_init"]
    assert after["steps"] == 0 and after["status"]["anchored"] is False and after["params_unchanged"]


def test_fsdp2_merged_readouts_match_float64_explicit_merge(jobs):
    _, train, _ = jobs
    for step, errors in train["errors"].items():
        assert set(errors) == {"merged.lin", "merged.sq", "completed.sq"}
        for key, error in errors.items():
            assert error < REFERENCE_RTOL, (step, key, error)
        for merge in W.MERGES:
            status = train["status"][step][merge]
            assert (status["checkpoint"], status["windows_completed"]) == expected_status(merge, step)


def test_checkpoint_manager_resume_mid_window_continues_exactly(jobs):
    _, train, _ = jobs
    resumed = train["resumed_at"]
    assert (resumed["steps"], resumed["train_step"]) == (W.SAVE_STEP, W.SAVE_STEP)
    for merge in W.MERGES:
        status = resumed["status"][merge]
        assert (status["checkpoint"], status["windows_completed"]) == expected_status(merge, W.SAVE_STEP)
    assert resumed["lr"] == [3e-3]  # the LR schedulers resumed past warmup
    assert train["resume_difference"] == {8: 0.0, 10: 0.0}  # every readout and param, bit for bit


def test_checkpoint_resharded_from_two_ranks_to_one_continues_the_merge(jobs):
    _, _, reshard = jobs
    assert (reshard["resumed_at"]["steps"], reshard["resumed_at"]["train_step"]) == (W.SAVE_STEP, W.SAVE_STEP)
    assert reshard["loaded_params_difference"] == 0.0
    assert set(reshard["errors"]) == {8, 10}
    for step, errors in reshard["errors"].items():
        for key, error in errors.items():
            assert error < REFERENCE_RTOL, (step, key, error)


def test_fsdp2_merged_export_and_save_merged_hf(jobs):
    out, train, _ = jobs
    export = train["export"]
    assert export["live_restored"]
    check_loads_as_merged(export["model"], export["merged"])
    _, cfg = W.model_config()
    adapter = W.model_config()[0].state_dict_adapter(cfg, None)
    want = adapter.to_hf(export["model"])
    assert export["hf"].keys() == want.keys() and all(torch.equal(export["hf"][k], v) for k, v in want.items())

    from safetensors.torch import load_file

    files = sorted((out / "merged-hf").glob("*.safetensors"))
    assert files, f"save_merged_hf wrote no safetensors file into {out / 'merged-hf'}"
    written = {k: v for f in files for k, v in load_file(f).items()}
    assert written.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(written[key], value), key


def test_checkpoint_holds_the_merge_as_sharded_tensors_keyed_by_param_fqn(jobs):
    """torchtitan's checkpoint stores each accumulator like its param: global shape, one chunk per FSDP2 rank."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out, train, _ = jobs
    metadata = FileSystemReader(str(out / "checkpoint" / f"step-{W.SAVE_STEP}")).read_metadata().state_dict_metadata
    shapes = {name: tuple(value.shape) for name, value in train["export"]["merged"].items()}
    for fqn, shape in shapes.items():
        for key in (f"optimizer.state.{fqn}.wsm_acc.lin", f"optimizer.state.{fqn}.wsm_acc.sq",
                    f"optimizer.state.{fqn}.wsm_last.sq"):
            entry = metadata[key]
            assert isinstance(entry, TensorStorageMetadata) and tuple(entry.size) == shape, key
            assert entry.properties.dtype == torch.float32, key
            assert len(entry.chunks) == 2, key  # dim 0 sharded over the two ranks
        # the counters, which DCP flattens into one entry per field
        assert {f"optimizer.param_groups.{fqn}.wsm.steps", f"optimizer.param_groups.{fqn}.wsm.merges.sq.counters.t",
                f"optimizer.param_groups.{fqn}.wsm.merges.lin.config.window"} <= metadata.keys()


# ------------------------------------------- MoE: merged expert_bias_E (merge_buffers=True)
def test_merge_buffers_config_is_a_bool():
    assert WSMConfig(window=4, merge_buffers=True).merge_buffers is True
    with pytest.raises(TypeError, match=r"WSMConfig.merge_buffers must be a bool \(True or False\), got str 'yes'"):
        with_wsm(default_adamw(), window=4, merge_buffers="yes")


def test_merge_buffers_go_to_the_first_optimizer_of_each_model_part_only():
    """Two optimizer types over one model part (BatchNorm): the part's buffers are merged (and saved) once."""
    import torch.nn as nn

    groups = [
        ParamGroupConfig(pattern=r"norm", optimizer_name="Adam", optimizer_kwargs={"lr": 1e-2}),
        ParamGroupConfig(pattern=r".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 3e-3}),
    ]
    part = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    part[1].register_module("norm", nn.LayerNorm(4))  # a param named "norm" for the first optimizer
    config = with_wsm(OptimizersContainer.Config(param_groups=groups), window=2, merge_buffers=True)
    optimizers = config.build(model_parts=[part])
    owners = [o._runtime.registry.model_buffers for o in optimizers]
    assert owners[0] is not None and owners[0].names == ["1.running_mean", "1.running_var"]
    assert owners[1] is None
    for _ in range(3):
        part(torch.randn(5, 3)).sum().backward()
        optimizers.step()
        optimizers.zero_grad()
    merged = optimizers.merged_state_dict()
    assert [k for k in merged if "running" in k] == ["1.running_mean", "1.running_var"]
    assert "1.num_batches_tracked" not in merged  # integer buffer: not merged
    flat = optimizers.state_dict()
    assert sum(k.endswith(":1.running_mean") and ".wsm_acc." in k for k in flat) == 1


def test_fsdp2_moe_merged_expert_bias_matches_float64_explicit_merge(jobs):
    """qwen3 MoE (load_balance_coeff set), torchtitan's _update_expert_bias pre-hook, FSDP2 on 2 gloo ranks."""
    _, train, _ = jobs
    moe = train["moe"]
    assert moe["readout_keys"][-1] == W.MOE_BIAS and "layers.0.moe.tokens_per_expert_E" not in moe["readout_keys"]
    assert moe["tokens_live"]  # non-persistent: neither merged nor exported
    bias = moe["bias"]
    assert not torch.equal(bias[W.SAVE_STEP], bias[W.SAVE_STEP + 1]), "the hook did not move expert_bias_E"
    assert set(moe["errors"]) == set(range(1, W.STEPS + 1))
    for step, errors in moe["errors"].items():
        for key, (params_error, bias_error) in errors.items():
            assert params_error < REFERENCE_RTOL and bias_error < REFERENCE_RTOL, (step, key, params_error, bias_error)
    # exports and merged_weights carry the merged bias; the live one comes back
    assert torch.equal(moe["model_export_bias"], moe["merged_bias"])
    assert torch.equal(moe["swapped_bias"], moe["merged_bias"])
    assert torch.equal(moe["restored_bias"], moe["live_bias_after_export"])
    assert not torch.equal(moe["merged_bias"], moe["live_bias_after_export"])
    # saved once, under the first param of the part's first optimizer
    fqn = "tok_embeddings.weight"
    assert moe["home_keys"] == sorted([f"state.{fqn}.wsm_acc.lin:{W.MOE_BIAS}", f"state.{fqn}.wsm_last.lin:{W.MOE_BIAS}",
                                       f"state.{fqn}.wsm_origin.lin:{W.MOE_BIAS}", f"state.{fqn}.wsm_anchor:{W.MOE_BIAS}"])


def test_fsdp2_moe_checkpoint_manager_resume_is_exact_also_on_one_rank(jobs):
    _, train, reshard = jobs
    moe = train["moe"]
    assert moe["resumed_steps"] == W.SAVE_STEP
    assert moe["resume_difference"] == {7: 0.0, 8: 0.0, 9: 0.0, 10: 0.0}  # params, merged params and bias
    moved = reshard["moe"]
    assert moved["steps"] == W.SAVE_STEP and moved["loaded_bias_difference"] == 0.0
    assert set(moved["errors"]) == {7, 8, 9, 10}
    for step, errors in moved["errors"].items():
        for key, (params_error, bias_error) in errors.items():
            assert params_error < REFERENCE_RTOL and bias_error < REFERENCE_RTOL, (step, key, params_error, bias_error)
