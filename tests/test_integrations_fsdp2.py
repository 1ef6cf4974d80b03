"""FSDP2 through the Hugging Face ``Trainer`` (accelerate's FSDP plugin, ``fsdp_version=2``) with ``wrap_trainer``.

Real accelerate and FSDP2 on 2 gloo ranks on CPU, in subprocesses
(``_fsdp2_hf_worker.py``, one launch for all cases): the params are DTensor
shards, the merge lives beside them, readouts gather.
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
