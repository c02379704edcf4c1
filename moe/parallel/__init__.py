"""Expert, data and pipeline parallelism: the process groups (``state``), the all-to-all token
dispatcher (``dispatch``) and the gradient reduction that keeps experts out of the
data-parallel all-reduce (``grads``).  Only this package and the backends import
``torch.distributed``."""

from moe.parallel.dispatch import AllToAllDispatcher, AllToAllPlan
from moe.parallel.grads import allreduce_gradients, expert_parameters, split_parameters
from moe.parallel.state import ParallelState, check_expert_sharding, check_parallel_sizes, rank_groups

__all__ = [
    "AllToAllDispatcher",
    "AllToAllPlan",
    "ParallelState",
    "allreduce_gradients",
    "check_expert_sharding",
    "check_parallel_sizes",
    "expert_parameters",
    "rank_groups",
    "split_parameters",
]
