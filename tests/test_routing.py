"""Tests for moe.model.routing: router math on hand-written logits, checked against the papers' formulas.

Expected values are computed here from the definitions (Switch: Fedus et al. 2021; GShard:
Lepikhin et al. 2021, Algorithm 1; ST-MoE z-loss; BASE: Lewis et al. 2021), with ``math`` on
Python floats, not by re-running the implementation's tensor arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe.model.auction import balanced_assignment
from moe.model.routing import (
    Routing,
    base_route,
    expert_capacity,
    gshard_route,
    load_balancing_loss,
    router_z_loss,
    switch_route,
    topk_route,
)


def softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    s = sum(ex)
    return [v / s for v in ex]


def logsumexp_row(row: list[float]) -> float:
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def aux_by_hand(logits: list[list[float]], first_choice: list[int]) -> float:
    """E * sum_i f_i * P_i, f_i = fraction of tokens whose (first) choice is i, P_i = mean prob."""
    T, E = len(logits), len(logits[0])
    probs = [softmax_row(r) for r in logits]
    f = [sum(1 for c in first_choice if c == i) / T for i in range(E)]
    P = [sum(p[i] for p in probs) / T for i in range(E)]
    return E * sum(fi * pi for fi, pi in zip(f, P))


def z_by_hand(logits: list[list[float]]) -> float:
    return sum(logsumexp_row(r) ** 2 for r in logits) / len(logits)


# ---------------------------------------------------------------------------------------------
# expert_capacity


@pytest.mark.parametrize(
    "T, E, k, cf, min_cap, expected",
    [
        (6, 3, 1, 1.0, 0, 2),  # ceil(1.0 * 6 / 3)
        (8, 4, 1, 1.25, 0, 3),  # ceil(2.5)
        (8, 4, 2, 1.25, 0, 5),  # GShard: ceil(2 * 1.25 * 8 / 4)
        (6, 3, 1, 0.1, 3, 3),  # floored at min_capacity
        (6, 3, 1, 0.1, 0, 1),  # ceil(0.2)
        (4, 2, 1, 10.0, 0, 4),  # never more than T: a token reaches an expert at most once
        (100, 10, 1, 1.1, 0, 11),  # 1.1 * 100 / 10 is 11.000000000000002 in floats: still 11
        (1000, 8, 1, 1.2, 0, 150),  # 1.2 * 1000 / 8 = 150 exactly in decimal
        (100, 10, 2, 0.7, 0, 14),  # 2 * 0.7 * 100 / 10 = 14
    ],
)
def test_expert_capacity_formula(T, E, k, cf, min_cap, expected):
    assert expert_capacity(T, E, k, cf, min_cap) == expected


# ---------------------------------------------------------------------------------------------
# Switch (top-1)

# T=6, E=3. First choices: e0, e1, e0, e0, e2, e0  -> e0 receives tokens 0, 2, 3, 5.
SWITCH_LOGITS = [
    [2.0, 0.0, 0.0],
    [0.0, 1.0, 0.0],
    [3.0, 1.0, 0.0],
    [1.0, 0.0, 0.0],
    [0.0, 0.0, 2.0],
    [0.5, 0.0, 0.0],
]
SWITCH_CHOICE = [0, 1, 0, 0, 2, 0]


def test_switch_chosen_experts_weights_and_capacity_drops():
    r = switch_route(torch.tensor(SWITCH_LOGITS), capacity_factor=1.0, min_capacity=0)
    assert isinstance(r, Routing)
    assert r.capacity == 2  # ceil(1.0 * 6 / 3)
    assert r.expert_ids_TK.shape == (6, 1)
    assert r.expert_ids_TK[:, 0].tolist() == SWITCH_CHOICE
    # e0 is full after tokens 0 and 2: the later tokens 3 and 5 are dropped, in token order.
    assert r.kept_TK[:, 0].tolist() == [True, True, True, False, True, False]
    probs = [softmax_row(row) for row in SWITCH_LOGITS]
    expected_w = [probs[t][SWITCH_CHOICE[t]] if t not in (3, 5) else 0.0 for t in range(6)]
    torch.testing.assert_close(r.weights_TK[:, 0], torch.tensor(expected_w), rtol=1e-6, atol=1e-7)
    assert r.weights_TK[3, 0].item() == 0.0 and r.weights_TK[5, 0].item() == 0.0  # exactly zero
    assert r.num_dropped.item() == 2.0
    # counts are taken before capacity dropping
    assert r.counts_E.tolist() == [4.0, 1.0, 1.0]
    # positions of the kept assignments: e0 -> 0, 1 (tokens 0, 2); e1 -> 0; e2 -> 0
    kept_pos = {t: r.position_TK[t, 0].item() for t in range(6) if r.kept_TK[t, 0]}
    assert kept_pos == {0: 0, 1: 0, 2: 1, 4: 0}


def test_switch_aux_and_z_loss_values():
    r = switch_route(torch.tensor(SWITCH_LOGITS), capacity_factor=1.0)
    # f = [4/6, 1/6, 1/6] (before dropping), P = mean softmax
    assert r.aux_loss.item() == pytest.approx(aux_by_hand(SWITCH_LOGITS, SWITCH_CHOICE), rel=1e-6)
    assert r.z_loss.item() == pytest.approx(z_by_hand(SWITCH_LOGITS), rel=1e-6)
    # the standalone functions agree
    assert router_z_loss(torch.tensor(SWITCH_LOGITS)).item() == pytest.approx(z_by_hand(SWITCH_LOGITS), rel=1e-6)


def test_switch_aux_loss_value_independent_of_capacity_and_mode():
    a = switch_route(torch.tensor(SWITCH_LOGITS), capacity_factor=1.0).aux_loss
    b = switch_route(torch.tensor(SWITCH_LOGITS), capacity_factor=None).aux_loss
    torch.testing.assert_close(a, b)


def test_switch_min_capacity_floor():
    r = switch_route(torch.tensor(SWITCH_LOGITS), capacity_factor=0.1, min_capacity=3)
    assert r.capacity == 3  # ceil(0.1 * 6 / 3) = 1, floored at 3
    assert r.kept_TK[:, 0].tolist() == [True, True, True, True, True, False]
    assert r.num_dropped.item() == 1.0
    assert r.weights_TK[5, 0].item() == 0.0


def test_switch_dropless_keeps_every_token():
    r = switch_route(torch.tensor(SWITCH_LOGITS), capacity_factor=None)
    assert r.capacity is None and r.position_TK is None
    assert bool(r.kept_TK.all())
    assert r.num_dropped.item() == 0.0
    probs = [softmax_row(row) for row in SWITCH_LOGITS]
    expected_w = [probs[t][SWITCH_CHOICE[t]] for t in range(6)]
    torch.testing.assert_close(r.weights_TK[:, 0], torch.tensor(expected_w), rtol=1e-6, atol=1e-7)
    assert r.counts_E.tolist() == [4.0, 1.0, 1.0]


def test_switch_weight_gradient_is_softmax_derivative():
    """Switch gate = p_e (not renormalised): d p_e / d l_j = p_e (delta_ej - p_j)."""
    logits = torch.tensor([[0.3, -0.2, 1.0]], requires_grad=True)
    r = switch_route(logits)
    r.weights_TK.sum().backward()
    p = softmax_row([0.3, -0.2, 1.0])
    expected = [p[2] * ((1.0 if j == 2 else 0.0) - p[j]) for j in range(3)]
    torch.testing.assert_close(logits.grad[0], torch.tensor(expected), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# GShard (top-2)

# T=4, E=3, cf=0.75 -> C = ceil(2 * 0.75 * 4 / 3) = 2.
#   token:  first, second
#   t0:     e0,    e1
#   t1:     e2,    e0     <- in token order, t1's 2nd choice would take e0's 2nd slot before t2's 1st
#   t2:     e0,    e2
#   t3:     e1,    e2
GSHARD_LOGITS = [
    [3.0, 1.0, 0.0],
    [1.0, 0.0, 2.0],
    [2.0, 0.0, 1.0],
    [0.0, 2.0, 1.0],
]
GSHARD_IDS = [[0, 1], [2, 0], [0, 2], [1, 2]]


def test_gshard_gates_renormalised():
    r = gshard_route(torch.tensor(GSHARD_LOGITS), random_routing=False)
    assert r.expert_ids_TK.tolist() == GSHARD_IDS
    assert bool(r.kept_TK.all())
    for t, row in enumerate(GSHARD_LOGITS):
        e1, e2 = GSHARD_IDS[t]
        g1 = sigmoid(row[e1] - row[e2])  # p1 / (p1 + p2)
        assert r.weights_TK[t, 0].item() == pytest.approx(g1, rel=1e-6)
        assert r.weights_TK[t, 1].item() == pytest.approx(1.0 - g1, rel=1e-5)
    torch.testing.assert_close(r.weights_TK.sum(1), torch.ones(4))


def test_gshard_first_choices_fill_slots_before_second_choices():
    r = gshard_route(torch.tensor(GSHARD_LOGITS), capacity_factor=0.75, random_routing=False)
    assert r.capacity == 2
    # e0: t0 (1st), t2 (1st) fill it; t1's 2nd choice is dropped although t1 comes before t2.
    # e1: t3 (1st) then t0 (2nd): both fit.
    # e2: t1 (1st), then 2nd choices in token order: t2 fits, t3 is dropped.
    assert r.kept_TK.tolist() == [[True, True], [True, False], [True, True], [True, False]]
    pos = {(t, j): r.position_TK[t, j].item() for t in range(4) for j in range(2) if r.kept_TK[t, j]}
    assert pos == {(0, 0): 0, (2, 0): 1, (3, 0): 0, (0, 1): 1, (1, 0): 0, (2, 1): 1}
    assert r.num_dropped.item() == 2.0
    assert r.counts_E.tolist() == [3.0, 2.0, 3.0]  # before dropping
    assert r.weights_TK[1, 1].item() == 0.0 and r.weights_TK[3, 1].item() == 0.0
    # the kept first choice keeps its renormalised gate g1 (not re-renormalised to 1)
    assert r.weights_TK[1, 0].item() == pytest.approx(sigmoid(2.0 - 1.0), rel=1e-6)
    # balancing loss over first choices: f = [2/4, 1/4, 1/4]
    firsts = [ids[0] for ids in GSHARD_IDS]
    assert r.aux_loss.item() == pytest.approx(aux_by_hand(GSHARD_LOGITS, firsts), rel=1e-6)
    assert r.z_loss.item() == pytest.approx(z_by_hand(GSHARD_LOGITS), rel=1e-6)


def test_gshard_random_routing_rule_with_seeded_generator():
    """Second expert kept iff u < 2 * g2, u ~ U[0, 1) drawn from the caller's generator."""
    T, E = 64, 4
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(123), dtype=torch.float64) * 1.5
    logits[0] = torch.tensor([1.0, 1.0, -3.0, -3.0], dtype=torch.float64)  # g2 = 0.5: always kept
    r = gshard_route(logits.float(), random_routing=True, generator=torch.Generator().manual_seed(7))
    u = torch.rand(T, generator=torch.Generator().manual_seed(7))
    rows = logits.tolist()
    n_checked = 0
    for t in range(T):
        order = sorted(range(E), key=lambda e: -rows[t][e])
        g2 = sigmoid(rows[t][order[1]] - rows[t][order[0]])
        assert r.kept_TK[t, 0]  # the first choice is never randomly dropped
        if abs(u[t].item() - 2 * g2) < 1e-5:
            continue  # too close to the threshold to call in float32
        n_checked += 1
        assert bool(r.kept_TK[t, 1]) == (u[t].item() < 2 * g2), t
        if not r.kept_TK[t, 1]:
            assert r.weights_TK[t, 1].item() == 0.0
        # g1 is the renormalised first gate whether or not the second survives
        assert r.weights_TK[t, 0].item() == pytest.approx(1.0 - g2, rel=1e-5)
    assert n_checked >= T - 2
    assert bool(r.kept_TK[0, 1])
    assert 0 < int(r.kept_TK[:, 1].sum()) < T  # the rule actually dropped some and kept some
    # random drops are not capacity drops
    assert r.num_dropped.item() == 0.0
    assert r.counts_E.sum().item() == r.kept_TK.sum().item()


