"""``WSMOptimizer.state_dict`` / ``load_state_dict``: the format and its validation.

Format version 2: the inner optimizer's state dict, plus in each parameter's
``state`` entry the tensors ``wsm_origin.<merge>`` (the window origin
``theta_0``: the param at the current window's anchor, in the param's dtype;
merges anchored at the same steps hold the same tensor), ``wsm_acc.<merge>``
(the running sum ``A = sum_j c_j (theta_j - theta_0)``) and, for merges with
``keep_last``, ``wsm_last.<merge>`` (the last completed window's merge,
``theta_0 + A`` before skip renormalisation; zeros until one completes), as the
live tensors themselves (``DTensor`` s under FSDP2 / TP). Parameters are
numbered exactly as ``torch.optim.Optimizer.state_dict`` numbers them
(duplicates included). Under the key ``"wsm"``, both at the top level and in
every param group::

    {"version": 2, "steps": int,
     "merges": {name: {"config": {schedule, weights_sha256, window, interval, start},
                       "counters": {anchored, t, r, windows_completed, has_last,
                                    skipped, last_skipped}}},
     "buffers": [buffer name, ...]}       # only with merge_buffers=True

Merged model buffers (``merge_buffers=True``) are not optimizer params, and
``get_optimizer_state_dict`` keeps only entries keyed by a param: their
buffers sit in the ``state`` entry of the first tracked param (the first
param of the first group), as ``wsm_acc.<merge>:<buffer name>`` and
``wsm_last.<merge>:<buffer name>`` (``:`` appears in neither merge nor module
names), with ``wsm_anchor:<buffer name>``: the buffer's value at the end of the
last step after which a window anchored (``ModelBuffers.capture``), which a
state saved at a window's end needs for the next anchor. They are plain
tensors (replicated under FSDP2, whose buffers are not sharded), so DCP saves
them once and loads them on every rank.

Format version 1 (v0.1, v0.2) has no ``wsm_origin`` entries: ``wsm_acc`` sums
raw params (``sum_j c_j theta_j``), ``wsm_last`` is as in version 2. It loads,
and the run goes on with that arithmetic bit for bit (so a resumed run equals
the run it continues); such a run saves version 1 again. Fresh optimizers use
origins and save version 2, which releases before it refuse by its version.

The copy in the param groups is what survives
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``, which
keeps only ``state`` and ``param_groups`` (and may re-key params by name).

Loading validates the whole input first, and only then changes anything: a
bad or truncated dict raises a ``ValueError`` naming the key and leaves the
optimizer and its inner optimizer as they were.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .. import schedules
from ..common.text import a
from . import distributed
from .registry import param_numbering
from .window import Position

if TYPE_CHECKING:
    from .merge import Merge
    from .runtime import Runtime

__all__ = ["VERSION", "save", "load"]

VERSION = 2
RAW_SUMS = 1  # the format without window origins (v0.1, v0.2), still loaded and written for such runs
VERSIONS = (RAW_SUMS, VERSION)
ACC = "wsm_acc"
ORIGIN = "wsm_origin"  # the window origin theta_0 (format 2)
COMPLETED = "wsm_last"  # format-1 name of the kept completed window
ANCHOR = "wsm_anchor"  # merged model buffers: the next anchor's checkpoint 0
_CONFIG_KEYS = ("schedule", "window", "interval", "start", "weights_sha256")
_POSITION_KEYS = ("anchored", "t", "r", "windows_completed", "has_last")  # "has_last": Position.has_completed
_LEDGER_KEYS = ("skipped", "last_skipped")  # [weight, count] of the current / completed window, or None


def _key(prefix: str, merge: str, buffer: str | None = None) -> str:
    return f"{prefix}.{merge}" if buffer is None else f"{prefix}.{merge}:{buffer}"


def _buffer_names(rt: "Runtime") -> list[str]:
    model_buffers = rt.registry.model_buffers
    return list(model_buffers.names) if model_buffers is not None else []


def _config(merge: "Merge") -> dict[str, Any]:
    """What must match for a saved state to load.

    ``weights_sha256`` is ``WindowWeights.digest()``: for ``k + 1 <= TABLE_LIMIT``
    the first 16 hex digits of the SHA-256 of the float64 ``c_0..c_k``, as v0.1
    stored it; ``schedules`` documents the formula past the limit.
    """
    spec = merge.spec
    return {
        "schedule": schedules.schedule_name(spec.schedule),
        "weights_sha256": spec.weights.digest(),
        "window": spec.window,
        "interval": spec.interval,
        "start": spec.start,
    }


def _counters(merge: "Merge") -> dict[str, Any]:
    pos, ledger = merge.position, merge.ledger

    def pair(totals):
        return None if totals is None else [totals[0], totals[1]]

    return {
        "anchored": pos.anchored,
        "t": pos.t,
        "r": pos.r,
        "windows_completed": pos.windows_completed,
        "has_last": pos.has_completed,
        "skipped": pair(ledger.totals()),
        "last_skipped": pair(ledger.totals(completed=True)),
    }


def _check_counters(merge: "Merge", counters: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the counter if a saved one cannot belong to this merge."""
    spec, name = merge.spec, merge.name
    for key in _POSITION_KEYS:
        if key not in counters:
            raise ValueError(f"load_state_dict: merge {name!r}: counters lack {key!r}")
    for key, top in {"t": spec.k, "r": spec.interval - 1, "windows_completed": None}.items():
        value = counters[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0 or (
            top is not None and value > top
        ):
            bound = f"0..{top}" if top is not None else ">= 0"
            raise ValueError(
                f"load_state_dict: merge {name!r}: counter {key} = {value!r} is outside {bound} "
                f"for window={spec.window}, interval={spec.interval}"
            )
    if counters["t"] == spec.k and counters["r"] != 0:
        raise ValueError(f"load_state_dict: merge {name!r}: counters t = k and r = {counters['r']} != 0")
    for key in ("anchored", "has_last"):  # a string such as "False" would be truthy
        if not isinstance(counters[key], (bool, np.bool_)):
            raise ValueError(f"load_state_dict: merge {name!r}: counter {key} = {counters[key]!r} must be a bool")
    if counters["has_last"] and counters["windows_completed"] == 0:
        raise ValueError(
            f"load_state_dict: merge {name!r}: counters say a completed window is kept (has_last = True) but no "
            "window has completed (windows_completed = 0)"
        )
    for key in _LEDGER_KEYS:
        _check_ledger(name, key, counters.get(key), spec.k)


def _check_ledger(name: str, key: str, pair: Any, k: int) -> None:
    """A skip total is ``[weight, count]``: a weight in ``[0, 1]``, ``0 <= count <= k + 1`` checkpoints."""
    if pair is None:
        return
    numbers = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
        isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and np.isfinite(x) for x in pair
    )
    if not numbers:
        raise ValueError(
            f"load_state_dict: merge {name!r}: counters[{key!r}] = {pair!r} must be [weight, count] "
            "(finite numbers) or None"
        )
    weight, count = pair
    if not (0.0 <= weight <= 1.0 and 0 <= count <= k + 1 and float(count).is_integer()):
        raise ValueError(
            f"load_state_dict: merge {name!r}: counters[{key!r}] = {pair!r} is out of range: the skipped "
            f"weight must be in [0, 1] and the count an integer in 0..{k + 1} (checkpoints per window)"
        )
    if count == 0 and weight != 0.0:
        raise ValueError(
            f"load_state_dict: merge {name!r}: counters[{key!r}] = {pair!r}: a weight without skipped checkpoints"
        )


