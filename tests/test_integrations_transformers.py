"""Hugging Face ``Trainer``: ``wrap_trainer`` with a real ``Trainer`` on a tiny GPT-2 from a config (CPU)."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from wsm_optim import WSMOptimizer, unwrap  # noqa: E402
from wsm_optim.integrations.transformers import wrap_trainer  # noqa: E402

VOCAB, SEQ = 64, 16


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


TRAIN, EVAL = TokenDataset(32, 0), TokenDataset(8, 1)


def _model(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _args(tmp_path, **kwargs):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=2,
        max_steps=8,
        save_strategy="steps",
        save_steps=3,
        eval_strategy="steps",
        eval_steps=3,
        logging_strategy="no",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kwargs)
    return TrainingArguments(**base)


class RecordMerged(TrainerCallback):
    """The merged readout (and live weights) at each checkpoint save: nothing steps in between."""

    def __init__(self):
        self.at_save = {}

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        wsm = unwrap(optimizer)
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.at_save[state.global_step] = (wsm.merged_state_dict(model=model), live)


def _trainer(tmp_path, model=None, callbacks=(), wsm=dict(schedule="1-sqrt", window=4), **kwargs):
    trainer = Trainer(
        model=model if model is not None else _model(),
        args=_args(tmp_path, **kwargs),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        callbacks=list(callbacks),
    )
    return wrap_trainer(trainer, **wsm)


def _equal(a, b):
    assert set(a) == set(b), set(a) ^ set(b)
    return all(torch.equal(a[k], b[k]) for k in a)


class Evaluator:
    """A plain ``Trainer`` (no WSM) that evaluates given weights: the same loss convention as the tested one."""

    def __init__(self, tmp_path, make=None):
        model = (make or _model)()
        self.trainer = Trainer(model=model, args=_args(tmp_path / "evaluator"), eval_dataset=EVAL)

    def __call__(self, state_dict):
        self.trainer.model.load_state_dict(state_dict)
        return self.trainer.evaluate()["eval_loss"]


def test_merged_metrics_next_to_live_and_merged_model_saved_per_checkpoint(tmp_path):
    record = RecordMerged()
    trainer = _trainer(tmp_path, callbacks=[record])
    trainer.train()
    evaluate = Evaluator(tmp_path)
    wsm = unwrap(trainer.optimizer)
    assert isinstance(wsm, WSMOptimizer) and wsm.steps == 8
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [3, 6, 8]
    for h in evals:
        merged, live = record.at_save[h["step"]]
        assert h["eval_merged_loss"] == pytest.approx(evaluate(merged), rel=1e-6)
        assert h["eval_loss"] == pytest.approx(evaluate(live), rel=1e-6)
        assert h["eval_merged_loss"] != h["eval_loss"]
    # the merged model of every checkpoint, as from_pretrained loads it
    for step in (3, 6, 8):
        folder = tmp_path / f"checkpoint-{step}" / "merged"
        loaded = GPT2LMHeadModel.from_pretrained(folder)
        assert _equal(loaded.state_dict(), record.at_save[step][0]), step
        live = GPT2LMHeadModel.from_pretrained(tmp_path / f"checkpoint-{step}")
        assert _equal(live.state_dict(), record.at_save[step][1]), step
    # evaluate() after training: live and merged metrics again, the live weights untouched
    live = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.evaluate()
    assert metrics["eval_merged_loss"] == pytest.approx(evaluate(wsm.merged_state_dict(model=trainer.model)), rel=1e-6)
    assert _equal(trainer.model.state_dict(), live)


def test_resume_from_checkpoint_mid_window_is_bit_exact(tmp_path):
    a = _trainer(tmp_path / "a")
    a.train()
    ckpt = tmp_path / "a" / "checkpoint-6"  # window 4: step 6 is checkpoint 2 of the second window
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert saved["wsm"]["merges"]["default"]["counters"]["t"] == 2
    b = _trainer(tmp_path / "b", model=_model(seed=1))  # another init: everything comes from the checkpoint
    b.train(resume_from_checkpoint=str(ckpt))
    wa, wb = unwrap(a.optimizer), unwrap(b.optimizer)
    assert wb.steps == wa.steps == 8
    assert _equal(b.model.state_dict(), a.model.state_dict()), "live weights differ after resume"
    assert _equal(wb.merged_state_dict(model=b.model), wa.merged_state_dict(model=a.model))
    sa, sb = wa.merge_status(), wb.merge_status()
    assert (sa["window_index"], sa["checkpoint"]) == (sb["window_index"], sb["checkpoint"])
    merged_a = GPT2LMHeadModel.from_pretrained(tmp_path / "a" / "checkpoint-8" / "merged").state_dict()
    merged_b = GPT2LMHeadModel.from_pretrained(tmp_path / "b" / "checkpoint-8" / "merged").state_dict()
    assert _equal(merged_a, merged_b)


@pytest.mark.parametrize("metric", ["eval_merged_loss", "merged_loss", "eval_loss"])
def test_load_best_model_at_end_loads_the_best_merged_model(tmp_path, metric):
    record = RecordMerged()
    trainer = _trainer(
        tmp_path, callbacks=[record], load_best_model_at_end=True, metric_for_best_model=metric,
        save_steps=2, eval_steps=2, max_steps=8, learning_rate=3e-2,
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    key = "eval_loss" if metric == "eval_loss" else "eval_merged_loss"
    best = min(evals, key=lambda h: h[key])
    assert trainer.state.best_metric == best[key]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    merged, live = record.at_save[best["step"]]
    assert not _equal(merged, live)
    assert _equal(trainer.model.state_dict(), live if metric == "eval_loss" else merged)
    # the model in the trainer was replaced; the merged metrics still score the run's final merge
    final = unwrap(trainer.optimizer).merged_state_dict(model=trainer.model)
    assert _equal(final, record.at_save[8][0])
    metrics = trainer.evaluate()
    assert metrics["eval_merged_loss"] == pytest.approx(Evaluator(tmp_path)(final), rel=1e-6)


def test_decaying_scheduler_warns_with_the_constant_with_warmup_way(tmp_path):
    trainer = _trainer(tmp_path, lr_scheduler_type="linear", max_steps=4, save_strategy="no", eval_strategy="no")
    with pytest.warns(UserWarning, match='lr_scheduler_type="constant_with_warmup"') as caught:
        trainer.train()
    assert "'linear'" in str(caught[0].message)
    # the same through optimizers=(WSMOptimizer, None): HF's default linear decay to 0
    model = _model()
    wsm = WSMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), window=4)
    trainer = Trainer(
        model=model, args=_args(tmp_path, max_steps=4, save_strategy="no", eval_strategy="no", lr_scheduler_type="linear"),
        train_dataset=TRAIN, optimizers=(wsm, None),
    )
    wrap_trainer(trainer)
    with pytest.warns(UserWarning, match="decays the learning rate after warmup"):
        trainer.train()
    assert unwrap(trainer.optimizer) is wsm
    # constant after warmup: no warning
    trainer = _trainer(tmp_path, max_steps=4, save_strategy="no", eval_strategy="no")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="WSM:")
        trainer.train()


def test_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="must be a transformers.Trainer"):
        wrap_trainer(object(), window=4)
    with pytest.raises(TypeError, match="window is required"):
        _trainer(tmp_path, wsm=dict(schedule="cosine"))
    with pytest.raises(ValueError, match="window"):
        _trainer(tmp_path, wsm=dict(window=0))
    trainer = _trainer(tmp_path)
    with pytest.raises(TypeError, match="already wrapped"):
        wrap_trainer(trainer, window=4)
    trainer = _trainer(tmp_path, wsm={}, max_steps=1, save_strategy="no", eval_strategy="no")
    with pytest.raises(TypeError, match="window is required"):
        trainer.train()


def test_core_and_hf_module_import_no_framework():
    import subprocess
    import sys

    code = (
        "import sys, wsm_optim, wsm_optim.integrations, wsm_optim.integrations.transformers\n"
        "heavy = [m for m in ('lightning', 'transformers', 'accelerate') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_several_merges_get_their_own_metrics_folders_and_best_model(tmp_path):
    merges = {"short": dict(window=2), "long": dict(schedule="1-sqrt", window=4)}
    trainer = _trainer(
        tmp_path, wsm=dict(merges=merges), save_steps=2, eval_steps=2, max_steps=6,
        load_best_model_at_end=True, metric_for_best_model="merged_long_loss",
    )
    trainer.train()
    wsm = unwrap(trainer.optimizer)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert all({"eval_merged_short_loss", "eval_merged_long_loss"} <= set(h) for h in evals)
    best = min(evals, key=lambda h: h["eval_merged_long_loss"])
    folder = tmp_path / f"checkpoint-{best['step']}"
    assert (folder / "merged_short").is_dir() and (folder / "merged_long").is_dir()
    loaded = GPT2LMHeadModel.from_pretrained(folder / "merged_long").state_dict()
    assert _equal(trainer.model.state_dict(), loaded)
    assert not _equal(GPT2LMHeadModel.from_pretrained(folder).state_dict(), loaded)  # not the live weights
    assert not _equal(GPT2LMHeadModel.from_pretrained(folder / "merged_short").state_dict(), loaded)
    assert wsm.merges == ("short", "long")


class RecordFinal(TrainerCallback):
    """The merged readouts at the last step, before the trainer loads the best checkpoint."""

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == args.max_steps:
            wsm = unwrap(optimizer)
            self.merged = {m: wsm.merged_state_dict(model=model, merge=m) for m in wsm.merges}
            self.live = {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("metric", ["eval_loss", "eval_merged_loss"])
def test_after_load_best_model_at_end_readouts_and_metrics_are_the_runs_final_merge(tmp_path, metric):
    """Mid-window at the end (7 steps, window 4): the current merge leans on the live params the load replaces."""
    record, final = RecordMerged(), RecordFinal()
    trainer = _trainer(
        tmp_path, callbacks=[record, final], load_best_model_at_end=True, metric_for_best_model=metric,
        save_steps=2, eval_steps=2, max_steps=7, learning_rate=3e-2,
    )
    trainer.train()
    wsm = unwrap(trainer.optimizer)
    assert wsm.merge_status()["checkpoint"] == 3  # mid-window: the live params weigh in the readout
    best_step = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert best_step != 7
    best = record.at_save[best_step][0 if metric == "eval_merged_loss" else 1]
    assert _equal(trainer.model.state_dict(), best)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no LiveParamsChangedWarning: nothing mixes in the loaded weights
        assert _equal(wsm.merged_state_dict(model=trainer.model), final.merged["default"])
        path = wsm.save_merged(tmp_path / "final.safetensors")
        import safetensors.torch

        saved = safetensors.torch.load_file(path)
        assert all(torch.equal(saved[k], final.merged["default"][k]) for k in saved)
        metrics = trainer.evaluate()
    evaluate = Evaluator(tmp_path)
    assert metrics["eval_merged_loss"] == pytest.approx(evaluate(final.merged["default"]), rel=1e-6)
    assert metrics["eval_loss"] == pytest.approx(evaluate(best), rel=1e-6)
    assert _equal(trainer.model.state_dict(), best), "readouts must leave the loaded best model in place"
    # training on (a second train() runs max_steps more): the merge follows the model's weights again
    trainer.train()
    assert wsm.steps == 14
    assert _equal(wsm.merged_state_dict(model=trainer.model), final.merged["default"])  # the new run's last step


def test_merged_folder_of_a_tied_embedding_model_is_complete_and_loads_silently(tmp_path):
    import logging

    messages = []
    handler = logging.Handler()
    handler.emit = lambda r: messages.append(r.getMessage())
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    record = RecordMerged()
    trainer = _trainer(
        tmp_path, callbacks=[record], load_best_model_at_end=True, metric_for_best_model="eval_merged_loss",
        save_steps=2, eval_steps=2, max_steps=4, learning_rate=3e-2,
    )
    try:
        trainer.train()
    finally:
        hf_logger.removeHandler(handler)
    model = trainer.model
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.transformer.wte.weight
    assert not [m for m in messages if "missing keys" in m or "unexpected keys" in m], messages
    best_step = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert _equal(model.state_dict(), record.at_save[best_step][0])
    # the folder itself: from_pretrained restores the tie and every tensor
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / f"checkpoint-{best_step}" / "merged")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert _equal(loaded.state_dict(), record.at_save[best_step][0])


# ------------------------------------------------------------ merge_buffers=True
class BiasedGPT2(GPT2LMHeadModel):
    """GPT-2 with a persistent float buffer updated in forward: a logit bias that re-centres the logits
    (as an MoE router's load-balancing bias does), used by every forward, changed by training forwards only."""

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("logit_bias", torch.zeros(config.vocab_size))

    def forward(self, input_ids=None, labels=None, attention_mask=None):
        from transformers.modeling_outputs import CausalLMOutput

        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.lm_head(hidden) + self.logit_bias
        if self.training:
            with torch.no_grad():
                mean = logits.detach().float().mean((0, 1))
                self.logit_bias.sub_(mean - mean.mean(), alpha=0.3)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)


