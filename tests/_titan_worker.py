"""One rank of a torchtitan job for ``tests/test_integrations_torchtitan.py`` (CPU, gloo).

Run as ``python _titan_worker.py SCENARIO OUT_DIR`` under the usual
``RANK``/``WORLD_SIZE``/``MASTER_*`` variables. torchtitan's ``Trainer`` needs an
accelerator (without one its device falls back to ``"cuda"``), so this drives
its components directly, as its ``Trainer`` does: a llama3 model from its
registry, ``parallelize_llama`` (FSDP2 over all ranks), the optimizer container
built from its config (``with_wsm(default_adamw(...))``), ``LRSchedulersContainer``
and ``CheckpointManager``.

Scenarios:

* ``train``: save a checkpoint before the first step (torchtitan's
  ``init_optim_state`` runs then), train ``STEPS`` steps saving a checkpoint
  at ``SAVE_STEP`` (mid-window), record the full params after every step and
  the merged readouts at ``READ_STEPS``, export the merged model (torchtitan
  and HF naming, and ``save_merged_hf``); then, in the same processes, build
  everything anew, resume from ``SAVE_STEP`` through the ``CheckpointManager``
  and train to ``STEPS`` again (the test compares both runs bit for bit).
* ``reshard``: resume the ``train`` checkpoint at another world size and train on.

Rank 0 writes ``{scenario}-ws{world}.pt`` for the test to compare.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import reference as R  # tests/reference.py: the float64 explicit merge

MERGES = {
    "lin": dict(schedule="linear", window=4),
    "sq": dict(schedule="1-sqrt", window=4, interval=2, keep_last=True),
}
STEPS = 10
SAVE_STEP = 6  # window 2 (steps 4..8) is half done
READ_STEPS = (6, 8, 10)  # mid-window (the saved step), window end, mid-window
GLOBAL_BATCH, SEQ = 4, 16
VOCAB = 256
PARALLELISM = "partial_dtensor"  # torchtitan's DTensor-parameter FSDP2 path


def use_cpu_device() -> None:
    # torchtitan picks its device type once, at import, and falls back to "cuda"
    # without an accelerator; its meshes must be CPU (gloo) meshes here.
    import torch.distributed.fsdp  # noqa: F401  (registers the "fake" backend torchtitan's meshes use for size-1 dims)
    import torchtitan.distributed.parallel_dims as parallel_dims

    parallel_dims.device_type = "cpu"


def model_config():
    """llama3 'debugmodel' from torchtitan's registry, shrunk: 1 layer, vocab 256, causal SDPA.

    Returns ``(model_spec, model_config)``.
    """
    from torchtitan.config import ParallelismConfig
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import model_registry

    spec = model_registry("debugmodel")
    cfg = spec.model
    cfg.layers = cfg.layers[:1]
    cfg.vocab_size = cfg.tok_embeddings.num_embeddings = cfg.lm_head.out_features = VOCAB
    for layer in cfg.layers:
        # FlexAttention has no backward on CPU; torchtitan's own CPU-free tests swap in SDPA the same way.
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    cfg.update_from_config(config=types.SimpleNamespace(parallelism=ParallelismConfig(spmd_backend=PARALLELISM)))
    return spec, cfg


def build_local_model(seed: int = 0):
    """The model of :func:`model_config` on CPU, not parallelised (plain tensors): ``(spec, config, model)``."""
    spec, cfg = model_config()
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return spec, cfg, model.train()


def build_model(parallel_dims):
    """The model of :func:`model_config`, parallelised by torchtitan's ``parallelize_llama`` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig

    spec, cfg = model_config()
    parallelism = ParallelismConfig(spmd_backend=PARALLELISM)
    with torch.device("meta"):
        model = cfg.build()
    model = spec.parallelize_fn(
        model, parallel_dims=parallel_dims, training=TrainingConfig(local_batch_size=2, seq_len=SEQ),
        parallelism=parallelism, compile_config=CompileConfig(), ac_config=None, dump_folder="",
    )
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # torchtitan turns FSDP's gradient division off (factor 1.0; the loss is divided by the
            # global token count instead), which FSDP runs as PREMUL_SUM: gloo has no PREMUL_SUM,
            # and with a factor of 1.0 a plain SUM is the same reduction.
            module.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    return spec, cfg, model


