"""Tests for moe.model.auction: exact balance, optimality against scipy's assignment solver, edge cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe.model.auction import balanced_assignment, balanced_capacities

# Stated guarantee with the default eps: objective >= optimum - 1e-6 * (max - min); we add float slack.
DEFAULT_REL_TOL = 1e-6


def _objective(scores_TE: torch.Tensor, expert_T: torch.Tensor) -> float:
    return scores_TE.double()[torch.arange(len(expert_T)), expert_T].sum().item()


def _optimum(scores_TE: torch.Tensor, cap_E: torch.Tensor) -> float:
    """Oracle: expand expert e into cap_E[e] identical slot columns and solve with scipy."""
    optimize = pytest.importorskip("scipy.optimize")
    cols = torch.repeat_interleave(torch.arange(len(cap_E)), cap_E)
    slots_TS = scores_TE.double()[:, cols].numpy()
    rows, picked = optimize.linear_sum_assignment(slots_TS, maximize=True)
    return float(slots_TS[rows, picked].sum())


def _check(scores_TE, cap_E=None, eps=None):
    """Run the auction; assert exact balance and the T * eps optimality bound; return expert_T."""
    T, E = scores_TE.shape
    expert_T = balanced_assignment(scores_TE, cap_E, eps=eps)
    cap_E = balanced_capacities(T, E) if cap_E is None else cap_E
    assert expert_T.dtype == torch.long and expert_T.shape == (T,)
    assert torch.equal(torch.bincount(expert_T, minlength=E), cap_E)
    span = (scores_TE.max() - scores_TE.min()).item() if T else 0.0
    tol = (T * eps if eps is not None else DEFAULT_REL_TOL * span) + 1e-9 * (1 + abs(scores_TE).sum().item())
    got, best = _objective(scores_TE, expert_T), _optimum(scores_TE, cap_E)
    assert best - tol <= got <= best + 1e-9 * (1 + abs(best))
    return expert_T


def test_balanced_capacities():
    assert balanced_capacities(8, 4).tolist() == [2, 2, 2, 2]
    assert balanced_capacities(10, 4).tolist() == [3, 3, 2, 2]  # first T % E experts get one more
    assert balanced_capacities(3, 5).tolist() == [1, 1, 1, 0, 0]
    assert balanced_capacities(0, 2).tolist() == [0, 0]
    with pytest.raises(ValueError, match="num_experts"):
        balanced_capacities(4, 0)


@pytest.mark.parametrize("T,E", [(64, 8), (67, 8), (1000, 7), (2048, 16), (5, 8)])
def test_exact_balance_default_capacities(T, E):
    scores_TE = torch.randn(T, E, generator=torch.Generator().manual_seed(T + E))
    expert_T = balanced_assignment(scores_TE)
    counts_E = torch.bincount(expert_T, minlength=E)
    assert counts_E.tolist() == balanced_capacities(T, E).tolist()
    assert counts_E.max() - counts_E.min() <= 1


@pytest.mark.parametrize("seed", range(30))
def test_matches_scipy_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(4, 65, (1,), generator=g))
    E = int(torch.randint(1, 9, (1,), generator=g))
    scores_TE = torch.randn(T, E, generator=g) * (1 + seed)  # fp32 input, varying scale
    _check(scores_TE)
    if seed % 3 == 0:  # random capacities (zeros likely) on the same scores
        cap_E = torch.bincount(torch.randint(0, E, (T,), generator=g), minlength=E)
        _check(scores_TE, cap_E)


def test_integer_scores_are_solved_exactly():
    g = torch.Generator().manual_seed(0)
    for T, E in [(40, 6), (63, 8), (50, 3)]:
        scores_TE = torch.randint(-20, 21, (T, E), generator=g).double()
        expert_T = balanced_assignment(scores_TE)
        assert _objective(scores_TE, expert_T) == _optimum(scores_TE, balanced_capacities(T, E))


@pytest.mark.parametrize("seed", range(5))
def test_resolves_near_ties(seed):
    # Coarse integer scores plus 1e-4 perturbations: a coarse eps would get the integer part right
    # and miss the perturbations (losing ~1e-4 >> the 1e-6 * range tolerance).
    g = torch.Generator().manual_seed(seed)
    scores_TE = torch.randint(0, 3, (40, 5), generator=g).double() + 1e-4 * torch.rand(40, 5, generator=g).double()
    _check(scores_TE)


def test_coarse_eps_keeps_its_bound():
    scores_TE = torch.randn(48, 5, generator=torch.Generator().manual_seed(1))
    _check(scores_TE, eps=0.05)  # within T * eps of the optimum


@settings(max_examples=50, deadline=None)
@given(
    T=st.integers(1, 24),
    E=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    integer=st.booleans(),
    custom=st.booleans(),
)
def test_property_balanced_and_near_optimal(T, E, seed, integer, custom):
    g = torch.Generator().manual_seed(seed)
    scores_TE = torch.randint(0, 3, (T, E), generator=g).float() if integer else torch.randn(T, E, generator=g)
    cap_E = torch.bincount(torch.randint(0, E, (T,), generator=g), minlength=E) if custom else None
    _check(scores_TE, cap_E)


def test_everyone_prefers_expert_0_two_experts():
    # Greedy argmax sends all 6 tokens to expert 0; the optimum gives expert 0 the 3 tokens with
    # the largest margin s[:, 0] - s[:, 1] = [3, 1, 2, 0.5, 2.5, 1.5], i.e. tokens 0, 4, 2.
    scores_TE = torch.tensor([[3, 0], [3, 2], [3, 1], [3, 2.5], [3, 0.5], [3, 1.5]])
    assert torch.bincount(scores_TE.argmax(1), minlength=2).tolist() == [6, 0]
    assert balanced_assignment(scores_TE).tolist() == [0, 1, 0, 1, 0, 1]


def test_everyone_prefers_expert_0_permutation():
    # T == E: only token 2 has nothing better to do than expert 0; unique optimum 13.
    scores_TE = torch.tensor([[5.0, 4, 0], [5, 0, 4], [5, 0, 0]])
    assert balanced_assignment(scores_TE).tolist() == [1, 2, 0]


def test_square_problem_matches_scipy():
    scores_TE = torch.randn(32, 32, generator=torch.Generator().manual_seed(3))
    expert_T = _check(scores_TE)
    assert sorted(expert_T.tolist()) == list(range(32))


@pytest.mark.parametrize("T,E", [(1000, 7), (64, 64), (5, 3)])
def test_all_equal_scores_terminate_balanced(T, E):
    expert_T = balanced_assignment(torch.full((T, E), 0.25))
    assert torch.equal(torch.bincount(expert_T, minlength=E), balanced_capacities(T, E))


@pytest.mark.parametrize("T,E", [(300, 6), (5, 3)])
def test_identical_rows_are_solved(T, E):
    # Every token ranks the experts the same way (the worst case for Jacobi bidding); any
    # balanced assignment is optimal.
    scores_TE = torch.arange(E, dtype=torch.float32).expand(T, E)
    _check(scores_TE)


def test_custom_capacities_with_zeros():
    scores_TE = torch.randn(8, 4, generator=torch.Generator().manual_seed(4))
    scores_TE[:, 0] += 10  # expert 0 is everyone's favourite but takes nobody
    cap_E = torch.tensor([0, 5, 0, 3])
    expert_T = _check(scores_TE, cap_E)
    assert set(expert_T.tolist()) <= {1, 3}


def test_more_experts_than_tokens():
    scores_TE = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    expert_T = _check(scores_TE)  # experts 3..7 have capacity 0
    assert sorted(expert_T.tolist()) == [0, 1, 2]


def test_single_open_expert():
    assert balanced_assignment(torch.randn(7, 1)).tolist() == [0] * 7
    assert balanced_assignment(torch.randn(5, 3), torch.tensor([0, 5, 0])).tolist() == [1] * 5
    assert balanced_assignment(torch.randn(0, 3)).tolist() == []


@pytest.mark.parametrize("max_rounds", [0, 1, 3])
def test_round_budget_fallback_is_balanced_and_deterministic(max_rounds):
    scores_TE = torch.randn(300, 8, generator=torch.Generator().manual_seed(6))
    cap_E = torch.tensor([100, 0, 50, 50, 40, 30, 20, 10])
    first = balanced_assignment(scores_TE, cap_E, max_rounds=max_rounds)
    assert torch.equal(torch.bincount(first, minlength=8), cap_E)
    assert torch.equal(first, balanced_assignment(scores_TE, cap_E, max_rounds=max_rounds))


def test_fp32_input_with_grad_is_solved_like_its_float64_copy():
    f32 = torch.randn(256, 8, generator=torch.Generator().manual_seed(7)).requires_grad_()
    expert_T = balanced_assignment(f32)
    assert not expert_T.requires_grad
    assert torch.equal(expert_T, balanced_assignment(f32.detach().double()))


@pytest.mark.parametrize(
    "scores_TE,cap_E,kwargs,match",
    [
        (torch.randn(6), None, {}, "2-D"),
        (torch.randn(2, 3, 4), None, {}, "2-D"),
        (torch.randn(6, 3), torch.tensor([2, 2]), {}, "shape"),
        (torch.randn(6, 3), torch.tensor([3, 3, 1]), {}, "sum to"),
        (torch.randn(6, 3), torch.tensor([4, 3, -1]), {}, "non-negative"),
        (torch.randn(6, 3), torch.tensor([2.0, 2.0, 2.0]), {}, "integer"),
        (torch.randn(6, 3), None, {"eps": 0.0}, "eps"),
        (torch.randn(6, 3), None, {"max_rounds": -1}, "max_rounds"),
        (torch.tensor([[0.0, float("nan")]]), None, {}, "finite"),
    ],
)
def test_bad_inputs_raise(scores_TE, cap_E, kwargs, match):
    with pytest.raises(ValueError, match=match):
        balanced_assignment(scores_TE, cap_E, **kwargs)
