"""The offline merge ``sum_j c_j * theta_j`` computed block by block, serially or in worker processes.

Every output tensor is cut along dim 0 into blocks of at most ``block_bytes``
of accumulator (a tensor saved in DCP row shards is cut only at shard
boundaries common to every input, so no saved chunk is read twice).
Consecutive blocks form batches of at most ``block_bytes``; for each batch,
every input is opened once, its blocks are read, checked for NaN/inf and added
into one accumulator per block (float32; float64/complex128 for such inputs,
:func:`wsm_optim.precision.accumulator_dtype`), then the batch is cast to the
output dtypes and handed on. Peak memory: one batch of accumulators, one block
read, one block cast, whatever the model size and the number of inputs.

With ``workers > 1``, batches run in that many spawned processes (each opens
the inputs itself); results come back in order and each block is computed by
the same code in the same order, so the output is bitwise the serial one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing
from torch import Tensor

from .checkpoint_readers import open_reader
from .precision import accumulator_dtype
from .progress import Progress

__all__ = ["Block", "plan_blocks", "plan_batches", "merge_batch", "merged_blocks", "check_finite", "averaged"]


def averaged(dtype: torch.dtype) -> bool:
    """Float and complex tensors are merged; integer/bool ones are copied from the newest input."""
    return dtype.is_floating_point or dtype.is_complex


@dataclass(frozen=True)
class Block:
    """Rows ``start:stop`` (dim 0; ``0:1`` for a scalar) of tensor ``name``, of global ``shape``."""

    name: str
    start: int
    stop: int
    shape: tuple[int, ...]
    dtype: torch.dtype  # the inputs' dtype
    out_dtype: torch.dtype

    @property
    def last(self) -> bool:
        """Whether this block ends its tensor."""
        return self.stop >= (self.shape[0] if self.shape else 1)

    @property
    def acc_bytes(self) -> int:
        rows = self.stop - self.start
        per_row = int(np.prod(self.shape[1:], dtype=np.int64)) if self.shape else 1
        dt = accumulator_dtype(self.dtype) if averaged(self.dtype) else self.dtype
        return rows * per_row * dt.itemsize


def plan_blocks(layout: Sequence[tuple[str, tuple[int, ...], torch.dtype, torch.dtype]], readers: Sequence[Any],
                block_bytes: int) -> list[Block]:
    """Blocks of every tensor of ``layout`` (``(name, shape, dtype, out_dtype)``), in order."""
    blocks: list[Block] = []
    for name, shape, dtype, out_dtype in layout:
        rows = shape[0] if shape else 1
        if not shape or rows == 0:
            blocks.append(Block(name, 0, rows, shape, dtype, out_dtype))
            continue
        fixed = [set(b) for r in readers if (b := r.row_blocks(name)) is not None]
        row_bytes = Block(name, 0, 1, shape, dtype, out_dtype).acc_bytes
        step = max(1, block_bytes // max(row_bytes, 1))
        if fixed:  # cut only where every DCP input has a saved-chunk boundary, joining pieces up to the budget
            cuts = sorted(set.intersection(*fixed))
            bounds = [0]
            for a, b in zip(cuts, cuts[1:]):
                if b - bounds[-1] > step and a > bounds[-1]:
                    bounds.append(a)
            bounds.append(rows)
        else:
            bounds = [*range(0, rows, step), rows]
        blocks += [Block(name, a, b, shape, dtype, out_dtype) for a, b in zip(bounds, bounds[1:])]
    return blocks


def plan_batches(blocks: Sequence[Block], block_bytes: int) -> list[list[Block]]:
    """Consecutive blocks grouped up to ``block_bytes`` of accumulators (a larger block is a batch alone)."""
    batches: list[list[Block]] = [[]]
    size = 0
    for b in blocks:
        if batches[-1] and size + b.acc_bytes > block_bytes:
            batches.append([])
            size = 0
        batches[-1].append(b)
        size += b.acc_bytes
    return [b for b in batches if b]


def _nonfinite_counts(t: Tensor) -> tuple[int, int] | None:
    """``(NaN count, inf count)`` of ``t``, or ``None`` when every value is finite.

    Fast path: one min/max reduction (NaN and +-inf show up in it, about 9x
    faster than ``isfinite().all()``); exact counts only when something is wrong.
    """
    if t.numel() == 0:
        return None
    values = torch.view_as_real(t) if t.is_complex() else t
    try:
        lo, hi = torch.aminmax(values)
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            return None
    except (RuntimeError, NotImplementedError):  # a dtype without aminmax (e.g. float8)
        values = values.float()
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return None
    n_nan = int(torch.isnan(values).sum())
    return n_nan, int(finite.numel() - finite.sum()) - n_nan


def check_finite(t: Tensor, name: str, path: Path) -> None:
    """Refuse NaN/inf in ``t``, naming the input file and the tensor."""
    counts = _nonfinite_counts(t)
    if counts is not None:
        raise ValueError(f"{path}: tensor {name!r} has {counts[0]} NaN and {counts[1]} inf values; refusing to merge")


def merge_batch(readers: Sequence[Any], batch: Sequence[Block], c: np.ndarray) -> list[Tensor]:
    """The merged blocks of ``batch`` (in the output dtypes): every input opened once, oldest first.

    NaN/inf are looked for once per block, in the accumulator: a non-finite
    input value always leaves one there (``c * NaN``, ``0 * inf`` and ``inf - inf``
    are NaN). Only then are the inputs read again to name the first one at fault.
    """
    acc: list[Tensor | None] = [None] * len(batch)
    newest = len(readers) - 1
    with torch.no_grad():
        for j, reader in enumerate(readers):
            coef = float(c[j])
            with reader.reading() as read:
                for i, b in enumerate(batch):
                    if not averaged(b.dtype):
                        if j == newest:
                            acc[i] = read(b.name, b.start, b.stop).clone()  # the read may view a memory map
                        continue
                    t = read(b.name, b.start, b.stop)
                    if acc[i] is None:  # c_0 * theta_0 is what 0 + c_0 * theta_0 rounds to: no zero fill
                        a = t.to(accumulator_dtype(b.dtype))
                        # scale in place unless ``a`` is the input's own (memory-mapped) tensor
                        acc[i] = a.mul_(coef) if (a is not t or reader.fresh_reads) else torch.mul(t, coef)
                        del a
                    else:
                        acc[i].add_(t.to(acc[i].dtype), alpha=coef)
                    del t
        for i, b in enumerate(batch):
            if averaged(b.dtype) and _nonfinite_counts(acc[i]) is not None:
                _name_the_nonfinite_input(readers, b)
    out = []
    for i, b in enumerate(batch):
        a, acc[i] = acc[i], None  # free each accumulator once cast: the batch is never held twice
        assert a is not None
        target = b.out_dtype if averaged(b.dtype) else b.dtype
        out.append(a if a.dtype == target else a.to(target))
        del a
    return out


def _name_the_nonfinite_input(readers: Sequence[Any], b: Block) -> None:
    """Raise for the oldest input whose rows of ``b`` hold NaN/inf; else for the overflowing sum."""
    for reader in readers:
        with reader.reading() as read:
            check_finite(read(b.name, b.start, b.stop), b.name, reader.path)
    raise ValueError(
        f"tensor {b.name!r}: every input is finite, but the weighted sum overflows its "
        f"{accumulator_dtype(b.dtype)} accumulator; refusing to merge"
    )


# --------------------------------------------------------------- workers
_worker_readers: list[Any] = []
_worker_c: np.ndarray | None = None


def _worker_init(paths: list[Path], key: str | None, unsafe: bool, optimizer_state: bool, c: np.ndarray) -> None:
    global _worker_readers, _worker_c
    torch.set_num_threads(1)  # the parallelism is the processes
    warned = set(paths) if unsafe else None  # the parent process already warned about each file
    _worker_readers = [open_reader(p, key, unsafe_pickle=warned, optimizer_state=optimizer_state) for p in paths]
    _worker_c = c


def _worker_batch(batch: list[Block]) -> list[Tensor]:
    assert _worker_c is not None
    return merge_batch(_worker_readers, batch, _worker_c)


def merged_blocks(readers: Sequence[Any], batches: Sequence[Sequence[Block]], c: np.ndarray, *,
                  workers: int = 1, progress: bool | None = True, reader_args: tuple = ()) -> Iterator[tuple[str, int, int, Tensor]]:
    """``(name, start, stop, merged rows)`` for every block, in order; progress counted in tensors.

    ``reader_args``: ``(paths, key, unsafe_pickle, optimizer_state)`` to reopen the inputs in workers.
    """
    total = sum(b.last for batch in batches for b in batch)
    with Progress(total, "merging", unit="tensor", enabled=progress) as bar:
        for batch, tensors in zip(batches, _results(readers, batches, c, workers, reader_args)):
            for b, t in zip(batch, tensors):
                yield b.name, b.start, b.stop, t
                if b.last:
                    bar.update()


def _results(readers: Sequence[Any], batches: Sequence[Sequence[Block]], c: np.ndarray, workers: int,
             reader_args: tuple) -> Iterator[list[Tensor]]:
    if workers <= 1 or len(batches) <= 1:
        for batch in batches:
            yield merge_batch(readers, batch, c)
        return
    # spawn: fork would copy the parent's OpenMP state into the workers; torch's context sends the merged
    # tensors back through shared memory instead of pickling their bytes through a pipe
    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(batches)), initializer=_worker_init, initargs=(*reader_args, c)) as pool:
        pending: deque = deque()
        todo = iter(batches)
        for batch in todo:  # at most 2 batches per worker in flight: memory stays bounded
            pending.append(pool.apply_async(_worker_batch, (list(batch),)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().get()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.apply_async(_worker_batch, (list(nxt),)))
            yield result
