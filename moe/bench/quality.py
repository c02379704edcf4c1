"""``moe-bench quality``: dense vs Switch vs GShard vs BASE at equal compute per token.

Every arm is one ``moe-train experiment=quality <arm overrides>`` run: the same model shape,
tokens, schedule and seed; only the FFN changes.  Active FLOPs per token stay equal:

* top-1 arms (switch, base) use experts the size of the dense FFN (``moe.expert_d_ff=0``);
* the top-2 arm (gshard) uses experts of half the dense FFN's hidden size
  (``moe.expert_d_ff=d_ff/2``): two of them cost one dense FFN.

The runner starts ``--jobs`` arms at a time with ``cpu_count // jobs`` threads each, polls
their ``metrics.jsonl`` for one progress bar, and then writes the report (a markdown table
and PNG plots).  A finished arm is not launched again (its run dir's config must match the
arm's: other overrides are a one-line error before anything starts), and a part-trained one
resumes from its checkpoint, so a crashed comparison is re-run with the same command.  Reading and
reporting (:func:`load_run`, :func:`steps_to_reach`, :func:`summarize`, :func:`render`) are
pure and tested without training.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

NOTES_MARKER = "<!-- notes: everything below this line is kept when the report is regenerated -->"

# Tiny shapes for the test suite's smoke comparison (seconds, not the hour the real one takes).
SMOKE_OVERRIDES = [
    "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.seq_len=32",
    "steps=12", "batch_size=4", "eval_every=4", "eval_batches=2", "ckpt_every=0",
    "optim.warmup_steps=2", "data.max_files=30", "logger.log_every=2", "logger.wandb=false",
]


@dataclass(frozen=True)
class Arm:
    """One side of the comparison: a router family and its expert count."""

    moe: str  # dense | switch | gshard | base | topk
    num_experts: int = 1
    top_k: int = 1

    @property
    def name(self) -> str:
        return "dense" if self.moe == "dense" else f"{self.moe}-{self.num_experts}"

    @property
    def run_name(self) -> str:
        return f"quality-{self.moe}-e{self.num_experts}"

    def overrides(self, d_ff: int) -> list[str]:
        """``moe-train`` overrides for this arm; ``d_ff`` is the dense FFN's hidden size."""
        if self.moe == "dense":  # no experts, so no experts' rate (the experiment's is the MoE arms')
            return ["moe=dense", "optim.expert_lr_scale=1"]
        out = [f"moe={self.moe}", f"moe.num_experts={self.num_experts}"]
        if self.top_k > 1:  # k experts of d_ff/k each: the same FLOPs as one dense FFN
            if d_ff % self.top_k:
                raise ValueError(f"model.d_ff={d_ff} is not divisible by top_k={self.top_k}: the {self.name} arm cannot match dense FLOPs")
            out.append(f"moe.expert_d_ff={d_ff // self.top_k}")
        return out


def expert_only(override: str) -> bool:
    """An override about the routers or experts alone (``moe.capacity_factor=2``,
    ``optim.expert_lr_scale=0.5``): the dense arm has neither and trains without it, so one dense
    run is the baseline of every router lever.  ``moe.init_scale`` is dense's FFN init too."""
    key = override.lstrip("+~").split("=", 1)[0]
    return key == "optim.expert_lr_scale" or (key.startswith("moe.") and key != "moe.init_scale")


DEFAULT_ARMS = [
    Arm("dense"),
    Arm("switch", 8), Arm("gshard", 8, 2), Arm("base", 8),
    Arm("switch", 16), Arm("gshard", 16, 2), Arm("base", 16),
]


def parse_arm(text: str) -> Arm:
    """``dense``, ``switch-8``, ``gshard-16``, ``base-8`` -> :class:`Arm`."""
    if text == "dense":
        return Arm("dense")
    name, _, n = text.partition("-")
    if name not in ("switch", "gshard", "base") or not n.isdigit() or int(n) < 2:
        raise ValueError(f"--arms: {text!r} is not an arm; write dense, switch-N, gshard-N or base-N (N >= 2)")
    return Arm(name, int(n), 2 if name == "gshard" else 1)


# -- reading runs -------------------------------------------------------------------------------


