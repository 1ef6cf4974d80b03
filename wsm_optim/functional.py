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
    ``coef``: ``c_0`` for an anchor pass, ``c_j`` for a checkpoint pass.
    ``lasts``: on anchor passes only, buffers that receive the finished
    window's ``A`` before it is overwritten (``keep_last=True``), else None.
    """

    accs: list[Tensor]
    coef: float
    lasts: list[Tensor] | None = None


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
    def anchor(params: Sequence[Tensor], targets: Sequence[Target]) -> None:
        with torch.no_grad():
            for tg in targets:
                if tg.lasts is not None:
                    torch._foreach_copy_(tg.lasts, tg.accs)
                # copy_ upcasts exactly; the scale then happens in fp32 (a
                # bf16 ``mul`` would round c_0 * theta to bf16 first).
                torch._foreach_copy_(tg.accs, list(params))
                torch._foreach_mul_(tg.accs, tg.coef)

    @staticmethod
    def accumulate(params: Sequence[Tensor], targets: Sequence[Target]) -> None:
        with torch.no_grad():
            for tg in targets:
                torch._foreach_add_(tg.accs, list(params), alpha=tg.coef)

    @staticmethod
    def readout(params: Sequence[Tensor], accs: Sequence[Tensor], w_next: float) -> list[Tensor]:
        """``A + w_next * theta`` in fp32 (new tensors)."""
        with torch.no_grad():
            if w_next == 0.0:
                return [a.clone() for a in accs]
            return list(torch._foreach_add(list(accs), list(params), alpha=w_next))


BACKENDS: dict[str, type] = {"foreach": ForeachBackend}
