"""Decentralized experts (Learning@home) and collaborative training (DeDLOC) over hivemind.

``dht`` is this process's DHT peer, ``uids`` the grid's expert names, ``records`` the signed
declarations of who serves which expert, ``expert`` the FFN a peer serves, ``server`` hosts
experts and declares them, ``layer`` is the ``hivemind`` expert layer (it registers itself)
that searches, calls and masks them, ``collab`` a collaborative trainer peer, and ``peer`` a
volunteer's machine running any of these roles (``moe-join``).  The only rooms that import
``hivemind``.
"""
