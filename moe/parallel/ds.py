"""The ``deepspeed`` backend's process group: the processes the ``deepspeed`` launcher starts.

    deepspeed --num_gpus 2 --no_local_rank $(which moe-train) parallel=deepspeed parallel.zero_stage=1

The launcher gives each process the same environment torchrun does (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); on CPU ``--num_gpus`` is simply the
process count.  ``--no_local_rank`` keeps it from appending ``--local_rank=N``, which Hydra
would reject as an override.

:func:`start` joins the group exactly as ``moe.parallel.ddp`` does (``env://``, the
``parallel.timeout_s`` on every collective, the same :class:`ParallelState` layout) and then
hands the initialised group to ``deepspeed.comm``, which DeepSpeed's engine talks through.
The engine itself (ZeRO, expert parameter groups, pipeline) is built by
``moe.parallel.ds_engine`` from the model.
"""

from __future__ import annotations

import sys
import warnings

from moe.config import ParallelConfig
from moe.parallel import ddp
from moe.parallel.state import ParallelState


def skip_shm_comm_build() -> None:
    """Keep ``deepspeed.comm`` from compiling its shared-memory all-reduce op.

    On a CPU accelerator DeepSpeed builds a C++ extension (``ShareMemCommBuilder``) the first
    time its torch comm backend is created: about 50 s with a compiler, a failure without one.
    That op only speeds up intra-node all-reduce of small tensors; gloo does the same job.
    ``build_shm_op`` returning None is DeepSpeed's own "op not available" path.
    """
    import deepspeed.comm.torch  # noqa: F401  (the module whose build_shm_op we replace)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def start(cfg: ParallelConfig, device: str = "auto") -> ParallelState:
    """Join the launcher's process group, build the layout and hand the group to DeepSpeed."""
    # ZeRO-1/2 gather partitions with torch's all_gather_into_tensor, which torch 2.13 flags as
    # deprecated once per rank: noise on every run's console that the user cannot act on.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    # Imported before the group is up: DeepSpeed's torch backend binds ``GroupMember.WORLD`` as
    # its barrier's default argument at import, which would keep the world group alive past
    # destroy_process_group (ddp.start imports torch.distributed.nn first for the same reason).
    import deepspeed

    skip_shm_comm_build()
    state = ddp.start(cfg, device=device)
    try:
        deepspeed.init_distributed(dist_backend=ddp.dist_backend(cfg, device), auto_mpi_discovery=False, verbose=False)
    except BaseException:
        del state  # so stop() frees its groups
        ddp.stop()
        raise
    return state


def stop() -> None:
    """Leave the process group (no-op when none is up), with DeepSpeed's references to its
    groups: ``deepspeed.utils.groups`` keeps the expert groups it made (its own
    ``destroy_process_group`` releases them), and the pipeline engine's send/recv module keeps
    its grid and groups in module globals that nothing of DeepSpeed's resets.  A group still
    referenced outlives ``ddp.stop()``, with worker threads that can abort the exit."""
    comm = sys.modules.get("deepspeed.comm")
    if comm is not None and comm.is_initialized():
        comm.destroy_process_group()
    p2p = sys.modules.get("deepspeed.runtime.pipe.p2p")
    if p2p is not None:
        p2p._grid = p2p._groups = None
    ddp.stop()
