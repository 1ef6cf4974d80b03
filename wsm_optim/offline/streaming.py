"""The offline merge ``sum_j c_j * theta_j`` computed block by block, serially or in worker processes.

Every output tensor is cut along dim 0 into blocks of at most ``block_bytes``
of accumulator (a tensor whose saved chunks load whole, a DCP fallback, is
cut only at chunk boundaries common to every input, so no saved chunk is read
twice). Consecutive blocks form batches of at most ``block_bytes``; for each
batch, every input is opened once, and its rows are read piece by piece
(about :data:`PIECE_BYTES`) into one reused buffer and added into one
accumulator per block (float32; float64/complex128 for such inputs,
:func:`wsm_optim.common.precision.accumulator_dtype`); each block is checked for
NaN/inf, cast to the output dtype and handed on. The serial merge runs one
batch ahead in a thread, so the output's writes overlap the next batch's reads.
Peak memory: two batches of accumulators, one piece-sized buffer (two for a
dtype cast), one block cast, whatever the model size and the number of inputs.

With ``workers > 1``, batches run in that many spawned processes (each opens
the inputs itself); results come back in order and each block is computed by
the same code in the same order, so the output is bitwise the serial one. A
worker makes its accumulators (and casts) in shared memory: they go to the
parent without a copy, and their pages leave the worker when the parent has
them, instead of being freed into the worker's heap, where glibc may keep them.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing
from torch import Tensor

from ..common.precision import accumulator_dtype
from ..common.progress import Progress
from .readers import open_reader

__all__ = ["Block", "ReadBuffers", "plan_blocks", "plan_batches", "merge_batch", "merged_blocks", "check_finite",
           "averaged", "PIECE_BYTES"]

#: Accumulator bytes per piece of rows read from an input at a time: the piece is read into one reused buffer,
#: still in the CPU cache when it is added, instead of a fresh block-sized tensor (new pages to fault in, then
#: streamed through DRAM). Smaller pieces cost more in per-read Python overhead than they save (measured on
#: 2 EPYC cores: 128 KiB pieces 2x slower than 1-4 MiB, which are alike).
PIECE_BYTES = 1 << 20


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
    piece_rows: int = 0  # rows read from each input at a time; 0: the whole block (its saved chunks load whole)

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
                block_bytes: int, cuts: dict[str, Sequence[int]] | None = None) -> list[Block]:
    """Blocks of every tensor of ``layout`` (``(name, shape, dtype, out_dtype)``), in order.

    ``cuts``: row offsets where the output wants a tensor cut (its own chunks,
    as a Megatron output's): no block crosses one.
    """
    blocks: list[Block] = []
    for name, shape, dtype, out_dtype in layout:
        rows = shape[0] if shape else 1
        if not shape or rows == 0:
            blocks.append(Block(name, 0, rows, shape, dtype, out_dtype))
            continue
        wanted = sorted({0, rows, *(cuts or {}).get(name, ())})
        fixed = [set(b) for r in readers if (b := r.row_blocks(name)) is not None]
        row_bytes = Block(name, 0, 1, shape, dtype, out_dtype).acc_bytes
        step = max(1, block_bytes // max(row_bytes, 1))
        piece = 0 if fixed else max(1, PIECE_BYTES // max(row_bytes, 1))
        if fixed:  # cut only where every DCP input has a saved-chunk boundary, joining pieces up to the budget
            common = sorted(set.intersection(*fixed))
            bounds = [0]
            for a, b in zip(common, common[1:]):
                if a > bounds[-1] and (b - bounds[-1] > step or a in wanted):
                    bounds.append(a)
            bounds = sorted({*bounds, *wanted})
        else:
            bounds = sorted({x for a, b in zip(wanted, wanted[1:]) for x in range(a, b, step)} | {rows})
        blocks += [Block(name, a, b, shape, dtype, out_dtype, piece) for a, b in zip(bounds, bounds[1:])]
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
        if math.isfinite(lo.item()) and math.isfinite(hi.item()):
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


class ReadBuffers:
    """Scratch memory reused by every read of a merge: no allocation (and no fresh pages to fault in) per read."""

    def __init__(self) -> None:
        self._raw = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]

    def _get(self, slot: int, numel: int, dtype: torch.dtype) -> Tensor:
        nbytes = numel * dtype.itemsize
        if self._raw[slot].numel() < nbytes:
            self._raw[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return self._raw[slot][:nbytes].view(dtype)

    def read(self, numel: int, dtype: torch.dtype) -> Tensor:
        """A flat buffer to read ``numel`` values of ``dtype`` into."""
        return self._get(0, numel, dtype)

    def cast(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """``t.to(dtype)`` (flat), in the second buffer."""
        return self._get(1, t.numel(), dtype).copy_(t.reshape(-1))


def merge_batch(readers: Sequence[Any], batch: Sequence[Block], c: np.ndarray,
                buffers: ReadBuffers | None = None, empty: Callable[..., Tensor] = torch.empty) -> list[Tensor]:
    """The merged blocks of ``batch`` (in the output dtypes): every input opened once, oldest first.

    Each input's rows are read piece by piece into one reused buffer and added
    into the block's accumulator: ``c_0 * theta_0`` first (what ``0 + c_0 * theta_0``
    rounds to: no zero fill), then ``+= c_j * theta_j``. NaN/inf are looked for
    once per block, in the accumulator: a non-finite input value always leaves
    one there (``c * NaN``, ``0 * inf`` and ``inf - inf`` are NaN). Only then
    are the inputs read again to name the first one at fault.

    ``empty(shape, dtype=...)`` allocates the accumulators and the casts
    returned (workers: :func:`_shared_empty`).
    """
    buffers = buffers if buffers is not None else ReadBuffers()
    accs = [empty(_rows(b), dtype=accumulator_dtype(b.dtype)) if averaged(b.dtype) else None for b in batch]
    copied: dict[int, Tensor] = {}  # non-float blocks, from the newest input
    newest = len(readers) - 1
    with torch.no_grad():
        for j, reader in enumerate(readers):
            coef = float(c[j])
            with reader.reading() as read:
                for i, (b, acc) in enumerate(zip(batch, accs)):
                    if acc is None:
                        if j == newest:
                            copied[i] = read(b.name, b.start, b.stop).clone()  # the read may view a memory map
                        continue
                    for start, stop, piece in _pieces(b, acc):
                        t = read(b.name, start, stop, buffers.read(piece.numel(), b.dtype)).reshape(-1)
                        if t.dtype != piece.dtype:
                            t = buffers.cast(t, piece.dtype)
                        if j == 0:
                            torch.mul(t, coef, out=piece)
                        else:
                            piece.add_(t, alpha=coef)
                        del t
        for b, acc in zip(batch, accs):
            if acc is not None and _nonfinite_counts(acc) is not None:
                _name_the_nonfinite_input(readers, b)
    out = []
    for i, b in enumerate(batch):
        acc, accs[i] = accs[i], None  # cast one block at a time: the batch is never held twice
        if acc is None:
            out.append(copied.pop(i))
        elif acc.dtype == b.out_dtype:
            out.append(acc)
        else:
            cast = empty(acc.shape, dtype=b.out_dtype).copy_(acc)
            if _nonfinite_counts(cast) is not None:  # the accumulator is finite (checked above): the cast overflowed
                raise ValueError(
                    f"tensor {b.name!r}: the merged value is finite (largest magnitude "
                    f"{float(acc.abs().max()):.4g}) but overflows when cast to {b.out_dtype}; write it with a "
                    "wider dtype (--dtype fp32 / dtype=torch.float32, or no --dtype for the inputs' own)"
                )
            out.append(cast)
        del acc
    return out


def _rows(b: Block) -> tuple[int, ...]:
    return (b.stop - b.start, *b.shape[1:]) if b.shape else ()


def _pieces(b: Block, acc: Tensor) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, stop, flat view of acc)`` for each piece of ``b.piece_rows`` rows (all rows when 0)."""
    flat = acc.view(-1)
    rows = b.stop - b.start  # 1 for a scalar (rows 0:1)
    per_row = flat.numel() // max(rows, 1)
    step = b.piece_rows or max(rows, 1)
    for a in range(0, rows, step):
        z = min(a + step, rows)
        yield b.start + a, b.start + z, flat[a * per_row:z * per_row]


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
_worker_buffers: ReadBuffers | None = None


