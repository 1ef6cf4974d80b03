"""``offload="cpu"``: accumulators in host memory, folds on a host worker thread.

Nothing of the merge lives on the GPU (accumulators, kept windows and window
origins are all host tensors). At a checkpoint the params (their local
shards) are copied device-to-host into a reused staging buffer, in the param's
dtype, on a side stream ordered after the inner step; a worker thread waits for
that copy and folds it (the arithmetic of the foreach backend, in the
accumulator's precision: bit-identical to ``backend="foreach"`` on CPU). The
training loop does not wait for the fold:

* ``step()`` waits only for the *copy* before the next inner step changes the
  params (:meth:`OffloadBackend.fence`, a stream wait on CUDA, nothing on CPU);
  forward and backward overlap it.
* Two staging slots per group alternate; a slot is reused once the worker is
  done with it. If the worker falls behind, the step waits and a one-time
  warning says by how much.
* Readouts, ``state_dict`` and ``load_state_dict`` wait for every fold
  (:meth:`OffloadBackend.join`).

On a CPU-only machine the same path runs: the staging copy is a host copy and
the worker folds it while training goes on.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...common.precision import accumulator_dtype
from ...common.warn import warn
from .. import distributed
from . import BackendBase, MergeUpdate, foreach

__all__ = ["OffloadBackend"]

#: A wait for the worker longer than this (seconds) is worth a warning.
_BEHIND = 0.005


@dataclass
class _Slot:
    """One staging buffer of a group: host copies of its params (and of the skip flag)."""

    staged: list[Tensor]
    ok: Tensor
    job: Future | None = None

    def __getstate__(self) -> dict[str, Any]:  # a copy starts idle (the backend joined first)
        return dict(self.__dict__, job=None)


@dataclass
class _Staging:
    slots: list[_Slot]
    turn: int = 0
    copies: list[Any] = field(default_factory=list)  # CUDA events of copies the next inner step must wait for


class OffloadBackend(BackendBase):
    """Host-resident accumulators folded by one worker thread (same arithmetic as foreach)."""

    name = "offload"

    def __init__(self) -> None:
        self._worker: ThreadPoolExecutor | None = None
        self._jobs: list[Future] = []
        self._streams: dict[torch.device, Any] = {}
        self._fences: list[tuple[torch.device, Any]] = []
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:  # threads, futures and streams cannot be copied
        self.join()
        return {"_warned": self._warned}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        self._warned = state["_warned"]

    # ------------------------------------------------------------- buffers
    @staticmethod
    def accumulator_like(p: Tensor) -> Tensor:
        local = distributed.local_view(p)
        host = torch.zeros(local.shape, dtype=accumulator_dtype(p.dtype), device="cpu", pin_memory=_pinned(local))
        return distributed.wrap_like(p, host)

    @staticmethod
    def accumulator_fits(acc: Tensor, p: Tensor) -> bool:
        local = distributed.local_view(acc)
        return local.device.type == "cpu" and local.dtype == accumulator_dtype(p.dtype)

    @staticmethod
    def origin_like(p: Tensor) -> Tensor:
        local = distributed.local_view(p)
        host = torch.zeros(local.shape, dtype=p.dtype, device="cpu", pin_memory=_pinned(local))
        return distributed.wrap_like(p, host)

    @staticmethod
    def origin_fits(origin: Tensor, p: Tensor) -> bool:
        local = distributed.local_view(origin)
        return local.device.type == "cpu" and local.dtype == p.dtype

    @staticmethod
    def handles(p: Tensor) -> bool:
        return True

    # -------------------------------------------------------------- passes
    def anchor(self, params: Sequence[Tensor], updates: Sequence[MergeUpdate], ok: Tensor | None = None,
               cache: dict | None = None) -> None:
        self._submit(foreach.anchor, params, updates, ok, cache)
        self.fence()  # the inner step of this very step() changes the params next

    def accumulate(self, params: Sequence[Tensor], updates: Sequence[MergeUpdate], ok: Tensor | None = None,
                   cache: dict | None = None) -> None:
        self._submit(foreach.accumulate, params, updates, ok, cache)

    @staticmethod
    def all_finite(params: Sequence[Tensor], ok: Tensor, cache: dict | None = None) -> None:
        foreach.all_finite(params, ok)

    def _submit(self, fold, params: Sequence[Tensor], updates: Sequence[MergeUpdate], ok: Tensor | None,
                cache: dict | None) -> None:
        if not params or not updates:
            return
        staging = self._staging(params, {} if cache is None else cache)
        slot = staging.slots[staging.turn]
        staging.turn = 1 - staging.turn
        self._wait_for(slot, len(params))
        device = params[0].device
        if device.type == "cuda":
            stream = self._stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # after the inner step that made these values
            with torch.cuda.stream(stream):
                torch._foreach_copy_(slot.staged, list(params), non_blocking=True)
                if ok is not None:
                    slot.ok.copy_(ok, non_blocking=True)
                # a finished window's kept weight (skip mode) is a device scalar: the host fold needs its value
                updates = [up if up.kept is None or up.kept.device.type == "cpu"
                           else dataclasses.replace(up, kept=up.kept.to("cpu", non_blocking=True)) for up in updates]
                copied = stream.record_event()
            self._fences.append((device, copied))
        else:
            copied = None
            torch._foreach_copy_(slot.staged, list(params))
            if ok is not None:
                slot.ok.copy_(ok)
        host_ok = slot.ok if ok is not None else None
        slot.job = self._pool().submit(_fold, fold, copied, slot.staged, list(updates), host_ok)
        self._jobs = [j for j in self._jobs if not j.done()] + [slot.job]

    def _wait_for(self, slot: _Slot, count: int) -> None:
        if slot.job is None or slot.job.done():
            if slot.job is not None:
                slot.job.result()  # re-raise a failed fold
            return
        began = time.perf_counter()
        slot.job.result()
        waited = time.perf_counter() - began
        if waited > _BEHIND and not self._warned:
            self._warned = True
            warn(
                f"offload='cpu': the host worker was still folding the previous checkpoint of {count} "
                f"parameter(s); step() waited {waited * 1e3:.1f} ms for it. Checkpoints come faster than the "
                "host can fold them: use a larger interval (fewer checkpoints per window), or offload=None",
                RuntimeWarning,
            )

    def _staging(self, params: Sequence[Tensor], cache: dict) -> _Staging:
        staging = cache.get("staging")
        if staging is None:
            def slot() -> _Slot:
                staged = [torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=_pinned(p)) for p in params]
                return _Slot(staged, torch.zeros((), dtype=torch.int32, pin_memory=_pinned(params[0])))

            staging = cache["staging"] = _Staging([slot(), slot()])
        return staging

    def _stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _pool(self) -> ThreadPoolExecutor:
        if self._worker is None:  # one worker: folds run in submission order (an anchor before its checkpoints)
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsm-offload")
        return self._worker

    # ---------------------------------------------------------- ordering
    def fence(self) -> None:
        """Order the next kernels on the current streams after the pending device-to-host copies."""
        for device, copied in self._fences:
            torch.cuda.current_stream(device).wait_event(copied)
        self._fences.clear()

    def join(self) -> None:
        """Wait until every copy and fold is done; re-raises a fold's error."""
        self.fence()
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.result()


def _fold(fold, copied, staged: list[Tensor], updates: list[MergeUpdate], ok: Tensor | None) -> None:
    if copied is not None:
        copied.synchronize()  # the worker waits for the copy, not the training loop
    fold(staged, updates, ok)


def _pinned(t: Tensor) -> bool:
    """Pin host buffers that exchange data with a CUDA tensor (asynchronous copies need page-locked memory)."""
    return t.device.type == "cuda" and torch.cuda.is_available()
