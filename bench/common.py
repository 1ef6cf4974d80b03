"""Shared helpers for ``bench/bench_update.py``: environment, timing, shapes, a small GPT-2.

Nothing here asserts anything about speed; it measures and describes.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------- devices

#: Peak HBM bandwidth (GB/s, 1 GB = 1e9 bytes) from vendor spec sheets, keyed by
#: the substrings of ``torch.cuda.get_device_name()`` that identify the part.
#: Rules are tried in order; the first whose substrings all occur (after
#: upper-casing and turning ``-``/``_`` into spaces) wins.
PEAK_BANDWIDTH_RULES: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("H200",), 4800.0, "H200 (4.8 TB/s)"),
    (("H100", "PCIE"), 2000.0, "H100 PCIe (2.0 TB/s)"),
    (("H100", "SXM"), 3350.0, "H100 SXM (3.35 TB/s)"),
    (("H100", "HBM3"), 3350.0, "H100 SXM (3.35 TB/s)"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (("A100", "80GB"), 2000.0, "A100 80GB (2.0 TB/s)"),
    (("A100", "40GB"), 1550.0, "A100 40GB (1.55 TB/s)"),
)


def peak_bandwidth_gbps(device_name: str) -> tuple[float, str] | None:
    """Spec-sheet peak memory bandwidth of a GPU named ``device_name``, or None if unknown."""
    key = device_name.upper().replace("-", " ").replace("_", " ")
    for needles, gbps, label in PEAK_BANDWIDTH_RULES:
        if all(n in key for n in needles):
            return gbps, label
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_model()}"


def git_revision(repo: str) -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    import numpy

    out["numpy"] = numpy.__version__
    out["cuda (torch build)"] = str(torch.version.cuda)
    return out


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


# ---------------------------------------------------------------------- timing


class Timer:
    """Seconds per call of ``fn``: ``time.perf_counter`` on CPU, CUDA events on CUDA.

    On CUDA the device is synchronised before the start event, so each sample
    starts from an empty queue; ``inner`` calls are timed together and averaged
    (launch-bound functions then show their real, CPU-limited rate).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        #: CPU only: process CPU seconds per call of the last :meth:`time` (all
        #: threads). Unlike wall time it excludes time spent descheduled by other
        #: processes, so it is the steadier measure on a shared machine.
        self.last_cpu = float("nan")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], inner: int = 1) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            fn()
        t1, c1 = time.perf_counter(), time.process_time()
        self.last_cpu = (c1 - c0) / inner
        return (t1 - t0) / inner

    def wall(self, fn: Callable[[], object], inner: int = 1) -> float:
        """Wall-clock seconds per call with a full device sync on both sides.

        Used where work may run on side streams (``overlap=True``), which
        events recorded on the current stream would not cover.
        """
        self.sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / inner


