"""``wsm-optim weights``: the Theorem 3.1 table of a schedule."""

from __future__ import annotations

import argparse

import numpy as np

from . import schedules as S


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schedule", default="linear", help=f"one of {', '.join([*S.SHAPES, *S.ALIASES])}")
    p.add_argument("--window", type=int, default=9, help="optimizer steps per window (default 9)")
    p.add_argument("--interval", type=int, default=1, help="steps between checkpoints (default 1)")
    p.add_argument("--plot", metavar="PNG", help="also draw the weights to this PNG file")


def table(schedule: S.Schedule, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(w, c)``: decay weights ``w_1..w_k`` and merge weights ``c_0..c_k``."""
    w = S.decay_weights(schedule, k)
    return w, S.merge_weights(w)


def format_table(schedule: S.Schedule, k: int) -> str:
    w, c = table(schedule, k)
    lines = [
        f"schedule {S.schedule_name(schedule)!r}: k = {k} updates, {k + 1} checkpoints (oldest first)",
        f"{'j':>5}  {'w_j (decay)':>12}  {'c_j (merge)':>12}",
    ]
    padded = np.concatenate(([1.0], w))
    for j in range(k + 1):
        lines.append(f"{j:>5}  {padded[j]:>12.6f}  {c[j]:>12.6f}")
    lines.append(f"{'sum':>5}  {'':>12}  {c.sum():>12.6f}")
    return "\n".join(lines)


def plot(schedule: S.Schedule, k: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, c = table(schedule, k)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(np.arange(k + 1), np.concatenate(([1.0], w)), marker="o", ms=3)
    ax1.set(title="decay weights w_i (w_0 = 1)", xlabel="update i", ylim=(-0.02, 1.02))
    ax2.bar(np.arange(k + 1), c)
    ax2.set(title="merge weights c_j", xlabel="checkpoint j (oldest first)")
    fig.suptitle(f"{S.schedule_name(schedule)}, k = {k}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.window < 1 or args.interval < 1 or args.window % args.interval:
        raise ValueError(
            f"--window must be a positive multiple of --interval, got {args.window} and {args.interval}"
        )
    k = args.window // args.interval
    print(format_table(args.schedule, k))
    if args.plot:
        plot(args.schedule, k, args.plot)
        print(f"wrote {args.plot}")
    return 0
