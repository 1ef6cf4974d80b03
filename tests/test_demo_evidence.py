"""The demo's evidence: EMA, schedule-free and WSD-branch baselines, branch points, ablation merges,
its outputs (results.json, plots, report) and the verdicts for wins and losses. All tiny and fast."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from wsm_optim import cli
from wsm_optim import schedules as S
from wsm_optim.demo import baselines, report
from wsm_optim.demo.model import GPT, GPTConfig

from test_demo import PNG_MAGIC, TINY, _main, small_text  # noqa: F401  (small_text is a fixture)


def _cfg(*argv: str):
    from wsm_optim.demo import build_config

    return build_config(cli.build_parser().parse_args(["demo", *argv]))


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))


def _batch(step: int):
    x = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(step))
    return x, torch.roll(x, -1, dims=1)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- baselines
def test_ema_weights_follow_the_ema_recursion():
    model = _model()
    opt = baselines.adamw(model, 1e-2, (0.9, 0.95), 0.1)
    ema = baselines.EMAWeights(model, 0.8)
    ref = None
    for step in range(6):
        baselines.train_step(model, opt, _batch(step), 1e-2)
        ema.update(model)
        live = {n: p.double() for n, p in _params(model).items()}
        # the first update copies the live weights; then ema <- 0.8 ema + 0.2 live
        ref = live if ref is None else {n: 0.8 * ref[n] + 0.2 * live[n] for n in live}
    for n, p in ema.model.named_parameters():
        torch.testing.assert_close(p.detach().double(), ref[n], rtol=1e-5, atol=1e-6, msg=n)
        assert p.data_ptr() != dict(model.named_parameters())[n].data_ptr()
    assert any(not torch.equal(p, q) for p, q in zip(ema.model.parameters(), model.parameters()))


def test_schedule_free_is_evaluated_at_its_average_and_trains_on():
    init = _model()
    start = _params(init)
    sf = baselines.ScheduleFreeRun(init, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, warmup=2)
    for n, p in sf.model.named_parameters():  # same initialisation, own tensors
        assert torch.equal(p, start[n]) and p.data_ptr() != dict(init.named_parameters())[n].data_ptr()
    for step in range(5):
        assert math.isfinite(sf.train_step(step, _batch(step)))
    y = _params(sf.model)
    seen = {}

    def evaluate(m):
        seen.update(_params(m))
        return 1.25

    assert sf.evaluate(evaluate) == 1.25
    assert any(not torch.allclose(seen[n], y[n]) for n in y)  # the averaged point x, not y
    for n, p in sf.model.named_parameters():  # back in train mode at y
        torch.testing.assert_close(p.detach(), y[n], rtol=1e-5, atol=1e-6)
    assert all(g["train_mode"] for g in sf.opt.param_groups)
    assert torch.equal(next(init.parameters()), next(iter(start.values())))  # init untouched


def test_schedule_free_divergence_is_reported_not_fatal():
    sf = baselines.ScheduleFreeRun(_model(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, warmup=0)
    with torch.no_grad():
        next(sf.model.parameters()).fill_(float("inf"))
    assert math.isnan(sf.train_step(3, _batch(3)))
    assert sf.diverged_at == 4 and math.isnan(sf.evaluate(lambda m: 1.0))
    table = [dict(run="constant", kind="constant", val_loss=2.0), dict(run="m", kind="merge", val_loss=1.9),
             dict(run="sf_x1", kind="schedule-free", val_loss=math.nan), dict(run="wsd", kind="wsd", val_loss=1.95)]
    a = report.answer_alternatives(table)
    assert a["vs"]["schedule-free"]["run"] is None
    assert "  schedule-free AdamW: every run diverged" in report.format_answer_alternatives(a)


@pytest.mark.parametrize("schedule", ["linear", "1-sqrt"])
def test_wsd_branch_forks_state_and_decays_the_lr(schedule):
    model = _model()
    opt = baselines.adamw(model, 1e-2, (0.9, 0.95), 0.1)
    for step in range(3):
        baselines.train_step(model, opt, _batch(step), 1e-2)
    live_before = _params(model)
    branch = baselines.WSDBranch(model, opt, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1,
                                 schedule=schedule, start=3, end=7)
    for (n, p), q in zip(branch.model.named_parameters(), model.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n
    for p, q in zip(branch.opt.param_groups[0]["params"], opt.param_groups[0]["params"]):
        a, b = branch.opt.state[p], opt.state[q]
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and a["exp_avg"].data_ptr() != b["exp_avg"].data_ptr()
    w = S.decay_weights(schedule, 4)
    for i, step in enumerate(range(3, 7)):
        branch.train_step(step, _batch(step))
        assert branch.opt.param_groups[0]["lr"] == pytest.approx(1e-2 * w[i])
    assert all(torch.equal(p, live_before[n]) for n, p in model.named_parameters())  # live untouched


# ---------------------------------------------------------------- planning
@pytest.mark.parametrize("preset", ["quick", "default", "study", "gpu"])
def test_presets_plan_exact_branch_comparisons(preset):
    cfg = _cfg("--preset", preset, "--device", "cpu")  # gpu: the config must be valid without a GPU
    T, D = cfg.steps, cfg.decay
    assert cfg.branch_ends == [T // 2, 3 * T // 4, T]
    assert list(cfg.branches) == [f"wsd@{T // 2}", f"wsd@{3 * T // 4}", "wsd"]
    tracker_ends = cfg.window_ends(cfg.tracker)
    assert cfg.merges[cfg.tracker] == dict(schedule="linear", window=D, interval=1,
                                           start=cfg.merges[cfg.tracker]["start"])
    for b in cfg.branches.values():
        # the tracker's window ending at the branch end starts at the branch point
        assert b["end"] in tracker_ends and b["start"] == b["end"] - D >= cfg.warmup
        assert b["start"] in cfg.eval_steps and b["end"] in cfg.eval_steps
    for name, spec in cfg.merges.items():
        assert spec["window"] % spec["interval"] == 0 and spec["start"] >= cfg.warmup
        assert cfg.window_ends(name)[-1] == T, name
    ref = cfg.ablation_window
    assert len(cfg.windows) >= 3 and ref == max(cfg.windows)
    assert {m["schedule"] for m in cfg.merges.values() if m["window"] == ref} >= set(S.SHAPES) - {"mean"}
    assert sorted(ref // m["interval"] for m in cfg.merges.values()
                  if m["window"] == ref and m["schedule"] == "linear") == [1, 2, 4, 8, 16, ref]
    ages = sorted(b / (1 - b) for b in cfg.ema_decays)  # EMA mean ages span the windows' (W/2)
    assert len(ages) >= 3 and ages[0] <= min(cfg.windows) / 2 and ages[-1] >= max(cfg.windows) / 2 - 1.5
    assert cfg.sf_lr_factors == [1.0, 3.0]
    assert set(cfg.window_end_steps[T]) == set(cfg.merges)


def test_branch_points_round_to_the_tracker_windows():
    cfg = _cfg("--quick", "--steps", "100", "--warmup", "5", "--decay", "30", "--windows", "10,20",
               "--branch-at", "0.2,0.5")
    # 0.2 and 0.5 round to T - m * D with the branch starting after warmup: only 40 fits, plus T
    assert cfg.branch_ends == [40, 100] and list(cfg.branches) == ["wsd@40", "wsd"]
    assert cfg.tracker == "linear-30" and 40 in cfg.window_ends("linear-30")


# ---------------------------------------------------------------- outputs
@pytest.fixture(scope="module")
def tiny(small_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    rc, stdout, stderr = _main(["demo", *TINY, "--data", str(small_text), "--out", str(out)])
    assert rc == 0, stderr
    return stdout, out, json.loads((out / "results.json").read_text())


def test_outputs_files_and_keys(tiny):
    stdout, out, res = tiny
    for png in ("loss.png", "ablations.png", "weights.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, png
    assert set(res) >= {"config", "command", "corpus", "table", "verdict", "branches", "answers", "answer_lines",
                        "final_merge_scores", "curves", "branch_curves", "train_loss", "merge_weights",
                        "runtime_s", "load_before", "load_after", "device_name", "n_params", "passes"}
    assert set(res["answers"]) == {"along", "alternatives", "ablations"}
    kinds = {r["kind"] for r in res["table"]}
    assert kinds == {"constant", "merge", "ema", "schedule-free", "wsd", "cosine"}
    md = (out / "report.md").read_text()
    for part in ("## 1.", "## 2.", "## 3.", "](loss.png)", "](ablations.png)", res["command"]):
        assert part in md, part
    assert res["command"].startswith("wsm-optim demo --quick") and "--windows 10,15" in res["command"]
    for r in res["table"]:
        assert f"| {r['label']} | {r['val_loss']:.4f} |" in md
    for key in ("along", "alternatives", "ablations"):
        assert res["answer_lines"][key][0] in stdout and res["answer_lines"][key][0] in md


def test_branch_rows_are_read_at_the_branch_ends(tiny):
    _, _, res = tiny
    curves, branch_curves = res["curves"], res["branch_curves"]
    live = dict(zip(curves["constant"]["step"], curves["constant"]["val_loss"]))
    tracker = res["config"]["tracker"]
    assert [r["end"] for r in res["branches"]] == [20, 30, 40]
    for row in res["branches"]:
        curve = curves["wsd"] if row["branch"] == "wsd" else branch_curves[row["branch"]]
        assert curve["step"][0] == row["start"] and curve["val_loss"][0] == live[row["start"]]  # forked there
        assert curve["step"][-1] == row["end"] and row["wsd"] == curve["val_loss"][-1]
        merged = dict(zip(curves[tracker]["step"], curves[tracker]["val_loss"]))
        assert row["merge"] == merged[row["end"]] and row["live"] == live[row["end"]]
        for name in row["ema"]:
            assert row["ema"][name] == dict(zip(curves[name]["step"], curves[name]["val_loss"]))[row["end"]]
        assert row["relative_difference"] == pytest.approx((row["merge"] - row["wsd"]) / row["wsd"])
    # EMA and schedule-free start from the same initialisation as the live run
    for name in [r["run"] for r in res["table"] if r["kind"] in ("ema", "schedule-free")]:
        assert curves[name]["step"][0] == 0 and curves[name]["val_loss"][0] == pytest.approx(live[0], abs=1e-5)
        assert curves[name]["val_loss"][-1] != live[40]


def test_final_scores_come_from_evaluate_merges(tiny):
    _, _, res = tiny
    final = res["final_merge_scores"]
    assert list(final["scores"]) == list(res["config"]["merges"])
    for name, score in final["scores"].items():
        assert score == res["curves"][name]["val_loss"][-1]
    assert final["best"] == min(final["scores"], key=final["scores"].get)
    assert final["live"] == res["curves"]["constant"]["val_loss"][-1]
    assert final["live_wins"] == (final["live"] < final["scores"][final["best"]])
    assert final["summary"].startswith(f"best merge {final['best']!r}: ")
    abl = res["answers"]["ablations"]
    assert [r["window"] for r in abl["windows"]] == [10, 15]
    assert [(r["updates"], r["interval"]) for r in abl["counts"]] == [(15, 1), (1, 15)]
    assert {r["shape"] for r in abl["shapes"]} == {"linear", "1-sqrt", "cosine", "ema", "inv-sqrt"}
    assert len(res["merge_weights"]["linear-15-k1"]) == 2  # k = 1 update: two checkpoints


# ---------------------------------------------------------------- verdicts
def _rows(merges, wsds):
    return [dict(branch=f"wsd@{e}", start=e - 10, end=e, fraction=e / 40, wsd=w, merge=m, merge_name="linear-10",
                 live=2.5, ema={"ema_0.8": 2.4}, schedule_free={"sf_x1": 2.45},
                 **dict(zip(("relative_difference", "outcome"), report.outcome(m, w))))
            for e, m, w in zip((20, 30, 40), merges, wsds)]


@pytest.mark.parametrize("merges, wsds, phrase, summary", [
    ((2.00, 1.90, 1.80), (2.10, 2.00, 1.90), "WSM beat WSD (-4.76%)", "matched WSD at 0 of 3 points, beat it at 3"),
    ((2.10, 2.00, 1.90), (2.00, 1.90, 1.80), "WSM lost to WSD (+5.00%)", "beat it at 0, lost at 3"),
    ((2.001, 1.90, 1.80), (2.00, 2.00, 1.70), "WSM matched WSD (+0.05%)", "matched WSD at 1 of 3 points, beat it at 1, lost at 1"),
])
def test_along_the_run_verdicts(merges, wsds, phrase, summary):
    cfg = _cfg(*TINY)
    rows = _rows(merges, wsds)
    lines = report.format_answer_along(cfg, report.answer_along(cfg, rows), rows)
    assert lines[0].startswith("Q1 along the run: WSM linear-10 vs WSD (1-sqrt decay over 10 steps)")
    assert phrase in lines[1] and summary in lines[-1]
    table = report.format_branch_table(rows)
    assert len(table.splitlines()) == 2 + len(rows)


def _table(merge, wsd, ema, sf):
    return [dict(run="constant", kind="constant", val_loss=2.3), dict(run="linear-10", kind="merge", val_loss=merge + 0.1),
            dict(run="linear-15", kind="merge", val_loss=merge), dict(run="ema_0.8", kind="ema", val_loss=ema),
            dict(run="sf_x1", kind="schedule-free", val_loss=sf), dict(run="wsd", kind="wsd", val_loss=wsd)]


@pytest.mark.parametrize("merge, wsd, ema, sf, expect, winner", [
    (2.0, 2.1, 2.2, 2.3, {"wsd": "beat", "ema": "beat", "schedule-free": "beat"}, "linear-15"),
    (2.0, 1.9, 2.005, 1.5, {"wsd": "lost to", "ema": "matched", "schedule-free": "lost to"}, "sf_x1"),
])
def test_alternatives_verdicts(merge, wsd, ema, sf, expect, winner):
    a = report.answer_alternatives(_table(merge, wsd, ema, sf))
    assert a["best_merge"] == "linear-15" and a["candidates"] == 2 and a["winner"] == winner
    lines = report.format_answer_alternatives(a)
    for kind, result in expect.items():
        v = a["vs"][kind]
        assert v["outcome"] == result
        assert v["relative_difference"] == pytest.approx((merge - v["val_loss"]) / v["val_loss"])
        assert any(f"WSM {result} it ({100 * v['relative_difference']:+.2f}%)" in ln for ln in lines), lines
    assert lines[-1].startswith(f"  -> lowest val loss: {winner}")


@pytest.mark.parametrize("losses, regime", [((1.9, 1.8, 1.7), "long"), ((1.7, 1.8, 1.9), "fast"),
                                            ((1.8, 1.7, 1.9), "intermediate")])
def test_ablation_regime_reading(losses, regime):
    cfg = _cfg(*TINY, "--windows", "5,10,15")
    final = dict(zip((f"linear-{w}" for w in (5, 10, 15)), losses))
    final.update({n: 2.0 for n in cfg.merges if n not in final})
    final.update({n: 2.0 for n in cfg.ema_names}, constant=2.1)
    table = [dict(run=n, val_loss=v) for n, v in final.items()]
    curves = {"constant": {"step": [0, 20, 25, 40], "val_loss": [4.0, 2.5, 2.3, 2.1]}}
    a = report.ablations(cfg, table, curves)
    assert a["regime"] == regime and a["best_window"] == (5, 10, 15)[int(np.argmin(losses))]
    assert a["live_improvement_over_longest_window"] == pytest.approx(2.3 - 2.1)  # from step 25 = 40 - 15
    lines = report.format_answer_ablations(a)
    assert report.REGIME_TEXT[regime].format(w=a["best_window"]) in lines[2]
    assert a["windows_within_tolerance"] == [w for w, v in zip((5, 10, 15), losses) if v <= min(losses) * 1.005]


def test_figures_and_report_can_be_redrawn_from_results(tiny, tmp_path):
    from wsm_optim.demo import main as demo

    _, out, res = tiny
    cfg = demo.config_from_results(res)
    assert cfg == demo.build_config(cli.build_parser().parse_args(["demo", *TINY]))
    (tmp_path / "results.json").write_text((out / "results.json").read_text())
    demo.redraw(tmp_path)
    assert (tmp_path / "report.md").read_text() == (out / "report.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text()) == res
    assert all((tmp_path / f).read_bytes()[:8] == PNG_MAGIC for f in ("loss.png", "ablations.png", "weights.png"))


# ---------------------------------------------------------------- figures read at a glance
def test_loss_figure_colours_only_the_comparison(tiny, tmp_path):
    """Left: WSM's tracker (blue) against every WSD branch (red) with the live run (black), nothing
    else; right: the best merge and WSD in colour, each other family's best in grey."""
    from matplotlib.colors import to_rgba

    from wsm_optim.demo import main as demo, plots

    _, _, res = tiny
    cfg = demo.config_from_results(res)
    fig = plots.plot_loss(cfg, res["curves"], res["branch_curves"], tmp_path / "loss.png")
    left, right = fig.axes
    colour = {ln.get_label(): to_rgba(ln.get_color()) for ax in (left, right) for ln in ax.get_lines()
              if not ln.get_label().startswith("_")}
    assert [t.get_text() for t in left.get_legend().get_texts()] == [
        "constant LR (live model)", "WSD: LR decayed to 0 over D=10 steps",
        "WSM linear-10: merge of the last D steps"]
    assert colour["WSM linear-10: merge of the last D steps"] == to_rgba(plots.WSM)
    assert colour["WSD: LR decayed to 0 over D=10 steps"] == to_rgba(plots.WSD)
    # one labelled difference per branch end, read from the curves
    notes = [t.get_text() for t in left.texts]
    tracker = dict(zip(res["curves"]["linear-10"]["step"], res["curves"]["linear-10"]["val_loss"]))
    assert notes == [f"WSM {100 * (tracker[r['end']] - r['wsd']) / r['wsd']:+.2f}%\nvs WSD" for r in res["branches"]]
    best = res["verdict"]["best_merge"]
    labels = [t.get_text() for t in right.get_legend().get_texts()]
    assert labels[0] == "constant LR (live model)" and labels[-2:] == ["WSD (D=10)", f"best WSM merge ({best})"]
    assert len(labels) <= 6
    for label in labels[1:-2]:  # the other families: muted
        assert colour[label] == to_rgba(plots.MUTED), label


