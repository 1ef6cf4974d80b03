#!/usr/bin/env python
"""What ``merge_buffers=True`` adds to a training step, measured against the same run without it.

A ResNet-style stack of ``--blocks`` (Linear, BatchNorm1d) pairs of width
``--width``: each BatchNorm has two merged float buffers and one live integer
one, so a block has ``width^2 + 2 width`` params and ``2 width`` merged buffer
elements. For each ``interval``, forward/backward/``step()`` is timed with
``WSMOptimizer(..., model=model)`` and with ``merge_buffers=True`` in the same
process, alternating rounds (the machine is shared and noisy), and the ratio
of the medians is printed, with the bytes the merged buffers add::

    python bench/bench_merge_buffers.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from wsm_optim import WSMOptimizer


def build(width: int, blocks: int) -> nn.Module:
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers)


def timed_steps(width: int, blocks: int, interval: int, merge_buffers: bool, steps: int) -> float:
    """Median seconds per training step over ``steps`` steps (after two warm-up steps)."""
    torch.manual_seed(0)
    model = build(width, blocks)
    opt = WSMOptimizer(torch.optim.AdamW(model.named_parameters(), lr=1e-3), window=10 * interval,
                       interval=interval, model=model, merge_buffers=merge_buffers)
    x = torch.randn(64, width)
    times = []
    for s in range(steps + 2):
        start = time.perf_counter()
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if s >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = args.blocks * (args.width * args.width + 3 * args.width)  # Linear weight+bias, BN weight+bias
    buffers = args.blocks * 2 * args.width
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.blocks} blocks of width "
          f"{args.width}: {params:,} params, {buffers:,} merged buffer elements "
          f"({4 * buffers / 2**10:.0f} KiB per merge + {4 * buffers / 2**10:.0f} KiB anchor copy)")
    print("| interval | step without (ms) | step with merge_buffers (ms) | ratio |")
    print("|---|---|---|---|")
    for interval in (1, 10):
        without, with_buffers = [], []
        for _ in range(args.rounds):  # alternate, so drift in the machine's load hits both alike
            without.append(timed_steps(args.width, args.blocks, interval, False, args.steps))
            with_buffers.append(timed_steps(args.width, args.blocks, interval, True, args.steps))
        a, b = statistics.median(without), statistics.median(with_buffers)
        print(f"| {interval} | {1e3 * a:.2f} | {1e3 * b:.2f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
