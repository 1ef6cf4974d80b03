"""Worker for tests/test_distributed.py: one rank of a gloo job, launched as a script.

Usage: ``python _wsm_dist_worker.py SCENARIO OUT_DIR`` with ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment.
Scenarios:

* ``train``  (2 ranks): FSDP2 training with WSM; checks zero communication per
  step and in sharded readouts; saves a DCP checkpoint mid-window
  (``CKPT_STEP``) and keeps going to ``TOTAL_STEPS``; writes the full merged
  outputs. Also runs the DDP and tensor-parallel (Shard(1) / Replicate) checks.
* ``resume`` (any world size): new process group, fresh model and optimizer,
  DCP load, continue to ``TOTAL_STEPS``; writes the full merged outputs.

Rank 0 writes ``OUT_DIR/<scenario>-ws<world>.pt``; any failed check raises
(non-zero exit, traceback on stderr). The model, data and config are shared
with the single-process reference computed by the test itself.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

GLOBAL_BATCH = 8
TOTAL_STEPS = 15
# Mid-window for both merges: "lin" (start=1, window=6, interval=2) is 3 steps
# into its second window, between two checkpoints (t=1, r=1); "sq" (window=4)
# is at t=2 of its third window.
CKPT_STEP = 10
MERGES = {
    "lin": dict(schedule="linear", window=6, interval=2, start=1, keep_last=True),
    "sq": dict(schedule="1-sqrt", window=4),
}
# A moment merge beside them (this worker's FSDP2 runs only): its parts are sharded, saved and
# resharded as any merge's accumulators; read with its own shape and with cosine
MOMENTS = {"post": dict(schedule="1-sqrt", window=6, start=1, moments=5)}


class Net(nn.Module):
    """Two linear layers; 16 and 5 output rows, so 2-way dim-0 sharding is even for one, uneven (3/2) for the other."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 5)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def make_model() -> Net:
    torch.manual_seed(1234)
    return Net()


