"""`moe-bench layer` runs, prints its table and writes JSON (tiny sizes; no timing asserted)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from moe.bench.cli import main
from moe.bench.layer import markdown_table


def test_layer_bench_writes_json_with_every_row(tmp_path, capsys):
    out = tmp_path / "layer.json"
    rc = main(
        [
            "layer",
            "--d-model",
            "32",
            "--d-ff",
            "64",
            "--tokens",
            "256",
            "--experts",
            "4",
            "8",
            "--k",
            "1",
            "2",
            "--repeats",
            "1",
            "--no-deepspeed",
            "--fine-grained",
            "2:4:1",
            "2:2:1+1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    rows = [r for r in result["rows"] if "granularity" not in r]
    assert {(r["E"], r["k"], r["mode"]) for r in rows} == {
        (E, k, m) for E in (4, 8) for k in (1, 2) for m in ("dropless", "capacity")
    }
    fine = [r for r in result["rows"] if "granularity" in r and r["impl"] == "ours"]
    assert [(r["E"], r["k"], r["expert_d_ff"], r["shared"]) for r in fine] == [(8, 4, 16, 0), (4, 2, 32, 1)]
    # torch's grouped GEMM timed beside ours in every dropless row, its own column
    torch_rows = {(r["E"], r["k"], r["mode"]) for r in result["rows"] if r["impl"] == "grouped_mm"}
    assert torch_rows == {(E, k, "dropless") for E in (4, 8) for k in (1, 2)} | {(8, 4, "dropless"), (4, 2, "dropless")}
    assert "_grouped_mm" in markdown_table(result).splitlines()[0]
    # the limit is the dense FFN's tokens/s over the active width: 4 x 16 = 1 FFN; (2 + 1) x 32 = 1.5 FFNs
    for r, width in zip(fine, (1.0, 1.5)):
        assert r["active_width"] == width
        assert r["limit_tokens_per_s"] == pytest.approx(r["dense_tokens_per_s"] / width)
        assert 0 < r["ratio"] == pytest.approx(r["tokens_per_s"] / r["limit_tokens_per_s"])
    assert "| 8 x 16 | 0 | 4 |" in markdown_table(result) and "| 4 x 32 | 1 | 2 |" in markdown_table(result)
    for r in rows:
        assert r["impl"] in ("ours", "grouped_mm") and r["tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["tokens_per_s"] / r["limit_tokens_per_s"])
    printed = capsys.readouterr().out
    assert "ratio" in printed and markdown_table(result).splitlines()[2] in printed


def test_layer_bench_rejects_k_larger_than_experts(tmp_path):
    with pytest.raises(SystemExit):
        main(["layer", "--experts", "2", "--k", "3", "--out", str(tmp_path / "x.json")])
    for bad in ("8:3", "8:3:1", "2:2:3"):  # malformed; d_ff 2048 not divisible by 3; k > N
        with pytest.raises(SystemExit):
            main(["layer", "--fine-grained", bad, "--out", str(tmp_path / "x.json")])


@pytest.mark.slow
def test_layer_bench_measures_deepspeed_side_by_side(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "layer.json"
    cmd = [
        sys.executable,
        "-m",
        "moe.bench.cli",
        "layer",
        "--d-model",
        "32",
        "--d-ff",
        "64",
        "--tokens",
        "256",
        "--experts",
        "4",
        "--k",
        "1",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    impls = {(r["mode"], r["impl"]) for r in json.loads(out.read_text())["rows"]}
    assert impls == {
        ("dropless", "ours"),
        ("dropless", "grouped_mm"),
        ("dropless", "deepspeed"),
        ("capacity", "ours"),
        ("capacity", "deepspeed"),
    }


def test_parallel_bench_table_and_json_from_its_own_numbers(tmp_path, capsys):
    """`moe-bench parallel` with a tiny model: two spawned gloo ranks, every layout measured,
    efficiency = tokens/s(2) / (2 x tokens/s(1)) from the numbers it reports (no speed bar)."""
    from moe.bench import parallel as bench_parallel

    out = tmp_path / "parallel.json"
    rc = main(
        [
            "parallel",
            "--n-layers",
            "1",
            "--d-model",
            "32",
            "--n-heads",
            "2",
            "--d-ff",
            "64",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--experts",
            "4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--max-files",
            "10",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--timeout",
            "240",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "parallel" and result["threads_per_process"] == 1 and result["steps"] == 2
    rows = {r["layout"]: r for r in result["rows"]}
    assert [(r["layout"], r["processes"], r["ep_size"]) for r in result["rows"]] == [
        ("1 process", 1, 1),
        ("DP=2", 2, 1),
        ("EP=2", 2, 2),
        ("DP=2, no overlap", 2, 1),
    ]
    one = rows["1 process"]
    assert one["efficiency"] is None and one["comm_s"] == 0
    for r in result["rows"]:
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and 0 <= r["comm_share"] <= 1
        assert r["comm_share"] == pytest.approx(r["comm_s"] / r["step_s"])
        assert len(result["rounds"][r["layout"]]) == 2  # every layout in every round
    for name in ("DP=2", "EP=2", "DP=2, no overlap"):
        assert rows[name]["comm_s"] > 0  # gradient all-reduce; EP also the all-to-all
        assert rows[name]["efficiency"] == pytest.approx(rows[name]["tokens_per_s"] / (2 * one["tokens_per_s"]))
        # tokens/s counts both processes' tokens: 2 x batch x seq_len per step
        m = result["rounds"][name]
        assert statistics.median(x["tokens_per_s"] for x in m) == pytest.approx(rows[name]["tokens_per_s"])
        assert m[0]["tokens_per_s"] == pytest.approx(2 * 2 * 32 * 2 / m[0]["seconds"])
    printed = capsys.readouterr().out
    table = bench_parallel.markdown_table(result)
    assert "weak-scaling efficiency" in table and all(line in printed for line in table.splitlines())


def test_parallel_bench_rejects_an_odd_expert_count(tmp_path):
    with pytest.raises(SystemExit):
        main(["parallel", "--experts", "3", "--out", str(tmp_path / "x.json")])
