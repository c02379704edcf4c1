"""Where a fine-grained MoE layer spends its time (docs/performance.md, "Fine-grained and shared
experts"): the grouped expert matmul forward+backward at (E, F, k) = (8, 2048, 1), (64, 256, 8)
and (32, 256, 8), the same FLOPs each, against one dense matmul; and the gather + scatter-add
of the T*k token copies.  Medians of 5 after a warm-up; run it on a quiet machine:

    .venv/bin/python scripts/fine_grained_costs.py
"""

from __future__ import annotations

import time

import torch

from moe.ops.grouped import grouped_mm

T, D = 8192, 512


def median_seconds(f, n: int = 5) -> float:
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2]


def grouped_fwd_bwd(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> None:
    y = grouped_mm(x, w, counts)
    y.backward(torch.ones_like(y))


def gather_scatter(x: torch.Tensor, idx: torch.Tensor) -> None:
    copies = x.index_select(0, idx)
    torch.zeros_like(x).index_add_(0, idx, copies)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(T, D, requires_grad=True)
    w = torch.randn(D, 2048, requires_grad=True)

    def dense() -> None:
        y = x @ w
        y.backward(torch.ones_like(y))

    flops = 3 * 2 * T * D * 2048  # forward + the two backward matmuls
    print(f"dense {T}x{D}x2048 matmul, fwd+bwd: {flops / median_seconds(dense) / 1e9:.1f} GFLOP/s")
    for E, F, k in [(8, 2048, 1), (64, 256, 8), (32, 256, 8)]:
        N = T * k
        rows = torch.randn(N, D, requires_grad=True)
        w_EDF = torch.randn(E, D, F, requires_grad=True)
        counts = [N // E] * E
        t_mm = median_seconds(lambda rows=rows, w_EDF=w_EDF, counts=counts: grouped_fwd_bwd(rows, w_EDF, counts))
        idx = torch.randint(0, T, (N,))
        t_copy = median_seconds(lambda idx=idx: gather_scatter(x.detach(), idx))
        print(
            f"E={E} F={F} k={k}: grouped matmul fwd+bwd {3 * 2 * N * D * F / t_mm / 1e9:.1f} GFLOP/s "
            f"({t_mm * 1e3:.0f} ms); gather + scatter-add of {N} rows: {t_copy * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    main()
