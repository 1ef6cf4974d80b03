"""Crash-safe writing of state dicts (safetensors or ``torch.save``).

:func:`atomic_save` never leaves a half-written file under the final name: it
writes a temporary file in the destination directory, flushes and fsyncs it,
renames it over the destination with ``os.replace`` (atomic on POSIX and
Windows), then fsyncs the directory so the rename itself survives a power
loss. On any exception (including ``KeyboardInterrupt``) the temporary file is
removed and a previous file under the final name is left untouched.

A process killed hard (``kill -9``, OOM killer, power loss) mid-write cannot
remove its temporary file. Such files are recognisable,
``.NAME.wsmtmp-HOST-PID-RAND.tmp`` (``HOST``: 8 hex digits of a hash of this
machine's host name, ``PID``: the writer's process id), and the next
:func:`atomic_save` to the same ``NAME`` removes the ones whose ``HOST`` is
this machine and whose writer process no longer exists (POSIX only). A live
writer's temporary file (any process, this one included), files of other
hosts sharing the directory, files for other targets and any other file are
never touched. The host is told apart by its host name: containers writing to
one shared directory need distinct host names (the default in Docker and
Kubernetes), else a live writer in another pid namespace could lose its
temporary file; its save would then fail, leaving the previous file intact.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["atomic_save", "remove_stale_temp_files", "infer_format", "FORMATS", "TORCH_SUFFIXES", "TEMP_MARKER"]

#: Supported output formats.
FORMATS = ("safetensors", "torch")
#: File suffixes written with ``torch.save``; any other suffix means safetensors.
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def infer_format(path: str | os.PathLike) -> str:
    """``"torch"`` for ``.pt``/``.pth``/``.bin`` files, ``"safetensors"`` otherwise (the default)."""
    return "torch" if Path(path).suffix.lower() in TORCH_SUFFIXES else "safetensors"


def _safetensors_ready(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Tensors safetensors accepts: CPU, contiguous, dense, no two sharing storage.

    safetensors refuses tied/shared tensors and views; such entries are cloned
    (only those: a dict of fresh tensors costs nothing extra).
    """
    ready: dict[str, Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"atomic_save: safetensors keys must be str, got {type(name).__name__} {name!r}")
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"atomic_save: safetensors stores tensors only; entry {name!r} is a "
                f"{type(tensor).__name__} (use a .pt path to torch.save arbitrary objects)"
            )
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        is_view = storage.nbytes() != t.numel() * t.element_size()
        if is_view or not t.is_contiguous() or (t.numel() and ptr in seen_storages):
            t = t.contiguous().clone()
        elif t.numel():
            seen_storages.add(ptr)
        ready[name] = t
    return ready


def _write_safetensors(state_dict: Mapping[str, Tensor], path: str, metadata: dict[str, str] | None) -> None:
    """Write ``state_dict`` to ``path`` (a fresh temporary file). Tests patch this to inject failures."""
    from safetensors.torch import save_file

    save_file(_safetensors_ready(state_dict), path, metadata=metadata)


def _write_torch(state_dict: Mapping[str, object], path: str, metadata: dict[str, str] | None) -> None:
    """``torch.save`` ``state_dict`` to ``path``; ``metadata`` is ignored (torch files have no header)."""
    with open(path, "wb") as f:
        torch.save(state_dict, f)


_WRITERS = {"safetensors": "_write_safetensors", "torch": "_write_torch"}

#: Marks the temporary files atomic_save creates (see the module docstring).
TEMP_MARKER = "wsmtmp"
# Longest target name used verbatim in a temp name; the marker, host, pid and random
# part add about 40 bytes and most file systems cap a name at 255 bytes.
_MAX_NAME_IN_TEMP = 200


def _host_id() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_stem(path: Path) -> str:
    """``.NAME.wsmtmp-HOST-``: the part of a temp name shared by every writer of ``path`` on this host."""
    name = path.name
    if len(name.encode()) > _MAX_NAME_IN_TEMP:
        short = name.encode()[:100].decode(errors="ignore")  # bytes, not characters, count against the limit
        name = short + "~" + hashlib.sha256(path.name.encode()).hexdigest()[:8]
    return f".{name}.{TEMP_MARKER}-{_host_id()}-"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (conservative: True when unsure)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only, nothing is sent
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by another user
        return True
    return True


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove temp files of :func:`atomic_save` for ``path`` left by dead writers on this host.

    Only names ``.NAME.wsmtmp-HOST-PID-RAND.tmp`` with this host's ``HOST`` and a
    ``PID`` that no process has any more; nothing on Windows (where signal 0
    would terminate the process). A recycled pid only delays the clean-up.
    Returns the removed paths.
    """
    if os.name != "posix":
        return []
    path = Path(path)
    pattern = re.compile(re.escape(_temp_stem(path)) + r"(\d+)-[A-Za-z0-9_]+\.tmp")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # raced with another cleaner, or no permission: not ours to fight over
            pass
    return removed


def _file_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give (mkstemp uses 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # e.g. Windows cannot open directories; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(
    state_dict: Mapping[str, object],
    path: str | os.PathLike,
    format: str | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state_dict`` to ``path`` so that a crash never leaves a partial file there.

    Args:
        state_dict: ``{name: tensor}``. For safetensors every value must be a
            tensor (any dtype/device; written from CPU, contiguous, shared or
            tied tensors cloned apart). ``torch.save`` accepts any picklable dict.
        path: destination. Its directory must exist. An existing file is
            replaced only once the new one is completely on disk.
        format: ``"safetensors"`` or ``"torch"``; ``None`` infers it from the
            suffix (``.pt``/``.pth``/``.bin`` -> torch, anything else -> safetensors).
        metadata: ``{str: str}`` stored in the safetensors header; ignored for torch.

    The temporary file is ``.NAME.wsmtmp-HOST-PID-RAND.tmp`` in ``path``'s
    directory; stale ones for ``path`` (writer process dead, same host) are
    removed first, see :func:`remove_stale_temp_files`.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    fmt = infer_format(path) if format is None else format
    if fmt not in FORMATS:
        raise ValueError(f"atomic_save: format must be one of {FORMATS} or None, got {format!r}")
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise TypeError(f"atomic_save: metadata must map str to str; bad entries: {bad}")
        metadata = dict(metadata)
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"atomic_save: output directory {str(directory)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"atomic_save: {str(path)!r} is a directory")
    writer = globals()[_WRITERS[fmt]]  # looked up at call time so tests can patch it
    remove_stale_temp_files(path)  # before writing: a crashed write may have left a file as big as ours
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_stem(path)}{os.getpid()}-", suffix=".tmp", dir=directory)
    try:
        os.close(fd)
        writer(state_dict, tmp, metadata)
        _fsync_path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_path(directory, directory=True)
    return path
