"""Crash-safe writing: wsm_optim.io.atomic_save and WSMOptimizer.save_merged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file
from torch import nn

from wsm_optim import WSMOptimizer
from wsm_optim.common import atomic


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(16, 8, generator=g),
        "b": torch.randn(8, generator=g).to(torch.bfloat16),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


def _load(path):
    return load_file(path) if str(path).endswith(".safetensors") else torch.load(path, weights_only=True)


def _assert_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt", "m.bin", "m.pth", "model_no_suffix"])
def test_round_trip_and_format_by_suffix(tmp_path, name):
    path = tmp_path / name
    assert atomic.atomic_save(_state(), path) == path
    expected = "torch" if name.endswith((".pt", ".bin", ".pth")) else "safetensors"
    assert atomic.infer_format(path) == expected
    loaded = torch.load(path, weights_only=True) if expected == "torch" else load_file(path)
    _assert_equal(loaded, _state())
    assert os.listdir(tmp_path) == [name]


def test_explicit_format_and_metadata(tmp_path):
    path = tmp_path / "x.bin"
    atomic.atomic_save(_state(), path, format="safetensors", metadata={"note": "hi"})
    _assert_equal(load_file(path), _state())
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata() == {"note": "hi"}
    with pytest.raises(ValueError, match="format must be one of"):
        atomic.atomic_save(_state(), tmp_path / "y.pt", format="npz")


def test_safetensors_accepts_tied_views_and_noncontiguous(tmp_path):
    base = torch.randn(6, 4)
    state = {"a": base, "tied": base, "t": base.t(), "row": base[2], "cols": base[:, 1:3]}
    path = tmp_path / "v.safetensors"
    atomic.atomic_save(state, path)
    loaded = load_file(path)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    assert base.shape == (6, 4)  # the caller's tensors are untouched


def test_safetensors_refuses_non_tensor_value(tmp_path):
    with pytest.raises(TypeError, match="entry 'step' is a int"):
        atomic.atomic_save({"w": torch.ones(2), "step": 3}, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic.atomic_save(_state(), tmp_path / "nope" / "x.safetensors")


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic.atomic_save(_state(), tmp_path / "p.safetensors")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644  # not mkstemp's 0o600


def _partial_then_fail(exc: BaseException):
    """A writer that puts some bytes into the temp file, then dies (a crash mid-write)."""

    def write(*args, **kwargs):
        target = args[1]
        if hasattr(target, "write"):
            target.write(b"PARTIAL" * 100)
            target.flush()
        else:
            with open(target, "wb") as f:
                f.write(b"PARTIAL" * 100)
        raise exc

    return write


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt"])
@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
@pytest.mark.parametrize("previous", [True, False])
def test_failure_mid_write_leaves_previous_file_and_no_temp(tmp_path, monkeypatch, name, exc, previous):
    path = tmp_path / name
    if previous:
        atomic.atomic_save(_state(seed=1), path)
        before = path.read_bytes()
    # Patch the library writers themselves, so the real atomic_save code path runs.
    if name.endswith(".safetensors"):
        monkeypatch.setattr(safetensors.torch, "save_file", _partial_then_fail(exc))
    else:
        monkeypatch.setattr(torch, "save", _partial_then_fail(exc))
    with pytest.raises(type(exc)):
        atomic.atomic_save(_state(seed=2), path)
    if previous:
        assert path.read_bytes() == before
        _assert_equal(_load(path), _state(seed=1))
        assert os.listdir(tmp_path) == [name]
    else:
        assert os.listdir(tmp_path) == []


def test_failure_at_rename_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    atomic.atomic_save(_state(seed=1), path)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic.atomic_save(_state(seed=2), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_fsync_file_before_rename_then_directory(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else "?"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    path = tmp_path / "m.safetensors"
    atomic.atomic_save(_state(), path)
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"]
    if events[0][1] != "?":
        tmp_name = os.path.basename(events[0][1])
        assert tmp_name.startswith(".m.safetensors.") and tmp_name.endswith(".tmp")
        assert events[2][1] == str(tmp_path)


def _trained_optimizer(model: nn.Module) -> WSMOptimizer:
    torch.manual_seed(0)
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), schedule="1-sqrt", window=3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 5)).square().mean().backward()
        opt.step()
    return opt


@pytest.mark.parametrize("name", ["merged.safetensors", "merged.pt"])
def test_save_merged_writes_merged_state_dict(tmp_path, name):
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = _trained_optimizer(model)
    path = opt.save_merged(tmp_path / name)
    _assert_equal(_load(path), opt.merged_state_dict())
    path = opt.save_merged(tmp_path / name, torch.bfloat16)  # overwrite, other dtype
    _assert_equal(_load(path), opt.merged_state_dict(torch.bfloat16))
    assert os.listdir(tmp_path) == [name]


def test_save_merged_with_model_and_tied_weights(tmp_path):
    model = nn.Sequential(nn.Linear(5, 5, bias=False), nn.BatchNorm1d(5), nn.Linear(5, 5, bias=False))
    model[2].weight = model[0].weight  # tied: one parameter under two keys
    opt = _trained_optimizer(model)
    path = opt.save_merged(tmp_path / "tied.safetensors", model=model)
    loaded = load_file(path)
    expected = opt.merged_state_dict(model=model)
    _assert_equal(loaded, expected)
    assert torch.equal(loaded["0.weight"], loaded["2.weight"])
    fresh = nn.Sequential(nn.Linear(5, 5, bias=False), nn.BatchNorm1d(5), nn.Linear(5, 5, bias=False))
    fresh.load_state_dict(loaded, strict=True)


def test_save_merged_failure_keeps_previous(tmp_path, monkeypatch):
    model = nn.Linear(5, 2)
    opt = _trained_optimizer(model)
    path = opt.save_merged(tmp_path / "m.safetensors")
    before = path.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _partial_then_fail(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        opt.save_merged(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


# ------------------------------------------------- symlinks and permissions
@pytest.mark.parametrize("name", ["m.safetensors", "m.pt"])
def test_save_through_a_symlink_writes_the_target_and_keeps_the_link(tmp_path, name):
    real = tmp_path / "store" / name
    real.parent.mkdir()
    atomic.atomic_save(_state(0), real)
    link = tmp_path / ("link_" + name)
    link.symlink_to(Path("store") / name)  # relative, as `ln -s` users write it
    atomic.atomic_save(_state(1), link)
    assert link.is_symlink() and os.readlink(link) == str(Path("store") / name)
    _assert_equal(_load(real), _state(1))  # the file the link points to has the new content
    assert sorted(os.listdir(real.parent)) == [name] and sorted(os.listdir(tmp_path)) == sorted(["store", link.name])


def test_save_merged_through_a_symlink_chain_keeps_mode_0600(tmp_path):
    model = nn.Linear(5, 2)
    opt = _trained_optimizer(model)
    real = tmp_path / "real.safetensors"
    atomic.atomic_save(_state(0), real)
    os.chmod(real, 0o600)
    hop = tmp_path / "hop.safetensors"
    hop.symlink_to(real)
    link = tmp_path / "link.safetensors"
    link.symlink_to(hop)
    opt.save_merged(link)
    assert link.is_symlink() and hop.is_symlink()
    _assert_equal(load_file(real), opt.merged_state_dict())
    assert (real.stat().st_mode & 0o777) == 0o600


def test_existing_file_keeps_its_mode_new_file_follows_umask(tmp_path):
    path = atomic.atomic_save(_state(0), tmp_path / "m.pt")
    os.chmod(path, 0o640)
    atomic.atomic_save(_state(1), path)
    assert (path.stat().st_mode & 0o777) == 0o640
    _assert_equal(_load(path), _state(1))


def test_dangling_symlink_is_written_through_or_names_the_missing_directory(tmp_path):
    link = tmp_path / "out.safetensors"
    link.symlink_to(tmp_path / "later.safetensors")  # target does not exist yet: created, like open(link, "w")
    atomic.atomic_save(_state(0), link)
    assert link.is_symlink()
    _assert_equal(load_file(tmp_path / "later.safetensors"), _state(0))
    broken = tmp_path / "broken.safetensors"
    broken.symlink_to(tmp_path / "gone" / "x.safetensors")
    with pytest.raises(FileNotFoundError) as info:
        atomic.atomic_save(_state(0), broken)
    assert str(info.value) == (
        f"atomic_save: output {str(broken)!r} is a symlink to {str(tmp_path / 'gone' / 'x.safetensors')!r}, "
        f"whose directory {str(tmp_path / 'gone')!r} does not exist"
    )
    assert broken.is_symlink()


# ----------------------------------------------- stale temp files after kill -9
_BLOCKED_WRITER = r"""
import sys, time
from pathlib import Path
import torch
from wsm_optim.common import atomic

