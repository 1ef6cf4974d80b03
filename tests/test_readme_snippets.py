"""The Python snippets of README.md and docs/*.md, extracted and run on tiny models; and their links.

Each block marked ``<!-- tested: NAME -->`` (in README.md or any ``docs/**/*.md``
page; names are unique across files) runs as written, in a fresh temporary
directory, after a preamble that defines what the page says is the user's
(``model``, ``loader``, ``evaluate``, datasets, ``LitModel``). Only the texts in
``SCALE`` are replaced (each replaced text must occur in the snippet, so the
page cannot drift away from what runs): windows of 1000 steps and runs of
2000 steps would take minutes on CPU, and a ``...  # train`` placeholder
becomes a short training loop. ``torch.compile`` runs with
``backend="aot_eager"``: inductor needs ~50 s on 2 CPU cores for the first
compile of even a tiny model.

Every relative link (``[text](path#anchor)``, images included) in README.md and
``docs/**/*.md`` must point to an existing file, and an anchor into a Markdown
file to one of its headings (GitHub's heading slugs).
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

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
TESTED = re.compile(r"<!-- tested: (\w+) -->\n```python\n(.*?)```", re.S)


def _collect_blocks(pages):
    blocks: dict[str, tuple[Path, str]] = {}
    for page in pages:
        for name, code in TESTED.findall(page.read_text()):
            assert name not in blocks, f"block {name!r} is marked in both {blocks[name][0]} and {page}"
            blocks[name] = (page, code)
    return blocks


BLOCKS = _collect_blocks(PAGES)

#: The blocks this file executed when they all lived in README.md (before the README was split
#: into docs/ pages): each must still exist somewhere and run.
EXECUTED_BEFORE_SPLIT = {"plain", "compile", "lightning", "transformers", "accelerate", "fsdp2"}

SCALE = {
    "quickstart": {"window=1000": "window=4"},
    "usage": {"window=1000": "window=4", "/ 500))": "/ 2))"},
    "several_merges": {},
    "evaluate_merges": {
        "window=1000": "window=2", "window=4000": "window=4",
        "...                                                      # train\n":
            "for x, y in loader:\n    torch.nn.functional.mse_loss(model(x), y).backward()\n"
            "    opt.step()\n    opt.zero_grad()\n",
    },
    "offline": {},
    "megatron": {},
    "merge_buffers": {"window=1000": "window=4"},
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
    "moments": {"window=1000": "window=6"},
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


USAGE_PREAMBLE = TORCH_PREAMBLE + """
class _LossModel(nn.Module):          # docs/usage.md's loop calls model(x, y) -> loss
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    def forward(self, x, y=None):
        out = self.net(x)
        return out if y is None else nn.functional.mse_loss(out, y)

model = _LossModel()
"""

EVALUATE_PREAMBLE = TORCH_PREAMBLE + """
def val_loss(model):
    return evaluate(model)
"""

SEVERAL_PREAMBLE = TORCH_PREAMBLE + """
from wsm_optim import WSMOptimizer
inner = torch.optim.AdamW(model.named_parameters(), lr=1e-3)
"""

OFFLINE_PREAMBLE = TORCH_PREAMBLE + """
import safetensors.torch
import wsm_optim
opt = wsm_optim.WSMOptimizer(torch.optim.AdamW(model.named_parameters(), lr=1e-3), window=4)
import os as _os
_os.makedirs("ckpts")
paths = []
for _i, _step in enumerate((2, 10, 100)):       # checkpoint i holds the value i + 1 everywhere
    _sd = {k: torch.full_like(v, float(_i + 1)) for k, v in model.state_dict().items()}
    torch.save({"model": _sd}, f"ckpts/step_{_step}.pt")
    safetensors.torch.save_file(_sd, f"step_{_step}.safetensors")
    paths.append(f"step_{_step}.safetensors")
