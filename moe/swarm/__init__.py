"""Decentralized experts (Learning@home) and collaborative training (DeDLOC, DiLoCo) over hivemind.

``dht`` is this process's DHT peer, ``uids`` the grid's expert names, ``records`` the signed
declarations of who serves which expert (and the run's prefix and its trainers' terms),
``expert`` the FFN a peer serves, ``server`` hosts experts and declares them, ``layer`` is
the ``hivemind`` expert layer (it registers itself) that searches, calls and masks them,
``collab`` a collaborative trainer peer averaging every step, ``diloco`` one averaging once
per H local steps, ``compression`` what their averagers send and how much, ``peer`` a
volunteer's machine running any of these roles (``moe-join``), and ``netem`` a user-space
network (latency, rate, loss) between peers on one machine.  The only rooms that import
``hivemind`` (``netem`` imports nothing of it).
"""
