"""This process's peer in hivemind's DHT: started with safe defaults, stopped cleanly.

Safe defaults, unlike hivemind's: listen on 127.0.0.1 only unless addresses are given, NAT
port mapping and auto-NAT off (both on by default in hivemind, and both send traffic off the
machine).
"""

from __future__ import annotations

import asyncio
import multiprocessing.util
import os
import re
from collections.abc import Iterable, Sequence

import hivemind
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


class WholeMessages:
    """The reading end of a hivemind helper process's command pipe, read a whole message at a time.

    hivemind's DHT and averager processes wake on their command pipe through ``loop.add_reader``,
    which under uvloop makes the pipe non-blocking.  multiprocessing writes a message over
    16 KiB as its length and then its body (a DHT store of 20 KB, a long list of experts), so
    the body can be missing when the length is read: ``recv`` raises BlockingIOError, hivemind logs it and reads on from
    the middle of the message, the process dies on the garbage (EOFError), and its caller
    blocks for ever on a pipe nobody reads (learning-at-home/hivemind#660 retries instead,
    which still loses the message).  Reading in blocking mode waits the microseconds for the
    rest; ``poll`` (what wakes the loop) is unchanged.
    """

    def __init__(self, conn):
        self._conn = conn

    def recv(self):
        os.set_blocking(self._conn.fileno(), True)
        return self._conn.recv()

    def __getattr__(self, name):
        return getattr(self._conn, name)


class DHT(hivemind.DHT):
    """``hivemind.DHT`` whose process reads its commands whole (:class:`WholeMessages`)."""

    def run(self) -> None:
        self._inner_pipe = WholeMessages(self._inner_pipe)
        super().run()


def prepare_to_fork() -> None:
    """Do, before anything forks, the one-time set-up a fork could otherwise catch half done.

    hivemind forks helper processes (the DHT, connection handlers) while its threads run.  A
    thread that sends an ``MPFuture`` over a pipe pickles a connection, and the first such
    pickle in a process creates multiprocessing's temp dir, holding ``tempfile``'s module lock
    (a plain ``threading.Lock``, not reset at fork) through disk I/O.  A process forked in that
    window inherits the lock held and hangs the first time it pickles a connection itself:
    this was hivemind's server start hanging "sometimes, on a loaded machine" (the connection
    handler stuck in ``tempfile._gettempdir`` while the server waits for it to be ready).
    Creating the temp dir up front leaves nothing to inherit.  Idempotent and cheap.
    """
    multiprocessing.util.get_temp_dir()  # tempfile.gettempdir() and its name sequence, both under that lock


def start_dht(
    initial_peers: Iterable[str] = (),
    *,
    host_maddrs: Sequence[str] = LOOPBACK,
    nat_port_map: bool = False,
    auto_nat: bool = False,
    **kwargs,
) -> DHT:
    """A running DHT peer with safe defaults: loopback, no NAT port mapping, no auto-NAT.

    ``kwargs`` go to ``hivemind.DHT`` (and from there to ``DHTNode`` and ``P2P.create``).  A peer
    that cannot start or reach ``initial_peers`` (nothing listens there, an address the p2p
    daemon cannot dial) is a one-line :class:`SwarmConnectError`.
    """
    prepare_to_fork()
    peers = list(initial_peers)
    try:
        return DHT(
            initial_peers=peers,
            start=True,
            host_maddrs=list(host_maddrs),
            nat_port_map=nat_port_map,
            auto_nat=auto_nat,
            **kwargs,
        )
    except Exception as e:
        raise SwarmConnectError.from_error(e, peers, list(host_maddrs)) from None


class SwarmConnectError(RuntimeError):
    """This peer could not join the swarm (or start its DHT peer); the message is one line."""

    @classmethod
    def from_error(cls, e: BaseException, initial_peers: list[str], host_maddrs: list[str]) -> SwarmConnectError:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = re.sub(r"^Daemon failed to start: (\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )?", "", why)  # the p2p daemon's stamp
        if not initial_peers:
            return cls(f"could not start a DHT peer listening on {', '.join(host_maddrs)}: {why}")
        hint = "check that a peer is running there (moe-join prints its address) and that the port is reachable"
        if any("/quic" in a for a in initial_peers):
            hint += "; give a peer's /tcp/ address (the ones moe-join prints): QUIC is not dialled here"
        return cls(f"could not join the swarm through {', '.join(initial_peers)}: {why}; {hint}")


def shutdown_dht(dht: DHT, timeout: float = 5.0) -> None:
    """Stop a DHT started in this process, closing first the P2P replica clients made of it.

    ``SwarmMoE`` (like hivemind's ``RemoteExpert``) talks through ``dht.replicate_p2p()``, a
    connection owned by hivemind's ``RemoteExpertWorker`` event-loop thread.  Left to the
    garbage collector, its finaliser runs in a thread with no event loop and raises (at a
    random moment of the caller's program); closed here, on its own loop, it goes quietly.
    """
    replica = getattr(dht, "_p2p_replica", None)  # hivemind caches one replica per process
    if replica is not None and getattr(dht, "_origin_pid", None) == os.getpid():
        try:
            RemoteExpertWorker.run_coroutine(_close_replica(replica), return_future=True).result(timeout)
        except Exception:  # best effort: the DHT goes down next anyway
            pass
        dht._p2p_replica = None
    dht.shutdown()


async def _close_replica(p2p) -> None:
    await p2p.shutdown()
    await asyncio.sleep(0.05)  # let the cancelled reader/writer tasks finish


def visible_maddrs(dht: DHT) -> list[str]:
    """The multiaddrs other peers pass as ``initial_peers`` to join through ``dht``."""
    return [str(a) for a in dht.get_visible_maddrs()]
