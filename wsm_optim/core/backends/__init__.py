"""Update backends: the arithmetic of a checkpoint pass over one group of tensors.

Every backend applies, to a list of local tensors sharing device and dtype and
one accumulator list per merge (see ``docs/method.md``, streaming form). With
the window's origin ``theta_0`` (``MergeUpdate.origins``, the params at the
anchor in their own dtype):

* ``anchor``:      ``completed <- A + kept * theta_0`` (when a finished window is kept),
                   then ``theta_0 <- theta``, ``A <- 0``
* ``accumulate``:  ``A <- A + c_j * (theta - theta_0)``

and without origins (a run resumed from a format-1 state dict, which summed raw
params; bitwise the arithmetic of that format):

* ``anchor``:      ``completed <- A`` (when kept), then ``A <- c_0 * theta``
* ``accumulate``:  ``A <- A + c_j * theta``

with an optional int32 device flag ``ok`` (skip mode: 0 leaves the checkpoint
out; a left-out anchor sets ``theta_0 <- 0``). Readouts
(``theta_0 + A + w_{t+1} (theta - theta_0)``) are plain torch ops in ``readout.py``.

Why origins: ``A`` then holds ``sum_j c_j (theta_j - theta_0)``, a sum of the
size of the merge's displacement from the window's start, not of the params;
fp32 rounding is relative to what is summed, so a window of ``k`` checkpoints
keeps about ``1e-7 * |merge - theta_0|`` instead of ``k * 1e-7 * |theta|``
(``docs/method.md``, "Precision of long windows").

A backend is one file in this package and one entry in :data:`BACKENDS`; the
rest of the package sees only the :class:`Backend` surface and its
capabilities (``capturable``, ``clock``, where buffers live, ``join``), never a
backend's name. :func:`select` is the one switch between them: ``"foreach"``
(torch ``_foreach_*`` ops, any device, coefficients from the host) and
``"triton"`` (one fused launch per group; coefficients found on the device from
a step counter, so no host value changes between steps and a step can be
captured in a CUDA graph).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ...common.precision import accumulator_dtype, accumulator_like
from ..distributed import is_dtensor
from ..spec import OFFLOAD_CHOICES, check_options  # the option rules live in spec

__all__ = ["Backend", "BackendBase", "MergeUpdate", "select", "inline", "BACKEND_NAMES", "BACKENDS", "OFFLOAD_CHOICES"]

#: ``backend=`` name -> ``module:class`` of this package (imported on use: Triton is optional).
BACKENDS = {"foreach": "foreach:ForeachBackend", "triton": "triton:TritonBackend", "offload": "offload:OffloadBackend"}
#: What ``backend=`` accepts: ``"auto"`` and every backend but ``offload`` (chosen by ``offload="cpu"``).
BACKEND_NAMES = ("auto", *(name for name in BACKENDS if name != "offload"))


@dataclass
class MergeUpdate:
    """One merge's share of a pass over a group.

    ``plan``: what this backend built once for the merge (:meth:`Backend.plan`;
    ``None`` for backends that need nothing). ``coef``: ``c_0`` for an anchor
    pass, ``c_j`` for a checkpoint pass (host float). ``accs``: accumulators
    aligned with the group's tensors (fp32, or wider for float64/complex
    params). ``completed``: buffers that receive the finished window's ``A``
    before an anchor overwrites it, else ``None``. ``origins``: each tensor's
    window origin ``theta_0`` (its own dtype and layout; merges anchored at the
    same steps share them), or ``None`` for the raw-sum arithmetic of format 1.
    ``kept``: skip mode, anchor passes that keep a finished window: the weight
    the finished window kept (``1 - skipped``, a float64 device scalar), which
    its origin carries into ``completed``; ``None`` means 1.
    """

    plan: Any
    coef: float
    accs: list[Tensor]
    completed: list[Tensor] | None = None
    origins: list[Tensor] | None = None
    kept: Tensor | None = None

    def subset(self, idx: list[int]) -> "MergeUpdate":
        """The same update restricted to the group's tensors at ``idx``."""
        if len(idx) == len(self.accs):
            return self
        completed = [self.completed[i] for i in idx] if self.completed is not None else None
        origins = [self.origins[i] for i in idx] if self.origins is not None else None
        return MergeUpdate(self.plan, self.coef, [self.accs[i] for i in idx], completed, origins, self.kept)


