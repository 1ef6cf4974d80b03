"""The demo's figures: ``loss.png`` (along the run), ``ablations.png``, ``weights.png``.

Colours carry the comparison: blue is WSM, red is WSD (the decay WSM
emulates), black the live constant-LR model; every other baseline is grey, so
the question a panel answers is the one thing in colour. Each function saves
its figure to ``path`` and returns it (closed: inspectable, no longer shown).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import schedules
from .config import Config

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WSM, WSD, LIVE, MUTED = "tab:blue", "tab:red", "black", "0.55"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _window_end_points(cfg: Config, curves: dict, name: str) -> tuple[list[int], list[float]]:
    """A merge's scores at its window ends (the exact merge of each window's checkpoints)."""
    ends = set(cfg.window_ends(name))
    pts = [(s, v) for s, v in zip(curves[name]["step"], curves[name]["val_loss"]) if s in ends]
    return [s for s, _ in pts], [v for _, v in pts]


def _best(curves: dict, names) -> str | None:
    finite = [n for n in names if math.isfinite(curves[n]["val_loss"][-1])]
    return min(finite, key=lambda n: curves[n]["val_loss"][-1]) if finite else None


class _Panel:
    """An axis that fits its y-range to what is drawn from step ``lo`` on."""

    def __init__(self, ax, lo: int) -> None:
        self.ax, self.lo, self.ys = ax, lo, []

    def draw(self, steps, vals, **style) -> None:
        steps, vals = np.asarray(steps), np.asarray(vals, dtype=float)
        keep = (steps >= self.lo) & np.isfinite(vals)
        self.ax.plot(steps[keep], vals[keep], **style)
        self.ys.extend(vals[keep].tolist())

    def fit(self, hi_step: int) -> None:
        if self.ys:
            lo_y, hi_y = min(self.ys), max(self.ys)
            pad = 0.06 * (hi_y - lo_y + 1e-9)
            self.ax.set_ylim(lo_y - pad, hi_y + pad)
        self.ax.set_xlim(self.lo - 0.02 * (hi_step - self.lo), hi_step + 0.04 * (hi_step - self.lo))
        self.ax.set(xlabel="step", ylabel="validation loss (nats/char)")
        self.ax.grid(alpha=0.3)


def plot_loss(cfg: Config, curves: dict, branch_curves: dict, path: Path) -> Figure:
    """Two panels. Left, question 1: the linear merge of the last ``D`` steps (blue, read at its
    window ends) against each WSD branch that decays over the same ``D`` steps (red), with the
    difference at each branch end. Right, question 2: over the second half, the best merge and
    WSD against the live run and the best of each other family (grey)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    T, D = cfg.steps, cfg.decay

    # ---- left: the merge against the decay it emulates
    first = min(b["start"] for b in cfg.branches.values())
    left = _Panel(ax1, max(0, first - D // 2))
    c = curves["constant"]
    left.draw(c["step"], c["val_loss"], color=LIVE, lw=1.2, label="constant LR (live model)")
    for i, name in enumerate(cfg.branches):
        curve = curves[name] if name == "wsd" else branch_curves[name]
        left.draw(curve["step"], curve["val_loss"], color=WSD, lw=2.2,
                  label=f"WSD: LR decayed to 0 over D={D} steps" if i == 0 else None)
    steps, vals = _window_end_points(cfg, curves, cfg.tracker)
    left.draw(steps, vals, color=WSM, lw=1.4, marker="o", ms=5, zorder=4,
              label=f"WSM {cfg.tracker}: merge of the last D steps")
    merged = dict(zip(steps, vals))
    for name, spec in cfg.branches.items():
        curve = curves[name] if name == "wsd" else branch_curves[name]
        end, wsd = curve["step"][-1], curve["val_loss"][-1]
        ax1.plot(end, wsd, "X", color=WSD, ms=9, zorder=3)
        if end in merged:
            rel = 100 * (merged[end] - wsd) / wsd
            # left of and below the X: the curves come in from the upper left, the panel ends at T
            ax1.annotate(f"WSM {rel:+.2f}%\nvs WSD", (end, min(wsd, merged[end])), textcoords="offset points",
                         xytext=(-6, -14), ha="right", va="top", fontsize=8.5, color="0.15")
    left.fit(T)
    lo_y, hi_y = ax1.get_ylim()
    ax1.set_ylim(lo_y - 0.12 * (hi_y - lo_y), hi_y)  # room for the labels under the branch ends
    ax1.set_title("Q1: does the merge track a real LR decay?\n"
                  "(each WSD branch forks from the live run; X: its end)", fontsize=10)
    ax1.legend(fontsize=8, loc="upper right")

    # ---- right: the end of the run against the alternatives
    right = _Panel(ax2, T // 2)
    right.draw(c["step"], c["val_loss"], color=LIVE, lw=1.2, label="constant LR (live model)")
    families = [("EMA", _best(curves, cfg.ema_names), "-"), ("schedule-free", _best(curves, cfg.sf_names), "--"),
                ("cosine to zero", "cosine" if "cosine" in curves else None, ":")]
    for label, name, ls in families:
        if name is not None:
            right.draw(curves[name]["step"], curves[name]["val_loss"], color=MUTED, lw=1.3, ls=ls,
                       label=f"best {label} ({name})" if label != "cosine to zero" else label)
    wsd = curves["wsd"]
    right.draw(wsd["step"], wsd["val_loss"], color=WSD, lw=2.2, label=f"WSD (D={D})")
    best = _best(curves, cfg.merges)
    steps, vals = _window_end_points(cfg, curves, best)
    right.draw(steps, vals, color=WSM, lw=1.8, marker="o", ms=4, label=f"best WSM merge ({best})")
    right.fit(T)
    ax2.set_title("Q2: the second half, against the alternatives\n"
                  "(merges read at their window ends; grey: best of each other family)", fontsize=10)
    ax2.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return fig


def plot_ablations(cfg: Config, abl: dict[str, Any], table: list[dict[str, Any]], path: Path) -> Figure:
    """Val loss at ``T`` as the % difference from WSD's (zero on every axis, lower is better):
    against window length (EMA placed at twice its mean age), against updates per window, and
    per shape; live and the best schedule-free run as reference lines."""
    plt = _pyplot()
    final = {r["run"]: r["val_loss"] for r in table}
    wsd = final["wsd"]

    def pct(v: float) -> float:
        return 100 * (v - wsd) / wsd

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.4))
    refs = [(pct(final["constant"]), LIVE, "-", "constant LR (live)")]
    sf = [final[n] for n in cfg.sf_names if math.isfinite(final[n])]
    if sf:
        refs.append((pct(min(sf)), MUTED, "--", "best schedule-free"))
    refs = [(y, color, ls, f"{label}: {y:+.2f}%") for y, color, ls, label in refs]

    def frame(ax, values) -> None:
        ax.axhline(0.0, color=WSD, lw=1.6, label=f"WSD (D={cfg.decay}): 0")
        for y, color, ls, label in refs:
            ax.axhline(y, color=color, lw=1, ls=ls, label=label)
        span = [0.0, *values, *(y for y, *_ in refs)]
        lo, hi = min(span), max(span)
        pad = 0.08 * (hi - lo + 1e-9)
        ax.set_ylim(lo - pad, hi + pad)
        ax.grid(alpha=0.3)

    ax = axes[0]
    ws = [r["window"] for r in abl["windows"]]
    wv = [pct(r["val_loss"]) for r in abl["windows"]]
    ax.plot(ws, wv, "o-", color=WSM, lw=1.8, label="WSM linear merge, window W")
    ev = []
    if abl["ema"]:
        ev = [pct(r["val_loss"]) for r in abl["ema"]]
        ax.plot([2 * r["mean_age"] for r in abl["ema"]], ev, "s--", color=MUTED, label="EMA, W = 2 x mean age")
    frame(ax, wv + ev)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ws, [str(w) for w in ws])
    ax.minorticks_off()
    ax.set(xlabel="window W (steps)", ylabel="val loss at the last step vs WSD (%)\nlower is better",
           title=f"window length ({abl['regime']} regime)")

    ax = axes[1]
    ks = [r["updates"] for r in abl["counts"]]
    kv = [pct(r["val_loss"]) for r in abl["counts"]]
    ax.plot(ks, kv, "o-", color=WSM, lw=1.8)
    frame(ax, kv)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set(xlabel=f"updates k per window of {abl['ablation_window']} steps (k + 1 checkpoints)",
           title="checkpoint count at a fixed window")

    ax = axes[2]
    names = [r["shape"] for r in abl["shapes"]]
    sv = [pct(r["val_loss"]) for r in abl["shapes"]]
    bars = ax.bar(range(len(sv)), sv, color=WSM, width=0.6)
    ax.bar_label(bars, [f"{v:+.2f}%" for v in sv], fontsize=8, padding=2)
    ax.set_xticks(range(len(sv)), names, rotation=20)
    frame(ax, sv)
    ax.set(title=f"merge shape at window {abl['ablation_window']}")
    fig.suptitle(f"Ablations: val loss at the last step, % above (+) or below (-) the WSD run's "
                 f"{wsd:.4f}", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8.5, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return fig


def plot_weights(cfg: Config, lr_mult: dict[str, list], path: Path) -> Figure:
    """Merge weights ``c_j`` of the final windows (every-step merges; log scale, since
    inv-sqrt and ema put 10-30% on one checkpoint and a linear window 0.06% on each) and
    their synthetic decays against WSD's LR multiplier."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    shown = {n: s for n, s in cfg.merges.items() if s.get("interval", 1) == 1}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
               "tab:cyan"]
    floor = 1e-5
    for i, (name, spec) in enumerate(shown.items()):
        k, color = spec["window"], palette[i % len(palette)]
        ckpt_steps = np.arange(cfg.steps - k, cfg.steps + 1)  # checkpoints of the final window
        coef = schedules.merge_coefficients(spec["schedule"], k)
        ax1.plot(ckpt_steps, np.maximum(coef, floor), lw=1.2, color=color, label=name)
        w = np.concatenate(([1.0], schedules.decay_weights(spec["schedule"], k)))  # w_0 = 1 at the anchor
        ax2.plot(ckpt_steps, w, lw=1.2, color=color, label=name)
    steps = np.arange(1, cfg.steps + 1)
    ax2.plot(steps, lr_mult["wsd"], color=WSD, lw=2.4, alpha=0.6, label="WSD LR multiplier")
    if cfg.with_cosine:
        ax2.plot(steps, lr_mult["cosine"], color=MUTED, lw=1, ls="--", label="cosine LR multiplier")
    xlim = (cfg.steps - 1.05 * max(max(cfg.windows), cfg.decay), cfg.steps + 0.02 * max(cfg.windows))
    ax1.set_yscale("log")
    ax1.set_ylim(floor, 1.0)
    ax1.set(title="merge weights c_j of the final window (log scale)", xlabel="checkpoint (step)",
            ylabel="c_j (weights of a window sum to 1)", xlim=xlim)
    ax2.set(title="synthetic decay w_i of each merge (Theorem 3.1) vs WSD's LR", xlabel="update (step)",
            ylabel="LR multiplier", xlim=xlim, ylim=(-0.02, 1.05))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7, loc="lower center", ncol=4)
    ax2.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return fig


def plot_post_hoc(cfg: Config, post_hoc: dict[str, Any], wsd: float, live: float, path: Path) -> Figure:
    """Each shape's validation loss read after training from one moment merge, beside its exact merge
    (tracked from the start), with WSD and the live model as reference lines."""
    plt = _pyplot()
    shapes = list(post_hoc["shapes"])
    x = np.arange(len(shapes))
    exact = [post_hoc["shapes"][s]["exact"] for s in shapes]
    chosen = [post_hoc["shapes"][s]["post_hoc"] for s in shapes]
    fig, ax = plt.subplots(figsize=(8, 4.4))
    ax.bar(x - 0.2, exact, 0.4, color=MUTED, label="exact merge (shape fixed before training)")
    ax.bar(x + 0.2, chosen, 0.4, color=WSM, label=f"moment merge read after training ({post_hoc['moments']} moments)")
    ax.axhline(wsd, color=WSD, lw=1.6, label=f"WSD (LR decayed over the last {cfg.decay} steps)")
    ax.axhline(live, color=LIVE, lw=1.2, ls="--", label="live constant-LR model")
    for i, s in enumerate(shapes):
        bound = post_hoc["shapes"][s]["bound"]
        ax.annotate(f"bound {bound:.0e}" if bound > 1e-9 else "exact", (x[i] + 0.2, chosen[i]),
                    ha="center", va="bottom", fontsize=7)
    values = exact + chosen + [wsd, live]
    lo, hi = min(values), max(values)
    ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.25 * (hi - lo + 1e-9))
    ax.set_xticks(x, shapes)
    ax.set(title=f"the decay shape chosen after training (window {cfg.ablation_window} steps ending at T)",
           ylabel="validation loss at T (nats/char)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return fig
