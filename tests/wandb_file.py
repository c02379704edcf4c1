"""Read an offline W&B run's ``run-<id>.wandb`` file with wandb's own protobuf ``Record``.

wandb 0.31 ships no Python reader for it (wandb-core, in Go, reads and writes it), so the
framing is parsed here: a 7-byte header (``:W&B``, 0xBEE1, version 0), then LevelDB-log blocks
of 32 KiB whose chunks carry a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle,
4 last).  Offline runs do not write ``files/config.yaml``: the config lives in this file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

_BLOCK = 32768


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    out, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:  # padding up to the end of the block
            pos += left
            continue
        if pos + 7 + n > len(data):  # the tail wandb-core is still writing: read it next time
            break
        parts += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            try:
                rec.ParseFromString(parts)
            except Exception:
                if pos >= len(data):  # the last record, caught mid-write
                    break
                raise
            out.append(rec)
            parts = b""
    return out


def run_records(wandb_dir: Path, timeout: float = 15.0) -> list:
    """The records of the W&B run in ``wandb_dir`` (``.../wandb/offline-run-<time>-<id>``), once
    its exit record is written (wandb-core writes the file's tail a few ms after ``finish()``)."""
    (run_file,) = Path(wandb_dir).glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        recs = read_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.02)


def offline_run(run_dir: Path) -> tuple[Path, list]:
    """The one offline W&B run under ``run_dir/wandb``: its directory and records."""
    (wandb_dir,) = Path(run_dir).glob("wandb/offline-run-*")
    return wandb_dir, run_records(wandb_dir)


def run_config(records: list) -> dict:
    """The run's config: the run record's, updated by later config records (``key`` or a
    ``nested_key`` path, e.g. ``_wandb.visualize.<chart key>``)."""
    cfg: dict = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        items = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for u in items:
            *parents, leaf = [u.key] if u.key else list(u.nested_key)
            d = cfg
            for k in parents:
                d = d.setdefault(k, {})
            d[leaf] = json.loads(u.value_json)
    return cfg


def history(records: list) -> dict[int, set[str]]:
    """Step -> the top-level keys logged at that step."""
    out: dict[int, set[str]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            out.setdefault(r.history.step.num, set()).update(i.key or i.nested_key[0] for i in r.history.item)
    return out


def table_paths(records: list, key: str) -> dict[int, str]:
    """Step -> the media path (relative to the run's ``files/``) of the table logged as ``key``.
    (The file name's number is wandb's step counter when the table was serialised, which can be
    the previous step: look tables up here, not by name.)"""
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for i in r.history.item:
                if list(i.nested_key) == [key, "path"]:
                    out[r.history.step.num] = json.loads(i.value_json)
    return out


def logged_table(wandb_dir: Path, key: str, step: int) -> dict:
    """The ``wandb.Table`` JSON logged as ``key`` at ``step`` by the W&B run in ``wandb_dir``."""
    return json.loads((Path(wandb_dir) / "files" / table_paths(run_records(wandb_dir), key)[step]).read_text())
