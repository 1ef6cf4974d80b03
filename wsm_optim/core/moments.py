"""A moment merge: the decay shape (and the window's end) chosen after training, from a few accumulators.

An exact merge folds ``A = sum_j c_j (theta_j - theta_0)`` with the weights of
one shape. A moment merge keeps ``m`` such sums instead, one per exponent
``p`` of :data:`EXPONENTS`: each is an ordinary merge (its own part of the
runtime, same window, interval and start) of the shape ``1 - t^p``
(:class:`PowerShape`), so every backend, the state dict, resume and sharding
treat them as they treat any merge.

Why that is enough (``docs/moments.md``): with ``Delta_i = theta_i - theta_{i-1}``
a merge of shape ``f`` over a window of ``T`` updates is
``theta_0 + sum_i f(i / (T + 1)) Delta_i`` (Theorem 3.1). Part ``p`` holds, after
checkpoint ``t`` of a window of ``k`` updates,
``A_p = x^p (theta - theta_0) - sum_{i<=t} (i / (k + 1))^p Delta_i`` with
``x = (t + 1) / (k + 1)`` (``theta``: the live params, the newest point). So if
``f(s) ~= 1 + sum_p b_p s^p`` on the window's sample points, the merge is the
affine combination

    theta_0 + alpha_0 (theta - theta_0) + sum_p alpha_p A_p,
    alpha_0 = 1 + sum_p b_p ((t + 1) / (T + 1))^p,   alpha_p = -b_p ((k + 1) / (T + 1))^p,

computed in displacement form (fp32 error relative to ``|merge - theta_0|``,
not to ``|theta|``). ``b`` is fitted once per shape and window length by least
squares in float64 (:func:`fit_shape`), which also gives the reconstruction's
error bound ``sum |w_i - w_hat_i| / sum w_i``: ``|merge_hat - merge| <= that
bound x sum w_i x max_i |Delta_i|``, per coordinate, with no data needed.
``1 - t`` and ``1 - sqrt(t)`` are in the span from ``m = 2`` on: linear and
1-sqrt are exact.

The window read ends at the live params: right after a checkpoint step it
holds the ``t + 1`` checkpoints ``theta_0..theta_t`` (``T = t``); between two
checkpoints the live params are its newest point (``T = t + 1``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .. import schedules
from ..common.precision import accumulator_dtype
from . import distributed
from .spec import MergeSpec

if TYPE_CHECKING:
    from .merge import Merge

__all__ = ["EXPONENTS", "MAX_MOMENTS", "TOLERANCE", "PowerShape", "ShapeFit", "fit_shape", "MomentMerge",
           "MomentReading", "MomentFitWarning", "part_name"]

#: The exponents ``p`` of the moments, in the order ``moments=m`` takes them: ``1`` and ``1/2`` first (linear and
#: 1-sqrt exact with two), then the powers that fit cosine, ema and inverse-sqrt best, measured in ``docs/moments.md``.
EXPONENTS = (1.0, 0.5, 2.0, 3.0, 4.0, 1.0 / 3.0, 1.5, 6.0)
MAX_MOMENTS = len(EXPONENTS)

#: A readout whose shape is reconstructed with a larger relative error bound warns (:class:`MomentFitWarning`).
TOLERANCE = 1e-2


class MomentFitWarning(UserWarning):
    """A moment merge read with a shape its moments reconstruct less closely than :data:`TOLERANCE`."""


def part_name(name: str, index: int) -> str:
    """The state-dict name of moment ``index`` of the moment merge ``name`` (``~`` never starts a user's merge name)."""
    return f"{name}~{index}"


class PowerShape:
    """The decay shape ``f(t) = 1 - t^p`` whose merge is the moment of exponent ``p`` (picklable, stored by ``p``)."""

    __slots__ = ("p",)

    def __init__(self, p: float) -> None:
        self.p = float(p)

    def __call__(self, t: float) -> float:
        return 1.0 - t ** self.p

    @property
    def __name__(self) -> str:  # the schedule name the state dict records
        return f"1-t^{self.p:.6g}"

    def __reduce__(self):
        return (PowerShape, (self.p,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PowerShape) and other.p == self.p

    def __hash__(self) -> int:
        return hash(("PowerShape", self.p))


@dataclass(frozen=True)
class ShapeFit:
    """How closely the moments reconstruct one shape over a window of ``end`` updates.

    ``coefficients``: ``b_p`` (float64, shape ``(m,)``) with
    ``f(s) ~= 1 + sum_p b_p s^p`` at ``s = i / (end + 1)``, ``i = 1..end``;
    ``error``: ``sum_i |w_i - w_hat_i| / sum_i w_i``, the relative error bound.
    """

    shape: str
    end: int
    coefficients: np.ndarray
    error: float


def fit_shape(shape: schedules.Schedule, end: int, exponents: Sequence[float]) -> ShapeFit:
    """Least-squares fit (float64) of ``shape`` by ``1 + sum_p b_p s^p`` on a window of ``end`` updates.

    ``shape``: a name of :data:`wsm_optim.schedules.SHAPES` (or an alias) or a
    callable ``f(t)`` with ``f(0) = 1``; ``end >= 0``. Fewer sample points
    than exponents interpolate exactly (minimum-norm coefficients).
    """
    if not isinstance(shape, str) and not callable(shape):
        raise TypeError(
            f"shape must be a shape name (one of {sorted(schedules.SHAPES)}) or a callable f(t) with f(0) = 1, got "
            f"{type(shape).__name__}: explicit weights fix one window length, a moment merge is read at any"
        )
    name = schedules.schedule_name(shape)
    if end == 0:
        return ShapeFit(name, 0, np.zeros(len(exponents)), 0.0)
    w = schedules.decay_weights(shape, end)  # validates the shape: f(0) = 1, values in [0, 1], non-increasing
    s = np.arange(1, end + 1, dtype=np.float64) / (end + 1)
    basis = s[:, None] ** np.asarray(exponents, dtype=np.float64)[None, :]
    b = np.linalg.lstsq(basis, w - 1.0, rcond=None)[0]
    total = float(w.sum())
    error = float(np.abs(w - 1.0 - basis @ b).sum() / total) if total > 0.0 else 0.0
    return ShapeFit(name, end, b, error)


class MomentMerge:
    """A moment merge of a ``WSMOptimizer``: its spec and its parts (one :class:`~wsm_optim.core.merge.Merge` per moment).

    The parts share one window position and one origin dict (they are anchored
    together). Readouts go through :meth:`reading`, which binds a shape.
    """

    def __init__(self, name: str, spec: MergeSpec, parts: Sequence["Merge"]) -> None:
        self.name, self.spec, self.parts = name, spec, list(parts)
        self.exponents = EXPONENTS[: len(self.parts)]
        self._fits: dict[tuple[Any, int], ShapeFit] = {}  # keyed by the shape object: a callable stays alive here

    @classmethod
    def build(cls, name: str, spec: MergeSpec) -> "MomentMerge":
        from .merge import Merge

        parts = [Merge(part_name(name, i), MergeSpec(PowerShape(p), spec.window, spec.interval, spec.start,
                                                     spec.keep_last))
                 for i, p in enumerate(EXPONENTS[: spec.moments])]
        return cls(name, spec, parts)

    def __repr__(self) -> str:
        s = self.spec
        return (f"{self.name}: {len(self.parts)} moments (reads {schedules.schedule_name(s.schedule)}) "
                f"window={s.window} interval={s.interval} start={s.start}")

    @property
    def position(self):
        return self.parts[0].position

    @property
    def origin(self) -> dict[Tensor, Tensor] | None:
        return self.parts[0].origin

    def end(self, completed: bool) -> tuple[int, int]:
        """``(t, T)``: checkpoints folded after the anchor, and updates in the window a readout reads."""
        pos = self.position
        if completed or pos.complete:
            return self.spec.k, self.spec.k
        return pos.t, pos.t + (1 if pos.r else 0)

    def fit(self, shape: schedules.Schedule | None, completed: bool = False) -> ShapeFit:
        """The fit of ``shape`` (``None``: the spec's schedule) over the window a readout would read now."""
        shape = self.spec.schedule if shape is None else shape
        end = self.end(completed)[1]
        try:
            key: tuple[Any, int] | None = (shape, end)
            fitted = self._fits.get(key)
        except TypeError:  # unhashable (an array): fit_shape says what a shape must be
            key, fitted = None, None
        if fitted is None:
            if len(self._fits) > 64:
                self._fits.clear()
            fitted = fit_shape(shape, end, self.exponents)
            if key is not None:
                self._fits[key] = fitted
        return fitted

    def reading(self, shape: schedules.Schedule | None, completed: bool) -> "MomentReading":
        """The moment merge read with ``shape`` (warns when its error bound exceeds :data:`TOLERANCE`)."""
        fitted = self.fit(shape, completed)
        if fitted.error > TOLERANCE:
            warnings.warn(
                f"merge {self.name!r}: shape {fitted.shape!r} is reconstructed from {len(self.parts)} moments "
                f"within a relative error bound of {fitted.error:.3g} (> {TOLERANCE:g}) over this window of "
                f"{fitted.end} updates; more moments (up to {MAX_MOMENTS}) reconstruct it more closely",
                MomentFitWarning,
                stacklevel=4,
            )
        t, end = self.end(completed)
        k, b = self.spec.k, fitted.coefficients
        p = np.asarray(self.exponents)
        alpha_live = 1.0 + float(np.sum(b * ((t + 1) / (end + 1)) ** p))
        alphas = [float(a) for a in -b * ((k + 1) / (end + 1)) ** p]
        return MomentReading(self, fitted, alpha_live, alphas)


@dataclass
class MomentReading:
    """A moment merge bound to one shape for one readout: what ``readout`` asks of a merge, and the values.

    ``fit``: the shape's fit the coefficients come from; ``alpha_live``/``alphas``:
    the coefficients of ``theta - theta_0`` and of the parts' accumulators (see
    the module docstring).
    """

    merge: MomentMerge
    fit: ShapeFit
    alpha_live: float
    alphas: list[float]

    @property
    def name(self) -> str:
        return self.merge.name

    @property
    def spec(self) -> MergeSpec:
        return self.merge.spec

    @property
    def position(self):
        return self.merge.position

    @property
    def reads_live(self) -> bool:
        """Every readout of the current window reads the live params (their weight is ``alpha_live``)."""
        return self.position.anchored

    def source(self, completed: bool):
        return self.merge.parts[0].source(completed)

    def readout_scale(self, completed: bool) -> None:
        return None  # moment merges refuse nonfinite="skip"

    def origin_of(self, source):
        return self.merge.parts[0].origin_of(source)

    def value(self, p: Tensor, completed: bool) -> Tensor:
        """One param's merged value: a new tensor in accumulator precision, laid out like ``p``."""
        merge, pos = self.merge, self.position
        with torch.no_grad():
            lp = distributed.local_view(p)
            if not pos.anchored and not completed:
                return distributed.wrap_like(p, lp.to(accumulator_dtype(lp.dtype), copy=True))
            origin = distributed.local_view(merge.origin[p])
            if completed and not pos.complete:
                # the kept window (keep_last): its parts' merges theta_0 + A_p, folded; it ended at
                # theta_k, the current window's origin, and theta_0 cancels from the combination
                kept = [distributed.local_view(part.completed[p]) for part in merge.parts]
                v = torch.empty_like(kept[0]).copy_(origin).mul_(self.alpha_live)
                for a, c in zip(self.alphas, kept):
                    v.add_(c, alpha=a)
                return distributed.wrap_like(p, v)
            accs = [distributed.local_view(part.acc[p]) for part in merge.parts]
            v = torch.empty_like(accs[0]).copy_(lp)  # device move and upcast in one copy
            v.sub_(origin).mul_(self.alpha_live)
            for a, acc in zip(self.alphas, accs):
                v.add_(acc, alpha=a)
            v.add_(origin)  # last, in one rounding: the result keeps the displacement's precision
        return distributed.wrap_like(p, v)
