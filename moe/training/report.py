"""What a run tells the person watching it: the progress bar and its postfix, the one line on
the data, and the end-of-run :class:`RunResult` with the summary ``moe-train`` prints."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe.training.sinks import wandb_dirs


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
    peak_flops: float = float("nan")  # one process's peak FLOP/s, what MFU is against
    peak_source: str = ""  # where the peak came from


def layer_load(
    metrics: dict[str, float], blocks: list[int], *, failures: dict[int, str] | None = None
) -> dict[int, dict[str, Any]]:
    """``RunResult.layer_load``: each MoE block's load from the last logged metrics, and why a
    block served no token (``failures``, from the loop)."""
    out = {}
    for i in blocks:
        p = f"moe/layer_{i}/"
        fracs = [
            v for k, v in sorted(metrics.items(), key=lambda kv: _expert_index(kv[0])) if k.startswith(p + "frac_e")
        ]
        out[i] = {
            "cv": metrics.get(p + "cv", float("nan")),
            "max_over_mean": metrics.get(p + "max_over_mean", float("nan")),
            "dropped_frac": metrics.get(p + "dropped_frac", float("nan")),
            "frac": fracs,
            "failure": (failures or {}).get(i),
        }
    return out


def _expert_index(key: str) -> int:
    tail = key.rsplit("frac_e", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else -1


def summary_metrics(r: RunResult) -> dict[str, float]:
    out = {
        "final/train_loss": r.train_loss,
        "final/val_loss": r.val_loss,
        "final/tokens_per_s": r.tokens_per_s,
        "final/mfu": r.mfu,
        "final/step": r.step,
    }
    for i, ld in r.layer_load.items():
        out[f"final/layer_{i}/cv"] = ld["cv"]
    return out


def postfix(m: dict[str, float]) -> str:
    cvs = [v for k, v in m.items() if k.endswith("/cv")]
    drops = [v for k, v in m.items() if k.endswith("/dropped_frac")]
    s = f"loss {m['train/loss']:.3f} | {m['perf/tokens_per_s']:,.0f} tok/s"
    if cvs:
        s += f" | load cv {max(cvs):.2f}"
    if drops:
        s += f" | dropped {100 * max(drops):.1f}%"
    return s


def progress_bar(initial: int, total: int, *, enabled: bool):
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
        f"  throughput {r.tokens_per_s:,.0f} tokens/s   MFU {100 * r.mfu:.1f}%"
        + (f" of {r.peak_flops / 1e9:,.1f} GFLOP/s per process ({r.peak_source})" if r.peak_source else ""),
        f"  parameters {r.params['total']:,} total, {r.params['active_non_embedding']:,} "
        "active non-embedding per token",
    ]
    if r.layer_load:
        lines.append("  expert load (fraction of tokens per expert, last log interval):")
        for i, ld in r.layer_load.items():
            fr = " ".join(f"{f:.2f}" for f in ld["frac"])
            lines.append(
                f"    block {i}: cv {ld['cv']:.3f}  max/mean {ld['max_over_mean']:.2f}  dropped "
                f"{100 * ld['dropped_frac']:.1f}%  [{fr}]"
            )
            if ld["dropped_frac"] >= 0.999:
                lines.append(
                    f"    WARNING: block {i} served no token: every assignment was dropped. "
                    f"{dead_layer_hint(ld.get('failure') or '')}"
                )
    lines += [
        f"  checkpoint  {r.checkpoint}",
        f"  metrics     {r.metrics}",
        f"  W&B run     {_wandb_line(r)}",
    ]
    return "\n".join(lines)


def data_line(meta: dict) -> str:
    """One line on what the run trains on, e.g. for the default corpus:
    ``data: stdlib, 1758 files (32 skipped: empty 28, not UTF-8 4), bpe vocab 4096,
    9,027,506 train / 351,110 val tokens (cached)``."""
    parts = [f"data: {meta.get('source', '?')}"]
    if "n_files" in meta:
        skipped = meta.get("skipped", 0)
        why = ", ".join(f"{k} {v}" for k, v in meta.get("skipped_reasons", {}).items())
        parts.append(f"{meta['n_files']} files" + (f" ({skipped} skipped: {why})" if skipped else ""))
    parts.append(f"{meta.get('tokenizer') or 'pre-tokenized'} vocab {meta.get('vocab_size', '?')}")
    n_train, n_val = meta.get("n_train_tokens"), meta.get("n_val_tokens")
    if n_train is not None and n_val is not None:
        parts.append(f"{n_train:,} train / {n_val:,} val tokens")
    line = ", ".join(parts)
    return line + (" (cached)" if meta.get("from_cache") else "")


def _wandb_line(r: RunResult) -> str:
    """The run's W&B directory; a resumed run has one per start, and ``wandb sync`` needs all."""
    if not r.wandb_dir:
        return "off"
    run_id = Path(r.wandb_dir).name.rsplit("-", 1)[-1]
    dirs = wandb_dirs(r.run_dir, run_id)
    if len(dirs) > 1:
        return (
            f"{r.run_dir}/wandb/*-{run_id}   ({len(dirs)} directories, one per start: "
            "`wandb sync` them all to upload the whole run)"
        )
    return f"{r.wandb_dir}   (offline: `wandb sync` it to upload)"


def dead_layer_hint(failure: str) -> str:
    """Why a layer served no token, and what to do about it (``failure``: the most common reason
    its failed calls gave, ``LoadAccumulator.failure``; empty when nothing failed: capacity)."""
    if not failure:
        return (
            "No expert call failed: the capacity dropped every token; raise moe.capacity_factor "
            "or set moe.dropless=true."
        )
    if "no signed declaration" in failure:
        fix = (
            "the servers do not sign their declarations (moe-join --unsigned?): restart them "
            "without --unsigned, or set moe.swarm.require_signed=false to call unsigned servers"
        )
    elif "not trusted" in failure:
        fix = (
            "no server's key is in moe.swarm.trusted_keys: add the fingerprints the servers "
            "print (moe-join: signing key ...), or leave the list empty"
        )
    elif "no expert of the grid is declared" in failure:
        fix = "no server serves this grid: start moe-join --serve N with this run's --prefix, --grid and --d-model"
    else:
        fix = "see docs/volunteers.md, Failures"
    return f"Its experts failed ({failure}); {fix}."
