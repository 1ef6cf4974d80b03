"""Pipeline parallelism: assemble the merged model from its stages.

Under ``torch.distributed.pipelining`` each rank holds one stage of the model
and steps one ``WSMOptimizer`` over that stage's parameters, so each stage
merges on its own, with no communication (the merge is elementwise). To
read out the whole merged model, every stage computes its merged state dict
and the stages are gathered into one dict on global rank 0:

.. code-block:: python

    from wsm_optim.integrations.pipeline import merged_pipeline_state_dict

    sd = merged_pipeline_state_dict(opt, stage_module, pp_group=mesh["pp"].get_group())
    if dist.get_rank() == 0:
        full_model.load_state_dict(sd, strict=True)

The keys are the stage modules' names, so the stage modules must keep the
unsplit model's fully qualified names: build each stage from a copy of the
whole model with the other stages' layers deleted (torchtitan's manual
split), not by re-nesting the layers under new names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["merged_pipeline_state_dict"]


def merged_pipeline_state_dict(
    opt,
    stage_module: nn.Module,
    pp_group: torch.distributed.ProcessGroup | None = None,
    dtype: torch.dtype | None = None,
    *,
    merge: str | None = None,
    completed: bool = False,
    shape: Any = None,
) -> dict[str, Tensor]:
    """The whole merged model, ``{fqn: CPU tensor}``, on global rank 0; ``{}`` on every other rank.

    A collective: every rank of every stage must call it, in the same order as
    its other collectives.

    Args:
        opt: this rank's ``WSMOptimizer``, over ``stage_module``'s parameters.
        stage_module: this rank's stage (possibly ``fully_shard``-ed or tensor
            parallel within the stage); its ``state_dict()`` keys are the
            unsplit model's names of its parameters and buffers. Its
            ``PipelineStage`` is accepted too (its ``submod`` is read).
        pp_group: the process group across stages that contains this rank
            (``device_mesh["pp"].get_group()``); ``None``: the default group
            (pure pipeline parallelism, one rank per stage).
        dtype, merge, completed, shape: as in ``WSMOptimizer.merged_state_dict``.

    Each stage first gathers its own merged state dict in full
    (``merged_state_dict(full=True, model=stage_module, cpu_offload=True)``,
    a collective within the stage's FSDP/TP mesh; every rank holds its stage's
    full copy until the call returns). The pipeline group that contains global
    rank 0 then sends the stages' dicts to rank 0 (``gather_object``, which
    pickles them); the other pipeline groups (other data-parallel replicas of
    the same stages) send nothing. A name in several stages (a buffer each
    stage keeps a copy of, such as a RoPE table) must have equal values there.
    With NCCL, set each rank's CUDA device first (``torch.cuda.set_device``),
    as for any ``gather_object``.

    Raises:
        ValueError: on global rank 0, if two stages hold different values under one name.
        RuntimeError: if ``torch.distributed`` is not initialised.
        TypeError: ``stage_module`` is neither a module nor a ``PipelineStage``.
    """
    if not isinstance(stage_module, nn.Module):
        submod = getattr(stage_module, "submod", None)  # torch.distributed.pipelining's PipelineStage
        if not isinstance(submod, nn.Module):
            raise TypeError(
                "merged_pipeline_state_dict: stage_module must be this rank's stage module (an nn.Module) or its "
                f"PipelineStage, got {type(stage_module).__name__}"
            )
        stage_module = submod
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("merged_pipeline_state_dict needs an initialised torch.distributed process group")
    local = opt.merged_state_dict(
        dtype, model=stage_module, merge=merge, completed=completed, shape=shape, full=True, cpu_offload=True
    )
    group = pp_group if pp_group is not None else dist.group.WORLD
    members = dist.get_process_group_ranks(group)
    if 0 not in members:  # another data-parallel replica of the pipeline: rank 0's group assembles
        return {}
    rank = dist.get_rank()
    stages: list | None = [None] * len(members) if rank == 0 else None
    dist.gather_object(local, stages, dst=0, group=group)
    if rank != 0:
        return {}
    assembled: dict[str, Tensor] = {}
    owner: dict[str, int] = {}
    for member, stage_dict in zip(members, stages):
        for name, value in stage_dict.items():
            if name in assembled:
                if not torch.equal(assembled[name], value):
                    raise ValueError(
                        f"merged_pipeline_state_dict: {name!r} is held by the stages on ranks {owner[name]} and "
                        f"{member} with different values; each name must belong to one stage, or be an "
                        "identical copy (a shared buffer)"
                    )
                continue
            assembled[name] = value
            owner[name] = member
    return assembled
