"""DeepSeekMoE / DeepSeek-V3 options: sigmoid scores, the loss-free expert bias, the sequence-wise
balancing loss, fine-grained and shared experts, group-limited routing.

The oracle is a per-token loop written from the papers' formulas (DeepSeek-V3 tech report,
eqs. 12-16 and 17-20; Wang et al. 2024, Algorithm 1; DeepSeekMoE sec. 3), in float64.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moe.config import ConfigError, MoEConfig, validate_moe
from moe.model.layers import MoELayer, update_expert_bias
from moe.model.routing import limit_to_groups, load_balancing_loss, sequence_balancing_loss, topk_route
from moe.training import checkpoint as ckpt
from moe.training.loop import Trainer

D, FF = 6, 12
TOL = dict(rtol=1e-9, atol=1e-11)


def make_layer(seed: int = 0, **over) -> MoELayer:
    torch.manual_seed(seed)
    cfg = dict(name="topk", num_experts=4, top_k=2, dropless=True, jitter_eps=0.0, min_capacity=0)
    cfg.update(over)
    layer = MoELayer(D, FF, MoEConfig(**cfg), activation="gelu").double()
    with torch.no_grad():
        layer.router.weight_ED.normal_(0.0, 1.0)
        for p in layer.experts.parameters():
            p.normal_(0.0, 0.5)
        if layer.shared is not None:
            for p in layer.shared.parameters():
                p.normal_(0.0, 0.5)
    return layer


def inputs(T: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def naive(layer: MoELayer, x_TD: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """Per token: scores, biased selection within the best groups, normalised gates times the
    route scale, the chosen experts' FFNs, plus the shared FFN."""
    c = layer.cfg
    E, k = c.routed_experts, c.routed_top_k
    W, w1, w2 = layer.router.weight_ED, layer.experts.w1_EDF, layer.experts.w2_EFD
    bias = layer.expert_bias_E if layer.expert_bias_E is not None else torch.zeros(E)
    rows, chosen = [], []
    for t in range(x_TD.shape[0]):
        x = x_TD[t]
        logits = W @ x
        s = torch.sigmoid(logits) if c.score_func == "sigmoid" else torch.softmax(logits, 0)
        sel = [s[e].item() + bias[e].item() for e in range(E)]
        allowed = set(range(E))
        if c.n_groups > 1:
            per = E // c.n_groups
            gscore = [sum(sorted(sel[g * per : (g + 1) * per], reverse=True)[: min(2, per)]) for g in range(c.n_groups)]
            best = sorted(range(c.n_groups), key=lambda g: -gscore[g])[: c.topk_groups]
            allowed = {e for g in best for e in range(g * per, (g + 1) * per)}
        ids = sorted(allowed, key=lambda e: -sel[e])[:k]
        total = sum(s[e] for e in ids)
        out = torch.zeros(D, dtype=x.dtype)
        for e in ids:
            w = (s[e] / total if (c.normalize_weights and k > 1) else s[e]) * c.route_scale
            out = out + w * (F.gelu(x @ w1[e]) @ w2[e])
        if layer.shared is not None:
            out = out + layer.shared.w2(F.gelu(layer.shared.w1(x)))
        rows.append(out)
        chosen.append(sorted(ids))
    return torch.stack(rows), chosen


