"""Kernels the model's layers call: the experts' grouped and batched matmuls (``grouped``).
Nothing here knows about routing, configs or processes."""

from moe.ops.grouped import batched_mm, grouped_mm

__all__ = ["batched_mm", "grouped_mm"]
