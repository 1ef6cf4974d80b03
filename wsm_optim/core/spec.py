"""What a merge is configured to do: :class:`MergeSpec`, validated once; :class:`WSMOptions`, the option set.

The single-merge arguments of ``WSMOptimizer`` (``schedule, window, interval,
start, keep_last``) and its ``merges=`` dict go through
:func:`specs_from_arguments` alone, and so do the trainer integrations: one
rule, one message. :class:`WSMOptions` holds every option of ``WSMOptimizer``
(all its arguments but ``inner`` and ``model``) with the constructor's
defaults; the integrations take exactly these options and check them through
:meth:`WSMOptions.check`, the constructor's own rules.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import schedules

__all__ = ["MergeSpec", "WSMOptions", "DEFAULT_MERGE", "specs_from_arguments", "check_options", "check_name",
           "check_int", "check_bool", "NONFINITE_MODES", "OFFLOAD_CHOICES"]

NONFINITE_MODES = ("raise", "skip")
OFFLOAD_CHOICES = (None, "cpu")

#: Name of the merge built from the single-merge arguments of ``WSMOptimizer``.
DEFAULT_MERGE = "default"


#: A merge name becomes a state-dict key suffix and, in the trainer integrations, a folder name.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def check_name(name: Any) -> str:
    """``name`` if it is a valid merge name: letters, digits, ``_``, ``-`` and ``.``, not starting with ``.``.

    Names end up in paths (``merged/<name>/`` folders of the integrations), so
    path separators, ``.``/``..`` and hidden names are refused.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            "merges: names must be non-empty strings of letters, digits, '_', '-' and '.' (not first), "
            f"e.g. 'linear_1k', got {name!r}: names become file and folder names, so no path separators"
        )
    return name


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

    ``moments``: ``None`` (an exact merge of ``schedule``), or the number of
    moment accumulators (1 to :data:`~wsm_optim.core.moments.MAX_MOMENTS`)
    of a moment merge, whose readouts choose the shape after training
    (``shape=``; ``schedule`` is the one read by default, a name or a callable).

    Validated on construction (``TypeError`` / ``ValueError`` naming the field);
    numpy ints and bools are normalised to Python ones.
    """

    schedule: schedules.Schedule = "linear"
    window: int = 1000
    interval: int = 1
    start: int = 0
    keep_last: bool = False
    moments: int | None = None

    def __post_init__(self) -> None:
        window = check_int("window", self.window, 1)
        interval = check_int("interval", self.interval, 1)
        start = check_int("start", self.start, 0)
        keep_last = check_bool("keep_last", self.keep_last)
        moments = None if self.moments is None else _check_moments(self.moments, self.schedule)
        if window % interval:
            raise ValueError(
                f"window must be a positive multiple of interval, got window={window}, interval={interval}"
            )
        # Plain Python values, so that the config in state_dict() loads with weights_only=True.
        for name, value in (("window", window), ("interval", interval), ("start", start), ("keep_last", keep_last),
                            ("moments", moments)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_weights", schedules.weights(self.schedule, window // interval))

    @property
    def k(self) -> int:
        """Updates per window (``k + 1`` checkpoints)."""
        return self.window // self.interval

    @property
    def weights(self) -> schedules.WindowWeights:
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


def _check_moments(moments: Any, schedule: Any) -> int:
    """``moments`` of a moment merge, and its default shape readable at any window length."""
    from .moments import MAX_MOMENTS  # the moment basis lives there (it imports this module)

    moments = check_int("moments", moments, 1)
    if moments > MAX_MOMENTS:
        raise ValueError(f"moments must be None or an int in 1..{MAX_MOMENTS}, got {moments}")
    if not isinstance(schedule, str) and not callable(schedule):
        raise ValueError(
            "a moment merge (moments=...) needs schedule as a shape name or a callable f(t): explicit weights "
            "w_1..w_k fix one window length, and a moment merge is read at whatever length the window has reached"
        )
    return moments


def specs_from_arguments(schedule, window, interval, start, keep_last, merges, moments=None) -> dict[str, MergeSpec]:
    """``{name: MergeSpec}`` from ``WSMOptimizer``'s single-merge arguments or its ``merges=`` dict."""
    if merges is None:
        if window is None:
            raise TypeError("window is required: optimizer steps per merge window, e.g. window=1000")
        return {DEFAULT_MERGE: MergeSpec(schedule, window, interval, start, keep_last, moments)}
    default_schedule = isinstance(schedule, str) and schedule == "linear"  # may be an array: no ==
    if (window is not None or not default_schedule or interval != 1 or start != 0 or keep_last is not False
            or moments is not None):
        raise TypeError(
            "pass either merges={...} or the single-merge arguments "
            "(schedule, window, interval, start, keep_last, moments), not both"
        )
    if not isinstance(merges, Mapping) or not merges:
        raise ValueError("merges must be a non-empty dict {name: dict(schedule=..., window=...)}")
    for name in merges:
        check_name(name)
    return {name: MergeSpec.named(name, config) for name, config in merges.items()}


