"""MetricsLogger: metrics.jsonl contents, a real offline W&B run, and the no-op paths."""

import json
import sys
import time

import pytest
import torch

from moe.config import LoggerConfig
from moe.training.sinks import MetricsLogger
from tests.wandb_file import history, logged_table, offline_run


def _strict_json(line: str) -> dict:
    def reject(name):  # NaN / Infinity literals are not valid JSON
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=reject)


def _lines(path):
    return [_strict_json(line) for line in path.read_text().splitlines()]


def _wait_for_bytes(path, needles, timeout=10.0):
    """wandb 0.31's finish() returns once the core has the records; the core writes the last
    block of the .wandb file when it closes the stream a few ms later."""
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes()
        if all(n in data for n in needles):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def test_jsonl_and_offline_wandb(tmp_path):
    cfg = LoggerConfig(wandb=True, wandb_mode="offline", progress=True)
    lg = MetricsLogger(tmp_path / "run", cfg, run_config={"model": {"d_model": 64}}, run_name="t")
    run_id = lg.wandb_run_id
    assert run_id and lg.wandb_dir is not None
    for s in range(3):
        lg.log(s * 10, {"train/loss": 4.0 - s, "train/tokens_per_s": torch.tensor(100.0 * s), "train/step_in_epoch": s})
    lg.summary({"final/val_loss": 1.5, "note": "done"})
    lg.close()
    lg.close()  # idempotent
    assert lg.wandb_run_id == run_id  # still known after close, for the checkpoint

    recs = _lines(tmp_path / "run" / "metrics.jsonl")
    assert len(recs) == 4
    assert [r["step"] for r in recs[:3]] == [0, 10, 20]
    assert [r["train/loss"] for r in recs[:3]] == [4.0, 3.0, 2.0]
    assert recs[2]["train/tokens_per_s"] == 200.0 and isinstance(recs[2]["train/step_in_epoch"], int)
    assert all(isinstance(r["time"], float) for r in recs)
    assert recs[3]["type"] == "summary" and recs[3]["final/val_loss"] == 1.5 and recs[3]["note"] == "done"

    wdir = tmp_path / "run" / "wandb"
    files = list(wdir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1 and files[0].parent == lg.wandb_dir
    # history and summary reached W&B (wandb-core writes the file's tail shortly after finish)
    assert _wait_for_bytes(files[0], [b"train/loss", b"final/val_loss"])

    # logging after close is ignored, and a new logger appends to the same jsonl
    lg.log(30, {"train/loss": 0.0})
    lg2 = MetricsLogger(tmp_path / "run", LoggerConfig(wandb=False), run_config={})
    lg2.log(30, {"train/loss": 1.0})
    lg2.close()
    recs = _lines(tmp_path / "run" / "metrics.jsonl")
    assert len(recs) == 5 and recs[-1] == {**recs[-1], "step": 30, "train/loss": 1.0}


def test_resume_id_continues_the_same_run(tmp_path):
    cfg = LoggerConfig(wandb_mode="offline")
    with MetricsLogger(tmp_path, cfg, run_config={}, resume_id="resume123") as lg:
        lg.log(1, {"x": 1.0})
        assert lg.wandb_run_id == "resume123"
    assert list((tmp_path / "wandb").glob("offline-run-*-resume123/run-resume123.wandb"))


def test_not_main_writes_nothing(tmp_path):
    run_dir = tmp_path / "rank1"
    lg = MetricsLogger(run_dir, LoggerConfig(wandb_mode="offline"), run_config={"a": 1}, is_main=False)
    lg.log(0, {"loss": 1.0})
    lg.log_expert_load(0, {1: [0.5, 0.5]})
    lg.summary({"loss": 1.0})
    lg.close()
    assert not run_dir.exists()
    assert lg.wandb_run_id is None and lg.wandb_dir is None


def test_non_finite_values_are_valid_json(tmp_path):
    lg = MetricsLogger(tmp_path, LoggerConfig(wandb=False), run_config={})
    lg.log(
        5,
        {
            "nan": float("nan"),
            "inf": float("inf"),
            "ninf": torch.tensor(float("-inf")),
            "ok": 1.0,
            "vec": [1.0, float("nan")],
        },
    )
    lg.summary({"best": float("nan")})
    lg.close()
    rec, summ = _lines(tmp_path / "metrics.jsonl")
    assert rec["nan"] is None and rec["inf"] is None and rec["ninf"] is None and rec["ok"] == 1.0
    assert rec["vec"] == [1.0, None]
    assert summ["best"] is None
    assert not (tmp_path / "wandb").exists()  # cfg.wandb=False: no W&B at all


def test_disabled_mode_and_jsonl_off(tmp_path):
    lg = MetricsLogger(tmp_path, LoggerConfig(wandb_mode="disabled", jsonl=False), run_config={})
    lg.log(0, {"loss": 1.0})
    lg.close()
    assert lg.wandb_run_id is None
    assert list(tmp_path.iterdir()) == []


def test_unloggable_value_names_the_key(tmp_path):
    lg = MetricsLogger(tmp_path, LoggerConfig(wandb=False), run_config={})
    with pytest.raises(TypeError, match="weird"):
        lg.log(0, {"weird": object()})
    lg.close()


def test_missing_wandb_warns_and_carries_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.warns(UserWarning, match="wandb is not importable"):
        lg = MetricsLogger(tmp_path, LoggerConfig(wandb_mode="offline"), run_config={})
    lg.log(1, {"loss": 2.0})
    lg.close()
    assert lg.wandb_run_id is None
    assert _lines(tmp_path / "metrics.jsonl")[0]["loss"] == 2.0


def test_console_line(tmp_path, capsys):
    lg = MetricsLogger(tmp_path, LoggerConfig(wandb=False, jsonl=False, progress=False), run_config={})
    m = {
        "train/loss": 3.41234,
        "perf/tokens_per_s": 12345.0,
        "moe/layer_1/cv": 0.2,
        "moe/layer_3/cv": torch.tensor(0.4),
    }
    line = lg.console_line(120, m)
    assert line == "step 120 | loss 3.4123 | tok/s 12.3k | cv 0.400"  # the worst layer
    lg.log(120, m)  # progress bars off: log prints the line
    assert capsys.readouterr().out.strip() == line
    lg.close()

    quiet = MetricsLogger(tmp_path, LoggerConfig(wandb=False, jsonl=False, progress=True), run_config={})
    quiet.log(1, m)  # progress bars on: the bar is the console
    assert capsys.readouterr().out == ""
    assert quiet.console_line(7, {}) == "step 7"


def test_expert_load_table_is_cumulative_bounded_and_survives_a_resume(tmp_path):
    cfg = LoggerConfig(wandb_mode="offline", progress=True)
    lg = MetricsLogger(tmp_path, cfg, run_config={})
    lg.LOAD_TABLE_MAX_ROWS = 12  # 3 evals of 2 layers x 2 experts
    for s in range(1, 7):
        lg.log_expert_load(s, {3: torch.tensor([0.25, 0.75]), 1: [s / 10, 1 - s / 10]})
    lg.log_expert_load(7, {})  # a dense model: nothing to log
    lg.close()
    t2, t6 = logged_table(lg.wandb_dir, "moe/expert_load", 2), logged_table(lg.wandb_dir, "moe/expert_load", 6)
    assert t2["columns"] == ["step", "layer", "expert", "fraction"]
    assert t2["data"] == [
        [1, 1, 0, 0.1],
        [1, 1, 1, 0.9],
        [1, 3, 0, 0.25],
        [1, 3, 1, 0.75],
        [2, 1, 0, 0.2],
        [2, 1, 1, 0.8],
        [2, 3, 0, 0.25],
        [2, 3, 1, 0.75],
    ]
    steps6 = sorted({row[0] for row in t6["data"]})
    assert len(t6["data"]) <= 12 and steps6[0] == 1 and steps6[-1] == 6  # thinned, still spans the run
    assert logged_table(lg.wandb_dir, "moe/layer_3/expert_load_table", 6)["data"] == [["e0", 0.25], ["e1", 0.75]]

    recs = [r for r in _lines(tmp_path / "metrics.jsonl") if r.get("type") == "expert_load"]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[0]["load"] == {"1": [0.1, 0.9], "3": [0.25, 0.75]} and isinstance(recs[0]["time"], float)

    # a resumed run (same W&B id) starts its table with the evals already in the jsonl
    lg2 = MetricsLogger(tmp_path, cfg, run_config={}, resume_id=lg.wandb_run_id)
    lg2.log_expert_load(7, {1: [0.5, 0.5], 3: [0.5, 0.5]})
    lg2.close()
    assert sorted({row[0] for row in logged_table(lg2.wandb_dir, "moe/expert_load", 7)["data"]}) == [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
    ]


def test_expert_load_lands_in_the_offline_wandb_history(tmp_path):
    with MetricsLogger(tmp_path, LoggerConfig(wandb_mode="offline"), run_config={}) as lg:
        lg.log(4, {"train/loss": 1.0})
        lg.log_expert_load(4, {0: [1.0, 0.0]})
    _, records = offline_run(tmp_path)
    assert {"train/loss", "moe/expert_load", "moe/layer_0/expert_load_table"} <= history(records)[4]
