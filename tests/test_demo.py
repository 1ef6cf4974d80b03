"""``wsm-optim demo``: argument parsing, bad input, a tiny deterministic run and ``--quick`` end to end."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import wsm_optim
from wsm_optim import cli
from wsm_optim.demo import main as demo
from wsm_optim.demo import timing
from wsm_optim import schedules as S
from wsm_optim.demo.data import split_corpus, strip_markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _main(argv: list[str]) -> tuple[int, str, str]:
    """``cli.main(argv)`` with stdout/stderr captured (usable in module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def _text(n_chars: int, seed: int = 0) -> str:
    """Pseudo-English made of a few words: learnable, so the loss must fall."""
    words = "the king and queen of a fair land speak to thee with love and fear".split()
    rng = np.random.default_rng(seed)
    out, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(words, size=rng.integers(4, 10))) + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(_text(30_000), encoding="utf-8")
    return path


# a run of a few seconds: tiny model from the quick preset, 40 steps on a 30 kB file. Every merge's
# first window is anchored after step 10 and the WSD branch starts after step 30: both are evaluated.
TINY = ["--quick", "--steps", "40", "--warmup", "10", "--windows", "10,15", "--decay", "10",
        "--block-size", "16", "--batch-size", "8", "--eval-every", "5", "--eval-batches", "2", "--with-cosine",
        "--no-progress"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``demo --quick`` once per test run (about 30-60 s on 2 cores)."""
    out = tmp_path_factory.mktemp("quick")
    rc, stdout, stderr = _main(["demo", "--quick", "--out", str(out), "--no-progress"])
    return rc, stdout, stderr, out


# ---------------------------------------------------------------- parsing
def test_parser_defaults_and_presets():
    parser = cli.build_parser()
    args = parser.parse_args(["demo"])
    assert (args.preset, args.out, args.data, args.with_cosine) == ("default", "wsm-demo-out", None, False)
    assert parser.parse_args(["demo", "--quick"]).preset == "quick"
    args = parser.parse_args(["demo", "--preset", "gpu", "--device", "cuda", "--with-cosine", "--steps", "7"])
    assert (args.preset, args.device, args.with_cosine, args.steps) == ("gpu", "cuda", True, 7)


def test_default_config_compares_at_least_three_windows_and_three_shapes():
    cfg = demo.build_config(cli.build_parser().parse_args(["demo"]))
    assert cfg.device == "cpu" and cfg.steps == 1280 and cfg.decay == 160
    merges = cfg.merges
    linear = sorted(m["window"] for m in merges.values() if m["schedule"] == "linear")
    assert len(linear) >= 3
    longest = max(linear)
    shapes_at_longest = {m["schedule"] for m in merges.values() if m["window"] == longest}
    assert shapes_at_longest >= {"linear", "1-sqrt", "cosine"}
    for m in merges.values():
        # windows tumble from `start` and the last one ends exactly at the last step, after warmup
        assert m["start"] >= cfg.warmup and (cfg.steps - m["start"]) % m["window"] == 0


def test_lr_multipliers():
    cfg = demo.build_config(cli.build_parser().parse_args(["demo", *TINY, "--wsd-schedule", "linear"]))
    mult = demo.lr_multipliers(cfg)
    T, D, warm = cfg.steps, cfg.decay, cfg.warmup
    np.testing.assert_allclose(mult["constant"][:warm], np.arange(1, warm + 1) / warm)
    assert np.all(mult["constant"][warm:] == 1.0)
    np.testing.assert_array_equal(mult["wsd"][: T - D], mult["constant"][: T - D])
    np.testing.assert_allclose(mult["wsd"][T - D :], 1 - np.arange(1, D + 1) / (D + 1))  # f(i / (D + 1))
    assert mult["cosine"][warm] == pytest.approx(1.0, abs=0.01) and mult["cosine"][-1] == pytest.approx(0.0)
    assert np.all(np.diff(mult["cosine"][warm:]) < 0)


@pytest.mark.parametrize(
    "merge, wsd, outcome",
    [(2.00, 2.05, "beat"), (2.00, 2.009, "matched"), (2.009, 2.00, "matched"), (2.05, 2.00, "lost to")],
)
def test_verdict(merge, wsd, outcome):
    table = [
        dict(run="constant", kind="constant", val_loss=2.2),
        dict(run="a", kind="merge", val_loss=merge + 0.3),
        dict(run="b", kind="merge", val_loss=merge),
        dict(run="wsd", kind="wsd", val_loss=wsd),
    ]
    v = demo.verdict(table)
    assert v["outcome"] == outcome and v["best_merge"] == "b"
    assert v["relative_difference"] == pytest.approx((merge - wsd) / wsd)
    assert f"WSM {outcome} WSD" in demo.format_verdict(v)[0]


def test_strip_markdown():
    md = ("# Hamlet\n\n## ACT I\n\n_Enter Ghost_\n\n**HORATIO**  \nStay! speak,  \n\\--speak!\n\n\n\n"
          "__\\[Aside]_  \n")
    assert strip_markdown(md) == (
        "Hamlet\n\nACT I\n\nEnter Ghost\n\nHORATIO:\nStay! speak,\n--speak!\n\n[Aside]\n"
    )


def test_split_is_disjoint_seeded_and_covers_text():
    text = _text(20_000)
    a, b, c = (split_corpus("t", text, 16, seed) for seed in (0, 0, 1))
    assert len(a.train) + len(a.val) == len(text)
    assert 0.05 < len(a.val) / len(text) < 0.15
    np.testing.assert_array_equal(a.val, b.val)
    assert not np.array_equal(a.val, c.val)
    assert "".join(a.chars[i] for i in a.train[:50]) in text


# ---------------------------------------------------------------- bad input
BAD_INPUT = [
    (["--data", "{missing}"], "--data: no such file"),
    (["--data", "{empty}"], "is empty"),
    (["--data", "{short}"], "too short"),
    (["--data", "{binary}"], "not UTF-8"),
    (["--steps", "100", "--windows", "500"], "--windows: window 500 is longer than the run"),
    (["--steps", "100", "--decay", "200"], "--decay: 200 steps is longer than the run"),
    (["--wsd-schedule", "exponential"], "unknown name 'exponential'"),
    (["--merge-schedules", "1-sqrt,wobbly"], "unknown name 'wobbly'"),
    (["--steps", "-5"], "--steps must be >= 1, got -5"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--steps", "50", "--warmup", "50"], "--warmup (50) must be less than --steps (50)"),
    (["--lr", "-0.1"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--block-size", "1"], "--block-size must be >= 2"),
    (["--eval-every", "0"], "--eval-every must be >= 1"),
    (["--eval-batches", "-2"], "--eval-batches must be >= 1"),
    (["--windows", "0,10"], "--windows: a window must be >= 1"),
    (["--windows", "ten"], "--windows: expected a comma-separated list"),
    (["--decay", "0"], "--decay must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--windows", "16", "--counts", "7"], "--counts: 7 does not divide the longest window (16 steps)"),
    (["--counts", "0"], "--counts: a count must be >= 1"),
    (["--branch-at", "0.5,1.5"], "--branch-at: fractions must be in (0, 1], got 1.5"),
    (["--ema-decays", "0.9,1.0"], "--ema-decays: each decay must be in [0, 1), got 1.0"),
    (["--sf-lr-factors", "0"], "--sf-lr-factors: each factor must be a finite number > 0"),
]


@pytest.mark.parametrize("argv, phrase", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(argv, phrase, tmp_path):
    files = {"missing": tmp_path / "nope.txt", "empty": tmp_path / "empty.txt",
             "short": tmp_path / "short.txt", "binary": tmp_path / "bin.txt"}
    files["empty"].write_text("  \n\n", encoding="utf-8")
    files["short"].write_text(_text(500), encoding="utf-8")
    files["binary"].write_bytes(b"abc\xff\xfe" * 100)
    argv = [a.format(**files) for a in argv]
    out_dir = tmp_path / "out"
    rc, stdout, stderr = _main(["demo", "--quick", "--out", str(out_dir), *argv])
    assert rc == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("wsm-optim demo: error:") and phrase in lines[0], lines[0]
    assert not out_dir.exists()  # rejected before any work


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is missing")
def test_cuda_requested_without_cuda():
    rc, _, stderr = _main(["demo", "--device", "cuda"])
    assert rc == 2 and "--device cuda: no CUDA device available" in stderr


def test_bad_input_via_subprocess_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(wsm_optim.__file__).resolve().parents[1]))
    for argv, phrase in [
        (["--data", str(tmp_path / "missing.txt")], "--data: no such file"),
        (["--steps", "-3"], "--steps must be >= 1"),
        (["--wsd-schedule", "bogus"], "unknown name 'bogus'"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "wsm_optim", "demo", *argv], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and phrase in proc.stderr


# ---------------------------------------------------------------- running
def test_tiny_run_is_deterministic(small_text, tmp_path):
    results = []
    for name in ("a", "b"):
        rc, stdout, stderr = _main(["demo", *TINY, "--data", str(small_text), "--out", str(tmp_path / name)])
        assert rc == 0, stderr
        results.append(json.loads((tmp_path / name / "results.json").read_text()))
    a, b = results
    assert a["table"] == b["table"] and a["curves"] == b["curves"] and a["train_loss"] == b["train_loss"]
    assert [r["run"] for r in a["table"]] == [
        "constant", "linear-10", "linear-15", "1-sqrt-15", "cosine-15", "ema-15", "inv-sqrt-15", "linear-15-k1",
        "ema_0.8", "ema_0.866667", "sf_x1", "sf_x3", "wsd", "cosine"]
    assert a["corpus"]["name"] == "small.txt"


def test_branches_do_not_disturb_the_constant_lr_run(small_text, tmp_path):
    """The WSD branch and the cosine run own their optimizer state: the main run and its merges
    come out bit-identical whatever D is and whether cosine runs."""
    curves = []
    for name, extra in [("a", []), ("b", ["--decay", "20", "--wsd-schedule", "linear"])]:
        argv = ["demo", *TINY, "--data", str(small_text), "--out", str(tmp_path / name), *extra]
        if extra:
            argv.remove("--with-cosine")
        rc, _, stderr = _main(argv)
        assert rc == 0, stderr
        curves.append(json.loads((tmp_path / name / "results.json").read_text())["curves"])
    a, b = curves
    for run in ["constant", "linear-10", "linear-15", "1-sqrt-15", "cosine-15"]:
        assert a[run] == b[run], run
    assert "cosine" in a and "cosine" not in b
    assert b["wsd"]["step"][0] == 20 and a["wsd"]["val_loss"][-1] != b["wsd"]["val_loss"][-1]


def test_merged_curves_are_merges_of_the_live_run(small_text, tmp_path):
    """At its anchor a merge equals the live model; WSD equals it at the branch point."""
    rc, _, stderr = _main(["demo", *TINY, "--data", str(small_text), "--out", str(tmp_path)])
    assert rc == 0, stderr
    res = json.loads((tmp_path / "results.json").read_text())
    live = dict(zip(res["curves"]["constant"]["step"], res["curves"]["constant"]["val_loss"]))
    for name, spec in res["config"]["merges"].items():
        curve = res["curves"][name]
        assert spec["start"] == 10 and curve["step"] == list(range(10, 45, 5)), (name, curve["step"])
        assert curve["val_loss"][0] == live[10]  # not anchored yet: the readout is the live model
        assert curve["val_loss"][1] != live[15]
    wsd = res["curves"]["wsd"]
    assert wsd["step"] == [30, 35, 40] and wsd["val_loss"][0] == live[30]
    assert wsd["val_loss"][1] != live[35]
    # the final values differ from the live model: the merges and the decay did something
    finals = {r["run"]: r["val_loss"] for r in res["table"]}
    assert all(finals[n] != finals["constant"] for n in finals if n != "constant")


def test_a_log_shows_the_expected_time_and_progress_lines(small_text, tmp_path):
    """Run with stdout and stderr going to files (not terminals), as `demo > log 2>&1` does: the
    expected time comes before training, progress lines (step, loss, val, elapsed) on stderr."""
    argv = [a for a in TINY if a != "--no-progress"]
    rc, stdout, stderr = _main(["demo", *argv, "--data", str(small_text), "--out", str(tmp_path)])
    assert rc == 0, stderr
    res = json.loads((tmp_path / "results.json").read_text())
    expected = [ln for ln in stdout.splitlines() if ln.startswith("expected time: about ")]
    assert len(expected) == 1 and "timed just now on this machine: 40 WSM steps x " in expected[0]
    lines = stdout.splitlines()
    assert lines.index(expected[0]) < lines.index(next(ln for ln in lines if ln.startswith("validation loss")))
    period = timing.progress_period(res["estimated_s"])
    assert f"progress: on stderr, every {period:.0f} s (a bar on a terminal)" in stdout
    progress = [ln for ln in stderr.splitlines() if ln.startswith("training: ")]
    assert progress, stderr
    assert re.fullmatch(r"training: 40/40 steps \(100%\), elapsed \d+:\d\d:\d\d, loss [\d.]+, val [\d.]+",
                        progress[-1]), progress[-1]
    assert f"val {res['curves']['constant']['val_loss'][-1]:.4g}" in progress[-1]
    assert "\r" not in stderr and "%|" not in stderr  # plain lines, no tqdm bar
    # the tip about threads appears exactly when the machine was busy at the start
    busy = res["load_before"] > timing.available_cores() and res["threads"] > 1
    assert ("--threads 1 is often faster here" in stdout) == busy
    assert res["estimated_s"] > 0 and f"(expected {res['estimated_s']:.0f} s for training" in stdout
    # the estimate counts exactly the evaluations the run made (one per recorded point)
    cfg = demo.config_from_results(res)
    recorded = sum(len(c["step"]) for c in [*res["curves"].values(), *res["branch_curves"].values()])
    assert timing.workload(cfg).val_batches == recorded * cfg.eval_batches
    assert timing.workload(cfg).baseline_steps == 40 * 3 + 3 * 10  # sf x1, x3, cosine; three 10-step branches


@pytest.mark.parametrize("load, cores, threads, busy", [(4.6, 2, 2, True), (2.0, 2, 2, False), (9.0, 2, 1, False),
                                                       (17.0, 16, 16, True)])
def test_busy_hint(load, cores, threads, busy):
    hint = timing.busy_hint(load, cores, threads)
    assert (hint is not None) == busy
    if busy:
        assert hint.startswith(f"note: this machine is busy (1-minute load average {load:.1f} on {cores} cores)")
        assert f"torch uses {threads} threads" in hint and "--threads 1 is often faster here" in hint


def test_progress_period_gives_about_twenty_lines_within_10_to_60_s():
    assert [timing.progress_period(s) for s in (5, 60, 220, 400, 1500, 7200)] == [10, 10, 10, 20, 60, 60]


def test_quick_end_to_end(quick_run):
    rc, stdout, stderr, out = quick_run
    assert rc == 0, stderr
    assert stderr.strip() == ""  # no library warnings, no progress bar with --no-progress
    for png in ("loss.png", "weights.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and 5_000 < len(data) < 400_000
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert cfg["preset"] == "quick"
    runs = [r["run"] for r in res["table"]]
    assert runs[0] == "constant" and runs[-1] == "wsd"
    assert len(runs) == 2 + len(cfg["merges"]) + len(cfg["ema_decays"]) + len(cfg["sf_lr_factors"])
    for row in res["table"]:
        assert math.isfinite(row["val_loss"])
        assert row["perplexity"] == pytest.approx(math.exp(row["val_loss"]))
        assert row["label"] in stdout
    for name, curve in res["curves"].items():
        assert len(curve["step"]) == len(curve["val_loss"]) >= 2, name
        assert all(math.isfinite(x) for x in curve["val_loss"]), name
        assert curve["step"] == sorted(curve["step"]) and curve["step"][-1] == cfg["steps"]
    live = res["curves"]["constant"]
    assert live["step"][0] == 0
    # at init the model predicts ~uniformly over the vocabulary: loss near ln(V)
    assert abs(live["val_loss"][0] - math.log(res["corpus"]["vocab_size"])) < 0.3
    assert live["val_loss"][-1] < live["val_loss"][0] - 1.0
    assert all(r["val_loss"] < live["val_loss"][0] - 1.0 for r in res["table"])
    assert len(res["train_loss"]) == cfg["steps"] and all(math.isfinite(x) for x in res["train_loss"])
    assert np.mean(res["train_loss"][-50:]) < np.mean(res["train_loss"][:50])
    for name, c in res["merge_weights"].items():
        spec = cfg["merges"][name]
        np.testing.assert_allclose(c, S.merge_coefficients(spec["schedule"], spec["window"] // spec["interval"]))
    v = res["verdict"]
    assert v == demo.verdict(res["table"])
    assert f"Result: WSM {v['outcome']} WSD" in stdout and v["best_merge"] in stdout