def _worker_init(paths: list[Path], key: str | None, unsafe: bool, optimizer_state: bool, c: np.ndarray) -> None:
    global _worker_readers, _worker_c, _worker_buffers
    torch.set_num_threads(1)  # the parallelism is the processes
    warned = set(paths) if unsafe else None  # the parent process already warned about each file
    _worker_readers = [open_reader(p, key, unsafe_pickle=warned, optimizer_state=optimizer_state) for p in paths]
    _worker_c = c
    _worker_buffers = ReadBuffers()


def _shared_empty(shape: tuple[int, ...], *, dtype: torch.dtype) -> Tensor:
    """``torch.empty`` in shared memory: the merged blocks go back to the parent without a copy (pickling moves a
    private tensor into shared memory, a second block-sized buffer) and are never freed into this process's heap,
    where glibc kept ~270 MiB of freed block-sized buffers per worker (4 x 270M DCP, 16 MiB blocks)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)


def _worker_batch(batch: list[Block]) -> list[Tensor]:
    assert _worker_c is not None
    return merge_batch(_worker_readers, batch, _worker_c, _worker_buffers, _shared_empty)


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
            del tensors, t  # before the next batch is asked for: three batches would be alive at once


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread while merging, as in the workers: the adds are memory-bound and a piece is too small
    to share (with a second OpenMP thread, 1 MiB pieces took 6-16x the CPU time on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _merged_one_ahead(readers: Sequence[Any], batches: Sequence[Sequence[Block]], c: np.ndarray) -> Iterator[list[Tensor]]:
    """The batches merged in a background thread, one ahead of the caller: the output's writes of batch k
    overlap the reads and adds of batch k + 1 (all three release the GIL). At most two batches are held."""
    buffers = ReadBuffers()  # used by the merging thread only

    def merge(batch: Sequence[Block]) -> list[Tensor]:
        with _one_thread():
            return merge_batch(readers, batch, c, buffers)

    with ThreadPoolExecutor(1, thread_name_prefix="wsm-merge") as pool:
        pending = pool.submit(merge, batches[0]) if batches else None
        for nxt in [*batches[1:], None]:
            assert pending is not None
            result = pending.result()
            pending = pool.submit(merge, nxt) if nxt is not None else None
            yield result
            del result


def _results(readers: Sequence[Any], batches: Sequence[Sequence[Block]], c: np.ndarray, workers: int,
             reader_args: tuple) -> Iterator[list[Tensor]]:
    if workers <= 1 or len(batches) <= 1:
        yield from _merged_one_ahead(readers, batches, c)
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
