"""DeepSpeed ZeRO 1/2 on CPU (gloo): plain ``deepspeed.initialize`` + ``attach``, and the HF ``Trainer`` + ``wrap_trainer``.

Real DeepSpeed, in subprocesses (DeepSpeed and accelerate keep process-wide
state): ``_deepspeed_worker.py`` on 2 ranks (stages 1 and 2, uneven
partitions), ``_deepspeed_hf_worker.py`` on 1 rank. Each launch runs all its
cases and writes what they measured; the tests below assert on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _launch import launch as _launch  # noqa: E402


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Both ranks' results of the plain ``deepspeed.initialize`` cases (one 2-rank launch)."""
    return _launch("_deepspeed_worker.py", 2, tmp_path_factory.mktemp("deepspeed"), "plain")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """The HF ``Trainer`` + DeepSpeed cases (one 1-rank launch)."""
    return _launch("_deepspeed_hf_worker.py", 1, tmp_path_factory.mktemp("deepspeed_hf"), "hf")[0]


def _case(results: dict, key: str) -> dict:
    found = results[key]
    assert "error" not in found, found["error"]
    return found


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_merge_equals_an_explicit_merge_of_the_gathered_fp32_masters(plain, stage):
    for rank, results in enumerate(plain):
        r = _case(results, f"merge_equals_explicit_merge[{stage}]")
        assert r["steps"] == 9, (rank, r)  # one merge step per engine step, whatever the param groups
        assert r["worst_vs_explicit_merge"] < 1e-6, (rank, r)
        assert r["swap_equals_readout"] and r["swap_masters_equal_readout"], (rank, r)
        assert r["unwrap_swap_equals_readout"], (rank, r)  # unwrap(engine).merged_weights(): the copies too
        assert r["restored_bit_exactly"] and r["masters_restored"], (rank, r)
        assert r["model_keys"], (rank, r)
        assert r["copy_of_the_module_gives_the_merge"], (rank, r)  # model=copy.deepcopy(engine.module): matched by name


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_resume_through_deepspeed_checkpointing_is_exact(plain, stage):
    for rank, results in enumerate(plain):
        r = _case(results, f"resume_through_deepspeed_checkpoint_is_exact[{stage}]")
        assert r["resumed_steps"] == 5 and r["steps"] == [9, 9], (rank, r)
        assert r["merged_equal"] and r["status_equal"], (rank, r)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_merge_buffers_readouts_swap_and_resume(plain, stage):
    """merge_buffers=True: BatchNorm running stats merged beside the flat fp32 partitions, saved and resumed."""
    for rank, results in enumerate(plain):
        r = _case(results, f"merge_buffers[{stage}]")
        assert r["steps"] == [9, 9] and r["resumed_steps"] == 5, (rank, r)
        assert r["keys"] and r["full_keys"] and r["full_buffers_merged"] and r["num_batches_tracked_live"], (rank, r)
        assert r["buffers_differ_from_live"], (rank, r)
        assert r["worst_params_vs_explicit_merge"] < 1e-6 and r["worst_buffers_vs_explicit_merge"] < 1e-6, (rank, r)
        assert r["swap_equals_readout"] and r["restored_bit_exactly"], (rank, r)
        assert r["saved_buffer_names"] == ["1.running_mean", "1.running_var"], (rank, r)
        assert r["resumed_merged_equal"] and r["resumed_live_equal"], (rank, r)


def test_zero2_round_robin_gradients_merge_follows_deepspeeds_reordered_layout(plain):
    for rank, results in enumerate(plain):
        r = _case(results, "round_robin_gradients")
        assert r["steps"] == 9 and r["worst_vs_explicit_merge"] < 1e-6, (rank, r)


def test_zero2_bf16_copies_are_the_cast_merge_of_the_fp32_masters_and_come_back(plain):
    for rank, results in enumerate(plain):
        r = _case(results, "bf16_copies_follow_the_merged_masters")
        assert r["dtype"] == "torch.bfloat16" and r["worst_vs_explicit_merge"] < 1e-6, (rank, r)
        assert r["copies_are_the_cast_merge"] and r["restored_bit_exactly"], (rank, r)


def test_without_zero_stage0_the_optimizer_is_stepped_as_is(plain):
    for rank, results in enumerate(plain):
        r = _case(results, "stage0_steps_the_optimizer_as_is")
        assert r["steps"] == 5 and r["equal"] and r["swap_equal"], (rank, r)


