"""``moe-bench quality`` itself: plan every arm (its config validated before anything starts),
train the missing ones ``--jobs`` at a time under one progress bar, evaluate the final
checkpoints and write the report."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from moe.bench.quality.arms import DEFAULT_ARMS, SMOKE_OVERRIDES, Arm, expert_only, parse_arm
from moe.bench.quality.curves import load_run, summarize
from moe.bench.quality.final_eval import final_eval, paired_gaps
from moe.bench.quality.plots import plot
from moe.bench.quality.progress import file_sig, finished, start_step, steps_done
from moe.bench.quality.report import NOTES_MARKER, kept_notes, render, schedule
from moe.cli.config import compose
from moe.config import ConfigError, flatten, to_dict
from moe.training.backend import resolve_device
from moe.training.checkpoint import check_resumable
from moe.training.flops import machine_peak


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# moe-train lets a resumed run change its schedule and length (to extend a run, say); an arm of
# the comparison may not: its curve would mix two schedules, or a longer run would be read as
# this one.
SAME_TRAINING_KEYS = ("steps", "optim", "batch_size", "grad_accum")


def _check_same_training(saved: dict, current: dict, run_dir: Path) -> None:
    a, b = ({k: v for k, v in flatten(d).items() if k.split(".")[0] in SAME_TRAINING_KEYS} for d in (saved, current))
    diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a) if a[k] != b.get(k)]
    if diff:
        raise ConfigError(
            f"{run_dir} was trained with another schedule ({', '.join(diff[:4])}); every arm of a "
            "comparison needs the same one:"
            " pass --runs-dir NEW_DIR, or move that run dir away"
        )


def run_quality(args) -> int:
    """Plan every arm (validating its config before anything starts), train the missing
    ones, and write the report."""
    arms = [parse_arm(a) for a in args.arms.split(",")] if args.arms else list(DEFAULT_ARMS)
    arms = with_sources(arms)
    extra = (SMOKE_OVERRIDES if args.smoke else []) + list(args.overrides)  # the user's overrides win
    jobs = max(1, args.jobs)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    runs_dir = Path(args.runs_dir).resolve()
    try:
        base = compose(["experiment=quality", *extra, "out_dir=/dev/null"])
    except ConfigError as e:
        print(f"moe-bench quality: error: {e}", file=sys.stderr)
        return 2
    d_ff, steps = base.model.d_ff, base.steps
    plans = []
    for arm in arms:
        run_dir = runs_dir / arm.run_name
        own = [o for o in extra if not (arm.moe == "dense" and expert_only(o))]
        try:
            ov = [
                "experiment=quality",
                *arm.overrides(d_ff),
                *own,
                *arm.schedule_overrides(steps, runs_dir),
                f"threads={threads}",
                f"hydra.run.dir={run_dir}",
            ]
            # (composed without init_from: the source run it names may not exist until phase one)
            cfg = compose([o for o in ov if not o.startswith(("hydra.", "init_from="))] + [f"out_dir={run_dir}"])
            init = [o.split("=", 1)[1] for o in ov if o.startswith("init_from=")]
            cfg = dataclasses.replace(cfg, init_from=init[0]) if init else cfg
        except (ConfigError, ValueError) as e:
            print(f"moe-bench quality: error: arm {arm.name}: {e}", file=sys.stderr)
            return 2
        plans.append((arm, run_dir, ov, cfg))
    # A finished arm is not launched again; but only if it is this arm: a run dir trained with
    # other overrides is the same one-line error moe-train would give, before anything starts.
    todo = []
    for plan in plans:
        arm, run_dir, _, cfg = plan
        if not finished(run_dir, cfg.steps):
            todo.append(plan)
            if not (run_dir / "checkpoint.pt").exists():
                continue  # nothing to resume: moe-train starts it over
        try:
            saved = json.loads((run_dir / "config.json").read_text())
        except (OSError, ValueError):
            continue  # a new arm (or no readable config.json: moe-train decides)
        try:
            current = to_dict(cfg)
            check_resumable(saved, current, run_dir)
            _check_same_training(saved, current, run_dir)
        except ConfigError as e:
            print(f"moe-bench quality: error: arm {arm.name}: {e}", file=sys.stderr)
            return 2
    if not args.report_only and todo and not any(o.startswith("peak_flops=") for o in extra):
        # One peak for every arm, this machine's kept one (measured once, before any arm runs:
        # an arm measuring its own while others train would get a fraction of it).
        torch.set_num_threads(threads)
        kept = machine_peak(resolve_device(plans[0][3].device))
        peak = kept.flops
        print(
            f"moe-bench quality: every arm's MFU is against {peak / 1e9:.1f} GFLOP/s with "
            f"{threads} thread(s) ({kept.source})",
            file=sys.stderr,
        )
        todo = [(arm, run_dir, ov + [f"peak_flops={peak:.6g}"], cfg) for arm, run_dir, ov, cfg in todo]
    trained_here = {arm.name for arm, *_ in todo}
    failed = []
    if not args.report_only and todo:
        failed = _train_arms(todo, jobs, Path(args.log_dir or runs_dir / "logs"))
    runs = []
    for arm, run_dir, _, _ in plans:
        try:
            runs.append(load_run(run_dir, arm.name, offset=arm.start))
        except FileNotFoundError as e:
            print(f"moe-bench quality: {arm.name}: {e}", file=sys.stderr)
    if not runs:
        return 1
    baselines = {arm.name: arm.baseline for arm, *_ in plans}
    rows = [r for r in summarize(runs, baselines=baselines) if not r["arm"].startswith("dense-")]
    n_eval = args.final_eval if args.final_eval is not None else (4 if args.smoke else 256)
    if n_eval > 0:
        gaps = paired_gaps(final_eval([p for p in plans if not p[0].length], n_eval), baselines=baselines)
        for r in rows:
            r["final_eval"] = gaps.get(r["arm"])
    c = plans[0][3]
    setup = {
        "command": "moe-bench quality " + " ".join(a for a in (args.argv or [])),
        "commit": _git_commit(),
        "seed": c.seed,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {threads}",
        "model": f"{c.model.n_layers} layers, d_model {c.model.d_model}, {c.model.n_heads} heads, d_ff "
        f"{c.model.d_ff}, MoE every {c.model.moe_every} blocks",
        "tokens_per_step": c.batch_size * c.grad_accum * c.model.seq_len,
        "steps": steps,
        "starts": sorted({arm.start for arm, *_ in plans if arm.start}),
        "schedule": schedule([cfg for *_, cfg in plans]),
        "data": data_description(c.data),
        "jobs": jobs,
        "threads": threads,
        "eval_batches": c.eval_batches,
        "trained_earlier": [arm.name for arm, *_ in plans if args.report_only or arm.name not in trained_here],
        "tokens_per_eval_batch": c.batch_size * c.model.seq_len,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = {}
    if not args.no_plots:
        for title, p in plot(runs, out.parent / (out.stem + "_plots")).items():
            plots[title] = os.path.relpath(p, out.parent)
    out.write_text(render(rows, setup=setup, plots=plots, notes=kept_notes(out)), encoding="utf-8")
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    print(render(rows, setup=setup, plots={}).split(NOTES_MARKER)[0].rstrip())
    print(f"wrote {out} and {json_path}")
    if failed:
        print(
            f"moe-bench quality: {len(failed)} arm(s) failed: {', '.join(failed)} (logs in "
            f"{Path(args.log_dir or runs_dir / 'logs')})",
            file=sys.stderr,
        )
        return 1
    return 0


def data_description(d) -> str:
    """The report's "Data:" line: the tokenizer and what the arms trained on."""
    vocab = f" (vocab {d.vocab_size})" if d.tokenizer == "bpe" else ""
    corpus = f"files under {d.path}" if d.path else "the embedded stdlib corpus"
    first = f", first {d.max_files} files" if d.max_files else ""
    return f"{d.tokenizer} tokenizer{vocab}, {corpus}{first}"


