"""Lightning: ``WSMCallback``, WSM in one line of ``Trainer(callbacks=[...])``.

Follows the conventions of Lightning's own ``WeightAveraging`` /
``EMAWeightAveraging`` callbacks: the averaged (here: merged) weights are
swapped in for validation, saved as the checkpoint's ``state_dict`` (so
``ModelCheckpoint(monitor=...)``, ``ckpt_path="best"`` and
``load_from_checkpoint`` refer to the model that was scored), the live weights
are kept under ``checkpoint["current_model_state"]`` for resuming, and the
merged weights are left in the module after ``fit``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from .. import schedules
from ..core.optimizer import WSMOptimizer
from ._arguments import merge_config, options_from
from ._schedulers import describe_decay, repoint_scheduler
from .unwrap import wrapped_merge

__all__ = ["WSMCallback"]

#: Checkpoint keys shared with Lightning's ``WeightAveraging`` callbacks.
LIVE_STATE_KEY = "current_model_state"


class WSMCallback(Callback):
    """Train with WSM: wrap the configured optimizer, validate and checkpoint the merged model.

    ``Trainer(callbacks=[WSMCallback(schedule="1-sqrt", window=1000)])``; the
    ``LightningModule``'s ``configure_optimizers`` stays as it is.

    * ``fit`` start: the optimizer from ``configure_optimizers`` is wrapped in
      :class:`~wsm_optim.WSMOptimizer` (``model=`` the module, so readouts are
      complete ``state_dict`` s); its LR schedulers are re-pointed at the wrapper.
      If ``configure_optimizers`` already returns a ``WSMOptimizer``, give no
      merge arguments here and it is used as is.
    * validation during ``fit`` (sanity check included) runs on the merged
      weights; the live weights are restored bit-exactly afterwards.
    * checkpoints: ``checkpoint["state_dict"]`` holds the merged weights (what
      validation scored), ``checkpoint["current_model_state"]`` the live ones,
      and the optimizer state the accumulators and counters: resuming with
      ``ckpt_path=`` continues bit-exactly (on CPU), also mid-window.
    * after ``fit`` (``merged_after_fit=True``) the module holds the merged weights;
      the optimizer's readouts then no longer apply (its live term is gone): to
      train on, resume from a checkpoint. A checkpoint saved after ``fit`` still
      keeps the live weights in ``current_model_state``.

    Args:
        schedule, window, interval, start, keep_last, merges, backend, nonfinite, overlap, capturable, offload,
        merge_buffers, moments:
            passed to :class:`~wsm_optim.WSMOptimizer` (see there). Leave them
            all at their defaults (``window=None``) to use a ``WSMOptimizer``
            returned by ``configure_optimizers``.
        merge: which merge is validated and saved when several are tracked
            (``merges={...}``); required then.
        swap_for_validation: validate the merged weights (default). ``False``
            validates the live weights and still saves the merged ones.
        merged_after_fit: leave the merged weights in the module when ``fit``
            ends, as Lightning's ``WeightAveraging`` does (default ``True``).
    """

    def __init__(
        self,
        schedule: schedules.Schedule = "linear",
        window: int | None = None,
        interval: int = 1,
        start: int = 0,
        *,
        keep_last: bool = False,
        merges: Mapping[str, Mapping[str, Any]] | None = None,
        merge: str | None = None,
        backend: str = "auto",
        nonfinite: str = "raise",
        overlap: bool = False,
        capturable: bool = False,
        offload: str | None = None,
        merge_buffers: bool = False,
        moments: int | None = None,
        swap_for_validation: bool = True,
        merged_after_fit: bool = True,
    ) -> None:
        self._config = merge_config(options_from(locals()))
        if merges is not None:
            if merge is None and len(merges) > 1:
                raise ValueError(f"WSMCallback: several merges {list(merges)}: name the one to validate with merge=")
            if merge is not None and merge not in merges:
                raise ValueError(f"WSMCallback: merge {merge!r} is not one of merges {list(merges)}")
        self.merge = merge
        self.swap_for_validation = bool(swap_for_validation)
        self.merged_after_fit = bool(merged_after_fit)
        self._wsm: WSMOptimizer | None = None
        self._swap: contextlib.ExitStack | None = None
        # After ``fit`` with ``merged_after_fit``, the module holds the merged
        # weights; these are the live ones, for a checkpoint saved afterwards.
        self._live_after_fit: dict[str, torch.Tensor] | None = None

    @property
    def optimizer(self) -> WSMOptimizer | None:
        """The ``WSMOptimizer`` of the current (or last) ``fit``, for readouts of other merges."""
        return self._wsm

    # ------------------------------------------------------------------ wrap
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Wrap the configured optimizer (after ``configure_optimizers``, before its state is restored)."""
        _check_strategy(trainer)
        from lightning.pytorch.callbacks.weight_averaging import WeightAveraging

        others = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, WeightAveraging)]
        if others:
            raise ValueError(
                f"WSMCallback and {others} both replace checkpoint['state_dict'] by averaged weights; use one"
            )
        optimizers = trainer.strategy.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"WSMCallback wraps one optimizer; configure_optimizers returned {len(optimizers)}"
            )
        configured = optimizers[0]
        found = wrapped_merge(configured)
        if found is not None:
            if self._config is not None:
                raise TypeError(
                    "WSMCallback: configure_optimizers already returns a WSMOptimizer; give the callback "
                    "no merge arguments (WSMCallback()) or return the plain optimizer"
                )
            if self.merge is None and len(found.merges) > 1:
                raise ValueError(f"WSMCallback: several merges {list(found.merges)}: name one with merge=")
            self._wsm = found
        else:
            if self._config is None:
                raise TypeError(
                    "WSMCallback: window is required (e.g. WSMCallback(window=1000)) unless "
                    "configure_optimizers returns a WSMOptimizer"
                )
            wsm = WSMOptimizer(configured, model=pl_module, **self._config)
            trainer.strategy.optimizers = [wsm]  # also re-creates the LightningOptimizer around it
            for config in trainer.lr_scheduler_configs:
                repoint_scheduler(config.scheduler, configured, wsm)
            self._wsm = wsm
        self._live_after_fit = None
        _warn_about_decay(trainer)
        _warn_about_weights_only_checkpoints(trainer)

    # ------------------------------------------------------------ validation
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Swap the merged weights in (only while fitting: ``validate``/``test`` use the loaded weights)."""
        if self._swapping(trainer):
            stack = contextlib.ExitStack()
            stack.enter_context(self._wsm.merged_weights(merge=self.merge))
            self._swap = stack

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Restore the live weights, bit-exactly."""
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    def _swapping(self, trainer: Trainer) -> bool:
        return (
            self.swap_for_validation
            and self._wsm is not None
            and self._live_after_fit is None
            and trainer.state.fn == TrainerFn.FITTING
        )

    def _restore(self) -> None:
        if self._swap is not None:
            stack, self._swap = self._swap, None
            stack.close()

    # ----------------------------------------------------------- end of fit
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Leave the merged weights in the module (``merged_after_fit``); keep the live ones for saving."""
        if not self.merged_after_fit or self._wsm is None:
            return
        merged = self._wsm.merged_state_dict(model=pl_module, merge=self.merge)
        self._live_after_fit = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        pl_module.load_state_dict(merged)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Merged weights in ``checkpoint["state_dict"]``, live ones in ``checkpoint["current_model_state"]``."""
        if self._wsm is None:
            rank_zero_info(
                "WSMCallback: checkpoint saved outside fit; its state_dict holds the module's weights as they are"
            )
            return
        if self._live_after_fit is not None:  # after fit: the module already holds the merged weights
            checkpoint[LIVE_STATE_KEY] = self._live_after_fit
            return
        if self._swap is not None:  # saved during validation: the module holds the merged weights now
            self._restore()
            try:
                checkpoint[LIVE_STATE_KEY] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
                checkpoint["state_dict"] = self._wsm.merged_state_dict(model=pl_module, merge=self.merge)
            finally:
                self.on_validation_epoch_start(trainer, pl_module)
            return
        checkpoint[LIVE_STATE_KEY] = checkpoint["state_dict"]
        checkpoint["state_dict"] = self._wsm.merged_state_dict(model=pl_module, merge=self.merge)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming ``fit``: put the live weights back (Lightning loaded the merged ``state_dict``)."""
        if trainer.state.fn != TrainerFn.FITTING:
            return  # validate/test/predict with ckpt_path: the merged weights are the ones wanted
        if LIVE_STATE_KEY in checkpoint:
            pl_module.load_state_dict(checkpoint[LIVE_STATE_KEY])
        else:
            rank_zero_warn(
                "WSMCallback: the checkpoint was not saved with WSMCallback (no 'current_model_state'); "
                "training resumes from its state_dict, and its optimizer state must be a WSMOptimizer's"
            )


def _check_strategy(trainer: Trainer) -> None:
    """Refuse strategies whose optimizer the callback cannot wrap after set-up."""
    name = type(trainer.strategy).__name__
    if "DeepSpeed" in name:
        raise NotImplementedError(
            "WSMCallback: DeepSpeed wraps the optimizer in its engine before callbacks run; "
            "not supported (use DDP, or ModelParallelStrategy for FSDP2)"
        )
    if name == "FSDPStrategy":
        raise NotImplementedError(
            "WSMCallback: FSDPStrategy is FSDP1 (flat parameters), which WSMOptimizer does not support; "
            "use ModelParallelStrategy (FSDP2, fully_shard)"
        )


def _warn_about_decay(trainer: Trainer) -> None:
    """WSM replaces the LR decay: warn about a scheduler that lowers the LR after warmup."""
    for config in trainer.lr_scheduler_configs:
        if config.interval == "epoch":
            horizon = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        elif trainer.max_steps and trainer.max_steps > 0:
            horizon = trainer.max_steps
        else:
            try:
                horizon = int(trainer.estimated_stepping_batches)
            except (ValueError, TypeError, OverflowError, RuntimeError):  # infinite or unknown length
                horizon = None
        decay = describe_decay(config.scheduler, horizon)
        if decay is not None:
            rank_zero_warn(
                f"WSMCallback: the LR scheduler from configure_optimizers decays the learning rate after "
                f"warmup: {decay}. WSM replaces the decay by the merge and expects a constant LR after "
                "warmup (e.g. LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps)))."
            )


def _warn_about_weights_only_checkpoints(trainer: Trainer) -> None:
    """Lightning skips callbacks' ``on_save_checkpoint`` for weights-only checkpoints: say so."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_weights_only:
            rank_zero_warn(
                "WSMCallback: ModelCheckpoint(save_weights_only=True) files will hold the LIVE weights, "
                "not the merged ones that validation scored: Lightning does not call callbacks' "
                "on_save_checkpoint for weights-only checkpoints. Use save_weights_only=False."
            )
