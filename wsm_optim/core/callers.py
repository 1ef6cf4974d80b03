"""Who calls ``WSMOptimizer.step()``: framework calls that are not training steps, or must not step it as they do.

* ``torch.distributed.checkpoint.state_dict`` (``get_optimizer_state_dict`` /
  ``set_optimizer_state_dict``, ``_init_optim_state``) and torchtitan's
  ``init_optim_state`` call ``optim.step()`` with zero gradients and
  ``lr = 0`` when the optimizer has no state yet, to make the inner optimizer
  create it. :func:`called_by_state_init` lets ``step()`` forward that call to
  the inner optimizer only: it neither counts nor touches accumulators.
* DeepSpeed ZeRO-1/2/3 and its bf16/fp16 master-weight wrappers step the client
  optimizer from their own ``step`` (ZeRO: once per param group, on flat
  partitions, after cutting ``param_groups`` to that group). Only
  ``wsm_optim.integrations.deepspeed.attach(engine)`` makes that one merge step
  per engine step; :func:`refuse_unattached_deepspeed` and
  :func:`refuse_group_cut` stop a run that forgot it at its first step.

Callers are found by walking a few frames up the stack (the optimizer's
profiling and ``no_grad`` wrappers sit in between); each check costs a
dictionary look-up while its framework was never imported.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

__all__ = ["called_by_state_init", "refuse_unattached_deepspeed", "refuse_group_cut"]

#: The state-initialising step: (module, function).
_STATE_INIT_FUNCTIONS = (
    ("torch.distributed.checkpoint.state_dict", "_init_optim_state"),
    ("torchtitan.components.optimizer.utils", "init_optim_state"),  # OptimizersContainer, torchft's optimizer
)
_ATTACH = "wsm_optim.integrations.deepspeed.attach(engine)"


def _callers(frame: FrameType | None, max_depth: int) -> Iterator[FrameType]:
    """``frame`` and the frames that called it, innermost first, at most ``max_depth``."""
    for _ in range(max_depth):
        if frame is None:
            return
        yield frame
        frame = frame.f_back


def called_by_state_init(max_depth: int = 16) -> bool:
    """True when the current ``step()`` call is DCP's or torchtitan's state-initialising step (matched by code object)."""
    codes = []
    for module_name, function in _STATE_INIT_FUNCTIONS:
        module = sys.modules.get(module_name)
        code = getattr(getattr(module, function, None), "__code__", None) if module is not None else None
        if code is not None:
            codes.append(code)
    return bool(codes) and any(f.f_code is code for f in _callers(sys._getframe(1), max_depth) for code in codes)


def refuse_unattached_deepspeed(opt: object, max_depth: int = 12) -> None:
    """Raise when a DeepSpeed optimizer wrapper steps ``opt`` without ``attach(engine)``.

    The wrapper is a ``self`` in a frame of a file under ``deepspeed/runtime/``
    whose ``optimizer`` is ``opt`` (the engine itself, stepping ``opt`` as is at
    stage 0 without bf16/fp16, is fine).
    """
    if "deepspeed" not in sys.modules:
        return
    for frame in _callers(sys._getframe(1), max_depth):
        if "/deepspeed/runtime/" not in frame.f_code.co_filename.replace("\\", "/"):
            continue
        owner = frame.f_locals.get("self")
        if (owner is not None and getattr(owner, "optimizer", None) is opt
                and not hasattr(owner, "zero_optimization_stage")  # the DeepSpeedEngine
                and getattr(owner, "_wsm_attached", None) is not opt):
            _refuse(owner)


def _refuse(zero: Any) -> None:
    name = type(zero).__name__
    if "Stage3" in name:
        raise NotImplementedError(
            f"WSMOptimizer: stepped by DeepSpeed ZeRO stage 3 ({name}); ZeRO stage 3 partitions every parameter "
            "and gathers it on the fly, and a WSM merge of it is not supported. Use ZeRO stage 1 or 2 "
            f"(zero_optimization.stage) with {_ATTACH}, or FSDP2 (fully_shard)"
        )
    if hasattr(zero, "single_partition_of_fp32_groups"):
        stage = 2 if getattr(zero, "partition_gradients", False) else 1
        raise RuntimeError(
            f"WSMOptimizer: stepped by DeepSpeed ZeRO stage {stage} ({name}) without {_ATTACH}: ZeRO steps it once "
            "per param group on flat fp32 partitions, so steps would miscount and the merge could not be read by "
            f"parameter name. Call {_ATTACH} right after deepspeed.initialize, before the first step (the HF "
            "Trainer's wrap_trainer does it)"
        )
    raise NotImplementedError(
        f"WSMOptimizer: stepped by DeepSpeed's {name} (bf16/fp16 master weights without ZeRO); not supported. "
        f"Use ZeRO stage 1 or 2 (zero_optimization.stage) with {_ATTACH}"
    )


def refuse_group_cut(current: list[dict[str, Any]], groups: list[dict[str, Any]]) -> None:
    """Raise when ``param_groups`` is set to a proper subset of ``current``, as DeepSpeed ZeRO does per group."""
    if 0 < len(groups) < len(current) and all(any(g is c for c in current) for g in groups):
        raise RuntimeError(
            f"WSMOptimizer.param_groups was cut to {len(groups)} of its {len(current)} groups, as a framework "
            "that steps one group at a time does (DeepSpeed ZeRO-1/2): every such step() would count as a "
            f"merge step. With DeepSpeed call {_ATTACH} right after deepspeed.initialize (the HF Trainer's "
            "wrap_trainer does it); to drop groups for good, edit opt.inner.param_groups"
        )
