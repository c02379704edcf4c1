"""The arms of the comparison: which router, how many experts, and the overrides that keep
every arm at the dense model's FLOPs per token."""

from __future__ import annotations

from dataclasses import dataclass

# Tiny shapes for the test suite's smoke comparison (seconds, not the hour the real one takes).
SMOKE_OVERRIDES = [
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.seq_len=32",
    "steps=12",
    "batch_size=4",
    "eval_every=4",
    "eval_batches=2",
    "ckpt_every=0",
    "optim.warmup_steps=2",
    "data.max_files=30",
    "logger.log_every=2",
    "logger.wandb=false",
]


@dataclass(frozen=True)
class Arm:
    """One side of the comparison: a router family and its expert count."""

    moe: str  # dense | switch | gshard | base | topk
    num_experts: int = 1
    top_k: int = 1

    @property
    def name(self) -> str:
        return "dense" if self.moe == "dense" else f"{self.moe}-{self.num_experts}"

    @property
    def run_name(self) -> str:
        return f"quality-{self.moe}-e{self.num_experts}"

    def overrides(self, d_ff: int) -> list[str]:
        """``moe-train`` overrides for this arm; ``d_ff`` is the dense FFN's hidden size."""
        if self.moe == "dense":  # no experts, so no experts' rate (the experiment's is the MoE arms')
            return ["moe=dense", "optim.expert_lr_scale=1"]
        out = [f"moe={self.moe}", f"moe.num_experts={self.num_experts}"]
        if self.top_k > 1:  # k experts of d_ff/k each: the same FLOPs as one dense FFN
            if d_ff % self.top_k:
                raise ValueError(
                    f"model.d_ff={d_ff} is not divisible by top_k={self.top_k}: the {self.name} arm "
                    "cannot match dense FLOPs"
                )
            out.append(f"moe.expert_d_ff={d_ff // self.top_k}")
        return out


def expert_only(override: str) -> bool:
    """An override about the routers or experts alone (``moe.capacity_factor=2``,
    ``optim.expert_lr_scale=0.5``): the dense arm has neither and trains without it, so one dense
    run is the baseline of every router lever.  ``moe.init_scale`` is dense's FFN init too."""
    key = override.lstrip("+~").split("=", 1)[0]
    return key == "optim.expert_lr_scale" or (key.startswith("moe.") and key != "moe.init_scale")


DEFAULT_ARMS = [
    Arm("dense"),
    Arm("switch", 8),
    Arm("gshard", 8, 2),
    Arm("base", 8),
    Arm("switch", 16),
    Arm("gshard", 16, 2),
    Arm("base", 16),
]


def parse_arm(text: str) -> Arm:
    """``dense``, ``switch-8``, ``gshard-16``, ``base-8`` -> :class:`Arm`."""
    if text == "dense":
        return Arm("dense")
    name, _, n = text.partition("-")
    if name not in ("switch", "gshard", "base") or not n.isdigit() or int(n) < 2:
        raise ValueError(f"--arms: {text!r} is not an arm; write dense, switch-N, gshard-N or base-N (N >= 2)")
    return Arm(name, int(n), 2 if name == "gshard" else 1)
