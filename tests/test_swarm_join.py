"""``moe-join`` and ``launch/swarm_local.sh``: real processes on 127.0.0.1, no mocks.

Every wait is bounded (line reads, process exits, the DHT expiration of a stopped server's
experts, the whole local swarm run); every process a test starts is stopped in ``finally``.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from moe.parallel.ports import free_port

pytest.importorskip("hivemind")

ROOT = Path(__file__).resolve().parent.parent
JOIN = [sys.executable, "-m", "moe.cli.join"]


class Peer:
    """A ``moe-join`` process in its own session; its stdout lines read by a thread."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(
            [*JOIN, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        self._eof = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._eof = True

    def wait_line(self, start: str, timeout: float = 120.0) -> str:
        """The first (new) stdout line starting with ``start``; fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.5)
            except queue.Empty:
                assert not self._eof, f"moe-join exited ({self.proc.poll()}) without it; output: {self.lines}"
                continue
            self.lines.append(line)
            if line.strip().startswith(start):
                return line.strip()
        raise AssertionError(f"no line starting with {start!r} within {timeout} s; output: {self.lines}")

    def stop(self) -> None:
        """SIGKILL the session if it is still running (the clean path is tested separately)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)
        try:  # helpers (DHT process, handlers, p2p daemon) of a peer that was SIGINTed are gone too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2, before anything starts

