"""DeepSpeed ZeRO stage 1 and 2: the merge of DeepSpeed's fp32 master partitions, once per engine step.

::

    wsm = WSMOptimizer(torch.optim.AdamW(model.parameters(), lr=...), window=1000)
    engine, *_ = deepspeed.initialize(model=model, optimizer=wsm, config={
        "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, ...})
    wsm_optim.integrations.deepspeed.attach(engine)      # once, before the first step
    ...
    merged = wsm_optim.integrations.deepspeed.merged_state_dict(engine)   # {name: tensor}, every rank
    with wsm_optim.integrations.deepspeed.merged_weights(engine):
        evaluate(engine)

With the Hugging Face ``Trainer``, ``wrap_trainer`` calls :func:`attach` itself.

What DeepSpeed does to a client optimizer, and what :func:`attach` changes:

* ZeRO-1/2 replace each param group's params by one flat fp32 partition of
  this rank (the fp32 master weights: the values to merge) and step the client
  optimizer once *per param group*, with ``param_groups`` cut to that group.
  A plain ``WSMOptimizer`` refuses such a cut (it would count one step per
  group and see its params change between calls). :func:`attach` declares
  the engine as stepping per group (``WSMOptimizer._bind_engine``): the
  windows are anchored before the first group's step, and the partitions
  folded after the last group's, one merge step per engine step. Nothing of
  DeepSpeed's is overridden.
* Counting: one merge step per optimizer step of the engine (gradient
  accumulation micro-steps do not count). A step that DeepSpeed skips for an
  fp16 loss-scale overflow never reaches the optimizer and does not count,
  as with ``GradScaler`` skipping ``optimizer.step()``.
* The merge then lives in one accumulator per flat partition (4 bytes per
  parameter per rank, divided by the data-parallel size like the masters).
  :func:`merged_state_dict` gathers the partitions and cuts them back into
  parameters by DeepSpeed's own layout (what ``zero_to_fp32`` does for files),
  also the reordered one of ``round_robin_gradients`` (where DeepSpeed 0.19's
  ``safe_get_full_fp32_param`` returns other params' values: compare with the
  module's copies there).
* :func:`merged_weights` swaps the merged masters in and refreshes DeepSpeed's
  low-precision copies (the module's params) from them, and on exit restores
  both: the masters bit-exactly, the copies as the cast of the masters, which
  is what they were. After :func:`attach`, the ``WSMOptimizer``'s own
  ``merged_weights()`` (e.g. ``wsm_optim.unwrap(engine).merged_weights()``) is
  this function for the engine. Its own ``merged_state_dict()`` returns this
  rank's flat partitions (keys ``FLAT_NAME``); :func:`merged_state_dict`
  gives them by parameter name.
* Stepping the ``WSMOptimizer`` under ZeRO-1/2 without :func:`attach` raises
  ``RuntimeError`` at the first step, naming ``attach(engine)``; under ZeRO-3, or
  DeepSpeed's bf16/fp16 wrapper without ZeRO, ``NotImplementedError`` naming them.
* ``engine.save_checkpoint`` / ``load_checkpoint`` store the client optimizer's
  ``state_dict()`` per rank (ZeRO's non-elastic checkpoints, the default), so
  the merge resumes exactly at the same data-parallel size (DeepSpeed itself
  refuses another size). Elastic checkpoints and DeepSpeed's universal
  checkpoint keep only the inner optimizer's state: :func:`attach` refuses
  ``elastic_checkpoint=true`` and ``checkpoint.load_universal=true``.

* ``merge_buffers=True`` (``WSMOptimizer(..., model=model, merge_buffers=True)``
  with the module given to ``deepspeed.initialize``): the module's persistent
  floating-point buffers are merged beside the flat partitions, with the same
  weights. DeepSpeed does not partition buffers: each rank merges its own
  (identical across ranks where the buffers are: updated from replicated
  values, or ``SyncBatchNorm``), in its own precision (DeepSpeed casts them
  with the module under bf16/fp16). :func:`merged_state_dict` returns them
  under their names, :func:`merged_weights` swaps them into the module, and
  their accumulators are saved with the rest of the client optimizer's state
  (each rank's own; DeepSpeed restores the live buffers from data-parallel
  rank 0's module file).

Refused with a message: ZeRO stage 3 (params partitioned per parameter and
gathered on the fly), optimizer offload, elastic and universal checkpoints.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..core.optimizer import WSMOptimizer
from .unwrap import unwrap

__all__ = ["attach", "merged_state_dict", "merged_weights", "FLAT_NAME"]

#: Name under which the ``WSMOptimizer`` tracks param group ``i``'s flat partition: ``FLAT_NAME.format(i)``.
FLAT_NAME = "deepspeed_flat_group_{}"
#: DeepSpeed's optimizer wrapper (or, at stage 0, the WSMOptimizer itself) -> the WSMOptimizer attach() wired.
_ATTACHED: weakref.WeakKeyDictionary[Any, WSMOptimizer] = weakref.WeakKeyDictionary()


def _zero(engine: Any) -> Any:
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None or not hasattr(engine, "zero_optimization_stage"):
        raise TypeError(f"engine must be a DeepSpeedEngine from deepspeed.initialize(...), got {type(engine).__name__}")
    return optimizer


def attach(engine: Any) -> WSMOptimizer:
    """Make the ``WSMOptimizer`` given to ``deepspeed.initialize`` merge once per engine step; returns it.

    Call once, after ``deepspeed.initialize`` and before the first step (and
    before ``engine.load_checkpoint`` when resuming). Stage 0 needs nothing
    (the optimizer is stepped as is); stages 1 and 2 are declared as stepping per param group, as described
    in the module docstring.

    Raises:
        NotImplementedError: ZeRO stage 3, optimizer offload, elastic or universal checkpoints.
        TypeError: no ``WSMOptimizer`` in the engine.
        RuntimeError: the ``WSMOptimizer`` already counted steps under ZeRO.
    """
    zero = _zero(engine)
    stage = int(engine.zero_optimization_stage())
    if stage == 3:
        raise NotImplementedError(
            "wsm_optim.integrations.deepspeed: ZeRO stage 3 partitions every parameter and gathers it on the fly; "
            "a WSM merge of its partitions is not supported. Use ZeRO stage 1 or 2, or FSDP2 (fully_shard)"
        )
    wsm = unwrap(zero)
    if _ATTACHED.get(zero) is wsm:
        return wsm
    if stage == 0:
        if zero is not wsm:
            raise NotImplementedError(
                f"wsm_optim.integrations.deepspeed: without ZeRO, DeepSpeed wraps the optimizer in "
                f"{type(zero).__name__} (bf16/fp16 master weights); not supported. Use ZeRO stage 1 or 2"
            )
        _ATTACHED[wsm] = wsm  # stepped as is: nothing to declare
        return wsm
    if not hasattr(zero, "single_partition_of_fp32_groups"):
        raise NotImplementedError(
            f"wsm_optim.integrations.deepspeed: ZeRO stage {stage} with optimizer {type(zero).__name__} is not "
            "supported; supported: DeepSpeedZeroOptimizer (ZeRO stage 1 and 2)"
        )
    if getattr(zero, "cpu_offload", False):
        raise NotImplementedError(
            "wsm_optim.integrations.deepspeed: zero_optimization.offload_optimizer is not supported; "
            "remove it (the merge of the masters would live on the host beside them)"
        )
    if bool(engine.zero_elastic_checkpoint()):
        raise NotImplementedError(
            "wsm_optim.integrations.deepspeed: zero_optimization.elastic_checkpoint=true saves only the inner "
            "optimizer's state, so the merge would not be saved; set it to false (the default)"
        )
    if engine.load_universal_checkpoint():
        raise NotImplementedError(
            "wsm_optim.integrations.deepspeed: checkpoint.load_universal=true loads DeepSpeed's universal checkpoint, "
            "which keeps only exp_avg, exp_avg_sq, fp32 and step, not the merge; resume from the ZeRO checkpoint at "
            "the data-parallel size it was saved with"
        )
    if zero.optimizer is not wsm:
        raise TypeError(
            f"wsm_optim.integrations.deepspeed: ZeRO steps {type(zero.optimizer).__name__}, which wraps the "
            "WSMOptimizer; pass the WSMOptimizer itself as deepspeed.initialize(optimizer=...)"
        )
    if getattr(zero, "torch_autocast_gradscaler", None) or getattr(zero, "zenflow", False):
        raise NotImplementedError(
            "wsm_optim.integrations.deepspeed: torch_autocast with a GradScaler and ZenFlow step the optimizer "
            "their own way; not supported"
        )
    if wsm.steps:
        raise RuntimeError(
            f"wsm_optim.integrations.deepspeed: the WSMOptimizer already counted {wsm.steps} steps under ZeRO, "
            "one per param group; call attach(engine) right after deepspeed.initialize, before the first step"
        )
    inner = wsm.inner
    for i, group in enumerate(inner.param_groups):
        # ZeRO left the names of the params it flattened; the group now holds one flat partition.
        group["param_names"] = [FLAT_NAME.format(i)]

    @contextlib.contextmanager
    def swap(core_swap: Any) -> Iterator[Any]:
        """The optimizer's merged_weights(): the masters swapped by the core, then the module's copies refreshed."""
        try:
            with core_swap():
                zero.update_lp_params()
                yield engine
        finally:
            zero.update_lp_params()

    _ATTACHED[zero] = wsm
    # The optimizer now tracks flat partitions, not the module's params: its model-keyed readouts cannot apply
    # (merged_state_dict(engine, model=...) gives them by name; its own are keyed by FLAT_NAME), and its
    # merged_weights() (e.g. through wsm_optim.unwrap(engine)) must also refresh the module's copies.
    # ZeRO steps the optimizer once per group, param_groups cut to that group: one merge step per engine step.
    wsm._bind_engine(merged_weights=swap, drop_model=True, steps_per_group=True)
    return wsm


def attached_to(zero: Any) -> WSMOptimizer | None:
    """The ``WSMOptimizer`` that :func:`attach` wired to ``zero`` (DeepSpeed's optimizer wrapper), or ``None``."""
    return _ATTACHED.get(zero)


def _layout(engine: Any) -> list[list[tuple[str, int, torch.Size, Tensor]]]:
    """Per param group: ``(name, offset in the flat group, shape, module param)`` in flat order."""
    zero = engine.optimizer
    names = engine.param_names  # {param: name} from model.named_parameters()
    return [
        [(names[p], offset, meta.shape, p) for p, offset, meta in zip(params, offsets, metas)]
        for params, offsets, metas in zip(
            zero.round_robin_bit16_groups, zero.round_robin_bit16_offsets, zero.round_robin_bit16_meta
        )
    ]


def _gather(zero: Any, group_no: int, partition: Tensor) -> Tensor:
    """The whole flat group from every rank's partition (a collective over the group's data-parallel ranks)."""
    group = zero.real_dp_process_group[group_no]
    world = torch.distributed.get_world_size(group=group) if torch.distributed.is_initialized() else 1
    if world == 1:
        return partition
    parts = [torch.empty_like(partition) for _ in range(world)]
    torch.distributed.all_gather(parts, partition.contiguous(), group=group)
    return torch.cat(parts)


def _attached(engine: Any) -> tuple[Any, WSMOptimizer]:
    zero = _zero(engine)
    wsm = _ATTACHED.get(zero)
    if wsm is None:
        raise RuntimeError(
            "wsm_optim.integrations.deepspeed: call attach(engine) after deepspeed.initialize (before the first step)"
        )
    return zero, wsm


def merged_state_dict(
    engine: Any,
    dtype: torch.dtype | None = None,
    *,
    merge: str | None = None,
    completed: bool = False,
    shape: Any = None,
    model: nn.Module | None = None,
) -> dict[str, Tensor]:
    """The merged model by parameter name, gathered from every data-parallel rank (a collective: all ranks call it).

    Args:
        engine: the engine :func:`attach` was called on.
        dtype: output dtype; ``None`` keeps each module param's dtype
            (``torch.float32`` returns the fp32 merge of the masters).
        merge, completed, shape: as for :meth:`WSMOptimizer.merged_state_dict`.
        model: return a complete ``model.state_dict()`` (buffers, tied and
            frozen entries as they are in ``model``); default: the trainable
            params under their ``named_parameters()`` names (without ZeRO,
            stage 0: ``engine.module``'s complete state dict).

    Returns:
        ``{name: tensor}`` on every rank, new CPU-or-device tensors of the
        module params' shapes; with ``merge_buffers=True`` also the merged
        module buffers (this rank's merge of its own buffers).
    """
    zero, wsm = _attached(engine)
    if zero is wsm:  # stage 0: the optimizer steps the module's own params
        return wsm.merged_state_dict(
            dtype, merge=merge, completed=completed, shape=shape,
            model=model if model is not None else engine.module,
        )
    flat = wsm.merged_state_dict(torch.float32, merge=merge, completed=completed, shape=shape)
    out: dict[str, Tensor] = {}
    by_param: dict[Tensor, Tensor] = {}
    for group_no, entries in enumerate(_layout(engine)):
        whole = _gather(zero, group_no, flat[FLAT_NAME.format(group_no)])
        for name, offset, shape, p in entries:
            value = whole.narrow(0, offset, shape.numel()).view(shape).to(dtype or p.dtype, copy=True)
            out[name] = by_param[p] = value
    # merge_buffers=True: this rank's merged module buffers, under their names (not partitioned: no gather)
    buffers = {name: flat[name].to(dtype or b.dtype) for b, name in wsm._runtime.registry.buffer_names.items()}
    out.update(buffers)
    if model is None:
        return out
    # a copy of the module (copy.deepcopy(engine.module)) holds other tensors: match its params by name, as
    # WSMOptimizer.merged_state_dict(model=copy) does; tied params answer to each of their names
    names: dict[Tensor, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(p, []).append(name)
    result = {}
    for key, value in model.state_dict(keep_vars=True).items():
        by_name = [out[n] for n in names.get(value, [key]) if n in out and out[n].shape == value.shape]
        if value in by_param:
            result[key] = by_param[value]
        elif by_name:
            result[key] = by_name[0]
        elif key in buffers and buffers[key].shape == value.shape:
            result[key] = buffers[key]
        else:
            result[key] = value.detach().clone()
    return result


@contextlib.contextmanager
def merged_weights(engine: Any, *, merge: str | None = None, completed: bool = False, shape: Any = None):
    """Swap the merge into DeepSpeed's fp32 masters and its low-precision copies (the module) for a ``with`` block.

    With ``merge_buffers=True`` the merged buffers are swapped into the module too.

    On exit the masters are restored bit-exactly and the copies refreshed from
    them (the cast of the masters, which they were before). Every rank must
    enter (the copies are all-gathered).
    """
    _, wsm = _attached(engine)
    with wsm.merged_weights(merge=merge, completed=completed, shape=shape):  # at stages 1/2 the swap attach bound
        yield engine
