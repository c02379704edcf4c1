"""``moe-bench``: benchmarks that print a table and write JSON (``layer``, ``parallel``,
``swarm``), and the equal-compute quality comparison (``quality``)."""
