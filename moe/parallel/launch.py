"""Which process group and which backend each ``parallel.backend`` name means, for the runs
whose processes a launcher starts (torchrun, the deepspeed launcher).  ``parallel=single`` is
one process (``moe.training.backend.Backend``); ``parallel=ray`` is Ray's driver
(``moe.parallel.ray_train``), which starts its own workers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moe.config import ParallelConfig, TrainConfig
from moe.parallel import ddp, ds
from moe.parallel.ddp import DDPBackend
from moe.parallel.ds_engine import DeepSpeedBackend
from moe.parallel.pipeline import PipelineBackend
from moe.parallel.state import ParallelState
from moe.training.backend import Backend
from moe.training.data import TokenData


@dataclass(frozen=True)
class Launcher:
    """How one rank of a launched run joins, trains and leaves.

    Attributes:
        start: ``start(parallel, device) -> ParallelState``: join the launcher's process group.
        stop: leave it, freeing every group (no-op when none is up).
        backend: ``backend(cfg, state, data) -> Backend``, this rank's way of running a step.
    """

    start: Callable[[ParallelConfig, str], ParallelState]
    stop: Callable[[], None]
    backend: Callable[[TrainConfig, ParallelState, TokenData], Backend]


def _deepspeed_backend(cfg: TrainConfig, state: ParallelState, data: TokenData) -> Backend:
    if cfg.parallel.pp_size > 1:  # DeepSpeed's pipeline engine runs the stages
        return PipelineBackend(cfg, state, data=data)
    return DeepSpeedBackend(cfg, state, data=data)


LAUNCHERS = {
    "ddp": Launcher(ddp.start, ddp.stop, lambda cfg, state, data: DDPBackend(cfg, state, data=data)),
    "deepspeed": Launcher(ds.start, ds.stop, _deepspeed_backend),
}


def launcher(name: str) -> Launcher:
    """The launcher of ``parallel.backend=name`` (``ddp`` or ``deepspeed``)."""
    try:
        return LAUNCHERS[name]
    except KeyError:
        raise ValueError(
            f"parallel.backend={name!r} is not started by a launcher; known: {', '.join(LAUNCHERS)}"
        ) from None
