"""Our model under Hugging Face ``transformers``' names: which architecture expresses a
config exactly, its ``config.json``, and the weights renamed (both ways for Llama).

=====================================  ============================================
our model                              transformers architecture
=====================================  ============================================
``llama`` block, dense                 ``LlamaForCausalLM``
``gpt`` block, dense, GELU             ``GPT2LMHeadModel`` (zero biases)
``llama``, softmax top-k, renormalised ``MixtralForCausalLM`` (every block sparse, k >= 2)
``llama``, softmax top-k, otherwise    ``Qwen2MoeForCausalLM`` (``decoder_sparse_step`` is
                                       ``moe_every``; its shared expert zero)
``llama``, sigmoid (DeepSeek-style)    ``Glm4MoeForCausalLM`` (expert bias, groups, shared
                                       experts, route scale; dense blocks only first)
=====================================  ============================================

Everything else is refused with one line saying why and what to train instead
(:class:`ExportRefused`): MoE with ``gpt`` blocks, BASE layers (balanced assignment), softmax
routing with an expert bias, shared experts, groups or a route scale, sigmoid routing with
dense blocks after sparse ones.  The export is of the model as inference runs it here:
dropless (no capacity limit).

Our tensors: ``attn.qkv`` is q, k and v stacked; a SwiGLU FFN is ``w2(silu(w1 x) * w3 x)``
(w1 = gate, w3 = up, w2 = down); experts are stacks ``w1_EDF``/``w3_EDF`` (E, D, F) and
``w2_EFD`` (E, F, D), so expert j's ``gate_proj.weight`` is ``w1_EDF[j].T``.
"""

from __future__ import annotations

import torch

from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.model.layers import top_k_of


class ExportRefused(ConfigError):
    """A config no ``transformers`` architecture computes exactly; the message says why and
    what to train instead."""


def architecture(model: ModelConfig, moe: MoEConfig) -> str:
    """The ``transformers`` architecture that computes this model exactly (module table),
    or :class:`ExportRefused`."""
    dense = moe.name == "dense"
    act = model.ffn_activation
    if model.block == "gpt":
        if not dense:
            raise ExportRefused(
                f"moe={moe.name} with model.block=gpt: no transformers architecture has experts with learned "
                "positions and LayerNorm; train with model.block=llama to export an MoE model"
            )
        if act != "gelu":
            raise ExportRefused(
                f"model.block=gpt with activation {act}: GPT-2 has a GELU MLP; train with the gpt block's "
                "own activation (model.activation=auto) or with model.block=llama"
            )
        return "GPT2LMHeadModel"
    if act != "swiglu":
        raise ExportRefused(
            f"model.block=llama with activation {act}: Llama-family models have SwiGLU MLPs; train with "
            "model.activation=auto (swiglu)"
        )
    if dense:
        return "LlamaForCausalLM"
    if moe.name == "base":
        raise ExportRefused(
            "moe=base: BASE's balanced assignment has no counterpart in transformers (its inference routing "
            "is a greedy top-1 over unnormalised affinities); train with moe=switch or moe=topk to export"
        )
    if moe.name not in ("switch", "gshard", "topk", "deepseek"):
        raise ExportRefused(f"moe={moe.name} has no transformers counterpart; train with moe=topk or deepseek")
    grouped = moe.n_groups > 1 and moe.topk_groups < moe.n_groups
    if moe.score_func == "softmax":
        extra = [
            why
            for ok, why in (
                (moe.bias_update_rate == 0, "an expert bias (moe.bias_update_rate)"),
                (moe.num_shared_experts == 0, "shared experts"),
                (not grouped, "group-limited routing"),
                (moe.route_scale == 1.0, f"moe.route_scale={moe.route_scale}"),
            )
            if not ok
        ]
        if extra:
            raise ExportRefused(
                f"softmax routing with {' and '.join(extra)}: the softmax MoE architectures of transformers "
                "(Mixtral, Qwen2-MoE) have none of these; train with moe.score_func=sigmoid (GLM-4-MoE has them)"
            )
        if model.moe_every == 1 and _renormalised(moe):
            return "MixtralForCausalLM"
        return "Qwen2MoeForCausalLM"
    # sigmoid: GLM-4-MoE's dense blocks are the first k only
    sparse = [(i + 1) % model.moe_every == 0 for i in range(model.n_layers)]
    first_sparse = sparse.index(True)
    if not all(sparse[first_sparse:]):
        raise ExportRefused(
            f"sigmoid routing with model.moe_every={model.moe_every}: GLM-4-MoE, the transformers architecture "
            "with sigmoid gates, an expert bias and shared experts, has dense blocks only before the sparse "
            "ones; train with model.moe_every=1"
        )
    if grouped and moe.routed_experts // moe.n_groups < 2:
        raise ExportRefused(
            f"moe.n_groups={moe.n_groups} leaves one expert per group; GLM-4-MoE scores a group by its best two "
            "experts: use fewer groups"
        )
    return "Glm4MoeForCausalLM"


