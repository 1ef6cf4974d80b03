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

Two forms of the same numbers:

* :func:`weights` returns a lazy :class:`WindowWeights`: ``c(j)`` and ``w(i)``
  cost O(1) time and memory each, whatever ``k`` (``window=10**12`` answers at
  once). This is what long windows must use.
* :func:`decay_weights` / :func:`merge_coefficients` materialise float64
  arrays; they refuse ``k + 1 > TABLE_LIMIT`` with a ``ValueError`` instead of
  spending minutes and gigabytes. ``WindowWeights.coefficients()`` is the same array.

Both give bit-identical values: ``weights(s, k).c(j) == merge_coefficients(s, k)[j]``.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Union

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
    "parse",
    "schedule_name",
    "decay_weights",
    "coefficients_from_decay",
    "decay_from_coefficients",
    "merge_coefficients",
    "validate_decay",
    "check_nonnegative",
    "weights",
    "WindowWeights",
    "TABLE_LIMIT",
    "CALLABLE_SAMPLE_POINTS",
]

Schedule = Union[str, Callable[[float], float], Sequence[float], np.ndarray]

#: Default time constant of ``"inv-sqrt"``, as a fraction of the window.
INV_SQRT_TAU = 0.1

#: Largest ``k + 1`` (checkpoints per window) for which a float64 table of
#: merge weights is ever materialised (by :func:`decay_weights`,
#: :func:`merge_coefficients`, ``WindowWeights.coefficients()``, and for validating
#: every point of a user callable). ``2**20``: the table is 8 MiB, and building
#: it with one scalar Python call of the shape per point takes about 0.3 s for
#: the named shapes and under a second for a simple user lambda on one core
#: (``bench/bench_weights.py``). Longer windows use the lazy
#: :class:`WindowWeights` form.
TABLE_LIMIT = 2**20

#: Points at which a user callable is checked when ``k + 1 > TABLE_LIMIT``
#: (then checking every point would cost O(k) calls); see :func:`weights`.
CALLABLE_SAMPLE_POINTS = 1025


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


def parse(schedule: Schedule) -> Callable[[float], float] | np.ndarray:
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


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"empty window: k = {k} updates; a window needs k >= 1")
    return k


def _check_table_limit(k: int, what: str) -> None:
    if k + 1 > TABLE_LIMIT:
        raise ValueError(
            f"{what}: k + 1 = {k + 1} checkpoints exceeds TABLE_LIMIT = {TABLE_LIMIT}, the largest weight "
            "table this package materialises (a float64 array of k + 1 values); use "
            "schedules.weights(schedule, k), whose c(j) and w(i) cost O(1) time and memory for any k"
        )


def _explicit(spec: np.ndarray, k: int) -> np.ndarray:
    if spec.size != k:
        raise ValueError(f"schedule: explicit decay sequence has length {spec.size}, expected k = {k}")
    return validate_decay(spec.copy())


def _sampled_table(spec: Callable[[float], float], schedule: Schedule, k: int) -> np.ndarray:
    """Every ``w_i = f(i / (k + 1))``, validated; ``f(0) == 1`` checked for user callables."""
    if not isinstance(schedule, str):
        _check_f0(spec)
    # fromiter: no intermediate list of k Python floats (32 bytes each), only the 8-byte array
    w = np.fromiter((_call(spec, i / (k + 1)) for i in range(1, k + 1)), dtype=np.float64, count=k)
    return validate_decay(w, what=f"schedule {schedule_name(schedule)!r}")


def decay_weights(schedule: Schedule, k: int) -> np.ndarray:
    """Decay weights ``w_1..w_k`` (float64, shape ``(k,)``) of ``schedule`` for ``k`` updates.

    A named shape or callable ``f`` is sampled at ``i / (k + 1)``; an explicit
    sequence must have length ``k``. A callable must satisfy ``f(0) == 1``
    (within 1e-9) and return finite values. ``k + 1 > TABLE_LIMIT`` raises
    ``ValueError`` (use :func:`weights` for long windows).
    """
    k = _check_k(k)
    spec = parse(schedule)
    if isinstance(spec, np.ndarray):
        w = _explicit(spec, k)
        _check_table_limit(k, "decay_weights")
        return w
    _check_table_limit(k, "decay_weights")
    return _sampled_table(spec, schedule, k)


