"""Writes and loads Megatron ``torch_dist`` checkpoints with real megatron-core, on 2 gloo ranks (CPU).

argv: ``PREFIX OUT_DIR`` (:func:`_launch.launch`). ``save``: iterations
:data:`ITERATIONS` into ``OUT_DIR/run`` as Megatron-LM lays them out
(``iter_XXXXXXX`` folders, the tracker), every tensor cut the way TP/PP ranks
cut it. ``load``: ``dist_checkpointing.load`` of ``OUT_DIR/merged`` (the run
folder the test merged into) with the same sharded state dict, each rank's
loaded tensors saved to ``OUT_DIR/loaded-rank<r>.pt``.

:func:`global_tensors` is the whole model of an iteration, computed the same
way here and in the test (the float64 reference is built from it, not from
the files).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

WORLD = 2
#: The iterations ``save`` writes (``WSM_MEGATRON_ITERATIONS="100,200"`` writes others: the fixture's).
ITERATIONS = tuple(int(i) for i in os.environ.get("WSM_MEGATRON_ITERATIONS", "100,200,300,400").split(","))
#: name -> (global shape, dtype, how the 2 ranks hold it): "tp0"/"tp1" TP chunks on dim 0/1,
#: "pp" one layer each of a stacked layer axis, "replicated" the same tensor on both (rank 0 saves it).
TENSORS = {
    "embedding.word_embeddings.weight": ((16, 8), torch.float32, "tp0"),
    "decoder.layers.self_attention.linear_proj.weight": ((8, 12), torch.float32, "tp1"),
    "decoder.layers.mlp.linear_fc1.weight": ((2, 12, 8), torch.bfloat16, "pp"),
    "decoder.final_layernorm.weight": ((8,), torch.float32, "replicated"),
    "position_ids": ((6,), torch.int64, "replicated"),
}
EXTRA = "decoder.layers.mlp.linear_fc1._extra_state"


def global_tensors(iteration: int) -> dict[str, torch.Tensor]:
    """The whole model at ``iteration``: a seeded random tensor per name (integers for integer dtypes)."""
    out = {}
    for i, (name, (shape, dtype, _)) in enumerate(TENSORS.items()):
        g = torch.Generator().manual_seed(1009 * iteration + i)
        if dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
        else:
            out[name] = torch.randint(0, 1000, shape, generator=g, dtype=dtype)
    return out


def extra_state(rank: int, iteration: int) -> dict:
    return {"rank": rank, "iteration": iteration, "fp8_meta": [rank, iteration]}


def _patch_cuda_calls() -> None:
    """megatron-core's save assumes CUDA in two calls: 0.15 syncs after a non-blocking copy to the CPU,
    and 0.15/0.16 all-reduce the save's failure flag on ``torch.cuda.current_device()``. On a CPU-only
    build with gloo, a no-op sync and the CPU device keep everything else as it is."""
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.current_device = lambda: "cpu"


def sharded_state_dict(rank: int, iteration: int, tensors: dict[str, torch.Tensor] | None, *,
                       with_training_state: bool = True) -> dict:
    """Megatron's sharded state dict of ``rank`` (``tensors=None``: empty tensors, a template to load into)."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    model = {}
    for name, (shape, dtype, how) in TENSORS.items():
        whole = tensors[name] if tensors is not None else torch.zeros(shape, dtype=dtype)
        if how == "tp0":
            model[name] = ShardedTensor.from_rank_offsets(name, whole.chunk(WORLD, 0)[rank].clone(), (0, rank, WORLD))
        elif how == "tp1":
            model[name] = ShardedTensor.from_rank_offsets(name, whole.chunk(WORLD, 1)[rank].clone(), (1, rank, WORLD))
        elif how == "pp":
            model[name] = ShardedTensor.from_rank_offsets(name, whole[rank].clone(), (0, rank, WORLD),
                                                          prepend_axis_num=1)
        else:
            model[name] = ShardedTensor.from_rank_offsets(name, whole.clone(), replica_id=rank)
    model[EXTRA] = ShardedObject(EXTRA, extra_state(rank, iteration) if tensors is not None else None, (WORLD,),
                                 (rank,))
    sd = {"model": model}
    if with_training_state:
        sd["optimizer"] = {"state": {"exp_avg": ShardedTensor.from_rank_offsets(
            "optimizer.state.exp_avg.embedding.word_embeddings.weight", torch.full((8, 8), float(rank)),
            (0, rank, WORLD))}}
        sd["rng_state"] = ShardedObject("rng_state", {"torch_rng_state": torch.get_rng_state()}, (WORLD,), (rank,))
        sd["iteration"] = iteration
        sd["checkpoint_version"] = 3.0
        sd["args"] = argparse.Namespace(tensor_model_parallel_size=WORLD, iteration=iteration, lr=3e-4)
    return sd


def save(out_dir: str) -> dict:
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    run = Path(out_dir, "run")
    for it in ITERATIONS:
        folder = run / f"iter_{it:07d}"
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(sharded_state_dict(rank, it, global_tensors(it)), str(folder))
        dist.barrier()
        if rank == 0:
            (run / "latest_checkpointed_iteration.txt").write_text(str(it))
    import megatron.core

    return {"saved": list(ITERATIONS), "megatron_core": megatron.core.__version__}


def load(out_dir: str) -> dict:
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    run = Path(out_dir, "merged")
    iteration = int((run / "latest_checkpointed_iteration.txt").read_text())
    template = sharded_state_dict(rank, iteration, None, with_training_state=False)
    loaded = dist_checkpointing.load(template, str(run / f"iter_{iteration:07d}"))
    model = loaded["model"]
    torch.save({"model": {k: v for k, v in model.items() if k != EXTRA}, "extra": model[EXTRA],
                "iteration": loaded["iteration"], "args": vars(loaded["args"])},
               Path(out_dir, f"loaded-rank{rank}.pt"))
    return {"iteration": loaded["iteration"], "tracker": iteration}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _launch import run_cases

    _patch_cuda_calls()
    dist.init_process_group("gloo")
    os.environ.setdefault("MEGATRON_LOGGING_LEVEL", "40")
    prefix = sys.argv[-2]
    run_cases({prefix: {"save": save, "load": load}[prefix]})
