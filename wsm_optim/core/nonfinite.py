"""The NaN/inf policy: the error, the finiteness check of readouts, and the skip ledger.

``nonfinite="raise"`` (default) costs nothing per step: a non-finite value that
reaches a merge poisons its accumulator, and readouts find it with one host
sync per readout (:class:`FiniteCheck`). ``nonfinite="skip"`` checks each
checkpoint on the device before it is folded in and leaves bad ones out; the
:class:`SkipLedger` counts the weight left out per window (device scalars, no
host sync per step) so that readouts can renormalise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..common.warn import warn
from .spec import NONFINITE_MODES  # re-exported: the option rules live in spec

__all__ = ["NonFiniteMergeError", "FiniteCheck", "SkipLedger", "nonfinite_error", "NONFINITE_MODES"]



class NonFiniteMergeError(RuntimeError):
    """A merge readout holds NaN/inf: a checkpoint of the window (or the live params) was not finite."""


def nonfinite_error(
    merge: str, window: int, first_step: int, window_steps: int, label: str, mode: str, steps=None
) -> NonFiniteMergeError:
    """The error a readout raises, naming the merge, the window (with its step range) and the param."""
    seen = f"; the kernel read non-finite values at steps {steps[0]}..{steps[1]}" if steps else ""
    if mode == "skip":  # skipped checkpoints never reach A: only the live term can be bad
        hint = "Checkpoints are skipped in this mode, so the live params themselves are non-finite now"
    else:
        hint = (
            "A checkpoint in this window (or the live params) held non-finite values; "
            "construct with nonfinite='skip' to leave such checkpoints out"
        )
    return NonFiniteMergeError(
        f"merge {merge!r}, window {window} (steps {first_step}..{first_step + window_steps}): the merged "
        f"value of parameter {label} is NaN/inf{seen}. {hint}"
    )


class FiniteCheck:
    """Collect one device flag per readout tensor; :meth:`first_bad` syncs with the host once.

    The flag is ``isfinite(sum(v))``: a reduction, so no temporary as large as
    the tensor. A sum can also overflow on finite values; a tensor flagged that
    way is re-checked element by element before it is blamed.
    """

    def __init__(self) -> None:
        self._flags: dict[torch.device, list[Tensor]] = {}
        self._entries: list[tuple[Any, Tensor, torch.device, int]] = []

    def add(self, key: Any, value: Tensor, recheck: Tensor | None = None) -> None:
        """Flag ``value`` (a local tensor).

        ``recheck``: the tensor to check element by element if the flag is
        raised (default ``value``; pass the kept output when ``value`` is freed).
        """
        with torch.no_grad():
            flags = self._flags.setdefault(value.device, [])
            flags.append(torch.isfinite(value.sum()).reshape(1))
        self._entries.append((key, value if recheck is None else recheck, value.device, len(flags) - 1))

    def first_bad(self) -> Any | None:
        """The key of the first non-finite tensor, else ``None`` (one host sync per device)."""
        flags = {d: torch.cat(f).tolist() for d, f in self._flags.items()}
        for key, value, device, index in self._entries:
            if flags[device][index]:
                continue
            if not bool(torch.isfinite(value).all()):
                return key
        return None


class SkipLedger:
    """Skip mode: weight and count of the checkpoints left out of one merge's window.

    ``mass``/``count`` belong to the current window, ``completed`` to the last
    completed one (kept with ``keep_last``). float64 device scalars: recording
    costs no host sync, and a float64 merge loses no precision to its ledger;
    readouts read them (one sync) to renormalise.
    """

    def __init__(self) -> None:
        self.mass: Tensor | None = None
        self.count: Tensor | None = None
        self.completed: tuple[Tensor, Tensor] | None = None

    def record(self, coef: float, ok: Tensor, new_window: bool) -> None:
        """Count a checkpoint with weight ``coef``; ``ok`` is its int32 device flag (0 = left out)."""
        missed = 1 - ok.to(torch.float64)
        if new_window or self.mass is None:
            self.mass, self.count = missed * coef, missed.clone()
        else:
            self.mass.add_(missed * coef)
            self.count.add_(missed)

    def roll(self) -> None:
        """The current window completed: keep its totals as the completed window's."""
        if self.mass is not None:
            self.completed = (self.mass.clone(), self.count.clone())

    def skipped_weight(self, completed: bool = False) -> float:
        """Weight left out of the current (or completed) window so far (a host sync)."""
        totals = self.totals(completed)
        return totals[0] if totals is not None else 0.0

    def totals(self, completed: bool = False) -> tuple[float, int] | None:
        """``(weight, count)`` left out of the current (or completed) window, ``None`` if never recorded."""
        pair = self.completed if completed else (self.mass, self.count)
        if pair is None or pair[0] is None:
            return None
        return float(pair[0]), int(pair[1])

    def restore(self, current: tuple[float, int] | None, completed: tuple[float, int] | None,
                device: torch.device) -> None:
        """Set both windows' totals (``load_state_dict``, after validation)."""

        def on_device(pair):
            if pair is None:
                return None
            return tuple(torch.tensor(float(x), dtype=torch.float64, device=device) for x in pair)

        self.mass, self.count = on_device(current) or (None, None)
        self.completed = on_device(completed)

    def readout_scale(self, merge: str, window: int, completed: bool) -> float | None:
        """``1 / (1 - skipped weight)`` for a readout (warns), ``None`` if nothing was skipped."""
        totals = self.totals(completed)
        if totals is None or totals[1] == 0:
            return None
        mass, count = totals
        if mass >= 1.0 - 1e-12:
            raise NonFiniteMergeError(
                f"merge {merge!r}, window {window}: every checkpoint with weight was skipped "
                "(non-finite params); nothing to merge"
            )
        warn(
            f"merge {merge!r}, window {window}: {count} checkpoint(s) with non-finite params were "
            f"skipped (merge weight {mass:.4g}); the remaining weights are renormalized",
            RuntimeWarning,
        )
        return 1.0 / (1.0 - mass)
