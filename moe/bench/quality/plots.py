"""The report's plots (matplotlib, the ``report`` extra)."""

from __future__ import annotations

import math
from pathlib import Path

from moe.bench.quality.curves import RunCurves, interp


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
        (
            "val_loss_vs_time",
            "Val loss vs training time",
            lambda r: [r.time_at(s) for s in r.val_steps],
            "training seconds (eval excluded)",
        ),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for r in runs:
            if r.val_steps:
                ax.plot(xs_of(r), r.val_loss, **style(r))
        lo = min((min(r.val_loss) for r in runs if r.val_loss), default=0)
        tail = [
            r.val_loss[len(r.val_loss) // 5] for r in runs if r.val_loss
        ]  # leave the first fifth's steep drop out of the y range
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
            ys = [interp(s, r.val_steps, r.val_loss) - interp(s, base.val_steps, base.val_loss) for s in xs]
            ax.plot(xs, ys, **style(r))
            kept += [y for x, y in zip(xs, ys) if x >= base.val_steps[-1] / 5]
        if kept:
            pad = 0.1 * (max(kept + [0.0]) - min(kept + [0.0])) or 0.01
            ax.set_ylim(min(kept + [0.0]) - pad, max(kept + [0.0]) + pad)
        save(
            fig,
            ax,
            xlabel="step",
            ylabel="val loss minus dense's (nats/token)",
            title="Val loss minus dense's at the same step (below 0: ahead of dense)",
            key="Val loss minus dense's vs steps",
            png="val_loss_gap_vs_steps.png",
        )
    moe_runs = [r for r in runs if any(not math.isnan(c) for c in r.cv)]
    if moe_runs:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for r in moe_runs:
            ax.plot(r.train_steps, r.cv, **style(r))
        save(
            fig,
            ax,
            xlabel="step",
            ylabel="load CV (mean over MoE layers)",
            title="Expert-load coefficient of variation over training",
            key="Load CV over training",
            png="load_cv.png",
        )
    return figs
