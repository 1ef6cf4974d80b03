"""Keep a run's final live weights aside while a trainer loads other weights into the model.

The current window's merge ``M_t = A_t + w_{t+1} * theta_live`` uses the live
params as its newest term. A trainer that loads another checkpoint into the
model when training ends (Hugging Face ``load_best_model_at_end``) replaces
that term, and every readout after it would mix in weights from another point
of the run. The integration knows the load is coming, so it asks the optimizer
to hold the final live values first (``WSMOptimizer._hold_live``); afterwards
each readout puts them back in the params for its duration (and the loaded
weights back after it), so ``merged_state_dict``, ``save_merged``,
``merged_weights`` and every metric read the run's final merge, exactly.

The held values are dropped when training goes on (the step count moves) or
the optimizer state is loaded: the params are the run's live weights again.
"""

from __future__ import annotations

from ..core.optimizer import WSMOptimizer

__all__ = ["keep_final_weights", "forget_final_weights"]


def keep_final_weights(wsm: WSMOptimizer) -> None:
    """Hold ``wsm``'s live params (on the host) before the trainer loads other weights into them.

    Costs one host copy of the params in their dtype until training goes on.
    """
    wsm._hold_live()


def forget_final_weights(wsm: WSMOptimizer) -> None:
    """Drop the held weights: readouts use the live params again."""
    wsm._release_live()
