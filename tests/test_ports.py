"""moe.parallel.ports: rendezvous ports that no outgoing connection can be given."""

from __future__ import annotations

import random
import socket

from moe.parallel.ports import _ephemeral_range, free_port


def test_the_port_is_free_and_outside_the_ephemeral_range():
    lo, hi = _ephemeral_range()
    for seed in range(20):
        port = free_port(rng=random.Random(seed))
        assert not lo <= port <= hi, (port, lo, hi)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free: binds


def test_a_port_in_use_is_skipped():
    first = free_port(rng=random.Random(7))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first))
        taken.listen()
        port = free_port(rng=random.Random(7))  # the same draws: the first one is now taken
        assert port != first
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