PEER = "12D3KooWPjceQrSwdWXPyLLeABRXmuqt69Rg3sBYbU1Nft9HyQ6X"  # a well-formed peer id nobody has
BAD = [
    (["--initial-peers", "127.0.0.1:31337"], "--initial-peers '127.0.0.1:31337': not a multiaddr"),
    (["--initial-peers", "/ip4/127.0.0.1/tcp/31337"], "no /p2p/<peer id> part"),
    (["--initial-peers", "/ip4/999.0.0.1/tcp/1/p2p/QmAbc"], "not an IPv4 address"),
    # addresses that parse but lead nowhere (issue 16): one line each, no traceback
    (["--initial-peers", "/ip4/127.0.0.1/tcp/45999/p2p/QmAbcdef123"], "QmAbcdef123 is not a peer id"),
    (
        ["--initial-peers", f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{PEER}", "--start-timeout", "30"],
        "failed to connect to bootstrap peers; check that a peer is running there",
    ),
    (
        ["--initial-peers", f"/ip4/127.0.0.1/udp/{free_port()}/quic/p2p/{PEER}", "--start-timeout", "30"],
        "give a peer's /tcp/ address",
    ),
    (["--serve", "65"], "--serve 65: the grid 8x8 has 64 experts"),
    (["--serve", "5", "--grid", "2", "2"], "--serve 5: the grid 2x2 has 4 experts"),
    (["--serve", "4", "--first", "62"], "(2 from --first 62)"),
    (["--serve", "-1"], "--serve -1: the number of experts must be >= 0"),
    (["--grid", "8", "0"], "--grid 8 0: every grid dimension must be >= 1"),
    (["--prefix", "a.b"], "--prefix: expert prefix"),
    (["--host", "localhost"], "--host 'localhost' is not an IPv4 address"),
    (["--announce", "/ip4/1.2.3.4/tcp/5/p2p/QmAbc"], "--announce"),
    (["--expiration", "1", "--update-period", "5"], "--expiration 1.0 < --update-period 5.0"),
    (["--serve", "two"], "argument --serve: invalid int value"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    # the trainer role (--train): checked before anything starts, the config too
    (["experiment=smoke"], "'experiment=smoke': config overrides are for the trainer role; add --train"),
    (["--train", "--target-batch-size", "0"], "--target-batch-size 0 must be >= 1"),
    (["--train", "--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["--train", "--steps", "-1"], "--steps -1 must be >= 0"),
    (
        ["--train", "--matchmaking-time", "0"],
        "--matchmaking-time, --averaging-timeout and --load-state-timeout must be > 0",
    ),
    (["--train", "--sync", "diloco", "--inner-steps", "0"], "--inner-steps 0 must be >= 1"),
    (["--train", "--sync", "diloco", "--outer-momentum", "1"], "--outer-momentum 1.0 in [0, 1)"),
    (["--train", "--sync", "sometimes"], "argument --sync: invalid choice: 'sometimes'"),
    (["--train", "--compression", "int4"], "argument --compression: invalid choice: 'int4'"),
    (["--train", "model.d_model=32"], "'model.d_model=32': moe-join sets model.d_model itself; use --d-model"),
    (["--train", "model=nosuch"], "model=nosuch: there is no model config named 'nosuch'"),
    (["--train", "optim.nosuch=1"], "optim.nosuch"),
    (["--train", "moe.swarm.k_best=99"], "moe.swarm.k_best=99 > the grid's 64 experts"),
    (["--train", "grad_accum=2"], "grad_accum=2: a trainer peer accumulates up to --target-batch-size by itself"),
]


@pytest.mark.parametrize("args,fragment", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_is_one_line_exit_2(args, fragment):
    p = subprocess.run([*JOIN, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("moe-join: error: ") and fragment in lines[0], lines[0]
    assert not p.stdout.strip()  # nothing started


def test_help_names_the_three_roles():
    p = subprocess.run([*JOIN, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    assert "--serve" in p.stdout and "--train" in p.stdout and "--target-batch-size" in p.stdout
    assert "hivemind.Optimizer" in p.stdout and "not implemented" not in p.stdout


# ---------------------------------------------------------------------------------------------
# the first peer's join line, a serving peer found by a layer, and leaving on Ctrl-C


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_join_line_serve_and_leave_on_sigint():
    from moe.swarm.dht import shutdown_dht, start_dht
    from moe.swarm.layer import SwarmMoE
    from moe.swarm.records import record_validators
    from moe.swarm.uids import grid_uids

    root = Peer(["--status-every", "5"])
    server = dht = None
    try:
        line = root.wait_line("moe-join --initial-peers")
        args = shlex.split(line)[1:]  # exactly what the first peer told us to run ...
        assert args[0] == "--initial-peers" and "/p2p/" in args[1]
        # ... with a small model and a short expiration (later flags win)
        server = Peer(
            [
                *args,
                "--serve",
                "3",
                "--d-model",
                "16",
                "--d-ff",
                "32",
                "--expiration",
                "4",
                "--update-period",
                "1",
                "--status-every",
                "1",
            ]
        )
        served = server.wait_line("moe-join: serving ")
        assert "serving 3 experts ffn.0.0 .. ffn.0.2" in served and "signed" in served
        server.wait_line("moe-join: status: experts 3")

        dht = start_dht([args[1]], record_validators=record_validators("ffn"))
        layer = SwarmMoE(
            16,
            dht=dht,
            uid_prefix="ffn",
            grid_size=[8, 8],
            k_best=2,
            k_min=1,
            forward_timeout=20,
            timeout_after_k_min=0.5,
            backward_timeout=20,
            require_signed=True,
        )
        mine = {layer.flat_index((0, j)) for j in range(3)}
        x = torch.randn(8, 16)
        deadline = time.monotonic() + 60
        while True:  # the declarations reach the DHT within a few seconds
            _, aux = layer(x)
            if aux.alive_TK.any():
                break
            assert time.monotonic() < deadline, f"the served experts were never used: {aux.failed}"
            time.sleep(1)
        assert set(aux.expert_idx_TK[aux.alive_TK].tolist()) <= mine

        server.proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert server.proc.wait(90) == 0
        server.wait_line("moe-join: leaving the swarm", timeout=10)
        deadline = time.monotonic() + 60  # expiration 4 s; the DHT drops the records after it
        while True:
            _, aux = layer(x)
            if not (aux.expert_idx_TK >= 0).any():
                break  # its experts are not found any more
            assert not aux.alive_TK.any(), "a stopped server's expert answered"
            assert time.monotonic() < deadline, "the stopped server's experts are still declared after 60 s"
            time.sleep(1)
        assert root.proc.poll() is None  # the others go on
        assert len(grid_uids("ffn", [8, 8])) == 64
    finally:
        if dht is not None:
            shutdown_dht(dht)
        for p in (server, root):
            if p is not None:
                p.stop()


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_serve_and_train_in_one_peer_shows_its_status_and_leaves_on_sigint(tmp_path):
    """Both roles in one moe-join: it serves 4 experts and trains through them (and others')."""
    root = Peer(["--status-every", "30", "--grid", "2", "2"])
    trainer = None
    try:
        addr = root.wait_line("moe-join: address ").split()[2]
        collab = root.wait_line("moe-join --initial-peers")  # the first peer prints how to join ...
        collab = root.wait_line("moe-join --initial-peers")  # ... and how to train with it
        assert "--train --target-batch-size" in collab
        trainer = Peer(
            [
                "--initial-peers",
                addr,
                "--serve",
                "4",
                "--train",
                "--grid",
                "2",
                "2",
                "--d-model",
                "32",
                "--d-ff",
                "64",
                "--target-batch-size",
                "8",
                "--batch-size",
                "4",
                "--matchmaking-time",
                "1",
                "--status-every",
                "1",
                "--out",
                str(tmp_path / "t"),
                "experiment=smoke",
                "logger=none",
                "moe.swarm.k_best=2",
                "moe.top_k=2",
                "model.n_heads=2",
                "model.seq_len=32",
            ]
        )
        assert trainer.wait_line("moe-join: peer id ").split()[3].startswith("12D3Koo")
        assert trainer.wait_line("moe-join: address ").endswith(trainer.lines[0].split()[3])  # .../p2p/<its peer id>
        assert "serving 4 experts ffn.0.0 .. ffn.1.1" in trainer.wait_line("moe-join: serving ")
        assert "run ffn (the swarm's experts), synced every step: target batch 8" in trainer.wait_line(
            "moe-join: training as a collaborative peer"
        )
        trainer.wait_line("moe-join: starting at collaborative step 0")
        deadline = time.monotonic() + 240
        while True:  # the status line: experts, calls/s, the round, trainer peers, contribution, bytes, peers seen
            line = trainer.wait_line("moe-join: status: ", timeout=120)
            assert "experts 4, expert calls/s" in line and "trainer peers" in line and "peers seen" in line, line
            assert "contributed" in line and "sent" in line and "received" in line and "last round:" in line, line
            if int(line.split("round ")[1].split(",")[0]) >= 2 and "tokens served" in line:
                break
            assert time.monotonic() < deadline, trainer.lines
        assert "trainer peers 1," in line, line
        assert int(line.split("tokens served by experts ")[1].split("%")[0]) > 50, (
            line
        )  # its own experts, called like any server's
        assert float(line.split("expert calls/s ")[1].split(",")[0]) > 0, line
        trainer.proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert trainer.proc.wait(120) == 0
        trainer.wait_line("moe-join: leaving the swarm", timeout=10)
        rows = [json.loads(ln) for ln in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "train/loss" in r][:2] == [1, 2]
        assert root.proc.poll() is None  # the others go on
    finally:
        for p in (trainer, root):
            if p is not None:
                p.stop()


# ---------------------------------------------------------------------------------------------
# launch/swarm_local.sh: a root, 2 expert servers and 2 collaborative trainer peers, stopped cleanly


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_swarm_local_trains_and_stops_cleanly(tmp_path):
    out = tmp_path / "run"
    env = {
        **os.environ,
        "STEPS": "5",
        "TARGET": "16",
        "OUT": str(out),
        "EXPIRATION": "6",
        "START_TIMEOUT": "60",
        "WANDB_MODE": "disabled",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    p = subprocess.run(
        [
            "bash",
            str(ROOT / "launch" / "swarm_local.sh"),
            "logger=none",
            "batch_size=4",
            "eval_every=5",
            "eval_batches=1",
            "optim.warmup_steps=1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    for i in (0, 1):  # each trainer: its own metrics, every collaborative step up to STEPS
        records = [json.loads(ln) for ln in (out / f"trainer{i}" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if "train/loss" in r]
        assert train and train[-1]["step"] == 5, [r["step"] for r in train]
        assert train[-1]["train/loss"] < train[0]["train/loss"]  # the loss falls
        assert max(r["collab/peers"] for r in train) == 2  # the two trainers trained together
        assert max(r["moe/served_fraction"] for r in train) > 0.5  # through the servers' experts
        assert any(r.get("val/loss") for r in records)
        log = (out / "peers" / f"trainer{i}.log").read_text()
        assert "moe-join: status: round " in log and "rounds joined" in log
        assert "moe-join: reached collaborative step 5" in log
    pids = [int(x) for x in (out / "peers" / "pids").read_text().split()]
    assert len(pids) == 5
    for pid in pids:  # no leftover peer, nor any of its helpers (each peer leads its group)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    for name in ("root", "server0", "server1", "trainer0", "trainer1"):
        assert "moe-join: leaving the swarm" in (out / "peers" / f"{name}.log").read_text()
    assert "moe-join: serving 8 experts" in (out / "peers" / "server0.log").read_text()


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_swarm_local_over_emulated_links_with_diloco_trainers(tmp_path):
    """NETEM=... puts every server and trainer behind its own relay link; SYNC=diloco trains
    rounds of INNER_STEPS; everything, relays included, stops at the end."""
    out = tmp_path / "run"
    env = {
        **os.environ,
        "STEPS": "3",
        "SYNC": "diloco",
        "INNER_STEPS": "5",
        "NETEM": "rtt=20ms,rate=100mbit",
        "OUT": str(out),
        "EXPIRATION": "6",
        "START_TIMEOUT": "60",
        "WANDB_MODE": "disabled",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    p = subprocess.run(
        ["bash", str(ROOT / "launch" / "swarm_local.sh"), "logger=none", "batch_size=4", "optim.warmup_steps=1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    local_steps = []
    for i in (0, 1):
        records = [json.loads(ln) for ln in (out / f"trainer{i}" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if "train/loss" in r]
        assert train and train[-1]["step"] >= 3 and train[-1]["collab/sent_bytes"] > 0, train
        local_steps.append(train[-1]["collab/local_steps"])
        log = (out / "peers" / f"trainer{i}.log").read_text()
        assert "synced DiLoCo: 5 local steps" in log and "moe-join: reached collaborative step 3" in log
    # both trained, one at least a whole round of 5 local steps (a trainer that started late on
    # a loaded machine catches up by downloading the state, skipping the steps it missed: 4 seen)
    assert min(local_steps) >= 1 and max(local_steps) >= 5, local_steps
    for name in ("server0", "server1", "trainer0", "trainer1"):  # each behind its link
        assert "(20 ms round trip, 100 Mbit/s)" in (out / "peers" / f"netem-{name}.log").read_text()
    relays = [int(x) for x in (out / "peers" / "relay_pids").read_text().split()]
    assert len(relays) == 4
    for pid in relays + [int(x) for x in (out / "peers" / "pids").read_text().split()]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_joiner_or_a_trainer_of_another_shape_is_refused_with_the_values(tmp_path, tiny_data):
    """Issue 16: `moe-join --d-model 32` joined a d_model 16 run and failed every call in
    silence; `--grid 4 4` served uids outside the run's 2x2 grid.  Every member states the run's
    shape, signed; a joiner (or a trainer) of another shape is refused with one line."""
    import dataclasses

    from moe.config import ConfigError, SwarmConfig
    from moe.training.loop import Trainer
    from tests.conftest import tiny_config

    first = Peer(
        [
            "--serve",
            "4",
            "--grid",
            "2",
            "2",
            "--d-model",
            "16",
            "--d-ff",
            "32",
            "--update-period",
            "2",
            "--expiration",
            "6",
        ]
    )
    try:
        addr = first.wait_line("moe-join: address ").split()[-1]
        first.wait_line("moe-join: serving 4 experts")
        key = first.lines[1].split()[3] if first.lines[1].startswith("moe-join: signing key") else None
        assert key is not None and len(key) == 40, first.lines
        for flags, theirs in (
            (["--d-model", "32", "--d-ff", "32", "--grid", "2", "2"], "d_model 32"),
            (["--d-model", "16", "--d-ff", "32", "--grid", "4", "4"], "grid 4x4"),
        ):
            p = subprocess.run(
                [*JOIN, "--initial-peers", addr, "--serve", "1", *flags],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=180,
            )
            lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
            assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stderr[-2000:])
            assert "d_model 16, expert d_ff 32, grid 2x2" in lines[0] and theirs in lines[0], lines[0]
            assert (
                f"declared by key {key[:12]}" in lines[0]
                and "join with the run's --d-model, --d-ff and --grid" in lines[0]
            ), lines[0]
            assert "moe-join: serving" not in p.stdout  # nothing served
        # a trainer of another width: the one-line ConfigError before training
        c = tiny_config(tmp_path, steps=6)
        swarm = SwarmConfig(grid=[2, 2], k_best=2, initial_peers=[addr], forward_timeout=15, backward_timeout=15)
        moe = dataclasses.replace(
            c.moe, name="hivemind", num_experts=4, top_k=2, dropless=True, jitter_eps=0.0, swarm=swarm
        )
        wrong = dataclasses.replace(c, model=dataclasses.replace(c.model, d_model=32, n_heads=2, d_ff=32), moe=moe)
        with pytest.raises(
            ConfigError,
            match=r"moe\.swarm: the swarm's run ffn has d_model 16, expert d_ff 32, grid 2x2 .*peer has d_model 32,",
        ) as e:
            Trainer(wrong, data=tiny_data)
        assert "\n" not in str(e.value)
    finally:
        first.stop()


def _diloco_args(addr: str, out, flags=(), overrides=()) -> list[str]:
    """moe-join's arguments for a DiLoCo trainer of the 2x2-grid, d_model 32 run."""
    return [
        *("--initial-peers", addr, "--train", "--sync", "diloco", "--inner-steps", "4", "--compression", "int8"),
        *("--grid", "2", "2", "--d-model", "32", "--d-ff", "64", "--batch-size", "4", "--matchmaking-time", "2"),
        *("--status-every", "1", "--start-timeout", "60", "--out", str(out), *flags),
        *("experiment=smoke", "logger=none", "moe.swarm.k_best=2", "moe.top_k=2", "model.n_heads=2"),
        *("model.seq_len=32", *overrides),
    ]


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_diloco_trainers_through_the_swarm_s_experts_and_what_they_refuse(tmp_path):
    """Issue 19: low-communication peers (--sync diloco) train the model whose experts the
    swarm's servers host (moe=hivemind), in one run; a trainer that would sync otherwise, train
    another model, or join another prefix is refused with one line before it trains."""
    root = Peer(["--serve", "4", "--grid", "2", "2", "--d-model", "32", "--d-ff", "64", "--status-every", "30"])
    peers = [root]
    try:
        addr = root.wait_line("moe-join: address ").split()[-1]
        root.wait_line("moe-join: serving 4 experts")
        a = Peer(_diloco_args(addr, tmp_path / "a"))
        peers.append(a)
        a.wait_line("moe-join: training as a collaborative peer of run ffn (the swarm's experts), synced DiLoCo: 4")
        b = Peer(_diloco_args(addr, tmp_path / "b"))
        peers.append(b)
        deadline = time.monotonic() + 300
        while True:  # both train; the status line says how the rounds go
            line = b.wait_line("moe-join: status: ", timeout=120)
            assert "contributed" in line and "rounds joined" in line and "last round:" in line, line
            if "last round: averaged with 1 peer" in line and int(line.split("round ")[1].split(",")[0]) >= 3:
                break
            assert time.monotonic() < deadline, b.lines[-5:]
        assert int(line.split("tokens served by experts ")[1].split("%")[0]) > 50, line
        assert "trainer peers 2" in line, line
        sent = line.split("sent ")[1].split(",")[0]
        assert sent.endswith("kB") or sent.endswith("MB"), line

        for flags, overrides, words in (
            (
                ["--inner-steps", "8"],
                [],
                "--sync diloco --inner-steps 4; this peer would use --sync diloco --inner-steps 8",
            ),
            (["--sync", "every-step"], [], "this peer would use --sync every-step"),
            ([], ["model.n_layers=3"], "the run's trainers train another model"),
            (["--prefix", "other"], [], "the swarm runs prefix ffn, not --prefix other: join with --prefix ffn"),
        ):
            args = [*JOIN, *_diloco_args(addr, tmp_path / "x", flags, overrides)]
            p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=240)
            lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("Dec ")]
            errors = [ln for ln in lines if ln.startswith("moe-join: error:")]
            assert p.returncode == 2 and len(errors) == 1, (flags, overrides, p.returncode, p.stderr[-2000:])
            assert words in errors[0], errors[0]
            assert "moe-join: status:" not in p.stdout  # it never trained

        for t in (a, b):
            t.proc.send_signal(signal.SIGINT)
        for t in (a, b):
            assert t.proc.wait(120) == 0
        rows = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if "train/loss" in r]
        assert train and all("collab/sent_bytes" in r for r in train)
        assert train[-1]["collab/sent_bytes"] > 0  # (the first round may have been alone: its mate was starting)
    finally:
        for p in peers:
            p.stop()


# ---------------------------------------------------------------------------------------------
# what moe=hivemind needs from the rest of the package


def test_failed_experts_are_counted_per_log_window():
    from moe.training.telemetry import LoadAccumulator

    acc = LoadAccumulator()
    acc.add(1, torch.tensor([3.0, 1.0]), 0, 4)
    acc.add_failed(1, ["ffn.0.1"])
    acc.add(1, torch.tensor([2.0, 2.0]), 1, 4)
    acc.add_failed(1, ["ffn.0.1", "ffn.0.0"])  # distinct uids over the window
    assert acc.summary()["moe/layer_1/failed_experts"] == 2.0
    acc.reset()
    acc.add(1, torch.tensor([2.0, 2.0]), 0, 4)
    acc.add_failed(1, [])
    assert acc.summary()["moe/layer_1/failed_experts"] == 0.0


def test_build_ffn_hivemind_needs_a_dht():
    from moe.config import MoEConfig
    from moe.model.layers import build_ffn

    with pytest.raises(ValueError, match="moe=hivemind needs a running DHT"):
        build_ffn(MoEConfig(name="hivemind", num_experts=64, top_k=4), 16, 32, sparse=True)


@pytest.mark.network
@pytest.mark.timeout(300)
def test_a_large_batch_does_not_kill_the_dht():
    """600 tokens on an [8, 8] grid: a 39 KB beam-search command if sent whole, which kills
    hivemind's DHT process (its non-blocking command pipe); sent in chunks it works, twice."""
    from moe.swarm.dht import shutdown_dht, start_dht
    from moe.swarm.expert import SwarmExpert
    from moe.swarm.layer import SwarmMoE
    from moe.swarm.server import ExpertServer
    from moe.swarm.uids import grid_uids

    uids = grid_uids("ffn", [8, 8])[:4]
    server = ExpertServer({u: SwarmExpert(16, 32) for u in uids}, 16)
    dht = None
    try:
        dht = start_dht(server.maddrs)
        layer = SwarmMoE(
            16,
            dht=dht,
            uid_prefix="ffn",
            grid_size=[8, 8],
            k_best=2,
            k_min=1,
            forward_timeout=30,
            timeout_after_k_min=0.5,
            backward_timeout=30,
        )
        x = torch.randn(600, 16, requires_grad=True)
        for _ in range(2):
            y, aux = layer(x)
            assert "<beam search>" not in aux.failed, aux.failed
            assert aux.alive_TK.any(dim=1).all()  # every token found a live expert (4 declared, k=2)
            y.pow(2).mean().backward()
        assert dht.is_alive()
    finally:
        if dht is not None:
            shutdown_dht(dht)
        server.shutdown()
