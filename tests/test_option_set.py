"""One option set: every integration takes exactly ``WSMOptimizer``'s options, the readouts one keyword set,
and backend names come from ``BACKENDS``.

Checked on the signatures, so adding an option to ``WSMOptimizer`` without its
integrations (or a readout keyword to one readout only) fails here.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing

import pytest
import torch

from wsm_optim import WSMOptimizer
from wsm_optim.core.backends import BACKEND_NAMES, BACKENDS
from wsm_optim.core.readout import READOUT_KEYWORDS
from wsm_optim.core.spec import WSMOptions
from wsm_optim.integrations import deepspeed as wds
from wsm_optim.integrations.lightning import WSMCallback
from wsm_optim.integrations.pipeline import merged_pipeline_state_dict
from wsm_optim.integrations.transformers import wrap_trainer

OPTIONS = {f.name: f.default for f in dataclasses.fields(WSMOptions)}
#: What each integration takes besides the options: its own settings.
OWN = {"WSMCallback": {"self", "merge", "swap_for_validation", "merged_after_fit"},
       "wrap_trainer": {"trainer", "save_merged"}}


def _parameters(fn) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


def test_wsm_optimizer_takes_exactly_the_option_set_with_its_defaults():
    params = _parameters(WSMOptimizer.__init__)
    assert set(params) == {"self", "inner", "model"} | set(OPTIONS)
    assert {n: params[n].default for n in OPTIONS} == OPTIONS


@pytest.mark.parametrize("entry", [WSMCallback.__init__, wrap_trainer], ids=["WSMCallback", "wrap_trainer"])
def test_trainer_integrations_take_exactly_the_options(entry):
    name = "WSMCallback" if entry is WSMCallback.__init__ else "wrap_trainer"
    params = _parameters(entry)
    assert set(params) - OWN[name] == set(OPTIONS), set(params) ^ (set(OPTIONS) | OWN[name])
    assert {n: params[n].default for n in OPTIONS} == OPTIONS


def test_torchtitan_config_fields_are_the_options():
    from wsm_optim.integrations.torchtitan import WSMConfig

    fields = {f.name: f.default for f in dataclasses.fields(WSMConfig)}
    assert fields == OPTIONS
    hints = typing.get_type_hints(WSMConfig)
    assert typing.get_args(hints["backend"]) == BACKEND_NAMES  # torchtitan's config parser reads the Literal


#: Run by the OLMo-core test environment's Python (ai2-olmo-core cannot be installed beside the test extras):
#: the callback's fields, their defaults, and the error a bad option raises through it.
_OLMO_CORE_DOOR = """
import dataclasses, json
from wsm_optim.integrations.olmo_core import WSMMergeCallback
try:
    WSMMergeCallback(window=4, offload="cpu", capturable=True)
    error = None
except ValueError as e:
    error = str(e)
fields = {f.name: f.default for f in dataclasses.fields(WSMMergeCallback)}
print(json.dumps({"fields": fields, "error": error}))
"""
#: What the OLMo-core callback takes besides the options: its own settings.
OLMO_CORE_OWN = {"output_suffix": "merged", "save_merged": True, "evaluate_merged": True, "enabled": True}


def test_olmo_core_callback_fields_are_the_options_with_their_defaults():
    import json
    import subprocess
    from pathlib import Path

    from _olmo_core_env import olmo_core_python

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([olmo_core_python(), "-c", _OLMO_CORE_DOOR], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)}, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["fields"] == {**OPTIONS, **OLMO_CORE_OWN}
    with pytest.raises(ValueError) as direct:
        WSMOptimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), window=4, offload="cpu",
                     capturable=True)
    assert got["error"] == str(direct.value)


def test_backend_names_come_from_the_backends_table():
    assert BACKEND_NAMES == ("auto", *[n for n in BACKENDS if n != "offload"])
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'foreach', 'triton'\)"):
        WSMOptimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), window=2, backend="cuda")


def _readouts():
    from wsm_optim.integrations.torchtitan import WSMOptimizersContainer

    return {
        "WSMOptimizer.merged_state_dict": WSMOptimizer.merged_state_dict,
        "WSMOptimizer.merged_weights": WSMOptimizer.merged_weights,
        "WSMOptimizer.save_merged": WSMOptimizer.save_merged,
        "deepspeed.merged_state_dict": wds.merged_state_dict,
        "deepspeed.merged_weights": wds.merged_weights,
        "merged_pipeline_state_dict": merged_pipeline_state_dict,
        "torchtitan.merged_state_dict": WSMOptimizersContainer.merged_state_dict,
        "torchtitan.merged_weights": WSMOptimizersContainer.merged_weights,
        "torchtitan.merged_model_state_dict": WSMOptimizersContainer.merged_model_state_dict,
        "torchtitan.save_merged_hf": WSMOptimizersContainer.save_merged_hf,
    }


@pytest.mark.parametrize("name", sorted(_readouts()))
def test_every_readout_takes_the_readout_keywords(name):
    params = _parameters(_readouts()[name])
    for keyword, default in READOUT_KEYWORDS.items():
        assert keyword in params, (name, keyword)
        assert params[keyword].kind is inspect.Parameter.KEYWORD_ONLY and params[keyword].default == default, name


def _trainer(tmp_path):
    from test_integrations_transformers import TRAIN, _args, _model
    from transformers import Trainer

    return Trainer(model=_model(), args=_args(tmp_path, eval_strategy="no"), train_dataset=TRAIN)


@pytest.mark.parametrize("door", ["WSMCallback", "wrap_trainer", "with_wsm"])
def test_integrations_refuse_a_bad_option_with_the_optimizers_message(door, tmp_path):
    """A rule of WSMOptimizer's options (offload='cpu' with capturable=True) holds through every door."""
    bad = dict(window=4, offload="cpu", capturable=True)
    with pytest.raises(ValueError) as direct:
        WSMOptimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), **bad)
    with pytest.raises(ValueError) as through:
        if door == "WSMCallback":
            WSMCallback(**bad)
        elif door == "wrap_trainer":
            wrap_trainer(_trainer(tmp_path), **bad)
        else:
            from torchtitan.components.optimizer import OptimizersContainer

            from wsm_optim.integrations.torchtitan import with_wsm

            with_wsm(OptimizersContainer.Config(), **bad)
    assert str(through.value).removeprefix("WSMConfig.") == str(direct.value)


def test_the_option_set_checks_what_the_constructor_checks():
    for bad in (dict(backend="cuda"), dict(nonfinite="ignore"), dict(offload="gpu"), dict(overlap="yes"),
                dict(window=3, interval=2), dict(merge_buffers=1), dict(offload="cpu", overlap=True)):
        kwargs = {"window": 4, **bad}
        with pytest.raises((TypeError, ValueError)) as direct:
            WSMOptimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), **kwargs)
        with pytest.raises(type(direct.value)) as through:
            WSMOptions(**kwargs).check()
        assert str(through.value) == str(direct.value), bad
