"""The FFN slot of a Transformer block: the dense baseline and the MoE layer, one interface.

Every layer maps ``(..., D) -> ((..., D), LayerAux | None)``; ``build_ffn`` is the registry
that turns ``moe.name`` into a layer, so one config override switches between them.
An MoE layer is a router (parameters), a routing function (pure, ``moe.model.routing``), a
dispatcher (moves tokens, ``moe.model.dispatch``) and grouped experts (``moe.model.experts``).

Shape suffixes: T tokens, E experts, D model dim, F hidden dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from moe.config import MOE_LAYERS, MoEConfig
from moe.model.dispatch import LocalDispatcher
from moe.model.experts import GroupedExperts, activation_fn, small_init_
from moe.model.routing import Routing, base_route, gshard_route, switch_route, topk_route


@dataclass
class LayerAux:
    """What one MoE layer reports for one forward: losses to add, load to log."""

    aux_loss: torch.Tensor  # scalar, load-balancing loss
    z_loss: torch.Tensor  # scalar, router z-loss
    counts_E: torch.Tensor  # assignments per expert (before capacity dropping)
    num_dropped: torch.Tensor  # scalar, assignments dropped by capacity
    num_routed: torch.Tensor  # scalar, assignments routed (tokens x choices kept by the router)


class DenseFFN(nn.Module):
    """``W2·act(W1·x)``: the baseline every MoE is compared to.  Same init as one expert."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "gelu", init_scale: float = 0.1, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.act = activation_fn(activation)
        self.dropout = nn.Dropout(dropout)
        small_init_(self.w1.weight, init_scale, d_model)
        small_init_(self.w2.weight, init_scale, d_ff)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.w2(self.dropout(self.act(self.w1(x)))), None


class Router(nn.Module):
    """Token -> expert logits, always computed in fp32 (Switch's selective precision).

    Multiplicative jitter ``x * U(1-eps, 1+eps)`` on the router input in training (Switch).
    For BASE the weight rows are the expert centroids ``c_e`` and the logits are affinities.
    """

    def __init__(self, d_model: int, num_experts: int, *, jitter_eps: float = 0.0, init_scale: float = 0.1, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight_ED = nn.Parameter(torch.empty(num_experts, d_model, dtype=dtype))
        self.jitter_eps = jitter_eps
        small_init_(self.weight_ED, init_scale, d_model)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = x_TD.to(self.weight_ED.dtype)
            if self.training and self.jitter_eps > 0:
                noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
                x_TD = x_TD * noise
            return x_TD @ self.weight_ED.t()  # (T, E)


class MoELayer(nn.Module):
    """A sparse FFN: router -> routing function -> dispatcher -> grouped experts -> combine.

    Args:
        d_model: D.
        d_ff: F, each expert's hidden size (top-1 experts of the dense FFN's size keep the
            active FLOPs per token equal to the dense model's).
        cfg: the expert layer (``moe.name``: switch, gshard, topk or base).
        activation: expert activation.
        dispatcher: moves tokens to experts; local by default.  Expert parallelism passes a
            ``moe.parallel.AllToAllDispatcher``: the layer then builds only the experts the
            dispatcher's ``expert_shard`` names (the router stays replicated, over all E), and
            BASE balances with the dispatcher's ``balanced_assignment`` (over the whole group).
    """

    def __init__(self, d_model: int, d_ff: int, cfg: MoEConfig, *, activation: str = "gelu", dispatcher=None):
        super().__init__()
        if cfg.name not in ("switch", "gshard", "topk", "base"):
            raise ValueError(f"MoELayer does not implement moe.name={cfg.name!r}")
        self.cfg = cfg
        E = cfg.num_experts
        self.router = Router(d_model, E, jitter_eps=cfg.jitter_eps if cfg.name != "base" else 0.0, init_scale=cfg.init_scale, dtype=getattr(torch, cfg.router_dtype))
        if cfg.name == "base":  # fairseq: orthogonal expert centroids, gain 0.1
            nn.init.orthogonal_(self.router.weight_ED, gain=0.1)
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        first, n_local = self.dispatcher.expert_shard(E)
        self.experts = GroupedExperts(
            n_local, d_model, d_ff, activation=activation, dropout=cfg.expert_dropout, init_scale=cfg.init_scale, first_expert=first, total_experts=E
        )

    def route(self, logits_TE: torch.Tensor) -> Routing:
        c = self.cfg
        cf = None if c.dropless else (c.capacity_factor if self.training else c.eval_capacity_factor)
        if c.name == "switch":
            return switch_route(logits_TE, capacity_factor=cf, min_capacity=c.min_capacity)
        if c.name == "gshard":
            return gshard_route(logits_TE, capacity_factor=cf, min_capacity=c.min_capacity, random_routing=c.random_routing and self.training)
        if c.name == "topk":
            return topk_route(logits_TE, c.top_k, capacity_factor=cf, min_capacity=c.min_capacity, normalize=c.normalize_weights, random_routing=c.random_routing and self.training)
        assignment = self.dispatcher.balanced_assignment(logits_TE.detach()) if self.training else None
        return base_route(logits_TE, training=self.training, assignment_T=assignment)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, LayerAux]:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        routing = self.route(self.router(x_TD))
        x_in, plan = self.dispatcher.dispatch(x_TD, routing)
        if plan.counts is not None:
            y = self.experts.forward_grouped(x_in, plan.counts)
        else:
            y = self.experts.forward_padded(x_in)
        out_TD = self.dispatcher.combine(y, plan)
        aux = LayerAux(routing.aux_loss, routing.z_loss, routing.counts_E.detach(), routing.num_dropped.detach(), routing.counts_E.sum().detach())
        return out_TD.view(shape), aux


def build_ffn(cfg: MoEConfig, d_model: int, d_ff: int, *, sparse: bool, activation: str = "gelu", dropout: float = 0.0, dispatcher=None, dht=None) -> nn.Module:
    """The registry: a block's FFN for ``moe.name`` (dense blocks of an MoE model pass sparse=False;
    ``dispatcher`` goes to the MoE layer: None for local experts; ``dht``: the running
    ``hivemind.DHT`` a ``moe=hivemind`` layer searches and calls experts through)."""
    if cfg.name not in MOE_LAYERS:
        raise ValueError(f"unknown expert layer moe.name={cfg.name!r}; known: {', '.join(MOE_LAYERS)}")
    if cfg.name == "dense" or not sparse:
        return DenseFFN(d_model, d_ff, activation=activation, init_scale=cfg.init_scale, dropout=dropout)
    if cfg.name == "hivemind":
        if dht is None:
            raise ValueError("moe=hivemind needs a running DHT: pass dht= (moe.swarm.server.start_dht; the trainer starts one from moe.initial_peers)")
        from moe.swarm.layer import SwarmMoE  # the swarm room imports hivemind: only when asked for

        return SwarmMoE(
            d_model, dht=dht, uid_prefix=cfg.uid_prefix, grid_size=cfg.grid, k_best=cfg.k_best, k_min=cfg.k_min,
            forward_timeout=cfg.forward_timeout, timeout_after_k_min=cfg.timeout_after_k_min, backward_timeout=cfg.backward_timeout,
            jitter_eps=cfg.jitter_eps, init_scale=cfg.init_scale, router_dtype=getattr(torch, cfg.router_dtype), require_signed=cfg.require_signed,
        )
    return MoELayer(d_model, d_ff, cfg, activation=activation, dispatcher=dispatcher)
