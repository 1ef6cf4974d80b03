"""The offline tool: merge checkpoints already saved on disk (``wsm-optim merge``, :func:`merge_checkpoints`).

It needs nothing of the online engine but the shapes (:mod:`wsm_optim.schedules`)
and the accumulator-precision rule (:mod:`wsm_optim.common.precision`):

* :mod:`.merge`: inputs (discovery, order), the Theorem 3.1 weights and :func:`merge_checkpoints`;
* :mod:`.streaming`: the merge loop, block by block, in bounded memory;
* :mod:`.readers`: one reader per input format (files, Hugging Face folders, DCP directories);
* :mod:`.megatron`: Megatron ``torch_dist`` run and iteration folders, their reader and output;
* :mod:`.files`: reading one checkpoint file safely;
* :mod:`.dcp_rows`: DCP rows read straight from ``.distcp`` files;
* :mod:`.writers`: one output per format, written crash-safely (:mod:`wsm_optim.common.atomic`).
"""

from .merge import (
    CHECKPOINT_SUFFIXES,
    OUT_FORMATS,
    WEIGHT_SUM_ATOL,
    UnsafePickleWarning,
    checkpoint_weights,
    format_table,
    merge_checkpoints,
    resolve_inputs,
    step_number,
)

__all__ = [
    "merge_checkpoints",
    "resolve_inputs",
    "step_number",
    "checkpoint_weights",
    "format_table",
    "UnsafePickleWarning",
    "CHECKPOINT_SUFFIXES",
    "WEIGHT_SUM_ATOL",
    "OUT_FORMATS",
]
