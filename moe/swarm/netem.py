"""A network between peers on one machine: a user-space TCP relay that adds latency, a rate
limit and packet loss (``tc netem`` is not in these kernels, and needs root).

Each peer gets a *link*: a port on 127.0.0.1 that forwards to the peer's real port.  The peer
announces the link's port (``moe-join --port REAL --announce /ip4/127.0.0.1/tcp/LINK``), so
every connection another peer opens to it crosses the link once, and libp2p reuses that
connection in both directions.  Per connection and direction the link

- holds every chunk for ``delay_ms`` (one way; the round trip is twice it),
- sends at most ``rate_mbit`` megabits per second (a serialising queue, as a router's
  interface: a chunk leaves when the ones before it have been sent),
- loses each ~1448-byte TCP segment with probability ``loss``, as TCP experiences it: the
  bytes all arrive, in order, but a chunk holding a lost segment arrives one round trip
  late (fast retransmit), or 200 ms late (Linux's minimum RTO) when the loss was the last
  segment of a burst; and a bulk transfer runs at most at TCP's steady-state rate under
  that loss, MSS / RTT * 1.22 / sqrt(loss) (Mathis et al. 1997), as its congestion window
  halves on each loss.

A link counts the bytes it carries in each direction, per source port: libp2p dials from its
listening port (``SO_REUSEPORT``), so the source port names the dialling peer, and a
benchmark can say how many bytes each peer sent and received.

    moe-netem --to 127.0.0.1:40001 --delay-ms 25 --rate-mbit 100 --loss 0.001   # prints the link's port

Python API: ``Netem`` runs links in a background thread of this process, ``NetemProcess``
in a child process of their own (what tests and ``moe-bench swarm`` use: a relay busy with
100 Mbit/s does not steal the trainers' interpreter).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import socket
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

SEGMENT = 1448  # bytes of TCP payload per segment on a 1500-byte MTU
MIN_RTO = 0.2  # seconds: Linux's minimum retransmission timeout
CHUNK = 64 * 1024


@dataclass(frozen=True)
class LinkSpec:
    """What one link does to the traffic crossing it (per connection and direction)."""

    delay_ms: float = 0.0  # one way
    rate_mbit: float = 0.0  # 0: no limit
    loss: float = 0.0  # probability a TCP segment is lost (and resent)
    seed: int = 0

    def __post_init__(self):
        if not (self.delay_ms >= 0 and self.rate_mbit >= 0 and 0 <= self.loss < 1):
            raise ValueError(
                f"netem link {self}: delay_ms and rate_mbit must be >= 0 and loss in [0, 1), "
                "e.g. delay_ms=25 rate_mbit=100 loss=0.001"
            )

    @property
    def rtt(self) -> float:
        return 2 * self.delay_ms / 1000

    @property
    def bytes_per_s(self) -> float:
        """The rate a bulk transfer gets: the link's, capped under loss by TCP's steady state
        (Mathis: MSS / RTT * 1.22 / sqrt(p), with the RTT at least 1 ms); 0: unlimited."""
        rates = [self.rate_mbit * 1e6 / 8] if self.rate_mbit else []
        if self.loss:
            rates.append(SEGMENT / max(self.rtt, 0.001) * 1.22 / self.loss**0.5)
        return min(rates) if rates else 0.0

    def describe(self) -> str:
        parts = [f"{2 * self.delay_ms:g} ms round trip"]
        parts.append(f"{self.rate_mbit:g} Mbit/s" if self.rate_mbit else "no rate limit")
        if self.loss:
            parts.append(f"{100 * self.loss:g}% segment loss")
        return ", ".join(parts)

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """``"rtt=50ms,rate=100mbit,loss=0.1%"`` (any subset; ``delay=25ms`` is one way)."""
        kw: dict[str, float] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, _, value = item.partition("=")
            v = value.strip().lower()
            try:
                if key == "rtt":
                    kw["delay_ms"] = float(v.removesuffix("ms")) / 2
                elif key == "delay":
                    kw["delay_ms"] = float(v.removesuffix("ms"))
                elif key == "rate":
                    kw["rate_mbit"] = float(v.removesuffix("mbit"))
                elif key == "loss":
                    kw["loss"] = float(v.removesuffix("%")) / 100 if v.endswith("%") else float(v)
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"netem {text!r}: cannot read {item!r}; write e.g. rtt=50ms,rate=100mbit,loss=0.1%"
                ) from None
        return cls(**kw)


class _Pipe:
    """One direction of one connection: read, hold, pace, deliver in order."""

    def __init__(self, spec: LinkSpec, rng: random.Random, count):
        self.spec, self.rng, self.count = spec, rng, count
        self.queue: asyncio.Queue = asyncio.Queue()
        self.link_free = 0.0  # when the link finishes sending what is queued
        self.stall_until = 0.0  # in-order delivery: nothing overtakes a resent segment
        self.in_flight = 0
        self.window = asyncio.Event()
        self.window.set()
        # what TCP would keep in flight: at least a bandwidth-delay product, at least 4 MB
        bdp = spec.rate_mbit * 1e6 / 8 * max(spec.rtt, 0.001)
        self.max_in_flight = max(4 * 2**20, int(2 * bdp))
        self.bytes_per_s = spec.bytes_per_s

    def _deliver_at(self, n: int, now: float) -> float:
        s = self.spec
        start = max(now, self.link_free)
        self.link_free = start + (n / self.bytes_per_s if self.bytes_per_s else 0.0)
        t = self.link_free + s.delay_ms / 1000
        if s.loss:
            segments = -(-n // SEGMENT)
            lost = sum(self.rng.random() < s.loss for _ in range(segments))
            if lost:
                # each loss costs a round trip (fast retransmit); a lost last segment waits for the RTO
                tail = self.rng.random() < 1 / segments
                t += lost * max(s.rtt, 0.001) + (MIN_RTO if tail else 0.0)
        t = max(t, self.stall_until)
        self.stall_until = t
        return t

    async def read(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.window.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                self.in_flight += len(data)
                if self.in_flight >= self.max_in_flight:
                    self.window.clear()
                self.queue.put_nowait((self._deliver_at(len(data), loop.time()), data))
        except (ConnectionError, OSError):
            pass
        finally:
            self.queue.put_nowait((None, b""))

    async def write(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                at, data = await self.queue.get()
                if at is None:
                    break
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                self.count(len(data))
                self.in_flight -= len(data)
                if self.in_flight < self.max_in_flight:
                    self.window.set()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                if writer.can_write_eof():
                    writer.write_eof()
            except (ConnectionError, OSError, RuntimeError):
                pass


class _Link:
    """A listening port that relays to ``target`` through ``spec``."""

    def __init__(self, target: tuple[str, int], spec: LinkSpec):
        self.target, self.spec = target, spec
        self.rng = random.Random(spec.seed)
        self.server: asyncio.AbstractServer | None = None
        # bytes by the dialling peer's source port: [to the target, from the target]
        self.bytes: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        self.connections = 0

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, c_reader, c_writer) -> None:
        src = c_writer.get_extra_info("peername")[1]
        try:
            t_reader, t_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.close()
            return
        self.connections += 1
        counts = self.bytes[src]

        def up(n):
            counts[0] += n

        def down(n):
            counts[1] += n

        a, b = _Pipe(self.spec, self.rng, up), _Pipe(self.spec, self.rng, down)
        try:
            await asyncio.gather(a.read(c_reader), a.write(t_writer), b.read(t_reader), b.write(c_writer))
        except asyncio.CancelledError:  # the relay is closing
            pass
        finally:
            for w in (c_writer, t_writer):
                w.close()


class Netem:
    """Links in a background thread of this process.

    >>> with Netem() as net:
    ...     port = net.add_link(("127.0.0.1", 40001), LinkSpec(delay_ms=25, rate_mbit=100))
    """

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.loop = asyncio.new_event_loop()
        self.links: dict[int, _Link] = {}
        self._thread = threading.Thread(target=self.loop.run_forever, name="netem", daemon=True)
        self._thread.start()

    def add_link(self, target: tuple[str, int], spec: LinkSpec, port: int = 0) -> int:
        """Start a link to ``target``; its port (``port``, or any free one)."""
        link = _Link(target, spec)
        got = asyncio.run_coroutine_threadsafe(link.start(self.host, port), self.loop).result(10)
        self.links[got] = link
        return got

    def stats(self) -> dict[int, dict]:
        """Per link port: its target, connections, and bytes per dialling source port."""

        def snap():
            return {
                p: {
                    "target": list(k.target),
                    "connections": k.connections,
                    "bytes": {s: list(v) for s, v in k.bytes.items()},
                }
                for p, k in self.links.items()
            }

        return asyncio.run_coroutine_threadsafe(_call(snap), self.loop).result(10)

    def close(self) -> None:
        async def stop():
            for k in self.links.values():
                if k.server is not None:
                    k.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def __enter__(self) -> Netem:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def _call(fn):
    return fn()


def _control() -> None:
    """``python -m moe.swarm.netem --control``: links driven by JSON lines on stdin (``NetemProcess``)."""
    import json
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it (stdin closes)
    with Netem() as net:
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                if cmd["op"] == "add":
                    reply = net.add_link(tuple(cmd["target"]), LinkSpec(**cmd["spec"]), cmd["port"])
                elif cmd["op"] == "stats":
                    reply = net.stats()
                else:
                    break
                out = {"ok": reply}
            except (OSError, ValueError) as e:
                out = {"error": str(e)}
            print(json.dumps(out), flush=True)


class NetemProcess:
    """``Netem`` in a child process of its own, driven over its stdin and stdout."""

    def __init__(self):
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moe.swarm.netem", "--control"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a Ctrl-C to the caller's terminal is the caller's to handle
        )
        self._lock = threading.Lock()

    def _ask(self, timeout: float = 60.0, **cmd):
        import json
        import select

        with self._lock:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                raise TimeoutError(f"the netem relay (pid {self.proc.pid}) did not answer within {timeout} s")
            line = self.proc.stdout.readline()
        if not line:
            raise OSError(f"the netem relay (pid {self.proc.pid}) exited with code {self.proc.wait(5)}")
        reply = json.loads(line)
        if "error" in reply:
            raise OSError(reply["error"])
        return reply["ok"]

    def add_link(self, target: tuple[str, int], spec: LinkSpec, port: int = 0) -> int:
        return self._ask(op="add", target=list(target), spec=asdict(spec), port=port)

    def stats(self) -> dict[int, dict]:
        return {int(k): v for k, v in self._ask(op="stats").items()}

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> NetemProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def peer_bytes(stats: dict[int, dict], peer_ports: dict[str, tuple[int, int]]) -> dict[str, dict[str, int]]:
    """Bytes each peer sent and received through the links.

    ``peer_ports``: name -> (its real listening port, its link's port).  Traffic on peer P's
    link from source port S is sent by the peer listening on S (libp2p dials from its
    listening port) and received by P, and the other way round.  Bytes from a source port
    no peer listens on (a dialler that did not reuse its port) go to ``"?"``.
    """
    by_real = {real: name for name, (real, _) in peer_ports.items()}
    by_link = {link: name for name, (_, link) in peer_ports.items()}
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"sent": 0, "received": 0})
    for link_port, s in stats.items():
        dest = by_link.get(int(link_port), "?")
        for src, (to_dest, from_dest) in s["bytes"].items():
            dialler = by_real.get(int(src), "?")
            out[dialler]["sent"] += to_dest
            out[dialler]["received"] += from_dest
            out[dest]["received"] += to_dest
            out[dest]["sent"] += from_dest
    return dict(out)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    """Console script ``moe-netem``: one link, until Ctrl-C."""
    p = argparse.ArgumentParser(
        prog="moe-netem",
        description="Relay TCP to a peer through an emulated network link (latency, rate limit, segment loss).",
    )
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="the peer's real address, e.g. 127.0.0.1:40001")
    p.add_argument("--port", type=int, default=0, help="the link's port (default: any free one; printed)")
    p.add_argument("--host", default="127.0.0.1", help="address the link listens on (default 127.0.0.1)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay in ms (the round trip is twice it)")
    p.add_argument("--rate-mbit", type=float, default=0.0, help="rate limit per direction in Mbit/s (0: none)")
    p.add_argument("--loss", type=float, default=0.0, help="probability a TCP segment is lost and resent (0-1)")
    p.add_argument(
        "--link", default=None, metavar="SPEC", help="all three at once, e.g. rtt=50ms,rate=100mbit,loss=0.1%%"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats-every", type=float, default=0.0, help="print bytes carried every this many seconds")
    p.add_argument("--control", action="store_true", help=argparse.SUPPRESS)
    if argv is None and sys.argv[1:] == ["--control"]:
        _control()
        return
    a = p.parse_args(argv)
    host, _, port = a.to.rpartition(":")
    try:
        spec = LinkSpec(a.delay_ms, a.rate_mbit, a.loss, a.seed)
        if a.link is not None:
            spec = dataclasses.replace(LinkSpec.parse(a.link), seed=a.seed)
        target = (host, int(port))
    except ValueError as e:
        print(f"moe-netem: error: {e if 'netem' in str(e) else f'--to {a.to!r}: write HOST:PORT'}", file=sys.stderr)
        sys.exit(2)
    import signal

    # started in the background by a script, SIGINT arrives ignored: stop on it (and SIGTERM) all the same
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with Netem(a.host) as net:
        try:
            got = net.add_link(target, spec, a.port)
        except OSError as e:
            print(f"moe-netem: error: cannot listen on {a.host}:{a.port}: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"moe-netem: {a.host}:{got} -> {a.to} ({spec.describe()})", flush=True)
        try:
            while True:
                time.sleep(a.stats_every or 3600)
                if a.stats_every:
                    s = net.stats()[got]
                    up = sum(v[0] for v in s["bytes"].values())
                    down = sum(v[1] for v in s["bytes"].values())
                    print(f"moe-netem: {s['connections']} connections, {up} bytes in, {down} bytes out", flush=True)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