def test_zero_stage3_is_refused_naming_the_stage(plain):
    for results in plain:
        message = _case(results, "stage3_is_refused")["refused"]
        assert message is not None and "ZeRO stage 3" in message and "stage 1 or 2" in message


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stepped_without_attach_is_refused_at_the_first_step(plain, stage):
    """One param group (ZeRO cuts nothing) and no attach: the first step raises instead of merging silently."""
    for rank, results in enumerate(plain):
        r = _case(results, f"stepped_without_attach_is_refused[{stage}]")
        assert r["steps"] == 0 and r["message"] is not None, (rank, r)
        if stage == 3:
            assert r["message"].startswith("NotImplementedError") and "ZeRO stage 3" in r["message"], (rank, r)
            assert "stage 1 or 2" in r["message"], (rank, r)
        else:
            assert r["message"].startswith("RuntimeError") and "ZeRO stage 2" in r["message"], (rank, r)
            assert "attach(engine)" in r["message"], (rank, r)


def test_without_zero_bf16_master_weight_wrapper_is_refused(plain):
    for rank, results in enumerate(plain):
        message = _case(results, "stage0_bf16_wrapper_is_refused")["message"]
        assert message is not None and "without ZeRO" in message and "stage 1 or 2" in message, (rank, message)


def test_universal_checkpoint_is_refused_naming_what_it_drops(plain):
    for rank, results in enumerate(plain):
        r = _case(results, "universal_checkpoint_is_refused")
        assert r["message"] is not None and "universal checkpoint" in r["message"], (rank, r)
        assert "data-parallel size" in r["message"] and r["steps"] == 0, (rank, r)


def test_hf_trainer_with_deepspeed_reports_merged_metrics_and_writes_merged_folders(hf):
    r = _case(hf, "wrap_trainer_metrics_and_merged_folders")
    assert r["steps"] == 8 and r["eval_steps"] == [3, 6, 8]
    assert all(r["merged_metric_matches"]) and all(r["live_metric_matches"]), r
    assert all(r["folder_matches"]) and all(r["merged_differs_from_live"]), r


def test_hf_trainer_with_deepspeed_merge_buffers_metrics_folders_and_resume(hf):
    r = _case(hf, "wrap_trainer_merge_buffers")
    assert r["steps"] == 8 and r["eval_steps"] == [3, 6, 8], r
    assert all(r["merged_metric_matches"]) and all(r["folder_matches"]) and all(r["buffer_differs_from_live"]), r
    assert r["resumed_steps"] == 8 and r["resumed_live_equal"] and r["resumed_merged_equal"], r


def test_hf_trainer_with_deepspeed_resumes_mid_window_exactly(hf):
    r = _case(hf, "resume_from_checkpoint_mid_window_is_exact")
    assert r["steps"] == [8, 8] and r["live_equal"] and r["merged_equal"], r


def test_hf_trainer_with_deepspeed_steps_the_optimizer_given_in_optimizers(hf):
    """DeepSpeed's set-up drops ``optimizers=(...)``; with ``wrap_trainer`` the given WSMOptimizer is the one stepped."""
    r = _case(hf, "optimizer_given_in_optimizers_is_the_one_stepped")
    assert r["same"] and r["steps"] == 4, r


def test_hf_trainer_with_deepspeed_without_wrap_trainer_unwrap_names_the_fix(hf):
    r = _case(hf, "without_wrap_trainer_unwrap_names_the_fix")
    assert r["steps"] == 0  # the Trainer never stepped it: it trains an optimizer of its own
    assert r["message"] is not None and "wrap_trainer(trainer" in r["message"], r


def test_hf_trainer_with_deepspeed_hand_passed_optimizer_fails_after_the_first_step(hf):
    """Not 8 silent steps: the run stops at the backward pass after the first training step, naming the fix."""
    r = _case(hf, "without_wrap_trainer_unwrap_names_the_fix")
    assert r["train_error"] is not None and "wrap_trainer(trainer" in r["train_error"], r
    assert "WSMOptimizer.step() has never been called" in r["train_error"], r
    assert r["global_step"] == 1 and r["steps"] == 0, r


def test_hf_trainer_with_deepspeed_refusals_name_the_setting(hf):
    r = _case(hf, "wrap_trainer_refusals_name_the_setting")
    assert r["zero3"] is not None and "ZeRO stage 3" in r["zero3"] and "zero_optimization.stage" in r["zero3"], r
    assert r["optimizer_section"] is not None and "'optimizer' section" in r["optimizer_section"], r
    assert r["load_best_model_at_end"] is not None and "load_best_model_at_end=False" in r["load_best_model_at_end"], r


def test_accelerate_deepspeed_plugin_with_attach_on_the_prepared_model(hf):
    r = _case(hf, "accelerate_deepspeed_plugin_with_attach")
    assert r["engine"] == "DeepSpeedEngine" and r["steps"] == 6 and r["worst_vs_explicit_merge"] < 1e-6, r
    assert "attach(engine)" in r["refused_without_attach"], r
