#!/usr/bin/env python
"""OLMo-core's ``ModelMergeCallback`` against ``WSMMergeCallback`` on the same small ``Trainer`` run.

Needs ai2-olmo-core 3.0.0 (``pip install "wsm-optim[olmo-core]"``, or the test
virtualenv ``~/.cache/wsm-optim-tests/olmo-core-3.0.0``)::

    python bench/bench_olmo_core.py --threads 2

Each run is its own process (for its peak RSS) on CPU: a llama-like model
(``--layers``, ``--d-model``, ``--vocab``), AdamW, random tokens, ``--steps``
steps, an LM evaluator. Three runs: no merge, ``ModelMergeCallback`` (the
average of the last ``--window`` steps before every ``--window``-th step, the
merged model saved and evaluated) and ``WSMMergeCallback`` (a 1-sqrt merge of
``--window``-step windows, saved and evaluated at the same steps). Printed per run:

* step time: median over the steps without a merge save, and the mean over all
  steps (saves and merged evaluations included), each as a ratio to the run
  without merging;
* bytes per param held by the merge between saves (its tensors, counted), and
  the peak RSS over the run without merging, per param;
* resume: the run stopped at a checkpoint in the middle of a window and
  resumed; whether the merge of that window is still written, and whether it
  equals the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

VARIANTS = ("none", "model_merge", "wsm")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--window", type=int, default=10, help="steps per merge (both callbacks)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs per variant, alternating (the best is kept)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: variant:folder:stop
    return ap.parse_args()


# ------------------------------------------------------------ one run (child)
def child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, NumpyPaddedFSLDatasetConfig, TokenizerConfig
    from olmo_core.nn.transformer import TransformerConfig
    from olmo_core.optim import AdamWConfig
    from olmo_core.train import Duration, TrainerConfig
    from olmo_core.train.callbacks import Callback, CheckpointerCallback, LMEvaluatorCallbackConfig, ModelMergeCallback
    from olmo_core.train.train_module import TransformerTrainModuleConfig

    from wsm_optim.integrations.olmo_core import WSMMergeCallback

    variant, folder, stop = args.run.split(":")
    folder, stop = Path(folder), int(stop)
    data = folder.parent / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if not (data / "train.npy").exists():
        rng.integers(1, args.vocab, args.seq * args.batch * (args.steps + 8)).astype(np.uint16).tofile(
            data / "train.npy")
        val = rng.integers(1, args.vocab, (16, args.seq))
        val[:, -1] = 0
        val.astype(np.uint16).tofile(data / "val.npy")
    tok = TokenizerConfig(vocab_size=args.vocab, eos_token_id=0, pad_token_id=0)

    @dataclass
    class Timer(Callback):
        priority: ClassVar[int] = 100  # first in pre_step; post_step is timed by the Stop callback below
        starts: dict = field(default_factory=dict)

        def pre_step(self, batch):
            self.starts[self.step] = time.perf_counter()

    @dataclass
    class Stop(Callback):
        priority: ClassVar[int] = -100  # last: the step's time includes every other callback
        times: dict = field(default_factory=dict)
        held: int = 0

        def post_step(self):
            self.times[self.step] = time.perf_counter() - self.trainer.callbacks["timer"].starts[self.step]
            merger = self.trainer.callbacks.get("merge")
            if isinstance(merger, ModelMergeCallback):  # its running sums, on the host
                held = sum(t.numel() * t.element_size() for acc in merger._accumulators.values()
                           for t in acc.values())
                self.held = max(self.held, held)

    torch.manual_seed(0)
    model = TransformerConfig.llama_like(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                                         n_heads=max(1, args.d_model // 64)).build(init_device="cpu")
    n_params = sum(p.numel() for p in model.parameters())
    train_module = TransformerTrainModuleConfig(
        rank_microbatch_size=args.batch * args.seq, max_sequence_length=args.seq,
        optim=AdamWConfig(lr=1e-3, foreach=True),
    ).build(model, device=torch.device("cpu"))
    dataset = NumpyFSLDatasetConfig(paths=[str(data / "train.npy")], sequence_length=args.seq, tokenizer=tok,
                                    work_dir=str(folder.parent / "work")).build()
    loader = NumpyDataLoaderConfig(global_batch_size=args.batch * args.seq, seed=0, num_workers=0).build(dataset)
    callbacks: dict[str, Any] = {
        "timer": Timer(), "stop": Stop(),
        # a permanent checkpoint in the middle of a window: where a resume starts
        "checkpointer": CheckpointerCallback(save_interval=args.window + args.window // 2,
                                             ephemeral_save_interval=None, save_async=False),
    }
    if variant == "model_merge":
        callbacks["merge"] = ModelMergeCallback(merge_interval=args.window, merge_last_n_steps=args.window,
                                                enabled=True)
    elif variant == "wsm":
        callbacks["merge"] = WSMMergeCallback(schedule="1-sqrt", window=args.window)
    config = TrainerConfig(save_folder=str(folder), work_dir=str(folder.parent / "work"),
                           max_duration=Duration.steps(stop), metrics_collect_interval=args.steps,
                           cancel_check_interval=10_000, callbacks=callbacks)
    config = config.with_callback("lm", LMEvaluatorCallbackConfig(
        eval_dataset=NumpyPaddedFSLDatasetConfig(paths=[str(data / "val.npy")], metadata=[{"label": "val"}],
                                                 sequence_length=args.seq, tokenizer=tok,
                                                 work_dir=str(folder.parent / "work")),
        eval_interval=10 * args.steps,  # only the merged evaluations run
    ))
    trainer = config.build(train_module, loader)
    trainer.fit()
    stop_cb = trainer.callbacks["stop"]
    held = stop_cb.held
    if variant == "wsm":  # the accumulators and window origins in the optimizer state
        sd = trainer.callbacks["merge"].optimizer.state_dict()["state"]
        held = sum(v.numel() * v.element_size() for entry in sd.values() for k, v in entry.items()
                   if k.startswith("wsm_") and isinstance(v, torch.Tensor))
    print("RESULT " + json.dumps({
        "times": stop_cb.times, "held": held, "n_params": n_params,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "merged": sorted(p.name for p in folder.glob("step*-merged")),
    }))


# ------------------------------------------------------------------- parent
def launch(args: argparse.Namespace, variant: str, folder: Path, stop: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--run", f"{variant}:{folder}:{stop}"]
    for name in ("steps", "window", "layers", "d_model", "vocab", "seq", "batch", "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{variant} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def same_checkpoint(a: Path, b: Path) -> bool:
    """Both folders' ``model_and_optim`` hold the same keys and bit-identical tensors."""
    import torch
    from olmo_core.distributed.checkpoint import get_checkpoint_metadata, load_keys

    x, y = (str(p / "model_and_optim") for p in (a, b))
    keys = sorted(get_checkpoint_metadata(x).state_dict_metadata)
    if keys != sorted(get_checkpoint_metadata(y).state_dict_metadata):
        return False
    return all(torch.equal(u, v) for u, v in zip(load_keys(x, keys), load_keys(y, keys)))


