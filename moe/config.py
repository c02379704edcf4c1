"""Typed configuration: one dataclass per Hydra group, validated before anything runs.

Hydra's ``DictConfig`` stops at the entry point (``moe.cli.train``); the package only ever sees
these dataclasses, so every component can be built in a test without Hydra.  ``validate``
collects the first problem as a :class:`ConfigError` whose message names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

MOE_LAYERS = ("dense", "switch", "gshard", "topk", "deepseek", "base", "hivemind")  # moe.name


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key and the fix."""


@dataclass
class ModelConfig:
    """Decoder-only Transformer shape."""

    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024  # hidden size of the dense FFN and of each expert
    vocab_size: int = 0  # 0: taken from the tokenizer
    seq_len: int = 128
    dropout: float = 0.0
    moe_every: int = 2  # every `moe_every`-th block (1-based: blocks moe_every, 2*moe_every, ...) is MoE
    tie_embeddings: bool = True
    activation: str = "auto"  # auto (the block's: gelu for gpt, swiglu for llama) | gelu | relu | silu | swiglu
    block: str = "gpt"  # gpt: LayerNorm, learned positions | llama: RMSNorm, rotary positions, SwiGLU
    rope_theta: float = 10000.0  # llama: rotary base (Su et al. 2021; Llama uses 10000)
    norm_eps: float = 1e-5  # LayerNorm / RMSNorm epsilon

    @property
    def ffn_activation(self) -> str:
        """The FFNs' and experts' activation: ``activation``, or the block's own when ``auto``."""
        if self.activation != "auto":
            return self.activation
        return BLOCK_ACTIVATION.get(self.block, "gelu")


BLOCK_ACTIVATION = {"gpt": "gelu", "llama": "swiglu"}  # model.activation=auto


@dataclass
class SwarmConfig:
    """``moe=hivemind``: experts on other peers, found through hivemind's DHT (``moe.swarm.*``;
    the other layers ignore it)."""

    grid: list[int] = field(default_factory=lambda: [8, 8])  # product-key grid; E = prod(grid)
    k_best: int = 4  # experts per token found by the search (Learning@home: 4); = moe.top_k
    k_min: int = 1  # replies a token waits for before the straggler timeout starts
    forward_timeout: float = 30.0  # seconds a forward waits for expert replies at most
    timeout_after_k_min: float = 1.0  # seconds for stragglers once every token has k_min replies
    backward_timeout: float = 30.0  # seconds a backward waits for expert gradients at most
    uid_prefix: str = "ffn"  # experts are <uid_prefix>.<i>.<j>; every sparse block calls this grid
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of the swarm (moe-join prints one)
    host_maddrs: list[str] = field(
        default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"]
    )  # where the trainer's DHT peer listens
    require_signed: bool = True  # find and call experts through signed declarations only (moe.swarm.records)
    trusted_keys: list[str] = field(
        default_factory=list
    )  # call only servers with these key fingerprints (moe-join prints its own); empty: any
    max_reply_scale: float = (
        1000.0  # refuse (and drop the server of) a reply or gradient over this many times the largest value sent
    )


@dataclass
class MoEConfig:
    """The expert layer. ``name`` picks the router family; one override switches it."""

    name: str = "switch"  # dense | switch | gshard | topk | base
    num_experts: int = 8
    top_k: int = 1
    expert_d_ff: int = 0  # each expert's hidden size; 0: model.d_ff (top-2 at d_ff/2 keeps dense FLOPs)
    capacity_factor: float = 1.25  # capacity = max(min_capacity, ceil(cf * k * T / E))
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    dropless: bool = False  # True: every token reaches its experts, no capacity
    aux_loss_weight: float = 0.01  # weight of the load-balancing loss E * sum_i f_i P_i
    z_loss_weight: float = 0.0  # weight of the router z-loss mean(logsumexp(logits)^2)
    jitter_eps: float = 0.0  # multiplicative router-input noise U(1-eps, 1+eps) in training
    expert_dropout: float = 0.0  # dropout on the expert hidden activation
    init_scale: float = 0.1  # Switch small-scale init: truncated normal, std sqrt(s / fan_in)
    random_routing: bool = False  # GShard: keep the 2nd expert with probability min(1, 2 g2)
    normalize_weights: bool = True  # renormalise the k gate values to sum to 1 (k > 1)
    router_dtype: str = "float32"  # selective precision: the router always runs in fp32
    gemm: str = (
        "auto"  # dropless experts' matmul: loop (ours) | grouped_mm (torch._grouped_mm) | auto (CUDA bf16: grouped_mm)
    )
    # -- DeepSeekMoE / DeepSeek-V3 (docs/layers.md): fine-grained, shared, sigmoid, loss-free, grouped
    score_func: str = (
        "softmax"  # topk: softmax | sigmoid (each expert's own sigmoid; gates renormalised over the k > 1)
    )
    route_scale: float = 1.0  # topk: factor on the combine weights after renormalisation
    bias_update_rate: float = 0.0  # loss-free balancing: per step bias += rate * sign(mean load - load); 0: off
    aux_loss_type: str = "batch"  # batch | sequence: the balancing loss over the batch or within each sequence
    granularity: int = 1  # m: each expert split into m of (expert_d_ff or d_ff)/m, m*top_k of them routed
    num_shared_experts: int = 0  # always-on experts beside the routed ones, each the size of a routed expert
    n_groups: int = 1  # group-limited routing: the routed experts in n_groups groups of consecutive experts
    topk_groups: int = 1  # ... each token chooses among its best topk_groups groups (n_groups=1: no limit)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)  # moe=hivemind only: the remote experts

    @property
    def routed_experts(self) -> int:
        """Experts the router chooses among: ``num_experts * granularity``."""
        return self.num_experts * self.granularity

    @property
    def routed_top_k(self) -> int:
        """Experts each token is sent to: ``top_k * granularity`` (the same FLOPs as ``top_k``
        experts of the unsplit size)."""
        return self.top_k * self.granularity

    def routed_d_ff(self, d_ff: int) -> int:
        """Each routed expert's hidden size, for a model whose FFN is ``d_ff`` wide."""
        return (self.expert_d_ff or d_ff) // self.granularity