def test_gshard_random_routing_reproducible_and_off_keeps_both():
    logits = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    a = gshard_route(logits, random_routing=True, generator=torch.Generator().manual_seed(3))
    b = gshard_route(logits, random_routing=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.kept_TK, b.kept_TK)
    off = gshard_route(logits, random_routing=False)
    assert bool(off.kept_TK.all())
    torch.testing.assert_close(off.weights_TK.sum(1), torch.ones(32))


def test_random_routing_dropped_second_choice_frees_capacity():
    """A second choice dropped by random routing takes no slot in its expert's buffer."""
    # T=2, E=2: t0 -> (e0, e1) with g2 tiny, t1 -> (e1, e0). C = ceil(2 * 0.5 * 2 / 2) = 1.
    logits = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])
    r = gshard_route(logits, capacity_factor=0.5, random_routing=True, generator=torch.Generator().manual_seed(0))
    assert r.capacity == 1
    # 2 * g2 ~ 4e-9: both second choices are randomly dropped (u >= 4e-9 for these draws)
    assert r.kept_TK.tolist() == [[True, False], [True, False]]
    assert r.num_dropped.item() == 0.0


# ---------------------------------------------------------------------------------------------
# general top-k


TOPK_LOGITS = [
    [1.0, 2.0, 3.0, 0.0],
    [0.0, -1.0, 5.0, 2.0],
]


