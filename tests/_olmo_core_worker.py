"""Worker of tests/test_integrations_olmo_core.py: real OLMo-core 3.0.0 ``Trainer`` runs on CPU.

Runs under the OLMo-core test environment's Python (``tests/_olmo_core_env.py``)
as ``python _olmo_core_worker.py SCENARIO OUT_DIR``, launched by
``tests/_dist_launch.run_job``. Every scenario writes ``OUT_DIR/<SCENARIO>-rank<r>.pt``:
float64 snapshots of the live params after every step, the merged checkpoints
loaded back into a fresh OLMo-core model, the metrics the trainer logged; the
test compares them with a float64 explicit merge (``tests/reference.py``).

The model is tiny (llama-like, 2 layers, d_model 64, vocab 128, sequences of
32 tokens); the data are numpy token files made here.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

torch.set_num_threads(1)

from olmo_core.data import (  # noqa: E402
    NumpyDataLoaderConfig,
    NumpyFSLDatasetConfig,
    NumpyPaddedFSLDatasetConfig,
    TokenizerConfig,
)
from olmo_core.distributed.checkpoint import load_model_and_optim_state  # noqa: E402
import olmo_core.distributed.parallel as olmo_parallel  # noqa: E402
from olmo_core.distributed.parallel import DataParallelType  # noqa: E402
from olmo_core.nn.transformer import TransformerConfig  # noqa: E402
from olmo_core.optim import AdamWConfig  # noqa: E402
from olmo_core.train import Duration, TrainerConfig  # noqa: E402
from olmo_core.train.callbacks import (  # noqa: E402
    Callback,
    CheckpointerCallback,
    LMEvaluatorCallbackConfig,
    ModelMergeCallback,
)
from olmo_core.train.train_module import TransformerDataParallelConfig, TransformerTrainModuleConfig  # noqa: E402

from wsm_optim.integrations.olmo_core import WSMMergeCallback  # noqa: E402

VOCAB, D_MODEL, LAYERS, HEADS, SEQ = 128, 64, 2, 4, 32
BATCH = 4  # sequences per step (global)
VAL_DOCS = 8
#: Two merges of different shape, window and interval; checkpoints every 3 steps land mid-window.
MERGES = {
    "lin": dict(schedule="linear", window=4),
    "sqrt": dict(schedule="1-sqrt", window=6, interval=2, keep_last=True),
}
SAVE_INTERVAL = 3
STEPS_RESHARD = 12


def tokenizer() -> TokenizerConfig:
    return TokenizerConfig(vocab_size=VOCAB, eos_token_id=0, pad_token_id=0)


def write_data(data: Path) -> None:
    """Random token files: training tokens, and validation documents of SEQ tokens ending in EOS."""
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if not (data / "train.npy").exists():
        rng.integers(1, VOCAB, SEQ * BATCH * 64).astype(np.uint8).tofile(data / "train.npy")
        val = rng.integers(1, VOCAB, (VAL_DOCS, SEQ))
        val[:, -1] = 0
        val.astype(np.uint8).tofile(data / "val.npy")


def val_tokens(data: Path) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(data / "val.npy", dtype=np.uint8).astype(np.int64)).view(VAL_DOCS, SEQ)


def model_config() -> TransformerConfig:
    return TransformerConfig.llama_like(vocab_size=VOCAB, d_model=D_MODEL, n_layers=LAYERS, n_heads=HEADS)


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return model_config().build(init_device="cpu")


def local_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full float64 copies of the params (gathered under FSDP: a collective)."""
    out = {}
    for name, p in model.named_parameters():
        value = p.detach()
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[name] = value.to(torch.float64, copy=True)
    return out


@dataclass
class Recorder(Callback):
    """Float64 snapshots of the live params after every step, and every metric the trainer logs."""

    priority: ClassVar[int] = -10  # after every other callback: what training continues from
    snapshots: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def pre_train(self):
        self.snapshots[self.step] = local_params(self.trainer.train_module.model)

    def post_train_batch(self):
        self.snapshots[self.step] = local_params(self.trainer.train_module.model)

    def log_metrics(self, step, metrics):
        self.metrics.setdefault(step, {}).update({k: float(v) for k, v in metrics.items()})


