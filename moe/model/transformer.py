"""A decoder-only Transformer (pre-norm, causal SDPA attention) with MoE FFNs.

Two blocks (``model.block``): ``gpt`` (LayerNorm, learned positions, GELU) and ``llama``
(RMSNorm, rotary position embeddings on queries and keys, SwiGLU FFNs and experts; no learned
positions), computed as Hugging Face's ``LlamaModel`` computes them, so a trained model maps
onto it weight for weight.  Every ``moe_every``-th block's FFN is the configured expert layer; the rest are dense.  The
forward returns the language-model loss and the MoE layers' auxiliary terms separately
(``ModelOutput``) so the caller weights them, and a pipeline stage can carry them on.  This
file never imports ``torch.distributed``.

Shape suffixes: B batch, S sequence, D model dim, H heads, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.config import ModelConfig, MoEConfig
from moe.model.layers import LayerAux, LayerContext, build_ffn


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, S, V)
    lm_loss: torch.Tensor | None  # mean cross-entropy, None without targets
    aux_loss: torch.Tensor  # sum over MoE layers of their balancing losses
    z_loss: torch.Tensor  # sum over MoE layers of their router z-losses
    layer_aux: list[LayerAux] = field(default_factory=list)  # one per MoE layer, in depth order

    def total_loss(self, moe: MoEConfig) -> torch.Tensor:
        """What is differentiated: lm + aux_loss_weight * aux + z_loss_weight * z."""
        assert self.lm_loss is not None
        return self.lm_loss + moe.aux_loss_weight * self.aux_loss + moe.z_loss_weight * self.z_loss


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` (Zhang & Sennrich 2019), normalised in fp32 and
    cast back before the weight, as Llama does."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The block's normalisation: LayerNorm for ``gpt``, RMSNorm for ``llama``."""
    if cfg.block == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of the rotary angles, each ``(S, head_dim)``: position ``s`` turns
    the dimension pair ``(i, i + head_dim/2)`` by ``s * theta^(-2i/head_dim)`` (the "rotate
    half" pairing of GPT-NeoX and Llama, not interleaved pairs)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (S, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x_BHSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys ``(B, H, S, d)`` by their positions' angles."""
    half = x_BHSd.shape[-1] // 2
    rotated = torch.cat([-x_BHSd[..., half:], x_BHSd[..., :half]], dim=-1)
    return x_BHSd * cos_Sd.to(x_BHSd.dtype) + rotated * sin_Sd.to(x_BHSd.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention; ``llama`` rotates queries and keys by position first."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.rotary_theta = cfg.rope_theta if cfg.block == "llama" else None
        self._rotary: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None  # cached cos/sin

    def _cos_sin(self, S: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._rotary
        if cached is None or cached[0] < S or cached[1] != device:
            cos, sin = rotary_cos_sin(S, head_dim, self.rotary_theta, device)
            self._rotary = cached = (S, device, cos, sin)
        return cached[2][:S], cached[3][:S]

    def forward(self, x_BSD: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """Attention of ``x``'s positions over themselves and, with ``cache``, over the
        ``cache.length`` positions before them (their keys and values kept there; this call
        appends its own, and the model advances the length)."""
        B, S, D = x_BSD.shape
        start = 0 if cache is None else cache.length
        q, k, v = self.qkv(x_BSD).split(D, dim=-1)
        q, k, v = (t.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D/H)
        if self.rotary_theta is not None:
            cos, sin = self._cos_sin(start + S, D // self.n_heads, x_BSD.device)
            cos, sin = cos[start:], sin[start:]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mask, causal = None, True
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, start + S, D/H)
            if start > 0:  # query i (position start + i) sees keys 0 .. start + i
                causal = False
                if S > 1:
                    mask = torch.ones(S, start + S, dtype=torch.bool, device=x_BSD.device).tril(start)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class LayerCache:
    """One block's keys and values for incremental decoding, ``(B, H, max_len, D/H)`` each,
    filled up to ``length``."""

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, *, device, dtype):
        self.k = torch.zeros(batch, n_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values; the keys and values of every position so far."""
        end = self.length + k_BHSd.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache: {end} positions do not fit its {self.k.shape[2]}")
        self.k[:, :, self.length : end] = k_BHSd
        self.v[:, :, self.length : end] = v_BHSd
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Every block's :class:`LayerCache`: pass it to :meth:`TransformerLM.forward` with the
    next tokens only; the positions it holds are ``length``.  At most ``max_len`` (default
    ``model.seq_len``, what the model was trained on) positions."""

    def __init__(self, model: TransformerLM, batch: int, max_len: int | None = None):
        cfg = model.cfg
        self.max_len = cfg.seq_len if max_len is None else max_len
        if cfg.block == "gpt" and self.max_len > cfg.seq_len:
            raise ValueError(f"a gpt block has learned positions for {cfg.seq_len} tokens, not {self.max_len}")
        p = model.tok_emb.weight
        self.layers = [
            LayerCache(batch, cfg.n_heads, self.max_len, cfg.d_model // cfg.n_heads, device=p.device, dtype=p.dtype)
            for _ in range(cfg.n_layers)
        ]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def advance(self, n: int) -> None:
        for layer in self.layers:
            layer.length += n


class Block(nn.Module):
    """``x + attn(ln1(x))``, then ``x + ffn(ln2(x))``; a sparse block's FFN is the expert
    layer ``moe.name`` built with ``context`` (``moe.model.layers.build_ffn``).  The norms are
    ``model.block``'s (:func:`make_norm`)."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, *, sparse: bool, context: LayerContext | None = None):
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = make_norm(cfg)
        d_ff = moe.expert_d_ff if sparse and moe.name != "dense" and moe.expert_d_ff else cfg.d_ff
        self.ffn = build_ffn(
            moe, cfg.d_model, d_ff, sparse=sparse, activation=cfg.ffn_activation, dropout=cfg.dropout, context=context
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.sparse = sparse and moe.name != "dense"

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> tuple[torch.Tensor, LayerAux | None]:
        x = x + self.drop(self.attn(self.ln1(x), cache))
        h, aux = self.ffn(self.ln2(x))
        return x + self.drop(h), aux


def is_sparse_block(index: int, cfg: ModelConfig) -> bool:
    """Blocks moe_every-1, 2*moe_every-1, ... (0-based) are MoE: moe_every=2 -> every other block."""
    return (index + 1) % cfg.moe_every == 0


class TransformerLM(nn.Module):
    """Decoder-only LM of ``model.block`` blocks.  ``vocab_size`` must be set (the trainer takes it from the tokenizer).

    Args:
        cfg, moe: the model's shape and its expert layer.
        context: what the sparse blocks are built with (``moe.model.layers.LayerContext``): the
            token dispatcher (e.g. ``moe.parallel.AllToAllDispatcher`` over the expert-parallel
            group: each block then holds only its shard of the experts) and a registered
            layer's runtime (``moe=hivemind``'s connection to the swarm).  None: every expert
            local.  Passed in, so this file never touches ``torch.distributed`` or the network.

    With the same seed every process builds the same weights, and an expert shard equals
    the matching slice of the unsharded model's (``GroupedExperts`` draws the full stack).
    """

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, *, context: LayerContext | None = None):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set (the trainer fills it from the tokenizer)")
        self.cfg, self.moe = cfg, moe
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.block == "gpt" else None  # llama: rotary
        self.drop = nn.Dropout(cfg.dropout)

        self.blocks = nn.ModuleList(
            Block(cfg, moe, sparse=is_sparse_block(i, cfg), context=context) for i in range(cfg.n_layers)
        )
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb.weight, std=0.02)
        for name, p in self.named_parameters():  # GPT-2: attention projections at 0.02, output scaled by depth
            if name.endswith("qkv.weight"):
                nn.init.normal_(p, std=0.02)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    def moe_layers(self) -> list[int]:
        """Indices of the blocks whose FFN is sparse."""
        return [i for i, b in enumerate(self.blocks) if b.sparse]

    def forward(
        self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None, *, cache: KVCache | None = None
    ) -> ModelOutput:
        """Logits for ``idx``; with ``cache`` (incremental decoding), ``idx`` are the tokens
        after the ``cache.length`` ones the cache holds, and the cache takes theirs."""
        B, S = idx_BS.shape
        start = 0 if cache is None else cache.length
        limit = self.cfg.seq_len if cache is None else cache.max_len
        if start + S > limit:
            raise ValueError(
                f"sequence of {start + S} tokens is longer than "
                + (f"model.seq_len={limit}" if cache is None else f"the KV cache's {limit}")
            )
        x = self.tok_emb(idx_BS)  # (B, S, D)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + S, device=idx_BS.device))
        x = self.drop(x)
        zero = x.new_zeros((), dtype=torch.float32)
        aux_loss, z_loss, layer_aux = zero, zero, []
        for i, block in enumerate(self.blocks):
            x, aux = block(x, None if cache is None else cache.layers[i])
            if aux is not None:
                layer_aux.append(aux)
                aux_loss = aux_loss + aux.aux_loss
                z_loss = z_loss + aux.z_loss
        if cache is not None:
            cache.advance(S)
        logits = self.lm_head(self.ln_f(x))  # (B, S, V)
        lm_loss = None
        if targets_BS is not None:
            lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_BS.reshape(-1))
        return ModelOutput(logits, lm_loss, aux_loss, z_loss, layer_aux)


def count_parameters(model: TransformerLM) -> dict[str, int]:
    """Parameter counts: total, embedding (token + position), expert, active non-embedding
    per token (the output projection excluded, tied or not), and the output projection's
    size, which every token multiplies whether or not it is tied to the embedding.

    Counts are the whole model's: a module holding a shard of the experts counts all of
    them (``total_experts``), so every expert-parallel size reports the same numbers."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.tok_emb.weight.numel() + (model.pos_emb.weight.numel() if model.pos_emb is not None else 0)
    head = model.lm_head.weight.numel()
    untied_head = 0 if model.cfg.tie_embeddings else head
    expert = active_expert = 0
    for b in model.blocks:
        ex = getattr(b.ffn, "experts", None)
        if ex is not None:
            n_local = sum(p.numel() for p in ex.parameters())
            per_expert = n_local // ex.num_experts
            total += per_expert * (ex.total_experts - ex.num_experts)  # the other ranks' shards
            expert += per_expert * ex.total_experts
            active_expert += per_expert * model.moe.routed_top_k
    non_emb = total - emb - untied_head
    return {
        "total": total,
        "embedding": emb,
        "expert": expert,
        "active_non_embedding": non_emb - expert + active_expert,
        "lm_head_flop_params": head,
    }
