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

from ..core.spec import check_bool, check_options, specs_from_arguments

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
    offload: Any = None,
    merge_buffers: Any = False,
) -> dict[str, Any] | None:
    """``WSMOptimizer`` keyword arguments for these merge arguments, or ``None`` if none was given.

    ``None`` (every merge argument at its default, ``window=None`` and no
    ``merges``) means: the framework already holds a ``WSMOptimizer`` and it is
    used as is. Otherwise the arguments are validated by
    :func:`wsm_optim.core.merge.specs_from_arguments` (the one rule for the merge
    arguments, also "window or merges, not both") and the option checks of
    ``WSMOptimizer``; errors are those ``WSMOptimizer(...)`` raises.
    """
    default_schedule = isinstance(schedule, str) and schedule == "linear"  # may be an array: no ==
    all_defaults = default_schedule and interval == 1 and start == 0 and keep_last is False
    merge_buffers = check_bool("merge_buffers", merge_buffers)
    if window is None and merges is None and all_defaults:
        if merge_buffers:
            raise ValueError(
                "merge_buffers=True needs the merge arguments (window=... or merges=...); with a WSMOptimizer "
                "built by you, pass merge_buffers=True and model= to it instead"
            )
        return None
    specs_from_arguments(schedule, window, interval, start, keep_last, merges)
    check_options(backend=backend, nonfinite=nonfinite, offload=offload)
    options = dict(backend=backend, nonfinite=nonfinite, offload=offload, merge_buffers=merge_buffers)
    if merges is not None:
        return dict(merges=merges, **options)
    return dict(schedule=schedule, window=window, interval=interval, start=start, keep_last=keep_last, **options)
