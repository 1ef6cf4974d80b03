"""The demo's training pass: one constant-LR run wrapped in ``WSMOptimizer`` plus its baselines.

All runs see the same batch at the same step and are evaluated on one fixed
set of validation batches at ``Config.eval_steps``. Merged models are read
with ``wsm_optim.evaluate_merges`` (each merge swapped into the live model,
the live weights restored exactly), so at a window's end the score is that of
the exact merge of the window's checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .. import WSMOptimizer, evaluate_merges
from ..common.progress import Progress
from .baselines import CosineRun, EMAWeights, ScheduleFreeRun, WSDBranch, adamw, train_step
from .config import BETAS, WEIGHT_DECAY, Config, UsageError, lr_multipliers
from .data import Corpus
from .model import GPT, GPTConfig


class Batches:
    """Deterministic batches: ``train(step)`` is the same for every run at that step;
    ``val`` is one fixed list of ``(x, y)`` int64 pairs of shape ``(batch, block)``."""

    def __init__(self, corpus: Corpus, cfg: Config) -> None:
        self.cfg = cfg
        self.train_ids = torch.from_numpy(corpus.train)
        val_ids = torch.from_numpy(corpus.val)
        rng = np.random.default_rng([cfg.seed, 2])
        self.val = [self._take(val_ids, rng.integers(0, len(val_ids) - cfg.block_size, cfg.batch_size))
                    for _ in range(cfg.eval_batches)]

    def _take(self, ids: torch.Tensor, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(starts)[:, None] + torch.arange(self.cfg.block_size + 1)
        seq = ids[idx].to(self.cfg.device)
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()

    def train(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.cfg.seed, 1, step])
        return self._take(self.train_ids, rng.integers(0, len(self.train_ids) - self.cfg.block_size,
                                                       self.cfg.batch_size))


@torch.no_grad()
def evaluate(model: GPT, batches: Batches) -> float:
    """Mean validation loss (nats per character) over the fixed validation batches."""
    return float(np.mean([model.loss(x, y).item() for x, y in batches.val]))


def model_config(cfg: Config, corpus: Corpus) -> GPTConfig:
    return GPTConfig(corpus.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd)


def train(cfg: Config, corpus: Corpus, progress: bool | None, progress_period: float = 30.0) -> dict[str, Any]:
    """Train everything in one pass; evaluate along the way.

    ``progress``: ``None`` shows a bar on a terminal and a line every
    ``progress_period`` seconds in a log or pipe (``wsm_optim.common.progress.Progress``,
    on stderr), ``True`` always shows, ``False`` never.

    Returns ``{"curves": {run: {"step": [...], "val_loss": [...]}}`` (runs that reach
    ``T``), ``"branch_curves"`` (WSD branches ending before ``T``), ``"final_scores"``
    (``evaluate_merges`` at ``T``: every merge, the live model and the best name), ``"post_hoc"``
    (:func:`choose_shape_after_training`),
    ``"train_loss"``, ``"lr_multipliers"``, ``"sf_diverged"`` ({run: step or None})}``.
    """
    torch.manual_seed(cfg.seed)
    batches = Batches(corpus, cfg)
    model = GPT(model_config(cfg, corpus)).to(cfg.device)
    mult = lr_multipliers(cfg)
    wsm = WSMOptimizer(adamw(model, cfg.lr, BETAS, WEIGHT_DECAY), merges={**cfg.merges, **cfg.post_hoc_merge})
    emas = {name: EMAWeights(model, b) for name, b in cfg.ema_names.items()}
    sfs = {name: ScheduleFreeRun(model, lr=cfg.lr * x, betas=BETAS, weight_decay=WEIGHT_DECAY, warmup=cfg.warmup)
           for name, x in cfg.sf_names.items()}
    cosine = (CosineRun(model, mult["cosine"], lr=cfg.lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
              if cfg.with_cosine else None)
    branches: dict[str, WSDBranch] = {}
    curves: dict[str, dict[str, list]] = {}
    branch_curves: dict[str, dict[str, list]] = {}
    train_loss: list[float] = []
    eval_steps = set(cfg.eval_steps)
    window_end_steps = cfg.window_end_steps
    final_scores = None

    def ev(m: GPT) -> float:
        return evaluate(m, batches)

    def record(name: str, step: int, value: float) -> None:
        target = branch_curves if name.startswith("wsd@") else curves
        target.setdefault(name, {"step": [], "val_loss": []})
        target[name]["step"].append(step)
        target[name]["val_loss"].append(value)

    def eval_all(done: int) -> None:
        nonlocal final_scores
        record("constant", done, ev(model))
        # before its first window is anchored a merge is the live model: nothing to score
        names = [n for n, spec in cfg.merges.items() if done >= spec["start"]]
        if names:
            scores = evaluate_merges(wsm, lambda: ev(model), merges=names,
                                     include_live=done == cfg.steps)
            for n in names:
                record(n, done, scores.scores[n])
            if done == cfg.steps:
                final_scores = dict(scores=scores.scores, best=scores.best, live=scores.live,
                                    live_wins=scores.live_wins, summary=scores.summary())
        for name, e in emas.items():
            record(name, done, ev(e.model))
        for name, sf in sfs.items():
            record(name, done, sf.evaluate(ev))
        for name, b in branches.items():
            record(name, done, ev(b.model))
        if cosine is not None:
            record("cosine", done, ev(cosine.model))

    def fork(done: int) -> None:
        for name, spec in cfg.branches.items():
            if spec["start"] == done:
                branches[name] = WSDBranch(model, wsm.inner, lr=cfg.lr, betas=BETAS, weight_decay=WEIGHT_DECAY,
                                           schedule=cfg.wsd_schedule, start=spec["start"], end=spec["end"])

    model.train()
    fork(0)
    eval_all(0)
    with Progress(cfg.steps, "training", "step", enabled=progress, period=progress_period) as bar:
        smooth = None
        for step in range(cfg.steps):
            batch = batches.train(step)
            loss = train_step(model, wsm, batch, cfg.lr * mult["constant"][step])
            if not math.isfinite(loss):
                raise UsageError(f"training diverged at step {step + 1} (loss {loss}); try a smaller --lr")
            for e in emas.values():
                e.update(model)
            for b in branches.values():
                b.train_step(step, batch)
            for sf in sfs.values():
                sf.train_step(step, batch)
            if cosine is not None:
                cosine.train_step(step, batch)
            train_loss.append(loss)
            done = step + 1
            fork(done)  # before the evaluation, so a branch's curve starts at its branch point
            if done in eval_steps:
                eval_all(done)
            elif done in window_end_steps:  # only the merges whose window just ended, and the live model
                record("constant", done, ev(model))
                ends = window_end_steps[done]
                for n, score in evaluate_merges(wsm, lambda: ev(model), merges=ends).scores.items():
                    record(n, done, score)
            for name in [n for n, b in branches.items() if b.end == done]:
                del branches[name]  # decayed to zero: done
            smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
            # loss: smoothed training loss; val: the live model's latest validation loss
            bar.update(1, loss=smooth, val=curves["constant"]["val_loss"][-1])
    for name in [*cfg.merges, *cfg.post_hoc_merge]:  # the windows were aligned to end at the last step
        status = wsm.merge_status(name)
        assert status["complete"], (name, status)
    post_hoc = choose_shape_after_training(cfg, wsm, lambda: ev(model), final_scores)
    return {"curves": curves, "branch_curves": branch_curves, "final_scores": final_scores, "post_hoc": post_hoc,
            "train_loss": train_loss, "lr_multipliers": {k: v.tolist() for k, v in mult.items()},
            "sf_diverged": {n: sf.diverged_at for n, sf in sfs.items()}}


def choose_shape_after_training(cfg, wsm: WSMOptimizer, evaluate, final_scores: dict) -> dict:
    """The moment merge of the last window read with each shape at ``T``, beside that shape's exact merge.

    Returns ``{"merge", "moments", "shapes": {shape: {"post_hoc", "exact", "bound"}}, "best"}``:
    validation losses of the shape chosen after training and of the merge tracked for it from the start,
    and the reconstruction's error bound (``WSMOptimizer.shape_fit``).
    """
    (name, spec), = cfg.post_hoc_merge.items()
    scores = evaluate_merges(wsm, evaluate, merges=[name], shapes=cfg.post_hoc_shapes)
    ref = cfg.ablation_window
    shapes = {s: dict(post_hoc=scores.scores[f"{name}:{s}"], exact=final_scores["scores"][f"{s}-{ref}"],
                      bound=wsm.shape_fit(s, merge=name).error) for s in cfg.post_hoc_shapes}
    return dict(merge=name, moments=spec["moments"], shapes=shapes, best=scores.best.split(":", 1)[1])