@pytest.mark.parametrize("normalize", [True, False])
def test_topk_k3(normalize):
    r = topk_route(torch.tensor(TOPK_LOGITS), 3, normalize=normalize)
    assert r.expert_ids_TK.tolist() == [[2, 1, 0], [2, 3, 0]]
    for t, ids in enumerate(r.expert_ids_TK.tolist()):
        p = softmax_row(TOPK_LOGITS[t])
        chosen = [p[e] for e in ids]
        expected = [c / sum(chosen) for c in chosen] if normalize else chosen
        torch.testing.assert_close(r.weights_TK[t], torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # balancing loss over all k choices: f_i = share of the 6 assignments
    probs = [softmax_row(row) for row in TOPK_LOGITS]
    f = [2 / 6, 1 / 6, 2 / 6, 1 / 6]
    P = [(probs[0][i] + probs[1][i]) / 2 for i in range(4)]
    assert r.aux_loss.item() == pytest.approx(4 * sum(a * b for a, b in zip(f, P)), rel=1e-6)
    assert r.counts_E.tolist() == [2.0, 1.0, 2.0, 1.0]


def test_topk_capacity_choice_major_order_k3():
    # All tokens pick e2 first, e1 second, e0 third; E=4, T=2, cf=0.5 -> C = ceil(3 * .5 * 2 / 4) = 1
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0], [1.0, 2.0, 3.0, 0.0]])
    r = topk_route(logits, 3, capacity_factor=0.5)
    assert r.capacity == 1
    assert r.kept_TK.tolist() == [[True, True, True], [False, False, False]]
    assert r.num_dropped.item() == 3.0


