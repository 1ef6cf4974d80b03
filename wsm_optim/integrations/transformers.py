"""Hugging Face ``Trainer``: ``wrap_trainer``, WSM in two lines.

::

    from wsm_optim.integrations.transformers import wrap_trainer
    wrap_trainer(trainer, schedule="1-sqrt", window=1000)

Then ``trainer.train()`` (and ``trainer.train(resume_from_checkpoint=...)``)
as usual:

* the optimizer the ``Trainer`` builds (or the one given in ``optimizers=``)
  is wrapped in :class:`~wsm_optim.WSMOptimizer` before accelerate prepares
  it, so ``optimizer.pt`` in every checkpoint holds the merge state and
  ``resume_from_checkpoint`` continues bit-exactly (on CPU), also mid-window;
* every evaluation also scores the merged model: ``eval_merged_loss`` (and
  every other metric) next to ``eval_loss``, usable as ``metric_for_best_model``;
* every checkpoint gets a ``merged/`` folder written by ``save_model`` under
  the merged weights, loadable with ``from_pretrained``;
* ``load_best_model_at_end`` with a merged metric loads the best *merged* model
  (``merged/`` folders load completely, tied embeddings included, without a
  "missing keys" message); with any metric, the run's final live weights are
  kept aside first (one host copy), so readouts of the optimizer and
  ``eval_merged_*`` afterwards are the run's final merge, exactly;
* DeepSpeed ZeRO stage 0, 1 and 2 (``TrainingArguments(deepspeed=...)``, no
  ``optimizer`` section): the engine is attached with
  :func:`wsm_optim.integrations.deepspeed.attach` (one merge step per step,
  fp32 masters merged); read merges by name with
  ``wsm_optim.integrations.deepspeed.merged_state_dict(trainer.model_wrapped)``.
  ZeRO-3 and ``load_best_model_at_end`` under DeepSpeed are refused;
* FSDP2 (``fsdp="full_shard", fsdp_config={"fsdp_version": 2}``): merges live
  beside the DTensor shards; ``merged_state_dict(full=True)`` gathers. FSDP1 is
  refused. (On CPU accelerate ignores its FSDP plugin and the Trainer runs DDP.);
* a learning-rate scheduler that decays after warmup (the ``Trainer`` default,
  linear to 0) gets a warning naming ``lr_scheduler_type="constant_with_warmup"``.

With several merges (``merges={name: dict(...)}``) each is evaluated and saved:
metrics ``eval_merged_<name>_*``, folders ``merged_<name>/``.

transformers is imported only when a wrapped trainer runs, never by ``import wsm_optim``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from .. import schedules
from ..core.optimizer import WSMOptimizer
from ._arguments import merge_config, options_from
from ._final_weights import forget_final_weights, keep_final_weights
from ._saved_model import load_saved_model
from ._schedulers import describe_decay, repoint_scheduler
from .unwrap import unwrap

__all__ = ["wrap_trainer", "WSMTrainerMixin", "merged_folder"]

#: Name of the merged model's folder (and metric infix) when one merge is tracked.
MERGED = "merged"


def merged_folder(optimizer: Any, merge: str) -> str:
    """Folder name and metric infix of ``merge``: ``"merged"`` for a single merge, else ``"merged_<merge>"``."""
    return MERGED if len(unwrap(optimizer).merges) == 1 else f"{MERGED}_{merge}"


def wrap_trainer(
    trainer: Any,
    schedule: schedules.Schedule = "linear",
    window: int | None = None,
    interval: int = 1,
    start: int = 0,
    *,
    keep_last: bool = False,
    merges: Mapping[str, Mapping[str, Any]] | None = None,
    backend: str = "auto",
    nonfinite: str = "raise",
    overlap: bool = False,
    capturable: bool = False,
    offload: str | None = None,
    merge_buffers: bool = False,
    moments: int | None = None,
    save_merged: bool = True,
) -> Any:
    """Make a ``transformers.Trainer`` (or any subclass, e.g. TRL's) train with WSM; returns it.

    The instance's class becomes a subclass with :class:`WSMTrainerMixin` first
    (as Lightning's ``LightningOptimizer`` does for optimizers); nothing else
    about the trainer changes. Call it before ``train()``.

    Args:
        trainer: the ``Trainer`` instance.
        schedule, window, interval, start, keep_last, merges, backend, nonfinite, overlap, capturable, offload,
        merge_buffers, moments:
            passed to :class:`~wsm_optim.WSMOptimizer`. Leave them all at their
            defaults (``window=None``) when the trainer got a ``WSMOptimizer``
            through ``optimizers=(wsm, scheduler)``.
        save_merged: write the merged model(s) into every checkpoint (default).
            Needed for ``load_best_model_at_end`` with a merged metric.
    """
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        raise TypeError(f"wrap_trainer: trainer must be a transformers.Trainer, got {type(trainer).__name__}")
    if isinstance(trainer, WSMTrainerMixin):
        raise TypeError("wrap_trainer: this trainer is already wrapped")
    _check_engine(trainer)
    config = merge_config(options_from(locals()))
    cls = type(trainer)
    trainer.__class__ = _WRAPPED.setdefault(cls, type(f"WSM{cls.__name__}", (WSMTrainerMixin, cls), {}))
    trainer._wsm_config = config
    trainer._wsm_save_merged = bool(save_merged)
    trainer._wsm_evaluating = False
    trainer._wsm_created = None
    # DeepSpeed's set-up (deepspeed_init) drops the optimizer given in optimizers=(...) and calls
    # create_optimizer(): remember it, so that create_optimizer hands it back.
    trainer._wsm_given = _find_wsm(trainer.optimizer)
    return trainer


def _find_wsm(optimizer: Any) -> WSMOptimizer | None:
    if optimizer is None:
        return None
    try:
        return unwrap(optimizer)
    except TypeError:
        return None


_WRAPPED: dict[type, type] = {}


class WSMTrainerMixin:
    """The ``Trainer`` overrides behind :func:`wrap_trainer` (use that: it sets the configuration)."""

    _wsm_config: dict[str, Any] | None
    _wsm_save_merged: bool
    _wsm_evaluating: bool
    _wsm_created: WSMOptimizer | None  # the one create_optimizer made (a later train() keeps it)
    _wsm_given: WSMOptimizer | None  # the one given in optimizers=(...), if any

    # ------------------------------------------------------------------ wrap
    def wsm_optimizer(self) -> WSMOptimizer | None:
        """The ``WSMOptimizer`` inside ``self.optimizer`` (accelerate's wrapper), or ``None`` before ``train()``."""
        return _find_wsm(self.optimizer)

    def create_optimizer(self, model=None):
        """The ``Trainer``'s optimizer, wrapped in ``WSMOptimizer`` before accelerate prepares it."""
        if self.optimizer is None and self._wsm_given is not None:
            self.optimizer = self._wsm_given  # deepspeed_init dropped it
        optimizer = super().create_optimizer(model)
        found = self.wsm_optimizer()
        if found is not None and found is self._wsm_created:
            return optimizer  # a later train() call: wrapped already
        if found is not None:  # given through optimizers=(WSMOptimizer(...), scheduler)
            if self._wsm_config is not None:
                raise TypeError(
                    "wrap_trainer: the trainer already got a WSMOptimizer through optimizers=...; "
                    "call wrap_trainer(trainer) without merge arguments, or pass the plain optimizer"
                )
            return optimizer
        if self._wsm_config is None:
            raise TypeError(
                "wrap_trainer: window is required (e.g. wrap_trainer(trainer, window=1000)) unless the "
                "trainer got a WSMOptimizer through optimizers=(WSMOptimizer(...), None)"
            )
        wsm = WSMOptimizer(optimizer, model=self.model if model is None else model, **self._wsm_config)
        self.optimizer = self._wsm_created = wsm
        if self.lr_scheduler is not None:  # given in optimizers=(opt, scheduler)
            repoint_scheduler(self.lr_scheduler, optimizer, wsm)
        return wsm

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The ``Trainer``'s scheduler; warns if it lowers the LR after warmup."""
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps=num_training_steps, optimizer=optimizer)
        engine = _deepspeed_engine(self)
        if engine is not None:  # accelerate has built the engine around the WSMOptimizer: one merge step per step
            from .deepspeed import attach

            attach(engine)
        decay = describe_decay(scheduler, num_training_steps)
        if decay is not None:
            if created:
                kind = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
                origin, fix = f"TrainingArguments(lr_scheduler_type={kind!r})", ""
            else:
                origin = "the scheduler given in optimizers=(optimizer, scheduler)"
                fix = " (or transformers.get_constant_schedule_with_warmup(optimizer, num_warmup_steps))"
            warnings.warn(
                f"WSM: {origin} decays the learning rate after warmup: {decay}. WSM replaces the decay by "
                "the merge and expects a constant LR after warmup; use "
                f'TrainingArguments(lr_scheduler_type="constant_with_warmup", warmup_steps=...){fix}.',
                UserWarning,
                stacklevel=2,
            )
        return scheduler

    # ------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """``Trainer.evaluate``, plus the same metrics of each merged model (``eval_merged_*``)."""
        outer = self._wsm_evaluating
        self._wsm_evaluating = True
        try:
            return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._wsm_evaluating = outer

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        """Run the loop on the live weights, then on each merge swapped in; one metrics dict.

        Overriding the loop (not ``evaluate``) keeps one ``log`` and one
        ``on_evaluate`` call with every metric, so callbacks such as
        ``EarlyStoppingCallback`` see the merged metrics. ``predict`` is left alone.
        """
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only=prediction_loss_only, ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        wsm = self.wsm_optimizer()
        if not self._wsm_evaluating or wsm is None:
            return output
        for merge in wsm.merges:
            prefix = f"{metric_key_prefix}_{merged_folder(wsm, merge)}"
            with self._merged_weights(wsm, merge):
                merged = super().evaluation_loop(
                    dataloader, description, prediction_loss_only=prediction_loss_only, ignore_keys=ignore_keys,
                    metric_key_prefix=prefix,
                )
            output.metrics.update(merged.metrics)
        return output

    def _merged_weights(self, wsm: WSMOptimizer, merge: str):
        """``wsm.merged_weights``; under DeepSpeed the engine's (masters and the module's copies)."""
        engine = _deepspeed_engine(self)
        if engine is None or engine.zero_optimization_stage() == 0:
            return wsm.merged_weights(merge=merge)
        from .deepspeed import merged_weights

        return merged_weights(engine, merge=merge)

    # ------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        """Write ``merged/`` (``save_model`` under the merged weights) into the checkpoint, then the checkpoint."""
        wsm = self.wsm_optimizer()
        if self._wsm_save_merged and wsm is not None:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            for merge in wsm.merges:
                with self._merged_weights(wsm, merge):
                    self.save_model(os.path.join(folder, merged_folder(wsm, merge)), _internal_call=True)
        super()._save_checkpoint(model, trial)

    def _load_best_model(self):
        """Load the best checkpoint (its merged model with a merged metric), keeping the run's merge readable.

        The final live weights are kept aside first (:mod:`._final_weights`):
        readouts and ``eval_merged_*`` metrics afterwards are the run's final
        merge, not one that mixes in the loaded weights.
        """
        wsm = self.wsm_optimizer()
        if wsm is not None:
            keep_final_weights(wsm)
        folder = None if wsm is None else _folder_of_metric(wsm, self.args.metric_for_best_model)
        if folder is None:
            return super()._load_best_model()
        best = self.state.best_model_checkpoint
        merged_dir = os.path.join(best, folder)
        if not os.path.isdir(merged_dir):
            raise FileNotFoundError(
                f"load_best_model_at_end: metric_for_best_model={self.args.metric_for_best_model!r} is a merged "
                f"metric but {merged_dir} does not exist (wrap_trainer(..., save_merged=False)?)"
            )
        if load_saved_model(self, merged_dir):
            return
        self.state.best_model_checkpoint = merged_dir
        try:
            super()._load_best_model()
        finally:
            self.state.best_model_checkpoint = best

    def train(self, *args, **kwargs):
        _check_engine(self)
        wsm = self.wsm_optimizer()
        if wsm is not None:
            forget_final_weights(wsm)  # training goes on from the weights the model holds now
        return super().train(*args, **kwargs)


def _check_engine(trainer: Any) -> None:
    """Refuse the engines under which the merge would stand still or cannot follow the params."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
        if stage == 3:
            raise NotImplementedError(
                "wrap_trainer: DeepSpeed ZeRO stage 3 partitions every parameter and gathers it on the fly; a WSM "
                "merge of it is not supported. Use ZeRO stage 1 or 2 (zero_optimization.stage), or FSDP2"
            )
        if "optimizer" in trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config:
            raise NotImplementedError(
                "wrap_trainer: the DeepSpeed config has an 'optimizer' section, so DeepSpeed builds its own optimizer "
                "and no merge would be kept; remove the section (the Trainer's optimizer is then used and wrapped)"
            )
        if trainer.args.load_best_model_at_end:
            raise NotImplementedError(
                "wrap_trainer: load_best_model_at_end under DeepSpeed reloads the best checkpoint's optimizer state "
                "into the engine, replacing the run's merge; set load_best_model_at_end=False and load "
                "checkpoint-N/merged with from_pretrained"
            )
    if getattr(trainer, "is_fsdp_enabled", False) and getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 1:
        raise NotImplementedError(
            "wrap_trainer: FSDP1 (flat parameters) is not supported by WSMOptimizer; use FSDP2 (fsdp_version=2)"
        )


def _deepspeed_engine(trainer: Any) -> Any:
    """The DeepSpeed engine accelerate built for ``trainer``, or ``None``."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    wrapped = getattr(trainer.accelerator, "deepspeed_engine_wrapped", None)
    return None if wrapped is None else wrapped.engine


def _folder_of_metric(wsm: WSMOptimizer, metric: str | None) -> str | None:
    """The merged folder whose metrics ``metric`` names (``eval_merged_loss`` -> ``merged``), else ``None``."""
    if not metric:
        return None
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    for merge in wsm.merges:
        folder = merged_folder(wsm, merge)
        if f"_{folder}_" in key:
            return folder
    return None
