"""AdamW's parameter groups and the learning-rate schedule.

The learning rate is a pure function of the step (:func:`lr_at`), not scheduler state: a
resumed run with a new ``optim.lr`` or ``steps`` follows the new schedule from where it stands.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moe.config import TrainConfig
from moe.model.experts import split_parameters


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup over the first warmup_steps steps,
    then a cosine from optim.lr down to lr * min_lr_ratio at the last step (steps - 1)."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, cfg.steps - 1 - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW's parameter groups: matrices (incl. stacked expert weights and the router) decay,
    norms and biases don't.  With ``optim.expert_lr_scale != 1`` each splits in two, shared
    parameters then expert ones, and a group's ``lr_scale`` is the multiple of the schedule's
    learning rate it trains at (:func:`set_lr`).  Their order is the checkpoint's optimizer
    layout (at scale 1 it is the two groups it always was)."""
    o = cfg.optim
    shared, experts = list(model.parameters()), []
    if o.expert_lr_scale != 1.0:
        shared, experts = split_parameters(model)
    groups = []
    for matrices, wd in ((True, o.weight_decay), (False, 0.0)):
        for params, scale in ((shared, 1.0), (experts, o.expert_lr_scale)):
            picked = [p for p in params if (p.dim() >= 2) == matrices]
            if picked or params is shared:  # (at scale 1: the two groups, as always)
                groups.append(
                    {
                        "params": picked,
                        "weight_decay": wd,
                        "lr": o.lr * scale,
                        "lr_scale": scale,
                        "betas": (o.beta1, o.beta2),
                        "eps": o.eps,
                    }
                )
    return groups


def set_lr(param_groups: list[dict[str, Any]], lr: float) -> None:
    """The schedule's learning rate into every group, times the group's ``lr_scale``."""
    for group in param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`optimizer_groups`."""
    return torch.optim.AdamW(optimizer_groups(model, cfg))