class TrainState:
    """The training loop's own counter, checkpointed as torchtitan's Trainer checkpoints its ``step``."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self):
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, sd) -> None:
        self.step = int(sd["step"])


def build_run(out_dir: Path, parallel_dims, seed: int):
    """Model, optimizers (``with_wsm(default_adamw(...))``), LR schedulers, train state and checkpointer.

    ``parallel_dims=None``: the model is not parallelised (one process, no process group).
    """
    from torchtitan.components.optimizer import default_adamw

    from wsm_optim.integrations.torchtitan import with_wsm

    torch.manual_seed(seed)
    spec, cfg, model = build_model(parallel_dims) if parallel_dims is not None else build_local_model(seed)
    optimizers = with_wsm(default_adamw(lr=3e-3), merges=MERGES, backend="foreach").build(model_parts=[model])
    return _run_parts(out_dir, spec, cfg, model, optimizers)


def _run_parts(out_dir: Path, spec, cfg, model, optimizers) -> types.SimpleNamespace:
    """torchtitan's LR schedulers, train state and ``CheckpointManager`` around a built model and optimizers."""
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer

    schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.0).build(
        optimizers=optimizers, training_steps=STEPS
    )
    state = TrainState()
    checkpointer = CheckpointManager.Config(
        enable=True, folder="checkpoint", interval=SAVE_STEP, keep_latest_k=0, last_save_model_only=False,
    ).build(
        dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
        states={"train_state": state}, sd_adapter=spec.state_dict_adapter(cfg, None), base_folder=str(out_dir),
    )
    return types.SimpleNamespace(model=model, optimizers=optimizers, schedulers=schedulers,
                                 state=state, checkpointer=checkpointer, spec=spec, cfg=cfg)


def batch(step: int) -> torch.Tensor:
    """This rank's rows of the global batch of ``step`` (the same global batch at any world size)."""
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1000 + step))
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    rows = GLOBAL_BATCH // world
    return tokens[rank * rows:(rank + 1) * rows]


def train_step(run, step: int) -> None:
    tokens = batch(step)
    logits = run.model(tokens[:, :-1])
    # as torchtitan's loss: summed over this rank's tokens, divided by the global token count
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum"
    ) / (GLOBAL_BATCH * SEQ)
    loss.backward()
    run.optimizers.step()
    run.schedulers.step()
    run.optimizers.zero_grad()
    run.state.step = step


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain full copy of a (possibly ``DTensor``) tensor; gathering is a collective."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def full_params(model) -> dict[str, torch.Tensor]:
    return {name: full(p) for name, p in model.named_parameters()}


SPECS = {name: R.Window(**config) for name, config in MERGES.items()}


def readouts(run) -> dict:
    """Counters and full (gathered) merged readouts of every merge, keyed ``merged.<merge>`` / ``completed.<merge>``."""
    opt = run.optimizers
    out = {"steps": opt.steps, "status": {m: opt.merge_status(m) for m in opt.merges}, "live": full_params(run.model)}
    for m in opt.merges:
        out[f"merged.{m}"] = opt.merged_state_dict(merge=m, full=True)
        if MERGES[m].get("keep_last") and out["status"][m]["windows_completed"] > 0:
            out[f"completed.{m}"] = opt.merged_state_dict(merge=m, completed=True, full=True)
    return out


def reference_errors(got: dict, snapshots: dict, step: int) -> dict[str, float]:
    """Largest ``|readout - float64 explicit merge| / max |checkpoint|`` per readout (``tests/reference.py``).

    ``snapshots``: ``{step: {name: full param}}`` holding step 0 and every step the merges use.
    """
    names = list(got["live"])
    snaps = {s: [snap[n].double() for n in names] for s, snap in snapshots.items()}
    errors = {}
    for m, spec in SPECS.items():
        wanted = {f"merged.{m}": (R.readout(spec, snaps, step), R.readout_scale(spec, snaps, step))}
        if f"completed.{m}" in got:
            last = R.completed_windows(spec, step) - 1
            wanted[f"completed.{m}"] = (R.window_merge(spec, snaps, last), R.window_scale(spec, snaps, last))
        for key, (ref, scale) in wanted.items():
            errors[key] = max(
                ((got[key][n].double() - r).abs() / sc.clamp_min(1e-30)).max().item()
                for n, r, sc in zip(names, ref, scale)
            )
    return errors


