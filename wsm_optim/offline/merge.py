"""Offline WSM merge of saved checkpoints (``wsm-optim merge``): inputs, weights and the merge.

The same Theorem 3.1 weights as :class:`~wsm_optim.WSMOptimizer`, applied to a
list of existing checkpoints ``theta_0 .. theta_k`` (oldest first,
``k = n - 1``): ``merged = sum_j c_j * theta_j``.

Inputs (:func:`resolve_inputs`): safetensors or ``torch.save`` files, Hugging
Face ``save_pretrained`` folders (sharded or not),
``torch.distributed.checkpoint`` directories and Megatron ``torch_dist``
iteration folders, in any mix, given oldest first or as one parent folder
(a Megatron run folder, say) sorted by step number (:mod:`wsm_optim.offline.readers`,
:mod:`wsm_optim.offline.megatron`).

Memory: the merge streams block by block (:mod:`wsm_optim.offline.streaming`):
each block of rows of each tensor is read from every input in turn, piece by
piece into one reused buffer, and added into a float32 accumulator (float64
for float64 inputs), then written out (:mod:`wsm_optim.offline.writers`)
while the next batch is merged, so the peak is about two ``block_size``
batches of accumulators plus a 1 MiB buffer, whatever the model size and the
number of inputs. Non-float tensors (integer buffers, step counters, masks) are copied
from the newest checkpoint, never averaged.

Every input's names, shapes and dtypes are checked before anything is read;
NaN/inf refuse the merge. Outputs appear complete or not at all (temporary
file or directory, then rename) and inputs are never modified.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import schedules
from ..common.atomic import TORCH_SUFFIXES, write_target
from . import writers
from .files import UnsafePickleWarning
from .megatron import TRACKER, MegatronCheckpoint, is_iteration_folder, is_partial_iteration, is_run_folder, row_cuts
from .readers import checkpoint_kind, common_layout, open_reader
from .streaming import averaged, merged_blocks, plan_batches, plan_blocks

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

#: Suffixes a directory input picks up when no glob is given.
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
#: Output formats: one safetensors file, one torch.save file, a sharded safetensors folder, a DCP directory,
#: a Megatron iteration folder (in a run folder).
OUT_FORMATS = tuple(writers.OUTPUTS)
#: Explicit weights (without ``normalize``) must sum to 1 within this absolute tolerance.
WEIGHT_SUM_ATOL = 1e-6

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}

_INT_RE = re.compile(r"\d+")


# ---------------------------------------------------------------- inputs
def step_number(name: str | os.PathLike) -> int | None:
    """The step number of a checkpoint path: the LAST integer in it, extension removed.

    ``"step_100.pt"`` -> 100, ``"run3/ckpt-0200.safetensors"`` -> 200,
    ``"iter_10/model.bin"`` -> 10, ``"final.pt"`` -> ``None``. Digits are read
    as a number, so 2 < 10 < 100 (not the text order "10" < "100" < "2").
    """
    p = Path(name)
    text = str(p.with_suffix("")) if p.suffix else str(p)
    found = _INT_RE.findall(text)
    return int(found[-1]) if found else None


def _sort_by_step(files: list[Path], root: Path) -> list[Path]:
    steps: dict[int, Path] = {}
    for f in sorted(files):
        rel = f.relative_to(root)
        step = step_number(rel)
        if step is None:
            raise ValueError(
                f"cannot order {str(rel)!r} by step number: its name has no integer "
                "(the step number is the last integer in the path below the directory, extension removed); "
                "narrow --glob or list the files explicitly, oldest first"
            )
        if step in steps:
            raise ValueError(
                f"ambiguous order: {str(steps[step].relative_to(root))!r} and {str(rel)!r} both have "
                f"step number {step} (the last integer in the name); narrow --glob or list the files "
                "explicitly, oldest first"
            )
        steps[step] = f
    return [steps[s] for s in sorted(steps)]


def resolve_inputs(
    paths: str | os.PathLike | Sequence[str | os.PathLike], glob: str | None = None
) -> list[Path]:
    """Checkpoints, oldest first: files, Hugging Face folders or DCP directories.

    ``paths`` is either checkpoints in merge order (oldest first), or ONE parent
    directory: its entries matching ``glob`` (default: every ``*.safetensors``,
    ``*.pt``, ``*.pth``, ``*.bin`` file and every sub-folder that is a
    checkpoint, e.g. torchtitan's ``step-1000/`` or HF's ``checkpoint-1000/``;
    ``**`` recurses) sorted by :func:`step_number`. A single folder that is itself
    a checkpoint (it holds ``.metadata``, ``*.safetensors.index.json`` or
    ``model.safetensors``) is one input unless ``glob`` is given. A Megatron run
    folder gives its ``iter_*`` folders; among Megatron inputs, an ``iter_*``
    folder without ``metadata.json`` (still being written, or cut short) is left
    out with a warning.
    Raises ``ValueError`` for an empty list, a name without a step number,
    two entries with the same step number or one checkpoint given twice (the
    same path, or a link to it), ``FileNotFoundError`` for a missing path.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no checkpoints given: pass checkpoints (oldest first) or one directory")
    parents = [p for p in paths if p.is_dir() and (glob is not None or checkpoint_kind(p) is None)]
    if parents:
        if len(paths) != 1:
            raise ValueError(
                f"pass either checkpoints or a single parent directory, not both / several: got {str(parents[0])!r}, "
                f"which is not a checkpoint folder, among {len(paths)} paths"
            )
        root = paths[0]
        if glob is None:
            found = [
                f for f in root.iterdir()
                if not _hidden(f, root)
                and ((f.is_file() and f.suffix.lower() in CHECKPOINT_SUFFIXES) or (f.is_dir() and checkpoint_kind(f)))
            ]
            what = (f"no checkpoint files ({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}) or checkpoint "
                    f"folders in {str(root)!r}")
        else:
            matched = [f for f in root.glob(glob) if not _hidden(f, root)]
            found = [f for f in matched if f.is_file() or (f.is_dir() and checkpoint_kind(f))]
            what = f"no files match --glob {glob!r} in {str(root)!r} (nor do any checkpoint folders)"
            left_out = sorted(str(f.relative_to(root)) for f in matched if f.is_dir() and not checkpoint_kind(f))
            if found and left_out:  # e.g. a checkpoint still being written, or saved as pytorch_model.bin
                warnings.warn(
                    f"--glob {glob!r} also matches {len(left_out)} folder{'s' if len(left_out) != 1 else ''} that "
                    f"{'are' if len(left_out) != 1 else 'is'} not a checkpoint (no .metadata, no "
                    f"*.safetensors.index.json, no model.safetensors), left out of the merge: {', '.join(left_out)}",
                    UserWarning,
                    stacklevel=2,
                )
        partial = sorted(f for f in root.iterdir() if is_partial_iteration(f) and not _hidden(f, root)) if any(
            is_iteration_folder(f) for f in found) else []
        found = [f for f in found if f not in partial]
        _warn_partial(partial)
        if not found:
            raise ValueError(f"empty checkpoint list: {what}")
        return _refuse_repeats(_sort_by_step(found, root))
    if glob is not None:
        raise ValueError("--glob needs a single directory argument (the files to match live in it)")
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    if any(is_iteration_folder(p) for p in paths):
        partial = [p for p in paths if is_partial_iteration(p)]
        _warn_partial(partial)
        paths = [p for p in paths if p not in partial]
    steps = [step_number(p.name) for p in paths]
    if len(paths) > 1 and None not in steps and len(set(steps)) == len(steps) and steps != sorted(steps):
        warnings.warn(
            f"the files are merged in the order given (oldest first), but the step numbers in their "
            f"names are not increasing: {steps}. A shell glob sorts names as text (10 < 100 < 2); "
            "pass the directory with --glob to sort by step number",
            UserWarning,
            stacklevel=2,
        )
    return _refuse_repeats(paths)


