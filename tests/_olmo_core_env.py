"""A Python that imports ai2-olmo-core 3.0.0 next to this environment's torch (tests only).

ai2-olmo-core 3.0.0 needs ``cached-path``, which caps ``huggingface-hub<2``;
the test extras' transformers 5.x needs ``huggingface-hub>=2.4``: pip cannot
install both in one environment. The OLMo-core tests therefore run in a
virtualenv over this one (``--system-site-packages``: the same torch, numpy,
pytest) that adds ai2-olmo-core and an older huggingface-hub, built on first use
and reused afterwards (``~/.cache/wsm-optim-tests/olmo-core-3.0.0``; override
the folder with ``WSM_OPTIM_TEST_CACHE``). A file lock keeps parallel test
processes from building it twice. If this environment already imports
ai2-olmo-core 3.0.0, it is used as it is.

The virtualenv sees this environment's packages also when this one is itself a
virtualenv (a ``.pth`` file), checks that it imports the very torch this process
imports before pip runs, and pip is told to keep it (``torch==<its version>``),
so the build never fetches another torch (a CUDA wheel, say). If the virtualenv
cannot be built, the caller fails with the failing command's output.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

OLMO_CORE_VERSION = "3.0.0"
#: What the virtualenv adds on top of this environment.
REQUIREMENTS = (f"ai2-olmo-core=={OLMO_CORE_VERSION}", "huggingface-hub<2")
BUILD_TIMEOUT_S = 900


def _installed_olmo_core() -> str | None:
    try:
        return importlib.metadata.version("ai2-olmo-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_requirement() -> str:
    """``torch==X.Y.Z`` of the running torch (without a local tag such as ``+cpu``)."""
    import torch

    return "torch==" + torch.__version__.split("+")[0]


def cache_root() -> Path:
    base = os.environ.get("WSM_OPTIM_TEST_CACHE") or Path.home() / ".cache" / "wsm-optim-tests"
    return Path(base) / f"olmo-core-{OLMO_CORE_VERSION}"


def olmo_core_python() -> str:
    """Path of a Python interpreter that imports ``olmo_core`` 3.0.0 and this environment's torch.

    Raises ``RuntimeError`` with the failing command's output if the virtualenv cannot be built.
    """
    if _installed_olmo_core() == OLMO_CORE_VERSION:
        return sys.executable
    root = cache_root()
    python = root / "bin" / "python"
    ready = root / "READY"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists() and ready.read_text().strip() == _marker() and python.exists():
            return str(python)
        shutil.rmtree(root, ignore_errors=True)
        _run([sys.executable, "-m", "venv", "--system-site-packages", str(root)])
        _see_this_environment(python)
        same_torch = _same_torch_check()
        _run([str(python), "-c", same_torch])  # before pip: it must find this torch installed, not fetch one
        _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", torch_requirement(),
              *REQUIREMENTS])
        _run([str(python), "-c", "import olmo_core.train; " + same_torch])
        ready.write_text(_marker())
    return str(python)


def _marker() -> str:
    """What a ready virtualenv was built over: the torch requirement and the file of this torch."""
    import torch

    return f"{torch_requirement()} {torch.__file__}"


def _see_this_environment(python: Path) -> None:
    """Put this environment's site-packages on the virtualenv's path, after its own.

    ``--system-site-packages`` shows the *base* interpreter's packages; when the
    tests themselves run in a virtualenv, its packages (torch among them) would be
    missing, and pip would download another torch. A ``.pth`` file adds them,
    after the virtualenv's own site-packages, so its huggingface-hub still wins.
    """
    import site

    paths = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(p)]
    own = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "wsm_optim_tests_parent_env.pth").write_text("\n".join(paths) + "\n")


def _same_torch_check() -> str:
    """Python code that fails unless it imports the very torch this process imports."""
    import torch

    return (f"import torch; assert torch.__file__ == {torch.__file__!r}, "
            f"'the OLMo-core test environment imports another torch: ' + torch.__file__")


def _run(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(
            f"building the OLMo-core test environment failed: {' '.join(command)} exited {proc.returncode}\n"
            f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
