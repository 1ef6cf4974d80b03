"""Where a run stands in one merge's windows: the window arithmetic, on the host (``docs/method.md``).

A window of merge ``spec`` holds ``k = window // interval`` updates and
``k + 1`` checkpoints; window ``n`` is anchored after ``start + n * window``
counted steps, checkpoint ``j`` of it is the params after
``start + n * window + j * interval`` steps, and windows tumble (the last
checkpoint of one window anchors the next).

:class:`Position` moves through a run in two equivalent ways, kept side by
side and tested against each other at every step: incrementally
(:meth:`Position.begin_window` before the inner step, :meth:`Position.advance`
after it) and in closed form from the step count alone
(:meth:`Position.set_position`, what the Triton kernel computes on the device).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import schedules
from .spec import MergeSpec

__all__ = ["Position"]


@dataclass
class Position:
    """Where the run stands in one merge's windows (host counters only).

    ``anchored``: a window has begun. ``t``: checkpoints folded into the
    current window after its anchor (``0..k``). ``r``: steps since the last
    checkpoint (``0..interval - 1``). ``windows_completed``: windows whose last
    checkpoint was reached. ``has_completed``: the last completed window is
    readable from its kept buffers (``keep_last``).
    """

    spec: MergeSpec
    anchored: bool = False
    t: int = 0
    r: int = 0
    windows_completed: int = 0
    has_completed: bool = False

    @property
    def weights(self) -> schedules.WindowWeights:
        return self.spec.weights

    @property
    def complete(self) -> bool:
        """The current window has reached its last checkpoint (readable until the next step anchors anew)."""
        return self.anchored and self.t == self.spec.k

    @property
    def window_index(self) -> int:
        """Index of the current window (0 before the first anchor; a finished window keeps its index)."""
        return self.windows_completed - (1 if self.complete else 0)

    def live_weight(self) -> float:
        """``w_{t+1}``: the weight the live params get in the current readout (0 at a window end)."""
        return self.weights.w(self.t + 1) if self.anchored else 1.0

    @property
    def mixes_live(self) -> bool:
        """The current readout mixes the live params into a window's checkpoints (anchored, mid-window)."""
        return self.anchored and self.live_weight() != 0.0

    def window_of(self, completed: bool) -> int:
        """Index of the window a readout refers to: the last completed one, or the current one."""
        return self.windows_completed - 1 if completed else self.window_index

    # ----------------------------------------------------------- incremental
    def anchor_due(self, steps: int) -> bool:
        """Whether the ``step()`` after ``steps`` counted steps anchors a window, before the inner step."""
        return self.complete or (not self.anchored and steps == self.spec.start)

    def begin_window(self) -> float:
        """Anchor a window at the current params; returns ``c_0``.

        A finished window becomes the kept completed one (with ``keep_last``).
        """
        if self.complete and self.spec.keep_last:
            self.has_completed = True
        self.anchored, self.t, self.r = True, 0, 0
        return self.weights.c(0)

    def advance(self) -> float | None:
        """Count one step after the inner step; returns ``c_t`` if a checkpoint is due, else ``None``."""
        if not self.anchored or self.complete:
            return None
        self.r += 1
        if self.r < self.spec.interval:
            return None
        self.r = 0
        self.t += 1
        if self.t == self.spec.k:
            self.windows_completed += 1
        return self.weights.c(self.t)

    # ----------------------------------------------------------- closed form
    def set_position(self, steps: int) -> None:
        """Counters after ``steps`` counted steps (the closed form the kernel uses on the device)."""
        spec, u = self.spec, steps - self.spec.start
        if u <= 0:
            self.anchored, self.t, self.r, self.windows_completed, self.has_completed = False, 0, 0, 0, False
            return
        within = u % spec.window
        self.anchored = True
        self.windows_completed = u // spec.window
        if within == 0:  # a window just finished; the next anchors at the next step()
            self.t, self.r = spec.k, 0
        else:
            self.t, self.r = divmod(within, spec.interval)
        self.has_completed = spec.keep_last and u > spec.window

    # ------------------------------------------------------------- readouts
    def readout_weights(self) -> np.ndarray:
        """Coefficients of the current readout: anchor, each checkpoint so far, then the live params.

        float64, sums to 1; ``[1.0]`` (the live params alone) before the first anchor.
        """
        if not self.anchored:
            return np.array([1.0])
        return np.array([self.weights.c(j) for j in range(self.t + 1)] + [self.live_weight()])

    def status(self) -> dict[str, Any]:
        """``window_index``, ``checkpoint`` (t of k), ``k``, ``steps_since_checkpoint``, ``complete``, ...

        ``has_completed``: the ``keep_last`` buffer holds a completed window (so
        ``completed=True`` readouts work now, as they do while ``complete``);
        ``completed_kept`` is its earlier name, kept for compatibility.
        ``weights``: :meth:`readout_weights`.
        """
        return {
            "anchored": self.anchored,
            "window_index": self.window_index if self.anchored else -1,
            "checkpoint": self.t,
            "k": self.spec.k,
            "steps_since_checkpoint": self.r,
            "complete": self.complete,
            "windows_completed": self.windows_completed,
            "has_completed": self.has_completed,
            "completed_kept": self.has_completed,
            "weights": self.readout_weights(),
        }

    def first_step(self, window: int) -> int:
        """Counted steps at the anchor of window number ``window``."""
        return self.spec.start + window * self.spec.window

    def upcoming(self, steps: int) -> tuple[float | None, float | None]:
        """``(c_0 if the next step() anchors, c_t if it reaches a checkpoint)``, without moving.

        Evaluates every weight the next step needs, so that a weight that
        cannot be computed raises before the step changes anything.
        """
        trial = copy.copy(self)
        anchor = trial.begin_window() if trial.anchor_due(steps) else None
        return anchor, trial.advance()

    def restore(self, anchored: bool, t: int, r: int, windows_completed: int, has_completed: bool) -> None:
        """Set the counters (``load_state_dict``, after validation)."""
        self.anchored, self.t, self.r = bool(anchored), int(t), int(r)
        self.windows_completed, self.has_completed = int(windows_completed), bool(has_completed)
