"""Progress of long work that reads well on a terminal and in a log.

On a terminal: a tqdm bar. Anywhere else (a log file, a pipe, CI): a tqdm bar
would print one frozen ``0%`` line, so :class:`Progress` prints a plain line
instead, at most every ``period`` seconds and at the end::

    training: 120/384 steps (31%), elapsed 0:00:12, ETA 0:00:26, loss 1.234

Torch-free; tqdm is imported only for a terminal.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``3725.4`` -> ``"1:02:05"``."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Count ``total`` units of work; show them as a bar (terminal) or periodic lines (log).

    Args:
        total: units of work expected (``> 0``).
        desc: what is being done, e.g. ``"training"``.
        unit: the unit's name, e.g. ``"step"`` (pluralised with ``s`` in lines).
        enabled: ``True`` always shows, ``False`` never, ``None`` (default) shows
            a bar on a terminal and lines elsewhere.
        period: seconds between two lines when not on a terminal.
        file: where to write (default ``sys.stderr``).
    """

    def __init__(self, total: int, desc: str, unit: str = "it", *, enabled: bool | None = None,
                 period: float = 30.0, file: IO[str] | None = None) -> None:
        self.total, self.desc, self.unit, self.period = int(total), desc, unit, float(period)
        self.file = file if file is not None else sys.stderr
        self.count = 0
        self.fields: dict[str, Any] = {}
        self.start = self._last = time.monotonic()
        self._bar = None
        self._lines = enabled is not False
        if enabled is not False and _is_terminal(self.file):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.file, leave=False)
            self._lines = False

    def update(self, n: int = 1, **fields: Any) -> None:
        """Count ``n`` more units; ``fields`` (e.g. ``loss=1.23``) are shown with the next line or bar refresh."""
        self.count += n
        self.fields.update(fields)
        if self._bar is not None:
            if fields:
                self._bar.set_postfix({k: _short(v) for k, v in self.fields.items()}, refresh=False)
            self._bar.update(n)
        elif self._lines and time.monotonic() - self._last >= self.period and self.count < self.total:
            self.write_line()

    def line(self) -> str:
        """The current progress as one line of text."""
        elapsed = time.monotonic() - self.start
        share = self.count / self.total if self.total else 1.0
        eta = f", ETA {format_seconds(elapsed / share - elapsed)}" if 0 < share < 1 else ""
        extra = "".join(f", {k} {_short(v)}" for k, v in self.fields.items())
        return (f"{self.desc}: {self.count}/{self.total} {self.unit}s ({share:.0%}), "
                f"elapsed {format_seconds(elapsed)}{eta}{extra}")

    def write_line(self) -> None:
        print(self.line(), file=self.file, flush=True)
        self._last = time.monotonic()

    def close(self) -> None:
        """Remove the bar, or print the final line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._lines:
            self.write_line()
            self._lines = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _is_terminal(file: IO[str]) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