def _hidden(path: Path, root: Path) -> bool:
    """A name below ``root`` starting with a dot: never a checkpoint (crash-safe writes keep their
    temporary files and folders there, ``.NAME.wsmtmp-...tmp``, until they are renamed)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _warn_partial(partial: Sequence[Path]) -> None:
    if partial:
        names = ", ".join(str(p) for p in partial)
        warnings.warn(
            f"{len(partial)} Megatron iteration folder{'s' if len(partial) != 1 else ''} without metadata.json "
            f"(still being written, or cut short) left out of the merge: {names}",
            UserWarning,
            stacklevel=3,
        )


def _refuse_repeats(paths: list[Path]) -> list[Path]:
    """``paths``, unless two of them are one checkpoint (the same path, or a link to it): it would count twice."""
    seen: dict[str, Path] = {}
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            first = seen[real]
            same = "the same path" if str(first) == str(p) else f"both are {real!r}"
            raise ValueError(
                f"checkpoint {str(p)!r} is given twice ({str(first)!r} and {str(p)!r}: {same}); each checkpoint "
                "must appear once (to weight one more heavily, use --weights / weights=)"
            )
        seen[real] = p
    return paths


# --------------------------------------------------------------- weights
def checkpoint_weights(
    n: int,
    schedule: schedules.Schedule | None = None,
    weights: Sequence[float] | None = None,
    normalize: bool = False,
) -> np.ndarray:
    """Merge weights ``c_0..c_{n-1}`` (float64, shape ``(n,)``, oldest first) for ``n`` checkpoints.

    From ``schedule`` via Theorem 3.1 with ``k = n - 1`` (one checkpoint:
    ``c = [1]``), or explicit ``weights``: finite, non-negative, ``n`` of them,
    summing to 1 within ``WEIGHT_SUM_ATOL`` unless ``normalize`` rescales them.
    """
    if n < 1:
        raise ValueError("empty checkpoint list: nothing to merge")
    if weights is None:
        if normalize:
            raise ValueError("--normalize applies to explicit --weights only (schedule weights sum to 1)")
        schedule = "linear" if schedule is None else schedule
        if n == 1:
            schedules.parse(schedule)  # still reject an unknown name
            return np.ones(1)
        return schedules.merge_coefficients(schedule, n - 1)
    if schedule is not None:
        raise ValueError("pass either a schedule or explicit weights, not both")
    c = np.asarray(weights, dtype=np.float64)
    if c.ndim != 1 or c.size != n:
        raise ValueError(
            f"--weights: got {c.size} values for {n} checkpoints; give one weight c_j per checkpoint, oldest first"
        )
    schedules.check_nonnegative(c, "--weights")
    with np.errstate(over="ignore"):  # an overflow is reported below, as an error
        total = float(c.sum())
    if not math.isfinite(total):  # e.g. 1e308 + 1e308: c / inf would silently merge to all zeros
        raise ValueError(
            f"--weights: the sum of the weights overflows float64 ({total!r}); "
            "give smaller weights (they only matter relative to each other with --normalize)"
        )
    if normalize:
        if total <= 0.0:
            raise ValueError("--weights: all weights are zero; cannot --normalize")
        return c / total
    if abs(total - 1.0) > WEIGHT_SUM_ATOL:
        raise ValueError(
            f"--weights: sum to {total:.10g}, expected 1 (absolute tolerance {WEIGHT_SUM_ATOL:g}); "
            "pass --normalize to rescale them"
        )
    return c


def format_table(paths: Sequence[Path], c: np.ndarray, label: str) -> str:
    """The weights table printed before merging: ``c_j`` and the implied decay ``w_j``."""
    n = len(paths)
    w = np.cumsum(c[::-1])[::-1]  # w_j = sum_{i >= j} c_i, w_0 = 1 (Theorem 3.1)
    lines = [
        f"merge of {n} checkpoint{'s' if n != 1 else ''} (oldest first), weights: {label}",
        f"{'j':>4}  {'step':>9}  {'c_j (merge)':>12}  {'w_j (decay)':>12}  file",
    ]
    for j, p in enumerate(paths):
        step = step_number(p.name)
        lines.append(f"{j:>4}  {'-' if step is None else step:>9}  {c[j]:>12.6f}  {w[j]:>12.6f}  {p}")
    lines.append(f"{'sum':>4}  {'':>9}  {c.sum():>12.6f}")
    return "\n".join(lines)


# ----------------------------------------------------------------- merge
def merge_checkpoints(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    schedule: schedules.Schedule | None = None,
    weights: Sequence[float] | None = None,
    normalize: bool = False,
    out: str | os.PathLike | None = None,
    key: str | None = None,
    dtype: torch.dtype | str | None = None,
    unsafe_pickle: bool = False,
    progress: bool = True,
    *,
    glob: str | None = None,
    verbose: bool | None = None,
    out_format: str | None = None,
    max_shard_size: str | int = "5GB",
    workers: int = 1,
    optimizer_state: bool = False,
    block_size: str | int = "16MiB",
    iteration: int | None = None,
) -> dict[str, Tensor] | Path:
    """Merge checkpoints with WSM weights: ``sum_j c_j * theta_j``, streaming block by block.

    Args:
        paths: checkpoints oldest first (safetensors / ``torch.save`` files, HF
            ``save_pretrained`` folders, DCP directories, Megatron ``iter_*``
            folders), or one parent folder (a Megatron run folder, say) whose
            entries (matching ``glob``) are sorted by step number; see :func:`resolve_inputs`.
        schedule: decay shape (a name of :data:`wsm_optim.schedules.SHAPES` or its
            ``ALIASES``, a callable ``f(t)`` or explicit ``w_1..w_k``); weights
            from Theorem 3.1 with ``k = n - 1``.
            Default ``"linear"`` (uniform mean). Exclusive with ``weights``.
        weights: explicit merge weights ``c_0..c_{n-1}``, oldest first, ``>= 0``.
        normalize: rescale ``weights`` to sum to 1 (otherwise they must, within 1e-6).
        out: output path, written crash-safely, never one of the inputs;
            ``None``: return the dict. Its format is ``out_format``, else
            inferred: ``.safetensors`` -> one safetensors file (streamed),
            ``.pt``/``.pth``/``.bin`` -> ``torch.save`` file, no suffix -> a
            sharded safetensors folder (``model.safetensors.index.json``), or
            for Megatron inputs a Megatron run folder (new or existing, holding
            no input) that gets the ``iter_XXXXXXX`` folder and the tracker.
        key: pick a sub-tree of each checkpoint, e.g. ``"model"``; in a
            ``torch.save`` file dotted paths walk nested dicts (``"state.model"``);
            in flat formats (safetensors, HF folders, DCP) it selects the tensors
            named ``key.*`` (prefix stripped).
        dtype: output dtype of the averaged (floating) tensors; default: each
            tensor's input dtype. Accumulation is float32 (float64 for float64 inputs).
        unsafe_pickle: allow ``torch.load(weights_only=False)`` for files safe
            loading refuses (and unrestricted unpickling of DCP ``.metadata``).
            This executes code stored in the file.
        progress: show progress over the tensors on stderr: a bar on a terminal,
            a plain line with elapsed time and ETA every 30 s (and at the end)
            in a log (:class:`wsm_optim.common.progress.Progress`).
        glob: pattern for a parent-folder input.
        verbose: print the weights table, the list of non-float tensors copied
            from the newest checkpoint, skipped entries and the output path (stdout).
            Defaults to ``progress``.
        out_format: one of :data:`OUT_FORMATS` (``"dcp"`` writes a
            ``torch.distributed.checkpoint`` directory, ``"megatron"`` a Megatron
            iteration folder); ``None`` infers it from ``out``.
        max_shard_size: largest shard of a sharded output, e.g. ``"5GB"``, ``"512MiB"``, or bytes.
        workers: processes that merge blocks in parallel (the result is bitwise the
            serial one). They are spawned, so they import the calling script: call
            from under ``if __name__ == "__main__":`` (the ``wsm-optim`` command does).
        optimizer_state: also merge a DCP checkpoint's optimizer state (skipped by default).
        block_size: accumulator memory per batch of blocks (``"16MiB"``); a
            tensor larger than that is merged in row blocks.
        iteration: a Megatron output's iteration (its ``iter_XXXXXXX`` folder,
            the tracker and the common state's ``iteration``); default: the newest input's.

    Returns:
        ``{name: tensor}`` when ``out`` is None (float tensors in the output
        dtype, non-float ones from the newest checkpoint), else the output ``Path``.

    Raises:
        ValueError: empty list, bad weights or arguments, missing key (names key
            and input), shape/dtype mismatch (key, shapes, input), NaN/inf (input
            and key), output equal to an input or a non-empty existing folder, refused pickle.
        FileNotFoundError: a missing input or output directory.
    """
    verbose = progress if verbose is None else verbose
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be a positive integer, got {workers!r}")
    files = resolve_inputs(paths, glob)
    c = checkpoint_weights(len(files), schedule, weights, normalize)
    out_dtype = _parse_dtype(dtype)
    fmt = _output_format(out, out_format, files[-1])
    _check_megatron_arguments(fmt, iteration, key)
    shard_bytes = writers.parse_size(max_shard_size)
    block_bytes = writers.parse_size(block_size, "--block-size")
    out_path = _check_output(out, files, fmt) if out is not None else None
    label = "explicit c_j" + (" (normalized)" if normalize else "") if weights is not None else (
        f"schedule {schedules.schedule_name('linear' if schedule is None else schedule)!r}, Theorem 3.1 with k = {len(files) - 1}"
    )
    if verbose:
        print(format_table(files, c, label), flush=True)

    unsafe = set() if unsafe_pickle else None  # inputs already warned about
    readers = [open_reader(p, key, unsafe_pickle=unsafe, optimizer_state=optimizer_state) for p in files]
    layout = common_layout(readers, files, key)
    copied = [n for n, (_, dt) in layout.items() if not averaged(dt)]
    skipped = readers[-1].skipped
    if verbose and copied:
        print(
            f"{len(copied)} non-float tensor{'s' if len(copied) != 1 else ''} taken from the newest "
            f"checkpoint ({files[-1].name}), not averaged: {', '.join(copied)}",
            flush=True,
        )
    if verbose and skipped:
        print(_skipped_line(files[-1].name, skipped), flush=True)

    def target(dt: torch.dtype) -> torch.dtype:
        return dt if (out_dtype is None or not averaged(dt) or dt.is_complex) else out_dtype

    plan = [(n, shape, dt, target(dt)) for n, (shape, dt) in layout.items()]
    cuts = row_cuts(readers[-1]) if fmt == "megatron" and isinstance(readers[-1], MegatronCheckpoint) else None
    blocks = plan_blocks(plan, readers, block_bytes, cuts)
    stream = merged_blocks(readers, plan_batches(blocks, block_bytes), c, workers=workers, progress=progress,
                           reader_args=(files, key, unsafe_pickle, optimizer_state))
    provenance = {"weights": label, "c": [float(x) for x in c], "files": [p.name for p in files],
                  "non_float_from_newest": copied}
    metadata = {"format": "pt", "wsm_merge": json.dumps(provenance)}
    out_layout = [(n, shape, od) for n, shape, _, od in plan]
    if out_path is None:
        return writers.MemoryOutput(out_layout).write(stream)
    target = writers.OutputTarget(out_path, out_layout, metadata, provenance, shard_bytes,
                                  [(b.name, b.start, b.stop) for b in blocks], files[-1], iteration, unsafe_pickle)
    output = writers.open_output(fmt, target)  # before the merge: a refused output costs no reading
    written = output.write(stream)
    if verbose:
        print(f"wrote {written} ({fmt}, {len(out_layout)} tensors)", flush=True)
    return out_path


def _skipped_line(source: str, skipped: dict[str, str]) -> str:
    """One line on the entries not merged: optimizer state by prefix, the others by reason and name (20 at most)."""
    optimizer = [n for n, why in skipped.items() if why == "optimizer state"]
    parts = []
    if optimizer:
        roots = sorted({n.split(".")[0] for n in optimizer})
        parts.append(f"{len(optimizer)} optimizer-state entries under {', '.join(roots)} (merge them with "
                     "--optimizer-state)")
    reasons: dict[str, list[str]] = {}
    for n, why in skipped.items():
        if why != "optimizer state":
            reasons.setdefault(why, []).append(n)
    for why, names in reasons.items():
        shown = ", ".join(names[:20]) + (f" ... ({len(names) - 20} more)" if len(names) > 20 else "")
        if why == "not a tensor":
            parts.append(f"{len(names)} non-tensor object{'s' if len(names) != 1 else ''} ({shown})")
            continue
        what, _, note = why.partition(": ")  # e.g. "extra state: carried from the newest input"
        parts.append(f"{len(names)} {what} entr{'ies' if len(names) != 1 else 'y'} ({note + ': ' if note else ''}{shown})")
    return f"not merged, from {source}: " + "; ".join(parts)


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"--dtype must be a floating dtype, got {dtype}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"--dtype: unknown {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_megatron_arguments(fmt: str | None, iteration: int | None, key: str | None) -> None:
    if iteration is not None:
        if fmt != "megatron":
            raise ValueError(f"--iteration sets a Megatron output's iteration; the output format is {fmt!r}")
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"--iteration must be a non-negative integer, got {iteration!r}")
    if fmt == "megatron" and key is not None:
        raise ValueError("--key cannot be used with a Megatron output: it keeps every key of the newest input "
                         "(Megatron loads the whole checkpoint)")


def _output_format(out: str | os.PathLike | None, out_format: str | None, newest: Path | None = None) -> str | None:
    if out_format is not None and out_format not in OUT_FORMATS:
        raise ValueError(f"--out-format: unknown {out_format!r}; choose one of {', '.join(OUT_FORMATS)}")
    if out is None:
        if out_format is not None:
            raise ValueError("--out-format needs an output path (-o / out=)")
        return None
    if out_format is not None:
        return out_format
    suffix = Path(out).suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix == "" or Path(out).is_dir():
        return "megatron" if newest is not None and is_iteration_folder(newest) else "sharded"
    raise ValueError(
        f"output {str(out)!r}: cannot tell the format from the suffix {suffix!r}; use .safetensors or "
        f".pt/.pth/.bin for one file, a name without a suffix for a sharded folder, or pass --out-format "
        f"({', '.join(OUT_FORMATS)})"
    )


def _check_output(out: str | os.PathLike, files: Sequence[Path], fmt: str | None) -> Path:
    out_path = Path(out)
    resolved = out_path.resolve()
    for f in files:
        if f.resolve() == resolved or (out_path.exists() and os.path.samefile(f, out_path)):
            raise ValueError(f"output {str(out_path)!r} is one of the input checkpoints ({f}); choose another path")
        if f.is_dir() and resolved.is_relative_to(f.resolve()):
            raise ValueError(f"output {str(out_path)!r} is inside the input checkpoint {f}; choose another path")
    if fmt == "megatron":
        for f in files:
            if f.resolve().parent == resolved:
                raise ValueError(f"output {str(out_path)!r} is the run folder of the input {f}; write the merge to "
                                 "another run folder (its tracker would make training resume from the merge)")
        if out_path.exists() and (not out_path.is_dir() or (any(out_path.iterdir()) and not is_run_folder(out_path))):
            raise ValueError(f"output {str(out_path)!r} exists and is not a Megatron run folder (no {TRACKER}, no "
                             "iter_* folders); a Megatron output goes into a new or empty folder, or a run folder")
        if not resolved.parent.is_dir():
            raise FileNotFoundError(f"output directory {str(out_path.parent)!r} does not exist")
        return out_path
    if fmt in ("sharded", "dcp"):
        if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
            raise ValueError(
                f"output {str(out_path)!r} exists and is not an empty directory; a {fmt} output is a new folder "
                "(written to a temporary folder, then renamed): remove it or choose a new path"
            )
        if not resolved.parent.is_dir():
            raise FileNotFoundError(f"output directory {str(out_path.parent)!r} does not exist")
        return out_path
    if out_path.is_dir():
        raise ValueError(f"output {str(out_path)!r} is a directory; give a file name or --out-format sharded/dcp")
    write_target(out_path)  # names the path that is wrong (a dangling symlink, a missing directory)
    return out_path
