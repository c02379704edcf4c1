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
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def activation_fn(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; use one of {', '.join(ACTIVATIONS)}") from None


def _expert_groups(counts: list[int], n_groups: int) -> list[list[tuple[int, int, int]]]:
    """Split experts into ``n_groups`` lists of (expert, first row, rows) with near-equal rows
    (longest-processing-time-first greedy)."""
    starts = [0]
    for n in counts[:-1]:
        starts.append(starts[-1] + n)
    groups: list[list[tuple[int, int, int]]] = [[] for _ in range(n_groups)]
    loads = [0] * n_groups
    for e in sorted(range(len(counts)), key=lambda e: -counts[e]):
        g = loads.index(min(loads))
        groups[g].append((e, starts[e], counts[e]))
        loads[g] += counts[e]
    return groups


def _for_each_expert(counts: list[int], body, device: torch.device) -> None:
    """Run ``body(e, start, n)`` for every expert.

    On a multi-core CPU the experts are spread over the intra-op threads, each running its
    matmuls single-threaded, the way ``bmm`` spreads a batch: a loop of small multi-threaded
    matmuls ran at half of dense speed at 64 experts here (fork/join per call), this runs at
    bmm's speed without bmm's padding.  Elsewhere (GPU, one thread, too few experts to share
    out evenly) a plain loop.
    """
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    total = sum(counts)
    if threads > 1 and len(counts) >= 2 * threads and total:
        groups = _expert_groups(counts, threads)
        if max(sum(n for _, _, n in g) for g in groups) <= 1.15 * total / threads:
            errors: list[BaseException] = []

            def run(group):
                try:
                    with torch.no_grad():  # grad mode is per thread; these are raw kernels
                        for e, start, n in group:
                            body(e, start, n)
                except BaseException as exc:  # re-raised on the calling thread below
                    errors.append(exc)

            torch.set_num_threads(1)  # MKL/OpenMP: one thread per expert group
            try:
                workers = [threading.Thread(target=run, args=(g,), daemon=True) for g in groups[1:]]
                for w in workers:
                    w.start()
                run(groups[0])
                for w in workers:
                    w.join()
            finally:
                torch.set_num_threads(threads)
            if errors:
                raise errors[0]
            return
    start = 0
    for e, n in enumerate(counts):
        body(e, start, n)
        start += n


class _GroupedMM(torch.autograd.Function):
    """``out[rows of e] = x[rows of e] @ w[e]`` for every expert e.

    An explicit loop with ``out=`` slices in both passes: indexing ``w[e]`` inside autograd
    would make every expert's backward materialise a full (E, D, F) gradient (20x slower at
    E = 64), and ``unbind`` + ``cat`` copies every activation once more.

    With ``into_grad`` (opt-in: ``GroupedExperts.grad_into_buffers``, which the trainer turns
    on) and ``w`` a parameter whose ``.grad`` is already allocated (the trainer zeroes
    gradients in place), the weight gradient is accumulated straight into it and an
    expanded zero goes back through autograd, so gradient hooks still fire: a fresh
    (E, D, F) gradient is hundreds of MiB at large E, which the allocator maps and the
    kernel zeroes anew every step (220 ms per 512 MiB here).  Only for ``.backward()``:
    ``torch.autograd.grad`` would get the zero (hence opt-in).
    """

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, w_EDF: torch.Tensor, counts: list[int], into_grad: bool) -> torch.Tensor:
        out_NF = x_ND.new_empty(x_ND.shape[0], w_EDF.shape[2])

        def body(e, start, n):
            if n:
                torch.mm(x_ND[start : start + n], w_EDF[e], out=out_NF[start : start + n])

        _for_each_expert(counts, body, x_ND.device)
        ctx.save_for_backward(x_ND, w_EDF)
        ctx.counts = counts
        ctx.leaf = _leaf(w_EDF, into_grad)
        return out_NF

    @staticmethod
    def backward(ctx, grad_NF: torch.Tensor):
        x_ND, w_EDF = ctx.saved_tensors
        grad_NF = grad_NF.contiguous()
        grad_x = x_ND.new_empty(x_ND.shape) if ctx.needs_input_grad[0] else None
        grad_w = None
        accumulate = False
        if ctx.needs_input_grad[1]:
            held = _held_grad(ctx, w_EDF)
            accumulate = held is not None
            grad_w = held if accumulate else torch.empty_like(w_EDF)

        def body(e, start, n):
            g = grad_NF[start : start + n]
            if grad_x is not None and n:
                torch.mm(g, w_EDF[e].t(), out=grad_x[start : start + n])
            if grad_w is not None:
                if accumulate:
                    if n:
                        grad_w[e].addmm_(x_ND[start : start + n].t(), g)
                elif n:
                    torch.mm(x_ND[start : start + n].t(), g, out=grad_w[e])
                else:  # an expert that got no tokens is a normal case: zero gradient
                    grad_w[e].zero_()

        _for_each_expert(ctx.counts, body, x_ND.device)
        if accumulate:  # already in .grad; autograd adds zero (and runs the param's hooks)
            grad_w = w_EDF.new_zeros(()).expand(w_EDF.shape)
        return grad_x, grad_w, None, None


def _leaf(w: torch.Tensor, into_grad: bool) -> torch.Tensor | None:
    """The parameter whose ``.grad`` the backward may accumulate into, if allowed."""
    return w if (into_grad and w.is_leaf and w.requires_grad) else None


def _held_grad(ctx, w: torch.Tensor) -> torch.Tensor | None:
    """``w.grad`` when the weight gradient can be accumulated straight into it (see _GroupedMM)."""
    held = ctx.leaf.grad if ctx.leaf is not None else None
    if held is not None and not torch.is_grad_enabled() and held.shape == w.shape and held.dtype == w.dtype and held.is_contiguous() and not held.requires_grad:
        return held
    return None


