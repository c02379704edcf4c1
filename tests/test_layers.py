"""Tests for moe.model.layers / moe.model.experts / moe.model.dispatch: equivalences, outputs AND gradients.

References are written out naively here (a per-token loop, a per-group matmul, a dense FFN)
and compared in float64 with the layer's two internal dropless paths forced in turn.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe.model.experts as experts_mod
from moe.config import MoEConfig
from moe.model.auction import balanced_assignment
from moe.model.experts import GroupedExperts
from moe.model.layers import DenseFFN, MoELayer, Router, build_ffn
from moe.model.routing import expert_capacity
from moe.ops import grouped_mm

D, FF = 6, 10
TOL = dict(rtol=1e-9, atol=1e-11)  # float64 throughout (the router too)


def make_layer(name: str, E: int, k: int = 1, *, seed: int = 0, router_scale: float = 1.0, **cfg) -> MoELayer:
    torch.manual_seed(seed)
    c = MoEConfig(name=name, num_experts=E, top_k=k, **{"min_capacity": 0, "jitter_eps": 0.0, "dropless": True, **cfg})
    layer = MoELayer(D, FF, c, activation="gelu").double()
    with torch.no_grad():  # bigger weights than the small-scale init: routing and outputs far from 0
        layer.router.weight_ED.normal_(0.0, router_scale)
        layer.experts.w1_EDF.normal_(0.0, 0.5)
        layer.experts.w2_EFD.normal_(0.0, 0.5)
    return layer


def inputs(T: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ffn(x_D: torch.Tensor, w1_DF: torch.Tensor, w2_FD: torch.Tensor) -> torch.Tensor:
    return F.gelu(x_D @ w1_DF) @ w2_FD


def naive_topk_forward(layer: MoELayer, x_TD: torch.Tensor, kept_TK: torch.Tensor | None = None) -> torch.Tensor:
    """For each token, for each kept choice: weight * w2^T act(w1^T x), weights from the papers:
    switch p_e; gshard / topk(normalize) p_e / sum of the chosen p; topk(not normalize) p_e."""
    c = layer.cfg
    k = 2 if c.name == "gshard" else c.top_k
    normalize = c.name == "gshard" or (c.name == "topk" and c.normalize_weights)
    W, w1, w2 = layer.router.weight_ED, layer.experts.w1_EDF, layer.experts.w2_EFD
    rows = []
    for t in range(x_TD.shape[0]):
        x = x_TD[t]
        p = torch.softmax(W @ x, dim=0)
        ids = sorted(range(len(p)), key=lambda e: -p[e].item())[:k]
        gate_sum = sum(p[e] for e in ids)
        out = torch.zeros(D, dtype=x.dtype)
        for j, e in enumerate(ids):
            if kept_TK is not None and not kept_TK[t, j]:
                continue
            w = p[e] / gate_sum if (normalize and k > 1) else p[e]
            out = out + w * ffn(x, w1[e], w2[e])
        rows.append(out)
    return torch.stack(rows)


def grads_of(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, seed: int = 5):
    """Backprop a fixed random cotangent; return grads of x and of every parameter (by name)."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    params = dict(module.named_parameters())
    grads = torch.autograd.grad((out * g).sum(), [x, *params.values()], allow_unused=True)
    return grads[0], {n: gr for n, gr in zip(params, grads[1:])}


@pytest.fixture
def count_paths(monkeypatch):
    """Counts calls of the two dropless paths: grouped_mm (loop) and forward_padded (padded)."""
    calls = {"loop": 0, "padded": 0}
    real_mm, real_padded = experts_mod.grouped_mm, GroupedExperts.forward_padded

    def mm(*a, **kw):
        calls["loop"] += 1
        return real_mm(*a, **kw)

    def padded(self, *a, **kw):
        calls["padded"] += 1
        return real_padded(self, *a, **kw)

    monkeypatch.setattr(experts_mod, "grouped_mm", mm)
    monkeypatch.setattr(GroupedExperts, "forward_padded", padded)
    return calls


PATHS = {"loop": 0.0, "padded": 1e9}


# ---------------------------------------------------------------------------------------------
# one expert == dense FFN


