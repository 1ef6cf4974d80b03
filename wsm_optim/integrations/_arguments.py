"""The merge arguments of a trainer integration, checked by the rules ``WSMOptimizer`` uses.

``wrap_trainer`` and ``WSMCallback`` take ``WSMOptimizer``'s merge arguments
as explicit keywords (IDE completion, help text) and build the optimizer later,
when the framework has made the inner one. They check the arguments at once,
through the same functions ``WSMOptimizer`` calls, so a bad argument raises the
same error with the same message whichever door it came through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..backends import BACKEND_NAMES
from ..merge import specs_from_arguments
from ..nonfinite import NONFINITE_MODES

__all__ = ["merge_config"]


def merge_config(
    schedule: Any,
    window: int | None,
    interval: Any,
    start: Any,
    keep_last: Any,
    merges: Mapping[str, Any] | None,
    backend: Any,
    nonfinite: Any,
) -> dict[str, Any] | None:
    """``WSMOptimizer`` keyword arguments for these merge arguments, or ``None`` if none was given.

    ``None`` (every merge argument at its default, ``window=None`` and no
    ``merges``) means: the framework already holds a ``WSMOptimizer`` and it is
    used as is. Otherwise the arguments are validated by
    :func:`wsm_optim.merge.specs_from_arguments` (the one rule for the merge
    arguments, also "window or merges, not both") and the option checks of
    ``WSMOptimizer``; errors are those ``WSMOptimizer(...)`` raises.
    """
    default_schedule = isinstance(schedule, str) and schedule == "linear"  # may be an array: no ==
    all_defaults = default_schedule and interval == 1 and start == 0 and keep_last is False
    if window is None and merges is None and all_defaults:
        return None
    specs_from_arguments(schedule, window, interval, start, keep_last, merges)
    # The option checks WSMOptimizer makes when it builds its runtime (same wording: see the tests).
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if merges is not None:
        return dict(merges=merges, backend=backend, nonfinite=nonfinite)
    return dict(
        schedule=schedule, window=window, interval=interval, start=start, keep_last=keep_last,
        backend=backend, nonfinite=nonfinite,
    )