def max_difference(a: dict, b: dict) -> float:
    return max((a[k][n] - b[k][n]).abs().max().item() for k in a if k.startswith(("merged.", "completed.", "live"))
               for n in a[k])


def train(run, first: int, last: int, snapshots: dict, reads: dict) -> None:
    for step in range(first + 1, last + 1):
        train_step(run, step)
        snapshots[step] = full_params(run.model)
        if step in READ_STEPS:
            reads[step] = readouts(run)
        run.checkpointer.save(curr_step=step)


def scenario_train(out_dir: Path, parallel_dims) -> dict:
    run = build_run(out_dir, parallel_dims, seed=0)
    snapshots, reads = {0: full_params(run.model)}, {}
    # torchtitan writes a checkpoint at step 0 when the interval divides it: the
    # optimizer state is still empty, so init_optim_state's lr = 0 step runs here.
    assert run.checkpointer.save(curr_step=0)
    record = {"after_init": {"steps": run.optimizers.steps, "status": run.optimizers.merge_status("lin"),
                             "params_unchanged": max_difference({"live": full_params(run.model)},
                                                                {"live": snapshots[0]}) == 0.0}}
    train(run, 0, STEPS, snapshots, reads)
    record["errors"] = {step: reference_errors(reads[step], snapshots, step) for step in READ_STEPS}
    record["status"] = {step: reads[step]["status"] for step in READ_STEPS}
    torch.save({s: snapshots[s] for s in (0, *range(SAVE_STEP - 2, SAVE_STEP + 1))}, out_dir / "snapshots.pt")

    opt = run.optimizers
    live_before = full_params(run.model)
    record["export"] = {
        "merged": reads[STEPS]["merged.lin"],
        "model": opt.merged_model_state_dict(merge="lin", full=True),
        "hf": opt.merged_hf_state_dict(run.checkpointer.sd_adapter, merge="lin", full=True),
    }
    opt.save_merged_hf(run.checkpointer, str(out_dir / "merged-hf"), merge="lin")
    record["export"]["live_restored"] = max_difference({"live": full_params(run.model)}, {"live": live_before}) == 0.0
    run.checkpointer.close()

    resumed = build_run(out_dir, parallel_dims, seed=1)
    assert resumed.checkpointer.load(step=SAVE_STEP)
    record["resumed_at"] = {"steps": resumed.optimizers.steps, "train_step": resumed.state.step,
                            "status": {m: resumed.optimizers.merge_status(m) for m in resumed.optimizers.merges},
                            "lr": [g["lr"] for o in resumed.optimizers for g in o.param_groups]}
    again = {}
    train(resumed, SAVE_STEP, STEPS, {}, again)
    record["resume_difference"] = {step: max_difference(again[step], reads[step]) for step in again}
    resumed.checkpointer.close()
    return record


# ------------------------------------------------- MoE: merged expert_bias_E
MOE_EXPERTS, MOE_TOP_K = 4, 2
MOE_MERGES = {"lin": dict(schedule="linear", window=4, keep_last=True)}
MOE_SPECS = {name: R.Window(**config) for name, config in MOE_MERGES.items()}
MOE_BIAS = "layers.0.moe.expert_bias_E"


def moe_model_config():
    """qwen3 'debugmodel_moe' from torchtitan's registry, shrunk: 1 layer, 4 experts (top 2), vocab 256, SDPA.

    ``load_balance_coeff`` keeps its registry value (1e-3): ``expert_bias_E`` is a
    persistent float32 buffer that torchtitan's ``_update_expert_bias`` step
    pre-hook moves; ``tokens_per_expert_E`` is non-persistent.
    """
    from torchtitan.config import ParallelismConfig
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.qwen3 import model_registry

    spec = model_registry("debugmodel_moe")
    cfg = spec.model
    cfg.layers = cfg.layers[:1]
    cfg.vocab_size = cfg.tok_embeddings.num_embeddings = cfg.lm_head.out_features = VOCAB
    for layer in cfg.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()  # FlexAttention: no CPU backward
        moe = layer.moe
        assert moe.load_balance_coeff is not None
        experts = moe.routed_experts
        moe.num_experts = experts.inner_experts.num_experts = experts.token_dispatcher.num_experts = MOE_EXPERTS
        moe.router.num_experts = moe.router.gate.out_features = MOE_EXPERTS
        moe.router.top_k = experts.token_dispatcher.top_k = MOE_TOP_K
        experts.inner_experts.hidden_dim = 32
    cfg.update_from_config(config=types.SimpleNamespace(parallelism=ParallelismConfig(spmd_backend=PARALLELISM)))
    return spec, cfg


