"""Crash-safe writing of state dicts (safetensors or ``torch.save``), shared by ``save_merged`` and the offline tool.

:func:`atomic_save` never leaves a half-written file under the final name: it
writes a temporary file in the destination directory, flushes and fsyncs it,
renames it over the destination with ``os.replace`` (atomic on POSIX and
Windows), then fsyncs the directory so the rename itself survives a power
loss. On any exception (including ``KeyboardInterrupt``) the temporary file is
removed and a previous file under the final name is left untouched. A symlink
is written through (its target gets the new content, the link stays) and an
existing file keeps its permission bits.

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

import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "atomic_save",
    "atomic_file",
    "atomic_directory",
    "remove_stale_temp_files",
    "infer_format",
    "FORMATS",
    "TORCH_SUFFIXES",
    "TEMP_MARKER",
]

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
    """Remove temp files of :func:`atomic_save` (and directories of :func:`atomic_directory`) for ``path`` left by dead writers on this host.

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
            elif entry.is_dir(follow_symlinks=False):  # an atomic_directory in progress when its writer died
                shutil.rmtree(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # raced with another cleaner, or no permission: not ours to fight over
            pass
    return removed


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _file_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give (mkstemp uses 0o600)."""
    return 0o666 & ~_umask()


def _mode_for(target: Path) -> int:
    """Permission bits for ``target``: an existing file keeps its own (0600 stays 0600), a new one follows the umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return _file_mode()


def write_target(path: Path, who: str = "") -> Path:
    """The file a write to ``path`` must replace: ``path`` itself, or for a symlink the file it points to.

    Replacing the link itself would leave the file it points to with the old
    content (and turn the link into a plain file). Raises ``FileNotFoundError``
    naming the path that is wrong (the link, its target and the target's missing
    directory), ``IsADirectoryError`` for a directory; ``who`` prefixes the messages.
    """
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    via = f" (symlink {str(path)!r} points to {str(target)!r})" if target is not path else ""
    if target.is_dir():
        raise IsADirectoryError(f"{who}{str(target)!r} is a directory{via}")
    if not target.parent.is_dir():
        if via:
            raise FileNotFoundError(
                f"{who}output {str(path)!r} is a symlink to {str(target)!r}, whose directory "
                f"{str(target.parent)!r} does not exist"
            )
        raise FileNotFoundError(f"{who}output directory {str(target.parent)!r} does not exist")
    return target


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
            replaced only once the new one is completely on disk, and keeps
            its permission bits. A symlink is written through: the file it
            points to gets the new content, the link stays a link.
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
    writer = globals()[_WRITERS[fmt]]  # looked up at call time so tests can patch it
    with atomic_file(path) as tmp:
        writer(state_dict, tmp, metadata)
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, who: str = "atomic_save: ") -> Iterator[str]:
    """Yield a temporary file name to write; on success it replaces ``path`` (fsync, rename, fsync dir).

    The crash-safety of :func:`atomic_save` for any writer: on an exception the
    temporary file is removed and ``path`` is untouched. ``path`` may be a
    symlink (its target is replaced) and keeps its permission bits.
    """
    target = write_target(Path(path), who)
    directory = target.parent
    remove_stale_temp_files(target)  # before writing: a crashed write may have left a file as big as ours
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_stem(target)}{os.getpid()}-", suffix=".tmp", dir=directory)
    try:
        os.close(fd)
        yield tmp
        _fsync_path(tmp)
        os.chmod(tmp, _mode_for(target))
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_path(directory, directory=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, who: str = "") -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it is renamed to ``path`` (complete or not at all).

    ``path`` must not exist, or be an empty directory (replaced); a non-empty
    one is refused (never deleted). The files written inside must be fsynced
    by their writers; the directory entries are fsynced here. On an exception
    the temporary directory and everything in it are removed. Stale temporary
    directories of dead writers on this host are removed first, as for files.
    """
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ValueError(f"{who}output {str(target)!r} exists and is not a directory; choose a new path")
    if target.is_dir() and any(target.iterdir()):
        raise ValueError(
            f"{who}output directory {str(target)!r} exists and is not empty; remove it or choose a new path "
            "(the output is written to a temporary directory and renamed, so it never mixes with old files)"
        )
    if not target.parent.is_dir():
        raise FileNotFoundError(f"{who}output directory {str(target.parent)!r} does not exist")
    remove_stale_temp_files(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_stem(target)}{os.getpid()}-", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp gives 0o700; a plain mkdir follows the umask
        yield tmp
        _fsync_path(tmp, directory=True)
        try:
            if target.is_dir():
                target.rmdir()  # empty (checked above); rename cannot replace a directory on every system
            os.rename(tmp, target)
        except OSError as e:
            if not (target.exists() or target.is_symlink()):
                raise
            raise ValueError(  # another writer (e.g. a second merge to the same path) finished first
                f"{who}output {str(target)!r} was created by another writer while this one was written; "
                "it is left as it is and this output is discarded: choose a new path"
            ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(target.parent, directory=True)
