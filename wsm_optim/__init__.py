"""wsm_optim: Warmup-Stable and Merge without storing checkpoints.

``WSMOptimizer`` wraps any torch optimizer and keeps the WSM merge of recent
checkpoints (Tian et al., arXiv 2507.17634, Theorem 3.1; ``docs/method.md``) in
one fp32 accumulator per parameter, updated in a single streaming pass per
checkpoint.

Layout, one concept per module: ``optimizer`` (the ``torch.optim`` face),
``spec`` (merge and option rules), ``window`` (window arithmetic), ``merge``
(one tracked merge and its buffers), ``runtime`` (the running state and
checkpoint passes), ``schedules`` (Theorem 3.1 weights), ``registry`` (params,
names, groups), ``readout`` (streamed readouts), ``nonfinite`` (NaN/inf policy),
``persistence`` (state-dict format), ``backends`` (foreach / Triton / host
offload; kernels in ``wsm_optim.kernels``), ``precision`` (accumulator dtype),
``distributed`` and ``pipeline`` (DTensor, DCP, pipeline stages), ``selection``
/ ``unwrap`` / ``integrations`` (trainers), ``offline``, ``streaming_merge``,
``io``, ``checkpoint_readers``, ``checkpoint_writers`` (saved checkpoints),
``cli`` / ``merge_cli`` / ``weights_cli`` (command line), ``demo`` (never
imported by the library).
"""

import importlib
from typing import Any

#: Public names and the modules they live in, imported on first use (PEP 562), so that
#: ``wsm-optim weights`` and ``import wsm_optim.schedules`` do not pay for importing torch.
_EXPORTS = {
    "WSMOptimizer": "optimizer",
    "MergeSpec": "merge",
    "DEFAULT_MERGE": "merge",
    "NonFiniteMergeError": "nonfinite",
    "LiveParamsChangedWarning": "readout",
    "merge_checkpoints": "offline",
    "evaluate_merges": "selection",
    "MergeScores": "selection",
}


from .unwrap import unwrap  # noqa: E402  (torch-free; eager so the submodule never shadows the function)


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