def run(out: Path, name: str, steps: int, callbacks: dict[str, Callback], *, evals: bool = False,
        save_interval: int = SAVE_INTERVAL, dp: bool = False) -> tuple[Any, Recorder]:
    """One ``Trainer.fit`` in ``out/name`` (resumes from the folder's latest checkpoint, as OLMo-core does)."""
    data = out / "data"
    write_data(data)
    model = fresh_model()
    dp_config = TransformerDataParallelConfig(name=DataParallelType.fsdp) if dp else None
    # OLMo-core builds one world mesh per process; these tests run several Trainers in one
    olmo_parallel._WORLD_MESH = None
    train_module = TransformerTrainModuleConfig(
        rank_microbatch_size=BATCH * SEQ // (dist.get_world_size() if dp else 1), max_sequence_length=SEQ,
        optim=AdamWConfig(lr=3e-3, weight_decay=0.1, foreach=True), dp_config=dp_config,
    ).build(model, device=torch.device("cpu"))
    dataset = NumpyFSLDatasetConfig(paths=[str(data / "train.npy")], sequence_length=SEQ, tokenizer=tokenizer(),
                                    work_dir=str(out / "work")).build()
    loader = NumpyDataLoaderConfig(global_batch_size=BATCH * SEQ, seed=0, num_workers=0).build(
        dataset, dp_process_group=train_module.dp_process_group)
    recorder = Recorder()
    config = TrainerConfig(
        save_folder=str(out / name), work_dir=str(out / "work"), max_duration=Duration.steps(steps),
        metrics_collect_interval=1, cancel_check_interval=1000,
        callbacks={
            "checkpointer": CheckpointerCallback(save_interval=save_interval, ephemeral_save_interval=None,
                                                 save_async=False),
            "recorder": recorder, **callbacks,
        },
    )
    if evals:
        config = config.with_callback("lm", LMEvaluatorCallbackConfig(
            eval_dataset=NumpyPaddedFSLDatasetConfig(paths=[str(data / "val.npy")], metadata=[{"label": "val"}],
                                                     sequence_length=SEQ, tokenizer=tokenizer(),
                                                     work_dir=str(out / "work")),
            eval_interval=4,
        ))
    trainer = config.build(train_module, loader)
    trainer.fit()
    return trainer, trainer.callbacks["recorder"]