def test_topk_k_equals_one_normalize_is_switch_gate():
    r = topk_route(torch.tensor(TOPK_LOGITS), 1, normalize=True)
    p = [softmax_row(row) for row in TOPK_LOGITS]
    torch.testing.assert_close(r.weights_TK[:, 0], torch.tensor([p[0][2], p[1][2]]))


@pytest.mark.parametrize("k", [0, -1, 5])
def test_bad_k_raises(k):
    with pytest.raises(ValueError):
        topk_route(torch.tensor(TOPK_LOGITS), k)


def test_bad_logits_shape_raises():
    with pytest.raises(ValueError):
        topk_route(torch.zeros(4), 1)
    with pytest.raises(ValueError):
        switch_route(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError):
        base_route(torch.zeros(4), training=True)


def test_float64_logits_are_not_truncated_to_float32():
    """moe.router_dtype=float64 is a supported setting: the routing must not round to fp32."""
    logits = torch.tensor([[0.0, 1e-9], [1.0, 1.0 + 1e-9]], dtype=torch.float64)
    r = switch_route(logits)
    assert r.weights_TK.dtype == torch.float64
    assert r.expert_ids_TK[:, 0].tolist() == [1, 1]  # a 1e-9 difference decides, as in fp64
    bf = switch_route(logits.to(torch.bfloat16))
    assert bf.weights_TK.dtype == torch.float32  # low precision is upcast to fp32


