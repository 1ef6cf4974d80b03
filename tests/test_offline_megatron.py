"""Megatron ``torch_dist`` checkpoints merged offline, with real megatron-core files on both ends.

The inputs are written by megatron-core itself (``dist_checkpointing.save`` of
a sharded state dict with TP-chunked and PP-stacked ``ShardedTensor`` s,
``ShardedObject`` s and a common state, 2 gloo ranks on CPU:
``_megatron_worker.py``), and by megatron-core 0.15.3 for the old pickled
``.metadata`` (``fixtures/megatron-core-0.15.3``); the merge is loaded back
by megatron-core's ``dist_checkpointing.load`` on 2 ranks. Every merged value
is compared with a float64 merge of the worker's global tensors, with weights
from the decay shape written out here (Theorem 3.1, the paper's sampling).
The newer layout with the common state as a DCP entry (Megatron-LM's main
branch, not in a megatron-core release yet) is written by plain DCP.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from wsm_optim.cli import main as cli_main
from wsm_optim.offline import megatron
from wsm_optim.offline.merge import merge_checkpoints
from wsm_optim.offline.readers import open_reader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _launch import launch  # noqa: E402
from _megatron_worker import EXTRA, ITERATIONS, TENSORS, WORLD, extra_state, global_tensors  # noqa: E402

FIXTURE_015 = HERE / "fixtures" / "megatron-core-0.15.3"
CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
          "common_backend_version": 1}
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Opaque:
    """An object torch's safe loading refuses (stands for Megatron's enums in a real common state)."""

    def __init__(self, value: int) -> None:
        self.value = value


def merge_weights(shape: str, n: int) -> np.ndarray:
    """``c_0..c_k`` for ``n = k + 1`` checkpoints: ``w_i = f(i / (k + 1))``, ``c_j = w_j - w_{j+1}`` (w_0 = 1, w_{k+1} = 0)."""
    f = {"linear": lambda t: 1 - t, "1-sqrt": lambda t: 1 - math.sqrt(t),
         "cosine": lambda t: (1 + math.cos(math.pi * t)) / 2}[shape]
    k = n - 1
    w = [1.0] + [f(i / (k + 1)) for i in range(1, k + 1)] + [0.0]
    return np.array([w[j] - w[j + 1] for j in range(k + 1)])


def reference(iterations, shape: str) -> dict[str, torch.Tensor]:
    """float64 ``sum_j c_j theta_j`` of the global tensors, cast to each dtype; integers from the newest."""
    states = [global_tensors(it) for it in iterations]
    c = merge_weights(shape, len(states))
    out = {}
    for name, newest in states[-1].items():
        if newest.is_floating_point():
            out[name] = sum(float(cj) * s[name].double() for cj, s in zip(c, states)).to(newest.dtype)
        else:
            out[name] = newest.clone()
    return out


def assert_merged(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if w.is_floating_point():  # fp32 accumulation of a few terms, then one rounding to the dtype
            torch.testing.assert_close(g, w, rtol=2 * torch.finfo(w.dtype).eps, atol=1e-6, msg=name)
        else:
            assert torch.equal(g, w), name


def read_iteration(folder: Path) -> dict[str, torch.Tensor]:
    """The model tensors of an iteration folder at their global shapes, through torch's own ``dcp.load``."""
    sd = {name: torch.full(shape, -7, dtype=dtype) for name, (shape, dtype, _) in TENSORS.items()}
    dcp.load(sd, checkpoint_id=str(folder), no_dist=True)
    return sd


def saved_chunks() -> dict[str, list]:
    """How the worker's 2 ranks cut each model tensor, from :data:`TENSORS` (not from any file)."""
    out = {}
    for name, (shape, _, how) in TENSORS.items():
        if how == "replicated":
            out[name] = [((0,) * len(shape), shape)]
            continue
        dim = {"tp0": 0, "tp1": 1, "pp": 0}[how]
        size = shape[dim] // WORLD
        out[name] = [(tuple(r * size if d == dim else 0 for d in range(len(shape))),
                      tuple(size if d == dim else s for d, s in enumerate(shape))) for r in range(WORLD)]
    return out


