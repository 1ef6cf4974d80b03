"""wsm_optim: Warmup-Stable and Merge without storing checkpoints.

``WSMOptimizer`` wraps any torch optimizer and keeps the WSM merge of recent
checkpoints (Tian et al., arXiv 2507.17634, Theorem 3.1; ``docs/method.md``) in
one fp32 accumulator per parameter, updated in a single streaming pass per
checkpoint.

Layout, one concept per module: ``optimizer`` (the ``torch.optim`` face),
``runtime`` (the running state and checkpoint passes), ``merge`` (window
arithmetic), ``schedules`` (Theorem 3.1 weights), ``registry`` (params and
their accumulators), ``readout`` (streamed readouts), ``nonfinite`` (NaN/inf
policy), ``persistence`` (state-dict format), ``backends`` (foreach / Triton
update arithmetic; kernels in ``wsm_optim.kernels``), ``distributed`` (DTensor
and DCP), ``selection`` / ``unwrap`` / ``integrations`` (trainers), ``offline``
and ``io`` (saved checkpoints), ``demo`` (never imported by the library).
"""

from . import schedules
from .offline import merge_checkpoints
from .optimizer import DEFAULT_MERGE, MergeSpec, NonFiniteMergeError, WSMOptimizer
from .readout import LiveParamsChangedWarning
from .selection import MergeScores, evaluate_merges
from .unwrap import unwrap

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
__version__ = "0.1.0"