"""


def _code(name):
    if name == "__preamble__":
        return ""
    assert name in BLOCKS, f"no page has a block marked <!-- tested: {name} -->"
    page, code = BLOCKS[name]
    for old, new in SCALE.get(name, {}).items():
        assert old in code, f"{page.name} snippet {name!r} no longer contains {old!r}: update SCALE"
        code = code.replace(old, new)
    return code


def _run(name, preamble, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    page = BLOCKS[name][0].relative_to(ROOT) if name in BLOCKS else "README.md"
    exec(compile(preamble + _code(name), f"{page}:{name}", "exec"), namespace)
    return namespace


def test_every_tested_block_is_covered():
    assert set(BLOCKS) == set(SCALE)
    assert EXECUTED_BEFORE_SPLIT <= set(BLOCKS), EXECUTED_BEFORE_SPLIT - set(BLOCKS)
    assert BLOCKS["quickstart"][0] == README  # the README's one usage example runs too


def test_quickstart_reads_the_completed_window(tmp_path, monkeypatch):
    import safetensors.torch

    ns = _run("quickstart", TORCH_PREAMBLE, tmp_path, monkeypatch)
    opt, model = ns["opt"], ns["model"]
    assert opt.steps == len(ns["loader"]) == 6  # window 4: one window completed, the next one half-way
    decayed = ns["decayed"]
    assert set(decayed) == {n for n, _ in model.named_parameters()}
    saved = safetensors.torch.load_file(tmp_path / "merged.safetensors")
    assert all(torch.equal(saved[k], decayed[k]) for k in decayed)
    # the completed window's merge is not the live model, nor the current (half-built) window's merge
    live, current = dict(model.named_parameters()), opt.merged_state_dict()
    assert not all(torch.equal(decayed[k], live[k]) for k in decayed)
    assert not all(torch.equal(decayed[k], current[k]) for k in decayed)
    assert (tmp_path / "ckpt.pt").is_file()


def test_usage_loop(tmp_path, monkeypatch):
    ns = _run("usage", USAGE_PREAMBLE, tmp_path, monkeypatch)
    opt = ns["opt"]
    assert opt.steps == len(ns["loader"])
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-4)  # warmed up, then constant
    assert set(ns["merged"]) == {n for n, _ in ns["model"].named_parameters()}


def test_several_merges(tmp_path, monkeypatch):
    ns = _run("several_merges", SEVERAL_PREAMBLE, tmp_path, monkeypatch)
    assert ns["opt"].merges == ("lin1k", "lin4k", "sqrt4k")
    assert set(ns["opt"].merged_state_dict(merge="sqrt4k")) == {n for n, _ in ns["model"].named_parameters()}


def test_evaluate_merges(tmp_path, monkeypatch):
    ns = _run("evaluate_merges", EVALUATE_PREAMBLE, tmp_path, monkeypatch)
    result, opt = ns["result"], ns["opt"]
    assert opt.steps == len(ns["loader"])
    assert set(result.scores) == {"lin1k", "lin4k", "sqrt4k"}
    assert result.best in result.scores and result.best_score == min(result.scores.values())
    assert result.live == pytest.approx(ns["evaluate"](ns["model"]))  # live weights restored
    saved = torch.load(tmp_path / "merged.pt")
    expected = opt.merged_state_dict(merge=result.best)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_moments(tmp_path, monkeypatch):
    import safetensors.torch

    ns = _run("moments", TORCH_PREAMBLE, tmp_path, monkeypatch)
    opt, scores = ns["opt"], ns["scores"]
    assert set(scores.scores) == {f"default:{s}" for s in ("linear", "1-sqrt", "cosine", "ema", "inv-sqrt")}
    saved = safetensors.torch.load_file(tmp_path / "merged.safetensors")
    expected = opt.merged_state_dict(shape=ns["best"])
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    with opt.merged_weights(shape=ns["best"]):
        assert ns["evaluate"](ns["model"]) == scores.best_score


def test_offline_merge(tmp_path, monkeypatch):
    from wsm_optim import schedules

    ns = _run("offline", OFFLINE_PREAMBLE, tmp_path, monkeypatch)
    c = schedules.merge_coefficients("1-sqrt", 2)  # three checkpoints, holding 1, 2, 3
    expected = float(sum(c_j * (j + 1) for j, c_j in enumerate(c)))
    assert set(ns["sd"]) == set(ns["model"].state_dict())
    for v in ns["sd"].values():
        torch.testing.assert_close(v, torch.full_like(v, expected))
    assert (tmp_path / "merged.safetensors").is_file()


MEGATRON_PREAMBLE = f"""
import shutil as _shutil
_shutil.copytree({str(ROOT / "tests" / "fixtures" / "megatron-core-0.15.3")!r}, "checkpoints")  # iterations 100, 200
"""


def test_megatron_merge(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tests"))
    from _megatron_worker import global_tensors

    _run("megatron", MEGATRON_PREAMBLE, tmp_path, monkeypatch)
    merged = tmp_path / "merged"
    assert (merged / "latest_checkpointed_iteration.txt").read_text().strip() == "150"  # the last merge written
    import torch.distributed.checkpoint as dcp

    a, b = global_tensors(100), global_tensors(200)
    w1 = 1 - (1 / 2) ** 0.5  # 1-sqrt, two checkpoints: c = (1 - w_1, w_1)
    for folder, c in (("iter_0000200", (1 - w1, w1)), ("iter_0000150", (0.5, 0.5))):
        sd = {k: torch.empty_like(v) for k, v in a.items()}
        dcp.load(sd, checkpoint_id=str(merged / folder), no_dist=True)
        for k, v in sd.items():
            want = (c[0] * a[k].double() + c[1] * b[k].double()).to(v.dtype) if v.is_floating_point() else b[k]
            torch.testing.assert_close(v, want, rtol=1e-2 if v.dtype == torch.bfloat16 else 1e-6, atol=1e-6, msg=k)


def test_merge_buffers(tmp_path, monkeypatch):
    ns = _run("merge_buffers", TORCH_PREAMBLE, tmp_path, monkeypatch)
    opt, net, merged = ns["opt"], ns["net"], ns["merged"]
    assert opt.steps == len(ns["loader"]) == 6
    assert set(merged) == set(net.state_dict())
    bn = net[1]
    assert not torch.equal(merged["1.running_mean"], bn.running_mean)  # merged, not the live statistics
    assert torch.equal(merged["1.num_batches_tracked"], bn.num_batches_tracked)  # integer: live


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


# ----------------------------------------------------------------------------- links

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _broken_links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text()))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    assert _broken_links(page) == []


def test_link_check_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Some `code`: here\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md) [ok](other.md#some-code-here) [ok](#page) [web](https://example.com/x)\n"
        "`[in code](missing.md)`\n```\n[in a fence](missing.md)\n```\n"
        "[gone](missing.md) ![img](missing.png) [bad anchor](other.md#nope) [bad local](#nope)\n"
    )
    assert len(_broken_links(page)) == 4
    assert _slug("Choosing a window: `evaluate_merges`") == "choosing-a-window-evaluate_merges"
    assert _slug("torch.compile") == "torchcompile"
