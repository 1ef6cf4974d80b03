"""Offline WSM merge of saved checkpoint files (``wsm-optim merge``).

The same Theorem 3.1 weights as :class:`~wsm_optim.WSMOptimizer`, applied to a
list of existing checkpoints ``theta_0 .. theta_k`` (oldest first,
``k = n - 1``): ``merged = sum_j c_j * theta_j``.

Memory: files are streamed one at a time into one accumulator per floating
tensor (float32; float64 for float64 inputs), so the peak is one accumulator
plus one loaded checkpoint whatever the number of files. Non-float tensors
(integer buffers, step counters, masks) are copied from the newest checkpoint,
never averaged.

Every input is checked before anything is written: same keys, shapes and
dtypes in every file, no NaN/inf in any floating tensor. The output is written
with :func:`wsm_optim.io.atomic_save` (never half-written).
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

from . import schedules
from .io import UnsafePickleWarning, atomic_save, infer_format, open_checkpoint, write_target
from .precision import accumulator_dtype
from .progress import Progress

__all__ = [
    "merge_checkpoints",
    "resolve_inputs",
    "step_number",
    "checkpoint_weights",
    "format_table",
    "UnsafePickleWarning",
    "CHECKPOINT_SUFFIXES",
    "WEIGHT_SUM_ATOL",
]

#: Suffixes a directory input picks up when no glob is given.
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
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
    """Checkpoint files, oldest first.

    ``paths`` is either files in merge order (oldest first), or ONE directory:
    its files matching ``glob`` (default: every ``*.safetensors``, ``*.pt``,
    ``*.pth``, ``*.bin``; ``**`` recurses) sorted by :func:`step_number`.
    Raises ``ValueError`` for an empty list, a name without a step number or
    two files with the same step number, ``FileNotFoundError`` for a missing path.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no checkpoints given: pass files (oldest first) or one directory")
    dirs = [p for p in paths if p.is_dir()]
    if dirs:
        if len(paths) != 1:
            raise ValueError(
                f"pass either checkpoint files or a single directory, not both / several: got {len(dirs)} "
                f"director{'y' if len(dirs) == 1 else 'ies'} among {len(paths)} paths"
            )
        root = paths[0]
        if glob is None:
            files = [f for f in root.iterdir() if f.is_file() and f.suffix.lower() in CHECKPOINT_SUFFIXES]
            what = f"no checkpoint files ({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}) in {str(root)!r}"
        else:
            files = [f for f in root.glob(glob) if f.is_file()]
            what = f"no files match --glob {glob!r} in {str(root)!r}"
        if not files:
            raise ValueError(f"empty checkpoint list: {what}")
        return _sort_by_step(files, root)
    if glob is not None:
        raise ValueError("--glob needs a single directory argument (the files to match live in it)")
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    steps = [step_number(p.name) for p in paths]
    if len(paths) > 1 and None not in steps and len(set(steps)) == len(steps) and steps != sorted(steps):
        warnings.warn(
            f"the files are merged in the order given (oldest first), but the step numbers in their "
            f"names are not increasing: {steps}. A shell glob sorts names as text (10 < 100 < 2); "
            "pass the directory with --glob to sort by step number",
            UserWarning,
            stacklevel=2,
        )
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
            schedules.resolve(schedule)  # still reject an unknown name
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
def _averaged(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _signature(paths: Sequence[Path], key: str | None, unsafe_pickle: set[Path] | None) -> dict[str, tuple]:
    """Names, shapes and dtypes of the first file, checked against every other file (cheap pass)."""
    ref: dict[str, tuple] | None = None
    for path in paths:
        with open_checkpoint(path, key, unsafe_pickle) as r:
            sig = {n: r.meta(n) for n in r.names}
        if ref is None:
            if not sig:
                raise ValueError(f"{path} holds no tensors" + (f" under --key {key!r}" if key else ""))
            ref = sig
            continue
        missing = [n for n in ref if n not in sig]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"key {missing[0]!r}{more} is missing from {path} (present in {paths[0]})")
        extra = [n for n in sig if n not in ref]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise ValueError(f"key {extra[0]!r}{more} in {path} is missing from {paths[0]}")
        for n, (shape, dtype) in ref.items():
            shape_j, dtype_j = sig[n]
            if shape_j != shape:
                raise ValueError(
                    f"shape mismatch for key {n!r}: {list(shape_j)} in {path}, {list(shape)} in {paths[0]}"
                )
            if dtype_j != dtype:
                raise ValueError(
                    f"dtype mismatch for key {n!r}: {dtype_j} in {path}, {dtype} in {paths[0]} "
                    f"(shape {list(shape)})"
                )
    assert ref is not None
    return ref