class Backend(Protocol):
    """What the optimizer calls. ``cache`` is a dict that lives exactly as long as the group's layout."""

    name: str
    #: Whether a step can be captured in a CUDA graph (no host value changes between steps).
    capturable: bool
    #: The device step counter the kernel reads, or ``None`` (coefficients come from the host).
    clock: Any

    def plan(self, name: str, spec: Any) -> Any:
        """What this backend needs about one merge (a ``MergeSpec``), built once per merge."""

    def accumulator_like(self, p: Tensor) -> Tensor:
        """A zeroed accumulator for param ``p`` (a ``DTensor`` for a ``DTensor`` param), where this backend keeps it."""

    def accumulator_fits(self, acc: Tensor, p: Tensor) -> bool:
        """Whether ``acc`` can stay the accumulator of ``p`` (else it is re-placed, values kept)."""

    def origin_like(self, p: Tensor) -> Tensor:
        """A zeroed window origin for ``p``: ``p``'s dtype and layout, where this backend keeps its accumulators."""

    def origin_fits(self, origin: Tensor, p: Tensor) -> bool:
        """Whether ``origin`` can stay the window origin of ``p`` (else it is re-placed, values kept)."""

    def handles(self, p: Tensor) -> bool: ...

    def anchor(self, params: Sequence[Tensor], updates: Sequence[MergeUpdate], ok: Tensor | None = None,
               cache: dict | None = None) -> None: ...

    def accumulate(self, params: Sequence[Tensor], updates: Sequence[MergeUpdate], ok: Tensor | None = None,
                   cache: dict | None = None) -> None: ...

    def all_finite(self, params: Sequence[Tensor], ok: Tensor, cache: dict | None = None) -> None: ...

    def fence(self) -> None:
        """Order what comes next after this backend's reads of the params (before the params change)."""

    def join(self) -> None:
        """Wait for all work this backend still runs asynchronously (before accumulators are read or replaced)."""

    def nonfinite_steps(self, caches: Iterable[dict]) -> dict[int, tuple[int, int]]: ...


class BackendBase:
    """Defaults for a backend that keeps accumulators beside their params and works synchronously."""

    name = ""
    capturable = False
    clock: Any = None

    def plan(self, name: str, spec: Any) -> Any:
        return None

    @staticmethod
    def accumulator_like(p: Tensor) -> Tensor:
        return accumulator_like(p)

    @staticmethod
    def accumulator_fits(acc: Tensor, p: Tensor) -> bool:
        # a DTensor's placement is FSDP2's/TP's business; local views are re-read at regrouping
        if is_dtensor(p):
            return True
        return acc.device == p.device and acc.dtype == accumulator_dtype(p.dtype) and acc.stride() == p.stride()

    @staticmethod
    def origin_like(p: Tensor) -> Tensor:
        # the param's own dtype: the origin IS checkpoint 0, stored exactly
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    @staticmethod
    def origin_fits(origin: Tensor, p: Tensor) -> bool:
        if is_dtensor(p):
            return True
        return origin.device == p.device and origin.dtype == p.dtype and origin.stride() == p.stride()

    def fence(self) -> None:
        pass

    def join(self) -> None:
        pass

    def nonfinite_steps(self, caches: Iterable[dict]) -> dict[int, tuple[int, int]]:
        """Steps at which non-finite values were read, per ``id(param)``: not recorded by default."""
        return {}


def _load(name: str) -> Backend:
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)()


def select(name: str, devices: Iterable[torch.device], table_sizes: Iterable[int], offload: str | None = None) -> Backend:
    """The backend for ``name`` given the params' devices and the merges' ``k + 1``.

    ``"auto"``: Triton when every param is on CUDA, Triton imports and every
    merge's weight table fits on the device (``schedules.TABLE_LIMIT``);
    foreach otherwise. ``"triton"`` on CPU params works only under
    ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests). ``offload="cpu"``:
    the host-resident backend (with ``"auto"`` or ``"foreach"``: it folds with
    the foreach arithmetic on the host).
    """
    from ...schedules import TABLE_LIMIT

    check_options(backend=name, offload=offload)
    if offload is not None:
        return _load("offload")
    devices, sizes = list(devices), list(table_sizes)
    too_long = [n for n in sizes if n > TABLE_LIMIT]
    if name == "auto":
        name = "foreach"
        if devices and all(d.type == "cuda" for d in devices) and not too_long:
            try:
                from . import triton  # noqa: F401

                name = "triton"
            except ImportError:
                pass
    if name != "triton":
        return _load(name)
    from . import triton

    if too_long:
        raise ValueError(
            f"backend='triton' keeps each merge's k + 1 weights in a device table of at most "
            f"schedules.TABLE_LIMIT = {TABLE_LIMIT} entries; a merge has {max(too_long)}. "
            "Use a larger interval, or backend='foreach'"
        )
    if not triton.interpreted() and not all(d.type == "cuda" for d in devices):
        raise ValueError(
            "backend='triton' needs CUDA parameters (CPU parameters only under "
            "TRITON_INTERPRET=1, Triton's interpreter for testing); use backend='foreach' or 'auto'"
        )
    return _load("triton")


def inline() -> Backend:
    """The backend that folds at once, on the current stream, beside the tensors (``"foreach"``).

    Merged model buffers use it whatever the params use: the next forward
    changes them in place, so they must be read before it runs (no side
    stream, no host copy in flight), and they are small.
    """
    return _load("foreach")


def __getattr__(name: str) -> Any:
    if name == "resolve":  # the 0.2 name of select() ("resolve" also named schedule and input lookups)
        warnings.warn("wsm_optim.backends.resolve is now select; the old name goes in 1.0", DeprecationWarning,
                      stacklevel=2)
        return select
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
