"""Who calls ``WSMOptimizer.step()``: the rules an engine integration registers, for calls the core cannot judge.

The core names no framework. What an engine needs from it is declared here and
filled in by :mod:`wsm_optim.integrations._callers`, which ``import wsm_optim``
loads (torch-free), so the rules hold whether or not the user imported an
integration:

* :data:`STATE_INIT`: ``(module, function)`` pairs whose ``optim.step()`` call
  only makes the inner optimizer create its state (zero gradients, ``lr = 0``).
  :func:`called_by_state_init` lets ``step()`` forward such a call to the
  inner optimizer only: it neither counts nor touches accumulators.
* :data:`STEP_CHECKS`: ``check(opt)`` callables run at the start of every
  counted ``step()``; one raises to refuse a caller that would step the
  optimizer wrongly (e.g. once per param group).
* :data:`HINTS`: ``{situation: sentence}``, the fix the core's messages name
  for ``"group_cut"`` (``param_groups`` set to a subset), ``"bypass"`` (the
  params train while ``step()`` never runs) and ``"unstepped"`` (a readout
  with no step counted, yet changed params).

Callers are found by walking a few frames up the stack (the optimizer's
profiling and ``no_grad`` wrappers sit in between); each check costs a
dictionary look-up while its framework was never imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

__all__ = ["STATE_INIT", "STEP_CHECKS", "HINTS", "callers", "called_by_state_init", "run_step_checks",
           "is_group_cut", "refuse_group_cut", "hint"]

#: ``(module, function)``: a ``step()`` called from that function only initialises the inner optimizer's state.
STATE_INIT: list[tuple[str, str]] = []
#: ``check(opt)``, run at the start of every counted ``step()``; raises to refuse the caller.
STEP_CHECKS: list[Callable[[Any], None]] = []
#: ``{situation: sentence}``: the fix to name in the core's messages ("group_cut", "bypass", "unstepped").
HINTS: dict[str, str] = {}


def hint(situation: str) -> str:
    """``" " + HINTS[situation]`` when an integration registered one, else ``""``."""
    text = HINTS.get(situation)
    return f" {text}" if text else ""


def callers(frame: FrameType | None, max_depth: int) -> Iterator[FrameType]:
    """``frame`` and the frames that called it, innermost first, at most ``max_depth``."""
    for _ in range(max_depth):
        if frame is None:
            return
        yield frame
        frame = frame.f_back


def called_by_state_init(max_depth: int = 16) -> bool:
    """True when the current ``step()`` call comes from a :data:`STATE_INIT` function (matched by code object)."""
    codes = []
    for module_name, function in STATE_INIT:
        module = sys.modules.get(module_name)
        code = getattr(getattr(module, function, None), "__code__", None) if module is not None else None
        if code is not None:
            codes.append(code)
    return bool(codes) and any(f.f_code is code for f in callers(sys._getframe(1), max_depth) for code in codes)


def run_step_checks(opt: Any) -> None:
    """Run every :data:`STEP_CHECKS` entry on ``opt`` (each raises to refuse the step)."""
    for check in STEP_CHECKS:
        check(opt)


def is_group_cut(current: list[dict[str, Any]], groups: list[dict[str, Any]]) -> bool:
    """True when ``groups`` is a proper, non-empty subset of ``current`` (the same dicts), as per-group stepping sets."""
    return 0 < len(groups) < len(current) and all(any(g is c for c in current) for g in groups)


def refuse_group_cut(current: list[dict[str, Any]], groups: list[dict[str, Any]]) -> None:
    """Raise when ``param_groups`` is set to a proper subset of ``current``, as a framework stepping per group does."""
    if is_group_cut(current, groups):
        raise RuntimeError(
            f"WSMOptimizer.param_groups was cut to {len(groups)} of its {len(current)} groups, as a framework "
            "that steps one group at a time does: every such step() would count as a merge step."
            f"{hint('group_cut')} To drop groups for good, edit opt.inner.param_groups"
        )