@pytest.mark.parametrize("path", ["loop", "padded"])
def test_one_expert_moe_equals_dense_ffn(path, monkeypatch, count_paths):
    monkeypatch.setattr(GroupedExperts, "PAD_RATIO", PATHS[path])
    layer = make_layer("switch", E=1)
    dense = DenseFFN(D, FF, activation="gelu").double()
    with torch.no_grad():
        dense.w1.weight.copy_(layer.experts.w1_EDF[0].t())
        dense.w2.weight.copy_(layer.experts.w2_EFD[0].t())
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)  # (B, S, D) input
    y_moe, aux = layer(x)
    y_dense, none = dense(x)
    assert none is None and y_moe.shape == x.shape
    assert count_paths[path] > 0
    torch.testing.assert_close(y_moe, y_dense, **TOL)
    gx_m, gp_m = grads_of(layer, x, y_moe)
    gx_d, gp_d = grads_of(dense, x, y_dense)
    torch.testing.assert_close(gx_m, gx_d, **TOL)
    torch.testing.assert_close(gp_m["experts.w1_EDF"][0], gp_d["w1.weight"].t(), **TOL)
    torch.testing.assert_close(gp_m["experts.w2_EFD"][0], gp_d["w2.weight"].t(), **TOL)
    assert aux.counts_E.tolist() == [10.0] and aux.num_dropped.item() == 0.0
    assert aux.aux_loss.item() == pytest.approx(1.0)  # E * f * P = 1 * 1 * 1


# ---------------------------------------------------------------------------------------------
# dropless grouped execution == naive per-token loop


LAYER_CASES = [
    ("switch", 4, 1, {}),
    ("gshard", 4, 2, {"random_routing": False}),
    ("topk", 5, 3, {"normalize_weights": True}),
    ("topk", 5, 3, {"normalize_weights": False}),
    ("topk", 3, 2, {}),
]


def check_against_naive(layer: MoELayer, x: torch.Tensor, kept_TK=None):
    x = x.clone().requires_grad_(True)
    y, aux = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = naive_topk_forward(layer, x_ref, kept_TK)
    torch.testing.assert_close(y, y_ref, **TOL)
    gx, gp = grads_of(layer, x, y)
    gx_ref, gp_ref = grads_of(layer, x_ref, y_ref)
    torch.testing.assert_close(gx, gx_ref, **TOL)
    for n in ("experts.w1_EDF", "experts.w2_EFD", "router.weight_ED"):
        assert gp_ref[n] is not None
        if gp[n] is None:  # e.g. one expert: the router gets no gradient either way
            assert n == "router.weight_ED" and torch.count_nonzero(gp_ref[n]) == 0
            continue
        torch.testing.assert_close(gp[n], gp_ref[n], **TOL)
    return y, aux, gp


@pytest.mark.parametrize("path", ["loop", "padded"])
@pytest.mark.parametrize("name, E, k, extra", LAYER_CASES)
def test_dropless_matches_naive_loop(name, E, k, extra, path, monkeypatch, count_paths):
    monkeypatch.setattr(GroupedExperts, "PAD_RATIO", PATHS[path])
    layer = make_layer(name, E, k, **extra)
    _, aux, gp = check_against_naive(layer, inputs(12))
    assert count_paths[path] > 0 and count_paths["loop" if path == "padded" else "padded"] == 0
    assert aux.num_dropped.item() == 0.0
    assert aux.counts_E.sum().item() == 12 * k
    assert gp["router.weight_ED"].abs().max().item() > 1e-6  # the router learns through the gates


@pytest.mark.parametrize("path", ["loop", "padded"])
@pytest.mark.parametrize("name, E, k, extra", [LAYER_CASES[0], LAYER_CASES[1], LAYER_CASES[2]])
def test_dropless_expert_with_zero_tokens(name, E, k, extra, path, monkeypatch, count_paths):
    """The last expert's logit is -50 for every token (feature 0 is constant 1): it gets nothing."""
    monkeypatch.setattr(GroupedExperts, "PAD_RATIO", PATHS[path])
    layer = make_layer(name, E, k, **extra)
    with torch.no_grad():
        layer.router.weight_ED[-1, 0] = -50.0
    x = inputs(12)
    x[:, 0] = 1.0
    _, aux, gp = check_against_naive(layer, x)
    assert count_paths[path] > 0
    assert aux.counts_E[-1].item() == 0.0
    assert torch.count_nonzero(gp["experts.w1_EDF"][-1]) == 0
    assert torch.count_nonzero(gp["experts.w2_EFD"][-1]) == 0


