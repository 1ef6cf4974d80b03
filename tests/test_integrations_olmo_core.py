"""OLMo-core 3.0.0: ``WSMMergeCallback`` in real ``Trainer`` runs on CPU.

ai2-olmo-core 3.0.0 cannot be installed beside the test extras (its
``cached-path`` caps ``huggingface-hub<2``, transformers 5 needs ``>=2.4``), so
the runs happen in a virtualenv over this environment (``tests/_olmo_core_env.py``,
built once and cached; if it cannot be built the tests fail with pip's output)
and in subprocesses (``tests/_olmo_core_worker.py``), which import this
checkout's ``wsm_optim``. One launch runs every Trainer of the single-process
cases; this process compares what they wrote with a float64 explicit merge of
the float64 snapshots of the params after every step (``tests/reference.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import reference as R  # noqa: E402
from _dist_launch import run_job  # noqa: E402
from _olmo_core_env import olmo_core_python  # noqa: E402

JOB_TIMEOUT_S = 420
#: fp32 accumulation of a handful of checkpoints against float64, relative to max |merge|
REFERENCE_RTOL = 1e-6
#: the merges the worker configures (tests/_olmo_core_worker.MERGES), as the reference models them
SPECS = {"lin": R.Window("linear", window=4), "sqrt": R.Window("1-sqrt", window=6, interval=2, keep_last=True)}
STEPS = 12


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("olmo_core")
    python = olmo_core_python()  # raises with pip's output if the environment cannot be built
    run_job("_olmo_core_worker.py", "local", 1, out, timeout_s=JOB_TIMEOUT_S, python=python)
    return torch.load(out / "local-rank0.pt", weights_only=False)


def snapshots(result: dict) -> tuple[list[str], list[list[torch.Tensor]]]:
    snaps = result["snapshots"]
    names = list(snaps[0])
    assert sorted(snaps) == list(range(len(snaps)))
    return names, [[snaps[s][n] for n in names] for s in range(len(snaps))]


def expected_checkpoints() -> dict[str, tuple[str, int]]:
    """``{"stepN-merged_<merge>": (merge, window index)}`` for every window completed in STEPS steps."""
    out = {}
    for merge, spec in SPECS.items():
        for m in range(R.completed_windows(spec, STEPS)):
            out[f"step{R.window_end(spec, m)}-merged_{merge}"] = (merge, m)
    return out


def assert_close(got: dict[str, torch.Tensor], names: list[str], expected: list[torch.Tensor], what: str) -> None:
    assert set(got) == set(names), what
    for name, want in zip(names, expected):
        err = (got[name].double() - want).abs().max() / want.abs().max()
        assert err <= REFERENCE_RTOL, f"{what}: {name} differs from the float64 explicit merge by {float(err):.3g}"


def test_merged_checkpoints_match_float64_explicit_merges_and_load_into_olmo_core(local):
    names, snaps = snapshots(local)
    expected = expected_checkpoints()
    assert sorted(local["merged"]) == sorted(expected)  # one folder per completed window, nothing else
    for folder, (merge, m) in expected.items():
        # local["merged"] holds each folder loaded by load_model_and_optim_state into a fresh model
        assert_close(local["merged"][folder], names, R.window_merge(SPECS[merge], snaps, m), folder)


def test_optimizer_readouts_after_the_run_match_the_reference(local):
    names, snaps = snapshots(local)
    for merge, spec in SPECS.items():
        assert_close(local["optimizer_merges"][merge], names, R.readout(spec, snaps, STEPS), f"merge {merge}")
        status = local["status"][merge]
        assert status["windows_completed"] == R.completed_windows(spec, STEPS)


def test_merged_models_are_evaluated_by_the_evaluator_callbacks_under_eval_merged(local):
    metrics = local["metrics"]
    for folder, (merge, _) in expected_checkpoints().items():
        step = int(folder[4:].split("-")[0])
        got = metrics[step][f"eval/merged_{merge}/lm/val/CE loss"]
        # the same loss by a plain forward of the merged checkpoint, loaded back
        assert got == pytest.approx(local["merged_ce"][folder], rel=1e-5), folder
    live = {s: m["eval/lm/val/CE loss"] for s, m in metrics.items() if "eval/lm/val/CE loss" in m}
    assert sorted(live) == [4, 8, 12]  # the live evaluations still run at their own interval
    assert metrics[4]["eval/merged_lin/lm/val/CE loss"] != live[4]


def test_live_weights_are_restored_bit_exactly_after_saving_and_evaluating(local):
    # a run with the callback (five merged saves and evaluations) ends at the same weights as a plain run
    names = list(local["final"])
    assert all(torch.equal(local["final"][n], local["plain_final"][n]) for n in names)


def test_resume_mid_window_from_an_olmo_core_checkpoint_continues_bit_exactly(local):
    resumed = local["resumed"]
    # stopped after step 6 and resumed from the step6 checkpoint: mid-window for "lin" (4..8), where
    # ModelMergeCallback skips the merge; at a window end for "sqrt" (written once, before the checkpoint)
    assert resumed["first_step"] == 6
    assert sorted(resumed["merged"]) == sorted(local["merged"])
    for folder, values in local["merged"].items():
        assert all(torch.equal(values[n], resumed["merged"][folder][n]) for n in values), folder
    for merge in SPECS:
        want, got = local["optimizer_merges"][merge], resumed["optimizer_merges"][merge]
        assert all(torch.equal(want[n], got[n]) for n in want), merge
    assert all(torch.equal(local["final"][n], resumed["final"][n]) for n in local["final"])
    for step in (8, 12):
        assert resumed["metrics"][step]["eval/merged_lin/lm/val/CE loss"] == local["metrics"][step][
            "eval/merged_lin/lm/val/CE loss"]


def test_checkpoints_hold_the_accumulators_as_optimizer_state(local):
    keys = local["checkpoint_keys"]
    for merge in SPECS:
        assert any(k.startswith("optim.state.") and k.endswith(f".wsm_acc.{merge}") for k in keys), merge
    assert any(k.endswith(".wsm_last.sqrt") for k in keys)  # keep_last
    assert any(k.startswith("optim.param_groups.0.wsm.merges.lin.counters") for k in keys)


def test_resuming_a_checkpoint_saved_without_the_callback_is_refused(local):
    # DCP refuses it before WSMOptimizer.load_state_dict would: the checkpoint lacks the accumulators
    error = local["plain_resume_error"]
    assert error is not None and "Missing key in checkpoint state_dict: optim.state." in error, error
    assert ".wsm_" in error, error


def test_every_option_reaches_the_optimizer(local):
    options = local["options"]
    names, snaps = snapshots(options)
    spec = R.Window("linear", window=4)
    assert sorted(options["merged"]) == ["step4-merged", "step8-merged"]  # one merge: no name in the folder
    for m, folder in enumerate(["step4-merged", "step8-merged"]):
        # a moment merge (moments=2) read with its default shape, linear: exact from m = 2
        assert_close(options["merged"][folder], names, R.window_merge(spec, snaps, m), folder)
    assert options["backend"] == "offload" and options["moment_merge"]


# ------------------------------------------------------------- FSDP, two ranks
FSDP_STEPS = 8


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> tuple[list[dict], dict]:
    """Two gloo ranks with OLMo-core's FSDP (fully_shard), then one rank resuming their step6 checkpoint."""
    out = tmp_path_factory.mktemp("olmo_core_fsdp")
    python = olmo_core_python()
    run_job("_olmo_core_worker.py", "fsdp", 2, out, timeout_s=JOB_TIMEOUT_S, python=python)
    run_job("_olmo_core_worker.py", "reshard", 1, out, timeout_s=JOB_TIMEOUT_S, python=python)
    ranks = [torch.load(out / f"fsdp-rank{r}.pt", weights_only=False) for r in range(2)]
    return ranks, torch.load(out / "reshard-rank0.pt", weights_only=False)


