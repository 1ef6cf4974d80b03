"""Pipeline parallelism (``torch.distributed.pipelining``) with one ``WSMOptimizer`` per stage, on CPU/gloo.

Two launches of ``tests/_wsm_pipeline_worker.py``: 2 stages on 2 ranks, and
2 stages x 2 FSDP2 ranks on 4, both with ``merge_buffers=True``. Checked
after every step: the whole merged model assembled by
``wsm_optim.integrations.pipeline.merged_pipeline_state_dict`` loads into the unsplit model
with ``strict=True`` and equals the float64 explicit merge of the gathered
parameters and moving buffers of all stages (both merges, current and last
completed window), the constant buffer both stages keep stays bit-exact; each
stage's own readout holds its names only, and ``merged_weights()`` swaps
exactly that readout into the stage (asserted in the worker) and restores the
live bits; a DCP
checkpoint of all stages, resumed by fresh stages and optimizers, continues
bit for bit like the uninterrupted run.
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
import _wsm_pipeline_worker as W  # noqa: E402
import harness  # noqa: E402
import reference as R  # noqa: E402

SPECS = {name: R.Window(**kwargs) for name, kwargs in W.MERGES.items()}
RTOL = harness.FP32_READOUT_RTOL[torch.float32]
PARAM_NAMES = [k for k, _ in W.make_model().named_parameters()]
MERGED_NAMES = PARAM_NAMES + W.RUNNING  # ``scale`` is merged too, but it never moves
STAGE_KEYS = {  # each stage's readout: its own layers (+ head on the last stage) and the shared buffer
    f"stage{i}": sorted(
        [f"layers.{j}.{t}" for j in layers for t in ("weight", "bias", "running")]
        + (["head.bias", "head.weight"] if i == len(W.STAGE_LAYERS) - 1 else [])
        + ["scale"]
    )
    for i, layers in enumerate(W.STAGE_LAYERS)
}


@pytest.fixture(scope="module", params=[("pp", 2), ("pp_fsdp", 4)], ids=["pp2", "pp2xfsdp2"])
def job(request, tmp_path_factory) -> dict:
    scenario, world = request.param
    out_dir = tmp_path_factory.mktemp(f"wsm_{scenario}")
    _dist_launch.run_job("_wsm_pipeline_worker.py", scenario, world, out_dir)
    return torch.load(out_dir / f"{scenario}.pt", weights_only=False)


def snapshots(record: dict, first: int = 0) -> list[list[torch.Tensor] | None]:
    out: list[list[torch.Tensor] | None] = [None] * (W.STEPS + 1)
    for s, snap in record["snapshots"].items():
        assert sorted(snap) == sorted(MERGED_NAMES + ["scale"]), sorted(snap)  # every stage's, gathered
        out[s] = R.snapshot([snap[k] for k in MERGED_NAMES])
    return out


def test_assembled_merge_loads_into_unsplit_model_and_matches_explicit_merge(job):
    record = job["straight"]
    snaps = snapshots(record)
    assert sorted(record["assembled"]) == list(range(W.STEPS + 1))
    for s, per_merge in record["assembled"].items():
        for merge, spec in SPECS.items():
            harness._check_status(record["status"][s][merge], spec, s, merge)
            assembled = per_merge[merge]
            model = W.make_model()
            model.load_state_dict(assembled, strict=True)  # names of the unsplit model, nothing missing or extra
            assert torch.equal(assembled["scale"], model.scale)
            expected, scale = R.readout(spec, snaps, s), R.readout_scale(spec, snaps, s)
            for i, key in enumerate(MERGED_NAMES):
                assert assembled[key].dtype == torch.float32 and assembled[key].device.type == "cpu"
                err = harness.rel_error(assembled[key], expected[i], scale[i])
                assert err <= RTOL, f"{merge} step {s} {key}: rel error {err:.3g} vs the float64 explicit merge"
        done = R.completed_windows(SPECS["lin"], s)
        assert (s in record["completed"]) == (done > 0), s
        if done:
            expected = R.window_merge(SPECS["lin"], snaps, done - 1)
            scale = R.window_scale(SPECS["lin"], snaps, done - 1)
            for i, key in enumerate(MERGED_NAMES):
                err = harness.rel_error(record["completed"][s][key], expected[i], scale[i])
                assert err <= RTOL, f"completed lin window {done - 1} at step {s} {key}: rel error {err:.3g}"
    # The merge is not the live model (guards against comparing two copies of the params).
    final = record["assembled"][W.STEPS]["sq"]
    for key in ("layers.0.weight", "layers.3.running"):
        assert (final[key] - record["snapshots"][W.STEPS][key]).abs().max() > 1e-4, key


def test_each_stage_reads_out_its_own_names(job):
    for s, keys in job["straight"]["stage_keys"].items():
        assert keys == STAGE_KEYS, s


def test_dcp_resume_of_all_stages_is_exact(job):
    straight, resumed = job["straight"], job["resumed"]
    assert sorted(resumed["assembled"]) == list(range(W.CKPT_STEP, W.STEPS + 1))
    for s in resumed["assembled"]:
        for key, value in straight["snapshots"][s].items():
            assert torch.equal(resumed["snapshots"][s][key], value), f"params at step {s}: {key}"
        for merge in SPECS:
            for key, value in straight["assembled"][s][merge].items():
                assert torch.equal(resumed["assembled"][s][merge][key], value), f"{merge} step {s}: {key}"
            status = {k: v for k, v in resumed["status"][s][merge].items() if k != "weights"}
            assert status == {k: v for k, v in straight["status"][s][merge].items() if k != "weights"}
        assert (s in resumed["completed"]) == (s in straight["completed"])
        for key, value in straight["completed"].get(s, {}).items():
            assert torch.equal(resumed["completed"][s][key], value), f"completed step {s}: {key}"


def test_stages_with_conflicting_values_are_refused(job):
    assert job["conflict"] is not None
    assert "'layers.0.weight' is held by the stages on ranks 0 and" in job["conflict"]


def test_assembly_needs_a_process_group():
    from wsm_optim import WSMOptimizer
    from wsm_optim.integrations.pipeline import merged_pipeline_state_dict

    model = W.make_model()
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=2)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        merged_pipeline_state_dict(opt, model)
    with pytest.raises(TypeError, match="stage_module must be this rank's stage module .* or its PipelineStage"):
        merged_pipeline_state_dict(opt, opt)