def merged_checkpoints(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"stepN-merged_x": params}``: every merged checkpoint in ``folder`` loaded into a fresh OLMo-core model."""
    out = {}
    for path in sorted(folder.glob("step*-merged*")):
        model = fresh_model()
        load_model_and_optim_state(str(path / "model_and_optim"), model)
        out[path.name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def merged_ce(params: dict[str, torch.Tensor], data: Path) -> float:
    """Next-token cross-entropy of ``params`` on the validation documents, by a plain forward.

    Summed over the SEQ - 1 predicted tokens of each document and divided by SEQ tokens per document,
    as OLMo-core's ``LMEvaluator`` averages its per-token losses (the last position has no label and
    counts as a zero loss).
    """
    model = fresh_model()
    model.load_state_dict(params)
    tokens = val_tokens(data)
    with torch.no_grad():
        logits = model(tokens)
    total = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB).double(), tokens[:, 1:].reshape(-1), reduction="sum")
    return float(total) / tokens.numel()


def optimizer_merges(callback: WSMMergeCallback) -> dict[str, dict[str, torch.Tensor]]:
    opt = callback.optimizer
    out = {}
    for merge in opt.merges:
        values = opt.merged_state_dict(merge=merge, full=True)
        out[merge] = {k: v.to(torch.float64) for k, v in values.items()}
    return out


# ------------------------------------------------------------------ scenarios
def scenario_local(out: Path) -> dict:
    """Full run, a run stopped at step 6 and resumed, a plain run, an options run and ModelMergeCallback."""
    steps = 12
    trainer, full = run(out, "full", steps, {"wsm": WSMMergeCallback(merges=MERGES)}, evals=True)
    full_cb = trainer.callbacks["wsm"]  # the TrainerConfig copies its callbacks
    result: dict[str, Any] = {
        "snapshots": full.snapshots,
        "metrics": full.metrics,
        "merged": merged_checkpoints(out / "full"),
        "final": local_params(trainer.train_module.model),
        "optimizer_merges": optimizer_merges(full_cb),
        "status": {m: full_cb.optimizer.merge_status(m) for m in MERGES},
        "checkpoint_keys": _checkpoint_keys(out / "full" / "step6" / "model_and_optim"),
    }
    result["merged_ce"] = {k: merged_ce(v, out / "data") for k, v in result["merged"].items()}

    # The same run, stopped after step 6 (mid-window of "lin", at the end of a "sqrt" window) and resumed
    run(out, "resumed", 6, {"wsm": WSMMergeCallback(merges=MERGES)}, evals=True)
    trainer, resumed = run(out, "resumed", steps, {"wsm": WSMMergeCallback(merges=MERGES)}, evals=True)
    resumed_cb = trainer.callbacks["wsm"]
    result["resumed"] = {
        "first_step": min(resumed.snapshots),
        "merged": merged_checkpoints(out / "resumed"),
        "final": local_params(trainer.train_module.model),
        "optimizer_merges": optimizer_merges(resumed_cb),
        "metrics": resumed.metrics,
    }

    trainer, _ = run(out, "plain", steps, {}, evals=True)
    result["plain_final"] = local_params(trainer.train_module.model)
    # the plain run's checkpoints hold no merge: resuming them with the callback must refuse, not start afresh
    try:
        run(out, "plain", steps + 1, {"wsm": WSMMergeCallback(merges=MERGES)})
        result["plain_resume_error"] = None
    except (Exception, CheckpointException) as error:  # DCP's CheckpointException is a BaseException
        result["plain_resume_error"] = f"{type(error).__name__}: {error}"

    # every other option passes through: a moment merge, host accumulators, merged buffers
    trainer, options = run(out, "options", 8, {"wsm": WSMMergeCallback(
        schedule="linear", window=4, moments=2, offload="cpu", merge_buffers=True, keep_last=True,
        nonfinite="raise", backend="foreach")})
    options_cb = trainer.callbacks["wsm"]
    result["options"] = {
        "snapshots": options.snapshots, "merged": merged_checkpoints(out / "options"),
        "kwargs": {f.name: repr(getattr(options_cb, f.name)) for f in dataclasses.fields(options_cb)},
        "backend": options_cb.optimizer.backend,
        "moment_merge": options_cb.optimizer.is_moment_merge(),
    }
    return result


def scenario_fsdp(out: Path) -> dict:
    """Two ranks, FSDP (fully_shard on gloo): a run of 8 steps, and the same run stopped at 6 and resumed."""
    trainer, full = run(out, "full", 8, {"wsm": WSMMergeCallback(merges=MERGES)}, evals=True, dp=True)
    result: dict[str, Any] = {"snapshots": full.snapshots, "metrics": full.metrics,
                              "final": local_params(trainer.train_module.model),
                              "sharded": sorted({type(p).__name__ for p in trainer.train_module.model.parameters()})}
    result["optimizer_merges"] = optimizer_merges(trainer.callbacks["wsm"])
    trainer, first = run(out, "resumed", 6, {"wsm": WSMMergeCallback(merges=MERGES)}, evals=True, dp=True)
    result["first_snapshots"] = first.snapshots
    # the step6 checkpoint as written by two ranks, for the one-rank scenario to reshard
    if dist.get_rank() == 0:
        shutil.copytree(out / "resumed", out.parent / "two_ranks_at_step6")
    dist.barrier()
    trainer, resumed = run(out, "resumed", 8, {"wsm": WSMMergeCallback(merges=MERGES)}, evals=True, dp=True)
    result["resumed"] = {"first_step": min(resumed.snapshots), "final": local_params(trainer.train_module.model),
                         "optimizer_merges": optimizer_merges(trainer.callbacks["wsm"])}
    trainer, _ = run(out, "plain", 8, {}, evals=True, dp=True)
    result["plain_final"] = local_params(trainer.train_module.model)
    # every rank loads each merged checkpoint whole into an unsharded model (DCP reads it collectively)
    result["merged"] = merged_checkpoints(out / "full")
    result["resumed"]["merged"] = merged_checkpoints(out / "resumed")
    return result


def scenario_reshard(out: Path) -> dict:
    """One rank, no FSDP: resume the two-rank run's step6 checkpoint (written by scenario_fsdp) to step 12."""
    shutil.copytree(out.parent / "two_ranks_at_step6", out / "reshard")
    trainer, resumed = run(out, "reshard", STEPS_RESHARD, {"wsm": WSMMergeCallback(merges=MERGES)}, evals=True)
    return {"snapshots": resumed.snapshots, "merged": merged_checkpoints(out / "reshard"),
            "optimizer_merges": optimizer_merges(trainer.callbacks["wsm"])}


def _checkpoint_keys(path: Path) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return sorted(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    os.environ.setdefault("OLMO_SHARED_FS", "1")  # every rank writes checkpoints to the same local folder
    if world > 1:
        dist.init_process_group("gloo")
    (out_dir / scenario).mkdir(parents=True, exist_ok=True)
    scenarios = {"local": scenario_local, "fsdp": scenario_fsdp, "reshard": scenario_reshard}
    result = scenarios[scenario](out_dir / scenario)
    torch.save(result, out_dir / f"{scenario}-rank{rank}.pt")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
