"""The training loop on one process: data -> model -> loss -> AdamW, with eval, checkpoints,
exact resume and telemetry.

Exact resume: the batch for step s is a pure function of (seed, s) (``TokenData.get_batch``),
and the checkpoint holds the model, optimizer and every RNG state (the learning rate is a
function of the step), so a run
resumed from step s computes bit-identical losses to one that never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe import checkpoint as ckpt
from moe.config import ConfigError, TrainConfig, to_dict, validate
from moe.data import TokenData, load_data
from moe.experts import GroupedExperts
from moe.flops import measure_peak_flops, mfu, transformer_flops_per_token
from moe.model import ModelOutput, TransformerLM, count_parameters
from moe.sinks import MetricsLogger
from moe.telemetry import LoadAccumulator

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


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices (incl. stacked expert weights and the router) decay, norms and biases don't."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


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


class Trainer:
    """Runs ``TrainConfig`` on one device.  Build, then ``fit()``.

    Args:
        cfg: the whole run's configuration (validated here, before anything is built).
        data: token data; loaded from ``cfg.data`` when None.
        is_main: this process logs and writes checkpoints (rank 0 in a multi-rank run).
    """

    def __init__(self, cfg: TrainConfig, *, data: TokenData | None = None, is_main: bool = True):
        validate(cfg)
        self.cfg = cfg
        self.is_main = is_main
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.run_dir = Path(cfg.out_dir)
        self.data = data if data is not None else load_data(cfg.data, progress=cfg.logger.progress and is_main)
        vocab = cfg.model.vocab_size or self.data.vocab_size
        if vocab < self.data.vocab_size:
            raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {self.data.vocab_size}; set model.vocab_size=0 to take it from the tokenizer")
        self.model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
        for split in ("train", "val"):
            n = len(getattr(self.data, split))
            if n < self.model_cfg.seq_len + 1:
                raise ConfigError(f"data: the {split} split has {n} tokens, fewer than model.seq_len+1={self.model_cfg.seq_len + 1}; lower model.seq_len, raise data.val_fraction or add data")
        torch.manual_seed(cfg.seed)
        self.model = TransformerLM(self.model_cfg, cfg.moe).to(self.device)
        for m in self.model.modules():  # we only ever .backward() and zero .grad in place
            if isinstance(m, GroupedExperts):
                m.grad_into_buffers = True
        self.optimizer = build_optimizer(self.model, cfg)
        self.step = 0
        self.wandb_id: str | None = None
        self.last_metrics: dict[str, float] = {}  # the latest logged train metrics
        self.params = count_parameters(self.model)
        # FLOPs per token: active non-embedding params plus the output projection.
        n_flops = self.params["active_non_embedding"] + self.params["lm_head_flop_params"]
        self.flops_per_token = transformer_flops_per_token(n_flops, self.model_cfg.n_layers, self.model_cfg.d_model, self.model_cfg.seq_len)
        self.moe_blocks = self.model.moe_layers()

    # -- state ------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": ckpt.rng_state(),
            "config": to_dict(self.cfg),
            "wandb_id": self.wandb_id,
            "last_metrics": self.last_metrics,
        }

    def save(self) -> Path:
        if self.is_main:
            ckpt.save_atomic(self.state_dict(), self.checkpoint_path)
        return self.checkpoint_path

    def load(self, path: Path) -> None:
        state = ckpt.load(path, map_location="cpu")  # RNG states must stay CPU tensors
        check_resumable(state.get("config", {}), to_dict(self.cfg), self.run_dir)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]
        self.wandb_id = state.get("wandb_id")
        self.last_metrics = state.get("last_metrics", {})

    # -- steps ------------------------------------------------------------------------------

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _forward(self, split: str, index: int) -> ModelOutput:
        c = self.cfg
        x, y = self.data.get_batch(split, index, c.batch_size, self.model_cfg.seq_len, c.seed, device=self.device)
        with self._autocast():
            return self.model(x, y)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation LM loss over a fixed set of batches (the same at every eval)."""
        self.model.eval()
        losses = [self._forward("val", i).lm_loss.item() for i in range(self.cfg.eval_batches)]
        self.model.train()
        return sum(losses) / len(losses)

    def train_step(self, load: LoadAccumulator) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches.

        Raises TrainingDiverged, before the optimizer touches the weights, when the loss or the
        gradient norm is NaN/inf.  One host sync per step (the finite check and the logged values).
        """
        c = self.cfg
        sums = torch.zeros(3, device=self.device)  # lm, aux, z: averaged over micro-batches
        for micro in range(c.grad_accum):
            out = self._forward("train", self.step * c.grad_accum + micro)
            (out.total_loss(c.moe) / c.grad_accum).backward()
            sums += torch.stack([out.lm_loss.detach(), out.aux_loss.detach(), out.z_loss.detach()]).float() / c.grad_accum
            for block, la in zip(self.moe_blocks, out.layer_aux):
                load.add(block, la.counts_E, la.num_dropped, la.num_routed, la.aux_loss.detach(), la.z_loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.optim.grad_clip if c.optim.grad_clip > 0 else float("inf"))
        lm, aux, z, gn = torch.cat([sums, grad_norm.detach().float().reshape(1).to(sums.device)]).tolist()
        if not all(math.isfinite(v) for v in (lm, aux, z, gn)):
            kept = f"the last good checkpoint is kept at {self.checkpoint_path}" if self.checkpoint_path.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1}: lm loss {lm}, aux {aux}, z {z}, grad norm {gn}; {kept}. "
                f"Lower optim.lr, raise optim.warmup_steps or set moe.z_loss_weight=0.001"
            )
        lr = lr_at(self.step, c)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # reuse gradient buffers (see experts._GroupedMM)
        self.step += 1
        return {"train/loss": lm, "train/aux_loss": aux, "train/z_loss": z, "train/lr": lr, "train/grad_norm": gn}

    # -- the loop ---------------------------------------------------------------------------

    def fit(self, *, stop_after: int | None = None) -> RunResult:
        """Train to ``cfg.steps`` (resuming from the run directory's checkpoint when allowed).

        ``stop_after`` ends this call after that many steps, as if the process were killed
        right after a checkpoint: used to test resumption.
        """
        c = self.cfg
        resumed = False
        metrics_path = self.run_dir / "metrics.jsonl"
        if c.resume and self.checkpoint_path.exists():
            self.load(self.checkpoint_path)
            resumed = True
            if self.is_main:  # records logged after the checkpoint are about to be redone
                _truncate_jsonl(metrics_path, self.step)
        elif self.is_main:  # a fresh start: records of an earlier run that never checkpointed go
            metrics_path.unlink(missing_ok=True)
            if not c.resume:
                self.checkpoint_path.unlink(missing_ok=True)
        peak = c.peak_flops or measure_peak_flops(self.device, self.dtype, seconds=0.5, n=2048)
        logger = MetricsLogger(self.run_dir, c.logger, run_config=to_dict(c), is_main=self.is_main, run_name=c.run_name, resume_id=self.wandb_id)
        self.wandb_id = logger.wandb_run_id
        if self.is_main:  # the run's full config beside its metrics, for moe-dash and for people
            _write_json_atomic(self.run_dir / "config.json", to_dict(c))
        tokens_per_step = c.batch_size * c.grad_accum * self.model_cfg.seq_len
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
        window: dict[str, float] = {}  # train/* sums over the log window
        exit_code = 1
        stop = _StopFlag()
        try:
            while self.step < end:
                step_metrics = self.train_step(load)
                for k, v in step_metrics.items():
                    window[k] = window.get(k, 0.0) + v
                window_steps += 1
                if bar is not None:
                    bar.update(1)
                if self.step % c.logger.log_every == 0 or self.step == end or stop.requested:
                    dt = time.perf_counter() - window_t
                    tps = window_steps * tokens_per_step / dt
                    metrics = {k: v / window_steps for k, v in window.items()}
                    metrics["train/lr"] = step_metrics["train/lr"]
                    metrics.update({
                        "perf/tokens_per_s": tps,
                        "perf/step_time_s": dt / window_steps,
                        "perf/mfu": mfu(tps, self.flops_per_token, peak),
                        "perf/comm_time_s": 0.0,  # one process: no collectives
                    })
                    metrics.update(load.summary())
                    self.last_metrics = metrics
                    history.append({"step": self.step, **{k: v for k, v in metrics.items() if not k.startswith("moe/")}})
                    logger.log(self.step, metrics)
                    if bar is not None:
                        bar.set_postfix_str(_postfix(metrics))
                    load.reset()
                    window.clear()
                    window_steps = 0
                pause = time.perf_counter()  # eval and checkpoint time stay out of tokens/s
                if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                    val_loss = self.evaluate()
                    logger.log(self.step, {"val/loss": val_loss})
                    logger.log_expert_load(self.step, LoadAccumulator.fracs_from_summary(self.last_metrics))  # the latest log window's
                    if bar is not None:
                        bar.write(f"step {self.step}: val loss {val_loss:.4f}")
                if stop.requested or (c.ckpt_every and self.step % c.ckpt_every == 0 and self.step < c.steps):
                    self.save()
                if stop.requested:
                    raise KeyboardInterrupt
                window_t = time.perf_counter() if window_steps == 0 else window_t + (time.perf_counter() - pause)
            if self.step >= c.steps:
                val_loss = self.evaluate()
                logger.log(self.step, {"val/loss": val_loss})
                logger.log_expert_load(self.step, LoadAccumulator.fracs_from_summary(self.last_metrics))
            self.save()
            exit_code = 0
        except KeyboardInterrupt:
            if stop.requested:  # Ctrl-C was deferred to the end of a step: the state is whole
                print(f"\ninterrupted: checkpoint at step {self.step} in {self.checkpoint_path}; run the same command with resume=true to go on", file=sys.stderr)
            raise
        finally:
            stop.restore()
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


# Keys that may differ between a checkpoint's run and the run resuming it.
RESUME_FREE_KEYS = ("steps", "resume", "out_dir", "run_name", "eval_every", "eval_batches", "ckpt_every", "threads", "peak_flops", "device", "logger", "optim", "data.cache_dir")


def check_resumable(saved: dict, current: dict, run_dir: Path) -> None:
    """A checkpoint is resumed only by the config that wrote it (schedule, logging and
    evaluation may change); anything else is a one-line ConfigError naming the keys."""
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    a, b = dict(flat(saved)), dict(flat(current))
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not any(k == f or k.startswith(f + ".") for f in RESUME_FREE_KEYS)]
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4]) + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, path)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
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
        f"  throughput {r.tokens_per_s:,.0f} tokens/s   MFU {100 * r.mfu:.1f}% (of the matmul peak measured at start-up)",
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
    return Trainer(cfg).fit()

