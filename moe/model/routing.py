"""Routing algorithms: pure functions from router logits to a :class:`Routing`.

No module state, no collectives, no parameters: each function takes logits (or affinity
scores) and returns which experts every token goes to, with what weight, which assignments
the capacity limit dropped, and the auxiliary losses.  That is what lets them be tested on
hand-written logits, and lets the same routing serve a local, an all-to-all or a remote
dispatcher.

Shape suffixes: T tokens, E experts, K choices per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe.model.auction import balanced_assignment


@dataclass
class Routing:
    """Where each token goes.

    ``weights_TK`` is differentiable with respect to the logits and is exactly 0 where
    ``kept_TK`` is False, so a dropped assignment contributes nothing and the token passes
    through the block's residual connection.
    """

    expert_ids_TK: torch.Tensor  # long, chosen expert per (token, choice)
    weights_TK: torch.Tensor  # combine weights (fp32; fp64 for a float64 router)
    kept_TK: torch.Tensor  # bool: False if dropped by capacity or by GShard's random routing
    position_TK: torch.Tensor | None  # long, slot in the expert's capacity buffer (capacity mode)
    capacity: int | None  # C, tokens per expert buffer; None in dropless mode
    aux_loss: torch.Tensor  # load-balancing loss E * sum_i f_i P_i (0 where not used)
    z_loss: torch.Tensor  # mean(logsumexp(logits)^2)
    counts_E: torch.Tensor  # float, assignments each expert was sent before capacity dropping
    num_dropped: torch.Tensor  # float scalar, assignments dropped by capacity

    @property
    def num_experts(self) -> int:
        return self.counts_E.numel()


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """Slots per expert: ``max(min_capacity, ceil(k * cf * T / E))``, never more than T.

    (An expert can receive each token at most once, so more than T slots is wasted memory.)
    The product is rounded to 9 decimals before the ceiling, so float error cannot add a slot
    (``1.1 * 100 / 10`` is ``11.000000000000002`` in floats; the capacity is 11, not 12).
    """
    c = max(min_capacity, math.ceil(round(k * capacity_factor * num_tokens / num_experts, 9)))
    return max(1, min(c, num_tokens))


def load_balancing_loss(
    probs_TE: torch.Tensor, ids_TK: torch.Tensor, kept_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer auxiliary loss ``E * sum_i f_i * P_i``.

    f_i: fraction of the (token, choice) assignments in ``ids_TK`` sent to expert i (counted
    before capacity dropping, as in Switch and GShard); P_i: mean router probability of i.
    f is not differentiable; the gradient reaches the router through P.  Equals 1 when both
    are uniform, E when every token goes to one expert with certainty.
    """
    E = probs_TE.shape[-1]
    if probs_TE.shape[0] == 0:  # no tokens: 0, not the NaN of an empty mean
        return probs_TE.sum()
    mask = F.one_hot(ids_TK, E).to(probs_TE.dtype)  # (T, K, E)
    if kept_TK is not None:
        mask = mask * kept_TK.unsqueeze(-1)
    f_E = mask.sum(dim=(0, 1)) / mask.sum().clamp_min(1.0)
    P_E = probs_TE.mean(dim=0)
    return E * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean(logsumexp(logits)^2)``: keeps router logits small (0 for no tokens)."""
    z_T = torch.logsumexp(logits_TE, dim=-1).pow(2)
    return z_T.mean() if z_T.numel() else z_T.sum()


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Routing math in fp32 at least: bf16/fp16 logits are upcast, a float64 router's kept."""
    return x if x.dtype == torch.float64 else x.float()


