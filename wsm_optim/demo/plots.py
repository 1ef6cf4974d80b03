"""The demo's figures: ``loss.png`` (along the run), ``ablations.png``, ``weights.png``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .. import schedules
from .config import Config


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cmap(name: str, n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return [cmap(0.45 + 0.5 * i / max(1, n - 1)) for i in range(n)]


def plot_loss(cfg: Config, curves: dict, branch_curves: dict, path: Path) -> None:
    """Validation loss vs step: the live run, each linear merge at its window ends, the EMAs,
    schedule-free, and every WSD branch (its end marked); whole run and second half."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    linear = [f"linear-{w}" for w in sorted(set(cfg.windows) | {cfg.decay})]
    blues, greens = _cmap("Blues", len(linear)), _cmap("Greens", len(cfg.ema_names))
    purples = _cmap("Purples", len(cfg.sf_names))
    for ax, lo in zip(axes, (cfg.steps // 8, cfg.steps // 2)):
        ys: list[float] = []

        def draw(steps, vals, **style):
            steps, vals = np.asarray(steps), np.asarray(vals, dtype=float)
            keep = (steps >= lo) & np.isfinite(vals)
            ax.plot(steps[keep], vals[keep], **style)
            ys.extend(vals[keep].tolist())

        c = curves["constant"]
        draw(c["step"], c["val_loss"], color="black", lw=1.6, label="constant LR (live)")
        for name, color in zip(linear, blues):
            ends = set(cfg.window_ends(name))
            pts = [(s, v) for s, v in zip(curves[name]["step"], curves[name]["val_loss"]) if s in ends]
            draw([s for s, _ in pts], [v for _, v in pts], color=color, lw=0.9, marker="o", ms=3.5,
                 label=f"WSM {name} at window ends")
        for (name, b), color in zip(cfg.ema_names.items(), greens):
            draw(curves[name]["step"], curves[name]["val_loss"], color=color, lw=0.9,
                 label=f"EMA {b:.4g}")
        for (name, x), color in zip(cfg.sf_names.items(), purples):
            draw(curves[name]["step"], curves[name]["val_loss"], color=color, lw=1.0, ls="--",
                 label=f"schedule-free {x:g}x LR")
        if "cosine" in curves:
            draw(curves["cosine"]["step"], curves["cosine"]["val_loss"], color="tab:gray", lw=1.0, ls=":",
                 label="cosine")
        for i, name in enumerate(cfg.branches):
            curve = curves[name] if name == "wsd" else branch_curves[name]
            draw(curve["step"], curve["val_loss"], color="tab:red", lw=1.6,
                 label=f"WSD branches (D={cfg.decay})" if i == 0 else None)
            if curve["step"][-1] >= lo:
                ax.plot(curve["step"][-1], curve["val_loss"][-1], "X", color="tab:red", ms=8)
        if ys:
            lo_y, hi_y = min(ys), max(ys)
            pad = 0.05 * (hi_y - lo_y + 1e-9)
            ax.set_ylim(lo_y - pad, hi_y + pad)
        ax.set(xlabel="step", ylabel="validation loss (nats/char)")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"from step {cfg.steps // 8} (X: end of a WSD branch)")
    axes[1].set_title("second half")
    axes[1].legend(fontsize=6.5, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_ablations(cfg: Config, abl: dict[str, Any], table: list[dict[str, Any]], path: Path) -> None:
    """Val loss at ``T`` against window length (EMA placed at twice its mean age), against
    updates per window, and per shape; live, WSD and schedule-free as reference lines."""
    plt = _pyplot()
    final = {r["run"]: r["val_loss"] for r in table}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))

    def refs(ax):
        ax.axhline(final["constant"], color="black", lw=1, label="constant LR (live)")
        ax.axhline(final["wsd"], color="tab:red", lw=1, label=f"WSD (D={cfg.decay})")
        sf = [final[n] for n in cfg.sf_names if math.isfinite(final[n])]
        if sf:
            ax.axhline(min(sf), color="tab:purple", lw=1, ls="--", label="best schedule-free")

    ax = axes[0]
    ax.plot([r["window"] for r in abl["windows"]], [r["val_loss"] for r in abl["windows"]], "o-",
            color="tab:blue", label="WSM linear, window W")
    if abl["ema"]:
        ax.plot([2 * r["mean_age"] for r in abl["ema"]], [r["val_loss"] for r in abl["ema"]], "s-",
                color="tab:green", label="EMA, W = 2 x mean age")
    refs(ax)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["window"] for r in abl["windows"]], [str(r["window"]) for r in abl["windows"]])
    ax.minorticks_off()
    ax.set(xlabel="window W (steps)", ylabel="val loss at the last step",
           title=f"window length ({abl['regime']} regime)")
    ax.legend(fontsize=7)
    ax = axes[1]
    ks = [r["updates"] for r in abl["counts"]]
    ax.plot(ks, [r["val_loss"] for r in abl["counts"]], "o-", color="tab:blue")
    refs(ax)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set(xlabel=f"updates k per window of {abl['ablation_window']} steps (k + 1 checkpoints)",
           title="checkpoint count at a fixed window")
    ax = axes[2]
    names = [r["shape"] for r in abl["shapes"]]
    vals = [r["val_loss"] for r in abl["shapes"]]
    ax.bar(range(len(vals)), vals, color="tab:blue")
    ax.set_xticks(range(len(vals)), names, rotation=20)
    refs(ax)
    spread = [v for v in vals + [final["constant"], final["wsd"]] if math.isfinite(v)]
    pad = 0.15 * (max(spread) - min(spread) + 1e-9)
    ax.set_ylim(min(spread) - pad, max(spread) + pad)
    ax.set(title=f"shape at window {abl['ablation_window']}")
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_weights(cfg: Config, lr_mult: dict[str, list], path: Path) -> None:
    """Merge weights ``c_j`` of the final windows (every-step merges) and their synthetic decays."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    shown = {n: s for n, s in cfg.merges.items() if s.get("interval", 1) == 1}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
               "tab:cyan"]
    for i, (name, spec) in enumerate(shown.items()):
        k, color = spec["window"], palette[i % len(palette)]
        ckpt_steps = np.arange(cfg.steps - k, cfg.steps + 1)  # checkpoints of the final window
        ax1.plot(ckpt_steps, schedules.merge_coefficients(spec["schedule"], k), lw=1.2, color=color, label=name)
        w = np.concatenate(([1.0], schedules.decay_weights(spec["schedule"], k)))  # w_0 = 1 at the anchor
        ax2.plot(ckpt_steps, w, lw=1.2, color=color, label=f"{name} (synthetic decay)")
    steps = np.arange(1, cfg.steps + 1)
    ax2.plot(steps, lr_mult["wsd"], color="tab:red", lw=2, alpha=0.6, label="WSD LR multiplier")
    if cfg.with_cosine:
        ax2.plot(steps, lr_mult["cosine"], color="tab:gray", lw=1, ls="--", label="cosine LR multiplier")
    ax1.set(title="merge weights c_j of the final window", xlabel="checkpoint (step)", ylabel="c_j")
    ax2.set(title="decay weights w_i (Theorem 3.1) vs WSD's LR", xlabel="update (step)",
            xlim=(cfg.steps - 1.1 * max(max(cfg.windows), cfg.decay), cfg.steps + 1), ylim=(-0.02, 1.05))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
