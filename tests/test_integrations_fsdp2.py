"""FSDP2 through the Hugging Face ``Trainer`` (accelerate's FSDP plugin, ``fsdp_version=2``) with ``wrap_trainer``.

Real accelerate on 2 gloo ranks on CPU, in subprocesses (``_fsdp2_hf_worker.py``,
one launch for all cases). accelerate (1.15) turns its FSDP plugin on only for
GPU-like multi-device types (``AcceleratorState``: ``MULTI_GPU``, ``MULTI_XPU``,
...); on CPU the type is ``MULTI_CPU``, the plugin is ignored and the Trainer
wraps the model in DDP. So on CPU these cases run the documented FSDP2
configuration as DDP: metrics, ``merged/`` folders and resume through the
Trainer, not FSDP2 sharding (WSM under FSDP2 itself: ``test_distributed*.py``,
``test_integrations_torchtitan.py``). :func:`test_what_accelerate_runs_with_the_fsdp2_config`
checks which one ran: DTensor params where accelerate enabled FSDP (an accelerator).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _launch import launch  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch("_fsdp2_hf_worker.py", 2, tmp_path_factory.mktemp("fsdp2_hf"), "fsdp2")


def _case(results, key):
    found = results[key]
    assert "error" not in found, found["error"]
    return found


def test_fsdp2_merged_metrics_and_merged_folders(ranks):
    for rank, results in enumerate(ranks):
        r = _case(results, "metrics_and_merged_folders")
        assert r["steps"] == 6 and r["eval_steps"] == [3, 6], (rank, r)
        for reported, expected in r["merged_metric"] + r["live_metric"]:
            assert reported == pytest.approx(expected, rel=1e-6), (rank, r)
        assert all(r["merged_differs"]), (rank, r)
        if rank == 0:  # the folder is written by the main process
            assert all(r["folder_matches"]), r


def test_fsdp2_resume_from_checkpoint_mid_window_is_exact(ranks):
    for rank, results in enumerate(ranks):
        r = _case(results, "resume_mid_window_is_exact")
        assert r["steps"] == [6, 6] and r["merged_equal"], (rank, r)


def test_what_accelerate_runs_with_the_fsdp2_config(ranks):
    """With FSDP enabled every param is a DTensor shard; on CPU accelerate runs the same config as DDP."""
    for rank, results in enumerate(ranks):
        r = _case(results, "metrics_and_merged_folders")
        if r["fsdp_enabled"]:
            assert r["dtensor_params"] == r["params"] > 0, (rank, r)
        else:
            assert r["distributed_type"] == "MULTI_CPU" and r["wrapped"] == "DistributedDataParallel", (rank, r)
            assert r["dtensor_params"] == 0, (rank, r)
