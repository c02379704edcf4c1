"""Checkpoints that do not depend on the expert-parallel size.

A checkpoint holds the *whole* model and optimizer, exactly as a one-process run writes
them: every MoE layer's ``(E, ...)`` expert stacks, and for each expert weight its AdamW
state (``exp_avg``, ``exp_avg_sq``) stacked the same way.  So a file written at one EP size
loads at any other (and by plain ``moe-train``), weights *and* optimizer state (DeepSpeed
loads the wrong experts there, or drops the optimizer state).

- :func:`gather_full_state` (collective over the expert-parallel group of rank 0): each
  rank's expert shards - weights and optimizer state, one flat buffer per dtype - are
  gathered on rank 0 and concatenated in expert order.  Expert-data-parallel replicas hold
  the same shards, so only rank 0's EP group takes part.
- ``moe.training.checkpoint.load_full_state`` (no communication): every rank reads the whole
  file and keeps the rows ``[first_expert, first_expert + num_experts)`` of each stack for its
  own shard.

Which tensors are sharded is read from the modules (``GroupedExperts.expert_parallel``,
``first_expert``, ``total_experts``); an optimizer state tensor is sharded when it has its
parameter's shape (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), a scalar ``step`` is not.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from moe.model.experts import expert_shards
from moe.parallel.state import ParallelState


def _param_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(parameter) -> its index in ``optimizer.state_dict()`` (param groups in order)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {id(p): i for i, p in enumerate(params)}


def _sharded_state(opt_state: dict[str, Any], p: nn.Parameter) -> list[str]:
    """Names of the per-parameter optimizer tensors that have the parameter's shape."""
    return sorted(k for k, v in opt_state.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape)


@torch.no_grad()
def gather_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: ParallelState
) -> tuple[dict, dict] | tuple[None, None]:
    """(model state dict, optimizer state dict) of the whole model on rank 0, in the format of
    a one-process run; (None, None) on other ranks.  Every rank must call it (ranks outside
    rank 0's expert-parallel group return at once).  The returned tensors may share memory
    with the live model: save them before the next step."""
    model_sd, optim_sd = model.state_dict(), optimizer.state_dict()
    if state.ep_size == 1:
        return (model_sd, optim_sd) if state.rank == 0 else (None, None)
    if 0 not in state.ep_ranks:
        return None, None
    shards = expert_shards(model)
    index = _param_index(optimizer)
    # (where the full tensor goes, local tensor): weights, then their optimizer state
    local: list[tuple[tuple, torch.Tensor]] = []
    for key, p, _, _, _ in shards:
        local.append((("model", key), p.detach()))
        st = optimizer.state.get(p, {})
        for name in _sharded_state(st, p):
            local.append((("optim", index[id(p)], name), st[name]))
    full: dict[tuple, torch.Tensor] = {}
    by_dtype: dict[torch.dtype, list[tuple[tuple, torch.Tensor]]] = {}
    for where, t in local:
        by_dtype.setdefault(t.dtype, []).append((where, t))
    root = state.ep_rank == 0  # global rank 0
    for items in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for _, t in items])
        bufs = [torch.empty_like(flat) for _ in range(state.ep_size)] if root else None
        dist.gather(flat, bufs, group=state.ep_group, group_dst=0)
        if root:
            offset = 0
            for where, t in items:
                n = t.numel()
                parts = [b[offset : offset + n].view(t.shape) for b in bufs]  # EP rank r holds the r-th shard
                full[where] = torch.cat(parts, dim=0)
                offset += n
    if not root:
        return None, None
    model_sd = dict(model_sd)
    for (kind, *rest), t in full.items():
        if kind == "model":
            model_sd[rest[0]] = t
    optim_sd = {"state": {i: dict(s) for i, s in optim_sd["state"].items()}, "param_groups": optim_sd["param_groups"]}
    for (kind, *rest), t in full.items():
        if kind == "optim":
            i, name = rest
            optim_sd["state"][i][name] = t
    return model_sd, optim_sd
