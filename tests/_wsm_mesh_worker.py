"""Worker for tests/test_distributed_meshes.py: one rank of a gloo job, launched by ``_dist_launch``.

Usage: ``python _wsm_mesh_worker.py SCENARIO OUT_DIR`` with the torchrun
environment variables set. One launch runs a group of cases; rank 0 writes
``OUT_DIR/<scenario>.pt`` = ``{case: record}`` (see :class:`Recorder`), and the
test compares every recorded readout with a float64 explicit merge of the
recorded (gathered) parameter snapshots. Scenarios, in launch order:

* ``ws2`` (2 ranks): ``fsdp2``: 1-D FSDP2, exact-arithmetic model; DCP
  checkpoint at ``CKPT_STEP`` to ``OUT_DIR/ckpt-ws2``, then on to ``STEPS``;
  ``buffers``: the same with :class:`BufNet` and ``merge_buffers=True``
  (checkpoint ``ckpt-buffers-ws2``), plus a ``merged_weights()`` swap check.
* ``ws4`` (4 ranks): ``hsdp``: FSDP2 on a 2x2 (replicate, shard) mesh,
  exact-arithmetic model, DCP checkpoint to ``OUT_DIR/ckpt-ws4``;
  ``fsdp_tp``: 2 (dp) x 2 (tp) mesh, ``ColwiseParallel`` / ``RowwiseParallel``
  then ``fully_shard`` on dp (``_StridedShard`` layouts), sliced data;
  ``resume_2to4``: 1-D FSDP2 over 4 ranks (uneven shards: 10 rows as 3/3/3/1,
  5 rows as 2/2/1/0) resumed from ``ckpt-ws2``; ``buffers_2to4``: BufNet
  resumed from ``ckpt-buffers-ws2``.
* ``ws1`` (1 process): ``resume_4to1``: the plain, unsharded model resumed
  from the HSDP checkpoint ``ckpt-ws4``; ``buffers_2to1``: plain BufNet
  resumed from ``ckpt-buffers-ws2``.

Exact-arithmetic model (:class:`GridNet`): every rank computes the gradient of
the whole global batch (so the forward pass is the same computation on every
rank and in one process) and the gradient is rounded to multiples of 2**-16 in
backward; parameters start on a 2**-20 grid and plain SGD uses ``lr = 2**-4``.
Every gradient sum, average over ranks and SGD update is then exact in fp32,
so the parameter trajectory is bit-identical at every world size and mesh,
and a run resumed at another world size can be compared bit for bit with the
uninterrupted one. Only the WSM merge rounds.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

GLOBAL_BATCH = 8
STEPS = 10
# Mid-window for both merges: "lin" (start=1, window=4, interval=2) is one step
# after its second anchor (t=0, r=1); "sq" (window=4) is at t=2 of its second window.
CKPT_STEP = 6
MERGES = {
    "lin": dict(schedule="linear", window=4, interval=2, start=1, keep_last=True),
    "sq": dict(schedule="1-sqrt", window=4),
}
GRAD_GRID = 2.0**-16
PARAM_GRID = 2.0**-20
GRAD_BOUND = 4.0
EXACT_LR = 2.0**-4


class Net(nn.Module):
    """fc1: 6 -> 10, fc2: 10 -> 5, a float buffer ``scale`` (5,).

    10 and 5 rows shard 2-way as 5/5 and 3/2 and 4-way as 3/3/3/1 and 2/2/1/0
    (``torch.chunk``), so the meshes below see uneven and empty shards.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 5)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


