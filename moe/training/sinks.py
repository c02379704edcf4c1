"""Where metrics go: ``run_dir/metrics.jsonl``, Weights & Biases, and a plain console line.

One :class:`MetricsLogger` per run.  Only the main process logs: with ``is_main=False``
every method is a no-op and nothing is created on disk, so multi-rank code can build a logger
on every rank and call it unconditionally.

metrics.jsonl
    One JSON object per line, ``{"step": s, "time": unix_seconds, **metrics}``; the final
    summary is ``{"type": "summary", "time": ..., **metrics}``; the expert load of each eval is
    ``{"step": s, "time": ..., "type": "expert_load", "load": {"<block>": [fraction per expert]}}``
    (:meth:`MetricsLogger.log_expert_load`).  The file is opened in append
    mode (a resumed run continues it) and flushed after every line, so a crash loses nothing
    already logged (flush, not fsync: it survives a process crash, not a power cut).
    Non-finite floats (NaN, +-inf) are written as ``null``: strict JSON has no literal for
    them, and ``null`` reads back as a missing value in pandas, jq and JavaScript.  W&B and
    the console still receive the real value.

Weights & Biases
    ``offline`` by default (the run is written under ``run_dir/wandb``; upload later with
    ``wandb sync``); ``online`` when the user has a key.  wandb is imported lazily, so
    importing this module is cheap and works without it.  If wandb is missing or ``init``
    fails, a warning is issued and logging carries on without it (an ``online`` run that
    fails, e.g. without an API key, falls back to ``offline`` first).  Keep
    :attr:`MetricsLogger.wandb_run_id` (e.g. in the checkpoint) and pass it back as
    ``resume_id`` to continue the same W&B run after a restart.  Metrics are logged with
    ``step=`` the training step, so W&B's "Step" x-axis is the training step for every section
    (``train/``, ``val/``, ``perf/``, ``moe/``; no ``define_metric`` needed).  The expert load
    goes to ``moe/expert_load`` (a table of every eval: step, layer, expert, fraction) and
    ``moe/layer_<i>/expert_load`` (a bar chart of the latest eval, its data in
    ``moe/layer_<i>/expert_load_table``).
"""

from __future__ import annotations

import json
import math
import numbers
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from moe.config import LoggerConfig
from moe.training.files import write_text_atomic


def _plain(key: str, v: Any) -> Any:
    """A metric value as a plain Python scalar (or list of them); tensors and numpy scalars
    are unwrapped with ``.item()``/``.tolist()``."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_plain(key, x) for x in v]
    if hasattr(v, "numel") and hasattr(v, "item"):  # torch.Tensor, without importing torch
        return _plain(key, v.item() if v.numel() == 1 else v.tolist())
    if hasattr(v, "item") and hasattr(v, "tolist"):  # numpy scalar or array
        return _plain(key, v.tolist())
    raise TypeError(f"metric {key!r}: cannot log a value of type {type(v).__name__}")


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return v


def _number(v: Any) -> float | None:
    """``v`` as a float for display (numbers, 0-d tensors, numpy scalars), else None."""
    if v is None or isinstance(v, (bool, str)):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _expert_load_records(path: Path) -> list[dict]:
    """The ``expert_load`` records of a metrics.jsonl (none if it does not exist); torn lines skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (
            isinstance(rec, dict)
            and rec.get("type") == "expert_load"
            and isinstance(rec.get("step"), int)
            and isinstance(rec.get("load"), dict)
        ):
            out.append(rec)
    return out


def _fmt_count(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}"


