"""One rank of the FSDP2 + ``offload="cpu"`` job (run by ``tests/test_offload.py``; gloo, CPU).

Two WSM optimizers on two identical FSDP2 models, one with host-resident
buffers and one inline, trained on the same batches: their buffers must be
``DTensor`` s sharded like the params and equal bit for bit; a DCP checkpoint
of the offloaded one, saved mid-window, must resume into an inline optimizer
(and the reverse) and continue bit-exactly.
"""

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from wsm_optim import WSMOptimizer

CONFIG = dict(merges={"lin": dict(window=4, keep_last=True), "cos": dict(schedule="cosine", window=6, interval=2)})


def model(world):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 5))  # 7 rows: uneven shards on 2 ranks
    mesh = init_device_mesh("cpu", (world,))
    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def wsm(net, offload):
    inner = torch.optim.SGD(net.named_parameters(), lr=0.05, momentum=0.9)
    return WSMOptimizer(inner, offload=offload, backend="foreach", **CONFIG)


def train(net, opt, first, last, rank, world):
    for step in range(first, last):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 8, generator=g), torch.randn(8, 5, generator=g)
        n = 8 // world
        nn.functional.mse_loss(net(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n]).backward()
        opt.step()
        opt.zero_grad()


def readouts(opt):
    out = {}
    for name in CONFIG["merges"]:
        out[name] = opt.merged_state_dict(merge=name, full=True)
    out["lin.completed"] = opt.merged_state_dict(merge="lin", completed=True, full=True)
    return out


def same(a, b, what):
    for k in a:
        if isinstance(a[k], dict):
            same(a[k], b[k], f"{what}.{k}")
        else:
            assert torch.equal(a[k], b[k]), (what, k, (a[k] - b[k]).abs().max())


def main(out_dir: Path):
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    nets = {o: model(world) for o in ("cpu", None)}
    opts = {o: wsm(nets[o], o) for o in nets}
    for o in opts:
        train(nets[o], opts[o], 0, 9, rank, world)  # 9: mid-window for both merges
    sd = opts["cpu"].state_dict()
    buffers = [v for e in sd["state"].values() for k, v in e.items() if k.startswith("wsm_")]
    assert buffers and all(isinstance(b, DTensor) and b.to_local().device.type == "cpu" for b in buffers)
    same(readouts(opts["cpu"]), readouts(opts[None]), "offload vs inline")
    for o in opts:
        dcp.save({"model": get_model_state_dict(nets[o]), "optim": get_optimizer_state_dict(nets[o], opts[o])},
                 checkpoint_id=str(out_dir / f"ckpt-{o}"))
    for o in opts:
        train(nets[o], opts[o], 9, 15, rank, world)
    final = readouts(opts[None])
    for saved, into in (("cpu", None), (None, "cpu")):  # resume across placements
        net = model(world)
        opt = wsm(net, into)
        state = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}
        dcp.load(state, checkpoint_id=str(out_dir / f"ckpt-{saved}"))
        set_model_state_dict(net, state["model"])
        set_optimizer_state_dict(net, opt, state["optim"])
        assert opt.steps == 9, opt.steps
        train(net, opt, 9, 15, rank, world)
        same(readouts(opt), final, f"resumed {saved} -> {into}")
    if rank == 0:
        (out_dir / "ok").write_text("ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[2]))  # argv: SCENARIO OUT_DIR (tests/_dist_launch.py); one scenario