# ---------------------------------------------------------------------------------------------
# load-balancing loss


def test_load_balancing_loss_uniform_is_one():
    E = 4
    probs = torch.full((8, E), 1.0 / E)
    ids = torch.arange(8).remainder(E).unsqueeze(1)
    assert load_balancing_loss(probs, ids).item() == pytest.approx(1.0)


def test_load_balancing_loss_collapse_is_num_experts():
    E = 4
    probs = torch.zeros(8, E)
    probs[:, 2] = 1.0
    ids = torch.full((8, 1), 2)
    assert load_balancing_loss(probs, ids).item() == pytest.approx(float(E))
    # the hand formula on a skewed but not collapsed case
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    ids = torch.tensor([[0], [0], [1]])
    expected = 2 * ((2 / 3) * (1.5 / 3) + (1 / 3) * (1.5 / 3))
    assert load_balancing_loss(probs, ids).item() == pytest.approx(expected)


def test_load_balancing_loss_has_real_gradient_to_router():
    """Unlike hivemind's switch_moe loss (independent of the router, zero gradient), ours
    reaches the logits through P_i: grad_tj = (E/T) * p_tj * (f_j - sum_i f_i p_ti)."""
    rows = [[1.0, 0.2, -0.5], [0.1, 0.9, 0.0], [2.0, -1.0, 0.5], [0.3, 0.2, 0.1]]
    logits = torch.tensor(rows, requires_grad=True)
    r = switch_route(logits)
    r.aux_loss.backward()
    g = logits.grad
    assert g is not None and g.abs().max().item() > 1e-3
    T, E = 4, 3
    probs = [softmax_row(row) for row in rows]
    choice = [max(range(E), key=lambda e: row[e]) for row in rows]
    f = [choice.count(i) / T for i in range(E)]
    expected = [
        [E / T * probs[t][j] * (f[j] - sum(f[i] * probs[t][i] for i in range(E))) for j in range(E)] for t in range(T)
    ]
    torch.testing.assert_close(g, torch.tensor(expected), rtol=1e-5, atol=1e-7)
    # the loss value moves with the router even when no token changes expert
    shifted = torch.tensor(rows) + torch.tensor([0.3, 0.0, 0.0])
    r2 = switch_route(shifted)
    assert torch.equal(r2.expert_ids_TK, r.expert_ids_TK)
    assert r2.aux_loss.item() > r.aux_loss.item() + 1e-3  # more mass on the most used expert


