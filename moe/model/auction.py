"""Exactly balanced token-to-expert assignment for BASE layers (Lewis et al. 2021).

A BASE layer routes every token to exactly one expert so that each expert receives a fixed
number of tokens, maximising the total token-expert affinity.  That is a linear assignment
problem in which expert e offers c_e identical slots; it is solved here by Bertsekas' auction
algorithm for "similar objects" with epsilon-scaling, in pure PyTorch.  Rounds are Jacobi: all
free tokens bid at once and each round is a handful of tensor ops (no loop over tokens), so the
solver runs on whatever device the scores are on.

Shape suffixes: T tokens, E experts, U free (bidding) tokens, C candidates for the experts bid on.
"""

from __future__ import annotations

import torch


def balanced_capacities(num_tokens: int, num_experts: int, device=None) -> torch.Tensor:
    """Exact balance: every expert gets ``num_tokens // num_experts`` tokens, and when the
    division is not exact the first ``num_tokens % num_experts`` experts get one more.
    Returns a LongTensor of shape (E,) summing to ``num_tokens``."""
    if num_experts <= 0 or num_tokens < 0:
        raise ValueError(f"need num_experts > 0 and num_tokens >= 0, got {num_experts=}, {num_tokens=}")
    base, extra = divmod(num_tokens, num_experts)
    cap_E = torch.full((num_experts,), base, dtype=torch.long, device=device)
    cap_E[:extra] += 1
    return cap_E


