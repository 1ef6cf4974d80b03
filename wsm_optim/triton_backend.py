"""Launchers for the Triton kernels in ``wsm_optim.kernels`` (``backend="triton"``).

One kernel launch per (device, dtype) group and phase, whatever the number of
tensors and merges. Tables (data pointers, chunk table, merge metadata and
weights) are built once per group and cached on the device; pointers are
re-validated on the host each launch (cheap ``data_ptr()`` calls, no device
access) so that a parameter whose storage was replaced is never written
through a stale pointer.

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .functional import BACKENDS, ForeachBackend, Target

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - exercised only without triton
    raise ImportError(
        "backend='triton' needs the triton package (pip install triton; Linux only)"
    ) from e

from .kernels.wsm_update import nonfinite_check_kernel, wsm_update_kernel

__all__ = ["TritonBackend", "interpreted", "is_dense"]

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


@dataclass
class _Plan:
    """Which params of a list the kernel handles (``fast``) and which go to foreach (``slow``)."""

    params: Sequence[Tensor]
    fast: list[int]
    slow: list[int]
    fast_params: list[Tensor]


@dataclass
class _GroupTables:
    """Device tables of one group for one tuple of merges."""

    ptr_key: tuple[int, ...]  # data_ptrs the pointer tables were built from
    param_ids: tuple[int, ...]  # id() of each param, to name it in errors
    param_ptrs: Tensor
    numels: Tensor
    chunk_tensor: Tensor
    chunk_start: Tensor
    acc_ptrs: Tensor
    last_ptrs: Tensor
    coefs: Tensor
    meta: Tensor
    n_chunks: int
    aligned: bool  # every pointer 16-byte aligned: the kernel may use vector accesses
    bad_step: Tensor  # i64 [2, n_tensors]: first / last step a NaN/inf was read


class TritonBackend:
    """Fused one-launch update; same interface as :class:`ForeachBackend`.

    The kernel ignores ``Target.coef``: it reads the merge weights from a
    device table at the index given by the device step counter (``advance``
    increments it every counted step), so ``step()`` reads nothing back from
    the device and a captured CUDA graph replays with the right weights.
    Parameters that are not dense in memory, or of a dtype the kernel does not
    handle, go through the foreach path instead (still correct).
    """

    name = "triton"

    def __init__(self, block: int | None = None, num_warps: int = 8) -> None:
        self.block = block or (1024 if interpreted() else 4096)
        self.num_warps = num_warps
        self._steps: dict[torch.device, Tensor] = {}
        self._ok: dict[torch.device, Tensor] = {}
        self._tables: dict[tuple, _GroupTables] = {}
        self._plans: dict[int, _Plan] = {}
        self._base_steps = 0

    # ----------------------------------------------------------- step counter
    def step_counter(self, device: torch.device) -> Tensor:
        if device not in self._steps:
            self._steps[device] = torch.full((), self._base_steps, dtype=torch.int64, device=device)
        return self._steps[device]

    def set_steps(self, steps: int) -> None:
        """Set the device step counters (on load; a host-to-device write, not per step)."""
        self._base_steps = steps
        for counter in self._steps.values():
            counter.fill_(steps)

    def read_steps(self) -> int | None:
        """The device step count (a host sync), or None before the first step."""
        return int(next(iter(self._steps.values())).item()) if self._steps else None

    def advance(self, devices: Sequence[torch.device]) -> None:
        for d in devices:
            self.step_counter(d).add_(1)

    # ------------------------------------------------------------------ tables
    @staticmethod
    def handles(p: Tensor) -> bool:
        """Whether the kernel updates ``p`` (else the foreach path does)."""
        return p.dtype in _TL_DTYPES and is_dense(p) and (p.is_cuda or interpreted())

    def _split(self, params: Sequence[Tensor]) -> tuple[list[int], list[int]]:
        """Indices of params the kernel handles, and of those left to foreach."""
        fast, slow = [], []
        for i, p in enumerate(params):
            (fast if self.handles(p) else slow).append(i)
        return fast, slow

    def _build(self, params: list[Tensor], targets: Sequence[Target], key) -> _GroupTables:
        device = params[0].device
        n = len(params)
        numels = np.array([p.numel() for p in params], dtype=np.int64)
        per_tensor = -(-numels // self.block)
        chunk_tensor = np.repeat(np.arange(n, dtype=np.int32), per_tensor)
        starts = np.concatenate([np.arange(c, dtype=np.int64) * self.block for c in per_tensor]) if n else []
        acc, last, meta, tables = [], [], [], []
        offset = 0
        for tg in targets:
            for a, p in zip(tg.accs, params):
                if a.stride() != p.stride() or a.dtype != torch.float32:
                    raise RuntimeError("internal: accumulator layout differs from its parameter")
            acc += [a.data_ptr() for a in tg.accs]
            last += [x.data_ptr() for x in tg.lasts] if tg.lasts is not None else [0] * n
            meta += [tg.start, tg.interval, tg.k, offset, int(tg.lasts is not None)]
            tables.append(np.asarray(tg.table, dtype=np.float64))
            offset += len(tg.table)

        def dev(x, dtype):
            return torch.as_tensor(np.asarray(x), dtype=dtype).to(device)

        previous = self._tables.get(key)
        param_ptrs = [p.data_ptr() for p in params]
        pointers = param_ptrs + acc + [x for x in last if x]
        return _GroupTables(
            ptr_key=tuple(param_ptrs),
            param_ids=tuple(id(p) for p in params),
            param_ptrs=dev(param_ptrs, torch.int64),
            numels=dev(numels, torch.int64),
            chunk_tensor=dev(chunk_tensor, torch.int32),
            chunk_start=dev(starts, torch.int64),
            acc_ptrs=dev(acc, torch.int64),
            last_ptrs=dev(last, torch.int64),
            coefs=dev(np.concatenate(tables) if tables else np.zeros(1), torch.float32),
            meta=dev(meta, torch.int64),
            n_chunks=int(per_tensor.sum()),
            aligned=all(ptr % 16 == 0 for ptr in pointers),
            bad_step=previous.bad_step
            if previous is not None and previous.bad_step.shape[1] == n
            else torch.stack(
                [
                    torch.full((n,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device),
                    torch.full((n,), -1, dtype=torch.int64, device=device),
                ]
            ),
        )

    def _plan(self, params: Sequence[Tensor]) -> _Plan:
        """The kernel/foreach split of a param list, cached per list object (groups keep theirs)."""
        plan = self._plans.get(id(params))
        if plan is None or plan.params is not params or len(plan.params) != len(params):
            fast, slow = self._split(params)
            plan = self._plans[id(params)] = _Plan(params, fast, slow, [params[i] for i in fast])
        return plan

    def _tables_for(self, plan: _Plan, targets: Sequence[Target]) -> _GroupTables:
        key = (
            id(plan),
            tuple(tg.name for tg in targets),
            tuple(tg.lasts is not None for tg in targets),
            tuple(id(tg.accs[0]) if tg.accs else 0 for tg in targets),
        )
        cached = self._tables.get(key)
        if cached is None or cached.ptr_key != tuple(p.data_ptr() for p in plan.fast_params):
            tgs = [_subset(tg, plan.fast) for tg in targets]
            cached = self._tables[key] = self._build(plan.fast_params, tgs, key)
        return cached

    def invalidate(self) -> None:
        """Forget cached tables (accumulators were replaced or params changed)."""
        self._tables.clear()
        self._plans.clear()

    # ------------------------------------------------------------------ launch
    def _launch(self, phase: int, params: Sequence[Tensor], targets: Sequence[Target], ok) -> None:
        plan = self._plan(params)
        if plan.slow:
            sub = [params[i] for i in plan.slow]
            subt = [_subset(tg, plan.slow) for tg in targets]
            (ForeachBackend.anchor if phase == 0 else ForeachBackend.accumulate)(sub, subt, ok)
        if not plan.fast or not targets:
            return
        tab = self._tables_for(plan, targets)
        if tab.n_chunks == 0:
            return
        ps = plan.fast_params
        device = ps[0].device
        ok_t = ok if ok is not None else self._ok_dummy(device)
        wsm_update_kernel[(tab.n_chunks,)](
            tab.param_ptrs,
            tab.numels,
            tab.chunk_tensor,
            tab.chunk_start,
            tab.acc_ptrs,
            tab.last_ptrs,
            tab.coefs,
            tab.meta,
            self.step_counter(device),
            tab.bad_step,
            ok_t,
            len(ps),
            N_MERGES=len(targets),
            PHASE=phase,
            PARAM_DTYPE=_TL_DTYPES[ps[0].dtype],
            SKIP=ok is not None,
            BLOCK=self.block,
            ALIGNED=tab.aligned,
            num_warps=self.num_warps,
            enable_fp_fusion=True,  # A + c * x as one FMA: one rounding instead of two
        )

    def _ok_dummy(self, device: torch.device) -> Tensor:
        if device not in self._ok:
            self._ok[device] = torch.ones((), dtype=torch.int32, device=device)
        return self._ok[device]

    def anchor(self, params: Sequence[Tensor], targets: Sequence[Target], ok: Tensor | None = None) -> None:
        self._launch(0, params, targets, ok)

    def accumulate(self, params: Sequence[Tensor], targets: Sequence[Target], ok: Tensor | None = None) -> None:
        self._launch(1, params, targets, ok)

    readout = staticmethod(ForeachBackend.readout)

    def all_finite(self, params: Sequence[Tensor], ok: Tensor) -> None:
        """Clear the int32 device flag ``ok`` if any value of ``params`` is NaN/inf."""
        plan = self._plan(params)
        if plan.slow:
            ForeachBackend.all_finite([params[i] for i in plan.slow], ok)
        if not plan.fast:
            return
        ps = plan.fast_params
        tab = self._tables_for(plan, [])
        if tab.n_chunks:
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

    def bad_steps(self) -> dict[int, tuple[int, int]]:
        """``{id(param): (first, last) step a NaN/inf was read}`` (host sync: readout only)."""
        out: dict[int, tuple[int, int]] = {}
        for key, tab in self._tables.items():
            if not key[1]:
                continue
            firsts, lasts = tab.bad_step.tolist()
            for pid, first, last in zip(tab.param_ids, firsts, lasts):
                if last >= 0:
                    old = out.get(pid, (first, last))
                    out[pid] = (min(old[0], first), max(old[1], last))
        return out


def _subset(tg: Target, idx: list[int]) -> Target:
    if len(idx) == len(tg.accs):
        return tg
    return Target(
        accs=[tg.accs[i] for i in idx],
        coef=tg.coef,
        lasts=[tg.lasts[i] for i in idx] if tg.lasts is not None else None,
        name=tg.name,
        start=tg.start,
        interval=tg.interval,
        k=tg.k,
        table=tg.table,
    )


BACKENDS["triton"] = TritonBackend
