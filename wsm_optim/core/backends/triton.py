"""Launchers for the Triton kernels in ``wsm_optim.kernels`` (``backend="triton"``).

One kernel launch per (device, dtype) group and phase, whatever the number of
tensors and merges, under the device guard of the group's device. Launch
tables (data pointers, chunk table, merge metadata and weights) are built once per
group layout and kept in the group's ``cache``; pointers are re-validated on
the host each launch (cheap ``data_ptr()`` calls, no device access), so a
parameter whose storage was replaced is never written through a stale pointer.

The kernel finds each merge's coefficient from the :class:`DeviceClock` (the
counted steps, on the device): ``step()`` reads nothing back, and a captured
CUDA graph replays with the right weights.

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import BackendBase, MergeUpdate, foreach

try:
    import triton.language as tl
except ImportError as e:  # pragma: no cover - exercised only without triton
    raise ImportError("backend='triton' needs the triton package (pip install triton; Linux only)") from e

from ...kernels.wsm_update import nonfinite_check_kernel, wsm_update_kernel

__all__ = ["TritonBackend", "DeviceClock", "interpreted", "is_dense"]

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreted() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill a gap-free block of memory (any stride order).

    Such a tensor and an accumulator with the same strides line up element by
    element in memory order, so the kernel can walk both linearly.
    """
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda x: x[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _guard(device: torch.device):
    """Launch on ``device`` whatever the current CUDA device is (params on ``cuda:1``, current ``cuda:0``)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class DeviceClock:
    """Counted optimizer steps, one int64 scalar per device, advanced on the device every step."""

    def __init__(self) -> None:
        self._counters: dict[torch.device, Tensor] = {}
        self._base = 0

    def counter(self, device: torch.device) -> Tensor:
        if device not in self._counters:
            self._counters[device] = torch.full((), self._base, dtype=torch.int64, device=device)
        return self._counters[device]

    def advance(self, devices: Iterable[torch.device]) -> None:
        for d in devices:
            self.counter(d).add_(1)

    def set(self, steps: int) -> None:
        """Set every counter (on load; a host-to-device write, not per step)."""
        self._base = steps
        for counter in self._counters.values():
            counter.fill_(steps)

    def read(self) -> int | None:
        """The device step count (a host sync), or ``None`` before the first step."""
        return int(next(iter(self._counters.values())).item()) if self._counters else None


@dataclass(frozen=True)
class MergePlan:
    """What the kernel needs about one merge to find its coefficient from the device step counter.

    ``weights`` (``c_0..c_k``) is materialised only when a launch table is built.
    """

    name: str
    start: int
    interval: int
    k: int
    weights: Any

    def coefficients(self) -> np.ndarray:
        """``c_0..c_k`` as float64 (materialised)."""
        return np.asarray(self.weights.coefficients(), dtype=np.float64)


@dataclass
class _Split:
    """Which tensors of a group the kernel handles (``fast``) and which go to foreach (``slow``)."""

    params: Sequence[Tensor]
    fast: list[int]
    slow: list[int]
    fast_params: list[Tensor]


@dataclass
class _Launch:
    """Device pointer, chunk and coefficient tables of one group for one tuple of merges."""

    ptr_key: tuple[int, ...]  # data_ptrs the pointer tables were built from
    param_ids: tuple[int, ...]  # id() of each param, to name it in errors
    param_ptrs: Tensor
    numels: Tensor
    chunk_tensor: Tensor
    chunk_start: Tensor
    acc_ptrs: Tensor
    completed_ptrs: Tensor
    origin_ptrs: Tensor
    origin: bool  # the merges fold displacements from their window origins
    coefs: Tensor
    meta: Tensor
    n_chunks: int
    aligned: bool  # every pointer 16-byte aligned: the kernel may use vector accesses
    bad_step: Tensor  # i64 [2, n_tensors]: first / last step a NaN/inf was read


class TritonBackend(BackendBase):
    """Fused one-launch update, same interface as :class:`~wsm_optim.core.backends.foreach.ForeachBackend`.

    The kernel ignores ``MergeUpdate.coef``: it reads the merge weights from a
    device table (built from each merge's :class:`MergePlan`) at the index given by :attr:`clock`. Parameters that are not
    dense in memory, or of a dtype the kernel does not handle (float64,
    complex), go through the foreach path instead (still correct).
    """

    name = "triton"
    capturable = True

    def __init__(self, block: int | None = None, num_warps: int = 8) -> None:
        self.block = block or (1024 if interpreted() else 4096)
        self.num_warps = num_warps
        self.clock = DeviceClock()
        self._ok: dict[torch.device, Tensor] = {}

    @staticmethod
    def handles(p: Tensor) -> bool:
        """Whether the kernel updates ``p`` (else the foreach path does)."""
        return p.dtype in _TL_DTYPES and is_dense(p) and (p.is_cuda or interpreted())

    def plan(self, name: str, spec: Any) -> MergePlan:
        return MergePlan(name, spec.start, spec.interval, spec.k, spec.weights)

    # ------------------------------------------------------------------ tables
    def _split(self, params: Sequence[Tensor], cache: dict) -> _Split:
        split = cache.get("split")
        if split is None or split.params is not params or len(split.params) != len(params):
            fast = [i for i, p in enumerate(params) if self.handles(p)]
            slow = sorted(set(range(len(params))) - set(fast))
            split = cache["split"] = _Split(params, fast, slow, [params[i] for i in fast])
        return split

    def _launch_tables(self, split: _Split, updates: Sequence[MergeUpdate], cache: dict) -> _Launch:
        key = (
            tuple(up.plan.name for up in updates),
            tuple(up.completed is not None for up in updates),
            tuple(id(up.accs[0]) if up.accs else 0 for up in updates),
            tuple(id(up.origins[0]) if up.origins else 0 for up in updates),
        )
        launches = cache.setdefault("launches", {})
        cached = launches.get(key)
        if cached is None or cached.ptr_key != tuple(p.data_ptr() for p in split.fast_params):
            subsets = [up.subset(split.fast) for up in updates]
            cached = launches[key] = self._build(split.fast_params, subsets, launches.get(key))
        return cached

    def _build(self, params: list[Tensor], updates: Sequence[MergeUpdate], previous: _Launch | None) -> _Launch:
        device = params[0].device
        n = len(params)
        numels = np.array([p.numel() for p in params], dtype=np.int64)
        per_tensor = -(-numels // self.block)
        chunk_tensor = np.repeat(np.arange(n, dtype=np.int32), per_tensor)
        starts = np.concatenate([np.arange(c, dtype=np.int64) * self.block for c in per_tensor]) if n else []
        acc, completed, origins, meta, tables = [], [], [], [], []
        offset = 0
        with_origin = {up.origins is not None for up in updates}
        if len(with_origin) > 1:
            raise RuntimeError("internal: merges of one launch differ in whether they have window origins")
        for up in updates:
            for a, p in zip(up.accs, params):
                if a.stride() != p.stride() or a.dtype != torch.float32:
                    raise RuntimeError("internal: accumulator layout differs from its parameter")
            for o, p in zip(up.origins or (), params):
                if o.stride() != p.stride() or o.dtype != p.dtype:
                    raise RuntimeError("internal: window origin layout differs from its parameter")
            table = up.plan.coefficients()
            acc += [a.data_ptr() for a in up.accs]
            completed += [x.data_ptr() for x in up.completed] if up.completed is not None else [0] * n
            origins += [o.data_ptr() for o in up.origins] if up.origins is not None else [0] * n
            meta += [up.plan.start, up.plan.interval, up.plan.k, offset, int(up.completed is not None)]
            tables.append(table)
            offset += len(table)

        def dev(x, dtype):
            return torch.as_tensor(np.asarray(x), dtype=dtype).to(device)

        param_ptrs = [p.data_ptr() for p in params]
        pointers = param_ptrs + acc + [x for x in completed + origins if x]
        return _Launch(
            ptr_key=tuple(param_ptrs),
            param_ids=tuple(id(p) for p in params),
            param_ptrs=dev(param_ptrs, torch.int64),
            numels=dev(numels, torch.int64),
            chunk_tensor=dev(chunk_tensor, torch.int32),
            chunk_start=dev(starts, torch.int64),
            acc_ptrs=dev(acc, torch.int64),
            completed_ptrs=dev(completed, torch.int64),
            origin_ptrs=dev(origins if origins else [0], torch.int64),
            origin=with_origin == {True},
            coefs=dev(np.concatenate(tables) if tables else np.zeros(1), torch.float32),
            meta=dev(meta, torch.int64),
            n_chunks=int(per_tensor.sum()),
            aligned=all(x % 16 == 0 for x in pointers),
            # a rebuilt table (storage replaced) keeps what was already seen
            bad_step=previous.bad_step
            if previous is not None and previous.param_ids == tuple(id(p) for p in params)
            else dev([[torch.iinfo(torch.int64).max] * n, [-1] * n], torch.int64),
        )

    # ------------------------------------------------------------------ launch
    def _launch(self, phase: int, params: Sequence[Tensor], updates: Sequence[MergeUpdate], ok, cache) -> None:
        cache = {} if cache is None else cache
        split = self._split(params, cache)
        if split.slow:
            sub = [params[i] for i in split.slow]
            subsets = [up.subset(split.slow) for up in updates]
            (foreach.anchor if phase == 0 else foreach.accumulate)(sub, subsets, ok)
        if not split.fast or not updates:
            return
        tab = self._launch_tables(split, updates, cache)
        if tab.n_chunks == 0:
            return
        ps = split.fast_params
        device = ps[0].device
        with _guard(device):
            kept = tab.coefs  # not read unless an anchor of a skip-mode run with origins keeps a window
            if phase == 0 and ok is not None and tab.origin:
                kept = torch.stack([
                    up.kept.to(device, torch.float32) if up.kept is not None
                    else torch.ones((), dtype=torch.float32, device=device) for up in updates
                ])
            wsm_update_kernel[(tab.n_chunks,)](
                tab.param_ptrs,
                tab.numels,
                tab.chunk_tensor,
                tab.chunk_start,
                tab.acc_ptrs,
                tab.completed_ptrs,
                tab.origin_ptrs,
                kept,
                tab.coefs,
                tab.meta,
                self.clock.counter(device),
                tab.bad_step,
                ok if ok is not None else self._ok_dummy(device),
                len(ps),
                N_MERGES=len(updates),
                PHASE=phase,
                PARAM_DTYPE=_TL_DTYPES[ps[0].dtype],
                SKIP=ok is not None,
                ORIGIN=tab.origin,
                BLOCK=self.block,
                ALIGNED=tab.aligned,
                num_warps=self.num_warps,
                enable_fp_fusion=True,  # A + c * x as one FMA: one rounding instead of two
            )

    def _ok_dummy(self, device: torch.device) -> Tensor:
        if device not in self._ok:
            self._ok[device] = torch.ones((), dtype=torch.int32, device=device)
        return self._ok[device]

    def anchor(self, params: Sequence[Tensor], updates: Sequence[MergeUpdate], ok: Tensor | None = None,
               cache: dict | None = None) -> None:
        self._launch(0, params, updates, ok, cache)

    def accumulate(self, params: Sequence[Tensor], updates: Sequence[MergeUpdate], ok: Tensor | None = None,
                   cache: dict | None = None) -> None:
        self._launch(1, params, updates, ok, cache)

    def all_finite(self, params: Sequence[Tensor], ok: Tensor, cache: dict | None = None) -> None:
        """Clear the int32 device flag ``ok`` if any value of ``params`` is NaN/inf."""
        cache = {} if cache is None else cache
        split = self._split(params, cache)
        if split.slow:
            foreach.all_finite([params[i] for i in split.slow], ok)
        if not split.fast:
            return
        ps = split.fast_params
        tab = self._launch_tables(split, [], cache)
        if tab.n_chunks:
            with _guard(ps[0].device):
                nonfinite_check_kernel[(tab.n_chunks,)](
                    tab.param_ptrs,
                    tab.numels,
                    tab.chunk_tensor,
                    tab.chunk_start,
                    ok,
                    PARAM_DTYPE=_TL_DTYPES[ps[0].dtype],
                    BLOCK=self.block,
                    ALIGNED=tab.aligned,
                    num_warps=self.num_warps,
                    enable_fp_fusion=True,
                )

    def nonfinite_steps(self, caches: Iterable[dict]) -> dict[int, tuple[int, int]]:
        """``{id(param): (first, last) step a NaN/inf was read}`` (host sync: readouts only)."""
        out: dict[int, tuple[int, int]] = {}
        for cache in caches:
            for key, tab in cache.get("launches", {}).items():
                if not key[0]:
                    continue
                firsts, lasts = tab.bad_step.tolist()
                for pid, first, last in zip(tab.param_ids, firsts, lasts):
                    if last >= 0:
                        old = out.get(pid, (first, last))
                        out[pid] = (min(old[0], first), max(old[1], last))
        return out
