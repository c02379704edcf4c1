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
from moe.model.experts import GroupedExperts, activation_fn, is_gated, small_init_
from moe.model.routing import Routing, base_route, topk_route


@dataclass
class LayerAux:
    """What one MoE layer reports for one forward: losses to add, load to log."""

    aux_loss: torch.Tensor  # scalar, load-balancing loss
    z_loss: torch.Tensor  # scalar, router z-loss
    counts_E: torch.Tensor  # assignments per expert (before capacity dropping)
    num_dropped: torch.Tensor  # scalar, assignments dropped by capacity
    num_routed: torch.Tensor  # scalar, assignments routed (tokens x choices kept by the router)
    expert_bias: torch.Tensor | None = None  # loss-free balancing's bias this forward chose with (a copy)


def top_k_of(cfg: MoEConfig) -> int:
    """Experts each token is routed to: Switch's one, GShard's two, else ``routed_top_k``."""
    return {"switch": 1, "gshard": 2}.get(cfg.name, cfg.routed_top_k)


class DenseFFN(nn.Module):
    """``W2·act(W1·x)`` (gated, SwiGLU: ``W2·(silu(W1·x) * W3·x)``): the baseline every MoE is
    compared to.  Same init as one expert."""

    def __init__(
        self, d_model: int, d_ff: int, *, activation: str = "gelu", init_scale: float = 0.1, dropout: float = 0.0
    ):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False) if is_gated(activation) else None
        self.act = activation_fn(activation)
        self.dropout = nn.Dropout(dropout)
        small_init_(self.w1.weight, init_scale, d_model)
        small_init_(self.w2.weight, init_scale, d_ff)
        if self.w3 is not None:
            small_init_(self.w3.weight, init_scale, d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = self.act(self.w1(x))
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(self.dropout(h)), None


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
    """A sparse FFN: router -> routing function -> dispatcher -> grouped experts -> combine,
    plus the always-on shared experts when there are any.

    Args:
        d_model: D.
        d_ff: F, the experts' hidden size before fine-grained splitting (top-1 experts of the
            dense FFN's size keep the active FLOPs per token equal to the dense model's); each
            routed expert is ``F / moe.granularity`` wide.
        cfg: the expert layer (``moe.name``: switch, gshard, topk, deepseek or base) and its
            options (``deepseek`` is top-k routing; its preset turns the DeepSeek options on).
        activation: expert activation (``swiglu``: gated experts with a third matrix).
        dispatcher: moves tokens to experts; local by default.  Expert parallelism passes a
            ``moe.parallel.AllToAllDispatcher``: the layer then builds only the experts the
            dispatcher's ``expert_shard`` names (the router stays replicated, over all E), and
            BASE balances with the dispatcher's ``balanced_assignment`` (over the whole group).

    Fine-grained experts (DeepSeekMoE, ``moe.granularity=m``): ``m * num_experts`` experts of
    ``F / m``, each token sent to ``m * top_k`` of them: the active FLOPs of ``top_k`` unsplit
    experts.  Shared experts (``moe.num_shared_experts=S``): one dense FFN of ``S * F / m``
    (S experts of the routed size side by side), applied to every token and added to the routed
    sum; its weights are ordinary replicated weights (all-reduced under data parallelism, never
    sharded).  Loss-free balancing (``moe.bias_update_rate > 0``): ``expert_bias_E``, a buffer
    saved with the weights, is added to the router scores to choose experts (never to the
    combine weights); each training forward adds its loads to ``step_load_E`` and the trainer
    calls :func:`update_expert_bias` once per optimizer step.
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
        if cfg.name not in ("switch", "gshard", "topk", "deepseek", "base"):
            raise ValueError(f"MoELayer does not implement moe.name={cfg.name!r}")
        if d_ff % cfg.granularity:
            raise ValueError(f"moe.granularity={cfg.granularity} does not divide the experts' d_ff={d_ff}")
        self.cfg = cfg
        E, d_expert = cfg.routed_experts, d_ff // cfg.granularity
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
            d_expert,
            activation=activation,
            dropout=cfg.expert_dropout,
            init_scale=cfg.init_scale,
            first_expert=first,
            total_experts=E,
            gemm=cfg.gemm,
        )
        # built after the routed experts: without shared experts every draw is as it was
        self.shared = None
        if cfg.num_shared_experts:
            self.shared = DenseFFN(
                d_model, cfg.num_shared_experts * d_expert, activation=activation, init_scale=cfg.init_scale
            )
        self.step_load_E: torch.Tensor | None = None  # this rank's loads since the last bias update (not saved)
        bias = torch.zeros(E, dtype=torch.float32) if cfg.bias_update_rate > 0 else None
        self.register_buffer("expert_bias_E", bias)  # None: no bias, nothing in the state dict

    def route(self, logits_TE: torch.Tensor, seq_len: int | None = None) -> Routing:
        c = self.cfg
        cf = None if c.dropless else (c.capacity_factor if self.training else c.eval_capacity_factor)
        aux_seq_len = seq_len if c.aux_loss_type == "sequence" else None
        if c.name in ("switch", "gshard", "topk", "deepseek"):
            k = top_k_of(c)
            return topk_route(
                logits_TE,
                k,
                capacity_factor=cf,
                min_capacity=c.min_capacity,
                normalize=c.name == "gshard" or (c.name in ("topk", "deepseek") and c.normalize_weights),
                random_routing=c.name != "switch" and c.random_routing and self.training,
                aux_first_choice_only=c.name == "gshard",
                score_func=c.score_func,
                bias_E=self.expert_bias_E,
                route_scale=c.route_scale,
                n_groups=c.n_groups,
                topk_groups=c.topk_groups,
                aux_seq_len=aux_seq_len,
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
        if self.cfg.aux_loss_type == "sequence" and x.dim() != 3:
            raise ValueError(
                f"moe.aux_loss_type=sequence needs the layer's input as (batch, sequence, d_model), got shape "
                f"{tuple(shape)}; pass whole sequences or use aux_loss_type=batch"
            )
        routing = self.route(self.router(x_TD), seq_len=shape[-2] if x.dim() == 3 else None)
        x_in, plan = self.dispatcher.dispatch(x_TD, routing)
        if plan.counts is not None:
            y = self.experts.forward_grouped(x_in, plan.counts)
        else:
            y = self.experts.forward_padded(x_in)
        out_TD = self.dispatcher.combine(y, plan)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)[0]
        counts_E = routing.counts_E.detach()
        if self.expert_bias_E is not None and self.training:
            self.step_load_E = counts_E if self.step_load_E is None else self.step_load_E + counts_E
        aux = LayerAux(
            routing.aux_loss,
            routing.z_loss,
            counts_E,
            routing.num_dropped.detach(),
            routing.counts_E.sum().detach(),
            None if self.expert_bias_E is None else self.expert_bias_E.clone(),
        )
        return out_TD.view(shape), aux


def update_expert_bias(model: nn.Module, sum_over_ranks_: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Loss-free balancing's step (Wang et al. 2024, DeepSeek-V3): for every MoE layer with an
    expert bias, ``bias += rate * sign(mean(load) - load)``, the load being the assignments each
    expert received since the last update, summed by ``sum_over_ranks_`` (in place) over every
    rank that routes tokens to the same experts, so every rank moves its copy of the bias alike.
    Underloaded experts gain, overloaded ones lose, balanced ones stay.  Call once per optimizer
    step on every rank (collective when ``sum_over_ranks_`` is); returns the layers updated."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer) and m.expert_bias_E is not None]
    if not layers:
        return 0
    loads_LE = torch.stack(
        [m.step_load_E if m.step_load_E is not None else torch.zeros_like(m.expert_bias_E) for m in layers]
    ).to(torch.float32)
    loads_LE = sum_over_ranks_(loads_LE)
    with torch.no_grad():
        for m, load_E in zip(layers, loads_LE):
            m.expert_bias_E.add_(m.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E))
            m.step_load_E = None
    return len(layers)


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
register_expert_layer("deepseek", ExpertLayer(_build_moe_layer))  # topk with moe/conf/moe/deepseek.yaml's options
register_expert_layer("base", ExpertLayer(_build_moe_layer))
