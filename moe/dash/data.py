"""What the dashboard shows, read from run directories: pure functions over files, no server.

A run directory is any folder holding a ``metrics.jsonl`` (written by the trainer, see
moe/training/sinks.py) and usually a ``config.json``.  :func:`scan` finds them under a root and turns
each into a compact dict of series the page draws; :func:`config_diff` lists the config keys
whose values differ between runs; :func:`collapses` flags layers whose routing collapsed.

Collapse, as flagged: in the latest logged window of a layer, one expert takes more than half
of the tokens (``max_frac > 0.5``, only meaningful with more than two experts), or the
coefficient of variation of the per-expert load is above ``cv_threshold`` (default 1.0: the
load's spread is as large as its mean).  Both are read from the same ``moe/layer_<i>/...``
telemetry the console and W&B show.  Worse than a collapse, and flagged the same way: a layer
that dropped every token (``dropped_frac`` >= 0.999; with ``moe=hivemind``, every expert call
failed).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

SERIES_KEYS = (
    "train/loss",
    "val/loss",
    "perf/tokens_per_s",
    "perf/mfu",
    "perf/step_time_s",
    "train/lr",
    "train/aux_loss",
)
_LAYER = re.compile(r"^moe/layer_(\d+)/(.+)$")
RUNNING_IF_WRITTEN_WITHIN_S = 120.0
DEAD_LAYER_DROPPED = 0.999  # a layer that dropped this much of its assignments served (about) no token


def find_runs(root: Path) -> list[Path]:
    """Run directories under ``root`` (``root`` itself if it is one), sorted by name.
    W&B's own folders are skipped."""
    root = Path(root)
    if (root / "metrics.jsonl").is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("wandb", ".hydra", "__pycache__") and not d.startswith(".")
        )
        if "metrics.jsonl" in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []  # a run's own subfolders hold no other runs
    return sorted(found)


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def read_config(run_dir: Path) -> dict[str, object]:
    """The run's flattened config from ``config.json`` (or Hydra's ``.hydra/config.yaml``)."""
    p = Path(run_dir) / "config.json"
    if p.is_file():
        try:
            return _flat(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return {}
    h = Path(run_dir) / ".hydra" / "config.yaml"
    if h.is_file():
        try:
            from omegaconf import OmegaConf

            return _flat(OmegaConf.to_container(OmegaConf.load(h), resolve=False))
        except Exception:  # a config the dashboard cannot read is shown as empty, not fatal
            return {}
    return {}


def read_run(run_dir: Path, *, now: float | None = None) -> dict:
    """One run as the page needs it.

    Returns ``{"name", "path", "status", "config", "series": {key: [[step, value], ...]},
    "layers": {i: {"steps": [...], "frac": [[...E] per step], "cv": [...], "dropped_frac": [...],
    "max_frac": [...], "bias": [[...E] or None per step]}}, "params", "final", "last_step",
    "updated"}`` ("bias": loss-free balancing's expert bias, where logged).  Lines that are not
    valid JSON (a line being written while we read) are skipped.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    series: dict[str, list] = {k: [] for k in SERIES_KEYS}
    layers: dict[int, dict] = {}
    params: dict = {}
    final: dict = {}
    last_step = 0
    text = path.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if not isinstance(r, dict) or r.get("type") == "expert_load":
            continue
        if r.get("type") == "summary":
            final = {k: v for k, v in r.items() if k not in ("type", "time")}
            continue
        step = int(r.get("step", 0))
        last_step = max(last_step, step)
        for k in SERIES_KEYS:
            v = r.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                s = series[k]
                if s and s[-1][0] == step:  # the final eval repeats the last periodic one
                    s[-1] = [step, v]
                else:
                    s.append([step, v])
        if "params/total" in r:
            params = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("params/")}
        per_layer: dict[int, dict] = {}
        for k, v in r.items():
            m = _LAYER.match(k)
            if m:
                per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = v
        for i, d in per_layer.items():
            fr = sorted((int(k[6:]), v) for k, v in d.items() if k.startswith("frac_e") and k[6:].isdigit())
            if not fr:
                continue
            L = layers.setdefault(
                i, {"steps": [], "frac": [], "cv": [], "dropped_frac": [], "max_frac": [], "bias": []}
            )
            fracs = [v if isinstance(v, (int, float)) else 0.0 for _, v in fr]
            bias = sorted((int(k[6:]), v) for k, v in d.items() if k.startswith("bias_e") and k[6:].isdigit())
            L["bias"].append([v if isinstance(v, (int, float)) else 0.0 for _, v in bias] or None)
            L["steps"].append(step)
            L["frac"].append(fracs)
            L["cv"].append(d.get("cv"))
            L["dropped_frac"].append(d.get("dropped_frac"))
            L["max_frac"].append(max(fracs))
    st = path.stat()
    now = time.time() if now is None else now
    status = "finished" if final else ("running" if now - st.st_mtime < RUNNING_IF_WRITTEN_WITHIN_S else "stopped")
    return {
        "name": run_dir.name,
        "path": str(run_dir),
        "status": status,
        "config": read_config(run_dir),
        "series": series,
        "layers": {str(i): layers[i] for i in sorted(layers)},
        "params": params,
        "final": final,
        "last_step": last_step,
        "updated": st.st_mtime,
    }


IGNORED_IN_DIFF = ("out_dir", "run_name", "logger.", "threads", "resume", "device")


def config_diff(runs: list[dict]) -> list[str]:
    """Config keys whose values differ between the runs (paths, names and logging left out)."""
    runs = [r for r in runs if r["config"]]  # a run without a config.json has nothing to compare
    if len(runs) < 2:
        return []
    keys = sorted(set().union(*(r["config"].keys() for r in runs)))
    out = []
    for k in keys:
        if any(k == ig or (ig.endswith(".") and k.startswith(ig)) for ig in IGNORED_IN_DIFF):
            continue
        values = {json.dumps(r["config"].get(k), sort_keys=True) for r in runs}
        if len(values) > 1:
            out.append(k)
    return out


def collapses(run: dict, cv_threshold: float = 1.0) -> list[dict]:
    """Layers of ``run`` whose latest window looks collapsed (see the module docstring)."""
    out = []
    for i, L in run["layers"].items():
        if not L["steps"]:
            continue
        E = len(L["frac"][-1])
        max_frac, cv = L["max_frac"][-1], L["cv"][-1]
        dropped = L["dropped_frac"][-1]
        if isinstance(dropped, (int, float)) and dropped >= DEAD_LAYER_DROPPED:  # worse than a collapse: nothing served
            since = L["steps"][-1]
            for s, d in zip(reversed(L["steps"]), reversed(L["dropped_frac"])):
                if not (isinstance(d, (int, float)) and d >= DEAD_LAYER_DROPPED):
                    break
                since = s
            reason = f"every token dropped ({100 * dropped:.0f}%): no expert served this layer"
            out.append({"run": run["name"], "layer": int(i), "step": L["steps"][-1], "since": since, "reason": reason})
            continue
        reasons = []
        if E > 2 and max_frac > 0.5:
            reasons.append(f"one expert takes {100 * max_frac:.0f}% of the tokens")
        if isinstance(cv, (int, float)) and cv > cv_threshold:
            reasons.append(f"load CV {cv:.2f} > {cv_threshold:g}")
        if reasons:
            since = L["steps"][-1]
            for s, mf, c in zip(reversed(L["steps"]), reversed(L["max_frac"]), reversed(L["cv"])):
                bad = (E > 2 and mf > 0.5) or (isinstance(c, (int, float)) and c > cv_threshold)
                if not bad:
                    break
                since = s
            out.append(
                {
                    "run": run["name"],
                    "layer": int(i),
                    "step": L["steps"][-1],
                    "since": since,
                    "reason": "; ".join(reasons),
                }
            )
    return out


def snapshot(root: Path, *, cv_threshold: float = 1.0, now: float | None = None) -> dict:
    """Everything the page draws, for every run under ``root``."""
    runs = []
    for d in find_runs(root):
        try:
            runs.append(read_run(d, now=now))
        except OSError:
            continue  # removed while we looked
    diff = config_diff(runs)
    alerts = [a for r in runs for a in collapses(r, cv_threshold)]
    for r in runs:
        r["diff"] = {k: r["config"].get(k) for k in diff}
    return {
        "root": str(Path(root).resolve()),
        "runs": runs,
        "diff_keys": diff,
        "alerts": alerts,
        "cv_threshold": cv_threshold,
        "generated": time.time(),
    }


def fingerprint(root: Path) -> str:
    """Changes when any run's metrics or config change: the page refetches only then."""
    parts = []
    for d in find_runs(root):
        for name in ("metrics.jsonl", "config.json"):
            try:
                st = (d / name).stat()
                parts.append(f"{d}/{name}:{st.st_mtime_ns}:{st.st_size}")
            except OSError:
                pass
    return str(hash(tuple(parts)) & 0xFFFFFFFFFFFF)
