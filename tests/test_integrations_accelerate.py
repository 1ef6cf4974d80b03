"""accelerate: ``accelerator.prepare(model, WSMOptimizer(...))``, then readouts through ``wsm_optim.unwrap``."""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402

from wsm_optim import WSMOptimizer, evaluate_merges, unwrap  # noqa: E402


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(7)]
    return model, data


def _train(model, opt, data, backward):
    for x, y in data:
        backward(nn.functional.mse_loss(model(x), y))
        opt.step()
        opt.zero_grad()


def test_prepared_optimizer_readouts_match_a_plain_loop_bitwise():
    model, data = _setup()
    plain = WSMOptimizer(torch.optim.AdamW(model.named_parameters(), lr=0.05), schedule="1-sqrt", window=4)
    _train(model, plain, data, lambda loss: loss.backward())

    accelerator = Accelerator(cpu=True)
    model_b, data_b = _setup()
    wsm = WSMOptimizer(torch.optim.AdamW(model_b.named_parameters(), lr=0.05), schedule="1-sqrt", window=4)
    model_b, prepared = accelerator.prepare(model_b, wsm)
    assert not isinstance(prepared, WSMOptimizer)  # accelerate's AcceleratedOptimizer around it
    assert unwrap(prepared) is wsm
    _train(model_b, prepared, data_b, accelerator.backward)

    assert unwrap(prepared).steps == plain.steps == len(data)
    merged, expected = unwrap(prepared).merged_state_dict(), plain.merged_state_dict()
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in merged)
    # swap and score through the wrapper; the live weights come back bit-exactly
    live = {k: v.clone() for k, v in model_b.state_dict().items()}
    x, y = data[0]

    def loss(m):
        with torch.no_grad():
            return float(nn.functional.mse_loss(m(x), y))

    scores = evaluate_merges(prepared, lambda: loss(model_b), include_live=True)
    assert scores.live == loss(model)
    assert all(torch.equal(v, live[k]) for k, v in model_b.state_dict().items())
    # resume through the wrapper: a new prepared pair loads the state and continues identically
    model_c, _ = _setup(seed=5)
    model_c.load_state_dict(model_b.state_dict())
    wsm_c = WSMOptimizer(torch.optim.AdamW(model_c.named_parameters(), lr=0.05), schedule="1-sqrt", window=4)
    model_c, prepared_c = accelerator.prepare(model_c, wsm_c)
    prepared_c.load_state_dict(copy.deepcopy(prepared.state_dict()))  # as torch.save would: no shared tensors
    _train(model_b, prepared, data_b[:3], accelerator.backward)
    _train(model_c, prepared_c, data_b[:3], accelerator.backward)
    assert unwrap(prepared_c).steps == len(data) + 3
    merged_b, merged_c = unwrap(prepared).merged_state_dict(), unwrap(prepared_c).merged_state_dict()
    assert all(torch.equal(merged_b[k], merged_c[k]) for k in merged_b)
