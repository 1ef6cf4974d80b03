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

__all__ = ["ForeachBackend", "anchor", "accumulate", "all_finite", "CHUNK", "BLOCK"]


#: Elements of the fp32 displacements ``theta - theta_0`` made at once on CUDA (64 MiB): bounds the
#: temporaries of one pass whatever the model size, while keeping foreach's batching.
CHUNK = 1 << 24
#: Elements per block on the CPU (1 MiB of fp32): the displacement of a block is made in a scratch
#: buffer that stays in cache while it is added, so the pass costs about one more read (the origin)
#: instead of writing and re-reading a model-sized temporary (measured 4x slower on GPT-2 124M).
BLOCK = 1 << 18


def anchor(params: Sequence[Tensor], updates: Sequence[MergeUpdate], ok: Tensor | None = None) -> None:
    """Begin a window at ``params`` (each ``[*shape]``, any float dtype).

    With origins: ``completed <- A + kept * theta_0`` (when given), then
    ``theta_0 <- theta`` and ``A <- 0``; ``ok == 0``: ``theta_0 <- 0`` (the window
    sums raw params). Without: ``completed <- A``, then ``A <- c_0 * theta``;
    ``ok == 0``: ``A <- 0``.
    """
    if not params:
        return
    with torch.no_grad():
        # every finished window is folded before any origin is overwritten: merges share origins
        for up in updates:
            if up.completed is None:
                continue
            if up.origins is None:
                torch._foreach_copy_(up.completed, up.accs)
                continue
            torch._foreach_copy_(up.completed, up.origins)  # exact: the accumulator is at least as wide
            if up.kept is not None:
                for c in up.completed:
                    c.mul_(up.kept.to(c.dtype))
            torch._foreach_add_(up.completed, up.accs)
        for up in updates:
            if up.origins is not None:
                torch._foreach_copy_(up.origins, list(params))
                if ok is not None:
                    for o in up.origins:
                        o.nan_to_num_(0.0, 0.0, 0.0).mul_(ok.to(o.dtype))
                torch._foreach_zero_(up.accs)
                continue
            # copy_ upcasts exactly; the scale then happens in the accumulator's precision
            # (a bf16 ``mul`` would round c_0 * theta to bf16 first).
            torch._foreach_copy_(up.accs, list(params))
            if ok is None:
                torch._foreach_mul_(up.accs, up.coef)
                continue
            for a in up.accs:
                a.nan_to_num_(0.0, 0.0, 0.0).mul_(_scale(ok, up.coef, a.dtype))


def accumulate(params: Sequence[Tensor], updates: Sequence[MergeUpdate], ok: Tensor | None = None) -> None:
    """``A <- A + c_j * (theta - theta_0)`` (``A + c_j * theta`` without origins); ``ok == 0`` leaves ``A``.

    ``theta - theta_0`` is formed in the accumulator's precision (exact for
    bf16/fp16 params, one rounding of the displacement for fp32), ``BLOCK``
    elements at a time on the CPU, ``CHUNK`` at a time elsewhere, once for
    every merge that shares the origins (the same values as one pass per merge).
    """
    if not params:
        return
    params = list(params)
    shared: dict[tuple[int, torch.dtype], list[MergeUpdate]] = {}
    with torch.no_grad():
        for up in updates:
            if up.origins is None:
                if ok is None:
                    torch._foreach_add_(up.accs, params, alpha=up.coef)
                    continue
                for a, p in zip(up.accs, params):
                    a.addcmul_(torch.nan_to_num(p.to(a.dtype), 0.0, 0.0, 0.0), _scale(ok, up.coef, a.dtype))
                continue
            if ok is not None:
                for a, p, o in zip(up.accs, params, up.origins):
                    d = torch.nan_to_num(p.to(a.dtype), 0.0, 0.0, 0.0).sub_(o)
                    a.addcmul_(d, _scale(ok, up.coef, a.dtype))
                continue
            shared.setdefault((id(up.origins[0]), up.accs[0].dtype), []).append(up)
        for group in shared.values():
            origins, accs, coefs = group[0].origins, [up.accs for up in group], [up.coef for up in group]
            if params[0].device.type == "cpu":
                _add_displacements_blocked(accs, coefs, params, origins)
                continue
            for idx in _chunks(params):
                d = [torch.empty_like(accs[0][i]).copy_(params[i]) for i in idx]
                torch._foreach_sub_(d, [origins[i] for i in idx])
                for merge_accs, coef in zip(accs, coefs):
                    torch._foreach_add_([merge_accs[i] for i in idx], d, alpha=coef)
                del d


def _add_displacements_blocked(accs: Sequence[Sequence[Tensor]], coefs: Sequence[float], params: Sequence[Tensor],
                               origins: Sequence[Tensor]) -> None:
    """``A_m <- A_m + coef_m * (theta - theta_0)`` for merges sharing ``origins``, ``BLOCK`` elements at a time (CPU).

    The displacement of a block is formed once, in one scratch buffer, and
    added to every merge's accumulator while it is in cache.
    """
    scratch: Tensor | None = None
    for i, (p, o) in enumerate(zip(params, origins)):
        targets = [merge_accs[i] for merge_accs in accs]
        a = targets[0]
        if not (all(t.is_contiguous() for t in targets) and p.is_contiguous() and o.is_contiguous()):
            d = torch.empty_like(a).copy_(p).sub_(o)  # dense but permuted: one temporary
            for t, coef in zip(targets, coefs):
                t.add_(d, alpha=coef)
            continue
        if scratch is None or scratch.dtype != a.dtype:
            scratch = torch.empty(min(BLOCK, max(a.numel(), 1)), dtype=a.dtype)
        flat = [t.view(-1) for t in targets]
        pf, of = p.view(-1), o.view(-1)
        for first in range(0, pf.numel(), BLOCK):
            last = min(first + BLOCK, pf.numel())
            if last - first > scratch.numel():
                scratch = torch.empty(BLOCK, dtype=a.dtype)
            d = scratch[: last - first]
            if p.dtype == a.dtype:
                torch.sub(pf[first:last], of[first:last], out=d)
            else:  # formed in the accumulator's precision: bf16/fp16 differences are exact there
                d.copy_(pf[first:last]).sub_(of[first:last])
            for af, coef in zip(flat, coefs):
                af[first:last].add_(d, alpha=coef)


def _chunks(params: Sequence[Tensor]) -> list[list[int]]:
    """Consecutive index runs of ``params`` of at most ``CHUNK`` elements (a larger tensor alone)."""
    runs, run, size = [], [], 0
    for i, p in enumerate(params):
        if run and size + p.numel() > CHUNK:
            runs.append(run)
            run, size = [], 0
        run.append(i)
        size += p.numel()
    if run:
        runs.append(run)
    return runs


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
