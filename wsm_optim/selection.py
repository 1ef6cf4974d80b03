"""Choosing a merge: evaluate every tracked merge in place and keep the best."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import schedules
from .integrations.unwrap import unwrap

__all__ = ["MergeScores", "evaluate_merges"]


@dataclass(frozen=True)
class MergeScores:
    """Scores of the tracked merges, in the optimizer's merge order.

    ``scores``: ``{merge name: score}`` (``"name:shape"`` for a moment merge read
    with several ``shapes``); ``best``: the name with the best score
    (lowest with ``mode="min"``, highest with ``"max"``; the first on ties);
    ``live``: the score of the live weights, when asked for (else ``None``);
    ``mode``: the ``mode`` the scores were compared with; ``bounds``: for each
    score of a moment merge, the relative error bound of its shape's
    reconstruction (``WSMOptimizer.shape_fit``), empty without moment merges.

    ``str(result)`` (and :meth:`summary`) says which merge is best and whether
    the live weights scored better than every merge (:attr:`live_wins`).
    """

    scores: dict[str, float]
    best: str
    live: float | None = None
    mode: str = "min"
    bounds: dict[str, float] = field(default_factory=dict)

    @property
    def best_score(self) -> float:
        return self.scores[self.best]

    @property
    def live_wins(self) -> bool | None:
        """``True`` when the live weights scored strictly better than the best merge,
        ``False`` when they did not, ``None`` when they were not scored (``include_live=False``)."""
        if self.live is None:
            return None
        return self.live < self.best_score if self.mode == "min" else self.live > self.best_score

    def summary(self) -> str:
        """One line: the best merge, and how the live weights compare with it."""
        best = f"best merge {self.best!r}: {self.best_score:.6g}"
        if self.live is None:
            return f"{best} (live weights not scored; include_live=True compares them)"
        if self.live_wins:
            return (f"{best}; the live weights scored better: {self.live:.6g}, so no tracked merge beats "
                    f"the live model here (keep the live weights, or track shorter windows)")
        return f"{best}; live weights: {self.live:.6g}"

    def __str__(self) -> str:
        return self.summary()


def evaluate_merges(
    optimizer: Any,
    evaluate: Callable[[], float],
    *,
    merges: Sequence[str] | None = None,
    shapes: Sequence[Any] | None = None,
    completed: bool = False,
    include_live: bool = False,
    mode: str = "min",
) -> MergeScores:
    """Evaluate each merge by swapping it into the live params; restore them exactly.

    Args:
        optimizer: a :class:`~wsm_optim.WSMOptimizer`, or a framework wrapper
            around one (see :func:`wsm_optim.unwrap`).
        evaluate: called with no argument while a merge is swapped in; returns
            a number (e.g. the validation loss of the model the optimizer trains).
        merges: names to evaluate (default: every tracked merge).
        shapes: decay shapes (names of :data:`wsm_optim.schedules.SHAPES` or
            callables) to read each *moment merge* with, chosen after training;
            its scores are then keyed ``"name:shape"`` (exact merges are
            evaluated once, under their name). ``None``: each moment merge with
            its own ``schedule``, under its name.
        completed: evaluate each merge's last *completed* window instead of
            the current one (see ``merged_state_dict(completed=True)``).
        include_live: also evaluate the live weights (``MergeScores.live``;
            ``MergeScores.live_wins`` then says whether they beat every merge).
        mode: ``"min"`` (lower is better, e.g. a loss) or ``"max"``.

    Between evaluations the live weights are restored bit-exactly (also when
    ``evaluate`` raises), so training can go on as if nothing happened.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a callable returning a number, got {type(evaluate).__name__}")
    opt = unwrap(optimizer)
    names = list(opt.merges) if merges is None else list(merges)
    if not names:
        raise ValueError("merges: give at least one merge name")
    unknown = [n for n in names if n not in opt.merges]
    if unknown:
        raise ValueError(f"merges: unknown names {unknown}; tracked merges are {list(opt.merges)}")
    readings = _readings(opt, names, shapes)
    scores: dict[str, float] = {}
    bounds: dict[str, float] = {}
    for key, name, shape in readings:
        with opt.merged_weights(merge=name, completed=completed, shape=shape):
            scores[key] = _score(evaluate(), key)
        if opt.is_moment_merge(name):
            bounds[key] = opt.shape_fit(shape, merge=name, completed=completed).error
    live = _score(evaluate(), "live weights") if include_live else None
    pick = min if mode == "min" else max
    best = pick(scores, key=lambda n: scores[n])
    return MergeScores(scores=scores, best=best, live=live, mode=mode, bounds=bounds)


def _readings(opt: Any, names: list[str], shapes: Sequence[Any] | None) -> list[tuple[str, str, Any]]:
    """``(score key, merge name, shape)`` of every evaluation, in merge order then shape order."""
    if shapes is None:
        return [(name, name, None) for name in names]
    if isinstance(shapes, str) or callable(shapes) or not shapes:
        raise ValueError(f"shapes must be a non-empty list of shape names or callables, got {shapes!r}")
    if not any(opt.is_moment_merge(name) for name in names):
        raise ValueError(
            f"shapes: none of the merges {names} is a moment merge (moments=m); exact merges are read with "
            "their own schedule only"
        )
    readings = []
    for name in names:
        if not opt.is_moment_merge(name):
            readings.append((name, name, None))
            continue
        for shape in shapes:
            readings.append((f"{name}:{schedules.schedule_name(shape)}", name, shape))
    keys = [key for key, _, _ in readings]
    if len(set(keys)) < len(keys):
        raise ValueError(f"shapes: two shapes have the same name ({keys}); give callables distinct __name__s")
    return readings


def _score(value: Any, what: str) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"evaluate() must return a number, got {type(value).__name__} for {what}") from None
    if math.isnan(score):
        raise ValueError(f"evaluate() returned NaN for {what}")
    return score
