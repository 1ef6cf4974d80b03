"""One rank of the Hugging Face ``Trainer`` + DeepSpeed tests (launched by tests/test_deepspeed.py, gloo, CPU).

Usage: ``python tests/_deepspeed_hf_worker.py OUT_DIR`` with the torch.distributed
environment set. Every case in one process (DeepSpeed's and accelerate's
start-up dominate); writes ``OUT_DIR/hf-rank<r>.json``.
"""

import os
import sys

import torch

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from _launch import run_cases  # noqa: E402
from test_integrations_transformers import EVAL, TRAIN, BiasedGPT2, _args, _buffered_model, _equal, _model  # noqa: E402
from transformers import GPT2LMHeadModel, Trainer, TrainerCallback  # noqa: E402

from wsm_optim import WSMOptimizer, unwrap  # noqa: E402
from wsm_optim.integrations import deepspeed as wds  # noqa: E402
from wsm_optim.integrations.transformers import wrap_trainer  # noqa: E402

RANK = int(os.environ.get("RANK", 0))


def ds_config(stage=2):
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }


class RecordEngineMerged(TrainerCallback):
    """At each save: the merged model by name (DeepSpeed readout) and the live module state."""

    def __init__(self, trainer):
        self.trainer, self.at_save = trainer, {}

    def on_save(self, args, state, control, model=None, **kwargs):
        engine = self.trainer.model_wrapped
        merged = wds.merged_state_dict(engine, model=self.trainer.model)
        live = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}
        self.at_save[state.global_step] = (merged, live)


def evaluate_loss(trainer, state_dict, build=_model):
    """The eval loss of given weights as ``trainer``'s evaluation computes it (its ``prediction_step``).

    On a separate plain model: a second ``Trainer`` would get DeepSpeed too
    (accelerate's state is process-wide).
    """
    model = build()
    model.load_state_dict(state_dict)
    model.eval()
    batch = next(iter(trainer.get_eval_dataloader()))
    return float(trainer.prediction_step(model, batch, prediction_loss_only=True)[0])


def make(out_dir, name, model=None, optimizers=(None, None), wsm=dict(schedule="1-sqrt", window=4), **kwargs):
    trainer = Trainer(
        model=model if model is not None else _model(),
        args=_args(os.path.join(out_dir, name), deepspeed=ds_config(), **kwargs),
        train_dataset=TRAIN, eval_dataset=EVAL, optimizers=optimizers,
    )
    return wrap_trainer(trainer, **wsm)


def case_wrap_trainer_metrics_and_merged_folders(out_dir):
    trainer = make(out_dir, "a")
    record = RecordEngineMerged(trainer)
    trainer.add_callback(record)
    trainer.train()
    wsm = unwrap(trainer.optimizer)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    out = {"steps": wsm.steps, "eval_steps": [h["step"] for h in evals], "merged_metric_matches": [],
           "live_metric_matches": [], "folder_matches": [], "merged_differs_from_live": []}
    for h in evals:
        merged, live = record.at_save[h["step"]]
        out["merged_metric_matches"].append(abs(h["eval_merged_loss"] - evaluate_loss(trainer, merged)) < 1e-5)
        out["live_metric_matches"].append(abs(h["eval_loss"] - evaluate_loss(trainer, live)) < 1e-5)
        out["merged_differs_from_live"].append(not _equal(merged, live))
        folder = os.path.join(out_dir, "a", f"checkpoint-{h['step']}", "merged")
        out["folder_matches"].append(_equal(GPT2LMHeadModel.from_pretrained(folder).state_dict(), merged))
    return out


def case_resume_from_checkpoint_mid_window_is_exact(out_dir):
    a = make(out_dir, "r", eval_strategy="no")
    a.train()
    b = make(out_dir, "r2", model=_model(seed=1), eval_strategy="no")
    b.train(resume_from_checkpoint=os.path.join(out_dir, "r", "checkpoint-6"))
    ma, mb = wds.merged_state_dict(a.model_wrapped), wds.merged_state_dict(b.model_wrapped)
    return {
        "steps": [unwrap(a.optimizer).steps, unwrap(b.optimizer).steps],
        "live_equal": _equal(a.model.state_dict(), b.model.state_dict()),
        "merged_equal": _equal(ma, mb),
    }


def case_optimizer_given_in_optimizers_is_the_one_stepped(out_dir):
    model = _model()
    wsm = WSMOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), schedule="1-sqrt", window=4)
    trainer = make(out_dir, "g", model=model, optimizers=(wsm, None), wsm={}, max_steps=4,
                   save_strategy="no", eval_strategy="no")
    trainer.train()
    return {"same": unwrap(trainer.optimizer) is wsm, "steps": wsm.steps}


def case_without_wrap_trainer_unwrap_names_the_fix(out_dir):
    """transformers' DeepSpeed set-up drops optimizers=(WSMOptimizer(...), None) and trains its own optimizer:
    the second backward pass (right after the first training step) raises, naming wrap_trainer."""
    model = _model()
    wsm = WSMOptimizer(torch.optim.AdamW(model.named_parameters(), lr=3e-3), window=4)
    trainer = Trainer(
        model=model, args=_args(os.path.join(out_dir, "p"), deepspeed=ds_config(), max_steps=8, save_strategy="no",
                                eval_strategy="no", warmup_steps=0),  # the first step moves the params
        train_dataset=TRAIN, optimizers=(wsm, None),
    )
    out = {"train_error": None, "message": None}
    try:
        trainer.train()
    except RuntimeError as e:
        out["train_error"] = str(e)
    out.update(steps=wsm.steps, global_step=trainer.state.global_step)
    try:
        unwrap(trainer.optimizer)
    except TypeError as e:
        out["message"] = str(e)
    return out


