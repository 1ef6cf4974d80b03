"""HSDP, FSDP2+TP, uneven shards and DCP resume at another world size, against a float64 explicit merge.

What users run, on CPU/gloo (``tests/_wsm_mesh_worker.py`` has the cases):
FSDP2 on a 2x2 (replicate, shard) mesh; FSDP2 on top of tensor parallelism
(dp 2 x tp 2); 1-D FSDP2 over 4 ranks with shards of 3/3/3/1 and 2/2/1/0 rows;
a DCP checkpoint written by 2 ranks and resumed by 4, and one written by the
4-rank HSDP job and resumed by one process with the plain, unsharded model.

Every step of every case is compared with the float64 explicit merge of the
gathered parameter snapshots (``tests/reference.py``), for both merges, the
current window (``full=True, model=model``: params and the buffer) and the
last completed one. The resumed runs are compared bit for bit with the
uninterrupted runs: the worker's exact-arithmetic model makes the parameter
trajectory independent of the world size, so any difference would come from
the resharded WSM state. Three launches (2, 4 and 1 ranks).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _dist_launch  # noqa: E402
import _wsm_mesh_worker as W  # noqa: E402
import harness  # noqa: E402
import reference as R  # noqa: E402

SPECS = {name: R.Window(**kwargs) for name, kwargs in W.MERGES.items()}
RTOL = harness.FP32_READOUT_RTOL[torch.float32]
PARAM_NAMES = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, dict]:
    """``{case: record}`` of all launches; the order matters: each resume reads the previous launch's checkpoint."""
    out_dir = tmp_path_factory.mktemp("wsm_meshes")
    result = {}
    for scenario, world in (("ws2", 2), ("ws4", 4), ("ws1", 1)):
        _dist_launch.run_job("_wsm_mesh_worker.py", scenario, world, out_dir)
        result.update(torch.load(out_dir / f"{scenario}.pt", weights_only=False))
    return result


def trajectory(*records_in_order: dict) -> list[list[torch.Tensor]]:
    """float64 param snapshots ``[step][param]``, later records overriding earlier ones from their first step."""
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    for record in records_in_order:
        snaps.update(record["snapshots"])
    assert sorted(snaps) == list(range(W.STEPS + 1))
    return [R.snapshot([snaps[s][k] for k in PARAM_NAMES]) for s in range(W.STEPS + 1)]


def check_against_explicit_merge(record: dict, snaps: list[list[torch.Tensor]]) -> int:
    """Every recorded readout vs the float64 explicit merge; returns how many tensors were compared."""
    checked = 0
    for s, readouts in record["readouts"].items():
        for merge, spec in SPECS.items():
            harness._check_status(record["status"][s][merge], spec, s, merge)
            got = readouts[merge]
            assert sorted(got) == sorted([*PARAM_NAMES, "scale"]), list(got)  # model.state_dict() keys
            torch.testing.assert_close(got["scale"], torch.linspace(0.5, 1.5, 5), rtol=0, atol=0)
            expected, scale = R.readout(spec, snaps, s), R.readout_scale(spec, snaps, s)
            for i, key in enumerate(PARAM_NAMES):
                assert got[key].dtype == torch.float32 and got[key].shape == expected[i].shape, key
                err = harness.rel_error(got[key], expected[i], scale[i])
                assert err <= RTOL, f"{merge} step {s} {key}: rel error {err:.3g} vs the float64 explicit merge"
                checked += 1
        done = R.completed_windows(SPECS["lin"], s)
        assert (s in record["completed"]) == (done > 0), s
        if done:
            expected = R.window_merge(SPECS["lin"], snaps, done - 1)
            scale = R.window_scale(SPECS["lin"], snaps, done - 1)
            for i, key in enumerate(PARAM_NAMES):
                err = harness.rel_error(record["completed"][s][key], expected[i], scale[i])
                assert err <= RTOL, f"completed lin window {done - 1} at step {s} {key}: rel error {err:.3g}"
                checked += 1
    return checked


def assert_identical(got: dict, want: dict, steps) -> None:
    for s in steps:
        for section in ("snapshots", "readouts", "completed"):
            a, b = got[section].get(s), want[section].get(s)
            assert (a is None) == (b is None), (section, s)
            if a is None:
                continue
            flat_a = a if section != "readouts" else {f"{m}/{k}": v for m, d in a.items() for k, v in d.items()}
            flat_b = b if section != "readouts" else {f"{m}/{k}": v for m, d in b.items() for k, v in d.items()}
            assert flat_a.keys() == flat_b.keys(), (section, s)
            for key in flat_a:
                assert torch.equal(flat_a[key], flat_b[key]), f"{section} step {s} {key} differs"
        for merge in SPECS:
            a, b = got["status"][s][merge], want["status"][s][merge]
            assert {k: v for k, v in a.items() if k != "weights"} == {k: v for k, v in b.items() if k != "weights"}


def test_hsdp_2x2_matches_explicit_merge(records):
    assert check_against_explicit_merge(records["hsdp"], trajectory(records["hsdp"])) > 0


def test_fsdp2_with_tensor_parallel_matches_explicit_merge(records):
    record = records["fsdp_tp"]
    snaps = trajectory(record)
    assert check_against_explicit_merge(record, snaps) > 0
    # The merge is not the live model (guards against comparing two copies of the params).
    assert (record["readouts"][W.STEPS]["sq"]["fc1.weight"] - snaps[-1][0]).abs().max() > 1e-4


def test_exact_model_trajectory_is_world_size_independent(records):
    # The premise of the bit-for-bit resume checks below: 1-D FSDP2 on 2 ranks and
    # HSDP on 4 ranks train to the same bits, and so do the merges.
    assert_identical(records["fsdp2"], records["hsdp"], range(W.STEPS + 1))


def test_dcp_resume_2_to_4_ranks_uneven_shards_is_exact(records):
    source, resumed = records["fsdp2"], records["resume_2to4"]
    assert min(resumed["snapshots"]) == W.CKPT_STEP
    # At the resume point: the loaded params and every readout equal the saved run's, bit for bit.
    assert_identical(resumed, source, range(W.CKPT_STEP, W.STEPS + 1))
    assert check_against_explicit_merge(resumed, trajectory(source, resumed)) > 0


def test_dcp_resume_4_ranks_hsdp_to_one_process_is_exact(records):
    source, resumed = records["hsdp"], records["resume_4to1"]
    assert min(resumed["snapshots"]) == W.CKPT_STEP
    assert_identical(resumed, source, range(W.CKPT_STEP, W.STEPS + 1))
    assert check_against_explicit_merge(resumed, trajectory(source, resumed)) > 0
