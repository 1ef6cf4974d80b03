"""An obviously-correct float64 reference for the WSM merge (tests only).

It stores every snapshot of the parameters and sums them explicitly. The only
thing it takes from ``wsm_optim`` is ``schedules`` (decay weights ``w`` and
merge weights ``c`` of Theorem 3.1, tested separately against hand-computed
values); it shares no code with the optimizer's coefficient or update path.

Window semantics, modelled here from docs/method.md (not from the code):

* ``snapshots[s]`` are the params after ``s`` counted optimizer steps
  (``s = 0``: the params at wrap time).
* ``k = window // interval`` updates per window, ``k + 1`` checkpoints.
* Window ``m`` (``m = 0, 1, ...``) is anchored at step ``a_m = start + m * window``;
  its checkpoint ``j`` is ``snapshots[a_m + j * interval]``, ``j = 0..k``.
  So the windows tumble: window ``m + 1`` is anchored at the last checkpoint
  of window ``m``.
* Readout after ``s`` steps: for ``s <= start`` the live params (nothing
  anchored yet; at ``s == start`` the live params *are* the anchor). Otherwise
  ``s`` lies in window ``m = (s - start - 1) // window``, ``u = s - a_m`` steps
  into it (``1 <= u <= window``), ``t = u // interval`` checkpoints reached, and

      M = sum_{j <= t} c_j * theta_{a_m + j*interval} + w_{t+1} * theta_s,   w_{k+1} = 0.

  At a checkpoint (``u % interval == 0``) ``theta_s`` is checkpoint ``t`` and
  this is ``sum_{j < t} c_j theta_j + w_t theta_t``; at the window end
  (``u == window``) it is the explicit merge ``sum_{j <= k} c_j theta_j``.
* Abel form (Theorem 3.1): the same ``M`` equals
  ``theta_anchor - sum_{i <= t} w_i g_i - w_{t+1} (theta_{ckpt t} - theta_s)``
  with ``g_i = theta_{ckpt i-1} - theta_{ckpt i}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wsm_optim import schedules

F64 = torch.float64


@dataclass(frozen=True)
class Window:
    """One merge's configuration, as the user passes it to ``WSMOptimizer``."""

    schedule: Any = "linear"
    window: int = 1
    interval: int = 1
    start: int = 0
    keep_last: bool = False

    @property
    def k(self) -> int:
        assert self.window % self.interval == 0
        return self.window // self.interval

    def decay(self) -> np.ndarray:
        """``w_1..w_k`` (float64, shape ``(k,)``); computed once per spec (a read-only copy)."""
        if "_w" not in self.__dict__:
            w = schedules.decay_weights(self.schedule, self.k)
            w.flags.writeable = False
            object.__setattr__(self, "_w", w)
        return self.__dict__["_w"]

    def merge(self) -> np.ndarray:
        """``c_0..c_k`` (float64, shape ``(k + 1,)``) from Theorem 3.1 (``schedules.coefficients_from_decay``)."""
        if "_c" not in self.__dict__:
            c = schedules.coefficients_from_decay(self.decay())
            c.flags.writeable = False
            object.__setattr__(self, "_c", c)
        return self.__dict__["_c"]

    def as_kwargs(self) -> dict[str, Any]:
        return dict(
            schedule=self.schedule,
            window=self.window,
            interval=self.interval,
            start=self.start,
            keep_last=self.keep_last,
        )


def snapshot(params: Sequence[Tensor]) -> list[Tensor]:
    """float64 copies of ``params`` (exact for fp32/bf16/fp16 values)."""
    return [p.detach().to(F64, copy=True) for p in params]


def explicit_merge(checkpoints: Sequence[Tensor], c: np.ndarray) -> Tensor:
    """``sum_j c_j * checkpoints[j]`` in float64, one term at a time."""
    assert len(checkpoints) == len(c), (len(checkpoints), len(c))
    total = torch.zeros_like(checkpoints[0], dtype=F64)
    for c_j, theta_j in zip(c, checkpoints):
        total = total + float(c_j) * theta_j.to(F64)
    return total


def readout_weights(spec: Window, s: int) -> dict[int, float]:
    """Weights on ``snapshots[...]`` of the readout after ``s`` steps (see module doc).

    Returns ``{snapshot index: weight}``; weights are >= 0 and sum to 1.
    """
    if s <= spec.start:
        return {s: 1.0}
    w, c = spec.decay(), spec.merge()
    k = spec.k
    m = (s - spec.start - 1) // spec.window
    anchor = spec.start + m * spec.window
    u = s - anchor
    t = u // spec.interval
    weights: dict[int, float] = {}
    for j in range(t + 1):
        idx = anchor + j * spec.interval
        weights[idx] = weights.get(idx, 0.0) + float(c[j])
    w_next = float(w[t]) if t < k else 0.0  # w[t] is w_{t+1}
    weights[s] = weights.get(s, 0.0) + w_next
    return weights


