"""The README's "Use with ..." snippets, extracted from README.md and run on tiny models.

Each block marked ``<!-- tested: NAME -->`` runs as written, in a fresh temporary
directory, after a preamble that defines what the README says is the user's
(``model``, ``loader``, ``evaluate``, datasets, ``LitModel``). Only the sizes in
``SCALE`` are replaced (each replaced text must occur in the snippet, so
the README cannot drift away from what runs): windows of 1000 steps and runs of
2000 steps would take minutes on CPU. ``torch.compile`` runs with
``backend="aot_eager"``: inductor needs ~50 s on 2 CPU cores for the first
compile of even a tiny model.
"""

import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = dict(re.findall(r"<!-- tested: (\w+) -->\n```python\n(.*?)```", README.read_text(), re.S))

SCALE = {
    "plain": {"window=1000": "window=4"},
    "compile": {"window=1000": "window=4", "@torch.compile\n": '@torch.compile(backend="aot_eager")\n'},
    "lightning": {"window=1000": "window=4"},
    "transformers": {
        "max_steps=2000": "max_steps=8", "warmup_steps=100": "warmup_steps=2", "eval_steps=500": "eval_steps=2",
        "save_steps=500": "save_steps=2", "window=1000": "window=4",
        "checkpoint-1000": "checkpoint-4", "checkpoint-1500": "checkpoint-6",
    },
    "accelerate": {"window=1000": "window=4"},
    "fsdp2": {"window=1000": "window=4"},
}

TORCH_PREAMBLE = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
_g = torch.Generator().manual_seed(1)
_x = torch.randn(24, 4, generator=_g)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(_x, _x.sum(1, keepdim=True).sin()), batch_size=4)

def evaluate(model):
    with torch.no_grad():
        return float(sum(nn.functional.mse_loss(model(x), y) for x, y in loader) / len(loader))
"""

LIGHTNING_PREAMBLE = TORCH_PREAMBLE + """
import lightning.pytorch as _L

class LitModel(_L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

train_loader = val_loader = loader
"""

TRANSFORMERS_PREAMBLE = """
import torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=64, n_positions=16,
                                   bos_token_id=0, eos_token_id=0))

class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        self.ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed))
    def __len__(self):
        return len(self.ids)
    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}

train_ds, eval_ds = _Tokens(32, 0), _Tokens(8, 1)
"""


def _code(name):
    if name == "__preamble__":
        return ""
    assert name in BLOCKS, f"README.md has no block marked <!-- tested: {name} -->"
    code = BLOCKS[name]
    for old, new in SCALE.get(name, {}).items():
        assert old in code, f"README snippet {name!r} no longer contains {old!r}: update SCALE"
        code = code.replace(old, new)
    return code


def _run(name, preamble, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(preamble + _code(name), f"README.md:{name}", "exec"), namespace)
    return namespace


def test_every_tested_block_is_covered():
    assert set(BLOCKS) == set(SCALE)


def test_plain_torch(tmp_path, monkeypatch):
    ns = _run("plain", TORCH_PREAMBLE, tmp_path, monkeypatch)
    assert ns["opt"].steps == len(ns["loader"])
    assert (tmp_path / "merged.safetensors").is_file()


def test_torch_compile(tmp_path, monkeypatch):
    torch._dynamo.reset()
    ns = _run("compile", TORCH_PREAMBLE, tmp_path, monkeypatch)
    assert ns["opt"].steps == len(ns["loader"])  # every compiled step counted
    assert set(ns["merged"]) == set(ns["model"].state_dict())


def test_lightning(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    ns = _run("lightning", LIGHTNING_PREAMBLE, tmp_path, monkeypatch)
    callback = next(cb for cb in ns["trainer"].callbacks if type(cb).__name__ == "WSMCallback")
    assert callback.optimizer.steps == 5 * len(ns["loader"])
    last = torch.load(ns["best"].last_model_path, weights_only=False)
    merged, live = last["state_dict"], last["current_model_state"]
    assert merged.keys() == live.keys() and not all(torch.equal(merged[k], live[k]) for k in merged)
    assert type(ns["merged_model"]).__name__ == "LitModel"


def test_transformers(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    ns = _run("transformers", TRANSFORMERS_PREAMBLE, tmp_path, monkeypatch)
    assert (tmp_path / "out" / "checkpoint-8" / "merged" / "config.json").is_file()
    assert any("eval_merged_loss" in h for h in ns["trainer"].state.log_history)
    assert ns["trainer"].state.global_step == 8


def test_accelerate(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    ns = _run("accelerate", TORCH_PREAMBLE, tmp_path, monkeypatch)
    assert ns["wsm"].steps == len(ns["loader"])
    assert (tmp_path / "merged.safetensors").is_file()
    # the resume the comment promises: a fresh accelerator, model and optimizer load the state exactly
    from accelerate import Accelerator

    import wsm_optim

    fresh = _run("__preamble__", TORCH_PREAMBLE, tmp_path, monkeypatch)["model"]
    torch.nn.init.zeros_(fresh[0].weight)
    accelerator = Accelerator()
    opt = wsm_optim.WSMOptimizer(torch.optim.AdamW(fresh.named_parameters(), lr=1e-3), window=4)
    fresh, opt = accelerator.prepare(fresh, opt)
    accelerator.load_state("ckpt")
    assert wsm_optim.unwrap(opt).steps == ns["wsm"].steps
    expected, got = ns["wsm"].merged_state_dict(), wsm_optim.unwrap(opt).merged_state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_one_rank(tmp_path):
    """As ``torchrun --nproc-per-node=1`` would run it (gloo on CPU), in a subprocess."""
    script = tmp_path / "train.py"
    script.write_text(TORCH_PREAMBLE + _code("fsdp2") + textwrap.dedent("""
        assert opt.steps == len(loader), opt.steps
        assert set(full) == {n for n, _ in model.named_parameters()}
    """))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(README.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "merged.safetensors").is_file() and (tmp_path / "ckpt").is_dir()