CASES = {
    "sigmoid": dict(score_func="sigmoid"),
    "sigmoid-scaled": dict(score_func="sigmoid", route_scale=2.5),
    "fine-grained": dict(granularity=3, score_func="sigmoid"),
    "shared": dict(num_shared_experts=2),
    "grouped": dict(num_experts=8, n_groups=4, topk_groups=2, score_func="sigmoid"),
    "everything": dict(
        name="deepseek", granularity=2, num_shared_experts=1, score_func="sigmoid", n_groups=2, topk_groups=1
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_layer_matches_the_per_token_formula(case):
    layer = make_layer(**CASES[case])
    x = inputs(16).requires_grad_(True)
    y, aux = layer(x)
    want, _ = naive(layer, x)
    torch.testing.assert_close(y, want, **TOL)
    assert aux.counts_E.numel() == layer.cfg.routed_experts
    assert aux.counts_E.sum().item() == 16 * layer.cfg.routed_top_k
    y.sum().backward()
    assert layer.router.weight_ED.grad.abs().max() > 1e-6  # the router learns through the gates


def test_biased_selection_on_hand_built_logits_never_touches_the_combine_weights():
    """Sigmoid scores of 2 tokens x 4 experts; a bias that lifts expert 3 above expert 0 for
    the choice.  Gates: the unbiased scores of the chosen, normalised, times the route scale."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 0.4, 0.3, 0.2]], dtype=torch.float64)
    s = torch.sigmoid(logits)
    plain = topk_route(logits, 2, score_func="sigmoid", route_scale=2.0)
    assert plain.expert_ids_TK.tolist() == [[0, 1], [0, 1]]
    torch.testing.assert_close(plain.weights_TK[0], 2.0 * s[0, :2] / s[0, :2].sum())
    bias = torch.tensor([0.0, 0.0, 0.0, 3.5])
    r = topk_route(logits, 2, score_func="sigmoid", route_scale=2.0, bias_E=bias)
    assert r.expert_ids_TK.tolist() == [[3, 0], [3, 0]]
    for t in range(2):  # the biased expert's weight is its own unbiased score's share
        chosen = s[t, [3, 0]]
        torch.testing.assert_close(r.weights_TK[t], 2.0 * chosen / chosen.sum())
    # softmax scores with the same bias: the choice moves, the weights are softmax probabilities
    p = torch.softmax(logits, -1)
    r = topk_route(logits, 1, bias_E=bias)
    assert r.expert_ids_TK.flatten().tolist() == [3, 3]
    torch.testing.assert_close(r.weights_TK.flatten(), p[:, 3])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3))
def test_the_bias_changes_choices_but_a_chosen_experts_weight_is_the_same_as_without_it(seed, k):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(10, 6, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    r = topk_route(logits, k, score_func="sigmoid", bias_E=bias.float())
    s = torch.sigmoid(logits)
    chosen = s.gather(1, r.expert_ids_TK)
    want = chosen / chosen.sum(-1, keepdim=True) if k > 1 else chosen
    torch.testing.assert_close(r.weights_TK, want)
    sel = s + bias.float().double()
    assert torch.equal(r.expert_ids_TK.sort(-1).values, sel.topk(k, -1).indices.sort(-1).values)


def test_bias_update_is_gamma_sign_of_mean_minus_load():
    layer = make_layer(bias_update_rate=0.25, num_experts=4, top_k=1)
    layer.step_load_E = torch.tensor([5.0, 1.0, 2.0, 0.0])  # mean 2: over, under, even, under
    assert update_expert_bias(layer, lambda t: t) == 1
    assert layer.expert_bias_E.tolist() == [-0.25, 0.25, 0.0, 0.25]
    assert layer.step_load_E is None  # consumed: the next step counts from zero
    update_expert_bias(layer, lambda t: t.mul_(3))  # no tokens since: all loads 0 == mean, no move
    assert layer.expert_bias_E.tolist() == [-0.25, 0.25, 0.0, 0.25]


def test_bias_moves_the_load_toward_balance_while_the_router_is_frozen():
    """A router that sends most tokens to expert 0: forward, update, repeat.  The max/mean load
    falls; the bias is all that changes (no optimizer here)."""
    layer = make_layer(bias_update_rate=0.02, num_experts=4, top_k=1, score_func="sigmoid")
    with torch.no_grad():
        layer.router.weight_ED[0] += 1.5  # skew: expert 0 wins most tokens
    layer.train()
    x = inputs(256, seed=3).abs()  # positive features: the skew holds for nearly every token

    def counts() -> torch.Tensor:
        with torch.no_grad():
            return layer(x)[1].counts_E

    first = counts()
    layer.step_load_E = None
    for _ in range(150):
        counts()
        update_expert_bias(layer, lambda t: t)
    last = counts()
    before, after = (c.max().item() / c.mean().item() for c in (first, last))
    assert before > 2.5 and after < 1.3, (before, after)
    assert layer.expert_bias_E.argmin() == first.argmax()  # the busiest expert was pushed down most


def test_eval_forwards_do_not_count_toward_the_bias():
    layer = make_layer(bias_update_rate=0.1).eval()
    with torch.no_grad():
        layer(inputs(8))
    assert layer.step_load_E is None


def test_sequence_loss_is_the_mean_of_per_sequence_losses():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(12, 5, generator=g, dtype=torch.float64), -1)
    ids = torch.randint(0, 5, (12, 2), generator=g)
    got = sequence_balancing_loss(probs, ids, seq_len=4)
    want = sum(load_balancing_loss(probs[i : i + 4], ids[i : i + 4]) for i in (0, 4, 8)) / 3
    torch.testing.assert_close(got, want)
    # a batch balanced as a whole whose sequences are not: the sequence loss sees it
    probs = torch.eye(2, dtype=torch.float64).repeat_interleave(4, 0)  # seq 0 all expert 0, seq 1 all 1
    ids = probs.argmax(-1, keepdim=True)
    assert load_balancing_loss(probs, ids).item() == pytest.approx(1.0)  # balanced batch
    assert sequence_balancing_loss(probs, ids, seq_len=4).item() == pytest.approx(2.0)  # E: each collapsed


def test_layer_uses_the_sequence_loss_per_sequence_of_its_input():
    layer = make_layer(aux_loss_type="sequence", score_func="sigmoid")
    x = inputs(12).view(3, 4, D)
    _, aux = layer(x)
    logits = layer.router(x.reshape(-1, D))
    r = topk_route(logits, 2, score_func="sigmoid", aux_seq_len=4)
    torch.testing.assert_close(aux.aux_loss, r.aux_loss)
    s = torch.sigmoid(logits)
    probs = s / s.sum(-1, keepdim=True)  # DeepSeek-V3 eq. 19: scores normalised over the experts
    torch.testing.assert_close(aux.aux_loss, sequence_balancing_loss(probs, r.expert_ids_TK, 4))


def test_granularity_m_is_m_times_the_experts_of_one_mth_the_size():
    """granularity=2 of 4 experts x top-2 == 8 experts of d_ff/2 x top-4, weight for weight."""
    a = make_layer(seed=7, num_experts=4, top_k=2, granularity=2)
    b = MoELayer(D, FF // 2, MoEConfig(name="topk", num_experts=8, top_k=4, dropless=True)).double()
    b.load_state_dict(a.state_dict())
    x = inputs(10)
    torch.testing.assert_close(a(x)[0], b(x)[0], rtol=0, atol=0)
    assert a.experts.w1_EDF.shape == (8, D, FF // 2)


def test_granularity_one_and_defaults_draw_and_compute_as_before():
    """Every new option at its default: the same parameters, buffers and output as a layer
    configured without them (state dicts have no bias, no shared expert)."""
    a = make_layer(seed=2, num_experts=4, top_k=2)
    assert set(a.state_dict()) == {"router.weight_ED", "experts.w1_EDF", "experts.w2_EFD"}
    torch.manual_seed(0)
    fresh = MoELayer(D, FF, MoEConfig(name="topk", num_experts=4, top_k=2))
    torch.manual_seed(0)
    same = MoELayer(D, FF, MoEConfig(name="topk", num_experts=4, top_k=2, granularity=1, n_groups=1))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, same.state_dict()[k])


def test_a_shared_experts_output_is_the_dense_ffn_plus_the_routed_sum():
    layer = make_layer(num_shared_experts=2, granularity=2)
    assert layer.shared.w1.weight.shape == (2 * FF // 2, D)  # 2 experts of the routed size, side by side
    x = inputs(9)
    y, _ = layer(x)
    shared = layer.shared
    layer.shared = None
    routed, _ = layer(x)
    layer.shared = shared
    torch.testing.assert_close(y, routed + shared(x)[0], **TOL)
    assert "shared.w1.weight" in layer.state_dict() and not getattr(layer.shared, "expert_parallel", False)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([(8, 2, 1, 2), (8, 4, 2, 3), (12, 3, 2, 4), (6, 6, 2, 2)]))
def test_group_limited_routing_stays_within_topk_groups(seed, shape):
    E, n_groups, topk_groups, k = shape
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(20, E, generator=g, dtype=torch.float64)
    bias = torch.randn(E, generator=g) * 0.3
    r = topk_route(logits, k, score_func="sigmoid", bias_E=bias, n_groups=n_groups, topk_groups=topk_groups)
    per = E // n_groups
    groups_T = [(set((ids // per).tolist())) for ids in r.expert_ids_TK]
    assert all(len(gr) <= topk_groups for gr in groups_T)
    # and within those groups the choice is the plain top-k of the biased scores
    sel = torch.sigmoid(logits) + bias.double()
    masked = limit_to_groups(sel, n_groups, topk_groups)
    assert torch.equal(r.expert_ids_TK, masked.topk(k, -1).indices)


def test_group_scores_are_the_sum_of_each_groups_two_best():
    sel = torch.tensor([[0.9, 0.0, 0.0, 0.5, 0.45, 0.45]])  # groups (0.9,0) (0,.5) (.45,.45): sums .9 .5 .9
    out = limit_to_groups(sel, 3, 2)
    assert torch.isinf(out[0, 2:4]).all() and torch.isfinite(out[0, [0, 1, 4, 5]]).all()


def test_config_checks_name_the_option_and_the_fix():
    def bad(**kw) -> str:
        with pytest.raises(ConfigError) as ei:
            validate_moe(dataclasses.replace(MoEConfig(name="topk", num_experts=8, top_k=2), **kw))
        return str(ei.value)

    assert "moe=topk" in bad(name="switch", top_k=1, score_func="sigmoid")
    assert "does not divide" in bad(n_groups=3, topk_groups=1)
    assert "raise moe.topk_groups" in bad(n_groups=8, topk_groups=1)  # 1 group of 1 expert < k=2
    assert "moe.granularity" in bad(name="gshard", granularity=2)
    assert "bias_update_rate" in bad(bias_update_rate=-1.0)
    validate_moe(MoEConfig(name="switch", num_experts=8, top_k=1, bias_update_rate=0.001, aux_loss_type="sequence"))


# ---------------------------------------------------------------------------------------------
# training: one process, EP=2 on two gloo ranks, resume, reshard


def _modern(cfg, **moe_over):
    """tiny_config's ``deepseek`` layer (fine-grained + shared + sigmoid + bias + sequence loss
    + 2 groups, one per EP rank) in ``llama`` blocks."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, block="llama"),
        moe=dataclasses.replace(cfg.moe, **moe_over),
    )


