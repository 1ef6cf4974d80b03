"""wsm_optim: Warmup-Stable and Merge without storing checkpoints.

``WSMOptimizer`` wraps any torch optimizer and keeps the WSM merge of recent
checkpoints (Tian et al., arXiv 2507.17634, Theorem 3.1) in one fp32
accumulator per parameter, updated in a single streaming pass per checkpoint.
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
