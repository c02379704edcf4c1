"""The FFN slot of a Transformer block: the dense baseline and the MoE layer, one interface.

Every layer maps ``(..., D) -> ((..., D), LayerAux | None)``.  A registry of expert layers
turns ``moe.name`` into a layer (:func:`build_ffn`), so one config override switches between
them.  The five built in here register below; a layer defined elsewhere registers itself
with :func:`register_expert_layer`, or through the ``moe.expert_layers`` entry-point group of
its distribution (the swarm's ``hivemind`` layer does: ``moe.swarm.layer``), so this package
never imports it.

An MoE layer is a router (parameters), a routing function (pure, ``moe.model.routing``), a
dispatcher (moves tokens, ``moe.model.dispatch``) and grouped experts (``moe.model.experts``).

Shape suffixes: T tokens, E experts, D model dim, F hidden dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
import torch.nn as nn

from moe.config import ModelConfig, MoEConfig
from moe.model.dispatch import LocalDispatcher, TokenDispatcher
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

    def __init__(
        self, d_model: int, d_ff: int, *, activation: str = "gelu", init_scale: float = 0.1, dropout: float = 0.0
    ):
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

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        jitter_eps: float = 0.0,
        init_scale: float = 0.1,
        dtype: torch.dtype = torch.float32,
    ):
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

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        cfg: MoEConfig,
        *,
        activation: str = "gelu",
        dispatcher: TokenDispatcher | None = None,
    ):
        super().__init__()
        if cfg.name not in ("switch", "gshard", "topk", "base"):
            raise ValueError(f"MoELayer does not implement moe.name={cfg.name!r}")
        self.cfg = cfg
        E = cfg.num_experts
        self.router = Router(
            d_model,
            E,
            jitter_eps=cfg.jitter_eps if cfg.name != "base" else 0.0,
            init_scale=cfg.init_scale,
            dtype=getattr(torch, cfg.router_dtype),
        )
        if cfg.name == "base":  # fairseq: orthogonal expert centroids, gain 0.1
            nn.init.orthogonal_(self.router.weight_ED, gain=0.1)
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        first, n_local = self.dispatcher.expert_shard(E)
        self.experts = GroupedExperts(
            n_local,
            d_model,
            d_ff,
            activation=activation,
            dropout=cfg.expert_dropout,
            init_scale=cfg.init_scale,
            first_expert=first,
            total_experts=E,
        )

    def route(self, logits_TE: torch.Tensor) -> Routing:
        c = self.cfg
        cf = None if c.dropless else (c.capacity_factor if self.training else c.eval_capacity_factor)
        if c.name == "switch":
            return switch_route(logits_TE, capacity_factor=cf, min_capacity=c.min_capacity)
        if c.name == "gshard":
            return gshard_route(
                logits_TE,
                capacity_factor=cf,
                min_capacity=c.min_capacity,
                random_routing=c.random_routing and self.training,
            )
        if c.name == "topk":
            return topk_route(
                logits_TE,
                c.top_k,
                capacity_factor=cf,
                min_capacity=c.min_capacity,
                normalize=c.normalize_weights,
                random_routing=c.random_routing and self.training,
            )
        assignment = None
        if self.training:
            # A diverged step's NaN/inf affinities: any balanced assignment will do (the NaN reaches
            # the loss through the gates, and the trainer stops every rank together there), so the
            # auction, which refuses non-finite scores, sees zeros in their place.  No host sync.
            scores = logits_TE.detach()
            assignment = self.dispatcher.balanced_assignment(torch.where(torch.isfinite(scores), scores, 0.0))
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
        aux = LayerAux(
            routing.aux_loss,
            routing.z_loss,
            routing.counts_E.detach(),
            routing.num_dropped.detach(),
            routing.counts_E.sum().detach(),
        )
        return out_TD.view(shape), aux


# ---------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class LayerContext:
    """What the sparse blocks of one model are built with beyond their config.

    Attributes:
        dispatcher: moves tokens to the experts; None: every expert in this process.  Expert
            parallelism passes an all-to-all dispatcher (``moe.parallel.dispatch``), and the
            layer then builds only the experts it names.
        runtime: what a registered layer that needs one shares across the model's blocks,
            from its :attr:`ExpertLayer.start_runtime` (``moe=hivemind``: this process's
            connection to the swarm); None for the layers built in here.
    """

    dispatcher: TokenDispatcher | None = None
    runtime: Any = None


@dataclass(frozen=True)
class ExpertLayer:
    """An expert layer a config can name with ``moe.name``.

    Attributes:
        build: ``build(d_model, d_ff, moe, *, activation, context) -> nn.Module``, the FFN of a
            sparse block (``context`` a :class:`LayerContext`).
        start_runtime: ``start_runtime(moe, model) -> runtime`` for a layer whose blocks share a
            resource that must be started before the model is built and closed after the run
            (the runtime has ``close()``); None: nothing to start.
    """

    build: Callable[..., nn.Module]
    start_runtime: Callable[[MoEConfig, ModelConfig], Any] | None = None


ENTRY_POINT_GROUP = "moe.expert_layers"  # distributions register layers here: name = "module:ExpertLayer object"
_EXPERT_LAYERS: dict[str, ExpertLayer] = {}  # name -> layer, filled at import by register_expert_layer


def register_expert_layer(name: str, layer: ExpertLayer) -> ExpertLayer:
    """Make ``moe.name=<name>`` build ``layer``.  A name registers once (a second
    registration of another layer is a ValueError)."""
    known = _EXPERT_LAYERS.get(name)
    if known is not None and known is not layer:
        raise ValueError(f"expert layer {name!r} is registered already")
    _EXPERT_LAYERS[name] = layer
    return layer


def expert_layer(name: str) -> ExpertLayer:
    """The layer registered as ``name``: built in, registered in this process, or found in
    the ``moe.expert_layers`` entry points of an installed distribution (loaded on first use)."""
    if name not in _EXPERT_LAYERS:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
            register_expert_layer(name, ep.load())
    if name not in _EXPERT_LAYERS:
        raise ValueError(f"unknown expert layer moe.name={name!r}; known: {', '.join(expert_layer_names())}")
    return _EXPERT_LAYERS[name]


def expert_layer_names() -> list[str]:
    """Every layer name a config can use: registered ones and installed entry points."""
    return sorted({*_EXPERT_LAYERS, *(ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))})


def start_runtime(moe: MoEConfig, model: ModelConfig) -> Any:
    """Start what ``moe.name``'s blocks share (its :attr:`ExpertLayer.start_runtime`); None for
    a layer that needs nothing.  The caller closes what it gets (``close()``)."""
    start = expert_layer(moe.name).start_runtime
    return start(moe, model) if start is not None else None


def build_ffn(
    cfg: MoEConfig,
    d_model: int,
    d_ff: int,
    *,
    sparse: bool,
    activation: str = "gelu",
    dropout: float = 0.0,
    context: LayerContext | None = None,
) -> nn.Module:
    """A block's FFN: the dense FFN for dense blocks (``sparse=False``) and for ``moe=dense``,
    else the expert layer registered as ``moe.name``, built with ``context``."""
    layer = expert_layer(cfg.name)  # an unknown name fails here, for dense blocks too
    if cfg.name == "dense" or not sparse:
        return DenseFFN(d_model, d_ff, activation=activation, init_scale=cfg.init_scale, dropout=dropout)
    return layer.build(d_model, d_ff, cfg, activation=activation, context=context or LayerContext())


def _build_moe_layer(d_model: int, d_ff: int, cfg: MoEConfig, *, activation: str, context: LayerContext) -> MoELayer:
    return MoELayer(d_model, d_ff, cfg, activation=activation, dispatcher=context.dispatcher)


def _build_dense(d_model: int, d_ff: int, cfg: MoEConfig, *, activation: str, context: LayerContext) -> DenseFFN:
    return DenseFFN(d_model, d_ff, activation=activation, init_scale=cfg.init_scale)


register_expert_layer("dense", ExpertLayer(_build_dense))
register_expert_layer("switch", ExpertLayer(_build_moe_layer))
register_expert_layer("gshard", ExpertLayer(_build_moe_layer))
register_expert_layer("topk", ExpertLayer(_build_moe_layer))
register_expert_layer("base", ExpertLayer(_build_moe_layer))
