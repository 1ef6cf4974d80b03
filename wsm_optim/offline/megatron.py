"""Megatron ``torch_dist`` checkpoints: run folders, iteration folders, their reader and their output.

The layout megatron-core's ``dist_checkpointing`` and Megatron-LM's training loop write::

    run/
      latest_checkpointed_iteration.txt   the tracker: the iteration Megatron resumes from ("1000")
      iter_0001000/                       one iteration (7 digits at least)
        .metadata                         torch DCP metadata; megatron-core <= 0.15 pickles its own
                                          MCoreMetadata / MCoreSavePlan classes in it
        __0_0.distcp ...                  DCP data: TP ranks write chunks of one global tensor, PP ranks
                                          slices of a stacked layer axis
        common.pt                         the non-sharded state (iteration, args, ...): legacy form;
                                          newer Megatron-LM keeps it as the DCP bytes entry common_state/shard_0_1
        metadata.json                     {"sharded_backend": "torch_dist", ...}, written last: a folder
                                          without it is still being written (or was cut short)

:class:`MegatronCheckpoint` reads one iteration folder: every tensor at its
global shape, streamed chunk by chunk like any DCP checkpoint
(:class:`~wsm_optim.offline.readers.DCPDirectory`); optimizer and RNG entries
are left out; ``_extra_state`` byte entries and the common state are not merged
but carried from the newest input by :class:`MegatronOutput`, which writes a
new iteration folder with the newest input's keys and chunking, then the
tracker (last, atomically). Megatron loads the result with
``--no-load-optim --no-load-rng`` (it holds neither).

Nothing here imports Megatron: the old pickled ``.metadata`` is read by the DCP
reader's allow-list unpickler, which stubs only the two megatron-core classes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import pickle
import re
import types
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..common.atomic import atomic_directory, atomic_file
from .files import UnsafePickleWarning
from .readers import DCPDirectory, _OpenFiles, _pread_into

__all__ = [
    "TRACKER",
    "CONFIG",
    "COMMON_FILE",
    "COMMON_ENTRY",
    "MegatronCheckpoint",
    "MegatronOutput",
    "iteration_folder",
    "iteration_of",
    "is_iteration_folder",
    "is_run_folder",
    "is_partial_iteration",
    "row_cuts",
]

#: The tracker file of a run folder: the iteration Megatron resumes from.
TRACKER = "latest_checkpointed_iteration.txt"
#: The file megatron-core writes last into an iteration folder (``sharded_backend`` and versions).
CONFIG = "metadata.json"
#: The legacy file of the common (non-sharded) state.
COMMON_FILE = "common.pt"
#: The DCP bytes entry holding the common state in newer Megatron-LM (a ``ShardedObject`` of shape ``(1,)``).
COMMON_ENTRY = "common_state/shard_0_1"
_ITERATION_RE = re.compile(r"iter_(\d+)")
# Types a common state holds besides containers and tensors (Megatron-LM saves its args as a Namespace).
_COMMON_SAFE_GLOBALS = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, pathlib.PurePosixPath]


def iteration_folder(iteration: int) -> str:
    """``"iter_0001000"`` for 1000: Megatron-LM's folder name (``iter_{:07d}``)."""
    return f"iter_{iteration:07d}"


def iteration_of(path: Path) -> int | None:
    """The iteration of a folder named ``iter_<digits>``, else ``None``."""
    m = _ITERATION_RE.fullmatch(path.name)
    return int(m.group(1)) if m else None


def is_iteration_folder(path: Path) -> bool:
    """A megatron-core checkpoint folder: DCP ``.metadata`` and ``metadata.json`` (its completion mark)."""
    return path.is_dir() and (path / ".metadata").is_file() and (path / CONFIG).is_file()


def is_partial_iteration(path: Path) -> bool:
    """An ``iter_*`` folder without ``metadata.json`` that is no other kind of checkpoint (a bare DCP
    folder, or not yet one): megatron-core writes that file last, so the save is still running or was cut short."""
    from .readers import checkpoint_kind

    return (path.is_dir() and iteration_of(path) is not None and not (path / CONFIG).is_file()
            and checkpoint_kind(path) in (None, "dcp"))


def is_run_folder(path: Path) -> bool:
    """A Megatron run folder: it holds the tracker file or ``iter_*`` folders (and is not a checkpoint itself)."""
    if not path.is_dir() or (path / ".metadata").is_file():
        return False
    return (path / TRACKER).is_file() or any(iteration_of(p) is not None and p.is_dir() for p in path.iterdir())


