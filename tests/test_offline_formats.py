"""Offline merge at scale: DCP directories and HF sharded folders in, every output layout out.

Inputs are written by the real frameworks: DCP checkpoints by a 2-rank and a
1-rank FSDP2 run (gloo, CPU; ``_dcp_checkpoint_writer.py``), sharded
safetensors by transformers' ``save_pretrained(max_shard_size=...)``. Every
output is compared with an explicit float64 merge of the checkpoints as the
frameworks' own loaders read them (``dcp_to_torch_save``, ``from_pretrained``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from wsm_optim.offline import readers as offline_readers
from wsm_optim import schedules as S
from wsm_optim.offline.readers import DCPDirectory
from wsm_optim.cli import main as cli_main
from wsm_optim.offline.merge import merge_checkpoints, resolve_inputs
from wsm_optim.offline.merge import step_number as S_number

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _dcp_checkpoint_writer import Net  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, *args: str) -> list[subprocess.Popen]:
    port = str(_free_port())
    return [
        subprocess.Popen(
            [sys.executable, str(HERE / "_dcp_checkpoint_writer.py"), *args],
            env=_env(RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(world)
    ]


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory) -> Path:
    """``step-2``, ``step-4`` saved by 2 FSDP2 ranks, ``step-6`` by 1 rank (whole tensors), in one folder."""
    root = tmp_path_factory.mktemp("dcp_run")
    procs = _launch(2, "train", str(root), "2,4", "1") + _launch(1, "train", str(root), "6", "2")
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return root


def _full_state(ckpt: Path, tmp: Path) -> dict:
    """The whole checkpoint as torch's own converter reads it (nested dicts, global tensors)."""
    out = tmp / f"{ckpt.name}.full.pt"
    if not out.exists():
        dcp_to_torch_save(ckpt, out)
    return torch.load(out, weights_only=True)


