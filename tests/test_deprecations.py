"""0.2 names keep working until 1.0, each with a ``DeprecationWarning`` naming today's name.

Module paths that moved into ``core/``, ``common/``, ``offline/``, ``cli/`` and
``integrations/`` import as the new modules themselves (one class, one
monkeypatch target); renamed functions return today's objects.
"""

import importlib
import subprocess
import sys
import warnings

import numpy as np
import pytest

from wsm_optim import _moved, schedules

#: Every module of the 0.2.0 wheel (wsm_optim/, demo aside) and a name it exported.
MODULES_02 = {
    "wsm_optim.optimizer": "WSMOptimizer", "wsm_optim.merge": "MergeSpec", "wsm_optim.nonfinite": "NonFiniteMergeError",
    "wsm_optim.persistence": "load", "wsm_optim.readout": "LiveParamsChangedWarning",
    "wsm_optim.registry": "Registry", "wsm_optim.runtime": "Runtime", "wsm_optim.selection": "evaluate_merges",
    "wsm_optim.distributed": "is_dtensor", "wsm_optim.backends": "select", "wsm_optim.backends.foreach": "accumulate",
    "wsm_optim.backends.triton": "TritonBackend", "wsm_optim.precision": "accumulator_dtype",
    "wsm_optim.progress": "Progress", "wsm_optim.warn": "warn", "wsm_optim.weights_cli": "run",
    "wsm_optim.io": "atomic_save", "wsm_optim.offline": "merge_checkpoints", "wsm_optim.cli": "main",
    "wsm_optim.schedules": "weights", "wsm_optim.integrations.lightning": "WSMCallback",
    "wsm_optim.integrations.transformers": "wrap_trainer",
}


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_a_moved_module_path_warns_once_and_is_the_new_module(old):
    home = _moved.MOVED[old]
    done = _fresh(f"import {old}")
    assert done.returncode != 0 and "DeprecationWarning" in done.stderr and "moved to" in done.stderr, done.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = importlib.import_module(old)
    if isinstance(home, str):
        assert module is importlib.import_module(home)
        assert module.__spec__.name == home  # its own spec: lazy relative imports inside it still resolve
    else:  # split in 0.3: every name of every new home answers
        for h in home:
            new = importlib.import_module(h)
            for name in getattr(new, "__all__", []):
                assert getattr(module, name) is getattr(new, name), (old, h, name)


@pytest.mark.parametrize("module, name", sorted(MODULES_02.items()))
def test_every_02_module_still_exports_its_names(module, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert getattr(importlib.import_module(module), name) is not None


def test_the_moved_classes_are_one_class():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from wsm_optim.merge import MergeSpec as old_spec
        from wsm_optim.optimizer import WSMOptimizer as old_opt
    from wsm_optim import MergeSpec, WSMOptimizer

    assert old_opt is WSMOptimizer and old_spec is MergeSpec


def test_todays_paths_do_not_warn():
    done = _fresh("import wsm_optim, wsm_optim.core.optimizer, wsm_optim.offline, wsm_optim.cli.merge, "
                  "wsm_optim.integrations.pipeline, wsm_optim.common.atomic\n"
                  "from wsm_optim import WSMOptimizer, MergeSpec, merge_checkpoints, evaluate_merges, unwrap")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("old, new", sorted(schedules._RENAMED.items()))
def test_renamed_schedule_functions_warn_and_are_todays(old, new):
    with pytest.warns(DeprecationWarning, match=f"schedules.{old} is now {new}"):
        assert getattr(schedules, old) is getattr(schedules, new)


def test_window_weights_table_warns_and_equals_coefficients():
    w = schedules.weights("1-sqrt", 12)
    with pytest.warns(DeprecationWarning, match=r"table\(\) is now .coefficients\(\)"):
        table = w.table()
    np.testing.assert_array_equal(table, w.coefficients())
    too_long = schedules.weights("ema", 10**12)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"MergeWeights.table\(\): k \+ 1 = 1000000000001"):
        too_long.table()  # its errors keep the old name


def test_backends_resolve_and_merge_state_warn():
    from wsm_optim.core import backends
    from wsm_optim.core.merge import MergeState
    from wsm_optim.core.spec import MergeSpec
    from wsm_optim.core.window import Position

    with pytest.warns(DeprecationWarning, match="backends.resolve is now select"):
        assert backends.resolve is backends.select
    spec = MergeSpec(schedule="linear", window=4)
    with pytest.warns(DeprecationWarning, match="MergeState is now"):
        state = MergeState("m", spec)
    assert isinstance(state, Position) and state.name == "m"


def test_unknown_names_still_raise_attribute_error():
    from wsm_optim.core import backends

    with pytest.raises(AttributeError):
        schedules.no_such_name  # noqa: B018
    with pytest.raises(AttributeError):
        backends.no_such_name  # noqa: B018