def check_options(*, backend: Any = "auto", nonfinite: Any = "raise", offload: Any = None, overlap: Any = False,
                  capturable: Any = False) -> tuple[bool, bool]:
    """Check ``WSMOptimizer``'s non-merge options that need no params; returns ``(overlap, capturable)`` as bools.

    The one place these rules and their messages live: ``WSMOptimizer`` and
    the trainer integrations (which build the optimizer later) both call it.
    """
    from .backends import BACKEND_NAMES  # the backends' own table (it imports this module)

    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"offload must be one of {OFFLOAD_CHOICES}, got {offload!r}")
    overlap, capturable = check_bool("overlap", overlap), check_bool("capturable", capturable)
    if offload is not None and backend == "triton":
        raise ValueError(
            "offload='cpu' folds on the host with torch ops; it cannot be combined with backend='triton' "
            "(use backend='auto' or 'foreach')"
        )
    if offload is not None and (capturable or overlap):
        raise ValueError(
            f"offload={offload!r} cannot be combined with capturable=True (host work cannot be captured in "
            "a CUDA graph) or overlap=True (the offloaded copy already overlaps training): got "
            f"capturable={capturable}, overlap={overlap}"
        )
    return overlap, capturable


@dataclass(frozen=True)
class WSMOptions:
    """Every option of ``WSMOptimizer`` but ``inner`` and ``model``, with its defaults (documented there).

    The trainer integrations (``WSMCallback``, ``wrap_trainer``, torchtitan's
    ``WSMConfig``) take exactly these options and build the optimizer later,
    when the framework has made the inner one: :meth:`check` applies
    ``WSMOptimizer``'s rules at once (same errors, same messages), and
    :meth:`kwargs` gives the constructor's keyword arguments.
    """

    schedule: Any = "linear"
    window: int | None = None
    interval: int = 1
    start: int = 0
    backend: str = "auto"
    keep_last: bool = False
    merges: Mapping[str, Any] | None = None
    nonfinite: str = "raise"
    overlap: bool = False
    capturable: bool = False
    offload: str | None = None
    merge_buffers: bool = False
    moments: int | None = None

    #: The merge arguments (one merge, or ``merges=``); the rest are options of the run.
    MERGE_ARGUMENTS = ("schedule", "window", "interval", "start", "keep_last", "moments")

    def merge_specs(self) -> dict[str, MergeSpec]:
        """The merges these options describe (:func:`specs_from_arguments`)."""
        return specs_from_arguments(self.schedule, self.window, self.interval, self.start, self.keep_last,
                                    self.merges, self.moments)

    def check(self) -> None:
        """Raise what ``WSMOptimizer(inner, **self.kwargs())`` raises for a bad option, before any params exist."""
        self.merge_specs()
        check_bool("merge_buffers", self.merge_buffers)
        check_options(backend=self.backend, nonfinite=self.nonfinite, offload=self.offload, overlap=self.overlap,
                      capturable=self.capturable)

    def uses_defaults(self) -> bool:
        """No merge argument given (the framework already holds a ``WSMOptimizer``, used as it is)."""
        default_schedule = isinstance(self.schedule, str) and self.schedule == "linear"  # may be an array: no ==
        return (self.window is None and self.merges is None and default_schedule and self.interval == 1
                and self.start == 0 and self.keep_last is False and self.moments is None)

    def kwargs(self) -> dict[str, Any]:
        """``WSMOptimizer`` keyword arguments: ``merges=`` or the single-merge arguments, then every option."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.merges is not None:
            for name in self.MERGE_ARGUMENTS:
                del options[name]
        else:
            del options["merges"]
        return options