def readout(spec: Window, snapshots: Sequence[Sequence[Tensor]], s: int) -> list[Tensor]:
    """Reference ``M`` after ``s`` steps, one float64 tensor per param: ``sum_idx weight * snapshot``."""
    weights = readout_weights(spec, s)
    coef = torch.tensor(list(weights.values()), dtype=F64)
    out = []
    for i in range(len(snapshots[0])):
        terms = torch.stack([snapshots[idx][i] for idx in weights])  # (n_terms, *shape)
        out.append((coef.view(-1, *[1] * (terms.dim() - 1)) * terms).sum(0))
    return out


def readout_scale(spec: Window, snapshots: Sequence[Sequence[Tensor]], s: int) -> list[Tensor]:
    """Elementwise ``max |theta|`` over the snapshots the readout after ``s`` steps uses.

    The merge is a convex combination of these, so this bounds ``|M|`` and is
    the natural scale for a relative error of the fp32 accumulation.
    """
    idx = list(readout_weights(spec, s))
    return [torch.stack([snapshots[j][i] for j in idx]).abs().amax(0) for i in range(len(snapshots[0]))]


def window_scale(spec: Window, snapshots: Sequence[Sequence[Tensor]], m: int) -> list[Tensor]:
    """Elementwise ``max |theta|`` over window ``m``'s checkpoints (bounds its merge)."""
    ckpts = window_checkpoints(spec, snapshots, m)
    return [torch.stack([ck[i] for ck in ckpts]).abs().amax(0) for i in range(len(snapshots[0]))]


def abel_readout(spec: Window, snapshots: Sequence[Sequence[Tensor]], s: int) -> list[Tensor]:
    """The same readout in Theorem 3.1's form ``theta_anchor - sum_i w_i g_i`` (float64)."""
    if s <= spec.start:
        return [x.clone() for x in snapshots[s]]
    w = spec.decay()
    k = spec.k
    m = (s - spec.start - 1) // spec.window
    anchor = spec.start + m * spec.window
    u = s - anchor
    t = u // spec.interval
    out = []
    for i in range(len(snapshots[0])):
        ck = [snapshots[anchor + j * spec.interval][i] for j in range(t + 1)]
        total = ck[0].clone()
        for j in range(1, t + 1):
            g_j = ck[j - 1] - ck[j]
            total = total - float(w[j - 1]) * g_j
        if t < k:  # the live params stand in for checkpoint t + 1
            total = total - float(w[t]) * (ck[t] - snapshots[s][i])
        out.append(total)
    return out


def window_checkpoints(spec: Window, snapshots: Sequence[Sequence[Tensor]], m: int) -> list[list[Tensor]]:
    """The ``k + 1`` checkpoints of window ``m``: ``[checkpoint j][param i]``."""
    anchor = spec.start + m * spec.window
    return [snapshots[anchor + j * spec.interval] for j in range(spec.k + 1)]


def window_merge(spec: Window, snapshots: Sequence[Sequence[Tensor]], m: int) -> list[Tensor]:
    """Explicit merge of window ``m`` (float64), summed checkpoint by checkpoint."""
    ckpts = window_checkpoints(spec, snapshots, m)
    c = spec.merge()
    return [explicit_merge([ck[i] for ck in ckpts], c) for i in range(len(snapshots[0]))]


def position(spec: Window, s: int) -> tuple[int, int, int] | None:
    """``(window m, checkpoints reached t, steps since checkpoint r)`` after ``s`` steps; None before the first anchor."""
    if s <= spec.start:
        return None
    m = (s - spec.start - 1) // spec.window
    u = s - (spec.start + m * spec.window)
    return m, u // spec.interval, u % spec.interval