def _callable_name(f: Callable[..., Any]) -> str:
    return getattr(f, "__name__", type(f).__name__)


def _check_f0(f: Callable[[float], float]) -> None:
    f0 = _call(f, 0.0)
    if abs(f0 - 1.0) > 1e-9:
        raise ValueError(f"schedule: callable must have f(0) == 1, got f(0) = {f0!r}")


def _call(f: Callable[[float], float], t: float) -> float:
    try:
        v = f(t)
    except TypeError as e:  # e.g. ``lambda: 1.0``: a raw TypeError would not say which argument is wrong
        raise TypeError(
            f"schedule: the callable {_callable_name(f)!r} must take one argument t (a float in [0, 1]) and "
            f"return a float; calling it with t = {t} raised TypeError: {e}"
        ) from e
    try:
        v = float(v)
    except (TypeError, ValueError) as e:
        raise ValueError(f"schedule: callable returned a non-number at t = {t}: {v!r}") from e
    if not math.isfinite(v):
        raise ValueError(f"schedule: callable returned {v!r} at t = {t}")
    return v


def coefficients_from_decay(w: Sequence[float] | np.ndarray) -> np.ndarray:
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


def decay_from_coefficients(c: Sequence[float] | np.ndarray, atol: float = 1e-9) -> np.ndarray:
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
    """Merge weights ``c_0..c_k`` (float64, shape ``(k + 1,)``) of ``schedule`` for ``k`` updates.

    ``k + 1 > TABLE_LIMIT`` raises ``ValueError`` (use :func:`weights` for long windows).
    """
    return coefficients_from_decay(decay_weights(schedule, k))


# ------------------------------------------------------------- lazy form
_DIGEST_SAMPLES = 1025  # c_j hashed for the digest of a window past TABLE_LIMIT