def _apply_capacity(ids_TK: torch.Tensor, kept_TK: torch.Tensor, E: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each kept assignment a slot in its expert's buffer; drop those past capacity C.

    Priority: every token's first choice is placed before any token's second choice, and
    within one choice rank tokens go in order (GShard Algorithm 1, DeepSpeed top2gating).
    Returns (kept_TK after dropping, position_TK).
    """
    T, K = ids_TK.shape
    ids_N = ids_TK.t().reshape(-1)  # (K*T,), choice-major: all first choices, then seconds
    mask_NE = F.one_hot(ids_N, E).to(torch.int32) * kept_TK.t().reshape(-1, 1)
    pos_N = ((torch.cumsum(mask_NE, dim=0) - 1) * mask_NE).sum(dim=-1)  # rank within its expert
    position_TK = pos_N.view(K, T).t().long()
    return kept_TK & (position_TK < C), position_TK


def _finish(logits_TE, probs_TE, ids_TK, weights_TK, kept_TK, capacity, aux_loss) -> Routing:
    E = logits_TE.shape[-1]
    counts_E = F.one_hot(ids_TK, E).mul(kept_TK.unsqueeze(-1)).sum(dim=(0, 1)).float()
    position_TK = None
    n_before = kept_TK.sum()
    if capacity is not None:
        kept_TK, position_TK = _apply_capacity(ids_TK, kept_TK, E, capacity)
    num_dropped = (n_before - kept_TK.sum()).float()
    return Routing(
        expert_ids_TK=ids_TK,
        weights_TK=weights_TK * kept_TK,
        kept_TK=kept_TK,
        position_TK=position_TK,
        capacity=capacity,
        aux_loss=aux_loss,
        z_loss=router_z_loss(logits_TE),
        counts_E=counts_E,
        num_dropped=num_dropped,
    )


SCORE_FUNCS = ("softmax", "sigmoid")


def router_scores(logits_TE: torch.Tensor, score_func: str = "softmax") -> torch.Tensor:
    """Token-expert scores: ``softmax`` over the experts, or each expert's own ``sigmoid``
    (DeepSeek-V3: an expert's score does not fall because another's rose)."""
    if score_func == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(logits_TE)
    raise ValueError(f"unknown score function {score_func!r}; use one of {', '.join(SCORE_FUNCS)}")


def limit_to_groups(select_TE: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """Group-limited routing (DeepSeek-V2/V3): the E experts form ``n_groups`` groups of
    consecutive experts; each token keeps its ``topk_groups`` best groups and every expert of
    the others gets ``-inf``.  A group's score is the sum of its two best selection scores
    (DeepSeek-V3; its one best when a group holds a single expert)."""
    T, E = select_TE.shape
    if n_groups <= 1 or topk_groups >= n_groups:
        return select_TE
    if E % n_groups:
        raise ValueError(f"{n_groups} groups do not divide {E} experts")
    per = E // n_groups
    grouped_TGe = select_TE.view(T, n_groups, per)
    group_T_G = grouped_TGe.topk(min(2, per), dim=-1).values.sum(dim=-1)  # (T, G)
    best_TG = group_T_G.topk(topk_groups, dim=-1).indices
    keep_TG = torch.zeros(T, n_groups, dtype=torch.bool, device=select_TE.device).scatter_(1, best_TG, True)
    return select_TE.masked_fill(~keep_TG.repeat_interleave(per, dim=1), float("-inf"))


def sequence_balancing_loss(
    probs_TE: torch.Tensor, ids_TK: torch.Tensor, seq_len: int, kept_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balancing loss: ``E * sum_i f_i P_i`` computed within each
    sequence of ``seq_len`` consecutive tokens, then averaged over the sequences, so no single
    sequence may pile onto a few experts even when the batch as a whole is balanced."""
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum()
    if T % seq_len:
        raise ValueError(f"{T} tokens are not whole sequences of {seq_len}")
    B = T // seq_len
    mask_BSKE = F.one_hot(ids_TK, E).to(probs_TE.dtype).view(B, seq_len, -1, E)
    if kept_TK is not None:
        mask_BSKE = mask_BSKE * kept_TK.view(B, seq_len, -1, 1)
    f_BE = mask_BSKE.sum(dim=(1, 2)) / mask_BSKE.sum(dim=(1, 2, 3)).clamp_min(1.0).unsqueeze(1)
    P_BE = probs_TE.view(B, seq_len, E).mean(dim=1)
    return E * (f_BE * P_BE).sum(dim=-1).mean()


def topk_route(
    logits_TE: torch.Tensor,
    k: int,
    *,
    capacity_factor: float | None = None,
    min_capacity: int = 0,
    normalize: bool = True,
    random_routing: bool = False,
    aux_first_choice_only: bool = False,
    generator: torch.Generator | None = None,
    score_func: str = "softmax",
    bias_E: torch.Tensor | None = None,
    route_scale: float = 1.0,
    n_groups: int = 1,
    topk_groups: int = 1,
    aux_seq_len: int | None = None,
) -> Routing:
    """General top-k routing over router scores (a softmax of the logits, or sigmoids).

    Args:
        logits_TE: router logits (computed in fp32 by the caller; bf16/fp16 upcast to fp32
            here regardless, fp64 kept).
        k: experts per token.
        capacity_factor: None for dropless execution; otherwise each expert gets
            ``expert_capacity(T, E, k, cf, min_capacity)`` slots and assignments past it are
            dropped (first choices fill slots before second choices).
        normalize: renormalise the k gate values to sum to 1 (when k > 1).
        random_routing: GShard's rule: keep the second expert with probability
            ``min(1, 2 * g2)`` where g2 is its (renormalised) gate.
        aux_first_choice_only: count f_i in the balancing loss over first choices only
            (Switch, GShard) instead of over all k choices.
        generator: RNG for random routing (the caller's, so runs are reproducible).
        score_func: ``softmax`` or ``sigmoid`` (:func:`router_scores`).  With sigmoid the
            balancing loss's P uses the scores normalised over the experts (DeepSeek-V3).
        bias_E: loss-free balancing (Wang et al. 2024): added to the scores to *choose* the
            experts only; the combine weights are the unbiased scores.  Not differentiated.
        route_scale: the combine weights' factor, after normalisation (DeepSeek-V3's
            routed scaling factor).
        n_groups, topk_groups: group-limited routing (:func:`limit_to_groups`).
        aux_seq_len: compute the balancing loss per sequence of this many consecutive tokens
            (:func:`sequence_balancing_loss`); None: over the whole batch.
    """
    if logits_TE.dim() != 2:
        raise ValueError(f"logits must be (tokens, experts), got shape {tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    if not 1 <= k <= E:
        raise ValueError(f"k={k} must be in [1, num_experts={E}]")
    logits_TE = _upcast(logits_TE)
    scores_TE = router_scores(logits_TE, score_func)
    select_TE = scores_TE.detach()
    if bias_E is not None:
        select_TE = select_TE + bias_E.to(select_TE.dtype)
    select_TE = limit_to_groups(select_TE, n_groups, topk_groups)
    ids_TK = torch.topk(select_TE, k, dim=-1).indices
    gates_TK = scores_TE.gather(1, ids_TK)
    if normalize and k > 1:
        gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
    if route_scale != 1.0:
        gates_TK = gates_TK * route_scale
    kept_TK = torch.ones_like(ids_TK, dtype=torch.bool)
    if random_routing and k > 1:
        u_T = torch.rand(T, device=logits_TE.device, generator=generator)
        kept_TK[:, 1] = u_T < 2.0 * gates_TK[:, 1].detach()
    aux_ids = ids_TK[:, :1] if aux_first_choice_only else ids_TK
    probs_TE = scores_TE if score_func == "softmax" else scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    if aux_seq_len is None:
        aux = load_balancing_loss(probs_TE, aux_ids)
    else:
        aux = sequence_balancing_loss(probs_TE, aux_ids, aux_seq_len)
    capacity = None if capacity_factor is None else expert_capacity(T, E, k, capacity_factor, min_capacity)
    return _finish(logits_TE, probs_TE, ids_TK, gates_TK, kept_TK, capacity, aux)


def switch_route(logits_TE: torch.Tensor, *, capacity_factor: float | None = None, min_capacity: int = 0) -> Routing:
    """Switch Transformer: top-1, gate = the chosen expert's router probability (Fedus et al.)."""
    return topk_route(logits_TE, 1, capacity_factor=capacity_factor, min_capacity=min_capacity)


def gshard_route(
    logits_TE: torch.Tensor,
    *,
    capacity_factor: float | None = None,
    min_capacity: int = 0,
    random_routing: bool = True,
    generator: torch.Generator | None = None,
) -> Routing:
    """GShard top-2 (Lepikhin et al., Algorithm 1): g1, g2 renormalised to sum to 1, the
    second expert kept with probability min(1, 2 g2), capacity 2·cf·T/E with first choices
    placed before second choices, balancing loss over first choices."""
    return topk_route(
        logits_TE,
        2,
        capacity_factor=capacity_factor,
        min_capacity=min_capacity,
        normalize=True,
        random_routing=random_routing,
        aux_first_choice_only=True,
        generator=generator,
    )


def base_route(scores_TE: torch.Tensor, *, training: bool, assignment_T: torch.Tensor | None = None) -> Routing:
    """BASE layers (Lewis et al. 2021): token-expert affinities ``h·c_e`` in, one expert per token.

    Training: the balanced linear assignment (every expert gets exactly T/E tokens; when E
    does not divide T the first T mod E experts get one more) that maximises the total
    affinity, solved by an auction.  Evaluation: greedy argmax (balance cannot be enforced on
    a stream of tokens at inference).  No tokens are dropped and there is no auxiliary loss.
    The weight is ``sigmoid(h·c_e)``: the layer's output ``σ·f_e(h) + (1−σ)·h`` with a residual
    expert ``f_e(h) = h + FFN_e(h)`` is ``h + σ·FFN_e(h)``, and the block's residual carries h.

    ``assignment_T`` (training only): the balanced assignment already solved by the caller,
    e.g. over the tokens of a whole expert-parallel group (``AllToAllDispatcher``), so this
    function stays free of collectives.
    """
    if scores_TE.dim() != 2:
        raise ValueError(f"scores must be (tokens, experts), got shape {tuple(scores_TE.shape)}")
    scores_TE = _upcast(scores_TE)
    if training and assignment_T is not None:
        if assignment_T.shape != scores_TE.shape[:1]:
            raise ValueError(f"assignment_T must have shape ({scores_TE.shape[0]},), got {tuple(assignment_T.shape)}")
        ids_T = assignment_T.long()
    elif training:
        ids_T = balanced_assignment(scores_TE.detach())
    else:
        ids_T = scores_TE.detach().argmax(dim=-1)
    ids_TK = ids_T.unsqueeze(1)
    weights_TK = torch.sigmoid(scores_TE.gather(1, ids_TK))
    kept_TK = torch.ones_like(ids_TK, dtype=torch.bool)
    zero = scores_TE.new_zeros(())
    counts_E = torch.bincount(ids_T, minlength=scores_TE.shape[1]).float()
    return Routing(ids_TK, weights_TK, kept_TK, None, None, zero, zero, counts_E, zero)
