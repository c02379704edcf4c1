"""A run's ``metrics.jsonl`` as curves (val loss, training time, load CV) and the table's rows."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path


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
        return interp(step, xs, ys)


def interp(x: float, xs: list[float], ys: list[float]) -> float:
    if not xs:
        return math.nan
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y1
    return ys[-1]


def load_run(run_dir: Path, name: str = "", *, offset: int = 0) -> RunCurves:
    """Curves from ``run_dir/metrics.jsonl`` (a resumed run's records appear once: the trainer
    truncates the file to the checkpoint's step before it re-logs).  ``offset``: steps before
    this run's first (an arm begun from a dense run of that many steps); every step is shifted
    by it, and the training time starts at 0 (the source run's time is its own)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (did the run start?)")
    rc = RunCurves(name or Path(run_dir).name)
    prev_step, total = offset, 0.0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("type") == "summary":
            rc.final = {k: v for k, v in r.items() if isinstance(v, (int, float))}
            continue
        step = r.get("step", 0) + offset
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


def summarize(runs: list[RunCurves], baseline: str = "dense", *, baselines: dict[str, str] | None = None) -> list[dict]:
    """One table row per run: final val loss, steps (and wall-clock) to reach the baseline's
    final val loss and their ratio to the baseline's, the val-loss gap to the baseline half way
    and at the end, tokens/s, parameters, mean load CV.  ``baselines`` names a run's own
    baseline (an upcycled arm's: dense continued from the same point); the rest use ``baseline``."""
    by_name = {r.name: r for r in runs}
    rows = []
    for r in runs:
        base_name = (baselines or {}).get(r.name, baseline)
        base = by_name.get(base_name)
        target = base.val_loss[-1] if base and base.val_loss else None
        base_steps = base.val_steps[-1] if base and base.val_steps else None
        reach = steps_to_reach(r.val_steps, r.val_loss, target) if target is not None else None
        if r is base:  # its own final loss is reached at its end (a noisy earlier eval does not count)
            reach = base_steps
        cvs = [c for c in r.cv if not math.isnan(c)]
        tps = [t for t in r.tokens_per_s if not math.isnan(t)]
        gap_mid = gap_end = None
        if base is not None and base.val_steps and r.val_steps:
            gap_mid = interp(base_steps / 2, r.val_steps, r.val_loss) - interp(
                base_steps / 2, base.val_steps, base.val_loss
            )
            gap_end = interp(base_steps, r.val_steps, r.val_loss) - target
        rows.append(
            {
                "arm": r.name,
                "baseline": base_name,
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
            }
        )
    return rows
