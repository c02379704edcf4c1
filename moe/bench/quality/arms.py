"""The arms of the comparison: which router, how many experts, and the overrides that keep
every arm at the dense model's FLOPs per token."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    """One side of the comparison: a router family and its expert count.

    ``start`` > 0: the arm begins from the dense model trained for ``start`` steps (the source
    arm ``dense-<start>``, ``length=start``) through ``init_from``, and trains the experiment's
    remaining steps with a fresh schedule: an MoE arm is *upcycled* from it, ``dense@<start>``
    is dense continued from the same checkpoint, the baseline of those arms.  Its steps count
    from the source's step 0 (the curves are shifted by ``start``)."""

    moe: str  # dense | switch | gshard | base | deepseek | upcycle
    num_experts: int = 1
    top_k: int = 1
    start: int = 0  # > 0: begins from the dense run of this many steps
    length: int = 0  # > 0 (dense only): a source run of this many steps

    # deepseek arms: moe/conf/moe/deepseek.yaml's split and shared experts, FLOPs matched below
    GRANULARITY = 4
    SHARED = 1

    @property
    def name(self) -> str:
        base = "dense" if self.moe == "dense" else f"{self.moe}-{self.num_experts}"
        if self.length:
            return f"dense-{self.length}"
        return f"{base}@{self.start}" if self.start else base

    @property
    def run_name(self) -> str:
        tail = f"-from{self.start}" if self.start else (f"-{self.length}steps" if self.length else "")
        return f"quality-{self.moe}-e{self.num_experts}{tail}"

    @property
    def source(self) -> Arm | None:
        """The dense run this arm begins from (None: it starts from scratch)."""
        return Arm("dense", length=self.start) if self.start else None

    @property
    def baseline(self) -> str:
        """The arm this one is measured against: dense, or dense continued from the same point."""
        return f"dense@{self.start}" if self.start and self.moe != "dense" else "dense"

    def schedule_overrides(self, steps: int, runs_dir) -> list[str]:
        """How long this arm trains and from what: the experiment's ``steps``, a source's
        ``length``, or the rest after ``start`` from the source's run directory."""
        if self.length:
            return [f"steps={self.length}"]
        if self.start:
            if not 0 < self.start < steps:
                raise ValueError(f"{self.name}: the start step must be between 0 and steps={steps}")
            return [f"steps={steps - self.start}", f"init_from={Path(runs_dir) / self.source.run_name}"]
        return []

    def overrides(self, d_ff: int) -> list[str]:
        """``moe-train`` overrides for this arm; ``d_ff`` is the dense FFN's hidden size."""
        if self.moe == "dense":  # no experts, so no experts' rate (the experiment's is the MoE arms')
            return ["moe=dense", "optim.expert_lr_scale=1"]
        if self.moe == "upcycle":
            # each expert half of a copy of dense's FFN, two halves a token (the FLOPs of one
            # FFN), route_scale 2: the upcycled model starts as the dense one (moe.training.upcycle)
            if d_ff % 2:
                raise ValueError(f"model.d_ff={d_ff} is odd: the {self.name} arm halves it")
            return [
                "moe=topk",
                f"moe.num_experts={self.num_experts}",
                "moe.top_k=1",
                "moe.granularity=2",
                "moe.route_scale=2.0",
            ]
        out = [f"moe={self.moe}", f"moe.num_experts={self.num_experts}"]
        if self.moe == "deepseek":  # m*k routed + S shared experts of e each, e = d_ff / (m*k + S) rounded down
            m, pieces = self.GRANULARITY, self.GRANULARITY * self.top_k + self.SHARED
            e = d_ff // pieces
            if e < 1:
                raise ValueError(f"model.d_ff={d_ff} is too small for {pieces} experts: the {self.name} arm")
            return out + [
                f"moe.top_k={self.top_k}",
                f"moe.granularity={m}",
                f"moe.num_shared_experts={self.SHARED}",
                f"moe.expert_d_ff={m * e}",
            ]
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
    """``dense``, ``switch-8``, ``gshard-16``, ``base-8``, ``deepseek-8`` -> :class:`Arm`;
    ``<arm>@<S>`` begins from the dense run of S steps (``dense@500``, ``upcycle-8@500``)."""
    what, at, start = text.partition("@")
    bad = ValueError(
        f"--arms: {text!r} is not an arm; write dense, switch-N, gshard-N, base-N or deepseek-N (N >= 2), "
        "or dense@S / <arm>@S / upcycle-N@S to begin from the dense run of S steps"
    )
    if at and not (start.isdigit() and int(start) > 0):
        raise bad
    s = int(start) if at else 0
    if what == "dense":
        return Arm("dense", start=s)
    name, _, n = what.partition("-")
    if name not in ("switch", "gshard", "base", "deepseek", "upcycle") or not n.isdigit() or int(n) < 2:
        raise bad
    if name == "upcycle" and not s:
        raise ValueError(f"--arms: {text!r}: an upcycle arm begins from a dense run: write upcycle-{n}@S")
    return Arm(name, int(n), 2 if name == "gshard" else 1, start=s)
