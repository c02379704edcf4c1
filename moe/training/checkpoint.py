"""Checkpoints: written atomically, opened safely (``weights_only=True``, one line when the file
is not readable), the RNG state that makes a resume bit-exact, the rules of which config may
resume which checkpoint, and loading a whole-model checkpoint into an expert shard.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then
renamed over the old one (``moe.training.files``): a crash at any moment leaves either the
previous checkpoint or the new one, never a torn file; the next start deletes the temporary a
killed save left (the loop, with ``remove_stale_temporaries``).
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from moe.config import ConfigError, TrainConfig, flatten, resolved_config_dict, to_dict, upgrade_config_dict
from moe.model.experts import expert_shards
from moe.training.files import write_atomic


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message is one line naming the file and the ways out."""


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` through a temporary beside ``path``, renamed over it (``moe.training.files``)."""
    return write_atomic(path, lambda f: torch.save(state, f))


# What numpy arrays in a checkpoint of an older version need (its numpy RNG state): array
# reconstruction only, no code of the file's choosing; torch's documented allowlist for them.
_NUMPY_ARRAY_GLOBALS = [
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    getattr(np, "_core", np).multiarray._reconstruct,
]


def load(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint, opened with ``torch.load(weights_only=True)``: tensors, numbers, strings and
    containers only, so opening one runs no code from the file.  Checkpoints of versions that
    kept the numpy RNG state as an array load too (numpy arrays allowed, nothing else).
    ``mmap=True`` maps the tensors instead of reading them: for a peek at the step or config.

    A file that is not a readable checkpoint (truncated, empty, not ours) is a one-line
    :class:`CheckpointError`; the file is left as it is."""
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:  # an older checkpoint's numpy arrays
            with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:
        size = path.stat().st_size if path.exists() else 0
        msg = str(e)
        if size == 0:
            why = "it is empty"
        elif "PytorchStreamReader" in msg or "zip archive" in msg:
            why = "truncated, or not a checkpoint file"
        else:
            why = f"{type(e).__name__}: {msg.splitlines()[0][:120] if msg else 'unreadable'}"
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({why}; {size:,} bytes); it is left as it is. "
            f"Pass resume=false to start the run over, or move the file away to keep it"
        ) from None


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, in a form ``torch.load(weights_only=True)`` reads (the
    numpy state's key array as a tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # (an ndarray in older checkpoints)
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _param_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(parameter) -> its index in ``optimizer.state_dict()`` (param groups in order)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {id(p): i for i, p in enumerate(params)}


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict, optim_sd: dict | None
) -> None:
    """Load a whole-model checkpoint (any expert-parallel size wrote it) into this rank's
    shard: expert stacks and their optimizer state are sliced to the experts this rank
    holds, everything else is loaded as is.  No communication."""
    model_sd = dict(model_sd)
    optim_sd = (
        None
        if optim_sd is None
        else {"state": {i: dict(s) for i, s in optim_sd["state"].items()}, "param_groups": optim_sd["param_groups"]}
    )
    index = _param_index(optimizer) if optimizer is not None else {}
    for key, p, first, n, total in expert_shards(model):
        if key not in model_sd:
            continue  # load_state_dict names the missing key
        full = model_sd[key]
        if full.dim() == 0 or full.shape[0] != total or tuple(full.shape[1:]) != tuple(p.shape[1:]):
            raise ValueError(
                f"checkpoint: {key} has shape {tuple(full.shape)}, this model's experts need "
                f"({total}, {', '.join(map(str, p.shape[1:]))}): the checkpoint is of another model "
                "(moe.num_experts or sizes changed)"
            )
        model_sd[key] = full[first : first + n]
        if optim_sd is not None and id(p) in index and index[id(p)] in optim_sd["state"]:
            st = optim_sd["state"][index[id(p)]]
            for name, v in list(st.items()):
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == full.shape:
                    st[name] = (
                        v[first : first + n].clone() if n != total else v
                    )  # a shard: not a view, the full stack can go
    model.load_state_dict(model_sd)
    if optimizer is not None and optim_sd is not None:
        optimizer.load_state_dict(optim_sd)


# Keys that may differ between a checkpoint's run and the run resuming it.  parallel.*: a
# checkpoint holds the whole model whatever the layout (moe.parallel.reshard); batch_size and
# grad_accum: only the global batch (batch_size x grad_accum x data-parallel ranks) counts.
# optim.expert_lr_scale may not (it splits the optimizer's groups, and a checkpoint's groups
# bring their own lr_scale back with them).
CHECKPOINT = "checkpoint.pt"  # a run directory's checkpoint (the one-process format)
RESUME_FIXED_KEYS = ("optim.expert_lr_scale",)
RESUME_FREE_KEYS = (
    "init_from",
    "steps",
    "resume",
    "out_dir",
    "run_name",
    "eval_every",
    "eval_batches",
    "ckpt_every",
    "threads",
    "peak_flops",
    "device",
    "logger",
    "optim",
    "data.cache_dir",
    "moe.gemm",  # which kernel multiplies the experts: the same function
    "parallel",
    "batch_size",
    "grad_accum",
)


def check_resumable(saved: dict, current: dict, run_dir: Path, *, saved_dp_size: int = 1, dp_size: int = 1) -> None:
    """A checkpoint is resumed only by the config that wrote it (schedule, logging,
    evaluation and the parallel layout may change, the global batch may not); anything else
    is a one-line ConfigError naming the keys."""
    a, b = flatten(resolved_config_dict(upgrade_config_dict(saved))), flatten(resolved_config_dict(current))
    # A key the checkpoint does not have, at its default now, came with a newer version of
    # this package: the run that wrote the checkpoint behaved as the default does.
    defaults = flatten(to_dict(TrainConfig()))
    added = {k for k in set(b) - set(a) if k in defaults and b[k] == defaults[k]}
    diff = [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
        and k not in added
        and (k in RESUME_FIXED_KEYS or not any(k == f or k.startswith(f + ".") for f in RESUME_FREE_KEYS))
    ]

    def global_batch(d: dict, dp: int) -> tuple[int, str]:
        bs, ga = d.get("batch_size", 0), d.get("grad_accum", 1)
        return bs * ga * dp, f"{bs}x{ga}x{dp}={bs * ga * dp}"

    (n_saved, saved_how), (n_now, now_how) = global_batch(a, saved_dp_size), global_batch(b, dp_size)
    if n_saved != n_now:
        diff.insert(0, f"global batch (batch_size x grad_accum x data-parallel ranks): {saved_how} -> {now_how}")
    if diff:
        shown = ", ".join(diff[:4]) + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")
        raise ConfigError(
            f"{run_dir} holds a checkpoint of another config ({shown}); pass run_name=NEW_NAME "
            "for a new run, or resume=false to start this one over"
        )
