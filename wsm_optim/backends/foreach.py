"""The torch ``_foreach_*`` backend: runs on any device, coefficients from the host.

No device-to-host synchronisation, but a CUDA graph would freeze the host
coefficients, so graph capture needs the Triton backend. Accumulators are fp32
while params may be bf16/fp16; such mixed-dtype lists take torch's per-tensor
path on CUDA (still correct, one kernel per tensor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import BackendBase, MergeUpdate

__all__ = ["ForeachBackend", "anchor", "accumulate", "all_finite"]


def anchor(params: Sequence[Tensor], updates: Sequence[MergeUpdate], ok: Tensor | None = None) -> None:
    """``A <- c_0 * theta`` (after ``completed <- A`` when given); ``ok == 0``: ``A <- 0``."""
    if not params:
        return
    with torch.no_grad():
        for up in updates:
            if up.completed is not None:
                torch._foreach_copy_(up.completed, up.accs)
            # copy_ upcasts exactly; the scale then happens in the accumulator's precision
            # (a bf16 ``mul`` would round c_0 * theta to bf16 first).
            torch._foreach_copy_(up.accs, list(params))
            if ok is None:
                torch._foreach_mul_(up.accs, up.coef)
                continue
            for a in up.accs:
                a.nan_to_num_(0.0, 0.0, 0.0).mul_(_scale(ok, up.coef, a.dtype))


def accumulate(params: Sequence[Tensor], updates: Sequence[MergeUpdate], ok: Tensor | None = None) -> None:
    """``A <- A + c_j * theta``; with ``ok == 0`` (skip mode) ``A`` is unchanged."""
    if not params:
        return
    with torch.no_grad():
        for up in updates:
            if ok is None:
                torch._foreach_add_(up.accs, list(params), alpha=up.coef)
                continue
            for a, p in zip(up.accs, params):
                a.addcmul_(torch.nan_to_num(p.to(a.dtype), 0.0, 0.0, 0.0), _scale(ok, up.coef, a.dtype))


def all_finite(params: Sequence[Tensor], ok: Tensor) -> None:
    """Clear the int32 device flag ``ok`` if any value of ``params`` is NaN/inf (no host sync)."""
    if params:
        with torch.no_grad():
            flags = torch.stack([torch.isfinite(p).all() for p in params])
            ok.mul_(flags.all().to(ok.dtype))


def _scale(ok: Tensor, coef: float, dtype: torch.dtype) -> Tensor:
    """``ok * coef`` as a device scalar in the accumulator's precision (float64 merges stay float64)."""
    return ok.to(dtype) * coef


class ForeachBackend(BackendBase):
    name = "foreach"

    @staticmethod
    def handles(p: Tensor) -> bool:
        return True

    @staticmethod
    def anchor(params, updates, ok=None, cache=None) -> None:
        anchor(params, updates, ok)

    @staticmethod
    def accumulate(params, updates, ok=None, cache=None) -> None:
        accumulate(params, updates, ok)

    @staticmethod
    def all_finite(params, ok, cache=None) -> None:
        all_finite(params, ok)
