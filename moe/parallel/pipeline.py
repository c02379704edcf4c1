"""Pipeline parallelism: :class:`~moe.model.transformer.TransformerLM` as DeepSpeed ``PipelineModule`` stages,
trained by DeepSpeed's pipeline engine (``parallel=deepspeed parallel.pp_size=P``).

    deepspeed --num_gpus 2 --no_local_rank $(which moe-train) parallel=deepspeed parallel.pp_size=2 grad_accum=4

**Layers.**  The model as one flat list (:func:`pipeline_layers`)::

    token embedding (tied) -> position embedding -> block 0 .. block L-1 -> final norm -> LM head (tied)

Activations between layers (and between stages) are a tuple ``(x_BSD, acc_2)``: ``acc_2``
accumulates ``(sum of the MoE balancing losses, sum of the router z-losses)`` over the
blocks seen so far; each MoE block adds its layer's terms, the loss on the last stage
(:class:`PipelineLoss`) weights them (``lm + aux_loss_weight * acc[0] + z_loss_weight * acc[1]``,
exactly ``ModelOutput.total_loss``), and their gradient flows back across the stages to every
router.  DeepSpeed's engine sends a gradient back only for floating tensors and runs
``out.backward(grad)`` on each of them, so the accumulator is created by the position
embedding as a leaf that requires grad (shape (2,), fixed): a stage without MoE blocks
passes it on unchanged and the engine's backward through it is a no-op.

**Tied embeddings** (``model.tie_embeddings``, the default): the token embedding is a
``TiedLayerSpec`` on the first and the last stage (the LM head reuses its weight through
``forward_fn``); DeepSpeed broadcasts it from the first stage at start-up and all-reduces its
gradient between the two stages after each backward.

**Partitioning:** ``partition_method="type:BlockLayer"``, the same number of Transformer
blocks per stage (the embeddings stay on the first stage, norm and head on the last).  With
top-1 routing an MoE block costs the FLOPs of a dense one, so equal blocks mean equal compute;
``"parameters"`` would count every expert and give MoE-heavy stages fewer blocks.

**Weights.**  Every rank builds the whole one-process ``TransformerLM`` with
``torch.manual_seed(seed)`` and copies its stage's slice into the stage's layers
(:func:`copy_weights`), so PP=P starts from exactly PP=1's weights; the whole model is then
dropped.  (Each process holds the whole model once, at start-up: fine for the sizes this
trainer runs; a model that does not fit one process would need per-layer seeding instead.)

**Training** (:class:`PipelineBackend`, the step of the one loop, ``moe.training.loop.Trainer``):
torch's AdamW with the trainer's parameter groups, ``gradient_accumulation_steps = grad_accum``
(the micro-batches per step: the pipeline fills only with ``grad_accum >= pp_size``), each
data-parallel rank and micro-batch one shard of the step's global batch (``batch_size x
grad_accum x dp_size`` sequences, the very batch every backend trains on), the LR of
``moe.training.optim.lr_at`` set before each step, gradient clipping by the norm of the whole
model's gradient (every stage's, the tied weight once), eval with ``engine.eval_batch``.
DeepSpeed's ``train_batch`` runs the whole step: forward, backward, gradient reduction,
clipping and the optimizer step, so the loop's finite check comes after the step (the saved
checkpoint never holds it).  Checkpoints: DeepSpeed's, in ``out_dir/global_step<N>`` named by
``out_dir/pipeline.json`` (resumed when present, by the same layout: processes, ``pp_size``,
``zero_stage``).

Telemetry: rank 0 logs what every backend logs (``train/*`` averaged over the micro-batches and
data-parallel replicas, ``val/loss``, ``perf/*``, and each MoE block's expert load
``moe/layer_*``, gathered from the stage holding the block); ``perf/comm_time_s`` counts this
module's own collectives, not the engine's sends between stages.

Not supported (a one-line ``ConfigError``): expert parallelism inside stages
(``parallel.ep_size > 1``), ``moe=hivemind``, bf16, ZeRO-2.

Shape suffixes: B batch, S sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moe.config import ConfigError, ModelConfig, MoEConfig, TrainConfig
from moe.model.layers import LayerAux
from moe.model.transformer import Block, TransformerLM, count_parameters, is_sparse_block, make_norm
from moe.parallel.ds import skip_shm_comm_build
from moe.parallel.state import ParallelState
from moe.training.backend import CHECKPOINT, Backend, rank_seed
from moe.training.data import TokenData
from moe.training.files import write_text_atomic
from moe.training.optim import build_optimizer, set_lr
from moe.training.telemetry import LoadAccumulator

PARTITION_METHOD = "type:BlockLayer"  # equal blocks per stage (module docstring)
TIED_KEY = "tok_emb"
PIPELINE_JSON = "pipeline.json"  # beside DeepSpeed's checkpoint: its tag, step, layout and config


# ---------------------------------------------------------------------------------------------
# the layers: each holds one piece of the one-process model under the name it has there


class StageLayer(nn.Module):
    """A pipeline layer wrapping the module ``inner`` that ``TransformerLM`` holds at ``prefix``."""

    prefix = ""

    def model_state(self) -> dict[str, torch.Tensor]:
        """This layer's weights under their one-process ``TransformerLM`` names."""
        if self.inner is None:
            return {}
        return {self.prefix + k: v for k, v in self.inner.state_dict().items()}

    def copy_from(self, full_state: dict[str, torch.Tensor]) -> None:
        if self.inner is None:
            return
        own = {k[len(self.prefix) :]: v for k, v in full_state.items() if k.startswith(self.prefix)}
        self.inner.load_state_dict(own)