def interleaved(
    fns: dict[str, Callable[[], object]],
    timer: Timer,
    rounds: int,
    warmup: int = 1,
    inner: int = 1,
    wall: bool = False,
    cpu_out: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Time each of ``fns`` once per round, round-robin, after ``warmup`` untimed rounds.

    Interleaving keeps the candidates' samples close in time, so a change in
    load from other processes hits all of them alike; compare them with
    :func:`paired_ratio`. Returns ``{name: [seconds per call, one per round]}``.
    On CPU (not ``wall``), ``cpu_out`` receives the process-CPU-time samples alike.
    """
    measure = timer.wall if wall else timer.time
    for _ in range(warmup):
        for fn in fns.values():
            measure(fn, inner)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(measure(fn, inner))
            if cpu_out is not None and not timer.cuda and not wall:
                cpu_out.setdefault(name, []).append(timer.last_cpu)
    return samples


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[r] / den[r]`` (samples taken side by side)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


# ------------------------------------------------------------------ memory/RSS


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssPeak:
    """Peak resident set size while the ``with`` block runs (Linux).

    Samples ``/proc/self/statm`` every ``period`` seconds in a thread and also
    uses ``ru_maxrss`` if it rose during the block, so a short spike between
    samples is not missed. ``delta`` is the peak minus the RSS on entry.
    """

    def __init__(self, period: float = 0.002) -> None:
        self.period = period
        self.peak = 0
        self.before = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            self._stop.wait(self.period)

    def __enter__(self) -> "RssPeak":
        self.before = current_rss_bytes()
        self._maxrss_before = maxrss_bytes()
        self.peak = self.before
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())
        after = maxrss_bytes()
        if after > self._maxrss_before:
            self.peak = max(self.peak, after)

    @property
    def delta(self) -> int:
        return self.peak - self.before


# ---------------------------------------------------------------- param shapes

Shapes = list[tuple[str, tuple[int, ...]]]


def gpt2_shapes(vocab: int = 50257, n_ctx: int = 1024, d: int = 768, n_layer: int = 12) -> Shapes:
    """Parameter names and shapes of GPT-2 (Hugging Face ``GPT2Model`` layout, Conv1D ``(in, out)``).

    The default is GPT-2 small, 124,439,808 params in 148 tensors (``lm_head``
    is tied to ``wte``, so it is not a separate parameter).
    """
    shapes: Shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (n_ctx, d))]
    for i in range(n_layer):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)),
            (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)),
            (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)),
            (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)),
            (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)),
            (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)),
            (h + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def llama_shapes(
    vocab: int = 128256, d: int = 2048, ffn: int = 8192, n_layer: int = 16, n_head: int = 32, n_kv: int = 8
) -> Shapes:
    """Parameter names and shapes of a Llama-style decoder (``nn.Linear`` ``(out, in)`` layout).

    The default is the Llama-3.2-1B configuration: 1,235,814,400 params in 146
    tensors, tied input/output embedding, grouped-query attention (8 KV heads
    of dim 64), no biases.
    """
    head_dim = d // n_head
    kv = n_kv * head_dim
    shapes: Shapes = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(n_layer):
        h = f"model.layers.{i}."
        shapes += [
            (h + "input_layernorm.weight", (d,)),
            (h + "self_attn.q_proj.weight", (d, d)),
            (h + "self_attn.k_proj.weight", (kv, d)),
            (h + "self_attn.v_proj.weight", (kv, d)),
            (h + "self_attn.o_proj.weight", (d, d)),
            (h + "post_attention_layernorm.weight", (d,)),
            (h + "mlp.gate_proj.weight", (ffn, d)),
            (h + "mlp.up_proj.weight", (ffn, d)),
            (h + "mlp.down_proj.weight", (d, ffn)),
        ]
    shapes.append(("model.norm.weight", (d,)))
    return shapes


#: Parameter lists the bench knows, by ``--models`` name.
MODELS: dict[str, Callable[[], Shapes]] = {
    "gpt2-124m": gpt2_shapes,
    "llama-1b": llama_shapes,
    # GPT-2 layout at 23M params: sections that hold many optimizers at once (moments) on a small host.
    "gpt2-23m": lambda: gpt2_shapes(vocab=8192, n_ctx=512, d=512, n_layer=6),
    # GPT-2 layout at toy size, for --quick / the smoke test.
    "gpt2-tiny": lambda: gpt2_shapes(vocab=1000, n_ctx=64, d=64, n_layer=2),
}


def numel(shapes: Shapes) -> int:
    return sum(math.prod(s) for _, s in shapes)


def make_params(shapes: Shapes, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """Separately allocated tensors (like a real model's), values ``N(0, 0.02^2)``, made on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in shapes:
        t = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=g)
        out[name] = t if dtype == torch.float32 else t.to(dtype)
    return out


# ------------------------------------------------------------ minimal GPT-2


@dataclass
class GPTConfig:
    vocab: int = 50257
    n_ctx: int = 1024
    d: int = 768
    n_layer: int = 12
    n_head: int = 12


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(cfg.d)
        self.c_attn = nn.Linear(cfg.d, 3 * cfg.d)
        self.c_proj = nn.Linear(cfg.d, cfg.d)
        self.ln_2 = nn.LayerNorm(cfg.d)
        self.c_fc = nn.Linear(cfg.d, 4 * cfg.d)
        self.mlp_proj = nn.Linear(4 * cfg.d, cfg.d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2 (pre-LN, learned positions, tied head); GPTConfig() is the 124M model."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.d)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d)
        self.h = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


# -------------------------------------------------------------------- output


def write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def md_table(rows: list[dict], cols: Sequence[str]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if math.isfinite(v) else str(v)
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def python_executable() -> str:
    return sys.executable
