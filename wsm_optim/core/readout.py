"""Reading a merge out: ``merged_state_dict`` and the ``merged_weights`` swap, streamed per tensor.

A readout never builds a full copy of the model on top of its result: each
tensor is computed (``theta_0 + A + w_{t+1} (theta - theta_0)`` in the
accumulator's precision, one temporary the size of that param), flagged for NaN/inf, cast and stored, before
the next one. The finiteness flags are read with one host sync at the end
(:class:`~wsm_optim.core.nonfinite.FiniteCheck`); a swap that finds a bad value puts
every param back before raising.

Peak memory above the live model: ``merged_state_dict`` about its output plus
one accumulator-precision copy of the largest param; ``merged_weights`` one
copy of the params in their dtype (the backup) plus the same temporary.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..common.precision import accumulator_dtype
from ..common.warn import warn
from . import callers, distributed
from .nonfinite import FiniteCheck, NonFiniteMergeError, nonfinite_error
from .moments import MomentReading
from .registry import unique_names

if TYPE_CHECKING:
    from .merge import Merge
    from .runtime import Runtime

__all__ = ["LiveParamsChangedWarning", "state_dict", "swapped", "check_dtype"]


#: The keywords every readout takes (``merged_state_dict``, ``merged_weights``, ``save_merged`` and the
#: integrations' readouts), with their defaults: ``merge``, which merge when several are tracked (``None``:
#: the only one); ``completed``, the last completed window instead of the current one; ``shape``, the decay
#: shape a moment merge is read with (``None``: its own schedule; exact merges take only ``None``).
READOUT_KEYWORDS = {"merge": None, "completed": False, "shape": None}


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


def _value(merge: "Merge", p: Tensor, source: dict[Tensor, Tensor] | None, completed: bool,
           scale: float | None) -> Tensor:
    """One param's merged value: a new tensor in accumulator precision, laid out like ``p``.

    Computed where the buffer lives (beside the param, or on the host for an
    offloaded merge), one tensor at a time. The current window's value is
    ``theta_0 + s * (A + w_{t+1} (theta - theta_0))`` (``s``: the skip-mode
    ``scale``, else 1): ``theta_0`` is added last, in one rounding, so the result
    keeps the precision of the displacement ``A`` holds.
    """
    if isinstance(merge, MomentReading):
        return merge.value(p, completed)
    with torch.no_grad():
        lp = distributed.local_view(p)
        if source is None:  # before the first anchor the merge is the live model
            v = lp.to(accumulator_dtype(lp.dtype), copy=True)
            if scale is not None:
                v.mul_(scale)
            return distributed.wrap_like(p, v)
        buffer = distributed.local_view(source[p])
        origins = merge.origin_of(source)
        weight = 0.0 if completed else merge.position.live_weight()
        if origins is None:
            # type promotion reads lp in the buffer's precision on the fly: no converted copy of the param
            v = buffer.clone() if weight == 0.0 else torch.add(buffer, lp.to(buffer.device), alpha=weight)
            if scale is not None:
                v.mul_(scale)
            return distributed.wrap_like(p, v)
        origin = distributed.local_view(origins[p])
        if weight == 0.0:
            v = buffer.clone()
        else:
            v = torch.empty_like(buffer).copy_(lp)  # one temporary: device move and upcast in one copy
            v.sub_(origin)
            torch.add(buffer, v, alpha=weight, out=v)
        if scale is not None:
            v.mul_(scale)
        v.add_(origin)
    return distributed.wrap_like(p, v)


def _prepare(rt: "Runtime", merge: "Merge", completed: bool, what: str):
    """Checks shared by every readout; returns ``(buffers to read or None, skip-mode scale)``."""
    if rt.swapped and not completed and merge.reads_live:
        raise RuntimeError(
            f"{what} of the current window called inside merged_weights(): it needs the live params, which "
            "are swapped out; read it outside the block (completed=True readouts work inside)"
        )
    rt.registry.check_materialised()
    if rt.steps == 0 and rt.trained_elsewhere():
        warn(
            f"{what}: this WSMOptimizer has counted no step(), yet its parameters changed since it was built: "
            "another optimizer is training them, so there is no merge (the readout is the live model)."
            f"{callers.hint('unstepped')} (If you loaded weights into the model yourself before the first step, "
            "ignore this.)",
            RuntimeWarning,
        )
    source = merge.source(completed)  # raises if there is no completed window to read
    if not completed and merge.reads_live:
        _warn_if_modified(rt, merge, what)
    return source, merge.readout_scale(completed)


def _warn_if_modified(rt: "Runtime", merge: "Merge", what: str) -> None:
    changed = rt.registry.modified()
    if not changed:
        return
    more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
    keep = "" if merge.spec.keep_last else "; outside a window's last step it needs keep_last=True"
    warn(
        f"{what}: parameter {rt.registry.label(changed[0])}{more} changed in place since the last step() "
        "(e.g. a checkpoint or the best model was loaded into the live model). The current window's merge "
        f"uses the live params as its newest term (weight {merge.position.live_weight():.4g}), so these values are "
        f"mixed in. Read the last completed window instead (completed=True{keep}), or do not edit the "
        "params between steps.",
        LiveParamsChangedWarning,
    )


def _raise_bad(rt: "Runtime", merge: "Merge", completed: bool, label: str, p: Tensor, dtype: torch.dtype,
               source: dict[Tensor, Tensor] | None, scale: float | None) -> None:
    """Raise the error for a non-finite readout value: an overflowing cast, or a non-finite merge."""
    pos = merge.position
    if dtype != accumulator_dtype(p.dtype):  # narrower than the merge's precision: did the cast overflow?
        merged = distributed.local_view(_value(merge, p, source, completed, scale))
        if bool(torch.isfinite(merged).all()):  # finite before the cast: the requested dtype overflowed
            raise NonFiniteMergeError(
                f"merge {merge.name!r}: the merged value of parameter {label} is finite (largest magnitude "
                f"{float(merged.abs().max()):.4g}) but overflows when cast to {dtype}; read it with a wider "
                "dtype (dtype=torch.float32, or dtype=None for the parameter's own)"
            )
    if not completed and not pos.anchored:
        raise NonFiniteMergeError(
            f"merge {merge.name!r}: no window is anchored yet (the merge is the live model), and the live "
            f"value of parameter {label} is NaN/inf"
        )
    window = pos.window_of(completed)
    steps = rt.backend.nonfinite_steps(g.cache for g in rt.registry.groups).get(id(p))
    raise nonfinite_error(
        merge.name, window, pos.first_step(window), merge.spec.window, label, rt.nonfinite, steps
    )


def _entries(rt: "Runtime", model: nn.Module | None) -> list[tuple[str, Tensor, Tensor | None]]:
    """``(key, tensor, tracked param or None)`` in output order.

    Without ``model``: the optimizer's params under their names (then the
    merged model buffers under theirs, with ``merge_buffers=True``). With it, every
    entry of ``model.state_dict()``: a param the optimizer tracks is matched by
    identity, else by name (a copy of the model); merged buffers
    (``merge_buffers=True``) likewise; other buffers and frozen params come
    from ``model`` as they are; a trainable param matched neither way is refused.
    """
    names = rt.registry.names
    if model is None:
        if names is None:
            raise ValueError(
                "merged_state_dict needs parameter names: build the inner optimizer from "
                "model.named_parameters(), or pass model= (here or to WSMOptimizer)"
            )
        unique_names({p: names[p] for p in rt.registry.params}, "merged_state_dict()")
        # merged model buffers (merge_buffers=True) under their module names: reached without a model
        # where an engine dropped the optimizer's model (its params are not the module's any more)
        buffers = [(n, b, b) for b, n in rt.registry.buffer_names.items()]
        return [(names[p], p, p) for p in rt.registry.params] + buffers
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__} {model!r}")
    tracked = set(rt.registry.targets)
    by_name = {n: p for p, n in names.items()} if names is not None else {}
    if names is not None and len(by_name) < len(names):  # a shared name cannot match a copy's param
        counts = collections.Counter(names.values())
        by_name = {n: p for n, p in by_name.items() if counts[n] == 1}
    by_name.update((n, b) for b, n in rt.registry.buffer_names.items())
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
    name: str | None,
    param_groups,
    *,
    dtype: Any,
    model: nn.Module | None,
    completed: bool,
    full: bool,
    rank0_only: bool,
    cpu_offload: bool,
    shape: Any = None,
) -> dict[str, Tensor]:
    """The readout behind ``WSMOptimizer.merged_state_dict`` (arguments documented there) of the merge ``name``."""
    if (rank0_only or cpu_offload) and not full:
        raise ValueError(
            f"rank0_only={rank0_only} / cpu_offload={cpu_offload} apply to full=True gathers; "
            "sharded readouts (full=False) stay on each rank's device"
        )
    dtype = check_dtype(dtype)
    merge = rt.prepare_readout(name, param_groups, shape, completed)
    entries = _entries(rt, model)
    source, scale = _prepare(rt, merge, completed, "merged_state_dict()")
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
            merged = _value(merge, param, source, completed, scale)
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
        key, param = bad
        label = repr(key) if rt.registry.names or model else rt.registry.label(param)
        _raise_bad(rt, merge, completed, label, param, out[key].dtype, source, scale)
    return out


@dataclass
class HeldLive:
    """The live terms of the readouts, kept aside while other weights sit in the params (:func:`hold_live`).

    ``values``: ``(param or merged model buffer, its local value on the host)``;
    ``steps``: the step count they belong to (a later step drops them).
    """

    values: list[tuple[Tensor, Tensor]]
    steps: int


def hold_live(rt: "Runtime", param_groups) -> None:
    """Keep the live params (and merged model buffers) on the host as the readouts' live terms.

    The current window's merge ``M_t = A_t + w_{t+1} theta_live`` uses the live
    params as its newest term. A trainer that loads other weights into the model
    when training ends (a "best" checkpoint) would replace that term; with the
    final live values held, every readout puts them back in the params for its
    duration (and the loaded values back after it), so it reads the run's final
    merge exactly. Costs one host copy of the params in their dtype; dropped at
    the next step or ``load_state_dict``.
    """
    terms = list(dict.fromkeys(p for group in param_groups for p in group["params"]))
    if rt.registry.model_buffers is not None:
        terms += rt.registry.model_buffers.current()
    with torch.no_grad():
        rt.held_live = HeldLive([(p, distributed.local_view(p).detach().to("cpu", copy=True)) for p in terms],
                                rt.steps)


@contextlib.contextmanager
def held_live_in(rt: "Runtime") -> Iterator[None]:
    """For a readout's duration: the held live terms in the params (nothing without :func:`hold_live`)."""
    held = rt.held_live
    if held is not None and rt.steps != held.steps:
        rt.held_live = held = None  # trained on since: the live params are the run's again
    if held is None:
        yield
        return
    with torch.no_grad():
        now = [(p, distributed.local_view(p).detach().clone()) for p, _ in held.values]
        for p, final in held.values:
            distributed.local_view(p).copy_(final)
    try:
        # the params hold the final step's values bit-exactly again: "changed since the last step()" does not apply
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LiveParamsChangedWarning)
            yield
    finally:
        with torch.no_grad():
            for p, value in now:
                distributed.local_view(p).copy_(value)


