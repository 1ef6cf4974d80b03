"""The options of a trainer integration, checked by the rules ``WSMOptimizer`` uses.

``wrap_trainer`` and ``WSMCallback`` take exactly ``WSMOptimizer``'s options
(:class:`~wsm_optim.core.spec.WSMOptions`: every argument but ``inner`` and
``model``) as explicit keywords (IDE completion, help text) and build the
optimizer later, when the framework has made the inner one. They check the
options at once, through :meth:`WSMOptions.check`, so a bad argument raises the
same error with the same message whichever door it came through.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..core.spec import WSMOptions, check_bool

__all__ = ["merge_config", "options_from"]


def options_from(arguments: Mapping[str, Any]) -> WSMOptions:
    """The :class:`WSMOptions` among an integration's keyword ``arguments`` (its other keywords are left out)."""
    return WSMOptions(**{f.name: arguments[f.name] for f in dataclasses.fields(WSMOptions) if f.name in arguments})


def merge_config(options: WSMOptions) -> dict[str, Any] | None:
    """``WSMOptimizer`` keyword arguments for ``options``, or ``None`` if no merge argument was given.

    ``None`` (every merge argument at its default, ``window=None`` and no
    ``merges``) means: the framework already holds a ``WSMOptimizer`` and it is
    used as is. Otherwise the options are validated by :meth:`WSMOptions.check`
    (the one rule for the merge arguments, also "window or merges, not both",
    and the option checks of ``WSMOptimizer``); errors are those
    ``WSMOptimizer(...)`` raises.
    """
    if check_bool("merge_buffers", options.merge_buffers) and options.uses_defaults():
        raise ValueError(
            "merge_buffers=True needs the merge arguments (window=... or merges=...); with a WSMOptimizer "
            "built by you, pass merge_buffers=True and model= to it instead"
        )
    if options.uses_defaults():
        return None
    options.check()
    return options.kwargs()