def _buffered_model(seed=0):
    torch.manual_seed(seed)
    return BiasedGPT2(_model(seed).config)


class BufferSnapshots(TrainerCallback):
    """float64 snapshots of ``logit_bias`` after every optimizer step (index 0: when training begins)."""

    def __init__(self):
        self.steps = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.steps.append([model.logit_bias.detach().to(torch.float64, copy=True)])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append([model.logit_bias.detach().to(torch.float64, copy=True)])


def test_merge_buffers_metrics_and_merged_folders_hold_merged_buffers(tmp_path):
    from reference import Window, readout

    spec = Window("1-sqrt", window=4)
    record, snaps = RecordMerged(), BufferSnapshots()
    trainer = _trainer(tmp_path, model=_buffered_model(), callbacks=[snaps, record],
                       wsm=dict(merge_buffers=True, **spec.as_kwargs()))
    trainer.train()
    wsm = unwrap(trainer.optimizer)
    assert wsm.steps == 8 and wsm.state_dict()["wsm"]["buffers"] == ["logit_bias"]
    evaluate = Evaluator(tmp_path, _buffered_model)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [3, 6, 8]
    for h in evals:
        merged, live = record.at_save[h["step"]]
        (expected,) = readout(spec, snaps.steps, h["step"])
        torch.testing.assert_close(merged["logit_bias"].double(), expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(merged["logit_bias"], live["logit_bias"])
        assert h["eval_merged_loss"] == pytest.approx(evaluate(merged), rel=1e-6)
        assert h["eval_loss"] == pytest.approx(evaluate(live), rel=1e-6)
        # the merged params with the LIVE buffer score differently: the metric used the merged buffer
        assert h["eval_merged_loss"] != pytest.approx(evaluate(dict(merged, logit_bias=live["logit_bias"])), rel=1e-6)
        folder = tmp_path / f"checkpoint-{h['step']}"
        assert _equal(BiasedGPT2.from_pretrained(folder / "merged").state_dict(), merged)
        assert _equal(BiasedGPT2.from_pretrained(folder).state_dict(), live)


def test_merge_buffers_resume_from_checkpoint_mid_window_is_exact(tmp_path):
    wsm = dict(schedule="1-sqrt", window=4, merge_buffers=True)
    a = _trainer(tmp_path / "a", model=_buffered_model(), wsm=wsm, eval_strategy="no")
    a.train()
    ckpt = tmp_path / "a" / "checkpoint-6"  # checkpoint 2 of the second window
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert saved["wsm"]["buffers"] == ["logit_bias"] and "wsm_acc.default:logit_bias" in saved["state"][0]
    b = _trainer(tmp_path / "b", model=_buffered_model(seed=1), wsm=wsm, eval_strategy="no")
    b.train(resume_from_checkpoint=str(ckpt))
    wa, wb = unwrap(a.optimizer), unwrap(b.optimizer)
    assert wb.steps == wa.steps == 8
    assert _equal(b.model.state_dict(), a.model.state_dict()), "live params or buffers differ after resume"
    assert _equal(wb.merged_state_dict(model=b.model), wa.merged_state_dict(model=a.model))
    merged_a = BiasedGPT2.from_pretrained(tmp_path / "a" / "checkpoint-8" / "merged").state_dict()
    merged_b = BiasedGPT2.from_pretrained(tmp_path / "b" / "checkpoint-8" / "merged").state_dict()
    assert _equal(merged_a, merged_b)
    assert not torch.equal(merged_a["logit_bias"], a.model.logit_bias)


def test_merge_buffers_load_best_merged_model_keeps_the_runs_merged_buffers(tmp_path):
    record = RecordMerged()
    trainer = _trainer(tmp_path, model=_buffered_model(), callbacks=[record],
                       wsm=dict(schedule="1-sqrt", window=4, merge_buffers=True), load_best_model_at_end=True,
                       metric_for_best_model="eval_merged_loss", save_steps=2, eval_steps=2, learning_rate=3e-2)
    trainer.train()
    best = min((h for h in trainer.state.log_history if "eval_merged_loss" in h), key=lambda h: h["eval_merged_loss"])
    assert _equal(trainer.model.state_dict(), record.at_save[best["step"]][0])  # merged params and buffers loaded
    if best["step"] != 8:  # the run's final merge is still what the optimizer reads, buffers included
        assert _equal(unwrap(trainer.optimizer).merged_state_dict(model=trainer.model), record.at_save[8][0])


def test_merge_buffers_needs_merge_arguments(tmp_path):
    trainer = Trainer(model=_model(), args=_args(tmp_path, eval_strategy="no"), train_dataset=TRAIN)
    with pytest.raises(ValueError, match="merge_buffers=True needs the merge arguments"):
        wrap_trainer(trainer, merge_buffers=True)
