"""`moe-bench layer` runs, prints its table and writes JSON (tiny sizes; no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moe.bench import main, markdown_table


def test_layer_bench_writes_json_with_every_row(tmp_path, capsys):
    out = tmp_path / "layer.json"
    rc = main(["layer", "--d-model", "32", "--d-ff", "64", "--tokens", "256", "--experts", "4", "8", "--k", "1", "2", "--repeats", "1", "--no-deepspeed", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["E"], r["k"], r["mode"]) for r in rows} == {(E, k, m) for E in (4, 8) for k in (1, 2) for m in ("dropless", "capacity")}
    for r in rows:
        assert r["impl"] == "ours" and r["tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["tokens_per_s"] / r["limit_tokens_per_s"])
    printed = capsys.readouterr().out
    assert "ratio" in printed and markdown_table(result).splitlines()[2] in printed


def test_layer_bench_rejects_k_larger_than_experts(tmp_path):
    with pytest.raises(SystemExit):
        main(["layer", "--experts", "2", "--k", "3", "--out", str(tmp_path / "x.json")])


@pytest.mark.slow
def test_layer_bench_measures_deepspeed_side_by_side(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "layer.json"
    cmd = [sys.executable, "-m", "moe.bench", "layer", "--d-model", "32", "--d-ff", "64", "--tokens", "256", "--experts", "4", "--k", "1", "--repeats", "1", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    impls = {(r["mode"], r["impl"]) for r in json.loads(out.read_text())["rows"]}
    assert impls == {("dropless", "ours"), ("dropless", "deepspeed"), ("capacity", "ours"), ("capacity", "deepspeed")}