def save(rt: "Runtime", inner: torch.optim.Optimizer) -> dict[str, Any]:
    """Inner state plus the WSM accumulators and counters (tensors are references to the live accumulators)."""
    sd = inner.state_dict()
    numbering = param_numbering(inner.param_groups)
    state = dict(sd["state"])
    for p in rt.registry.params:
        pid = numbering[id(p)]
        entry = dict(state.get(pid, {}))
        for merge in rt.merges:
            if merge.origin is not None:
                entry[_key(ORIGIN, merge.name)] = merge.origin[p]
            entry[_key(ACC, merge.name)] = merge.acc[p]
            if merge.completed is not None:
                # Always present (zeros until a window completes), so that a DCP
                # load template built before training has the key.
                entry[_key(COMPLETED, merge.name)] = merge.completed[p]
        if p is rt.registry.params[0]:  # the merged model buffers' home
            model_buffers = rt.registry.model_buffers
            for b, name in zip(rt.registry.buffers, _buffer_names(rt)):
                entry[f"{ANCHOR}:{name}"] = model_buffers.at_anchor(name, b)
                for merge in rt.merges:
                    if merge.origin is not None:
                        entry[_key(ORIGIN, merge.name, name)] = merge.origin[b]
                    entry[_key(ACC, merge.name, name)] = merge.acc[b]
                    if merge.completed is not None:
                        entry[_key(COMPLETED, merge.name, name)] = merge.completed[b]
        state[pid] = entry
    sd["state"] = state
    wsm = {
        "version": VERSION if rt.origins else RAW_SUMS,
        "steps": rt.steps,
        "merges": {m.name: {"config": _config(m), "counters": _counters(m)} for m in rt.merges},
    }
    if rt.registry.buffers:
        wsm["buffers"] = _buffer_names(rt)
    sd["wsm"] = wsm
    sd["param_groups"] = [dict(g, wsm=copy.deepcopy(wsm)) for g in sd["param_groups"]]
    return sd


