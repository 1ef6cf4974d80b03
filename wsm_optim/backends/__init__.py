"""Update backends: the arithmetic of a checkpoint pass over one group of tensors.

Every backend applies, to a list of local tensors sharing device and dtype and
one accumulator list per merge (see ``docs/method.md``, streaming form):

* ``anchor``:      ``A <- c_0 * theta``  (after ``completed <- A`` when a finished window is kept)
* ``accumulate``:  ``A <- A + c_j * theta``

with an optional int32 device flag ``ok`` (skip mode: 0 leaves the checkpoint
out). Readouts (``A + w_{t+1} theta``) are plain torch ops in ``readout.py``.

``resolve()`` is the one switch between them: ``"foreach"`` (torch
``_foreach_*`` ops, any device, coefficients from the host) and ``"triton"``
(one fused launch per group; coefficients found on the device from a step
counter, so no host value changes between steps and a step can be captured in
a CUDA graph).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = ["Backend", "MergeUpdate", "resolve", "BACKEND_NAMES"]

BACKEND_NAMES = ("auto", "foreach", "triton")


@dataclass
class MergeUpdate:
    """One merge's share of a pass over a group.

    ``accs``: accumulators aligned with the group's tensors (fp32, or wider
    for float64/complex params). ``coef``: ``c_0`` for an anchor pass, ``c_j``
    for a checkpoint pass (host float, used by foreach). ``completed``:
    buffers that receive the finished window's ``A`` before an anchor
    overwrites it, else ``None``. ``name``, ``start``, ``interval``, ``k`` and
    ``table`` (``c_0..c_k``, anything ``numpy.asarray`` takes, materialised only
    by the Triton launcher): what the kernel needs to find the coefficient
    from the device step counter.
    """

    accs: list[Tensor]
    coef: float
    completed: list[Tensor] | None = None
    name: str = ""
    start: int = 0
    interval: int = 1
    k: int = 1
    table: Any = ()

    def subset(self, idx: list[int]) -> "MergeUpdate":
        if len(idx) == len(self.accs):
            return self
        return MergeUpdate(
            accs=[self.accs[i] for i in idx],
            coef=self.coef,
            completed=[self.completed[i] for i in idx] if self.completed is not None else None,
            name=self.name,
            start=self.start,
            interval=self.interval,
            k=self.k,
            table=self.table,
        )

    def coefficients(self) -> np.ndarray:
        """``c_0..c_k`` as float64 (materialised)."""
        table = self.table.table() if hasattr(self.table, "table") else self.table
        return np.asarray(table, dtype=np.float64)


class Backend(Protocol):
    """What the optimizer calls; ``cache`` is a dict that lives as long as the group's layout."""

    name: str
    #: The device step counter the kernel reads (Triton), or ``None`` (coefficients come from the host).
    clock: Any

    def handles(self, p: Tensor) -> bool: ...

    def anchor(self, params: Sequence[Tensor], updates: Sequence[MergeUpdate], ok: Tensor | None = None,
               cache: dict | None = None) -> None: ...

    def accumulate(self, params: Sequence[Tensor], updates: Sequence[MergeUpdate], ok: Tensor | None = None,
                   cache: dict | None = None) -> None: ...

    def all_finite(self, params: Sequence[Tensor], ok: Tensor, cache: dict | None = None) -> None: ...

    def nonfinite_steps(self, caches: Iterable[dict]) -> dict[int, tuple[int, int]]: ...


def resolve(name: str, devices: Iterable[torch.device], table_sizes: Iterable[int]) -> Backend:
    """The backend for ``name`` given the params' devices and the merges' ``k + 1``.

    ``"auto"``: Triton when every param is on CUDA, Triton imports and every
    merge's weight table fits on the device (``schedules.TABLE_LIMIT``);
    foreach otherwise. ``"triton"`` on CPU params works only under
    ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).
    """
    from ..schedules import TABLE_LIMIT

    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    devices, sizes = list(devices), list(table_sizes)
    too_long = [n for n in sizes if n > TABLE_LIMIT]
    if name == "auto":
        name = "foreach"
        if devices and all(d.type == "cuda" for d in devices) and not too_long:
            try:
                from . import triton  # noqa: F401

                name = "triton"
            except ImportError:
                pass
    if name == "foreach":
        from .foreach import ForeachBackend

        return ForeachBackend()
    from . import triton

    if too_long:
        raise ValueError(
            f"backend='triton' keeps each merge's k + 1 weights in a device table of at most "
            f"schedules.TABLE_LIMIT = {TABLE_LIMIT} entries; a merge has {max(too_long)}. "
            "Use a larger interval, or backend='foreach'"
        )
    if not triton.interpreted() and not all(d.type == "cuda" for d in devices):
        raise ValueError(
            "backend='triton' needs CUDA parameters (CPU parameters only under "
            "TRITON_INTERPRET=1, Triton's interpreter for testing); use backend='foreach' or 'auto'"
        )
    return triton.TritonBackend()
