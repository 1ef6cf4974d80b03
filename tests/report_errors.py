"""Print the largest relative error of WSMOptimizer's readouts against the float64 reference, per dtype.

Usage (from the repository root)::

    python tests/report_errors.py            # about 40 s of CPU time

A deterministic sweep over param dtypes, every named schedule plus an explicit
and a callable one, windows 1..200 with intervals 1..8, start 0..3, every inner
optimizer, three windows each (tumbling) with keep_last. "fp32 readout" is
``merged_state_dict(torch.float32)`` (and ``completed=True``) against the
float64 merge of the checkpoints in their own dtype; "param-dtype readout" is
the default ``merged_state_dict()``. Relative error = max over elements of
``|got - ref| / max_j |theta_j|`` (elementwise scale over the merged
checkpoints). Every comparison is also asserted against the tolerance table
in ``harness.py``.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import harness as H  # noqa: E402
import reference as R  # noqa: E402

NAMED = ["linear", "cosine", "1-sqrt", "inv-sqrt", "ema"]
WINDOWS = [(1, 1), (6, 2), (24, 3), (64, 1), (200, 1), (200, 8)]


def sweep() -> dict[str, H.Errors]:
    rng = np.random.default_rng(0)
    results = {name: H.Errors() for name in H.DTYPES}
    for (dname, dtype), (window, interval), inner in itertools.product(H.DTYPES.items(), WINDOWS, H.INNERS):
        k = window // interval
        explicit = sorted(rng.uniform(0, 1, size=k), reverse=True)
        for i, schedule in enumerate([*NAMED, explicit, lambda t: (1 - t) ** 2]):
            if window >= 64 and i % 3:  # long windows: a third of the schedules keeps it quick
                continue
            start = (i + window) % 4
            spec = R.Window(schedule, window, interval, start, keep_last=True)
            case = H.Case(
                shapes=[(), (1,), (3, 2)],
                dtype=dtype,
                merges={"m": spec},
                inner=inner,
                steps=start + 3 * window,
                seed=i,
                abel_every=1 if k <= 32 else 13,
            )
            errs = H.run_case(case)
            agg = results[dname]
            agg.fp32, agg.native = max(agg.fp32, errs.fp32), max(agg.native, errs.native)
            agg.checks += errs.checks
            agg.window_ends += errs.window_ends
    return results


def main() -> None:
    for dname, e in sweep().items():
        print(
            f"{dname}: largest rel error vs float64 reference: fp32 readout {e.fp32:.3g} "
            f"(tolerance {H.FP32_READOUT_RTOL[H.DTYPES[dname]]:g}), param-dtype readout {e.native:.3g} "
            f"(tolerance {H.NATIVE_READOUT_RTOL[H.DTYPES[dname]]:.3g}); {e.checks} tensor checks, "
            f"{e.window_ends} window ends"
        )


if __name__ == "__main__":
    main()
