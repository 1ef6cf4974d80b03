"""Checkpoint files: safe reading and crash-safe writing (safetensors or ``torch.save``).

Reading (:func:`open_checkpoint`, :func:`load_torch_file`): safetensors files
are opened lazily (names, shapes and dtypes without loading data); ``torch.save``
files load with ``weights_only=True`` (memory-mapped for the zip format). A file
that safe loading refuses is told apart from a corrupt one by walking its
pickles without executing them, so only a well-formed file suggests
``unsafe_pickle`` (which warns with :class:`UnsafePickleWarning`).

Writing: :func:`atomic_save` never leaves a half-written file under the final name: it
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
import pickletools
import re
import shutil
import socket
import stat
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .text import a

__all__ = [
    "atomic_save",
    "atomic_file",
    "atomic_directory",
    "remove_stale_temp_files",
    "infer_format",
    "open_checkpoint",
    "load_torch_file",
    "CheckpointFile",
    "UnsafePickleWarning",
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


# ------------------------------------------------------------------ reading
class UnsafePickleWarning(UserWarning):
    """A checkpoint was unpickled with ``weights_only=False`` (it can run arbitrary code)."""


def select_key(obj: Any, key: str, path: Path, full_key: str | None = None) -> Any:
    """``obj[key]``, where a dotted ``key`` may also walk nested dicts (``"state.model"``)."""
    full_key = key if full_key is None else full_key
    where = "" if key == full_key else f" (looking up {key!r} inside {full_key[: -len(key) - 1]!r})"
    if not isinstance(obj, Mapping):
        raise ValueError(f"--key {full_key!r}: {path} holds {a(type(obj).__name__)}, not a dict{where}")
    if key in obj:
        return obj[key]
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in obj and isinstance(obj[head], Mapping):
            return select_key(obj[head], ".".join(parts[i:]), path, full_key)
    shown = ", ".join(repr(k) for k in list(obj)[:20])
    raise ValueError(f"--key {full_key!r} not found in {path}{where}; available keys: {shown}")


def check_state_dict(obj: Any, path: Path, key: str | None) -> dict[str, Tensor]:
    where = f"{path}" + (f" (under --key {key!r})" if key else "")
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} holds {a(type(obj).__name__)}, not a state dict {{name: tensor}}")
    for name, value in obj.items():
        if not isinstance(name, str):
            raise ValueError(f"{where}: key {name!r} is not a string; not a state dict")
        if not isinstance(value, Tensor):
            hint = (
                "; this looks like a training checkpoint: pick the model's state dict with --key "
                f"(top-level keys: {', '.join(repr(k) for k in list(obj)[:20])})"
                if isinstance(value, Mapping) and key is None
                else ""
            )
            raise ValueError(f"{where}: entry {name!r} is {a(type(value).__name__)}, not a tensor{hint}")
        if value.is_sparse or value.layout != torch.strided:
            raise ValueError(f"{where}: entry {name!r} is {a(str(value.layout))} tensor; only dense tensors merge")
    return dict(obj)


def _load_error_reason(e: BaseException) -> str:
    """The informative part of a ``torch.load`` error: the weights-only unpickler's reason, else line 1."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        after = text.split(marker, 1)[1].split("Check the documentation of torch.load", 1)[0]
        reason = " ".join(ln.strip() for ln in after.splitlines() if ln.strip())
        if reason:
            return reason
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else repr(e)}"


def _parse_pickles(stream: Any, count: int | None) -> None:
    """Walk ``count`` consecutive pickles (``None``: exactly one, then end of data) without executing any.

    ``pickletools.genops`` decodes opcodes and their arguments only (no
    globals imported, nothing called), so this is safe on untrusted files.
    Raises ``ValueError`` on an invalid opcode or a truncated pickle.
    """
    for _ in range(1 if count is None else count):
        stopped = False
        for op, _arg, _pos in pickletools.genops(stream):
            stopped = op.name == "STOP"
        if not stopped:
            raise ValueError("pickle data ends without STOP")
    if count is None and stream.read(1):
        raise ValueError("data after the end of the pickle")


