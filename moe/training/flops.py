"""Model FLOPs per token and model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / peak FLOP/s, where model FLOPs count only the arithmetic the
architecture requires (PaLM, Chowdhery et al. 2022, appendix B), not recomputation.  For an
MoE model ``N`` is the number of *active* non-embedding parameters per token: the dense
parts plus ``top_k`` experts (and the router) of each MoE layer.

The peak is measured, not looked up: a square-matmul loop on the training device and dtype.
That is the achievable dense-matmul throughput (with the current torch thread count), so the
MFU reported here is relative to what this machine can actually do, which is higher than MFU
against a datasheet peak.
"""

from __future__ import annotations

import time

import torch


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
