"""Reading one ``torch.save`` checkpoint file safely (for :class:`wsm_optim.offline.readers.TorchFile`).

:func:`open_checkpoint`, :func:`load_torch_file`: ``torch.save`` files load with
``weights_only=True`` (memory-mapped for the zip format). A file that
safe loading refuses is told apart from a corrupt one by walking its pickles
without executing them, so only a well-formed file suggests ``unsafe_pickle``
(which warns with :class:`UnsafePickleWarning`).
"""

from __future__ import annotations

import contextlib
import pickletools
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..common.text import a

__all__ = ["open_checkpoint", "load_torch_file", "CheckpointFile", "UnsafePickleWarning", "select_key",
           "check_state_dict"]


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
    """One open ``torch.save`` checkpoint: ``names`` (in file order), ``meta(name)`` and ``tensor(name)``.

    (safetensors files are read by :class:`wsm_optim.offline.readers.SafetensorsFile`, never through here.)
    """

    def __init__(self, path: Path, key: str | None, unsafe_pickle: set[Path] | None) -> None:
        self.path = path
        obj = load_torch_file(path, unsafe_pickle is not None, set() if unsafe_pickle is None else unsafe_pickle)
        if key is not None:
            obj = select_key(obj, key, path)
        self._sd: dict[str, Tensor] | None = check_state_dict(obj, path, key)
        self.names = list(self._sd)

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._sd[name]
        return tuple(t.shape), t.dtype

    def tensor(self, name: str) -> Tensor:
        return self._sd[name]


@contextlib.contextmanager
def open_checkpoint(path: Path, key: str | None, unsafe_pickle: set[Path] | None) -> Iterator[CheckpointFile]:
    """``unsafe_pickle``: None = refuse unsafe pickles; a set = allow them, warning once per file in it."""
    reader = CheckpointFile(path, key, unsafe_pickle)
    try:
        yield reader
    finally:
        # Drop the tensors now: a name still bound to the reader must not keep
        # this checkpoint in memory while the next one loads.
        reader._sd = None
