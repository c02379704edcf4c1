"""Running the training step on many processes: the backends of the one loop
(``moe.training.loop.Trainer``) and what they are built from.

- ``state``: :class:`ParallelState`, ranks and process groups, built once and passed down;
- ``dispatch``: the all-to-all token dispatcher of expert parallelism;
- ``grads``: gradient reduction that keeps experts out of the data-parallel all-reduce, the
  global gradient norm, buckets sent during the backward;
- ``reshard``: checkpoints gathered into the one-process format (any EP size resumes any other);
- ``reduce``: the small collectives of the loop (metric means, broadcasts);
- ``ports``: rendezvous ports outside the ephemeral range;
- ``ddp``: torchrun's processes and :class:`~moe.parallel.ddp.DDPBackend`;
- ``ds``, ``ds_engine``: DeepSpeed's launcher and engine (ZeRO 0-2), ``DeepSpeedBackend``;
- ``pipeline``: DeepSpeed's pipeline stages, ``PipelineBackend``;
- ``ray_train``: Ray Train's workers, each a ``DDPBackend`` rank;
- ``launch``: which launcher and backend each ``parallel.backend`` name means.

Only this package (and the swarm's rooms, for hivemind) imports ``torch.distributed``,
``deepspeed`` and ``ray``; ``deepspeed`` and ``ray`` only when a run asks for them.
"""

from moe.parallel.dispatch import AllToAllDispatcher, AllToAllPlan
from moe.parallel.grads import OverlappedGradReducer, allreduce_gradients, clip_grad_norm_
from moe.parallel.reshard import gather_full_state
from moe.parallel.state import ParallelState, check_expert_sharding, check_parallel_sizes, rank_groups

__all__ = [
    "AllToAllDispatcher",
    "AllToAllPlan",
    "OverlappedGradReducer",
    "ParallelState",
    "allreduce_gradients",
    "check_expert_sharding",
    "check_parallel_sizes",
    "clip_grad_norm_",
    "gather_full_state",
    "rank_groups",
]
