"""One rank of the Hugging Face ``Trainer`` + FSDP2 config (accelerate, ``fsdp_version=2``) tests, gloo on CPU.

On CPU accelerate ignores the FSDP plugin (see tests/test_integrations_fsdp2.py): the Trainer runs DDP here.

Launched by tests/test_integrations_fsdp2.py on 2 ranks; every case in one
process; writes ``OUT_DIR/fsdp2-rank<r>.json``.
"""

import os
import sys

import torch
from torch.distributed.tensor import DTensor

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from _launch import run_cases  # noqa: E402
from test_integrations_transformers import EVAL, TRAIN, _args, _equal, _model  # noqa: E402
from transformers import GPT2LMHeadModel, Trainer, TrainerCallback  # noqa: E402

from wsm_optim import unwrap  # noqa: E402
from wsm_optim.integrations.transformers import wrap_trainer  # noqa: E402

RANK = int(os.environ.get("RANK", 0))
FSDP = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]})


class RecordGathered(TrainerCallback):
    """At each save: the merged model gathered from the shards (every rank), and the live one."""

    def __init__(self, trainer):
        self.trainer, self.at_save = trainer, {}

    def on_save(self, args, state, control, **kwargs):
        wsm = unwrap(self.trainer.optimizer)
        merged = wsm.merged_state_dict(model=self.trainer.model, full=True, cpu_offload=True)
        live = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
                for k, v in self.trainer.model.state_dict().items()}
        self.at_save[state.global_step] = (merged, live)


def evaluate_loss(trainer, state_dict):
    """The eval loss of given weights as ``trainer``'s evaluation computes it, on a plain (unsharded) model."""
    model = _model()
    model.load_state_dict(state_dict)
    model.eval()
    batch = next(iter(torch.utils.data.DataLoader(EVAL, batch_size=len(EVAL))))
    return float(trainer.prediction_step(model, batch, prediction_loss_only=True)[0])


def make(out_dir, name, model=None, **kwargs):
    trainer = Trainer(
        model=model if model is not None else _model(),
        args=_args(os.path.join(out_dir, name), **FSDP, per_device_train_batch_size=2, per_device_eval_batch_size=4,
                   **kwargs),
        train_dataset=TRAIN, eval_dataset=EVAL,
    )
    return wrap_trainer(trainer, schedule="1-sqrt", window=4)


def case_metrics_and_merged_folders(out_dir):
    trainer = make(out_dir, "a", max_steps=6, save_steps=3, eval_steps=3)
    record = RecordGathered(trainer)
    trainer.add_callback(record)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    params = [p for g in unwrap(trainer.optimizer).param_groups for p in g["params"]]
    out = {"distributed_type": trainer.accelerator.distributed_type.name, "fsdp_enabled": trainer.is_fsdp_enabled,
           "wrapped": type(trainer.model_wrapped).__name__, "params": len(params),
           "dtensor_params": sum(isinstance(p, DTensor) for p in params),
           "steps": unwrap(trainer.optimizer).steps, "eval_steps": [h["step"] for h in evals],
           "merged_metric": [], "live_metric": [], "folder_matches": [], "merged_differs": []}
    for h in evals:
        merged, live = record.at_save[h["step"]]
        out["merged_metric"].append([h["eval_merged_loss"], evaluate_loss(trainer, merged)])
        out["live_metric"].append([h["eval_loss"], evaluate_loss(trainer, live)])
        out["merged_differs"].append(not _equal(merged, live))
        folder = os.path.join(out_dir, "a", f"checkpoint-{h['step']}", "merged")
        out["folder_matches"].append(_equal(GPT2LMHeadModel.from_pretrained(folder).state_dict(), merged))
    return out


def case_resume_mid_window_is_exact(out_dir):
    a = make(out_dir, "r", max_steps=6, save_steps=3, eval_strategy="no")
    a.train()
    b = make(out_dir, "r2", model=_model(seed=1), max_steps=6, save_steps=3, eval_strategy="no")
    b.train(resume_from_checkpoint=os.path.join(out_dir, "r", "checkpoint-3"))
    wa, wb = unwrap(a.optimizer), unwrap(b.optimizer)
    ma = wa.merged_state_dict(model=a.model, full=True)
    mb = wb.merged_state_dict(model=b.model, full=True)
    return {"steps": [wa.steps, wb.steps], "merged_equal": _equal(ma, mb)}


CASES = [case_metrics_and_merged_folders, case_resume_mid_window_is_exact]


def main():
    run_cases({case.__name__[5:]: case for case in CASES})


if __name__ == "__main__":
    main()
