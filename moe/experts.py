"""Grouped expert FFNs: all E experts' weights stacked, run as one grouped matmul.

Two execution paths over the same weights:
- dropless: tokens sorted by expert, ``x_ND`` with per-expert row counts; each expert's rows
  go through one matmul (``grouped_mm``);
- capacity: a padded ``(E, C, D)`` batch through ``torch.bmm``.

Shape suffixes: N routed rows (tokens sorted by expert), E experts, C capacity, D model dim,
F expert hidden dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def activation_fn(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; use one of {', '.join(ACTIVATIONS)}") from None


class _GroupedMM(torch.autograd.Function):
    """``out[rows of e] = x[rows of e] @ w[e]`` for every expert e.

    Written as an explicit loop with ``out=`` slices in both passes: indexing ``w[e]`` inside
    autograd would make every expert's backward materialise a full (E, D, F) gradient (20x
    slower at E = 64), and ``unbind`` + ``cat`` copies every activation once more.
    """

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, w_EDF: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out_NF = x_ND.new_empty(x_ND.shape[0], w_EDF.shape[2])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(x_ND[start : start + n], w_EDF[e], out=out_NF[start : start + n])
            start += n
        ctx.save_for_backward(x_ND, w_EDF)
        ctx.counts = counts
        return out_NF

    @staticmethod
    def backward(ctx, grad_NF: torch.Tensor):
        x_ND, w_EDF = ctx.saved_tensors
        grad_NF = grad_NF.contiguous()
        grad_x = x_ND.new_empty(x_ND.shape) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(w_EDF) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.counts):
            g = grad_NF[start : start + n]
            if grad_x is not None and n:
                torch.mm(g, w_EDF[e].t(), out=grad_x[start : start + n])
            if grad_w is not None:
                if n:
                    torch.mm(x_ND[start : start + n].t(), g, out=grad_w[e])
                else:  # an expert that got no tokens is a normal case: zero gradient
                    grad_w[e].zero_()
            start += n
        return grad_x, grad_w, None


def grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of ``x_ND`` are grouped by expert (``counts[e]`` rows for expert e, in order)."""
    assert sum(counts) == x_ND.shape[0] and len(counts) == w_EDF.shape[0]
    return _GroupedMM.apply(x_ND.contiguous(), w_EDF, counts)


class GroupedExperts(nn.Module):
    """E two-layer FFN experts ``w2·act(w1·x)`` with stacked weights ``w1_EDF``, ``w2_EFD``.

    Args:
        num_experts: E (the local experts, under expert parallelism).
        d_model: D.
        d_ff: F, each expert's hidden size.
        activation: gelu | relu | silu.
        dropout: expert dropout on the hidden activation (Switch uses a higher rate here).
        init_scale: Switch small-scale init, truncated normal with std sqrt(s / fan_in).
    """

    PAD_RATIO = 1.5  # dropless: pad to the largest expert's count while that wastes < 50%

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, activation: str = "gelu", dropout: float = 0.0, init_scale: float = 0.1):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.act = activation_fn(activation)
        self.dropout = dropout
        self.init_scale = init_scale
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, fan_in in ((self.w1_EDF, self.d_model), (self.w2_EFD, self.d_ff)):
            std = math.sqrt(self.init_scale / fan_in)
            nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)

    def _hidden(self, h: torch.Tensor) -> torch.Tensor:
        h = self.act(h)
        return F.dropout(h, self.dropout, self.training) if self.dropout else h

    def forward_grouped(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Dropless: rows sorted by expert, ``counts[e]`` rows for expert e.

        When the load is even enough (padding every expert to the largest count costs at
        most ``PAD_RATIO`` times the rows), the rows are padded into one (E, C, D) batch:
        ``bmm`` spreads the experts over the cores and runs small per-expert matmuls at
        close to dense speed, where a loop of small matmuls ran at half of it (E = 64 here).
        An uneven load takes the loop, which does no wasted work.
        """
        N, E = x_ND.shape[0], len(counts)
        c_max = max(counts) if counts else 0
        if N and E * c_max <= self.PAD_RATIO * N:
            offsets = torch.tensor([0] + counts[:-1], device=x_ND.device).cumsum(0)
            expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), torch.tensor(counts, device=x_ND.device), output_size=N)
            slot_N = expert_N * c_max + torch.arange(N, device=x_ND.device) - offsets[expert_N]
            x_ECD = x_ND.new_zeros(E * c_max, x_ND.shape[1]).index_copy(0, slot_N, x_ND).view(E, c_max, -1)
            return self.forward_padded(x_ECD).view(E * c_max, -1).index_select(0, slot_N)
        w1, w2 = self.w1_EDF.to(x_ND.dtype), self.w2_EFD.to(x_ND.dtype)
        h_NF = self._hidden(grouped_mm(x_ND, w1, counts))
        return grouped_mm(h_NF, w2, counts)

    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Capacity mode: one padded batch of C rows per expert."""
        w1, w2 = self.w1_EDF.to(x_ECD.dtype), self.w2_EFD.to(x_ECD.dtype)
        return torch.bmm(self._hidden(torch.bmm(x_ECD, w1)), w2)