def completed_windows(spec: Window, s: int) -> int:
    """How many windows have completed after ``s`` steps."""
    return max(0, (s - spec.start) // spec.window)


def at_window_end(spec: Window, s: int) -> bool:
    return s > spec.start and (s - spec.start) % spec.window == 0


# ------------------------------------------------------------ nonfinite="skip"
# A checkpoint whose params held a NaN/inf is left out of the merge and the
# remaining weights are renormalised (docs/method.md, "Non-finite checkpoints").
# The anchor of a window (checkpoint 0) is the params at the *next* step's start,
# so a bad checkpoint k of one window does not poison the next window's anchor
# when the user repairs the params in between: only checkpoints j >= 1, taken
# right after the step that produced them, can be left out here.


def readout_terms(spec: Window, s: int) -> list[tuple[int, float, int | None]]:
    """The readout after ``s`` steps as ``(snapshot index, weight, j)`` terms.

    ``j`` is the checkpoint number within the window, ``None`` for the live
    params standing in for checkpoint ``t + 1`` (weight ``w_{t+1}``).
    """
    if s <= spec.start:
        return [(s, 1.0, None)]
    w, c = spec.decay(), spec.merge()
    m = (s - spec.start - 1) // spec.window
    anchor = spec.start + m * spec.window
    t = (s - anchor) // spec.interval
    terms: list[tuple[int, float, int | None]] = [(anchor + j * spec.interval, float(c[j]), j) for j in range(t + 1)]
    if t < spec.k:
        terms.append((s, float(w[t]), None))
    return terms


def skipped_checkpoints(spec: Window, s: int, bad_steps) -> int:
    """How many checkpoints (``j >= 1``) of the readout after ``s`` steps were taken at ``bad_steps``."""
    return sum(1 for idx, _, j in readout_terms(spec, s) if j and idx in bad_steps)


def readout_skipping(
    spec: Window, snapshots: Sequence[Sequence[Tensor]], s: int, bad_steps=frozenset()
) -> tuple[list[Tensor], list[Tensor]]:
    """``(M, scale)`` after ``s`` steps with the checkpoints taken at ``bad_steps`` left out.

    ``M = sum_kept weight * theta / sum_kept weight`` (float64), one tensor per
    param; ``scale`` is the elementwise ``max |theta|`` over the kept terms
    (it bounds ``|M|``). With no bad steps this is :func:`readout`.
    """
    kept = [(idx, wt) for idx, wt, j in readout_terms(spec, s) if not (j and idx in bad_steps)]
    total = sum(wt for _, wt in kept)
    assert total > 0, "every weighted checkpoint was left out (test setup)"
    values, scales = [], []
    for i in range(len(snapshots[0])):
        acc = torch.zeros_like(snapshots[0][i], dtype=F64)
        for idx, wt in kept:
            acc = acc + (wt / total) * snapshots[idx][i]
        values.append(acc)
        scales.append(torch.stack([snapshots[idx][i] for idx, _ in kept]).abs().amax(0))
    return values, scales


def window_end(spec: Window, m: int) -> int:
    """Counted steps at the end (last checkpoint) of window ``m``."""
    return spec.start + (m + 1) * spec.window


# ------------------------------------------------------------ moment merges
# A moment merge read with a shape after ``s`` steps is the explicit merge, with
# that shape's weights, of the window from its anchor to the live params: the
# checkpoints taken since the anchor, then the live params when they are not a
# checkpoint (docs/moments.md).


def moment_points(spec: Window, s: int, completed: bool = False) -> list[int]:
    """Snapshot indices of the window a moment merge reads after ``s`` steps (``completed``: the last finished one)."""
    if completed:
        m = completed_windows(spec, s) - 1
        assert m >= 0, "no window has completed (test setup)"
        anchor = spec.start + m * spec.window
        return [anchor + j * spec.interval for j in range(spec.k + 1)]
    if s <= spec.start:
        return [s]
    m = (s - spec.start - 1) // spec.window
    anchor = spec.start + m * spec.window
    points = list(range(anchor, s + 1, spec.interval))
    return points if points[-1] == s else points + [s]


def moment_readout(shape: Any, spec: Window, snapshots: Sequence[Sequence[Tensor]], s: int,
                   completed: bool = False) -> tuple[list[Tensor], list[Tensor], np.ndarray]:
    """``(M, step, w)``: the float64 explicit merge with ``shape``'s weights, ``max_i |Delta_i|`` per element, ``w_1..w_T``."""
    points = moment_points(spec, s, completed)
    T = len(points) - 1
    c = schedules.merge_coefficients(shape, T) if T else np.ones(1)
    w = schedules.decay_weights(shape, T) if T else np.zeros(0)
    values, steps = [], []
    for i in range(len(snapshots[0])):
        pts = [snapshots[idx][i].to(F64) for idx in points]
        values.append(explicit_merge(pts, c))
        deltas = [b - a for a, b in zip(pts, pts[1:])]
        steps.append(torch.stack(deltas).abs().amax(0) if deltas else torch.zeros_like(pts[0]))
    return values, steps, w
