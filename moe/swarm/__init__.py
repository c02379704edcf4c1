"""Decentralized experts (Learning@home): experts served by peers and found through hivemind's DHT.

``expert`` is the FFN a peer serves, ``server`` hosts experts and declares them on the DHT,
``layer`` is the ``hivemind`` expert layer that searches, calls and masks them.  The only
package rooms that import ``hivemind``.
"""
