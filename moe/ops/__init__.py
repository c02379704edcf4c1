"""Kernels the model's layers call: the experts' grouped and batched matmuls, ours and torch's
grouped GEMM (``grouped``).
Nothing here knows about routing, configs or processes."""

from moe.ops.grouped import batched_mm, grouped_mm, resolve_gemm, torch_grouped_mm

__all__ = ["batched_mm", "grouped_mm", "resolve_gemm", "torch_grouped_mm"]
