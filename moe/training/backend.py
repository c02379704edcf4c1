"""How one process runs the training step: the interface between the loop and the ways of
running a step, and its one-process implementation.

The loop (:class:`moe.training.loop.Trainer`) owns the schedule, evaluation, checkpoints and
their resume rules, logging and Ctrl-C; a :class:`Backend` owns the model, the optimizer and
every collective.  Per optimizer step ``s`` the loop calls::

    backend.set_lr(lr_at(s))
    losses = backend.forward_backward(s, load)  # (lm, aux, z): this rank's micro-batches, forward and backward
    backend.reduce_gradients()                   # over the data-parallel replicas
    norm = backend.clip_gradients(max_norm)      # by the whole model's norm; None: the optimizer clips in its step
    backend.sum_over_replicas_(values)           # the losses, the norm, any rank's Ctrl-C: the finite check
    after = backend.optimizer_step()             # the norm the step clipped by, when only known now

and besides: ``evaluate(batches)``, ``load_summary(load)`` (the expert load of a log window,
over every rank), ``save_checkpoint`` / ``open_checkpoint`` / ``restore``, ``count_ranks`` and
``broadcast`` (a file every rank must see, a number rank 0 measured), ``comm_seconds()``.

This module's :class:`Backend` is one process (CPU or one GPU).  The others subclass it in
``moe.parallel``: data + expert parallel ranks under torchrun or Ray (``DDPBackend``: buckets
of gradients all-reduced during the backward), DeepSpeed's engine (ZeRO 0-2) and DeepSpeed's
pipeline stages.  Nothing here imports ``torch.distributed``.

Batches: step ``s`` trains on one global batch of ``batch_size * grad_accum * replicas``
sequences, ``get_batch("train", s, ...)``; replica ``r`` takes shard ``micro * replicas + r``
of it in micro-batch ``micro`` (so the step's sequences depend on the product only).  Eval:
each replica evaluates its shard of each val batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from moe.config import ConfigError, ModelConfig, TrainConfig, validate
from moe.model.experts import GroupedExperts
from moe.model.layers import LayerContext, start_runtime, update_expert_bias
from moe.model.transformer import ModelOutput, TransformerLM, count_parameters
from moe.training import checkpoint as ckpt
from moe.training.data import TokenData, load_data
from moe.training.optim import build_optimizer, optimizer_groups, set_lr
from moe.training.telemetry import LoadAccumulator
from moe.training.upcycle import upcycle_from

CHECKPOINT = ckpt.CHECKPOINT  # the one-process format every backend but the pipeline writes


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU by default: CPUs without native bf16 run bf16 matmuls hundreds of times slower."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed of rank ``rank``'s own (dropout, jitter, random routing), from the run's seed."""
    digest = hashlib.sha256(f"{seed}/rank/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def model_config(cfg: TrainConfig, data: TokenData) -> ModelConfig:
    """``cfg.model`` with the vocabulary taken from the tokenizer (``vocab_size=0``), checked
    against the data: a one-line ConfigError when the model cannot train on it."""
    vocab = cfg.model.vocab_size or data.vocab_size
    if vocab < data.vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's {data.vocab_size}; set "
            "model.vocab_size=0 to take it from the tokenizer"
        )
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
    for split in ("train", "val"):
        n = len(getattr(data, split))
        if n < model_cfg.seq_len + 1:
            raise ConfigError(
                f"data: the {split} split has {n} tokens, fewer than "
                f"model.seq_len+1={model_cfg.seq_len + 1}; lower model.seq_len, raise "
                "data.val_fraction or add data"
            )
    return model_cfg


