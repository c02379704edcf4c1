"""The training loop: the schedule, evaluation, checkpoints and their resume rules, logging, the
progress bar, Ctrl-C and the run's result, for every way of running a step.

How a step runs is the :class:`~moe.training.backend.Backend`'s: one process (the default),
data + expert parallel ranks (``moe.parallel.ddp``, also under Ray), DeepSpeed's engine or its
pipeline stages (``moe.parallel``).  The loop calls the same methods on each and has no
branch for any of them.

Exact resume: the batch for step s is a pure function of (seed, s) (``TokenData.get_batch``),
and the checkpoint holds the model, optimizer and every RNG state (the learning rate is a
function of the step, ``moe.training.optim.lr_at``), so a run resumed from step s computes
bit-identical losses to one that never stopped.

Several ranks: every rank builds a Trainer and calls ``fit()`` in step.  The logged losses and
the gradient norm are averaged over the replicas in one small all-reduce and the finite check
reads those values, so every rank takes the same decision and none steps alone.  Only the
main rank logs and writes; the expert-load counts are summed over the ranks before each log,
tokens/s counts every rank's tokens, and ``perf/comm_time_s`` is the main rank's wall time
per step in collectives (all-to-all, gradient and metric all-reduces).  Checkpoints hold the
whole model in the one-process format (``moe.parallel.reshard``): any expert-parallel size
resumes any other's.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe.config import ConfigError, TrainConfig, to_dict, validate
from moe.training.backend import Backend
from moe.training.checkpoint import check_resumable
from moe.training.data import TOKENIZER_FILE, TokenData
from moe.training.files import remove_stale_temporaries, write_text_atomic
from moe.training.flops import Peak, machine_peak, mfu, transformer_flops_per_token
from moe.training.interrupt import StopFlag
from moe.training.optim import lr_at
from moe.training.report import RunResult, dead_layer_hint, layer_load, postfix, progress_bar, summary_metrics
from moe.training.sinks import MetricsLogger, last_logged, truncate_jsonl, wandb_dirs
from moe.training.telemetry import LoadAccumulator


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is left in place."""


@dataclass
class TrainerHooks:
    """A caller's view of the run, called on every rank, in step (Ray Train's report is
    collective, so every worker must call it).  ``on_log(step, metrics)`` after each train log
    and each eval (``{"val/loss": ...}``); ``on_checkpoint(step, path)`` after each checkpoint
    is written (the file exists on the main rank's filesystem)."""

    on_log: Callable[[int, dict[str, float]], None] | None = None
    on_checkpoint: Callable[[int, Path], None] | None = None


