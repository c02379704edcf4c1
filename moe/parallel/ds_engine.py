"""DeepSpeed's engine around our model: ZeRO stages 0, 1 and 2 with expert parameter groups
(:class:`DeepSpeedBackend`, the ``parallel=deepspeed`` way of running a step).

The engine owns the gradient reduction and the optimizer step; everything else stays ours:
the all-to-all (``AllToAllDispatcher`` over the same expert-parallel groups), the data
shards, the LR schedule, telemetry and the EP-independent checkpoint format.

How our experts become DeepSpeed's experts:

- **Parameters.**  DeepSpeed tells expert weights by two attributes on the parameter,
  ``allreduce = False`` and ``group_name = "ep_size_<EP>"``; :func:`mark_expert_parameters`
  sets them from :func:`moe.parallel.expert_parameters` (the modules say which weights are
  experts' - attributes on a parameter are lost by ``copy.deepcopy``, so they are set here,
  right before the engine is built, and nowhere else).
- **Groups.**  DeepSpeed keeps its own expert and expert-data-parallel groups in
  ``deepspeed.utils.groups``; :func:`deepspeed_expert_groups` creates them for ``ep_size`` and
  checks that they hold exactly the ranks of our :class:`ParallelState` (consecutive ranks
  for expert parallelism, every EP-th rank for expert data parallelism), so both sides reduce
  over the same ranks.
- **The engine's MoE switch.**  The engine turns on its expert paths only when a submodule is
  an instance of ``deepspeed.moe.layer.MoE`` (it checks the class, nothing else); without
  that switch ZeRO-0 fails on the first expert gradient and ZeRO-1/2 put the experts into the
  data-parallel all-reduce.  Our layers are not DeepSpeed's, so :func:`wrap` attaches one
  parameter-free marker module of that class to the model: no weights, no forward, no
  effect on ``state_dict``.
- **Optimizer.**  torch's AdamW (DeepSpeed's fused Adam compiles for 80-90 s on first use),
  its groups split into shared and expert groups (``moe: True``, ``name``) the way ZeRO-1/2
  require, each keeping its weight decay.

Gradient clipping: ZeRO-1/2 compute the norm over the gradient partitions, summed over the
data-parallel group - every expert counted once, the true norm - and clip inside the step.
ZeRO-0's engine averages the ranks' local norms instead, which under expert parallelism is not
the norm of the whole gradient (each rank's norm covers only its experts); so at ZeRO-0 the
engine's clipping is off and the trainer clips with ``moe.parallel.clip_grad_norm_``, as
``parallel=ddp`` does.  Every stage therefore clips by the same global norm.

Checkpoints stay in the one-process format at every ZeRO stage: :meth:`DeepSpeedRun.full_optimizer`
assembles each parameter's AdamW state (ZeRO partitions gathered with DeepSpeed's
``safe_get_full_optimizer_state``) into a plain ``torch.optim.AdamW`` laid out as a
one-process run's, which ``moe.parallel.gather_full_state`` then gathers over the experts.
A run saved at ZeRO-2 and EP=2 resumes at ZeRO-0, at EP=1, or under ``parallel=single``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from moe.model.experts import expert_parameters
from moe.parallel.ddp import DDPBackend
from moe.parallel.ds import skip_shm_comm_build
from moe.parallel.state import ParallelState
from moe.training.checkpoint import load_full_state
from moe.training.optim import optimizer_groups, set_lr


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of size ``ep_size``."""
    return f"ep_size_{ep_size}"


def mark_expert_parameters(model: nn.Module, ep_size: int) -> int:
    """Set DeepSpeed's expert marks on every expert weight; returns how many were marked."""
    name = expert_group_name(ep_size)
    params = expert_parameters(model)
    for _, p in params:
        p.allreduce = False
        p.group_name = name
    return len(params)


