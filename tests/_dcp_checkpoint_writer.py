"""Worker for tests/test_offline_formats.py: one rank of a gloo FSDP2 run that saves DCP checkpoints.

Usage: ``python _dcp_checkpoint_writer.py OUT_DIR STEPS SEED`` with ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment. Trains
:class:`Net` (``torch.manual_seed(0)`` init, data from ``SEED``) with AdamW,
every module ``fully_shard``-ed over all ranks, and after each step in ``STEPS``
(comma-separated) saves ``{"model", "optim", "train_state"}`` with
``dcp.save`` to ``OUT_DIR/step-<step>``, as torchtitan lays its checkpoints out.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn


class Net(nn.Module):
    """33 embedding rows (uneven over 2 ranks), a float and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(33, 12)
        self.fc1 = nn.Linear(12, 20)
        self.norm = nn.LayerNorm(20)
        self.fc2 = nn.Linear(20, 5)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 5))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.numel()
        return self.fc2(torch.tanh(self.norm(self.fc1(self.emb(x)).clone()))) * self.scale


def main(out_dir: str, steps: str, seed: int) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    torch.manual_seed(0)
    model = Net()
    mesh = init_device_mesh("cpu", (world,))
    for m in (model.emb, model.fc1, model.norm, model.fc2):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    save_at = {int(s) for s in steps.split(",")}
    for step in range(1, max(save_at) + 1):
        x = torch.randint(0, 33, (8, 3), generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in save_at:
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd, "train_state": {"step": step}}
            dcp.save(state, checkpoint_id=os.path.join(out_dir, f"step-{step}"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
