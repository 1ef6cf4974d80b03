"""Evaluations inside and outside ``merged_weights`` between FSDP2 training steps, on 2 gloo ranks.

argv: ``PREFIX OUT_DIR`` (:func:`_launch.launch`). FSDP2 keeps the root module's
params all-gathered after a forward without backward; the swap writes into the
shards. Each case trains the same steps and evaluates after two of them, mid-window:
live then merged the first time, merged only the second; the result is the final
params, the merged evaluations, and what a plain unsharded copy of the model
computes from ``merged_state_dict(full=True)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

STEPS = 7
EVAL_AFTER = (2, 5)


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)


def run(evaluate: bool, pass_model: bool) -> dict:
    from torch.distributed.fsdp import fully_shard

    from wsm_optim import WSMOptimizer

    model = build()
    fully_shard(model[0])
    fully_shard(model)
    extra = {"model": model} if pass_model else {}
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=4, **extra)
    probe = torch.randn(3, 8, generator=torch.Generator().manual_seed(99))
    merged_eval, reference = [], []
    for step in range(STEPS):
        x, y = batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if evaluate and step in EVAL_AFTER:
            with torch.no_grad():
                if step == EVAL_AFTER[0]:
                    model(probe)  # a live evaluation first: it leaves the root's params all-gathered
                with opt.merged_weights():
                    merged_eval.append(model(probe).clone())
            plain = build()
            plain.load_state_dict({k: v.float() for k, v in opt.merged_state_dict(full=True).items()})
            with torch.no_grad():
                reference.append(plain(probe))
    final = {k: v.full_tensor() for k, v in model.named_parameters()}
    return {"final": final, "merged_eval": merged_eval, "reference": reference}


def cases(out_dir: str) -> dict:
    rank = dist.get_rank()
    result = {"plain": run(False, True), "with_model": run(True, True), "without_model": run(True, False)}
    torch.save(result, Path(out_dir, f"results-rank{rank}.pt"))
    return {"ok": True}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _launch import run_cases

    dist.init_process_group("gloo")
    run_cases({"evaluations": cases})