@dataclass
class RunCurves:
    """What the report needs from one run's ``metrics.jsonl``."""

    name: str
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_steps: list[int] = field(default_factory=list)
    train_time_s: list[float] = field(default_factory=list)  # cumulative training seconds (eval excluded)
    tokens_per_s: list[float] = field(default_factory=list)
    cv: list[float] = field(default_factory=list)  # per train record: the mean over MoE layers
    params: dict[str, int] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)

    def time_at(self, step: float) -> float:
        """Training seconds spent up to ``step`` (linear between logged steps)."""
        xs, ys = [0] + self.train_steps, [0.0] + self.train_time_s
        return _interp(step, xs, ys)


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    if not xs:
        return math.nan
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y1
    return ys[-1]


def load_run(run_dir: Path, name: str = "") -> RunCurves:
    """Curves from ``run_dir/metrics.jsonl`` (a resumed run's records appear once: the trainer
    truncates the file to the checkpoint's step before it re-logs)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (did the run start?)")
    rc = RunCurves(name or Path(run_dir).name)
    prev_step, total = 0, 0.0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("type") == "summary":
            rc.final = {k: v for k, v in r.items() if isinstance(v, (int, float))}
            continue
        step = r.get("step", 0)
        if "val/loss" in r and r["val/loss"] is not None:
            if rc.val_steps and rc.val_steps[-1] == step:  # the final eval repeats a periodic one
                rc.val_loss[-1] = r["val/loss"]
            else:
                rc.val_steps.append(step)
                rc.val_loss.append(r["val/loss"])
        if "params/total" in r:
            rc.params = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("params/")}
        if "perf/step_time_s" in r and step > prev_step:
            total += r["perf/step_time_s"] * (step - prev_step)
            rc.train_steps.append(step)
            rc.train_time_s.append(total)
            rc.tokens_per_s.append(r.get("perf/tokens_per_s") or math.nan)
            cvs = [v for k, v in r.items() if k.startswith("moe/layer_") and k.endswith("/cv") and v is not None]
            rc.cv.append(sum(cvs) / len(cvs) if cvs else math.nan)
            prev_step = step
    return rc


def steps_to_reach(steps: list[int], losses: list[float], target: float) -> float | None:
    """The first step at which the val-loss curve reaches ``target``: linear interpolation
    between the two evals that straddle it; None if it never does."""
    for i, (s, loss) in enumerate(zip(steps, losses)):
        if loss <= target:
            if i == 0:
                return float(s)
            s0, l0 = steps[i - 1], losses[i - 1]
            return s0 + (s - s0) * (l0 - target) / (l0 - loss)
    return None


def summarize(runs: list[RunCurves], baseline: str = "dense") -> list[dict]:
    """One table row per run: final val loss, steps (and wall-clock) to reach the baseline's
    final val loss and their ratio to the baseline's, the val-loss gap to the baseline half way
    and at the end, tokens/s, parameters, mean load CV."""
    base = next((r for r in runs if r.name == baseline), None)
    target = base.val_loss[-1] if base and base.val_loss else None
    base_steps = base.val_steps[-1] if base and base.val_steps else None
    rows = []
    for r in runs:
        reach = steps_to_reach(r.val_steps, r.val_loss, target) if target is not None else None
        cvs = [c for c in r.cv if not math.isnan(c)]
        tps = [t for t in r.tokens_per_s if not math.isnan(t)]
        gap_mid = gap_end = None
        if base is not None and base.val_steps and r.val_steps:
            gap_mid = _interp(base_steps / 2, r.val_steps, r.val_loss) - _interp(base_steps / 2, base.val_steps, base.val_loss)
            gap_end = _interp(base_steps, r.val_steps, r.val_loss) - target
        rows.append({
            "arm": r.name,
            "steps": r.val_steps[-1] if r.val_steps else 0,
            "final_val_loss": r.val_loss[-1] if r.val_loss else math.nan,
            "steps_to_baseline": reach,
            "steps_ratio": reach / base_steps if reach is not None and base_steps else None,
            "time_to_baseline_s": r.time_at(reach) if reach is not None else None,
            "gap_mid": gap_mid,  # val loss minus the baseline's at half the baseline's steps
            "gap_end": gap_end,  # ... and at its last step
            "train_time_s": r.train_time_s[-1] if r.train_time_s else math.nan,
            "tokens_per_s": sorted(tps)[len(tps) // 2] if tps else math.nan,  # the median log window
            "total_params": r.params.get("total", 0),
            "active_params": r.params.get("active_non_embedding", 0),
            "mean_cv": sum(cvs) / len(cvs) if cvs else None,
        })
    return rows


def paired_gaps(per_batch: dict[str, list[float]], baseline: str = "dense") -> dict[str, dict]:
    """The final checkpoints on the same ``N`` val batches: each arm's mean loss, and its gap
    to the baseline as the mean of the per-batch differences with its standard error (the
    batches are shared, so the pairing removes their difficulty from the noise)."""
    base = per_batch.get(baseline)
    out = {}
    for name, losses in per_batch.items():
        n = len(losses)
        row = {"batches": n, "val_loss": sum(losses) / n, "gap": None, "gap_se": None, "batches_ahead": None}
        if base is not None and len(base) == n and name != baseline and n > 1:
            d = [a - b for a, b in zip(losses, base)]
            mean = sum(d) / n
            row.update(gap=mean, gap_se=math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n), batches_ahead=sum(x < 0 for x in d))
        out[name] = row
    return out


def final_eval(plans, batches: int, *, progress: bool = True) -> dict[str, list[float]]:
    """Each finished arm's final checkpoint on val batches ``0..batches-1`` (the training
    evals used the first ``eval_batches`` of them): {arm: per-batch LM loss}.  Cached in the
    run's ``final_eval.json`` (keyed by the checkpoint's step and the batch count)."""
    import torch

    from moe.training.backend import Backend
    from moe.training.checkpoint import load as load_ckpt
    from moe.training.data import load_data

    out, data = {}, None
    for arm, run_dir, _, cfg in plans:
        path = run_dir / "checkpoint.pt"
        if not path.exists():
            continue
        step = int(load_ckpt(path, mmap=True)["step"])
        if step < cfg.steps:
            continue  # not finished: no final eval
        cache = run_dir / "final_eval.json"
        try:
            got = json.loads(cache.read_text())
            if got["step"] == step and got["batches"] == batches:
                out[arm.name] = got["losses"]
                continue
        except (OSError, ValueError, KeyError):
            pass
        if data is None:
            data = load_data(cfg.data, progress=False)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        b = Backend(cfg, data=data)
        try:
            b.restore(b.open_checkpoint(run_dir))
            b.model.eval()
            losses = []
            with torch.no_grad():
                for i in range(batches):
                    losses.append(b.forward("val", i).lm_loss.item())
            if progress:
                print(f"moe-bench quality: {arm.name}: final checkpoint (step {step}) on {batches} val batches: {sum(losses) / batches:.4f}", file=sys.stderr)
        finally:
            b.close()
        cache.write_text(json.dumps({"step": step, "batches": batches, "losses": losses}))
        out[arm.name] = losses
    return out


def bar_checks(rows: list[dict], baseline: str = "dense") -> list[tuple[str, bool | None, str]]:
    """Issue 6's bar, each as (claim, met?, evidence); met is None when an arm is missing."""
    by = {r["arm"]: r for r in rows}
    out = []
    base = by.get(baseline)
    sw = by.get("switch-8")
    if base and sw:
        ratio = sw["steps_ratio"]
        out.append(("Switch-8 reaches dense's final val loss in <= 0.5x the steps", ratio is not None and ratio <= 0.5,
                    f"{ratio:.2f}x" if ratio is not None else "never reached"))
    for arm in ("gshard-8", "base-8"):
        if base and arm in by:
            claim = f"{arm.split('-')[0].capitalize().replace('Gshard', 'GShard').replace('Base', 'BASE')}-8 beats dense at equal steps"
            f = by[arm].get("final_eval")
            if f and f.get("gap") is not None:  # the paired final eval: ahead by more than its noise
                met = f["gap"] + 2 * f["gap_se"] < 0
                out.append((claim, met, f"final checkpoints on {f['batches']} val batches: {f['gap']:+.4f} ± {2 * f['gap_se']:.4f} (2 SE) against dense"
                            + ("" if met or f["gap"] >= 0 else "; ahead, but within the noise")))
                continue
            d = by[arm]["final_val_loss"] - base["final_val_loss"]
            out.append((claim, d < 0, f"final val loss {by[arm]['final_val_loss']:.4f} vs dense {base['final_val_loss']:.4f} ({d:+.4f})"))
    return out


