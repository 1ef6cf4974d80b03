"""The running state of a ``WSMOptimizer`` in one object, and the checkpoint passes that change it.

Framework wrappers (Lightning's ``LightningOptimizer``, accelerate's
``AcceleratedOptimizer``) forward or copy the optimizer's attributes; an
attribute assigned inside a method entered through such a proxy would land on
the proxy. So the optimizer assigns attributes only in its constructor, and
everything that changes later (counters, merges, the swap lock, the side
stream) lives here, reached through one shared reference.

A ``step()`` is: :meth:`Runtime.check_step` (every weight the step needs is
computed first, so a bad one raises before anything moves),
:meth:`Runtime.anchor_windows` (before the inner step: merges whose window is
complete, or whose ``start`` is reached, anchor at the current params), the
inner step, then :meth:`Runtime.fold` (``A <- A + c_t (theta - theta_0)`` for
every merge at a checkpoint), possibly on a side stream. Merged model buffers
(``merge_buffers=True``) take the same passes with the same weights, always
inline on the current stream (``backends.inline``): the next forward changes
them in place.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import schedules
from . import callers, distributed
from .backends import Backend, inline, select
from .merge import Merge
from .moments import MomentMerge
from .model_buffers import ModelBuffers
from .registry import Group, Registry
from .spec import MergeSpec, check_options

__all__ = ["Runtime"]


@dataclass
class EngineBinding:
    """What an engine integration that re-homes the params asks of the optimizer (``WSMOptimizer._bind_engine``).

    ``merged_weights(core_swap)``: a context-manager factory that replaces
    ``WSMOptimizer.merged_weights()``; ``core_swap()`` is the optimizer's own
    swap of the params it tracks (enter it, then swap whatever copies the
    engine keeps; what the block yields is what ``merged_weights()`` yields).

    ``steps_per_group``: the engine steps the optimizer once per param group,
    with ``param_groups`` cut to that group (DeepSpeed ZeRO-1/2). One merge
    step is then counted when every group has been stepped: the windows are
    anchored before the first group's inner step and the params folded after
    the last one's. ``whole`` holds every group while ``param_groups`` is cut,
    ``stepped`` the ids of the groups stepped since the last counted step.
    """

    merged_weights: Callable[[Callable[[], Any]], Any] | None = None
    steps_per_group: bool = False
    whole: list[dict[str, Any]] | None = None
    stepped: set[int] = field(default_factory=set)

    def cut(self, current: list[dict[str, Any]], groups: list[dict[str, Any]]) -> None:
        """Note ``param_groups`` going from ``current`` to ``groups``: a cut to some groups, or back to all."""
        whole = self.whole if self.whole is not None else current
        self.whole = whole if callers.is_group_cut(whole, groups) else None

    def round_done(self, groups: list[dict[str, Any]]) -> bool:
        """Record ``groups`` (stepped while ``param_groups`` is cut); True once every group of the round was."""
        self.stepped.update(id(g) for g in groups)
        if all(id(g) in self.stepped for g in self.whole):
            self.stepped.clear()
            return True
        return False


@dataclass
class Runtime:
    """Everything a ``WSMOptimizer`` changes while it runs."""

    merges: list[Merge]
    registry: Registry
    backend: Backend
    backend_choice: str  # as given: "auto" re-selects when the params change device
    offload: str | None
    nonfinite: str
    capturable: bool
    overlap: bool
    devices: list[torch.device]
    model_buffer_backend: Backend = field(default_factory=inline)  # merged model buffers: inline, current stream
    steps: int = 0
    swapped: bool = False
    side_stream: Any = None
    side_done: Any = None
    swap_lock: Any = field(default_factory=threading.Lock)
    initial: dict[int, tuple] = field(default_factory=dict)  # id(param) -> _sums when wrapped
    engine: EngineBinding | None = None  # what an engine integration bound (WSMOptimizer._bind_engine)
    held_live: Any = None  # readout.HeldLive: final live terms kept aside (WSMOptimizer._hold_live)
    # the merges as the user named them: each exact Merge, and each MomentMerge (whose parts are in ``merges``)
    named: list[Merge | MomentMerge] = field(default_factory=list)

    @classmethod
    def create(cls, specs: dict[str, MergeSpec], param_groups, *, backend: str, nonfinite: str, overlap: Any,
               capturable: Any, offload: str | None = None,
               model_buffers: ModelBuffers | None = None) -> "Runtime":
        """Validate the options against the params and build the runtime (no buffers yet: they come at the first step)."""
        overlap, capturable = check_options(
            backend=backend, nonfinite=nonfinite, offload=offload, overlap=overlap, capturable=capturable
        )
        if capturable and model_buffers is not None:
            raise ValueError(
                "merge_buffers=True cannot be combined with capturable=True: merged model buffers are folded "
                "with host coefficients, which a CUDA graph would freeze"
            )
        params = list(dict.fromkeys(p for g in param_groups for p in g["params"]))
        devices = list(dict.fromkeys(distributed.local_view(p).device for p in params))
        chosen = select(backend, devices, [s.k + 1 for s in specs.values()], offload)
        if capturable and (not chosen.capturable or nonfinite == "skip"):
            raise ValueError(
                "capturable=True needs backend='triton' (a capturable backend) and nonfinite='raise' "
                f"(got backend={chosen.name!r}, nonfinite={nonfinite!r})"
            )
        if overlap and not any(d.type == "cuda" for d in devices):
            raise ValueError("overlap=True needs CUDA parameters (it uses a side CUDA stream)")
        named = [MomentMerge.build(n, s) if s.moments is not None else Merge(n, s) for n, s in specs.items()]
        if nonfinite == "skip" and any(isinstance(m, MomentMerge) for m in named):
            raise ValueError(
                "moments=... cannot be combined with nonfinite='skip': a checkpoint left out of the moments "
                "changes every shape's weights in a way no renormalisation undoes; use nonfinite='raise'"
            )
        rt = cls(
            merges=[part for m in named for part in (m.parts if isinstance(m, MomentMerge) else [m])],
            named=named,
            registry=Registry(model_buffers),
            backend=chosen,
            backend_choice=backend,
            offload=offload,
            nonfinite=nonfinite,
            capturable=capturable,
            overlap=overlap,
            devices=devices,
        )
        rt.check_capturable(params)
        rt.use_origins(True)
        rt.initial = _sums(params)
        if model_buffers is not None:
            model_buffers.capture()  # checkpoint 0 of a window anchored at the first step (start=0)
        rt._plan()
        rt.registry.refresh(param_groups, place=False)
        return rt

    def check_capturable(self, params) -> None:
        """``capturable=True``: refuse params the backend cannot update inside a CUDA graph."""
        for p in params if self.capturable else ():
            if not self.backend.handles(distributed.local_view(p)):
                raise ValueError(
                    f"capturable=True: a parameter of shape {tuple(p.shape)}, dtype {p.dtype}, strides "
                    f"{p.stride()} is not handled by the Triton kernel (it needs fp32/bf16/fp16 params dense "
                    "in memory); the foreach fallback cannot run inside a CUDA graph"
                )

    def use_origins(self, enabled: bool) -> None:
        """Fold displacements from window origins (``True``, format 2) or raw params (``False``, format-1 runs).

        Merges anchored at the same steps (same ``start`` and ``window``, any
        schedule or interval) share one origin per param. Placed buffers follow at once.
        """
        shared: dict[tuple[int, int], dict[Tensor, Tensor]] = {}
        for m in self.merges:
            current = m.origin
            m.use_origins(shared.setdefault((m.spec.start, m.spec.window), current if current is not None else {})
                          if enabled else None)
        if self.registry.placed:
            self.join()
            for m in self.merges:
                m.follow(self.registry.params, self.backend, self.registry.buffers, self.model_buffer_backend)

    @property
    def origins(self) -> bool:
        """Whether the merges fold displacements from window origins (format 2) rather than raw params."""
        return all(m.origin is not None for m in self.merges)

    def _plan(self) -> None:
        for m in self.merges:
            m.plan = self.backend.plan(m.name, m.spec)

    def __getstate__(self) -> dict[str, Any]:  # CUDA streams, events and locks cannot be pickled
        self.join()  # a copy holds every fold that was started
        # nor the engine a binding refers to: a copy is a plain WSMOptimizer again
        return dict(self.__dict__, side_stream=None, side_done=None, swap_lock=None, engine=None, held_live=None)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, swap_lock=threading.Lock())
        if not self.named:  # pickled by a release without moment merges
            self.named = list(self.merges)

    def merge(self, name: str | None) -> Merge | MomentMerge:
        """The merge called ``name`` (``None``: the only one), or a ``ValueError`` listing the names."""
        names = [m.name for m in self.named]
        if name is None:
            if len(self.named) == 1:
                return self.named[0]
            raise ValueError(f"merge: several merges are tracked, name one of {names}")
        for m in self.named:
            if m.name == name:
                return m
        raise ValueError(f"merge: unknown name {name!r}; tracked merges are {names}")

    # ------------------------------------------------------------- params
    @property
    def placed(self) -> bool:
        """Whether the buffers exist (from the first ``step()``, ``state_dict()`` or ``load_state_dict()``)."""
        return self.registry.placed

    def follow_params(self, param_groups, place: bool = True) -> None:
        """Adopt param changes; buffers follow them; an ``"auto"`` backend follows the params to (or from) CUDA."""
        if not self.registry.refresh(param_groups, place=place) or not self.registry.placed:
            return
        self.backend.join()  # buffers may be re-placed below: no fold may still write the old ones
        devices = self.registry.devices
        if devices and devices != self.devices:
            self.devices = devices
            if self.backend_choice == "auto" and not self.capturable:
                self.backend = select("auto", devices, [m.spec.k + 1 for m in self.merges], self.offload)
                self._plan()
            if self.backend.clock is not None and not self.capturable:  # a counter for a new device
                self.backend.clock.set(self.steps)
        for m in self.merges:
            m.rebind(self.registry.rebound)
            m.follow(self.registry.params, self.backend, self.registry.buffers, self.model_buffer_backend)

    def add_param_group(self, inner: torch.optim.Optimizer, param_group: dict[str, Any]) -> None:
        """``inner.add_param_group`` for a group whose params are checked first; buffers follow."""
        self.join()
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        new = [p[1] if isinstance(p, tuple) else p for p in group["params"]]
        for p in new:  # refuse before the inner optimizer takes the group
            self.registry.check_param(p, place=self.placed)
        self.check_capturable(new)
        inner.add_param_group(group)
        self.follow_params(inner.param_groups, place=self.placed)

    def prepare_readout(self, name: str | None, param_groups, shape: Any = None, completed: bool = False):
        """The merge called ``name``, its folds joined and its buffers following the params, ready to read.

        A moment merge comes bound to ``shape`` (``None``: its own schedule) as a
        :class:`~wsm_optim.core.moments.MomentReading`; an exact merge refuses a ``shape``.
        """
        chosen = self.merge(name)
        if isinstance(chosen, MomentMerge):
            chosen = chosen.reading(shape, completed)
        elif shape is not None:
            raise ValueError(
                f"shape={shape!r}: merge {chosen.name!r} is an exact merge of its own schedule "
                f"({schedules.schedule_name(chosen.spec.schedule)!r}); a shape is chosen at read time only for a moment "
                "merge (moments=m)"
            )
        self.join()
        self.follow_params(param_groups, place=self.placed)  # before step 1 nothing is anchored
        return chosen

    # ------------------------------------------------------------- passes
    def check_step(self) -> None:
        """Compute every weight the next step needs; a weight that cannot be computed raises here, before anything moves."""
        for m in self.merges:
            m.position.upcoming(self.steps)

    def anchor_windows(self) -> None:
        """Before the inner step: anchor every merge whose window is due (``theta_0 <- theta``, ``A <- 0``)."""
        due = [m for m in self.merges if m.position.anchor_due(self.steps)]
        run = self.merges if self.capturable else due  # capturable: the kernel decides
        if not run:
            return
        passes = self._passes(anchor=True)
        ok = self._checkpoint_ok(passes)
        keep = [m.spec.keep_last and (m.position.complete or self.capturable) for m in run]
        kept = [m.kept_weight() if ok is not None else None for m in run]
        for g, backend, tensors in passes:
            updates = [m.update(g, m.weights.c(0), k, w) for m, k, w in zip(run, keep, kept)]
            backend.anchor(tensors, updates, None if ok is None else ok[g.device], cache=g.cache)
        for m in due:
            if m.position.complete and m.spec.keep_last:
                m.ledger.roll()
            c0 = m.position.begin_window()
            if ok is not None:  # skip mode (never capturable): ``run`` is ``due``
                m.ledger.record(c0, ok[self.registry.target_devices[0]], new_window=True)

    def capture_buffers(self) -> None:
        """After a step: if a window anchors at the next one, keep the merged model buffers' values (its checkpoint 0)."""
        if self.registry.buffers and any(m.position.anchor_due(self.steps) for m in self.merges):
            self.registry.model_buffers.capture()

    def count_step(self) -> None:
        """After the inner step: count it, on the host and on the device clock."""
        self.steps += 1
        if self.backend.clock is not None:
            self.backend.clock.advance(self.registry.devices)

    def fold(self) -> None:
        """After the inner step: ``A <- A + c_t (theta - theta_0)`` for every merge at a checkpoint.

        With ``overlap=True`` the params' pass runs on the side stream, overlapping
        the next forward/backward (joined before the params change again).
        """
        due = [(m, c) for m in self.merges if (c := m.position.advance()) is not None]
        run = [(m, 0.0) for m in self.merges] if self.capturable else due
        if not run:
            return
        ok = self._checkpoint_ok(self._passes())

        def accumulate(groups: list[Group], backend: Backend) -> None:
            for g in groups:
                updates = [m.update(g, c) for m, c in run]
                backend.accumulate(g.local, updates, None if ok is None else ok[g.device], cache=g.cache)

        accumulate(self.registry.buffer_groups, self.model_buffer_backend)  # before the next forward changes them
        side = self.side()
        if side is None:
            accumulate(self.registry.groups, self.backend)
        else:
            side.wait_stream(torch.cuda.current_stream(side.device))
            for flag in (ok or {}).values():
                flag.record_stream(side)  # made on the current stream, read on the side stream
            with torch.cuda.stream(side):
                accumulate(self.registry.groups, self.backend)
            self.side_done = side.record_event()
        if ok is not None:
            for m, c in due:
                m.ledger.record(c, ok[self.registry.target_devices[0]], new_window=False)

    def _passes(self, anchor: bool = False) -> list[tuple[Group, Backend, list[Tensor]]]:
        """``(group, backend, tensors read)``: params through the chosen backend, merged model buffers inline.

        An anchor reads the merged model buffers as captured at the end of the
        step before (``ModelBuffers.capture``), the live tensors otherwise.
        """
        registry = self.registry
        passes = [(g, self.backend, g.local) for g in registry.groups]
        for g in registry.buffer_groups:
            tensors = g.local
            if anchor:
                tensors = [registry.model_buffers.at_anchor(registry.buffer_names[b], b) for b in g.params]
            passes.append((g, self.model_buffer_backend, tensors))
        return passes

    def _checkpoint_ok(self, passes: list[tuple[Group, Backend, list[Tensor]]]) -> dict[torch.device, Tensor] | None:
        """Skip mode: an int32 flag per device, 1 iff every tensor the ``passes`` read is finite (device only)."""
        if self.nonfinite != "skip":
            return None
        devices = self.registry.target_devices
        flags = {d: torch.ones((), dtype=torch.int32, device=d) for d in devices}
        for g, backend, tensors in passes:
            backend.all_finite(tensors, flags[g.device], cache=g.cache)
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

    def fence(self) -> None:
        """Before the params change: order the next kernels after every read of the params still in flight."""
        if self.side_done is not None:
            torch.cuda.current_stream(self.side_stream.device).wait_event(self.side_done)
            self.side_done = None
        self.backend.fence()

    def join(self) -> None:
        """Before buffers are read or replaced: wait for all checkpoint work still running."""
        self.fence()
        self.backend.join()

    def trained_elsewhere(self) -> bool:
        """No ``step()`` was counted, yet the params changed since wrapping: another optimizer is stepping them.

        One reduction per param and one host sync; readouts call it only while ``steps == 0``.
        """
        now = _sums([p for p in self.registry.params if id(p) in self.initial])
        # tolerances: a device move (CPU -> GPU after wrapping) reduces in another order; a dtype
        # change (a precision plugin casting the model after wrapping) rounds: not comparable
        return any(
            now[k][2] == self.initial[k][2] and not math.isclose(a, b, rel_tol=tol, abs_tol=1e-30)
            for k in now for a, b, tol in zip(now[k][:2], self.initial[k][:2], (1e-9, 1e-4))
        )

    # ------------------------------------------------------------ counting
    def set_steps(self, steps: int) -> None:
        """Set the counted steps on the host and the device clock (``load_state_dict``)."""
        self.steps = steps
        if self.backend.clock is not None:
            self.backend.clock.set(steps)

    def sync_steps(self) -> int:
        """Capturable mode: adopt the device step count after CUDA-graph replays (one host sync)."""
        steps = self.backend.clock.read() if self.backend.clock is not None else None
        if steps is not None and steps != self.steps:
            self.steps = steps
            for m in self.merges:
                m.position.set_position(steps)
        return self.steps


def _sums(params) -> dict[int, tuple]:
    """``{id(param): (sum, 2-norm, dtype) of its local values}``, one host sync per device (meta params skipped).

    Both are reductions without a temporary copy: the sum accumulates in float64;
    the norm (in the param's precision) catches a step that moves values but keeps their sum.
    """
    by_device: dict[torch.device, list[tuple[int, Tensor]]] = {}
    for p in params:
        local = distributed.local_view(p).detach()
        if local.device.type != "meta":
            total = local.sum(dtype=torch.complex128).abs() if local.is_complex() else local.sum(dtype=torch.float64)
            pair = torch.stack([total, torch.linalg.vector_norm(local).double()])
            by_device.setdefault(local.device, []).append((id(p), pair))
    dtypes = {id(p): distributed.local_view(p).dtype for p in params}
    sums: dict[int, tuple] = {}
    for entries in by_device.values():
        values = torch.stack([v for _, v in entries]).tolist()
        sums.update((key, (*value, dtypes[key])) for (key, _), value in zip(entries, values))
    return sums
