"""Gradient reduction for expert + data parallelism: experts stay out of the data-parallel
all-reduce and are reduced within their expert-data-parallel group instead.

Which parameters are experts' is read from the modules, not from marks on the parameters: a
module whose class sets ``expert_parallel = True`` (:class:`moe.experts.GroupedExperts`)
holds expert weights, sharded over the expert-parallel group.  (DeepSpeed marks each
parameter ``allreduce = False``; attributes on a parameter are lost by ``copy.deepcopy``, which
would silently put the experts back into the data-parallel all-reduce.  A DeepSpeed backend
sets its marks from :func:`expert_parameters`.)

Scaling: each rank's loss is the mean over its own tokens and the training loss is the mean
over the ``dp_size`` ranks.  A non-expert gradient is summed over the data-parallel group and
divided by ``dp_size``.  An expert's gradient already holds, through the all-to-all
backward, the contributions of every rank of its EP group; summed over its expert-data-parallel
group it holds those of all ``dp_size`` ranks, so it too is divided by ``dp_size`` (not by the
expert-data-parallel size), and the result does not depend on ``ep_size``.  DeepSpeed's
engine scales expert gradients the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from moe.parallel.state import ParallelState


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every expert weight: parameters of modules with ``expert_parallel``."""
    seen: set[int] = set()
    out = []
    for mod_name, mod in model.named_modules():
        if getattr(mod, "expert_parallel", False):
            for n, p in mod.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((f"{mod_name}.{n}" if mod_name else n, p))
    return out


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(shared parameters, expert parameters), each in ``model.parameters()`` order."""
    expert_ids = {id(p) for _, p in expert_parameters(model)}
    shared, experts = [], []
    for p in model.parameters():
        (experts if id(p) in expert_ids else shared).append(p)
    return shared, experts


def _sum_and_scale(params: list[nn.Parameter], group, group_size: int, divide_by: int) -> None:
    """Sum the gradients over ``group`` (one flat all-reduce per dtype and device) and divide.

    A trainable parameter without a gradient takes part with zeros, so every rank issues the
    same collectives in the same order whatever its graph touched."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        if group_size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            flat.div_(divide_by)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        elif divide_by != 1:
            torch._foreach_div_(grads, divide_by)


@torch.no_grad()
def allreduce_gradients(model: nn.Module, state: ParallelState, *, shared: bool = True) -> None:
    """Average gradients after ``backward``: shared parameters over the data-parallel group,
    expert parameters within their expert-data-parallel group (both divided by ``dp_size``,
    see the module docstring).  Every rank of a stage must call it, after every backward
    that should be averaged.

    ``shared=False`` reduces the experts only, for a backend whose engine (DDP, DeepSpeed)
    already all-reduces the shared parameters and has been told to leave the experts out
    (:func:`expert_parameters` names them).
    """
    if state.dp_size == 1:
        return
    shared_params, expert_params = split_parameters(model)
    if shared:
        _sum_and_scale(shared_params, state.dp_group, state.dp_size, state.dp_size)
    _sum_and_scale(expert_params, state.expert_dp_group, state.expert_dp_size, state.dp_size)
