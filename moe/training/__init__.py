"""The training harness: the one loop (``loop``), the one-process way of running a step and the
interface every backend implements (``backend``), the optimizer and schedule (``optim``),
checkpoints and their resume rules (``checkpoint``), the data (``data``), telemetry
(``telemetry``, ``sinks``, ``flops``), the console (``report``) and Ctrl-C (``interrupt``).
Nothing here imports ``torch.distributed``: the backends in ``moe.parallel`` do.
"""