def _is_valid_pickle_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a well-formed ``torch.save`` file, judged without unpickling anything.

    zip format (torch >= 1.6): the archive and its ``*/data.pkl`` member (CRC
    checked) must read, and that member must be one complete pickle. Legacy
    format: the magic-number, protocol and system-info pickles, then the object
    pickle and the storage-keys pickle must all decode.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                members = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if len(members) != 1:
                    return False
                _parse_pickles(BytesIO(z.read(members[0])), None)
            return True
        with open(path, "rb") as f:
            _parse_pickles(f, 5)
        return True
    except Exception:  # noqa: BLE001 - any decoding failure means "not a valid file"
        return False


def load_torch_file(path: Path, unsafe_pickle: bool, warned: set[Path]) -> Any:
    mmap = zipfile.is_zipfile(path)  # mmap needs the zip format (torch.save's default since 1.6)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - re-raised with a message naming the file
        text = str(e)
        # Random bytes also fail inside the weights-only unpickler ("Unsupported operand"), so its
        # refusal alone does not mean "valid but unsafe": only a file whose pickles decode is.
        refused = "Weights only load failed" in text and _is_valid_pickle_checkpoint(path)
        if not refused:
            size = path.stat().st_size
            detail = "it is empty (0 bytes)" if size == 0 else f"{size} bytes; torch.load: {_load_error_reason(e)}"
            raise ValueError(
                f"cannot read {path}: the file is corrupt or not a torch.save checkpoint (a safetensors file needs the "
                f".safetensors suffix): {detail}"
            ) from e
        reason = _load_error_reason(e)
        if not unsafe_pickle:
            raise ValueError(
                f"{path} holds objects that safe loading (torch.load weights_only=True) refuses"
                f"{': ' + reason if reason else ''}. Loading it means unpickling, which can execute "
                "arbitrary code stored in the file; only if you trust where it comes from, pass "
                "--unsafe-pickle (unsafe_pickle=True)"
            ) from e
    if path not in warned:  # once per file, though it is opened twice (check pass, merge pass)
        warned.add(path)
        warnings.warn(
            f"--unsafe-pickle: loading {path} with torch.load(weights_only=False). Unpickling runs any code "
            "stored in the file; do this only for files you created or fully trust",
            UnsafePickleWarning,
            stacklevel=4,
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot unpickle {path}: {type(e).__name__}: {e}") from e


class CheckpointFile:
    """One open checkpoint: ``names`` (in file order), ``meta(name)`` and ``tensor(name)``."""

    def __init__(
        self, path: Path, key: str | None, unsafe_pickle: set[Path] | None, stack: contextlib.ExitStack
    ):
        self.path = path
        self._st = None
        self._sd: dict[str, Tensor] | None = None
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import _TYPES

            try:
                self._st = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"cannot read {path} as a safetensors file: {e}") from e
            self._types = _TYPES
            names = list(self._st.keys())
            if key is not None:
                prefix = key + "."
                self._full = {n[len(prefix):]: n for n in names if n.startswith(prefix)}
                if not self._full:
                    tops = sorted({n.split(".")[0] for n in names})[:20]
                    raise ValueError(
                        f"--key {key!r}: no tensor in {path} is named {prefix + '*'!r} "
                        f"(safetensors files are flat; first name parts present: {tops})"
                    )
            else:
                self._full = {n: n for n in names}
            self.names = list(self._full)
        else:
            obj = load_torch_file(path, unsafe_pickle is not None, set() if unsafe_pickle is None else unsafe_pickle)
            if key is not None:
                obj = select_key(obj, key, path)
            self._sd = check_state_dict(obj, path, key)
            self.names = list(self._sd)

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if self._st is not None:
            sl = self._st.get_slice(self._full[name])
            dt = sl.get_dtype()
            if dt not in self._types:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported safetensors dtype {dt}")
            return tuple(sl.get_shape()), self._types[dt]
        t = self._sd[name]
        return tuple(t.shape), t.dtype

    def tensor(self, name: str) -> Tensor:
        if self._st is not None:
            return self._st.get_tensor(self._full[name])
        return self._sd[name]


@contextlib.contextmanager
def open_checkpoint(path: Path, key: str | None, unsafe_pickle: set[Path] | None) -> Iterator[CheckpointFile]:
    """``unsafe_pickle``: None = refuse unsafe pickles; a set = allow them, warning once per file in it."""
    with contextlib.ExitStack() as stack:
        reader = CheckpointFile(path, key, unsafe_pickle, stack)
        try:
            yield reader
        finally:
            # Drop the tensors now: a name still bound to the reader must not keep
            # this checkpoint in memory while the next one loads.
            reader._sd = None
            reader._st = None
