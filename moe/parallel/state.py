"""Who this process is and whom it talks to: one :class:`ParallelState`, built once by a
backend and passed down explicitly (no process groups in module globals).

Rank layout, for W processes, pipeline size P and expert-parallel size EP
(``W % (EP * P) == 0``)::

    rank     = pp_rank * dp_size + dp_rank          dp_size = W / P   (ranks of one stage)
    dp_rank  = expert_dp_rank * EP + ep_rank

- data-parallel group: the ``dp_size`` ranks of one pipeline stage (all ranks when P = 1);
  non-expert gradients are averaged over it;
- expert-parallel group: ``EP`` consecutive ranks of a stage that together hold all experts
  (rank ``ep_rank`` holds experts ``[ep_rank * E/EP, (ep_rank + 1) * E/EP)``); tokens move
  between them by all-to-all.  Consecutive ranks are usually on one node, where all-to-all is
  cheapest (DeepSpeed lays groups out the same way);
- expert-data-parallel group: the ``dp_size / EP`` ranks of a stage holding the same expert
  shard (same ``ep_rank``), every ``EP``-th rank; expert gradients are reduced over it;
- pipeline group: the ``P`` ranks with the same ``dp_rank``, one per stage (DeepSpeed's
  pipeline topology lays its stages out the same way: ``moe.parallel.pipeline`` checks it).

A group of one process is ``None`` (nothing to communicate); every other group is its own
communicator, also one spanning all ranks, so the dispatcher's collectives never interleave
with a backend's on the default group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moe.config import ConfigError


def check_parallel_sizes(world_size: int, ep_size: int, pp_size: int = 1) -> None:
    """Raise a one-line :class:`ConfigError` (a ValueError) unless the sizes fit together.
    Cheap and collective-free: call it before any worker starts."""
    if ep_size < 1:
        raise ConfigError(f"ep_size={ep_size} must be >= 1 (1: no expert parallelism, every rank holds all experts)")
    if pp_size < 1:
        raise ConfigError(f"pp_size={pp_size} must be >= 1 (1: no pipeline parallelism)")
    if world_size < 1:
        raise ConfigError(f"world_size={world_size} must be >= 1")
    if world_size % (ep_size * pp_size):
        raise ConfigError(
            f"world size {world_size} is not divisible by ep_size*pp_size={ep_size}*{pp_size}={ep_size * pp_size}; "
            f"run a multiple of {ep_size * pp_size} processes or lower ep_size/pp_size"
        )


def check_expert_sharding(num_experts: int, ep_size: int) -> None:
    """Every rank of the expert-parallel group holds the same number of experts."""
    if ep_size < 1:
        raise ConfigError(f"ep_size={ep_size} must be >= 1 (1: no expert parallelism, every rank holds all experts)")
    if num_experts < 1 or num_experts % ep_size:
        raise ConfigError(
            f"moe.num_experts={num_experts} is not divisible by ep_size={ep_size}: every rank of the expert-parallel "
            f"group holds the same number of experts; make num_experts a multiple of ep_size"
        )


def rank_groups(world_size: int, ep_size: int, pp_size: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    """Every process group of the layout (module docstring), as (kind, global ranks), in the
    order :meth:`ParallelState.build` creates them.  Kinds: dp, ep, expert_dp, pp; each rank is
    in exactly one group of each kind."""
    check_parallel_sizes(world_size, ep_size, pp_size)
    dp = world_size // pp_size
    out: list[tuple[str, tuple[int, ...]]] = []
    for s in range(pp_size):
        base = s * dp
        out.append(("dp", tuple(range(base, base + dp))))
        for j in range(dp // ep_size):
            out.append(("ep", tuple(range(base + j * ep_size, base + (j + 1) * ep_size))))
        for i in range(ep_size):
            out.append(("expert_dp", tuple(range(base + i, base + dp, ep_size))))
    for j in range(dp):
        out.append(("pp", tuple(range(j, world_size, dp))))
    return out


@dataclass(frozen=True, eq=False)
class ParallelState:
    """Ranks, device and process groups of one process.  Build with :meth:`build` (after
    ``torch.distributed.init_process_group``) or :meth:`single`; never construct per layer.

    Attributes:
        rank, world_size: in the default (world) group.
        local_rank: index of this process on its node (picks the GPU).
        device: where this process computes.
        ep_size, pp_size: expert-parallel and pipeline sizes.
        ep_group, expert_dp_group, dp_group, pp_group: process groups (``None`` when the group
            is this process alone); ``*_ranks`` hold their global ranks, in group order.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ep_size: int = 1
    pp_size: int = 1
    ep_group: dist.ProcessGroup | None = None
    expert_dp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    ep_ranks: tuple[int, ...] = (0,)
    expert_dp_ranks: tuple[int, ...] = (0,)
    dp_ranks: tuple[int, ...] = (0,)
    pp_ranks: tuple[int, ...] = (0,)

    # -- derived indices ------------------------------------------------------------------------
    @property
    def dp_size(self) -> int:
        """Ranks of one pipeline stage: the data-parallel world (non-expert gradients)."""
        return self.world_size // self.pp_size

    @property
    def expert_dp_size(self) -> int:
        return self.dp_size // self.ep_size

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp_size

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep_size

    @property
    def expert_dp_rank(self) -> int:
        return self.dp_rank // self.ep_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def expert_shard(self, num_experts: int) -> tuple[int, int]:
        """(first expert, number of experts) this rank holds."""
        check_expert_sharding(num_experts, self.ep_size)
        n = num_experts // self.ep_size
        return self.ep_rank * n, n

    def __deepcopy__(self, memo):  # process groups are handles: a copied model shares them
        return self

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ParallelState:
        """One process, no process groups."""
        return cls(rank=0, world_size=1, local_rank=0, device=torch.device(device))

    @classmethod
    def build(
        cls,
        ep_size: int,
        pp_size: int = 1,
        *,
        device: torch.device | str | None = None,
        local_rank: int | None = None,
        timeout: timedelta | None = None,
    ) -> ParallelState:
        """Create the groups of the default process group (call ``init_process_group`` first).

        Every rank must call this with the same sizes: ``new_group`` is collective over the
        whole world, so each rank creates every group (also those it is not in) in one fixed
        order.  Sizes are checked first, identically on every rank, so a bad size raises
        everywhere before any collective starts.

        Args:
            ep_size: ranks that together hold all experts (1: every rank holds all experts).
            pp_size: pipeline stages (``parallel=deepspeed``: DeepSpeed's pipeline engine runs them).
            device: default ``cuda:<local_rank>`` when the backend is NCCL, else CPU.
            local_rank: default ``$LOCAL_RANK`` (set by torchrun and the deepspeed launcher),
                else the rank.
            timeout: for collectives on the new groups (``new_group`` does not inherit the
                timeout given to ``init_process_group``; None: torch's default, 30 min).
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ParallelState.build needs torch.distributed.init_process_group first (or use ParallelState.single)"
            )
        world, rank = dist.get_world_size(), dist.get_rank()
        check_parallel_sizes(world, ep_size, pp_size)
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if device is None:
            device = f"cuda:{local_rank}" if dist.get_backend() == "nccl" else "cpu"
        groups: dict[str, tuple[dist.ProcessGroup | None, tuple[int, ...]]] = {}
        for kind, ranks in rank_groups(world, ep_size, pp_size):
            # new_group is collective over the world: every rank creates every group, in this order
            pg = dist.new_group(list(ranks), timeout=timeout) if len(ranks) > 1 else None
            if rank in ranks:
                groups[kind] = (pg, ranks)

        return cls(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            device=torch.device(device),
            ep_size=ep_size,
            pp_size=pp_size,
            ep_group=groups["ep"][0],
            expert_dp_group=groups["expert_dp"][0],
            dp_group=groups["dp"][0],
            pp_group=groups["pp"][0],
            ep_ranks=groups["ep"][1],
            expert_dp_ranks=groups["expert_dp"][1],
            dp_ranks=groups["dp"][1],
            pp_ranks=groups["pp"][1],
        )