def case_wrap_trainer_merge_buffers(out_dir):
    """merge_buffers=True under ZeRO-2: eval_merged_* and merged/ with the merged logit-bias buffer; exact resume."""
    wsm = dict(schedule="1-sqrt", window=4, merge_buffers=True)
    trainer = make(out_dir, "mb", model=_buffered_model(), wsm=wsm)
    record = RecordEngineMerged(trainer)
    trainer.add_callback(record)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    out = {"steps": unwrap(trainer.optimizer).steps, "eval_steps": [h["step"] for h in evals],
           "merged_metric_matches": [], "folder_matches": [], "buffer_differs_from_live": []}
    for h in evals:
        merged, live = record.at_save[h["step"]]
        out["merged_metric_matches"].append(
            abs(h["eval_merged_loss"] - evaluate_loss(trainer, merged, _buffered_model)) < 1e-5)
        out["buffer_differs_from_live"].append(not torch.equal(merged["logit_bias"], live["logit_bias"]))
        folder = os.path.join(out_dir, "mb", f"checkpoint-{h['step']}", "merged")
        out["folder_matches"].append(_equal(BiasedGPT2.from_pretrained(folder).state_dict(), merged))
    resumed = make(out_dir, "mb2", model=_buffered_model(seed=1), wsm=wsm, eval_strategy="no")
    resumed.train(resume_from_checkpoint=os.path.join(out_dir, "mb", "checkpoint-6"))
    ma, mb = wds.merged_state_dict(trainer.model_wrapped), wds.merged_state_dict(resumed.model_wrapped)
    out.update(
        resumed_steps=unwrap(resumed.optimizer).steps,
        resumed_live_equal=_equal(trainer.model.state_dict(), resumed.model.state_dict()),
        resumed_merged_equal=_equal(ma, mb) and "logit_bias" in ma,
    )
    return out


def case_accelerate_deepspeed_plugin_with_attach(out_dir):
    """accelerate's DeepSpeed plugin: ``accelerator.prepare(model, WSMOptimizer(...))`` returns the engine as the
    model; ``attach(model)`` then merges once per step (vs a float64 explicit merge of the gathered masters);
    without it the first step is refused."""
    import reference
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.utils import safe_get_full_fp32_param

    spec = reference.Window(schedule="1-sqrt", window=4, interval=2)
    out = {}
    for attach in (True, False):
        config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
        AcceleratorState._reset_state()  # the Trainers' accelerate state is process-wide; a new plugin needs a reset
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        model, opt = accelerator.prepare(model, WSMOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05),
                                                             **spec.as_kwargs()))
        if attach:
            wds.attach(model)
        names = [n for n, _ in model.module.named_parameters()]
        snapshots = [[safe_get_full_fp32_param(p).to(torch.float64) for p in model.module.parameters()]]
        g = torch.Generator().manual_seed(1)
        worst = 0.0
        try:
            for s in range(1, 7):
                x, y = torch.randn(4, 7, generator=g), torch.randn(4, 3, generator=g)
                accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
                opt.step()
                opt.zero_grad()
                snapshots.append([safe_get_full_fp32_param(p).to(torch.float64) for p in model.module.parameters()])
                merged = wds.merged_state_dict(model, torch.float32)
                for name, ref in zip(names, reference.readout(spec, snapshots, s)):
                    worst = max(worst, float((merged[name].to(torch.float64) - ref).abs().max()))
        except RuntimeError as e:
            out["refused_without_attach"] = str(e)
            continue
        out.update(steps=unwrap(opt).steps, worst_vs_explicit_merge=worst, engine=type(model).__name__)
    return out


def case_wrap_trainer_refusals_name_the_setting(out_dir):
    """ZeRO-3, an 'optimizer' section, load_best_model_at_end: wrap_trainer refuses before training.

    Last in CASES: a ZeRO-3 config makes the Trainer set transformers' process-wide ZeRO-3 flag.
    """
    settings = {
        "zero3": (ds_config(3), {}),
        "optimizer_section": ({**ds_config(), "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, {}),
        "load_best_model_at_end": (ds_config(), dict(load_best_model_at_end=True, metric_for_best_model="eval_loss")),
    }
    out = {}
    for key, (config, args) in settings.items():
        trainer = Trainer(model=_model(), args=_args(os.path.join(out_dir, key), deepspeed=config, **args),
                          train_dataset=TRAIN, eval_dataset=EVAL)
        try:
            wrap_trainer(trainer, schedule="1-sqrt", window=4)
            out[key] = None
        except NotImplementedError as e:
            out[key] = str(e)
    return out


CASES = [
    case_wrap_trainer_merge_buffers,
    case_wrap_trainer_metrics_and_merged_folders,
    case_resume_from_checkpoint_mid_window_is_exact,
    case_optimizer_given_in_optimizers_is_the_one_stepped,
    case_without_wrap_trainer_unwrap_names_the_fix,
    case_accelerate_deepspeed_plugin_with_attach,
    case_wrap_trainer_refusals_name_the_setting,
]


def main():
    run_cases({case.__name__[5:]: case for case in CASES})


if __name__ == "__main__":
    main()