def test_default_pad_ratio_picks_padded_for_even_and_loop_for_skewed_load(count_paths):
    ex = GroupedExperts(4, D, FF).double()
    x = torch.randn(8, D, dtype=torch.float64)
    ex.forward_grouped(x, [2, 2, 2, 2])
    assert count_paths == {"loop": 0, "padded": 1}
    ex.forward_grouped(x, [8, 0, 0, 0])  # padding to (4, 8, D) would be 4x the rows
    assert count_paths == {"loop": 2, "padded": 1}  # one grouped_mm per expert matrix
    # both paths give the same rows
    a = ex.forward_grouped(x, [3, 1, 0, 4])
    ref = torch.cat(
        [ffn(x[s : s + n], ex.w1_EDF[e], ex.w2_EFD[e]) for e, (s, n) in enumerate([(0, 3), (3, 1), (4, 0), (4, 4)])]
    )
    torch.testing.assert_close(a, ref, **TOL)


def test_dropless_with_no_tokens():
    layer = make_layer("switch", 4)
    x = torch.zeros(0, D, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    assert y.shape == (0, D)
    y.sum().backward()


# ---------------------------------------------------------------------------------------------
# grouped_mm


def _grouped_and_reference(counts, d, f, gen):
    """grouped_mm on random float64 inputs, and the same product as one matmul per group;
    the outputs are checked equal here."""
    E, N = len(counts), sum(counts)
    x = torch.randn(N, d, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, d, f, generator=gen, dtype=torch.float64, requires_grad=True)
    out = grouped_mm(x, w, counts)
    starts = [sum(counts[:e]) for e in range(E)]
    ref = torch.cat([x[s : s + n] @ w[e] for e, (s, n) in enumerate(zip(starts, counts))])
    torch.testing.assert_close(out, ref, **TOL)
    return x, w, out, ref


@pytest.mark.parametrize("counts", [[3, 0, 2, 0, 1], [0, 0, 6, 0, 0], [1, 1, 1, 1, 2], [0, 0, 0, 0, 0]])
def test_grouped_mm_matches_per_group_matmul(counts):
    N = sum(counts)
    gen = torch.Generator().manual_seed(0)
    x, w, out, ref = _grouped_and_reference(counts, 4, 3, gen)
    g = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    gx, gw = torch.autograd.grad((out * g).sum(), [x, w])
    gx_ref, gw_ref = torch.autograd.grad((ref * g).sum(), [x, w], allow_unused=True)
    torch.testing.assert_close(gx, gx_ref if gx_ref is not None else torch.zeros_like(x), **TOL)
    torch.testing.assert_close(gw, gw_ref if gw_ref is not None else torch.zeros_like(w), **TOL)
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.count_nonzero(gw[e]) == 0  # an empty expert: zero gradient, not garbage
    if N:
        assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, counts), (x, w))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("counts", [[2, 3, 1, 0, 2, 2, 3, 1], [5, 0, 0, 0, 0, 0, 0, 1], [1] * 8])