class _GridGrad(torch.autograd.Function):
    """Identity forward; backward clamps the gradient to ``+-GRAD_BOUND`` and rounds it to ``GRAD_GRID``."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.round(grad.clamp(-GRAD_BOUND, GRAD_BOUND) / GRAD_GRID) * GRAD_GRID


class GridNet(Net):
    """:class:`Net` whose parameter gradients are exact in fp32 sums (see the module doc).

    Calls ``F.linear`` on the parameters directly, so it must be sharded at the
    root only (``fully_shard(model)``): per-layer FSDP2 hooks would not run.
    """

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.round(p / PARAM_GRID) * PARAM_GRID)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = _GridGrad.apply
        h = torch.tanh(F.linear(x, g(self.fc1.weight), g(self.fc1.bias)))
        return F.linear(h, g(self.fc2.weight), g(self.fc2.bias)) * self.scale


class BufNet(GridNet):
    """:class:`GridNet` with buffers that move every step, for ``merge_buffers=True`` (no new params).

    ``bn``: a ``BatchNorm1d(10, affine=False)`` on fc1's output (``running_mean`` /
    ``running_var`` move in every forward; ``num_batches_tracked`` is int64 and
    stays live); ``expert_bias`` (5,): persistent float32, moved in an optimizer
    step pre-hook from the non-persistent ``load`` counted in the forward, as
    torchtitan's ``_update_expert_bias`` moves MoE routing biases. Every rank
    computes the whole global batch, so the buffers are the same on every rank
    and at every world size (FSDP2 does not shard buffers).
    """

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(10, affine=False)
        self.register_buffer("expert_bias", torch.zeros(5))
        self.register_buffer("load", torch.zeros(5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = _GridGrad.apply
        h = torch.tanh(self.bn(F.linear(x, g(self.fc1.weight), g(self.fc1.bias))))
        out = F.linear(h, g(self.fc2.weight), g(self.fc2.bias)) * self.scale + self.expert_bias
        self.load += out.detach().abs().sum(0)
        return out


def update_expert_bias(model: BufNet):
    """A step pre-hook (registered on the WSMOptimizer, as torchtitan registers its own on the container)."""

    def hook(optimizer, args, kwargs) -> None:
        with torch.no_grad():
            model.expert_bias.add_(2.0**-7 * torch.sign(model.load.mean() - model.load))
            model.load.zero_()

    return hook


def make_buffer_run(world: int):
    """``BufNet`` (FSDP2 over ``world`` ranks, or plain at 1) with ``merge_buffers=True`` and the bias pre-hook."""
    from wsm_optim import WSMOptimizer

    torch.manual_seed(1234)
    model = BufNet()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    inner = torch.optim.SGD(model.named_parameters(), lr=EXACT_LR)
    opt = WSMOptimizer(inner, merges=MERGES, backend="foreach", model=model, merge_buffers=True)
    opt.register_step_pre_hook(update_expert_bias(model))
    return model, opt


MERGED_BUFFERS = ["scale", "bn.running_mean", "bn.running_var", "expert_bias"]


def make_model(exact: bool) -> Net:
    torch.manual_seed(1234)
    return GridNet() if exact else Net()


def make_optimizer(model: nn.Module, exact: bool):
    from wsm_optim import WSMOptimizer

    if exact:
        inner = torch.optim.SGD(model.named_parameters(), lr=EXACT_LR)
    else:  # stateful: the momentum buffers are DTensors sharded like the params
        inner = torch.optim.SGD(model.named_parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    return WSMOptimizer(inner, merges=MERGES, backend="foreach")


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: (8, 6) inputs, (8, 5) targets; the same on every rank."""
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 5, generator=g)


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gathered fp32 copies of the live params (a collective for DTensor params)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.named_parameters()
    }


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gathered copies of every ``model.state_dict()`` entry (params and persistent buffers)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.state_dict().items()
    }