class Trainer:
    """Runs ``TrainConfig`` to ``cfg.steps``.  Build, then ``fit()``.

    Args:
        cfg: the whole run's configuration (validated here, before anything is built).
        data: token data for the default one-process backend; loaded from ``cfg.data`` when None.
        backend: how this process runs a step (built for ``cfg``); default one process on
            ``cfg.device`` (:class:`~moe.training.backend.Backend`).  With several ranks every
            rank builds its backend and a Trainer and calls ``fit()`` in step.
        hooks: called on every rank as the run logs and checkpoints (:class:`TrainerHooks`).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        data: TokenData | None = None,
        backend: Backend | None = None,
        hooks: TrainerHooks | None = None,
    ):
        validate(cfg)
        if backend is not None and data is not None:
            raise ValueError("pass data= to the backend, not to the Trainer, when you build the backend yourself")
        if backend is not None and backend.cfg is not cfg:
            raise ValueError("the backend was built for another config; build it from the one the Trainer gets")
        self.cfg = cfg
        self.backend = backend if backend is not None else Backend(cfg, data=data)
        self.hooks = hooks or TrainerHooks()
        self.is_main = self.backend.is_main
        self.run_dir = Path(cfg.out_dir)
        self.step = 0
        self.wandb_id: str | None = None
        self.last_metrics: dict[str, float] = {}  # the latest logged train metrics
        b = self.backend
        # FLOPs per token: active non-embedding params plus the output projection.
        n_flops = b.params["active_non_embedding"] + b.params["lm_head_flop_params"]
        self.flops_per_token = transformer_flops_per_token(
            n_flops, b.model_cfg.n_layers, b.model_cfg.d_model, b.model_cfg.seq_len
        )
        self._stop: StopFlag | None = None
        self.dead_layers: dict[int, str] = {}  # block -> why it served no token (the latest log window)
        self._dead_windows: dict[int, int] = {}

    @property
    def model(self) -> torch.nn.Module:
        return self.backend.model

    @property
    def params(self) -> dict[str, int]:
        return self.backend.params

    def close(self) -> None:
        """Release what the backend started (``moe=hivemind``: leave the swarm).  Idempotent;
        ``moe-train`` calls it at exit, however the run ends."""
        self.backend.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one step ---------------------------------------------------------------------------------

    def train_step(self, load: LoadAccumulator) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches.

        Raises TrainingDiverged, before the optimizer touches the weights, when the loss or the
        gradient norm is NaN/inf (a backend whose engine steps inside its forward-backward, the
        pipeline, checks after).  One host sync per step (the finite check and the logged values).
        """
        b, c = self.backend, self.cfg
        lr = lr_at(self.step, c)
        b.set_lr(lr)
        losses = b.forward_backward(self.step, load)
        b.reduce_gradients()
        norm = b.clip_gradients(c.optim.grad_clip if c.optim.grad_clip > 0 else float("inf"))
        stop = float(self._stop is not None and self._stop.requested)
        known = norm is not None
        vals = torch.cat(
            [
                losses.float(),
                (norm.detach().float().reshape(1) if known else torch.zeros(1)).to(losses.device),
                losses.new_tensor([stop]),
            ]
        )
        vals = b.sum_over_replicas_(
            vals
        )  # one all-reduce: mean losses, the norm (the same everywhere), any rank's Ctrl-C
        self._stop_agreed = bool(vals[4] > 0)
        lm, aux, z, gn = (vals[:4] / b.replicas).tolist()
        self._check_finite(lm, aux, z, gn if known else 0.0)  # the same values on every rank: all raise together
        after = b.optimizer_step()
        if after is not None:  # ZeRO-1/2, the pipeline: the norm is known once the step is taken
            gn, known = float(after), True
            self._check_finite(lm, aux, z, gn)  # (this step is applied already, and not saved)
        b.update_expert_bias()
        self.step += 1
        out = {"train/loss": lm, "train/aux_loss": aux, "train/z_loss": z, "train/lr": lr}
        if known:
            out["train/grad_norm"] = gn
        return out

    def _check_finite(self, lm: float, aux: float, z: float, gn: float) -> None:
        """Raise TrainingDiverged unless every value is finite."""
        if all(math.isfinite(v) for v in (lm, aux, z, gn)):
            return
        path = self.backend.checkpoint_path(self.run_dir)
        kept = f"the last good checkpoint is kept at {path}" if path.exists() else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"training diverged at step {self.step + 1}: lm loss {lm}, aux {aux}, z {z}, grad norm {gn}; {kept}. "
            f"Lower optim.lr, raise optim.warmup_steps or set moe.z_loss_weight=0.001"
        )

    def evaluate(self) -> float:
        """Mean validation LM loss over ``eval_batches`` fixed batches (the same at every eval),
        over every replica's shard."""
        return self.backend.evaluate(self.cfg.eval_batches)

    def comm_seconds(self) -> float:
        """Wall time this rank spent in collectives so far (the backend counts them)."""
        return self.backend.comm_seconds()

    # -- checkpoints ------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.backend.checkpoint_path(self.run_dir)

    def save(self) -> Path:
        """Write the checkpoint (the main rank writes; every rank must call it)."""
        meta = {
            "step": self.step,
            "config": to_dict(self.cfg),
            "wandb_id": self.wandb_id,
            "last_metrics": self.last_metrics,
        }
        path = self.backend.save_checkpoint(self.run_dir, meta)
        if self.hooks.on_checkpoint is not None:
            self.hooks.on_checkpoint(self.step, path)
        return path

    def _resume(self) -> bool:
        """Load the run directory's checkpoint when there is one and ``resume`` allows; checks
        first that every rank sees it and that this config may resume it (one-line ConfigErrors,
        the same on every rank)."""
        c, b = self.cfg, self.backend
        found = c.resume and self.checkpoint_path.exists()
        if b.count_ranks(found) not in (0, b.world_size):
            raise ConfigError(
                f"out_dir={c.out_dir}: some ranks see {self.checkpoint_path.name} and some do not; "
                "out_dir must be on a filesystem every node sees"
            )
        if not found:
            return False
        state = b.open_checkpoint(self.run_dir)
        layout = state.get("layout", {"world_size": 1, "dp_size": 1, "ep_size": 1})
        check_resumable(
            state.get("config", {}), to_dict(c), self.run_dir, saved_dp_size=layout["dp_size"], dp_size=b.replicas
        )
        b.restore(state)
        self.step = state["step"]
        self.wandb_id = state.get("wandb_id")
        self.last_metrics = state.get("last_metrics", {})
        return True

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self, *, stop_after: int | None = None) -> RunResult | None:
        """Train to ``cfg.steps`` (resuming from the run directory's checkpoint when allowed);
        the :class:`RunResult` on the main rank, None on the others.  A run that finished
        already reports its result and writes nothing.

        ``stop_after`` ends this call after that many steps, as if the process were killed
        right after a checkpoint: used to test resumption.
        """
        c, b = self.cfg, self.backend
        if self.is_main:  # a save killed halfway left its temporary: ours, its writer gone
            for tmp in remove_stale_temporaries(self.run_dir):
                print(f"removed {tmp.name}, left by a save that was killed", file=sys.stderr)
        resumed = self._resume()
        if resumed and self.step >= c.steps:
            return self._finished() if self.is_main else None
        logger, peak = self._start(resumed)
        tokens_per_step = c.batch_size * c.grad_accum * b.replicas * b.model_cfg.seq_len  # every replica's
        end = c.steps if stop_after is None else min(c.steps, self.step + stop_after)
        load, window, history = LoadAccumulator(), _Window(self, Peak(peak.flops * b.world_size, peak.source)), []
        val_loss = float("nan")
        bar = progress_bar(self.step, c.steps, enabled=self.is_main and c.logger.progress)
        exit_code, result = 1, None
        stopping = False  # at the end of a step, the run stops there (Ctrl-C on some rank)
        self._stop, self._stop_agreed = StopFlag(), False
        try:
            while self.step < end:
                window.add(self.train_step(load))
                # several ranks stop on what the step's all-reduce carried, so all agree; one alone at once
                stopping = self._stop_agreed if b.world_size > 1 else self._stop.requested
                if bar is not None:
                    bar.update(1)
                if self.step % c.logger.log_every == 0 or self.step == end or stopping:
                    metrics = {**window.metrics(tokens_per_step, self.flops_per_token), **b.load_summary(load)}
                    self._watch_dead_layers(metrics, load, bar)
                    load.reset()
                    self.last_metrics = metrics
                    history.append(
                        {"step": self.step, **{k: v for k, v in metrics.items() if not k.startswith("moe/")}}
                    )
                    self._log(logger, metrics)
                    if bar is not None:
                        bar.set_postfix_str(postfix(metrics))
                with window.paused():  # eval and checkpoint time stay out of tokens/s
                    if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                        val_loss = self._log_eval(logger)
                        if bar is not None:
                            bar.write(f"step {self.step}: val loss {val_loss:.4f}")
                    if stopping or (c.ckpt_every and self.step % c.ckpt_every == 0 and self.step < c.steps):
                        self.save()
                if stopping:
                    raise KeyboardInterrupt
            if self.step >= c.steps:
                val_loss = self._log_eval(logger)
            self.save()
            exit_code = 0
        except KeyboardInterrupt:
            if stopping and self.is_main:  # Ctrl-C was deferred to the end of a step: the state is whole
                print(
                    f"\ninterrupted: checkpoint at step {self.step} in {self.checkpoint_path}; run the "
                    "same command with resume=true to go on",
                    file=sys.stderr,
                )
            raise
        finally:
            self._stop.restore()
            self._stop = None
            if bar is not None:
                bar.close()
            if exit_code == 0 and self.is_main:
                result = self._result(val_loss, logger.wandb_dir, history, peak)
                logger.summary(summary_metrics(result))
            logger.close(exit_code=exit_code)
        return result

    def _start(self, resumed: bool) -> tuple[MetricsLogger, Peak]:
        """Before the first step: the metrics file made consistent with the checkpoint, the peak
        FLOP/s MFU is measured against, the sinks, the run's config beside its metrics."""
        c, b = self.cfg, self.backend
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resumed:  # records logged after the checkpoint are about to be redone
                truncate_jsonl(metrics_path, self.step)
            else:  # a fresh start: records of an earlier run that never checkpointed go
                metrics_path.unlink(missing_ok=True)
                if not c.resume:
                    self.checkpoint_path.unlink(missing_ok=True)
        # one process's peak (the main rank's: the ranks would share the cores); MFU counts it once per rank
        peak = (
            Peak(c.peak_flops, "given as peak_flops=")
            if c.peak_flops
            else b.broadcast(machine_peak(b.device, b.dtype) if self.is_main else None)
        )
        logger = MetricsLogger(
            self.run_dir,
            c.logger,
            run_config=to_dict(c),
            is_main=self.is_main,
            run_name=c.run_name,
            resume_id=self.wandb_id,
        )
        self.wandb_id = logger.wandb_run_id
        if self.is_main:  # the run's full config beside its metrics, for moe-dash and for people
            write_text_atomic(self.run_dir / "config.json", json.dumps(to_dict(c), indent=2, default=str))
            tokenizer = getattr(getattr(b, "data", None), "tokenizer", None)
            if tokenizer is not None and tokenizer.kind == "bpe":  # moe-generate / moe-eval / moe-export read it
                tokenizer.save(self.run_dir / TOKENIZER_FILE)
            logger.log(
                self.step,
                {
                    "perf/peak_flops": peak.flops,
                    "perf/flops_per_token": self.flops_per_token,
                    **{f"params/{k}": v for k, v in b.params.items()},
                },
            )
            print(f"MFU against a peak of {peak.flops / 1e9:,.1f} GFLOP/s per process ({peak.source})", file=sys.stderr)
            if resumed:
                print(f"resumed from {self.checkpoint_path} at step {self.step}", file=sys.stderr)
            elif b.init_note:
                print(b.init_note, file=sys.stderr)
        return logger, peak

    def _finished(self) -> RunResult:
        """A run that reached ``steps`` already: its result from the checkpoint and the metrics
        file, nothing trained, evaluated or written (not even a W&B directory)."""
        c = self.cfg
        print(
            f"{self.run_dir} already finished its {self.step} steps; nothing was trained or written. "
            f"To train on, raise steps (e.g. steps={2 * c.steps}); to start over, pass resume=false",
            file=sys.stderr,
        )
        val_loss = last_logged(self.run_dir / "metrics.jsonl", "val/loss")
        dirs = wandb_dirs(self.run_dir, self.wandb_id)
        return self._result(val_loss, dirs[-1] if dirs else None, [], None)

    def _watch_dead_layers(self, metrics: dict[str, Any], load: LoadAccumulator, bar) -> None:
        """A layer that served no token in the window (every assignment dropped: with
        ``moe=hivemind``, every expert call failed) is said loudly on the console, when it
        starts, every 10 windows while it lasts, and when it ends; the summary repeats it."""
        for i in self.backend.moe_blocks:
            dropped = metrics.get(f"moe/layer_{i}/dropped_frac")
            if dropped is None:
                continue
            if dropped >= DEAD_LAYER_DROPPED:
                why = load.failure(i)
                self.dead_layers[i] = why
                n = self._dead_windows[i] = self._dead_windows.get(i, 0) + 1
                if self.is_main and n % 10 == 1:
                    _say(
                        bar,
                        f"WARNING: block {i} served no token at step {self.step}: every assignment was "
                        f"dropped ({100 * dropped:.1f}%). {dead_layer_hint(why)}",
                    )
            elif i in self.dead_layers:
                del self.dead_layers[i]
                self._dead_windows.pop(i, None)
                if self.is_main:
                    _say(bar, f"block {i} serves tokens again at step {self.step} (dropped {100 * dropped:.1f}%)")

    def _log(self, logger: MetricsLogger, metrics: dict[str, Any]) -> None:
        logger.log(self.step, metrics)
        if self.hooks.on_log is not None:
            self.hooks.on_log(self.step, metrics)

    def _log_eval(self, logger: MetricsLogger) -> float:
        val_loss = self.evaluate()
        logger.log(self.step, {"val/loss": val_loss})
        logger.log_expert_load(
            self.step, LoadAccumulator.fracs_from_summary(self.last_metrics)
        )  # the latest log window's
        if self.hooks.on_log is not None:
            self.hooks.on_log(self.step, {"val/loss": val_loss})
        return val_loss

    def _result(
        self, val_loss: float, wandb_dir: Path | None, history: list[dict[str, float]], peak: Peak | None
    ) -> RunResult:
        last = self.last_metrics
        return RunResult(
            step=self.step,
            train_loss=last.get("train/loss", float("nan")),
            val_loss=val_loss,
            tokens_per_s=last.get("perf/tokens_per_s", float("nan")),
            mfu=last.get("perf/mfu", float("nan")),
            layer_load=layer_load(last, self.backend.moe_blocks, failures=self.dead_layers),
            run_dir=self.run_dir,
            checkpoint=self.checkpoint_path,
            metrics=self.run_dir / "metrics.jsonl",
            wandb_dir=wandb_dir,
            params=self.backend.params,
            history=history,
            peak_flops=peak.flops if peak is not None else float("nan"),
            peak_source=peak.source if peak is not None else "",
        )


