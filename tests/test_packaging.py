"""Packaging: the top-level ``kernels/`` folder shadows no installed package; wheels hold the whole library.

``kernels/`` installs as ``wsm_optim.kernels``. A PyPI package is also called
``kernels`` (transformers imports it), and a Python started in a clone's root
has the root first on ``sys.path``: the folder must never win there, neither in
this process's working directory nor in the one multi-rank workers start with.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import wsm_optim
from _dist_launch import worker_pythonpath

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, *, cwd: Path, pythonpath: str | None = None, timeout: float = 300) -> str:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _installed_kernels_package() -> Path:
    """Where the PyPI ``kernels`` package lives (it comes with transformers)."""
    spec = importlib.metadata.distribution("kernels")  # fails loudly if the test extras lack it
    return Path(spec.locate_file("kernels")).resolve()


def test_kernels_folder_is_a_namespace_portion():
    assert not (REPO / "kernels" / "__init__.py").exists(), "a regular package in kernels/ shadows PyPI's 'kernels'"
    assert (REPO / "wsm_optim" / "kernels").resolve() == (REPO / "kernels").resolve()


@pytest.mark.parametrize("where", ["repository root", "multi-rank worker"])
def test_import_kernels_from_the_repository_root_finds_the_installed_package(where):
    pythonpath = worker_pythonpath() if where == "multi-rank worker" else None
    out = _python(
        "import kernels, transformers\n"
        "from transformers import GPT2LMHeadModel\n"
        "import wsm_optim.kernels.wsm_update as k\n"
        "print(kernels.__file__); print(k.__file__)",
        cwd=REPO, pythonpath=pythonpath,
    )
    kernels_file, ours = out.split()
    assert Path(kernels_file).resolve().parent == _installed_kernels_package()
    assert Path(ours).resolve() == (REPO / "kernels" / "wsm_update.py").resolve()


def test_any_regular_kernels_package_later_on_the_path_wins(tmp_path):
    """Independent of PyPI's package: a namespace portion never beats a regular package, wherever it is."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("WHO = 'regular'\n")
    out = _python("import kernels; print(kernels.WHO)", cwd=REPO,
                  pythonpath=os.pathsep.join([str(REPO), str(tmp_path)]))
    assert out.strip() == "regular"


def test_collection_from_the_repository_root():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider"], cwd=REPO,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " error" not in proc.stdout.splitlines()[-1], proc.stdout[-4000:]


def test_version_comes_from_the_package_metadata():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert wsm_optim.__version__ == importlib.metadata.version("wsm-optim") == declared


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("wsm_optim-*.whl")
    return path


def test_wheel_holds_every_module_under_wsm_optim_and_no_top_level_kernels(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names} == {"wsm_optim", f"wsm_optim-{wsm_optim.__version__}.dist-info"}
    expected = {f"wsm_optim/{p.relative_to(REPO / 'wsm_optim').as_posix()}"
                for p in (REPO / "wsm_optim").rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {f"wsm_optim/kernels/{p.name}" for p in (REPO / "kernels").glob("*.py")}
    assert expected <= names, sorted(expected - names)
    assert "wsm_optim/kernels/wsm_update.py" in names
    assert f"wsm_optim-{wsm_optim.__version__}.dist-info/licenses/LICENSE" in names


def test_installed_wheel_imports_the_kernels_and_runs_the_cli(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = _python(
        "import torch, wsm_optim, wsm_optim.kernels.wsm_update, wsm_optim.core.backends.triton\n"
        "from wsm_optim import WSMOptimizer\n"
        "p = torch.nn.Parameter(torch.ones(3))\n"
        "opt = WSMOptimizer(torch.optim.SGD([p], lr=0.1), schedule='linear', window=2)\n"
        "p.grad = torch.ones(3); opt.step()\n"
        "print(wsm_optim.__file__); print(wsm_optim.kernels.wsm_update.__file__)",
        cwd=tmp_path, pythonpath=str(target),
    )
    for line in out.split():
        assert Path(line).resolve().is_relative_to(target.resolve()), out
    cli = subprocess.run([str(target / "bin" / "wsm-optim"), "--help"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)}, timeout=300)
    assert cli.returncode == 0 and "merge" in cli.stdout, cli.stdout + cli.stderr
