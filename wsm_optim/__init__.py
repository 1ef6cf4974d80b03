"""wsm_optim: Warmup-Stable and Merge without storing checkpoints.

``WSMOptimizer`` wraps any torch optimizer and keeps the WSM merge of recent
checkpoints (Tian et al., arXiv 2507.17634, Theorem 3.1; ``docs/method.md``) in
one fp32 accumulator per parameter, updated in a single streaming pass per
checkpoint.

Layout: ``core/`` (the online engine: ``WSMOptimizer``, its merges, backends,
readouts and state-dict format), ``offline/`` (merging saved checkpoints),
``cli/`` (the ``wsm-optim`` command), ``integrations/`` (trainers and engines),
``common/`` (pieces the three share), ``schedules`` (decay shapes and Theorem 3.1
weights, torch-free), ``selection`` (``evaluate_merges``), ``demo`` (never imported by the
library). 0.2 module paths
(``wsm_optim.optimizer`` and the like) still import, with a ``DeprecationWarning``.
"""

import importlib
from typing import Any

#: Public names and the modules they live in, imported on first use (PEP 562), so that
#: ``wsm-optim weights`` and ``import wsm_optim.schedules`` do not pay for importing torch.
_EXPORTS = {
    "WSMOptimizer": "core.optimizer",
    "MergeSpec": "core.spec",
    "DEFAULT_MERGE": "core.spec",
    "NonFiniteMergeError": "core.nonfinite",
    "LiveParamsChangedWarning": "core.readout",
    "merge_checkpoints": "offline",
    "evaluate_merges": "selection",
    "MergeScores": "selection",
}


from . import _moved  # noqa: E402

_moved.install()

from .integrations import _callers  # noqa: E402,F401  (torch-free: what the engines need from step())
from .integrations.unwrap import unwrap  # noqa: E402  (torch-free; eager so the submodule never shadows the function)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name == "schedules":
        return importlib.import_module(".schedules", __name__)
    raise AttributeError(f"module 'wsm_optim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, "schedules"])


__all__ = [
    "WSMOptimizer",
    "MergeSpec",
    "NonFiniteMergeError",
    "LiveParamsChangedWarning",
    "DEFAULT_MERGE",
    "merge_checkpoints",
    "evaluate_merges",
    "MergeScores",
    "unwrap",
    "schedules",
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wsm-optim")
    except PackageNotFoundError:  # a checkout on sys.path that was never installed
        return "0+unknown"


__version__ = _version()
