"""The blocks of ``model.block``: ``llama`` against Hugging Face's own Llama, ``gpt`` unchanged.

The oracle for the llama block is ``transformers.LlamaForCausalLM`` with our weights copied in
under its names: the same logits within fp32 rounding means RMSNorm, the rotary embedding
(its "rotate half" pairing and frequencies) and the SwiGLU FFN are Llama's.
"""

from __future__ import annotations

import pytest
import torch

from moe.config import ModelConfig, MoEConfig
from moe.model.hf import to_hf
from moe.model.transformer import RMSNorm, TransformerLM, apply_rotary, count_parameters, rotary_cos_sin


def llama_cfg(**kw) -> ModelConfig:
    base = dict(n_layers=2, d_model=64, n_heads=4, d_ff=96, vocab_size=101, seq_len=32, moe_every=1, block="llama")
    base.update(kw)
    return ModelConfig(**base)


def to_hf_llama(model: TransformerLM) -> dict[str, torch.Tensor]:
    """Our dense llama model's weights under LlamaForCausalLM's names (moe-export's renaming,
    itself checked against transformers' loading in tests/test_inference.py); the head kept
    even when tied, as the state dict below is loaded whole."""
    out = to_hf(model.state_dict(), model.cfg, model.moe, "LlamaForCausalLM")
    out.setdefault("lm_head.weight", model.lm_head.weight)
    return out


def test_llama_block_equals_transformers_llama():
    import transformers  # a test dependency (pyproject: test extra): the oracle, never skipped

    cfg = llama_cfg(rope_theta=500.0, norm_eps=1e-6)
    torch.manual_seed(0)
    ours = TransformerLM(cfg, MoEConfig(name="dense")).eval()
    with torch.no_grad():  # norms away from 1, so a missing weight would show
        for n, p in ours.named_parameters():
            if n.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
                p.uniform_(0.5, 1.5)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True,
        hidden_act="silu",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_llama(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(input_ids=idx).logits
        got = ours(idx).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.std() > 0.01  # not two models that both output ~0


def test_llama_has_no_learned_positions_and_counts_no_position_embedding():
    llama = TransformerLM(llama_cfg(), MoEConfig(name="dense"))
    gpt = TransformerLM(llama_cfg(block="gpt"), MoEConfig(name="dense"))
    assert llama.pos_emb is None and "pos_emb.weight" not in llama.state_dict()
    cl, cg = count_parameters(llama), count_parameters(gpt)
    assert cl["embedding"] == 101 * 64 and cg["embedding"] == 101 * 64 + 32 * 64
    # SwiGLU adds a third matrix to every FFN: 2 layers x 64 x 96
    ffn_gpt, ffn_llama = 2 * 2 * 64 * 96, 2 * 3 * 64 * 96
    norms_gpt, norms_llama = (2 * 2 + 1) * 2 * 64, (2 * 2 + 1) * 64  # LayerNorm has a bias, RMSNorm none
    assert cl["active_non_embedding"] - cg["active_non_embedding"] == ffn_llama - ffn_gpt + norms_llama - norms_gpt


def test_llama_logits_depend_on_order_through_rotary_only():
    """With no learned positions a llama model still sees order: swapping two earlier tokens
    changes a later token's logits (causal attention alone is order-blind over a set)."""
    torch.manual_seed(0)
    m = TransformerLM(llama_cfg(), MoEConfig(name="dense")).eval()
    a = torch.tensor([[5, 7, 9, 11]])
    b = torch.tensor([[7, 5, 9, 11]])
    with torch.no_grad():
        la, lb = m(a).logits[0, -1], m(b).logits[0, -1]
    assert not torch.allclose(la, lb, atol=1e-6)


def test_rotary_turns_pairs_by_position_times_frequency():
    """Naive oracle: for each position s and pair i, rotate (x_i, x_{i+d/2}) by s * theta^(-2i/d)."""
    S, d, theta = 5, 8, 100.0
    x = torch.randn(1, 1, S, d, dtype=torch.float64)
    cos, sin = rotary_cos_sin(S, d, theta, torch.device("cpu"))
    got = apply_rotary(x, cos.double(), sin.double())
    want = torch.empty_like(x)
    for s in range(S):
        for i in range(d // 2):
            a = s * theta ** (-2 * i / d)
            c, sn = torch.cos(torch.tensor(a, dtype=torch.float64)), torch.sin(torch.tensor(a, dtype=torch.float64))
            x1, x2 = x[0, 0, s, i], x[0, 0, s, i + d // 2]
            want[0, 0, s, i] = x1 * c - x2 * sn
            want[0, 0, s, i + d // 2] = x2 * c + x1 * sn
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # angles computed in fp32


def test_rmsnorm_formula():
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(4, 6)
    want = torch.arange(1.0, 7.0) * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), want)


def test_swiglu_experts_compute_silu_gate_times_up():
    """A one-expert SwiGLU layer equals ``w2(silu(w1 x) * w3 x)`` by hand, grouped and padded."""
    from moe.model.experts import GroupedExperts

    ex = GroupedExperts(3, 8, 16, activation="swiglu")
    x = torch.randn(7, 8)
    counts = [3, 0, 4]
    got = ex.forward_grouped(x, counts)
    rows = []
    for e, (lo, hi) in enumerate([(0, 3), (3, 3), (3, 7)]):
        h = torch.nn.functional.silu(x[lo:hi] @ ex.w1_EDF[e]) * (x[lo:hi] @ ex.w3_EDF[e])
        rows.append(h @ ex.w2_EFD[e])
    torch.testing.assert_close(got, torch.cat(rows))
    padded = ex.forward_padded(x[:6].view(3, 2, 8))
    torch.testing.assert_close(padded[2], rows[2][1:3])  # x[4:6] is rows 1-2 of expert 2's x[3:7]


def test_gpt_block_is_unchanged_by_the_block_option():
    """``model.block=gpt`` (the default) builds the same weights as before the option existed:
    the same parameter names and the same initial draws under one seed."""
    cfg = llama_cfg(block="gpt")
    torch.manual_seed(3)
    m = TransformerLM(cfg, MoEConfig(name="switch", num_experts=4))
    names = [n for n, _ in m.named_parameters()]
    assert "pos_emb.weight" in names and not any(n.endswith("w3_EDF") or n.endswith("w3.weight") for n in names)
    assert cfg.ffn_activation == "gelu" and llama_cfg().ffn_activation == "swiglu"


def test_a_checkpoint_from_before_the_block_option_resumes(tmp_path):
    """A run saved with ``model.activation=gelu`` and no ``block``/``rope_theta``/``norm_eps``
    keys resumes under today's defaults (``auto`` on a gpt block is gelu), not under llama."""
    import dataclasses

    from moe.config import ConfigError, TrainConfig, to_dict
    from moe.training.checkpoint import check_resumable

    old = to_dict(TrainConfig())
    old["model"] = {k: v for k, v in old["model"].items() if k not in ("block", "rope_theta", "norm_eps")}
    old["model"]["activation"] = "gelu"
    check_resumable(old, to_dict(TrainConfig()), tmp_path)
    llama = TrainConfig()
    llama = dataclasses.replace(llama, model=dataclasses.replace(llama.model, block="llama"))
    with pytest.raises(ConfigError, match="model.activation: 'gelu' -> 'swiglu'"):
        check_resumable(old, to_dict(llama), tmp_path)
