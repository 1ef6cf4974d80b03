"""Where a DCP checkpoint keeps a saved chunk's raw bytes, so rows can be read without loading the chunk.

torch's ``FileSystemWriter`` stores each tensor chunk as a ``torch.save`` zip
archive at ``storage_data[index] = _StorageInfo(relative_path, offset, length)``
in one of the checkpoint's files. Such an archive stores its members
uncompressed: ``archive/data.pkl`` (the pickled tensor: storage key, storage
offset, size, stride), ``archive/byteorder`` and ``archive/data/<key>`` (the
storage's bytes). When the pickle describes a plain contiguous tensor that
covers its whole storage, in the chunk's dtype and shape, little-endian, rows
``a:b`` of the chunk are the bytes ``[start + a * row_bytes, start + b * row_bytes)``
of the file, with ``start`` what :func:`plain_tensor_offset` returns.

A chunk over 4 GiB makes its record a zip64 archive (64-bit sizes and offsets
in the central directory's extra fields and a zip64 end record); both forms
are read. Anything else (a compressed or transformed item, a strided or offset
view, another pickle, a malformed layout) returns ``None``: the caller reads
that chunk through ``dcp.load`` instead.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
from collections import OrderedDict
from typing import Any

import torch

__all__ = ["plain_tensor_offset"]

_EOCD = b"PK\x05\x06"  # end of central directory record
_EOCD64 = b"PK\x06\x06"  # zip64 end of central directory record
_EOCD64_LOCATOR = b"PK\x06\x07"  # just before the EOCD: where the zip64 record is
_CENTRAL = b"PK\x01\x02"  # central directory file header
_LOCAL = b"PK\x03\x04"  # local file header
_STORED = 0  # zip compression method: none
_ZIP64_EXTRA = 0x0001
_TAIL_BYTES = 64 << 10  # the central directory of a tensor record is well under 1 KiB; a zip comment is at most 64 KiB
_HEAD_BYTES = 4 << 10  # data.pkl and byteorder of a tensor record lie in its first few hundred bytes

# The legacy typed-storage class names that torch.save pickles, and their dtypes.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    return data if len(data) == size else b""


def _members(fd: int, start: int, length: int) -> dict[str, tuple[int, int, int, int]] | None:
    """``{name: (method, compressed size, size, local header offset)}`` from the central directory of the
    zip archive at ``[start, start + length)`` of ``fd`` (offsets relative to ``start``)."""
    tail_len = min(length, _TAIL_BYTES)
    tail = _pread(fd, tail_len, start + length - tail_len)
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        return None
    count, cd_size, cd_offset = struct.unpack_from("<HII", tail, at + 10)
    if count == 0xFFFF or 0xFFFFFFFF in (cd_size, cd_offset):
        if at < 20 or tail[at - 20:at - 16] != _EOCD64_LOCATOR:
            return None
        record = _pread(fd, 56, start + struct.unpack_from("<Q", tail, at - 12)[0])
        if record[:4] != _EOCD64:
            return None
        count, cd_size, cd_offset = struct.unpack_from("<QQQ", record, 32)
    if cd_offset + cd_size > length:
        return None
    cd_in_tail = cd_offset - (length - tail_len)
    cd = tail[cd_in_tail:cd_in_tail + cd_size] if cd_in_tail >= 0 else _pread(fd, cd_size, start + cd_offset)
    if len(cd) != cd_size:
        return None
    out: dict[str, tuple[int, int, int, int]] = {}
    pos = 0
    for _ in range(count):
        if cd[pos:pos + 4] != _CENTRAL or pos + 46 > len(cd):
            return None
        method, = struct.unpack_from("<H", cd, pos + 10)
        csize, size, n_name, n_extra, n_comment = struct.unpack_from("<IIHHH", cd, pos + 20)
        header, = struct.unpack_from("<I", cd, pos + 42)
        name = cd[pos + 46:pos + 46 + n_name].decode("utf-8", "replace")
        if 0xFFFFFFFF in (csize, size, header):
            wide = _zip64_fields(cd[pos + 46 + n_name:pos + 46 + n_name + n_extra], size, csize, header)
            if wide is None:
                return None
            size, csize, header = wide
        out[name] = (method, csize, size, header)
        pos += 46 + n_name + n_extra + n_comment
    return out


def _zip64_fields(extra: bytes, size: int, csize: int, header: int) -> tuple[int, int, int] | None:
    """``(size, compressed size, local header offset)`` with each field that is ``0xFFFFFFFF`` read from the
    zip64 extra field, where they follow in that order (APPNOTE 4.5.3)."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        if tag == _ZIP64_EXTRA:
            body, out = extra[pos + 4:pos + 4 + n], []
            for value in (size, csize, header):
                if value == 0xFFFFFFFF:
                    if len(body) < 8:
                        return None
                    value, body = struct.unpack_from("<Q", body)[0], body[8:]
                out.append(value)
            return out[0], out[1], out[2]
        pos += 4 + n
    return None