# Seconds ahead a record of a swarm may expire; every peer of the run refuses longer-lived ones, so
# no peer can pin a declaration over an honest server's re-declarations (moe.swarm.records).
MAX_RECORD_LIFETIME = 600.0

# The swarm's keys sat directly under moe. (moe.grid, ...) before they had their own node.
SWARM_KEYS = tuple(f.name for f in dataclasses.fields(SwarmConfig))


def upgrade_config_dict(d: dict) -> dict:
    """A config dict as an older version of this package wrote it (a checkpoint's), in today's
    layout: the swarm's keys move from ``moe.<key>`` to ``moe.swarm.<key>``.  A copy; the
    argument is left as it is."""
    out = dict(d)
    moe = out.get("moe")
    if isinstance(moe, dict) and any(k in moe for k in SWARM_KEYS):
        moe = dict(moe)
        swarm = dict(moe.get("swarm") or {})
        for k in SWARM_KEYS:
            if k in moe:
                swarm.setdefault(k, moe.pop(k))
        moe["swarm"] = swarm
        out["moe"] = moe
    return out


def resolved_config_dict(d: dict) -> dict:
    """A config dict with its ``auto`` values spelled out (``model.activation=auto`` -> the
    block's own), so two configs that build the same model compare equal.  A copy."""
    model = d.get("model")
    if not isinstance(model, dict) or model.get("activation", "auto") != "auto":
        return d
    model = {**model, "activation": BLOCK_ACTIVATION.get(model.get("block", "gpt"), "gelu")}
    return {**d, "model": model}


@dataclass
class DataConfig:
    """Where tokens come from.

    ``path`` empty means the embedded default corpus (the standard library's .py files).
    Otherwise a text file, a folder of text files, or a pre-tokenized ``.bin`` of uint16/uint32.
    """

    path: str = ""
    tokenizer: str = "bpe"  # bpe (byte-level BPE trained on the train split) | byte (256 ids)
    vocab_size: int = 4096
    val_fraction: float = 0.05  # by file, deterministically
    extensions: list[str] = field(default_factory=lambda: [".py", ".txt", ".md", ".rst"])
    on_bad_file: str = "error"  # error | skip  (empty, unreadable or non-UTF-8 files)
    max_files: int = 0  # 0: all files
    cache_dir: str = ""  # empty: $XDG_CACHE_HOME/moe or ~/.cache/moe
    bin_dtype: str = "uint16"  # for a pre-tokenized .bin


@dataclass
class OptimConfig:
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 40
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    # The experts' learning rate as a multiple of lr (their weight decay scales with it, as
    # AdamW's does).  Each expert learns from about top_k/E of the tokens, so its gradient is
    # noisier than a shared weight's, while Adam's step is the same size.
    expert_lr_scale: float = 1.0


@dataclass
class LoggerConfig:
    console: bool = True
    jsonl: bool = True
    wandb: bool = True
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "moe"
    wandb_entity: str = ""
    log_every: int = 10
    progress: bool = True


PARALLEL_BACKENDS = ("single", "ddp", "deepspeed", "ray")
DIST_BACKENDS = ("auto", "gloo", "nccl")
# How to start a multi-process run; the one-line errors below point here.
TORCHRUN = "torchrun --nproc_per_node N --no-python moe-train parallel=ddp ..."
DEEPSPEED = "deepspeed --num_gpus N --no_local_rank $(which moe-train) parallel=deepspeed ..."
LAUNCHERS = {"ddp": TORCHRUN, "deepspeed": DEEPSPEED}
# The pip extra each backend's package comes with (named in the error when it is missing).
BACKEND_PACKAGES = {"deepspeed": ("deepspeed", "deepspeed"), "ray": ("ray.train", "ray")}


