"""Find the ``WSMOptimizer`` inside the optimizer wrappers of training frameworks."""

from __future__ import annotations

from typing import Any

__all__ = ["unwrap"]

#: Attributes under which known wrappers keep the optimizer they wrap:
#: Lightning's ``LightningOptimizer`` (``_optimizer``), accelerate's
#: ``AcceleratedOptimizer`` and DeepSpeed's optimizers (``optimizer``).
_INNER_ATTRIBUTES = ("_optimizer", "optimizer")
_MAX_DEPTH = 8


def unwrap(optimizer: Any) -> Any:
    """The :class:`~wsm_optim.WSMOptimizer` that ``optimizer`` is or wraps.

    Follows the attributes under which Lightning, accelerate (and so Hugging
    Face ``Trainer``) and DeepSpeed keep the optimizer they wrap, a few levels
    deep. A ``WSMOptimizer`` is returned as is.

    Raises:
        TypeError: no ``WSMOptimizer`` is found; the message lists the chain
            of wrappers that was followed.
    """
    from ..core.optimizer import WSMOptimizer

    chain, current = [], optimizer
    for _ in range(_MAX_DEPTH):
        chain.append(type(current).__name__)
        if type(current) is WSMOptimizer or (
            isinstance(current, WSMOptimizer) and "_optimizer" not in vars(current)
        ):
            return current
        inner = next(
            (vars(current)[a] for a in _INNER_ATTRIBUTES if a in getattr(current, "__dict__", {})), None
        )
        if inner is None or inner is current:
            break
        current = inner
    if any(name.startswith("DeepSpeed") for name in chain):
        raise TypeError(
            f"unwrap: no WSMOptimizer inside {' -> '.join(chain)}: DeepSpeed stepped an optimizer of its own, "
            "so no merge was kept. With the Hugging Face Trainer, DeepSpeed discards the optimizer given in "
            "optimizers=(...) and builds one with create_optimizer(): call "
            "wsm_optim.integrations.transformers.wrap_trainer(trainer, window=...) before train()"
        )
    raise TypeError(
        f"unwrap: no WSMOptimizer inside {' -> '.join(chain)}; wrap the optimizer with "
        "WSMOptimizer(inner, ...) before handing it to the framework"
    )


def wrapped_merge(optimizer: Any) -> Any:
    """The ``WSMOptimizer`` that ``optimizer`` is or wraps, or ``None``: what a trainer integration asks
    before it wraps the framework's optimizer itself."""
    try:
        return unwrap(optimizer)
    except TypeError:
        return None