def test_grouped_mm_same_result_with_one_or_more_threads(threads, counts):
    """Experts may be spread over intra-op threads on CPU; results and grads must not change."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        N = sum(counts)
        gen = torch.Generator().manual_seed(1)
        x, w, out, ref = _grouped_and_reference(counts, 5, 4, gen)
        g = torch.randn(N, 4, generator=gen, dtype=torch.float64)
        gx, gw = torch.autograd.grad((out * g).sum(), [x, w])
        gx_ref, gw_ref = torch.autograd.grad((ref * g).sum(), [x, w])
        torch.testing.assert_close(gx, gx_ref, **TOL)
        torch.testing.assert_close(gw, gw_ref, **TOL)
        assert torch.get_num_threads() == threads  # the thread setting is restored
    finally:
        torch.set_num_threads(old)


def test_grouped_mm_only_weight_or_only_input_needs_grad():
    x = torch.randn(5, 4, dtype=torch.float64)
    w = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    grouped_mm(x, w, [2, 3]).sum().backward()
    torch.testing.assert_close(w.grad[0], x[:2].sum(0)[:, None].expand(4, 3), **TOL)
    x.requires_grad_(True)
    w2 = w.detach()
    grouped_mm(x, w2, [2, 3]).sum().backward()
    torch.testing.assert_close(x.grad[:2], w2[0].sum(1).expand(2, 4), **TOL)


# ---------------------------------------------------------------------------------------------
# capacity mode


@pytest.mark.parametrize("name, E, k, extra", LAYER_CASES)
def test_capacity_mode_with_huge_factor_equals_dropless(name, E, k, extra):
    dropless = make_layer(name, E, k, **extra)
    capped = make_layer(name, E, k, dropless=False, capacity_factor=100.0, eval_capacity_factor=100.0, **extra)
    capped.load_state_dict(dropless.state_dict())
    for mode in ("train", "eval"):
        dropless.train(mode == "train")
        capped.train(mode == "train")
        x = inputs(10).requires_grad_(True)
        y1, a1 = dropless(x)
        y2, a2 = capped(x)
        torch.testing.assert_close(y1, y2, **TOL)
        assert a2.num_dropped.item() == 0.0
        torch.testing.assert_close(a1.aux_loss, a2.aux_loss, **TOL)
        torch.testing.assert_close(a1.z_loss, a2.z_loss, **TOL)
        g1x, g1p = grads_of(dropless, x, y1)
        g2x, g2p = grads_of(capped, x, y2)
        torch.testing.assert_close(g1x, g2x, **TOL)
        for n in g1p:
            torch.testing.assert_close(g1p[n], g2p[n], **TOL)


def greedy_kept(layer: MoELayer, x: torch.Tensor, k: int, C: int) -> torch.Tensor:
    """Which (token, choice) survive capacity C, by GShard's rule, computed from the logits."""
    E = layer.cfg.num_experts
    with torch.no_grad():
        ids = torch.topk(x @ layer.router.weight_ED.t(), k, dim=-1).indices.tolist()
    fill, kept = [0] * E, torch.zeros(len(ids), k, dtype=torch.bool)
    for j in range(k):
        for t in range(len(ids)):
            if fill[ids[t][j]] < C:
                kept[t, j] = True
                fill[ids[t][j]] += 1
    return kept


@pytest.mark.parametrize("name, E, k, extra", [LAYER_CASES[0], LAYER_CASES[1], LAYER_CASES[2]])
def test_capacity_mode_with_drops_matches_naive_loop(name, E, k, extra):
    layer = make_layer(name, E, k, dropless=False, capacity_factor=0.5, **extra)
    x = inputs(16)
    x[:, 0] = 1.0
    with torch.no_grad():
        layer.router.weight_ED[0, 0] = 3.0  # expert 0 is popular: forces drops
    C = expert_capacity(16, E, k, 0.5, 0)
    kept = greedy_kept(layer, x, k, C)
    assert not bool(kept.all())
    _, aux, _ = check_against_naive(layer, x, kept)
    assert aux.num_dropped.item() == (~kept).sum().item()