def deepspeed_expert_groups(state: ParallelState) -> str:
    """Create DeepSpeed's expert and expert-data-parallel groups for ``state.ep_size`` (once per
    process; collective) and check they hold the same ranks as ours.  Returns the group name."""
    from deepspeed.utils import groups

    name = expert_group_name(state.ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(state.ep_size)
    ep = tuple(dist.get_process_group_ranks(groups._get_expert_parallel_group(name)))
    edp = tuple(dist.get_process_group_ranks(groups._get_expert_data_parallel_group(name)))
    if ep != state.ep_ranks or edp != state.expert_dp_ranks:
        raise RuntimeError(
            f"DeepSpeed laid out the expert groups differently from ours (expert-parallel {ep} vs {state.ep_ranks}, "
            f"expert-data-parallel {edp} vs {state.expert_dp_ranks}); this DeepSpeed version is not supported"
        )
    return name


@functools.cache
def _marker_class() -> type:
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEMarker(MoE):
        """Tells DeepSpeed's engine the model has expert layers (module docstring).  Built
        without ``MoE.__init__``: it holds no weights and is never called."""

        def __init__(self, num_experts: int, ep_size: int):
            nn.Module.__init__(self)
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = expert_group_name(ep_size)

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
            """The engine asks each MoE to create its groups: ours exist already (deepspeed_expert_groups)."""

        def forward(self, *args, **kwargs):  # pragma: no cover - a marker
            raise RuntimeError("the DeepSpeed MoE marker is not a layer")

    return DeepSpeedMoEMarker


def moe_param_groups(groups: list[dict[str, Any]], ep_size: int) -> list[dict[str, Any]]:
    """Our optimizer groups split into shared and expert groups, as ZeRO-1/2 require: each
    expert group has ``moe: True`` and the expert group name, and keeps its options."""
    out = []
    for i, g in enumerate(groups):
        params = g["params"]
        shared = [p for p in params if getattr(p, "allreduce", True)]
        experts = [p for p in params if not getattr(p, "allreduce", True)]
        opts = {k: v for k, v in g.items() if k != "params"}
        if shared:
            out.append({**opts, "params": shared, "name": f"group{i}-shared"})
        if experts:
            out.append({**opts, "params": experts, "name": expert_group_name(ep_size), "moe": True})
    return out


def ds_config(cfg, state: ParallelState) -> dict[str, Any]:
    """The DeepSpeed config of a run (``TrainConfig``): micro-batch, accumulation, ZeRO stage."""
    stage = cfg.parallel.zero_stage
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * state.dp_size,
        # ZeRO-0: the trainer clips by the global norm (module docstring); ZeRO-1/2 clip in the step
        "gradient_clipping": cfg.optim.grad_clip if stage > 0 else 0.0,
        "zero_optimization": {
            "stage": stage,
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "overlap_comm": False,
        },
        "zero_allow_untested_optimizer": True,  # torch's AdamW under ZeRO: DeepSpeed only warns about it
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedRun:
    """The engine of one rank.  Build with :func:`wrap`; the trainer calls :meth:`backward`
    for each micro-batch and :meth:`step` once per optimizer step."""

    def __init__(self, engine, canonical_groups: list[dict[str, Any]], stage: int):
        self.engine = engine
        self.stage = stage
        self._canonical = canonical_groups  # the one-process optimizer layout (checkpoints)

    @property
    def optimizer(self):
        return self.engine.optimizer

    def backward(self, loss: torch.Tensor) -> None:
        """``loss`` of one micro-batch, not divided by grad_accum: the engine divides."""
        self.engine.backward(loss)

    def micro_step(self) -> None:
        """After each micro-batch but the last: the engine counts the accumulation."""
        self.engine.step()

    def step(self) -> None:
        """The optimizer step at the accumulation boundary (the LR set before: ``set_lr``)."""
        self.engine.step()

    def grad_norm(self) -> torch.Tensor | None:
        """The norm ZeRO-1/2 clipped by in the last step (None at ZeRO-0: the trainer's own)."""
        n = self.engine.get_global_grad_norm() if self.stage > 0 else None
        if n is None:
            return None
        return n if isinstance(n, torch.Tensor) else torch.tensor(float(n))

    # -- checkpoints --------------------------------------------------------------------------
    def blank_optimizer(self) -> torch.optim.AdamW:
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])} for g in self._canonical
        ]
        return torch.optim.AdamW(groups)

    @torch.no_grad()
    def full_optimizer(self) -> torch.optim.AdamW:
        """This rank's optimizer state as a plain AdamW in the one-process layout (its expert
        shard only; ``gather_full_state`` gathers the experts).  Collective at ZeRO-1/2."""
        opt = self.blank_optimizer()
        if self.stage == 0:  # the engine steps our AdamW itself: share its per-parameter state
            _share_state(self.engine.optimizer, opt)
            return opt
        from deepspeed.utils import safe_get_full_optimizer_state

        step = self._inner_step()
        if step is None:  # no step taken yet: no state to save
            return opt
        self._relink_optimizer_state()
        for g in opt.param_groups:
            for p in g["params"]:
                opt.state[p] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").to(p.dtype).clone(),
                    "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").to(p.dtype).clone(),
                }
        return opt

    def _relink_optimizer_state(self) -> None:
        """Point every parameter's fragment mapping at its partition's AdamW state.

        ZeRO-1/2 link the mappings once, right after the first optimizer step of the first
        param group - when the other groups' AdamW state does not exist yet - so the mappings
        of every other group (here: the expert groups) stay empty and
        ``safe_get_full_optimizer_state`` fails on them.  Linking again once every group has
        its state is what DeepSpeed's own link does, for all groups."""
        zero = self.engine.optimizer
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()

    def _inner_step(self) -> float | None:
        inner = self.engine.optimizer.optimizer  # the torch AdamW over the flat partitions
        for st in inner.state.values():
            if "step" in st:
                return float(st["step"])
        return None

    @torch.no_grad()
    def load_full_optimizer(self, opt: torch.optim.AdamW) -> None:
        """Put a one-process-layout AdamW state (this rank's shard, after ``load_full_state``)
        and the model's current weights into the engine.  Collective-free."""
        if self.stage == 0:
            _share_state(opt, self.engine.optimizer)
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        zero = self.engine.optimizer
        step = None
        if any(opt.state.get(p) for g in opt.param_groups for p in g["params"]):
            self._ensure_inner_state()
            self._relink_optimizer_state()
        for g in opt.param_groups:
            for p in g["params"]:
                safe_set_full_fp32_param(p, p.data.float())  # the master copy of the loaded weights
                st = opt.state.get(p)
                if not st:
                    continue
                step = float(st["step"])
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, st[key].float(), key)
        if step is not None:
            for st in zero.optimizer.state.values():
                st["step"] = torch.tensor(step)

    def _ensure_inner_state(self) -> None:
        """AdamW creates its state at the first step; a resumed ZeRO run needs it before that."""
        zero = self.engine.optimizer
        inner = zero.optimizer
        for group in inner.param_groups:
            for flat in group["params"]:
                if flat not in inner.state or "exp_avg" not in inner.state[flat]:
                    inner.state[flat] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format),
                    }


