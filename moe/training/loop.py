"""The training loop: data -> model -> loss -> AdamW, with eval, checkpoints, exact resume and
telemetry, on one process or on every rank of a data + expert parallel run (a
:class:`~moe.parallel.ParallelState` passed in; the loop is the same).

Exact resume: the batch for step s is a pure function of (seed, s) (``TokenData.get_batch``),
and the checkpoint holds the model, optimizer and every RNG state (the learning rate is a
function of the step), so a run
resumed from step s computes bit-identical losses to one that never stopped.

Several ranks:

- **Batches.**  Step ``s`` trains on one global batch of ``batch_size * grad_accum * dp_size``
  sequences, ``get_batch("train", s, ...)``; data-parallel rank ``r`` takes shard
  ``micro * dp_size + r`` of it in micro-batch ``micro``.  So the step's sequences depend on
  the product only: DP=2 with ``batch_size=b`` sees exactly what one process sees with
  ``batch_size=2b`` (or with ``b`` and ``grad_accum=2``, micro-batch for rank).  Eval: every
  rank evaluates its shard of each val batch (all must: the all-to-all is collective) and the
  losses are averaged over the data-parallel ranks.
- **Gradients.**  Once per step, after the last micro-batch: ``allreduce_gradients`` (shared
  parameters over the data-parallel group, experts within their expert-data-parallel group),
  then clipping by the norm of the whole model's gradient (every expert counted once:
  ``moe.parallel.clip_grad_norm_``).  The logged losses and the gradient norm are averaged
  over the ranks in one small all-reduce, and the finite check reads those values, so every
  rank takes the same decision and none steps alone.
- **Each rank's MoE losses are its own.**  The balancing loss ``E * sum f_i P_i`` and
  capacity ``ceil(cf * T / E)`` are computed over a rank's own tokens (as DeepSpeed does): a
  run at DP=2 equals one process with ``grad_accum=2`` exactly, and one process with the double
  batch exactly when the layer is dropless and aux-free (the z-loss is a per-token mean: fine).
- **Telemetry.**  Only rank 0 logs and writes; the expert-load counts are summed over the
  data-parallel ranks before each log, tokens/s counts every rank's tokens, and
  ``perf/comm_time_s`` is rank 0's wall time per step in collectives (all-to-all, gradient
  and metric all-reduces).
- **Checkpoints** hold the whole model in the one-process format (``moe.parallel.reshard``):
  any expert-parallel size resumes any other's.  Each rank's RNG state is kept; resumed at
  another world size, ranks > 0 draw fresh streams from (seed, rank, step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from moe.training import checkpoint as ckpt
from moe.config import ConfigError, TrainConfig, flatten, to_dict, validate
from moe.training.data import TokenData, load_data
from moe.model.experts import GroupedExperts
from moe.training.flops import measure_peak_flops, mfu, transformer_flops_per_token
from moe.model.transformer import ModelOutput, TransformerLM, count_parameters
from moe.parallel import AllToAllDispatcher, OverlappedGradReducer, ParallelState, allreduce_gradients, clip_grad_norm_, gather_full_state, load_full_state
from moe.parallel.reduce import broadcast_object, count_over_world, gather_objects, mean_over_dp_, sum_over_dp_
from moe.training.sinks import MetricsLogger
from moe.training.telemetry import LoadAccumulator

CHECKPOINT = "checkpoint.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is left in place."""


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup over the first warmup_steps steps,
    then a cosine from optim.lr down to lr * min_lr_ratio at the last step (steps - 1).

    A pure function of the step and the config: a resumed run with a new optim.lr or steps
    follows the new schedule from where it stands (no scheduler state to go stale).
    """
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, cfg.steps - 1 - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW's parameter groups: matrices (incl. stacked expert weights and the router) decay,
    norms and biases don't.  With ``optim.expert_lr_scale != 1`` each splits in two, shared
    parameters then expert ones, and a group's ``lr_scale`` is the multiple of the schedule's
    learning rate it trains at (:func:`set_lr`).  Their order is the checkpoint's optimizer
    layout (at scale 1 it is the two groups it always was)."""
    o = cfg.optim
    shared, experts = list(model.parameters()), []
    if o.expert_lr_scale != 1.0:
        from moe.parallel import split_parameters

        shared, experts = split_parameters(model)
    groups = []
    for matrices, wd in ((True, o.weight_decay), (False, 0.0)):
        for params, scale in ((shared, 1.0), (experts, o.expert_lr_scale)):
            picked = [p for p in params if (p.dim() >= 2) == matrices]
            if picked or params is shared:  # (at scale 1: the two groups, as always)
                groups.append({"params": picked, "weight_decay": wd, "lr": o.lr * scale, "lr_scale": scale, "betas": (o.beta1, o.beta2), "eps": o.eps})
    return groups