def _renormalised(moe: MoEConfig) -> bool:
    """Whether the k combine weights are renormalised to sum to one (k >= 2)."""
    return top_k_of(moe) > 1 and (moe.name == "gshard" or (moe.name in ("topk", "deepseek") and moe.normalize_weights))


def hf_config(model: ModelConfig, moe: MoEConfig, arch: str, *, eos_token_id: int) -> dict:
    """``config.json`` of ``arch`` for this model, every field that matters spelled out (no
    reliance on the library's defaults)."""
    D, H = model.d_model, model.n_heads
    rope = {"rope_type": "default", "rope_theta": model.rope_theta}
    common = {
        "architectures": [arch],
        "vocab_size": model.vocab_size,
        "tie_word_embeddings": model.tie_embeddings,
        "eos_token_id": eos_token_id,
        "bos_token_id": eos_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if arch == "GPT2LMHeadModel":
        return {
            **common,
            "model_type": "gpt2",
            "n_embd": D,
            "n_layer": model.n_layers,
            "n_head": H,
            "n_positions": model.seq_len,
            "n_inner": model.d_ff,
            "activation_function": "gelu",
            "layer_norm_epsilon": model.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    llama_like = {
        **common,
        "hidden_size": D,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": H,
        "num_key_value_heads": H,
        "head_dim": D // H,
        "intermediate_size": model.d_ff,
        "hidden_act": "silu",
        "rms_norm_eps": model.norm_eps,
        "max_position_embeddings": model.seq_len,
        "rope_theta": model.rope_theta,
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
    }
    if arch == "LlamaForCausalLM":
        return {**llama_like, "model_type": "llama", "attention_bias": False, "mlp_bias": False}
    E, F_e, k = moe.routed_experts, moe.routed_d_ff(model.d_ff), top_k_of(moe)
    if arch == "MixtralForCausalLM":
        return {
            **llama_like,
            "model_type": "mixtral",
            "intermediate_size": F_e,
            "num_local_experts": E,
            "num_experts_per_tok": k,
            "sliding_window": None,
            "router_aux_loss_coef": moe.aux_loss_weight,
            "output_router_logits": False,
        }
    if arch == "Qwen2MoeForCausalLM":
        return {
            **llama_like,
            "model_type": "qwen2_moe",
            "moe_intermediate_size": F_e,
            "num_experts": E,
            "num_experts_per_tok": k,
            "norm_topk_prob": _renormalised(moe),
            "decoder_sparse_step": model.moe_every,
            "mlp_only_layers": [],
            "shared_expert_intermediate_size": 1,  # always built; its weights are zero (adds nothing)
            "qkv_bias": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "router_aux_loss_coef": moe.aux_loss_weight,
            "output_router_logits": False,
        }
    if arch == "Glm4MoeForCausalLM":
        grouped = moe.n_groups > 1 and moe.topk_groups < moe.n_groups
        first_sparse = model.moe_every - 1
        return {
            **llama_like,
            "model_type": "glm4_moe",
            "rope_parameters": {**rope, "partial_rotary_factor": 1.0},
            "partial_rotary_factor": 1.0,
            "moe_intermediate_size": F_e,
            "n_routed_experts": E,
            "num_experts_per_tok": k,
            "n_shared_experts": moe.num_shared_experts,
            "first_k_dense_replace": first_sparse,
            "n_group": moe.n_groups if grouped else 1,
            "topk_group": moe.topk_groups if grouped else 1,
            "norm_topk_prob": _renormalised(moe),
            "routed_scaling_factor": moe.route_scale,
            "use_qk_norm": False,
            "attention_bias": False,
            "num_nextn_predict_layers": 0,
        }
    raise ValueError(f"unknown architecture {arch}")


def _experts(sd: dict[str, torch.Tensor], p: str, q: str, names: tuple[str, str, str]) -> dict[str, torch.Tensor]:
    """Expert stacks at ``p`` (ours) as per-expert ``q.experts.{j}.<gate|up|down>`` weights."""
    gate, up, down = names
    w1, w2, w3 = sd[p + "experts.w1_EDF"], sd[p + "experts.w2_EFD"], sd[p + "experts.w3_EDF"]
    out = {}
    for j in range(w1.shape[0]):
        e = f"{q}experts.{j}."
        out[e + gate + ".weight"] = w1[j].t().contiguous()
        out[e + up + ".weight"] = w3[j].t().contiguous()
        out[e + down + ".weight"] = w2[j].t().contiguous()
    return out


def to_hf(state: dict[str, torch.Tensor], model: ModelConfig, moe: MoEConfig, arch: str) -> dict[str, torch.Tensor]:
    """Our state dict (``TransformerLM``'s, one-process) under ``arch``'s names."""
    sd = {k: v.detach().to("cpu") for k, v in state.items()}
    D = model.d_model
    if arch == "GPT2LMHeadModel":
        return _to_gpt2(sd, model)
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["ln_f.weight"]}
    if not model.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(model.n_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[p + "attn.qkv.weight"].split(D, dim=0)
        out |= {
            q + "self_attn.q_proj.weight": wq.contiguous(),
            q + "self_attn.k_proj.weight": wk.contiguous(),
            q + "self_attn.v_proj.weight": wv.contiguous(),
            q + "self_attn.o_proj.weight": sd[p + "attn.proj.weight"],
            q + "input_layernorm.weight": sd[p + "ln1.weight"],
            q + "post_attention_layernorm.weight": sd[p + "ln2.weight"],
        }
        f = p + "ffn."
        if f + "w1.weight" in sd:  # a dense block
            out |= {
                q + "mlp.gate_proj.weight": sd[f + "w1.weight"],
                q + "mlp.up_proj.weight": sd[f + "w3.weight"],
                q + "mlp.down_proj.weight": sd[f + "w2.weight"],
            }
            continue
        router = sd[f + "router.weight_ED"].float()
        if arch == "MixtralForCausalLM":
            m = q + "block_sparse_moe."
            out[m + "gate.weight"] = router
            out |= _experts(sd, f, m, ("w1", "w3", "w2"))
            continue
        m = q + "mlp."
        out[m + "gate.weight"] = router
        out |= _experts(sd, f, m, ("gate_proj", "up_proj", "down_proj"))
        if arch == "Qwen2MoeForCausalLM":  # its always-on shared expert, silenced
            out |= {
                m + "shared_expert.gate_proj.weight": torch.zeros(1, D),
                m + "shared_expert.up_proj.weight": torch.zeros(1, D),
                m + "shared_expert.down_proj.weight": torch.zeros(D, 1),
                m + "shared_expert_gate.weight": torch.zeros(1, D),
            }
        elif arch == "Glm4MoeForCausalLM":
            bias = sd.get(f + "expert_bias_E")
            out[m + "gate.e_score_correction_bias"] = (
                bias.float() if bias is not None else torch.zeros(router.shape[0], dtype=torch.float32)
            )
            if f + "shared.w1.weight" in sd:
                out |= {
                    m + "shared_experts.gate_proj.weight": sd[f + "shared.w1.weight"],
                    m + "shared_experts.up_proj.weight": sd[f + "shared.w3.weight"],
                    m + "shared_experts.down_proj.weight": sd[f + "shared.w2.weight"],
                }
            else:  # GLM-4-MoE always builds them (0 wide without any): empty weights, nothing missing
                out |= {
                    m + "shared_experts.gate_proj.weight": torch.zeros(0, D),
                    m + "shared_experts.up_proj.weight": torch.zeros(0, D),
                    m + "shared_experts.down_proj.weight": torch.zeros(D, 0),
                }
    return out


def _to_gpt2(sd: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2's names; its Conv1D weights are (in, out), ours (out, in); its biases are zero."""
    D, F = model.d_model, model.d_ff
    zeros = lambda n: torch.zeros(n, dtype=sd["tok_emb.weight"].dtype)  # noqa: E731
    out = {
        "transformer.wte.weight": sd["tok_emb.weight"],
        "transformer.wpe.weight": sd["pos_emb.weight"],
        "transformer.ln_f.weight": sd["ln_f.weight"],
        "transformer.ln_f.bias": sd["ln_f.bias"],
    }
    if not model.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(model.n_layers):
        p, q = f"blocks.{i}.", f"transformer.h.{i}."
        out |= {
            q + "ln_1.weight": sd[p + "ln1.weight"],
            q + "ln_1.bias": sd[p + "ln1.bias"],
            q + "attn.c_attn.weight": sd[p + "attn.qkv.weight"].t().contiguous(),
            q + "attn.c_attn.bias": zeros(3 * D),
            q + "attn.c_proj.weight": sd[p + "attn.proj.weight"].t().contiguous(),
            q + "attn.c_proj.bias": zeros(D),
            q + "ln_2.weight": sd[p + "ln2.weight"],
            q + "ln_2.bias": sd[p + "ln2.bias"],
            q + "mlp.c_fc.weight": sd[p + "ffn.w1.weight"].t().contiguous(),
            q + "mlp.c_fc.bias": zeros(F),
            q + "mlp.c_proj.weight": sd[p + "ffn.w2.weight"].t().contiguous(),
            q + "mlp.c_proj.bias": zeros(D),
        }
    return out


# ---------------------------------------------------------------------------------------------
# import: a Hugging Face Llama as our dense llama model


def llama_model_config(hf: dict) -> dict:
    """Our ``model.*`` keys for a Llama ``config.json``; one-line ConfigError for what our
    attention does not have (grouped-query attention, biases, rope scaling)."""
    if hf.get("model_type") != "llama":
        raise ConfigError(f"a {hf.get('model_type')!r} model: only Llama checkpoints are read (model_type llama)")
    H = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", H) != H:
        raise ConfigError(
            f"the Llama has grouped-query attention ({hf['num_key_value_heads']} key/value heads for {H}); "
            "ours is multi-head: only num_key_value_heads == num_attention_heads is read"
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("the Llama has attention or MLP biases; ours has none")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"the Llama's MLP uses {hf['hidden_act']}; ours is SwiGLU (silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(
            f"the Llama uses {rope.get('rope_type') or rope.get('type')} rope scaling; ours is plain rotary"
        )
    if hf.get("head_dim", hf["hidden_size"] // H) != hf["hidden_size"] // H:
        raise ConfigError(f"the Llama's head_dim={hf['head_dim']} is not hidden_size / heads")
    return {
        "block": "llama",
        "activation": "swiglu",
        "n_layers": hf["num_hidden_layers"],
        "d_model": hf["hidden_size"],
        "n_heads": H,
        "d_ff": hf["intermediate_size"],
        "vocab_size": hf["vocab_size"],
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    }


def from_hf_llama(hf_state: dict[str, torch.Tensor], n_layers: int, *, tied: bool) -> dict[str, torch.Tensor]:
    """A Llama's weights under our dense llama model's names (the inverse of :func:`to_hf`)."""
    sd = {
        "tok_emb.weight": hf_state["model.embed_tokens.weight"],
        "ln_f.weight": hf_state["model.norm.weight"],
    }
    sd["lm_head.weight"] = sd["tok_emb.weight"] if tied else hf_state["lm_head.weight"]
    for i in range(n_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        sd |= {
            p + "attn.qkv.weight": torch.cat(
                [hf_state[q + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")], dim=0
            ),
            p + "attn.proj.weight": hf_state[q + "self_attn.o_proj.weight"],
            p + "ln1.weight": hf_state[q + "input_layernorm.weight"],
            p + "ln2.weight": hf_state[q + "post_attention_layernorm.weight"],
            p + "ffn.w1.weight": hf_state[q + "mlp.gate_proj.weight"],
            p + "ffn.w3.weight": hf_state[q + "mlp.up_proj.weight"],
            p + "ffn.w2.weight": hf_state[q + "mlp.down_proj.weight"],
        }
    return sd
