"""Stop a run whose ``WSMOptimizer`` is constructed but never stepped, while something else trains its params.

The merge only advances when ``WSMOptimizer.step()`` runs. A framework can
silently replace the optimizer it was given and train one of its own; so does a
loop that calls ``opt.inner.step()``. Nothing of the merge then runs, and a
readout days later finds 0 steps. (The integrations register the fix for the
frameworks known to do it as ``callers.HINTS["bypass"]``.)

:class:`BypassGuard` is armed from construction until the first ``step()`` or
``load_state_dict()``: one post-accumulate-grad hook per trainable param
records a few of its values at each backward pass. If the values moved between
two backward passes and no ``WSMOptimizer`` in the process was stepped in
between, another optimizer stepped them, and the second backward raises, naming
the fix. Gradient accumulation (several backward passes before the first step)
leaves the params unchanged and passes; a second ``WSMOptimizer`` over the same
params that is stepped (the first only loaded or inspected) passes too. The
first ``step()`` removes every hook: a correctly wired run pays one small copy
per param during its first step's backward passes, nothing afterwards.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import callers

__all__ = ["BypassGuard", "count_step"]

_SAMPLES = 16  # values recorded per param, spread over the whole tensor
_steps = [0]  # WSMOptimizer.step() calls in this process, any instance


def count_step() -> None:
    """Note a ``WSMOptimizer.step()``: params that move across it moved through a merge."""
    _steps[0] += 1


def _sample(p: Tensor) -> Tensor:
    """Up to ``_SAMPLES`` values of ``p`` at evenly spaced flat positions (a copy)."""
    flat = p.detach()
    flat = (flat if flat.is_contiguous() else flat.contiguous()).view(-1)
    return flat[:: max(1, flat.numel() // _SAMPLES)][:_SAMPLES].clone()


def _plain(p: Tensor) -> bool:
    """A dense param whose values can be read locally (not a DTensor or other subclass, not on meta)."""
    return type(p) in (torch.nn.Parameter, Tensor) and p.requires_grad and p.device.type != "meta" and p.numel() > 0


class BypassGuard:
    """Raise at the second backward pass when ``owner``'s params moved without ``owner.step()``.

    Args:
        owner: the ``WSMOptimizer`` (held weakly: a dropped optimizer guards nothing).
        param_groups: its param groups at construction; groups with
            ``param_names`` give the error the param's name.
    """

    def __init__(self, owner: Any, param_groups: Sequence[dict[str, Any]]) -> None:
        self._owner = weakref.ref(owner)
        self._handles: list[Any] = []
        self._seen: dict[int, tuple[Tensor, int]] = {}
        seen_ids: set[int] = set()
        for group in param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names):
                if id(p) in seen_ids or not _plain(p):
                    continue
                seen_ids.add(id(p))
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(len(self._handles), name)))

    def disarm(self) -> None:
        """Remove every hook (the owner was stepped or loaded: the framework runs it)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._seen = [], {}

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def _hook(self, index: int, name: str | None):
        def after_grad(p: Tensor) -> None:
            if not self._handles or (p.is_cuda and torch.cuda.is_current_stream_capturing()):
                return
            now, steps = _sample(p), _steps[0]
            before, steps_before = self._seen.get(index, (None, steps))
            self._seen[index] = (now, steps)
            if before is None or steps != steps_before or (before.device == now.device and torch.equal(before, now)):
                return
            gc.collect()  # a WSMOptimizer dropped by its user may still wait in a reference cycle
            if self._owner() is None:
                self.disarm()
                return
            self.disarm()
            label = f"parameter {name!r}" if name is not None else f"parameter #{index} (shape {tuple(p.shape)})"
            raise RuntimeError(
                f"WSMOptimizer: {label} changed between two backward passes, but WSMOptimizer.step() has never "
                "been called: another optimizer is training these params and the merge counts none of its steps."
                f"{callers.hint('bypass')} Otherwise step the WSMOptimizer, not the optimizer it wraps (for steps "
                "before the first window, use start=)"
            )

        return after_grad
