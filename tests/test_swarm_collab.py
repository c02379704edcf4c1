"""Collaborative trainer peers (``moe.swarm.collab``): real hivemind on 127.0.0.1, no mocks.

One expert server (a forked ``ServerProcess``, its DHT the swarm's root) and trainer peers,
each a forked child with its own DHT peer and RSA key, driven over a pipe by the test.
Every wait is bounded (pipe replies, training rounds, process exits); every process a test
starts is stopped in ``finally``.
"""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("hivemind")

from moe.config import LoggerConfig, ModelConfig, MoEConfig, OptimConfig, SwarmConfig, TrainConfig  # noqa: E402
from tests.forked import ForkedPeer, child_setup, serve, train_all  # noqa: E402

PREFIX = "ffn"
GRID = [2, 2]
D_MODEL, D_FF = 32, 64
BATCH, TARGET = 4, 16  # sequences per local step; per collaborative step over all peers


def swarm_config(out_dir, seed: int = 0, steps: int = 60) -> TrainConfig:
    """A 2-block model, both blocks on the swarm's 2x2 grid of remote experts."""
    return TrainConfig(
        model=ModelConfig(n_layers=2, d_model=D_MODEL, n_heads=2, d_ff=D_FF, seq_len=32, moe_every=1),
        moe=MoEConfig(
            name="hivemind",
            num_experts=4,
            top_k=2,
            dropless=True,
            swarm=SwarmConfig(
                k_best=2,
                k_min=1,
                grid=list(GRID),
                uid_prefix=PREFIX,
                forward_timeout=20,
                backward_timeout=20,
                timeout_after_k_min=0.5,
                require_signed=True,
            ),
        ),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        logger=LoggerConfig(wandb=False, wandb_mode="disabled", progress=False, console=False),
        out_dir=str(out_dir),
        steps=steps,
        batch_size=BATCH,
        eval_every=0,
        eval_batches=2,
        ckpt_every=0,
        seed=seed,
    )


def _peer_main(conn, initial_peers, cfg, data, load_first):
    """A trainer peer in a forked child: answers the test's commands until ``stop``."""
    child_setup()
    from hivemind.utils.crypto import RSAPrivateKey

    from moe.swarm.collab import CollabTrainer
    from moe.swarm.dht import start_dht
    from moe.swarm.records import record_validators

    dht = start_dht(initial_peers, record_validators=record_validators(PREFIX, RSAPrivateKey()))  # a key of its own
    trainer = CollabTrainer(
        cfg,
        dht=dht,
        target_batch_size=TARGET,
        matchmaking_time=4.0,
        averaging_timeout=30.0,
        load_state_timeout=30.0,
        data=data,
    )  # room for a loaded machine
    before = trainer.params_vector().clone()
    if load_first:
        trainer.load_state()
    conn.send((trainer.collab_step, before, trainer.params_vector()))
    serve(
        conn,
        trainer,
        dht,
        progress=lambda: trainer.collab_step,  # the collaborative step
        report=lambda: (trainer.collab_step, list(trainer.history), trainer.local_steps),
        extra={"leave_rounds": trainer.leave_rounds},
    )