class Backend:
    """One process: the whole model, torch's AdamW, no communication.

    Args:
        cfg: the run (validated here, before anything is built).
        data: token data; loaded from ``cfg.data`` when None.

    Attributes the loop reads: ``cfg``, ``data``, ``model_cfg`` (the vocabulary filled in),
    ``model`` (this process's modules), ``params`` (parameter counts of the whole model),
    ``moe_blocks`` (indices of the sparse blocks), ``device``, ``is_main`` (this process logs
    and writes), ``replicas`` (data-parallel replicas: batch shards per micro-batch),
    ``world_size``.
    """

    replicas = 1
    world_size = 1
    rank = 0
    init_note = ""  # what init_from did (upcycling), for the start-up lines

    def __init__(self, cfg: TrainConfig, *, data: TokenData | None = None):
        validate(cfg)
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = self._device()
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.is_main = self.rank == 0
        self.data = data if data is not None else load_data(cfg.data, progress=cfg.logger.progress and self.is_main)
        self.model_cfg = model_config(cfg, self.data)
        self.runtime = (
            None  # what the expert layer's blocks share (moe=hivemind: the swarm connection); close() stops it
        )
        self._comm = 0.0  # wall time in this backend's collectives (collective())
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction (subclasses extend) ------------------------------------------------------

    def _device(self) -> torch.device:
        return resolve_device(self.cfg.device)

    def _layer_context(self) -> LayerContext:
        """How the sparse blocks are built: every expert here."""
        return LayerContext(runtime=self.runtime)

    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same weights on every rank; expert shards are slices of them
        self.runtime = start_runtime(cfg.moe, self.model_cfg)
        self.model = TransformerLM(self.model_cfg, cfg.moe, context=self._layer_context())
        self.init_from_dense(self.model)
        self.model.to(self.device)
        if self.world_size > 1:  # each rank its own dropout, jitter and random-routing draws
            torch.manual_seed(rank_seed(cfg.seed, self.rank))
        self.params = count_parameters(self.model)
        self.moe_blocks = self.model.moe_layers()
        self._use_grad_buffers(True)
        self.optimizer = self._optimizer()

    def init_from_dense(self, model: torch.nn.Module) -> None:
        """``init_from``: copy the dense run's weights into the freshly built ``model`` (sparse
        upcycling, ``moe.training.upcycle``), unless this run resumes its own checkpoint."""
        cfg = self.cfg
        if not cfg.init_from or (cfg.resume and self.checkpoint_path(Path(cfg.out_dir)).exists()):
            return
        self.init_note = upcycle_from(model, cfg, self.model_cfg)

    def _use_grad_buffers(self, on: bool) -> None:
        """We only ever ``.backward()`` and zero ``.grad`` in place: the experts may accumulate
        their weight gradients straight into it (``moe.ops.grouped``)."""
        for m in self.model.modules():
            if isinstance(m, GroupedExperts):
                m.grad_into_buffers = on

    def _optimizer(self) -> torch.optim.Optimizer | None:
        return build_optimizer(self.model, self.cfg)

    def close(self) -> None:
        """Release what the backend started (the expert layer's runtime).  Idempotent."""
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            runtime.close()

    # -- the step -------------------------------------------------------------------------------

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def forward(self, split: str, index: int, micro: int = 0) -> ModelOutput:
        """This replica's share of batch ``index``: in training, shard ``micro * replicas + r``
        of ``batch_size * grad_accum * replicas`` sequences; in eval, shard ``r`` of
        ``batch_size * replicas`` (module docstring)."""
        c = self.cfg
        shards = self.replicas * (c.grad_accum if split == "train" else 1)
        shard = micro * self.replicas + self.replica_rank
        x, y = self.data.get_batch(
            split,
            index,
            c.batch_size,
            self.model_cfg.seq_len,
            c.seed,
            device=self.device,
            shard=shard,
            num_shards=shards,
        )
        with self.autocast():
            return self.compute(x, y)

    replica_rank = 0  # which batch shard this process takes

    def compute(self, x: torch.Tensor, y: torch.Tensor) -> ModelOutput:
        return self.model(x, y)

    def set_lr(self, lr: float) -> None:
        """The schedule's learning rate for the coming optimizer step."""
        set_lr(self.optimizer.param_groups, lr)

    def forward_backward(self, step: int, load: LoadAccumulator) -> torch.Tensor:
        """Every micro-batch of step ``step``: forward, the loss, backward.  Adds each MoE
        layer's load to ``load``; returns this rank's ``(lm, aux, z)`` averaged over the
        micro-batches (a tensor on the device: no host sync)."""
        c = self.cfg
        sums = torch.zeros(3, device=self.device)
        for micro in range(c.grad_accum):
            out = self.forward("train", step, micro)
            self.backward(out.total_loss(c.moe), micro)
            sums += (
                torch.stack([out.lm_loss.detach(), out.aux_loss.detach(), out.z_loss.detach()]).float() / c.grad_accum
            )
            for block, la in zip(self.moe_blocks, out.layer_aux):
                load.add_layer_aux(block, la)
        return sums

    def backward(self, loss: torch.Tensor, micro: int) -> None:
        """The backward of micro-batch ``micro``'s loss (not yet divided by grad_accum)."""
        (loss / self.cfg.grad_accum).backward()

    def reduce_gradients(self) -> None:
        """Average the gradients over the replicas: nothing to do in one process."""

    def clip_gradients(self, max_norm: float) -> torch.Tensor | None:
        """Clip by the norm of the whole model's gradient; returns the norm before clipping
        (None: the optimizer clips inside its step, see :meth:`optimizer_step`)."""
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def optimizer_step(self) -> float | None:
        """Step the optimizer, zero the gradients in place (their buffers are reused).  Returns
        the norm the step clipped by when only known now (None otherwise)."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        return None

    def update_expert_bias(self) -> None:
        """Loss-free balancing's once-per-step bias update (``moe.bias_update_rate``), with the
        step's expert loads summed over the ranks that hold the same MoE layers.  Collective
        when there is more than one replica; nothing without an expert bias."""
        update_expert_bias(self.model, self.sum_expert_load_)

    def sum_expert_load_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum per-expert loads over every rank routing through the same layers, in place: the
        data-parallel replicas (expert-parallel ranks included: their routers are replicas)."""
        return self.sum_over_replicas_(t)

    @torch.no_grad()
    def evaluate(self, batches: int) -> float:
        """Mean validation LM loss over ``batches`` fixed batches, averaged over the replicas."""
        self.model.eval()
        try:
            losses = [self.forward("val", i).lm_loss.item() for i in range(batches)]
        finally:
            self.model.train()
        return self.mean_over_replicas(sum(losses) / len(losses))

    # -- agreement between ranks ----------------------------------------------------------------

    def sum_over_replicas_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the data-parallel replicas, in place (the loop divides by ``replicas``)."""
        return t

    def mean_over_replicas(self, value: float) -> float:
        return value

    def load_summary(self, load: LoadAccumulator) -> dict[str, float]:
        """The log window's expert load over every rank's tokens (``moe/layer_*``), on the
        main rank.  Collective."""
        return load.summary()

    def count_ranks(self, flag: bool) -> int:
        """How many ranks pass ``flag=True``."""
        return int(flag)

    def broadcast(self, obj: Any) -> Any:
        """The main rank's ``obj`` on every rank."""
        return obj

    def comm_seconds(self) -> float:
        """Wall time this rank has spent in collectives so far."""
        return self._comm

    @contextmanager
    def collective(self):
        """Counts the wall time of the block as time in collectives (:meth:`comm_seconds`)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._comm += time.perf_counter() - t0

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint_path(self, run_dir: Path) -> Path:
        """The file that exists when ``run_dir`` holds a checkpoint of this kind."""
        return run_dir / CHECKPOINT

    def layout(self) -> dict[str, int]:
        return {"world_size": 1, "dp_size": 1, "ep_size": 1}

    def state_dict(self) -> dict[str, Any] | None:
        """The whole model and optimizer in the one-process format, and the RNG state; on the
        main rank (None elsewhere).  Collective."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": ckpt.rng_state()}

    def save_checkpoint(self, run_dir: Path, meta: dict[str, Any]) -> Path:
        """Write the checkpoint, ``meta`` (step, config, ...) with :meth:`state_dict`, atomically
        (main rank).  Collective."""
        state = self.state_dict()
        path = self.checkpoint_path(run_dir)
        if self.is_main:
            ckpt.save_atomic({**meta, **state}, path)
        return path

    def open_checkpoint(self, run_dir: Path) -> dict[str, Any]:
        """The checkpoint's contents (every rank reads it): ``step``, ``config``, ``layout`` and
        the rest for :meth:`restore`."""
        return ckpt.load(self.checkpoint_path(run_dir), map_location="cpu")  # RNG states must stay CPU tensors

    def restore(self, state: dict[str, Any]) -> None:
        """Load an opened checkpoint, written by any layout (the one-process format: this
        process keeps its shard of the experts, ``load_full_state``)."""
        self.load_weights_and_optimizer(state["model"], state["optimizer"])
        ckpt.set_rng_state(state["rng"])

    def load_weights_and_optimizer(self, model_sd: dict, optim_sd: dict) -> None:
        """The checkpoint's weights and per-parameter optimizer state; the weight decay, betas
        and eps of the config resuming it (load_state_dict brings the checkpoint's back)."""
        ckpt.load_full_state(self.model, self.optimizer, model_sd, optim_sd)
        for group, now in zip(self.optimizer.param_groups, optimizer_groups(self.model, self.cfg), strict=True):
            group.update({k: v for k, v in now.items() if k != "params"})
