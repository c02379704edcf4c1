"""Model FLOPs per token and model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / peak FLOP/s, where model FLOPs count only the arithmetic the
architecture requires (PaLM, Chowdhery et al. 2022, appendix B), not recomputation.  For an
MoE model ``N`` is the number of *active* non-embedding parameters per token: the dense
parts plus ``top_k`` experts (and the router) of each MoE layer.

The peak is measured, not looked up: a square-matmul loop on the training device and dtype.
That is the achievable dense-matmul throughput (with the current torch thread count), so the
MFU reported here is relative to what this machine can actually do, which is higher than MFU
against a datasheet peak.  It is measured once per machine, device, dtype, thread count and
torch version (:func:`machine_peak`: the best of several short trials, so a busy moment does
not lower it), kept in ``~/.cache/moe/peak_flops.json`` and reused by every run, which says
where its peak came from; ``moe-bench peak`` measures it again, ``peak_flops=`` overrides it.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moe.training.files import user_cache_dir, write_text_atomic

PEAK_CACHE = "peak_flops.json"


def _sync(device: torch.device) -> None:
    # Kernels are asynchronous on accelerators: time only after they have finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        torch.accelerator.synchronize(device)


def measure_peak_flops(
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    seconds: float = 0.5,
    n: int = 1024,
) -> float:
    """FLOP/s of a square matmul loop on this device, measured once at start-up (warm-up then
    timed; cuda synchronize when on GPU).

    Each ``n x n @ n x n`` product counts ``2 n^3`` FLOPs; the fastest timed batch of them
    within about ``seconds`` gives the peak.  Call it after setting ``torch.set_num_threads``.
    """
    if seconds <= 0 or n <= 0:
        raise ValueError(f"seconds and n must be positive, got seconds={seconds}, n={n}")
    device = torch.device(device)
    flop_per_mm = 2.0 * n**3
    with torch.no_grad():
        g = torch.Generator(device=device).manual_seed(0)  # leave the global RNG alone (exact resume)
        a = torch.randn(n, n, device=device, generator=g).to(dtype)
        b = torch.randn(n, n, device=device, generator=g).to(dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        # Warm-up: kernel selection, thread-pool start-up and allocator caching happen here.
        for _ in range(3):
            torch.mm(a, b, out=c)
        _sync(device)

        # Time batches of matmuls for about `seconds` and keep the fastest batch: on a shared
        # machine other work only ever slows a batch down, and MFU wants the real peak
        # (an average here once gave MFU over 100%).
        best, batch, t_start = 0.0, 1, time.perf_counter()
        while True:
            t0 = time.perf_counter()
            for _ in range(batch):
                torch.mm(a, b, out=c)
            _sync(device)
            dt = time.perf_counter() - t0
            best = max(best, flop_per_mm * batch / max(dt, 1e-12))
            if time.perf_counter() - t_start >= seconds:
                break
            if dt < 0.02:  # make a batch long enough to time (and to amortise a GPU sync)
                batch *= 2
    return best


def transformer_flops_per_token(
    n_active_params_non_embedding: int,
    n_layers: int,
    d_model: int,
    seq_len: int,
    *,
    training: bool = True,
) -> float:
    """PaLM appendix B: 6·N + 12·L·d·T for training (fwd+bwd), 2·N + 4·L·d·T forward only (N
    excludes embeddings; attention term per token).

    ``N`` is the active non-embedding parameter count (one matmul FLOP pair per parameter
    per token forward, twice that backward).  The attention term is the ``QK^T`` and ``AV``
    products over the full context ``T``; like PaLM it does not halve it for causal masking.
    """
    for name, v in (
        ("n_active_params_non_embedding", n_active_params_non_embedding),
        ("n_layers", n_layers),
        ("d_model", d_model),
        ("seq_len", seq_len),
    ):
        if v < 0:
            raise ValueError(f"{name} must be non-negative, got {v}")
    fwd = 2.0 * n_active_params_non_embedding + 4.0 * n_layers * d_model * seq_len
    return 3.0 * fwd if training else fwd  # backward costs twice the forward


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: ``tokens_per_s * flops_per_token / peak_flops`` (a fraction, not %)."""
    if not peak_flops > 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops


@dataclass(frozen=True)
class Peak:
    """The FLOP/s MFU is measured against, and where it came from (shown with every MFU)."""

    flops: float
    source: str


def _processor() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a measured peak holds for: the processor (or GPU), device, dtype, threads, torch."""
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else _processor()
    dt = str(dtype).removeprefix("torch.")
    return f"{what}, {device.type}, {dt}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def measure_machine_peak(
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    *,
    trials: int = 8,
    seconds: float = 0.25,
    n: int = 2048,
    pause: float = 0.05,
) -> float:
    """The best of ``trials`` short matmul measurements, a short pause between them: on a shared
    machine another process's burst lowers some trials, not the best one."""
    best = 0.0
    for i in range(trials):
        if i:
            time.sleep(pause)
        best = max(best, measure_peak_flops(device, dtype, seconds=seconds, n=n))
    return best


def machine_peak(
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: Path | None = None,
    remeasure: bool = False,
) -> Peak:
    """This machine's peak for ``device``/``dtype`` at the current thread count: the one kept in
    ``cache_dir/peak_flops.json`` (default ``~/.cache/moe``), measured and kept when there is
    none (or ``remeasure``)."""
    device = torch.device(device)
    path = (cache_dir or user_cache_dir()) / PEAK_CACHE
    key = machine_key(device, dtype)
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        kept = {}
    entry = kept.get(key) if isinstance(kept, dict) and not remeasure else None
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
        return Peak(float(entry["flops"]), f"measured {entry.get('date', '?')} on this machine, kept in {path}")
    flops = measure_machine_peak(device, dtype)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    kept = kept if isinstance(kept, dict) else {}
    kept[key] = {"flops": flops, "date": date}
    write_text_atomic(path, json.dumps(kept, indent=1, sort_keys=True))
    return Peak(flops, f"measured {date} on this machine, kept in {path}")
