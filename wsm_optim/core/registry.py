"""The parameters a ``WSMOptimizer`` merges: who they are, their names, groups and placement.

The one place that adopts parameters, whichever way they arrive (constructor,
``add_param_group``, direct edits of ``param_groups``, a parameter replaced by
another object), and notices when one changes device, storage or dtype.
:meth:`Registry.refresh` is called explicitly, once per ``step()``, readout and
``state_dict()``, and says whether anything changed; the merges then make their
buffers follow (``merge.Merge.follow``). Nothing here runs from a getter, and
nothing here knows about merges.

With ``merge_buffers=True`` the model's merged buffers (``model_buffers``) are
tracked beside the params, in groups of their own: they are found by name at
every refresh, and :attr:`Registry.rebound` tells which buffer tensors were
replaced by new objects (a model moved or cast) so their merges can follow.

Parameters are grouped by the device and dtype of their local tensor (the
``to_local()`` view of a ``DTensor``): one backend call per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..common.precision import accumulator_dtype, accumulator_like  # re-exported (earlier home)
from ..common.text import a
from ..common.warn import warn
from . import distributed
from .model_buffers import ModelBuffers

__all__ = ["Group", "Registry", "accumulator_like", "accumulator_dtype", "param_numbering", "unique_names"]


def param_numbering(param_groups: Sequence[dict[str, Any]]) -> dict[int, int]:
    """``{id(param): index}`` exactly as ``torch.optim.Optimizer.state_dict`` numbers params.

    Indices count every entry of every group, duplicates included; a param
    listed twice gets the index of its last entry in the first group that
    lists it (torch warns about duplicates but accepts them).
    """
    numbering: dict[int, int] = {}
    start = 0
    for group in param_groups:
        params = group["params"]
        numbering.update({id(p): i for i, p in enumerate(params, start) if id(p) not in numbering})
        start += len(params)
    return numbering


@dataclass
class Group:
    """Params whose local tensors share device and dtype: one backend call each.

    ``params`` are the optimizer's params (plain or ``DTensor``). Backends only
    see ``local`` (the ``to_local()`` views; the tensors themselves for plain
    params) and the merges' buffers aligned with them. ``cache`` belongs to the
    backend (e.g. the Triton launcher's pointer tables): it lives exactly as
    long as this grouping, so nothing ever needs invalidating.
    """

    device: torch.device
    params: list[Tensor]
    local: list[Tensor]
    sharded: bool
    cache: dict[Any, Any] = field(default_factory=dict)
    pointers: list[int] = field(default_factory=list)

    def moved(self) -> bool:
        """Whether a local tensor was replaced (FSDP2 re-padding, ``p.data = ...``, a device move)."""
        if self.sharded:
            return any(distributed.local_view(p) is not lp for p, lp in zip(self.params, self.local))
        return [p.data_ptr() for p in self.params] != self.pointers


class Registry:
    """Params (deduplicated, in optimizer order), their names, shapes and groups, and their version counters.

    ``placed`` turns true at the first :meth:`refresh` with ``place=True`` (the
    first ``step()``, ``state_dict()`` or ``load_state_dict()``): from then on the
    params must hold values (no meta device) and are grouped, so that buffers
    are born where the params are by then (a model moved to the GPU after
    wrapping, meta-device params materialised after wrapping).
    """

    def __init__(self, model_buffers: ModelBuffers | None = None) -> None:
        self.params: list[Tensor] = []
        self.groups: list[Group] = []
        self.names: dict[Tensor, str] | None = None
        self.model_buffers = model_buffers
        self.buffers: list[Tensor] = []  # the merged model buffers' tensors, in model_buffers.names order
        self.buffer_groups: list[Group] = []
        self.buffer_names: dict[Tensor, str] = {}
        self.rebound: dict[Tensor, Tensor] = {}  # buffer tensors replaced at the last rebuild: old -> new
        self.placed = False
        self.versions: dict[int, int] | None = None  # id(param) -> version after the last step()
        self._shapes: dict[Tensor, tuple[int, ...]] = {}
        self._ids: list[int] | None = None

    # -------------------------------------------------------------- refresh
    def refresh(self, param_groups: Sequence[dict[str, Any]], *, place: bool = True) -> bool:
        """Adopt what changed in ``param_groups`` since the last call; returns whether anything did.

        The check per call is one identity list and one data-pointer list: new,
        removed or replaced params, and params whose storage, device or dtype
        changed, are all caught. Cheap when nothing changed.
        """
        buffers = self.model_buffers.current() if self.model_buffers is not None else []
        ids = [id(p) for g in param_groups for p in g["params"]] + [id(b) for b in buffers]
        moved = any(g.moved() for g in self.groups + self.buffer_groups)
        if ids == self._ids and (self.placed or not place) and not moved:
            return False
        self._rebuild(param_groups, ids, place, buffers)
        return True

    def _rebuild(self, param_groups: Sequence[dict[str, Any]], ids: list[int], place: bool,
                 buffers: list[Tensor]) -> None:
        params = list(dict.fromkeys(p for g in param_groups for p in g["params"]))
        for p in params:  # validate everything before changing anything
            self.check_param(p, place)
        if place and buffers:
            meta = next((n for b, n in zip(buffers, self.model_buffers.names) if b.device.type == "meta"), None)
            if meta is not None:
                raise ValueError(f"merge_buffers: the model's buffer {meta!r} is on the meta device; materialise "
                                 "the model before the first step()")
        self._warn_replaced(param_groups, ids)
        self.params = params
        self.placed = place or self.placed
        self.names = _names(param_groups)
        self._ids = ids
        if self.placed:
            self._shapes = {p: tuple(p.shape) for p in params}
        self.groups = self._group(params) if self.placed else []
        self.rebound = {old: new for old, new in zip(self.buffers, buffers) if old is not new}
        self.buffers = buffers
        self.buffer_names = dict(zip(buffers, self.model_buffers.names)) if buffers else {}
        self.buffer_groups = self._group(buffers) if self.placed else []

    def _warn_replaced(self, param_groups: Sequence[dict[str, Any]], ids: list[int]) -> None:
        if self._ids is None or len(ids) != len(self._ids) or not self.placed:
            return
        known = set(self.params)
        flat = [p for g in param_groups for p in g["params"]]
        pairs = zip(ids[:len(flat)], self._ids)  # the merged buffers' ids come after the params'
        replaced = [i for i, (new, old) in enumerate(pairs) if new != old and flat[i] not in known]
        if replaced:
            names = _names(param_groups) or {}
            label = ", ".join(names.get(flat[i], f"#{i}") for i in replaced[:5])
            warn(
                f"WSMOptimizer: {len(replaced)} parameter(s) in param_groups were replaced by new tensor "
                f"objects ({label}); their merge restarts from their current values (as for params added "
                "mid-window). Replace a parameter's values in place (p.copy_(...)) to keep its merge.",
                RuntimeWarning,
            )

    def check_param(self, p: Tensor, place: bool) -> None:
        """Raise a clear error for a param that cannot be merged (dtype, meta device, changed shape)."""
        if not isinstance(p, Tensor):
            raise TypeError(f"WSMOptimizer: param_groups hold {a(type(p).__name__)}, expected tensors")
        if not (p.dtype.is_floating_point or p.dtype.is_complex):
            raise TypeError(f"WSMOptimizer: a parameter of dtype {p.dtype} cannot be merged (floating or complex only)")
        if place and p.device.type == "meta":
            raise _meta_error(p)
        distributed.local_view(p)  # refuses Partial placements
        old = self._shapes.get(p)
        if old is not None and old != tuple(p.shape):
            raise ValueError(
                f"WSMOptimizer: a parameter changed shape from {old} to {tuple(p.shape)} "
                "after it was wrapped; its merge cannot follow it. Create the WSMOptimizer after "
                "the model's final shape is set"
            )

    def _group(self, params: list[Tensor]) -> list[Group]:
        members: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in params:
            lp = distributed.local_view(p)
            members.setdefault((lp.device, lp.dtype), []).append(p)
        groups = []
        for (device, _), ps in members.items():
            sharded = any(distributed.is_dtensor(p) for p in ps)
            groups.append(
                Group(
                    device=device,
                    params=ps,
                    local=[distributed.local_view(p) for p in ps],
                    sharded=sharded,
                    pointers=[] if sharded else [p.data_ptr() for p in ps],
                )
            )
        return groups

    def check_materialised(self) -> None:
        """Raise the meta-device error if a param has no values (readouts of the live model need them)."""
        meta = next((p for p in self.params if p.device.type == "meta"), None)
        if meta is not None:
            raise _meta_error(meta)

    # ------------------------------------------------------------ inspection
    @property
    def devices(self) -> list[torch.device]:
        """Devices of the params' local tensors."""
        return list(dict.fromkeys(g.device for g in self.groups))

    @property
    def target_devices(self) -> list[torch.device]:
        """Devices of everything merged: the params and the merged model buffers."""
        return list(dict.fromkeys(g.device for g in self.groups + self.buffer_groups))

    @property
    def targets(self) -> list[Tensor]:
        """Everything merged: the params, then the merged model buffers."""
        return self.params + self.buffers

    def label(self, p: Tensor) -> str:
        """A param's (or merged buffer's) name for messages: its name, else its position and shape."""
        if p in self.buffer_names:
            return f"buffer {self.buffer_names[p]!r}"
        if self.names is not None and p in self.names:
            return repr(self.names[p])
        index = next((i for i, q in enumerate(self.params) if q is p), -1)
        return f"#{index} (shape {tuple(p.shape)})"

    # -------------------------------------------------- live-weight versions
    def versions_now(self) -> dict[int, int]:
        """``{id(param): version counter}`` now."""
        return {id(p): lp._version for g in self.groups for p, lp in zip(g.params, g.local)}

    def record_versions(self) -> None:
        """Remember each param's version counter (after ``step()``); kept across regrouping."""
        self.versions = self.versions_now()

    def forget_versions(self) -> None:
        """Versions unknown (after ``load_state_dict``: the model may be loaded after the optimizer)."""
        self.versions = None

    def absorb(self, before: dict[int, int]) -> None:
        """Count our own in-place writes since ``before`` (a swap and its restore) as not an edit."""
        if self.versions is not None:
            now = self.versions_now()
            for key, version in before.items():
                if key in self.versions and key in now:
                    self.versions[key] += now[key] - version

    def modified(self) -> list[Tensor]:
        """Params changed in place since the last :meth:`record_versions` (outside ``step()``).

        Only in-place ops through the param are seen: ``p.data.copy_(...)`` and
        ``p.data = ...`` bypass torch's version counter.
        """
        if self.versions is None:
            return []
        return [
            p for g in self.groups for p, lp in zip(g.params, g.local)
            if self.versions.get(id(p), lp._version) != lp._version
        ]


def _meta_error(p: Tensor) -> ValueError:
    return ValueError(
        f"WSMOptimizer: a parameter of shape {tuple(p.shape)} is on the meta device. Build the inner "
        "optimizer and WSMOptimizer after materialising the model: module.to_empty(device=...) "
        "replaces meta parameters by new objects that an optimizer built before never sees"
    )


def unique_names(names: dict[Tensor, str], what: str) -> None:
    """Raise ``ValueError`` naming the params that share a name (a readout keyed by name would drop some)."""
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(names.values()):
        seen.setdefault(name, []).append(i)
    clashes = {n: idx for n, idx in seen.items() if len(idx) > 1}
    if clashes:
        shown = "; ".join(f"{n!r} is shared by params #{', #'.join(map(str, idx))}" for n, idx in list(clashes.items())[:5])
        raise ValueError(
            f"{what}: {len(clashes)} parameter name(s) are used by more than one parameter ({shown}), so a dict "
            "keyed by name would silently keep only one of them. Give each param group unique names, e.g. "
            "[(f'gen.{n}', p) for n, p in gen.named_parameters()], or pass model= (keys from model.state_dict())"
        )


def _names(param_groups: Sequence[dict[str, Any]]) -> dict[Tensor, str] | None:
    """``{param: name}`` when every group has ``param_names`` (built from ``named_parameters()``)."""
    names: dict[Tensor, str] = {}
    for group in param_groups:
        if "param_names" not in group:
            return None
        names.update(zip(group["params"], group["param_names"]))
    return names
