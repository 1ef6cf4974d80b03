"""Decay shapes and Theorem 3.1 of the WSM paper (decay <-> checkpoint merge).

All the merge math of the package lives here, in float64 NumPy.

Notation (see ``docs/method.md``): a window holds ``k`` updates and ``k + 1``
checkpoints ``theta_0 .. theta_k`` (``theta_0`` is the anchor).

* decay weights ``w``: shape ``(k,)``, ``w[i - 1] = w_i``, non-increasing in
  ``[0, 1]``. The merged model equals ``theta_0 - sum_i w_i * g_i``.
* merge weights ``c``: shape ``(k + 1,)``, ``c[j]`` multiplies ``theta_j``;
  ``c >= 0`` and ``sum(c) == 1``.

Theorem 3.1: ``c_j = w_j - w_{j+1}`` with ``w_0 := 1`` and ``w_{k+1} := 0``;
conversely ``w_i = sum_{j >= i} c_j``.

A decay *shape* is ``f: [0, 1] -> [0, 1]``; the paper samples it at
``t_i = i / (k + 1)``, so ``w_i = f(i / (k + 1))`` for ``i = 1..k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Union

import numpy as np

__all__ = [
    "Schedule",
    "SHAPES",
    "ALIASES",
    "INV_SQRT_TAU",
    "linear",
    "cosine",
    "one_minus_sqrt",
    "ema",
    "inv_sqrt",
    "resolve",
    "schedule_name",
    "decay_weights",
    "merge_weights",
    "decay_from_merge",
    "merge_coefficients",
    "validate_decay",
    "check_nonnegative",
]

Schedule = Union[str, Callable[[float], float], Sequence[float], np.ndarray]

#: Default time constant of ``"inv-sqrt"``, as a fraction of the window.
INV_SQRT_TAU = 0.1


def linear(t: float) -> float:
    """``1 - t``: the merge is a uniform mean of all ``k + 1`` checkpoints."""
    return 1.0 - t


def cosine(t: float) -> float:
    """``(1 + cos(pi t)) / 2``: a symmetric hump of merge weights."""
    return 0.5 * (1.0 + math.cos(math.pi * t))


def one_minus_sqrt(t: float) -> float:
    """``1 - sqrt(t)``: most weight on the oldest checkpoint (the anchor)."""
    return 1.0 - math.sqrt(t)


def ema(t: float) -> float:
    """``1 - 0.1 ** (1 - t)``, the paper's EMA-like shape (most weight on the newest).

    Note ``ema(0) == 0.9``, not 1: this is the paper's definition, and it is
    harmless because Theorem 3.1 fixes ``w_0 := 1``; the anchor simply gets
    ``c_0 = 1 - ema(1 / (k + 1))``.
    """
    return 1.0 - 0.1 ** (1.0 - t)


def inv_sqrt(tau: float = INV_SQRT_TAU) -> Callable[[float], float]:
    """Classic inverse-square-root decay ``f(t) = 1 / sqrt(1 + t / tau)``.

    ``tau`` is the time constant as a fraction of the window (default
    ``INV_SQRT_TAU = 0.1``): the decay halves at ``t = 3 tau``. It never reaches
    zero, so the newest checkpoint keeps weight ``c_k = f(k / (k + 1))``
    (about 0.30 for the default and long windows).
    """
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"inv_sqrt: tau must be a finite number > 0, got {tau!r}")

    def f(t: float) -> float:
        return 1.0 / math.sqrt(1.0 + t / tau)

    f.__name__ = f"inv_sqrt(tau={tau})"
    f.__qualname__ = f.__name__
    return f


SHAPES: dict[str, Callable[[float], float]] = {
    "linear": linear,
    "cosine": cosine,
    "1-sqrt": one_minus_sqrt,
    "inv-sqrt": inv_sqrt(INV_SQRT_TAU),
    "ema": ema,
}
ALIASES: dict[str, str] = {"mean": "linear", "minus-sqrt": "1-sqrt"}


def _valid_names() -> str:
    return ", ".join(repr(n) for n in [*SHAPES, *ALIASES])


def resolve(schedule: Schedule) -> Callable[[float], float] | np.ndarray:
    """Turn a schedule spec into a shape ``f`` or an explicit float64 ``w`` array.

    Raises ``ValueError`` for an unknown name and ``TypeError`` for a spec that
    is neither a name, a callable nor a sequence of numbers.
    """
    if isinstance(schedule, str):
        name = ALIASES.get(schedule, schedule)
        if name not in SHAPES:
            raise ValueError(
                f"schedule: unknown name {schedule!r}; valid names are {_valid_names()}, "
                "or pass a callable f(t) or an explicit sequence w_1..w_k"
            )
        return SHAPES[name]
    if callable(schedule):
        return schedule
    try:
        w = np.asarray(schedule, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(
            "schedule must be a name, a callable f(t) or a sequence of numbers, "
            f"got {type(schedule).__name__}"
        ) from e
    if w.ndim != 1:
        raise ValueError(f"schedule: an explicit decay sequence must be 1-D, got shape {w.shape}")
    return w


def schedule_name(schedule: Schedule) -> str:
    """A short human-readable name: the canonical name, a callable's name, or ``"explicit"``."""
    if isinstance(schedule, str):
        return ALIASES.get(schedule, schedule)
    if callable(schedule):
        return getattr(schedule, "__name__", type(schedule).__name__)
    return "explicit"


