"""Backend-agnostic streaming-merge updates, and the torch ``_foreach`` backend.

Every function works on one *group*: parameters sharing device and dtype, with
one fp32 accumulator list per merge (aligned with ``params``). The class in
``optimizer.py`` owns the state machine and calls these at checkpoints.

Update rules (``METHOD.md``, streaming form), for a merge whose window is
anchored at ``theta_0`` with merge weights ``c_0..c_k``:

* anchor:      ``A <- c_0 * theta``                     (params read once, A written once)
* checkpoint:  ``A <- A + c_j * theta``                 (params read once, A read-modify-written once)
* readout:     ``M = A + w_{t+1} * theta``              (``w_{k+1} = 0``, so ``M = A`` at window end)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Target", "ForeachBackend", "accumulator_like", "BACKENDS"]


@dataclass
class Target:
    """One merge's share of an update pass over a group.

    ``accs``: fp32 accumulators aligned with the group's params.
    ``coef``: ``c_0`` for an anchor pass, ``c_j`` for a checkpoint pass (host
    float, used by the foreach backend).
    ``lasts``: buffers that receive the finished window's ``A`` before an
    anchor overwrites it (``keep_last=True`` and a window has finished), else None.
    ``name``, ``start``, ``interval``, ``k``, ``table`` (the merge weights
    ``c_0..c_k``): what the Triton kernel needs to find the coefficient on the
    device from the device step counter.
    """

    accs: list[Tensor]
    coef: float
    lasts: list[Tensor] | None = None
    name: str = ""
    start: int = 0
    interval: int = 1
    k: int = 1
    table: Sequence[float] = ()


def accumulator_like(p: Tensor) -> Tensor:
    """A zeroed fp32 (complex64 for complex params) buffer shaped and strided like ``p``."""
    dtype = torch.complex64 if p.is_complex() else torch.float32
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


class ForeachBackend:
    """Torch ``_foreach_*`` ops; runs on any device.

    Coefficients are host Python floats computed from host counters: no
    device-to-host synchronisation, but a CUDA graph would freeze them, so
    graph capture needs the Triton backend. Accumulators are fp32 while params
    may be bf16/fp16; such mixed-dtype lists take torch's per-tensor slow path
    on CUDA (still correct, one kernel per tensor).
    """

    name = "foreach"

    @staticmethod
    def anchor(params: Sequence[Tensor], targets: Sequence[Target], ok: Tensor | None = None) -> None:
        """``A <- c_0 * theta`` (after ``last <- A`` when ``lasts`` is given).

        ``ok``: optional int32 device flag (skip mode); when 0 the checkpoint
        is left out, i.e. ``A <- 0``.
        """
        if not params:
            return
        with torch.no_grad():
            for tg in targets:
                if tg.lasts is not None:
                    torch._foreach_copy_(tg.lasts, tg.accs)
                # copy_ upcasts exactly; the scale then happens in fp32 (a
                # bf16 ``mul`` would round c_0 * theta to bf16 first).
                torch._foreach_copy_(tg.accs, list(params))
                if ok is None:
                    torch._foreach_mul_(tg.accs, tg.coef)
                else:
                    for a in tg.accs:
                        a.nan_to_num_(0.0, 0.0, 0.0)
                    torch._foreach_mul_(tg.accs, ok.to(torch.float32) * tg.coef)

    @staticmethod
    def accumulate(params: Sequence[Tensor], targets: Sequence[Target], ok: Tensor | None = None) -> None:
        """``A <- A + c_j * theta``; with ``ok == 0`` (skip mode) ``A`` is unchanged."""
        if not params:
            return
        with torch.no_grad():
            for tg in targets:
                if ok is None:
                    torch._foreach_add_(tg.accs, list(params), alpha=tg.coef)
                    continue
                scale = ok.to(torch.float32) * tg.coef
                for a, p in zip(tg.accs, params):
                    a.addcmul_(torch.nan_to_num(p.to(a.dtype), 0.0, 0.0, 0.0), scale)

    @staticmethod
    def all_finite(params: Sequence[Tensor], ok: Tensor) -> None:
        """Clear the int32 device flag ``ok`` if any value of ``params`` is NaN/inf (no host sync)."""
        if params:
            with torch.no_grad():
                flags = torch.stack([torch.isfinite(p).all() for p in params])
                ok.mul_(flags.all().to(ok.dtype))

    @staticmethod
    def handles(p: Tensor) -> bool:
        return True

    # The foreach backend takes coefficients from the host: no device counter.
    def advance(self, devices: Sequence[torch.device]) -> None:
        pass

    def set_steps(self, steps: int) -> None:
        pass

    def read_steps(self) -> int | None:
        return None

    def invalidate(self) -> None:
        pass

    def bad_steps(self) -> dict[int, tuple[int, int]]:
        return {}

    @staticmethod
    def readout(params: Sequence[Tensor], accs: Sequence[Tensor], w_next: float) -> list[Tensor]:
        """``A + w_next * theta`` in fp32 (new tensors)."""
        with torch.no_grad():
            if w_next == 0.0:
                return [a.clone() for a in accs]
            return list(torch._foreach_add(list(accs), list(params), alpha=w_next))


BACKENDS: dict[str, type] = {"foreach": ForeachBackend}
