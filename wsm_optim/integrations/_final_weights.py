"""Keep a run's final live weights aside while a trainer loads other weights into the model.

The current window's merge is ``M_t = A_t + w_{t+1} * theta_live``: it uses the
live params as its newest term. A trainer that loads another checkpoint into
the model when training ends (Hugging Face ``load_best_model_at_end``) replaces
that term, and every readout after it would mix in weights from another point
of the run. The integration knows the load is coming, so it keeps the final
live values first; afterwards each readout of the ``WSMOptimizer`` puts them
back in the params for its duration (and the loaded weights back after it), so
``merged_state_dict``, ``save_merged``, ``merged_weights`` and every metric
read the run's final merge, exactly.

The kept values are dropped when training goes on (the step count moves) or
the optimizer state is loaded: the params are the run's live weights again.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import Tensor

from ..core.optimizer import WSMOptimizer
from ..core.readout import LiveParamsChangedWarning

__all__ = ["keep_final_weights", "forget_final_weights"]


def _local(p: Tensor) -> Tensor:
    """The tensor holding this rank's values (the local shard of a ``DTensor``)."""
    to_local = getattr(p, "to_local", None)
    return to_local() if callable(to_local) else p


def _params(wsm: WSMOptimizer) -> list[Tensor]:
    """The tracked params, then the merged model buffers (``merge_buffers=True``): every live term of a readout."""
    params = list(dict.fromkeys(p for group in wsm.param_groups for p in group["params"]))
    model_buffers = wsm._runtime.registry.model_buffers
    return params + (model_buffers.current() if model_buffers is not None else [])


class FinalWeightsKept:
    """Readouts of a ``WSMOptimizer`` whose params hold other weights than the run's final ones.

    Mixed in front of the optimizer's class by :func:`keep_final_weights`.
    ``_wsm_final``: ``(param, final local value on the host)`` per tracked param;
    ``_wsm_final_steps``: the step count they belong to.
    """

    _wsm_final: list[tuple[Tensor, Tensor]] | None
    _wsm_final_steps: int

    @contextlib.contextmanager
    def _final_weights_in(self):
        if self._wsm_final is not None and self.steps != self._wsm_final_steps:
            self._wsm_final = None  # trained on since: the live params are the run's again
        if self._wsm_final is None:
            yield
            return
        with torch.no_grad():
            now = [(p, _local(p).detach().clone()) for p, _ in self._wsm_final]
            for p, final in self._wsm_final:
                _local(p).copy_(final)
        try:
            # The params hold the final step's values bit-exactly again: the core's
            # "live params changed since the last step()" warning does not apply.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LiveParamsChangedWarning)
                yield
        finally:
            with torch.no_grad():
                for p, value in now:
                    _local(p).copy_(value)

    def merged_state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        with self._final_weights_in():
            return super().merged_state_dict(*args, **kwargs)  # type: ignore[misc]

    @contextlib.contextmanager
    def merged_weights(self, **kwargs: Any):
        with self._final_weights_in(), super().merged_weights(**kwargs):  # type: ignore[misc]
            yield self

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        forget_final_weights(self)  # the loaded state goes with the params the trainer holds now


#: ``{optimizer class: its subclass with FinalWeightsKept first}`` and back.
_KEPT: dict[type, type] = {}
_ORIGINAL: dict[type, type] = {}


def keep_final_weights(wsm: WSMOptimizer) -> None:
    """Keep ``wsm``'s live params (on the host) before the trainer loads other weights into them.

    Costs one host copy of the params in their dtype until training goes on.
    """
    if isinstance(wsm, FinalWeightsKept):
        forget_final_weights(wsm)
    with torch.no_grad():
        final = [(p, _local(p).detach().to("cpu", copy=True)) for p in _params(wsm)]
    cls = type(wsm)
    if cls not in _KEPT:
        _KEPT[cls] = type(cls.__name__, (FinalWeightsKept, cls), {"__module__": cls.__module__})
        _ORIGINAL[_KEPT[cls]] = cls
    wsm.__class__ = _KEPT[cls]
    wsm._wsm_final = final  # type: ignore[attr-defined]
    wsm._wsm_final_steps = wsm.steps  # type: ignore[attr-defined]


def forget_final_weights(wsm: WSMOptimizer) -> None:
    """Drop the kept weights: readouts use the live params again."""
    if not isinstance(wsm, FinalWeightsKept):
        return
    wsm.__class__ = _ORIGINAL[type(wsm)]
    del wsm._wsm_final, wsm._wsm_final_steps
