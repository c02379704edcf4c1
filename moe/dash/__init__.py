"""``moe-dash``: a local dashboard over run directories (see docs/dashboard.md)."""
