"""How long the demo will take, said before it starts, and what slows it down.

The estimate times a few steps of the run's own model on this machine just
before training (a throwaway copy under a forked RNG, so the run itself is
unchanged) and multiplies by the work the plan in ``config.py`` implies:
WSM steps, baseline steps (WSD branches, schedule-free, cosine) and
validation batches. Plotting, start-up and the EMA updates (a few vector
operations per step) are not included.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import WSMOptimizer
from .baselines import adamw, train_step
from .config import BETAS, WEIGHT_DECAY, Config
from .model import GPT, GPTConfig

#: timed repetitions of each operation (after one untimed warm-up); the median is used
TIMED_REPEATS = 5


@dataclass(frozen=True)
class Workload:
    """What one run does: ``wsm_steps`` steps of the WSMOptimizer-wrapped run,
    ``baseline_steps`` optimizer steps of the other runs, ``val_batches``
    forward passes of one validation batch."""

    wsm_steps: int
    baseline_steps: int
    val_batches: int


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds of training and evaluation, from per-operation timings on this machine."""

    seconds: float
    workload: Workload
    wsm_step_s: float
    baseline_step_s: float
    val_batch_s: float

    def line(self) -> str:
        w = self.workload
        return (f"expected time: about {_minutes(self.seconds)} for training and evaluation (timed just now on "
                f"this machine: {w.wsm_steps:,} WSM steps x {self.wsm_step_s * 1e3:.1f} ms + {w.baseline_steps:,} "
                f"baseline steps x {self.baseline_step_s * 1e3:.1f} ms + {w.val_batches:,} validation batches x "
                f"{self.val_batch_s * 1e3:.1f} ms; longer if the machine gets busier)")


def workload(cfg: Config) -> Workload:
    """Count the work of ``training.train`` for ``cfg`` (the same plan: evaluation points,
    window ends, branch lifetimes)."""
    steps = cfg.steps
    baseline = steps * (len(cfg.sf_names) + int(cfg.with_cosine))
    baseline += sum(b["end"] - b["start"] for b in cfg.branches.values())
    per_eval_fixed = 1 + len(cfg.ema_names) + len(cfg.sf_names) + int(cfg.with_cosine)  # live + baselines
    models = 0
    eval_steps = set(cfg.eval_steps)
    for done in cfg.eval_steps:
        models += per_eval_fixed
        models += sum(done >= spec["start"] for spec in cfg.merges.values())
        models += sum(b["start"] <= done <= b["end"] for b in cfg.branches.values())
    for done, ends in cfg.window_end_steps.items():
        if done not in eval_steps:
            models += 1 + len(ends)
    return Workload(wsm_steps=steps, baseline_steps=baseline, val_batches=models * cfg.eval_batches)


def estimate(cfg: Config, model_config: GPTConfig) -> TimeEstimate:
    """Time one WSM step, one plain AdamW step and one validation batch of this run's model
    (median of ``TIMED_REPEATS``) and scale them by :func:`workload`."""
    device = torch.device(cfg.device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 1)
        shape = (cfg.batch_size, cfg.block_size)
        x = torch.randint(0, model_config.vocab_size, shape, device=device)
        batch = (x, torch.roll(x, -1, dims=1))
        plain = GPT(model_config).to(device)
        wrapped = GPT(model_config).to(device)
        plain_opt = adamw(plain, cfg.lr, BETAS, WEIGHT_DECAY)
        # windows anchored from step 0, so the timed steps fold every merge as the stable phase does
        merges = {name: dict(spec, start=0) for name, spec in cfg.merges.items()}
        wsm = WSMOptimizer(adamw(wrapped, cfg.lr, BETAS, WEIGHT_DECAY), merges=merges)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        wsm_s = _median_seconds(lambda: train_step(wrapped, wsm, batch, cfg.lr), sync)
        baseline_s = _median_seconds(lambda: train_step(plain, plain_opt, batch, cfg.lr), sync)
        with torch.no_grad():
            val_s = _median_seconds(lambda: plain.loss(*batch).item(), sync)
    work = workload(cfg)
    seconds = work.wsm_steps * wsm_s + work.baseline_steps * baseline_s + work.val_batches * val_s
    return TimeEstimate(seconds=seconds, workload=work, wsm_step_s=wsm_s, baseline_step_s=baseline_s,
                        val_batch_s=val_s)


def _median_seconds(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    fn()  # warm-up: first-call allocations and lazy initialisation are not the steady state
    times = []
    for _ in range(TIMED_REPEATS):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def progress_period(expected_seconds: float) -> float:
    """Seconds between two progress lines in a log: about 20 lines per run, one every 10 to 60 s
    (a multiple of 5 s, so the lines read as a steady rhythm)."""
    return min(60.0, max(10.0, 5.0 * round(expected_seconds / 20 / 5)))


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def busy_hint(load: float, cores: int, threads: int) -> str | None:
    """A tip when the 1-minute load average ``load`` exceeds ``cores`` while torch runs
    ``threads > 1`` threads (they wait on each other when cores are shared); else ``None``."""
    if load <= cores or threads <= 1:
        return None
    return (f"note: this machine is busy (1-minute load average {load:.1f} on {cores} cores) and torch uses "
            f"{threads} threads, which wait on each other when the cores are shared: --threads 1 is often "
            f"faster here")
