"""One tracked merge: :class:`Merge` holds its spec, window position, skip ledger and buffers.

Everything about one merge lives on its ``Merge`` object, and everything else
asks it: the runtime's checkpoint passes (:meth:`Merge.update`), the readouts
(:meth:`Merge.source`), the state-dict format (``acc`` / ``completed`` and the
position's counters). A ``Merge`` gives a param adopted mid-window its buffers
and seeds them itself (:meth:`Merge.follow`).

Buffers are keyed by the param object: ``acc[p]`` is the running sum ``A`` of
the current window, ``completed[p]`` (``keep_last`` only) the last completed
window's merge. They are placed by the backend (beside their param, or on the
host for an offloading backend).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import distributed, schedules
from .nonfinite import SkipLedger
from .spec import DEFAULT_MERGE, MergeSpec, check_bool, check_int, check_name, specs_from_arguments
from .window import Position

__all__ = ["Merge", "MergeSpec", "MergeState", "DEFAULT_MERGE", "specs_from_arguments", "check_name",
           "check_int", "check_bool"]


class Merge:
    """One merge of a ``WSMOptimizer``: what it is, where it stands, and its buffers.

    Attributes:
        name: the merge's name (``"default"`` for the single-merge arguments).
        spec: its :class:`MergeSpec`.
        position: its :class:`~wsm_optim.window.Position` in the windows.
        ledger: skipped checkpoints (``nonfinite="skip"``).
        acc: ``{param: A}``, accumulator precision (fp32, float64 for float64 params).
        completed: ``{param: merged}`` of the last completed window, or ``None`` without ``keep_last``.
        plan: what the backend in use built for this merge (``Backend.plan``).
    """

    def __init__(self, name: str, spec: MergeSpec) -> None:
        self.name, self.spec = name, spec
        self.position = Position(spec)
        self.ledger = SkipLedger()
        self.acc: dict[Tensor, Tensor] = {}
        self.completed: dict[Tensor, Tensor] | None = {} if spec.keep_last else None
        self.plan: Any = None
        self._views: dict[int, tuple[Any, list[Tensor], list[Tensor] | None]] = {}

    def __repr__(self) -> str:
        s = self.spec
        return (f"{self.name}: {schedules.schedule_name(s.schedule)} window={s.window} "
                f"interval={s.interval} start={s.start}")

    @property
    def weights(self) -> schedules.WindowWeights:
        return self.spec.weights

    # ------------------------------------------------------------- buffers
    def follow(self, params: Sequence[Tensor], backend: Any, buffers: Sequence[Tensor] = (),
               buffer_backend: Any = None) -> None:
        """Give every param (and merged model buffer) its buffers, seeded if it arrives mid-window; drop those gone.

        ``backend`` places the params' buffers, ``buffer_backend`` those of the
        merged model buffers. A buffer that no longer fits its tensor (device,
        dtype or strides changed) is re-placed with its values kept.
        """
        placements = [(p, backend) for p in params] + [(b, buffer_backend) for b in buffers]
        current = {t for t, _ in placements}
        stores = [self.acc] + ([self.completed] if self.completed is not None else [])
        for store in stores:
            for p in [p for p in store if p not in current]:
                del store[p]
        with torch.no_grad():
            for p, place in placements:
                fresh = p not in self.acc
                for store in stores:
                    old = store.get(p)
                    if old is None:
                        store[p] = place.buffer_like(p)
                    elif not place.buffer_fits(old, p):
                        new = place.buffer_like(p)
                        new.copy_(old)  # by logical index: values kept whatever the layout
                        store[p] = new
                if fresh:
                    self._seed(p)
        self._views.clear()

    def rebind(self, replaced: dict[Tensor, Tensor]) -> None:
        """Key the buffers of merged model buffers replaced by new tensor objects (``old -> new``) by the new ones."""
        for store in [self.acc] + ([self.completed] if self.completed is not None else []):
            for old, new in replaced.items():
                if old in store:
                    store[new] = store.pop(old)

    def _seed(self, p: Tensor) -> None:
        """A param adopted mid-window counts as constant at its current value since the anchor.

        Skip mode divides readouts by ``1 - skipped weight``: seed so that they return ``p``.
        """
        pos, live = self.position, distributed.local_view(p)
        if pos.anchored:
            weight = 1.0 - self.ledger.skipped_weight() - pos.live_weight()
            distributed.local_view(self.acc[p]).copy_(live).mul_(weight)
        if self.completed is not None and pos.has_completed:
            weight = 1.0 - self.ledger.skipped_weight(completed=True)
            distributed.local_view(self.completed[p]).copy_(live).mul_(weight)

    def views(self, group: Any) -> tuple[list[Tensor], list[Tensor] | None]:
        """Local views of this merge's buffers aligned with ``group.params`` (cached per grouping)."""
        entry = self._views.get(id(group))
        if entry is None or entry[0] is not group:
            accs = [distributed.local_view(self.acc[p]) for p in group.params]
            completed = ([distributed.local_view(self.completed[p]) for p in group.params]
                         if self.completed is not None else None)
            entry = self._views[id(group)] = (group, accs, completed)
        return entry[1], entry[2]

    def update(self, group: Any, coef: float, keep_completed: bool = False):
        """This merge's share of a pass over ``group`` (a ``backends.MergeUpdate``)."""
        from .backends import MergeUpdate

        accs, completed = self.views(group)
        return MergeUpdate(self.plan, coef, accs, completed if keep_completed else None)

    # ------------------------------------------------------------- readouts
    def source(self, completed: bool) -> dict[Tensor, Tensor] | None:
        """The buffers a readout reads: the completed window's, the current ``A``, or ``None`` (the live model).

        Raises ``RuntimeError`` saying why when ``completed=True`` has nothing to read.
        """
        pos = self.position
        if not completed:
            return self.acc if pos.anchored else None
        if pos.complete:
            return self.acc
        if pos.has_completed:
            return self.completed
        if not self.spec.keep_last and pos.windows_completed:
            raise RuntimeError(
                f"merge {self.name!r}: the last completed window was overwritten when the next "
                "window began; construct with keep_last=True to keep it"
            )
        if pos.windows_completed:
            raise RuntimeError(
                f"merge {self.name!r}: the last completed window was not kept (this optimizer resumed from a "
                "state saved without keep_last); the next window to complete will be"
            )
        raise RuntimeError(f"merge {self.name!r}: no window has completed yet")

    def readout_scale(self, completed: bool) -> float | None:
        """Skip mode: ``1 / (1 - skipped weight)`` of the window a readout refers to (warns), else ``None``."""
        pos = self.position
        if not pos.anchored:
            return None
        # at a window's end the finished window is still the current one in the ledger (rolled at the next anchor)
        return self.ledger.readout_scale(self.name, pos.window_of(completed), completed and not pos.complete)


class MergeState(Position):
    """Deprecated: the window position is :class:`wsm_optim.window.Position` (``Merge.position``)."""

    def __init__(self, name: str, spec: MergeSpec) -> None:
        super().__init__(spec)
        self.name = name