DEAD_LAYER_DROPPED = 0.999  # a layer that dropped this much of its assignments served (about) no token


def _say(bar, line: str) -> None:
    """A line on the console, above the progress bar when there is one."""
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


class _Window:
    """The train metrics of one log window: sums of each step's values, wall time and comm
    time, with eval and checkpoint time left out (:meth:`paused`)."""

    def __init__(self, trainer: Trainer, peak: Peak):
        self.trainer = trainer
        self.peak = peak  # every rank's together
        self.warned = False
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.last_lr = float("nan")
        self.t0, self.comm0 = time.perf_counter(), trainer.comm_seconds()

    def add(self, step_metrics: dict[str, float]) -> None:
        for k, v in step_metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.last_lr = step_metrics["train/lr"]
        self.steps += 1

    def metrics(self, tokens_per_step: int, flops_per_token: float) -> dict[str, Any]:
        """The window's means and throughput; starts a new window."""
        dt = time.perf_counter() - self.t0
        tps = self.steps * tokens_per_step / dt
        out: dict[str, Any] = {k: v / self.steps for k, v in self.sums.items()}
        out["train/lr"] = self.last_lr
        out.update(
            {
                "perf/tokens_per_s": tps,
                "perf/step_time_s": dt / self.steps,
                "perf/mfu": self._mfu(tps, flops_per_token),
                "perf/comm_time_s": (self.trainer.comm_seconds() - self.comm0) / self.steps,  # this rank's, per step
            }
        )
        self.sums.clear()
        self.steps = 0
        self.t0, self.comm0 = time.perf_counter(), self.trainer.comm_seconds()
        return out

    def _mfu(self, tps: float, flops_per_token: float) -> float:
        """Model FLOP/s over the peak, never above 1: a model faster than the peak means the
        peak is too low, which is said once (and how to fix it), not reported as MFU > 100%."""
        value = mfu(tps, flops_per_token, self.peak.flops)
        if value > 1 and not self.warned and self.trainer.is_main:
            self.warned = True
            print(
                f"note: the model ran at {tps * flops_per_token / 1e9:,.1f} GFLOP/s, above the peak "
                f"of {self.peak.flops / 1e9:,.1f} "
                f"({self.peak.source}); MFU is shown as 100%. Measure the peak again with `moe-bench "
                "peak`, or pass peak_flops=",
                file=sys.stderr,
            )
        return min(1.0, value)

    def paused(self):
        return _Pause(self)


class _Pause:
    def __init__(self, window: _Window):
        self.window = window

    def __enter__(self) -> None:
        self.t0, self.comm0 = time.perf_counter(), self.window.trainer.comm_seconds()

    def __exit__(self, *exc) -> None:
        w = self.window
        w.t0 += time.perf_counter() - self.t0
        w.comm0 += w.trainer.comm_seconds() - self.comm0


def train(cfg: TrainConfig) -> RunResult:
    """Train ``cfg`` in this process (one process, ``cfg.device``)."""
    with Trainer(cfg) as trainer:
        return trainer.fit()
