"""Reading any checkpoint layout tensor by tensor, a block of rows at a time: the :class:`Reader` contract.

One interface for every input the offline merge accepts (:func:`open_reader`,
one entry of :data:`READERS` per format, tried in order):

* a safetensors file (``.safetensors``): header parsed here, tensor bytes read
  with plain file reads (no memory map), so a read costs exactly the rows asked for;
* a ``torch.save`` file (any other suffix): loaded with ``weights_only=True``
  (memory-mapped for the zip format) by :func:`wsm_optim.offline.files.open_checkpoint`;
* a Hugging Face folder: ``*.safetensors.index.json`` and its shards, or
  ``model.safetensors`` (``save_pretrained``);
* a ``torch.distributed.checkpoint`` (DCP) directory (holds ``.metadata``):
  tensors are read by FQN at their global shape, whatever sharding layout
  (world size, FSDP/TP) wrote them.

A reader exposes ``names`` (after ``key`` selection), ``meta(name) -> (shape,
dtype)`` and ``row_blocks(name)`` (where a tensor may be cut along dim 0
without re-reading saved data), cheaply and without loading tensors. Data is
read inside ``with reader.reading() as read: read(name, start, stop, out)``,
which returns rows ``start:stop`` (dim 0) of the tensor as a CPU tensor valid
until the ``with`` block ends, to be treated as read-only. ``out`` (optional):
a contiguous tensor of the rows' dtype and number of elements that the reader
fills and returns (viewed at the rows' shape), so a caller reuses one buffer for
every read; the ``torch.save`` reader returns a view of its memory map instead
(no copy at all). ``skipped``: ``{name: why}`` of entries left out (a DCP
checkpoint's optimizer state and objects).

A new input format is one reader class satisfying :class:`Reader` plus its
entry in :data:`READERS` (how to recognise it, how to open it), and a row of the
format matrix in the tests.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ContextManager, Protocol, runtime_checkable

import torch
from torch import Tensor

from .dcp_rows import plain_tensor_offset
from .files import UnsafePickleWarning, open_checkpoint

__all__ = [
    "Reader",
    "ReaderFormat",
    "READERS",
    "open_reader",
    "checkpoint_kind",
    "common_layout",
    "SafetensorsFile",
    "TorchFile",
    "HFFolder",
    "DCPDirectory",
    "SAFETENSORS_DTYPES",
    "OPTIMIZER_PREFIXES",
]

Read = Callable[..., Tensor]  # read(name, start, stop, out=None)


@runtime_checkable
class Reader(Protocol):
    """One input checkpoint, read tensor by tensor (see the module docstring).

    Attributes:
        path: the checkpoint (file or folder).
        names: the tensors it offers, after ``key`` selection, in file order.
        skipped: ``{name: why}`` of entries left out of ``names``.
    """

    path: Path
    names: list[str]
    skipped: dict[str, str]

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """``(shape, dtype)`` of ``name``, without reading its data."""

    def row_blocks(self, name: str) -> list[int] | None:
        """Row offsets (dim 0) where ``name`` may be cut without re-reading saved data; ``None``: anywhere."""

    def reading(self) -> ContextManager[Read]:
        """A context whose ``read(name, start, stop, out=None)`` returns rows ``start:stop`` as a CPU tensor."""

#: safetensors dtype codes and the torch dtypes they store (little-endian).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
}
#: First name parts under which a DCP checkpoint keeps optimizer state (skipped unless asked for).
OPTIMIZER_PREFIXES = ("optim", "optimizer", "optimizers", "optim_state", "optimizer_state")
# A safetensors header is JSON of a few MB at most; anything larger is a corrupt length field.
_MAX_HEADER_BYTES = 100 * 2**20


def checkpoint_kind(path: Path) -> str | None:
    """The :data:`READERS` key for a checkpoint at ``path`` (``"dcp"``, ``"hf"``, ...); ``None`` for other folders."""
    return next((name for name, fmt in READERS.items() if fmt.recognises(path)), None)


def open_reader(path: Path, key: str | None = None, *, unsafe_pickle: set[Path] | None = None,
                optimizer_state: bool = False) -> Reader:
    """The reader for ``path`` (see the module docstring); ``key`` picks a sub-tree.

    ``unsafe_pickle``: ``None`` refuses pickles that safe loading refuses; a set
    allows them, warning once per path (the set remembers which).
    ``optimizer_state``: keep a DCP checkpoint's optimizer state (skipped by default).
    """
    kind = checkpoint_kind(path)
    if kind is not None:
        return READERS[kind].open(path, key, unsafe_pickle, optimizer_state)
    raise ValueError(
        f"{path} is a directory but not a checkpoint: no .metadata (DCP or Megatron), no *.safetensors.index.json "
        "and no model.safetensors (Hugging Face folder)"
    )


def _select_prefix(names: list[str], key: str | None, path: Path, what: str) -> dict[str, str]:
    """``{name below key: full name}`` for the flat ``names`` of a file or folder."""
    if key is None:
        return {n: n for n in names}
    prefix = key + "."
    chosen = {n[len(prefix):]: n for n in names if n.startswith(prefix)}
    if not chosen:
        tops = sorted({n.split(".")[0] for n in names})[:20]
        raise ValueError(
            f"--key {key!r}: no tensor in {path} is named {prefix + '*'!r} "
            f"({what} are flat; first name parts present: {tops})"
        )
    return chosen


def _rows(shape: tuple[int, ...], start: int, stop: int) -> tuple[int, ...]:
    return (stop - start, *shape[1:]) if shape else ()


def _destination(shape: tuple[int, ...], dtype: torch.dtype, out: Tensor | None) -> Tensor:
    """``out`` viewed at ``shape`` (checked), or a new tensor."""
    if out is None:
        return torch.empty(shape, dtype=dtype)
    if out.dtype != dtype or not out.is_contiguous() or out.numel() != torch.Size(shape).numel():
        raise ValueError(f"out: {out.dtype} {list(out.shape)} cannot hold {list(shape)} of {dtype}")
    return out.view(shape)


class _OpenFiles:
    """Files of one folder, opened on first use and closed together when the read context ends.

    At most ``limit`` stay open (the least recently used is closed first): a DCP
    checkpoint may keep every saved chunk in a file of its own.
    """

    def __init__(self, root: Path, limit: int = 64) -> None:
        self.root, self.limit = root, limit
        self._fds: OrderedDict[str, int] = OrderedDict()

    def fd(self, relative: str) -> int:
        fd = self._fds.pop(relative, None)
        if fd is None:
            fd = os.open(self.root / relative, os.O_RDONLY)
            if len(self._fds) >= self.limit:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[relative] = fd
        return fd

    def __enter__(self) -> "_OpenFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


def _pread_into(fd: int, dest: Tensor, offset: int, path: Path, what: str) -> None:
    """Fill the contiguous ``dest`` with the file's bytes from ``offset`` (``preadv`` may return short reads)."""
    if dest.numel() == 0:
        return
    buf = memoryview(dest.view(-1).view(torch.uint8).numpy())
    pos = 0
    while pos < len(buf):
        got = os.preadv(fd, [buf[pos:]], offset + pos)
        if got <= 0:
            raise ValueError(f"cannot read {path}: {what} is cut short (file truncated?)")
        pos += got