def _biases(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("expert_bias_E")}


def case_fit_with_biases(rank, states, *, cfg, data, stop_after=None):
    """Train on this rank; every rank returns its own copy of the expert biases and the distinct
    ranks each token of the last forward reached; rank 0 also the run."""
    from tests.conftest import rank_trainer

    t = rank_trainer(cfg, data, states[cfg.parallel.ep_size])
    res = t.fit(stop_after=stop_after)
    reached = [m.dispatcher.ranks_per_token_T for m in t.model.modules() if isinstance(m, MoELayer)]
    final = t.backend.state_dict()
    out = {"biases": _biases(t.model), "reached": [r.clone() for r in reached if r is not None]}
    if rank == 0:
        out |= {"history": res.history, "model": final["model"], "step": res.step}
    return out


def test_ep2_equals_one_process_with_every_modern_option_and_the_same_bias_on_every_rank(pair, tmp_path, tiny_data):
    from tests.test_parallel_train import NO_AUX, B, _assert_same_run, _cfg, _reference

    par = pair.run(
        case_fit_with_biases, cfg=_modern(_cfg(tmp_path / "ep", "deepseek", ep=2, world=2, steps=4)), data=tiny_data
    )
    ref = _reference(_modern(_cfg(tmp_path / "ref", "deepseek", batch_size=2 * B, steps=4)), tiny_data)
    _assert_same_run(par[0], ref, keys=NO_AUX)
    want = {k: v for k, v in ref["model"].items() if k.endswith("expert_bias_E")}
    assert len(want) == 2 and all(v.abs().sum() > 0 for v in want.values())  # the bias moved
    for rank in (0, 1):  # every rank holds the one-process bias, exactly (sums of integer loads)
        assert set(par[rank]["biases"]) == set(want)
        for k, v in want.items():
            assert torch.equal(par[rank]["biases"][k], v), (rank, k)
    # 2 groups of 4 experts = the 2 ranks' shards, topk_groups=1: every token's rows go to 1 rank
    for rank in (0, 1):
        assert par[rank]["reached"] and all(r.max().item() == 1 for r in par[rank]["reached"])
    # the shared expert is replicated: the same full weight in the gathered state as one process
    assert ref["model"]["blocks.0.ffn.shared.w1.weight"].shape == (64, 64)  # 1 expert of d_ff/2 = 64


