"""What the engines need from ``WSMOptimizer.step()``, registered into :mod:`wsm_optim.core.callers`.

Loaded by ``import wsm_optim`` (torch-free), so the rules hold whether or not
an integration module was imported:

* ``torch.distributed.checkpoint.state_dict`` (``get_optimizer_state_dict`` /
  ``set_optimizer_state_dict``, ``_init_optim_state``) and torchtitan's
  ``init_optim_state`` call ``optim.step()`` with zero gradients and ``lr = 0``
  when the optimizer has no state yet: state-initialising calls, not steps.
* DeepSpeed ZeRO-1/2/3 and its bf16/fp16 master-weight wrappers step the client
  optimizer from their own ``step`` (ZeRO: once per param group, on flat
  partitions, after cutting ``param_groups`` to that group). Only
  ``wsm_optim.integrations.deepspeed.attach(engine)`` makes that one merge step
  per engine step; :func:`refuse_unattached_deepspeed` stops a run that forgot
  it at its first step.
* The fixes the core's messages name: ``attach(engine)`` for a cut
  ``param_groups``, ``wrap_trainer`` where the Hugging Face ``Trainer`` with
  DeepSpeed dropped a hand-passed optimizer.
"""

from __future__ import annotations

import sys
from typing import Any

from ..core import callers

__all__ = ["refuse_unattached_deepspeed"]

ATTACH = "wsm_optim.integrations.deepspeed.attach(engine)"
_WRAP_TRAINER = "wsm_optim.integrations.transformers.wrap_trainer(trainer, window=...)"


def refuse_unattached_deepspeed(opt: object, max_depth: int = 12) -> None:
    """Raise when a DeepSpeed optimizer wrapper steps ``opt`` without ``attach(engine)``.

    The wrapper is a ``self`` in a frame of a file under ``deepspeed/runtime/``
    whose ``optimizer`` is ``opt`` (the engine itself, stepping ``opt`` as is at
    stage 0 without bf16/fp16, is fine).
    """
    if "deepspeed" not in sys.modules:
        return
    for frame in callers.callers(sys._getframe(1), max_depth):
        if "/deepspeed/runtime/" not in frame.f_code.co_filename.replace("\\", "/"):
            continue
        owner = frame.f_locals.get("self")
        if (owner is not None and getattr(owner, "optimizer", None) is opt
                and not hasattr(owner, "zero_optimization_stage")):  # the DeepSpeedEngine
            from .deepspeed import attached_to

            if attached_to(owner) is not opt:
                _refuse(owner)


def _refuse(zero: Any) -> None:
    name = type(zero).__name__
    if "Stage3" in name:
        raise NotImplementedError(
            f"WSMOptimizer: stepped by DeepSpeed ZeRO stage 3 ({name}); ZeRO stage 3 partitions every parameter "
            "and gathers it on the fly, and a WSM merge of it is not supported. Use ZeRO stage 1 or 2 "
            f"(zero_optimization.stage) with {ATTACH}, or FSDP2 (fully_shard)"
        )
    if hasattr(zero, "single_partition_of_fp32_groups"):
        stage = 2 if getattr(zero, "partition_gradients", False) else 1
        raise RuntimeError(
            f"WSMOptimizer: stepped by DeepSpeed ZeRO stage {stage} ({name}) without {ATTACH}: ZeRO steps it once "
            "per param group on flat fp32 partitions, so steps would miscount and the merge could not be read by "
            f"parameter name. Call {ATTACH} right after deepspeed.initialize, before the first step (the HF "
            "Trainer's wrap_trainer does it)"
        )
    raise NotImplementedError(
        f"WSMOptimizer: stepped by DeepSpeed's {name} (bf16/fp16 master weights without ZeRO); not supported. "
        f"Use ZeRO stage 1 or 2 (zero_optimization.stage) with {ATTACH}"
    )


callers.STATE_INIT.extend([
    ("torch.distributed.checkpoint.state_dict", "_init_optim_state"),
    ("torchtitan.components.optimizer.utils", "init_optim_state"),  # OptimizersContainer, torchft's optimizer
])
callers.STEP_CHECKS.append(refuse_unattached_deepspeed)
callers.HINTS.update(
    group_cut=f"With DeepSpeed ZeRO-1/2, call {ATTACH} right after deepspeed.initialize (the HF Trainer's "
    "wrap_trainer does it).",
    bypass="With the Hugging Face Trainer and DeepSpeed, Trainer(optimizers=(WSMOptimizer(...), None)) is dropped "
    f"by transformers' DeepSpeed set-up, which builds its own optimizer: use {_WRAP_TRAINER} before train() (it "
    "keeps a WSMOptimizer given in optimizers=).",
    unstepped="DeepSpeed under the Hugging Face Trainer discards the optimizer given in optimizers=(...): call "
    "wsm_optim.integrations.transformers.wrap_trainer(trainer, ...) before train().",
)
