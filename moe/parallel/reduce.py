"""The few small collectives a training loop needs besides the gradients: the mean of a
metric over the data-parallel ranks, one rank's value sent to all, objects gathered on rank 0.

Each takes the :class:`ParallelState` and does nothing (no communication) in a one-process
run, so the trainer calls them unconditionally.  Every rank of the group must call them in
the same order, as with any collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from moe.parallel.state import ParallelState


def sum_over_dp_(t: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Sum ``t`` over the data-parallel group, in place; returns ``t``."""
    if state.dp_size > 1:
        dist.all_reduce(t, group=state.dp_group)
    return t


def mean_over_dp_(t: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Mean of ``t`` over the data-parallel group, in place; returns ``t``."""
    if state.dp_size > 1:
        dist.all_reduce(t, group=state.dp_group)
        t.div_(state.dp_size)
    return t


def count_over_world(flag: bool, state: ParallelState) -> int:
    """How many ranks of the world pass ``flag=True`` (e.g. to check that all agree)."""
    if state.world_size == 1:
        return int(flag)
    t = torch.tensor([int(flag)], dtype=torch.long, device=state.device)
    dist.all_reduce(t)
    return int(t.item())


def broadcast_object(obj: Any, state: ParallelState) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; for small things: a path, a float)."""
    if state.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=state.device)
    return box[0]


def gather_objects(obj: Any, state: ParallelState) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0; None on the other ranks."""
    if state.world_size == 1:
        return [obj]
    out = [None] * state.world_size if state.rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