def test_without_group_limits_tokens_reach_both_ranks(pair, tmp_path, tiny_data):
    """The count above could fail: the same run with n_groups=1 sends some token to both ranks."""
    from tests.test_parallel_train import _cfg

    cfg = _modern(_cfg(tmp_path / "ep", "deepseek", ep=2, world=2, steps=1), n_groups=1, topk_groups=1)
    par = pair.run(case_fit_with_biases, cfg=cfg, data=tiny_data)
    assert max(r.max().item() for r in par[0]["reached"]) == 2


def test_resume_with_the_bias_is_bit_exact(tmp_path, tiny_data):
    from tests.test_parallel_train import _cfg

    def cfg(d):
        return _modern(_cfg(d, "deepseek", steps=6))

    straight = Trainer(cfg(tmp_path / "a"), data=tiny_data)
    res_a = straight.fit()
    first = Trainer(cfg(tmp_path / "b"), data=tiny_data)
    res_b1 = first.fit(stop_after=3)
    saved = ckpt.load(tmp_path / "b" / "checkpoint.pt")["model"]
    assert any(k.endswith("expert_bias_E") and v.abs().sum() > 0 for k, v in saved.items())  # saved, not zero
    resumed = Trainer(cfg(tmp_path / "b"), data=tiny_data)
    res_b2 = resumed.fit()
    losses = [h["train/loss"] for h in res_b1.history + res_b2.history]
    assert losses == [h["train/loss"] for h in res_a.history]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ep2_checkpoint_of_the_modern_layer_loads_at_ep1(pair, tmp_path, tiny_data):
    """Resharding: the EP=2 checkpoint (32 experts' rows gathered, shared expert and bias
    once) continues in one process exactly as the EP=2 run continues itself."""
    from tests.test_parallel_train import NO_AUX, B, _assert_same_run, _cfg, case_fit

    cfg = _modern(_cfg(tmp_path / "ep2", "deepseek", ep=2, world=2, steps=5))
    pair.run(case_fit, cfg=cfg, data=tiny_data, stop_after=3)
    saved = tmp_path / "at_step_3.pt"
    shutil.copy(tmp_path / "ep2" / "checkpoint.pt", saved)
    cont = pair.run(case_fit, cfg=cfg, data=tiny_data)[0]
    state = ckpt.load(saved)
    assert (
        state["model"]["blocks.0.ffn.experts.w1_EDF"].shape[0] == 8 and "blocks.0.ffn.experts.w3_EDF" in state["model"]
    )
    (tmp_path / "ep1").mkdir()
    shutil.copy(saved, tmp_path / "ep1" / "checkpoint.pt")
    t = Trainer(_modern(_cfg(tmp_path / "ep1", "deepseek", steps=5, batch_size=2 * B)), data=tiny_data)
    res = t.fit()
    _assert_same_run({"history": res.history, "model": t.model.state_dict(), "step": res.step}, cont, keys=NO_AUX)


