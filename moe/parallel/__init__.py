"""Expert, data and pipeline parallelism: the process groups (``state``), the all-to-all token
dispatcher (``dispatch``), the gradient reduction that keeps experts out of the
data-parallel all-reduce and the global gradient norm (``grads``), EP-independent
checkpoints (``reshard``), the trainer's small metric collectives (``reduce``), rendezvous
ports (``ports``) and the torchrun backend (``ddp``).  Only this package and the backends
import ``torch.distributed``."""

from moe.parallel.dispatch import AllToAllDispatcher, AllToAllPlan
from moe.parallel.grads import OverlappedGradReducer, allreduce_gradients, clip_grad_norm_, expert_parameters, split_parameters
from moe.parallel.reshard import gather_full_state, load_full_state
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
    "expert_parameters",
    "gather_full_state",
    "load_full_state",
    "rank_groups",
    "split_parameters",
]