@contextlib.contextmanager
def swapped(rt: "Runtime", name: str | None, param_groups, completed: bool, shape: Any = None) -> Iterator[None]:
    """Swap the merge ``name`` into the live params for a ``with`` block; restore them bit-exactly on exit.

    One swap at a time per optimizer, whatever the thread: a second entry
    raises at once (the check and the claim are one atomic step).
    """
    merge = rt.prepare_readout(name, param_groups, shape, completed)
    if not rt.swap_lock.acquire(blocking=False):
        raise RuntimeError(
            "merged_weights() is already active for this optimizer (in this thread or another): swaps cannot "
            "nest or run concurrently, since the second would save the merged values as the live ones"
        )
    try:
        with _swap(rt, merge, completed):
            yield
    finally:
        rt.swap_lock.release()


@contextlib.contextmanager
def _swap(rt: "Runtime", merge: "Merge", completed: bool) -> Iterator[None]:
    source, scale = _prepare(rt, merge, completed, "merged_weights()")
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
            for p in rt.registry.targets:
                merged = _value(merge, p, source, completed, scale)
                local = distributed.local_view(p)
                backup.append((p, local.clone()))
                local.copy_(distributed.local_view(merged))  # shard to shard, host to device: one tensor at a time
                del merged
                check.add(p, local)
        bad = check.first_bad()
        if bad is not None:
            _raise_bad(rt, merge, completed, rt.registry.label(bad), bad, bad.dtype, source, scale)
    except BaseException:
        restore()
        raise
    rt.swapped = True
    try:
        yield
    finally:
        restore()
        rt.swapped = False
