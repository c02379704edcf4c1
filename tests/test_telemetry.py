"""Load statistics against hand-computed values and numpy formulas; the accumulator's sums."""

import math

import numpy as np
import pytest
import torch

from moe.training.telemetry import LoadAccumulator, load_stats


def test_balanced_counts():
    s = load_stats(torch.tensor([2, 2, 2, 2]), dropped=0, routed=8)
    assert s["cv"] == pytest.approx(0.0)
    assert s["entropy"] == pytest.approx(math.log(4))
    assert s["entropy_norm"] == pytest.approx(1.0)
    assert s["max_over_mean"] == pytest.approx(1.0)
    assert s["dropped_frac"] == 0.0
    assert s["frac"] == pytest.approx([0.25] * 4)
    assert s["min_frac"] == s["max_frac"] == pytest.approx(0.25)


def test_one_hot_counts():
    s = load_stats(torch.tensor([8.0, 0, 0, 0]), dropped=torch.tensor(3), routed=torch.tensor(8))
    assert s["cv"] == pytest.approx(math.sqrt(3))
    assert s["entropy"] == pytest.approx(0.0, abs=1e-12)
    assert s["entropy"] >= 0.0
    assert s["entropy_norm"] == pytest.approx(0.0, abs=1e-12)
    assert s["max_over_mean"] == pytest.approx(4.0)
    assert s["dropped_frac"] == pytest.approx(3 / 8)
    assert s["frac"] == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert s["min_frac"] == 0.0 and s["max_frac"] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_random_counts_match_numpy(seed):
    rng = np.random.default_rng(seed)
    E = int(rng.integers(2, 33))
    c = rng.integers(0, 100, size=E).astype(np.float64)
    c[0] += 1  # at least one token
    s = load_stats(torch.from_numpy(c), dropped=5, routed=c.sum())
    p = c / c.sum()
    nz = p[p > 0]
    assert s["cv"] == pytest.approx(c.std() / c.mean())
    assert s["entropy"] == pytest.approx(-(nz * np.log(nz)).sum())
    assert s["entropy_norm"] == pytest.approx(-(nz * np.log(nz)).sum() / np.log(E))
    assert s["max_over_mean"] == pytest.approx(c.max() / c.mean())
    assert s["dropped_frac"] == pytest.approx(5 / c.sum())
    assert s["frac"] == pytest.approx(p.tolist())
    assert sum(s["frac"]) == pytest.approx(1.0)
    assert s["min_frac"] == pytest.approx(p.min()) and s["max_frac"] == pytest.approx(p.max())


def test_all_zero_counts_no_nan():
    s = load_stats(torch.zeros(4), dropped=0, routed=0)
    for k, v in s.items():
        vals = v if isinstance(v, list) else [v]
        assert all(math.isfinite(x) for x in vals), k
    assert s["cv"] == 0.0 and s["max_over_mean"] == 1.0 and s["entropy_norm"] == 1.0
    assert s["dropped_frac"] == 0.0
    assert sum(s["frac"]) == pytest.approx(1.0)


def test_single_expert():
    s = load_stats(torch.tensor([5]), dropped=1, routed=5)
    assert s["cv"] == 0.0 and s["entropy"] == 0.0 and s["entropy_norm"] == 1.0
    assert s["max_over_mean"] == 1.0 and s["frac"] == [1.0]
    s0 = load_stats(torch.tensor([0]), dropped=0, routed=0)
    assert s0["entropy_norm"] == 1.0 and s0["frac"] == [1.0]


def test_bad_shape_rejected():
    with pytest.raises(ValueError):
        load_stats(torch.ones(2, 2), 0, 4)
    with pytest.raises(ValueError):
        load_stats(torch.ones(0), 0, 0)


def test_accumulator_sums_and_means():
    acc = LoadAccumulator()
    acc.add(
        0,
        torch.tensor([3, 1]),
        dropped=torch.tensor(1.0),
        routed=torch.tensor(4),
        aux_loss=torch.tensor(1.0),
        z_loss=0.5,
    )
    acc.add(0, torch.tensor([1, 3]), dropped=1, routed=4, aux_loss=3.0, z_loss=torch.tensor(1.5))
    acc.add(1, torch.tensor([8.0, 0, 0, 0]), dropped=0, routed=8, aux_loss=2.0)
    out = acc.summary()
    # layer 0: summed counts [4, 4] are balanced even though each step was not
    assert out["moe/layer_0/cv"] == pytest.approx(0.0)
    assert out["moe/layer_0/frac_e0"] == pytest.approx(0.5)
    assert out["moe/layer_0/frac_e1"] == pytest.approx(0.5)
    assert out["moe/layer_0/dropped_frac"] == pytest.approx(2 / 8)
    assert out["moe/layer_0/aux_loss"] == pytest.approx(2.0)
    assert out["moe/layer_0/z_loss"] == pytest.approx(1.0)
    assert out["moe/layer_1/max_over_mean"] == pytest.approx(4.0)
    assert out["moe/layer_1/z_loss"] == 0.0
    for i, E in ((0, 2), (1, 4)):
        for k in ("cv", "entropy", "max_over_mean", "dropped_frac", "aux_loss", "z_loss"):
            assert f"moe/layer_{i}/{k}" in out
        assert [f"moe/layer_{i}/frac_e{j}" in out for j in range(E)] == [True] * E
        assert f"moe/layer_{i}/frac_e{E}" not in out
    assert all(isinstance(v, float) for v in out.values())
    assert acc.layer_fracs() == {0: pytest.approx([0.5, 0.5]), 1: pytest.approx([1.0, 0, 0, 0])}

    acc.reset()
    assert acc.summary() == {} and acc.layer_fracs() == {} and len(acc) == 0
    acc.add(0, torch.tensor([1, 0]), 0, 1)
    assert acc.summary()["moe/layer_0/frac_e0"] == 1.0  # nothing left over from before reset


def test_fracs_from_summary_inverts_summary():
    acc = LoadAccumulator()
    acc.add(3, torch.arange(1.0, 13.0), 0, 78)  # 12 experts: frac_e10 must come after frac_e9
    acc.add(1, torch.tensor([1.0, 3.0]), 0, 4)
    m = {**acc.summary(), "train/loss": 2.0, "moe/layer_x/frac_e0": 1.0, "moe/layer_1/frac_ex": 1.0}
    fracs = LoadAccumulator.fracs_from_summary(m)
    assert list(fracs) == [1, 3]
    assert fracs[1] == pytest.approx([0.25, 0.75])
    assert fracs[3] == pytest.approx([j / 78 for j in range(1, 13)])
    assert fracs == {i: pytest.approx(f) for i, f in acc.layer_fracs().items()}
    assert LoadAccumulator.fracs_from_summary({"train/loss": 1.0}) == {}


def test_accumulator_detaches_and_rejects_expert_count_change():
    acc = LoadAccumulator()
    counts = torch.tensor([1.0, 2.0], requires_grad=True)
    aux = (counts * 2).sum()
    acc.add(3, counts * 1, 0, 3, aux_loss=aux)
    assert acc.summary()["moe/layer_3/aux_loss"] == pytest.approx(6.0)
    with pytest.raises(ValueError):
        acc.add(3, torch.ones(3), 0, 3)