def make_inner(params) -> torch.optim.Optimizer:
    # SGD with momentum: stateful (a DTensor momentum buffer per shard) and
    # linear in the gradient, so FSDP2 vs one process differ by fp32 rounding only.
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: the same on every rank and in the reference."""
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 5, generator=g)


def train_steps(model, opt, first: int, last: int, rank: int = 0, world: int = 1) -> None:
    """Steps ``first..last-1``; this rank takes its contiguous slice of each global batch."""
    per_rank = GLOBAL_BATCH // world
    for step in range(first, last):
        x, y = batch(step)
        x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
        # Mean over the local slice; FSDP2 averages gradients over ranks, so the
        # gradient is the global-batch mean, as in the one-process reference.
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def full_outputs(opt, model) -> dict[str, dict[str, torch.Tensor]]:
    """Gathered merged state dicts (fp32, current and completed windows) and the live params."""
    out = {}
    for name in (*MERGES, *MOMENTS):
        out[f"merged.{name}"] = opt.merged_state_dict(torch.float32, merge=name, full=True, model=model)
    out["completed.lin"] = opt.merged_state_dict(torch.float32, merge="lin", completed=True, full=True)
    out["merged.post:cosine"] = opt.merged_state_dict(torch.float32, merge="post", shape="cosine", full=True)
    out["live"] = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.named_parameters()
    }
    out["steps"] = opt.steps
    out["status"] = {n: opt.merge_status(n) for n in MERGES}
    return out


def _init() -> tuple[int, int]:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    return dist.get_rank(), dist.get_world_size()


def _fsdp_model(world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    fully_shard(model.fc1, mesh=mesh)
    fully_shard(model.fc2, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def wsm_buffers(opt, merge: str, kind: str = "wsm_acc") -> dict:
    """``{param: buffer}`` of one merge, through the public state dict (its tensors are the live buffers)."""
    state = opt.state_dict()["state"]
    params = [p for g in opt.param_groups for p in g["params"]]
    return {p: state[i][f"{kind}.{merge}"] for i, p in enumerate(params)}


def _wsm(model):
    from wsm_optim import WSMOptimizer

    return WSMOptimizer(make_inner(model.named_parameters()), merges={**MERGES, **MOMENTS}, backend="foreach")


def _count_comms(fn) -> int:
    from torch.distributed.tensor.debug import CommDebugMode

    mode = CommDebugMode()
    with mode:
        fn()
    return mode.get_total_counts()


def _dcp_save(model, opt, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=str(path),
    )


def scenario_train(out_dir: Path) -> None:
    import warnings

    from torch.distributed.tensor import DTensor

    from wsm_optim import LiveParamsChangedWarning
    from wsm_optim.core.distributed import local_view

    # FSDP2 and DDP never edit the live params outside step(): a readout warning would be a false positive
    warnings.simplefilter("error", LiveParamsChangedWarning)
    rank, world = _init()
    model = _fsdp_model(world)
    opt = _wsm(model)
    accs = wsm_buffers(opt, "sq")
    for p in model.parameters():
        acc = accs[p]
        assert isinstance(p, DTensor) and isinstance(acc, DTensor), (type(p), type(acc))
        assert acc.placements == p.placements and acc.device_mesh == p.device_mesh
        assert acc.shape == p.shape and acc.to_local().shape == p.to_local().shape
        assert acc.dtype == torch.float32

    # Step 0 is outside the timed/counted region: FSDP2 lazy init happens in the first forward.
    train_steps(model, opt, 0, 1, rank, world)
    step_comms = []
    for step in range(1, CKPT_STEP):
        x, y = batch(step)
        per = GLOBAL_BATCH // world
        nn.functional.mse_loss(model(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per]).backward()
        # opt.step() covers the inner SGD step and WSM's anchor / accumulate
        # passes (both merges hit checkpoints in this range).
        step_comms.append(_count_comms(opt.step))
        opt.zero_grad()
    assert step_comms == [0] * len(step_comms), f"collectives during step(): {step_comms}"

    # Backends saw local views: the accumulator's local tensor is what changed.
    p0 = next(model.parameters())
    assert local_view(wsm_buffers(opt, "sq")[p0]).abs().sum() > 0

    sharded = {}
    n_read = _count_comms(lambda: sharded.update(opt.merged_state_dict(merge="sq")))
    assert n_read == 0, f"sharded merged_state_dict communicated {n_read} times"
    for k, v in sharded.items():
        p = dict(model.named_parameters())[k]
        assert isinstance(v, DTensor) and v.placements == p.placements and v.shape == p.shape, k
    # Positive control: the same counter does see the gather's collectives.
    n_full = _count_comms(lambda: opt.merged_state_dict(merge="sq", full=True))
    assert n_full >= len(sharded), f"full gather counted only {n_full} collectives"

    # merged_weights on sharded params: no communication, merged values inside, bit-exact restore.
    live_before = {k: v.to_local().clone() for k, v in model.named_parameters()}
    inside = {}

    def swap():
        with opt.merged_weights(merge="sq"):
            inside.update({k: v.to_local().clone() for k, v in model.named_parameters()})

    assert _count_comms(swap) == 0
    for k, v in model.named_parameters():
        assert torch.equal(inside[k], sharded[k].to_local()), k
        assert torch.equal(v.to_local(), live_before[k]), k

    # rank0_only: every rank joins the gathers, only rank 0 keeps the result.
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as mode:
        r0 = opt.merged_state_dict(merge="sq", full=True, rank0_only=True, cpu_offload=True)
    assert (len(r0) > 0) == (rank == 0), (rank, len(r0))
    # Shard(0) params go to rank 0 with gather (no all-gather): the other rank never holds a full one.
    counts = {str(op): n for op, n in mode.get_comm_counts().items()}
    assert counts == {"c10d.gather_": len(sharded)}, counts
    gathered = {k: v.full_tensor() for k, v in sharded.items()}  # collective: all ranks
    for k, v in r0.items():
        assert not isinstance(v, DTensor) and v.shape == sharded[k].shape
        assert torch.equal(v, gathered[k]), k

    mid = full_outputs(opt, model)
    _dcp_save(model, opt, out_dir / "ckpt")
    assert opt.steps == CKPT_STEP  # get_optimizer_state_dict did not step
    train_steps(model, opt, CKPT_STEP, TOTAL_STEPS, rank, world)
    final = full_outputs(opt, model)
    _state_dict_round_trips(model, opt)

    ddp = _ddp_check(rank, world)
    tp = _tp_check(rank, world)
    if rank == 0:
        torch.save({"mid": mid, "final": final, "ddp": ddp, "tp": tp}, out_dir / f"train-ws{world}.pt")


def _state_dict_round_trips(model, opt) -> None:
    """DCP full (gathered) optimizer state dict and a per-rank torch.save both restore the buffers."""
    import io

    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    full_opts = StateDictOptions(full_state_dict=True)
    full_sd = get_optimizer_state_dict(model, opt, options=full_opts)
    acc_key = "wsm_acc.sq"
    assert not hasattr(full_sd["state"]["fc2.weight"][acc_key], "device_mesh")  # gathered, plain
    assert full_sd["state"]["fc2.weight"][acc_key].shape == (5, 16)
    # A plain full tensor loads into a DTensor accumulator as this rank's slice, locally.
    from wsm_optim.core.distributed import copy_into

    accs = wsm_buffers(opt, "sq")
    for fqn, p in model.named_parameters():
        target = torch.zeros_like(accs[p])
        copy_into(target, full_sd["state"][fqn][acc_key])
        assert torch.equal(target.to_local(), accs[p].to_local()), fqn
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    for restore in ("dcp-full", "torch.save"):
        fresh = _wsm(model)
        if restore == "dcp-full":
            set_optimizer_state_dict(model, fresh, full_sd, options=full_opts)
        else:
            buf.seek(0)
            fresh.load_state_dict(torch.load(buf, weights_only=False))
        assert fresh.steps == opt.steps, restore
        for name in opt.state_dict()["wsm"]["merges"]:  # every merge's buffers, each part of a moment merge's
            owner = name.split("~")[0]
            assert fresh.merge_status(owner)["checkpoint"] == opt.merge_status(owner)["checkpoint"]
            kinds = ["wsm_acc"] + (["wsm_last"] if {**MERGES, **MOMENTS}[owner].get("keep_last") else [])
            for kind in kinds:
                mine, theirs = wsm_buffers(fresh, name, kind), wsm_buffers(opt, name, kind)
                for p in model.parameters():
                    assert torch.equal(mine[p].to_local(), theirs[p].to_local()), (restore, kind)


def _ddp_check(rank: int, world: int) -> dict:
    """DDP: accumulators identical on every rank; rank0_only full readout."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    opt = _wsm(ddp.module)
    train_steps(ddp, opt, 0, 7, rank, world)
    for name in opt.state_dict()["wsm"]["merges"]:
        accs = wsm_buffers(opt, name)
        for p in model.parameters():
            gathered = [torch.empty_like(accs[p]) for _ in range(world)]
            dist.all_gather(gathered, accs[p])
            for other in gathered[1:]:
                assert torch.equal(gathered[0], other), f"DDP accumulators differ across ranks ({name})"
    mine = opt.merged_state_dict(torch.float32, merge="sq")
    r0 = opt.merged_state_dict(torch.float32, merge="sq", full=True, rank0_only=True)
    assert (len(r0) > 0) == (rank == 0)
    for k, v in r0.items():
        assert torch.equal(v, mine[k]), k
    return mine


