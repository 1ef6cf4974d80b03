"""Reading a merge out: ``merged_state_dict`` and the ``merged_weights`` swap, streamed per tensor.

A readout never builds a full copy of the model on top of its result: each
tensor is computed (``A + w_{t+1} theta`` in the accumulator's precision, one
temporary the size of that param), flagged for NaN/inf, cast and stored, before
the next one. The finiteness flags are read with one host sync at the end
(:class:`~wsm_optim.nonfinite.FiniteCheck`); a swap that finds a bad value puts
every param back before raising.

Peak memory above the live model: ``merged_state_dict`` about its output plus
one accumulator-precision copy of the largest param; ``merged_weights`` one
copy of the params in their dtype (the backup) plus the same temporary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import distributed
from .nonfinite import FiniteCheck, NonFiniteMergeError, nonfinite_error
from .precision import accumulator_dtype
from .warn import warn

if TYPE_CHECKING:
    from .merge import MergeState
    from .runtime import Runtime

__all__ = ["LiveParamsChangedWarning", "state_dict", "swapped", "check_dtype"]


class LiveParamsChangedWarning(UserWarning):
    """A readout of the current window found params changed in place since the last ``step()``."""


def check_dtype(dtype: Any) -> torch.dtype | None:
    """``dtype`` of a readout: ``None`` (each param's own) or a floating/complex ``torch.dtype``."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype must be a torch.dtype such as torch.bfloat16 (or None for each param's dtype), "
            f"got {type(dtype).__name__} {dtype!r}; strings are not accepted"
        )
    if not (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"dtype must be a floating point (or complex) dtype, got {dtype}: a merge is not an integer")
    return dtype


def _value(rt: "Runtime", state: "MergeState", p: Tensor, completed: bool, scale: float | None) -> Tensor:
    """One param's merged value: a new tensor in accumulator precision, laid out like ``p``."""
    with torch.no_grad():
        if completed:
            v = distributed.local_view(_completed_buffers(rt, state)[p]).clone()
        elif state.anchored:
            acc = distributed.local_view(rt.registry.accs[state.name][p])
            weight = state.live_weight()
            lp = distributed.local_view(p)
            # type promotion reads lp in acc's precision on the fly: no converted copy of the param
            v = acc.clone() if weight == 0.0 else torch.add(acc, lp, alpha=weight)
        else:  # before the first anchor the merge is the live model
            lp = distributed.local_view(p)
            v = lp.to(accumulator_dtype(lp.dtype), copy=True)
        if scale is not None:
            v.mul_(scale)
    return distributed.wrap_like(p, v)


def _completed_buffers(rt: "Runtime", state: "MergeState") -> dict[Tensor, Tensor]:
    """The buffers holding the last completed window's merge, or a ``RuntimeError`` saying why none."""
    if state.complete:
        return rt.registry.accs[state.name]
    if state.has_completed:
        return rt.registry.completed[state.name]
    if not state.spec.keep_last and state.windows_completed:
        raise RuntimeError(
            f"merge {state.name!r}: the last completed window was overwritten when the next "
            "window began; construct with keep_last=True to keep it"
        )
    if state.windows_completed:
        raise RuntimeError(
            f"merge {state.name!r}: the last completed window was not kept (this optimizer resumed from a "
            "state saved without keep_last); the next window to complete will be"
        )
    raise RuntimeError(f"merge {state.name!r}: no window has completed yet")


def _prepare(rt: "Runtime", state: "MergeState", completed: bool, what: str) -> float | None:
    """Checks shared by every readout; returns the skip-mode scale."""
    if rt.swapped and not completed and state.mixes_live:
        raise RuntimeError(
            f"{what} of the current window called inside merged_weights(): it needs the live params, which "
            "are swapped out; read it outside the block (completed=True readouts work inside)"
        )
    rt.registry.check_materialised()
    if completed:
        _completed_buffers(rt, state)  # raises if there is none
    elif state.mixes_live:
        _warn_if_modified(rt, state, what)
    window = state.window_of(completed)
    # at a window's end the finished window is still the current one in the ledger (rolled at the next anchor)
    kept = completed and not state.complete
    return rt.ledgers[state.name].readout_scale(state.name, window, kept) if state.anchored else None


def _warn_if_modified(rt: "Runtime", state: "MergeState", what: str) -> None:
    changed = rt.registry.modified()
    if not changed:
        return
    more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
    keep = "" if state.spec.keep_last else "; outside a window's last step it needs keep_last=True"
    warn(
        f"{what}: parameter {rt.registry.label(changed[0])}{more} changed in place since the last step() "
        "(e.g. a checkpoint or the best model was loaded into the live model). The current window's merge "
        f"uses the live params as its newest term (weight {state.live_weight():.4g}), so these values are "
        f"mixed in. Read the last completed window instead (completed=True{keep}), or do not edit the "
        "params between steps.",
        LiveParamsChangedWarning,
    )


def _raise_bad(rt: "Runtime", state: "MergeState", completed: bool, label: str, p: Tensor | None) -> None:
    if not completed and not state.anchored:
        raise NonFiniteMergeError(
            f"merge {state.name!r}: no window is anchored yet (the merge is the live model), and the live "
            f"value of parameter {label} is NaN/inf"
        )
    window = state.window_of(completed)
    steps = rt.backend.nonfinite_steps(g.cache for g in rt.registry.groups).get(id(p)) if p is not None else None
    raise nonfinite_error(
        state.name, window, state.first_step(window), state.spec.window, label, rt.nonfinite, steps
    )