def _check_finite(t: Tensor, name: str, path: Path) -> None:
    """Refuse NaN/inf. Fast path: one min/max reduction (NaN and +-inf show up in it,
    about 9x faster than ``isfinite().all()``); exact counts only for the error message."""
    if t.numel() == 0:
        return
    values = torch.view_as_real(t) if t.is_complex() else t
    try:
        lo, hi = torch.aminmax(values)
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            return
    except (RuntimeError, NotImplementedError):  # a dtype without aminmax (e.g. float8)
        values = values.float()
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(values).sum())
        n_bad = int(finite.numel() - finite.sum())
        raise ValueError(
            f"{path}: tensor {name!r} has {n_nan} NaN and {n_bad - n_nan} inf values; refusing to merge"
        )


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
) -> dict[str, Tensor] | Path:
    """Merge checkpoint files with WSM weights: ``sum_j c_j * theta_j``, streaming one file at a time.

    Args:
        paths: checkpoint files oldest first, or one directory whose files
            (matching ``glob``) are sorted by step number; see :func:`resolve_inputs`.
            safetensors files (``.safetensors``) or ``torch.save`` state dicts (any other suffix).
        schedule: decay shape (``"linear"``/``"mean"``, ``"cosine"``,
            ``"1-sqrt"``, ``"inv-sqrt"``, ``"ema"``, a callable ``f(t)`` or
            explicit ``w_1..w_k``); weights from Theorem 3.1 with ``k = n - 1``.
            Default ``"linear"`` (uniform mean). Exclusive with ``weights``.
        weights: explicit merge weights ``c_0..c_{n-1}``, oldest first, ``>= 0``.
        normalize: rescale ``weights`` to sum to 1 (otherwise they must, within 1e-6).
        out: output file (``.safetensors`` or ``.pt``/``.pth``/``.bin``), written
            atomically; must not be one of the inputs. ``None``: return the dict.
        key: pick a sub-dict of each checkpoint, e.g. ``"model"``; dotted paths
            walk nested dicts (``"state.model"``). In a safetensors file it
            selects the tensors named ``key.*`` (prefix stripped).
        dtype: output dtype of the averaged (floating) tensors; default: each
            tensor's input dtype. Accumulation is float32 (float64 for float64 inputs).
        unsafe_pickle: allow ``torch.load(weights_only=False)`` for files safe
            loading refuses. This executes code stored in the file.
        progress: show progress over the files on stderr: a bar on a terminal,
            a plain line with elapsed time and ETA every 30 s (and at the end)
            in a log (:class:`wsm_optim.progress.Progress`).
        glob: pattern for a directory input.
        verbose: print the weights table, the list of non-float tensors copied
            from the newest checkpoint and the output path (stdout). Defaults to ``progress``.

    Returns:
        ``{name: tensor}`` when ``out`` is None (float tensors in the output
        dtype, non-float ones from the newest checkpoint), else the output ``Path``.

    Raises:
        ValueError: empty list, bad weights, missing key (names key and file),
            shape/dtype mismatch (key, shapes, file), NaN/inf (file and key),
            output equal to an input, refused pickle.
        FileNotFoundError: a missing input or output directory.
    """
    verbose = progress if verbose is None else verbose
    files = resolve_inputs(paths, glob)
    c = checkpoint_weights(len(files), schedule, weights, normalize)
    out_dtype = _parse_dtype(dtype)
    out_path = _check_output(out, files) if out is not None else None
    label = "explicit c_j" + (" (normalized)" if normalize else "") if weights is not None else (
        f"schedule {schedules.schedule_name('linear' if schedule is None else schedule)!r}, Theorem 3.1 with k = {len(files) - 1}"
    )
    if verbose:
        print(format_table(files, c, label), flush=True)

    unsafe = set() if unsafe_pickle else None  # files already warned about
    signature = _signature(files, key, unsafe)
    copied = [n for n, (_, dt) in signature.items() if not _averaged(dt)]
    if verbose and copied:
        print(
            f"{len(copied)} non-float tensor{'s' if len(copied) != 1 else ''} taken from the newest "
            f"checkpoint ({files[-1].name}), not averaged: {', '.join(copied)}",
            flush=True,
        )

    acc: dict[str, Tensor] = {}
    kept: dict[str, Tensor] = {}
    newest = len(files) - 1
    bar = Progress(len(files), "merging", unit="file", enabled=progress)
    with torch.no_grad(), bar:
        for j, path in enumerate(files):
            coef = float(c[j])
            with open_checkpoint(path, key, unsafe) as reader:
                for name, (shape, dt) in signature.items():
                    t = reader.tensor(name)
                    if not _averaged(dt):
                        if j == newest:
                            kept[name] = t.clone()
                        continue
                    _check_finite(t, name, path)
                    a = acc.get(name)
                    if a is None:
                        a = acc[name] = torch.zeros(shape, dtype=accumulator_dtype(dt))
                    a.add_(t.to(a.dtype), alpha=coef)
                    del t
            bar.update()

    merged: dict[str, Tensor] = {}
    for name, (_, dt) in signature.items():
        if name in kept:
            merged[name] = kept.pop(name)
            continue
        a = acc.pop(name)  # pop: free each fp32 buffer as soon as it is converted
        target = dt if (out_dtype is None or dt.is_complex) else out_dtype
        merged[name] = a if a.dtype == target else a.to(target)
        del a
    if out_path is None:
        return merged
    metadata = {
        "wsm_merge": json.dumps(
            {
                "weights": label,
                "c": [float(x) for x in c],
                "files": [p.name for p in files],
                "non_float_from_newest": copied,
            }
        )
    }
    atomic_save(merged, out_path, metadata=metadata)
    if verbose:
        print(f"wrote {out_path} ({infer_format(out_path)}, {len(merged)} tensors)", flush=True)
    return out_path


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"--dtype must be a floating dtype, got {dtype}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"--dtype: unknown {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_output(out: str | os.PathLike, files: Sequence[Path]) -> Path:
    out_path = Path(out)
    resolved = out_path.resolve()
    for f in files:
        if f.resolve() == resolved or (out_path.exists() and os.path.samefile(f, out_path)):
            raise ValueError(f"output {str(out_path)!r} is one of the input checkpoints ({f}); choose another path")
    if out_path.is_dir():
        raise ValueError(f"output {str(out_path)!r} is a directory; give a file name")
    write_target(out_path)  # names the path that is wrong (a dangling symlink, a missing directory)
    return out_path
