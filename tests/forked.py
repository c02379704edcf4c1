"""Trainer peers in forked children, driven over a pipe by a test (``test_swarm_collab``,
``test_swarm_diloco``).

A child (``main(conn, *args)``) starts its own DHT peer and trainer, sends one hello, then
:func:`serve` answers the test's commands until ``stop``, or until the test process is gone.
The child leads a session of its own, so :meth:`ForkedPeer.kill` takes everything it started
(the DHT's and averagers' processes, the p2p daemons) with it.  Every wait is bounded.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable


def child_setup() -> None:
    """First thing in a forked peer: a session of its own, Ctrl-C's default, one thread."""
    import torch

    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    torch.set_num_threads(1)


def serve(conn, trainer, dht, progress: Callable[[], int], report: Callable[[], tuple], extra=None) -> None:
    """Answer ``train_until`` (``progress()`` >= target, or the time is up: then ``report()``),
    ``state`` ((progress, theta)), ``stop``, and the ``extra`` commands; then leave cleanly."""
    from moe.swarm.dht import shutdown_dht

    parent = os.getppid()
    extra = extra or {}
    try:
        while os.getppid() == parent:
            if not conn.poll(1.0):
                continue
            cmd, *args = conn.recv()
            if cmd == "train_until":
                target, seconds = args
                deadline = time.monotonic() + seconds
                while progress() < target and time.monotonic() < deadline:
                    trainer.train_step()
                conn.send(report())
            elif cmd == "state":
                conn.send((progress(), trainer.params_vector()))
            elif cmd == "stop":
                break
            else:
                extra[cmd](*args)
    finally:
        trainer.shutdown()
        shutdown_dht(dht)
        conn.send("stopped")


class ForkedPeer:
    """``main(conn, *args)`` in a forked child; ``hello`` is the first thing it sent."""

    def __init__(self, main, *args, timeout: float = 180.0):
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=main, args=(child, *args))
        self.proc.start()
        child.close()
        try:
            self.hello = self.recv(timeout)
        except BaseException:
            self.kill()
            raise

    def recv(self, timeout: float):
        assert self.conn.poll(timeout), f"trainer peer {self.proc.pid} did not answer within {timeout} s"
        return self.conn.recv()

    def send(self, *msg) -> None:
        self.conn.send(msg)

    def state(self):
        """(its step or round, its parameters)."""
        self.send("state")
        return self.recv(60)

    def stop(self, timeout: float = 60.0) -> bool:
        """Leave cleanly (trainer and DHT shutdown); True if it said so in time."""
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
        """SIGKILL it and everything it started."""
        from moe.swarm.server import kill_session

        kill_session(self.proc)


def train_all(peers: list[ForkedPeer], target: int, seconds: float) -> list:
    """Every peer trains until ``target`` (at most ``seconds``); their reports."""
    for p in peers:
        p.send("train_until", target, seconds)
    return [p.recv(seconds + 120) for p in peers]
