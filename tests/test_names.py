"""Names: parameter names key every readout, merge names become keys and folders."""

import pytest
import torch
from torch import nn

from wsm_optim import WSMOptimizer


def _two_nets():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2)), nn.Sequential(nn.Linear(2, 1))


def test_duplicate_param_names_are_refused_not_dropped(tmp_path):
    # per-part learning rates / a GAN's two nets: both groups name their params "0.weight", "0.bias"
    gen, disc = _two_nets()
    inner = torch.optim.SGD([
        {"params": list(gen.named_parameters()), "lr": 0.1},
        {"params": list(disc.named_parameters()), "lr": 0.01},
    ])
    opt = WSMOptimizer(inner, window=4)
    for _ in range(2):
        (gen(torch.randn(5, 3)).sum() + disc(torch.randn(5, 2)).sum()).backward()
        opt.step()
        opt.zero_grad()
    for read in (opt.merged_state_dict, lambda: opt.save_merged(tmp_path / "m.safetensors")):
        with pytest.raises(ValueError) as info:
            read()
        message = str(info.value)
        assert "'0.weight'" in message and "'0.bias'" in message and "more than one parameter" in message
        assert "model=" in message  # the fix is named
    assert not (tmp_path / "m.safetensors").exists()


def test_unique_prefixed_names_read_every_param():
    gen, disc = _two_nets()
    inner = torch.optim.SGD([
        {"params": [(f"gen.{n}", p) for n, p in gen.named_parameters()], "lr": 0.1},
        {"params": [(f"disc.{n}", p) for n, p in disc.named_parameters()], "lr": 0.01},
    ])
    opt = WSMOptimizer(inner, window=4)
    (gen(torch.randn(5, 3)).sum() + disc(torch.randn(5, 2)).sum()).backward()
    opt.step()
    assert sorted(opt.merged_state_dict()) == ["disc.0.bias", "disc.0.weight", "gen.0.bias", "gen.0.weight"]


def test_duplicate_names_with_model_read_by_identity():
    gen, disc = _two_nets()
    both = nn.ModuleDict({"gen": gen, "disc": disc})
    inner = torch.optim.SGD([
        {"params": list(gen.named_parameters()), "lr": 0.1},
        {"params": list(disc.named_parameters()), "lr": 0.01},
    ])
    opt = WSMOptimizer(inner, window=4, model=both)
    (gen(torch.randn(5, 3)).sum() + disc(torch.randn(5, 2)).sum()).backward()
    opt.step()
    merged = opt.merged_state_dict()
    assert len(merged) == 4 and set(merged) == set(both.state_dict())


@pytest.mark.parametrize("name", ["../../x", "a/b", "a\\b", ".", "..", ".hidden", "", "with space", "x\0y", 3])
def test_merge_names_that_would_be_paths_are_refused(name):
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="names must be non-empty strings of letters, digits"):
        WSMOptimizer(torch.optim.SGD([p], lr=0.1), merges={name: dict(window=2)})


@pytest.mark.parametrize("name", ["default", "linear_1k", "cos-2.5k", "A9"])
def test_plain_merge_names_are_accepted(name):
    p = nn.Parameter(torch.zeros(2))
    assert WSMOptimizer(torch.optim.SGD([p], lr=0.1), merges={name: dict(window=2)}).merges == (name,)
