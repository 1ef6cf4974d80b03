"""The running state of a ``WSMOptimizer`` in one object, and the checkpoint passes that change it.

Framework wrappers (Lightning's ``LightningOptimizer``, accelerate's
``AcceleratedOptimizer``) forward or copy the optimizer's attributes; an
attribute assigned inside a method entered through such a proxy would land on
the proxy. So the optimizer assigns attributes only in its constructor, and
everything that changes later (counters, buffers, the swap flag, the side
stream) lives here, reached through one shared reference.

A ``step()`` is: :meth:`Runtime.anchor_windows` (before the inner step: merges
whose window is complete, or whose ``start`` is reached, anchor at the current
params), the inner step, then :meth:`Runtime.fold` (``A <- A + c_t theta`` for
every merge at a checkpoint), possibly on a side stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import distributed
from .backends import Backend, MergeUpdate, resolve
from .merge import MergeSpec, MergeState, check_bool
from .nonfinite import NONFINITE_MODES, SkipLedger
from .registry import Group, Registry

__all__ = ["Runtime"]


@dataclass
class Runtime:
    """Everything a ``WSMOptimizer`` changes while it runs."""

    merges: dict[str, MergeState]
    ledgers: dict[str, SkipLedger]
    registry: Registry
    backend: Backend
    backend_choice: str  # as given: "auto" re-resolves when the params change device
    nonfinite: str
    capturable: bool
    overlap: bool
    devices: list[torch.device]
    steps: int = 0
    swapped: bool = False
    side_stream: Any = None
    side_done: Any = None

    @classmethod
    def create(cls, specs: dict[str, MergeSpec], param_groups, *, backend: str, nonfinite: str, overlap: Any,
               capturable: Any) -> "Runtime":
        """Validate the options against the params and build the runtime (no buffers yet: they come at the first step)."""
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        overlap, capturable = check_bool("overlap", overlap), check_bool("capturable", capturable)
        params = list(dict.fromkeys(p for g in param_groups for p in g["params"]))
        devices = list(dict.fromkeys(distributed.local_view(p).device for p in params))
        chosen = resolve(backend, devices, [s.k + 1 for s in specs.values()])
        if capturable and (chosen.name != "triton" or nonfinite == "skip"):
            raise ValueError(
                "capturable=True needs backend='triton' and nonfinite='raise' "
                f"(got backend={chosen.name!r}, nonfinite={nonfinite!r})"
            )
        if overlap and not any(d.type == "cuda" for d in devices):
            raise ValueError("overlap=True needs CUDA parameters (it uses a side CUDA stream)")
        rt = cls(
            merges={n: MergeState(n, s) for n, s in specs.items()},
            ledgers={n: SkipLedger() for n in specs},
            registry=Registry(specs, [n for n, s in specs.items() if s.keep_last]),
            backend=chosen,
            backend_choice=backend,
            nonfinite=nonfinite,
            capturable=capturable,
            overlap=overlap,
            devices=devices,
        )
        rt.check_capturable(params)
        rt.registry.seed = rt.seed
        rt.registry.sync(param_groups, allocate=False)
        return rt

    def check_capturable(self, params) -> None:
        """``capturable=True``: refuse params the Triton kernel cannot update inside a CUDA graph."""
        for p in params if self.capturable else ():
            if not self.backend.handles(distributed.local_view(p)):
                raise ValueError(
                    f"capturable=True: a parameter of shape {tuple(p.shape)}, dtype {p.dtype}, strides "
                    f"{p.stride()} is not handled by the Triton kernel (it needs fp32/bf16/fp16 params dense "
                    "in memory); the foreach fallback cannot run inside a CUDA graph"
                )

    def __getstate__(self) -> dict[str, Any]:  # CUDA streams and events cannot be pickled
        return dict(self.__dict__, side_stream=None, side_done=None)

    def merge(self, name: str | None) -> MergeState:
        """The merge called ``name`` (``None``: the only one), or a ``ValueError`` listing the names."""
        if name is None:
            if len(self.merges) == 1:
                return next(iter(self.merges.values()))
            raise ValueError(f"merge: several merges are tracked, name one of {list(self.merges)}")
        if name not in self.merges:
            raise ValueError(f"merge: unknown name {name!r}; tracked merges are {list(self.merges)}")
        return self.merges[name]

    # ------------------------------------------------------------- params
    def sync(self, param_groups, allocate: bool = True) -> None:
        """Adopt param changes; an ``"auto"`` backend follows the params to (or from) CUDA."""
        self.registry.sync(param_groups, allocate=allocate)
        devices = self.registry.devices
        if devices and devices != self.devices:
            self.devices = devices
            if self.backend_choice == "auto" and not self.capturable:
                self.backend = resolve("auto", devices, [m.spec.k + 1 for m in self.merges.values()])
            if self.backend.clock is not None and not self.capturable:  # a counter for a new device
                self.backend.clock.set(self.steps)

    def seed(self, name: str, p: Tensor, acc: Tensor, completed: Tensor | None) -> None:
        """A param adopted mid-window counts as constant at its current value since the anchor.

        Skip mode divides readouts by ``1 - skipped weight``: seed so that they return ``p``.
        """
        merge, ledger = self.merges[name], self.ledgers[name]
        if merge.anchored:
            acc.copy_(p).mul_(1.0 - ledger.skipped_weight() - merge.live_weight())
        if completed is not None and merge.has_completed:
            completed.copy_(p).mul_(1.0 - ledger.skipped_weight(completed=True))

    # ------------------------------------------------------------- passes
    def anchor_windows(self) -> None:
        """Before the inner step: anchor every merge whose window is due (``A <- c_0 theta``)."""
        due = [m for m in self.merges.values() if m.anchor_due(self.steps)]
        run = list(self.merges.values()) if self.capturable else due  # capturable: the kernel decides
        ok = self._checkpoint_ok() if run else None
        for g in self.registry.groups:
            updates = [
                self._update(m, g, m.weights.c(0), keep=m.spec.keep_last and (m.complete or self.capturable))
                for m in run
            ]
            self.backend.anchor(g.local, updates, None if ok is None else ok[g.device], cache=g.cache)
        for m in due:
            if m.complete and m.spec.keep_last:
                self.ledgers[m.name].roll()
            c0 = m.begin_window()
            if ok is not None:  # skip mode (never capturable): ``run`` is ``due``
                self.ledgers[m.name].record(c0, ok[self.registry.devices[0]], new_window=True)

    def count_step(self) -> None:
        """After the inner step: count it, on the host and on the device clock."""
        self.steps += 1
        if self.backend.clock is not None:
            self.backend.clock.advance(self.registry.devices)

    def fold(self) -> None:
        """After the inner step: ``A <- A + c_t theta`` for every merge at a checkpoint."""
        due = [(m, c) for m in self.merges.values() if (c := m.advance()) is not None]
        run = [(m, 0.0) for m in self.merges.values()] if self.capturable else due
        if not run:
            return
        ok = self._checkpoint_ok()
        for g in self.registry.groups:
            updates = [self._update(m, g, c) for m, c in run]
            self.backend.accumulate(g.local, updates, None if ok is None else ok[g.device], cache=g.cache)
        if ok is not None:
            for m, c in due:
                self.ledgers[m.name].record(c, ok[self.registry.devices[0]], new_window=False)

    def _update(self, m: MergeState, g: Group, coef: float, keep: bool = False) -> MergeUpdate:
        return MergeUpdate(
            accs=g.accs[m.name], coef=coef, completed=g.completed[m.name] if keep else None, name=m.name,
            start=m.spec.start, interval=m.spec.interval, k=m.spec.k, table=m.weights,
        )

    def _checkpoint_ok(self) -> dict[torch.device, Tensor] | None:
        """Skip mode: an int32 flag per device, 1 iff every param is finite (device only)."""
        if self.nonfinite != "skip":
            return None
        devices = self.registry.devices
        flags = {d: torch.ones((), dtype=torch.int32, device=d) for d in devices}
        for g in self.registry.groups:
            self.backend.all_finite(g.local, flags[g.device], cache=g.cache)
        if len(devices) > 1:  # the checkpoint is bad if any device saw a bad value
            total = flags[devices[0]].clone()
            for d in devices[1:]:
                total.mul_(flags[d].to(devices[0], non_blocking=True))
            flags = {d: total.to(d, non_blocking=True) for d in devices}
        return flags

    # --------------------------------------------------------- side stream
    def side(self):
        """The CUDA side stream of ``overlap=True`` (created on first use), else ``None``."""
        if self.overlap and self.side_stream is None and torch.cuda.is_available():
            self.side_stream = torch.cuda.Stream(device=next(d for d in self.devices if d.type == "cuda"))
        return self.side_stream

    def join(self) -> None:
        """Make the current stream wait for an update still running on the side stream."""
        if self.side_done is not None:
            torch.cuda.current_stream(self.side_stream.device).wait_event(self.side_done)
            self.side_done = None

    def sync_steps(self) -> int:
        """Capturable mode: adopt the device step count after CUDA-graph replays (one host sync)."""
        steps = self.backend.clock.read() if self.backend.clock is not None else None
        if steps is not None and steps != self.steps:
            self.steps = steps
            for m in self.merges.values():
                m.set_position(steps)
        return self.steps
