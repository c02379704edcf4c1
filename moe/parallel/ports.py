"""A TCP port for a rendezvous on this host that no other connection will take or reuse.

``bind(("127.0.0.1", 0))`` hands out a port from the kernel's ephemeral range, the same range
it draws the source port of every outgoing connection from.  A rendezvous on such a port can
fail in two rare ways: another process's connection takes the port before the store binds it,
or a client retrying ``connect()`` before the store listens is given that very port as its
source and connects to itself (TCP simultaneous open), then waits forever for an answer.  A
port outside the ephemeral range is never handed out implicitly, so neither can happen.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 20000  # above the ports services conventionally own


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux), else IANA's 49152-65535."""
    try:
        lo, hi = (int(x) for x in _RANGE_FILE.read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 49152, 65535


def free_port(host: str = "127.0.0.1", *, tries: int = 200, rng: random.Random | None = None) -> int:
    """A port on ``host`` that nothing is bound to now and that lies outside the ephemeral range.

    Falls back to a kernel-chosen port when no such port is free in ``tries`` draws (a
    machine whose ephemeral range starts too low to leave room below it).
    """
    rng = rng or random.Random()
    lo, hi = _ephemeral_range()
    candidates = [(_LOWEST, lo - 1)] if lo - 1 >= _LOWEST else []
    if hi < 65535:
        candidates.append((hi + 1, 65535))
    for _ in range(tries if candidates else 0):
        a, b = rng.choice(candidates)
        port = rng.randint(a, b)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