def set_lr(param_groups: list[dict[str, Any]], lr: float) -> None:
    """The schedule's learning rate into every group, times the group's ``lr_scale``."""
    for group in param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def model_config(cfg: TrainConfig, data: TokenData):
    """``cfg.model`` with the vocabulary taken from the tokenizer (``vocab_size=0``), checked
    against the data: a one-line ConfigError when the model cannot train on it."""
    vocab = cfg.model.vocab_size or data.vocab_size
    if vocab < data.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {data.vocab_size}; set model.vocab_size=0 to take it from the tokenizer")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
    for split in ("train", "val"):
        n = len(getattr(data, split))
        if n < model_cfg.seq_len + 1:
            raise ConfigError(f"data: the {split} split has {n} tokens, fewer than model.seq_len+1={model_cfg.seq_len + 1}; lower model.seq_len, raise data.val_fraction or add data")
    return model_cfg


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`optimizer_groups`."""
    return torch.optim.AdamW(optimizer_groups(model, cfg))


@dataclass
class RunResult:
    """What a finished (or resumed-and-finished) run reports."""

    step: int
    train_loss: float
    val_loss: float
    tokens_per_s: float
    mfu: float
    layer_load: dict[int, dict[str, Any]]
    run_dir: Path
    checkpoint: Path
    metrics: Path
    wandb_dir: Path | None
    params: dict[str, int]
    history: list[dict[str, float]] = field(default_factory=list)  # per logged step


@dataclass
class TrainerHooks:
    """A backend's view of the run, called on every rank, in step (Ray Train's report is
    collective, so every worker must call it).  ``on_log(step, metrics)`` after each train log
    and each eval (``{"val/loss": ...}``); ``on_checkpoint(step, path)`` after each checkpoint
    is written (the file exists on rank 0's filesystem)."""

    on_log: Callable[[int, dict[str, float]], None] | None = None
    on_checkpoint: Callable[[int, Path], None] | None = None


def _rank_seed(seed: int, rank: int, step: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}/rank/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Trainer:
    """Runs ``TrainConfig`` on one device, or as one rank of a parallel run.  Build, then ``fit()``.

    Args:
        cfg: the whole run's configuration (validated here, before anything is built).
        data: token data; loaded from ``cfg.data`` when None.
        is_main: this process logs and writes checkpoints; default: rank 0 (only rank 0 can be).
        state: ranks and process groups (``moe.parallel.ddp.start`` builds it under torchrun);
            None: one process on ``cfg.device``.  Its ``ep_size`` must be ``parallel.ep_size``.
            Every rank of the state builds a Trainer and calls ``fit()`` in step.
        hooks: called on every rank as the run logs and checkpoints (:class:`TrainerHooks`).
    """

    def __init__(self, cfg: TrainConfig, *, data: TokenData | None = None, is_main: bool | None = None, state: ParallelState | None = None, hooks: TrainerHooks | None = None):
        validate(cfg)
        self.cfg = cfg
        self.hooks = hooks or TrainerHooks()
        st = self.state = state if state is not None else ParallelState.single(resolve_device(cfg.device))
        if st.ep_size != cfg.parallel.ep_size:
            raise ConfigError(f"parallel.ep_size={cfg.parallel.ep_size} but the process groups were built with ep_size={st.ep_size}; build the ParallelState from the same config")
        if st.pp_size != 1:
            raise ConfigError(f"pp_size={st.pp_size}: this trainer runs the whole model in one process; pipeline stages train with moe.parallel.pipeline.PipelineTrainer (moe-train picks it for parallel.pp_size > 1)")
        self.is_main = st.is_main if is_main is None else (bool(is_main) and st.is_main)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = st.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.run_dir = Path(cfg.out_dir)
        self.data = data if data is not None else load_data(cfg.data, progress=cfg.logger.progress and self.is_main)
        self.model_cfg = model_config(cfg, self.data)
        torch.manual_seed(cfg.seed)  # the same weights on every rank; expert shards are slices of them
        dispatcher = AllToAllDispatcher(st) if st.ep_size > 1 else None
        self._dispatchers = [dispatcher] if dispatcher is not None else []
        self.dht = _start_swarm_dht(cfg) if cfg.moe.name == "hivemind" else None  # close() stops it
        try:
            self.model = TransformerLM(self.model_cfg, cfg.moe, make_dispatcher=(lambda i: dispatcher) if dispatcher is not None else None, dht=self.dht).to(self.device)
        except BaseException:
            self.close()
            raise
        if st.world_size > 1:  # each rank its own dropout, jitter and random-routing draws
            torch.manual_seed(_rank_seed(cfg.seed, st.rank))
        self.ds = None  # parallel=deepspeed: the engine (moe.parallel.ds_engine) steps the optimizer
        for m in self.model.modules():  # we only ever .backward() and zero .grad in place (DeepSpeed frees them)
            if isinstance(m, GroupedExperts):
                m.grad_into_buffers = cfg.parallel.backend != "deepspeed"
        if cfg.parallel.backend == "deepspeed":
            from moe.parallel import ds_engine

            self.optimizer = None
            self.ds = ds_engine.wrap(self.model, optimizer_groups(self.model, cfg), cfg, st)
        else:
            self.optimizer = build_optimizer(self.model, cfg)
        # data parallel without DeepSpeed: gradients all-reduced in buckets while the backward runs
        self._reducer = OverlappedGradReducer(self.model, st, cfg.parallel.bucket_mb) if st.dp_size > 1 and self.ds is None and cfg.parallel.bucket_mb > 0 else None
        self.step = 0
        self.wandb_id: str | None = None
        self.last_metrics: dict[str, float] = {}  # the latest logged train metrics
        self.params = count_parameters(self.model)
        # FLOPs per token: active non-embedding params plus the output projection.
        n_flops = self.params["active_non_embedding"] + self.params["lm_head_flop_params"]
        self.flops_per_token = transformer_flops_per_token(n_flops, self.model_cfg.n_layers, self.model_cfg.d_model, self.model_cfg.seq_len)
        self.moe_blocks = self.model.moe_layers()
        self._comm_seconds = 0.0  # gradient and metric all-reduces (the dispatchers count their own)
        self._stop: _StopFlag | None = None
        self._stop_agreed = False  # some rank asked to stop (Ctrl-C), as of the last step

    def close(self) -> None:
        """Leave the swarm (``moe=hivemind``: stop this trainer's DHT peer).  Idempotent; a
        no-op for the other layers.  ``moe-train`` calls it at exit, however the run ends."""
        dht, self.dht = getattr(self, "dht", None), None
        if dht is not None:
            from moe.swarm.server import shutdown_dht

            shutdown_dht(dht)

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- state ------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def state_dict(self) -> dict[str, Any] | None:
        """The checkpoint: the whole model and optimizer in the one-process format (expert
        shards gathered), on the main rank; None elsewhere.  Collective: every rank calls it."""
        st = self.state
        optimizer = self.ds.full_optimizer() if self.ds is not None else self.optimizer  # ZeRO partitions gathered
        model_sd, optim_sd = gather_full_state(self.model, optimizer, st)
        rngs = gather_objects(ckpt.rng_state(), st)
        if not self.is_main:
            return None
        out = {
            "step": self.step,
            "model": model_sd,
            "optimizer": optim_sd,
            "rng": rngs[0],
            "config": to_dict(self.cfg),
            "wandb_id": self.wandb_id,
            "last_metrics": self.last_metrics,
        }
        if st.world_size > 1:
            out["layout"] = {"world_size": st.world_size, "dp_size": st.dp_size, "ep_size": st.ep_size}
            out["rng_ranks"] = rngs
        return out

    def save(self) -> Path:
        """Write the checkpoint (rank 0); every rank must call it (the expert shards are gathered)."""
        state = self.state_dict()
        if self.is_main:
            ckpt.save_atomic(state, self.checkpoint_path)
        if self.hooks.on_checkpoint is not None:
            self.hooks.on_checkpoint(self.step, self.checkpoint_path)
        return self.checkpoint_path

    def load(self, path: Path) -> None:
        """Resume from ``path`` (on every rank: each reads the file and keeps its expert shard)."""
        st = self.state
        state = ckpt.load(path, map_location="cpu")  # RNG states must stay CPU tensors
        layout = state.get("layout", {"world_size": 1, "dp_size": 1, "ep_size": 1})
        check_resumable(state.get("config", {}), to_dict(self.cfg), self.run_dir, saved_dp_size=layout["dp_size"], dp_size=st.dp_size)
        if self.ds is not None:  # through a one-process-layout AdamW into the engine (any ZeRO stage)
            optimizer = self.ds.blank_optimizer()
            load_full_state(self.model, optimizer, state["model"], state["optimizer"])
            self.ds.load_full_optimizer(optimizer)
        else:
            load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
            # load_state_dict brought back the checkpoint's weight decay, betas and eps; the
            # config resuming it may change them (as the DeepSpeed path, which loads the
            # per-parameter state alone, always did)
            for group, now in zip(self.optimizer.param_groups, optimizer_groups(self.model, self.cfg), strict=True):
                group.update({k: v for k, v in now.items() if k != "params"})
        rngs = state.get("rng_ranks") or [state["rng"]]
        if len(rngs) == st.world_size:
            ckpt.set_rng_state(rngs[st.rank])
        else:  # another world size: rank 0 goes on with rank 0's stream, the others start fresh ones
            ckpt.set_rng_state(rngs[0])
            if st.rank > 0:
                torch.manual_seed(_rank_seed(self.cfg.seed, st.rank, state["step"]))
        self.step = state["step"]
        self.wandb_id = state.get("wandb_id")
        self.last_metrics = state.get("last_metrics", {})

    # -- steps ------------------------------------------------------------------------------

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _forward(self, split: str, index: int, micro: int = 0) -> ModelOutput:
        """This rank's share of batch ``index``: in training, shard ``micro * dp_size + dp_rank``
        of ``batch_size * grad_accum * dp_size`` sequences; in eval, shard ``dp_rank`` of
        ``batch_size * dp_size`` (module docstring)."""
        c, st = self.cfg, self.state
        shards = st.dp_size * (c.grad_accum if split == "train" else 1)
        shard = micro * st.dp_size + st.dp_rank
        x, y = self.data.get_batch(split, index, c.batch_size, self.model_cfg.seq_len, c.seed, device=self.device, shard=shard, num_shards=shards)
        with self._autocast():
            return (self.ds.engine if self.ds is not None else self.model)(x, y)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation LM loss over a fixed set of batches (the same at every eval); every
        rank evaluates its shard of each batch, the mean is over all ranks' shards."""
        self.model.eval()
        losses = [self._forward("val", i).lm_loss.item() for i in range(self.cfg.eval_batches)]
        self.model.train()
        loss = sum(losses) / len(losses)
        if self.state.dp_size > 1:
            with self._collective():
                loss = mean_over_dp_(torch.tensor([loss], dtype=torch.float64, device=self.device), self.state).item()
        return loss

    @contextmanager
    def _collective(self):
        """Times a collective of the trainer's own into comm_seconds()."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._comm_seconds += time.perf_counter() - t0

    def comm_seconds(self) -> float:
        """Wall time spent in collectives so far (this rank): dispatchers plus the trainer's own."""
        return self._comm_seconds + sum(d.comm_seconds for d in self._dispatchers)

    def train_step(self, load: LoadAccumulator) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches.

        Raises TrainingDiverged, before the optimizer touches the weights, when the loss or the
        gradient norm is NaN/inf.  One host sync per step (the finite check and the logged values).
        """
        c, st = self.cfg, self.state
        ds = self.ds
        sums = torch.zeros(3, device=self.device)  # lm, aux, z: averaged over micro-batches
        for micro in range(c.grad_accum):
            out = self._forward("train", self.step, micro)
            if self._reducer is not None and micro == c.grad_accum - 1:
                self._reducer.arm()  # the step's last backward: buckets go out as they complete
            if ds is not None:  # the engine divides by grad_accum and reduces at the last micro-batch
                ds.backward(out.total_loss(c.moe))
                if micro < c.grad_accum - 1:
                    ds.micro_step()
            else:
                (out.total_loss(c.moe) / c.grad_accum).backward()
            sums += torch.stack([out.lm_loss.detach(), out.aux_loss.detach(), out.z_loss.detach()]).float() / c.grad_accum
            for block, la in zip(self.moe_blocks, out.layer_aux):
                load.add(block, la.counts_E, la.num_dropped, la.num_routed, la.aux_loss.detach(), la.z_loss.detach())
                failed = getattr(la, "failed", None)  # moe=hivemind: uid -> why, forward and backward
                if failed is not None:
                    load.add_failed(block, (u for u in (*failed, *la.backward_failed) if not u.startswith("<")))
        if st.dp_size > 1 and ds is None:
            with self._collective():  # the wait for what is still in flight (the exposed part)
                if self._reducer is not None:
                    self._reducer.finish()
                else:
                    allreduce_gradients(self.model, st)  # once per step, whatever grad_accum
        max_norm = c.optim.grad_clip if c.optim.grad_clip > 0 else float("inf")
        if ds is None or ds.stage == 0:  # ZeRO-1/2 clip inside the step, by the same global norm
            grad_norm = clip_grad_norm_(self.model, max_norm, st)
        else:
            grad_norm = torch.zeros(())
        vals = torch.cat([sums, grad_norm.detach().float().reshape(1).to(sums.device)])
        if st.dp_size > 1:  # one all-reduce: mean losses, the norm (the same everywhere), any rank's Ctrl-C
            stop = float(self._stop is not None and self._stop.requested)
            with self._collective():
                vals = sum_over_dp_(torch.cat([vals, vals.new_tensor([stop])]), st)
            self._stop_agreed = bool(vals[4] > 0)
            vals = vals[:4] / st.dp_size
        lm, aux, z, gn = vals.tolist()
        self._check_finite(lm, aux, z, gn)  # the same values on every rank: all raise together
        lr = lr_at(self.step, c)
        if ds is not None:
            ds.step(lr)
            zero_norm = ds.grad_norm()
            if zero_norm is not None:  # ZeRO-1/2: known once the step is taken (the same on every rank)
                gn = float(zero_norm)
                self._check_finite(lm, aux, z, gn)  # (this step is applied already, and not saved)
        else:
            set_lr(self.optimizer.param_groups, lr)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=False)  # reuse gradient buffers (see experts._GroupedMM)
        self.step += 1
        return {"train/loss": lm, "train/aux_loss": aux, "train/z_loss": z, "train/lr": lr, "train/grad_norm": gn}

    def _check_finite(self, lm: float, aux: float, z: float, gn: float) -> None:
        """Raise TrainingDiverged unless every value is finite."""
        if all(math.isfinite(v) for v in (lm, aux, z, gn)):
            return
        kept = f"the last good checkpoint is kept at {self.checkpoint_path}" if self.checkpoint_path.exists() else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"training diverged at step {self.step + 1}: lm loss {lm}, aux {aux}, z {z}, grad norm {gn}; {kept}. "
            f"Lower optim.lr, raise optim.warmup_steps or set moe.z_loss_weight=0.001"
        )

    # -- the loop ---------------------------------------------------------------------------

    def fit(self, *, stop_after: int | None = None) -> RunResult:
        """Train to ``cfg.steps`` (resuming from the run directory's checkpoint when allowed).

        ``stop_after`` ends this call after that many steps, as if the process were killed
        right after a checkpoint: used to test resumption.
        """
        c, st = self.cfg, self.state
        resumed = False
        metrics_path = self.run_dir / "metrics.jsonl"
        found = c.resume and self.checkpoint_path.exists()
        if count_over_world(found, st) not in (0, st.world_size):
            raise ConfigError(f"out_dir={c.out_dir}: some ranks see {CHECKPOINT} and some do not; out_dir must be on a filesystem every node sees")
        if found:
            self.load(self.checkpoint_path)
            resumed = True
            if self.is_main:  # records logged after the checkpoint are about to be redone
                _truncate_jsonl(metrics_path, self.step)
        elif self.is_main:  # a fresh start: records of an earlier run that never checkpointed go
            metrics_path.unlink(missing_ok=True)
            if not c.resume:
                self.checkpoint_path.unlink(missing_ok=True)
        # peak of one process (measured on rank 0 only: the ranks would share the cores), times the ranks
        peak = c.peak_flops or broadcast_object(measure_peak_flops(self.device, self.dtype, seconds=0.5, n=2048) if st.rank == 0 else None, st)
        peak_all = peak * st.world_size
        logger = MetricsLogger(self.run_dir, c.logger, run_config=to_dict(c), is_main=self.is_main, run_name=c.run_name, resume_id=self.wandb_id)
        self.wandb_id = logger.wandb_run_id
        if self.is_main:  # the run's full config beside its metrics, for moe-dash and for people
            _write_text_atomic(self.run_dir / "config.json", json.dumps(to_dict(c), indent=2, default=str))
        tokens_per_step = c.batch_size * c.grad_accum * st.dp_size * self.model_cfg.seq_len  # every rank's
        load = LoadAccumulator()
        history: list[dict[str, float]] = []
        val_loss = float("nan")
        if self.is_main:
            logger.log(self.step, {"perf/peak_flops": peak, "perf/flops_per_token": self.flops_per_token, **{f"params/{k}": v for k, v in self.params.items()}})
            if resumed and self.step >= c.steps:
                print(f"{self.run_dir} already finished {self.step} steps; re-evaluating. Raise steps= to train on, or resume=false to start over", file=sys.stderr)
            elif resumed:
                print(f"resumed from {self.checkpoint_path} at step {self.step}", file=sys.stderr)
        end = c.steps if stop_after is None else min(c.steps, self.step + stop_after)
        bar = _progress(self.step, c.steps, enabled=self.is_main and c.logger.progress)
        window_t, window_steps = time.perf_counter(), 0
        window_comm = self.comm_seconds()
        window: dict[str, float] = {}  # train/* sums over the log window
        exit_code = 1
        stopping = False  # at the end of a step, the run stops there (Ctrl-C on some rank)
        stop = self._stop = _StopFlag()
        try:
            while self.step < end:
                step_metrics = self.train_step(load)
                stopping = stop.requested if st.dp_size == 1 else self._stop_agreed  # all ranks agree
                for k, v in step_metrics.items():
                    window[k] = window.get(k, 0.0) + v
                window_steps += 1
                if bar is not None:
                    bar.update(1)
                if self.step % c.logger.log_every == 0 or self.step == end or stopping:
                    if st.dp_size > 1:
                        with self._collective():
                            load.merge_ranks(lambda t: sum_over_dp_(t, st), st.dp_size)  # the global load
                    dt = time.perf_counter() - window_t
                    tps = window_steps * tokens_per_step / dt
                    metrics = {k: v / window_steps for k, v in window.items()}
                    metrics["train/lr"] = step_metrics["train/lr"]
                    metrics.update({
                        "perf/tokens_per_s": tps,
                        "perf/step_time_s": dt / window_steps,
                        "perf/mfu": mfu(tps, self.flops_per_token, peak_all),
                        "perf/comm_time_s": (self.comm_seconds() - window_comm) / window_steps,  # rank 0's, per step
                    })
                    metrics.update(load.summary())
                    self.last_metrics = metrics
                    history.append({"step": self.step, **{k: v for k, v in metrics.items() if not k.startswith("moe/")}})
                    logger.log(self.step, metrics)
                    if self.hooks.on_log is not None:
                        self.hooks.on_log(self.step, metrics)
                    if bar is not None:
                        bar.set_postfix_str(_postfix(metrics))
                    load.reset()
                    window.clear()
                    window_steps = 0
                    window_comm = self.comm_seconds()
                pause, pause_comm = time.perf_counter(), self.comm_seconds()  # eval and checkpoint time stay out of tokens/s
                if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                    val_loss = self.evaluate()
                    logger.log(self.step, {"val/loss": val_loss})
                    logger.log_expert_load(self.step, LoadAccumulator.fracs_from_summary(self.last_metrics))  # the latest log window's
                    if self.hooks.on_log is not None:
                        self.hooks.on_log(self.step, {"val/loss": val_loss})
                    if bar is not None:
                        bar.write(f"step {self.step}: val loss {val_loss:.4f}")
                if stopping or (c.ckpt_every and self.step % c.ckpt_every == 0 and self.step < c.steps):
                    self.save()
                if stopping:
                    raise KeyboardInterrupt
                window_t = time.perf_counter() if window_steps == 0 else window_t + (time.perf_counter() - pause)
                window_comm += self.comm_seconds() - pause_comm
            if self.step >= c.steps:
                val_loss = self.evaluate()
                logger.log(self.step, {"val/loss": val_loss})
                logger.log_expert_load(self.step, LoadAccumulator.fracs_from_summary(self.last_metrics))
                if self.hooks.on_log is not None:
                    self.hooks.on_log(self.step, {"val/loss": val_loss})
            self.save()
            exit_code = 0
        except KeyboardInterrupt:
            if stopping and self.is_main:  # Ctrl-C was deferred to the end of a step: the state is whole
                print(f"\ninterrupted: checkpoint at step {self.step} in {self.checkpoint_path}; run the same command with resume=true to go on", file=sys.stderr)
            raise
        finally:
            stop.restore()
            self._stop = None
            if bar is not None:
                bar.close()
            if exit_code == 0:
                result = self._result(self.last_metrics, val_loss, logger, history)
                logger.summary(_summary_metrics(result))
            logger.close(exit_code=exit_code)
        return result

    def _result(self, last, val_loss, logger, history) -> RunResult:
        layer_load = {}
        for i in self.moe_blocks:
            p = f"moe/layer_{i}/"
            fracs = [v for k, v in sorted(last.items(), key=lambda kv: _expert_index(kv[0])) if k.startswith(p + "frac_e")]
            layer_load[i] = {"cv": last.get(p + "cv", float("nan")), "max_over_mean": last.get(p + "max_over_mean", float("nan")), "dropped_frac": last.get(p + "dropped_frac", float("nan")), "frac": fracs}
        return RunResult(
            step=self.step,
            train_loss=last.get("train/loss", float("nan")),
            val_loss=val_loss,
            tokens_per_s=last.get("perf/tokens_per_s", float("nan")),
            mfu=last.get("perf/mfu", float("nan")),
            layer_load=layer_load,
            run_dir=self.run_dir,
            checkpoint=self.checkpoint_path,
            metrics=self.run_dir / "metrics.jsonl",
            wandb_dir=logger.wandb_dir,
            params=self.params,
            history=history,
        )


class _StopFlag:
    """The first Ctrl-C asks the loop to stop after the current step (and checkpoint there);
    a second one interrupts at once.  A no-op off the main thread, and where SIGINT is
    ignored (e.g. under nohup) or handled by someone else."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        print("\nstopping after this step (Ctrl-C again to abort at once)", file=sys.stderr)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


# Keys that may differ between a checkpoint's run and the run resuming it.  parallel.*: a
# checkpoint holds the whole model whatever the layout (moe.parallel.reshard); batch_size and
# grad_accum: only the global batch (batch_size x grad_accum x data-parallel ranks) counts.
# optim.expert_lr_scale may not (it splits the optimizer's groups, and a checkpoint's groups
# bring their own lr_scale back with them).
RESUME_FIXED_KEYS = ("optim.expert_lr_scale",)
RESUME_FREE_KEYS = ("steps", "resume", "out_dir", "run_name", "eval_every", "eval_batches", "ckpt_every", "threads", "peak_flops", "device", "logger", "optim", "data.cache_dir", "parallel", "batch_size", "grad_accum")


def check_resumable(saved: dict, current: dict, run_dir: Path, *, saved_dp_size: int = 1, dp_size: int = 1) -> None:
    """A checkpoint is resumed only by the config that wrote it (schedule, logging,
    evaluation and the parallel layout may change, the global batch may not); anything else
    is a one-line ConfigError naming the keys."""
    a, b = flatten(saved), flatten(current)
    # A key the checkpoint does not have, at its default now, came with a newer version of
    # this package: the run that wrote the checkpoint behaved as the default does.
    defaults = flatten(to_dict(TrainConfig()))
    added = {k for k in set(b) - set(a) if k in defaults and b[k] == defaults[k]}
    diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in added and (k in RESUME_FIXED_KEYS or not any(k == f or k.startswith(f + ".") for f in RESUME_FREE_KEYS))]
    def global_batch(d: dict, dp: int) -> tuple[int, str]:
        bs, ga = d.get("batch_size", 0), d.get("grad_accum", 1)
        return bs * ga * dp, f"{bs}x{ga}x{dp}={bs * ga * dp}"

    (n_saved, saved_how), (n_now, now_how) = global_batch(a, saved_dp_size), global_batch(b, dp_size)
    if n_saved != n_now:
        diff.insert(0, f"global batch (batch_size x grad_accum x data-parallel ranks): {saved_how} -> {now_how}")
    if diff:
        shown = ", ".join(diff[:4]) + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")
        raise ConfigError(f"{run_dir} holds a checkpoint of another config ({shown}); pass run_name=NEW_NAME for a new run, or resume=false to start this one over")


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop records past ``step`` (logged after the checkpoint, about to be redone); atomic."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the crash
        if rec.get("type") != "summary" and rec.get("step", 0) <= step:
            kept.append(line)
    _write_text_atomic(path, "".join(k + "\n" for k in kept))


def _write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside ``path``, then rename it over: readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _expert_index(key: str) -> int:
    tail = key.rsplit("frac_e", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else -1


def _summary_metrics(r: RunResult) -> dict[str, float]:
    out = {"final/train_loss": r.train_loss, "final/val_loss": r.val_loss, "final/tokens_per_s": r.tokens_per_s, "final/mfu": r.mfu, "final/step": r.step}
    for i, ld in r.layer_load.items():
        out[f"final/layer_{i}/cv"] = ld["cv"]
    return out


def _postfix(m: dict[str, float]) -> str:
    cvs = [v for k, v in m.items() if k.endswith("/cv")]
    drops = [v for k, v in m.items() if k.endswith("/dropped_frac")]
    s = f"loss {m['train/loss']:.3f} | {m['perf/tokens_per_s']:,.0f} tok/s"
    if cvs:
        s += f" | load cv {max(cvs):.2f}"
    if drops:
        s += f" | dropped {100 * max(drops):.1f}%"
    return s


def _progress(initial: int, total: int, *, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


def format_summary(r: RunResult) -> str:
    """The end-of-run report printed by ``moe-train``."""
    lines = [
        "",
        f"done: {r.step} steps",
        f"  train loss {r.train_loss:.4f}   val loss {r.val_loss:.4f}",
        f"  throughput {r.tokens_per_s:,.0f} tokens/s   MFU {100 * r.mfu:.1f}% (of the matmul peak measured at start-up)"
        + ("\n  MFU above 100%: the start-up peak was measured while the machine was busy; pass peak_flops= for a fixed one" if r.mfu > 1 else ""),
        f"  parameters {r.params['total']:,} total, {r.params['active_non_embedding']:,} active non-embedding per token",
    ]
    if r.layer_load:
        lines.append("  expert load (fraction of tokens per expert, last log interval):")
        for i, ld in r.layer_load.items():
            fr = " ".join(f"{f:.2f}" for f in ld["frac"])
            lines.append(f"    block {i}: cv {ld['cv']:.3f}  max/mean {ld['max_over_mean']:.2f}  dropped {100 * ld['dropped_frac']:.1f}%  [{fr}]")
    lines += [
        f"  checkpoint  {r.checkpoint}",
        f"  metrics     {r.metrics}",
        f"  W&B run     {r.wandb_dir if r.wandb_dir else 'off'}" + ("   (offline: `wandb sync` it to upload)" if r.wandb_dir else ""),
    ]
    return "\n".join(lines)


def train(cfg: TrainConfig) -> RunResult:
    with Trainer(cfg) as trainer:
        return trainer.fit()


def _start_swarm_dht(cfg: TrainConfig):
    """This trainer's DHT peer for ``moe=hivemind``: joins ``moe.initial_peers`` (none: a new
    swarm), listens on ``moe.host_maddrs`` (loopback by default), NAT mapping and auto-NAT off,
    and checks signed expert records with the run's validators (``moe.swarm.records``)."""
    from moe.swarm.records import record_validators
    from moe.swarm.server import start_dht

    m = cfg.moe
    try:
        return start_dht(m.initial_peers, host_maddrs=m.host_maddrs, record_validators=record_validators(m.uid_prefix))
    except Exception as e:
        peers = ", ".join(m.initial_peers) or "none"
        raise ConfigError(f"moe.initial_peers: could not join the swarm (initial peers: {peers}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; check that a peer is running there (moe-join prints its address)") from None

