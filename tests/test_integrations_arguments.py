"""The trainer integrations refuse bad merge arguments with exactly ``WSMOptimizer``'s error and message."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lightning")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from wsm_optim import WSMOptimizer  # noqa: E402
from wsm_optim.integrations.lightning import WSMCallback  # noqa: E402
from wsm_optim.integrations.transformers import wrap_trainer  # noqa: E402

BAD = {
    "window 0": dict(window=0),
    "window not a multiple of interval": dict(window=10, interval=3),
    "negative start": dict(window=4, start=-1),
    "window as a float": dict(window=4.0),
    "keep_last as a string": dict(window=4, keep_last="yes"),
    "schedule without window": dict(schedule="cosine"),
    "interval without window": dict(interval=2),
    "explicit weights without window": dict(schedule=np.array([0.5])),
    "unknown schedule": dict(schedule="cosinus", window=4),
    "window and merges": dict(window=4, merges={"a": dict(window=4)}),
    "schedule and merges": dict(schedule="cosine", merges={"a": dict(window=4)}),
    "empty merges": dict(merges={}),
    "merge without window": dict(merges={"a": dict(schedule="cosine")}),
    "unknown merge key": dict(merges={"a": dict(window=4, every=2)}),
    "bad merge name": dict(merges={"../x": dict(window=4)}),
    "bad window in a merge": dict(merges={"a": dict(window=4, interval=3)}),
    "unknown nonfinite": dict(window=4, nonfinite="ignore"),
    "unknown backend": dict(window=4, backend="cuda"),
    "merge_buffers as a string": dict(window=4, merge_buffers="yes"),
    "merge_buffers as an int": dict(window=4, merge_buffers=1),
    "merge_buffers None": dict(window=4, merge_buffers=None),
    "merge_buffers as a string, with merges": dict(merges={"a": dict(window=4)}, merge_buffers="False"),
}


def _error(make):
    with pytest.raises((TypeError, ValueError)) as caught:
        make()
    return type(caught.value), str(caught.value)


@pytest.mark.parametrize("case", list(BAD))
def test_integrations_raise_the_optimizers_error_for_the_same_bad_arguments(case, tmp_path):
    kwargs = BAD[case]
    param = torch.zeros(2, requires_grad=True)
    expected = _error(lambda: WSMOptimizer(torch.optim.SGD([param], lr=0.1), **kwargs))
    trainer = Trainer(
        model=GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=16, n_positions=4)),
        args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
    )
    assert _error(lambda: wrap_trainer(trainer, **kwargs)) == expected
    assert _error(lambda: WSMCallback(**kwargs)) == expected


def _tiny_trainer(tmp_path):
    return Trainer(
        model=GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=16, n_positions=4)),
        args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
    )


@pytest.mark.parametrize("kwargs", [dict(), dict(schedule="linear", interval=1, start=0, keep_last=False)])
def test_merge_buffers_without_merge_arguments_is_refused_by_the_integrations(kwargs, tmp_path):
    """Nothing to build a WSMOptimizer from: the flag would be silently dropped (a given WSMOptimizer keeps its own)."""
    for make in (lambda: wrap_trainer(_tiny_trainer(tmp_path), merge_buffers=True, **kwargs),
                 lambda: WSMCallback(merge_buffers=True, **kwargs)):
        error, message = _error(make)
        assert error is ValueError and "merge_buffers=True needs the merge arguments" in message
        assert "model=" in message  # the way with a WSMOptimizer built by the user


def test_merge_buffers_without_model_is_refused_by_the_optimizer():
    param = torch.zeros(2, requires_grad=True)
    error, message = _error(lambda: WSMOptimizer(torch.optim.SGD([param], lr=0.1), window=4, merge_buffers=True))
    assert error is ValueError and "merge_buffers=True needs model=" in message
