"""Learning-rate schedulers seen by a WSM integration: re-point them, detect a decay.

WSM replaces the LR decay by a merge, so the LR must stay constant after
warmup. Frameworks build a scheduler before the integration wraps the
optimizer (Lightning's ``configure_optimizers``) or pick a decaying default
(Hugging Face ``Trainer``: linear decay to 0); these helpers keep the
scheduler attached to the wrapper and say when it decays.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import numpy as np
import torch

__all__ = ["repoint_scheduler", "describe_decay"]

#: At most this many steps are probed to decide whether a ``LambdaLR`` decays:
#: probing every step of a long run would cost seconds of Python calls.
_MAX_PROBES = 4096
#: A factor below ``(1 - _TOLERANCE) * peak`` after the peak counts as a decay.
_TOLERANCE = 1e-6


def repoint_scheduler(scheduler: Any, old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Make ``scheduler`` (and the schedulers it chains) drive ``new`` instead of ``old``.

    ``new`` shares ``old``'s ``param_groups`` (a ``WSMOptimizer`` around it), so
    learning rates already flow through; re-pointing keeps what frameworks check
    by identity (Lightning's ``LearningRateMonitor`` pairs schedulers with
    ``trainer.optimizers``) and torch's "``optimizer.step()`` was called" check.
    """
    if getattr(scheduler, "optimizer", None) is old:
        scheduler.optimizer = new
        _track_step_calls(new)
    for child in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        repoint_scheduler(child, old, new)


def _track_step_calls(optimizer: torch.optim.Optimizer) -> None:
    """Wrap ``optimizer.step`` as ``torch.optim.lr_scheduler.LRScheduler.__init__`` does.

    The scheduler's first ``step()`` warns unless ``optimizer.step`` carries
    ``_wrapped_by_lr_sched`` and set ``optimizer._opt_called``. A weak
    reference, as in torch, so that the wrapper does not keep the optimizer alive.
    """
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    ref = weakref.ref(optimizer)
    func = type(optimizer).step

    @functools.wraps(func)
    def step(*args, **kwargs):
        opt = ref()
        opt._opt_called = True
        return func(opt, *args, **kwargs)

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = step  # type: ignore[method-assign]


#: torch schedulers that lower the LR over training (or on a plateau) whatever their arguments
#: (a ``gamma`` below 1 for the step-wise ones, checked below).
_DECAYING = ("ReduceLROnPlateau", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "PolynomialLR", "OneCycleLR", "CyclicLR")
_GAMMA = ("ExponentialLR", "StepLR", "MultiStepLR")


def describe_decay(scheduler: Any, num_steps: int | None) -> str | None:
    """How ``scheduler`` lowers the LR after its peak, or ``None`` if it does not.

    ``LambdaLR`` (every Hugging Face scheduler, and most hand-written warmups)
    is probed exactly: its factor at up to 4096 steps of ``range(num_steps)``.
    Torch's built-in decaying schedulers are recognised by type. Anything else
    (or ``num_steps`` unknown for a ``LambdaLR``) is trusted: ``None``.
    """
    if scheduler is None:
        return None
    name = type(scheduler).__name__
    children = getattr(scheduler, "_schedulers", None)
    if children is not None:
        for child in children:
            found = describe_decay(child, num_steps)
            if found is not None:
                return f"{name} containing {found}"
        return None
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        if not num_steps or num_steps < 2:
            return None
        probes = np.unique(np.linspace(0, num_steps - 1, min(num_steps, _MAX_PROBES)).round().astype(np.int64))
        for lam in scheduler.lr_lambdas:
            factors = np.array([float(lam(int(s))) for s in probes])
            peak = int(np.argmax(factors))
            after = factors[peak:]
            low = int(np.argmin(after))
            if after[low] < (1 - _TOLERANCE) * factors[peak]:
                return (
                    f"{_lambda_name(lam)} (LR factor {factors[peak]:.3g} at step {probes[peak]}, "
                    f"{after[low]:.3g} at step {probes[peak + low]})"
                )
        return None
    if name in _DECAYING:
        return name
    if name in _GAMMA and float(getattr(scheduler, "gamma", 1.0)) < 1.0:
        return f"{name}(gamma={scheduler.gamma})"
    if name == "LinearLR" and float(scheduler.end_factor) < float(scheduler.start_factor):
        return f"LinearLR(start_factor={scheduler.start_factor}, end_factor={scheduler.end_factor})"
    return None


def _lambda_name(lam: Any) -> str:
    func = lam.func if isinstance(lam, functools.partial) else lam
    return f"LambdaLR({getattr(func, '__name__', type(func).__name__)})"
