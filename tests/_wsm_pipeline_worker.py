"""Worker for tests/test_distributed_pipeline.py: one rank of a gloo pipeline job, launched by ``_dist_launch``.

Usage: ``python _wsm_pipeline_worker.py SCENARIO OUT_DIR`` with the torchrun
environment variables set. Scenarios:

* ``pp`` (2 ranks): 2 pipeline stages, one rank each (``ScheduleGPipe``, 2
  microbatches).
* ``pp_fsdp`` (4 ranks): 2 stages x 2 data-parallel ranks, each stage
  ``fully_shard``-ed over its dp ranks (mesh ``(pp, dp)``).

Each scenario trains to ``CKPT_STEP``, saves every stage to one DCP
checkpoint, trains on to ``STEPS``, then builds fresh stages, schedules and
optimizers, resumes them from the checkpoint and trains to ``STEPS`` again.
After every step rank 0 records the gathered parameters and buffers of the whole model,
the assembled merged model (``wsm_optim.integrations.pipeline.merged_pipeline_state_dict``)
and each stage's own readout keys. ``OUT_DIR/<scenario>.pt`` =
``{"straight": record, "resumed": record}``.
"""

from __future__ import annotations

import copy
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from _wsm_mesh_worker import CKPT_STEP, MERGES, STEPS  # the same merges and checkpoint step as the mesh tests

GLOBAL_BATCH = 8
MICROBATCHES = 2
#: Which layers each stage keeps; stage 1 also keeps the head. Both keep the buffer ``scale``.
STAGE_LAYERS = (("0", "1"), ("2", "3"))
#: Each layer's float buffer that its forward moves (merged with ``merge_buffers=True``).
RUNNING = [f"layers.{i}.running" for i in range(4)]


class Stack(nn.Module):
    """The unsplit model: 4 layers 6 -> 10 -> 10 -> 5 -> 5 (tanh), head 5 -> 3, a float buffer ``scale`` (3,).

    A stage is a copy with the other stages' layers deleted (and the head on
    the last stage only), so its parameter and buffer names are the unsplit
    model's. 10 and 5 rows shard 2-way as 5/5 and 3/2. Each layer has a
    buffer ``running`` (its output width) that every training forward moves,
    as BatchNorm statistics would, but by the same amount on every
    data-parallel rank (FSDP2 replicates buffers; rank 0's are the ones
    assembled).
    """

    def __init__(self) -> None:
        super().__init__()
        dims = [6, 10, 10, 5, 5]
        self.layers = nn.ModuleDict({str(i): nn.Linear(dims[i], dims[i + 1]) for i in range(4)})
        for i, layer in self.layers.items():
            layer.register_buffer("running", torch.full((dims[int(i) + 1],), float(i)))
        self.head: nn.Module | None = nn.Linear(5, 3)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in self.layers.items():
            x = torch.tanh(layer(x))
            if self.training:
                layer.running.mul_(0.75).add_(torch.linspace(0.0, 1.0 + int(i), len(layer.running)))
        return self.head(x) * self.scale if self.head is not None else x


def make_model() -> Stack:
    torch.manual_seed(4321)
    return Stack()


