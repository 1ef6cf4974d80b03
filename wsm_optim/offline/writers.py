"""Writing a merged checkpoint block by block, in any layout, crash-safely: the :class:`Output` contract.

The merge produces ``blocks``: ``(name, start, stop, tensor)`` in ``layout``
order, rows ``start:stop`` (dim 0) of each output tensor, consecutive. An
output is built from an :class:`OutputTarget` (:func:`open_output`, one entry of
:data:`OUTPUTS` per format), consumes the blocks with ``write(blocks)`` and
returns what the caller gets:

* :class:`MemoryOutput`: ``{name: tensor}`` (``out=None``);
* :class:`TorchFileOutput`: one ``torch.save`` file (held in memory, then :func:`~wsm_optim.common.atomic.atomic_save`);
* :class:`SafetensorsOutput`: one safetensors file written streaming, the header
  first (every shape is known before the first block), then block after block;
* :class:`ShardedOutput`: a folder of safetensors shards with
  ``model.safetensors.index.json`` (``save_pretrained`` layout, ``--max-shard-size``),
  plus the input's ``config.json`` and friends, so ``from_pretrained`` loads it;
* :class:`DCPOutput`: a ``torch.distributed.checkpoint`` directory, one saved
  chunk per block, that ``dcp.load`` reads into any layout;
* :class:`~wsm_optim.offline.megatron.MegatronOutput`: a new ``iter_XXXXXXX``
  folder of a Megatron run folder, with the newest input's chunking, extra and
  common state, then the tracker file.

Files are written through :func:`~wsm_optim.common.atomic.atomic_file`, folders
through :func:`~wsm_optim.common.atomic.atomic_directory`: an output appears
complete or not at all. Only the block being written is held in memory (except
the two in-memory outputs).

A new output format is one class with ``open(target)`` and ``write(blocks)``
plus its entry in :data:`OUTPUTS` (and a row of the format matrix in the tests).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..common.atomic import atomic_directory, atomic_file, atomic_save
from .megatron import MegatronOutput

__all__ = [
    "Output",
    "OutputTarget",
    "OUTPUTS",
    "open_output",
    "MemoryOutput",
    "TorchFileOutput",
    "SafetensorsOutput",
    "ShardedOutput",
    "DCPOutput",
    "SafetensorsWriter",
    "parse_size",
    "HF_SIDE_FILES",
]

#: ``(name, shape, dtype)`` of every output tensor, in output order.
Layout = Sequence[tuple[str, tuple[int, ...], torch.dtype]]
#: ``(name, start, stop, tensor)``: rows ``start:stop`` (dim 0) of one output tensor, in its output dtype.
Block = tuple[str, int, int, Tensor]


@dataclass(frozen=True)
class OutputTarget:
    """Everything an output may need, known before the first block is merged.

    Attributes:
        path: where to write (a file or a folder, never an input).
        layout: every output tensor, in order.
        metadata: string metadata for file headers (safetensors ``__metadata__``).
        provenance: the merge's weights and inputs (a DCP output's ``wsm_merge.json``).
        max_shard_bytes: largest shard of a sharded output.
        block_rows: ``(name, start, stop)`` of every block the merge will produce, in order.
        newest_input: the newest checkpoint (a folder's side files, e.g. ``config.json``, come from it).
        iteration: a Megatron output's iteration (``None``: the newest input's).
        unsafe_pickle: whether state carried from the newest input may be unpickled without restrictions.
    """

    path: Path
    layout: Layout
    metadata: Mapping[str, str] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    max_shard_bytes: int = 5 * 10**9
    block_rows: Sequence[tuple[str, int, int]] = ()
    newest_input: Path | None = None
    iteration: int | None = None
    unsafe_pickle: bool = False


@runtime_checkable
class Output(Protocol):
    """Where a merge goes."""

    @classmethod
    def open(cls, target: OutputTarget) -> "Output":
        """The output for ``target``; nothing is written yet."""

    def write(self, blocks: Iterable[Block]) -> Any:
        """Consume every block once, in layout order; return what ``merge_checkpoints`` returns (here: the path)."""

_ST_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.complex64: "C64",
}
#: Files copied from the newest Hugging Face input folder into a sharded output (``from_pretrained`` needs them).
HF_SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.json", "chat_template.jinja", "preprocessor_config.json", "spiece.model",
)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, what: str = "--max-shard-size") -> int:
    """``"5GB"`` -> 5 * 10**9, ``"512MiB"`` -> 512 * 2**20, ``1000`` -> 1000 (bytes, ``> 0``)."""
    if isinstance(text, int):
        value = text
    else:
        s = text.strip().upper().replace(" ", "")
        unit = s.lstrip("0123456789.")
        number = s[: len(s) - len(unit)]
        if unit not in _SIZE_UNITS or not number:
            raise ValueError(
                f"{what}: cannot read {text!r}; give a number of bytes with an optional unit, "
                f"one of {', '.join(u for u in _SIZE_UNITS if u)} (e.g. 5GB, 512MiB)"
            )
        value = int(float(number) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"{what} must be positive, got {text!r}")
    return value


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def _bytes_of(t: Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _in_order(blocks: Iterable[Block], layout: Layout) -> Iterator[Block]:
    """``blocks`` checked to tile each tensor of ``layout`` row by row, in order (a bug guard, not user input)."""
    it = iter(blocks)
    for name, shape, dtype in layout:
        rows, at = (shape[0] if shape else 1), 0
        while at < rows or (rows == 0 and at == 0):
            b_name, start, stop, t = next(it)
            if b_name != name or start != at or t.dtype != dtype:
                raise AssertionError(f"block {b_name}[{start}:{stop}] {t.dtype} out of order, expected {name}[{at}:] {dtype}")
            yield b_name, start, stop, t
            del t  # a written block is freed before the next one is merged
            at = stop
            if rows == 0:
                break
    if next(it, None) is not None:
        raise AssertionError("more blocks than the layout holds")


def _finish(ordered: Iterator[Block]) -> None:
    """Run ``ordered`` (an :func:`_in_order` stream whose last block was taken) to its end: the merge's
    generator then counts the last tensor and prints its final progress line before the output is
    renamed, and the check that no block is left over runs."""
    for _ in ordered:  # nothing is left: _in_order raises for an extra block
        pass


class SafetensorsWriter:
    """One safetensors file on an open binary stream: header from ``layout`` first, then tensor bytes in order."""

    def __init__(self, f: BinaryIO, layout: Layout, metadata: Mapping[str, str] | None = None) -> None:
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name, shape, dtype in layout:
            if dtype not in _ST_CODES:
                raise ValueError(f"safetensors cannot store {name!r} of dtype {dtype}; use a .pt output")
            size = _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        self.f, self.end = f, 8 + len(raw) + offset

    def write(self, tensor: Tensor) -> None:
        self.f.write(_bytes_of(tensor))

    def finish(self) -> None:
        self.f.flush()
        if self.f.tell() != self.end:
            raise AssertionError(f"safetensors file ends at {self.f.tell()}, header promised {self.end}")


class MemoryOutput:
    """``{name: tensor}``, assembled from the blocks."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    @classmethod
    def open(cls, target: OutputTarget) -> "MemoryOutput":
        return cls(target.layout)

    def write(self, blocks: Iterable[Block]) -> dict[str, Tensor]:
        shapes = {name: shape for name, shape, _ in self.layout}
        out: dict[str, Tensor] = {}
        for name, start, stop, t in _in_order(blocks, self.layout):
            shape = shapes[name]
            if name not in out:
                if not shape or (start, stop) == (0, shape[0]):
                    out[name] = t  # the whole tensor in one block: no copy
                    continue
                out[name] = torch.empty(shape, dtype=t.dtype)
            out[name][start:stop] = t
        return out