def with_sources(arms: list[Arm]) -> list[Arm]:
    """The arms, each arm's source (the dense run it begins from) first, once."""
    out: list[Arm] = []
    for arm in arms:
        if arm.source is not None and arm.source not in out:
            out.append(arm.source)
    return out + [a for a in arms if a not in out]


def _train_arms(plans, jobs: int, log_dir: Path) -> list[str]:
    """Run the arms ``jobs`` at a time, an arm that begins from a source run once that run has
    finished (sources come first in ``plans``); one progress bar over all their steps.  An arm
    whose source failed is not started, and counts as failed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    todo = list(plans)
    running: dict[str, tuple] = {}
    failed: list[str] = []
    # Arms already trained (or part-trained) count from the start, so the rate and the ETA are
    # those of the steps this command trains, not inflated by a finished arm's steps.
    # A part-trained arm counts from its checkpoint's step, not its last logged one: the metrics
    # logged after the checkpoint are dropped on resume, and the bar must not run backwards.
    steps_of = {arm.name: cfg.steps for arm, _, _, cfg in plans}
    start = {arm.name: start_step(run_dir, steps_of[arm.name]) for arm, run_dir, _, _ in plans}
    done_steps = dict(start)
    stale: dict[str, tuple | None] = {}
    bar = tqdm(
        total=sum(steps_of.values()),
        initial=sum(done_steps.values()),
        desc="quality",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
    )
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    try:
        while todo or running:
            pending = {a.name for a, *_ in todo} | set(running)
            for plan in [p for p in todo if p[0].source is not None and p[0].source.name in failed]:
                todo.remove(plan)
                failed.append(plan[0].name)
                tqdm.write(f"{plan[0].name}: not started: its source {plan[0].source.name} failed", file=sys.stderr)
            while len(running) < jobs:
                ready = [p for p in todo if p[0].source is None or p[0].source.name not in pending]
                if not ready:
                    break
                todo.remove(ready[0])
                arm, run_dir, ov, _ = ready[0]
                stale[arm.name] = file_sig(run_dir / "metrics.jsonl")  # before the trainer can touch it
                log = open(log_dir / f"{arm.run_name}.log", "w")
                proc = subprocess.Popen(
                    [sys.executable, "-m", "moe.cli.train", *ov, "logger.progress=false"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
                running[arm.name] = (proc, log, run_dir)
            time.sleep(1.0)
            for name, (proc, log, run_dir) in list(running.items()):
                done_steps[name] = steps_done(run_dir, start[name], stale[name], steps_of[name])
                if proc.poll() is not None:
                    log.close()
                    del running[name]
                    if proc.returncode != 0:
                        failed.append(name)
                        tqdm.write(f"{name}: moe-train exited with {proc.returncode}; see {log.name}", file=sys.stderr)
                    else:
                        done_steps[name] = steps_of[name]
            bar.n = sum(done_steps.values())
            bar.set_postfix_str(" ".join(sorted(running)), refresh=False)  # one refresh a poll, not two
            bar.refresh()
    finally:
        for proc, _, _ in running.values():  # Ctrl-C: each arm finishes its step and checkpoints
            proc.send_signal(signal.SIGINT)
        for proc, log, _ in running.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        bar.close()
    return failed
