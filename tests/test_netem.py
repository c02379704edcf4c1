"""The user-space network between peers (``moe.swarm.netem``): its latency, rate limit and
loss measured from outside with plain sockets, and its per-peer byte counts against
hivemind's own peers dialling through it.  127.0.0.1 only; every wait is bounded."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from moe.swarm.netem import LinkSpec, Netem, NetemProcess, peer_bytes


def _echo_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(30)

    def echo(c):
        c.settimeout(60)
        with c:
            while data := c.recv(1 << 16):
                c.sendall(data)

    def serve():
        for _ in range(8):  # bounded: the tests open a few connections each
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _rtt(port: int, n: int = 5) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            s.sendall(b"x")
            assert s.recv(1) == b"x"
            times.append(time.perf_counter() - t)
    return sorted(times)[n // 2]


def _echo_rate(port: int, nbytes: int) -> float:
    """Mbit/s of a bulk transfer through the link and back."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        got = 0

        def read():
            nonlocal got
            while got < nbytes:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                got += len(chunk)

        t = time.perf_counter()
        r = threading.Thread(target=read)
        r.start()
        s.sendall(b"y" * nbytes)
        r.join(60)
        assert got == nbytes
        return nbytes * 8 / (time.perf_counter() - t) / 1e6


def test_link_spec_parses_and_refuses():
    assert LinkSpec.parse("rtt=50ms,rate=100mbit,loss=0.1%") == LinkSpec(delay_ms=25, rate_mbit=100, loss=0.001)
    assert LinkSpec.parse("delay=10ms") == LinkSpec(delay_ms=10)
    assert LinkSpec.parse("") == LinkSpec()
    with pytest.raises(ValueError, match="write e.g. rtt=50ms,rate=100mbit"):
        LinkSpec.parse("latency=5")
    with pytest.raises(ValueError, match="loss in"):
        LinkSpec(loss=1.5)


@pytest.mark.network
def test_latency_and_rate_are_what_the_link_says():
    srv, port = _echo_server()
    with srv, Netem() as net:
        plain = _rtt(port)
        link = net.add_link(("127.0.0.1", port), LinkSpec(delay_ms=25, rate_mbit=40))
        rtt = _rtt(link)
        assert 0.048 < rtt < 0.080, rtt  # 2 x 25 ms, plus loopback and scheduling
        assert plain < 0.01
    srv2, port2 = _echo_server()
    with srv2, Netem() as net:
        link = net.add_link(("127.0.0.1", port2), LinkSpec(rate_mbit=40))
        rate = _echo_rate(link, 4 * 2**20)
        assert 30 < rate < 42, rate  # capped at 40 Mbit/s each way


@pytest.mark.network
def test_loss_stalls_the_stream_but_delivers_every_byte_in_order():
    srv, port = _echo_server()
    with srv, Netem() as net:
        spec = LinkSpec(delay_ms=5, loss=0.02, seed=1)
        lossy = net.add_link(("127.0.0.1", port), spec)
        mathis = 1448 / 0.010 * 1.22 / 0.02**0.5  # bytes/s TCP keeps under 2% loss at 10 ms
        assert spec.bytes_per_s == pytest.approx(mathis)
        with socket.create_connection(("127.0.0.1", lossy), timeout=60) as s:
            payload = bytes(range(256)) * 4096  # 1 MiB
            t = time.perf_counter()
            s.sendall(payload)
            back = b""
            while len(back) < len(payload):
                back += s.recv(1 << 20)
            took = time.perf_counter() - t
        assert back == payload
        # there and back through the same link (the directions overlap): at least one pass at TCP's rate
        assert len(payload) / mathis < took < 3 * len(payload) / mathis + 1, (took, len(payload) / mathis)


@pytest.mark.network
@pytest.mark.timeout(180)
def test_hivemind_peers_dial_through_their_links_and_bytes_are_attributed():
    pytest.importorskip("hivemind")
    from hivemind.utils import get_dht_time

    from moe.parallel.ports import free_port
    from moe.swarm.dht import shutdown_dht, start_dht

    with NetemProcess() as net:
        ra, rb = free_port(), free_port()
        la = net.add_link(("127.0.0.1", ra), LinkSpec(delay_ms=20))
        lb = net.add_link(("127.0.0.1", rb), LinkSpec(delay_ms=20))
        a = start_dht(host_maddrs=[f"/ip4/127.0.0.1/tcp/{ra}"], announce_maddrs=[f"/ip4/127.0.0.1/tcp/{la}"])
        try:
            visible = [str(m) for m in a.get_visible_maddrs()]
            assert all(f"/tcp/{la}/" in m for m in visible), visible  # others dial the link
            b = start_dht(
                visible, host_maddrs=[f"/ip4/127.0.0.1/tcp/{rb}"], announce_maddrs=[f"/ip4/127.0.0.1/tcp/{lb}"]
            )
            try:
                stored, took = False, 0.0
                for _ in range(3):  # bounded: a first store can wait out a DHT request timeout on a loaded machine
                    t = time.perf_counter()
                    try:
                        stored = b.store("k", "v" * 20_000, get_dht_time() + 60, return_future=True).result(20)
                    except TimeoutError:
                        continue
                    took = time.perf_counter() - t
                    if stored:
                        break
                assert stored
                assert a.get("k", latest=True, return_future=True).result(30).value == "v" * 20_000
                assert took > 0.04, took  # at least one round trip of the link
                stats = net.stats()
                counted = peer_bytes(stats, {"a": (ra, la), "b": (rb, lb)})
                assert "?" not in counted, counted  # every byte's dialler is known
                assert counted["b"]["sent"] > 20_000 and counted["a"]["received"] > 20_000
                assert counted["a"]["sent"] == counted["b"]["received"]
            finally:
                shutdown_dht(b)
        finally:
            shutdown_dht(a)