@dataclass
class ParallelConfig:
    """How the run is spread over processes.

    ``single``: one process.  ``ddp``: one process per rank started by ``torchrun`` (its
    environment gives each process its rank), data parallel over all ranks, experts sharded
    over groups of ``ep_size`` consecutive ranks.  ``deepspeed``: the same layout started by
    the ``deepspeed`` launcher, the model wrapped in DeepSpeed's engine (ZeRO stage
    ``zero_stage``, pipeline stages ``pp_size``).  ``ray``: ``moe-train`` is the driver and
    Ray Train runs ``num_workers`` ranks (on this machine, or on the cluster at
    ``ray_address``).
    """

    backend: str = "single"  # single | ddp (torchrun) | deepspeed (deepspeed launcher) | ray (Ray Train)
    ep_size: int = 1  # expert-parallel size: ranks that together hold all experts
    pp_size: int = 1  # pipeline stages (deepspeed only)
    zero_stage: int = 0  # DeepSpeed ZeRO stage: 0, 1 or 2 (deepspeed only)
    num_workers: int = 2  # Ray Train workers, one rank each (ray only)
    cpus_per_worker: int = 1  # CPUs Ray reserves per worker (ray only)
    use_gpu: bool = False  # one GPU per Ray worker (ray only)
    ray_address: str = "local"  # local: a private Ray on this machine; auto or ray://HOST:10001: a cluster
    bucket_mb: float = (
        8.0  # gradient all-reduce buckets sent during the backward (ddp, ray); 0: one all-reduce after it
    )
    dist_backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    timeout_s: float = 600.0  # a collective waiting longer than this fails the run (a rank crashed or hangs)


