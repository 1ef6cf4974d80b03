"""``WSMOptimizer.state_dict`` / ``load_state_dict``: the format and its validation.

Format version 1 (unchanged since v0.1): the inner optimizer's state dict,
plus in each parameter's ``state`` entry the buffers ``wsm_acc.<merge>`` (the
running sum ``A``) and, for merges with ``keep_last``, ``wsm_last.<merge>``
(the last completed window; zeros until one completes), as the live tensors
themselves (``DTensor`` s under FSDP2 / TP). Parameters are numbered exactly as
``torch.optim.Optimizer.state_dict`` numbers them (duplicates included). Under
the key ``"wsm"``, both at the top level and in every param group::

    {"version": 1, "steps": int,
     "merges": {name: {"config": {schedule, weights_sha256, window, interval, start},
                       "counters": {anchored, t, r, windows_completed, has_last,
                                    skipped, last_skipped}}}}

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

from . import distributed
from .merge import MergeState
from .registry import param_numbering

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["VERSION", "save", "load"]

VERSION = 1
ACC = "wsm_acc"
COMPLETED = "wsm_last"  # format-1 name of the kept completed window
_CONFIG_KEYS = ("schedule", "window", "interval", "start", "weights_sha256")


def _key(prefix: str, merge: str) -> str:
    return f"{prefix}.{merge}"


def save(rt: "Runtime", inner: torch.optim.Optimizer) -> dict[str, Any]:
    """Inner state plus the WSM buffers and counters (tensors are references to the live buffers)."""
    sd = inner.state_dict()
    numbering = param_numbering(inner.param_groups)
    state = dict(sd["state"])
    for p in rt.registry.params:
        pid = numbering[id(p)]
        entry = dict(state.get(pid, {}))
        for name, merge in rt.merges.items():
            entry[_key(ACC, name)] = rt.registry.accs[name][p]
            if merge.spec.keep_last:
                # Always present (zeros until a window completes), so that a DCP
                # load template built before training has the key.
                entry[_key(COMPLETED, name)] = rt.registry.completed[name][p]
        state[pid] = entry
    sd["state"] = state
    wsm = {
        "version": VERSION,
        "steps": rt.steps,
        "merges": {
            name: {"config": merge.config(), "counters": {**merge.counters(), **rt.ledgers[name].counters()}}
            for name, merge in rt.merges.items()
        },
    }
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
        "With torch.distributed.checkpoint, flatten_optimizer_state_dict=True drops it: "
        "use the default StateDictOptions"
    )


def _require(mapping: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(mapping, Mapping) or key not in mapping:
        raise ValueError(f"load_state_dict: {where} lacks the key {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"load_state_dict: {where}[{key!r}] is a {type(value).__name__}, expected {kind}")
    return value


def _check_merges(rt: "Runtime", wsm: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    version = wsm.get("version") if isinstance(wsm, Mapping) else None
    if version != VERSION:
        raise ValueError(f"load_state_dict: unsupported wsm state version {version!r}")
    steps = _require(wsm, "steps", "'wsm'", (int, np.integer))
    if steps < 0:
        raise ValueError(f"load_state_dict: 'wsm'['steps'] = {steps} is negative")
    saved = _require(wsm, "merges", "'wsm'", Mapping)
    if set(saved) != set(rt.merges):
        raise ValueError(
            f"load_state_dict: merge names differ: saved {sorted(saved)}, this optimizer {sorted(rt.merges)}"
        )
    for name, merge in rt.merges.items():
        config = _require(saved[name], "config", f"'wsm'['merges'][{name!r}]", Mapping)
        mine = merge.config()
        for key in _CONFIG_KEYS:
            if mine[key] != config.get(key):
                raise ValueError(
                    f"load_state_dict: merge {name!r}: {key} mismatch: saved {config.get(key)!r}, "
                    f"this optimizer {mine[key]!r}"
                )
        counters = _require(saved[name], "counters", f"'wsm'['merges'][{name!r}]", Mapping)
        merge.check_counters(counters)
        expected = MergeState(name, merge.spec)
        expected.set_position(int(steps))
        got = (bool(counters["anchored"]), counters["t"], counters["r"], counters["windows_completed"])
        if got != (expected.anchored, expected.t, expected.r, expected.windows_completed):
            raise ValueError(
                f"load_state_dict: merge {name!r}: counters (anchored, t, r, windows_completed) = {got} "
                f"do not match steps = {steps}, which give {(expected.anchored, expected.t, expected.r, expected.windows_completed)}"
            )
        for key in ("skipped", "last_skipped"):
            pair = counters.get(key)
            if pair is not None and not (
                isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and np.isfinite(x)
                        for x in pair)
            ):
                raise ValueError(
                    f"load_state_dict: merge {name!r}: counters[{key!r}] = {pair!r} must be [weight, count] "
                    "(finite numbers) or None"
                )
    return int(steps), saved


def _has_buffers(rt: "Runtime", state: Mapping[Any, Any], key: Any) -> bool:
    entry = state.get(key)
    return isinstance(entry, Mapping) and all(_key(ACC, name) in entry for name in rt.merges)


def _buffers(rt: "Runtime", inner: torch.optim.Optimizer, state_dict: Mapping[str, Any], saved: Mapping[str, Any]):
    """``[(param, merge, kind, saved tensor)]`` to copy, validated against the params; nothing is changed."""
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
        # v0.1 numbered the WSM buffers of duplicated params by their first position among distinct params
        legacy = {p: i for i, p in enumerate(unique)}
        if all(_has_buffers(rt, state, i) for i in legacy.values()):
            key_of = legacy
    copies = []
    for p in unique:
        key = key_of[p]
        entry = state.get(key, {})
        for name, merge in rt.merges.items():
            kinds = [(ACC, True)]
            if merge.spec.keep_last:
                kinds.append((COMPLETED, bool(saved[name]["counters"]["has_last"])))
            for prefix, needed in kinds:
                field = _key(prefix, name)
                if field not in entry:
                    if needed:
                        raise ValueError(f"load_state_dict: parameter {key!r} has no {field!r} entry")
                    continue
                distributed.check_copy(p, entry[field], f"state[{key!r}][{field!r}]")
                if needed:
                    copies.append((p, name, prefix, entry[field]))
    return copies


def load(rt: "Runtime", inner: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> None:
    """Validate ``state_dict`` completely, then restore inner state, buffers and counters."""
    steps, saved = _check_merges(rt, _saved_wsm(state_dict))
    copies = _buffers(rt, inner, state_dict, saved)
    inner_sd = {k: v for k, v in state_dict.items() if k not in ("state", "wsm", "param_groups")}
    inner_sd["param_groups"] = [{k: v for k, v in g.items() if k != "wsm"} for g in state_dict["param_groups"]]
    inner_sd["state"] = {}
    for pid, entry in state_dict["state"].items():
        plain = {k: v for k, v in entry.items() if not k.startswith((ACC + ".", COMPLETED + "."))}
        if plain:
            inner_sd["state"][pid] = plain
    before = {"state": inner.state, "param_groups": inner.param_groups}  # torch's load replaces both
    try:
        inner.load_state_dict(inner_sd)
    except Exception as e:
        inner.__dict__.update(before)
        raise ValueError(f"load_state_dict: the inner {type(inner).__name__} refused its part: {e}") from e
    # Nothing below can fail on valid input: the buffers were checked against the params.
    rt.registry.sync(inner.param_groups)
    with torch.no_grad():
        for name, merge in rt.merges.items():
            keep_saved_completed = merge.spec.keep_last and bool(saved[name]["counters"]["has_last"])
            if merge.spec.keep_last and not keep_saved_completed:
                for buffer in rt.registry.completed[name].values():
                    buffer.zero_()
            merge.restore(saved[name]["counters"], keep_saved_completed)
        for p, name, prefix, value in copies:
            store = rt.registry.accs if prefix == ACC else rt.registry.completed
            distributed.copy_into(store[name][p], value)
    device = rt.registry.devices[0] if rt.registry.devices else torch.device("cpu")
    for name in rt.merges:
        rt.ledgers[name].restore(saved[name]["counters"], device)
    rt.steps = steps
    if rt.backend.clock is not None:
        rt.backend.clock.set(steps)
    rt.registry.forget_versions()
