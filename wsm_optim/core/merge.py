"""One tracked merge: :class:`Merge` holds its spec, window position, skip ledger and accumulators.

Everything about one merge lives on its ``Merge`` object, and everything else
asks it: the runtime's checkpoint passes (:meth:`Merge.update`), the readouts
(:meth:`Merge.source`), the state-dict format (``acc`` / ``completed`` and the
position's counters). A ``Merge`` gives a param adopted mid-window its
accumulators and seeds them itself (:meth:`Merge.follow`).

The accumulators are keyed by the param object: ``origin[p]`` is the window origin
``theta_0`` (``p`` at the current window's anchor, in ``p``'s dtype), ``acc[p]``
the running sum ``A = sum_j c_j (theta_j - theta_0)`` of the current window,
``completed[p]`` (``keep_last`` only) the last completed window's merge, stored
folded (``theta_0 + A``, accumulator precision, before any skip-mode
renormalisation). They are placed by the backend (beside their param, or on
the host for an offloading backend). Merges anchored at the same steps (same
``start`` and ``window``) share one ``origin`` dict. ``origin`` is ``None`` for a
run resumed from a format-1 state dict: ``A`` then sums raw params,
``sum_j c_j theta_j``, as that format did.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import schedules
from . import distributed
from .nonfinite import SkipLedger
from .spec import MergeSpec
from .window import Position

__all__ = ["Merge"]


class Merge:
    """One merge of a ``WSMOptimizer``: what it is, where it stands, and its accumulators.

    Attributes:
        name: the merge's name (``"default"`` for the single-merge arguments).
        spec: its :class:`MergeSpec`.
        position: its :class:`~wsm_optim.core.window.Position` in the windows.
        ledger: skipped checkpoints (``nonfinite="skip"``).
        acc: ``{param: A}``, accumulator precision (fp32, float64 for float64 params).
        completed: ``{param: merged}`` of the last completed window, or ``None`` without ``keep_last``.
        origin: ``{param: theta_0}`` in the param's dtype, or ``None`` (raw sums, a format-1 run).
        plan: what the backend in use built for this merge (``Backend.plan``).
    """

    def __init__(self, name: str, spec: MergeSpec) -> None:
        self.name, self.spec = name, spec
        self.position = Position(spec)
        self.ledger = SkipLedger()
        self.acc: dict[Tensor, Tensor] = {}
        self.completed: dict[Tensor, Tensor] | None = {} if spec.keep_last else None
        self.origin: dict[Tensor, Tensor] | None = {}
        self.plan: Any = None
        self._views: dict[int, tuple[Any, list[Tensor], list[Tensor] | None, list[Tensor] | None]] = {}

    def __repr__(self) -> str:
        s = self.spec
        return (f"{self.name}: {schedules.schedule_name(s.schedule)} window={s.window} "
                f"interval={s.interval} start={s.start}")

    @property
    def weights(self) -> schedules.WindowWeights:
        return self.spec.weights

    # -------------------------------------------------------- accumulators
    def follow(self, params: Sequence[Tensor], backend: Any, model_buffers: Sequence[Tensor] = (),
               model_buffer_backend: Any = None) -> None:
        """Give every param (and merged model buffer) accumulators, seeded if it comes mid-window; drop those gone.

        ``backend`` places the params' accumulators, ``model_buffer_backend``
        those of the merged model buffers. An accumulator that no longer fits
        its tensor (device, dtype or strides changed) is re-placed with its
        values kept.
        """
        placements = [(p, backend) for p in params] + [(b, model_buffer_backend) for b in model_buffers]
        current = {t for t, _ in placements}
        for store, _ in self._stores():
            for p in [p for p in store if p not in current]:
                del store[p]
        with torch.no_grad():
            for p, place in placements:
                fresh = p not in self.acc
                for store, origin in self._stores():
                    if origin:
                        like, fits = place.origin_like, place.origin_fits
                    else:
                        like, fits = place.accumulator_like, place.accumulator_fits
                    old = store.get(p)
                    if old is None:
                        store[p] = like(p)
                    elif not fits(old, p):
                        new = like(p)
                        new.copy_(old)  # by logical index: values kept whatever the layout
                        store[p] = new
                if fresh:
                    self._seed(p)
        self._views.clear()

    def _stores(self) -> list[tuple[dict[Tensor, Tensor], bool]]:
        """``(accumulators, whether they are window origins)``: the origins first, so that seeding finds them placed."""
        stores = [(self.origin, True)] if self.origin is not None else []
        stores.append((self.acc, False))
        if self.completed is not None:
            stores.append((self.completed, False))
        return stores

    def use_origins(self, origin: dict[Tensor, Tensor] | None) -> None:
        """Fold displacements from ``origin`` (a dict shared with merges anchored at the same steps), or raw sums (``None``)."""
        self.origin = origin
        self._views.clear()

    def rebind(self, replaced: dict[Tensor, Tensor]) -> None:
        """Key the buffers of merged model buffers replaced by new tensor objects (``old -> new``) by the new ones."""
        for store, _ in self._stores():
            for old, new in replaced.items():
                if old in store:
                    store[new] = store.pop(old)

    def _seed(self, p: Tensor) -> None:
        """A param adopted mid-window counts as constant at its current value since the anchor.

        Skip mode divides readouts by ``1 - skipped weight``: seed so that they return ``p``.
        With origins that is ``theta_0 = p``, ``A = 0`` (a shared origin is
        seeded alike by every merge that shares it: they are anchored together).
        """
        pos, live = self.position, distributed.local_view(p)
        if pos.anchored and self.origin is not None:
            distributed.local_view(self.origin[p]).copy_(live)
            distributed.local_view(self.acc[p]).zero_()
        elif pos.anchored:
            weight = 1.0 - self.ledger.skipped_weight() - pos.live_weight()
            distributed.local_view(self.acc[p]).copy_(live).mul_(weight)
        if self.completed is not None and pos.has_completed:
            weight = 1.0 - self.ledger.skipped_weight(completed=True)
            distributed.local_view(self.completed[p]).copy_(live).mul_(weight)

    def views(self, group: Any) -> tuple[list[Tensor], list[Tensor] | None, list[Tensor] | None]:
        """Local views of this merge's ``(accumulators, completed, origins)`` aligned with ``group.params`` (cached)."""
        entry = self._views.get(id(group))
        if entry is None or entry[0] is not group:
            def local(store):
                return [distributed.local_view(store[p]) for p in group.params] if store is not None else None

            entry = self._views[id(group)] = (group, local(self.acc), local(self.completed), local(self.origin))
        return entry[1], entry[2], entry[3]

    def update(self, group: Any, coef: float, keep_completed: bool = False, kept: Tensor | None = None):
        """This merge's share of a pass over ``group`` (a ``backends.MergeUpdate``).

        ``kept``: the weight the finished window kept (skip mode, an anchor that keeps it).
        """
        from .backends import MergeUpdate

        accs, completed, origins = self.views(group)
        return MergeUpdate(self.plan, coef, accs, completed if keep_completed else None, origins,
                           kept if keep_completed and origins is not None else None)

    def kept_weight(self) -> Tensor | None:
        """Skip mode: ``1 - skipped weight`` of the current window (a float64 device scalar), else ``None``."""
        mass = self.ledger.mass
        return None if mass is None else 1.0 - mass

    # ------------------------------------------------------------- readouts
    @property
    def reads_live(self) -> bool:
        """A readout of the current window mixes the live params in (anchored, mid-window)."""
        return self.position.mixes_live

    def origin_of(self, source: dict[Tensor, Tensor] | None) -> dict[Tensor, Tensor] | None:
        """The origins ``source`` (from :meth:`source`) is relative to: the current window's ``A`` has them."""
        return self.origin if source is self.acc else None

    def source(self, completed: bool) -> dict[Tensor, Tensor] | None:
        """The accumulators a readout reads: the completed window's, the current ``A``, or ``None`` (the live model).

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
    """Deprecated (0.2): the window position is :class:`wsm_optim.core.window.Position` (``Merge.position``)."""

    def __init__(self, name: str, spec: MergeSpec) -> None:
        warnings.warn("wsm_optim.merge.MergeState is now wsm_optim.core.window.Position(spec); the old name goes "
                      "in 1.0", DeprecationWarning, stacklevel=2)
        super().__init__(spec)
        self.name = name