@torch.no_grad()
def balanced_assignment(
    scores_TE: torch.Tensor,
    capacities_E: torch.Tensor | None = None,
    *,
    eps: float | None = None,
    max_rounds: int = 10_000,
) -> torch.Tensor:
    """Assign each of T tokens to one of E experts maximising sum(scores[t, expert[t]]) subject to
    expert e receiving exactly capacities_E[e] tokens. Returns expert_T (LongTensor, shape (T,)).

    ``capacities_E`` defaults to :func:`balanced_capacities` (T // E each, the first T % E experts
    one more); zero capacities are allowed.  Solved by an auction with epsilon-scaling: eps starts
    at half the score range and is divided by 8 each phase down to the final ``eps``.  Scores
    must be finite; prices are kept in float64 whatever the input dtype.

    Optimality guarantee: the returned assignment satisfies eps-complementary slackness, so its
    objective is within ``T * eps`` of the optimum (exactly optimal for integer scores when
    ``eps < 1 / T``).  The default final eps is ``(max - min) * 1e-6 / T``, i.e. the objective is
    within ``1e-6 * (max(scores) - min(scores))`` of the optimum.

    Termination: every bid raises a price by at least eps, and tied tokens are spread over the
    experts (each token scans them in a different rotated order).  If ``max_rounds``
    bidding rounds (over all phases) are used up anyway, the tokens still unassigned are put into
    the remaining free slots in token order (deterministic, exactly balanced, but without the
    guarantee above).  Exact balance always holds on return.
    """
    if scores_TE.dim() != 2:
        raise ValueError(f"scores_TE must be 2-D (tokens, experts), got shape {tuple(scores_TE.shape)}")
    T, E = scores_TE.shape
    device = scores_TE.device
    if capacities_E is not None and (capacities_E.is_floating_point() or capacities_E.is_complex()):
        raise ValueError(f"capacities_E must be an integer tensor, got dtype {capacities_E.dtype}")
    cap_E = balanced_capacities(T, E, device) if capacities_E is None else capacities_E.to(device, torch.long)
    if cap_E.shape != (E,):
        raise ValueError(f"capacities_E must have shape ({E},), got {tuple(cap_E.shape)}")
    if bool((cap_E < 0).any()):
        raise ValueError(f"capacities_E must be non-negative, got {cap_E.tolist()}")
    if int(cap_E.sum()) != T:
        raise ValueError(f"capacities_E must sum to the number of tokens {T}, got {int(cap_E.sum())}")
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be non-negative, got {max_rounds}")
    if not bool(torch.isfinite(scores_TE).all()):
        raise ValueError("scores_TE must be finite")

    open_E = cap_E > 0
    if int(open_E.sum()) <= 1:  # zero or one expert can take tokens: nothing to optimise
        return torch.full((T,), int(open_E.long().argmax()) if T else 0, dtype=torch.long, device=device)

    span = float(scores_TE.max() - scores_TE.min()) or 1.0
    # Token t sees the experts in the rotated order col_TE[t] = (t, t+1, ...) mod E, so that tied
    # tokens spread their bids over the experts instead of all piling onto the same one.
    all_T, ar_E = torch.arange(T, device=device), torch.arange(E, device=device)
    col_TE = (all_T[:, None] + ar_E) % E
    s_TE = scores_TE.to(torch.float64).gather(1, col_TE)  # s_TE[t, j] = scores_TE[t, col_TE[t, j]]
    eps_final = span * 1e-6 / T if eps is None else float(eps)
    # Closed experts get an infinite price so nobody ever bids for them.
    price_E = torch.where(open_E, 0.0, float("inf")).to(torch.float64)
    owner_T = torch.full((T,), -1, dtype=torch.long, device=device)  # -1: unassigned
    bid_T = torch.zeros(T, dtype=torch.float64, device=device)  # what each holder bid
    rounds, cur_eps = 0, max(span / 2, eps_final)
    while rounds < max_rounds:
        owner_T.fill_(-1)  # new phase: keep the prices, drop the assignment
        free_U = all_T
        while free_U.numel() and rounds < max_rounds:
            rounds += 1
            # Every free token bids for its best expert: price + (best - second best value) + eps.
            # Two or more experts are open, so the second best value is finite.
            col_UE, s_UE = (col_TE, s_TE) if free_U is all_T else (col_TE[free_U], s_TE[free_U])
            val_UE = s_UE - price_E.take(col_UE)
            j1_U1 = val_UE.argmax(1, keepdim=True)  # (not .max(1): it goes parallel even when tiny)
            v1_U = val_UE.gather(1, j1_U1).squeeze(1)
            v2_U = val_UE.scatter_(1, j1_U1, -torch.inf).amax(1)
            e1_U = col_UE.gather(1, j1_U1).squeeze(1)
            owner_T[free_U] = e1_U
            bid_T[free_U] = price_E[e1_U] + (v1_U - v2_U) + cur_eps
            # Each expert that got bids keeps its cap_E highest bids (holders and bidders alike):
            # candidates C sorted by expert, then by bid descending; the rest become free.
            hit_E = torch.zeros(E, dtype=torch.bool, device=device)
            hit_E[e1_U] = True
            cand_C = hit_E[owner_T].nonzero().squeeze(1)
            cand_C = cand_C[bid_T[cand_C].argsort(descending=True, stable=True)]
            cand_C = cand_C[owner_T[cand_C].argsort(stable=True)]
            own_C = owner_T[cand_C]
            cnt_E = torch.bincount(own_C, minlength=E)
            start_E = cnt_E.cumsum(0) - cnt_E
            lost_C = torch.arange(len(cand_C), device=device) - start_E[own_C] >= cap_E[own_C]
            free_U = cand_C[lost_C]
            owner_T[free_U] = -1
            # A full expert's price is the lowest bid it holds; the others keep their price.
            last_E = (start_E + cap_E - 1).clamp(0, len(cand_C) - 1)
            price_E = torch.where(hit_E & (cnt_E >= cap_E), bid_T[cand_C[last_E]], price_E)
        if cur_eps <= eps_final or free_U.numel():
            break
        cur_eps = max(cur_eps / 8, eps_final)

    free_U = (owner_T < 0).nonzero().squeeze(1)
    if free_U.numel():  # round budget used up: free tokens (in index order) fill the free slots
        left_E = cap_E - torch.bincount(owner_T[owner_T >= 0], minlength=E)
        owner_T[free_U] = torch.repeat_interleave(torch.arange(E, device=device), left_E)
    assert torch.equal(torch.bincount(owner_T, minlength=E), cap_E), "balance invariant violated"
    return owner_T
