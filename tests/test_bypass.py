"""A WSMOptimizer that is never stepped while another optimizer trains its params stops the run, naming the fix.

Cases through plain torch (the Hugging Face Trainer + DeepSpeed case, where
transformers drops ``optimizers=(WSMOptimizer(...), None)``, runs in
``tests/test_deepspeed.py``).
"""

import copy
import gc

import pytest
import torch

from wsm_optim import WSMOptimizer


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(3, 6, generator=g)).square().sum().backward()


def _hooks(model):
    return sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())


@pytest.mark.parametrize("inner", [
    lambda ps: torch.optim.SGD(ps, lr=0.1),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0),
])
def test_stepping_the_inner_optimizer_raises_at_the_next_backward(inner):
    model = _model()
    opt = WSMOptimizer(inner(model.named_parameters()), window=4)
    _backward(model, 0)
    opt.inner.step()  # the mistake: the merge never sees this step
    opt.zero_grad()
    with pytest.raises(RuntimeError, match=r"WSMOptimizer.step\(\) has never been called") as e:
        _backward(model, 1)
    message = str(e.value)
    assert "wrap_trainer(trainer" in message and "parameter '" in message  # names the fix and the param
    assert opt.steps == 0
    assert _hooks(model) == 0  # raised once, then disarmed


def test_names_the_param_by_index_without_names():
    model = _model()
    opt = WSMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), window=4)
    _backward(model, 0)
    opt.inner.step()
    with pytest.raises(RuntimeError, match=r"parameter #\d \(shape"):
        _backward(model, 1)


def test_another_optimizer_over_the_same_params_is_caught():
    model = _model()
    kept = WSMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), window=4)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    _backward(model, 0)
    other.step()
    with pytest.raises(RuntimeError, match="another optimizer is training these params"):
        _backward(model, 1)
    assert kept.steps == 0


def test_gradient_accumulation_before_the_first_step_passes_and_the_first_step_disarms():
    """Backward passes without a param change are fine; the first step() removes every hook (no cost after)."""
    model, ref = _model(), _model()
    opt = WSMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), window=2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    assert _hooks(model) == len(list(model.parameters()))
    for step in range(4):
        for micro in range(3):
            _backward(model, 10 * step + micro)
            _backward(ref, 10 * step + micro)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert _hooks(model) == 0
    assert opt.steps == 4
    for p, q in zip(model.parameters(), ref.parameters()):  # the hooks never changed a gradient
        assert torch.equal(p, q)


def test_a_dropped_wsm_optimizer_guards_nothing():
    model = _model()
    opt = WSMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), window=4)
    del opt  # e.g. built to inspect a state dict; the run trains a plain optimizer
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(3):
        _backward(model, s)
        plain.step()
        plain.zero_grad()
    gc.collect()
    assert _hooks(model) == 0


def test_frozen_params_and_param_edits_without_a_backward_are_not_flagged():
    """A checkpoint loaded before training (no backward in between) is not a bypass."""
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = WSMOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), window=2)
    model.load_state_dict(_model(seed=3).state_dict())
    _backward(model, 0)
    opt.step()
    _backward(model, 1)  # after a step() the params may move: disarmed
    assert opt.steps == 1 and _hooks(model) == 0


def test_copies_step_and_the_original_stays_guarded():
    model = _model()
    opt = WSMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), window=2)
    twin = copy.deepcopy(opt)  # its own params, no guard
    twin.step()
    assert twin.steps == 1
    _backward(model, 0)
    opt.inner.step()
    with pytest.raises(RuntimeError, match="never been called"):
        _backward(model, 1)


def test_lightning_style_attribute_copy_shares_the_guard():
    """LightningOptimizer copies the wrapper's attributes and steps through them: that step disarms."""
    model = _model()
    opt = WSMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), window=2)

    class Forwarding:
        pass

    face = Forwarding()
    face.__dict__ = {k: v for k, v in opt.__dict__.items() if k != "step"}
    face.step = opt.step
    _backward(model, 0)
    face.step()
    _backward(model, 1)
    assert opt.steps == 1 and _hooks(model) == 0


def test_several_wsm_optimizers_over_one_model_one_of_them_stepped():
    """A second WSMOptimizer built to load and inspect a state dict, or one stepped while another waits, passes."""
    model = _model()
    trained = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=2)
    waiting = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=2)  # never stepped
    for s in range(3):
        _backward(model, s)
        trained.step()
        trained.zero_grad()
    inspected = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=2)
    inspected.load_state_dict(trained.state_dict())
    for s in range(3):
        _backward(model, 10 + s)
        trained.step()
        trained.zero_grad()
    assert trained.steps == 6 and waiting.steps == 0 and _hooks(model) == len(list(model.parameters()))  # waiting's


def test_a_loaded_optimizer_is_not_guarded():
    model = _model()
    source = WSMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), window=2)
    source.step()
    resumed = WSMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), window=2)
    resumed.load_state_dict(source.state_dict())
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(3):
        _backward(model, s)
        plain.step()
    assert _hooks(model) == 0
