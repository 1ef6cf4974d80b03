"""One merge: its configuration (:class:`MergeSpec`) and where the run stands in it (:class:`MergeState`).

This is the window arithmetic of the package, on the host (see
``docs/method.md``). A window of merge ``spec`` holds ``k = window // interval``
updates and ``k + 1`` checkpoints; window ``n`` is anchored after
``start + n * window`` counted steps, checkpoint ``j`` of it is the params after
``start + n * window + j * interval`` steps, and windows tumble (the last
checkpoint of one window anchors the next).

:class:`MergeState` moves through a run in two equivalent ways, kept side by
side and tested against each other at every step: incrementally
(:meth:`MergeState.begin_window` before the inner step, :meth:`MergeState.advance`
after it) and in closed form from the step count alone
(:meth:`MergeState.set_position`, what the Triton kernel computes on the device).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import schedules

__all__ = ["MergeSpec", "MergeState", "DEFAULT_MERGE", "specs_from_arguments", "check_int", "check_bool"]

#: Name of the merge built from the single-merge arguments of ``WSMOptimizer``.
DEFAULT_MERGE = "default"


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python int ``>= minimum`` (numpy ints accepted, bools refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a Python bool; only ``True``/``False`` (and numpy bools) are accepted.

    Strings such as ``"False"`` or ints such as ``2`` are refused: their truth
    value is rarely what the user meant.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return bool(value)


@dataclass(frozen=True)
class MergeSpec:
    """Configuration of one merge: a decay shape over tumbling windows.

    ``window`` optimizer steps per window, a checkpoint every ``interval``
    steps (``k = window // interval`` updates, ``k + 1`` checkpoints), the first
    window anchored after ``start`` steps. ``keep_last`` keeps the last
    completed window's merge readable in one more fp32 buffer per parameter.
    ``schedule``: a shape name, a callable ``f(t)`` with ``f(0) = 1``, or the
    explicit decay weights ``w_1..w_k``.

    Validated on construction (``TypeError`` / ``ValueError`` naming the field);
    numpy ints and bools are normalised to Python ones.
    """

    schedule: schedules.Schedule = "linear"
    window: int = 1000
    interval: int = 1
    start: int = 0
    keep_last: bool = False

    def __post_init__(self) -> None:
        window = check_int("window", self.window, 1)
        interval = check_int("interval", self.interval, 1)
        start = check_int("start", self.start, 0)
        keep_last = check_bool("keep_last", self.keep_last)
        if window % interval:
            raise ValueError(
                f"window must be a positive multiple of interval, got window={window}, interval={interval}"
            )
        # Plain Python values, so that the config in state_dict() loads with weights_only=True.
        for name, value in (("window", window), ("interval", interval), ("start", start), ("keep_last", keep_last)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_weights", schedules.weights(self.schedule, window // interval))

    @property
    def k(self) -> int:
        """Updates per window (``k + 1`` checkpoints)."""
        return self.window // self.interval

    @property
    def weights(self) -> schedules.MergeWeights:
        """The Theorem 3.1 weights ``c_0..c_k`` / ``w_0..w_{k+1}``, computed on demand."""
        return self._weights  # type: ignore[attr-defined]

    @classmethod
    def named(cls, name: str, config: Any) -> "MergeSpec":
        """``config`` (a ``MergeSpec`` or a dict of its fields) for ``merges[name]``; errors name the merge."""
        if isinstance(config, MergeSpec):
            return config
        if not isinstance(config, Mapping):
            raise TypeError(f"merges[{name!r}] must be a dict or a MergeSpec, got {type(config).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(config) - set(allowed))
        if unknown:
            raise TypeError(f"merges[{name!r}]: unknown keys {unknown}; allowed: {sorted(allowed)}")
        if "window" not in config:
            raise TypeError(f"merges[{name!r}]: 'window' is required")
        try:
            return cls(**config)
        except (TypeError, ValueError) as e:
            raise type(e)(f"merges[{name!r}].{e} (merge {name!r})") from None


def specs_from_arguments(schedule, window, interval, start, keep_last, merges) -> dict[str, MergeSpec]:
    """``{name: MergeSpec}`` from ``WSMOptimizer``'s single-merge arguments or its ``merges=`` dict."""
    if merges is None:
        if window is None:
            raise TypeError("window is required: optimizer steps per merge window, e.g. window=1000")
        return {DEFAULT_MERGE: MergeSpec(schedule, window, interval, start, keep_last)}
    default_schedule = isinstance(schedule, str) and schedule == "linear"  # may be an array: no ==
    if window is not None or not default_schedule or interval != 1 or start != 0 or keep_last is not False:
        raise TypeError(
            "pass either merges={...} or the single-merge arguments "
            "(schedule, window, interval, start, keep_last), not both"
        )
    if not isinstance(merges, Mapping) or not merges:
        raise ValueError("merges must be a non-empty dict {name: dict(schedule=..., window=...)}")
    for name in merges:
        if not isinstance(name, str) or not name:
            raise ValueError(f"merges: names must be non-empty strings, got {name!r}")
    return {name: MergeSpec.named(name, config) for name, config in merges.items()}


@dataclass
class MergeState:
    """Where the run stands in one merge's windows (host counters only).

    ``anchored``: a window has begun. ``t``: checkpoints folded into the
    current window after its anchor (``0..k``). ``r``: steps since the last
    checkpoint (``0..interval - 1``). ``windows_completed``: windows whose last
    checkpoint was reached. ``has_completed``: the last completed window is
    readable from its kept buffers (``keep_last``).
    """

    name: str
    spec: MergeSpec
    anchored: bool = False
    t: int = 0
    r: int = 0
    windows_completed: int = 0
    has_completed: bool = False

    @property
    def weights(self) -> schedules.MergeWeights:
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

        ``completed_kept``: the ``keep_last`` buffer holds a completed window (so
        ``completed=True`` readouts work now, as they do while ``complete``).
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
            "completed_kept": self.has_completed,
            "weights": self.readout_weights(),
        }

    def first_step(self, window: int) -> int:
        """Counted steps at the anchor of window number ``window``."""
        return self.spec.start + window * self.spec.window

    # ---------------------------------------------------------- persistence
    def config(self) -> dict[str, Any]:
        """What must match for a saved state to load (format version 1)."""
        return {
            "schedule": schedules.schedule_name(self.spec.schedule),
            "weights_sha256": self.weights.digest(),
            "window": self.spec.window,
            "interval": self.spec.interval,
            "start": self.spec.start,
        }

    def counters(self) -> dict[str, Any]:
        # "has_last" is the format-1 name of has_completed.
        return {
            "anchored": self.anchored,
            "t": self.t,
            "r": self.r,
            "windows_completed": self.windows_completed,
            "has_last": self.has_completed,
        }

    def check_counters(self, counters: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the counter if a saved one cannot belong to this spec."""
        spec = self.spec
        limits = {"t": spec.k, "r": spec.interval - 1, "windows_completed": None}
        for key in ("anchored", "t", "r", "windows_completed", "has_last"):
            if key not in counters:
                raise ValueError(f"load_state_dict: merge {self.name!r}: counters lack {key!r}")
        for key, top in limits.items():
            value = counters[key]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0 or (
                top is not None and value > top
            ):
                bound = f"0..{top}" if top is not None else ">= 0"
                raise ValueError(
                    f"load_state_dict: merge {self.name!r}: counter {key} = {value!r} is outside {bound} "
                    f"for window={spec.window}, interval={spec.interval}"
                )
        if counters["t"] == spec.k and counters["r"] != 0:
            raise ValueError(f"load_state_dict: merge {self.name!r}: counters t = k and r = {counters['r']} != 0")

    def restore(self, counters: dict[str, Any], keep_saved_completed: bool) -> None:
        self.anchored = bool(counters["anchored"])
        self.t, self.r = int(counters["t"]), int(counters["r"])
        self.windows_completed = int(counters["windows_completed"])
        self.has_completed = keep_saved_completed