def main() -> None:
    args = parse()
    if args.run:
        child(args)
        return
    import torch

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-olmo-core-"))
    out.mkdir(parents=True, exist_ok=True)
    import importlib.metadata

    print(f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
          f"{args.threads} threads; torch {torch.__version__}, ai2-olmo-core {importlib.metadata.version('ai2-olmo-core')}")
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):  # alternating: the machine's load drifts
        for v in VARIANTS:
            runs[v].append(launch(args, v, out / f"{v}-{repeat}", args.steps))
    n = runs["none"][0]["n_params"]
    merge_steps = set(range(args.window, args.steps + 1, args.window))
    print(f"model: {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}: {n:,} params; "
          f"{args.steps} steps of {args.batch}x{args.seq} tokens; merges every {args.window} steps; "
          f"best of {args.repeats} runs each")

    def median_step(r: dict) -> float:  # steps without a merge save or a checkpoint, the first one left out
        ckpt = args.window + args.window // 2
        t = {int(k): v for k, v in r["times"].items()}
        return statistics.median(v for k, v in t.items() if k > 1 and k not in merge_steps and k % ckpt)

    def merge_step(r: dict) -> float:
        return statistics.mean(v for k, v in r["times"].items() if int(k) in merge_steps)

    best = {v: min(median_step(r) for r in runs[v]) for v in VARIANTS}
    rss = {v: min(r["peak_rss"] for r in runs[v]) for v in VARIANTS}
    resume_stop = args.window + args.window // 2
    last_resumed = f"step{2 * args.window}-merged"
    print(f"\n| run | step time, median | ratio to no merge | merge step (save + eval), mean | merge held, "
          f"bytes/param | peak RSS over no merge, bytes/param | resume from step {resume_stop} (mid-window) |")
    print("|---|---|---|---|---|---|---|")
    for variant in VARIANTS:
        r = runs[variant][0]
        if variant == "none":
            resume, save = "-", "-"
        else:
            save = f"{min(merge_step(x) for x in runs[variant]) * 1e3:.0f} ms"
            launch(args, variant, out / f"{variant}-resumed", resume_stop)
            resumed = launch(args, variant, out / f"{variant}-resumed", args.steps)
            if last_resumed not in resumed["merged"]:
                resume = f"{last_resumed} not written (merge skipped)"
            else:
                exact = same_checkpoint(out / f"{variant}-0" / last_resumed, out / f"{variant}-resumed" / last_resumed)
                resume = f"{last_resumed} written, " + ("bit-identical to the uninterrupted run" if exact
                                                         else "DIFFERS from the uninterrupted run")
        print(f"| {variant} | {best[variant] * 1e3:.1f} ms | {best[variant] / best['none']:.3f} | {save} | "
              f"{r['held'] / n:.2f} | {(rss[variant] - rss['none']) / n:.2f} | {resume} |")
    results = {v: runs[v][0] for v in VARIANTS}
    print("\nper run (in launch order per repeat): median step / mean merge step / peak RSS")
    for v in VARIANTS:
        print(f"  {v}: " + "; ".join(
            f"{median_step(x) * 1e3:.1f} ms / " + (f"{merge_step(x) * 1e3:.0f} ms" if v != "none" else "-")
            + f" / {x['peak_rss'] / 2**20:.0f} MiB" for x in runs[v]))
    print(f"\nmerged checkpoints: " + "; ".join(f"{v}: {results[v]['merged']}" for v in VARIANTS[1:]))
    print(f"runs in {out}")


if __name__ == "__main__":
    main()
