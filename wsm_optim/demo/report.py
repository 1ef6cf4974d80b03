"""Tables and plain-language verdicts for the demo's three questions.

1. Along the run: does the merge of the ``D``-step window ending at a step
   match a WSD decay of ``D`` steps ending there (same start checkpoint)?
2. At the end: is the best merge better than WSD, EMA, schedule-free (and cosine)?
3. Ablations: which window length, checkpoint count and shape, and which regime
   (still improving fast, or the paper's long-window regime) the run is in.

Each comparison is ``(wsm - other) / other`` of the validation loss; within
``MATCH_TOLERANCE`` counts as a match. Every number comes from the run; the
verdict says "lost" when WSM lost.
"""

from __future__ import annotations

import math
from typing import Any

from .. import schedules
from .config import Config

#: |WSM - other| / other val loss at or below this counts as a match.
MATCH_TOLERANCE = 0.005

KIND_NAMES = {"merge": "WSM merge", "wsd": "WSD", "ema": "EMA of weights", "schedule-free": "schedule-free AdamW",
              "cosine": "cosine to zero", "constant": "constant LR (no merge)"}


def outcome(wsm: float, other: float) -> tuple[float, str]:
    """``(relative difference, "beat" | "matched" | "lost to")`` of WSM's loss against another's."""
    if not math.isfinite(other):
        return math.nan, "beat"  # the other run diverged
    rel = (wsm - other) / other
    return rel, "matched" if abs(rel) <= MATCH_TOLERANCE else ("beat" if rel < 0 else "lost to")


def merge_label(name: str, spec: dict[str, Any]) -> str:
    shape = schedules.schedule_name(spec["schedule"])
    interval = spec.get("interval", 1)
    if interval == 1:
        return f"WSM {shape} merge, window {spec['window']}"
    k = spec["window"] // interval
    return f"WSM {shape} merge, window {spec['window']}, {k} update{'s' if k > 1 else ''} (every {interval})"


def make_table(cfg: Config, curves: dict[str, dict[str, list]]) -> list[dict[str, Any]]:
    """Rows ``{run, kind, label, val_loss, perplexity}`` at the last step, in display order."""
    rows = [("constant", "constant", "constant LR (live model)")]
    rows += [(name, "merge", merge_label(name, spec)) for name, spec in cfg.merges.items()]
    rows += [(name, "ema", f"EMA of weights, decay {b:.6g} (mean age {b / (1 - b):.0f} steps)")
             for name, b in cfg.ema_names.items()]
    rows += [(name, "schedule-free", f"schedule-free AdamW, lr {x:g}x = {cfg.lr * x:g}")
             for name, x in cfg.sf_names.items()]
    rows.append(("wsd", "wsd", f"WSD, {cfg.wsd_schedule} decay over last {cfg.decay}"))
    if cfg.with_cosine:
        rows.append(("cosine", "cosine", f"cosine to zero over {cfg.steps}"))
    table = []
    for run_name, kind, label in rows:
        curve = curves[run_name]
        assert curve["step"][-1] == cfg.steps
        loss = curve["val_loss"][-1]
        table.append(dict(run=run_name, kind=kind, label=label, val_loss=loss,
                          perplexity=math.exp(loss) if math.isfinite(loss) else math.nan))
    return table


