"""``wsm-optim merge``: the command line of :func:`wsm_optim.offline.merge.merge_checkpoints`.

Arguments map one to one onto the function's; warnings print as one line
(``wsm-optim merge: warning: ...``), errors as one line with exit code 2 (see
:mod:`wsm_optim.cli`).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .. import schedules
from ..offline.merge import CHECKPOINT_SUFFIXES, DTYPES, OUT_FORMATS, WEIGHT_SUM_ATOL, merge_checkpoints

__all__ = ["add_arguments", "run"]


def _parse_weights(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError as e:
        raise ValueError(f"--weights: expected comma-separated numbers like 0.5,0.3,0.2, got {text!r}") from e


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="CKPT",
        help="checkpoints, oldest first: .safetensors files, torch.save .pt/.pth/.bin state dicts, Hugging Face "
        "save_pretrained folders (sharded or not), torch.distributed.checkpoint (DCP) directories, Megatron torch_dist "
        "iter_* folders; or ONE parent directory (a Megatron run folder, say): its checkpoints (see --glob) sorted by "
        "step number = the last integer in the name (2 < 10 < 100)",
    )
    p.add_argument(
        "--glob",
        metavar="PATTERN",
        help="with a parent directory: which entries, e.g. 'step_*.pt', 'step-*' (DCP folders), 'checkpoint-*' "
        f"(HF folders) or '**/model.safetensors' (default: all {', '.join('*' + s for s in CHECKPOINT_SUFFIXES)} "
        "files and checkpoint folders)",
    )
    p.add_argument(
        "--schedule",
        help=f"decay shape, one of {', '.join([*schedules.SHAPES, *schedules.ALIASES])} (default linear = uniform mean); "
        "merge weights from Theorem 3.1 with k = number of checkpoints - 1",
    )
    p.add_argument(
        "--weights",
        metavar="C0,C1,...",
        help="explicit merge weights c_j, one per checkpoint oldest first, >= 0, "
        f"summing to 1 (within {WEIGHT_SUM_ATOL:g}) unless --normalize",
    )
    p.add_argument("--normalize", action="store_true", help="rescale --weights to sum to 1")
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT",
        help="output: FILE.safetensors (one file, streamed), FILE.pt/.pth/.bin (torch.save), or a new DIR "
        "(sharded safetensors + index; with --out-format dcp a DCP directory; for Megatron inputs a run folder that "
        "gets iter_XXXXXXX/ and the tracker, see --iteration)",
    )
    p.add_argument(
        "--out-format", choices=list(OUT_FORMATS),
        help="output format (default: from -o: .safetensors, .pt/.pth/.bin, no suffix = sharded, or megatron for "
        "Megatron inputs)",
    )
    p.add_argument(
        "--max-shard-size", default="5GB", metavar="SIZE",
        help="largest shard of a sharded output, e.g. 5GB, 500MB, 2GiB (default 5GB)",
    )
    p.add_argument(
        "--key",
        metavar="KEY",
        help="take the state dict under this key of each checkpoint, e.g. model or state.model "
        "(safetensors, HF folders and DCP: the tensors named KEY.*, prefix stripped)",
    )
    p.add_argument(
        "--optimizer-state", action="store_true",
        help="also merge the optimizer state of DCP and Megatron checkpoints (skipped by default)",
    )
    p.add_argument(
        "--iteration", type=int, metavar="N",
        help="with a Megatron output: the merged checkpoint's iteration (its iter_XXXXXXX folder, the tracker and "
        "the common state's iteration); default: the newest input's",
    )
    p.add_argument("--workers", type=int, default=1, metavar="N", help="merge in N processes (same result; default 1)")
    p.add_argument(
        "--block-size", default="16MiB", metavar="SIZE",
        help="accumulator memory per batch of tensors; larger tensors are merged in row blocks (default 16MiB)",
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="output dtype of the averaged tensors (default: input dtype); accumulation is float32",
    )
    p.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="allow loading .pt files that torch.load(weights_only=True) refuses (and DCP .metadata with "
        "unknown objects). DANGER: unpickling runs any code stored in the file; use only for files you trust",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but warnings and errors")


def run(args: argparse.Namespace) -> int:
    weights = _parse_weights(args.weights) if args.weights is not None else None

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"wsm-optim merge: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        merge_checkpoints(
            args.inputs,
            schedule=args.schedule,
            weights=weights,
            normalize=args.normalize,
            out=args.output,
            key=args.key,
            dtype=args.dtype,
            unsafe_pickle=args.unsafe_pickle,
            progress=not (args.no_progress or args.quiet),
            glob=args.glob,
            verbose=not args.quiet,
            out_format=args.out_format,
            max_shard_size=args.max_shard_size,
            workers=args.workers,
            optimizer_state=args.optimizer_state,
            block_size=args.block_size,
            iteration=args.iteration,
        )
    return 0