def _saved_wsm(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    if "wsm" in state_dict:
        return state_dict["wsm"]
    for group in state_dict.get("param_groups", ()):
        if isinstance(group, Mapping) and "wsm" in group:
            return group["wsm"]
    raise ValueError(
        "load_state_dict: no 'wsm' entry (top level or in param_groups); this is not a "
        "WSMOptimizer state dict (load a plain optimizer state with opt.inner.load_state_dict). "
        "With torch.distributed.checkpoint, flatten_optimizer_state_dict=True drops it (use the default "
        "StateDictOptions), and so does saving several optimizers under one key (e.g. pipeline stages: "
        "give each stage's optimizer its own key, 'optim.stage0', 'optim.stage1', ...)"
    )


def _require(mapping: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(mapping, Mapping) or key not in mapping:
        raise ValueError(f"load_state_dict: {where} lacks the key {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"load_state_dict: {where}[{key!r}] is {a(type(value).__name__)}, expected {a(kinds)}")
    return value


def _check_merges(rt: "Runtime", wsm: Mapping[str, Any]) -> tuple[int, dict[str, Any], int]:
    version = wsm.get("version") if isinstance(wsm, Mapping) else None
    if isinstance(version, bool) or version not in VERSIONS:
        raise ValueError(f"load_state_dict: unsupported wsm state version {version!r} (this release reads {list(VERSIONS)})")
    steps = _require(wsm, "steps", "'wsm'", (int, np.integer))
    if steps < 0:
        raise ValueError(f"load_state_dict: 'wsm'['steps'] = {steps} is negative")
    saved = _require(wsm, "merges", "'wsm'", Mapping)
    buffers = list(wsm.get("buffers", []))
    if buffers != _buffer_names(rt):
        raise ValueError(
            f"load_state_dict: the merged model buffers differ: saved {buffers}, this optimizer "
            f"{_buffer_names(rt)}. A state saved with merge_buffers=True loads into an optimizer built with "
            "merge_buffers=True and the same model (and one saved without it into one without it)"
        )
    names = [m.name for m in rt.merges]
    if set(saved) != set(names):
        raise ValueError(f"load_state_dict: merge names differ: saved {sorted(saved)}, this optimizer {sorted(names)}")
    for merge in rt.merges:
        name = merge.name
        config = _require(saved[name], "config", f"'wsm'['merges'][{name!r}]", Mapping)
        mine = _config(merge)
        for key in _CONFIG_KEYS:
            if mine[key] != config.get(key):
                raise ValueError(
                    f"load_state_dict: merge {name!r}: {key} mismatch: saved {config.get(key)!r}, "
                    f"this optimizer {mine[key]!r}"
                )
        counters = _require(saved[name], "counters", f"'wsm'['merges'][{name!r}]", Mapping)
        _check_counters(merge, counters)
        expected = Position(merge.spec)
        expected.set_position(int(steps))
        got = (bool(counters["anchored"]), counters["t"], counters["r"], counters["windows_completed"])
        if got != (expected.anchored, expected.t, expected.r, expected.windows_completed):
            raise ValueError(
                f"load_state_dict: merge {name!r}: counters (anchored, t, r, windows_completed) = {got} "
                f"do not match steps = {steps}, which give {(expected.anchored, expected.t, expected.r, expected.windows_completed)}"
            )
    return int(steps), saved, int(version)


def _has_buffers(rt: "Runtime", state: Mapping[Any, Any], key: Any) -> bool:
    entry = state.get(key)
    return isinstance(entry, Mapping) and all(_key(ACC, m.name) in entry for m in rt.merges)


def _buffers(rt: "Runtime", inner: torch.optim.Optimizer, state_dict: Mapping[str, Any], saved: Mapping[str, Any],
             origins: bool):
    """``[(param, merge, kind, saved tensor)]`` to copy, validated against the params; nothing is changed.

    ``origins``: the state holds window origins (format 2), which are then required.
    """
    groups = _require(state_dict, "param_groups", "the state dict", (list, tuple))
    state = _require(state_dict, "state", "the state dict", Mapping)
    saved_keys = []
    for i, group in enumerate(groups):
        saved_keys += list(_require(group, "params", f"param_groups[{i}]", (list, tuple)))
    flat = [p for g in inner.param_groups for p in g["params"]]
    if len(saved_keys) != len(flat):
        raise ValueError(
            f"load_state_dict: the state dict has {len(saved_keys)} parameters in its param_groups, "
            f"this optimizer {len(flat)}"
        )
    key_of: dict[Tensor, Any] = {}
    for key, p in zip(saved_keys, flat):
        key_of.setdefault(p, key)
    unique = list(dict.fromkeys(flat))
    if len(unique) < len(flat) and not all(_has_buffers(rt, state, key_of[p]) for p in unique):
        # v0.1 numbered the WSM accumulators of duplicated params by their first position among distinct params
        legacy = {p: i for i, p in enumerate(unique)}
        if all(_has_buffers(rt, state, i) for i in legacy.values()):
            key_of = legacy
    copies = []
    for p in unique:
        copies += _entry_copies(rt, saved, p, state.get(key_of[p], {}), key_of[p], origins=origins)
    if rt.registry.model_buffers is not None and unique:
        home = key_of[unique[0]]  # the merged model buffers' home: the first param's entry
        entry = state.get(home, {})
        for b, name in zip(rt.registry.model_buffers.current(), _buffer_names(rt)):
            copies += _entry_copies(rt, saved, b, entry, home, name, origins=origins)
            field = f"{ANCHOR}:{name}"
            if field not in entry:
                raise ValueError(f"load_state_dict: parameter {home!r} has no {field!r} entry (merged buffer {name!r})")
            distributed.check_copy(b, entry[field], f"state[{home!r}][{field!r}]", finite=rt.nonfinite == "skip")
            copies.append((b, None, ANCHOR, entry[field]))
    return copies


def _entry_copies(rt: "Runtime", saved: Mapping[str, Any], tensor: Tensor, entry: Mapping[str, Any], key: Any,
                  buffer: str | None = None, origins: bool = False) -> list[tuple[Tensor, "Merge", str, Any]]:
    """The copies into ``tensor``'s buffers from the state entry saved under ``key`` (validated, nothing changed)."""
    copies = []
    for merge in rt.merges:
        if origins:
            copies += _origin_copy(rt, merge, tensor, entry, key, buffer)
        kinds = [(ACC, True)]
        if merge.completed is not None:
            kinds.append((COMPLETED, bool(saved[merge.name]["counters"]["has_last"])))
        for prefix, needed in kinds:
            field = _key(prefix, merge.name, buffer)
            if field not in entry:
                if needed:
                    what = "" if buffer is None else f" (merged buffer {buffer!r})"
                    raise ValueError(f"load_state_dict: parameter {key!r} has no {field!r} entry{what}")
                continue
            distributed.check_copy(tensor, entry[field], f"state[{key!r}][{field!r}]", finite=rt.nonfinite == "skip")
            if needed:
                copies.append((tensor, merge, prefix, entry[field]))
    return copies


def _origin_copy(rt: "Runtime", merge: "Merge", tensor: Tensor, entry: Mapping[str, Any], key: Any,
                 buffer: str | None) -> list[tuple[Tensor, "Merge", str, Any]]:
    """The copy into ``tensor``'s window origin (format 2): present, shaped like it, exact in its dtype.

    An origin is a checkpoint of the param: one that would round when cast to
    the param's dtype would move every readout of the window by that rounding.
    With ``nonfinite="skip"`` it is always finite (a checkpoint left out at the anchor stores 0).
    """
    field = _key(ORIGIN, merge.name, buffer)
    where = f"state[{key!r}][{field!r}]"
    if field not in entry:
        what = "" if buffer is None else f" (merged buffer {buffer!r})"
        raise ValueError(
            f"load_state_dict: parameter {key!r} has no {field!r} entry{what}, which a version "
            f"{VERSION} state dict has for every parameter (the window origin of merge {merge.name!r})"
        )
    value = entry[field]
    distributed.check_copy(tensor, value, where, finite=rt.nonfinite == "skip")
    if torch.promote_types(value.dtype, tensor.dtype) != tensor.dtype:
        raise ValueError(
            f"load_state_dict: {where} has dtype {value.dtype}, which would round when cast to the "
            f"parameter's {tensor.dtype}; a window origin is the param at the window's anchor, saved in its dtype"
        )
    return [(tensor, merge, ORIGIN, value)]


def load(rt: "Runtime", inner: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> None:
    """Validate ``state_dict`` completely, then restore inner state, accumulators and counters."""
    steps, saved, version = _check_merges(rt, _saved_wsm(state_dict))
    copies = _buffers(rt, inner, state_dict, saved, origins=version == VERSION)
    inner_sd = {k: v for k, v in state_dict.items() if k not in ("state", "wsm", "param_groups")}
    inner_sd["param_groups"] = [{k: v for k, v in g.items() if k != "wsm"} for g in state_dict["param_groups"]]
    inner_sd["state"] = {}
    for pid, entry in state_dict["state"].items():
        plain = {k: v for k, v in entry.items()
                 if not k.startswith((ACC + ".", COMPLETED + ".", ORIGIN + ".", ANCHOR + ":"))}
        if plain:
            inner_sd["state"][pid] = plain
    before = {"state": inner.state, "param_groups": inner.param_groups}  # torch's load replaces both
    try:
        inner.load_state_dict(inner_sd)
    except Exception as e:
        inner.__dict__.update(before)
        raise ValueError(f"load_state_dict: the inner {type(inner).__name__} refused its part: {e}") from e
    # Nothing below can fail on valid input: the accumulators were checked against the params.
    rt.use_origins(version == VERSION)  # a format-1 run keeps its raw sums: it continues bit for bit
    rt.follow_params(inner.param_groups)
    with torch.no_grad():
        for merge in rt.merges:
            counters = saved[merge.name]["counters"]
            has_completed = merge.completed is not None and bool(counters["has_last"])
            if merge.completed is not None and not has_completed:
                for buffer in merge.completed.values():
                    buffer.zero_()
            merge.position.restore(counters["anchored"], counters["t"], counters["r"],
                                   counters["windows_completed"], has_completed)
        for p, merge, prefix, value in copies:
            if prefix == ANCHOR:
                name = rt.registry.buffer_names[p]
                rt.registry.model_buffers.captured[name] = value.detach().to(p.device, p.dtype, copy=True)
                continue
            store = {ACC: merge.acc, COMPLETED: merge.completed, ORIGIN: merge.origin}[prefix]
            distributed.copy_into(store[p], value)
    device = rt.registry.devices[0] if rt.registry.devices else torch.device("cpu")
    for merge in rt.merges:
        counters = saved[merge.name]["counters"]
        merge.ledger.restore(*(_totals(counters.get(key)) for key in _LEDGER_KEYS), device)
    rt.set_steps(steps)
    rt.registry.forget_versions()


def _totals(pair: Any) -> tuple[float, int] | None:
    return None if not pair else (float(pair[0]), int(pair[1]))
