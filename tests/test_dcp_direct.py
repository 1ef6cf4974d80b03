"""Reading DCP rows straight from the saved files (:mod:`wsm_optim.offline.dcp_rows`) against ``dcp.load``.

Checkpoints are written by torch's own ``FileSystemWriter`` with saved chunks
of any box shape (row shards as FSDP writes, column shards as TP writes) and
dtype; a chunk saved with a transposed layout must be left to ``dcp.load``.
The FSDP2-written inputs are covered in ``test_offline_formats.py``.
"""

from __future__ import annotations

import io
import struct
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsm_optim.offline.readers import DCPDirectory
from wsm_optim.offline.dcp_rows import plain_tensor_offset

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64]


def _save_chunks(path: Path, tensors: dict[str, tuple[torch.Tensor, list[tuple[tuple, tuple]], bool]]) -> Path:
    """A DCP directory holding each tensor as the given chunks ``(offsets, sizes)``; with ``transposed`` each
    chunk is stored column-major (contiguous storage, strides of the transpose)."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    items, data = [], {}
    for name, (t, boxes, transposed) in tensors.items():
        for offsets, sizes in boxes:
            index = MetadataIndex(name, torch.Size(offsets))
            chunk = t[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
            data[index] = chunk.t().contiguous().t() if transposed else chunk.contiguous()
            items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                properties=TensorProperties(dtype=t.dtype), size=t.shape)))

    class ChunkPlanner(DefaultSavePlanner):
        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items, planner_data={})
            return self.plan

        def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
            return data[write_item.index]

    dcp.save({}, storage_writer=dcp.FileSystemWriter(str(path)), planner=ChunkPlanner(), no_dist=True)
    return path


def _boxes(shape: tuple[int, ...], row_cuts: list[int], col_cuts: list[int]) -> list[tuple[tuple, tuple]]:
    rows = [0, *sorted(set(row_cuts)), shape[0]]
    cols = [0, *sorted(set(col_cuts)), shape[1]] if len(shape) == 2 else [None, None]
    out = []
    for r0, r1 in zip(rows, rows[1:]):
        for c0, c1 in zip(cols, cols[1:]):
            out.append(((r0,), (r1 - r0,)) if c0 is None else ((r0, c0), (r1 - r0, c1 - c0)))
    return out


@st.composite
def _layouts(draw):
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(1, 9))
    shape = (rows, draw(st.integers(1, 4))) if draw(st.booleans()) else (rows,)
    row_cuts = draw(st.lists(st.integers(1, rows - 1), max_size=3)) if rows > 1 else []
    col_cuts = draw(st.lists(st.integers(1, shape[1] - 1), max_size=2)) if len(shape) == 2 and shape[1] > 1 else []
    transposed = len(shape) == 2 and draw(st.booleans())
    a = draw(st.integers(0, rows - 1))
    b = draw(st.integers(a + 1, rows))
    return dtype, shape, row_cuts, col_cuts, transposed, (a, b)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_layouts())
def test_direct_rows_equal_dcp_load_for_any_chunk_layout(layout):
    dtype, shape, row_cuts, col_cuts, transposed, (a, b) = layout
    g = torch.Generator().manual_seed(len(row_cuts) * 7 + a)
    t = (torch.randn(shape, generator=g) * 100).to(dtype)
    boxes = _boxes(shape, row_cuts, col_cuts)
    with tempfile.TemporaryDirectory() as tmp:
        path = _save_chunks(Path(tmp) / "ck", {"w": (t, boxes, transposed),
                                                "s": (t.flatten()[0].clone(), [((), ())], False)})
        direct, via_dcp = DCPDirectory(path), DCPDirectory(path, direct_reads=False)
        # a plainly stored chunk is read directly; a transposed one (non-contiguous strides) goes to dcp.load
        column_major = transposed and any(min(sizes) > 1 for _, sizes in boxes)
        assert (direct.row_blocks("w") is None) == (not column_major)
        assert direct.row_blocks("s") is None
        for name, (lo, hi) in (("w", (a, b)), ("s", (0, 1))):
            want = t[lo:hi] if name == "w" else t.flatten()[0]
            got, ref = direct.read(name, lo, hi), via_dcp.read(name, lo, hi)
            assert got.dtype == dtype and torch.equal(got, want) and torch.equal(ref, want), (name, lo, hi)
        buf = torch.full((t[a:b].numel(),), 3, dtype=dtype)  # a reused buffer is filled, not reallocated
        got = direct.read("w", a, b, buf)
        assert got.data_ptr() == buf.data_ptr() and torch.equal(got, t[a:b])


def _record(obj, prefix: bytes = b"x" * 100) -> tuple[bytes, int, int]:
    """``torch.save(obj)`` bytes after ``prefix`` (as DCP stores items at offsets of a file): data, start, length."""
    f = io.BytesIO()
    torch.save(obj, f)
    return prefix + f.getvalue(), len(prefix), len(f.getvalue())


@pytest.mark.parametrize("dtype", [*DTYPES, torch.bool, torch.complex64])
@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 1, 4)])
def test_plain_tensor_offset_finds_the_raw_bytes(tmp_path, dtype, shape):
    t = (torch.randn(shape) * 10).to(dtype)
    data, start, length = _record(t)
    (tmp_path / "f").write_bytes(data)
    with open(tmp_path / "f", "rb") as f:
        at = plain_tensor_offset(f.fileno(), start, length, dtype, shape)
    assert at is not None and start < at < start + length
    raw = data[at:at + t.numel() * dtype.itemsize]
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=dtype).view(shape), t)


def _zip64(archive: bytes) -> bytes:
    """The same stored members with every size and offset in zip64 fields and a zip64 end record, as a
    ``torch.save`` record over 4 GiB has them (built by hand: 4 GiB of test data is out of reach)."""
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        members = [(i.filename.encode(), z.read(i), i.CRC) for i in z.infolist()]
    out, central, big = bytearray(), bytearray(), 0xFFFFFFFF
    for name, data, crc in members:
        offset, n = len(out), len(data)
        extra = struct.pack("<HHQQ", 1, 16, n, n)
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, 0, 0, 0, crc, big, big, len(name), len(extra))
        out += name + extra + data
        extra = struct.pack("<HHQQQ", 1, 24, n, n, offset)
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0, 0, 0, 0, crc, big, big,
                               len(name), len(extra), 0, 0, 0, 0, big) + name + extra
    cd_offset, end64 = len(out), len(out) + len(central)
    out += central
    out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, len(members), len(members), len(central),
                       cd_offset)
    out += struct.pack("<4sIQI", b"PK\x06\x07", 0, end64, 1)
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, big, big, 0)
    return bytes(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_tensor_offset_reads_zip64_records(tmp_path, dtype):
    t = torch.randn(5, 3).to(dtype)
    plain, start, _ = _record(t)
    wide = _zip64(plain[start:])
    assert torch.equal(torch.load(io.BytesIO(wide)), t)  # a zip64 archive torch itself reads
    data = plain[:start] + wide
    (tmp_path / "f").write_bytes(data)
    with open(tmp_path / "f", "rb") as f:
        at = plain_tensor_offset(f.fileno(), start, len(wide), dtype, (5, 3))
        assert at is not None
        assert torch.equal(torch.frombuffer(bytearray(data[at:at + t.numel() * dtype.itemsize]), dtype=dtype).view(5, 3), t)
        for cut in (len(wide) - 30, 200):  # the zip64 end record or the central directory cut off
            assert plain_tensor_offset(f.fileno(), start, cut, dtype, (5, 3)) is None, cut


def test_plain_tensor_offset_leaves_everything_else_to_torch_load(tmp_path):
    base = torch.arange(12, dtype=torch.float32).view(3, 4)
    cases = {
        "transposed": (base.t().contiguous().t(), torch.float32, (3, 4)),
        "storage offset": (base.view(-1)[2:], torch.float32, (10,)),
        "dtype": (base, torch.float64, (3, 4)),
        "shape": (base, torch.float32, (4, 3)),
        "parameter": (torch.nn.Parameter(base), torch.float32, (3, 4)),
        "dict": ({"w": base}, torch.float32, (3, 4)),
    }
    for what, (obj, dtype, shape) in cases.items():
        data, start, length = _record(obj)
        for name, blob, n in ((what, data, length), (f"{what}, truncated", data[:start + length // 2], length // 2),
                              (f"{what}, garbage", data[:start] + b"\0" * length, length)):
            (tmp_path / "f").write_bytes(blob)
            with open(tmp_path / "f", "rb") as f:
                assert plain_tensor_offset(f.fileno(), start, n, dtype, shape) is None, name