def build_moe_run(out_dir: Path, parallel_dims, seed: int):
    """The MoE model (``parallelize_qwen3``: FSDP2), ``with_wsm(..., merge_buffers=True)``, torchtitan's
    load-balancing hook (``spec.post_optimizer_build_fn``, as its Trainer calls it), schedulers, checkpointer."""
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.components.optimizer import default_adamw
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig

    from wsm_optim.integrations.torchtitan import with_wsm

    torch.manual_seed(seed)
    spec, cfg = moe_model_config()
    with torch.device("meta"):
        model = cfg.build()
    model = spec.parallelize_fn(
        model, parallel_dims=parallel_dims, training=TrainingConfig(local_batch_size=2, seq_len=SEQ),
        parallelism=ParallelismConfig(spmd_backend=PARALLELISM), compile_config=CompileConfig(), ac_config=None,
        dump_folder="",
    )
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)  # see build_model
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    optimizers = with_wsm(default_adamw(lr=3e-3), merges=MOE_MERGES, backend="foreach",
                          merge_buffers=True).build(model_parts=[model])
    spec.post_optimizer_build_fn(optimizers, [model], parallel_dims)  # registers _update_expert_bias
    return _run_parts(out_dir, spec, cfg, model, optimizers)


def moe_state(model) -> dict[str, torch.Tensor]:
    """Full params, then the merged buffer (the readout's key order)."""
    out = full_params(model)
    out[MOE_BIAS] = full(model.get_buffer(MOE_BIAS))
    return out


def moe_train(run, first: int, last: int, snapshots: dict, reads: dict) -> None:
    for step in range(first + 1, last + 1):
        train_step(run, step)
        snapshots[step] = moe_state(run.model)
        opt = run.optimizers
        reads[step] = {"merged.lin": opt.merged_state_dict(merge="lin", full=True), "live": snapshots[step],
                       "status": opt.merge_status("lin")}
        if reads[step]["status"]["windows_completed"] > 0:
            reads[step]["completed.lin"] = opt.merged_state_dict(merge="lin", completed=True, full=True)
        run.checkpointer.save(curr_step=step)


def moe_errors(reads: dict, snapshots: dict) -> dict:
    """``{step: {readout: (max error over params, error of expert_bias_E)}}`` vs the float64 explicit merge."""
    out = {}
    for step, got in reads.items():
        names = list(got["live"])
        snaps = {s: [snap[n].double() for n in names] for s, snap in snapshots.items()}
        spec = MOE_SPECS["lin"]
        wanted = {"merged.lin": (R.readout(spec, snaps, step), R.readout_scale(spec, snaps, step))}
        if "completed.lin" in got:
            last = R.completed_windows(spec, step) - 1
            wanted["completed.lin"] = (R.window_merge(spec, snaps, last), R.window_scale(spec, snaps, last))
        out[step] = {}
        for key, (ref, scale) in wanted.items():
            assert list(got[key]) == names, (list(got[key]), names)
            errs = {n: ((got[key][n].double() - r).abs() / sc.clamp_min(1e-30)).max().item()
                    for n, r, sc in zip(names, ref, scale)}
            out[step][key] = (max(v for n, v in errs.items() if n != MOE_BIAS), errs[MOE_BIAS])
    return out


