"""Peak host memory of gathering the merged model from FSDP2 shards (CPU, gloo).

    python bench/dist_gather_memory.py [--layers 6] [--width 4096] [--world 2]

Trains an FSDP2-sharded stack of ``layers`` bias-free ``width x width`` fp32
linear layers for two steps under ``WSMOptimizer`` (SGD, so the only extra
state is the fp32 accumulator), then, in a fresh process group per method,
measures each rank's peak RSS increase (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``) while producing a full merged state dict:

* ``streamed``: ``opt.merged_state_dict(full=True, rank0_only=True, cpu_offload=True)``
* ``streamed-all``: ``opt.merged_state_dict(full=True)`` (every rank keeps a copy)
* ``naive``: ``{k: v.full_tensor() for k, v in opt.merged_state_dict().items()}``
  (every merged shard first, then every full tensor, on every rank)
* ``dcp-swap``: ``get_model_state_dict(model, StateDictOptions(full_state_dict=True,
  cpu_offload=True))`` inside ``opt.merged_weights()``

Glibc is told to mmap every allocation of 64 KiB or more
(``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave RSS at once and the peak
reflects live tensors. Results are in MiB; "kept" is the size of the dict the rank ends up holding.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

METHODS = ("streamed", "streamed-all", "naive", "dcp-swap")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def worker(method: str, layers: int, width: int) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from wsm_optim import WSMOptimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=1e-3), schedule="linear", window=4)
        for _ in range(2):
            model(torch.randn(4, width)).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        dist.barrier()
        base = _status_kib("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        if method == "streamed":
            out = opt.merged_state_dict(full=True, rank0_only=True, cpu_offload=True)
        elif method == "streamed-all":
            out = opt.merged_state_dict(full=True)
        elif method == "naive":
            out = {k: v.full_tensor() for k, v in opt.merged_state_dict().items()}
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            with opt.merged_weights():
                out = get_model_state_dict(
                    model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
                )
        seconds = time.perf_counter() - t0
        peak = _status_kib("VmHWM")
        kept = sum(v.numel() * v.element_size() for v in out.values()) / 2**20
        n_params = sum(p.numel() for p in model.parameters())
        shard = sum(p.to_local().numel() * 4 for p in model.parameters()) / 2**20
        line = (
            f"{method:12s} rank {rank}: peak +{(peak - base) / 1024:7.1f} MiB  kept {kept:7.1f} MiB  "
            f"(model {n_params * 4 / 2**20:.0f} MiB fp32, shard {shard:.0f} MiB, "
            f"one param {width * width * 4 / 2**20:.0f} MiB)  {seconds:.2f}s"
        )
        for r in range(world):
            if r == rank:
                print(line, flush=True)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(method: str, args) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(args.world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(args.world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            # Every allocation >= 64 KiB is its own mmap, returned to the OS when
            # freed: RSS then tracks live tensors instead of glibc's heap reuse.
            MALLOC_MMAP_THRESHOLD_="65536",
        )
        cmd = [sys.executable, __file__, "--worker", method, "--layers", str(args.layers), "--width", str(args.width)]
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        return max(p.wait(timeout=args.timeout) for p in procs)
    except subprocess.TimeoutExpired:
        print(f"{method}: timed out after {args.timeout}s", file=sys.stderr)
        return 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.layers, args.width)
        return 0
    return max(launch(m, args) for m in args.methods)


if __name__ == "__main__":
    sys.exit(main())