def _tp_check(rank: int, world: int) -> dict:
    """Tensor-parallel-style params, gradients set by hand; rank 0 gathers the merge.

    ``w``: ``Shard(1)`` with 5 columns (3 / 2 split); ``v``: ``Shard(0)`` with one
    row (rank 1's shard is empty); ``b``: ``Replicate``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from wsm_optim import WSMOptimizer

    mesh = init_device_mesh("cpu", (world,))
    params = {
        name: nn.Parameter(distribute_tensor(value, mesh, [placement], src_data_rank=None))
        for name, (value, placement) in {
            k: (v, {"w": Shard(1), "v": Shard(0), "b": Replicate()}[k]) for k, v in tp_initial().items()
        }.items()
    }
    opt = WSMOptimizer(torch.optim.SGD(params.items(), lr=0.1, momentum=0.5), schedule="cosine", window=5)
    comms = []
    for step in range(6):
        for k, grad in tp_grads(step).items():
            params[k].grad = distribute_tensor(grad, mesh, params[k].placements, src_data_rank=None)
        comms.append(_count_comms(opt.step))
    assert comms == [0] * 6, f"TP step communicated: {comms}"
    accs = wsm_buffers(opt, "default")
    for k, p in params.items():
        assert accs[p].placements == p.placements
    out = opt.merged_state_dict(torch.float32, full=True, rank0_only=True)
    assert (len(out) > 0) == (rank == 0)
    return out


def tp_initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"w": torch.randn(3, 5, generator=g), "v": torch.randn(1, 4, generator=g), "b": torch.randn(6, generator=g)}


def tp_grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    return {k: torch.randn(v.shape, generator=g) for k, v in tp_initial().items()}


def scenario_resume(out_dir: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    rank, world = _init()
    model = _fsdp_model(world)
    opt = _wsm(model)
    # The load template: on a fresh optimizer DCP's _init_optim_state calls
    # opt.step() (zero grads, lr=0); that must not count or anchor a window.
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    assert opt.steps == 0 and not any(opt.merge_status(n)["anchored"] for n in MERGES)
    assert len(opt.inner.state) > 0  # the inner optimizer did get its state
    dcp.load(state, checkpoint_id=str(out_dir / "ckpt"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    assert opt.steps == CKPT_STEP, opt.steps
    resumed_mid = full_outputs(opt, model)
    train_steps(model, opt, CKPT_STEP, TOTAL_STEPS, rank, world)
    final = full_outputs(opt, model)
    if rank == 0:
        torch.save({"mid": resumed_mid, "final": final}, out_dir / f"resume-ws{world}.pt")


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    try:
        {"train": scenario_train, "resume": scenario_resume}[scenario](out_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
