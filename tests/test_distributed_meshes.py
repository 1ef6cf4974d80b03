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
    result["_out_dir"] = out_dir
    return result


def trajectory(*records_in_order: dict) -> list[list[torch.Tensor]]:
    """float64 param snapshots ``[step][param]``, later records overriding earlier ones from their first step."""
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    for record in records_in_order:
        snaps.update(record["snapshots"])
    assert sorted(snaps) == list(range(W.STEPS + 1))
    return [R.snapshot([snaps[s][k] for k in PARAM_NAMES]) for s in range(W.STEPS + 1)]


def check_against_explicit_merge(record: dict, snaps: list[list[torch.Tensor]], keys=PARAM_NAMES,
                                 check_live=None) -> int:
    """Every recorded readout vs the float64 explicit merge; returns how many tensors were compared.

    ``snaps[step][i]`` holds ``keys[i]``; ``check_live(readout, step)`` checks the entries that are not merged.
    """
    checked = 0
    for s, readouts in record["readouts"].items():
        for merge, spec in SPECS.items():
            harness._check_status(record["status"][s][merge], spec, s, merge)
            got = readouts[merge]
            if check_live is not None:
                check_live(got, s)
            expected, scale = R.readout(spec, snaps, s), R.readout_scale(spec, snaps, s)
            for i, key in enumerate(keys):
                assert got[key].dtype == torch.float32 and got[key].shape == expected[i].shape, key
                err = harness.rel_error(got[key], expected[i], scale[i])
                assert err <= RTOL, f"{merge} step {s} {key}: rel error {err:.3g} vs the float64 explicit merge"
                checked += 1
        done = R.completed_windows(SPECS["lin"], s)
        assert (s in record["completed"]) == (done > 0), s
        if done:
            expected = R.window_merge(SPECS["lin"], snaps, done - 1)
            scale = R.window_scale(SPECS["lin"], snaps, done - 1)
            for i, key in enumerate(keys):
                err = harness.rel_error(record["completed"][s][key], expected[i], scale[i])
                assert err <= RTOL, f"completed lin window {done - 1} at step {s} {key}: rel error {err:.3g}"
                checked += 1
    return checked


def _scale_is_live(got: dict, s: int) -> None:
    assert sorted(got) == sorted([*PARAM_NAMES, "scale"]), list(got)  # model.state_dict() keys
    torch.testing.assert_close(got["scale"], torch.linspace(0.5, 1.5, 5), rtol=0, atol=0)


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


BUFFER_KEYS = PARAM_NAMES + W.MERGED_BUFFERS


def check_buffers_against_explicit_merge(record: dict, snapshots: dict) -> int:
    """Params and merged buffers vs the float64 explicit merge of the gathered state-dict snapshots."""
    snaps = [R.snapshot([snapshots[s][k] for k in BUFFER_KEYS]) for s in range(W.STEPS + 1)]

    def integer_buffer_is_live(got: dict, s: int) -> None:
        assert sorted(got) == sorted([*BUFFER_KEYS, "bn.num_batches_tracked"]), list(got)
        assert torch.equal(got["bn.num_batches_tracked"], snapshots[s]["bn.num_batches_tracked"]), s

    return check_against_explicit_merge(record, snaps, BUFFER_KEYS, integer_buffer_is_live)


def test_fsdp2_merged_buffers_match_explicit_merge(records):
    record = records["buffers"]
    snapshots = record["snapshots"]
    assert check_buffers_against_explicit_merge(record, snapshots) > 0
    # the buffers do move (running stats in the forward, the bias in the step pre-hook), and the merge is not live
    for key in ("bn.running_mean", "expert_bias"):
        assert not torch.equal(snapshots[W.CKPT_STEP][key], snapshots[W.CKPT_STEP + 1][key]), key
        assert (record["readouts"][W.STEPS]["sq"][key] - snapshots[W.STEPS][key]).abs().max() > 1e-4, key
    assert record["swapped"]  # merged_weights() swapped the merged buffers in and restored the live ones


@pytest.mark.parametrize("case", ["buffers_2to4", "buffers_2to1"])
def test_dcp_resume_of_merged_buffers_at_another_world_size_is_exact(records, case):
    source, resumed = records["buffers"], records[case]
    assert min(resumed["snapshots"]) == W.CKPT_STEP
    assert_identical(resumed, source, range(W.CKPT_STEP, W.STEPS + 1))
    snapshots = {**source["snapshots"], **resumed["snapshots"]}
    assert check_buffers_against_explicit_merge(resumed, snapshots) > 0


def test_dcp_checkpoint_holds_merged_buffers_once_under_the_first_param(records):
    """``get_optimizer_state_dict`` keeps them: ``optim.state.fc1.weight.wsm_acc.<merge>:<buffer>``, one chunk each."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(records["_out_dir"] / "ckpt-buffers-ws2")).read_metadata().state_dict_metadata
    for name in W.MERGED_BUFFERS:
        keys = [f"optim.state.fc1.weight.wsm_acc.lin:{name}", f"optim.state.fc1.weight.wsm_last.lin:{name}",
                f"optim.state.fc1.weight.wsm_acc.sq:{name}", f"optim.state.fc1.weight.wsm_anchor:{name}"]
        for key in keys:
            entry = metadata[key]
            assert isinstance(entry, TensorStorageMetadata) and len(entry.chunks) == 1, key  # replicated: saved once
            assert entry.properties.dtype == torch.float32, key
    assert not any("num_batches_tracked" in k or ":load" in k for k in metadata if k.startswith("optim.")), "live only"


def test_hsdp_2x2_matches_explicit_merge(records):
    assert check_against_explicit_merge(records["hsdp"], trajectory(records["hsdp"]), check_live=_scale_is_live) > 0


def test_fsdp2_with_tensor_parallel_matches_explicit_merge(records):
    record = records["fsdp_tp"]
    snaps = trajectory(record)
    assert check_against_explicit_merge(record, snaps, check_live=_scale_is_live) > 0
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
    assert check_against_explicit_merge(resumed, trajectory(source, resumed), check_live=_scale_is_live) > 0


def test_dcp_resume_4_ranks_hsdp_to_one_process_is_exact(records):
    source, resumed = records["hsdp"], records["resume_4to1"]
    assert min(resumed["snapshots"]) == W.CKPT_STEP
    assert_identical(resumed, source, range(W.CKPT_STEP, W.STEPS + 1))
    assert check_against_explicit_merge(resumed, trajectory(source, resumed), check_live=_scale_is_live) > 0