def common_layout(readers: Sequence[Any], paths: Sequence[Path], key: str | None) -> dict[str, tuple]:
    """``{name: (shape, dtype)}`` of the oldest input, checked against every other input (metadata only).

    Raises ``ValueError`` naming the key and the input for a missing or extra
    key, a global-shape mismatch or a dtype mismatch.
    """
    ref: dict[str, tuple] | None = None
    for path, r in zip(paths, readers):
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
    _same_chunking(readers, paths)
    assert ref is not None
    return ref


def _same_chunking(readers: Sequence[Any], paths: Sequence[Path]) -> None:
    """Inputs that record how their ranks cut each tensor (Megatron's TP/PP chunks) must all cut it alike,
    and carry the same byte entries: a merge of different parallel layouts is refused, as Megatron's own
    tool refuses it (its extra and common state belong to one layout)."""
    chunked = [(p, r) for p, r in zip(paths, readers) if hasattr(r, "chunking")]
    if len(chunked) < 2:
        return
    (p0, r0), rest = chunked[0], chunked[1:]
    for path, r in rest:
        for n in r0.names:
            mine, theirs = r0.chunking(n), r.chunking(n)
            if mine != theirs:
                raise ValueError(
                    f"chunk layout mismatch for key {n!r}: {len(theirs)} saved chunks "
                    f"{[list(s) for _, s in theirs][:4]} in {path}, {len(mine)} {[list(s) for _, s in mine][:4]} in "
                    f"{p0} (checkpoints saved with other tensor/pipeline-parallel sizes cannot be merged; convert "
                    "them to one layout first)"
                )
        for a, b in ((r0.carried, r.carried), (r.carried, r0.carried)):
            extra = [n for n in a if n not in b]
            if extra:
                where, other = (p0, path) if a is r0.carried else (path, p0)
                raise ValueError(f"entry {extra[0]!r} is in {where} but not in {other} (checkpoints saved with other "
                                 "parallel layouts cannot be merged)")