def _data_start(fd: int, start: int, length: int, header: int, head: bytes) -> int | None:
    """Offset (relative to ``start``) of the data of the member whose local header is at ``header``."""
    local = head[header:header + 30] if header + 30 <= len(head) else _pread(fd, 30, start + header)
    if len(local) != 30 or local[:4] != _LOCAL:
        return None
    n_name, n_extra = struct.unpack_from("<HH", local, 26)
    return header + 30 + n_name + n_extra


def _member_bytes(fd: int, start: int, length: int, member: tuple[int, int, int, int], head: bytes) -> bytes | None:
    method, csize, size, header = member
    at = _data_start(fd, start, length, header, head)
    if method != _STORED or csize != size or at is None or at + size > length:
        return None
    return head[at:at + size] if at + size <= len(head) else _pread(fd, size, start + at)


class _TensorRecord(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a ``torch.save``\\ d tensor into a description: nothing is built, no code runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: ("tensor", storage, offset, tuple(size), tuple(stride))
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name}")  # a parameter, a subclass, a quantized tensor...

    def persistent_load(self, pid: Any) -> Any:
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(repr(pid))
        return ("storage", dtype, str(key), int(numel))


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for s in reversed(shape):
        strides.append(step)
        step *= max(s, 1)
    return tuple(reversed(strides))


def plain_tensor_offset(fd: int, start: int, length: int, dtype: torch.dtype, shape: tuple[int, ...]) -> int | None:
    """Absolute file offset of the raw bytes of the ``torch.save``\\ d tensor stored at ``[start, start + length)``
    of ``fd``, when it is a plain contiguous little-endian tensor of ``dtype`` and ``shape`` whose
    bytes are stored uncompressed; else ``None`` (see the module docstring)."""
    if sys.byteorder != "little":  # pragma: no cover - the raw bytes would need swapping
        return None
    members = _members(fd, start, length)
    if not members:
        return None
    prefix = next((n[: -len("data.pkl")] for n in members if n.endswith("/data.pkl")), None)
    if prefix is None or prefix + "byteorder" not in members:
        return None  # no byteorder record: an old writer, leave it to torch.load
    head = _pread(fd, min(length, _HEAD_BYTES), start)
    pkl = _member_bytes(fd, start, length, members[prefix + "data.pkl"], head)
    order = _member_bytes(fd, start, length, members[prefix + "byteorder"], head)
    if pkl is None or order != b"little":
        return None
    try:
        record = _TensorRecord(io.BytesIO(pkl)).load()
    except Exception:  # noqa: BLE001 - whatever it is, it is not a plain tensor record
        return None
    if not (isinstance(record, tuple) and record[0] == "tensor" and isinstance(record[1], tuple)):
        return None
    _, (_, st_dtype, key, numel), storage_offset, size, stride = record
    nelem = 1
    for s in shape:
        nelem *= s
    if (st_dtype != dtype or storage_offset != 0 or size != tuple(shape) or numel != nelem or len(stride) != len(size)
            or any(st != want for n, st, want in zip(size, stride, _contiguous_strides(size)) if n > 1)):
        return None
    data = members.get(f"{prefix}data/{key}")
    if data is None:
        return None
    method, csize, size_bytes, header = data
    at = _data_start(fd, start, length, header, head)
    if method != _STORED or csize != size_bytes or size_bytes != nelem * dtype.itemsize or at is None \
            or at + size_bytes > length:
        return None
    return start + at