def _share_state(src: torch.optim.Optimizer, dst: torch.optim.Optimizer) -> None:
    """dst's per-parameter state becomes src's (the same tensors), parameter by parameter."""
    for g in dst.param_groups:
        for p in g["params"]:
            if p in src.state:
                dst.state[p] = src.state[p]


def wrap(model: nn.Module, canonical_groups: list[dict[str, Any]], cfg, state: ParallelState) -> DeepSpeedRun:
    """Build DeepSpeed's engine around ``model`` (on its device, weights identical on every
    rank).  ``canonical_groups``: the optimizer groups of a one-process run
    (``moe.training.optim.optimizer_groups``)."""
    import deepspeed

    skip_shm_comm_build()
    ep = state.ep_size
    n_marked = mark_expert_parameters(model, ep)
    if n_marked:
        deepspeed_expert_groups(state)
        num_experts = max(getattr(m, "total_experts", 0) for m in model.modules())
        model.add_module("_deepspeed_moe_marker", _marker_class()(num_experts, ep))
    o = cfg.optim
    groups = moe_param_groups(canonical_groups, ep) if n_marked else canonical_groups
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config(cfg, state), dist_init_required=False
    )
    if n_marked and not engine.has_moe_layers:
        raise RuntimeError(
            "DeepSpeed's engine did not take the model's expert layers; this DeepSpeed version is not supported"
        )
    return DeepSpeedRun(engine, canonical_groups, cfg.parallel.zero_stage)


class DeepSpeedBackend(DDPBackend):
    """One rank of a ``parallel=deepspeed`` run: the layout of :class:`DDPBackend` (the same
    all-to-all over the same expert-parallel groups, the same data shards), the model wrapped
    in DeepSpeed's engine (ZeRO ``parallel.zero_stage``), which reduces the gradients and steps
    the optimizer.  The engine divides the loss by ``grad_accum`` itself and reduces at the
    last micro-batch; ZeRO-1/2 clip inside the step by the same global norm (module docstring)."""

    def _optimizer(self) -> None:
        return None  # the engine's (wrap)

    def _build(self) -> None:
        super()._build()
        self._use_grad_buffers(False)  # DeepSpeed frees and re-creates the gradients itself
        self.ds = wrap(self.model, optimizer_groups(self.model, self.cfg), self.cfg, self.state)

    def compute(self, x: torch.Tensor, y: torch.Tensor):
        return self.ds.engine(x, y)

    def set_lr(self, lr: float) -> None:
        set_lr(self.ds.optimizer.param_groups, lr)

    def backward(self, loss: torch.Tensor, micro: int) -> None:
        self.ds.backward(loss)  # the engine divides by grad_accum and reduces at the last micro-batch
        if micro < self.cfg.grad_accum - 1:
            self.ds.micro_step()

    def reduce_gradients(self) -> None:
        """The engine reduced them in the last micro-batch's step."""

    def clip_gradients(self, max_norm: float) -> torch.Tensor | None:
        if self.ds.stage == 0:  # ZeRO-0: the global norm of moe.parallel.grads (module docstring)
            return super().clip_gradients(max_norm)
        return None  # ZeRO-1/2 clip inside the step, by the same global norm

    def optimizer_step(self) -> float | None:
        self.ds.step()
        norm = self.ds.grad_norm()  # ZeRO-1/2: known once the step is taken (the same on every rank)
        return float(norm) if norm is not None else None

    def full_optimizer(self) -> torch.optim.Optimizer:
        return self.ds.full_optimizer()  # ZeRO partitions gathered

    def load_weights_and_optimizer(self, model_sd: dict, optim_sd: dict) -> None:
        """Through a one-process-layout AdamW into the engine (any ZeRO stage); the config's
        weight decay, betas and eps stay (the engine loads the per-parameter state alone)."""
        optimizer = self.ds.blank_optimizer()
        load_full_state(self.model, optimizer, model_sd, optim_sd)
        self.ds.load_full_optimizer(optimizer)