def _entries(rt: "Runtime", model: nn.Module | None) -> list[tuple[str, Tensor, Tensor | None]]:
    """``(key, tensor, tracked param or None)`` in output order.

    Without ``model``: the optimizer's params under their names. With it, every
    entry of ``model.state_dict()``: a param the optimizer tracks is matched by
    identity, else by name (a copy of the model); buffers and frozen params come
    from ``model`` as they are; a trainable param matched neither way is refused.
    """
    names = rt.registry.names
    if model is None:
        if names is None:
            raise ValueError(
                "merged_state_dict needs parameter names: build the inner optimizer from "
                "model.named_parameters(), or pass model= (here or to WSMOptimizer)"
            )
        return [(names[p], p, p) for p in rt.registry.params]
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__} {model!r}")
    tracked = set(rt.registry.params)
    by_name = {n: p for p, n in names.items()} if names is not None else {}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    entries, untracked = [], []
    for key, value in model.state_dict(keep_vars=True).items():
        if value in tracked:
            entries.append((key, value, value))
        elif key in by_name and tuple(by_name[key].shape) == tuple(value.shape):
            entries.append((key, value, by_name[key]))
        elif id(value) in trainable:
            untracked.append(key)
        else:
            entries.append((key, value, None))
    if untracked:
        hint = (
            "the inner optimizer has no parameter names to match them by: build it from model.named_parameters()"
            if names is None
            else "no tracked parameter has these names"
        )
        raise ValueError(
            f"model: {len(untracked)} trainable parameter(s) are not tracked by this optimizer: "
            f"{untracked[:5]}{' ...' if len(untracked) > 5 else ''}. A copy of the model (deepcopy) can only be "
            f"matched by name and {hint}; otherwise pass the model this optimizer trains"
        )
    return entries


def _cast(p: Tensor, value: Tensor, dtype: torch.dtype | None, key: str) -> Tensor:
    target = dtype if dtype is not None else p.dtype
    if p.dtype.is_complex and not target.is_complex:
        raise ValueError(
            f"dtype={target} would drop the imaginary part of the complex parameter {key!r} "
            f"({p.dtype}); pass dtype=None or a complex dtype"
        )
    return value.to(target)


def state_dict(
    rt: "Runtime",
    state: "MergeState",
    *,
    dtype: torch.dtype | None,
    model: nn.Module | None,
    completed: bool,
    full: bool,
    rank0_only: bool,
    cpu_offload: bool,
) -> dict[str, Tensor]:
    """The readout behind ``WSMOptimizer.merged_state_dict`` (arguments documented there)."""
    entries = _entries(rt, model)
    scale = _prepare(rt, state, completed, "merged_state_dict()")
    out: dict[str, Tensor] = {}
    check = FiniteCheck()
    with torch.no_grad():
        for key, tensor, param in entries:
            if param is None:  # a buffer or frozen param: as it is in the model
                value = tensor.detach()
                if full:
                    value = distributed.gather_full(value, rank0_only=rank0_only, cpu_offload=cpu_offload)
                    if value is None:
                        continue
                if distributed.is_dtensor(tensor) and full or value.device != tensor.device:
                    out[key] = value  # already a new tensor (gathered or offloaded)
                else:
                    out[key] = value.clone()  # never alias live state
                continue
            merged = _value(rt, state, param, completed, scale)
            value = _cast(param, merged, dtype, key)
            del merged
            if full:
                value = distributed.gather_full(value, rank0_only=rank0_only, cpu_offload=cpu_offload)
                if value is None:
                    continue
            out[key] = value
            local = distributed.local_view(value)
            check.add((key, param), local, recheck=local)
    bad = check.first_bad()
    if bad is not None:
        _raise_bad(rt, state, completed, repr(bad[0]) if rt.registry.names or model else rt.registry.label(bad[1]),
                   bad[1])
    return out


@contextlib.contextmanager
def swapped(rt: "Runtime", state: "MergeState", completed: bool) -> Iterator[None]:
    """Swap the merge into the live params for a ``with`` block; restore them bit-exactly on exit."""
    scale = _prepare(rt, state, completed, "merged_weights()")
    backup: list[tuple[Tensor, Tensor]] = []
    check = FiniteCheck()
    before = rt.registry.versions_now()

    def restore() -> None:
        with torch.no_grad():
            for p, saved in backup:
                distributed.local_view(p).copy_(saved)
        rt.registry.absorb(before)  # our own swap is not an edit; an earlier edit stays visible

    try:
        with torch.no_grad():
            for p in rt.registry.params:
                merged = _value(rt, state, p, completed, scale)
                local = distributed.local_view(p)
                backup.append((p, local.clone()))
                local.copy_(distributed.local_view(merged))  # shard to shard: no communication
                del merged
                check.add(p, local)
        bad = check.first_bad()
        if bad is not None:
            _raise_bad(rt, state, completed, rt.registry.label(bad), bad)
    except BaseException:
        restore()
        raise
    rt.swapped = True
    try:
        yield
    finally:
        restore()
        rt.swapped = False