class Recorder:
    """Runs the training steps of one case and records, after every step, what the test checks.

    Record (rank 0): ``snapshots`` ``{step: {name: full fp32 param}}``,
    ``readouts`` ``{step: {merge: merged_state_dict(fp32, full=True, model=model)}}``,
    ``completed`` ``{step: {name: tensor}}`` (``"lin"``, ``completed=True``, once a
    window has completed), ``status`` ``{step: {merge: merge_status}}``.
    """

    def __init__(self, model: nn.Module, opt, *, dp_rank: int, dp_size: int, buffers: bool = False) -> None:
        self.model, self.opt, self.dp_rank, self.dp_size = model, opt, dp_rank, dp_size
        self.buffers = buffers  # snapshots of the whole state dict (merged buffers are checkpoints too)
        self.record = {"snapshots": {}, "readouts": {}, "completed": {}, "status": {}}
        self.step_comms: list[int] = []

    def observe(self) -> None:
        s, opt = self.opt.steps, self.opt
        self.record["snapshots"][s] = full_state(self.model) if self.buffers else full_params(self.model)
        self.record["readouts"][s] = {
            m: opt.merged_state_dict(torch.float32, merge=m, full=True, model=self.model) for m in MERGES
        }
        if opt.merge_status("lin")["windows_completed"] > 0:
            self.record["completed"][s] = opt.merged_state_dict(
                torch.float32, merge="lin", completed=True, full=True, model=self.model if self.buffers else None
            )
        self.record["status"][s] = {m: opt.merge_status(m) for m in MERGES}

    def train(self, last: int) -> None:
        """Steps ``opt.steps .. last - 1``; the dp rank takes its slice of each global batch (dp_size 1: all of it)."""
        per = GLOBAL_BATCH // self.dp_size
        for step in range(self.opt.steps, last):
            x, y = batch(step)
            x, y = x[self.dp_rank * per : (self.dp_rank + 1) * per], y[self.dp_rank * per : (self.dp_rank + 1) * per]
            F.mse_loss(self.model(x), y).backward()
            self.step_comms.append(count_comms(self.opt.step))
            self.opt.zero_grad()
            self.observe()
        assert self.step_comms == [0] * len(self.step_comms), f"collectives during step(): {self.step_comms}"


def count_comms(fn) -> int:
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as mode:
        fn()
    return mode.get_total_counts()


def wsm_buffers(opt, merge: str, kind: str = "wsm_acc") -> dict:
    """``{param: buffer}`` of one merge, through the public state dict (its tensors are the live buffers)."""
    state = opt.state_dict()["state"]
    params = [p for g in opt.param_groups for p in g["params"]]
    return {p: state[i][f"{kind}.{merge}"] for i, p in enumerate(params)}


def check_layouts(model: nn.Module, opt) -> None:
    """Every accumulator is a DTensor laid out exactly like its param (mesh, placements, local shape)."""
    for merge in MERGES:
        accs = wsm_buffers(opt, merge)
        for name, p in model.named_parameters():
            acc = accs[p]
            assert acc.device_mesh == p.device_mesh and acc.placements == p.placements, (name, acc.placements)
            assert acc.shape == p.shape and acc.to_local().shape == p.to_local().shape, name
            assert acc.dtype == torch.float32, name


def dcp_save(model, opt, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(path))