class WindowWeights:
    """Theorem 3.1 weights of one schedule and window, computed on demand.

    Build it with :func:`weights` (the constructor is internal). Immutable;
    copies and pickles in O(1) for named shapes (stored as the name; a user
    callable is stored as given, an explicit sequence or a fully validated
    callable table as its read-only float64 array ``w_1..w_k``). Equality is
    identity; compare ``digest()`` to compare weights.

    Attributes:
        k: updates per window (``k + 1`` checkpoints ``theta_0 .. theta_k``).
        name: :func:`schedule_name` of the schedule.

    ``c(j)`` and ``w(i)`` are bit-identical to ``merge_coefficients(s, k)[j]``
    and ``decay_weights(s, k)[i - 1]``: the same scalar call
    ``f(i / (k + 1))`` and the same float64 subtraction. Values that were not
    validated when the object was built (named shapes at any ``k``, user
    callables past ``TABLE_LIMIT``) are checked on every call: ``w(i)`` must be
    finite and in ``[0, 1]`` and ``c(j)`` must be ``>= 0``, else ``ValueError``
    with the same wording as :func:`validate_decay`; no invalid weight is ever
    returned.
    """

    __slots__ = ("k", "name", "_kind", "_f", "_w", "_digest")

    def __init__(self, k: int, name: str, kind: str, source: Any) -> None:
        # kind "shape": source is a canonical name in SHAPES (so it pickles as the name);
        # "lazy": a user callable, checked point by point; "table": validated w_1..w_k (read-only).
        if kind not in ("shape", "lazy", "table"):
            raise ValueError(f"WindowWeights: kind must be 'shape', 'lazy' or 'table', got {kind!r}")
        set_ = object.__setattr__
        set_(self, "k", k)
        set_(self, "name", name)
        set_(self, "_kind", kind)
        set_(self, "_f", SHAPES[source] if kind == "shape" else source if kind == "lazy" else None)
        set_(self, "_w", source if kind == "table" else None)
        set_(self, "_digest", None)

    @property
    def _source(self) -> Any:
        return {"shape": self.name, "lazy": self._f, "table": self._w}[self._kind]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"WindowWeights is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"WindowWeights is immutable; cannot delete {name!r}")

    def __reduce__(self):
        return (_restore_window_weights, (self.k, self.name, self._kind, self._source, self._digest))

    def __repr__(self) -> str:
        return f"WindowWeights(name={self.name!r}, k={self.k})"

    # ------------------------------------------------------------ values
    def _index(self, x: Any, hi: int, what: str) -> int:
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise TypeError(f"WindowWeights.{what}: index must be an int, got {type(x).__name__}")
        x = int(x)
        if not 0 <= x <= hi:
            raise IndexError(f"WindowWeights.{what}: index {x} is outside 0..{hi} (k = {self.k})")
        return x

    def _w_at(self, i: int) -> float:
        """``w_i`` for ``0 <= i <= k + 1`` (no index check)."""
        if i == 0:
            return 1.0
        if i == self.k + 1:
            return 0.0
        if self._w is not None:
            return float(self._w[i - 1])
        v = _call(self._f, i / (self.k + 1))
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"schedule {self.name!r}: w_{i} = {v!r} is outside [0, 1]")
        return v

    def w(self, i: int) -> float:
        """Decay weight ``w_i``, ``0 <= i <= k + 1``; ``w_0 = 1``, ``w_{k+1} = 0``. ``IndexError`` outside."""
        return self._w_at(self._index(i, self.k + 1, "w"))

    def c(self, j: int) -> float:
        """Merge weight ``c_j = w_j - w_{j+1}`` of checkpoint ``theta_j``, ``0 <= j <= k``. ``IndexError`` outside."""
        j = self._index(j, self.k, "c")
        a, b = self._w_at(j), self._w_at(j + 1)
        if self._w is None and b > a:  # a table was validated when built; a lazy value is checked here
            raise ValueError(
                f"schedule {self.name!r}: not non-increasing: w_{j + 1} = {b!r} > w_{j} = {a!r} "
                "(an increasing decay gives a negative merge weight)"
            )
        return a - b

    def coefficients(self) -> np.ndarray:
        """``c_0..c_k`` as a fresh float64 array of shape ``(k + 1,)``, equal to :func:`merge_coefficients`.

        Raises ``ValueError`` naming ``TABLE_LIMIT`` when ``k + 1 > TABLE_LIMIT``.
        """
        _check_table_limit(self.k, "WindowWeights.coefficients()")
        if self._w is not None:
            w = self._w
        else:
            w = _sampled_table(self._f, self.name if self._kind == "shape" else self._f, self.k)
        c = coefficients_from_decay(w)
        if self._digest is None:
            object.__setattr__(self, "_digest", _table_digest(c))
        return c

    def table(self) -> np.ndarray:
        """Deprecated (0.2) name of :meth:`coefficients` (its errors keep the old name)."""
        warnings.warn("WindowWeights.table() is now .coefficients(); the old name goes in 1.0", DeprecationWarning,
                      stacklevel=2)
        _check_table_limit(self.k, "MergeWeights.table()")
        return self.coefficients()

    def digest(self) -> str:
        """16 hex characters identifying these weights (stored in state dicts to detect a changed schedule).

        ``k + 1 <= TABLE_LIMIT``: the first 16 hex digits of the SHA-256 of the
        float64 bytes of :meth:`table` (what v0.1 state dicts store as ``weights_sha256``).
        Past ``TABLE_LIMIT``: SHA-256 of ``"wsm_optim.MergeWeights/v1|{name}|k={k}|"``
        followed by either every ``w_i`` (an explicit sequence: already in
        memory) or the float64 bytes of ``c_j`` at the ``1025`` points
        ``j = (s * k) // 1024``, ``s = 0..1024`` (named shapes and callables:
        O(1) time and memory). Computed once, then cached.
        """
        if self._digest is None:
            if self.k + 1 <= TABLE_LIMIT:
                self.coefficients()  # sets the digest
            else:
                h = hashlib.sha256(f"wsm_optim.MergeWeights/v1|{self.name}|k={self.k}|".encode())
                if self._w is not None:
                    h.update(np.ascontiguousarray(self._w).data)
                else:
                    n = _DIGEST_SAMPLES - 1
                    h.update(np.array([self.c((s * self.k) // n) for s in range(n + 1)], dtype=np.float64).tobytes())
                object.__setattr__(self, "_digest", h.hexdigest()[:16])
        return self._digest


def _restore_window_weights(k: int, name: str, kind: str, source: Any, digest: str | None) -> WindowWeights:
    """Unpickle / copy: the same weights, with the digest already computed (it can cost a table build)."""
    mw = WindowWeights(k, name, kind, source)
    object.__setattr__(mw, "_digest", digest)
    return mw


def _table_digest(c: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(c).tobytes()).hexdigest()[:16]


def _check_sample(f: Callable[[float], float], name: str, k: int) -> None:
    """Check a user callable at ``CALLABLE_SAMPLE_POINTS`` spread-out ``i`` and their right neighbours."""
    n = CALLABLE_SAMPLE_POINTS - 1
    points = sorted({1 + (s * (k - 1)) // n for s in range(n + 1)} | {2 + (s * (k - 1)) // n for s in range(n)})
    prev_i, prev = 0, 1.0
    for i in points:
        v = _call(f, i / (k + 1))
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"schedule {name!r}: w_{i} = {v!r} is outside [0, 1]")
        if v > prev:
            raise ValueError(
                f"schedule {name!r}: not non-increasing: w_{i} = {v!r} > w_{prev_i} = {prev!r} "
                "(an increasing decay gives a negative merge weight)"
            )
        prev_i, prev = i, v


def weights(schedule: Schedule, k: int) -> WindowWeights:
    """The Theorem 3.1 weights of ``schedule`` for ``k`` updates, in O(1) time and memory for named shapes.

    Args:
        schedule: a name (see ``SHAPES``/``ALIASES``), a callable ``f(t)`` with
            ``f(0) == 1`` (within 1e-9), or an explicit sequence ``w_1..w_k``.
        k: updates per window, an int ``>= 1`` (any size: ``10**12`` is fine).

    Cost and validation:

    * named shapes: O(1); they are valid for every ``k`` (``linear``, ``1-sqrt``
      and ``inv-sqrt`` are compositions of correctly rounded IEEE operations,
      hence monotone; ``cosine`` and ``ema`` rely on libm's ``cos``/``pow``,
      checked over many ``k`` in the tests) and every returned value is
      re-checked anyway.
    * user callables: every point is evaluated and validated (O(k) calls, the
      same errors as :func:`decay_weights`) when ``k + 1 <= TABLE_LIMIT``, and
      the validated table is kept. Past that, only ``f(0) == 1`` and
      ``CALLABLE_SAMPLE_POINTS`` evenly spread points ``i_s = 1 + s (k - 1) // 1024``
      plus their right neighbours ``i_s + 1`` are checked (finite, in ``[0, 1]``,
      non-increasing); other points are checked when ``c(j)``/``w(i)`` reads them.
    * explicit sequences: length must be ``k``, every value validated (O(k), the
      caller's data); a read-only copy is kept.

    Raises:
        TypeError: ``k`` not an int, a spec that is no schedule, a callable that
            does not take one argument.
        ValueError: ``k < 1``, unknown name, wrong length, invalid values.
    """
    k = _check_k(k)
    spec = parse(schedule)
    name = schedule_name(schedule)
    if isinstance(spec, np.ndarray):
        w = _explicit(spec, k)
        w.flags.writeable = False
        return WindowWeights(k, name, "table", w)
    if isinstance(schedule, str):
        return WindowWeights(k, name, "shape", name)
    if k + 1 <= TABLE_LIMIT:
        w = _sampled_table(spec, schedule, k)
        w.flags.writeable = False
        return WindowWeights(k, name, "table", w)
    _check_f0(spec)
    _check_sample(spec, name, k)
    return WindowWeights(k, name, "lazy", spec)


#: 0.2 names -> today's: one word per idea ("coefficients" c_j, "decay" w_i, "parse" a schedule argument;
#: ``merged_weights`` is the optimizer's swap). They import with a ``DeprecationWarning`` until 1.0.
_RENAMED = {"resolve": "parse", "merge_weights": "coefficients_from_decay",
            "decay_from_merge": "decay_from_coefficients", "MergeWeights": "WindowWeights"}
_restore_merge_weights = _restore_window_weights  # pickles written before the rename


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        warnings.warn(f"wsm_optim.schedules.{name} is now {_RENAMED[name]}; the old name goes in 1.0",
                      DeprecationWarning, stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module 'wsm_optim.schedules' has no attribute {name!r}")