def validate_decay(w: np.ndarray, what: str = "decay weights") -> np.ndarray:
    """Check that ``w`` (shape ``(k,)``) is finite, in ``[0, 1]`` and non-increasing.

    Indices in messages are 1-based, as ``w_1 .. w_k`` in the paper.
    Returns ``w`` as float64.
    """
    w = np.asarray(w, dtype=np.float64)
    if w.size == 0:
        raise ValueError(f"{what}: empty window (k = 0); a window needs at least one update")
    bad = np.flatnonzero(~np.isfinite(w))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{what}: w_{i + 1} = {float(w[i])!r} is not finite")
    bad = np.flatnonzero((w < 0.0) | (w > 1.0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{what}: w_{i + 1} = {float(w[i])!r} is outside [0, 1]")
    bad = np.flatnonzero(np.diff(w) > 0.0)
    if bad.size:
        i = int(bad[0]) + 1
        raise ValueError(
            f"{what}: not non-increasing: w_{i + 1} = {float(w[i])!r} > w_{i} = {float(w[i - 1])!r} "
            "(an increasing decay gives a negative merge weight)"
        )
    return w


def decay_weights(schedule: Schedule, k: int) -> np.ndarray:
    """Decay weights ``w_1..w_k`` (float64, shape ``(k,)``) of ``schedule`` for ``k`` updates.

    A named shape or callable ``f`` is sampled at ``i / (k + 1)``; an explicit
    sequence must have length ``k``. A callable must satisfy ``f(0) == 1``
    (within 1e-9) and return finite values.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"empty window: k = {k} updates; a window needs k >= 1")
    spec = resolve(schedule)
    if isinstance(spec, np.ndarray):
        if spec.size != k:
            raise ValueError(
                f"schedule: explicit decay sequence has length {spec.size}, expected k = {k}"
            )
        return validate_decay(spec.copy())
    builtin = isinstance(schedule, str)
    if not builtin:
        f0 = _call(spec, 0.0)
        if abs(f0 - 1.0) > 1e-9:
            raise ValueError(f"schedule: callable must have f(0) == 1, got f(0) = {f0!r}")
    w = np.array([_call(spec, i / (k + 1)) for i in range(1, k + 1)], dtype=np.float64)
    return validate_decay(w, what=f"schedule {schedule_name(schedule)!r}")


def _call(f: Callable[[float], float], t: float) -> float:
    v = f(t)
    try:
        v = float(v)
    except (TypeError, ValueError) as e:
        raise ValueError(f"schedule: callable returned a non-number at t = {t}: {v!r}") from e
    if not math.isfinite(v):
        raise ValueError(f"schedule: callable returned {v!r} at t = {t}")
    return v


def merge_weights(w: Sequence[float] | np.ndarray) -> np.ndarray:
    """Theorem 3.1, decay -> merge: ``c_j = w_j - w_{j+1}`` (``w_0 = 1``, ``w_{k+1} = 0``).

    ``w``: shape ``(k,)``. Returns ``c``: float64, shape ``(k + 1,)``, oldest first.
    """
    w = validate_decay(w)
    padded = np.concatenate(([1.0], w, [0.0]))
    return padded[:-1] - padded[1:]


def check_nonnegative(c: np.ndarray, what: str) -> np.ndarray:
    """Raise ``ValueError`` naming the first ``c_j`` that is negative or not finite."""
    bad = np.flatnonzero(~np.isfinite(c) | (c < 0.0))
    if bad.size:
        j = int(bad[0])
        raise ValueError(f"{what}: c_{j} = {float(c[j])!r} is negative or not finite; weights must be >= 0")
    return c


def decay_from_merge(c: Sequence[float] | np.ndarray, atol: float = 1e-9) -> np.ndarray:
    """Theorem 3.1, merge -> decay: ``w_i = sum_{j >= i} c_j``, ``i = 1..k``.

    ``c``: shape ``(k + 1,)``, non-negative, summing to 1 (within ``atol``).
    Returns ``w``: float64, shape ``(k,)``.
    """
    c = np.asarray(c, dtype=np.float64)
    if c.ndim != 1 or c.size < 2:
        raise ValueError(
            f"merge weights: need a 1-D sequence of k + 1 >= 2 values, got shape {c.shape}"
        )
    c = check_nonnegative(c, "merge weights")
    total = float(c.sum())
    if abs(total - 1.0) > atol:
        raise ValueError(f"merge weights: sum to {total!r}, expected 1")
    w = np.cumsum(c[::-1])[::-1][1:].copy()
    return np.clip(w, 0.0, 1.0)


def merge_coefficients(schedule: Schedule, k: int) -> np.ndarray:
    """Merge weights ``c_0..c_k`` (float64, shape ``(k + 1,)``) of ``schedule`` for ``k`` updates."""
    return merge_weights(decay_weights(schedule, k))


# --- lazy weights (interim; the hardening branch replaces this block) ---------------------------
TABLE_LIMIT = 2**20


class MergeWeights:
    """Theorem 3.1 weights of ``schedule`` for ``k`` updates, computed on demand (O(1) memory)."""

    def __init__(self, schedule: Schedule, k: int) -> None:
        self.k = int(k)
        self.name = schedule_name(schedule)
        self._schedule = schedule
        spec = resolve(schedule)
        if isinstance(spec, np.ndarray) or self.k + 1 <= TABLE_LIMIT and not isinstance(schedule, str):
            self._w = decay_weights(schedule, self.k)
            self._f = None
        else:
            self._w = None
            self._f = spec

    def w(self, i: int) -> float:
        if i == 0:
            return 1.0
        if i == self.k + 1:
            return 0.0
        if not 0 < i <= self.k:
            raise IndexError(f"w_{i}: i must be in 0..{self.k + 1}")
        return float(self._w[i - 1]) if self._w is not None else float(self._f(i / (self.k + 1)))

    def c(self, j: int) -> float:
        if not 0 <= j <= self.k:
            raise IndexError(f"c_{j}: j must be in 0..{self.k}")
        return self.w(j) - self.w(j + 1)

    def table(self) -> np.ndarray:
        if self.k + 1 > TABLE_LIMIT:
            raise ValueError(f"k + 1 = {self.k + 1} merge weights exceed TABLE_LIMIT = {TABLE_LIMIT}")
        return merge_weights(self._w if self._w is not None else decay_weights(self._schedule, self.k))

    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(np.ascontiguousarray(self.table()).tobytes()).hexdigest()[:16]


def weights(schedule: Schedule, k: int) -> MergeWeights:
    return MergeWeights(schedule, k)
