"""OLMo-core (ai2-olmo-core 3.0.0): WSM in one line of the ``Trainer``'s callbacks.

One line in an OLMo-core training script or ``TrainerConfig``::

    from wsm_optim.integrations.olmo_core import WSMMergeCallback

    trainer_config = trainer_config.with_callback("wsm", WSMMergeCallback(schedule="1-sqrt", window=1000))

The train module's optimizer (whatever ``OptimConfig`` built it: ``AdamWConfig``,
``LionConfig``, ...) is wrapped in :class:`~wsm_optim.WSMOptimizer` when the
callback is attached, before the ``Trainer`` loads a checkpoint. What it changes,
and why:

* Checkpoints. The accumulators and counters are optimizer state, so every
  checkpoint's ``model_and_optim/`` holds them (``optim.state.<param fqn>.wsm_acc.<merge>``,
  ``wsm_origin.<merge>``, ``wsm_last.<merge>``; ``DTensor`` s sharded like
  their param under FSDP, so DCP reshards them), and a resume from any step,
  also mid-window, continues the merge exactly. OLMo-core writes optimizer
  state flattened by default (``StateDictOptions(flatten_optimizer_state_dict=True)``),
  which rebuilds keys from the inner optimizer's live state and would drop the
  WSM entries; the callback switches the train module's save and load options
  to unflattened optimizer state dicts (OLMo-core's loader detects the layout of
  each checkpoint from its metadata).
* Merged checkpoints. When a merge's window completes at step ``N``, the merged
  model is written beside the run's checkpoints as ``stepN-merged/model_and_optim``
  (model only, OLMo-core's DCP layout, as ``ModelMergeCallback`` writes it;
  ``stepN-merged_<name>`` with several merges), loadable with
  ``olmo_core.distributed.checkpoint.load_model_and_optim_state``.
* Evaluation. Right after, every ``EvaluatorCallback`` of the trainer runs on the
  merged weights with the metric prefix ``eval/merged`` (``eval/merged_<name>``);
  the live weights are restored bit-exactly afterwards.

The callback runs before ``CheckpointerCallback`` (priority 2, as
``ModelMergeCallback``), so a merge that completes at a checkpoint step is saved
before that checkpoint, and a resume from it does not write it twice.

Unlike ``ModelMergeCallback`` (a uniform average of the last ``merge_last_n_steps``
steps, kept in host memory outside any checkpoint, given up on a mid-window
resume), nothing blocks ephemeral checkpoints: the merge is part of every one.
``docs/olmo-core.md`` compares the two on the same run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional

import torch
from olmo_core.distributed.checkpoint import save_state_dict
from olmo_core.distributed.utils import barrier, get_rank
from olmo_core.io import clear_directory, dir_is_empty, is_url, join_path
from olmo_core.train.callbacks import Callback, EvaluatorCallback

from .. import schedules
from ..core.distributed import resharded
from ..core.optimizer import WSMOptimizer
from ..core.spec import WSMOptions
from ._arguments import merge_config
from .unwrap import wrapped_merge

__all__ = ["WSMMergeCallback"]

#: Folder suffix and metric infix of the merged model when one merge is tracked.
MERGED = "merged"


@dataclass
class WSMMergeCallback(Callback):
    """Keep a WSM merge in the optimizer state; save and evaluate the merged model when a window completes.

    ``TrainerConfig(...).with_callback("wsm", WSMMergeCallback(schedule="1-sqrt", window=1000))``.

    The merge arguments are :class:`~wsm_optim.WSMOptimizer`'s options
    (:class:`~wsm_optim.core.spec.WSMOptions`, every field with its default),
    validated when the callback is created. Leave them all at their defaults
    (``window=None``) if the train module's optimizer already is a
    ``WSMOptimizer``; it is then used as it is.

    Windows count optimizer steps, which are the trainer's steps (``global_step``)
    unless ``steps_to_skip`` skips some.
    """

    # Before CheckpointerCallback (1): see the module docstring.
    priority: ClassVar[int] = 2

    schedule: schedules.Schedule = "linear"
    """Decay shape: a name of ``wsm_optim.schedules.SHAPES``, a callable f(t), or w_1..w_k."""

    window: Optional[int] = None
    """Optimizer steps per merge window (required unless ``merges`` is given)."""

    interval: int = 1
    """Steps between checkpoints of the merge; ``window`` must be a multiple of it."""

    start: int = 0
    """Steps before the first window is anchored."""

    backend: str = "auto"
    """Update backend (``"auto"``: Triton on CUDA, foreach otherwise)."""

    keep_last: bool = False
    """Keep the last completed window's merge readable (one more fp32 accumulator per param)."""

    merges: Optional[Dict[str, Dict[str, Any]]] = None
    """Several merges, ``{name: dict(schedule=..., window=..., ...)}``, instead of the fields above."""

    nonfinite: str = "raise"
    """NaN/inf policy of the merge: ``"raise"`` or ``"skip"``."""

    overlap: bool = False
    """CUDA only: fold checkpoints on a side stream."""

    capturable: bool = False
    """Launch the update every step so a step can be captured in a CUDA graph (Triton backend)."""

    offload: Optional[str] = None
    """``"cpu"``: every accumulator in host memory, folded by a worker thread."""

    merge_buffers: bool = False
    """Also merge the model's persistent floating-point buffers with the same weights."""

    moments: Optional[int] = None
    """A moment merge with this many accumulators per param, read with any decay shape afterwards."""

    output_suffix: str = MERGED
    """Merged checkpoints go to ``<save_folder>/step<N>-<output_suffix>`` (``-<output_suffix>_<merge>``
    with several merges); metrics to ``eval/<output_suffix>`` (``eval/<output_suffix>_<merge>``)."""

    save_merged: bool = True
    """Write the merged model when a window completes."""

    evaluate_merged: bool = True
    """Run the trainer's evaluator callbacks on the merged model when a window completes."""

    enabled: bool = True

    def __post_init__(self) -> None:
        self._config = merge_config(self.options())
        self._wsm: Optional[WSMOptimizer] = None
        #: ``{merge: windows_completed}`` already saved/evaluated, so each window is written once.
        self._done: Dict[str, int] = {}

    def options(self) -> WSMOptions:
        """The merge fields as ``WSMOptimizer``'s option set."""
        return WSMOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(WSMOptions)})

    @property
    def optimizer(self) -> WSMOptimizer:
        """The train module's ``WSMOptimizer`` (for readouts: ``merged_state_dict``, ``merged_weights``)."""
        if self._wsm is None:
            raise RuntimeError("WSMMergeCallback: not attached to a Trainer yet")
        return self._wsm

    # ----------------------------------------------------------------- wrap
    def post_attach(self) -> None:
        """Wrap the train module's optimizer; switch its optimizer state dicts to the unflattened layout."""
        if not self.enabled:
            return
        train_module = self.trainer.train_module
        configured = getattr(train_module, "optim", None)
        if not isinstance(configured, torch.optim.Optimizer):
            raise TypeError(
                f"WSMMergeCallback: the train module ({type(train_module).__name__}) has no optimizer "
                f"in .optim (got {type(configured).__name__}); eval_only train modules cannot keep a merge"
            )
        found = wrapped_merge(configured)
        if found is not None:
            if self._config is not None:
                raise TypeError(
                    "WSMMergeCallback: the train module's optimizer already is a WSMOptimizer; give the "
                    "callback no merge arguments (WSMMergeCallback()) or build a plain optimizer"
                )
            self._wsm = found
        else:
            if self._config is None:
                raise TypeError(
                    "WSMMergeCallback: window is required (e.g. WSMMergeCallback(window=1000)) unless the "
                    "train module's optimizer already is a WSMOptimizer"
                )
            # model=: OLMo-core's OptimConfig.build passes bare params (no names), so readouts take the
            # names (and the buffers) from the module the train module trains
            self._wsm = WSMOptimizer(configured, model=train_module.model, **self._config)
            train_module.optim = self._wsm
        for name in ("state_dict_save_opts", "state_dict_load_opts"):
            opts = getattr(train_module, name, None)
            if opts is not None and opts.flatten_optimizer_state_dict:
                setattr(train_module, name, dataclasses.replace(opts, flatten_optimizer_state_dict=False))

    def pre_train(self) -> None:
        """After any checkpoint load: a window that is complete now was saved before that checkpoint."""
        if not self.enabled:
            return
        for merge in self.optimizer.merges:
            status = self.optimizer.merge_status(merge)
            self._done[merge] = status["windows_completed"]

    # ----------------------------------------------------- completed windows
    def post_train_batch(self) -> None:
        """Save and evaluate each merge whose window completed at this step."""
        if not self.enabled:
            return
        for merge in self.optimizer.merges:
            status = self.optimizer.merge_status(merge)
            if status["complete"] and status["windows_completed"] > self._done.get(merge, 0):
                self._done[merge] = status["windows_completed"]
                self.save_and_evaluate(merge)

    def merged_name(self, merge: str) -> str:
        """``"merged"`` (``output_suffix``) for a single merge, else ``"merged_<merge>"``."""
        return self.output_suffix if len(self.optimizer.merges) == 1 else f"{self.output_suffix}_{merge}"

    def merged_checkpoint_path(self, merge: str, step: Optional[int] = None) -> str:
        """``<save_folder>/step<N>-merged``: where the merge completed at step ``N`` is written."""
        step = self.step if step is None else step
        return str(join_path(self.trainer.save_folder, f"step{step}-{self.merged_name(merge)}"))

    @torch.no_grad()
    def save_and_evaluate(self, merge: str, *, completed: bool = True) -> Optional[str]:
        """Write the merge as ``stepN-merged/model_and_optim`` and evaluate it, inside ``merged_weights``.

        A collective under FSDP (every rank calls it). Returns the merged
        checkpoint's folder (``None`` with ``save_merged=False``).
        """
        path = self.merged_checkpoint_path(merge) if self.save_merged else None
        evaluators = [cb for cb in self.trainer.callbacks.values() if isinstance(cb, EvaluatorCallback)]
        if path is None and not (self.evaluate_merged and evaluators):
            return None
        train_module = self.trainer.train_module
        # FSDP2 keeps lm_head's params all-gathered after an evaluation forward: resharded around the swap
        # (WSMOptimizer does it too when it has model=; a user-built one may not)
        with resharded(train_module.model), self.optimizer.merged_weights(merge=merge, completed=completed):
            if path is not None:
                if get_rank() == 0:
                    if not dir_is_empty(path):
                        clear_directory(path)
                    if not is_url(path):
                        os.makedirs(path, exist_ok=True)
                barrier()
                save_state_dict(
                    join_path(path, "model_and_optim"),
                    train_module.state_dict_to_save(optim=False),
                    process_group=self.trainer.checkpointer.process_group,
                )
                barrier()
            if self.evaluate_merged:
                for callback in evaluators:
                    callback.perform_eval(prefix=f"eval/{self.merged_name(merge)}")
        return path
