"""Distributed mixture-of-experts training, one config override apart.

The package is built in floors; a module imports only from its own floor or below, and no two
modules import each other (``pyproject.toml``'s import-linter contracts, checked by the tests):

- ``moe.bench``: benchmarks and the quality report (``moe-bench``);
- ``moe.cli``, ``moe.dash``: the entry points (``moe-train``, ``moe-join``) and the dashboards (``moe-dash``);
- ``moe.parallel``, ``moe.swarm``: the parallel backends (torch.distributed, DeepSpeed, Ray) and
  the decentralized experts (hivemind);
- ``moe.training``: the one training loop and what it needs (data, optimizer, checkpoints, telemetry);
- ``moe.model``: the Transformer and its expert layers, plain PyTorch;
- ``moe.ops``: the experts' matmul kernels;
- ``moe.config``: the typed configuration.

docs/architecture.md walks one batch through them.
"""