def dcp_load(model, opt, path: Path) -> None:
    """Resume ``model`` / ``opt`` (fresh, any layout) from a DCP checkpoint written by :func:`dcp_save`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    assert opt.steps == 0, "building the load template must not count a step"
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    assert opt.steps == CKPT_STEP, opt.steps


# ----------------------------------------------------------------------- cases
def case_fsdp2_exact(world: int, out_dir: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model(exact=True)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = make_optimizer(model, exact=True)
    check_layouts(model, opt)
    rec = Recorder(model, opt, dp_rank=0, dp_size=1)  # exact model: every rank takes the whole batch
    rec.observe()
    rec.train(CKPT_STEP)
    dcp_save(model, opt, out_dir / f"ckpt-ws{world}")
    rec.train(STEPS)
    return rec.record


def case_hsdp_exact(world: int, out_dir: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    assert world == 4
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = make_model(exact=True)
    fully_shard(model, mesh=mesh)  # a 2-D mesh: HSDP (replicate on dim 0, shard on dim 1)
    opt = make_optimizer(model, exact=True)
    for p in model.parameters():
        assert p.device_mesh.ndim == 2 and str(p.placements) == "(Replicate(), Shard(dim=0))", p.placements
    check_layouts(model, opt)
    rec = Recorder(model, opt, dp_rank=0, dp_size=1)
    rec.observe()
    rec.train(CKPT_STEP)
    dcp_save(model, opt, out_dir / f"ckpt-ws{world}")
    rec.train(STEPS)
    _check_rank0_only(model, opt)
    _check_state_dict_round_trips(model, opt)
    return rec.record


def case_fsdp_tp(world: int, out_dir: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    assert world == 4
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = make_model(exact=False)
    parallelize_module(model, mesh["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    fully_shard(model.fc1, mesh=mesh["dp"])
    fully_shard(model.fc2, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = make_optimizer(model, exact=False)
    placements = {k: str(v.placements) for k, v in model.named_parameters()}
    assert placements["fc1.weight"].startswith("(_StridedShard(dim=0"), placements  # FSDP on top of TP rows
    assert placements["fc2.weight"] == "(Shard(dim=0), Shard(dim=1))", placements
    check_layouts(model, opt)
    # Ranks of one tp group see the same data; the dp index picks the slice.
    rec = Recorder(model, opt, dp_rank=mesh.get_local_rank("dp"), dp_size=2)
    rec.observe()
    rec.train(STEPS)
    _check_rank0_only(model, opt)
    _check_state_dict_round_trips(model, opt, full_state_dict=False)
    return rec.record


def case_resume(world: int, out_dir: Path, source_world: int) -> dict:
    """Fresh model and optimizer at ``world`` ranks (1: plain module), resumed from ``ckpt-ws<source_world>``."""
    model = make_model(exact=True)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    with torch.no_grad():  # nothing may survive from the fresh init
        for p in model.parameters():
            p.fill_(123.0)
    opt = make_optimizer(model, exact=True)
    dcp_load(model, opt, out_dir / f"ckpt-ws{source_world}")
    if world > 1:
        check_layouts(model, opt)
    rec = Recorder(model, opt, dp_rank=0, dp_size=1)
    rec.observe()
    rec.train(STEPS)
    return rec.record


def case_buffers(world: int, out_dir: Path) -> dict:
    """``merge_buffers=True`` under 1-D FSDP2: readouts, ``merged_weights``, DCP checkpoint at ``CKPT_STEP``."""
    model, opt = make_buffer_run(world)
    rec = Recorder(model, opt, dp_rank=0, dp_size=1, buffers=True)
    rec.observe()
    rec.train(CKPT_STEP)
    dcp_save(model, opt, out_dir / f"ckpt-buffers-ws{world}")
    rec.train(STEPS)
    rec.record["swapped"] = _check_merged_weights_swaps_buffers(model, opt)
    return rec.record


def case_resume_buffers(world: int, out_dir: Path, source_world: int) -> dict:
    """A fresh ``BufNet`` run at ``world`` ranks resumed from ``ckpt-buffers-ws<source_world>``, trained on."""
    model, opt = make_buffer_run(world)
    with torch.no_grad():  # nothing may survive from the fresh init
        model.expert_bias.fill_(7.0)
        model.bn.running_mean.fill_(7.0)
    dcp_load(model, opt, out_dir / f"ckpt-buffers-ws{source_world}")
    rec = Recorder(model, opt, dp_rank=0, dp_size=1, buffers=True)
    rec.observe()
    rec.train(STEPS)
    return rec.record


def _check_merged_weights_swaps_buffers(model, opt) -> bool:
    """Inside ``merged_weights()`` the model's merged buffers hold the merge; on exit the live values, bit for bit."""
    live = {k: v.clone() for k, v in model.state_dict().items() if not hasattr(v, "full_tensor")}
    merged = opt.merged_state_dict(merge="sq", model=model)
    with opt.merged_weights(merge="sq"):
        inside = {k: v.clone() for k, v in model.state_dict().items() if k in live}
    after = {k: v for k, v in model.state_dict().items() if k in live}
    assert all(torch.equal(inside[k], merged[k].to(inside[k].dtype)) for k in MERGED_BUFFERS), "merged_weights"
    assert torch.equal(inside["bn.num_batches_tracked"], live["bn.num_batches_tracked"])
    assert all(torch.equal(after[k], live[k]) for k in live), "live buffers not restored"
    assert any(not torch.equal(inside[k], live[k]) for k in MERGED_BUFFERS)
    return True


