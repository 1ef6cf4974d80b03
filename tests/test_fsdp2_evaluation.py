"""Evaluating in ``merged_weights`` between FSDP2 training steps changes nothing of the training (2 gloo ranks).

FSDP2 leaves the root module's params all-gathered after a forward without a
backward; ``merged_weights`` writes into the shards. With ``model=`` the
optimizer reshards the model's FSDP modules before and after the swap, so the
merged evaluation sees the merged values (not a previous live evaluation's
all-gathered ones) and the next training step the live ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _launch import launch  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp2_eval")
    ranks = launch("_fsdp2_eval_worker.py", 2, out, "evaluations")
    for r in ranks:
        assert r["evaluations"] == {"ok": True}, r["evaluations"]
    return [torch.load(out / f"results-rank{rank}.pt", weights_only=False) for rank in range(2)]


def test_merged_evaluations_between_steps_leave_training_bit_exact(results):
    for r in results:
        plain, evaluated = r["plain"]["final"], r["with_model"]["final"]
        assert all(torch.equal(plain[k], evaluated[k]) for k in plain)


def test_merged_evaluation_sees_the_merged_values_after_a_live_one(results):
    for r in results:
        got, want = r["with_model"]["merged_eval"], r["with_model"]["reference"]
        assert len(got) == len(want) == 2
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_without_model_the_swap_cannot_reshard(results):
    """The control: the same run without ``model=`` evaluates the live all-gathered params and trains on
    stale values afterwards; the two checks above fail for it (which is why FSDP2 readouts want ``model=``)."""
    r = results[0]
    got, want = r["without_model"]["merged_eval"], r["without_model"]["reference"]
    assert not torch.allclose(got[0], want[0], rtol=1e-6, atol=1e-6)  # after a live evaluation: its values
    plain, evaluated = r["plain"]["final"], r["without_model"]["final"]
    assert not all(torch.equal(plain[k], evaluated[k]) for k in plain)  # the step after the merged-only one
