"""The final checkpoints of the arms on the same val batches, and each arm's gap to dense with
its standard error (the pairing removes the batches' difficulty from the noise)."""

from __future__ import annotations

import json
import math
import sys

import torch

from moe.training.backend import Backend
from moe.training.checkpoint import load as load_ckpt
from moe.training.data import load_data


def paired_gaps(
    per_batch: dict[str, list[float]], baseline: str = "dense", *, baselines: dict[str, str] | None = None
) -> dict[str, dict]:
    """The final checkpoints on the same ``N`` val batches: each arm's mean loss, and its gap
    to its baseline (``baselines[arm]``, else ``baseline``) as the mean of the per-batch
    differences with its standard error (the batches are shared, so the pairing removes their
    difficulty from the noise)."""
    out = {}
    for name, losses in per_batch.items():
        base = per_batch.get((baselines or {}).get(name, baseline))
        n = len(losses)
        row = {"batches": n, "val_loss": sum(losses) / n, "gap": None, "gap_se": None, "batches_ahead": None}
        if base is not None and base is not losses and len(base) == n and n > 1:
            d = [a - b for a, b in zip(losses, base)]
            mean = sum(d) / n
            row.update(
                gap=mean,
                gap_se=math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n),
                batches_ahead=sum(x < 0 for x in d),
            )
        out[name] = row
    return out


def final_eval(plans, batches: int, *, progress: bool = True) -> dict[str, list[float]]:
    """Each finished arm's final checkpoint on val batches ``0..batches-1`` (the training
    evals used the first ``eval_batches`` of them): {arm: per-batch LM loss}.  Cached in the
    run's ``final_eval.json`` (keyed by the checkpoint's step and the batch count)."""
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
                print(
                    f"moe-bench quality: {arm.name}: final checkpoint (step {step}) on {batches} val "
                    f"batches: {sum(losses) / batches:.4f}",
                    file=sys.stderr,
                )
        finally:
            b.close()
        cache.write_text(json.dumps({"step": step, "batches": batches, "losses": losses}))
        out[arm.name] = losses
    return out