def _check_state_dict_round_trips(model, opt, full_state_dict: bool = True) -> None:
    """A DCP ``full_state_dict=True`` dict (plain, gathered tensors) and a per-rank ``torch.save`` restore all buffers.

    From the full dict each rank cuts its own slice, without communication.
    ``full_state_dict=False`` checks the per-rank ``torch.save`` only: under
    FSDP2 + TP, torch 2.13's own ``set_optimizer_state_dict(full_state_dict=True)``
    fails before reaching the optimizer (``_StridedShard`` scatter assertion in
    ``distribute_tensor``; a plain ``torch.optim.SGD`` fails the same way).
    """
    import io

    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    full_opts = StateDictOptions(full_state_dict=True)
    if full_state_dict:
        full_sd = get_optimizer_state_dict(model, opt, options=full_opts)
        assert not hasattr(full_sd["state"]["fc1.weight"]["wsm_acc.sq"], "device_mesh")  # gathered, plain
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    for restore in ("dcp-full", "torch.save") if full_state_dict else ("torch.save",):
        fresh = make_optimizer(model, exact=isinstance(model, GridNet))
        if restore == "dcp-full":
            set_optimizer_state_dict(model, fresh, full_sd, options=full_opts)
        else:
            buf.seek(0)
            fresh.load_state_dict(torch.load(buf, weights_only=False))
        assert fresh.steps == opt.steps, restore
        for merge in MERGES:
            assert fresh.merge_status(merge)["checkpoint"] == opt.merge_status(merge)["checkpoint"], restore
            for kind in ("wsm_acc", "wsm_last") if MERGES[merge].get("keep_last") else ("wsm_acc",):
                mine = wsm_buffers(fresh, merge, kind)
                theirs = wsm_buffers(opt, merge, kind)
                for name, p in model.named_parameters():
                    assert mine[p].placements == p.placements, (restore, name)
                    assert torch.equal(mine[p].to_local(), theirs[p].to_local()), (restore, merge, kind, name)


def _check_rank0_only(model, opt) -> None:
    """2-D layouts fall back to all-gathers: rank 0 keeps exactly the full readout, the others ``{}``."""
    full = opt.merged_state_dict(torch.float32, merge="sq", full=True)
    r0 = opt.merged_state_dict(torch.float32, merge="sq", full=True, rank0_only=True, cpu_offload=True)
    assert (len(r0) > 0) == (dist.get_rank() == 0), (dist.get_rank(), len(r0))
    for k, v in r0.items():
        assert torch.equal(v, full[k]), k


SCENARIOS = {
    "ws2": lambda world, out: {"fsdp2": case_fsdp2_exact(world, out), "buffers": case_buffers(world, out)},
    "ws4": lambda world, out: {
        "hsdp": case_hsdp_exact(world, out),
        "fsdp_tp": case_fsdp_tp(world, out),
        "resume_2to4": case_resume(world, out, source_world=2),
        "buffers_2to4": case_resume_buffers(world, out, source_world=2),
    },
    "ws1": lambda world, out: {
        "resume_4to1": case_resume(world, out, source_world=4),
        "buffers_2to1": case_resume_buffers(world, out, source_world=2),
    },
}


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        records = SCENARIOS[scenario](dist.get_world_size(), out_dir)
        if dist.get_rank() == 0:
            torch.save(records, out_dir / f"{scenario}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
