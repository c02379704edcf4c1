"""Expert-parallel token dispatcher: experts sharded over the expert-parallel (EP) group,
tokens moved to them and back by all-to-all with uneven split sizes.

The :class:`moe.model.dispatch.TokenDispatcher` interface, as the local dispatcher, so
:class:`moe.model.layers.MoELayer` does
not change: routing is computed on this rank's own T tokens over all E experts (the router
is replicated), ``dispatch`` sends every kept (token, choice) row to the rank holding its
expert, ``combine`` brings the expert outputs back and sums them per token.

One forward of a layer on one rank, EP ranks, E_l = E / EP local experts:

1. the kept rows grouped by destination expert (sorted by expert), in both modes: capacity
   mode's dropping is already in the routing (C from this rank's own T), and sending a
   zero-padded ``(E, C, D)`` buffer, as DeepSpeed does, would move and compute the empty
   slots too;
2. the per-expert row counts are exchanged (an all-to-all of E integers; one host sync),
   giving the split sizes of both directions;
3. the rows move with ``all_to_all_single`` and explicit split sizes (gloo rejects the list
   form ``all_to_all`` with unequal sizes), through an autograd function whose backward is
   the reverse all-to-all;
4. received rows arrive source-major ``[src][local expert]`` and are permuted to
   expert-major ``[local expert][src]``: grouped rows with counts per local expert summed
   over sources, run by the experts' grouped path (ranks with different T, hence
   different capacities, just work).

An expert, or a whole rank, that receives no rows is a normal case: the split sizes are
zero, every rank still takes part in every collective (which is what keeps them from
hanging), and the empty expert's weight gradient is zero.

Every rank of the EP group must call dispatch/combine (and backward) for the same layers in
the same order, with the same ``requires_grad`` on the layer input: that is what a
replicated model does.

Shape suffixes: T tokens, K choices, N rows sent, M rows received, E experts, C capacity,
D model dim, S source ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe.model.auction import balanced_assignment
from moe.model.dispatch import DispatchPlan, TokenDispatcher, choices_to_rows, inverse_permutation, rows_to_tokens
from moe.model.routing import Routing
from moe.parallel.state import ParallelState, check_expert_sharding


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with split sizes; backward is the reverse exchange.
    Wall time of both goes to ``owner.comm_seconds``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, owner) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.owner = (out_splits, in_splits), group, owner
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        t0 = time.perf_counter()
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        owner.comm_seconds += time.perf_counter() - t0
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits), *grad_out.shape[1:]))
        t0 = time.perf_counter()
        dist.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group)
        ctx.owner.comm_seconds += time.perf_counter() - t0
        return grad_in, None, None, None, None


@dataclass
class AllToAllPlan(DispatchPlan):
    """A :class:`DispatchPlan` plus how the rows crossed the EP group."""

    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank
    order_M: torch.Tensor | None  # received row feeding each expert-major row (None: identity)
    # nothing dropped: the sent rows are a permutation of the T*K choices (moe.model.dispatch)
    order_N: torch.Tensor | None = None  # flat choice t*K + j of each sent row
    inverse_N: torch.Tensor | None = None  # sent row of each choice
    weight_TK: torch.Tensor | None = None


def _expert_major_order(recv_SE: torch.Tensor, M: int) -> torch.Tensor | None:
    """Permutation taking rows laid out ``[src][expert]`` (``recv_SE[s, e]`` rows each) to
    ``[expert][src]``: ``x_expert_major = x_source_major[order]``.  None when it is the identity
    (one source or one local expert)."""
    S, El = recv_SE.shape
    if S == 1 or El == 1:
        return None
    n = recv_SE.reshape(-1)
    start_SE = (n.cumsum(0) - n).view(S, El)  # first row of each (src, expert) block
    len_B, start_B = recv_SE.t().reshape(-1), start_SE.t().reshape(-1)  # blocks in expert-major order
    first_B = len_B.cumsum(0) - len_B  # where each block starts in the expert-major layout
    return (
        torch.repeat_interleave(start_B - first_B, len_B, output_size=M) + torch.arange(M, device=recv_SE.device)
    ).long()


class AllToAllDispatcher(TokenDispatcher):
    """Experts sharded over an expert-parallel group; tokens moved by all-to-all.

    Args:
        state_or_group: a :class:`ParallelState` (its ``ep_group``), or a process group whose
            ranks, in group order, hold consecutive expert shards (``None`` with a one-process
            group: no communication, the same as :class:`LocalDispatcher`).

    Rank ``r`` of the group holds experts ``[r * E/EP, (r + 1) * E/EP)``.  ``MoELayer`` asks
    :meth:`expert_shard` which experts to build, and, for BASE in training,
    :meth:`balanced_assignment` (balanced over all tokens of the group).

    ``comm_seconds`` adds up the wall time spent in this dispatcher's collectives (counts
    exchange, token all-to-all forward and backward, BASE's gather/scatter), waiting for
    slower ranks included; the trainer reports it as ``perf/comm_time_s``.  Exact with gloo,
    whose collectives block; with NCCL, which returns once the kernel is queued, it is mostly
    launch time (the counts exchange, which reads its result back, does wait).
    """

    def __init__(self, state_or_group: ParallelState | dist.ProcessGroup | None):
        if isinstance(state_or_group, ParallelState):
            self.group, self.ep_size = state_or_group.ep_group, state_or_group.ep_size
            self.ep_rank = state_or_group.ep_rank
        elif state_or_group is None:
            self.group, self.ep_size, self.ep_rank = None, 1, 0
        else:
            self.group = state_or_group
            self.ep_size, self.ep_rank = dist.get_world_size(state_or_group), dist.get_rank(state_or_group)
        if self.ep_size > 1 and self.group is None:
            raise ValueError(f"expert-parallel size {self.ep_size} needs a process group")
        self.comm_seconds = 0.0
        self.ranks_per_token_T: torch.Tensor | None = None  # the last dispatch's: distinct ranks each token reached

    def __deepcopy__(self, memo):  # holds a process-group handle: a copied model shares it
        return self

    def expert_shard(self, num_experts: int) -> tuple[int, int]:
        """(first expert, number of experts) held by this rank."""
        check_expert_sharding(num_experts, self.ep_size)
        n = num_experts // self.ep_size
        return self.ep_rank * n, n

    # -- BASE ---------------------------------------------------------------------------------
    @torch.no_grad()
    def balanced_assignment(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """BASE's balanced assignment over the tokens of the whole EP group: every expert gets
        ``sum(T) / E`` tokens in total (the first ``sum(T) % E`` one more), the total affinity
        of all ranks' tokens maximised.  The scores are gathered on EP rank 0 (E floats a
        token), solved there, and each rank gets its own tokens' experts back.  Returns
        ``expert_T`` for this rank's tokens.

        The assignment is the one a single process would find for the group's tokens (the
        EP=2 == EP=1 tests rely on it).  fairseq's BaseLayer instead solves per worker, each
        worker's T tokens spread evenly over all experts after a random shuffle of tokens
        across workers: cheaper (no gather, EP auctions in parallel) but more constrained.
        Here one auction of sum(T) tokens runs on one rank while the others wait."""
        if self.ep_size == 1:
            return balanced_assignment(scores_TE)
        t0 = time.perf_counter()
        T, E = scores_TE.shape
        sizes = [torch.zeros(1, dtype=torch.long, device=scores_TE.device) for _ in range(self.ep_size)]
        dist.all_gather(sizes, torch.tensor([T], dtype=torch.long, device=scores_TE.device), group=self.group)
        sizes_S = torch.cat(sizes).tolist()
        t_max = max(sizes_S)
        padded = scores_TE.new_zeros(t_max, E)
        padded[:T] = scores_TE
        root = self.ep_rank == 0
        bufs = [torch.empty_like(padded) for _ in range(self.ep_size)] if root else None
        dist.gather(padded, bufs, group=self.group, group_dst=0)
        ids_back = None
        if root:
            all_TE = torch.cat([b[:n] for b, n in zip(bufs, sizes_S)])
            ids_all = balanced_assignment(all_TE)
            ids_back = [ids_all.new_zeros(t_max) for _ in range(self.ep_size)]
            start = 0
            for buf, n in zip(ids_back, sizes_S):
                buf[:n] = ids_all[start : start + n]
                start += n
        ids = torch.empty(t_max, dtype=torch.long, device=scores_TE.device)
        dist.scatter(ids, ids_back, group=self.group, group_src=0)
        self.comm_seconds += time.perf_counter() - t0  # the auction on EP rank 0 included: the others wait for it
        return ids[:T]

    # -- dispatch / combine -------------------------------------------------------------------
    def _exchange_counts(self, send_E: torch.Tensor) -> torch.Tensor:
        """Rows this rank sends to each expert -> rows it receives, ``(S, E_l)``."""
        El = send_E.numel() // self.ep_size
        if self.ep_size == 1:
            return send_E.view(1, El)
        recv = torch.empty_like(send_E)
        t0 = time.perf_counter()
        dist.all_to_all_single(recv, send_E, group=self.group)  # E_l counts to/from each rank
        self.comm_seconds += time.perf_counter() - t0
        return recv.view(self.ep_size, El)

    def _move(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        return x if self.ep_size == 1 else _AllToAll.apply(x, out_splits, in_splits, self.group, self)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, AllToAllPlan]:
        T, D = x_TD.shape
        K = routing.expert_ids_TK.shape[1]
        E, S = routing.num_experts, self.ep_size
        check_expert_sharding(E, S)
        El = E // S
        kept_idx = routing.kept_TK.reshape(-1).nonzero().squeeze(1)  # indices into (T*K)
        ids_N = routing.expert_ids_TK.reshape(-1)[kept_idx]
        # Capacity mode too sends only the kept rows, grouped by expert: the dropping was done
        # by the routing, and a padded (E, C, D) buffer would carry (C - load) zero rows per
        # expert through both all-to-alls and the experts (20% more at capacity factor 1.25).
        order = torch.argsort(ids_N, stable=True)  # by expert, so by destination rank too
        kept_idx = kept_idx[order]
        send_E = torch.bincount(ids_N, minlength=E)
        token_idx_N = kept_idx // K
        if S > 1:  # which ranks each token's rows go to (group-limited routing bounds it)
            reach_TS = torch.zeros(T, S, dtype=torch.bool, device=x_TD.device)
            reach_TS[token_idx_N, ids_N[order] // El] = True
            self.ranks_per_token_T = reach_TS.sum(dim=1)
        inverse = None
        if kept_idx.numel() == T * K:  # nothing dropped: gathers both ways, as the local dispatcher
            inverse = inverse_permutation(kept_idx)
            x_send = choices_to_rows(x_TD, kept_idx, inverse, K)
        else:
            x_send = x_TD.index_select(0, token_idx_N)
        weight_N = routing.weights_TK.reshape(-1)[kept_idx]
        recv_SE = self._exchange_counts(send_E)
        sent_recv = torch.cat([send_E, recv_SE.reshape(-1)]).tolist()  # the one host sync: split sizes are ints
        send_splits = [sum(sent_recv[s * El : (s + 1) * El]) for s in range(S)]
        counts_SE = [sent_recv[E + s * El : E + (s + 1) * El] for s in range(S)]
        recv_splits = [sum(row) for row in counts_SE]
        x_recv = self._move(x_send, recv_splits, send_splits)
        order_M = _expert_major_order(recv_SE, sum(recv_splits))
        x_local = x_recv if order_M is None else x_recv.index_select(0, order_M)
        counts = [sum(col) for col in zip(*counts_SE)]  # rows per local expert, all sources
        gathers = (kept_idx, inverse, routing.weights_TK) if inverse is not None else (None, None, None)
        return x_local, AllToAllPlan(
            token_idx_N, weight_N, counts, None, T, send_splits, recv_splits, order_M, *gathers
        )

    def combine(self, y: torch.Tensor, plan: AllToAllPlan) -> torch.Tensor:
        D = y.shape[-1]
        y_MD = y.reshape(-1, D)
        if plan.order_M is not None:  # back to source-major
            y_MD = y_MD.new_empty(y_MD.shape).index_copy(0, plan.order_M, y_MD)
        y_back = self._move(y_MD, plan.send_splits, plan.recv_splits)  # rows as this rank sent them
        if plan.inverse_N is not None:
            return rows_to_tokens(y_back, plan.order_N, plan.inverse_N, plan.weight_TK)
        y_ND = y_back * plan.weight_N.to(y_back.dtype).unsqueeze(1)
        return y_ND.new_zeros(plan.num_tokens, D).index_add(0, plan.token_idx_N, y_ND)