class TokenEmbedding(StageLayer):
    """ids (B, S) -> (B, S, D); tied: the LM head is this weight (:func:`tied_lm_head`)."""

    prefix = "tok_emb."

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inner = nn.Embedding(cfg.vocab_size, cfg.d_model)

    def forward(self, idx_BS: torch.Tensor) -> torch.Tensor:
        return self.inner(idx_BS)


class PositionEmbedding(StageLayer):
    """x (B, S, D) -> (dropout(x + pos), acc): starts the MoE loss accumulator.  A ``llama``
    model has no learned positions (its attention rotates by position): ``dropout(x)``."""

    prefix = "pos_emb."

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inner = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.block == "gpt" else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inner is not None:
            x_BSD = x_BSD + self.inner(torch.arange(x_BSD.shape[1], device=x_BSD.device))
        # a leaf that requires grad: the engine backpropagates into every floating output
        acc_2 = torch.zeros(2, device=x_BSD.device, dtype=torch.float32, requires_grad=True)
        return self.drop(x_BSD), acc_2


class BlockLayer(StageLayer):
    """Block ``index``: (x, acc) -> (block(x), acc + (aux_loss, z_loss) of its MoE FFN)."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, index: int):
        super().__init__()
        self.index, self.prefix = index, f"blocks.{index}."
        self.inner = Block(cfg, moe, sparse=is_sparse_block(index, cfg))
        self.on_aux: Callable[[int, LayerAux], None] | None = None  # sees each training forward's LayerAux (telemetry)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, acc_2 = inputs
        x, aux = self.inner(x)
        if aux is not None:
            acc_2 = acc_2 + torch.stack([aux.aux_loss, aux.z_loss]).float()
            if self.on_aux is not None and self.training:
                self.on_aux(self.index, aux)
        return x, acc_2


class FinalNorm(StageLayer):
    prefix = "ln_f."

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inner = make_norm(cfg)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, acc_2 = inputs
        return self.inner(x), acc_2


class LMHead(StageLayer):
    """The untied output projection (``model.tie_embeddings=false``)."""

    prefix = "lm_head."

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inner = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, acc_2 = inputs
        return self.inner(x), acc_2


def tied_lm_head(emb: TokenEmbedding, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head of a tied model: logits (B, S, V) = x @ tok_emb.weight^T."""
    x, acc_2 = inputs
    return F.linear(x, emb.inner.weight), acc_2