def test_z_loss_gradient():
    rows = [[1.0, 2.0], [0.0, -1.0]]
    logits = torch.tensor(rows, requires_grad=True)
    router_z_loss(logits).backward()
    # d/dl mean(lse^2) = (2/T) * lse * softmax
    expected = [[2 / 2 * logsumexp_row(r) * p for p in softmax_row(r)] for r in rows]
    torch.testing.assert_close(logits.grad, torch.tensor(expected), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# BASE

# T=4, E=2 (2 tokens each). The cost of moving a token from e0 to e1 is s0 - s1 = 1, 4, 3, 1:
# the optimum moves t0 and t3.
BASE_SCORES = [
    [5.0, 4.0],
    [4.0, 0.0],
    [3.0, 0.0],
    [2.0, 1.0],
]


def test_base_training_exact_balance_and_optimal():
    scores = torch.tensor(BASE_SCORES, requires_grad=True)
    r = base_route(scores, training=True)
    assert r.expert_ids_TK[:, 0].tolist() == [1, 0, 0, 1]
    assert r.counts_E.tolist() == [2.0, 2.0]
    assert bool(r.kept_TK.all()) and r.num_dropped.item() == 0.0
    assert r.capacity is None and r.position_TK is None
    assert r.aux_loss.item() == 0.0
    expected = [sigmoid(BASE_SCORES[t][e]) for t, e in enumerate([1, 0, 0, 1])]
    torch.testing.assert_close(r.weights_TK[:, 0], torch.tensor(expected))
    # gradient of the weight reaches the chosen score only: sigma' = s (1 - s)
    r.weights_TK.sum().backward()
    g_expected = torch.zeros(4, 2)
    for t, e in enumerate([1, 0, 0, 1]):
        s = sigmoid(BASE_SCORES[t][e])
        g_expected[t, e] = s * (1 - s)
    torch.testing.assert_close(scores.grad, g_expected)


def test_base_eval_is_greedy_argmax():
    r = base_route(torch.tensor(BASE_SCORES), training=False)
    assert r.expert_ids_TK[:, 0].tolist() == [0, 0, 0, 0]
    assert r.counts_E.tolist() == [4.0, 0.0]
    expected = [sigmoid(row[0]) for row in BASE_SCORES]
    torch.testing.assert_close(r.weights_TK[:, 0], torch.tensor(expected))


def test_base_uneven_tokens_balance():
    scores = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    scores[:, 0] += 5.0  # everyone prefers e0
    r = base_route(scores, training=True)
    assert r.counts_E.tolist() == [3.0, 2.0, 2.0]  # T // E each, the first T % E get one more
    assert torch.equal(r.expert_ids_TK[:, 0], balanced_assignment(scores))


# ---------------------------------------------------------------------------------------------
# properties over random logits


def reference_capacity(kept_pre: list[list[bool]], ids: list[list[int]], E: int, C: int):
    """Greedy slot filling: choice j of every token before choice j+1 of any; token order within."""
    T, K = len(ids), len(ids[0])
    fill = [0] * E
    kept = [[False] * K for _ in range(T)]
    pos = {}
    for j in range(K):
        for t in range(T):
            if not kept_pre[t][j]:
                continue
            e = ids[t][j]
            if fill[e] < C:
                kept[t][j] = True
                pos[(t, j)] = fill[e]
                fill[e] += 1
    return kept, pos


@st.composite
def routing_cases(draw):
    E = draw(st.integers(1, 6))
    T = draw(st.integers(1, 12))
    k = draw(st.integers(1, E))
    cf = draw(st.sampled_from([None, None, 0.25, 0.5, 1.0, 1.1, 1.25, 2.0, 3.0]))
    min_cap = draw(st.integers(0, 3))
    normalize = draw(st.booleans())
    random_routing = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.0, 0.1, 1.0, 5.0, 30.0]))
    integer = draw(st.booleans())  # integer logits: many exact ties
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * scale
    if integer:
        logits = logits.round()
    return logits, k, cf, min_cap, normalize, random_routing, seed