def chunks(folder: Path) -> dict[str, list]:
    md = dcp.FileSystemReader(str(folder)).read_metadata()
    return {n: sorted((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks)
            for n, m in md.state_dict_metadata.items() if hasattr(m, "chunks")}


@pytest.fixture(scope="module")
def megatron_run(tmp_path_factory) -> Path:
    """``run/`` with :data:`ITERATIONS`, saved by megatron-core on 2 ranks."""
    out = tmp_path_factory.mktemp("megatron")
    results = launch("_megatron_worker.py", WORLD, out, "save")
    assert all(r["save"].get("saved") == list(ITERATIONS) for r in results), results
    return out / "run"


def test_run_folder_merges_into_a_checkpoint_megatron_core_loads(megatron_run, tmp_path, capsys):
    """The whole path: a run folder in, a run folder out, loaded by megatron-core on the same 2 ranks."""
    out = tmp_path / "merged"
    assert cli_main(["merge", str(megatron_run), "--schedule", "1-sqrt", "-o", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "1 optimizer-state entries under optimizer" in printed
    assert "2 RNG state entries (rng_state/shard_0_2, rng_state/shard_1_2)" in printed
    assert f"2 extra state entries (carried from the newest input: {EXTRA}/shard_0_2, {EXTRA}/shard_1_2)" in printed

    newest = megatron_run / megatron.iteration_folder(ITERATIONS[-1])
    folder = out / megatron.iteration_folder(ITERATIONS[-1])
    assert (out / megatron.TRACKER).read_text().strip() == str(ITERATIONS[-1])
    written = read_iteration(folder)
    assert_merged(written, reference(ITERATIONS, "1-sqrt"))
    # the newest input's chunking, and no optimizer or RNG entries
    assert chunks(folder) == saved_chunks()
    assert chunks(newest) == {**saved_chunks(), "optimizer.state.exp_avg.embedding.word_embeddings.weight":
                              [((0, 0), (8, 8)), ((8, 0), (8, 8))]}
    names = set(dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata)
    assert not any(n.startswith(("optimizer.", "rng_state")) for n in names)
    assert json.loads((folder / "metadata.json").read_text()) == json.loads((newest / "metadata.json").read_text())
    provenance = json.loads((folder / "wsm_merge.json").read_text())
    assert provenance["files"] == [megatron.iteration_folder(i) for i in ITERATIONS]
    np.testing.assert_allclose(provenance["c"], merge_weights("1-sqrt", len(ITERATIONS)), rtol=1e-12)
    assert provenance["iteration"] == ITERATIONS[-1] and provenance["common_state"] == "set"

    results = launch("_megatron_worker.py", WORLD, tmp_path, "load")
    for rank, r in enumerate(results):
        assert r["load"] == {"iteration": ITERATIONS[-1], "tracker": ITERATIONS[-1]}, r
        loaded = torch.load(tmp_path / f"loaded-rank{rank}.pt", weights_only=False)
        assert loaded["extra"] == extra_state(rank, ITERATIONS[-1])  # carried from the newest input
        assert loaded["args"]["tensor_model_parallel_size"] == WORLD
        for name, (shape, dtype, how) in TENSORS.items():
            local = {"tp0": lambda t: t.chunk(WORLD, 0)[rank], "tp1": lambda t: t.chunk(WORLD, 1)[rank],
                     "pp": lambda t: t[rank], "replicated": lambda t: t}[how](written[name])
            got = loaded["model"][name]  # megatron-core's view of the rank's piece: the very values written
            assert got.dtype == dtype and torch.equal(got, local), (rank, name)


def test_merged_iteration_reads_back_as_an_input(megatron_run, tmp_path):
    """The output is itself a Megatron input: merged alone (weight 1) it gives its own values."""
    out = merge_checkpoints(megatron_run, schedule="cosine", out=tmp_path / "merged", progress=False)
    folder = out / megatron.iteration_folder(ITERATIONS[-1])
    again = merge_checkpoints([folder], progress=False)
    assert_merged({n: again[n] for n in TENSORS}, reference(ITERATIONS, "cosine"))


def test_window_of_iteration_folders_and_the_steps_they_use(megatron_run):
    """A list of ``iter_*`` folders is a window, oldest first; the iteration numbers are the steps."""
    window = [megatron_run / megatron.iteration_folder(i) for i in ITERATIONS[1:]]
    merged = merge_checkpoints(window, schedule="linear", progress=False)
    assert_merged(merged, reference(ITERATIONS[1:], "linear"))
    reader = open_reader(window[-1])
    assert isinstance(reader, megatron.MegatronCheckpoint) and reader.iteration == ITERATIONS[-1]
    assert reader.skipped["rng_state/shard_0_2"] == "RNG state"


def test_optimizer_state_is_merged_into_the_output_when_asked(megatron_run, tmp_path):
    out = merge_checkpoints(megatron_run, out=tmp_path / "merged", optimizer_state=True, progress=False)
    folder = out / megatron.iteration_folder(ITERATIONS[-1])
    name = "optimizer.state.exp_avg.embedding.word_embeddings.weight"
    assert chunks(folder)[name] == [((0, 0), (8, 8)), ((8, 0), (8, 8))]
    sd = {name: torch.empty(16, 8)}
    dcp.load(sd, checkpoint_id=str(folder), no_dist=True)
    assert torch.equal(sd[name], torch.cat([torch.zeros(8, 8), torch.ones(8, 8)]))  # each rank's constant, merged


def test_partial_iteration_folders_are_left_out_with_a_warning(megatron_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(megatron_run, run)
    being_written = run / "iter_0000500"  # DCP files written, metadata.json not yet
    shutil.copytree(run / megatron.iteration_folder(ITERATIONS[-1]), being_written)
    (being_written / "metadata.json").unlink()
    (run / "iter_0000600").mkdir()  # just created
    with pytest.warns(UserWarning, match=r"2 Megatron iteration folders without metadata\.json .* left out") as w:
        merged = merge_checkpoints(run, schedule="1-sqrt", progress=False)
    assert "iter_0000500" in str(w[0].message) and "iter_0000600" in str(w[0].message)
    assert_merged(merged, reference(ITERATIONS, "1-sqrt"))
    listed = [run / megatron.iteration_folder(i) for i in ITERATIONS] + [being_written]
    with pytest.warns(UserWarning, match="1 Megatron iteration folder without metadata.json"):
        merged = merge_checkpoints(listed, schedule="1-sqrt", progress=False)
    assert_merged(merged, reference(ITERATIONS, "1-sqrt"))


def test_iteration_is_set_in_the_folder_the_tracker_and_the_common_state(megatron_run, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / megatron.TRACKER).write_text("7")  # an earlier merge's run folder
    merge_checkpoints(megatron_run, schedule="linear", out=out, iteration=450, progress=False)
    assert (out / megatron.TRACKER).read_text().strip() == "450"
    common = torch.load(out / "iter_0000450" / "common.pt", weights_only=False)
    assert common["iteration"] == 450 and common["checkpoint_version"] == 3.0
    assert common["args"].lr == 3e-4  # everything else as the newest input had it
    assert_merged(read_iteration(out / "iter_0000450"), reference(ITERATIONS, "linear"))


def test_a_crash_leaves_the_old_tracker_and_no_iteration_folder(megatron_run, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / megatron.TRACKER).write_text("7\n")

    def failing(blocks, plan, layout):
        yield from ()
        raise OSError("disk full")

    monkeypatch.setattr(megatron, "_chunks", failing)
    with pytest.raises(OSError, match="disk full"):
        merge_checkpoints(megatron_run, out=out, progress=False)
    assert (out / megatron.TRACKER).read_text() == "7\n"
    assert sorted(p.name for p in out.iterdir()) == [megatron.TRACKER]  # nothing half-written left


def test_megatron_core_0_15_pickled_metadata_reads_without_importing_megatron(tmp_path):
    """megatron-core 0.15.3's ``.metadata`` pickles ``MCoreMetadata`` / ``MCoreSavePlan``: read by stubs,
    in a process where importing megatron would be noticed."""
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(HERE)!r})
        from wsm_optim.offline.merge import merge_checkpoints
        merged = merge_checkpoints({str(FIXTURE_015)!r}, schedule="1-sqrt", out={str(tmp_path / "out")!r},
                                   progress=False)
        print("megatron imported:", any(m == "megatron" or m.startswith("megatron.") for m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=HERE.parent)
    assert done.returncode == 0, done.stderr
    assert "megatron imported: False" in done.stdout
    assert b"MCoreMetadata" in (FIXTURE_015 / "iter_0000100" / ".metadata").read_bytes()  # the old form indeed
    folder = tmp_path / "out" / "iter_0000200"
    assert_merged(read_iteration(folder), reference((100, 200), "1-sqrt"))
    assert chunks(folder) == saved_chunks()


def test_a_foreign_class_in_megatron_metadata_is_refused(tmp_path):
    folder = tmp_path / "iter_0000100"
    shutil.copytree(FIXTURE_015 / "iter_0000100", folder)
    raw = (folder / ".metadata").read_bytes()
    assert raw.count(b"MCoreSavePlan") == 1
    (folder / ".metadata").write_bytes(raw.replace(b"MCoreSavePlan", b"EvilSavePlan_"))  # same length: valid pickle
    with pytest.raises(ValueError, match=r"megatron\.core\.dist_checkpointing\.strategies\.torch\.EvilSavePlan_ is "
                                         r"not part of a DCP metadata file.*--unsafe-pickle"):
        merge_checkpoints([folder], progress=False)


def _plain_iteration(path: Path, iteration: int, *, whole: bool = True, common_entry: bool = False,
                     common: dict | None = None) -> Path:
    """An iteration folder in Megatron's layout written by plain DCP: every tensor in one chunk (TP = PP = 1),
    an extra-state entry, the common state as ``common.pt`` or as the DCP entry ``common_state/shard_0_1``."""
    sd: dict = dict(global_tensors(iteration)) if whole else {}
    sd[f"{EXTRA}/shard_0_1"] = io.BytesIO(_saved([extra_state(0, iteration)]))
    state = {"iteration": iteration, "checkpoint_version": 3.0} if common is None else common
    if common_entry:
        sd[megatron.COMMON_ENTRY] = io.BytesIO(_saved([state]))
    dcp.save(sd, checkpoint_id=str(path), no_dist=True, planner=_BytesAsIs())
    if not common_entry:
        torch.save(state, path / "common.pt")
    (path / "metadata.json").write_text(json.dumps(CONFIG))
    return path


class _BytesAsIs(dcp.DefaultSavePlanner):
    """Stores a ``BytesIO`` entry's bytes as they are, as megatron-core's ``MCoreSavePlanner`` does (torch's
    default planner would ``torch.save`` the ``BytesIO`` object around them)."""

    def transform_object(self, write_item, object):  # noqa: A002 - torch's parameter name
        return object if isinstance(object, io.BytesIO) else super().transform_object(write_item, object)


def _saved(value) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _entry(folder: Path, name: str):
    """A byte entry of a DCP folder through torch's own ``dcp.load``, unpickled as megatron-core does."""
    sd = {name: io.BytesIO()}
    dcp.load(sd, checkpoint_id=str(folder), no_dist=True)  # torch.load of the stored bytes
    return sd[name]


def test_common_state_as_a_dcp_entry_is_carried_with_its_iteration_set(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    its = (10, 20, 30)
    for it in its:
        _plain_iteration(run / megatron.iteration_folder(it), it, common_entry=True)
    out = merge_checkpoints(run, schedule="cosine", out=tmp_path / "merged", iteration=31, progress=False)
    folder = out / "iter_0000031"
    assert not (folder / "common.pt").exists()
    assert _entry(folder, megatron.COMMON_ENTRY) == [{"iteration": 31, "checkpoint_version": 3.0}]
    assert _entry(folder, f"{EXTRA}/shard_0_1") == [extra_state(0, 30)]
    assert_merged(read_iteration(folder), reference(its, "cosine"))


def test_a_common_state_safe_loading_refuses_is_carried_unchanged_at_the_same_iteration(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for it in (10, 20):
        _plain_iteration(run / megatron.iteration_folder(it), it, common={"iteration": it, "thing": Opaque(it)})
    newest = run / "iter_0000020" / "common.pt"
    out = merge_checkpoints(run, out=tmp_path / "a", progress=False)
    assert (out / "iter_0000020" / "common.pt").read_bytes() == newest.read_bytes()
    assert json.loads((out / "iter_0000020" / "wsm_merge.json").read_text())["common_state"] == "carried"
    with pytest.raises(ValueError, match=r"safe loading refuses, so its iteration cannot be set to 21.*--unsafe-pickle"):
        merge_checkpoints(run, out=tmp_path / "b", iteration=21, progress=False)
    assert not (tmp_path / "b").exists()  # refused before anything was read or written
    from wsm_optim.offline.files import UnsafePickleWarning

    with pytest.warns(UnsafePickleWarning):
        out = merge_checkpoints(run, out=tmp_path / "c", iteration=21, unsafe_pickle=True, progress=False)
    common = torch.load(out / "iter_0000021" / "common.pt", weights_only=False)
    assert common["iteration"] == 21 and common["thing"].value == 20


def test_inputs_of_another_parallel_layout_are_refused_naming_the_first_difference(megatron_run, tmp_path):
    tp1 = _plain_iteration(tmp_path / "iter_0000500", 500)  # the same model saved with TP = PP = 1
    with pytest.raises(ValueError, match=r"chunk layout mismatch for key 'embedding\.word_embeddings\.weight': 1 saved "
                                         r"chunks \[\[16, 8\]\] in .*iter_0000500, 2 \[\[8, 8\], \[8, 8\]\] in "
                                         r".*iter_0000400.*tensor/pipeline-parallel"):
        merge_checkpoints([megatron_run / "iter_0000400", tp1], progress=False)
    without = _plain_iteration(tmp_path / "iter_0000700", 700, whole=False)  # the same entries but no tensors
    with pytest.raises(ValueError, match=r"key 'embedding\.word_embeddings\.weight' \(and 4 more\) is missing from "
                                         r".*iter_0000700"):
        merge_checkpoints([megatron_run / "iter_0000400", without], progress=False)


def test_megatron_output_refusals_name_the_argument(megatron_run, tmp_path):
    with pytest.raises(ValueError, match="is the run folder of the input"):
        merge_checkpoints(megatron_run, out=megatron_run, out_format="megatron", iteration=999, progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a Megatron run folder"):
        merge_checkpoints(megatron_run, out=busy, progress=False)
    with pytest.raises(ValueError, match=r"--iteration sets a Megatron output's iteration; the output format is 'dcp'"):
        merge_checkpoints(megatron_run, out=tmp_path / "d", out_format="dcp", iteration=5, progress=False)
    with pytest.raises(ValueError, match="--iteration must be a non-negative integer, got -1"):
        merge_checkpoints(megatron_run, out=tmp_path / "d", iteration=-1, progress=False)
    with pytest.raises(ValueError, match="--key cannot be used with a Megatron output"):
        merge_checkpoints(megatron_run, out=tmp_path / "d", key="decoder", progress=False)
    done = tmp_path / "done"
    merge_checkpoints(megatron_run, out=done, progress=False)
    with pytest.raises(ValueError, match=r"iter_0000400 exists; write the merge to another run folder"):
        merge_checkpoints(megatron_run, out=done, progress=False)
    st = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(st))
    with pytest.raises(ValueError, match="--out-format megatron needs Megatron iteration folders as inputs"):
        merge_checkpoints([st], out=tmp_path / "m", out_format="megatron", progress=False)
    with pytest.raises(ValueError, match="sharded backend 'zarr'"):
        bad = tmp_path / "iter_0000009"
        shutil.copytree(megatron_run / "iter_0000100", bad)
        (bad / "metadata.json").write_text(json.dumps({**CONFIG, "sharded_backend": "zarr"}))
        merge_checkpoints([bad], progress=False)


def _chunked_iteration(path: Path, tensors: dict[str, torch.Tensor], chunks: dict[str, list],
                       carried: dict[str, bytes] | None = None) -> Path:
    """An iteration folder whose tensors are saved in the given chunks (``[(offsets, sizes)]``, as ranks
    of a TP x PP grid write them), with byte entries stored as they are, ``common.pt`` and ``metadata.json``."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    carried = {f"{EXTRA}/shard_0_1": _saved([{"x": 1}]), **(carried or {})}
    items = [WriteItem(index=MetadataIndex(n), type=WriteItemType.BYTE_IO) for n in carried]
    data = {}
    for name, t in tensors.items():
        for offsets, sizes in chunks[name]:
            items.append(WriteItem(index=MetadataIndex(name, torch.Size(offsets)), type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(
                                       chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                                       properties=TensorProperties(dtype=t.dtype), size=t.shape)))
            piece = t
            for d, (o, n) in enumerate(zip(offsets, sizes)):
                piece = piece.narrow(d, o, n)
            data[(name, tuple(offsets))] = piece.clone()

    class Planner(dcp.DefaultSavePlanner):
        def create_local_plan(self):
            self.plan = SavePlan(items, planner_data={})
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return io.BytesIO(carried[write_item.index.fqn])
            return data[(write_item.index.fqn, tuple(write_item.index.offset))]

    dcp.save({}, storage_writer=dcp.FileSystemWriter(str(path)), planner=Planner(), no_dist=True)
    torch.save({"iteration": megatron.iteration_of(path)}, path / "common.pt")
    (path / "metadata.json").write_text(json.dumps(CONFIG))
    return path


GRID = {  # a 2-D TP x PP grid with uneven pieces, a tensor without rows split on dim 1, an uneven 1-D split
    "grid": ((37, 23), [((r0, c0), (r1 - r0, c1 - c0)) for r0, r1 in ((0, 10), (10, 25), (25, 37))
                        for c0, c1 in ((0, 7), (7, 16), (16, 23))]),
    "empty": ((0, 5), [((0, 0), (0, 3)), ((0, 3), (0, 2))]),
    "rows": ((11,), [((0,), (4,)), ((4,), (7,))]),
}


def test_any_chunk_grid_is_written_back_as_the_newest_input_cut_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    states = []
    for it in (1, 2, 3):
        g = torch.Generator().manual_seed(it)
        states.append({n: torch.randn(shape, generator=g) for n, (shape, _) in GRID.items()})
        _chunked_iteration(run / megatron.iteration_folder(it), states[-1], {n: c for n, (_, c) in GRID.items()},
                           {"rerun_state_machine_state/shard_0_1": _saved([{"mode": it}])})
    out = merge_checkpoints(run, schedule="cosine", out=tmp_path / "merged", block_size="1KiB", progress=False)
    folder = out / "iter_0000003"
    sd = {n: torch.full(shape, -7.0) for n, (shape, _) in GRID.items()}
    dcp.load(sd, checkpoint_id=str(folder), no_dist=True)
    c = merge_weights("cosine", 3)
    for name, value in sd.items():
        want = sum(float(cj) * s[name].double() for cj, s in zip(c, states)).float()
        torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-6, msg=name)
    assert chunks(folder) == {n: sorted(c) for n, (_, c) in GRID.items()}
    # every byte entry but RNG and optimizer state is carried: here the rerun state machine's, as stored
    assert _entry(folder, "rerun_state_machine_state/shard_0_1") == [{"mode": 3}]


def test_hidden_folders_in_a_run_folder_are_never_inputs(megatron_run, tmp_path):
    """A crash-safe write's temporary folder (``.iter_XXXXXXX.wsmtmp-...tmp``) left by a killed merge is
    a complete-looking iteration folder; it must not be merged, and its digits are not a step."""
    run = tmp_path / "run"
    shutil.copytree(megatron_run, run)
    shutil.copytree(run / "iter_0000400", run / ".iter_0000500.wsmtmp-host-999999-abc.tmp")
    merged = merge_checkpoints(run, schedule="1-sqrt", progress=False)
    assert_merged(merged, reference(ITERATIONS, "1-sqrt"))
    from wsm_optim.offline.merge import resolve_inputs

    assert [p.name for p in resolve_inputs(run)] == [megatron.iteration_folder(i) for i in ITERATIONS]
    assert [p.name for p in resolve_inputs(run, glob="*iter_*")] == [megatron.iteration_folder(i) for i in ITERATIONS]


def test_a_failed_merge_into_a_new_run_folder_leaves_nothing(megatron_run, tmp_path, monkeypatch):
    def failing(blocks, plan, layout):
        yield from ()
        raise OSError("disk full")

    monkeypatch.setattr(megatron, "_chunks", failing)
    with pytest.raises(OSError, match="disk full"):
        merge_checkpoints(megatron_run, out=tmp_path / "new-run", progress=False)
    assert not (tmp_path / "new-run").exists()
