"""Offline merge inputs that are wrong in ways a loader does not notice: each is refused naming the input and
the entry (never merged silently, never a traceback); float8 tensors merge through fp32.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from wsm_optim.cli import main as cli_main
from wsm_optim.offline.merge import merge_checkpoints

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_dcp_direct import _save_chunks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _rewrite_metadata(folder: Path, edit) -> None:
    meta = folder / ".metadata"
    md = pickle.loads(meta.read_bytes())
    edit(md)
    meta.write_bytes(pickle.dumps(md))


def _two_row_chunks(folder: Path, seed: int) -> torch.Tensor:
    t = torch.randn(10, 3, generator=torch.Generator().manual_seed(seed)) * 100
    _save_chunks(folder, {"w": (t, [((0, 0), (5, 3)), ((5, 0), (5, 3))], False)})
    return t


def test_overlapping_dcp_chunks_are_refused(tmp_path):
    """Rows 0:5 listed twice and 5:10 missing add up to the right size, but rows 5:10 would never be read."""
    a, b = tmp_path / "a_1", tmp_path / "b_2"
    _two_row_chunks(a, 0), _two_row_chunks(b, 1)

    def overlap(md):
        chunks = md.state_dict_metadata["w"].chunks
        chunks[1] = chunks[0]

    _rewrite_metadata(b, overlap)
    with pytest.raises(ValueError, match=r"b_2: the \.metadata lists overlapping saved chunks of 'w'"):
        merge_checkpoints([a, b], out=tmp_path / "m.safetensors", progress=False)
    assert not (tmp_path / "m.safetensors").exists()


def test_a_dcp_chunk_without_storage_data_is_refused(tmp_path, capsys):
    a, b = tmp_path / "a_1", tmp_path / "b_2"
    _two_row_chunks(a, 0), _two_row_chunks(b, 1)

    def forget(md):
        md.storage_data = {k: v for k, v in md.storage_data.items() if tuple(k.offset) != (5, 0)}

    _rewrite_metadata(b, forget)
    with pytest.raises(ValueError, match=r"b_2: the \.metadata lists a saved chunk of 'w' at \[5, 0\] but says "
                                         r"nowhere in which file it is stored"):
        merge_checkpoints([a, b], out=tmp_path / "m.safetensors", progress=False)
    assert cli_main(["merge", str(a), str(b), "-o", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no storage_data entry" in err


def _hf_folder(folder: Path, weight_map, seed: int = 0) -> Path:
    folder.mkdir()
    save_file({"w": torch.randn(4, generator=torch.Generator().manual_seed(seed))},
              str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("weight_map, message", [
    (["w"], r"'weight_map' must map tensor names to shard files, got a list"),
    (None, r"'weight_map' must map tensor names to shard files, got a NoneType"),
    ({"w": 3}, r"'weight_map' maps 'w' to 3; expected a shard file name"),
    ({"w": "../outside.safetensors"}, r"'weight_map' maps 'w' to '../outside.safetensors', outside the checkpoint"),
    ({"w": "/tmp/outside.safetensors"}, r"'weight_map' maps 'w' to '/tmp/outside.safetensors', outside the"),
])
def test_a_malformed_or_escaping_index_is_refused_naming_the_file(tmp_path, capsys, weight_map, message):
    good = _hf_folder(tmp_path / "step_1", {"w": "model-00001-of-00001.safetensors"})
    save_file({"w": torch.full((4,), 7.0)}, str(tmp_path / "outside.safetensors"))
    bad = _hf_folder(tmp_path / "step_2", weight_map, seed=1)
    with pytest.raises(ValueError, match=r"step_2/model\.safetensors\.index\.json: " + message):
        merge_checkpoints([good, bad], out=tmp_path / "m.safetensors", progress=False)
    assert cli_main(["merge", str(good), str(bad), "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_the_same_checkpoint_twice_is_refused_naming_both(tmp_path):
    files = []
    for j in range(2):
        files.append(tmp_path / f"step_{j + 1}.safetensors")
        save_file({"w": torch.full((3,), float(j))}, str(files[-1]))
    with pytest.raises(ValueError, match=r"step_1\.safetensors' is given twice .*the same path"):
        merge_checkpoints([files[0], files[1], files[0]], progress=False)
    link = tmp_path / "step_3.safetensors"
    os.symlink(files[1], link)
    with pytest.raises(ValueError, match=r"'.*step_3\.safetensors' is given twice \('.*step_2\.safetensors' and "
                                         r"'.*step_3\.safetensors': both are"):
        merge_checkpoints([files[0], files[1], link], progress=False)
    with pytest.raises(ValueError, match=r"given twice"):  # a parent folder whose entries link to each other
        merge_checkpoints(tmp_path, progress=False)


def test_a_finite_merge_that_overflows_the_output_dtype_is_refused(tmp_path):
    files = []
    for j, v in enumerate([70000.0, 80000.0]):
        files.append(tmp_path / f"step_{j + 1}.safetensors")
        save_file({"w": torch.tensor([v, 1.0]), "b": torch.ones(2)}, str(files[-1]))
    out = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=r"tensor 'w': the merged value is finite \(largest magnitude 7\.5e\+04\) "
                                         r"but overflows when cast to torch\.float16; write it with a wider dtype"):
        merge_checkpoints(files, weights=[0.5, 0.5], dtype="fp16", out=out, progress=False)
    assert not out.exists()
    merged = merge_checkpoints(files, weights=[0.5, 0.5], dtype="fp32", progress=False)
    assert merged["w"].tolist() == [75000.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_tensors_merge_through_fp32(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    states, files = [], []
    for j in range(3):
        states.append({"w": (torch.randn(5, 4, generator=g) * 4).to(dtype), "b": torch.randn(4, generator=g)})
        files.append(tmp_path / f"step_{j + 1}.safetensors")
        save_file(states[-1], str(files[-1]))
    c = np.array([0.2, 0.3, 0.5])
    expected = sum(float(cj) * s["w"].double() for cj, s in zip(c, states))
    as_fp32 = merge_checkpoints(files, weights=c, dtype="fp32", progress=False)
    assert as_fp32["w"].dtype == torch.float32
    torch.testing.assert_close(as_fp32["w"].double(), expected, rtol=1e-6, atol=1e-6)
    out = tmp_path / "m.safetensors"
    merge_checkpoints(files, weights=c, out=out, progress=False)
    kept = load_file(str(out))["w"]
    assert kept.dtype == dtype  # the inputs' dtype by default: the fp32 merge rounded once
    assert torch.equal(kept, as_fp32["w"].to(dtype))