@settings(max_examples=100, deadline=None)
@given(routing_cases())
def test_routing_invariants(case):
    logits, k, cf, min_cap, normalize, random_routing, seed = case
    T, E = logits.shape
    r = topk_route(
        logits,
        k,
        capacity_factor=cf,
        min_capacity=min_cap,
        normalize=normalize,
        random_routing=random_routing,
        generator=torch.Generator().manual_seed(seed),
    )
    ids, w, kept = r.expert_ids_TK, r.weights_TK, r.kept_TK
    assert ids.shape == w.shape == kept.shape == (T, k)
    assert ids.dtype == torch.long and kept.dtype == torch.bool
    assert bool((ids >= 0).all()) and bool((ids < E).all())
    # distinct experts per token
    for t in range(T):
        assert len(set(ids[t].tolist())) == k
    # the chosen experts are the k most probable
    probs = torch.softmax(logits.double(), -1)
    chosen_p = probs.gather(1, ids)
    other = probs.scatter(1, ids, float("-inf"))
    if k < E:
        assert bool((chosen_p.min(1).values >= other.max(1).values - 1e-6).all())
    # weights: non-negative, sum <= 1, exactly zero where dropped
    assert bool((w >= 0).all())
    assert bool((w.sum(1) <= 1 + 1e-5).all())
    assert bool((w[~kept] == 0).all())
    # the first choice is only ever dropped by capacity
    if cf is None:
        assert bool(kept[:, 0].all())
        assert r.num_dropped.item() == 0.0
        if not random_routing:
            assert bool(kept.all())  # dropless: every token reaches all its experts
            if normalize and k > 1:
                torch.testing.assert_close(w.sum(1).double(), torch.ones(T, dtype=torch.float64), rtol=0, atol=1e-5)
            if k == 1 or not normalize:
                torch.testing.assert_close(w.double(), chosen_p, rtol=1e-5, atol=1e-6)
    # counts before capacity, dropped = pre-capacity kept - kept
    pre = torch.ones(T, k, dtype=torch.bool)
    if random_routing and k > 1:
        u = torch.rand(T, generator=torch.Generator().manual_seed(seed))
        g = torch.topk(probs, k, dim=-1).values
        g2 = (g[:, 1] / g.sum(1)) if normalize else g[:, 1]
        pre[:, 1] = u.double() < 2 * g2
        decided = (u.double() - 2 * g2).abs() > 1e-5
    else:
        decided = torch.ones(T, dtype=torch.bool)
    if cf is None:
        assert torch.equal(kept[decided], pre[decided])
        return
    C = r.capacity
    assert C == max(1, min(T, max(min_cap, math.ceil(round(k * cf * T / E, 9)))))
    if not bool(decided.all()):
        pre = kept.clone()  # cannot tell a threshold case apart; still check the capacity rules
    else:
        expected_counts = torch.bincount(ids[pre], minlength=E).float()
        assert torch.equal(r.counts_E, expected_counts)
        assert r.num_dropped.item() == pre.sum().item() - kept.sum().item()
        ref_kept, ref_pos = reference_capacity(pre.tolist(), ids.tolist(), E, C)
        assert kept.tolist() == ref_kept
        for (t, j), p in ref_pos.items():
            assert r.position_TK[t, j].item() == p
    # no expert over capacity; kept positions unique per expert and < C
    for e in range(E):
        sel = kept & (ids == e)
        assert int(sel.sum()) <= C
        p = r.position_TK[sel].tolist()
        assert len(set(p)) == len(p)
        assert all(0 <= x < C for x in p)
    # loss values
    assert 0.0 <= r.aux_loss.item() <= E + 1e-4
    lse = torch.logsumexp(logits.double(), -1)
    assert r.z_loss.item() == pytest.approx((lse**2).mean().item(), rel=1e-5, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.integers(0, 2**31 - 1), st.booleans())
def test_base_invariants(E, T, seed, training):
    scores = torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 2
    r = base_route(scores, training=training)
    ids = r.expert_ids_TK[:, 0]
    assert r.expert_ids_TK.shape == (T, 1)
    assert bool(r.kept_TK.all())
    counts = torch.bincount(ids, minlength=E)
    assert torch.equal(r.counts_E, counts.float())
    if training:
        expected = [T // E + (1 if e < T % E else 0) for e in range(E)]
        assert counts.tolist() == expected
    else:
        assert torch.equal(ids, scores.argmax(-1))
    torch.testing.assert_close(r.weights_TK[:, 0], torch.sigmoid(scores.gather(1, ids[:, None]))[:, 0])