def _config(path: Path) -> dict[str, Any]:
    """``metadata.json`` of an iteration folder, checked to name the ``torch_dist`` backend."""
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path / CONFIG}: not megatron-core's checkpoint config ({e})") from e
    backend = config.get("sharded_backend") if isinstance(config, dict) else None
    if backend != "torch_dist":
        raise ValueError(
            f"{path}: {CONFIG} names the sharded backend {backend!r}; only 'torch_dist' checkpoints (DCP) are "
            "read (convert others with Megatron's checkpoint tools)"
        )
    return config


def _kind(name: str) -> str:
    """Why a Megatron byte entry is not merged, by its name: RNG state is left out, the rest is carried."""
    if name.split(".")[0] == "rng_state" or name.startswith("rng_state/"):
        return "RNG state"
    if name.split("/")[0] == "common_state":
        return "common state: carried from the newest input"
    if "_extra_state" in name.split("/")[0].split("."):
        return "extra state: carried from the newest input"
    return "other state: carried from the newest input"  # e.g. the rerun state machine's


class MegatronCheckpoint(DCPDirectory):
    """One Megatron iteration folder (``iter_XXXXXXX``), read as the DCP checkpoint it is.

    ``skipped`` names why each entry is not merged: optimizer state, RNG state,
    extra state and the common state (the last two are carried into a
    :class:`MegatronOutput` from the newest input). ``chunking(name)`` is the
    saved chunk layout of a tensor (TP/PP ranks' pieces), which every input of
    a merge must share; ``carried`` lists the byte entries an output copies.
    """

    def __init__(self, path: Path, key: str | None = None, *, unsafe_pickle: set[Path] | None = None,
                 optimizer_state: bool = False) -> None:
        self.config = _config(path)
        super().__init__(path, key, unsafe_pickle=unsafe_pickle, optimizer_state=optimizer_state)
        for name, why in list(self.skipped.items()):
            if why == "not a tensor":
                self.skipped[name] = _kind(name)
        #: The byte entries an output copies from this input: all but RNG and optimizer state.
        self.carried = [n for n, why in self.skipped.items() if why.endswith("carried from the newest input")]
        self.iteration = iteration_of(path)

    def chunking(self, name: str) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
        """``((offsets, sizes), ...)`` of the saved chunks of ``name``, sorted (the order the ranks wrote is not part of it)."""
        return tuple(sorted((tuple(c.offsets), tuple(c.sizes)) for c in self._md(name).chunks))

    def raw_bytes(self, name: str) -> bytes:
        """The stored bytes of the byte entry ``name`` (a ``ShardedObject``: ``torch.save([object])``)."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.metadata.storage_data.get(MetadataIndex(name))
        if info is None:
            raise ValueError(f"{self.path}: the .metadata lists {name!r} but no file holds it; the checkpoint is corrupt")
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{self.path}: {name!r} is stored transformed ({info.transform_descriptors}); "
                             "only plainly stored entries are carried")
        buf = torch.empty(info.length, dtype=torch.uint8)
        with _OpenFiles(self.path) as files:
            _pread_into(files.fd(info.relative_path), buf, info.offset, self.path / info.relative_path, repr(name))
        return buf.numpy().tobytes()


# ------------------------------------------------------------------ common state
def _load_common(data: bytes, where: str, unsafe_pickle: bool) -> Any | None:
    """The common state, loaded as torch's safe loading does (plus argparse/types namespaces and paths).

    ``None`` when it holds other objects (Megatron's enums in its args, say) and
    ``unsafe_pickle`` is off: the caller then carries the bytes unchanged.
    """
    try:
        with torch.serialization.safe_globals(_COMMON_SAFE_GLOBALS):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not unsafe_pickle:
            return None
        warnings.warn(f"--unsafe-pickle: unpickling {where} without restrictions ({str(e).splitlines()[0]})",
                      UnsafePickleWarning, stacklevel=4)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _save(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


class _CommonState:
    """The newest input's common state, with its iteration set to the output's, in the form the input had it."""

    def __init__(self, source: MegatronCheckpoint, iteration: int, unsafe_pickle: bool) -> None:
        legacy = source.path / COMMON_FILE
        self.legacy = legacy.is_file()
        if not self.legacy and COMMON_ENTRY not in source.carried:
            raise ValueError(f"{source.path}: no common state (neither {COMMON_FILE} nor the DCP entry "
                             f"{COMMON_ENTRY!r}); Megatron cannot load a checkpoint without it")
        raw = legacy.read_bytes() if self.legacy else source.raw_bytes(COMMON_ENTRY)
        where = str(legacy) if self.legacy else f"{source.path}:{COMMON_ENTRY}"
        loaded = _load_common(raw, where, unsafe_pickle)
        #: ``"set"``: the iteration was rewritten; ``"carried"``: the bytes are the input's (same iteration).
        self.how = "set"
        if loaded is None:
            if iteration != source.iteration:
                raise ValueError(
                    f"{where} holds objects that safe loading refuses, so its iteration cannot be set to "
                    f"{iteration}; write the merge at the newest input's iteration ({source.iteration}, the "
                    "default), or pass --unsafe-pickle (unsafe_pickle=True) if you trust the checkpoint"
                )
            self.raw, self.how = raw, "carried"
            return
        state = loaded if self.legacy else loaded[0]
        if not isinstance(state, dict):
            raise ValueError(f"{where}: the common state is a {type(state).__name__}, expected a dict")
        state = dict(state)
        state["iteration"] = iteration
        self.raw = _save(state if self.legacy else [state])


# ------------------------------------------------------------------------ output
def _chunks(blocks: Iterator[tuple[str, int, int, Tensor]], plan: Sequence[tuple[str, tuple, tuple]],
            layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> Iterator[tuple[str, tuple, Tensor]]:
    """Re-cut the merge's row blocks into the saved chunks of ``plan`` (``(name, offsets, sizes)``,
    each tensor's chunks sorted by their last row), yielding ``(name, offsets, chunk)`` in plan order.

    A chunk is yielded as soon as the blocks have covered its rows, so only the
    chunks that overlap the current rows are held: one chunk for row-sharded
    tensors (TP on dim 0, PP's stacked layer axis), the tensor's rows so far for
    column-sharded ones.
    """
    todo = list(plan)
    at = 0
    open_chunks: dict[tuple[str, tuple], Tensor] = {}
    for name, start, stop, t in blocks:
        shape = layout[name][0]
        if not shape:  # a scalar: one chunk, one block
            todo_name, offsets, _ = todo[at]
            assert todo_name == name, (todo_name, name)
            at += 1
            yield name, offsets, t
            continue
        if shape[0] == 0:  # no rows: every chunk is empty, whatever its other dims
            while at < len(todo) and todo[at][0] == name:
                _, offsets, sizes = todo[at]
                at += 1
                yield name, offsets, torch.empty(sizes, dtype=t.dtype)
            continue
        j = at
        whole_rows = None  # a block that is exactly one chunk of whole rows goes out as it is, not copied
        while j < len(todo) and todo[j][0] == name:
            _, offsets, sizes = todo[j]
            lo, hi = max(start, offsets[0]), min(stop, offsets[0] + sizes[0])
            if (lo, hi) == (start, stop) == (offsets[0], offsets[0] + sizes[0]) and tuple(sizes[1:]) == shape[1:]:
                whole_rows = offsets
            elif lo < hi:
                buf = open_chunks.get((name, offsets))
                if buf is None:
                    buf = open_chunks[(name, offsets)] = torch.empty(sizes, dtype=t.dtype)
                piece = t[lo - start:hi - start]
                for dim in range(1, len(shape)):
                    piece = piece.narrow(dim, offsets[dim], sizes[dim])
                buf[lo - offsets[0]:hi - offsets[0]].copy_(piece)
            j += 1
        while at < len(todo) and todo[at][0] == name and todo[at][1][0] + todo[at][2][0] <= stop:
            _, offsets, _ = todo[at]
            at += 1
            yield name, offsets, (t if offsets == whole_rows else open_chunks.pop((name, offsets)))
        del t
    if at != len(todo):
        raise AssertionError(f"the merge ended before the saved chunk {todo[at][:2]} was complete")


def row_cuts(reader: MegatronCheckpoint) -> dict[str, list[int]]:
    """Where the merge should cut each tensor into blocks for an output with ``reader``'s chunking: at
    every saved chunk's first and last row, so a block of a row-split tensor is one chunk (or part of
    one) and goes out without being assembled."""
    return {n: sorted({b for o, s in reader.chunking(n) if o for b in (o[0], o[0] + s[0])}) for n in reader.names}


class MegatronOutput:
    """A new iteration folder in a Megatron run folder, then the tracker.

    ``run/iter_XXXXXXX/`` (``iteration``: the newest input's unless given) holds
    the merged tensors cut into the newest input's saved chunks, its extra
    state, its common state with the iteration set, its ``metadata.json`` and
    ``wsm_merge.json`` (the merge's provenance). The folder appears complete or
    not at all; the tracker is replaced after it, atomically, so a crash leaves
    the old tracker. Returns the iteration folder.
    """

    def __init__(self, run: Path, layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 source: MegatronCheckpoint, iteration: int, provenance: Mapping[str, Any], unsafe_pickle: bool) -> None:
        self.run, self.layout, self.source, self.iteration = run, layout, source, iteration
        self.folder = run / iteration_folder(iteration)
        if self.folder.exists():
            raise ValueError(f"{self.folder} exists; write the merge to another run folder or pass another iteration "
                             "(--iteration)")
        self.common = _CommonState(source, iteration, unsafe_pickle)
        self.provenance = {**provenance, "iteration": iteration, "common_state": self.common.how,
                           "carried_from": source.path.name}
        present = set(source.names)
        missing = [n for n, _, _ in layout if n not in present]
        if missing:
            raise AssertionError(f"output tensors {missing[:3]} are not in the newest input")
        self.plan = [(name, offsets, sizes) for name, _, _ in layout
                     for offsets, sizes in sorted(source.chunking(name), key=lambda c: (c[0][0] + c[1][0] if c[0] else 0, c[0]))]

    @classmethod
    def open(cls, target: Any) -> "MegatronOutput":
        newest = target.newest_input
        if newest is None or not is_iteration_folder(newest):
            raise ValueError(f"--out-format megatron needs Megatron iteration folders as inputs (the newest input "
                             f"{str(newest)!r} is not one: no {CONFIG} beside a DCP .metadata)")
        # every tensor of the newest input: the optimizer's too, in case the merge was asked to take them
        source = MegatronCheckpoint(newest, unsafe_pickle=set() if target.unsafe_pickle else None,
                                    optimizer_state=True)
        iteration = source.iteration if target.iteration is None else target.iteration
        if iteration is None:
            raise ValueError(f"the newest input {newest} is not named iter_<digits>; pass the output's iteration "
                             "(--iteration / iteration=)")
        return cls(target.path, target.layout, source, iteration, target.provenance, target.unsafe_pickle)

    def write(self, blocks: Iterable[tuple[str, int, int, Tensor]]) -> Path:
        created = not self.run.exists()
        self.run.mkdir(exist_ok=True)
        try:
            return self._write(blocks)
        except BaseException:
            if created and not any(self.run.iterdir()):
                self.run.rmdir()  # a failed merge into a new run folder leaves nothing behind
            raise

    def _write(self, blocks: Iterable[tuple[str, int, int, Tensor]]) -> Path:
        import torch.distributed.checkpoint as dcp

        from .writers import _finish, _in_order, _write_json

        layout = {name: (shape, dtype) for name, shape, dtype in self.layout}
        carried = {n: self.source.raw_bytes(n) for n in self.source.carried if n != COMMON_ENTRY}
        if not self.common.legacy:
            carried[COMMON_ENTRY] = self.common.raw
        with atomic_directory(self.folder) as tmp:
            ordered = _in_order(blocks, self.layout)
            planner = _chunk_planner(self.plan, layout, carried, _chunks(ordered, self.plan, layout))
            writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=False, sync_files=True, thread_count=1)
            try:
                with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the intent
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
            except BaseException:
                if planner.error is not None:
                    raise planner.error from None
                raise
            _finish(ordered)
            if self.common.legacy:
                with open(tmp / COMMON_FILE, "wb") as f:
                    f.write(self.common.raw)
                    f.flush()
                    os.fsync(f.fileno())
            _write_json(tmp / "wsm_merge.json", self.provenance)
            _write_json(tmp / CONFIG, self.source.config)  # last, as megatron-core does: it marks the folder complete
        with atomic_file(self.run / TRACKER, "") as t, open(t, "w") as f:
            f.write(f"{self.iteration}\n")
        return self.folder


def _chunk_planner(plan: Sequence[tuple[str, tuple, tuple]], layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                   carried: Mapping[str, bytes], chunks: Iterator[tuple[str, tuple, Tensor]]) -> Any:
    """A ``DefaultSavePlanner`` that saves ``plan``'s chunks, pulled from ``chunks`` in order, and the ``carried`` bytes."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    items = [WriteItem(index=MetadataIndex(name), type=WriteItemType.BYTE_IO) for name in carried]
    for name, offsets, sizes in plan:
        shape, dtype = layout[name]
        items.append(WriteItem(
            index=MetadataIndex(name, torch.Size(offsets)),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                                        properties=TensorProperties(dtype=dtype), size=torch.Size(shape)),
        ))

    class ChunkPlanner(DefaultSavePlanner):
        error: BaseException | None = None  # what the merge raised (e.g. NaN in an input), unwrapped

        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items, planner_data={})
            return self.plan

        def resolve_data(self, write_item: WriteItem) -> Tensor | io.BytesIO:
            if write_item.type == WriteItemType.BYTE_IO:
                return io.BytesIO(carried[write_item.index.fqn])
            try:
                name, offsets, chunk = next(chunks)
            except BaseException as e:
                self.error = e
                raise
            want = write_item.index
            if name != want.fqn or tuple(offsets) != tuple(want.offset):
                raise AssertionError(f"DCP asked for {want}, the merge produced {name} at {list(offsets)}")
            return chunk

    return ChunkPlanner()

