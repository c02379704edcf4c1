"""Token dispatchers: move tokens to the experts a :class:`~moe.model.routing.Routing` chose, and back.

:class:`TokenDispatcher` is the interface the MoE layer talks to.  ``dispatch(x_TD, routing)``
returns the experts' input and a plan; ``combine(y, plan)`` returns the weighted sum of each
token's expert outputs, ``(T, D)``.  The local dispatcher here keeps every expert on this
process; the all-to-all dispatcher of expert parallelism (``moe.parallel.dispatch``) moves
rows between ranks behind the same calls, so the MoE layer does not change when experts
move.  A dispatcher also says which experts this process holds (``expert_shard``), solves
BASE's balanced assignment over the tokens it balances (``balanced_assignment``: this
process's here, the expert-parallel group's there) and counts the wall time it spends
moving rows (``comm_seconds``).

Two layouts:
- grouped (dropless): ``x_ND`` rows sorted by expert plus ``counts`` per expert;
- padded (capacity): ``x_ECD``, C slots per expert, empty slots zero.

Shape suffixes: T tokens, K choices, N routed rows, E experts, C capacity, D model dim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from moe.model.auction import balanced_assignment
from moe.model.routing import Routing


@dataclass
class DispatchPlan:
    """How routed rows map back to tokens."""

    token_idx_N: torch.Tensor  # long, source token of each routed row
    weight_N: torch.Tensor  # combine weight of each routed row
    counts: list[int] | None  # grouped layout: rows per expert
    slot_N: torch.Tensor | None  # padded layout: row index in the flattened (E*C) buffer
    num_tokens: int


@dataclass
class PermutationPlan(DispatchPlan):
    """Every (token, choice) routed (dropless, nothing dropped): the rows are a permutation of
    the T*K choices, and moving them is a gather both ways (:class:`_GatherRows`)."""

    order_N: torch.Tensor  # flat choice t*K + j of each routed row
    inverse_N: torch.Tensor  # routed row of each flat choice
    weight_TK: torch.Tensor  # the combine weights, (T, K)


class _GatherRows(torch.autograd.Function):
    """``x[src // K]`` where ``src`` is a permutation of the ``T*K`` choices: the forward a
    gather, and so is the backward (the inverse permutation, then a sum over the K copies) —
    where autograd's own backward of ``index_select`` is a scatter-add, which runs on one core
    on CPUs (2-4x slower than the gather here, docs/performance.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, src_N: torch.Tensor, inverse_N: torch.Tensor, K: int) -> torch.Tensor:
        ctx.save_for_backward(inverse_N)
        ctx.K, ctx.T = K, x.shape[0]
        return x.index_select(0, src_N // K if K > 1 else src_N)

    @staticmethod
    def backward(ctx, g_ND: torch.Tensor):
        (inverse_N,) = ctx.saved_tensors
        g = g_ND.index_select(0, inverse_N)  # back to choice order t*K + j
        if ctx.K > 1:
            g = g.view(ctx.T, ctx.K, g.shape[-1]).sum(1)
        return g, None, None, None


def inverse_permutation(perm_N: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``."""
    inv = torch.empty_like(perm_N)
    inv[perm_N] = torch.arange(perm_N.numel(), device=perm_N.device)
    return inv


def choices_to_rows(x_TD: torch.Tensor, order_N: torch.Tensor, inverse_N: torch.Tensor, K: int) -> torch.Tensor:
    """Routed rows ``x[order // K]`` when ``order`` is a permutation of all ``T*K`` choices (its
    inverse ``inverse``): gathers forward and backward (:class:`_GatherRows`)."""
    return _GatherRows.apply(x_TD, order_N, inverse_N, K)


def rows_to_tokens(y_ND: torch.Tensor, order_N: torch.Tensor, inverse_N: torch.Tensor, weight_TK: torch.Tensor):
    """Each token's weighted sum of its K rows, ``(T, D)``: the rows back in choice order by a
    gather, then summed over the K choices in order (so every dispatcher adds alike)."""
    T, K = weight_TK.shape
    y_TKD = _PermuteRows.apply(y_ND, inverse_N, order_N).view(T, K, y_ND.shape[-1])
    w_TK1 = weight_TK.to(y_ND.dtype).unsqueeze(-1)
    return (y_TKD * w_TK1).squeeze(1) if K == 1 else (y_TKD * w_TK1).sum(1)


class _PermuteRows(torch.autograd.Function):
    """``y[perm]`` for a permutation ``perm`` (inverse ``inverse``): a gather both ways."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return y.index_select(0, perm)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return g.index_select(0, inverse), None, None


class TokenDispatcher(ABC):
    """Moves a layer's routed rows to its experts and back.

    The layer calls, per forward: ``expert_shard`` once at construction (which experts to
    build), ``balanced_assignment`` (BASE, in training), ``dispatch`` and then ``combine``.
    The output of ``dispatch`` is the experts' input in one of the two layouts above; the
    plan tells ``combine`` how to bring the experts' output back.
    """

    comm_seconds: float = 0.0  # wall time spent moving rows between processes so far

    def expert_shard(self, num_experts: int) -> tuple[int, int]:
        """(first expert, number of experts) this process holds; default: all of them."""
        return 0, num_experts

    def balanced_assignment(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """BASE's balanced assignment over the tokens this dispatcher balances; default: this
        process's own."""
        return balanced_assignment(scores_TE.detach())

    @abstractmethod
    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, DispatchPlan]:
        """The experts' input (grouped rows or a padded buffer) and the plan back."""

    @abstractmethod
    def combine(self, y: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """``(T, D)``: each token's expert outputs, weighted and summed."""


class LocalDispatcher(TokenDispatcher):
    """All experts live in this process."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, DispatchPlan]:
        T, D = x_TD.shape
        K = routing.expert_ids_TK.shape[1]
        kept_idx = routing.kept_TK.reshape(-1).nonzero().squeeze(1)  # indices into (T*K)
        ids_N = routing.expert_ids_TK.reshape(-1)[kept_idx]
        E = routing.num_experts
        if routing.capacity is None:
            order = torch.argsort(ids_N, stable=True)  # group by expert, token order within
            kept_idx = kept_idx[order]
            counts = torch.bincount(ids_N, minlength=E).tolist()
            if kept_idx.numel() == T * K:  # nothing dropped: a permutation of the choices, gathers both ways
                inverse = inverse_permutation(kept_idx)
                w_TK = routing.weights_TK
                plan = PermutationPlan(
                    kept_idx // K, w_TK.reshape(-1)[kept_idx], counts, None, T, kept_idx, inverse, w_TK
                )
                return choices_to_rows(x_TD, kept_idx, inverse, K), plan
            plan = DispatchPlan(kept_idx // K, routing.weights_TK.reshape(-1)[kept_idx], counts, None, T)
            return x_TD.index_select(0, plan.token_idx_N), plan
        C = routing.capacity
        slot_N = ids_N * C + routing.position_TK.reshape(-1)[kept_idx]
        plan = DispatchPlan(kept_idx // K, routing.weights_TK.reshape(-1)[kept_idx], None, slot_N, T)
        x_ND = x_TD.index_select(0, plan.token_idx_N)
        x_ECD = x_TD.new_zeros(E * C, D).index_copy(0, slot_N, x_ND).view(E, C, D)
        return x_ECD, plan

    def combine(self, y: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        D = y.shape[-1]
        if isinstance(plan, PermutationPlan):
            return rows_to_tokens(y, plan.order_N, plan.inverse_N, plan.weight_TK)
        y_ND = y if plan.slot_N is None else y.reshape(-1, D).index_select(0, plan.slot_N)
        y_ND = y_ND * plan.weight_N.to(y_ND.dtype).unsqueeze(1)
        return y_ND.new_zeros(plan.num_tokens, D).index_add(0, plan.token_idx_N, y_ND)
