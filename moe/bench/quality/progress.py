"""How far an arm is, read from its run directory while it trains (the one progress bar)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from moe.training.checkpoint import load as load_ckpt


def tail_records(metrics: Path, nbytes: int = 8192) -> list[dict]:
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


def step_of(records: list[dict]) -> int:
    for r in reversed(records):
        if "step" in r:  # (the end-of-run summary record has none)
            return int(r["step"])
    return 0


def last_step(metrics: Path) -> int:
    """The last step logged; the tail read grows until it holds a whole record with a step
    (an expert-load record of many experts is longer than the first 8 KiB read)."""
    nbytes = 8192
    while True:
        recs = tail_records(metrics, nbytes)
        if any("step" in r for r in recs) or nbytes >= 1 << 22:
            return step_of(recs)
        nbytes *= 4


def finished(run_dir: Path, steps: int) -> bool:
    """The run reached ``steps`` and ended cleanly (its summary record is written last)."""
    recs = tail_records(run_dir / "metrics.jsonl")
    return bool(recs) and recs[-1].get("type") == "summary" and last_step(run_dir / "metrics.jsonl") >= steps


def start_step(run_dir: Path, steps: int) -> int:
    """The step an arm's run starts from: ``steps`` if it finished, else its checkpoint's step
    (the trainer drops the metrics records logged after the checkpoint when it resumes)."""
    if finished(run_dir, steps):
        return steps
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return 0
    try:
        return min(steps, int(load_ckpt(path, mmap=True)["step"]))
    except Exception:  # a checkpoint torn by a crash: the trainer will say so, one arm in
        return 0


def file_sig(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def steps_done(run_dir: Path, start: int, stale: tuple | None, steps: int) -> int:
    """An arm's progress while it trains.  Until moe-train has touched its metrics.jsonl
    (``stale`` is the file's signature at launch) the records in it may be ones it is about to
    drop (logged after the checkpoint, or by a run that never checkpointed): count from
    ``start`` until then, so the bar never jumps ahead and back."""
    path = run_dir / "metrics.jsonl"
    if file_sig(path) == stale:
        return start
    return max(start, min(steps, last_step(path)))