def test_dropped_token_output_is_exactly_zero():
    """Switch, E=2, everyone prefers expert 0, C = ceil(1.0 * 6 / 2) = 3: tokens 3, 4, 5 are dropped
    and the layer's output for them is exactly 0 (the block's residual carries them)."""
    layer = make_layer("switch", 2, dropless=False, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight_ED.zero_()
        layer.router.weight_ED[0, 0] = 5.0
    x = inputs(6)
    x[:, 0] = 1.0
    x.requires_grad_(True)
    y, aux = layer(x)
    assert aux.num_dropped.item() == 3.0
    assert aux.counts_E.tolist() == [6.0, 0.0]
    assert torch.count_nonzero(y[3:]) == 0
    assert bool((y[:3].abs().sum(1) > 0).all())
    y[3:].sum().backward()
    assert torch.count_nonzero(x.grad) == 0


# ---------------------------------------------------------------------------------------------
# BASE


@pytest.mark.parametrize("path", ["loop", "padded"])
def test_base_layer_output_and_balance(path, monkeypatch, count_paths):
    monkeypatch.setattr(GroupedExperts, "PAD_RATIO", PATHS[path])
    layer = make_layer("base", 4)
    with torch.no_grad():
        layer.router.weight_ED[0] += 2.0 * layer.router.weight_ED[1]  # make the greedy choice uneven
    x = inputs(12).requires_grad_(True)
    for training in (True, False):
        layer.train(training)
        y, aux = layer(x)
        c = layer.router.weight_ED
        scores = x @ c.t()
        e_T = balanced_assignment(scores.detach()) if training else scores.detach().argmax(-1)
        if training:
            assert aux.counts_E.tolist() == [3.0, 3.0, 3.0, 3.0]  # exact balance
        assert aux.counts_E.tolist() == torch.bincount(e_T, minlength=4).float().tolist()
        assert aux.num_dropped.item() == 0.0 and aux.aux_loss.item() == 0.0
        ref = torch.stack(
            [
                torch.sigmoid(scores[t, e]) * ffn(x[t], layer.experts.w1_EDF[e], layer.experts.w2_EFD[e])
                for t, e in enumerate(e_T.tolist())
            ]
        )
        torch.testing.assert_close(y, ref, **TOL)
        gx, gp = grads_of(layer, x, y)
        gx_ref, gp_ref = grads_of(layer, x, ref)
        torch.testing.assert_close(gx, gx_ref, **TOL)
        for n in gp:
            torch.testing.assert_close(gp[n], gp_ref[n], **TOL)
    assert count_paths[path] > 0


# ---------------------------------------------------------------------------------------------
# router


def test_router_logits_fp32_for_low_precision_input():
    r = Router(D, 4)
    x = torch.randn(5, D)
    logits = r(x.to(torch.bfloat16))
    assert logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert r(x).dtype == torch.float32  # selective precision: autocast is off in the router
        assert r(x.to(torch.bfloat16)).dtype == torch.float32
    torch.testing.assert_close(r(x), x @ r.weight_ED.t())


def test_moe_layer_bf16_input_runs_with_fp32_routing():
    torch.manual_seed(0)
    layer = MoELayer(D, FF, MoEConfig(name="gshard", num_experts=4, top_k=2, dropless=True))
    x = torch.randn(7, D).to(torch.bfloat16)
    y, aux = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (7, D)
    assert aux.z_loss.dtype == torch.float32 and aux.aux_loss.dtype == torch.float32


def test_router_jitter_only_in_training():
    r = Router(D, 4, jitter_eps=0.1)
    x = torch.randn(5, D)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, x @ r.weight_ED.t())
    r.train()
    c, d = r(x), r(x)
    assert not torch.equal(c, d)
    assert not torch.equal(c, a)
    # multiplicative noise in [1 - eps, 1 + eps] on the input: bounded deviation
    bound = (0.1 * x.abs()) @ r.weight_ED.abs().t()
    assert bool(((c - a).abs() <= bound + 1e-6).all())
    r0 = Router(D, 4, jitter_eps=0.0).train()
    assert torch.equal(r0(x), r0(x))


def test_moe_layer_eval_is_deterministic_with_jitter():
    layer = make_layer("switch", 4, jitter_eps=0.2)
    assert layer.router.jitter_eps == 0.2
    x = inputs(8)
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])


# ---------------------------------------------------------------------------------------------
# registry


def test_build_ffn_registry():
    with pytest.raises(ValueError):
        build_ffn(MoEConfig(name="bogus"), D, FF, sparse=True)
    with pytest.raises(ValueError):
        MoELayer(D, FF, MoEConfig(name="dense"))
    assert isinstance(build_ffn(MoEConfig(name="dense"), D, FF, sparse=True), DenseFFN)
    assert isinstance(build_ffn(MoEConfig(name="switch"), D, FF, sparse=False), DenseFFN)
    for name, k in (("switch", 1), ("gshard", 2), ("topk", 2), ("base", 1)):
        m = build_ffn(MoEConfig(name=name, top_k=k, num_experts=4), D, FF, sparse=True)
        assert isinstance(m, MoELayer)
        y, aux = m(torch.randn(2, 3, D))
        assert y.shape == (2, 3, D) and aux is not None