class _BatchedMM(torch.autograd.Function):
    """``torch.bmm(x_ECD, w_EDF)`` with the weight gradient accumulated into ``w.grad`` when
    it is already allocated, as in _GroupedMM."""

    @staticmethod
    def forward(ctx, x_ECD: torch.Tensor, w_EDF: torch.Tensor, into_grad: bool) -> torch.Tensor:
        ctx.save_for_backward(x_ECD, w_EDF)
        ctx.leaf = _leaf(w_EDF, into_grad)
        return torch.bmm(x_ECD, w_EDF)

    @staticmethod
    def backward(ctx, grad_ECF: torch.Tensor):
        x_ECD, w_EDF = ctx.saved_tensors
        grad_x = torch.bmm(grad_ECF, w_EDF.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            held = _held_grad(ctx, w_EDF)
            if held is not None:
                held.baddbmm_(x_ECD.transpose(1, 2), grad_ECF)
                grad_w = w_EDF.new_zeros(()).expand(w_EDF.shape)
            else:
                grad_w = torch.bmm(x_ECD.transpose(1, 2), grad_ECF)
        return grad_x, grad_w, None


def grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts: list[int], *, into_grad: bool = False) -> torch.Tensor:
    """Rows of ``x_ND`` are grouped by expert (``counts[e]`` rows for expert e, in order)."""
    assert sum(counts) == x_ND.shape[0] and len(counts) == w_EDF.shape[0]
    return _GroupedMM.apply(x_ND.contiguous(), w_EDF, counts, into_grad)


def small_init_(w: torch.Tensor, scale: float, fan_in: int) -> None:
    """Switch Transformer init: truncated normal, std sqrt(scale / fan_in), cut at 2 std."""
    std = math.sqrt(scale / fan_in)
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


class GroupedExperts(nn.Module):
    """E two-layer FFN experts ``w2·act(w1·x)`` with stacked weights ``w1_EDF``, ``w2_EFD``.

    Args:
        num_experts: E (the local experts, under expert parallelism).
        d_model: D.
        d_ff: F, each expert's hidden size.
        activation: gelu | relu | silu.
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
    ):
        super().__init__()
        total_experts = num_experts if total_experts is None else total_experts
        if not 0 <= first_expert <= total_experts - num_experts:
            raise ValueError(f"experts [{first_expert}, {first_expert + num_experts}) are not a shard of {total_experts} experts")
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.first_expert, self.total_experts = first_expert, total_experts
        self.act = activation_fn(activation)
        self.dropout = dropout
        self.init_scale = init_scale
        # Accumulate weight gradients straight into allocated .grad buffers (see _GroupedMM):
        # right for loss.backward() with gradients zeroed in place, wrong for autograd.grad.
        self.grad_into_buffers = False
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, fan_in in ((self.w1_EDF, self.d_model), (self.w2_EFD, self.d_ff)):
            if self.total_experts == self.num_experts:
                small_init_(w, self.init_scale, fan_in)
            else:  # draw all experts' weights, keep this shard's (same RNG use as one process)
                full = w.new_empty(self.total_experts, *w.shape[1:])
                small_init_(full, self.init_scale, fan_in)
                with torch.no_grad():
                    w.copy_(full[self.first_expert : self.first_expert + self.num_experts])

    def _cast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input and weights in the autocast dtype when autocast is on, else in x's dtype (our
        matmuls are not autocast ops: cast by hand, so both paths compute alike)."""
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        return x.to(dt), self.w1_EDF.to(dt), self.w2_EFD.to(dt)

    def _hidden(self, h: torch.Tensor) -> torch.Tensor:
        h = self.act(h)
        return F.dropout(h, self.dropout, self.training) if self.dropout else h

    def forward_grouped(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Dropless: rows sorted by expert, ``counts[e]`` rows for expert e.

        When the load is (nearly) even, padding every expert to the largest count costs at
        most ``PAD_RATIO`` times the rows, and the rows go through one (E, C, D) ``bmm``
        (BASE's exact balance always lands here).  Otherwise ``grouped_mm`` runs each
        expert's rows through its own matmul, experts spread over the cores, no wasted work.
        Measured side by side in ``moe-bench layer`` (docs/performance.md).
        """
        N, E = x_ND.shape[0], len(counts)
        c_max = max(counts) if counts else 0
        if N and E * c_max <= self.PAD_RATIO * N:
            offsets = torch.tensor([0] + counts[:-1], device=x_ND.device).cumsum(0)
            expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), torch.tensor(counts, device=x_ND.device), output_size=N)
            slot_N = expert_N * c_max + torch.arange(N, device=x_ND.device) - offsets[expert_N]
            x_ECD = x_ND.new_zeros(E * c_max, x_ND.shape[1]).index_copy(0, slot_N, x_ND).view(E, c_max, -1)
            return self.forward_padded(x_ECD).view(E * c_max, -1).index_select(0, slot_N)
        x_ND, w1, w2 = self._cast(x_ND)
        h_NF = self._hidden(grouped_mm(x_ND, w1, counts, into_grad=self.grad_into_buffers))
        return grouped_mm(h_NF, w2, counts, into_grad=self.grad_into_buffers)

    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Capacity mode: one padded batch of C rows per expert."""
        x_ECD, w1, w2 = self._cast(x_ECD)
        g = self.grad_into_buffers
        return _BatchedMM.apply(self._hidden(_BatchedMM.apply(x_ECD, w1, g)), w2, g)
