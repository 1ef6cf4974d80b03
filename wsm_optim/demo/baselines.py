"""What a user would do instead of WSM, trained on the same batches as the constant-LR run.

* ``WSDBranch``: a copy of the constant-LR model and of its inner AdamW state at
  the branch start, decayed to zero over ``D`` steps (the WSD recipe).
* ``EMAWeights``: an exponential moving average of the constant-LR run's
  weights (``torch.optim.swa_utils.AveragedModel``), updated every step at no
  extra training cost.
* ``ScheduleFreeRun``: schedule-free AdamW, its own run from the same
  initialisation (needs the ``schedulefree`` package, in the ``[demo]`` extra).
* ``CosineRun``: AdamW with warmup and a cosine decay to zero over the run.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import schedules
from .model import GPT


def param_groups(model: GPT) -> list[dict]:
    """nanoGPT's grouping: weight decay on matrices and embeddings, none on biases and norms."""
    decay = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [(n, p) for n, p in model.named_parameters() if p.dim() < 2]
    return [
        {"params": [p for _, p in decay], "param_names": [n for n, _ in decay], "weight_decay": None},
        {"params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def adamw(model: GPT, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    groups = param_groups(model)
    groups[0]["weight_decay"] = weight_decay
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def train_step(model: GPT, opt: torch.optim.Optimizer, batch, lr: float | None) -> float:
    """One update on ``batch``; ``lr`` sets every group's LR first (``None``: leave it to the optimizer)."""
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr
    loss = model.loss(*batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


class WSDBranch:
    """Forked from the live model and inner optimizer after ``start`` steps; over steps
    ``start .. end - 1`` the LR is ``lr * w_i``, ``w_i = f(i / (D + 1))`` of ``schedule``."""

    def __init__(self, model: GPT, inner: torch.optim.Optimizer, *, lr: float, betas, weight_decay: float,
                 schedule: str, start: int, end: int) -> None:
        self.model = copy.deepcopy(model)
        self.opt = adamw(self.model, lr, betas, weight_decay)
        self.opt.load_state_dict(copy.deepcopy(inner.state_dict()))  # own moment buffers
        self.lr, self.start, self.end = lr, start, end
        self.weights = schedules.decay_weights(schedule, end - start)

    def train_step(self, step: int, batch) -> float:
        return train_step(self.model, self.opt, batch, self.lr * float(self.weights[step - self.start]))


class EMAWeights:
    """``AveragedModel`` with ``get_ema_multi_avg_fn(decay)``: after the first update (a copy),
    ``ema <- decay * ema + (1 - decay) * params`` each step; ``decay`` gives a mean
    checkpoint age of ``decay / (1 - decay)`` steps."""

    def __init__(self, model: GPT, decay: float) -> None:
        self.decay = decay
        # GPT has no buffers; use_buffers=False averages the parameters only
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        self.model = self.averaged.module

    def update(self, live: GPT) -> None:
        self.averaged.update_parameters(live)


class ScheduleFreeRun:
    """Schedule-free AdamW from the same initialisation: same betas, weight-decay groups and
    warmup length as the AdamW run; evaluated at its averaged point ``x`` (``opt.eval()``)."""

    def __init__(self, init: GPT, *, lr: float, betas, weight_decay: float, warmup: int) -> None:
        try:
            from schedulefree import AdamWScheduleFree
        except ImportError:
            raise ImportError("schedule-free baselines need schedulefree: pip install 'wsm-optim[demo]' "
                              "(or --sf-lr-factors none)") from None
        self.model = copy.deepcopy(init)
        groups = param_groups(self.model)
        groups[0]["weight_decay"] = weight_decay
        for g in groups:
            g.pop("param_names")
        self.opt = AdamWScheduleFree(groups, lr=lr, betas=betas, warmup_steps=warmup)
        self.opt.train()
        self.diverged_at: int | None = None

    def train_step(self, step: int, batch) -> float:
        if self.diverged_at is not None:
            return math.nan
        loss = train_step(self.model, self.opt, batch, None)
        if not math.isfinite(loss):
            self.diverged_at = step + 1  # reported as such; the comparison goes on without it
        return loss

    def evaluate(self, evaluate) -> float:
        if self.diverged_at is not None:
            return math.nan
        self.opt.eval()  # swap in the averaged weights x
        try:
            return evaluate(self.model)
        finally:
            self.opt.train()


class CosineRun:
    """AdamW from the same initialisation with ``lr * multipliers[step]``."""

    def __init__(self, init: GPT, multipliers: np.ndarray, *, lr: float, betas, weight_decay: float) -> None:
        self.model = copy.deepcopy(init)
        self.opt = adamw(self.model, lr, betas, weight_decay)
        self.lr, self.multipliers = lr, multipliers

    def train_step(self, step: int, batch) -> float:
        return train_step(self.model, self.opt, batch, self.lr * float(self.multipliers[step]))