def test_fsdp_merged_checkpoints_match_float64_explicit_merges(fsdp):
    ranks, _ = fsdp
    result = ranks[0]
    assert result["sharded"] == ["DTensor"]  # the params really are FSDP2 shards
    names, snaps = snapshots(result)
    expected = {f"step{R.window_end(spec, m)}-merged_{merge}": (merge, m)
                for merge, spec in SPECS.items() for m in range(R.completed_windows(spec, FSDP_STEPS))}
    for rank in ranks:  # each rank loaded the folders whole into an unsharded model
        assert sorted(rank["merged"]) == sorted(expected)
        for folder, (merge, m) in expected.items():
            assert_close(rank["merged"][folder], names, R.window_merge(SPECS[merge], snaps, m), folder)
    for merge, spec in SPECS.items():
        assert_close(result["optimizer_merges"][merge], names, R.readout(spec, snaps, FSDP_STEPS), merge)


def test_fsdp_live_weights_are_restored_after_evaluating_the_merge(fsdp):
    # an evaluation leaves FSDP2's root-level modules (lm_head) holding all-gathered params; with the merged
    # weights swapped in, the next step would train on them unless the callback reshards
    result = fsdp[0][0]
    assert all(torch.equal(result["final"][n], result["plain_final"][n]) for n in result["final"])


def test_fsdp_resume_mid_window_continues_bit_exactly(fsdp):
    result = fsdp[0][0]
    resumed = result["resumed"]
    assert resumed["first_step"] == 6
    assert all(torch.equal(result["final"][n], resumed["final"][n]) for n in result["final"])
    for folder, values in result["merged"].items():
        assert all(torch.equal(values[n], resumed["merged"][folder][n]) for n in values), folder


def test_checkpoint_of_two_fsdp_ranks_resumes_on_one_rank_and_continues_the_merge(fsdp):
    ranks, reshard = fsdp
    first = ranks[0]["first_snapshots"]  # the two-rank run that wrote the step6 checkpoint
    names = list(first[0])
    assert min(reshard["snapshots"]) == 6
    assert all(torch.equal(reshard["snapshots"][6][n], first[6][n]) for n in names)
    snaps = [[(first if s <= 6 else reshard["snapshots"])[s][n] for n in names] for s in range(STEPS + 1)]
    # "lin" window 4..8 and "sqrt" window 6..12 were anchored on two ranks and completed on one
    for folder, merge, m in [("step8-merged_lin", "lin", 1), ("step12-merged_lin", "lin", 2),
                             ("step12-merged_sqrt", "sqrt", 1)]:
        assert_close(reshard["merged"][folder], names, R.window_merge(SPECS[merge], snaps, m), folder)
    for merge, spec in SPECS.items():
        assert_close(reshard["optimizer_merges"][merge], names, R.readout(spec, snaps, STEPS), merge)
