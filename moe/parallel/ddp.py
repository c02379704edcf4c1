"""The ``ddp`` backend: the processes ``torchrun`` starts, one process group, one
:class:`ParallelState`, and :class:`DDPBackend`, how each of them runs the training step.

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
from typing import Any

import torch
import torch.distributed as dist

# torch.distributed.nn.functional binds ``group.WORLD`` as its functions' default argument when
# first imported, and torch imports it lazily (torch._dynamo -> fsdp -> _shard) once training
# runs: after the group is up, those defaults would hold the world group forever, past
# destroy_process_group and into interpreter exit.  Imported here, before start(), they hold None.
import torch.distributed.nn  # noqa: F401

from moe.config import ConfigError, ParallelConfig, TrainConfig
from moe.model.layers import LayerContext
from moe.parallel.dispatch import AllToAllDispatcher
from moe.parallel.grads import OverlappedGradReducer, allreduce_gradients, clip_grad_norm_
from moe.parallel.reduce import broadcast_object, count_over_world, gather_objects, mean_over_dp_, sum_over_dp_
from moe.parallel.reshard import gather_full_state
from moe.parallel.state import ParallelState
from moe.training import checkpoint as ckpt
from moe.training.backend import Backend, rank_seed
from moe.training.data import TokenData
from moe.training.telemetry import LoadAccumulator


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


class DDPBackend(Backend):
    """One rank of a data + expert parallel run (torchrun's processes, Ray Train's workers).

    Every rank holds the non-expert weights and its shard of the experts (``ep_size`` ranks
    together hold all of them; tokens move by all-to-all, ``AllToAllDispatcher``).  Gradients:
    during the step's last backward, full buckets are all-reduced as they complete
    (:class:`OverlappedGradReducer`; ``parallel.bucket_mb=0``: one all-reduce after the
    backward): shared parameters over the data-parallel group, experts within their
    expert-data-parallel group; clipping by the norm of the whole model's gradient (every
    expert counted once, :func:`clip_grad_norm_`).

    Each rank's MoE losses are its own: the balancing loss ``E * sum f_i P_i`` and capacity
    ``ceil(cf * T / E)`` are computed over a rank's own tokens (as DeepSpeed does), so a run at
    DP=2 equals one process with ``grad_accum=2`` exactly, and one process with the double
    batch exactly when the layer is dropless and aux-free.

    Checkpoints hold the whole model in the one-process format (``gather_full_state``): any
    expert-parallel size resumes any other's.  Each rank's RNG state is kept; resumed at another
    world size, ranks > 0 draw fresh streams from (seed, rank, step).

    Args:
        cfg: the run; ``parallel.ep_size`` must be ``state.ep_size``.
        state: this process's ranks and groups (:func:`start` builds it under torchrun).
        data: token data; loaded from ``cfg.data`` when None.
    """

    def __init__(self, cfg: TrainConfig, state: ParallelState, *, data: TokenData | None = None):
        if state.ep_size != cfg.parallel.ep_size:
            raise ConfigError(
                f"parallel.ep_size={cfg.parallel.ep_size} but the process groups were built with "
                f"ep_size={state.ep_size}; build the ParallelState from the same config"
            )
        if state.pp_size != 1:
            raise ConfigError(
                f"pp_size={state.pp_size}: this backend runs the whole model in every process; "
                "pipeline stages train with moe.parallel.pipeline.PipelineBackend"
            )
        self.state = state
        self.rank, self.world_size = state.rank, state.world_size
        self.replicas, self.replica_rank = state.dp_size, state.dp_rank
        self.dispatcher = AllToAllDispatcher(state) if state.ep_size > 1 else None
        self.reducer = None
        super().__init__(cfg, data=data)

    def _device(self) -> torch.device:
        return self.state.device

    def _layer_context(self) -> LayerContext:
        return LayerContext(dispatcher=self.dispatcher, runtime=self.runtime)

    def _build(self) -> None:
        super()._build()
        p = self.cfg.parallel
        if self.state.dp_size > 1 and self.optimizer is not None and p.bucket_mb > 0:
            self.reducer = OverlappedGradReducer(self.model, self.state, p.bucket_mb)

    def comm_seconds(self) -> float:  # the dispatcher counts its all-to-alls itself
        return super().comm_seconds() + (self.dispatcher.comm_seconds if self.dispatcher is not None else 0.0)

    # -- the step -------------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, micro: int) -> None:
        if self.reducer is not None and micro == self.cfg.grad_accum - 1:
            self.reducer.arm()  # the step's last backward: buckets go out as they complete
        super().backward(loss, micro)

    def reduce_gradients(self) -> None:
        if self.state.dp_size == 1:
            return
        with self.collective():  # the wait for what is still in flight (the exposed part)
            if self.reducer is not None:
                self.reducer.finish()
            else:
                allreduce_gradients(self.model, self.state)  # once per step, whatever grad_accum

    def clip_gradients(self, max_norm: float) -> torch.Tensor | None:
        return clip_grad_norm_(self.model, max_norm, self.state)

    # -- agreement between ranks ----------------------------------------------------------------

    def sum_over_replicas_(self, t: torch.Tensor) -> torch.Tensor:
        with self.collective():
            return sum_over_dp_(t, self.state)

    def mean_over_replicas(self, value: float) -> float:
        if self.state.dp_size == 1:
            return value
        with self.collective():
            return mean_over_dp_(torch.tensor([value], dtype=torch.float64, device=self.device), self.state).item()

    def load_summary(self, load: LoadAccumulator) -> dict[str, float]:
        if self.state.dp_size > 1:
            with self.collective():
                load.merge_ranks(lambda t: sum_over_dp_(t, self.state), self.state.dp_size)  # the global load
        return load.summary()

    def count_ranks(self, flag: bool) -> int:
        return count_over_world(flag, self.state)

    def broadcast(self, obj: Any) -> Any:
        return broadcast_object(obj, self.state)

    # -- checkpoints ----------------------------------------------------------------------------

    def layout(self) -> dict[str, int]:
        st = self.state
        return {"world_size": st.world_size, "dp_size": st.dp_size, "ep_size": st.ep_size}

    def full_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose state the checkpoint holds (in the one-process layout)."""
        return self.optimizer

    def state_dict(self) -> dict[str, Any] | None:
        """The whole model and optimizer in the one-process format (expert shards gathered) and
        every rank's RNG state, on rank 0; None elsewhere.  Collective: every rank calls it."""
        st = self.state
        model_sd, optim_sd = gather_full_state(self.model, self.full_optimizer(), st)
        rngs = gather_objects(ckpt.rng_state(), st)
        if not self.is_main:
            return None
        out = {"model": model_sd, "optimizer": optim_sd, "rng": rngs[0]}
        if st.world_size > 1:
            out["layout"] = self.layout()
            out["rng_ranks"] = rngs
        return out

    def restore(self, state: dict[str, Any]) -> None:
        """Every rank reads the whole file and keeps its expert shard; each rank takes its own
        RNG stream back (another world size: rank 0 goes on with rank 0's stream, the others
        start fresh ones from (seed, rank, step))."""
        self.load_weights_and_optimizer(state["model"], state["optimizer"])
        rngs = state.get("rng_ranks") or [state["rng"]]
        if len(rngs) == self.world_size:
            ckpt.set_rng_state(rngs[self.rank])
        else:
            ckpt.set_rng_state(rngs[0])
            if self.rank > 0:
                torch.manual_seed(rank_seed(self.cfg.seed, self.rank, state["step"]))