# ---------------------------------------------------------------- safetensors
class SafetensorsFile:
    """A safetensors file read with ``pread`` (exactly the rows asked for, no memory map)."""

    def __init__(self, path: Path, key: str | None = None) -> None:
        if sys.byteorder != "little":  # pragma: no cover - safetensors stores little-endian data
            raise ValueError("reading safetensors files needs a little-endian machine")
        self.path = path
        self.entries = self._parse_header(path)
        self._full = _select_prefix(list(self.entries), key, path, "safetensors files")
        self.names = list(self._full)
        self.skipped: dict[str, str] = {}

    @staticmethod
    def _parse_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
        """``{name: (dtype, shape, absolute byte offset)}`` in file order; every entry checked against the file size."""

        def bad(reason: str) -> ValueError:
            return ValueError(f"cannot read {path} as a safetensors file: {reason}")

        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise bad(f"header length {n} does not fit the file ({size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise bad(f"the header is not JSON ({e})") from e
        if not isinstance(header, dict):
            raise bad("the header is not a JSON object")
        entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        spans = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise bad(f"entry {name!r} has no valid dtype/shape/data_offsets ({e!r})") from e
            numel = 1
            for s in shape:
                numel *= s
            if min(shape, default=0) < 0 or end - begin != numel * dtype.itemsize or begin < 0:
                raise bad(f"entry {name!r}: data_offsets {[begin, end]} do not hold shape {list(shape)} of {dtype}")
            if 8 + n + end > size:
                raise bad(f"entry {name!r} ends at byte {8 + n + end}, past the end of the file ({size} bytes)")
            entries[name] = (dtype, shape, 8 + n + begin)
            spans.append((begin, end, name))
        spans.sort()
        for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise bad(f"entries {n0!r} and {n1!r} overlap")
        return entries

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        dtype, shape, _ = self.entries[self._full[name]]
        return shape, dtype

    def row_blocks(self, name: str) -> list[int] | None:
        """``None``: any row boundary reads without waste."""
        return None

    @contextlib.contextmanager
    def reading(self) -> Iterator[Read]:
        with _OpenFiles(self.path.parent) as files:
            yield lambda name, start, stop, out=None: self.read_rows(files.fd(self.path.name), self._full[name],
                                                                     start, stop, out)

    def read_rows(self, fd: int, full_name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        dtype, shape, offset = self.entries[full_name]
        dest = _destination(_rows(shape, start, stop), dtype, out)
        row_bytes = dest.numel() // max(stop - start, 1) * dtype.itemsize if shape else 0
        _pread_into(fd, dest, offset + start * row_bytes, self.path, f"tensor {full_name!r}")
        return dest


# ---------------------------------------------------------------- torch.save
class TorchFile:
    """A ``torch.save`` state dict; opened again for each block of reads (memory-mapped when it can be)."""

    def __init__(self, path: Path, key: str | None, unsafe_pickle: set[Path] | None) -> None:
        self.path, self.key, self.unsafe = path, key, unsafe_pickle
        with open_checkpoint(path, key, unsafe_pickle) as r:
            self._meta = {n: r.meta(n) for n in r.names}
        self.names = list(self._meta)
        self.skipped: dict[str, str] = {}

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._meta[name]

    def row_blocks(self, name: str) -> list[int] | None:
        return None

    @contextlib.contextmanager
    def reading(self) -> Iterator[Read]:
        # Closing after each block drops the memory map: touched pages of every
        # input would otherwise stay resident for the whole merge.
        with open_checkpoint(self.path, self.key, self.unsafe) as r:
            def read(name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
                t = r.tensor(name)
                return t[start:stop] if t.dim() else t  # a view of the memory map: copying into out would cost more

            yield read


# ------------------------------------------------------------- HF folders
def _hf_index(path: Path) -> Path | None:
    found = sorted(path.glob("*.safetensors.index.json"))
    return found[0] if found else None


def _weight_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map``, checked: tensor names to shard files inside the index's own folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {index}: not a safetensors index with a weight_map ({e!r})") from e
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to shard files, got a "
                         f"{type(weight_map).__name__}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise ValueError(f"{index}: 'weight_map' maps {name!r} to {shard!r}; expected a shard file name")
        relative = PurePosixPath(shard)
        if relative.is_absolute() or ".." in relative.parts or "\\" in shard:
            raise ValueError(f"{index}: 'weight_map' maps {name!r} to {shard!r}, outside the checkpoint folder; "
                             "shard files must lie in the index's folder")
    return weight_map


class HFFolder:
    """A ``save_pretrained`` folder: ``*.safetensors.index.json`` + shards, or ``model.safetensors``."""

    def __init__(self, path: Path, key: str | None = None) -> None:
        self.path = path
        index = _hf_index(path)
        if index is not None:
            weight_map = _weight_map(index)
            files = {f: SafetensorsFile(path / f) for f in sorted(set(weight_map.values()))}
            for name, f in weight_map.items():
                if name not in files[f].entries:
                    raise ValueError(f"{index} maps {name!r} to {f}, which does not hold it")
            self.index: Path | None = index
        else:
            only = path / "model.safetensors"
            files = {only.name: SafetensorsFile(only)}
            weight_map = {n: only.name for n in files[only.name].entries}
            self.index = None
        self._files, self._where = files, weight_map
        self._full = _select_prefix(list(weight_map), key, path, "safetensors folders")
        self.names = list(self._full)
        self.skipped: dict[str, str] = {}

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        full = self._full[name]
        dtype, shape, _ = self._files[self._where[full]].entries[full]
        return shape, dtype

    def row_blocks(self, name: str) -> list[int] | None:
        return None

    @contextlib.contextmanager
    def reading(self) -> Iterator[Read]:
        with _OpenFiles(self.path) as files:
            def read(name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
                full = self._full[name]
                shard = self._where[full]
                return self._files[shard].read_rows(files.fd(shard), full, start, stop, out)

            yield read


# -------------------------------------------------------------------- DCP
class _ForeignGlobal(pickle.UnpicklingError):
    """A DCP ``.metadata`` pickle names a global the format never uses (it could run code)."""


@functools.cache
def _megatron_stubs() -> dict[str, type]:
    """Stand-ins for the two megatron-core (<= 0.15) classes its ``.metadata`` files pickle: subclasses of
    torch's own, so the file reads without importing Megatron (their extra fields land in ``__dict__``)."""
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.planner import SavePlan

    return {"MCoreMetadata": type("MCoreMetadata", (Metadata,), {"__module__": __name__}),
            "MCoreSavePlan": type("MCoreSavePlan", (SavePlan,), {"__module__": __name__})}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, allowing only the classes such a file holds (no code runs).

    megatron-core also stores its save plans (``all_local_plans``) there, and up
    to 0.15 its own ``MCoreMetadata`` / ``MCoreSavePlan``, which are stubbed.
    """

    _ALLOWED = {
        "torch.distributed.checkpoint.metadata": None,  # any name: dataclasses and enums of the format
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
        "torch.serialization": {"_get_layout"},
        "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
        "collections": {"OrderedDict"},
    }
    _MEGATRON = "megatron.core.dist_checkpointing.strategies.torch"

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module == self._MEGATRON and name in ("MCoreMetadata", "MCoreSavePlan"):
            return _megatron_stubs()[name]
        allowed = self._ALLOWED.get(module, ())
        if module in self._ALLOWED and (allowed is None or name in allowed):
            return getattr(__import__(module, fromlist=[name]), name)
        raise _ForeignGlobal(f"global {module}.{name} is not part of a DCP metadata file")


class _RowsPlanner:
    """The part of ``LoadPlanner`` that ``FileSystemReader.read_data`` calls: it copies into ``dest``."""

    def __init__(self, dest: Tensor, start: tuple[int, ...]) -> None:
        self.dest, self.start = dest, start

    def resolve_tensor(self, item: Any) -> Tensor:
        t = self.dest
        for dim, (off, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            t = t.narrow(dim, off, length)
        return t

    def commit_tensor(self, item: Any, tensor: Tensor) -> None:
        pass

    def load_bytes(self, item: Any, value: Any) -> None:  # pragma: no cover - tensors only are planned
        raise AssertionError("DCP reader asked to load bytes")


class DCPDirectory:
    """A ``torch.distributed.checkpoint`` directory, read by FQN at global shapes.

    Rows are read straight from the files: a saved chunk stored as a plain
    ``torch.save`` record (what torch's ``FileSystemWriter`` writes) has its raw
    bytes at a known offset (:mod:`wsm_optim.offline.dcp_rows`), so a read costs
    exactly the rows asked for. A chunk stored any other way (compressed,
    transformed, strided) is read through ``FileSystemReader.read_data``, which
    loads it whole (``direct_reads=False``: every chunk that way).

    Non-tensor entries (pickled objects such as ``train_state``) and optimizer
    state (names under :data:`OPTIMIZER_PREFIXES`, or ``X.state.*`` beside
    ``X.param_groups.*``) are listed in ``skipped`` (name -> reason) and not merged, unless
    ``optimizer_state`` is set or ``key`` points into them.
    """

    def __init__(self, path: Path, key: str | None = None, *, unsafe_pickle: set[Path] | None = None,
                 optimizer_state: bool = False, direct_reads: bool = True) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        self._reader = FileSystemReader(str(path))
        self.metadata = self._read_metadata(path, unsafe_pickle)
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        all_names = list(self.metadata.state_dict_metadata)
        tensors = [n for n, md in self.metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)]
        asked_for_optimizer = key is not None and key.split(".")[0] in OPTIMIZER_PREFIXES
        optimizer = set() if (optimizer_state or asked_for_optimizer) else _optimizer_names(all_names)
        is_tensor = set(tensors)
        #: ``{name: why}`` for entries not merged: ``"optimizer state"`` or ``"not a tensor"``.
        self.skipped = {
            n: "optimizer state" if n in optimizer else "not a tensor"
            for n in all_names
            if (n in optimizer or n not in is_tensor) and (key is None or n.startswith(key + "."))
        }
        self._full = _select_prefix([n for n in tensors if n not in optimizer], key, path, "DCP names")
        self.names = list(self._full)
        self.direct_reads = direct_reads
        # saved chunk (its storage index) -> (file, offset of its raw bytes), or None: read through dcp
        self._direct: dict[Any, tuple[str, int] | None] = {}

    @staticmethod
    def _read_metadata(path: Path, unsafe_pickle: set[Path] | None) -> Any:
        meta = path / ".metadata"
        with open(meta, "rb") as f:
            try:
                return _MetadataUnpickler(f).load()
            except _ForeignGlobal as e:
                refusal = e
            except Exception as e:  # noqa: BLE001 - truncated or garbage metadata: corrupt, not unsafe
                raise ValueError(f"cannot read {meta}: not a DCP metadata file ({type(e).__name__}: {e})") from e
        if unsafe_pickle is None:
            raise ValueError(
                f"{meta} holds objects that safe loading refuses ({refusal}). Loading it means unpickling, which "
                "can execute arbitrary code stored in the file; only if you trust where it comes from, pass "
                "--unsafe-pickle (unsafe_pickle=True)"
            )
        if path not in unsafe_pickle:
            unsafe_pickle.add(path)
            warnings.warn(f"--unsafe-pickle: unpickling {meta} without restrictions; it can run any code stored "
                          "in the file", UnsafePickleWarning, stacklevel=4)
        with open(meta, "rb") as f:
            return pickle.load(f)

    def _md(self, name: str) -> Any:
        return self.metadata.state_dict_metadata[self._full[name]]

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        md = self._md(name)
        return tuple(md.size), md.properties.dtype

    def _direct_location(self, fqn: str, chunk: Any, dtype: torch.dtype, files: _OpenFiles) -> tuple[str, int] | None:
        """``(file, offset of the raw bytes)`` of a saved chunk stored plainly, else ``None`` (cached)."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        index = MetadataIndex(fqn, chunk.offsets)
        if index not in self._direct:
            info = self.metadata.storage_data.get(index) if self.direct_reads else None
            where = None
            if info is not None and not getattr(info, "transform_descriptors", None):
                at = plain_tensor_offset(files.fd(info.relative_path), info.offset, info.length, dtype,
                                         tuple(chunk.sizes))
                where = None if at is None else (info.relative_path, at)
            self._direct[index] = where
        return self._direct[index]

    def row_blocks(self, name: str) -> list[int] | None:
        """``None`` when every saved chunk of ``name`` is read directly (any row range costs its rows only).

        Else the row boundaries of the saved chunks, when every chunk spans whole
        rows (dim-0 sharding, as FSDP): a read inside one block loads only that
        block's saved chunks, a read across a saved chunk's boundary would load
        the chunk again. Other layouts (TP column shards) return ``[0, rows]``: read whole.
        """
        md = self._md(name)
        shape = tuple(md.size)
        with _OpenFiles(self.path) as files:
            if all(self._direct_location(self._full[name], c, md.properties.dtype, files) for c in md.chunks):
                return None
        if not shape:
            return [0, 1]
        full_rows = all(
            tuple(c.offsets[1:]) == (0,) * (len(shape) - 1) and tuple(c.sizes[1:]) == shape[1:] for c in md.chunks
        )
        if not full_rows:
            return [0, shape[0]]
        return sorted({0, shape[0], *(int(c.offsets[0]) for c in md.chunks)})

    @contextlib.contextmanager
    def reading(self) -> Iterator[Read]:
        with _OpenFiles(self.path) as files:
            yield lambda name, start, stop, out=None: self.read(name, start, stop, out, files)

    def read(self, name: str, start: int, stop: int, out: Tensor | None = None,
             files: _OpenFiles | None = None) -> Tensor:
        """Rows ``start:stop`` of ``name`` at its global shape, assembled from the saved chunks that overlap them."""
        if files is None:
            with _OpenFiles(self.path) as own:
                return self.read(name, start, stop, out, own)
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

        md = self._md(name)
        fqn = self._full[name]
        shape, dtype = tuple(md.size), md.properties.dtype
        want_off = (start, *(0,) * (len(shape) - 1)) if shape else ()
        want_len = _rows(shape, start, stop)
        dest = _destination(want_len, dtype, out)
        items, covered, boxes = [], 0, []
        for chunk in md.chunks:
            lo = [max(o, w) for o, w in zip(chunk.offsets, want_off)]
            hi = [min(o + s, w + n) for o, s, w, n in zip(chunk.offsets, chunk.sizes, want_off, want_len)]
            if any(h <= lo_ for lo_, h in zip(lo, hi)) and shape:
                continue
            lengths = [h - lo_ for lo_, h in zip(lo, hi)]
            covered += int(torch.Size(lengths).numel())
            for other_lo, other_hi in boxes:  # disjoint boxes whose volumes add up to the rows tile them exactly
                if all(a < d and c < b for a, b, c, d in zip(lo, hi, other_lo, other_hi)):
                    raise ValueError(
                        f"{self.path}: the .metadata lists overlapping saved chunks of {fqn!r} (at "
                        f"{list(chunk.offsets)} and another one covering {other_lo}..{other_hi}); the checkpoint "
                        "is corrupt"
                    )
            boxes.append((lo, hi))
            if MetadataIndex(fqn, chunk.offsets) not in self.metadata.storage_data:
                raise ValueError(
                    f"{self.path}: the .metadata lists a saved chunk of {fqn!r} at {list(chunk.offsets)} but says "
                    "nowhere in which file it is stored (no storage_data entry); the checkpoint is corrupt"
                )
            where = self._direct_location(fqn, chunk, dtype, files)
            if where is not None:
                self._read_direct(files, where, fqn, chunk, lo, lengths, want_off, dest)
                continue
            items.append(ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=MetadataIndex(fqn, torch.Size(want_off)),
                dest_offsets=torch.Size([a - w for a, w in zip(lo, want_off)]),
                storage_index=MetadataIndex(fqn, chunk.offsets),
                storage_offsets=torch.Size([a - o for a, o in zip(lo, chunk.offsets)]),
                lengths=torch.Size(lengths),
            ))
        if covered != dest.numel():
            raise ValueError(
                f"{self.path}: the saved chunks of {fqn!r} cover {covered} of the {dest.numel()} values of "
                f"rows {start}:{stop}; the checkpoint is incomplete"
            )
        if items:
            try:
                self._reader.read_data(LoadPlan(items), _RowsPlanner(dest, want_off)).wait()
            except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # torch.load of a cut or damaged file
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ValueError(
                    f"{self.path}: cannot read the saved chunks of {fqn!r} (rows {start}:{stop}): the checkpoint is "
                    f"corrupt or truncated ({reason})"
                ) from e
        return dest

    def _read_direct(self, files: _OpenFiles, where: tuple[str, int], fqn: str, chunk: Any, lo: list[int],
                     lengths: list[int], want_off: tuple[int, ...], dest: Tensor) -> None:
        """Copy the part ``lo : lo + lengths`` (global indices) of a plainly stored chunk into ``dest``."""
        relative, data_offset = where
        sizes = tuple(chunk.sizes)
        row_bytes = int(torch.Size(sizes[1:]).numel()) * dest.dtype.itemsize
        first = lo[0] - chunk.offsets[0] if sizes else 0  # the chunk's first row wanted
        target = dest
        for dim, (a, n) in enumerate(zip(lo, lengths)):
            target = target.narrow(dim, a - want_off[dim], n)
        if sizes[1:] == tuple(lengths[1:]) and target.is_contiguous():  # whole rows of the chunk: straight in
            _pread_into(files.fd(relative), target, data_offset + first * row_bytes, self.path / relative,
                        f"the saved chunk of {fqn!r} at {list(chunk.offsets)}")
            return
        # a column shard (TP): its rows are contiguous in the file, not in dest
        rows = torch.empty((lengths[0], *sizes[1:]), dtype=dest.dtype)
        _pread_into(files.fd(relative), rows, data_offset + first * row_bytes, self.path / relative,
                    f"the saved chunk of {fqn!r} at {list(chunk.offsets)}")
        for dim in range(1, len(sizes)):
            rows = rows.narrow(dim, lo[dim] - chunk.offsets[dim], lengths[dim])
        target.copy_(rows)


@dataclass(frozen=True)
class ReaderFormat:
    """One input format: how to recognise a checkpoint of it and how to open its :class:`Reader`.

    ``open(path, key, unsafe_pickle, optimizer_state)``: the arguments of
    :func:`open_reader`, of which a format uses what applies to it.
    """

    recognises: Callable[[Path], bool]
    open: Callable[[Path, str | None, set[Path] | None, bool], Reader]


def _hf_folder(path: Path) -> bool:
    return path.is_dir() and not (path / ".metadata").is_file() and (
        _hf_index(path) is not None or (path / "model.safetensors").is_file())


def _megatron(path: Path, key: str | None, unsafe: set[Path] | None, optim: bool) -> Reader:
    from .megatron import MegatronCheckpoint

    return MegatronCheckpoint(path, key, unsafe_pickle=unsafe, optimizer_state=optim)


def _megatron_folder(path: Path) -> bool:
    from .megatron import is_iteration_folder

    return is_iteration_folder(path)


#: Input formats, tried in this order (a Megatron iteration folder is a DCP directory with
#: megatron-core's ``metadata.json``; a DCP directory may also hold safetensors files).
READERS: dict[str, ReaderFormat] = {
    "megatron": ReaderFormat(_megatron_folder, _megatron),
    "dcp": ReaderFormat(lambda p: p.is_dir() and (p / ".metadata").is_file(),
                        lambda p, key, unsafe, optim: DCPDirectory(p, key, unsafe_pickle=unsafe, optimizer_state=optim)),
    "hf": ReaderFormat(_hf_folder, lambda p, key, unsafe, optim: HFFolder(p, key)),
    "safetensors": ReaderFormat(lambda p: not p.is_dir() and p.suffix.lower() == ".safetensors",
                                lambda p, key, unsafe, optim: SafetensorsFile(p, key)),
    "torch": ReaderFormat(lambda p: not p.is_dir() and p.suffix.lower() != ".safetensors",
                          lambda p, key, unsafe, optim: TorchFile(p, key, unsafe)),
}


def _optimizer_names(names: list[str]) -> set[str]:
    """Names of optimizer state: under an optimizer prefix, or ``X.state.*`` / ``X.param_groups.*``
    where ``X.param_groups.*`` exists (``X`` may be empty: an optimizer state dict saved at the top level)."""
    roots = {n.rsplit("param_groups.", 1)[0] for n in names if n.startswith("param_groups.") or ".param_groups." in n}
    prefixes = tuple(f"{r}{part}." for r in roots for part in ("state", "param_groups"))
    return {n for n in names if n.split(".")[0] in OPTIMIZER_PREFIXES or (prefixes and n.startswith(prefixes))}
