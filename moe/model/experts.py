"""Grouped expert FFNs: all E experts' weights stacked, run as one grouped matmul.

Two execution paths over the same weights:
- dropless: tokens sorted by expert, ``x_ND`` with per-expert row counts; each expert's rows
  go through one matmul (``moe.ops.grouped_mm``);
- capacity: a padded ``(E, C, D)`` batch through a batched matmul (``moe.ops.batched_mm``).

Shape suffixes: N routed rows (tokens sorted by expert), E experts, C capacity, D model dim,
F expert hidden dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.ops import batched_mm, grouped_mm, resolve_gemm, torch_grouped_mm

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
GATED = {"swiglu": F.silu}  # act(x @ w1) * (x @ w3): a third matrix, the gate's partner (Shazeer 2020)


def activation_fn(name: str):
    """The elementwise function of activation ``name`` (a gated one's: silu for swiglu)."""
    try:
        return ACTIVATIONS.get(name) or GATED[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; use one of {', '.join([*ACTIVATIONS, *GATED])}") from None


def is_gated(name: str) -> bool:
    """Whether activation ``name`` multiplies by a second projection (SwiGLU: ``w3``)."""
    return name in GATED


def small_init_(w: torch.Tensor, scale: float, fan_in: int) -> None:
    """Switch Transformer init: truncated normal, std sqrt(scale / fan_in), cut at 2 std."""
    std = math.sqrt(scale / fan_in)
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


class GroupedExperts(nn.Module):
    """E FFN experts ``w2·act(w1·x)`` with stacked weights ``w1_EDF``, ``w2_EFD``; with a gated
    activation (``swiglu``) ``w2·(silu(w1·x) * (w3·x))``, a third stack ``w3_EDF``.

    Args:
        num_experts: E (the local experts, under expert parallelism).
        d_model: D.
        d_ff: F, each expert's hidden size.
        activation: gelu | relu | silu | swiglu (gated: a third matrix ``w3_EDF``).
        dropout: expert dropout on the hidden activation (Switch uses a higher rate here).
        init_scale: Switch small-scale init, truncated normal with std sqrt(s / fan_in).
        first_expert, total_experts: under expert parallelism, this module holds experts
            ``[first_expert, first_expert + num_experts)`` of ``total_experts`` (default: all).
            The init draws the whole stack and keeps the shard, so every expert starts with the
            weights it would have in one process with the same seed (a transient full-size
            tensor, once, at construction).
    """

    PAD_RATIO = 1.1  # dropless: pad to the largest expert's count while that wastes <= 10%
    # Its parameters are expert weights: sharded over the expert-parallel group, left out of the
    # data-parallel all-reduce (moe.parallel.grads reads this, not marks on the parameters).
    expert_parallel = True

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "gelu",
        dropout: float = 0.0,
        init_scale: float = 0.1,
        first_expert: int = 0,
        total_experts: int | None = None,
        gemm: str = "auto",
    ):
        super().__init__()
        total_experts = num_experts if total_experts is None else total_experts
        if not 0 <= first_expert <= total_experts - num_experts:
            raise ValueError(
                f"experts [{first_expert}, {first_expert + num_experts}) are not a shard of {total_experts} experts"
            )
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.first_expert, self.total_experts = first_expert, total_experts
        self.act = activation_fn(activation)
        self.gated = is_gated(activation)
        self.dropout = dropout
        self.init_scale = init_scale
        # Accumulate weight gradients straight into allocated .grad buffers (moe.ops.grouped):
        # right for loss.backward() with gradients zeroed in place, wrong for autograd.grad.
        self.grad_into_buffers = False
        self.gemm = gemm  # moe.gemm: loop (ours) | grouped_mm (torch._grouped_mm) | auto (moe.ops.grouped.resolve_gemm)
        resolve_gemm(gemm, torch.device("cpu"))  # a bad name fails here, not in the first forward
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        # (after w2: a gated stack leaves the other stacks' init draws as they were)
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff)) if self.gated else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stacks = [(self.w1_EDF, self.d_model), (self.w2_EFD, self.d_ff)]
        if self.gated:
            stacks.append((self.w3_EDF, self.d_model))
        for w, fan_in in stacks:
            if self.total_experts == self.num_experts:
                small_init_(w, self.init_scale, fan_in)
            else:  # draw all experts' weights, keep this shard's (same RNG use as one process)
                full = w.new_empty(self.total_experts, *w.shape[1:])
                small_init_(full, self.init_scale, fan_in)
                with torch.no_grad():
                    w.copy_(full[self.first_expert : self.first_expert + self.num_experts])

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        """The autocast dtype when autocast is on, else x's."""
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    def _cast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Input and weights in :meth:`_compute_dtype` (our matmuls are not autocast ops: cast
        by hand, so both paths compute alike)."""
        dt = self._compute_dtype(x)
        w3 = self.w3_EDF.to(dt) if self.gated else None
        return x.to(dt), self.w1_EDF.to(dt), self.w2_EFD.to(dt), w3

    def _hidden(self, h: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(h) if gate is None else self.act(h) * gate
        return F.dropout(h, self.dropout, self.training) if self.dropout else h

    def forward_grouped(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Dropless: rows sorted by expert, ``counts[e]`` rows for expert e.

        When the load is (nearly) even, padding every expert to the largest count costs at
        most ``PAD_RATIO`` times the rows, and the rows go through one (E, C, D) ``bmm``
        (BASE's exact balance always lands here).  Otherwise ``grouped_mm`` runs each
        expert's rows through its own matmul, experts spread over the cores, no wasted work.
        Measured side by side in ``moe-bench layer`` (docs/performance.md).
        """
        if (
            resolve_gemm(self.gemm, x_ND.device, self._compute_dtype(x_ND)) == "grouped_mm"
        ):  # torch's kernel, no padding to the largest
            x_ND, w1, w2, w3 = self._cast(x_ND)
            gate = torch_grouped_mm(x_ND, w3, counts) if w3 is not None else None
            return torch_grouped_mm(self._hidden(torch_grouped_mm(x_ND, w1, counts), gate), w2, counts)
        N, E = x_ND.shape[0], len(counts)
        c_max = max(counts) if counts else 0
        if N and E * c_max <= self.PAD_RATIO * N:
            offsets = torch.tensor([0] + counts[:-1], device=x_ND.device).cumsum(0)
            expert_N = torch.repeat_interleave(
                torch.arange(E, device=x_ND.device), torch.tensor(counts, device=x_ND.device), output_size=N
            )
            slot_N = expert_N * c_max + torch.arange(N, device=x_ND.device) - offsets[expert_N]
            x_ECD = x_ND.new_zeros(E * c_max, x_ND.shape[1]).index_copy(0, slot_N, x_ND).view(E, c_max, -1)
            return self.forward_padded(x_ECD).view(E * c_max, -1).index_select(0, slot_N)
        x_ND, w1, w2, w3 = self._cast(x_ND)
        g = self.grad_into_buffers
        gate = grouped_mm(x_ND, w3, counts, into_grad=g) if w3 is not None else None
        h_NF = self._hidden(grouped_mm(x_ND, w1, counts, into_grad=g), gate)
        return grouped_mm(h_NF, w2, counts, into_grad=g)

    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Capacity mode: one padded batch of C rows per expert."""
        x_ECD, w1, w2, w3 = self._cast(x_ECD)
        g = self.grad_into_buffers
        gate = batched_mm(x_ECD, w3, into_grad=g) if w3 is not None else None
        return batched_mm(self._hidden(batched_mm(x_ECD, w1, into_grad=g), gate), w2, into_grad=g)


# ---------------------------------------------------------------------------------------------
# which parameters are experts' (read from the modules: ``expert_parallel``)


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every expert weight: parameters of modules with ``expert_parallel``."""
    seen: set[int] = set()
    out = []
    for mod_name, mod in model.named_modules():
        if getattr(mod, "expert_parallel", False):
            for n, p in mod.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((f"{mod_name}.{n}" if mod_name else n, p))
    return out


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(shared parameters, expert parameters), each in ``model.parameters()`` order."""
    expert_ids = {id(p) for _, p in expert_parameters(model)}
    shared, experts = [], []
    for p in model.parameters():
        (experts if id(p) in expert_ids else shared).append(p)
    return shared, experts


def expert_shards(model: nn.Module) -> list[tuple[str, nn.Parameter, int, int, int]]:
    """(state-dict key, parameter, first expert, local experts, total experts) of every expert
    weight, in module order."""
    out = []
    for mod_name, mod in model.named_modules():
        if getattr(mod, "expert_parallel", False):
            for n, p in mod.named_parameters(recurse=False):
                key = f"{mod_name}.{n}" if mod_name else n
                out.append((key, p, mod.first_expert, mod.num_experts, mod.total_experts))
    return out
