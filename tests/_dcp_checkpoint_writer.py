"""Worker for tests/test_offline_formats.py: one rank of a gloo FSDP2 job around DCP checkpoints.

Run with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment:

* ``python _dcp_checkpoint_writer.py train OUT_DIR STEPS SEED``: trains :class:`Net`
  (``torch.manual_seed(0)`` init, data from ``SEED``) with AdamW, every module
  ``fully_shard``-ed over all ranks, and after each step in ``STEPS``
  (comma-separated) saves ``{"model", "optim", "train_state"}`` with ``dcp.save``
  to ``OUT_DIR/step-<step>``, as torchtitan lays its checkpoints out.
* ``python _dcp_checkpoint_writer.py load CKPT OUT_FILE``: ``dcp.load`` of a model
  state dict (names without a prefix) into the sharded model; rank 0 saves the
  gathered full tensors to ``OUT_FILE``.
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


def sharded_net() -> Net:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for m in (model.emb, model.fc1, model.norm, model.fc2):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def load(ckpt: str, out_file: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    model = sharded_net()
    sd = get_model_state_dict(model)
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(model, sd)
    full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    if dist.get_rank() == 0:
        torch.save(full, out_file)
    dist.destroy_process_group()


def train(out_dir: str, steps: str, seed: int) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    dist.init_process_group("gloo")
    model = sharded_net()
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
    if sys.argv[1] == "train":
        train(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        load(sys.argv[2], sys.argv[3])