target, flag = Path(sys.argv[1]), Path(sys.argv[2])


class Block:
    "Pickled by torch.save inside atomic_save: signals, then blocks until the process is killed."

    def __reduce__(self):
        flag.write_text("writing")
        time.sleep(600)
        return (int, ())


atomic.atomic_save({"w": torch.ones(1 << 16), "block": Block()}, target)
"""


def _start_blocked_writer(target, flag):
    """A real process inside atomic_save(target), stopped mid-write; returns it once its temp file exists."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_WRITER, str(target), str(flag)],
        env=env,
        stdout=subprocess.DEVNULL,  # a leaked child must not hold pytest's output open
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not flag.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"writer exited or hung before writing (rc {proc.returncode})")
        time.sleep(0.05)
    return proc


def _temps(directory, name):
    return sorted(n for n in os.listdir(directory) if n.startswith(f".{name}.") and n.endswith(".tmp"))


def test_kill_9_mid_write_leaves_old_file_and_next_write_removes_the_stale_temp(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "m.pt"
    atomic.atomic_save(_state(seed=1), target)
    before = target.read_bytes()
    proc = _start_blocked_writer(target, tmp_path / "flag")
    try:
        (stale,) = _temps(out, "m.pt")
        assert f"{atomic.TEMP_MARKER}-" in stale and f"-{proc.pid}-" in stale  # recognisable: marker, writer pid
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()  # reaped: its pid no longer exists
    assert target.read_bytes() == before  # the crash left the previous file intact
    assert _temps(out, "m.pt") == [stale]  # and, until the next write, its temp file
    atomic.atomic_save(_state(seed=2), target)
    assert sorted(os.listdir(out)) == ["m.pt"]
    _assert_equal(_load(target), _state(seed=2))


def test_live_writers_temp_file_is_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "m.pt"
    proc = _start_blocked_writer(target, tmp_path / "flag")
    try:
        (live,) = _temps(out, "m.pt")
        atomic.atomic_save(_state(seed=3), target)  # another process writes the same target meanwhile
        assert _temps(out, "m.pt") == [live]
        assert atomic.remove_stale_temp_files(target) == []
        _assert_equal(_load(target), _state(seed=3))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert atomic.remove_stale_temp_files(target) == [out / live]


def test_only_our_own_stale_temp_files_for_that_target_are_removed(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # a pid that existed and is gone
    host = atomic._host_id()
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    ours = f".m.pt.{atomic.TEMP_MARKER}-{host}-{dead}-abc_123.tmp"
    untouched = [
        ".m.pt.k3j4h5g6.tmp",  # an earlier version's temp name: writer unknown
        f".m.pt.{atomic.TEMP_MARKER}-{other_host}-{dead}-abc.tmp",  # another host sharing the directory
        f".other.pt.{atomic.TEMP_MARKER}-{host}-{dead}-abc.tmp",  # another target
        f".m.pt.{atomic.TEMP_MARKER}-{host}-{os.getpid()}-abc.tmp",  # this live process (another thread)
        f"m.pt.{atomic.TEMP_MARKER}-{host}-{dead}-abc.tmp",  # not hidden: not ours
        f".m.pt.{atomic.TEMP_MARKER}-{host}-{dead}-abc.tmp.bak",
    ]
    for name in [ours, *untouched]:
        (tmp_path / name).write_bytes(b"partial")
    atomic.atomic_save(_state(), tmp_path / "m.pt")
    assert sorted(os.listdir(tmp_path)) == sorted(["m.pt", *untouched])


def test_long_target_name_still_writes_and_cleans_up(tmp_path):
    name = "é" * 120 + ".pt"  # 243 bytes: with the temp-name decorations it would pass 255
    target = tmp_path / name
    atomic.atomic_save(_state(seed=4), target)
    _assert_equal(_load(target), _state(seed=4))
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = f"{atomic._temp_stem(target)}{int(done.stdout)}-x.tmp"
    assert len(stale.encode()) < 255
    (tmp_path / stale).write_bytes(b"partial")
    atomic.atomic_save(_state(seed=5), target)
    assert os.listdir(tmp_path) == [name]


# ------------------------------------------------- folders: complete or not at all
def test_atomic_directory_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
            assert not target.exists()
            raise RuntimeError("mid-write")
    assert os.listdir(tmp_path) == []  # neither the folder nor its temporary twin
    old = os.umask(0o022)
    try:
        with atomic.atomic_directory(target) as tmp:
            (tmp / "a.json").write_text("{}")
    finally:
        os.umask(old)
    assert os.listdir(tmp_path) == ["merged"] and os.listdir(target) == ["a.json"]
    assert (target.stat().st_mode & 0o777) == 0o755  # as mkdir would make it, not mkdtemp's 0o700
    with pytest.raises(ValueError, match="exists and is not empty"):
        with atomic.atomic_directory(target):
            pass
    assert os.listdir(target) == ["a.json"]


def test_atomic_directory_filled_by_another_writer_meanwhile_is_left_as_it_is(tmp_path):
    """Two merges to one new path: the one that finishes second is refused in one line (was an OSError traceback
    from rmdir) and removes only its own temporary folder."""
    target = tmp_path / "merged"
    with pytest.raises(ValueError, match=r"output '.*merged' was created by another writer .* choose a new path"):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "mine.safetensors").write_bytes(b"mine")
            target.mkdir()
            (target / "theirs.safetensors").write_bytes(b"theirs")
    assert os.listdir(tmp_path) == ["merged"] and os.listdir(target) == ["theirs.safetensors"]
    with pytest.raises(ValueError, match="was created by another writer"):
        with atomic.atomic_directory(tmp_path / "file") as tmp:
            (tmp_path / "file").write_text("theirs")  # a file in the way: rename says NotADirectoryError
    assert (tmp_path / "file").read_text() == "theirs" and sorted(os.listdir(tmp_path)) == ["file", "merged"]


def test_stale_temp_directory_of_a_dead_writer_is_removed(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{atomic._temp_stem(tmp_path / 'merged')}{int(done.stdout)}-abc.tmp"
    live = tmp_path / f"{atomic._temp_stem(tmp_path / 'merged')}{os.getpid()}-abc.tmp"
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    with atomic.atomic_directory(tmp_path / "merged") as tmp:
        (tmp / "x").write_text("1")
    assert sorted(os.listdir(tmp_path)) == sorted(["merged", live.name])