def scenario_moe(out_dir: Path, parallel_dims) -> dict:
    """Train the MoE model with merged buffers, save mid-window, resume through the CheckpointManager."""
    run = build_moe_run(out_dir, parallel_dims, seed=0)
    snapshots, reads = {0: moe_state(run.model)}, {}
    moe_train(run, 0, STEPS, snapshots, reads)
    opt = run.optimizers
    live = dict(run.model.named_buffers())
    record = {
        "errors": moe_errors(reads, snapshots),
        "bias": {s: snapshots[s][MOE_BIAS] for s in snapshots},
        "buffer_names": [n for n, _ in run.model.named_buffers()],
        "readout_keys": list(reads[STEPS]["merged.lin"]),
        "tokens_live": opt.merged_model_state_dict(merge="lin").keys().isdisjoint({"layers.0.moe.tokens_per_expert_E"}),
        "model_export_bias": opt.merged_model_state_dict(merge="lin", full=True)[MOE_BIAS],
        "merged_bias": reads[STEPS]["merged.lin"][MOE_BIAS],
        "live_bias_after_export": live[MOE_BIAS].clone(),
        "home_keys": sorted(k for k in opt.state_dict() if MOE_BIAS in k),
    }
    with opt.merged_weights(merge="lin"):
        record["swapped_bias"] = run.model.get_buffer(MOE_BIAS).clone()
    record["restored_bias"] = run.model.get_buffer(MOE_BIAS).clone()
    torch.save({s: snapshots[s] for s in range(SAVE_STEP + 1)}, out_dir / "moe-snapshots.pt")  # window 0 too
    run.checkpointer.close()

    resumed = build_moe_run(out_dir, parallel_dims, seed=1)
    assert resumed.checkpointer.load(step=SAVE_STEP)
    record["resumed_steps"] = resumed.optimizers.steps
    again = {}
    moe_train(resumed, SAVE_STEP, STEPS, {}, again)
    record["resume_difference"] = {
        step: max((again[step][k][n] - reads[step][k][n]).abs().max().item()
                  for k in ("merged.lin", "completed.lin", "live") if k in reads[step] for n in reads[step][k])
        for step in again
    }
    resumed.checkpointer.close()
    return record


def scenario_moe_reshard(out_dir: Path, parallel_dims) -> dict:
    run = build_moe_run(out_dir, parallel_dims, seed=2)
    assert run.checkpointer.load(step=SAVE_STEP)
    snapshots = torch.load(out_dir / "moe-snapshots.pt")
    record = {"steps": run.optimizers.steps,
              "loaded_bias_difference": (full(run.model.get_buffer(MOE_BIAS)) - snapshots[SAVE_STEP][MOE_BIAS]).abs().max().item()}
    reads = {}
    moe_train(run, SAVE_STEP, STEPS, snapshots, reads)
    record["errors"] = moe_errors(reads, snapshots)
    run.checkpointer.close()
    return record


def scenario_reshard(out_dir: Path, parallel_dims) -> dict:
    run = build_run(out_dir, parallel_dims, seed=2)
    assert run.checkpointer.load(step=SAVE_STEP)
    snapshots = torch.load(out_dir / "snapshots.pt")  # the saving run's, up to SAVE_STEP
    record = {"resumed_at": {"steps": run.optimizers.steps, "train_step": run.state.step},
              "loaded_params_difference": max_difference({"live": full_params(run.model)},
                                                         {"live": snapshots[SAVE_STEP]})}
    reads = {}
    train(run, SAVE_STEP, STEPS, snapshots, reads)
    record["errors"] = {step: reference_errors(reads[step], snapshots, step) for step in reads}
    record["status"] = {step: reads[step]["status"] for step in reads}
    run.checkpointer.close()
    return record


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    use_cpu_device()
    from torchtitan.distributed import ParallelDims

    parallel_dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=1,
                                 world_size=dist.get_world_size(), spmd_backend=PARALLELISM)
    parallel_dims.build_mesh()
    record = {"train": scenario_train, "reshard": scenario_reshard}[scenario](out_dir, parallel_dims)
    # the MoE cases in the same processes (one launch per world size)
    moe = {"train": scenario_moe, "reshard": scenario_moe_reshard}[scenario]
    (out_dir / "moe").mkdir(exist_ok=True)
    record["moe"] = moe(out_dir / "moe", parallel_dims)
    if dist.get_rank() == 0:
        torch.save(record, out_dir / f"{scenario}-ws{dist.get_world_size()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("TORCHTITAN_LOG_LEVEL", "WARNING")
    main()