def verdict(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Best merge vs WSD: ``beat`` / ``matched`` (within ``MATCH_TOLERANCE`` of WSD's loss) / ``lost``."""
    by_run = {r["run"]: r for r in table}
    best = min((r for r in table if r["kind"] == "merge"), key=lambda r: r["val_loss"])
    wsd = by_run["wsd"]["val_loss"]
    rel, result = outcome(best["val_loss"], wsd)
    return dict(best_merge=best["run"], best_merge_val_loss=best["val_loss"], wsd_val_loss=wsd,
                relative_difference=rel, tolerance=MATCH_TOLERANCE, outcome=result,
                constant_val_loss=by_run["constant"]["val_loss"],
                cosine_val_loss=by_run["cosine"]["val_loss"] if "cosine" in by_run else None)


def format_table(table: list[dict[str, Any]]) -> str:
    width = max(len(r["label"]) for r in table)
    lines = [f"{'run':<{width}}  {'val loss':>8}  {'ppl':>6}", "-" * (width + 18)]
    lines += [f"{r['label']:<{width}}  {r['val_loss']:>8.4f}  {r['perplexity']:>6.3f}" for r in table]
    return "\n".join(lines)


def format_verdict(v: dict[str, Any]) -> list[str]:
    pct = 100 * v["relative_difference"]
    tol = 100 * v["tolerance"]
    best, wsd, const = v["best_merge_val_loss"], v["wsd_val_loss"], v["constant_val_loss"]
    lines = [
        f"Result: WSM {v['outcome']} WSD on this run.",
        f"  best merge {v['best_merge']}: val loss {best:.4f}; WSD: {wsd:.4f}; difference {pct:+.2f}%",
        f"  ('matched' means within {tol:.1f}% of WSD's val loss)",
        f"  constant LR, no merge: {const:.4f}; best merge {best - const:+.4f}, WSD {wsd - const:+.4f} nats",
    ]
    if v["cosine_val_loss"] is not None:
        cos = v["cosine_val_loss"]
        lines.append(f"  cosine to zero: {cos:.4f}; best merge {100 * (best / cos - 1):+.2f}% from it")
    return lines


def _at(curve: dict[str, list], step: int) -> float:
    return curve["val_loss"][curve["step"].index(step)]


# ---------------------------------------------------------------- question 1: along the run
def branch_table(cfg: Config, curves: dict, branch_curves: dict) -> list[dict[str, Any]]:
    """One row per WSD branch: at its end step, the branch, the tracker merge (the linear merge
    of the ``D`` steps since the branch point, i.e. the window that starts at the same
    checkpoint), the live model, every EMA and schedule-free run."""
    rows = []
    for name, spec in cfg.branches.items():
        e = spec["end"]
        wsd = _at((curves if name == "wsd" else branch_curves)[name], e)
        merge = _at(curves[cfg.tracker], e)
        rel, result = outcome(merge, wsd)
        rows.append(dict(
            branch=name, start=spec["start"], end=e, fraction=e / cfg.steps, wsd=wsd, merge=merge,
            merge_name=cfg.tracker, live=_at(curves["constant"], e),
            ema={n: _at(curves[n], e) for n in cfg.ema_names},
            schedule_free={n: _at(curves[n], e) for n in cfg.sf_names},
            relative_difference=rel, outcome=result,
        ))
    return rows


def format_branch_table(rows: list[dict[str, Any]]) -> str:
    has_ema = bool(rows and rows[0]["ema"])
    has_sf = bool(rows and rows[0]["schedule_free"])
    head = f"{'end step':>8}  {'live':>7}  {'WSD':>7}  {'WSM':>7}  {'WSM-WSD':>8}"
    head += f"  {'best EMA':>8}" if has_ema else ""
    head += f"  {'best SF':>7}" if has_sf else ""
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{r['end']:>8}  {r['live']:>7.4f}  {r['wsd']:>7.4f}  {r['merge']:>7.4f}  "
                f"{100 * r['relative_difference']:>+7.2f}%")
        line += f"  {min(r['ema'].values()):>8.4f}" if has_ema else ""
        line += f"  {_nanmin(r['schedule_free'].values()):>7.4f}" if has_sf else ""
        lines.append(line)
    return "\n".join(lines)


def _nanmin(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return min(finite) if finite else math.nan


def answer_along(cfg: Config, rows: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("beat", "matched", "lost to")}
    mean = sum(r["relative_difference"] for r in rows) / len(rows)
    return dict(points=[r["end"] for r in rows], counts=counts, mean_relative_difference=mean,
                worst_relative_difference=max(r["relative_difference"] for r in rows))


def format_answer_along(cfg: Config, a: dict[str, Any], rows) -> list[str]:
    n = len(rows)
    c = a["counts"]
    lines = [f"Q1 along the run: WSM {cfg.tracker} vs WSD ({cfg.wsd_schedule} decay over {cfg.decay} steps) "
             f"from the same checkpoint, at {n} points:"]
    for r in rows:
        lines.append(f"  step {r['end']} ({r['fraction']:.0%}): WSM {r['merge']:.4f}, WSD {r['wsd']:.4f}: "
                     f"WSM {r['outcome']} WSD ({100 * r['relative_difference']:+.2f}%)")
    lines.append(f"  -> WSM matched WSD at {c['matched']} of {n} points, beat it at {c['beat']}, lost at "
                 f"{c['lost to']}; mean difference {100 * a['mean_relative_difference']:+.2f}%")
    return lines


# ---------------------------------------------------------------- question 2: alternatives
def answer_alternatives(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Best of each family at ``T``; WSM's best merge against each family's best."""
    best: dict[str, dict[str, Any]] = {}
    sizes: dict[str, int] = {}
    for r in table:
        sizes[r["kind"]] = sizes.get(r["kind"], 0) + 1
        if not math.isfinite(r["val_loss"]):
            continue
        if r["kind"] not in best or r["val_loss"] < best[r["kind"]]["val_loss"]:
            best[r["kind"]] = r
    wsm = best["merge"]["val_loss"]
    vs = {}
    for kind, r in best.items():
        if kind != "merge":
            rel, result = outcome(wsm, r["val_loss"])
            vs[kind] = dict(run=r["run"], val_loss=r["val_loss"], relative_difference=rel, outcome=result,
                            candidates=sizes[kind])
    for kind in sizes:
        if kind not in best:  # every run of the family diverged
            vs[kind] = dict(run=None, val_loss=math.nan, relative_difference=math.nan, outcome="beat",
                            candidates=sizes[kind])
    winner = min(best.values(), key=lambda r: r["val_loss"])
    return dict(best_merge=best["merge"]["run"], best_merge_val_loss=wsm, candidates=sizes["merge"], vs=vs,
                winner=winner["run"], winner_kind=winner["kind"])


def format_answer_alternatives(a: dict[str, Any]) -> list[str]:
    lines = [f"Q2 against the alternatives at the last step (each family's best; WSM's best of "
             f"{a['candidates']} merges = {a['best_merge']}, {a['best_merge_val_loss']:.4f}):"]
    for kind, v in a["vs"].items():
        if v["run"] is None:
            lines.append(f"  {KIND_NAMES[kind]}: every run diverged")
            continue
        of = f" (best of {v['candidates']}: {v['run']})" if v["candidates"] > 1 else ""
        lines.append(f"  vs {KIND_NAMES[kind]}{of}: {v['val_loss']:.4f}: WSM {v['outcome']} it "
                     f"({100 * v['relative_difference']:+.2f}%)")
    lines.append(f"  -> lowest val loss: {a['winner']} ({KIND_NAMES[a['winner_kind']]})")
    return lines


# ---------------------------------------------------------------- question 3: ablations
def ablations(cfg: Config, table: list[dict[str, Any]], curves: dict) -> dict[str, Any]:
    """Window, count and shape ablations at ``T``, and a plain-language reading of the regime."""
    final = {r["run"]: r["val_loss"] for r in table}
    live = final["constant"]
    ref = cfg.ablation_window
    windows = [dict(window=w, run=f"linear-{w}", val_loss=final[f"linear-{w}"]) for w in cfg.windows]
    counts = [dict(updates=ref, interval=1, run=f"linear-{ref}", val_loss=final[f"linear-{ref}"])]
    counts += [dict(updates=k, interval=ref // k, run=f"linear-{ref}-k{k}", val_loss=final[f"linear-{ref}-k{k}"])
               for k in cfg.counts if k != ref]
    shapes = [dict(shape="linear", run=f"linear-{ref}", val_loss=final[f"linear-{ref}"])]
    shapes += [dict(shape=s, run=f"{s}-{ref}", val_loss=final[f"{s}-{ref}"]) for s in cfg.merge_schedules]
    ema = [dict(decay=b, mean_age=b / (1 - b), run=n, val_loss=final[n]) for n, b in cfg.ema_names.items()]
    best_w = min(windows, key=lambda r: r["val_loss"])
    i_best = windows.index(best_w)
    if len(windows) == 1:
        regime = "single"
    elif i_best == len(windows) - 1:
        regime = "long"
    elif i_best == 0:
        regime = "fast"
    else:
        regime = "intermediate"
    # how much the live model still improves over the longest window: the force that makes old
    # checkpoints worse than new ones
    live_curve = curves["constant"]
    back = cfg.steps - max(cfg.windows)
    steps_before = [s for s in live_curve["step"] if s <= back]
    live_then = _at(live_curve, steps_before[-1]) if steps_before else math.nan
    near = [r["window"] for r in windows if r["val_loss"] <= best_w["val_loss"] * (1 + MATCH_TOLERANCE)]
    every = counts[0]["val_loss"]
    enough = [c["updates"] for c in counts if c["val_loss"] <= every * (1 + MATCH_TOLERANCE)]
    return dict(
        windows=windows, counts=counts, shapes=sorted(shapes, key=lambda r: r["val_loss"]), ema=ema,
        ablation_window=ref, best_window=best_w["window"], windows_within_tolerance=near, regime=regime, live_val_loss=live,
        live_improvement_over_longest_window=live_then - live, longest_window=max(cfg.windows),
        improvement_to_merge_gain=(live_then - live) / (live - best_w["val_loss"]) if live != best_w["val_loss"]
        else math.inf,
        fewest_updates_within_tolerance=min(enough),
    )


REGIME_TEXT = {
    "long": "the paper's long-window regime: every longer window helped, up to the longest tried ({w} steps); "
            "try longer windows",
    "fast": "a fast-improvement regime: the shortest window ({w} steps) was best, because the model still "
            "improves quickly and older checkpoints are clearly worse; use a short window or train longer",
    "intermediate": "between the two: the best window was {w} steps; shorter windows average away less noise, "
                    "longer ones reach back to checkpoints that are too old",
    "single": "only one window was tried ({w} steps)",
}


def format_answer_ablations(a: dict[str, Any]) -> list[str]:
    ws = ", ".join(f"{r['window']}: {r['val_loss']:.4f}" for r in a["windows"])
    cs = ", ".join(f"{r['updates']}: {r['val_loss']:.4f}" for r in a["counts"])
    ss = " < ".join(f"{r['shape']} {r['val_loss']:.4f}" for r in a["shapes"])
    lines = [f"Q3 which window and shape (val loss at the last step; live model {a['live_val_loss']:.4f}):",
             f"  window (linear, a checkpoint every step): {ws}",
             f"  -> this run is in {REGIME_TEXT[a['regime']].format(w=a['best_window'])}",
             f"     windows within {100 * MATCH_TOLERANCE:.1f}% of the best: "
             f"{', '.join(str(w) for w in a['windows_within_tolerance'])}",
             f"     (over the last {a['longest_window']} steps the live model improved by "
             f"{a['live_improvement_over_longest_window']:.4f} nats, {a['improvement_to_merge_gain']:.2f}x the best "
             f"merge's gain over it; the smaller this ratio, the more a long window can average)"]
    if len(a["counts"]) > 1:
        lines += [f"  updates per window {a['ablation_window']} (linear): {cs}",
                  f"  -> down to {a['fewest_updates_within_tolerance']} updates per window the merge stays within "
                  f"{100 * MATCH_TOLERANCE:.1f}% of merging every step"]
    if len(a["shapes"]) > 1:
        lines.append(f"  shape at window {a['ablation_window']} (best first): {ss}")
    if a["ema"]:
        es = ", ".join(f"{r['mean_age']:.0f}: {r['val_loss']:.4f}" for r in a["ema"])
        lines.append(f"  EMA by mean checkpoint age in steps (a linear window W has mean age W/2): {es}")
    return lines


# ---------------------------------------------------------------- markdown report
def markdown(cfg: Config, payload: dict[str, Any], command: str) -> str:
    """A short report: setup, the three answers with their tables, the plots."""
    t = payload
    rows = t["branches"]
    out = [f"# WSM evidence: `{cfg.preset}` preset", "",
           f"Regenerate: `{command}`", "",
           f"Corpus {t['corpus']['name']} ({t['corpus']['train_chars']:,} train / {t['corpus']['val_chars']:,} "
           f"val chars); model {t['n_params'] / 1e6:.2f}M parameters ({cfg.n_layer} layers, {cfg.n_embd} wide, "
           f"context {cfg.block_size}); {cfg.steps} steps of {cfg.batch_size} sequences "
           f"({t['passes']:.1f} passes over the training text); AdamW, peak LR {cfg.lr:g}, "
           f"warmup {cfg.warmup}, seed {cfg.seed}. Validation loss in nats per character on "
           f"{cfg.eval_batches} fixed batches. Wall time {t['runtime_s'] / 60:.1f} min on {t['device_name']}, "
           f"{t['threads']} torch thread{'s' if t['threads'] > 1 else ''} (1-min load average "
           f"{t['load_before']:.1f} before, {t['load_after']:.1f} after).", "",
           "## 1. Does the merge track a real decay along the run?", "",
           f"WSD branches decay the LR ({cfg.wsd_schedule}) to zero over D = {cfg.decay} steps, forked from "
           f"the constant-LR run; WSM is the linear merge of the same D steps of that run "
           f"(`{cfg.tracker}`, the window starting at the branch point).", "",
           "| end step | live | WSD | WSM | WSM vs WSD | best EMA | best schedule-free |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ema = f"{min(r['ema'].values()):.4f}" if r["ema"] else "-"
        sf = f"{_nanmin(r['schedule_free'].values()):.4f}" if r["schedule_free"] else "-"
        out.append(f"| {r['end']} ({r['fraction']:.0%}) | {r['live']:.4f} | {r['wsd']:.4f} | {r['merge']:.4f} | "
                   f"{100 * r['relative_difference']:+.2f}% ({r['outcome']}) | {ema} | {sf} |")
    out += ["", *[f"    {x}" for x in t["answer_lines"]["along"]], "",
            "![validation loss along the run](loss.png)", "",
            "## 2. Is it better than the alternatives?", "",
            "| run | val loss | vs best WSM merge |", "|---|---:|---:|"]
    best = t["answers"]["alternatives"]["best_merge_val_loss"]
    for r in t["table"]:
        rel = (r["val_loss"] - best) / best if math.isfinite(r["val_loss"]) else math.nan
        out.append(f"| {r['label']} | {r['val_loss']:.4f} | {100 * rel:+.2f}% |")
    out += ["", *[f"    {x}" for x in t["answer_lines"]["alternatives"]], "",
            "## 3. Which window and shape?", "",
            *[f"    {x}" for x in t["answer_lines"]["ablations"]], "",
            "![ablations](ablations.png)", "", "Merge weights of the final windows:", "",
            "![weights](weights.png)", ""]
    if t.get("post_hoc"):
        out += post_hoc_section(cfg, t["post_hoc"], t["curves"]["wsd"]["val_loss"][-1])
    return "\n".join(out)


def post_hoc_section(cfg: Config, post_hoc: dict[str, Any], wsd: float) -> list[str]:
    """Section 4 of the report: the shape chosen after training, against the exact merges and WSD."""
    out = ["## 4. Choosing the shape after training", "",
           f"One moment merge (`moments={post_hoc['moments']}`) over the same {cfg.ablation_window}-step windows "
           "as the shape ablation, read at T with each shape; beside it the exact merge of that shape, tracked "
           "from the start. `bound`: the reconstruction's relative error bound of the decay weights.", "",
           "| shape | exact merge | read after training | difference | bound | vs WSD |",
           "|---|---:|---:|---:|---:|---:|"]
    for shape, r in post_hoc["shapes"].items():
        out.append(f"| {shape} | {r['exact']:.4f} | {r['post_hoc']:.4f} | {r['post_hoc'] - r['exact']:+.5f} | "
                   f"{r['bound']:.1e} | {100 * (r['post_hoc'] - wsd) / wsd:+.2f}% |")
    out += ["", f"Best shape read after training: {post_hoc['best']}.", "",
            "![shapes chosen after training](shapes.png)", ""]
    return out