def test_bias_is_logged_per_expert(tmp_path, tiny_data):
    import json

    from tests.test_parallel_train import _cfg

    Trainer(_modern(_cfg(tmp_path, "deepseek", steps=3)), data=tiny_data).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/loss" in r][-1]
    bias = [last[f"moe/layer_0/bias_e{j}"] for j in range(8)]
    assert "moe/layer_0/bias_e8" not in last and last["moe/layer_0/bias_range"] == pytest.approx(max(bias) - min(bias))
    assert all(abs(b / 0.01 - round(b / 0.01)) < 1e-4 for b in bias)  # whole steps of gamma


def test_sequence_loss_needs_whole_sequences_and_sigmoid_top1_needs_no_renormalising():
    layer = make_layer(aux_loss_type="sequence")
    with pytest.raises(ValueError, match=r"\(batch, sequence, d_model\)"):
        layer(inputs(8))
    with pytest.raises(ConfigError, match="normalize_weights=false"):
        validate_moe(MoEConfig(name="topk", num_experts=8, top_k=1, score_func="sigmoid"))
    validate_moe(MoEConfig(name="topk", num_experts=8, top_k=1, score_func="sigmoid", normalize_weights=False))
    validate_moe(MoEConfig(name="topk", num_experts=8, top_k=1, granularity=2, score_func="sigmoid"))