class PipelineLoss:
    """``loss_fn`` of the last stage: ``(logits, acc), labels -> lm + w_aux * aux + w_z * z``
    (``ModelOutput.total_loss``, term for term).  Keeps each micro-batch's detached
    ``(lm, aux, z)`` until :meth:`drain`, for the logs."""

    def __init__(self, moe: MoEConfig):
        self.aux_weight, self.z_weight = moe.aux_loss_weight, moe.z_loss_weight
        self.records: list[torch.Tensor] = []

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor], labels_BS: torch.Tensor) -> torch.Tensor:
        logits_BSV, acc_2 = outputs
        lm = F.cross_entropy(logits_BSV.float().view(-1, logits_BSV.shape[-1]), labels_BS.reshape(-1))
        self.records.append(torch.stack([lm.detach(), acc_2[0].detach(), acc_2[1].detach()]))
        # always through acc (also at weight 0): the engine needs a gradient for it
        return lm + self.aux_weight * acc_2[0] + self.z_weight * acc_2[1]

    def drain(self) -> list[torch.Tensor]:
        out, self.records = self.records, []
        return out


def pipeline_layers(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> list:
    """The model as DeepSpeed layer specs, in forward order (module docstring)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if model_cfg.tie_embeddings:
        first = TiedLayerSpec(TIED_KEY, TokenEmbedding, model_cfg, tied_weight_attr="inner.weight")
        head = TiedLayerSpec(
            TIED_KEY, TokenEmbedding, model_cfg, forward_fn=tied_lm_head, tied_weight_attr="inner.weight"
        )
    else:
        first, head = LayerSpec(TokenEmbedding, model_cfg), LayerSpec(LMHead, model_cfg)
    blocks = [LayerSpec(BlockLayer, model_cfg, moe_cfg, i) for i in range(model_cfg.n_layers)]
    return [first, LayerSpec(PositionEmbedding, model_cfg), *blocks, LayerSpec(FinalNorm, model_cfg), head]


def layer_prefixes(model_cfg: ModelConfig) -> list[str]:
    """The one-process name prefix of each layer of :func:`pipeline_layers`, in its order (the
    index DeepSpeed names each layer's checkpoint file by)."""
    blocks = [f"blocks.{i}." for i in range(model_cfg.n_layers)]
    return [TokenEmbedding.prefix, PositionEmbedding.prefix, *blocks, FinalNorm.prefix, LMHead.prefix]


def read_pipeline_checkpoint(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A pipeline run's ``pipeline.json`` and its whole model in the one-process format
    (``TransformerLM``'s state dict), read from DeepSpeed's files: each layer's weights are in
    ``<tag>/layer_<index>-model_states.pt`` under ``inner.``, the index that of
    :func:`pipeline_layers`; a tied LM head is the embedding, stored once.  No DeepSpeed, no
    processes, any number of stages; opened ``weights_only``.  A missing file is a one-line
    ConfigError."""
    from moe.training.checkpoint import load as load_checkpoint

    run_dir = Path(run_dir)
    info = json.loads((run_dir / PIPELINE_JSON).read_text(encoding="utf-8"))
    model = dict(info["config"]["model"])
    model_cfg = ModelConfig(**{k: v for k, v in model.items() if k in ModelConfig.__dataclass_fields__})
    tag_dir = run_dir / info["tag"]
    state: dict[str, torch.Tensor] = {}
    for index, prefix in enumerate(layer_prefixes(model_cfg)):
        path = tag_dir / f"layer_{index:02d}-model_states.pt"
        if not path.exists():
            if prefix == LMHead.prefix and model_cfg.tie_embeddings:
                continue  # the tied head: the embedding's weight
            if prefix == PositionEmbedding.prefix and model_cfg.block != "gpt":
                continue  # no learned positions
            raise ConfigError(
                f"{run_dir}: DeepSpeed's checkpoint {tag_dir.name} has no {path.name}; it is incomplete "
                "(resume the run to write a whole one)"
            )
        for k, v in load_checkpoint(path).items():
            if k.startswith("inner."):
                state[prefix + k[len("inner.") :]] = v
    if model_cfg.tie_embeddings:
        state[LMHead.prefix + "weight"] = state[TokenEmbedding.prefix + "weight"]
    return info, state


def stage_layers(module: nn.Module) -> list[StageLayer]:
    """The layers this stage holds (a tied embedding once)."""
    return [m for m in module.modules() if isinstance(m, StageLayer)]


def copy_weights(module: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Load this stage's slice of a one-process ``TransformerLM`` state dict."""
    with torch.no_grad():
        for layer in stage_layers(module):
            layer.copy_from(full_state)


def stage_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """This stage's weights under their one-process ``TransformerLM`` names."""
    out: dict[str, torch.Tensor] = {}
    for layer in stage_layers(module):
        out.update(layer.model_state())
    return out


def build_pipeline_module(
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig,
    *,
    num_stages: int,
    seed: int,
    partition_method: str = PARTITION_METHOD,
    init: Callable[[nn.Module], None] | None = None,
):
    """The ``PipelineModule`` of this rank's stage, weights equal to ``TransformerLM`` built
    with ``torch.manual_seed(seed)`` (then passed to ``init``, e.g. upcycling's copy of a dense
    model); returns ``(module, full_params)`` (parameter counts of the whole model,
    ``count_parameters``).  Collective: every rank calls it (after ``deepspeed.init_distributed``)."""
    from deepspeed.pipe import PipelineModule

    torch.manual_seed(seed)
    full = TransformerLM(model_cfg, moe_cfg)
    if init is not None:
        init(full)
    params = count_parameters(full)
    full_state = full.state_dict()  # (detached; freed with this function's frame)
    del full
    with torch.no_grad():  # its start-up broadcast of the tied weight stays out of autograd
        module = PipelineModule(
            layers=pipeline_layers(model_cfg, moe_cfg),
            num_stages=num_stages,
            loss_fn=PipelineLoss(moe_cfg),
            partition_method=partition_method,
        )
    copy_weights(module, full_state)
    return module, params


# ---------------------------------------------------------------------------------------------
# the run


def check_pipeline_config(cfg: TrainConfig, world_size: int) -> None:
    """What the pipeline backend does not do, as one-line ConfigErrors (before any engine)."""
    p = cfg.parallel
    if p.backend != "deepspeed":
        raise ConfigError(
            f"parallel.pp_size={p.pp_size} needs parallel=deepspeed (DeepSpeed's pipeline "
            "engine); launch with `deepspeed --num_gpus N --no_local_rank $(which moe-train) "
            f"parallel=deepspeed parallel.pp_size={p.pp_size}`"
        )
    if p.ep_size != 1:
        raise ConfigError(
            f"parallel.ep_size={p.ep_size} with parallel.pp_size={p.pp_size}: expert parallelism "
            "inside pipeline stages is not supported; set parallel.ep_size=1 (or "
            "parallel.pp_size=1)"
        )
    if cfg.moe.name == "hivemind":
        raise ConfigError(
            "moe=hivemind with parallel.pp_size>1: the swarm's experts are remote and need one "
            "process; use parallel=single"
        )
    if p.zero_stage > 1:
        raise ConfigError(
            f"parallel.zero_stage={p.zero_stage} with parallel.pp_size={p.pp_size}: DeepSpeed's "
            "pipeline engine supports ZeRO stage 0 or 1 only; set parallel.zero_stage=1"
        )
    if cfg.dtype == "bfloat16":
        raise ConfigError(
            "dtype=bfloat16 with parallel.pp_size>1: the pipeline runs in fp32 only; set dtype=float32 (or auto)"
        )
    if world_size % p.pp_size:
        raise ConfigError(
            f"parallel.pp_size={p.pp_size} does not divide the world size {world_size}; start a "
            f"multiple of {p.pp_size} processes"
        )


def ds_config(cfg: TrainConfig, dp_size: int) -> dict[str, Any]:
    """DeepSpeed's config: micro-batch, micro-batches per step (``grad_accum``), clipping, ZeRO."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * dp_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _clip_over_stages(engine) -> None:
    """ZeRO-0's clipping (replaces ``engine.clip_fp32_gradients``).  DeepSpeed's own counts only
    the gradients of the ranks whose model-parallel rank is 0 - under pipeline parallelism,
    the first stage's alone.  Here: the norm of every stage's gradient (a tied weight once:
    ``ds_pipe_replicated`` marks the copies), summed over the pipeline group, torch's clip
    factor ``max_norm / (norm + 1e-6)`` capped at 1.  Gradients are already averaged over the
    data-parallel ranks, so every rank computes the same norm."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    own = [p.grad for p in params if not getattr(p, "ds_pipe_replicated", False)]
    sq = torch.nn.utils.get_total_norm(own).square() if own else torch.zeros((), device=engine.device)
    sq = sq.reshape(1).float()
    if engine.num_stages > 1:
        dist.all_reduce(sq, group=engine.grid.get_pipe_parallel_group())
    norm = sq.sqrt().reshape(())
    torch.nn.utils.clip_grads_with_norm_(params, engine.gradient_clipping(), norm)
    engine._global_grad_norm = norm.item()


class PipelineBackend(Backend):
    """One rank of a pipeline-parallel run (``parallel=deepspeed parallel.pp_size=P``): this
    rank's stage as DeepSpeed ``PipelineModule`` layers, trained by DeepSpeed's pipeline engine.

    Args:
        cfg: the run (``parallel.pp_size > 1``, ``parallel=deepspeed``; validated here).
        state: this process's rank and world (``moe.parallel.ds.start``); the pipeline and
            data-parallel groups are DeepSpeed's own (``PipeDataParallelTopology``: rank =
            stage * dp_size + dp_rank, the layout of :class:`ParallelState`).
        data: token data; loaded from ``cfg.data`` when None.
    """

    def __init__(self, cfg: TrainConfig, state: ParallelState, *, data: TokenData | None = None):
        check_pipeline_config(cfg, state.world_size)
        if cfg.resume and (Path(cfg.out_dir) / CHECKPOINT).exists():
            raise ConfigError(
                f"out_dir={cfg.out_dir} holds a {CHECKPOINT} of a run without pipeline stages, which "
                f"parallel.pp_size={cfg.parallel.pp_size} cannot resume; pass run_name=NEW_NAME, or "
                "resume=false"
            )
        self.state = state
        self.rank, self.world_size = state.rank, state.world_size
        self._load: LoadAccumulator | None = None  # where the stage's MoE blocks report, during a step
        super().__init__(cfg, data=data)

    def _device(self) -> torch.device:
        return self.state.device

    def _build(self) -> None:
        import deepspeed

        cfg = self.cfg
        if cfg.grad_accum < cfg.parallel.pp_size and self.is_main:
            print(
                f"note: grad_accum={cfg.grad_accum} micro-batches per step < "
                f"parallel.pp_size={cfg.parallel.pp_size}: the pipeline never fills (stages wait for "
                "each other); raise grad_accum",
                file=sys.stderr,
            )
        skip_shm_comm_build()
        self.module, self.params = build_pipeline_module(
            self.model_cfg, cfg.moe, num_stages=cfg.parallel.pp_size, seed=cfg.seed, init=self.init_from_dense
        )
        self.model = self.module
        if self.world_size > 1:  # each rank its own dropout / jitter draws, as every backend
            torch.manual_seed(rank_seed(cfg.seed, self.rank))
        grid = self.module._grid
        self.replicas, self.replica_rank, self.stage = (
            grid.data_parallel_size,
            grid.data_parallel_id,
            grid.get_stage_id(),
        )
        assert self.rank == self.stage * self.replicas + self.replica_rank, (
            "DeepSpeed's topology differs from ParallelState's layout"
        )
        optimizer = build_optimizer(self.module, cfg)
        self.engine, *_ = deepspeed.initialize(
            model=self.module, optimizer=optimizer, config=ds_config(cfg, self.replicas), dist_init_required=False
        )
        self.optimizer = self.engine.optimizer
        if cfg.parallel.zero_stage == 0 and cfg.optim.grad_clip > 0:
            self.engine.clip_fp32_gradients = lambda: _clip_over_stages(self.engine)
        self.loss_fn: PipelineLoss = self.module.loss_fn
        self.moe_blocks = [
            i for i in range(self.model_cfg.n_layers) if is_sparse_block(i, self.model_cfg) and cfg.moe.name != "dense"
        ]
        for layer in stage_layers(self.module):
            if isinstance(layer, BlockLayer):
                layer.on_aux = self._on_aux

    def _on_aux(self, block: int, a: LayerAux) -> None:
        if self._load is not None:
            self._load.add_layer_aux(block, a)

    # -- data -------------------------------------------------------------------------------

    def _batches(self, split: str, index: int, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Train: micro-batch m is shard ``m * dp_size + dp_rank`` of step ``index``'s batch;
        val: micro-batch i is shard ``dp_rank`` of val batch i (``Backend.forward``)."""
        c, S = self.cfg, self.model_cfg.seq_len
        dev = self.engine.device
        if split == "train":
            for m in range(count):
                yield self.data.get_batch(
                    "train",
                    index,
                    c.batch_size,
                    S,
                    c.seed,
                    device=dev,
                    shard=m * self.replicas + self.replica_rank,
                    num_shards=count * self.replicas,
                )
        else:
            for i in range(count):
                yield self.data.get_batch(
                    "val", i, c.batch_size, S, c.seed, device=dev, shard=self.replica_rank, num_shards=self.replicas
                )

    def _mean_records(self) -> torch.Tensor:
        """The last stage's mean (lm, aux, z) over its micro-batches (zeros on other stages)."""
        recs = self.loss_fn.drain()
        return torch.stack(recs).mean(0).float() if recs else torch.zeros(3, device=self.engine.device)

    # -- the step -------------------------------------------------------------------------------

    def set_lr(self, lr: float) -> None:
        set_lr(self.engine.optimizer.param_groups, lr)

    def forward_backward(self, step: int, load: LoadAccumulator) -> torch.Tensor:
        """``engine.train_batch``: every micro-batch through the stages, forward and backward,
        and then the gradient reduction, clipping and the optimizer step (module docstring)."""
        self._load = load
        try:
            self.engine.train_batch(self._batches("train", step, self.cfg.grad_accum))
        finally:
            self._load = None
        return self._mean_records()

    def clip_gradients(self, max_norm: float) -> None:
        return None  # inside train_batch

    def optimizer_step(self) -> float | None:
        """Taken inside train_batch; the norm it clipped by (when clipping is on)."""
        if self.cfg.optim.grad_clip <= 0:
            return None
        gn = self.engine.get_global_grad_norm()
        return float(gn) if gn is not None else float("nan")

    def evaluate(self, batches: int) -> float:
        self.engine.eval_batch(self._batches("val", 0, batches), num_micro_batches=batches)
        loss = self._mean_records()[:1].double()
        return (self.sum_over_replicas_(loss) / self.replicas).item()

    # -- agreement between ranks ----------------------------------------------------------------

    def sum_over_replicas_(self, t: torch.Tensor) -> torch.Tensor:
        """Over the whole world: only the last stage's ranks hold non-zero losses."""
        if self.world_size > 1:
            with self.collective():
                dist.all_reduce(t)
        return t

    def mean_over_replicas(self, value: float) -> float:
        raise NotImplementedError("the pipeline averages its evaluation in evaluate()")

    def sum_expert_load_(self, t: torch.Tensor) -> torch.Tensor:
        """Over this stage's data-parallel replicas: they hold the same MoE blocks."""
        if self.replicas > 1:
            with self.collective():
                dist.all_reduce(t, group=self.engine.grid.get_data_parallel_group())
        return t

    def load_summary(self, load: LoadAccumulator) -> dict[str, float]:
        """Every stage's MoE blocks (summed over the data-parallel replicas), on rank 0 ({}
        elsewhere)."""
        with self.collective():
            if self.replicas > 1:
                group = self.engine.grid.get_data_parallel_group()
                load.merge_ranks(lambda t: dist.all_reduce(t, group=group), self.replicas)
            mine = load.summary() if self.replica_rank == 0 else {}
            every = [None] * self.world_size if self.is_main else None
            dist.gather_object(mine, every, dst=0)
        return {k: v for d in every for k, v in d.items()} if self.is_main else {}

    def count_ranks(self, flag: bool) -> int:
        t = torch.tensor([float(flag)], device=self.engine.device)
        dist.all_reduce(t)
        return int(t.item())

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint_path(self, run_dir: Path) -> Path:
        return run_dir / PIPELINE_JSON

    def layout(self) -> dict[str, int]:
        return {
            "world_size": self.world_size,
            "pp_size": self.cfg.parallel.pp_size,
            "dp_size": self.replicas,
            "zero_stage": self.cfg.parallel.zero_stage,
        }

    def state_dict(self) -> None:
        raise NotImplementedError(
            "pipeline checkpoints are DeepSpeed's (save_checkpoint); stage_state_dict gives a stage's weights"
        )

    def save_checkpoint(self, run_dir: Path, meta: dict[str, Any]) -> Path:
        """``engine.save_checkpoint`` into ``out_dir/global_step<N>`` (collective), then (rank 0)
        ``out_dir/pipeline.json`` naming it, with the step, layout and config; older tags go."""
        step = meta["step"]
        tag = f"global_step{step}"
        self.engine.save_checkpoint(
            str(run_dir), tag=tag, client_state={"step": step, "wandb_id": meta.get("wandb_id")}
        )
        dist.barrier()  # every rank's files are written
        if self.is_main:
            info = {"tag": tag, "layout": self.layout(), **meta}
            write_text_atomic(run_dir / PIPELINE_JSON, json.dumps(info, indent=2, default=str))
            for old in run_dir.glob("global_step*"):
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        return run_dir / tag

    def open_checkpoint(self, run_dir: Path) -> dict[str, Any]:
        """``pipeline.json``; the layout must be this run's (a one-line ConfigError)."""
        info = json.loads((run_dir / PIPELINE_JSON).read_text(encoding="utf-8"))
        if info["layout"] != self.layout():
            raise ConfigError(
                f"out_dir={self.cfg.out_dir} holds a pipeline checkpoint of layout {info['layout']}, "
                f"this run is {self.layout()}; resume with the same processes, parallel.pp_size and "
                "zero_stage, or pass resume=false"
            )
        return info

    def restore(self, info: dict[str, Any]) -> None:
        with torch.no_grad():  # (it broadcasts the tied weight again)
            loaded, client = self.engine.load_checkpoint(
                str(Path(self.cfg.out_dir)), tag=info["tag"], load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if loaded is None or client is None or client.get("step") != info["step"]:
            raise ConfigError(
                f"out_dir={self.cfg.out_dir}: DeepSpeed could not load "
                f"{Path(self.cfg.out_dir) / info['tag']}; pass resume=false to start over"
            )
        # RNG states are not in DeepSpeed's checkpoint: fresh streams from (seed, rank, step)
        torch.manual_seed(rank_seed(self.cfg.seed, self.rank, info["step"]))