# -- the report ---------------------------------------------------------------------------------


def _fmt(v, spec: str, none: str = "never") -> str:
    if v is None:
        return none
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return format(v, spec)


def render(rows: list[dict], *, setup: dict, plots: dict[str, str], notes: str = "") -> str:
    """The markdown report: setup, table, the bar, plots, then the kept notes."""
    lines = [
        "# Results: dense vs Switch vs GShard vs BASE at equal compute",
        "",
        "Generated by `moe-bench quality` (moe/bench/quality.py); the notes at the end are written by hand.",
        "",
        "## Setup",
        "",
        f"- Command: `{setup['command']}`",
        f"- Commit `{setup['commit']}`, seed {setup['seed']}, {setup['date']}, {setup['machine']}",
        f"- Model: {setup['model']}; {setup['tokens_per_step']:,} tokens per step, {setup['steps']} steps; {setup['schedule']}",
        f"- Data: {setup['data']}",
        "- Equal compute per token: top-1 experts (switch, base) are the dense FFN's size; gshard's top-2 experts have"
        " half its hidden size, so two of them cost one dense FFN. The active-parameter column shows it (the router adds E x d_model).",
        (f"- Arms ran {setup['jobs']} at a time with {setup['threads']} thread(s) each, so tokens/s and wall-clock compare arms"
         " within this run, not with other machines." if not setup.get("trained_earlier") else
         f"- Trained by earlier invocations with this config (their run dirs' config.json match it): {', '.join(setup['trained_earlier'])}."
         " Their tokens/s and wall-clock are as measured then, with however many arms shared the machine; compare them with care."),
        "",
        "## Table",
        "",
        "| arm | steps | final val loss | steps to dense's final val loss | vs dense | training time to it | val loss minus dense's: half way / end | tokens/s | total params | active params | mean load CV |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['steps']:,} | {_fmt(r['final_val_loss'], '.4f')} | {_fmt(r['steps_to_baseline'], ',.0f')} | "
            f"{_fmt(r['steps_ratio'], '.2f', '-')}{'x' if r['steps_ratio'] is not None else ''} | "
            f"{_fmt(r['time_to_baseline_s'], ',.0f', '-')}{' s' if r['time_to_baseline_s'] is not None else ''} | "
            f"{_fmt(r.get('gap_mid'), '+.4f', '-')} / {_fmt(r.get('gap_end'), '+.4f', '-')} | "
            f"{_fmt(r['tokens_per_s'], ',.0f')} | {r['total_params']:,} | {r['active_params']:,} | {_fmt(r['mean_cv'], '.3f', '-')} |"
        )
    finals = [r for r in rows if r.get("final_eval")]
    if finals:
        n = finals[0]["final_eval"]["batches"]
        lines += [
            "",
            f"## The final checkpoints on {n} val batches",
            "",
            f"Each arm's last checkpoint on the same {n} val batches ({n * setup.get('tokens_per_eval_batch', setup['tokens_per_step']):,} tokens; the training-time evals"
            f" used the first {setup.get('eval_batches', '')} of them). The gap is the mean of the per-batch differences from dense, with twice its standard"
            " error: the batches are shared, so their difficulty cancels out of the noise.",
            "",
            "| arm | val loss | minus dense's | ± 2 SE | batches where it beats dense |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in finals:
            f = r["final_eval"]
            ahead = f"{f['batches_ahead']} / {f['batches']}" if f["batches_ahead"] is not None else "-"
            lines.append(f"| {r['arm']} | {f['val_loss']:.4f} | {_fmt(f['gap'], '+.4f', '-')} | {_fmt(f['gap_se'] and 2 * f['gap_se'], '.4f', '-')} | {ahead} |")
    checks = bar_checks(rows)
    if checks:
        lines += ["", "## The bar", ""]
        for claim, met, evidence in checks:
            lines.append(f"- {'met' if met else 'NOT met'}: {claim} ({evidence})")
    if plots:
        lines += ["", "## Plots", ""]
        for title, path in plots.items():
            lines += [f"![{title}]({path})", ""]
    lines += ["", NOTES_MARKER, notes.strip("\n") if notes else ""]
    return "\n".join(lines).rstrip() + "\n"


def kept_notes(path: Path) -> str:
    """The hand-written part of an existing report (below :data:`NOTES_MARKER`)."""
    if not path.exists():
        return ""
    text = path.read_text(encoding="utf-8")
    return text.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in text else ""


def plot(runs: list[RunCurves], out_dir: Path) -> dict[str, Path]:
    """Val loss against steps and against training time, and each router's load CV over
    training, as PNGs in ``out_dir``; returns {title: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Path] = {}

    def style(r: RunCurves) -> dict:
        fam = r.name.split("-")[0]
        color = {"dense": "black", "switch": "tab:blue", "gshard": "tab:orange", "base": "tab:green"}.get(fam, None)
        return {"color": color, "linestyle": "--" if r.name.endswith("-16") else "-", "label": r.name, "linewidth": 1.4}

    def save(fig, ax, *, xlabel: str, ylabel: str, title: str, key: str, png: str) -> None:
        """Label, grid and legend the axes; write ``out_dir/png`` as ``figs[key]``."""
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        figs[key] = out_dir / png
        fig.savefig(figs[key])
        plt.close(fig)

    for key, title, xs_of, xlabel in (
        ("val_loss_vs_steps", "Val loss vs steps", lambda r: r.val_steps, "step"),
        ("val_loss_vs_time", "Val loss vs training time", lambda r: [r.time_at(s) for s in r.val_steps], "training seconds (eval excluded)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for r in runs:
            if r.val_steps:
                ax.plot(xs_of(r), r.val_loss, **style(r))
        lo = min((min(r.val_loss) for r in runs if r.val_loss), default=0)
        tail = [r.val_loss[len(r.val_loss) // 5] for r in runs if r.val_loss]  # leave the first fifth's steep drop out of the y range
        if tail:
            ax.set_ylim(lo - 0.02 * abs(lo), max(tail))
        save(fig, ax, xlabel=xlabel, ylabel="val loss (nats/token)", title=title, key=title, png=f"{key}.png")
    base = next((r for r in runs if r.name == "dense" and r.val_steps), None)
    others = [r for r in runs if r is not base and r.val_steps]
    if base is not None and others:  # the curves overlap at this scale; their gap does not
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        ax.axhline(0.0, color="black", linewidth=1.0, label="dense")
        kept = []  # the gaps after the first fifth of training: the y range (the start is noise)
        for r in others:
            xs = [s for s in r.val_steps if base.val_steps[0] <= s <= base.val_steps[-1]]
            ys = [_interp(s, r.val_steps, r.val_loss) - _interp(s, base.val_steps, base.val_loss) for s in xs]
            ax.plot(xs, ys, **style(r))
            kept += [y for x, y in zip(xs, ys) if x >= base.val_steps[-1] / 5]
        if kept:
            pad = 0.1 * (max(kept + [0.0]) - min(kept + [0.0])) or 0.01
            ax.set_ylim(min(kept + [0.0]) - pad, max(kept + [0.0]) + pad)
        save(fig, ax, xlabel="step", ylabel="val loss minus dense's (nats/token)", title="Val loss minus dense's at the same step (below 0: ahead of dense)",
             key="Val loss minus dense's vs steps", png="val_loss_gap_vs_steps.png")
    moe_runs = [r for r in runs if any(not math.isnan(c) for c in r.cv)]
    if moe_runs:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for r in moe_runs:
            ax.plot(r.train_steps, r.cv, **style(r))
        save(fig, ax, xlabel="step", ylabel="load CV (mean over MoE layers)", title="Expert-load coefficient of variation over training",
             key="Load CV over training", png="load_cv.png")
    return figs


# -- running ------------------------------------------------------------------------------------


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from moe.cli.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
        return sha + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _tail_records(metrics: Path, nbytes: int = 8192) -> list[dict]:
    """The whole records among the last ``nbytes`` of a ``metrics.jsonl`` ([] if none)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(0, os.SEEK_END)
            start = max(0, f.tell() - nbytes)
            f.seek(start)
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    if start > 0:
        lines = lines[1:]  # it starts mid-record
    out = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # e.g. a record still being written
        if isinstance(r, dict):
            out.append(r)
    return out


def _step_of(records: list[dict]) -> int:
    for r in reversed(records):
        if "step" in r:  # (the end-of-run summary record has none)
            return int(r["step"])
    return 0


def _last_step(metrics: Path) -> int:
    return _step_of(_tail_records(metrics))


def _finished(run_dir: Path, steps: int) -> bool:
    """The run reached ``steps`` and ended cleanly (its summary record is written last)."""
    recs = _tail_records(run_dir / "metrics.jsonl")
    return bool(recs) and recs[-1].get("type") == "summary" and _step_of(recs) >= steps


def _start_step(run_dir: Path, steps: int) -> int:
    """The step an arm's run starts from: ``steps`` if it finished, else its checkpoint's step
    (the trainer drops the metrics records logged after the checkpoint when it resumes)."""
    if _finished(run_dir, steps):
        return steps
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return 0
    try:
        from moe.training.checkpoint import load

        return min(steps, int(load(path, mmap=True)["step"]))
    except Exception:  # a checkpoint torn by a crash: the trainer will say so, one arm in
        return 0


def _file_sig(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _steps_done(run_dir: Path, start: int, stale: tuple | None, steps: int) -> int:
    """An arm's progress while it trains.  Until moe-train has touched its metrics.jsonl
    (``stale`` is the file's signature at launch) the records in it may be ones it is about to
    drop (logged after the checkpoint, or by a run that never checkpointed): count from
    ``start`` until then, so the bar never jumps ahead and back."""
    path = run_dir / "metrics.jsonl"
    if _file_sig(path) == stale:
        return start
    return max(start, min(steps, _last_step(path)))


# moe-train lets a resumed run change its schedule and length (to extend a run, say); an arm of
# the comparison may not: its curve would mix two schedules, or a longer run would be read as
# this one.
SAME_TRAINING_KEYS = ("steps", "optim", "batch_size", "grad_accum")


def _check_same_training(saved: dict, current: dict, run_dir: Path) -> None:
    from moe.config import ConfigError, flatten

    a, b = ({k: v for k, v in flatten(d).items() if k.split(".")[0] in SAME_TRAINING_KEYS} for d in (saved, current))
    diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a) if a[k] != b.get(k)]
    if diff:
        raise ConfigError(f"{run_dir} was trained with another schedule ({', '.join(diff[:4])}); every arm of a comparison needs the same one:"
                          " pass --runs-dir NEW_DIR, or move that run dir away")


