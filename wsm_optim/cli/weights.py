"""``wsm-optim weights``: the Theorem 3.1 table of a schedule.

Any window answers at once: values come from the lazy
:func:`wsm_optim.schedules.weights` (O(1) per value), a table longer than
``SUMMARY_ROWS`` rows is printed as its first and last rows around one ellipsis
line, and ``--plot`` of a long window draws ``PLOT_POINTS`` evenly spread points.
"""

from __future__ import annotations

import argparse

import numpy as np

from .. import schedules

#: Longest table printed in full; a longer one shows its first and last SUMMARY_ROWS // 2 rows.
SUMMARY_ROWS = 40
#: Most points ``--plot`` draws; a longer window is sampled at this many evenly spread j.
PLOT_POINTS = 2001


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schedule", default="linear", help=f"one of {', '.join([*schedules.SHAPES, *schedules.ALIASES])}")
    p.add_argument("--window", type=int, default=9, help="optimizer steps per window (default 9)")
    p.add_argument("--interval", type=int, default=1, help="steps between checkpoints (default 1)")
    p.add_argument("--plot", metavar="PNG", help="also draw the weights to this PNG file")


def shown_rows(k: int, rows: int = SUMMARY_ROWS) -> tuple[range, range]:
    """Indices ``j`` printed for ``k + 1`` checkpoints: ``(head, tail)``; ``tail`` is empty for a full table."""
    if k + 1 <= rows:
        return range(k + 1), range(0)
    return range(rows // 2), range(k + 1 - rows // 2, k + 1)


def format_table(schedule: schedules.Schedule, k: int) -> str:
    """The table ``j, w_j, c_j`` for ``j = 0..k``, summarised past ``SUMMARY_ROWS`` rows.

    Values print as ``%.6f``, or all as ``%.6e`` when a shown nonzero value is
    below 1e-3 (long windows: ``c_j ~ 1 / k`` would print as 0.000000).
    """
    mw = schedules.weights(schedule, k)
    head, tail = shown_rows(k)
    values = {j: (mw.w(j), mw.c(j)) for j in (*head, *tail)}
    tiny = any(0.0 < abs(v) < 1e-3 for pair in values.values() for v in pair)
    fmt = ">12.6e" if tiny else ">12.6f"
    width = max(5, len(str(k)))
    lines = [
        f"schedule {mw.name!r}: k = {k} updates, {k + 1} checkpoints (oldest first)",
        f"{'j':>{width}}  {'w_j (decay)':>12}  {'c_j (merge)':>12}",
    ]
    lines += [f"{j:>{width}}  {values[j][0]:{fmt}}  {values[j][1]:{fmt}}" for j in head]
    if tail:
        lines.append(f"{'...':>{width}}  ({tail.start - head.stop} rows omitted: j = {head.stop} .. {tail.start - 1})")
        lines += [f"{j:>{width}}  {values[j][0]:{fmt}}  {values[j][1]:{fmt}}" for j in tail]
        # c_j = w_j - w_{j+1} telescopes: the sum over all j is w_0 - w_{k+1} = 1, without O(k) work
        total = f"{mw.w(0) - mw.w(k + 1):{fmt}}  (= w_0 - w_{{k+1}}, all {k + 1} rows)"
    else:
        total = f"{float(np.sum([values[j][1] for j in head])):{fmt}}"
    lines.append(f"{'sum':>{width}}  {'':>12}  {total}")
    return "\n".join(lines)


def plot(schedule: schedules.Schedule, k: int, path: str) -> None:
    """Draw ``w_j`` and ``c_j`` to a PNG; past ``PLOT_POINTS`` checkpoints, at ``PLOT_POINTS`` evenly spread j."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mw = schedules.weights(schedule, k)
    sampled = k + 1 > PLOT_POINTS
    n = PLOT_POINTS - 1
    js = np.array([(s * k) // n for s in range(n + 1)] if sampled else range(k + 1), dtype=np.int64)
    w = np.array([mw.w(int(j)) for j in js])
    c = np.array([mw.c(int(j)) for j in js])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(js, w, marker=None if sampled else "o", ms=3)
    ax1.set(title="decay weights w_i (w_0 = 1)", xlabel="update i", ylim=(-0.02, 1.02))
    if sampled:
        ax2.plot(js, c)
        ax2.set(title=f"merge weights c_j ({len(js)} of {k + 1} j)", xlabel="checkpoint j (oldest first)")
    else:
        ax2.bar(js, c)
        ax2.set(title="merge weights c_j", xlabel="checkpoint j (oldest first)")
    fig.suptitle(f"{mw.name}, k = {k}")
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
