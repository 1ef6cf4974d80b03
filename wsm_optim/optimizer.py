"""``WSMOptimizer``: a wrapper that keeps the WSM checkpoint merge while training.

The state machine lives here; the arithmetic is in ``functional`` (and the
Triton kernels), the merge weights in ``schedules``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed as D
from . import schedules as S
from .functional import BACKENDS, Target, accumulator_like

__all__ = ["WSMOptimizer", "MergeSpec", "DEFAULT_MERGE", "NonFiniteMergeError"]

DEFAULT_MERGE = "default"
_STATE_VERSION = 1
_ACC = "wsm_acc"
_LAST = "wsm_last"


class NonFiniteMergeError(RuntimeError):
    """A merge readout holds NaN/inf: a checkpoint of the window was not finite."""


@dataclass(frozen=True)
class MergeSpec:
    """Configuration of one merge: a decay shape over tumbling windows.

    ``window`` optimizer steps per window, a checkpoint every ``interval``
    steps (``k = window // interval`` updates, ``k + 1`` checkpoints), the first
    window anchored after ``start`` steps. ``keep_last`` keeps the last
    completed window's merge in one more fp32 buffer.
    """

    schedule: S.Schedule = "linear"
    window: int = 1000
    interval: int = 1
    start: int = 0
    keep_last: bool = False

    @property
    def k(self) -> int:
        return self.window // self.interval


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclass
class _Track:
    """One merge's coefficients, counters and buffers."""

    name: str
    spec: MergeSpec
    c: np.ndarray  # (k + 1,) merge weights, float64
    w_next: np.ndarray  # (k + 1,): w_next[t] = w_{t+1}, w_{k+1} = 0
    anchored: bool = False
    t: int = 0  # checkpoints completed in the current window (0..k)
    r: int = 0  # steps since the last checkpoint (0..interval-1)
    windows_completed: int = 0
    has_last: bool = False
    accs: dict[Tensor, Tensor] = field(default_factory=dict)
    lasts: dict[Tensor, Tensor] = field(default_factory=dict)
    # skip mode: device scalars, weight and count of checkpoints left out of A
    skipped_mass: Tensor | None = None
    skipped_count: Tensor | None = None
    last_skipped: tuple[Tensor, Tensor] | None = None

    @classmethod
    def build(cls, name: str, spec: MergeSpec) -> "_Track":
        def label(field: str) -> str:
            return field if name == DEFAULT_MERGE else f"merges[{name!r}].{field}"

        window = _check_int(label("window"), spec.window, 1)
        interval = _check_int(label("interval"), spec.interval, 1)
        _check_int(label("start"), spec.start, 0)
        if window % interval:
            raise ValueError(
                f"window must be a positive multiple of interval, got window={window}, "
                f"interval={interval} (merge {name!r})"
            )
        # plain ints (not numpy's), so the config in state_dict() loads with weights_only=True
        spec = dataclasses.replace(
            spec, window=window, interval=interval, start=int(spec.start), keep_last=bool(spec.keep_last)
        )
        w = S.decay_weights(spec.schedule, spec.k)
        c = S.merge_weights(w)
        return cls(name=name, spec=spec, c=c, w_next=np.concatenate((w, [0.0])))

    @property
    def complete(self) -> bool:
        return self.anchored and self.t == self.spec.k

    def set_position(self, steps: int) -> None:
        """Counters after ``steps`` counted steps (the closed form the kernel uses on device)."""
        spec, u = self.spec, steps - self.spec.start
        if u <= 0:
            self.anchored, self.t, self.r, self.windows_completed = False, 0, 0, 0
            self.has_last = False
            return
        window_steps = u % spec.window
        self.anchored = True
        self.windows_completed = u // spec.window
        if window_steps == 0:  # a window just finished; the next anchors at the next step()
            self.t, self.r = spec.k, 0
        else:
            self.t, self.r = divmod(window_steps, spec.interval)
        self.has_last = spec.keep_last and u > spec.window

    @property
    def window_index(self) -> int:
        """Index of the current window (0 before the first anchor; a finished window keeps its index)."""
        return self.windows_completed - (1 if self.complete else 0)

    def target(self, group: "_Group", coef: float, with_last: bool = False) -> Target:
        """This merge's share of an update pass over ``group`` (local views)."""
        return Target(
            accs=group.accs[self.name],
            coef=coef,
            lasts=group.lasts[self.name] if with_last else None,
            name=self.name,
            start=self.spec.start,
            interval=self.spec.interval,
            k=self.spec.k,
            table=self.c,
        )

    def config(self) -> dict[str, Any]:
        digest = hashlib.sha256(np.ascontiguousarray(self.c).tobytes()).hexdigest()[:16]
        return {
            "schedule": S.schedule_name(self.spec.schedule),
            "weights_sha256": digest,
            "window": self.spec.window,
            "interval": self.spec.interval,
            "start": self.spec.start,
        }

    def counters(self) -> dict[str, Any]:
        def host(pair):
            return None if pair is None or pair[0] is None else [float(pair[0]), int(pair[1])]

        return {
            "anchored": self.anchored,
            "t": self.t,
            "r": self.r,
            "windows_completed": self.windows_completed,
            "has_last": self.has_last,
            "skipped": host((self.skipped_mass, self.skipped_count)),
            "last_skipped": host(self.last_skipped),
        }


@dataclass
class _Group:
    """Params whose local tensors share device and dtype: one backend call each.

    ``params`` are the optimizer's params (plain or ``DTensor``), the keys of
    ``_Track.accs``. Backends only ever see the ``local`` lists: the
    ``to_local()`` views of DTensor params and accumulators (the tensors
    themselves for plain ones), unwrapped once here and reused every pass.
    """

    params: list[Tensor]
    local: list[Tensor]
    accs: dict[str, list[Tensor]]
    lasts: dict[str, list[Tensor]]
    sharded: bool  # holds DTensors: local views are re-validated before use

    def is_stale(self) -> bool:
        # FSDP2 may swap a DTensor's local tensor (e.g. re-padding at lazy init
        # after ``to_empty``); an identity check per param catches that.
        return self.sharded and any(D.local_view(p) is not lp for p, lp in zip(self.params, self.local))


def _fp32_copy(t: Tensor) -> Tensor:
    """A detached copy of ``t`` in at least the accumulator precision (fp32 / complex64).

    Used for the live model before a window is anchored, so wider dtypes
    (float64) are kept as they are: that readout is exactly the live model.
    """
    acc = torch.complex64 if t.is_complex() else torch.float32
    return t.detach().to(torch.promote_types(t.dtype, acc), copy=True)


class WSMOptimizer(torch.optim.Optimizer):
    r"""Wrap any optimizer and keep the WSM merge of its recent checkpoints.

    After warmup, train at constant LR; this wrapper maintains, in one fp32
    accumulator per parameter and merge, the weighted merge of the last window's
    checkpoints that Theorem 3.1 of the WSM paper equates to a learning-rate
    decay of the given shape. No checkpoint is stored.

    Args:
        inner: the optimizer to wrap (any ``torch.optim.Optimizer``). Build it
            from ``model.named_parameters()`` so readouts are keyed by name.
        schedule: decay shape: ``"linear"`` (``"mean"``), ``"cosine"``,
            ``"1-sqrt"`` (``"minus-sqrt"``), ``"inv-sqrt"``, ``"ema"``; a
            callable ``f(t)`` with ``f(0) = 1``; or explicit ``w_1..w_k``.
        window: optimizer steps per merge window; a positive multiple of ``interval``.
        interval: steps between checkpoints. ``k = window // interval``
            updates and ``k + 1`` checkpoints per window.
        start: steps before the first window is anchored. Until then the
            merged model is the live model. Windows then tumble: each new
            window is anchored at the last checkpoint of the previous one.
        backend: ``"foreach"``, ``"triton"`` (CUDA, or CPU under
            ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton on CUDA when
            importable, foreach otherwise).
        keep_last: keep the last completed window's merge in one more fp32
            buffer per parameter, readable with ``completed=True``.
        merges: several merges updated side by side, ``{name: dict(schedule=...,
            window=..., interval=..., start=..., keep_last=...)}``. Mutually
            exclusive with the single-merge arguments; readouts take ``merge=name``.
        model: optional module; readouts then return complete
            ``model.state_dict()``-style dicts (buffers from the live model).
        nonfinite: ``"raise"`` (default): a NaN/inf that reached a merge makes
            its readouts raise :class:`NonFiniteMergeError` naming the window
            and the first bad parameter; nothing is checked per step (a NaN
            poisons the fp32 accumulator, which readouts check; the Triton
            kernel also records the step in the same pass). ``"skip"``: each
            checkpoint is checked first (one more read of the params, on the
            device, no host sync); a checkpoint with a non-finite value is left
            out of the merge, readouts renormalize the remaining weights and warn.
        overlap: CUDA only: run the checkpoint update on a side stream so it
            overlaps the next forward/backward; it is joined before the next
            inner step, readout or state_dict.
        capturable: launch the update every step and let the Triton kernel
            decide on the device whether a checkpoint is due, so a step can be
            captured in a CUDA graph. After graph replays call :meth:`sync_steps`
            before reading the merge. Needs ``backend="triton"``.

    Counting: only calls of :meth:`step` count. A step skipped by
    ``torch.amp.GradScaler`` (inf/NaN gradients) never calls it, so it does not count.

    Memory: one fp32 buffer per parameter and merge (two with ``keep_last``).

    Distributed: with ``DTensor`` params (FSDP2 ``fully_shard``, tensor
    parallel) the buffers are ``DTensor`` s sharded like their param and every
    update runs on the local shards, with no communication; DDP needs nothing
    special. ``merged_state_dict(full=True, rank0_only=True)`` gathers; the
    state dict works with ``torch.distributed.checkpoint`` (see ``wsm_optim.distributed``).
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        schedule: S.Schedule = "linear",
        window: int | None = None,
        interval: int = 1,
        start: int = 0,
        backend: str = "auto",
        *,
        keep_last: bool = False,
        merges: Mapping[str, Mapping[str, Any]] | None = None,
        model: nn.Module | None = None,
        nonfinite: str = "raise",
        overlap: bool = False,
        capturable: bool = False,
    ) -> None:
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"inner must be a torch.optim.Optimizer, got {type(inner).__name__}")
        if isinstance(inner, WSMOptimizer):
            raise TypeError("inner is already a WSMOptimizer; use merges= to track several merges")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.inner = inner
        self.model = model
        self._init_hooks()
        self._tracks: dict[str, _Track] = {}
        for name, spec in self._parse_merges(schedule, window, interval, start, keep_last, merges).items():
            self._tracks[name] = _Track.build(name, spec)
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.backend = self._resolve_backend(backend)
        if capturable and (self._backend_name != "triton" or nonfinite == "skip"):
            raise ValueError(
                "capturable=True needs backend='triton' and nonfinite='raise' "
                f"(got backend={self._backend_name!r}, nonfinite={nonfinite!r})"
            )
        self.capturable = capturable
        self._check_capturable(self._params())
        self._side_stream = None
        self._side_done = None
        if overlap:
            if not any(p.is_cuda for p in self._params()):
                raise ValueError("overlap=True needs CUDA parameters (it uses a side CUDA stream)")
            self._side_stream = torch.cuda.Stream(device=next(p for p in self._params() if p.is_cuda).device)
        self._steps = 0
        self._swapped = False
        self._groups: dict[tuple[torch.device, torch.dtype], _Group] | None = None
        self._param_count = -1
        self._grouped()  # gives every param its accumulators

    # ------------------------------------------------------------------ set-up
    def _init_hooks(self) -> None:
        # What torch.optim.Optimizer.__init__ sets up, minus param_groups/state,
        # which belong to the inner optimizer.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    @staticmethod
    def _parse_merges(schedule, window, interval, start, keep_last, merges) -> dict[str, MergeSpec]:
        if merges is None:
            if window is None:
                raise TypeError("window is required: optimizer steps per merge window, e.g. window=1000")
            return {DEFAULT_MERGE: MergeSpec(schedule, window, interval, start, keep_last)}
        if window is not None or schedule != "linear" or interval != 1 or start != 0 or keep_last:
            raise TypeError(
                "pass either merges={...} or the single-merge arguments "
                "(schedule, window, interval, start, keep_last), not both"
            )
        if not isinstance(merges, Mapping) or not merges:
            raise ValueError("merges must be a non-empty dict {name: dict(schedule=..., window=...)}")
        allowed = {"schedule", "window", "interval", "start", "keep_last"}
        specs = {}
        for name, cfg in merges.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"merges: names must be non-empty strings, got {name!r}")
            if not isinstance(cfg, Mapping):
                raise TypeError(f"merges[{name!r}] must be a dict, got {type(cfg).__name__}")
            unknown = set(cfg) - allowed
            if unknown:
                raise TypeError(
                    f"merges[{name!r}]: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}"
                )
            if "window" not in cfg:
                raise TypeError(f"merges[{name!r}]: 'window' is required")
            specs[name] = MergeSpec(**cfg)
        return specs

    def _resolve_backend(self, backend: str):
        valid = ("auto", "foreach", "triton")
        if backend not in valid:
            raise ValueError(f"backend must be one of {valid}, got {backend!r}")
        if backend == "auto":
            backend = "foreach"
            params = list(self._params())
            if params and all(p.is_cuda for p in params):
                try:
                    from . import triton_backend  # noqa: F401

                    backend = "triton"
                except ImportError:
                    pass
        if backend == "triton":
            from . import triton_backend

            if not triton_backend.interpreted() and not all(p.is_cuda for p in self._params()):
                raise ValueError(
                    "backend='triton' needs CUDA parameters (CPU parameters only under "
                    "TRITON_INTERPRET=1, Triton's interpreter for testing); use backend='foreach' or 'auto'"
                )
        self._backend_name = backend
        return BACKENDS[backend]()

    def _params(self) -> Iterator[Tensor]:
        seen: set[int] = set()
        for group in self.inner.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def _adopt(self, p: Tensor) -> bool:
        """Give a parameter its accumulators; returns whether it had none.

        A parameter that joins mid-window (``add_param_group``) is treated as
        having been constant at its current value since the anchor: its merged
        value starts as its live value. The same holds for the last completed
        window kept with ``keep_last`` (its ``completed=True`` value is the live value).
        """
        added = False
        with torch.no_grad():
            for tr in self._tracks.values():
                if p in tr.accs:
                    continue
                added = True
                # Readouts divide by (1 - skipped weight) in skip mode; seed so that
                # they return p: A = (1 - skipped - w_{t+1}) p.
                skipped = float(tr.skipped_mass) if tr.skipped_mass is not None else 0.0
                acc = accumulator_like(p)
                if tr.anchored:
                    acc.copy_(p).mul_(float(1.0 - skipped - tr.w_next[tr.t]))
                tr.accs[p] = acc
                if tr.spec.keep_last:
                    last = accumulator_like(p)
                    if tr.has_last:  # same rule for the kept completed window: constant at p
                        kept_skipped = float(tr.last_skipped[0]) if tr.last_skipped is not None else 0.0
                        last.copy_(p).mul_(1.0 - kept_skipped)
                    tr.lasts[p] = last
        return added

    def _grouped(self) -> dict[tuple[torch.device, torch.dtype], _Group]:
        count = sum(len(g["params"]) for g in self.inner.param_groups)
        if count != self._param_count:  # new params: constructor, add_param_group, direct edits
            self._param_count = count
            if any([self._adopt(p) for p in self._params()]):  # a list: adopt every one
                self._groups = None
                self.backend.invalidate()
        if self._groups is not None and not any(g.is_stale() for g in self._groups.values()):
            return self._groups
        members: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in self._params():
            lp = D.local_view(p)
            members.setdefault((lp.device, lp.dtype), []).append(p)
        groups = {}
        for key, params in members.items():
            groups[key] = _Group(
                params=params,
                local=[D.local_view(p) for p in params],
                accs={n: [D.local_view(tr.accs[p]) for p in params] for n, tr in self._tracks.items()},
                lasts={
                    n: [D.local_view(tr.lasts[p]) for p in params]
                    for n, tr in self._tracks.items()
                    if tr.spec.keep_last
                },
                sharded=any(D.is_dtensor(p) for p in params),
            )
        self._groups = groups
        return groups

    # --------------------------------------------------- torch.optim interface
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.inner.param_groups = value
        self._groups = None

    @property
    def state(self):  # type: ignore[override]
        return self.inner.state

    @state.setter
    def state(self, value) -> None:
        self.inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.inner.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._join()
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        self._check_capturable(p[1] if isinstance(p, tuple) else p for p in group["params"])
        self.inner.add_param_group(group)
        self._grouped()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # an LR scheduler wraps ``step`` on the instance, bound to this object: a copy must
        # use its own (class) step; CUDA streams and events cannot be pickled.
        state.pop("step", None)
        state.pop("_opt_called", None)
        state["_side_stream"] = None
        state["_side_done"] = None
        state["_overlap"] = self._side_stream is not None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        overlap = state.pop("_overlap", False)
        self.__dict__.update(state)
        if overlap and torch.cuda.is_available():
            device = next(p for p in self._params() if p.is_cuda).device
            self._side_stream = torch.cuda.Stream(device=device)

    def __repr__(self) -> str:
        merges = ", ".join(
            f"{n}: {S.schedule_name(t.spec.schedule)} window={t.spec.window} "
            f"interval={t.spec.interval} start={t.spec.start}"
            for n, t in self._tracks.items()
        )
        return f"WSMOptimizer({merges}; backend={self._backend_name})\n{self.inner!r}"

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Run the inner step, then fold the new params into every merge at a checkpoint.

        Returns whatever the inner step returned. Before the inner step, merges
        whose window is complete (or whose ``start`` is reached) are anchored at
        the current params; the finished window's merge stays readable until then.
        """
        if self._swapped:
            raise RuntimeError("step() called inside merged_weights(): the live params are swapped out")
        self._join()
        if D.called_by_dcp_state_init():
            # torch.distributed.checkpoint's _init_optim_state: zero grads and lr=0,
            # only to make the inner optimizer allocate its state. Not a training step.
            return self.inner.step()
        self._begin_windows()
        if closure is None:
            loss = self.inner.step()
        else:
            with torch.enable_grad():
                loss = self.inner.step(closure)
        self._steps += 1
        self.backend.advance(self._devices())
        if self._side_stream is None:
            self._end_step()
        else:
            current = torch.cuda.current_stream(self._side_stream.device)
            self._side_stream.wait_stream(current)
            with torch.cuda.stream(self._side_stream):
                self._end_step()
            self._side_done = self._side_stream.record_event()
        return loss

    def _check_capturable(self, params) -> None:
        if not self.capturable:
            return
        for p in params:
            if not self.backend.handles(D.local_view(p)):
                raise ValueError(
                    f"capturable=True: a parameter of shape {tuple(p.shape)}, dtype {p.dtype}, "
                    f"strides {p.stride()} is not handled by the Triton kernel (it needs fp32/bf16/fp16 "
                    "params dense in memory); the foreach fallback cannot run inside a CUDA graph"
                )

    def _join(self) -> None:
        """Make the current stream wait for an update still running on the side stream."""
        if self._side_done is not None:
            torch.cuda.current_stream(self._side_stream.device).wait_event(self._side_done)
            self._side_done = None

    def _devices(self) -> list[torch.device]:
        return list(dict.fromkeys(d for d, _ in self._grouped()))

    def _checkpoint_ok(self) -> dict[torch.device, Tensor] | None:
        """Skip mode: an int32 flag per device, 1 iff every param is finite (device only)."""
        if self.nonfinite != "skip":
            return None
        groups = self._grouped()
        devices = self._devices()
        flags = {d: torch.ones((), dtype=torch.int32, device=d) for d in devices}
        for (d, _), g in groups.items():
            self.backend.all_finite(g.local, flags[d])
        if len(devices) > 1:  # the checkpoint is bad if any device saw a bad value
            total = flags[devices[0]].clone()
            for d in devices[1:]:
                total.mul_(flags[d].to(devices[0], non_blocking=True))
            flags = {d: total.to(d, non_blocking=True) for d in devices}
        return flags

    def _record_skips(self, tr: _Track, coef: float, ok: Tensor, reset: bool) -> None:
        missed = 1 - ok.to(torch.float32)
        if reset or tr.skipped_mass is None:
            tr.skipped_mass = missed * coef
            tr.skipped_count = missed.clone()
        else:
            tr.skipped_mass.add_(missed * coef)
            tr.skipped_count.add_(missed)

    def _begin_windows(self) -> None:
        due = [
            tr
            for tr in self._tracks.values()
            if tr.complete or (not tr.anchored and self._steps == tr.spec.start)
        ]
        # capturable: every merge goes to the kernel, which decides on the device
        run = list(self._tracks.values()) if self.capturable else due
        ok = None
        if run:
            ok = self._checkpoint_ok()
            for (device, _), g in self._grouped().items():
                targets = [
                    tr.target(g, float(tr.c[0]), with_last=tr.spec.keep_last and (tr.complete or self.capturable))
                    for tr in run
                ]
                self.backend.anchor(g.local, targets, None if ok is None else ok[device])
        for tr in due:
            if tr.spec.keep_last and tr.complete:
                tr.has_last = True
                if tr.skipped_mass is not None:
                    tr.last_skipped = (tr.skipped_mass.clone(), tr.skipped_count.clone())
            if ok is not None:  # skip mode (never capturable): ``run`` is ``due``
                self._record_skips(tr, float(tr.c[0]), ok[self._devices()[0]], reset=True)
            tr.anchored, tr.t, tr.r = True, 0, 0

    def _end_step(self) -> None:
        due: list[tuple[_Track, float]] = []
        for tr in self._tracks.values():
            if not tr.anchored or tr.complete:
                continue
            tr.r += 1
            if tr.r == tr.spec.interval:
                tr.r = 0
                tr.t += 1
                due.append((tr, float(tr.c[tr.t])))
                if tr.t == tr.spec.k:
                    tr.windows_completed += 1
        run = [(tr, 0.0) for tr in self._tracks.values()] if self.capturable else due
        if not run:
            return
        ok = self._checkpoint_ok()
        for (device, _), g in self._grouped().items():
            self.backend.accumulate(
                g.local, [tr.target(g, coef) for tr, coef in run], None if ok is None else ok[device]
            )
        if ok is not None:
            for tr, coef in due:
                self._record_skips(tr, coef, ok[self._devices()[0]], reset=False)

    def sync_steps(self) -> int:
        """Capturable mode: adopt the device step count after CUDA-graph replays.

        Replays advance the device counter but not the host one that readouts
        use; this reads it (one host sync) and recomputes every merge's position.
        """
        steps = self.backend.read_steps()
        if steps is not None and steps != self._steps:
            self._steps = steps
            for tr in self._tracks.values():
                tr.set_position(steps)
        return self._steps

    # ----------------------------------------------------------------- readout
    def _track(self, merge: str | None) -> _Track:
        if merge is None:
            if len(self._tracks) == 1:
                return next(iter(self._tracks.values()))
            raise ValueError(f"merge: several merges are tracked, name one of {list(self._tracks)}")
        if merge not in self._tracks:
            raise ValueError(f"merge: unknown name {merge!r}; tracked merges are {list(self._tracks)}")
        return self._tracks[merge]

    def _completed_source(self, tr: _Track) -> dict[Tensor, Tensor]:
        """The buffers holding the last completed window's merge, or a ``RuntimeError``."""
        if tr.complete:
            return tr.accs
        if tr.has_last:
            return tr.lasts
        if not tr.spec.keep_last and tr.windows_completed:
            raise RuntimeError(
                f"merge {tr.name!r}: the last completed window was overwritten when the next "
                "window began; construct with keep_last=True to keep it"
            )
        if tr.windows_completed:
            raise RuntimeError(
                f"merge {tr.name!r}: the last completed window was not kept (this optimizer resumed from a "
                "state saved without keep_last); the next window to complete will be"
            )
        raise RuntimeError(f"merge {tr.name!r}: no window has completed yet")

    def _merged_fp32(self, tr: _Track, completed: bool) -> dict[Tensor, Tensor]:
        """Merged values (fp32, new tensors) keyed by param, checked for NaN/inf.

        Laid out like the params: a ``DTensor`` param gets a ``DTensor`` value
        with its mesh and placements, computed from local shards only (so the
        NaN/inf check is per rank: the rank holding a bad shard raises).
        """
        self._join()
        if completed:
            source = self._completed_source(tr)
            with torch.no_grad():
                out = {p: source[p].clone() for p in self._params()}
        else:
            out = self._current_fp32(tr)
        scale = self._skip_scale(tr, completed)
        if scale is not None:
            with torch.no_grad():
                torch._foreach_mul_([D.local_view(v) for v in out.values()], scale)
        self._check_finite(tr, out, self._window_of(tr, completed))
        return out

    @staticmethod
    def _window_of(tr: _Track, completed: bool) -> int:
        return tr.windows_completed - 1 if completed else tr.window_index

    def _skip_scale(self, tr: _Track, completed: bool) -> float | None:
        """Skip mode: ``1 / (1 - skipped weight)`` for the readout, warning once per readout."""
        if not tr.anchored:
            return None
        mass, count = (tr.skipped_mass, tr.skipped_count) if not completed or tr.complete else (
            tr.last_skipped or (None, None)
        )
        if mass is None or int(count) == 0:
            return None
        mass, window = float(mass), self._window_of(tr, completed)
        if mass >= 1.0 - 1e-12:
            raise NonFiniteMergeError(
                f"merge {tr.name!r}, window {window}: every checkpoint with weight was skipped "
                "(non-finite params); nothing to merge"
            )
        warnings.warn(
            f"merge {tr.name!r}, window {window}: {int(count)} checkpoint(s) with non-finite params were "
            f"skipped (merge weight {mass:.4g}); the remaining weights are renormalized",
            RuntimeWarning,
            stacklevel=4,
        )
        return 1.0 / (1.0 - mass)

    def _check_finite(self, tr: _Track, out: dict[Tensor, Tensor], window: int) -> None:
        if not out:
            return
        with torch.no_grad():
            ok = torch.stack([torch.isfinite(D.local_view(v)).all().cpu() for v in out.values()])
        if bool(ok.all()):
            return
        bad = next(p for p, good in zip(out, ok.tolist()) if not good)
        names = self._param_names() or {}
        label = repr(names[bad]) if bad in names else f"#{list(out).index(bad)} (shape {tuple(bad.shape)})"
        raise self._nonfinite_error(tr, window, label, self.backend.bad_steps().get(id(bad)))

    def _nonfinite_error(self, tr: _Track, window: int, label: str, steps=None) -> NonFiniteMergeError:
        first = tr.spec.start + window * tr.spec.window
        seen = f"; the kernel read non-finite values at steps {steps[0]}..{steps[1]}" if steps else ""
        if self.nonfinite == "skip":  # skipped checkpoints never reach A: only the live term can
            hint = "Checkpoints are skipped in this mode, so the live params themselves are non-finite now"
        else:
            hint = (
                "A checkpoint in this window (or the live params) held non-finite values; "
                "construct with nonfinite='skip' to leave such checkpoints out"
            )
        return NonFiniteMergeError(
            f"merge {tr.name!r}, window {window} (steps {first}..{first + tr.spec.window}): the merged "
            f"value of parameter {label} is NaN/inf{seen}. {hint}"
        )

    def _readout_local(self, tr: _Track, local: list[Tensor], accs: list[Tensor]) -> list[Tensor]:
        """Current-window merged values of local tensors: ``A + w_{t+1} theta``, or live before the anchor."""
        if tr.anchored:
            return self.backend.readout(local, accs, float(tr.w_next[tr.t]))
        return [_fp32_copy(lp) for lp in local]

    def _current_fp32(self, tr: _Track) -> dict[Tensor, Tensor]:
        out: dict[Tensor, Tensor] = {}
        for g in self._grouped().values():
            vals = self._readout_local(tr, g.local, g.accs[tr.name])
            out.update((p, D.wrap_like(p, v)) for p, v in zip(g.params, vals))
        return out

    def _merged_one_fp32(self, tr: _Track, p: Tensor, completed: bool, scale: float | None) -> Tensor:
        """One param's merged value, computed on its own (streamed gathers): like ``_merged_fp32``."""
        if completed:
            with torch.no_grad():
                v = self._completed_source(tr)[p].clone()
        else:
            (lv,) = self._readout_local(tr, [D.local_view(p)], [D.local_view(tr.accs[p])])
            v = D.wrap_like(p, lv)
        if scale is not None:
            D.local_view(v).mul_(scale)
        return v

    def _param_names(self) -> dict[Tensor, str] | None:
        names: dict[Tensor, str] = {}
        for group in self.inner.param_groups:
            if "param_names" not in group:
                return None
            names.update(zip(group["params"], group["param_names"]))
        return names

    def merged_state_dict(
        self,
        dtype: torch.dtype | None = None,
        *,
        model: nn.Module | None = None,
        merge: str | None = None,
        completed: bool = False,
        full: bool = False,
        rank0_only: bool = False,
        cpu_offload: bool = False,
    ) -> dict[str, Tensor]:
        """The merged model ``M_t = theta_anchor - sum_{i<=t} w_i g_i`` of the current window.

        Right after a window's last step this is exactly the explicit merge of
        its ``k + 1`` checkpoints. With ``interval > 1``, between two
        checkpoints the live params stand in for the next checkpoint, with its
        weight ``w_{t+1}`` (weights still sum to 1). Before the first window is
        anchored the merged model is the live model.

        Args:
            dtype: output dtype; ``None`` keeps each param's dtype,
                ``torch.float32`` returns the accumulator's full precision.
            model: return a complete ``model.state_dict()``-style dict (buffers
                and params not in the optimizer from the live model) that
                ``model.load_state_dict(..., strict=True)`` accepts. Defaults
                to the ``model`` given to the constructor.
            merge: which merge, when several are tracked.
            completed: the last *completed* window instead of the current one:
                available while a finished window has not been replaced yet
                (until the next ``step()``), and at any time with ``keep_last=True``.
            full: gather ``DTensor`` values (FSDP2 / TP) into plain full tensors.
                A collective per tensor: every rank must call it. Streamed one
                tensor at a time (merge the shard, cast, gather, offload, drop),
                so the transient cost is about one full parameter. Plain
                params (DDP, one process) are already full. ``False`` (default):
                ``DTensor`` values sharded like the params, computed from local
                shards without communication, ready for ``torch.distributed.checkpoint.save``.
            rank0_only: with ``full=True``, only global rank 0 keeps the result;
                the other ranks join the gathers and get ``{}``. Use it so that
                one rank writes files (also with DDP).
            cpu_offload: with ``full=True``, move each gathered tensor to CPU as
                soon as it is gathered, so the device holds at most one full one.

        Returns:
            ``{name: tensor}`` of new tensors (not views of live state). Without
            ``model`` the keys are the ``param_names`` the inner optimizer got
            from ``named_parameters()``; with neither, ``ValueError``.
        """
        if (rank0_only or cpu_offload) and not full:
            raise ValueError(
                f"rank0_only={rank0_only} / cpu_offload={cpu_offload} apply to full=True gathers; "
                "sharded readouts (full=False) stay on each rank's device"
            )
        tr = self._track(merge)
        model = model if model is not None else self.model
        names = self._param_names() if model is None else None
        if model is None and names is None:
            raise ValueError(
                "merged_state_dict needs parameter names: build the inner optimizer from "
                "model.named_parameters(), or pass model= (here or to WSMOptimizer)"
            )

        def cast(p: Tensor, v: Tensor) -> Tensor:
            return v.to(dtype if dtype is not None else p.dtype)

        if full:
            return self._gathered_state_dict(tr, completed, cast, names, model, rank0_only, cpu_offload)
        merged = self._merged_fp32(tr, completed)
        if model is None:
            # keys in the optimizer's param order (``merged`` is in dtype-group order)
            return {names[p]: cast(p, merged[p]) for p in self._params()}
        out: dict[str, Tensor] = {}
        for key, value in model.state_dict(keep_vars=True).items():
            if value in merged:
                out[key] = cast(value, merged[value])
            else:
                out[key] = value.detach().clone()
        return out

    def _gathered_state_dict(self, tr, completed, cast, names, model, rank0_only, cpu_offload):
        """``merged_state_dict(full=True)``: one param merged, cast and gathered at a time."""
        self._join()
        scale = self._skip_scale(tr, completed)
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            if model is None:
                items = [(names[p], p, True) for p in self._params()]
            else:
                params = set(self._params())
                items = [(k, v, v in params) for k, v in model.state_dict(keep_vars=True).items()]
            for key, tensor, is_param in items:
                if is_param:
                    value = cast(tensor, self._merged_one_fp32(tr, tensor, completed, scale))
                else:
                    value = tensor.detach()
                full_value = D.gather_full(value, rank0_only=rank0_only, cpu_offload=cpu_offload)
                del value
                if full_value is not None:
                    if is_param and not bool(torch.isfinite(full_value).all()):
                        raise self._nonfinite_error(tr, self._window_of(tr, completed), repr(key))
                    if not is_param and not D.is_dtensor(tensor) and full_value.device == tensor.device:
                        full_value = full_value.clone()  # a plain buffer comes back as the live tensor
                    out[key] = full_value
        return out

    @contextlib.contextmanager
    def merged_weights(self, *, merge: str | None = None, completed: bool = False):
        """Swap the merged values into the live params for the ``with`` block.

        The live values are restored bit-exactly on exit, also on exception.
        Costs one copy of the params (in their dtype) while inside.
        ``step()`` raises inside the block.
        """
        if self._swapped:
            raise RuntimeError("merged_weights() is already active")
        tr = self._track(merge)
        merged = self._merged_fp32(tr, completed)
        with torch.no_grad():
            backup = {p: p.detach().clone() for p in merged}
            for p, v in merged.items():
                D.local_view(p).copy_(D.local_view(v))  # shard to shard: no communication
        del merged
        self._swapped = True
        try:
            yield self
        finally:
            with torch.no_grad():
                for p, v in backup.items():
                    D.local_view(p).copy_(D.local_view(v))
            self._swapped = False

    def save_merged(
        self,
        path,
        dtype: torch.dtype | None = None,
        *,
        model: nn.Module | None = None,
        merge: str | None = None,
        completed: bool = False,
    ):
        """Write :meth:`merged_state_dict` to ``path`` crash-safely; returns the ``Path``.

        safetensors by default; ``.pt``/``.pth``/``.bin`` use ``torch.save``.
        Written via :func:`wsm_optim.io.atomic_save` (temp file, fsync,
        ``os.replace``): a crash never leaves a partial file under ``path``.
        Arguments as for :meth:`merged_state_dict`. Tied weights (with
        ``model=``) are written as separate tensors under each key.
        """
        from .io import atomic_save

        state = self.merged_state_dict(dtype, model=model, merge=merge, completed=completed)
        return atomic_save(state, path)

    # -------------------------------------------------------------- inspection
    @property
    def merges(self) -> tuple[str, ...]:
        """Names of the tracked merges."""
        return tuple(self._tracks)

    @property
    def steps(self) -> int:
        """Counted optimizer steps since wrapping (restored by ``load_state_dict``)."""
        return self._steps

    def merge_status(self, merge: str | None = None) -> dict[str, Any]:
        """Counters of one merge: ``window_index``, ``checkpoint`` (t of k), ``k``, ...

        ``weights`` are the coefficients the current readout gives the anchor,
        each checkpoint so far and (last) the live params: float64, sums to 1.
        """
        tr = self._track(merge)
        live = tr.w_next[tr.t] if tr.anchored else 1.0
        weights = np.concatenate((tr.c[: tr.t + 1], [live])) if tr.anchored else np.array([1.0])
        return {
            "anchored": tr.anchored,
            "window_index": tr.window_index if tr.anchored else -1,
            "checkpoint": tr.t,
            "k": tr.spec.k,
            "steps_since_checkpoint": tr.r,
            "complete": tr.complete,
            "windows_completed": tr.windows_completed,
            "weights": weights,
        }

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Inner state plus WSM buffers and counters (hooks registered on the wrapper run around it).

        As with ``torch.optim`` optimizers, tensors in the result are references
        to the live buffers (no copy of the accumulators is made): ``torch.save``
        it or ``copy.deepcopy`` it to keep a snapshot while training goes on.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self._state_dict_impl()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _state_dict_impl(self) -> dict[str, Any]:
        """Inner state plus WSM buffers and counters.

        Format (``"wsm"`` version 1): the inner optimizer's state dict; in each
        parameter's ``state`` entry the fp32 buffers ``wsm_acc.<merge>`` (and,
        for merges with ``keep_last``, ``wsm_last.<merge>``), the live tensors
        themselves (``DTensor`` s sharded like their param under FSDP2 / TP); and
        ``{"version", "steps", "merges": {name: {"config", "counters"}}}`` both
        under the top-level key ``"wsm"`` and under ``"wsm"`` in every param
        group. The copy in the param groups is what survives
        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``,
        which keeps only ``state`` and ``param_groups``.
        """
        self._join()
        sd = self.inner.state_dict()
        state = dict(sd["state"])
        for pid, p in enumerate(self._params()):
            entry = dict(state.get(pid, {}))
            for tr in self._tracks.values():
                entry[f"{_ACC}.{tr.name}"] = tr.accs[p]
                if tr.spec.keep_last:
                    # Always present (zeros until a window completes) so that a
                    # DCP load template built before training has the key.
                    entry[f"{_LAST}.{tr.name}"] = tr.lasts[p]
            state[pid] = entry
        sd["state"] = state
        wsm = {
            "version": _STATE_VERSION,
            "steps": self._steps,
            "merges": {
                n: {"config": tr.config(), "counters": tr.counters()} for n, tr in self._tracks.items()
            },
        }
        sd["wsm"] = wsm
        sd["param_groups"] = [dict(g, wsm=copy.deepcopy(wsm)) for g in sd["param_groups"]]
        return sd

    @staticmethod
    def _saved_wsm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
        if "wsm" in state_dict:
            return state_dict["wsm"]
        for group in state_dict.get("param_groups", ()):
            if "wsm" in group:
                return group["wsm"]
        raise ValueError(
            "load_state_dict: no 'wsm' entry (top level or in param_groups); this is not a "
            "WSMOptimizer state dict (load a plain optimizer state with opt.inner.load_state_dict). "
            "With torch.distributed.checkpoint, flatten_optimizer_state_dict=True drops it: "
            "use the default StateDictOptions"
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore inner state, accumulators and counters (see ``_load_state_dict_impl``).

        Load-state-dict hooks registered on the wrapper run around it, as in ``torch.optim``.
        """
        state_dict = dict(state_dict)  # shallow copy, as torch.optim does
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_state_dict_impl(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_state_dict_impl(self, state_dict: dict[str, Any]) -> None:
        """Restore inner state, accumulators and counters.

        Accepts this class's :meth:`state_dict`, also after
        ``torch.distributed.checkpoint.state_dict`` re-keyed it by parameter
        name (state entries are matched to params by their position in the
        saved ``param_groups``, as ``torch.optim.Optimizer`` does). Saved
        accumulators are copied into the existing buffers: ``DTensor`` s laid out
        like the params, or plain full tensors (each rank keeps its slice).
        Raises ``ValueError`` naming the field if the saved merges differ from
        this optimizer's (names, schedule, weights, window, interval, start).
        """
        wsm = self._saved_wsm(state_dict)
        if wsm.get("version") != _STATE_VERSION:
            raise ValueError(f"load_state_dict: unsupported wsm state version {wsm.get('version')!r}")
        saved = wsm["merges"]
        if set(saved) != set(self._tracks):
            raise ValueError(
                f"load_state_dict: merge names differ: saved {sorted(saved)}, "
                f"this optimizer {sorted(self._tracks)}"
            )
        for name, tr in self._tracks.items():
            mine, theirs = tr.config(), saved[name]["config"]
            for key in ("schedule", "window", "interval", "start", "weights_sha256"):
                if mine[key] != theirs.get(key):
                    raise ValueError(
                        f"load_state_dict: merge {name!r}: {key} mismatch: saved "
                        f"{theirs.get(key)!r}, this optimizer {mine[key]!r}"
                    )
        inner_state: dict[Any, dict[str, Any]] = {}
        extra: dict[Any, dict[str, Tensor]] = {}
        for pid, entry in state_dict["state"].items():
            plain = {k: v for k, v in entry.items() if not k.startswith((_ACC + ".", _LAST + "."))}
            extra[pid] = {k: v for k, v in entry.items() if k not in plain}
            if plain:
                inner_state[pid] = plain
        inner_sd = {k: v for k, v in state_dict.items() if k not in ("state", "wsm", "param_groups")}
        inner_sd["param_groups"] = [
            {k: v for k, v in g.items() if k != "wsm"} for g in state_dict["param_groups"]
        ]
        inner_sd["state"] = inner_state
        self._join()
        self.inner.load_state_dict(inner_sd)
        self._groups = None
        params = list(self._params())
        counter_device = self._devices()[0] if params else torch.device("cpu")

        def on_device(pair):  # skip-mode (weight, count) from host floats
            if not pair:
                return None
            return tuple(torch.tensor(float(x), dtype=torch.float32, device=counter_device) for x in pair)

        # Saved keys in param order: ints from state_dict(), names after DCP re-keying.
        saved_keys = [k for g in state_dict["param_groups"] for k in g["params"]]
        with torch.no_grad():
            for name, tr in self._tracks.items():
                counters = saved[name]["counters"]
                keep_saved_last = tr.spec.keep_last and counters["has_last"]
                for saved_key, p in zip(saved_keys, params):
                    src = extra.get(saved_key, {})
                    key = f"{_ACC}.{name}"
                    if key not in src:
                        raise ValueError(f"load_state_dict: parameter {saved_key!r} has no {key!r} entry")
                    if p not in tr.accs:
                        tr.accs[p] = accumulator_like(p)
                    D.copy_into(tr.accs[p], src[key])
                    if tr.spec.keep_last:
                        if p not in tr.lasts:
                            tr.lasts[p] = accumulator_like(p)
                        if keep_saved_last:
                            D.copy_into(tr.lasts[p], src[f"{_LAST}.{name}"])
                        else:
                            tr.lasts[p].zero_()
                live = {id(p) for p in params}
                for p in [p for p in tr.accs if id(p) not in live]:
                    del tr.accs[p]
                    tr.lasts.pop(p, None)
                tr.anchored = bool(counters["anchored"])
                tr.t, tr.r = int(counters["t"]), int(counters["r"])
                tr.windows_completed = int(counters["windows_completed"])
                tr.has_last = bool(keep_saved_last)
                tr.skipped_mass, tr.skipped_count = on_device(counters.get("skipped")) or (None, None)
                tr.last_skipped = on_device(counters.get("last_skipped"))
        self._steps = int(wsm["steps"])
        self.backend.invalidate()
        self.backend.set_steps(self._steps)
