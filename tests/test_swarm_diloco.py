"""Low-communication trainer peers (``moe.swarm.diloco``) and what their updates are sent as
(``moe.swarm.compression``): real hivemind on 127.0.0.1, no mocks.

The oracle for the algorithm is a naive DiLoCo loop written out here (AdamW steps, then a
hand-written Nesterov step on the parameter change); for the codecs, hivemind's own
quantiser and plain casts.  Peers are forked children driven over a pipe, each with its
own DHT peer and RSA key; every wait is bounded and every process is stopped in ``finally``.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

pytest.importorskip("hivemind")

from tests.conftest import tiny_config  # noqa: E402

H = 20  # inner steps per round in the multi-peer test (~1 s: a round must outlast a state download)


def diloco_config(out_dir, seed: int = 0):
    """The tiny 2-block model with 4 top-2 dropless experts per block (deterministic: no jitter)."""
    return tiny_config(out_dir, "topk", seed=seed, steps=300)


# ---------------------------------------------------------------------------------------- codecs
def test_8bit_codec_is_hivemind_s_scheme_and_decodes_on_numpy_2():
    from hivemind.compression import CompressionInfo
    from hivemind.compression.quantization import Uniform8BitQuantization

    from moe.swarm.compression import Uniform8Bit

    torch.manual_seed(0)
    x = torch.randn(5000) * 3 + 1
    ours, theirs = Uniform8Bit().quantize(x), Uniform8BitQuantization().quantize(x)
    assert (ours[0] == theirs[0]).all() and abs(ours[1] - theirs[1]).max() < 1e-6
    msg = Uniform8Bit().compress(x, CompressionInfo.from_tensor(x))
    y = Uniform8Bit().extract(msg)  # hivemind's own extract raises TypeError on numpy 2
    inside = (x - x.mean()).abs() < 2.9 * x.std()  # within the codec's +-3 sigma range
    assert (y - x)[inside].abs().max() < 6 * x.std() / 256  # at most one bin off
    assert len(msg.buffer) == 8 + 256 * 4 + x.numel()  # a byte a value, and the 256 bins


def test_round_trip_is_the_codec_part_by_part_and_error_feedback_keeps_the_sum():
    from hivemind.compression import CompressionInfo

    from moe.swarm.compression import PeerCompression

    torch.manual_seed(0)
    x = torch.randn(3000)
    fp16 = PeerCompression("fp16")
    y = x.clone()
    fp16.round_trip_(y)
    assert torch.equal(y, x.half().float())

    c = PeerCompression("int8")
    c.part_size = lambda t: 1000  # three parts, each with its own scale, as the all-reduce splits
    y = x.clone()
    y[:1000] *= 100  # a part with another scale: a per-tensor codec would flatten the others
    ref = y.clone()
    c.round_trip_(y)
    for s in range(0, 3000, 1000):
        part = ref[s : s + 1000]
        want = c.inner.extract(c.inner.compress(part, CompressionInfo.from_tensor(part)))
        assert torch.equal(y[s : s + 1000], want)

    # error feedback: over 30 rounds of small updates the decoded sum tracks the true sum
    updates = [torch.randn(3000) * 0.01 + 0.002 for _ in range(30)]
    total = torch.stack(updates).sum(0)
    residual = torch.zeros(3000)
    sent_ef = torch.zeros(3000)
    sent_plain = torch.zeros(3000)
    for u in updates:
        a, b = u.clone(), u.clone()
        c.round_trip_(a, residual)
        c.round_trip_(b)
        sent_ef += a
        sent_plain += b
    err_ef = float((sent_ef - total).norm())
    err_plain = float((sent_plain - total).norm())
    assert err_ef <= float(residual.norm()) + 1e-4  # what is missing is exactly what is still owed
    assert err_ef < 0.5 * err_plain, (err_ef, err_plain)


def test_diloco_options_refuse_bad_values():
    from moe.swarm.diloco import DiLoCoOptions

    for bad, words in [
        (dict(inner_steps=0), "at least one local step"),
        (dict(outer_momentum=1.0), "outer_momentum"),
        (dict(compression="int4"), "choose one of none, fp16, int8"),
        (dict(matchmaking_time=0), "must be > 0 seconds"),
    ]:
        with pytest.raises(ValueError, match=words):
            DiLoCoOptions(**bad).check()


# ---------------------------------------------------------------- one peer against a naive loop
@pytest.mark.network
@pytest.mark.timeout(300)
def test_a_peer_alone_is_exactly_naive_diloco(tmp_path, tiny_data):
    """Alone, a round is H AdamW steps then SGD-Nesterov on theta with theta - local as gradient."""
    from moe.model.transformer import TransformerLM
    from moe.swarm.dht import shutdown_dht, start_dht
    from moe.swarm.diloco import DiLoCoOptions, DiLoCoTrainer
    from moe.swarm.records import record_validators
    from moe.training.optim import lr_at

    cfg = diloco_config(tmp_path)
    inner_steps, rounds, lr_o, mu = 4, 3, 0.7, 0.9
    dht = start_dht(record_validators=record_validators("ffn"))
    try:
        with DiLoCoTrainer(
            cfg,
            dht=dht,
            options=DiLoCoOptions(inner_steps=inner_steps, compression="none", outer_lr=lr_o, outer_momentum=mu),
            data_seed=7,
            data=tiny_data,
            log=False,
        ) as t:
            records = [r for _ in range(rounds * inner_steps) if (r := t.train_step()) is not None]
            got = t.params_vector().clone()
            local = torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])
    finally:
        shutdown_dht(dht)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["outcome"] == "alone" for r in records)
    assert torch.equal(got, local)  # the local copy restarts from theta

    # the oracle
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tiny_data.vocab_size)
    torch.manual_seed(cfg.seed)
    model = TransformerLM(model_cfg, cfg.moe)
    params = list(model.parameters())
    o = cfg.optim
    inner = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    theta = [p.detach().clone() for p in params]
    mom = [torch.zeros_like(p) for p in params]
    step = 0
    for r in range(rounds):
        for i in range(inner_steps):
            for g in inner.param_groups:
                g["lr"] = lr_at(r * inner_steps + i, cfg)
            x, y = tiny_data.get_batch("train", step, cfg.batch_size, model_cfg.seq_len, 7)
            model(x, y).total_loss(cfg.moe).backward()
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            inner.step()
            inner.zero_grad(set_to_none=True)
            step += 1
        with torch.no_grad():
            for th, p, m in zip(theta, params, mom):
                delta = th - p
                m.mul_(mu).add_(delta)
                th.sub_(lr_o * (delta + mu * m))
                p.copy_(th)
    want = torch.cat([t.reshape(-1) for t in theta])
    assert torch.allclose(got, want, atol=1e-6, rtol=0), float((got - want).abs().max())


# ------------------------------------------------------------------------------- peers together
def _peer_main(conn, initial_peers, cfg, data, options, load_first):
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    torch.set_num_threads(1)
    from hivemind.utils.crypto import RSAPrivateKey

    from moe.swarm.dht import shutdown_dht, start_dht
    from moe.swarm.diloco import DiLoCoTrainer
    from moe.swarm.records import record_validators

    parent = os.getppid()
    dht = start_dht(initial_peers, record_validators=record_validators("ffn", RSAPrivateKey()))
    trainer = DiLoCoTrainer(cfg, dht=dht, options=options, data=data, log=False)
    before = trainer.params_vector().clone()
    if load_first:
        trainer.load_state()
    conn.send(("ready", trainer.round, before, trainer.params_vector()))
    try:
        while os.getppid() == parent:
            if not conn.poll(1.0):
                continue
            cmd, *args = conn.recv()
            if cmd == "train_until":
                target, seconds = args
                deadline = time.monotonic() + seconds
                while trainer.round < target and time.monotonic() < deadline:
                    trainer.train_step()
                conn.send((trainer.round, list(trainer.history), trainer.sent_bytes))
            elif cmd == "train_slowly":  # each local step delay seconds late, for one round
                target, seconds, delay = args
                deadline = time.monotonic() + seconds
                while trainer.round < target and time.monotonic() < deadline:
                    time.sleep(delay)
                    trainer.train_step()
                conn.send((trainer.round, list(trainer.history), trainer.sent_bytes))
            elif cmd == "train_forever":  # until killed
                while True:
                    trainer.train_step()
            elif cmd == "state":
                conn.send((trainer.round, trainer.params_vector()))
            elif cmd == "stop":
                break
    finally:
        trainer.shutdown()
        shutdown_dht(dht)
        conn.send("stopped")


class Peer:
    def __init__(self, initial_peers, cfg, data, options, load_first=False, timeout=180.0):
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_peer_main, args=(child, initial_peers, cfg, data, options, load_first))
        self.proc.start()
        child.close()
        _, self.start_round, self.params_before, self.params_after_start = self.recv(timeout)

    def recv(self, timeout: float):
        assert self.conn.poll(timeout), f"peer {self.proc.pid} did not answer within {timeout} s"
        return self.conn.recv()

    def send(self, *msg) -> None:
        self.conn.send(msg)

    def state(self):
        self.send("state")
        return self.recv(60)

    def stop(self, timeout: float = 60.0) -> bool:
        if not self.proc.is_alive():
            return False
        self.send("stop")
        try:
            ok = self.recv(timeout) == "stopped"
        except (AssertionError, EOFError, OSError):
            ok = False
        self.proc.join(20)
        return ok

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.join(10)


def train_all(peers, target: int, seconds: float):
    for p in peers:
        p.send("train_until", target, seconds)
    return [p.recv(seconds + 120) for p in peers]


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_peers_average_a_joiner_catches_up_and_a_killed_peer_stops_no_one(tmp_path, tiny_data):
    from moe.swarm.dht import shutdown_dht, start_dht
    from moe.swarm.diloco import DiLoCoOptions
    from moe.swarm.records import record_validators

    opts = DiLoCoOptions(inner_steps=H, compression="fp16", matchmaking_time=3.0, averaging_timeout=20.0)
    root = start_dht(record_validators=record_validators("ffn"))
    initial = [str(m) for m in root.get_visible_maddrs()]
    peers = []
    try:
        a = Peer(initial, diloco_config(tmp_path / "a"), tiny_data, opts)
        peers.append(a)
        b = Peer(initial, diloco_config(tmp_path / "b"), tiny_data, opts)
        peers.append(b)
        assert torch.equal(a.params_before, b.params_before)  # the run's seed

        (ra, ha, sent_a), (rb, hb, _) = train_all([a, b], 4, 240)
        assert ra >= 4 and rb >= 4
        averaged = [r for r in ha + hb if r["outcome"].startswith("averaged with 1 peer")]
        assert len(averaged) >= 4, [r["outcome"] for r in ha + hb]
        # one round's fp16 update, sent (reduce-scatter) and returned (all-gather): ~2 bytes a parameter
        n = a.params_before.numel()
        per_round = (ha[-1]["collab/sent_bytes"] - ha[-2]["collab/sent_bytes"]) / n
        assert 0.5 < per_round < 3.0, per_round
        sa, pa = a.state()
        sb, pb = b.state()
        assert sa == sb
        moved, apart = float((pa - a.params_before).norm()), float((pa - pb).norm())
        assert moved > 0.1 and apart < 1e-3 * moved, (moved, apart)  # the same theta up to fp16 rounding

        # a third peer joins from other initial weights: it downloads theta and the round
        c = Peer(initial, diloco_config(tmp_path / "c", seed=5), tiny_data, opts, load_first=True)
        peers.append(c)
        assert not torch.allclose(c.params_before, pa, atol=1e-3)
        assert c.start_round >= sa
        if c.start_round == sa:  # nobody moved on while it downloaded: exactly a peer's theta
            assert any(torch.equal(c.params_after_start, p) for p in (pa, pb))
        (ra2, _, _), (rb2, _, _), (rc2, hc, _) = train_all([a, b, c], c.start_round + 4, 240)
        assert min(ra2, rb2, rc2) >= c.start_round + 4
        assert any(r["outcome"].startswith("averaged with 2 peers") for r in hc), [r["outcome"] for r in hc]

        # b dies mid-training (SIGKILL, possibly inside an all-reduce): a and c go on, in bounded time
        b.send("train_forever")
        time.sleep(1.5)
        b.kill()
        peers.remove(b)
        t0 = time.monotonic()
        (ra3, ha3, _), (rc3, _, _) = train_all([a, c], max(ra2, rc2) + 3, 300)
        assert min(ra3, rc3) >= max(ra2, rc2) + 3, (ra3, rc3)
        assert time.monotonic() - t0 < 300
        losses = [r["train/loss"] for r in ha + ha3]
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses

        # c leaves cleanly: a goes on alone, and still advances
        assert c.stop()
        peers.remove(c)
        ((ra4, ha4, _),) = train_all([a], ra3 + 2, 240)
        assert ra4 >= ra3 + 2 and ha4[-1]["outcome"].startswith("alone"), [r["outcome"] for r in ha4]
        assert a.stop()
        peers.clear()
    finally:
        for p in peers:
            p.kill()
        shutdown_dht(root)


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_straggler_misses_its_round_the_other_goes_on_and_it_catches_up(tmp_path, tiny_data):
    from moe.swarm.dht import shutdown_dht, start_dht
    from moe.swarm.diloco import DiLoCoOptions
    from moe.swarm.records import record_validators

    opts = DiLoCoOptions(inner_steps=H, compression="fp16", matchmaking_time=2.0, averaging_timeout=20.0)
    root = start_dht(record_validators=record_validators("ffn"))
    initial = [str(m) for m in root.get_visible_maddrs()]
    peers = []
    try:
        a = Peer(initial, diloco_config(tmp_path / "a"), tiny_data, opts)
        peers.append(a)
        b = Peer(initial, diloco_config(tmp_path / "b"), tiny_data, opts)
        peers.append(b)
        (ra, ha, _), (rb, hb, _) = train_all([a, b], 2, 240)
        assert ra == rb == 2 and ha[-1]["outcome"] == hb[-1]["outcome"] == "averaged with 1 peer"

        # b straggles: its round takes ~15x longer; a waits for it (matchmaking, retried), then goes on alone
        b.send("train_slowly", 3, 240, 0.7)  # 14 s late: past the 2 x matchmaking + 5 s a round waits
        a.send("train_until", 4, 240)
        ra, ha, _ = a.recv(360)
        rb, hb, _ = b.recv(360)
        assert ra >= 4 and any(r["outcome"].startswith("alone") for r in ha[2:]), [r["outcome"] for r in ha]
        assert any(r["outcome"].startswith("resynced") for r in hb[2:]), [r["outcome"] for r in hb]
        assert rb >= ra - 1  # it downloaded the run's round instead of trailing behind

        # then they average together again, from the same theta
        (ra, ha, _), (rb, hb, _) = train_all([a, b], max(ra, rb) + 2, 240)
        assert ha[-1]["outcome"] == "averaged with 1 peer" and hb[-1]["outcome"] == "averaged with 1 peer", (
            [r["outcome"] for r in ha[-3:]],
            [r["outcome"] for r in hb[-3:]],
        )
        (sa, pa), (sb, pb) = a.state(), b.state()
        assert sa == sb and float((pa - pb).norm()) < 1e-3 * float(pa.norm())
        for p in (a, b):
            assert p.stop()
        peers.clear()
    finally:
        for p in peers:
            p.kill()
        shutdown_dht(root)