class TorchFileOutput(MemoryOutput):
    """A ``torch.save`` file: the format has no streaming writer, so the merged dict is held, then saved atomically."""

    def __init__(self, path: Path, layout: Layout) -> None:
        super().__init__(layout)
        self.path = path

    @classmethod
    def open(cls, target: OutputTarget) -> "TorchFileOutput":
        return cls(target.path, target.layout)

    def write(self, blocks: Iterable[Block]) -> Path:  # type: ignore[override]
        return atomic_save(super().write(blocks), self.path, format="torch")


class SafetensorsOutput:
    """One safetensors file, streamed; ``metadata`` goes into its header."""

    def __init__(self, path: Path, layout: Layout, metadata: Mapping[str, str] | None = None) -> None:
        self.path, self.layout, self.metadata = path, layout, metadata

    @classmethod
    def open(cls, target: OutputTarget) -> "SafetensorsOutput":
        return cls(target.path, target.layout, target.metadata)

    def write(self, blocks: Iterable[Block]) -> Path:
        with atomic_file(self.path, "") as tmp, open(tmp, "wb") as f:
            writer = SafetensorsWriter(f, self.layout, self.metadata)
            for _, _, _, t in _in_order(blocks, self.layout):
                writer.write(t)
                del t  # freed before the next block is merged
            writer.finish()
        return self.path