def _expected(states: list[dict[str, torch.Tensor]], c: np.ndarray) -> dict[str, torch.Tensor]:
    """float64 reference: sum_j c_j theta_j cast back to each dtype; non-floats from the newest."""
    out = {}
    for k, v in states[-1].items():
        if v.is_floating_point():
            out[k] = sum(float(cj) * s[k].double() for cj, s in zip(c, states)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def _assert_matches(merged: dict, expected: dict) -> None:
    assert sorted(merged) == sorted(expected)
    for k, v in expected.items():
        assert merged[k].dtype == v.dtype and merged[k].shape == v.shape, k
        if v.is_floating_point():
            torch.testing.assert_close(merged[k], v, rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert torch.equal(merged[k], v), k


def _read_sharded(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(folder / f))
    return out


def _dcp_load(folder: Path, names: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``dcp.load`` into freshly allocated tensors of the given shapes (a plain, unsharded layout)."""
    sd = {k: torch.full_like(v, -1) for k, v in names.items()}
    dcp.load(sd, checkpoint_id=str(folder))
    return sd


# ------------------------------------------------------------------ DCP inputs
def test_dcp_checkpoints_of_two_layouts_merge_into_every_output(dcp_run, tmp_path):
    ckpts = resolve_inputs(dcp_run, glob="step-*")
    assert [p.name for p in ckpts] == ["step-2", "step-4", "step-6"]
    emb = dcp.FileSystemReader(str(ckpts[0])).read_metadata().state_dict_metadata["model.emb.weight"]
    assert len(emb.chunks) == 2  # really written sharded by 2 ranks (17 + 16 rows) ...
    emb = dcp.FileSystemReader(str(ckpts[2])).read_metadata().state_dict_metadata["model.emb.weight"]
    assert len(emb.chunks) == 1  # ... and whole by 1 rank
    states = [_full_state(p, tmp_path)["model"] for p in ckpts]
    expected = _expected(states, S.merge_coefficients("1-sqrt", 2))
    assert sorted(expected) == sorted(Net().state_dict())
    assert expected["seen"].item() == 6 * 24  # the integer buffer comes from the newest (step 6)

    merged = merge_checkpoints(dcp_run, glob="step-*", key="model", schedule="1-sqrt", progress=False)
    _assert_matches(merged, expected)
    outs = {
        "safetensors": tmp_path / "m.safetensors",
        "torch": tmp_path / "m.pt",
        "sharded": tmp_path / "sharded",
        "dcp": tmp_path / "dcp_out",
    }
    for fmt, out in outs.items():
        got = merge_checkpoints(dcp_run, glob="step-*", key="model", schedule="1-sqrt", out=out,
                                out_format=fmt if fmt == "dcp" else None, max_shard_size="1KB", progress=False)
        assert got == out
        if fmt == "safetensors":
            back = load_file(out)
        elif fmt == "torch":
            back = torch.load(out, weights_only=True)
        elif fmt == "sharded":
            back = _read_sharded(out)
            assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(expected)
            assert len(list(out.glob("model-*-of-*.safetensors"))) > 2  # 1KB shards: really sharded
        else:
            back = _dcp_load(out, expected)
            provenance = json.loads((out / "wsm_merge.json").read_text())
            assert provenance["files"] == ["step-2", "step-4", "step-6"]
        _assert_matches(back, expected)
    assert sorted(os.listdir(tmp_path)) == sorted([*(p.name for p in outs.values()), *(f"{p.name}.full.pt" for p in ckpts)])


def test_dcp_output_in_row_blocks_loads_into_other_layouts(dcp_run, tmp_path):
    """Two 2-rank inputs merge in 600-byte blocks (rows read straight from the saved chunks, across their shard
    boundary at row 17); dcp.load reassembles the output unsharded and into a 2-rank FSDP2 model."""
    ckpts = [dcp_run / "step-2", dcp_run / "step-4"]
    states = [_full_state(p, tmp_path)["model"] for p in ckpts]
    expected = _expected(states, np.array([0.25, 0.75]))
    out = tmp_path / "blocks"
    merge_checkpoints(ckpts, key="model", weights=[0.25, 0.75], out=out, out_format="dcp", block_size="600B",
                      progress=False)
    emb = dcp.FileSystemReader(str(out)).read_metadata().state_dict_metadata["emb.weight"]
    assert [list(c.offsets) for c in emb.chunks] == [[0, 0], [12, 0], [24, 0]]  # 12 rows of 12 fp32 per block
    _assert_matches(_dcp_load(out, expected), expected)
    procs = _launch(2, "load", str(out), str(tmp_path / "fsdp_loaded.pt"))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    _assert_matches(torch.load(tmp_path / "fsdp_loaded.pt", weights_only=True), expected)


def test_direct_reads_of_fsdp2_checkpoints_match_dcp_load(dcp_run):
    """Every saved chunk that FSDP2 (2 ranks) and a 1-rank run wrote is read straight from its file, and any row
    range, inside a chunk or across the ranks' boundary, equals what ``dcp.load`` assembles."""
    for step in ("step-2", "step-6"):
        direct = DCPDirectory(dcp_run / step, key="model")
        via_dcp = DCPDirectory(dcp_run / step, key="model", direct_reads=False)
        for name in direct.names:
            assert direct.row_blocks(name) is None, (step, name)  # no chunk left to dcp.load
            shape, _ = direct.meta(name)
            rows = shape[0] if shape else 1
            ranges = [(0, rows)] + [(a, b) for a in range(rows) for b in range(a + 1, rows + 1) if b - a <= 3]
            for a, b in ranges if shape else [(0, 1)]:
                got, want = direct.read(name, a, b), via_dcp.read(name, a, b)
                assert got.dtype == want.dtype and torch.equal(got, want), (step, name, a, b)


def test_dcp_load_fallback_cuts_blocks_at_saved_chunks_and_gives_the_same_bits(dcp_run, tmp_path, monkeypatch):
    """With no chunk readable directly (as for a compressed or transformed storage), rows go through dcp.load,
    blocks are cut only at the inputs' shard boundary (row 17 of 33), and the merged bits do not change."""
    ckpts = [dcp_run / "step-2", dcp_run / "step-4"]  # both 2-rank
    kwargs = dict(key="model", schedule="1-sqrt", block_size="600B", progress=False)
    direct = merge_checkpoints(ckpts, **kwargs)
    monkeypatch.setattr(offline_readers, "plain_tensor_offset", lambda *args: None)
    out = tmp_path / "fallback"
    merge_checkpoints(ckpts, out=out, out_format="dcp", **kwargs)
    emb = dcp.FileSystemReader(str(out)).read_metadata().state_dict_metadata["emb.weight"]
    assert [list(c.offsets) for c in emb.chunks] == [[0, 0], [17, 0]]
    fallback = _dcp_load(out, direct)
    for k in direct:
        assert torch.equal(direct[k], fallback[k]), k


def test_optimizer_state_and_objects_are_skipped_and_listed_unless_asked(dcp_run, tmp_path, capsys):
    ckpts = [dcp_run / "step-2", dcp_run / "step-4"]
    full = [_full_state(p, tmp_path) for p in ckpts]
    merged = merge_checkpoints(ckpts, verbose=True, progress=False)
    assert sorted(merged) == sorted(f"model.{k}" for k in full[0]["model"])
    printed = capsys.readouterr().out
    n_optim = sum(len(st) for st in full[1]["optim"]["state"].values()) + 12  # + 12 param_groups entries
    assert (f"not merged, from step-4: {n_optim} optimizer-state entries under optim (merge them with "
            "--optimizer-state); 1 non-tensor object (train_state.step)") in printed
    with_opt = merge_checkpoints(ckpts, optimizer_state=True, progress=False)
    optim = {f"optim.state.{p}.{k}": v for p, st in full[1]["optim"]["state"].items() for k, v in st.items()}
    assert set(optim) <= set(with_opt) and len(with_opt) == len(merged) + len(optim)
    for name in optim:
        p, k = name.removeprefix("optim.state.").rsplit(".", 1)
        ref = 0.5 * full[0]["optim"]["state"][p][k].double() + 0.5 * full[1]["optim"]["state"][p][k].double()
        torch.testing.assert_close(with_opt[name], ref.float(), rtol=1e-6, atol=1e-7)
    only_opt = merge_checkpoints(ckpts, key="optim", progress=False)  # asking by key includes it too
    assert sorted(only_opt) == sorted(n.removeprefix("optim.") for n in optim)


def test_workers_give_bitwise_the_serial_result(dcp_run, tmp_path):
    kwargs = dict(glob="step-*", key="model", schedule="ema", block_size="700B", progress=False)
    serial = merge_checkpoints(dcp_run, **kwargs)
    out = tmp_path / "parallel.safetensors"
    merge_checkpoints(dcp_run, workers=2, out=out, **kwargs)
    parallel = load_file(out)
    assert sorted(serial) == sorted(parallel)
    for k in serial:
        assert torch.equal(serial[k], parallel[k]), k


def test_worker_blocks_are_allocated_in_shared_memory(tmp_path):
    # A worker's accumulators (and bf16 casts) are made in shared memory: returned without a copy and never freed
    # into the worker's heap (glibc kept ~270 MiB of freed 16 MiB blocks per worker in a 4 x 270M merge).
    from wsm_optim.offline import streaming as M

    paths = []
    for j in range(3):
        g = torch.Generator().manual_seed(j)
        sd = {"w": torch.randn(37, 5, generator=g), "h": torch.randn(11, generator=g).bfloat16(),
              "s": torch.randn((), generator=g), "e": torch.zeros(0, 3), "step": torch.tensor(j)}
        save_file(sd, tmp_path / f"{j}.safetensors")
        paths.append(tmp_path / f"{j}.safetensors")
    readers = [offline_readers.open_reader(p) for p in paths]
    layout = [(n, s, dt, torch.bfloat16 if dt == torch.float32 and n == "w" else dt)
              for n, (s, dt) in offline_readers.common_layout(readers, paths, None).items()]
    c = np.array([0.2, 0.3, 0.5])
    threads = torch.get_num_threads()
    try:
        M._worker_init(paths, None, False, False, c)  # what a pool worker runs, here in-process
        batches = M.plan_batches(M.plan_blocks(layout, readers, 256), 256)
        results = [(batch, M.merge_batch(readers, batch, c), M._worker_batch(batch)) for batch in batches]
    finally:
        torch.set_num_threads(threads)
        M._worker_readers, M._worker_c, M._worker_buffers = [], None, None
    for batch, private, shared in results:
        for b, p, q in zip(batch, private, shared):
            assert p.dtype == q.dtype == b.out_dtype and p.shape == q.shape and torch.equal(p, q), b
            if q.numel() and q.is_floating_point():
                assert q.untyped_storage().is_shared(), b


def _dcp(path: Path, sd: dict) -> Path:
    dcp.save(sd, checkpoint_id=str(path), no_dist=True)
    return path


def test_dcp_refusals_name_the_key_and_the_input(tmp_path):
    base = {"w": torch.ones(4, 3), "b": torch.zeros(3)}
    a = _dcp(tmp_path / "a_1", {"model": base})
    cases = [
        ({"w": torch.ones(4, 3)}, r"key 'b' is missing from .*b_2 \(present in .*a_1\)"),
        ({**base, "w": torch.ones(3, 4)}, r"shape mismatch for key 'w': \[3, 4\] in .*b_2, \[4, 3\] in .*a_1"),
        ({**base, "b": torch.zeros(3, dtype=torch.float64)}, r"dtype mismatch for key 'b': torch.float64 in .*b_2"),
        ({**base, "w": torch.tensor([[1.0, float("nan"), 2.0]] * 4)}, r"b_2: tensor 'w' has 4 NaN and 0 inf values"),
    ]
    for j, (sd, message) in enumerate(cases):
        b = _dcp(tmp_path / f"case{j}" / "b_2", {"model": sd})
        out = tmp_path / f"out{j}"
        with pytest.raises(ValueError, match=message):
            merge_checkpoints([a, b], key="model", out=out, out_format="dcp", progress=False)
        assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(ValueError, match=r"--key 'modle': no tensor in .*a_1 is named 'modle\.\*'.*\['model'\]"):
        merge_checkpoints([a], key="modle", progress=False)


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9])
def test_truncated_dcp_chunk_file_is_refused_naming_the_input_and_the_key(tmp_path, capsys, keep):
    """A cut ``.distcp`` file is read through torch.load, whose RuntimeError/EOFError was a traceback (exit 1)."""
    states = [{"model": {"w": torch.randn(64, 8), "b": torch.randn(8)}} for _ in range(2)]
    a, b = _dcp(tmp_path / "a_1", states[0]), _dcp(tmp_path / "b_2", states[1])
    (data,) = b.glob("*.distcp")
    data.write_bytes(data.read_bytes()[: int(data.stat().st_size * keep)])
    out = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=r"b_2: cannot read the saved chunks of 'model\.[wb]' .*corrupt or truncated"):
        merge_checkpoints([a, b], out=out, progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert cli_main(["merge", str(a), str(b), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"wsm-optim merge: error: {b}: cannot read the saved chunks"), err


def test_dcp_metadata_with_foreign_objects_is_refused_without_unsafe_pickle(tmp_path):
    a = _dcp(tmp_path / "a", {"model": {"w": torch.ones(2)}})
    md = dcp.FileSystemReader(str(a)).read_metadata()
    md.planner_data = {"x": os.getcwd}  # a callable the format never holds: a pickle that could run code
    import pickle

    with open(a / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(ValueError, match=r"a/\.metadata holds objects that safe loading refuses .*--unsafe-pickle"):
        merge_checkpoints([a], progress=False)
    from wsm_optim.offline.merge import UnsafePickleWarning

    with pytest.warns(UnsafePickleWarning, match="without restrictions"):
        merged = merge_checkpoints([a], unsafe_pickle=True, progress=False)
    assert torch.equal(merged["model.w"], torch.ones(2))
    (a / ".metadata").write_bytes(b"\x80\x04garbage, not a pickle")  # corrupt is not unsafe: no --unsafe-pickle hint
    for unsafe in (False, True):
        with pytest.raises(ValueError, match=r"cannot read .*a/\.metadata: not a DCP metadata file") as info:
            merge_checkpoints([a], unsafe_pickle=unsafe, progress=False)
        assert "--unsafe-pickle" not in str(info.value)


def test_glob_names_the_matched_folders_that_are_not_checkpoints(tmp_path):
    """A folder the glob matches but cannot read (still being written, or ``pytorch_model.bin`` only) changes the
    weights of the others: it is left out with a warning naming it, not silently."""
    for step in (1, 2):
        _dcp(tmp_path / f"step-{step}", {"w": torch.full((2,), float(step))})
    (tmp_path / "step-3").mkdir()  # no .metadata yet
    (tmp_path / "step-3" / "__0_0.distcp").write_bytes(b"partial")
    with pytest.warns(UserWarning, match=r"--glob 'step-\*' also matches 1 folder that is not a checkpoint .*: step-3$"):
        assert resolve_inputs(tmp_path, glob="step-*") == [tmp_path / "step-1", tmp_path / "step-2"]
    with pytest.warns(UserWarning, match="left out of the merge: step-3"):
        merged = merge_checkpoints(tmp_path, glob="step-*", progress=False)
    assert torch.equal(merged["w"], torch.full((2,), 1.5))


def test_cli_merges_a_parent_folder_of_dcp_checkpoints(dcp_run, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["merge", str(dcp_run), "--glob", "step-*", "--key", "model", "-o", str(out), "--out-format", "dcp",
            "--schedule", "cosine", "--no-progress"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "weights: schedule 'cosine', Theorem 3.1 with k = 2" in printed and f"wrote {out} (dcp, 9 tensors)" in printed
    states = [_full_state(p, tmp_path)["model"] for p in resolve_inputs(dcp_run, glob="step-*")]
    expected = _expected(states, S.merge_coefficients("cosine", 2))
    _assert_matches(_dcp_load(out, expected), expected)
    assert cli_main(argv) == 2  # the folder now exists: refused, not overwritten or mixed
    err = capsys.readouterr().err
    assert err.startswith(f"wsm-optim merge: error: output {str(out)!r} exists and is not an empty directory")


# -------------------------------------------------------- HF sharded folders
def _tiny_gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16)
    model = GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_hf_sharded_folders_merge_into_a_folder_from_pretrained_loads(tmp_path):
    from transformers import GPT2LMHeadModel

    run = tmp_path / "run"
    states = []
    for step in (500, 1000, 1500):
        model = _tiny_gpt2(step)
        model.save_pretrained(run / f"checkpoint-{step}", max_shard_size="40KB")
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert len(list((run / "checkpoint-500").glob("model-*.safetensors"))) > 2  # really sharded
    saved = set(_read_sharded(run / "checkpoint-500"))
    c = S.merge_coefficients("linear", 2)
    expected = _expected([{k: s[k] for k in saved} for s in states], c)
    out = tmp_path / "merged"
    assert merge_checkpoints(run, glob="checkpoint-*", out=out, max_shard_size="50KB", progress=False) == out
    assert (out / "config.json").read_text() == (run / "checkpoint-1500" / "config.json").read_text()
    _assert_matches(_read_sharded(out), expected)
    loaded, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    for k, v in loaded.state_dict().items():  # the tied lm_head follows the merged embedding
        ref = expected.get(k, expected["transformer.wte.weight"] if k == "lm_head.weight" else None)
        torch.testing.assert_close(v, ref, rtol=1e-6, atol=1e-7, msg=k)
    single = merge_checkpoints(run, glob="checkpoint-*", out=tmp_path / "one.safetensors", progress=False)
    _assert_matches(load_file(single), expected)


# --------------------------------------------------------------- memory bound
_RSS_CHILD = textwrap.dedent(
    """
    import sys
    import torch, torch.distributed.checkpoint, safetensors.torch
    import wsm_optim.offline.merge, wsm_optim.offline.writers, wsm_optim.offline.streaming
    from wsm_optim.offline.merge import merge_checkpoints

    def peak():  # VmHWM: ru_maxrss would carry pytest's own peak over fork+exec
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

    src, out, fmt = sys.argv[1:4]
    before = peak()
    merge_checkpoints(src, glob="step_*", out=out, out_format=fmt, schedule="1-sqrt", block_size="4MiB",
                      progress=False, verbose=False)
    print(before, peak())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_is_bounded_by_the_largest_tensor_not_the_model(tmp_path):
    """3 checkpoints of a 104 MiB model (48 x 2 MiB + one 8 MiB tensor) in DCP and HF folders."""
    n_small, small, large = 48, 2**19, 2 * 2**20  # fp32 elements: 2 MiB and 8 MiB tensors
    model_bytes = (n_small * small + large) * 4
    g = torch.Generator().manual_seed(0)
    for j in range(3):
        sd = {f"layer{i}.weight": torch.randn(small // 512, 512, generator=g) for i in range(n_small)}
        sd["embed.weight"] = torch.randn(large // 512, 512, generator=g)
        _dcp(tmp_path / "dcp" / f"step_{j}", sd)
        (tmp_path / "hf" / f"step_{j}").mkdir(parents=True)
        save_file(sd, str(tmp_path / "hf" / f"step_{j}" / "model.safetensors"))
        del sd
    results = {}
    for src, fmt in (("dcp", "safetensors"), ("hf", "sharded"), ("hf", "dcp")):
        done = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, str(tmp_path / src), str(tmp_path / f"out_{src}_{fmt}"), fmt],
            capture_output=True, text=True, env=_env(), timeout=300,
        )
        assert done.returncode == 0, done.stderr
        before, after = map(int, done.stdout.split())
        results[src, fmt] = extra = after - before
        print(f"{src} -> {fmt}: peak extra {extra / 2**20:.0f} MiB for a {model_bytes / 2**20:.0f} MiB model")
    # The previous single-file merge held a whole-model fp32 accumulator (104 MiB) plus one checkpoint.
    # Both layouts read exactly the blocks' rows (DCP straight from the saved chunks' bytes) into a reused 1 MiB
    # buffer: two 4 MiB batches of accumulators in flight (the next one is merged while one is written), the
    # buffer and allocator slack (measured 23-31 MiB in all three cases).
    for (src, fmt), extra in results.items():
        bound = 0.4 * model_bytes
        assert extra < bound, f"{src} -> {fmt}: peak extra {extra / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"


# ------------------------------------------------------- layouts and refusals
def _mixed_inputs(tmp_path: Path) -> tuple[list[Path], list[dict]]:
    """The same names in a DCP directory, a safetensors file and a torch.save file (oldest first)."""
    g = torch.Generator().manual_seed(0)
    states = [
        {"big.weight": torch.randn(37, 11, generator=g), "half": torch.randn(9, generator=g).half(),
         "count": torch.tensor(10 * j), "scalar": torch.randn((), generator=g)}
        for j in range(3)
    ]
    paths = [_dcp(tmp_path / "ck_1", states[0]), tmp_path / "ck_2.safetensors", tmp_path / "ck_3.pt"]
    save_file(states[1], str(paths[1]))
    torch.save(states[2], paths[2])
    return paths, states


def test_mixed_layouts_merge_and_row_blocks_change_nothing(tmp_path):
    paths, states = _mixed_inputs(tmp_path)
    c = S.merge_coefficients("inv-sqrt", 2)
    whole = merge_checkpoints(paths, schedule="inv-sqrt", progress=False)
    _assert_matches({k: v for k, v in whole.items() if k != "half"}, {k: v for k, v in _expected(states, c).items() if k != "half"})
    ref_half = sum(float(cj) * s["half"].double() for cj, s in zip(c, states))
    torch.testing.assert_close(whole["half"], ref_half.half(), rtol=1e-3, atol=1e-3)  # one fp16 rounding
    tiny = merge_checkpoints(paths, schedule="inv-sqrt", block_size="100B", progress=False)  # 37 rows in many blocks
    assert all(torch.equal(tiny[k], whole[k]) for k in whole)
    out = merge_checkpoints(paths, schedule="inv-sqrt", block_size="100B", out=tmp_path / "m.safetensors", progress=False)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:  # the streamed header: HF-loadable metadata and provenance
        meta = f.metadata()
        assert meta["format"] == "pt"
        assert json.loads(meta["wsm_merge"])["files"] == ["ck_1", "ck_2.safetensors", "ck_3.pt"]
    back = load_file(out)
    assert all(torch.equal(back[k], whole[k]) for k in whole)


@pytest.mark.parametrize("out_format, workers", [("safetensors", 1), ("torch", 1), ("sharded", 1), ("dcp", 1), ("dcp", 2)])
def test_progress_in_a_log_ends_with_every_tensor_counted(tmp_path, capsys, out_format, workers):
    """Not a terminal: one plain line at the end, counting the last tensor for every output (the sharded and DCP
    writers stop asking for blocks after the last one, which left the line at 3/4, printed after 'wrote')."""
    paths, states = _mixed_inputs(tmp_path)
    out = tmp_path / ("merged.pt" if out_format == "torch" else "merged")
    merge_checkpoints(paths, out=out, out_format=out_format, block_size="100B", workers=workers, verbose=False)
    lines = capsys.readouterr().err.splitlines()
    assert [l.split(", elapsed")[0] for l in lines] == ["merging: 4/4 tensors (100%)"], lines


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        (dict(out="m.npz"), ValueError, r"output '.*m\.npz': cannot tell the format from the suffix '\.npz'.*--out-format \(safetensors, torch, sharded, dcp, megatron\)"),
        (dict(out="m", out_format="zip"), ValueError, r"--out-format: unknown 'zip'; choose one of safetensors, torch, sharded, dcp, megatron"),
        (dict(out_format="dcp"), ValueError, r"--out-format needs an output path"),
        (dict(out="m", max_shard_size="5XB"), ValueError, r"--max-shard-size: cannot read '5XB'"),
        (dict(block_size="0"), ValueError, r"--block-size must be positive"),
        (dict(workers=0), ValueError, r"--workers must be a positive integer, got 0"),
        (dict(out="ck_1/inside", out_format="dcp"), ValueError, r"is inside the input checkpoint .*ck_1"),
        (dict(out="missing/m"), FileNotFoundError, r"output directory '.*missing' does not exist"),
    ],
)
def test_bad_output_arguments_are_refused_before_reading(tmp_path, monkeypatch, kwargs, exc, message):
    paths, _ = _mixed_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(exc, match=message):
        merge_checkpoints(paths, progress=False, **kwargs)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, inputs untouched


def test_suffix_picks_the_output_layout_and_an_empty_folder_is_reused(tmp_path):
    paths, _ = _mixed_inputs(tmp_path)
    ref = merge_checkpoints(paths, progress=False)
    assert torch.load(merge_checkpoints(paths, out=tmp_path / "m.bin", progress=False), weights_only=True).keys() == ref.keys()
    (tmp_path / "empty").mkdir()
    folder = merge_checkpoints(paths, out=tmp_path / "empty", progress=False)  # an existing empty folder: sharded
    assert sorted(os.listdir(folder)) == ["model.safetensors"]  # one shard: no index, as save_pretrained does
    assert all(torch.equal(load_file(folder / "model.safetensors")[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        merge_checkpoints(paths, out=folder, progress=False)


# ------------------------------------------------------------------ the format matrix
def _matrix_states(n: int = 4) -> list[dict[str, torch.Tensor]]:
    """``n`` small checkpoints: fp32 and bf16 tensors of several shapes, a 0-d one, an int buffer."""
    g = torch.Generator().manual_seed(7)
    states = []
    base = {"embed.weight": torch.randn(9, 4, generator=g), "block.w": torch.randn(3, 5, 2, generator=g),
            "block.b": torch.randn(5, generator=g), "scale": torch.randn((), generator=g)}
    for j in range(n):
        sd = {k: v + 0.1 * j * torch.randn(v.shape, generator=g) for k, v in base.items()}
        sd["block.w_bf16"] = (base["block.w"] * (1 + 0.05 * j)).to(torch.bfloat16)
        sd["steps"] = torch.tensor([10 * j, j], dtype=torch.int64)
        states.append(sd)
    return states


def _write_input(kind: str, sd: dict[str, torch.Tensor], path: Path) -> Path:
    """One checkpoint in the layout of input format ``kind`` (a key of ``readers.READERS``, or ``hf-sharded``)."""
    if kind == "safetensors":
        save_file(sd, str(path.with_suffix(".safetensors")))
        return path.with_suffix(".safetensors")
    if kind == "torch":
        torch.save(sd, path.with_suffix(".pt"))
        return path.with_suffix(".pt")
    path.mkdir()
    if kind == "hf":
        save_file(sd, str(path / "model.safetensors"))
    elif kind == "hf-sharded":  # what save_pretrained(max_shard_size=...) writes: shards and their index
        names = sorted(sd)
        shards = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for i, part in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: sd[k] for k in part}, str(path / fname))
            weight_map.update({k: fname for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif kind == "dcp":
        _dcp(path, {k: v.clone() for k, v in sd.items()})
    elif kind == "megatron":  # megatron-core's torch_dist layout, by plain DCP: + common state and metadata.json
        _dcp(path, {k: v.clone() for k, v in sd.items()})
        torch.save({"iteration": S_number(path), "checkpoint_version": 3.0}, path / "common.pt")
        (path / "metadata.json").write_text(json.dumps(MEGATRON_CONFIG))
    else:
        raise AssertionError(kind)
    return path


def _read_output(fmt: str, path: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if fmt == "safetensors":
        return load_file(str(path))
    if fmt == "torch":
        return torch.load(path, weights_only=True)
    if fmt == "sharded":
        return _read_sharded(path)
    if fmt == "dcp":
        return _dcp_load(path, like)
    if fmt == "megatron":  # a run folder: the iteration its tracker names
        iteration = int((path / "latest_checkpointed_iteration.txt").read_text())
        return _dcp_load(path / f"iter_{iteration:07d}", like)
    raise AssertionError(fmt)


#: Every input format (``hf`` twice: one file, or shards with an index) and every output format.
MATRIX_INPUTS = ("safetensors", "torch", "hf", "hf-sharded", "dcp", "megatron")
MATRIX_OUTPUTS = {"safetensors": "merged.safetensors", "torch": "merged.pt", "sharded": "merged", "dcp": "merged",
                  "megatron": "merged"}
#: megatron-core's ``metadata.json`` of a ``torch_dist`` checkpoint.
MEGATRON_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                   "common_backend_version": 1}


def test_every_format_has_a_matrix_row():
    """A new reader or output without a row here fails: the matrix below is what proves it merges right."""
    assert set(offline_readers.READERS) == {k.split("-")[0] for k in MATRIX_INPUTS}
    from wsm_optim.offline import writers

    assert set(writers.OUTPUTS) == set(MATRIX_OUTPUTS)


def test_readers_and_outputs_satisfy_their_protocols(tmp_path):
    from wsm_optim.offline import writers

    sd = _matrix_states(1)[0]
    for kind in MATRIX_INPUTS:
        reader = offline_readers.open_reader(_write_input(kind, sd, tmp_path / f"in-{kind}-1"))
        assert isinstance(reader, offline_readers.Reader), kind
        assert sorted(reader.names) == sorted(sd) and reader.meta("block.w_bf16") == ((3, 5, 2), torch.bfloat16), kind
    layout = [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    newest = tmp_path / "in-megatron-1"  # a Megatron output carries state from its newest input: it needs one
    for fmt in writers.OUTPUTS:
        out = writers.open_output(fmt, writers.OutputTarget(tmp_path / f"out-{fmt}", layout, newest_input=newest,
                                                            iteration=1))
        assert isinstance(out, writers.Output), fmt
    with pytest.raises(ValueError, match="--out-format: unknown 'npz'"):
        writers.open_output("npz", writers.OutputTarget(tmp_path / "x", layout))


@pytest.mark.parametrize("out_format", sorted(MATRIX_OUTPUTS))
@pytest.mark.parametrize("in_format", MATRIX_INPUTS)
def test_format_matrix_every_reader_into_every_output_matches_a_float64_merge(tmp_path, in_format, out_format):
    """Each cell: 4 checkpoints in one input format, merged into one output format, read back with the
    format's own loader, against sum_j c_j theta_j in float64 (Theorem 3.1 weights, 1-sqrt, k = 3)."""
    states = _matrix_states()
    # a Megatron output carries the newest input's extra and common state: its newest input is a Megatron one
    kinds = [in_format] * (len(states) - 1) + ["megatron" if out_format == "megatron" else in_format]
    paths = [_write_input(kind, sd, tmp_path / (f"iter_{j:07d}" if kind == "megatron" else f"step-{j}"))
             for j, (kind, sd) in enumerate(zip(kinds, states))]
    out = merge_checkpoints(paths, schedule="1-sqrt", out=tmp_path / MATRIX_OUTPUTS[out_format], out_format=out_format,
                            progress=False)
    got = _read_output(out_format, out, states[-1])
    assert sorted(got) == sorted(states[-1])
    c = S.coefficients_from_decay(S.decay_weights("1-sqrt", len(states) - 1))
    assert c.sum() == pytest.approx(1.0, abs=1e-12)
    for name, newest in states[-1].items():
        value = got[name]
        assert value.dtype == newest.dtype and value.shape == newest.shape, name
        if not newest.is_floating_point():
            assert torch.equal(value, newest), name  # never averaged: the newest checkpoint's
            continue
        exact = sum(float(cj) * sd[name].double() for cj, sd in zip(c, states))
        scale = sum(float(cj) * sd[name].double().abs() for cj, sd in zip(c, states))
        # fp32 accumulation of 4 terms (a few fp32 roundings of the terms' size), then one rounding to the dtype
        tol = torch.finfo(newest.dtype).eps * exact.abs() + 4 * torch.finfo(torch.float32).eps * scale
        err = (value.double() - exact).abs()
        assert (err <= tol).all(), (name, float(err.max()))
