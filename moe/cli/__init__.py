"""The entry points: ``moe-train`` (``train``), ``moe-join`` (``join``) and Hydra at the edge
(``config``): the only code that sees a ``DictConfig``."""