class ShardedOutput:
    """A ``save_pretrained``-style folder: ``model-0000i-of-0000n.safetensors`` + index, or one ``model.safetensors``.

    Tensors go to shards in layout order; a shard closes before it would pass
    ``max_shard_bytes`` (a tensor larger than that gets a shard of its own).
    ``side_files`` (e.g. ``config.json``) are copied in.
    """

    def __init__(self, path: Path, layout: Layout, max_shard_bytes: int, metadata: Mapping[str, str] | None = None,
                 side_files: Sequence[Path] = ()) -> None:
        self.path, self.layout, self.metadata, self.side_files = path, layout, metadata, side_files
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in layout:
            n = _nbytes(entry[1], entry[2])
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += n
        self.shards = shards
        total = len(shards)
        self.names = ["model.safetensors"] if total == 1 else [
            f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)
        ]

    @classmethod
    def open(cls, target: OutputTarget) -> "ShardedOutput":
        """With the newest input's side files when it is a folder (``from_pretrained`` needs its ``config.json``)."""
        newest = target.newest_input if target.newest_input is not None and target.newest_input.is_dir() else None
        side = [newest / f for f in HF_SIDE_FILES if newest is not None and (newest / f).is_file()]
        return cls(target.path, target.layout, target.max_shard_bytes, target.metadata, side)

    def write(self, blocks: Iterable[Block]) -> Path:
        it = _in_order(blocks, self.layout)
        with atomic_directory(self.path) as tmp:
            weight_map = {}
            for file_name, shard in zip(self.names, self.shards):
                with open(tmp / file_name, "wb") as f:
                    writer = SafetensorsWriter(f, shard, self.metadata)
                    for name, shape, _ in shard:
                        rows, done = (shape[0] if shape else 1), 0
                        while True:
                            _, _, stop, t = next(it)
                            writer.write(t)
                            del t  # freed before the next block is merged
                            done = stop
                            if done >= rows:
                                break
                        weight_map[name] = file_name
                    writer.finish()
                    os.fsync(f.fileno())
            _finish(it)
            if len(self.names) > 1:
                index = {
                    "metadata": {"total_size": sum(_nbytes(s, d) for _, s, d in self.layout), **(self.metadata or {})},
                    "weight_map": weight_map,
                }
                _write_json(tmp / "model.safetensors.index.json", index)
            for side in self.side_files:
                shutil.copyfile(side, tmp / side.name)
                _fsync_file(tmp / side.name)
        return self.path


class DCPOutput:
    """A ``torch.distributed.checkpoint`` directory, one saved chunk per block (``dcp.load`` reshards it).

    ``dcp.save`` pulls each tensor from the planner (``resolve_data``) in plan
    order, one file per item, so the merge streams into it: only the block
    being written is in memory. ``sidecar`` is written as ``wsm_merge.json``.
    """

    def __init__(self, path: Path, layout: Layout, block_rows: Sequence[tuple[str, int, int]],
                 sidecar: Mapping[str, Any] | None = None) -> None:
        self.path, self.layout, self.block_rows, self.sidecar = path, layout, block_rows, sidecar

    @classmethod
    def open(cls, target: OutputTarget) -> "DCPOutput":
        return cls(target.path, target.layout, target.block_rows, target.provenance)

    def write(self, blocks: Iterable[Block]) -> Path:
        import torch.distributed.checkpoint as dcp

        with atomic_directory(self.path) as tmp:
            writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=False, sync_files=True, thread_count=1)
            ordered = _in_order(blocks, self.layout)
            planner = _pulling_planner(self.layout, self.block_rows, ordered)
            try:
                with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the intent
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
            except BaseException:  # CheckpointException derives from BaseException
                if planner.error is not None:  # dcp.save wraps it in a CheckpointException: give the merge's own
                    raise planner.error from None
                raise
            _finish(ordered)  # dcp.save took as many blocks as it planned: the stream's end is not asked for
            if self.sidecar is not None:
                _write_json(tmp / "wsm_merge.json", self.sidecar)
        return self.path


#: Output format name -> its class (``--out-format``); the order is the CLI's.
OUTPUTS: dict[str, type] = {"safetensors": SafetensorsOutput, "torch": TorchFileOutput, "sharded": ShardedOutput,
                            "dcp": DCPOutput, "megatron": MegatronOutput}


def open_output(fmt: str, target: OutputTarget) -> Output:
    """The output of format ``fmt`` (a key of :data:`OUTPUTS`) for ``target``."""
    if fmt not in OUTPUTS:
        raise ValueError(f"--out-format: unknown {fmt!r}; choose one of {', '.join(OUTPUTS)}")
    return OUTPUTS[fmt].open(target)


def _pulling_planner(layout: Layout, block_rows: Sequence[tuple[str, int, int]], blocks: Iterator[Block]) -> Any:
    """A ``DefaultSavePlanner`` whose plan is the blocks and whose data comes from ``blocks`` on demand."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    shapes = {name: (shape, dtype) for name, shape, dtype in layout}
    items = []
    for name, start, stop in block_rows:
        shape, dtype = shapes[name]
        offsets = torch.Size((start, *(0,) * (len(shape) - 1)) if shape else ())
        sizes = torch.Size((stop - start, *shape[1:]) if shape else ())
        items.append(WriteItem(
            index=MetadataIndex(name, offsets),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                properties=TensorProperties(dtype=dtype),
                size=torch.Size(shape),
            ),
        ))

    class PullingPlanner(DefaultSavePlanner):
        error: BaseException | None = None  # what the merge raised (e.g. NaN in an input), unwrapped

        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items, planner_data={})
            return self.plan

        def resolve_data(self, write_item: WriteItem) -> Tensor:
            try:
                name, start, _, tensor = next(blocks)
            except BaseException as e:
                self.error = e
                raise
            want = write_item.index
            if name != want.fqn or (tensor.dim() and start != want.offset[0]):
                raise AssertionError(f"DCP asked for {want}, the merge produced {name}[{start}:]")
            return tensor

    return PullingPlanner()


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
