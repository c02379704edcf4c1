"""The ``ddp`` backend: the processes ``torchrun`` starts, one process group, one
:class:`ParallelState`.

    torchrun --nproc_per_node 2 --no-python moe-train parallel=ddp parallel.ep_size=2

torchrun gives each process ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`start` joins the group through them (``env://``), with
``parallel.timeout_s`` on every collective, so a rank that crashed or hangs ends the others
with an error instead of a hang (torchrun also stops the remaining workers when one exits
with an error).  :func:`stop` leaves the group.  ``moe.config.validate_launch`` checks the
environment against the config first, before any process group exists.

Gradients are averaged by ``moe.parallel.allreduce_gradients`` after the backward (experts
within their expert-data-parallel group), not by ``torch.nn.parallel.DistributedDataParallel``
hooks: DDP would all-reduce the experts over all ranks, and its overlap of communication with
the backward buys little on CPU/gloo.  (A CUDA user with a big dense part would gain from it;
a later option.)
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta
import torch
import torch.distributed as dist

# torch.distributed.nn.functional binds ``group.WORLD`` as its functions' default argument when
# first imported, and torch imports it lazily (torch._dynamo -> fsdp -> _shard) once training
# runs: after the group is up, those defaults would hold the world group forever, past
# destroy_process_group and into interpreter exit.  Imported here, before start(), they hold None.
import torch.distributed.nn  # noqa: F401

from moe.config import ParallelConfig
from moe.parallel.state import ParallelState


def dist_backend(cfg: ParallelConfig, device: str = "auto") -> str:
    """``auto``: NCCL when this process computes on a CUDA GPU, gloo otherwise."""
    if cfg.dist_backend != "auto":
        return cfg.dist_backend
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if on_gpu else "gloo"


def _device(device: str, backend: str, local_rank: int) -> torch.device:
    """The process's device: one GPU per local rank under NCCL (or device=cuda), else CPU."""
    if device.startswith("cuda:"):
        return torch.device(device)
    if device == "cuda" or (device == "auto" and backend == "nccl"):
        return torch.device("cuda", local_rank)
    return torch.device("cpu" if device == "auto" else device)


def start(cfg: ParallelConfig, device: str = "auto") -> ParallelState:
    """Join the process group torchrun set up and build every group of the layout.

    ``env://`` reads torchrun's variables from the process environment (under torchrun it
    also reuses the agent's store rather than opening a second one on MASTER_PORT).

    Args:
        cfg: ``parallel.*`` (``ep_size``, ``dist_backend``, ``timeout_s``).
        device: ``TrainConfig.device`` (auto: this rank's GPU under NCCL, else CPU).
    """
    env = os.environ
    local_rank = int(env.get("LOCAL_RANK", 0))
    backend = dist_backend(cfg, device)
    dev = _device(device, backend, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = timedelta(seconds=cfg.timeout_s)
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        timeout=timeout,
        device_id=dev if dev.type == "cuda" else None,
    )
    try:
        return ParallelState.build(cfg.ep_size, cfg.pp_size, device=dev, local_rank=local_rank, timeout=timeout)
    except BaseException:
        stop()
        raise


def stop() -> None:
    """Leave the process group (no-op when none is up) and free its groups now.

    ``destroy_process_group`` only unregisters the groups: each lives on, with its gloo worker
    threads, while something references it.  Callers drop their :class:`ParallelState` (and
    whatever holds its groups) first; the collection here frees the reference cycles that
    still do, so no worker thread outlives the interpreter (one that does can abort the
    process at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
