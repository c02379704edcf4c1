"""``moe-bench swarm`` runs, prints its table and writes JSON (tiny sizes, real servers on
127.0.0.1; no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("hivemind")

from moe.bench.cli import main  # noqa: E402
from moe.bench.swarm import ARMS, NET_ARM, LocalGridMoE, markdown_table  # noqa: E402


def test_local_grid_moe_is_the_swarm_function_on_a_hand_built_grid():
    """No network: with routers that score expert (i, j) as a[i] + b[j], the local layer picks
    the exact top-k of the grid and mixes the experts with a softmax over those k."""
    import torch

    from moe.model.experts import GroupedExperts
    from moe.model.layers import Router

    torch.manual_seed(0)
    D, grid, k = 8, [2, 3], 2
    routers = torch.nn.ModuleList(Router(D, g) for g in grid)
    experts = GroupedExperts(6, D, 16)
    x = torch.randn(5, D)
    y, _ = LocalGridMoE(routers, experts, grid, k)(x)
    s = (routers[0](x)[:, :, None] + routers[1](x)[:, None, :]).reshape(5, 6)
    for t in range(5):
        top = s[t].topk(k)
        w = torch.softmax(top.values, 0)
        ref = sum(
            w[j] * experts.forward_grouped(x[t : t + 1], [1 if e == top.indices[j] else 0 for e in range(6)])
            for j in range(k)
        )
        torch.testing.assert_close(y[t : t + 1], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.network
@pytest.mark.timeout(300)
def test_swarm_bench_writes_json_with_every_row(tmp_path, capsys):
    out = tmp_path / "swarm.json"
    rc = main(
        [
            "swarm",
            "--sizes",
            "16x32x48",
            "--grid",
            "4",
            "2",
            "--k",
            "2",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--timeout-after-k-min",
            "10",
            "--network",
            "rtt=20ms,rate=50mbit",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "swarm" and result["servers"] == 4 and result["failed_fraction"] == 0.25
    rows = {r["arm"]: r for r in result["rows"]}
    assert [(r["d_model"], r["d_ff"], r["tokens"], r["arm"]) for r in result["rows"]] == [
        (16, 32, 48, arm) for arm in (*ARMS, NET_ARM)
    ]
    for r in result["rows"]:
        assert r["tokens_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(48 / (r["ms"] / 1e3))
        assert r["vs_local"] == pytest.approx(r["tokens_per_s"] / rows["local"]["tokens_per_s"])
        assert len(result["rounds"][f"16x32x48 {r['arm']}"]) == 2  # every arm in every round
    # the live swarm computes the local layer's function, and nothing fails in it (a 10 s
    # straggler window: a slow live server on a loaded machine is not cut off; the dead
    # server's calls fail at once, their dial refused)
    assert result["max_abs_diff_swarm_vs_local"]["16x32x48 swarm"] < 1e-4
    assert result["max_abs_diff_swarm_vs_local"]["16x32x48 swarm, emulated network"] < 1e-4
    # behind 20 ms links a step waits at least a round trip (forward) and another (backward)
    assert rows[NET_ARM]["ms"] > 2 * 20 and rows[NET_ARM]["failed_experts"] == 0
    assert rows["swarm"]["failed_experts"] == 0 and rows["swarm"]["dropped_frac"] == 0
    # the killed server's row (2 of the 8 experts) fails and is masked, every step
    failing = rows["swarm, 25% failed"]
    assert 0 < failing["failed_experts"] <= 2 and 0 < failing["dropped_frac"] < 1
    printed = capsys.readouterr().out
    table = markdown_table(result)
    assert "vs local" in table and all(line in printed for line in table.splitlines())


def test_swarm_bench_rejects_a_grid_without_a_failing_quarter(tmp_path):
    with pytest.raises(SystemExit):
        main(["swarm", "--grid", "3", "2", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        main(["swarm", "--sizes", "16x32", "--out", str(tmp_path / "x.json")])


def test_moe_bench_help_lists_the_swarm_subcommand(capsys):
    for argv in (["--help"], ["swarm", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "swarm" in out and "25% of the experts failing" in out and "--sizes" in out


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_swarm_train_bench_compares_the_syncs_and_survives_a_kill(tmp_path):
    """``moe-bench swarm --train`` at a toy size: every arm trains every step, the bytes and the
    loss are reported per arm, and the killed arm's survivors finish.  The command runs in a
    process of its own, as a user runs it: its peers, DHTs and p2p daemons come and go with it,
    whatever happens to it."""
    out = tmp_path / "train.json"
    config = [
        "moe=switch",
        "model=tiny",
        "model.n_layers=2",
        "model.d_model=32",
        "model.n_heads=2",
        "model.d_ff=64",
        "model.seq_len=64",
        "batch_size=16",
        "data.tokenizer=byte",
        "data.max_files=40",
        "optim.warmup_steps=2",
        "logger=none",
        "eval_batches=2",
    ]
    log_out, log_err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with log_out.open("w") as stdout, log_err.open("w") as stderr:  # files: a leftover helper holds no pipe open
        try:
            rc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "moe.bench.cli",
                    "swarm",
                    "--train",
                    "--steps",
                    "16",
                    "--inner-steps",
                    "8",
                    "--matchmaking-time",
                    "1",
                    "--averaging-timeout",
                    "20",  # an all-reduce that stalls costs 20 s, not 60 (seen: arms of 64-70 s among arms of 3 s)
                    "--network",
                    "rtt=20ms,rate=100mbit",
                    "--out",
                    str(out),
                    "--config",
                    *config,
                ],
                stdout=stdout,
                stderr=stderr,
                timeout=780,
            ).returncode
        except subprocess.TimeoutExpired:
            pytest.fail("moe-bench swarm --train outlasted 780 s:\n" + log_err.read_text()[-4000:])
    printed = log_out.read_text()
    assert rc == 0, log_err.read_text()[-4000:]
    result = json.loads(out.read_text())
    arms = {(a["arm"], a["network"]): a for a in result["arms"]}
    assert set(arms) == {
        *((arm, net) for arm in ("every-step", "diloco fp16", "diloco int8") for net in ("loopback", "emulated")),
        ("diloco fp16 (1 of 3 peers killed)", "emulated"),
    }
    for a in result["arms"]:
        assert a["finished"], a  # every surviving peer trained every step: nothing hung
        assert a["tokens_per_s"] > 0 and a["wire_bytes_sent_per_mtok"] > 0 and a["val_loss"] > 0
        assert a["wire_bytes_sent_per_mtok"] >= 0.9 * a["tensor_bytes_sent_per_mtok"]  # the wire carries the tensors
    # the summary states every bar (at this toy size every-step's peers may step alone: no ratio is asserted)
    s = result["summary"]
    for key in ("bytes_every_step_over_diloco", "val_loss_gap_diloco", "diloco"):
        assert any(k.startswith(key) for k in s), s

    # 8 bits send less than fp16, a round of fp16 about 2 bytes a parameter (reduce-scatter + all-gather);
    # the peer that sent least (a peer that shared its state with a late mate sent that too)
    def least(arm):
        return min(r["tensor_bytes_sent_per_mtok"] * r["tokens"] / 1e6 for r in arm["peers_rows"])

    n = result["arms"][0]["params"]
    fp16, int8 = arms[("diloco fp16", "loopback")], arms[("diloco int8", "loopback")]
    assert 1.0 < least(fp16) / 2 / n < 3.0, least(fp16) / 2 / n  # 2 rounds
    assert least(int8) < 0.7 * least(fp16)
    killed = arms[("diloco fp16 (1 of 3 peers killed)", "emulated")]
    assert killed["killed_at_s"] is not None and len(killed["peers_rows"]) == 2 and s["killed_run_finished"]
    assert all(f"| {a['arm']} | {a['network']} (" in printed for a in result["arms"])  # the table, printed
