"""``moe-dash``: the local dashboard over run directories (``data`` reads them, ``server`` serves
the page in ``static/``) and the W&B workspace laid out for MoE runs (``wandb_panels``); see
docs/dashboard.md."""