def test_ablation_figure_shows_percent_from_wsd_with_zero_on_every_axis(tiny, tmp_path):
    from wsm_optim.demo import main as demo, plots

    _, _, res = tiny
    cfg = demo.config_from_results(res)
    fig = plots.plot_ablations(cfg, res["answers"]["ablations"], res["table"], tmp_path / "ablations.png")
    wsd = res["verdict"]["wsd_val_loss"]
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert lo <= 0 <= hi and hi - lo < 100, (ax.get_title(), lo, hi)
    assert "vs WSD (%)" in fig.axes[0].get_ylabel()
    bars = fig.axes[2].patches
    shapes = res["answers"]["ablations"]["shapes"]
    assert len(bars) == len(shapes)
    for bar, row in zip(bars, shapes):
        assert bar.get_y() == 0 and bar.get_height() == pytest.approx(100 * (row["val_loss"] - wsd) / wsd)
    windows = fig.axes[0].get_lines()[0]
    assert list(windows.get_ydata()) == pytest.approx(
        [100 * (r["val_loss"] - wsd) / wsd for r in res["answers"]["ablations"]["windows"]])


def test_weights_figure_puts_merge_weights_on_a_log_scale(tiny, tmp_path):
    """inv-sqrt puts ~30% of a window's weight on its last checkpoint: on a linear axis every other
    merge's weights (0.06% each for a 1600-step linear window) lie flat on zero."""
    from wsm_optim.demo import main as demo, plots

    _, _, res = tiny
    fig = plots.plot_weights(demo.config_from_results(res), res["lr_multipliers"], tmp_path / "weights.png")
    coefficients, decays = fig.axes
    assert coefficients.get_yscale() == "log" and decays.get_yscale() == "linear"
    lo, hi = coefficients.get_ylim()
    smallest = min(min(c) for c in res["merge_weights"].values() if min(c) > 0)
    assert lo <= max(smallest, 1e-5) and hi >= max(max(c) for c in res["merge_weights"].values())