class MetricsLogger:
    """Sends metrics to every enabled sink (jsonl, W&B, console line); see the module docstring."""

    # Rows of the cumulative W&B expert-load table: past this, every other logged step is
    # dropped (the first and the latest kept), so the table spans the whole run at a coarser
    # grain.  The whole table is uploaded again at each eval: this bounds the upload per eval.
    LOAD_TABLE_MAX_ROWS = 5000

    # (label, candidate keys, formatter) for the console one-liner; first key present wins.
    _CONSOLE_FIELDS = (
        ("loss", ("train/loss", "loss"), lambda x: f"{x:.4f}"),
        ("val", ("val/loss", "eval/loss"), lambda x: f"{x:.4f}"),
        ("lr", ("train/lr", "lr"), lambda x: f"{x:.2e}"),
        ("tok/s", ("train/tokens_per_s", "tokens_per_s", "perf/tokens_per_s"), _fmt_count),
        ("mfu", ("train/mfu", "mfu", "perf/mfu"), lambda x: f"{100 * x:.1f}%"),
    )

    def __init__(
        self,
        run_dir: str | Path,
        cfg: LoggerConfig,
        *,
        run_config: dict,
        is_main: bool = True,
        run_name: str = "",
        resume_id: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.is_main = is_main
        self._jsonl = None
        self._run = None  # the wandb Run, while W&B is active
        self._wandb_id: str | None = None  # kept after close, e.g. for the final checkpoint
        self._wandb_dir: Path | None = None
        self._load_rows: list[tuple[int, list[list]]] = []  # (step, [[step, layer, expert, fraction]])
        self._closed = False
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            # Line-oriented append: a resumed run continues the same file.
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.wandb and cfg.wandb_mode != "disabled":
            self._run = self._init_wandb(run_config, run_name, resume_id)
            if self._run is not None:
                self._wandb_id = self._run.id
                self._wandb_dir = Path(self._run.settings.sync_dir)
                # A resumed run's table starts with the evals already in the jsonl.
                for rec in _expert_load_records(self.run_dir / "metrics.jsonl"):
                    self._add_load_rows(rec["step"], {int(i): f for i, f in rec["load"].items()})

    # -- W&B ------------------------------------------------------------------------------

    def _init_wandb(self, run_config: dict, run_name: str, resume_id: str | None) -> Any:
        try:
            import wandb
        except ImportError as e:
            warnings.warn(f"wandb is not importable ({e}); logging without W&B", stacklevel=3)
            return None

        def init(mode: str) -> Any:
            settings = wandb.Settings(
                quiet=True,  # keep the one-line "run data is saved in ..." notice, drop the rest
                console="off",  # don't wrap stdout/stderr: it garbles tqdm bars and costs a thread
                reinit="create_new",  # each logger owns its own run, even if another is active
            )
            return wandb.init(
                project=self.cfg.wandb_project,
                entity=self.cfg.wandb_entity or None,
                dir=str(self.run_dir),
                mode=mode,
                config=run_config,
                name=run_name or None,  # None: W&B picks a name
                id=resume_id,
                resume="allow" if resume_id else None,
                settings=settings,
            )

        mode = self.cfg.wandb_mode
        try:
            return init(mode)
        except Exception as e:  # wandb raises several types (UsageError, CommError, timeouts)
            if mode != "online":
                warnings.warn(f"W&B init failed ({type(e).__name__}: {e}); logging without W&B", stacklevel=3)
                return None
            warnings.warn(
                f"W&B online init failed ({type(e).__name__}: {e}); logging offline to "
                f"{self.run_dir / 'wandb'} instead (upload later with `wandb sync`)",
                stacklevel=3,
            )
        try:
            return init("offline")
        except Exception as e:
            warnings.warn(f"W&B offline init failed too ({type(e).__name__}: {e}); logging without W&B", stacklevel=3)
            return None

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run id (pass it back as ``resume_id`` to continue this run), or None."""
        return self._wandb_id

    @property
    def wandb_dir(self) -> Path | None:
        """This run's W&B directory (``run_dir/wandb/<offline-run|run>-<time>-<id>``), or None."""
        return self._wandb_dir

    # -- logging --------------------------------------------------------------------------

    def _active(self) -> bool:
        return self.is_main and not self._closed

    def _write(self, record: dict) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
            self._jsonl.flush()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Log ``metrics`` at ``step`` to every enabled sink.

        Values may be numbers, strings, bools, 0-d tensors or numpy scalars.  The console line
        is printed only when ``cfg.console`` is on and ``cfg.progress`` is off (otherwise the
        progress bar is the console).
        """
        if not self._active():
            return
        plain = {k: _plain(k, v) for k, v in metrics.items()}
        self._write({"step": int(step), "time": time.time(), **plain})
        if self._run is not None:
            # W&B drops (with a warning) steps below its last one, e.g. after resuming from
            # an older checkpoint; the jsonl keeps everything.
            self._run.log(plain, step=int(step))
        if self.cfg.console and not self.cfg.progress:
            line = self.console_line(step, plain)
            if " | " in line:  # skip records with nothing to show (e.g. parameter counts)
                print(line, file=sys.stdout, flush=True)

    def log_expert_load(self, step: int, load: dict[int, list[float]]) -> None:
        """The expert load at ``step``: ``load`` maps an MoE block's index to the fraction of its
        tokens that went to each expert (each list sums to 1).

        jsonl: one ``{"type": "expert_load", "load": {"<block>": [...]}}`` record.  W&B:
        ``moe/expert_load``, a table with the rows of every call so far (columns step, layer,
        expert, fraction; thinned past :attr:`LOAD_TABLE_MAX_ROWS`), and a bar chart
        ``moe/layer_<i>/expert_load`` per block.  An empty ``load`` (a dense model) logs nothing.
        """
        if not self._active() or not load:
            return
        plain = {int(i): [float(x) for x in _plain(f"load[{i}]", list(f))] for i, f in sorted(load.items())}
        self._write(
            {
                "step": int(step),
                "time": time.time(),
                "type": "expert_load",
                "load": {str(i): f for i, f in plain.items()},
            }
        )
        if self._run is None:
            return
        import wandb

        self._add_load_rows(int(step), plain)
        rows = [r for _, step_rows in self._load_rows for r in step_rows]
        data: dict[str, Any] = {
            "moe/expert_load": wandb.Table(columns=["step", "layer", "expert", "fraction"], data=rows)
        }
        for i, fr in plain.items():
            bars = wandb.Table(columns=["expert", "fraction"], data=[[f"e{j}", f] for j, f in enumerate(fr)])
            data[f"moe/layer_{i}/expert_load"] = wandb.plot.bar(
                bars, "expert", "fraction", title=f"block {i}: fraction of tokens per expert"
            )
        self._run.log(data, step=int(step))

    def _add_load_rows(self, step: int, load: dict[int, list[float]]) -> None:
        rows = [[step, i, j, f] for i, fr in sorted(load.items()) for j, f in enumerate(fr)]
        self._load_rows = [(s, r) for s, r in self._load_rows if s != step] + [
            (step, rows)
        ]  # a re-logged step replaces
        while len(self._load_rows) > 1 and sum(len(r) for _, r in self._load_rows) > self.LOAD_TABLE_MAX_ROWS:
            kept = self._load_rows[:-1][::2] + self._load_rows[-1:]  # the first, every other, the latest
            self._load_rows = kept if len(kept) < len(self._load_rows) else self._load_rows[-1:]

    def summary(self, metrics: dict[str, Any]) -> None:
        """Final results: a ``{"type": "summary", ...}`` line in the jsonl and W&B ``run.summary``."""
        if not self._active():
            return
        plain = {k: _plain(k, v) for k, v in metrics.items()}
        self._write({"type": "summary", "time": time.time(), **plain})
        if self._run is not None:
            self._run.summary.update(plain)

    def console_line(self, step: int, metrics: dict[str, Any]) -> str:
        """A compact one-liner, e.g. ``step 120 | loss 3.4120 | tok/s 12.3k | cv 0.21``.

        ``cv`` is the mean of the ``moe/layer_*/cv`` keys (the layers' load imbalance).
        Missing keys are left out.
        """
        parts = [f"step {int(step)}"]
        for label, keys, fmt in self._CONSOLE_FIELDS:
            for k in keys:
                v = _number(metrics.get(k))
                if v is not None:
                    parts.append(f"{label} {fmt(v)}")
                    break
        cvs = [_number(v) for k, v in metrics.items() if k.startswith("moe/layer_") and k.endswith("/cv")]
        cvs = [v for v in cvs if v is not None]
        if cvs:  # the worst layer: one collapsed layer must show
            parts.append(f"cv {max(cvs):.3f}")
        return " | ".join(parts)

    def close(self, exit_code: int = 0) -> None:
        """Flush and close the jsonl and finish the W&B run; safe to call twice."""
        if not self._active():
            return
        self._closed = True
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A run that ends in an exception is marked failed in W&B.
        self.close(exit_code=0 if exc_type is None else 1)


def truncate_jsonl(path: Path, step: int) -> None:
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
    write_text_atomic(path, "".join(k + "\n" for k in kept))


def last_logged(path: Path, key: str) -> float:
    """The last value of ``key`` in a ``metrics.jsonl`` (NaN when none); reads, never writes."""
    value = float("nan")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return value
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get(key), (int, float)):
            value = float(rec[key])
    return value


def wandb_dirs(run_dir: Path, run_id: str | None) -> list[Path]:
    """The W&B directories of run ``run_id`` under ``run_dir/wandb`` (a resumed run adds one per
    start), oldest first; ``wandb sync`` needs all of them for the whole history."""
    if not run_id:
        return []
    return sorted((Path(run_dir) / "wandb").glob(f"*-{run_id}"))