def make_stage_module(stage: int) -> Stack:
    module = copy.deepcopy(make_model())
    for key in list(module.layers):
        if key not in STAGE_LAYERS[stage]:
            del module.layers[key]
    if stage != len(STAGE_LAYERS) - 1:
        module.head = None
    return module


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(20_000 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


class Pipeline:
    """This rank's stage module, ``PipelineStage``, ``ScheduleGPipe`` and ``WSMOptimizer``."""

    def __init__(self, mesh) -> None:
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        from wsm_optim import WSMOptimizer

        self.mesh = mesh
        self.stage = mesh.get_local_rank("pp")
        self.dp_rank, self.dp_size = mesh.get_local_rank("dp"), mesh["dp"].size()
        self.module = make_stage_module(self.stage)
        if self.dp_size > 1:
            from torch.distributed.fsdp import fully_shard

            for layer in self.module.layers.values():
                fully_shard(layer, mesh=mesh["dp"])
            fully_shard(self.module, mesh=mesh["dp"])
        self.pp_group = mesh["pp"].get_group()
        # Static shapes: in dynamic mode a fresh schedule's first step runs the forward once more to infer them
        # (on real first-stage inputs), which would move ``running`` once more after a resume than in one run.
        rows = GLOBAL_BATCH // self.dp_size // MICROBATCHES
        widths = ((6, 10), (10, 3))[self.stage]
        pipe_stage = PipelineStage(
            self.module, self.stage, len(STAGE_LAYERS), torch.device("cpu"), group=self.pp_group,
            input_args=torch.zeros(rows, widths[0]), output_args=torch.zeros(rows, widths[1]),
            input_grads=torch.zeros(rows, widths[0]), output_grads=torch.zeros(rows, widths[1]),
        )
        self.pipe_stage = pipe_stage
        self.schedule = ScheduleGPipe(pipe_stage, n_microbatches=MICROBATCHES, loss_fn=F.mse_loss)
        inner = torch.optim.SGD(self.module.named_parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
        self.opt = WSMOptimizer(inner, merges=MERGES, backend="foreach", model=self.module, merge_buffers=True)
        self.record = {"snapshots": {}, "assembled": {}, "completed": {}, "stage_keys": {}, "status": {}}

    @property
    def state_key(self) -> str:
        # One optimizer state dict per stage under its own key: DCP saves each
        # top-level key's param_groups as one object, so stages sharing a key
        # would overwrite each other's (see docs/distributed.md).
        return f"optim.stage{self.stage}"

    def train(self, last: int) -> None:
        per = GLOBAL_BATCH // self.dp_size
        for step in range(self.opt.steps, last):
            x, y = batch(step)
            x, y = x[self.dp_rank * per : (self.dp_rank + 1) * per], y[self.dp_rank * per : (self.dp_rank + 1) * per]
            if self.stage == 0:
                self.schedule.step(x)
            else:
                self.schedule.step(target=y)
            self.opt.step()
            self.opt.zero_grad()
            self.observe()

    def observe(self) -> None:
        from wsm_optim.integrations.pipeline import merged_pipeline_state_dict

        s = self.opt.steps
        live = {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in [*self.module.named_parameters(), *self.module.named_buffers()]
        }
        snapshot = gather_to_rank0(live, self.pp_group)
        assembled = {  # the stage given as its module, and as its PipelineStage (its submod is read)
            m: merged_pipeline_state_dict(self.opt, stage, self.pp_group, torch.float32, merge=m)
            for m, stage in zip(MERGES, (self.module, self.pipe_stage))
        }
        completed = None
        if self.opt.merge_status("lin")["windows_completed"] > 0:
            completed = merged_pipeline_state_dict(
                self.opt, self.module, self.pp_group, torch.float32, merge="lin", completed=True
            )
        # Per-stage readout: only this stage's names, sharded like its params, no communication.
        own = self.opt.merged_state_dict(torch.float32, merge="sq", model=self.module)
        self.check_merged_weights(own)
        stage_keys = gather_to_rank0({f"stage{self.stage}": sorted(own)}, self.pp_group)
        if dist.get_rank() == 0:
            self.record["snapshots"][s] = snapshot
            self.record["assembled"][s] = assembled
            self.record["stage_keys"][s] = stage_keys
            self.record["status"][s] = {m: self.opt.merge_status(m) for m in MERGES}
            if completed is not None:
                self.record["completed"][s] = completed
        else:
            assert assembled == {m: {} for m in MERGES}, "only global rank 0 keeps the assembled model"

    def check_merged_weights(self, own: dict) -> None:
        """Inside ``merged_weights()`` this stage's params and buffers hold its merged readout; on exit the live bits come back."""
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
        tensors = lambda: [*self.module.named_parameters(), *self.module.named_buffers()]  # noqa: E731
        live = {k: local(v).detach().clone() for k, v in tensors()}
        with self.opt.merged_weights(merge="sq"):
            for k, v in tensors():
                assert torch.equal(local(v), local(own[k])), f"stage {self.stage} {k}: merged_weights value"
        for k, v in tensors():
            assert torch.equal(local(v), live[k]), f"stage {self.stage} {k}: live value not restored"

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state = {"model": get_model_state_dict(self.module),
                 self.state_key: get_optimizer_state_dict(self.module, self.opt)}
        dcp.save(state, checkpoint_id=str(path))

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = {"model": get_model_state_dict(self.module),
                 self.state_key: get_optimizer_state_dict(self.module, self.opt)}
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(self.module, state["model"])
        set_optimizer_state_dict(self.module, self.opt, state[self.state_key])
        assert self.opt.steps == CKPT_STEP, self.opt.steps


def gather_to_rank0(obj: dict, pp_group) -> dict:
    """Union of the stages' dicts on global rank 0 (only the pipeline group containing rank 0 sends)."""
    members = dist.get_process_group_ranks(pp_group)
    if 0 not in members:
        return {}
    out = [None] * len(members) if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=pp_group)
    return {k: v for d in out for k, v in d.items()} if out is not None else {}


def run(out_dir: Path, scenario: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (len(STAGE_LAYERS), world // len(STAGE_LAYERS)), mesh_dim_names=("pp", "dp"))
    straight = Pipeline(mesh)
    straight.observe()
    straight.train(CKPT_STEP)
    straight.save(out_dir / f"ckpt-{scenario}")
    straight.train(STEPS)

    resumed = Pipeline(mesh)  # fresh stages, schedules and optimizers
    with torch.no_grad():  # nothing may survive from the fresh init
        for p in resumed.module.parameters():
            p.fill_(123.0)
    resumed.load(out_dir / f"ckpt-{scenario}")
    resumed.observe()
    resumed.train(STEPS)
    return {"straight": straight.record, "resumed": resumed.record, "conflict": conflicting_stages_error(mesh)}


def conflicting_stages_error(mesh) -> str | None:
    """Both stages claim ``layers.0`` with other values: rank 0 must refuse to assemble (its message; else None)."""
    from wsm_optim import WSMOptimizer
    from wsm_optim.integrations.pipeline import merged_pipeline_state_dict

    torch.manual_seed(dist.get_rank())
    module = nn.Module()
    module.layers = nn.ModuleDict({"0": nn.Linear(2, 2)})
    opt = WSMOptimizer(torch.optim.SGD(module.named_parameters(), lr=0.1), window=2)
    try:
        got = merged_pipeline_state_dict(opt, module, mesh["pp"].get_group())
    except ValueError as err:
        return str(err)
    assert dist.get_rank() != 0, f"conflicting stages assembled: {sorted(got)}"
    return None


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        expected_world = {"pp": 2, "pp_fsdp": 4}[scenario]
        assert dist.get_world_size() == expected_world, (scenario, dist.get_world_size())
        records = run(out_dir, scenario)
        if dist.get_rank() == 0:
            torch.save(records, out_dir / f"{scenario}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
