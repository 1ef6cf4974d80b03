"""Offline merge of checkpoint files: wsm_optim.merge_checkpoints and ``wsm-optim merge``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wsm_optim import WSMOptimizer, merge_checkpoints
from wsm_optim import schedules as S
from wsm_optim.cli import main as cli_main
from wsm_optim.offline.merge import (
    WEIGHT_SUM_ATOL,
    UnsafePickleWarning,
    checkpoint_weights,
    resolve_inputs,
    step_number,
)

REPO = Path(__file__).resolve().parents[1]


def _ckpt(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(6, 4, generator=g),
        "layer.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "norm.running_mean": torch.randn(4, generator=g, dtype=torch.float64),
        "norm.num_batches_tracked": torch.tensor(100 + seed),
        "mask": torch.tensor([True, seed % 2 == 0]),
    }


def _save(sd: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def _write(tmp_path: Path, n: int, suffix: str = ".safetensors", name="step_{}", wrap=None) -> list[Path]:
    paths = []
    for j in range(n):
        sd = _ckpt(j)
        paths.append(_save(wrap(sd) if wrap else sd, tmp_path / (name.format(j) + suffix)))
    return paths


def _expected(states: list[dict], c: np.ndarray) -> dict[str, torch.Tensor]:
    """Reference merge in float64, cast back to each input dtype; non-floats from the newest."""
    out = {}
    for k, v in states[-1].items():
        if v.is_floating_point():
            total = sum(float(cj) * s[k].double() for cj, s in zip(c, states))
            out[k] = total.to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def _assert_close(merged: dict, expected: dict, rtol=1e-6, atol=1e-6) -> None:
    assert sorted(merged) == sorted(expected)
    for k, v in expected.items():
        assert merged[k].dtype == v.dtype, k
        if v.is_floating_point():
            if v.dtype == torch.bfloat16:  # one bf16 rounding of the fp32 result
                torch.testing.assert_close(merged[k], v, rtol=8e-3, atol=1e-2)
            else:
                torch.testing.assert_close(merged[k], v, rtol=rtol, atol=atol)
        else:
            assert torch.equal(merged[k], v), k


# ------------------------------------------------------------ round trips
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("out_suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("schedule", ["1-sqrt", "ema"])
def test_round_trip_matches_weighted_sum(tmp_path, suffix, out_suffix, schedule):
    paths = _write(tmp_path, 4, suffix)
    out = tmp_path / ("merged" + out_suffix)
    assert merge_checkpoints(paths, schedule=schedule, out=out, progress=False) == out
    loaded = load_file(out) if out_suffix == ".safetensors" else torch.load(out, weights_only=True)
    c = S.merge_coefficients(schedule, 3)
    _assert_close(loaded, _expected([_ckpt(j) for j in range(4)], c))
    # in memory: the same dict
    _assert_close(merge_checkpoints(paths, schedule=schedule, progress=False), loaded, rtol=0, atol=0)


def test_default_schedule_is_uniform_mean_and_single_file_is_identity(tmp_path):
    paths = _write(tmp_path, 3)
    merged = merge_checkpoints(paths, progress=False)
    _assert_close(merged, _expected([_ckpt(j) for j in range(3)], np.full(3, 1 / 3)))
    one = merge_checkpoints(paths[:1], schedule="1-sqrt", progress=False)
    _assert_close(one, _ckpt(0), rtol=0, atol=0)
    np.testing.assert_array_equal(checkpoint_weights(1, "cosine"), [1.0])


def test_dtype_override_and_default_keeps_input_dtype(tmp_path):
    paths = _write(tmp_path, 2)
    default = merge_checkpoints(paths, progress=False)
    assert default["layer.bias"].dtype == torch.bfloat16
    assert default["norm.running_mean"].dtype == torch.float64
    half = merge_checkpoints(paths, dtype="bf16", progress=False)
    for k in ("layer.weight", "layer.bias", "norm.running_mean"):
        assert half[k].dtype == torch.bfloat16
    assert half["norm.num_batches_tracked"].dtype == torch.int64  # non-floats never cast
    torch.testing.assert_close(half["layer.weight"], default["layer.weight"].bfloat16(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="--dtype: unknown 'int8'"):
        merge_checkpoints(paths, dtype="int8", progress=False)


def test_non_float_tensors_come_from_newest_and_are_listed(tmp_path, capsys):
    paths = _write(tmp_path, 3)
    merged = merge_checkpoints(paths, schedule="1-sqrt", progress=False, verbose=True)
    assert merged["norm.num_batches_tracked"].item() == 102  # newest, not a weighted mean
    assert torch.equal(merged["mask"], torch.tensor([True, True]))
    out = capsys.readouterr().out
    assert "2 non-float tensors taken from the newest checkpoint (step_2.safetensors), not averaged" in out
    assert "norm.num_batches_tracked" in out and "mask" in out


def test_weights_table_printed_before_merging(tmp_path, capsys):
    paths = _write(tmp_path, 10)
    merge_checkpoints(paths, schedule="1-sqrt", out=tmp_path / "m.safetensors", progress=False, verbose=True)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "schedule '1-sqrt', Theorem 3.1 with k = 9" in lines[0]
    # docs/method.md check values for 1-sqrt, k = 9 (oldest first)
    c_printed = [float(ln.split()[2]) for ln in lines[2:12]]
    np.testing.assert_allclose(
        c_printed, [0.316, 0.131, 0.101, 0.085, 0.075, 0.067, 0.062, 0.058, 0.054, 0.051], atol=6e-4
    )
    assert out.index("c_j (merge)") < out.index("wrote ")


def test_explicit_weights_and_normalize(tmp_path):
    paths = _write(tmp_path, 3)
    merged = merge_checkpoints(paths, weights=[0.5, 0.0, 0.5], progress=False)
    _assert_close(merged, _expected([_ckpt(j) for j in range(3)], np.array([0.5, 0.0, 0.5])))
    scaled = merge_checkpoints(paths, weights=[2, 0, 2], normalize=True, progress=False)
    _assert_close(scaled, merged, rtol=0, atol=0)


# ---------------------------------------------------------------- refusals
def test_refuses_missing_key_naming_key_and_file(tmp_path):
    paths = _write(tmp_path, 3)
    sd = _ckpt(1)
    del sd["layer.bias"]
    _save(sd, paths[1])
    with pytest.raises(ValueError, match=r"key 'layer.bias' is missing from .*step_1\.safetensors"):
        merge_checkpoints(paths, progress=False)
    sd = _ckpt(1)
    sd["extra.weight"] = torch.zeros(2)
    _save(sd, paths[1])
    with pytest.raises(ValueError, match=r"key 'extra.weight' in .*step_1\.safetensors is missing from .*step_0"):
        merge_checkpoints(paths, progress=False)


def test_refuses_shape_and_dtype_mismatch(tmp_path):
    paths = _write(tmp_path, 3, ".pt")
    sd = _ckpt(2)
    sd["layer.weight"] = torch.zeros(4, 6)
    _save(sd, paths[2])
    with pytest.raises(ValueError, match=r"shape mismatch for key 'layer.weight': \[4, 6\] in .*step_2\.pt, \[6, 4\] in .*step_0\.pt"):
        merge_checkpoints(paths, progress=False)
    sd["layer.weight"] = torch.zeros(6, 4, dtype=torch.float16)
    _save(sd, paths[2])
    with pytest.raises(ValueError, match=r"dtype mismatch for key 'layer.weight': torch.float16 in .*step_2\.pt, torch.float32 in"):
        merge_checkpoints(paths, progress=False)


def test_refuses_empty_list(tmp_path):
    with pytest.raises(ValueError, match="no checkpoints given"):
        merge_checkpoints([], progress=False)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="empty checkpoint list: no checkpoint files"):
        merge_checkpoints(tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"empty checkpoint list: no files match --glob '\*.pt'"):
        merge_checkpoints(tmp_path, glob="*.pt", progress=False)


@pytest.mark.parametrize(
    "weights, normalize, message",
    [
        ([0.6, -0.1, 0.5], False, r"c_1 = -0.1 is negative"),
        ([0.5, 0.5], False, r"got 2 values for 3 checkpoints"),
        ([0.25, 0.25, 0.25, 0.25], False, r"got 4 values for 3 checkpoints"),
        ([0.3, 0.3, 0.3], False, r"sum to 0.9.*expected 1 \(absolute tolerance 1e-06\).*--normalize"),
        ([0.0, 0.0, 0.0], True, r"all weights are zero"),
        ([1.0, float("nan"), 0.0], True, r"c_1 = nan is negative or not finite"),
    ],
)
def test_refuses_bad_weights(tmp_path, weights, normalize, message):
    paths = _write(tmp_path, 3)
    with pytest.raises(ValueError, match=message):
        merge_checkpoints(paths, weights=weights, normalize=normalize, progress=False)


def test_weight_sum_tolerance_and_schedule_conflicts():
    ok = [0.5, 0.5 - WEIGHT_SUM_ATOL / 2]
    np.testing.assert_array_equal(checkpoint_weights(2, weights=ok), ok)
    with pytest.raises(ValueError, match="not both"):
        checkpoint_weights(2, "linear", [0.5, 0.5])
    with pytest.raises(ValueError, match="--normalize applies to explicit --weights only"):
        checkpoint_weights(2, "linear", normalize=True)
    with pytest.raises(ValueError, match="unknown name 'foo'"):
        checkpoint_weights(1, "foo")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("suffix, key", [(".safetensors", "layer.bias"), (".pt", "layer.weight"), (".pt", "norm.running_mean")])
def test_refuses_nan_inf_naming_file_and_key(tmp_path, bad, suffix, key):
    paths = _write(tmp_path, 3, suffix)
    sd = _ckpt(1)
    sd[key].view(-1)[2] = bad
    _save(sd, paths[1])
    kind = "1 NaN and 0 inf" if bad != bad else "0 NaN and 1 inf"
    with pytest.raises(ValueError, match=rf"step_1{suffix}: tensor '{key}' has {kind} values"):
        merge_checkpoints(paths, out=tmp_path / "m.safetensors", progress=False)
    assert not (tmp_path / "m.safetensors").exists()


def test_refuses_output_equal_to_an_input(tmp_path, monkeypatch):
    paths = _write(tmp_path, 2)
    before = paths[1].read_bytes()
    with pytest.raises(ValueError, match="is one of the input checkpoints"):
        merge_checkpoints(paths, out=paths[1], progress=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is one of the input checkpoints"):  # other spelling
        merge_checkpoints(paths, out=Path("sub/../step_1.safetensors"), progress=False)
    (tmp_path / "sub").mkdir()
    os.symlink(paths[0], tmp_path / "sub" / "link.safetensors")
    with pytest.raises(ValueError, match="is one of the input checkpoints"):
        merge_checkpoints(paths, out=tmp_path / "sub" / "link.safetensors", progress=False)
    assert paths[1].read_bytes() == before


def test_refuses_missing_output_dir_and_input(tmp_path):
    paths = _write(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="output directory .* does not exist"):
        merge_checkpoints(paths, out=tmp_path / "no" / "m.safetensors", progress=False)
    with pytest.raises(FileNotFoundError, match="missing.pt' does not exist"):
        merge_checkpoints([paths[0], tmp_path / "missing.pt"], progress=False)


# ----------------------------------------------------------------- pickles
class _Custom:
    """An arbitrary object: safe loading must refuse it."""


def test_refuses_arbitrary_pickle_unless_unsafe(tmp_path):
    paths = [
        _save({"model": _ckpt(j), "extra": _Custom()}, tmp_path / f"ck_{j}.pt") for j in range(2)
    ]
    with pytest.raises(ValueError, match=r"ck_0\.pt holds objects that safe loading .* refuses.*--unsafe-pickle"):
        merge_checkpoints(paths, key="model", progress=False)
    with pytest.warns(UnsafePickleWarning, match="runs any code") as record:
        merged = merge_checkpoints(paths, key="model", unsafe_pickle=True, progress=False)
    unsafe = [str(w.message) for w in record if w.category is UnsafePickleWarning]
    assert len(unsafe) == 2 and "ck_0.pt" in unsafe[0] and "ck_1.pt" in unsafe[1]  # once per file
    _assert_close(merged, _expected([_ckpt(0), _ckpt(1)], np.array([0.5, 0.5])))


def test_safe_files_load_without_warning_even_with_unsafe_flag(tmp_path):
    paths = _write(tmp_path, 2, ".pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_checkpoints(paths, unsafe_pickle=True, progress=False)


def test_unreadable_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match=r"cannot read .*junk\.pt"):
        merge_checkpoints([tmp_path / "junk.pt"], progress=False)
    with pytest.raises(ValueError, match=r"cannot read .*junk\.safetensors as a safetensors file"):
        merge_checkpoints([tmp_path / "junk.safetensors"], progress=False)


def test_legacy_torch_format_without_mmap(tmp_path):
    paths = []
    for j in range(2):
        paths.append(tmp_path / f"old_{j}.pt")
        torch.save(_ckpt(j), paths[-1], _use_new_zipfile_serialization=False)
    merged = merge_checkpoints(paths, progress=False)
    _assert_close(merged, _expected([_ckpt(0), _ckpt(1)], np.array([0.5, 0.5])))


# ------------------------------------------------------------- --key paths
def test_key_picks_sub_dict_and_dotted_paths(tmp_path):
    states = [_ckpt(j) for j in range(3)]
    flat = [_save({"model": s, "optimizer": {"lr": 0.1}, "step": j}, tmp_path / f"a_{j}.pt") for j, s in enumerate(states)]
    nested = [_save({"state": {"model": s}}, tmp_path / f"b_{j}.pt") for j, s in enumerate(states)]
    expected = _expected(states, np.full(3, 1 / 3))
    _assert_close(merge_checkpoints(flat, key="model", progress=False), expected)
    _assert_close(merge_checkpoints(nested, key="state.model", progress=False), expected)
    with pytest.raises(ValueError, match=r"entry 'model' is a dict, not a tensor; .*--key.*'optimizer'"):
        merge_checkpoints(flat, progress=False)
    with pytest.raises(ValueError, match=r"--key 'modle' not found in .*a_0\.pt; available keys: 'model', 'optimizer', 'step'"):
        merge_checkpoints(flat, key="modle", progress=False)
    with pytest.raises(ValueError, match=r"--key 'state.params' not found in .*b_0\.pt \(looking up 'params' inside 'state'\); available keys: 'model'"):
        merge_checkpoints(nested, key="state.params", progress=False)


def test_key_selects_prefix_in_safetensors(tmp_path):
    states = [_ckpt(j) for j in range(2)]
    paths = [
        _save({**{f"model.{k}": v for k, v in s.items()}, "ema.x": torch.zeros(3)}, tmp_path / f"s_{j}.safetensors")
        for j, s in enumerate(states)
    ]
    merged = merge_checkpoints(paths, key="model", progress=False)
    _assert_close(merged, _expected(states, np.array([0.5, 0.5])))
    with pytest.raises(ValueError, match=r"no tensor in .* is named 'opt\.\*'.*\['ema', 'model'\]"):
        merge_checkpoints(paths, key="opt", progress=False)


# --------------------------------------------------------------- ordering
def test_step_number_is_last_integer_without_extension():
    assert step_number("step_100.pt") == 100
    assert step_number("run3/ckpt-0200.safetensors") == 200
    assert step_number("iter_10/model.bin") == 10
    assert step_number("final.pt") is None


def test_glob_orders_by_step_number_not_text(tmp_path):
    for step in (100, 2, 10):
        _save({"w": torch.full((3,), float(step))}, tmp_path / f"ckpt_step{step}.safetensors")
    ordered = resolve_inputs(tmp_path, glob="ckpt_step*.safetensors")
    assert [p.name for p in ordered] == ["ckpt_step2.safetensors", "ckpt_step10.safetensors", "ckpt_step100.safetensors"]
    # The order reaches the merge: all weight on the oldest (step 2), none on the newest.
    merged = merge_checkpoints(tmp_path, glob="*.safetensors", weights=[0.75, 0.25, 0.0], progress=False)
    torch.testing.assert_close(merged["w"], torch.full((3,), 0.75 * 2 + 0.25 * 10))
    # default glob: every checkpoint suffix; subdirectories with '**'
    assert resolve_inputs(tmp_path) == ordered
    for step in (7, 30):
        (tmp_path / f"iter_{step}").mkdir()
        _save({"w": torch.zeros(3)}, tmp_path / f"iter_{step}" / "model.safetensors")
    nested = resolve_inputs(tmp_path, glob="iter_*/model.safetensors")
    assert [p.parent.name for p in nested] == ["iter_7", "iter_30"]


def test_glob_refuses_ambiguous_names(tmp_path):
    for name in ("a_10.pt", "b_10.pt"):
        _save({"w": torch.zeros(2)}, tmp_path / name)
    with pytest.raises(ValueError, match=r"ambiguous order: 'a_10.pt' and 'b_10.pt' both have step number 10"):
        resolve_inputs(tmp_path)
    (tmp_path / "b_10.pt").unlink()
    _save({"w": torch.zeros(2)}, tmp_path / "final.pt")
    with pytest.raises(ValueError, match=r"cannot order 'final.pt' by step number: its name has no integer"):
        resolve_inputs(tmp_path)
    with pytest.raises(ValueError, match="--glob needs a single directory"):
        resolve_inputs([tmp_path / "a_10.pt"], glob="*.pt")
    with pytest.raises(ValueError, match="not both"):
        resolve_inputs([tmp_path, tmp_path / "a_10.pt"])


def test_explicit_files_keep_given_order_but_warn_when_steps_decrease(tmp_path):
    paths = [_save({"w": torch.full((2,), float(s))}, tmp_path / f"step_{s}.pt") for s in (10, 100, 2)]
    with pytest.warns(UserWarning, match=r"not increasing: \[10, 100, 2\].*shell glob"):
        merged = merge_checkpoints(paths, weights=[1, 0, 0], progress=False)
    assert torch.equal(merged["w"], torch.full((2,), 10.0))  # the given order, oldest first


# --------------------------------------------------------------------- CLI
def test_cli_merge_and_errors(tmp_path, capsys):
    _write(tmp_path, 3, ".pt")
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    rc = cli_main(["merge", str(tmp_path), "--glob", "step_*.pt", "--schedule", "1-sqrt", "-o", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "c_j (merge)" in printed and f"wrote {out}" in printed
    c = S.merge_coefficients("1-sqrt", 2)
    _assert_close(load_file(out), _expected([_ckpt(j) for j in range(3)], c))
    args = ["merge", str(tmp_path), "--glob", "step_*.pt", "-o", str(out), "-q"]
    assert cli_main([*args, "--weights", "1,0,0"]) == 0
    only_oldest = {**_ckpt(0), "norm.num_batches_tracked": torch.tensor(102), "mask": torch.tensor([True, True])}
    _assert_close(load_file(out), only_oldest, rtol=0, atol=0)  # non-floats still from the newest
    assert capsys.readouterr().out == ""
    assert cli_main([*args, "--weights", "1,x,0"]) == 2
    assert "--weights: expected comma-separated numbers" in capsys.readouterr().err
    assert cli_main([*args, "--weights", "1,1,1"]) == 2
    assert "sum to 3, expected 1" in capsys.readouterr().err
    assert cli_main([*args, "--weights", "1,1,1", "--normalize", "--schedule", "cosine"]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli_main([*args, "--key", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wsm-optim merge: error: --key 'nope' not found") and "Traceback" not in err


def test_cli_prints_warnings_as_one_line(tmp_path, capsys):
    paths = [_save({"w": torch.zeros(2)}, tmp_path / f"step_{s}.pt") for s in (2, 1)]
    assert cli_main(["merge", *map(str, paths), "-o", str(tmp_path / "m.pt"), "-q"]) == 0
    assert "wsm-optim merge: warning: the files are merged in the order given" in capsys.readouterr().err


def test_cli_output_through_a_dangling_symlink_names_the_wrong_path(tmp_path, capsys):
    """The message names the link and its missing target directory, not the link's (existing) one."""
    paths = _write(tmp_path, 2)
    out = tmp_path / "out"
    out.mkdir()
    link = out / "merged.safetensors"
    link.symlink_to(tmp_path / "gone" / "merged.safetensors")
    assert cli_main(["merge", *map(str, paths), "-o", str(link), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"wsm-optim merge: error: output {str(link)!r} is a symlink to "
        f"{str(tmp_path / 'gone' / 'merged.safetensors')!r}, whose directory {str(tmp_path / 'gone')!r} does not exist"
    )
    (tmp_path / "gone").mkdir()  # once the directory exists, the merge is written through the link
    assert cli_main(["merge", *map(str, paths), "-o", str(link), "-q"]) == 0
    assert link.is_symlink()
    _assert_close(load_file(tmp_path / "gone" / "merged.safetensors"), _expected([_ckpt(0), _ckpt(1)], np.array([0.5, 0.5])))


def test_progress_in_a_log_is_plain_lines_not_a_frozen_bar(tmp_path, capsys):
    """stderr is not a terminal here, as in a log: a final plain line, no tqdm bar at 0%."""
    paths = _write(tmp_path, 3)
    merge_checkpoints(paths, progress=True, verbose=False)
    err = capsys.readouterr().err
    assert "0%|" not in err and "|" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("merging: 5/5 tensors (100%), elapsed 0:00:0"), err
    merge_checkpoints(paths, progress=False, verbose=False)
    assert capsys.readouterr().err == ""


def test_file_tools_do_not_import_the_training_engine():
    """The offline tool, the shared pieces and the CLIs must stay usable without the engine (wsm_optim.core)."""
    code = (
        "import sys, wsm_optim.offline, wsm_optim.offline.merge, wsm_optim.cli.merge, wsm_optim.cli.weights\n"
        "import wsm_optim.cli, wsm_optim.common.atomic, wsm_optim.offline.files\n"
        "import wsm_optim.offline.readers, wsm_optim.offline.writers, wsm_optim.offline.streaming\n"
        "print(sorted(m for m in sys.modules if m.startswith('wsm_optim.core.')))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    # import wsm_optim loads the engine's rule registry (stdlib only, filled in by the integrations), no more
    assert done.stdout.strip() == "['wsm_optim.core.callers']"


# ----------------------------------------------- consistency with the optimizer
@pytest.mark.parametrize("schedule, interval, start", [("1-sqrt", 2, 2), ("cosine", 1, 0), ("ema", 2, 1)])
def test_offline_merge_equals_streaming_optimizer(tmp_path, schedule, interval, start):
    k = 4
    window = k * interval
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = WSMOptimizer(
        torch.optim.AdamW(model.named_parameters(), lr=3e-2, weight_decay=0.1),
        schedule=schedule, window=window, interval=interval, start=start,
    )

    def save(step: int) -> None:
        sd = {n: p.detach().clone() for n, p in model.named_parameters()}
        save_file(sd, str(tmp_path / f"step_{step}.safetensors"))

    if start == 0:
        save(0)
    for step in range(1, start + window + 1):
        opt.zero_grad()
        x = torch.randn(32, 6)
        (model(x) - x[:, :3].sin()).square().mean().backward()
        opt.step()
        if step == start or (step > start and (step - start) % interval == 0):
            save(step)
    assert opt.merge_status()["complete"]
    files = resolve_inputs(tmp_path)
    assert len(files) == k + 1  # step_10 must sort after step_8
    offline = merge_checkpoints(tmp_path, schedule=schedule, progress=False)
    streaming = opt.merged_state_dict(torch.float32)
    assert sorted(offline) == sorted(streaming)
    for name, value in streaming.items():
        torch.testing.assert_close(offline[name], value, rtol=1e-6, atol=1e-7)
    # ... and the window really moved the weights (the check is not vacuous)
    first = load_file(files[0])
    assert max((first[n] - streaming[n]).abs().max().item() for n in streaming) > 1e-2


# ------------------------------------------------------------ memory claim
_MEMORY_CHILD = textwrap.dedent(
    """
    import sys
    import torch, safetensors.torch, tqdm.auto
    from wsm_optim.offline.merge import merge_checkpoints

    def peak():  # bytes
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec,
        # so the child would report pytest's own peak.
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

    before = peak()
    merge_checkpoints(sys.argv[1], out=sys.argv[2], schedule="1-sqrt", progress=False, verbose=False)
    print(before, peak())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc (Linux)")
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_streaming_peak_memory_independent_of_file_count(tmp_path, suffix):
    """Merging N = 8 files of S bytes costs about 2 S extra (accumulator + one file), not N S."""
    n_files, numel = 8, 12 * 2**20  # 48 MiB of fp32 per file, in 4 tensors
    file_bytes = numel * 4
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    g = torch.Generator().manual_seed(0)
    for j in range(n_files):
        sd = {f"w{i}": torch.randn(numel // 4, generator=g) for i in range(4)}
        _save(sd, ckpts / f"step_{j}{suffix}")
        del sd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(ckpts), str(tmp_path / f"merged{suffix}")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    before, after = map(int, result.stdout.split())
    extra = after - before
    print(f"peak extra {extra / 2**20:.0f} MiB = {extra / file_bytes:.2f} x file size ({suffix})")
    # Expected ~2 file sizes; loading all files would need >= 8. Generous bound: 4.
    assert extra < 4 * file_bytes, f"merge peak {extra / 2**20:.0f} MiB for {n_files} x {file_bytes / 2**20:.0f} MiB files"
    assert extra > 0.5 * file_bytes  # the measurement sees at least the accumulator


# ------------------------------------------------- overflow and corrupt files
@pytest.mark.parametrize("weights", [[1e308, 1e308], [1.7e308, 1.7e308, 0.0]])
def test_weights_whose_sum_overflows_are_refused(tmp_path, weights, capsys):
    paths = _write(tmp_path, len(weights))
    with pytest.raises(ValueError, match=r"--weights: the sum of the weights overflows float64 \(inf\)"):
        merge_checkpoints(paths, weights=weights, normalize=True, progress=False)
    out = tmp_path / "merged.safetensors"
    argv = ["merge", *map(str, paths), "--weights", ",".join(map(repr, weights)), "--normalize", "-o", str(out), "-q"]
    assert cli_main(argv) == 2
    assert "overflows float64" in capsys.readouterr().err
    assert not out.exists()
    # large but finite weights still normalize exactly
    merged = merge_checkpoints(paths, weights=[5e307] * len(weights), normalize=True, progress=False)
    _assert_close(merged, _expected([_ckpt(j) for j in range(len(weights))], np.full(len(weights), 1 / len(weights))))


def _corrupt_files(tmp_path: Path) -> dict[str, Path]:
    good = _save(_ckpt(0), tmp_path / "good_0.pt")
    legacy = tmp_path / "legacy_0.pt"
    torch.save(_ckpt(0), legacy, _use_new_zipfile_serialization=False)
    files = {
        "random": np.random.default_rng(0).bytes(1 << 14),
        "empty": b"",
        "text": b"this is not a checkpoint\n",
        "truncated-zip": good.read_bytes()[: good.stat().st_size // 2],
        "truncated-legacy": legacy.read_bytes()[: legacy.stat().st_size // 2],
    }
    raw = bytearray(good.read_bytes())  # flip bytes inside data.pkl: the zip's CRC no longer matches
    at = raw.find(b"data.pkl") + 40
    raw[at : at + 16] = bytes(b ^ 0xFF for b in raw[at : at + 16])
    files["flipped-pickle"] = bytes(raw)
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}_1.pt"
        paths[name].write_bytes(data)
    return paths


def test_corrupt_file_is_reported_as_corrupt_without_suggesting_unsafe_pickle(tmp_path, capsys):
    good = _save(_ckpt(0), tmp_path / "ok_0.pt")
    for name, bad in _corrupt_files(tmp_path).items():
        for unsafe in (False, True):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no UnsafePickleWarning for a file that is not a pickle
                with pytest.raises(ValueError) as info:
                    merge_checkpoints([good, bad], unsafe_pickle=unsafe, progress=False)
            msg = str(info.value)
            assert f"cannot read {bad}: the file is corrupt or not a torch.save checkpoint" in msg, (name, msg)
            assert "--unsafe-pickle" not in msg, (name, msg)
        out = tmp_path / "merged.pt"
        assert cli_main(["merge", str(good), str(bad), "-o", str(out), "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(bad) in err[0] and "corrupt" in err[0] and "--unsafe-pickle" not in err[0]
        assert not out.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
@pytest.mark.parametrize("legacy", [False, True])
def test_valid_pickle_refused_by_safe_loading_suggests_unsafe_pickle(tmp_path, legacy):
    """A well-formed file that weights_only refuses: a custom global, or an opcode it does not support."""
    extra = dict(_use_new_zipfile_serialization=False) if legacy else {}
    custom = tmp_path / "custom_0.pt"
    torch.save({"model": _ckpt(0), "extra": _Custom()}, custom, **extra)
    proto4 = tmp_path / "proto4_1.pt"
    torch.save({"model": _ckpt(1)}, proto4, pickle_protocol=4, **extra)  # FRAME opcodes: valid, but refused
    for path, reason in ((custom, "Unsupported global"), (proto4, "Unsupported operand")):
        with pytest.raises(ValueError) as info:
            merge_checkpoints([path], key="model", progress=False)
        msg = str(info.value)
        assert f"{path} holds objects that safe loading" in msg and reason in msg and "--unsafe-pickle" in msg
    with pytest.warns(UnsafePickleWarning):
        merged = merge_checkpoints([custom, proto4], key="model", unsafe_pickle=True, progress=False)
    _assert_close(merged, _expected([_ckpt(0), _ckpt(1)], np.array([0.5, 0.5])))


def test_numpy_array_schedule(tmp_path):
    """An explicit decay sequence given as a numpy array (no truth-value checks on it)."""
    w = np.array([0.6, 0.3])
    c = checkpoint_weights(3, w)
    assert c.tobytes() == S.merge_coefficients(w, 2).tobytes()
    paths = _write(tmp_path, 3)
    merged = merge_checkpoints(paths, schedule=w, progress=False, verbose=False)
    _assert_close(merged, _expected([_ckpt(j) for j in range(3)], c))
    with pytest.raises(ValueError, match="length 2, expected k = 1"):
        checkpoint_weights(2, w)
