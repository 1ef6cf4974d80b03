"""``WSMOptimizer``: a wrapper that keeps the WSM checkpoint merge while training.

The state machine lives here; the arithmetic is in ``functional`` (and the
Triton kernels), the merge weights in ``schedules``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import schedules as S
from .functional import BACKENDS, Target, accumulator_like

__all__ = ["WSMOptimizer", "MergeSpec", "DEFAULT_MERGE"]

DEFAULT_MERGE = "default"
_STATE_VERSION = 1
_ACC = "wsm_acc"
_LAST = "wsm_last"


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

    @classmethod
    def build(cls, name: str, spec: MergeSpec) -> "_Track":
        window = _check_int(f"merges[{name!r}].window" if name != DEFAULT_MERGE else "window", spec.window, 1)
        interval = _check_int(
            f"merges[{name!r}].interval" if name != DEFAULT_MERGE else "interval", spec.interval, 1
        )
        _check_int(f"merges[{name!r}].start" if name != DEFAULT_MERGE else "start", spec.start, 0)
        if window % interval:
            raise ValueError(
                f"window must be a positive multiple of interval, got window={window}, "
                f"interval={interval} (merge {name!r})"
            )
        w = S.decay_weights(spec.schedule, spec.k)
        c = S.merge_weights(w)
        return cls(name=name, spec=spec, c=c, w_next=np.concatenate((w, [0.0])))

    @property
    def complete(self) -> bool:
        return self.anchored and self.t == self.spec.k

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
        return {
            "anchored": self.anchored,
            "t": self.t,
            "r": self.r,
            "windows_completed": self.windows_completed,
            "has_last": self.has_last,
        }


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

    Counting: only calls of :meth:`step` count. A step skipped by
    ``torch.amp.GradScaler`` (inf/NaN gradients) never calls it, so it does not count.

    Memory: one fp32 buffer per parameter and merge (two with ``keep_last``).
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
        self.backend = self._resolve_backend(backend)
        self._steps = 0
        self._swapped = False
        self._groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] | None = None
        for p in self._params():
            self._adopt(p)

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
            if any(p.is_cuda for p in self._params()):
                try:
                    from . import triton_backend  # noqa: F401

                    backend = "triton"
                except ImportError:
                    pass
        if backend == "triton" and "triton" not in BACKENDS:
            from . import triton_backend  # noqa: F401  (registers itself)
        self._backend_name = backend
        return BACKENDS[backend]()

    def _params(self) -> Iterator[Tensor]:
        seen: set[int] = set()
        for group in self.inner.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def _adopt(self, p: Tensor) -> None:
        """Give a parameter its accumulators.

        A parameter that joins mid-window (``add_param_group``) is treated as
        having been constant at its current value since the anchor: its merged
        value starts as its live value. The same holds for the last completed
        window kept with ``keep_last`` (its ``completed=True`` value is the live value).
        """
        with torch.no_grad():
            for tr in self._tracks.values():
                if p in tr.accs:
                    continue
                acc = accumulator_like(p)
                if tr.anchored:
                    acc.copy_(p).mul_(float(1.0 - tr.w_next[tr.t]))
                tr.accs[p] = acc
                if tr.spec.keep_last:
                    last = accumulator_like(p)
                    if tr.has_last:  # same rule for the kept completed window: constant at p
                        last.copy_(p)
                    tr.lasts[p] = last
        self._groups = None

    def _grouped(self) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
        if self._groups is None:
            groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for p in self._params():
                groups.setdefault((p.device, p.dtype), []).append(p)
            self._groups = groups
        return self._groups

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
        self.inner.add_param_group(param_group)
        for p in self._params():
            self._adopt(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

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
        self._begin_windows()
        if closure is None:
            loss = self.inner.step()
        else:
            with torch.enable_grad():
                loss = self.inner.step(closure)
        self._steps += 1
        self._end_step()
        return loss

    def _begin_windows(self) -> None:
        due = [
            tr
            for tr in self._tracks.values()
            if tr.complete or (not tr.anchored and self._steps == tr.spec.start)
        ]
        if not due:
            return
        for params in self._grouped().values():
            targets = []
            for tr in due:
                keep = tr.spec.keep_last and tr.complete
                targets.append(
                    Target(
                        accs=[tr.accs[p] for p in params],
                        coef=float(tr.c[0]),
                        lasts=[tr.lasts[p] for p in params] if keep else None,
                    )
                )
            self.backend.anchor(params, targets)
        for tr in due:
            if tr.spec.keep_last and tr.complete:
                tr.has_last = True
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
        if not due:
            return
        for params in self._grouped().values():
            self.backend.accumulate(
                params, [Target(accs=[tr.accs[p] for p in params], coef=coef) for tr, coef in due]
            )

    # ----------------------------------------------------------------- readout
    def _track(self, merge: str | None) -> _Track:
        if merge is None:
            if len(self._tracks) == 1:
                return next(iter(self._tracks.values()))
            raise ValueError(f"merge: several merges are tracked, name one of {list(self._tracks)}")
        if merge not in self._tracks:
            raise ValueError(f"merge: unknown name {merge!r}; tracked merges are {list(self._tracks)}")
        return self._tracks[merge]

    def _merged_fp32(self, tr: _Track, completed: bool) -> dict[Tensor, Tensor]:
        """Merged values (fp32, new tensors) keyed by param."""
        out: dict[Tensor, Tensor] = {}
        if completed:
            if tr.complete:
                source = tr.accs
            elif tr.has_last:
                source = tr.lasts
            elif not tr.spec.keep_last and tr.windows_completed:
                raise RuntimeError(
                    f"merge {tr.name!r}: the last completed window was overwritten when the next "
                    "window began; construct with keep_last=True to keep it"
                )
            else:
                raise RuntimeError(f"merge {tr.name!r}: no window has completed yet")
            with torch.no_grad():
                return {p: source[p].clone() for p in self._params()}
        for params in self._grouped().values():
            if tr.anchored:
                vals = self.backend.readout(params, [tr.accs[p] for p in params], float(tr.w_next[tr.t]))
            else:
                vals = [p.detach().to(accumulator_like(p).dtype, copy=True) for p in params]
            out.update(zip(params, vals))
        return out

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

        Returns:
            ``{name: tensor}`` of new tensors (not views of live state). Without
            ``model`` the keys are the ``param_names`` the inner optimizer got
            from ``named_parameters()``; with neither, ``ValueError``.
        """
        tr = self._track(merge)
        model = model if model is not None else self.model
        names = self._param_names() if model is None else None
        if model is None and names is None:
            raise ValueError(
                "merged_state_dict needs parameter names: build the inner optimizer from "
                "model.named_parameters(), or pass model= (here or to WSMOptimizer)"
            )
        merged = self._merged_fp32(tr, completed)

        def cast(p: Tensor, v: Tensor) -> Tensor:
            return v.to(dtype if dtype is not None else p.dtype)

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
                p.copy_(v)
        del merged
        self._swapped = True
        try:
            yield self
        finally:
            with torch.no_grad():
                for p, v in backup.items():
                    p.copy_(v)
            self._swapped = False

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
            "window_index": tr.windows_completed - (1 if tr.complete else 0) if tr.anchored else -1,
            "checkpoint": tr.t,
            "k": tr.spec.k,
            "steps_since_checkpoint": tr.r,
            "complete": tr.complete,
            "windows_completed": tr.windows_completed,
            "weights": weights,
        }

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Inner state plus, per parameter, ``wsm_acc.<merge>`` / ``wsm_last.<merge>``
        fp32 buffers in its ``state`` entry, and config/counters under ``"wsm"``."""
        sd = self.inner.state_dict()
        state = dict(sd["state"])
        for pid, p in enumerate(self._params()):
            entry = dict(state.get(pid, {}))
            for tr in self._tracks.values():
                entry[f"{_ACC}.{tr.name}"] = tr.accs[p]
                if tr.has_last:
                    entry[f"{_LAST}.{tr.name}"] = tr.lasts[p]
            state[pid] = entry
        sd["state"] = state
        sd["wsm"] = {
            "version": _STATE_VERSION,
            "steps": self._steps,
            "merges": {
                n: {"config": tr.config(), "counters": tr.counters()} for n, tr in self._tracks.items()
            },
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore inner state, accumulators and counters.

        Raises ``ValueError`` naming the field if the saved merges differ from
        this optimizer's (names, schedule, weights, window, interval, start).
        """
        if "wsm" not in state_dict:
            raise ValueError(
                "load_state_dict: no 'wsm' entry; this is not a WSMOptimizer state dict "
                "(load a plain optimizer state with opt.inner.load_state_dict)"
            )
        wsm = state_dict["wsm"]
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
        inner_sd = {k: v for k, v in state_dict.items() if k not in ("state", "wsm")}
        inner_sd["state"] = inner_state
        self.inner.load_state_dict(inner_sd)
        self._groups = None
        params = list(self._params())
        with torch.no_grad():
            for name, tr in self._tracks.items():
                counters = saved[name]["counters"]
                keep_saved_last = tr.spec.keep_last and counters["has_last"]
                for pid, p in enumerate(params):
                    src = extra.get(pid, {})
                    key = f"{_ACC}.{name}"
                    if key not in src:
                        raise ValueError(f"load_state_dict: parameter {pid} has no {key!r} entry")
                    tr.accs[p] = accumulator_like(p).copy_(src[key])
                    if tr.spec.keep_last:
                        tr.lasts[p] = accumulator_like(p)
                        if keep_saved_last:
                            tr.lasts[p].copy_(src[f"{_LAST}.{name}"])
                live = {id(p) for p in params}
                for p in [p for p in tr.accs if id(p) not in live]:
                    del tr.accs[p]
                    tr.lasts.pop(p, None)
                tr.anchored = bool(counters["anchored"])
                tr.t, tr.r = int(counters["t"]), int(counters["r"])
                tr.windows_completed = int(counters["windows_completed"])
                tr.has_last = bool(keep_saved_last)
        self._steps = int(wsm["steps"])