@dataclass
class TrainConfig:
    """Everything a run needs; passed whole to the trainer."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run_name: str = "default"
    out_dir: str = "runs/default"
    seed: int = 1337
    steps: int = 400
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    resume: bool = True  # continue from out_dir/checkpoint.pt when it exists
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 autocast on CUDA) | float32 | bfloat16
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    peak_flops: float = 0.0  # 0: measured at start-up by a short matmul benchmark
    init_from: str = ""  # a dense run (dir or checkpoint.pt) to start from: sparse upcycling (moe.training.upcycle)


# ---------------------------------------------------------------------------------------------
# dict -> dataclass, with unknown keys and wrong types reported by their dotted path


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a group of keys, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _unknown_key(cls: type, k: str, prefix: str) -> ConfigError:
    names = sorted(f.name for f in dataclasses.fields(cls))
    close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.6) or [n for n in names if n.startswith(str(k)[:3])]
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return ConfigError(f"{prefix}{k}: unknown key{hint}; known keys: {', '.join(names)}")


def check_key(path: str, cls: type | None = None) -> None:
    """``model.d_model`` exists in TrainConfig; ``model.foo`` is a ConfigError naming it (for overrides)."""
    tp: Any = TrainConfig if cls is None else cls
    parts = path.split(".")
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(
                f"{path}: {prefix} is a single value, not a group of keys; set it directly ({prefix}=...)"
            )
        if part not in {f.name for f in dataclasses.fields(tp)}:
            raise _unknown_key(tp, part, prefix + "." if prefix else "")
        tp = typing.get_type_hints(tp)[part]


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain dict; unknown keys are an error naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise _unknown_key(cls, k, prefix)
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"a.b.c": leaf}``: the form that config diffs are shown in."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# validation: one check, one line


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate_moe(m: MoEConfig) -> None:
    _check(
        m.name in MOE_LAYERS,
        f"moe.name={m.name!r} is not a known expert layer; use one of {', '.join(MOE_LAYERS)} (e.g. moe=switch)",
    )
    if m.name == "hivemind":  # first: its num_experts and top_k follow from moe.swarm's grid and k_best
        validate_swarm(m)
    _check(m.num_experts >= 1, f"moe.num_experts={m.num_experts} must be >= 1")
    _check(m.top_k >= 1, f"moe.top_k={m.top_k} must be >= 1")
    _check(
        m.gemm in ("auto", "loop", "grouped_mm"),
        f"moe.gemm={m.gemm!r}; use auto (torch's grouped GEMM on CUDA in bf16, else ours), loop or grouped_mm",
    )
    _check(
        m.top_k <= m.num_experts,
        f"moe.top_k={m.top_k} > moe.num_experts={m.num_experts}: a token cannot pick more "
        "experts than exist; lower moe.top_k or raise moe.num_experts",
    )
    _check(
        m.capacity_factor > 0,
        f"moe.capacity_factor={m.capacity_factor} must be > 0 (1.0-1.25 is typical; use "
        "moe.dropless=true for no capacity limit)",
    )
    _check(m.eval_capacity_factor > 0, f"moe.eval_capacity_factor={m.eval_capacity_factor} must be > 0")
    _check(m.expert_d_ff >= 0, f"moe.expert_d_ff={m.expert_d_ff} must be >= 0 (0: the model's d_ff)")
    _check(m.min_capacity >= 0, f"moe.min_capacity={m.min_capacity} must be >= 0")
    _check(m.aux_loss_weight >= 0, f"moe.aux_loss_weight={m.aux_loss_weight} must be >= 0")
    _check(m.z_loss_weight >= 0, f"moe.z_loss_weight={m.z_loss_weight} must be >= 0")
    _check(0 <= m.jitter_eps < 1, f"moe.jitter_eps={m.jitter_eps} must be in [0, 1)")
    _check(0 <= m.expert_dropout < 1, f"moe.expert_dropout={m.expert_dropout} must be in [0, 1)")
    _check(m.init_scale > 0, f"moe.init_scale={m.init_scale} must be > 0 (Switch uses 0.1)")
    _check(
        m.router_dtype in ("float32", "float64"),
        f"moe.router_dtype={m.router_dtype!r}: the router runs in float32 (or float64); lower "
        "precision makes routing unstable; set moe.router_dtype=float32",
    )
    if m.name == "switch":
        _check(
            m.top_k == 1, f"moe.top_k={m.top_k}: switch routes each token to exactly one expert; use moe=topk for k > 1"
        )
    if m.name == "gshard":
        _check(m.top_k == 2, f"moe.top_k={m.top_k}: gshard is top-2 routing; use moe=topk for other k")
    if m.name == "base":
        _check(m.top_k == 1, f"moe.top_k={m.top_k}: base assigns each token to exactly one expert; set moe.top_k=1")
    validate_modern(m)


ROUTED_LAYERS = ("switch", "gshard", "topk", "deepseek")  # the layers routing by router scores and top-k
TOPK_LAYERS = ("topk", "deepseek")  # general top-k routing: deepseek is topk with DeepSeek's options on


def validate_modern(m: MoEConfig) -> None:
    """The DeepSeekMoE / DeepSeek-V3 options: which layers take them, and their ranges."""

    def only(ok: bool, what: str, layers: str, fix: str) -> None:
        _check(ok, f"{what}: moe={m.name} does not take it ({layers} only); {fix}")

    _check(m.score_func in ("softmax", "sigmoid"), f"moe.score_func={m.score_func!r}; use softmax or sigmoid")
    only(
        m.score_func == "softmax" or m.name in TOPK_LAYERS,
        f"moe.score_func={m.score_func}",
        "moe=topk, moe=deepseek",
        "use moe=topk (or the preset moe=deepseek)",
    )
    _check(m.route_scale > 0 and math.isfinite(m.route_scale), f"moe.route_scale={m.route_scale} must be > 0")
    _check(
        m.score_func != "sigmoid" or not m.normalize_weights or m.routed_top_k > 1,
        "moe.score_func=sigmoid with one expert per token: its renormalised gate is always 1, so the router "
        "would learn nothing through it; route to 2 or more (moe.top_k, moe.granularity) or set "
        "moe.normalize_weights=false",
    )
    only(
        m.route_scale == 1.0 or m.name in TOPK_LAYERS,
        f"moe.route_scale={m.route_scale}",
        "moe=topk, moe=deepseek",
        "use moe=topk",
    )
    _check(
        m.bias_update_rate >= 0 and math.isfinite(m.bias_update_rate),
        f"moe.bias_update_rate={m.bias_update_rate} must be >= 0 (DeepSeek-V3: 0.001; 0 turns the expert bias off)",
    )
    only(
        m.bias_update_rate == 0 or m.name in ROUTED_LAYERS,
        f"moe.bias_update_rate={m.bias_update_rate}",
        ", ".join(ROUTED_LAYERS),
        "set moe.bias_update_rate=0",
    )
    _check(m.aux_loss_type in ("batch", "sequence"), f"moe.aux_loss_type={m.aux_loss_type!r}; use batch or sequence")
    only(
        m.aux_loss_type == "batch" or m.name in ROUTED_LAYERS,
        "moe.aux_loss_type=sequence",
        ", ".join(ROUTED_LAYERS),
        "set moe.aux_loss_type=batch",
    )
    _check(m.granularity >= 1, f"moe.granularity={m.granularity} must be >= 1 (1: experts of the full size)")
    only(
        m.granularity == 1 or m.name in TOPK_LAYERS,
        f"moe.granularity={m.granularity}",
        "moe=topk, moe=deepseek",
        "use moe=topk (m*k experts per token) or moe=deepseek",
    )
    _check(m.num_shared_experts >= 0, f"moe.num_shared_experts={m.num_shared_experts} must be >= 0")
    only(
        m.num_shared_experts == 0 or m.name in (*ROUTED_LAYERS, "base"),
        f"moe.num_shared_experts={m.num_shared_experts}",
        ", ".join((*ROUTED_LAYERS, "base")),
        "set moe.num_shared_experts=0",
    )
    _check(
        1 <= m.topk_groups <= m.n_groups,
        f"moe.topk_groups={m.topk_groups} must be in [1, moe.n_groups={m.n_groups}]",
    )
    if m.n_groups > 1:
        only(
            m.name in TOPK_LAYERS,
            f"moe.n_groups={m.n_groups}",
            "moe=topk, moe=deepseek",
            "use moe=topk or set moe.n_groups=1",
        )
        E, k = m.routed_experts, m.routed_top_k
        _check(
            E % m.n_groups == 0,
            f"moe.n_groups={m.n_groups} does not divide the {E} routed experts; pick a divisor "
            "(under expert parallelism: a multiple of parallel.ep_size, so a group is on one rank)",
        )
        _check(
            k <= m.topk_groups * (E // m.n_groups),
            f"moe.topk_groups={m.topk_groups} groups of {E // m.n_groups} experts hold fewer than the "
            f"{k} experts a token is sent to; raise moe.topk_groups",
        )


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_MADDR = re.compile(
    r"^/(?:ip4/(?P<ip4>[0-9.]+)|ip6/(?P<ip6>[0-9a-fA-F:.]+)|dns[46]?/(?P<dns>[A-Za-z0-9.-]+))"
    r"/(?:tcp|udp)/(?P<port>[0-9]+)(?:/quic(?:-v1)?)?(?:/p2p/(?P<peer>[" + _B58 + r"]+))?$"
)


def check_multiaddr(addr: str, *, need_peer: bool = True) -> str | None:
    """Why ``addr`` is not a peer multiaddr hivemind can dial, or None.  Syntax only, no
    network (and no hivemind import): ``/ip4/1.2.3.4/tcp/PORT/p2p/PEER_ID``, the ip6 and dns
    forms, tcp or udp/quic; ``need_peer``: the ``/p2p/<peer id>`` part is required."""
    m = _MADDR.match(addr) if isinstance(addr, str) else None
    if m is None:
        return "not a multiaddr like /ip4/127.0.0.1/tcp/31337/p2p/Qm... (copy the whole address a peer prints)"
    if m["ip4"] is not None:
        parts = m["ip4"].split(".")
        if len(parts) != 4 or not all(p.isdigit() and int(p) <= 255 for p in parts):
            return f"{m['ip4']} is not an IPv4 address"
    if not 0 <= int(m["port"]) <= 65535:
        return f"port {m['port']} is out of range (0-65535)"
    if need_peer and not m["peer"]:
        return "it has no /p2p/<peer id> part; copy the whole address a peer prints"
    if m["peer"] and not _is_peer_id(m["peer"]):
        peer = m["peer"]
        return (
            f"{peer} is not a peer id (a base58 multihash, like the 12D3KooW... a peer prints); copy the whole address"
        )
    return None


def _is_peer_id(text: str) -> bool:
    """A libp2p peer id: base58 of a multihash (code, digest length, digest), e.g. Qm... (sha2-256)
    or 12D3KooW... (the identity hash of a public key)."""
    n = 0
    for ch in text:
        n = n * 58 + _B58.index(ch)
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    raw = b"\0" * (len(text) - len(text.lstrip("1"))) + raw  # base58's leading '1's are zero bytes

    def varint(i: int) -> tuple[int, int] | None:
        value = shift = 0
        while i < len(raw):
            b = raw[i]
            value |= (b & 0x7F) << shift
            i += 1
            if not b & 0x80:
                return value, i
            shift += 7
        return None

    code = varint(0)
    length = varint(code[1]) if code else None
    return bool(length) and code[0] in (0x00, 0x12) and length[0] == len(raw) - length[1] > 0


def validate_swarm(m: MoEConfig) -> None:
    """The ``moe=hivemind`` fields (``moe.swarm.*``): grid, k_best/k_min, timeouts, prefix, peer addresses."""
    s = m.swarm
    _check(
        len(s.grid) >= 1 and all(g >= 1 for g in s.grid),
        f"moe.swarm.grid={s.grid} must be a non-empty list of positive ints, e.g. [8, 8]",
    )
    E = math.prod(s.grid)
    _check(
        m.expert_dropout == 0,
        f"moe.expert_dropout={m.expert_dropout}: expert dropout is not supported on expert "
        "servers (hivemind re-runs the forward in backward); set moe.expert_dropout=0",
    )
    _check(s.k_best >= 1, f"moe.swarm.k_best={s.k_best} must be >= 1 (Learning@home uses 4)")
    _check(
        E >= s.k_best,
        f"moe.swarm.k_best={s.k_best} > the grid's {E} experts (moe.swarm.grid={s.grid}); "
        "lower moe.swarm.k_best or enlarge moe.swarm.grid",
    )
    _check(
        m.num_experts == E,
        f"moe.num_experts={m.num_experts} but moe.swarm.grid={s.grid} has {E} experts; set "
        f"moe.num_experts={E} too (run names and FLOP counts read it)",
    )
    _check(
        m.top_k == s.k_best,
        f"moe.top_k={m.top_k} but moe.swarm.k_best={s.k_best}; set moe.top_k={s.k_best} too "
        "(each token's experts, for FLOP counts)",
    )
    _check(1 <= s.k_min <= s.k_best, f"moe.swarm.k_min={s.k_min} must be in [1, moe.swarm.k_best={s.k_best}]")
    for name in ("forward_timeout", "timeout_after_k_min", "backward_timeout"):
        v = getattr(s, name)
        _check(v >= 0 and math.isfinite(v), f"moe.swarm.{name}={v} must be a finite number of seconds >= 0")
    _check(
        s.forward_timeout > 0 and s.backward_timeout > 0,
        "moe.swarm.forward_timeout and moe.swarm.backward_timeout must be > 0 seconds (30 is a safe default)",
    )
    _check(
        bool(s.uid_prefix) and "." not in s.uid_prefix and s.uid_prefix.replace("_", "").replace("-", "").isalnum(),
        f"moe.swarm.uid_prefix={s.uid_prefix!r} must be one word of letters, digits, '_' or '-' (no dots), e.g. ffn",
    )
    _check(
        s.max_reply_scale > 0 and math.isfinite(s.max_reply_scale),
        f"moe.swarm.max_reply_scale={s.max_reply_scale} must be a positive number (1000: a "
        "reply may be up to 1000x the largest value sent)",
    )
    for i, key in enumerate(s.trusted_keys):
        _check(
            re.fullmatch(r"[0-9a-f]{40}", key) is not None,
            f"moe.swarm.trusted_keys[{i}]={key!r} is not a key fingerprint (40 hex digits, as "
            "moe-join prints: signing key ...)",
        )
    _check(
        not s.trusted_keys or s.require_signed,
        "moe.swarm.trusted_keys needs moe.swarm.require_signed=true (keys sign the declarations)",
    )
    for i, addr in enumerate(s.initial_peers):
        why = check_multiaddr(addr)
        _check(why is None, f"moe.swarm.initial_peers[{i}]={addr!r}: {why}")
    _check(
        len(s.host_maddrs) >= 1,
        "moe.swarm.host_maddrs must list at least one address to listen on, e.g. [/ip4/127.0.0.1/tcp/0]",
    )
    for i, addr in enumerate(s.host_maddrs):
        why = check_multiaddr(addr, need_peer=False)
        _check(
            why is None and "/p2p/" not in addr,
            f"moe.swarm.host_maddrs[{i}]={addr!r} must be an address to listen on like "
            "/ip4/127.0.0.1/tcp/0 (port 0: any free port)",
        )


def validate_parallel(cfg: TrainConfig) -> None:
    """The parallel layout on its own (the world size is only known at launch: ``validate_launch``)."""
    p = cfg.parallel
    _check(
        p.backend in PARALLEL_BACKENDS,
        f"parallel.backend={p.backend!r} is not a backend of this version; use "
        "parallel=single (one process), ddp (torchrun), deepspeed or ray",
    )
    if p.backend in BACKEND_PACKAGES:
        import importlib.util

        module, extra = BACKEND_PACKAGES[p.backend]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        _check(
            found,
            f"parallel.backend={p.backend} needs the {module.split('.')[0]} package, which is not "
            f"installed; pip install -e '.[{extra}]' (or use parallel=ddp)",
        )
    _check(p.ep_size >= 1, f"parallel.ep_size={p.ep_size} must be >= 1 (1: every rank holds all experts)")
    _check(
        p.ep_size == 1 or p.backend != "single",
        f"parallel.ep_size={p.ep_size} needs {p.ep_size}+ processes but "
        f"parallel.backend=single runs one; use parallel=ddp and launch with `{TORCHRUN}`, or "
        "set parallel.ep_size=1",
    )
    _check(
        cfg.moe.name != "hivemind" or p.backend == "single",
        f"moe=hivemind with parallel.backend={p.backend}: the swarm's experts are remote and "
        "each trainer is one process for now; use parallel=single",
    )
    _check(
        p.ep_size == 1 or cfg.moe.name != "dense",
        f"parallel.ep_size={p.ep_size} with moe=dense: a dense model has no experts to shard; "
        "set parallel.ep_size=1 or pick an expert layer (e.g. moe=switch)",
    )
    _check(
        cfg.moe.routed_experts % p.ep_size == 0,
        f"parallel.ep_size={p.ep_size} does not divide the {cfg.moe.routed_experts} routed experts "
        f"(moe.num_experts x moe.granularity): "
        "every rank of an expert-parallel group holds the same number of experts; pick an "
        "ep_size dividing num_experts",
    )
    _check(p.pp_size >= 1, f"parallel.pp_size={p.pp_size} must be >= 1 (1: no pipeline parallelism)")
    _check(
        p.pp_size == 1 or p.backend == "deepspeed",
        f"parallel.pp_size={p.pp_size} needs parallel=deepspeed (its PipelineModule runs the "
        f"stages); set parallel.pp_size=1 for parallel.backend={p.backend}",
    )
    _check(
        p.pp_size <= cfg.model.n_layers,
        f"parallel.pp_size={p.pp_size} > model.n_layers={cfg.model.n_layers}: every pipeline "
        "stage needs at least one block; lower pp_size",
    )
    _check(
        p.zero_stage in (0, 1, 2),
        f"parallel.zero_stage={p.zero_stage}; use 0, 1 or 2 (ZeRO-3 partitions the expert "
        "weights themselves, which expert parallelism already shards)",
    )
    _check(
        p.zero_stage == 0 or p.backend == "deepspeed",
        f"parallel.zero_stage={p.zero_stage} needs parallel=deepspeed; set "
        f"parallel.zero_stage=0 for parallel.backend={p.backend}",
    )
    _check(
        p.pp_size == 1 or p.zero_stage <= 1,
        f"parallel.zero_stage={p.zero_stage} with parallel.pp_size={p.pp_size}: DeepSpeed's "
        "pipeline engine supports ZeRO stage 0 or 1 only; set parallel.zero_stage=1",
    )
    _check(
        p.bucket_mb >= 0 and math.isfinite(p.bucket_mb),
        f"parallel.bucket_mb={p.bucket_mb} must be >= 0 (MiB per gradient all-reduce bucket; "
        "0: one all-reduce after the backward)",
    )
    _check(p.num_workers >= 1, f"parallel.num_workers={p.num_workers} must be >= 1 (Ray Train workers, one rank each)")
    _check(p.cpus_per_worker >= 1, f"parallel.cpus_per_worker={p.cpus_per_worker} must be >= 1")
    if p.backend == "ray":
        _check(
            p.num_workers % p.ep_size == 0,
            f"parallel.ep_size={p.ep_size} does not divide parallel.num_workers={p.num_workers}: "
            f"run a multiple of {p.ep_size} workers or lower ep_size",
        )
        _check(
            p.ray_address in ("local", "auto")
            or p.ray_address.startswith("ray://")
            or re.fullmatch(r"[\w.-]+:\d+", p.ray_address) is not None,
            f"parallel.ray_address={p.ray_address!r}; use local (a private Ray on this machine), "
            "auto (the cluster this node joined with `ray start`) or ray://HEAD:10001",
        )
    _check(
        p.dist_backend in DIST_BACKENDS,
        f"parallel.dist_backend={p.dist_backend!r}; use auto (nccl on CUDA, gloo on CPU), gloo or nccl",
    )
    _check(
        p.timeout_s > 0 and math.isfinite(p.timeout_s),
        f"parallel.timeout_s={p.timeout_s} must be a positive number of seconds",
    )
    if p.dist_backend == "nccl":
        import torch

        _check(
            torch.cuda.is_available(),
            "parallel.dist_backend=nccl needs CUDA GPUs and none is visible; use "
            "parallel.dist_backend=auto (gloo on CPU)",
        )


def validate_launch(cfg: TrainConfig, env: typing.Mapping[str, str]) -> None:
    """The launch fits the config: ``env`` is the process environment the launcher (torchrun,
    deepspeed) sets up (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT).  Run before any process
    group starts, so a bad launch ends every rank with the same one line instead of a hang."""
    p = cfg.parallel
    world = env.get("WORLD_SIZE")
    if p.backend in ("single", "ray"):
        fix = (
            "add parallel=ddp (torchrun) or parallel=deepspeed"
            if p.backend == "single"
            else "run moe-train parallel=ray as one process: Ray starts the workers"
        )
        _check(
            world in (None, "", "1"),
            f"parallel.backend={p.backend} but this process is one of WORLD_SIZE={world} started "
            f"together (torchrun or deepspeed?); {fix}",
        )
        return
    how = LAUNCHERS[p.backend]
    missing = [k for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    _check(
        not missing,
        f"parallel.backend={p.backend} needs the environment its launcher sets "
        f"({', '.join(missing)} not set): launch with `{how}`, or use parallel=single for one "
        "process",
    )
    _check(
        world.isdigit() and int(world) >= 1,
        f"parallel.backend={p.backend}: WORLD_SIZE={world!r} is not a positive integer; launch with `{how}`",
    )
    n = int(world)
    _check(
        n % p.ep_size == 0,
        f"parallel.ep_size={p.ep_size} does not divide the world size {n} (WORLD_SIZE): start "
        f"a multiple of {p.ep_size} processes or set parallel.ep_size to a divisor of {n}",
    )
    _check(
        n % (p.ep_size * p.pp_size) == 0,
        f"parallel.ep_size*pp_size={p.ep_size}*{p.pp_size} does not divide the world size {n} "
        f"(WORLD_SIZE): start a multiple of {p.ep_size * p.pp_size} processes or lower "
        "ep_size/pp_size",
    )


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError on the first bad value.  Cheap: nothing is built or read."""
    md = cfg.model
    _check(md.n_layers >= 1, f"model.n_layers={md.n_layers} must be >= 1")
    _check(md.d_model >= 1, f"model.d_model={md.d_model} must be >= 1")
    _check(md.n_heads >= 1, f"model.n_heads={md.n_heads} must be >= 1")
    _check(
        md.d_model % md.n_heads == 0,
        f"model.d_model={md.d_model} is not divisible by model.n_heads={md.n_heads}; pick n_heads dividing d_model",
    )
    _check(md.d_ff >= 1, f"model.d_ff={md.d_ff} must be >= 1")
    _check(md.seq_len >= 2, f"model.seq_len={md.seq_len} must be >= 2")
    _check(0 <= md.dropout < 1, f"model.dropout={md.dropout} must be in [0, 1)")
    _check(md.moe_every >= 1, f"model.moe_every={md.moe_every} must be >= 1 (1: every block is MoE)")
    _check(
        md.moe_every <= md.n_layers or cfg.moe.name == "dense",
        f"model.moe_every={md.moe_every} > model.n_layers={md.n_layers}: no block would be "
        "MoE; lower moe_every or use moe=dense",
    )
    _check(
        md.activation in ("auto", "gelu", "relu", "silu", "swiglu"),
        f"model.activation={md.activation!r}; use auto (the block's own), gelu, relu, silu or swiglu",
    )
    _check(md.block in BLOCK_ACTIVATION, f"model.block={md.block!r}; use gpt or llama")
    _check(
        md.block != "llama" or (md.d_model // md.n_heads) % 2 == 0,
        f"model.block=llama rotates pairs of dimensions: the head size d_model/n_heads="
        f"{md.d_model // max(md.n_heads, 1)} must be even",
    )
    _check(md.rope_theta > 0, f"model.rope_theta={md.rope_theta} must be > 0 (Llama: 10000)")
    _check(md.norm_eps > 0, f"model.norm_eps={md.norm_eps} must be > 0")
    _check(md.vocab_size >= 0, f"model.vocab_size={md.vocab_size} must be >= 0 (0: from the tokenizer)")
    validate_moe(cfg.moe)
    m = cfg.moe
    _check(
        (m.expert_d_ff or md.d_ff) % m.granularity == 0,
        f"moe.granularity={m.granularity} does not divide the experts' hidden size "
        f"{m.expert_d_ff or md.d_ff} (moe.expert_d_ff, or model.d_ff when 0); pick a divisor",
    )
    _check(
        m.name != "hivemind" or md.ffn_activation != "swiglu",
        "moe=hivemind: the swarm's experts are two-matrix FFNs (moe-join --activation gelu|relu|silu); "
        "set model.activation=gelu (or another of those) for a llama block",
    )

    d = cfg.data
    _check(d.tokenizer in ("bpe", "byte"), f"data.tokenizer={d.tokenizer!r}; use bpe or byte")
    _check(
        d.tokenizer != "bpe" or 257 <= d.vocab_size <= 65535,
        f"data.vocab_size={d.vocab_size} must be in [257, 65535] for the BPE tokenizer",
    )
    _check(0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    _check(d.on_bad_file in ("error", "skip"), f"data.on_bad_file={d.on_bad_file!r}; use error or skip")
    _check(d.bin_dtype in ("uint16", "uint32"), f"data.bin_dtype={d.bin_dtype!r}; use uint16 or uint32")
    _check(d.max_files >= 0, f"data.max_files={d.max_files} must be >= 0 (0: all files)")
    if d.path:
        import os

        _check(
            os.path.exists(os.path.expanduser(d.path)),
            f"data.path={d.path!r} does not exist; point it at a text file, a folder of text "
            "files or a .bin of token ids (empty: the standard-library corpus)",
        )

    if cfg.init_from:
        import os

        resuming = cfg.resume and any(
            os.path.exists(os.path.join(cfg.out_dir, f)) for f in ("checkpoint.pt", "pipeline.json")
        )  # a resumed run reads its own checkpoint, not init_from
        _check(
            resuming or os.path.exists(os.path.expanduser(cfg.init_from)),
            f"init_from={cfg.init_from!r} does not exist; point it at a dense run's directory or its checkpoint.pt",
        )

    o = cfg.optim
    _check(o.lr > 0 and math.isfinite(o.lr), f"optim.lr={o.lr} must be a positive number")
    _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _check(0 <= o.beta1 < 1, f"optim.beta1={o.beta1} must be in [0, 1) (0.9 is typical)")
    _check(0 <= o.beta2 < 1, f"optim.beta2={o.beta2} must be in [0, 1) (0.95-0.999 is typical)")
    _check(o.eps > 0, f"optim.eps={o.eps} must be > 0 (1e-8 is typical)")
    _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)")
    _check(
        0 <= o.expert_lr_scale and math.isfinite(o.expert_lr_scale),
        f"optim.expert_lr_scale={o.expert_lr_scale} must be a number >= 0 (1: the experts learn at optim.lr)",
    )
    _check(
        o.expert_lr_scale == 1 or cfg.moe.name not in ("dense", "hivemind"),
        f"optim.expert_lr_scale={o.expert_lr_scale} with moe={cfg.moe.name}: "
        + (
            "a dense model has no experts"
            if cfg.moe.name == "dense"
            else "the swarm's experts train on their servers, with the servers' optimizer"
        )
        + "; set optim.expert_lr_scale=1",
    )

    lg = cfg.logger
    _check(
        lg.wandb_mode in ("offline", "online", "disabled"),
        f"logger.wandb_mode={lg.wandb_mode!r}; use offline, online or disabled",
    )
    _check(lg.log_every >= 1, f"logger.log_every={lg.log_every} must be >= 1")

    validate_parallel(cfg)
    _check(cfg.steps >= 1, f"steps={cfg.steps} must be >= 1")
    _check(cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1")
    _check(cfg.grad_accum >= 1, f"grad_accum={cfg.grad_accum} must be >= 1")
    _check(cfg.eval_every >= 0, f"eval_every={cfg.eval_every} must be >= 0 (0: only at the end)")
    _check(cfg.eval_batches >= 1, f"eval_batches={cfg.eval_batches} must be >= 1")
    _check(cfg.ckpt_every >= 0, f"ckpt_every={cfg.ckpt_every} must be >= 0 (0: only at the end)")
    _check(
        cfg.optim.warmup_steps <= cfg.steps,
        f"optim.warmup_steps={o.warmup_steps} > steps={cfg.steps}; lower the warmup or train longer",
    )
    _check(
        cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda") or cfg.device == "mps",
        f"device={cfg.device!r}; use auto, cpu, cuda, cuda:N or mps",
    )
    if cfg.device.startswith("cuda"):
        import torch

        _check(
            torch.cuda.is_available(),
            f"device={cfg.device!r} but no CUDA device is visible; use device=auto or device=cpu",
        )
    _check(
        cfg.dtype != "float16",
        "dtype=float16 needs loss scaling, which the trainer does not do; use dtype=bfloat16 (or auto)",
    )
    _check(cfg.dtype in ("auto", "float32", "bfloat16"), f"dtype={cfg.dtype!r}; use auto, float32 or bfloat16")
    _check(cfg.threads >= 0, f"threads={cfg.threads} must be >= 0 (0: torch's default)")
    _check(cfg.peak_flops >= 0, f"peak_flops={cfg.peak_flops} must be >= 0 (0: measure at start-up)")