def _schedule(cfgs: list) -> str:
    """The setup's schedule line; the experts' rate is the MoE arms' (dense has no experts)."""
    c = cfgs[0]
    expert_lr = next((x.optim.expert_lr_scale for x in cfgs if x.optim.expert_lr_scale != 1), 1.0)
    return (f"AdamW lr {c.optim.lr:g}" + (f" (the experts' {expert_lr:g}x that)" if expert_lr != 1 else "")
            + f", {c.optim.warmup_steps} warmup steps, cosine to {c.optim.min_lr_ratio:g}x; eval every {c.eval_every} steps on {c.eval_batches} batches")


def run_quality(args) -> int:
    """Plan every arm (validating its config before anything starts), train the missing
    ones, and write the report."""
    from moe.cli.config import config_from_hydra
    from moe.config import ConfigError, to_dict

    arms = [parse_arm(a) for a in args.arms.split(",")] if args.arms else list(DEFAULT_ARMS)
    extra = (SMOKE_OVERRIDES if args.smoke else []) + list(args.overrides)  # the user's overrides win
    jobs = max(1, args.jobs)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    runs_dir = Path(args.runs_dir).resolve()
    base = _compose(["experiment=quality", *extra, "out_dir=/dev/null"])
    d_ff = int(base.model.d_ff)
    plans = []
    for arm in arms:
        run_dir = runs_dir / arm.run_name
        own = [o for o in extra if not (arm.moe == "dense" and expert_only(o))]
        ov = ["experiment=quality", *arm.overrides(d_ff), *own, f"threads={threads}", f"hydra.run.dir={run_dir}"]
        try:
            cfg = config_from_hydra(_compose([o for o in ov if not o.startswith("hydra.")] + [f"out_dir={run_dir}"]))
        except ConfigError as e:
            print(f"moe-bench quality: error: arm {arm.name}: {e}", file=sys.stderr)
            return 2
        plans.append((arm, run_dir, ov, cfg))
    steps = plans[0][3].steps
    # A finished arm is not launched again; but only if it is this arm: a run dir trained with
    # other overrides is the same one-line error moe-train would give, before anything starts.
    from moe.training.checkpoint import check_resumable

    todo = []
    for plan in plans:
        arm, run_dir, _, cfg = plan
        if not _finished(run_dir, steps):
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
        # One peak for every arm, measured here before any arm runs: an arm measuring its own
        # while others train would get a fraction of it and report MFU above 100%.
        import torch

        from moe.training.flops import measure_peak_flops
        from moe.training.backend import resolve_device

        torch.set_num_threads(threads)
        peak = measure_peak_flops(resolve_device(plans[0][3].device), seconds=1.0, n=2048)
        print(f"moe-bench quality: matmul peak {peak / 1e9:.1f} GFLOP/s with {threads} thread(s); every arm's MFU is against it", file=sys.stderr)
        todo = [(arm, run_dir, ov + [f"peak_flops={peak:.6g}"], cfg) for arm, run_dir, ov, cfg in todo]
    trained_here = {arm.name for arm, *_ in todo}
    failed = [] if args.report_only or not todo else _train_arms(todo, jobs, steps, Path(args.log_dir or runs_dir / "logs"))
    runs = []
    for arm, run_dir, _, _ in plans:
        try:
            runs.append(load_run(run_dir, arm.name))
        except FileNotFoundError as e:
            print(f"moe-bench quality: {arm.name}: {e}", file=sys.stderr)
    if not runs:
        return 1
    rows = summarize(runs)
    n_eval = args.final_eval if args.final_eval is not None else (4 if args.smoke else 256)
    if n_eval > 0:
        gaps = paired_gaps(final_eval(plans, n_eval))
        for r in rows:
            r["final_eval"] = gaps.get(r["arm"])
    c = plans[0][3]
    setup = {
        "command": "moe-bench quality " + " ".join(a for a in (args.argv or [])),
        "commit": _git_commit(),
        "seed": c.seed,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {threads}",
        "model": f"{c.model.n_layers} layers, d_model {c.model.d_model}, {c.model.n_heads} heads, d_ff {c.model.d_ff}, MoE every {c.model.moe_every} blocks",
        "tokens_per_step": c.batch_size * c.grad_accum * c.model.seq_len,
        "steps": c.steps,
        "schedule": _schedule([cfg for *_, cfg in plans]),
        "data": f"{c.data.tokenizer} tokenizer" + (f" (vocab {c.data.vocab_size})" if c.data.tokenizer == "bpe" else "") + (f", first {c.data.max_files} files" if c.data.max_files else ", the embedded stdlib corpus"),
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
        print(f"moe-bench quality: {len(failed)} arm(s) failed: {', '.join(failed)} (logs in {Path(args.log_dir or runs_dir / 'logs')})", file=sys.stderr)
        return 1
    return 0


def _train_arms(plans, jobs: int, steps: int, log_dir: Path) -> list[str]:
    """Run the arms ``jobs`` at a time; one progress bar over all their steps."""
    from tqdm import tqdm

    log_dir.mkdir(parents=True, exist_ok=True)
    todo = list(plans)
    running: dict[str, tuple] = {}
    failed: list[str] = []
    # Arms already trained (or part-trained) count from the start, so the rate and the ETA are
    # those of the steps this command trains, not inflated by a finished arm's steps.
    # A part-trained arm counts from its checkpoint's step, not its last logged one: the metrics
    # logged after the checkpoint are dropped on resume, and the bar must not run backwards.
    start = {arm.name: _start_step(run_dir, steps) for arm, run_dir, _, _ in plans}
    done_steps = dict(start)
    stale: dict[str, tuple | None] = {}
    bar = tqdm(total=steps * len(plans), initial=sum(done_steps.values()), desc="quality", unit="step", file=sys.stderr, dynamic_ncols=True)
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    try:
        while todo or running:
            while todo and len(running) < jobs:
                arm, run_dir, ov, _ = todo.pop(0)
                stale[arm.name] = _file_sig(run_dir / "metrics.jsonl")  # before the trainer can touch it
                log = open(log_dir / f"{arm.run_name}.log", "w")
                proc = subprocess.Popen([sys.executable, "-m", "moe.cli.train", *ov, "logger.progress=false"], stdout=log, stderr=subprocess.STDOUT, env=env)
                running[arm.name] = (proc, log, run_dir)
            time.sleep(1.0)
            for name, (proc, log, run_dir) in list(running.items()):
                done_steps[name] = _steps_done(run_dir, start[name], stale[name], steps)
                if proc.poll() is not None:
                    log.close()
                    del running[name]
                    if proc.returncode != 0:
                        failed.append(name)
                        tqdm.write(f"{name}: moe-train exited with {proc.returncode}; see {log.name}", file=sys.stderr)
                    else:
                        done_steps[name] = steps
            bar.n = sum(done_steps.values())
            bar.set_postfix_str(" ".join(sorted(running)), refresh=False)  # one refresh a poll, not two
            bar.refresh()
    finally:
        for proc, log, _ in running.values():  # Ctrl-C: each arm finishes its step and checkpoints
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