class PeerProc(ForkedPeer):
    def __init__(self, initial_peers, cfg, data, load_first=False):
        super().__init__(_peer_main, initial_peers, cfg, data, load_first)
        self.start_step, self.params_before, self.params_after_start = self.hello


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_peers_step_together_a_joiner_loads_the_state_and_one_leaves(tmp_path, tiny_data):
    from moe.swarm.expert import SwarmExpert
    from moe.swarm.server import ServerProcess
    from moe.swarm.uids import grid_uids

    torch.manual_seed(0)
    server = ServerProcess(
        {u: SwarmExpert(D_MODEL, D_FF) for u in grid_uids(PREFIX, GRID)},
        D_MODEL,
        optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3),
        sign_records=True,
        record_validators=_validators(),
    )
    peers = []
    try:
        a = PeerProc(server.maddrs, swarm_config(tmp_path / "a"), tiny_data)
        peers.append(a)
        b = PeerProc(server.maddrs, swarm_config(tmp_path / "b"), tiny_data)
        peers.append(b)
        assert a.start_step == b.start_step == 0
        assert torch.equal(a.params_before, b.params_before)  # the run's seed: the same initial weights

        # two peers step together: each collaborative step needs both peers' samples
        (sa, ha, na), (sb, hb, nb) = train_all([a, b], 4, 240)
        assert sa >= 4 and sb >= 4, (sa, sb)
        assert max(r["collab/peers"] for r in ha) == 2 and max(r["collab/peers"] for r in hb) == 2
        assert max(r["moe/served_fraction"] for r in ha + hb) > 0.5  # the tokens went to the server's experts
        # both contributed, and at least one stepped on fewer batches than the 4 steps need (a
        # faster peer may fill a round alone while the other is still starting: hivemind steps
        # when the swarm's samples reach the target, whoever sent them)
        assert na > 0 and nb > 0 and min(na, nb) < 4 * TARGET // BATCH, (na, nb)
        sa, pa = a.state()
        sb, pb = b.state()
        assert sa == sb
        # averaged gradients, the same step on both: the same parameters (up to a round that
        # averaged only part of the tensors on a loaded machine, pulled back by state averaging)
        moved, apart = float((pa - a.params_before).norm()), float((pa - pb).norm())
        assert moved > 0.01 and apart < 0.2 * moved, (
            moved,
            apart,
        )  # 11% seen in a fresh-clone run; unaveraged peers sit near 100%

        # a third peer joins mid-run, from other initial weights, and loads the current state
        c = PeerProc(server.maddrs, swarm_config(tmp_path / "c", seed=123), tiny_data, load_first=True)
        peers.append(c)
        assert not torch.allclose(c.params_before, pa, atol=1e-3)  # its own init is not the run's state
        assert c.start_step == sa  # the collaborative step, loaded
        # the parameters, loaded: exactly those of the peer it downloaded them from
        assert any(torch.allclose(c.params_after_start, p, atol=1e-6) for p in (pa, pb)), [
            float((c.params_after_start - p).norm()) for p in (pa, pb)
        ]

        (sa2, _, _), (sb2, _, _), (sc2, hc, nc) = train_all([a, b, c], sa + 3, 240)
        assert min(sa2, sb2, sc2) >= sa + 3, (sa2, sb2, sc2)
        assert nc > 0 and max(r["collab/peers"] for r in hc) == 3  # it contributed, seen by the tracker

        # one is done: it leaves the rounds but stays up; the others keep stepping without it
        a.send("leave_rounds")
        a.state()  # answered once the goodbye is stored
        (sb3, hb3, _), (sc3, _, _) = train_all([b, c], max(sb2, sc2) + 3, 240)
        assert min(sb3, sc3) >= max(sb2, sc2) + 3, (sb3, sc3)
        assert hb3[-1]["collab/peers"] == 2 and a.proc.is_alive()  # the leaver said goodbye
        assert a.stop()  # then it leaves cleanly
        peers.remove(a)

        losses = [r["train/loss"] for r in hb3]  # b took part from the start
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # the loss falls over the run
        steps = [r["step"] for r in hb3]
        assert steps == sorted(steps) and steps[-1] == sb3
        # b's metrics.jsonl: one record per collaborative step, the step and the loss
        import json

        rows = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "train/loss" in r] == steps
        for p in (b, c):
            assert p.stop()
        peers.clear()
    finally:
        for p in peers:
            p.kill()
        server.shutdown()


def _validators():
    from moe.swarm.records import record_validators

    return record_validators(PREFIX)


@pytest.mark.network
@pytest.mark.timeout(300)
def test_progress_records_are_signed_and_owned():
    """A peer's progress record (hivemind's ProgressTracker) cannot be overwritten or deleted
    by a peer with another key; the owner can update it."""
    from hivemind.optim.progress_tracker import ProgressTracker
    from hivemind.utils import get_dht_time
    from hivemind.utils.crypto import RSAPrivateKey

    from moe.swarm.dht import shutdown_dht, start_dht
    from moe.swarm.records import collab_run_id, progress_key, record_validators, signing_key

    owner_key, other_key = RSAPrivateKey(), RSAPrivateKey()
    owner = start_dht(record_validators=record_validators(PREFIX, owner_key))
    other = tracker = None
    try:
        other = start_dht(
            [str(a) for a in owner.get_visible_maddrs()], record_validators=record_validators(PREFIX, other_key)
        )
        assert signing_key(owner) is not None
        tracker = ProgressTracker(
            owner,
            collab_run_id(PREFIX),
            target_batch_size=64,
            private_key=owner_key,
            min_refresh_period=0.2,
            start=True,
        )
        tracker.report_local_progress(local_epoch=3, samples_accumulated=8)
        subkey = b"[owner:" + owner_key.get_public_key().to_bytes() + b"]"

        def owner_record():
            found = other.get(progress_key(PREFIX), latest=True)
            item = found.value.get(subkey) if found is not None and isinstance(found.value, dict) else None
            return None if item is None else item.value

        deadline = time.monotonic() + 60
        while owner_record() is None:
            assert time.monotonic() < deadline, "the owner's progress record never appeared"
            time.sleep(0.5)
        assert owner_record()["epoch"] == 3

        forged = dict(owner_record(), epoch=999, samples_accumulated=10**6)
        exp = get_dht_time() + 60
        assert not other.store(progress_key(PREFIX), forged, exp, subkey=subkey)  # overwrite: refused
        assert not other.store(progress_key(PREFIX), None, exp + 1, subkey=subkey)  # delete: refused
        assert owner_record()["epoch"] == 3
        # the other peer's own record (its key) is accepted: the refusal above is about ownership
        mine = b"[owner:" + other_key.get_public_key().to_bytes() + b"]"
        assert other.store(progress_key(PREFIX), dict(forged, epoch=1), exp, subkey=mine)
        # a malformed progress record is refused even under one's own key (the schema)
        assert not other.store(progress_key(PREFIX), {"epoch": "soon"}, exp, subkey=mine)
        # the owner can still update its own
        tracker.report_local_progress(local_epoch=4, samples_accumulated=0)
        deadline = time.monotonic() + 60
        while owner_record()["epoch"] != 4:
            assert time.monotonic() < deadline, "the owner could not update its own record"
            time.sleep(0.5)
    finally:
        if tracker is not None:
            tracker.shutdown(5)
        for d in (other, owner):
            if d is not None:
                shutdown_dht(d)
