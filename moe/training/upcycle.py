"""Sparse upcycling (Komatsuzaki et al. 2022): start an MoE model from a trained dense one.

``init_from=<dense run dir or checkpoint.pt>`` builds the configured model and then copies in
the dense model's weights: embeddings, attention, norms, the dense blocks' FFNs and the output
projection as they are; in every sparse block each routed expert is a copy of that block's
dense FFN and the router stays freshly initialised.

Fine-grained experts (``moe.granularity=m``): the dense FFN's hidden units are cut into m
consecutive slices of ``d_ff/m``; expert ``c*m + j`` holds slice ``j`` of copy ``c`` (rows
``j*d_ff/m ...`` of ``w1``/``w3``, the same rows of ``w2``'s input side).  The fresh router's
row of expert ``c*m`` is repeated for ``c*m+1 ... c*m+m-1``, so at step 0 the m slices of a
copy score alike and a token picks whole copies: the m slices then add up to the dense FFN
when each carries the weight the whole copy would (``moe.route_scale=m`` with renormalised
gates).  Shared experts start with a zero output projection (``w2 = 0``): they add nothing at
step 0 and learn from there.

The upcycled model computes the dense model's function exactly at step 0 when every token's
combine weights over its copies sum to one: renormalised top-k (k >= 2 routed experts, or
``topk`` with ``granularity >= 2``), ``route_scale`` equal to the granularity, no capacity
dropping.  :func:`exact_start` says whether a config does, and why not; Switch (one expert,
weighted by its router probability) does not: its output starts as ``p * FFN(x)``.

Under expert parallelism each rank copies the dense FFN into its own shard of the experts
(``moe.model.experts.expert_shards``): every rank reads the same file.

``init_from`` may also name a Hugging Face Llama directory (``config.json`` of model_type
``llama`` and ``model.safetensors``, sharded or not, e.g. one ``moe-export`` wrote): its
weights are renamed into our dense llama model's (``moe.model.hf``) and upcycled the same way.
Its shape must be this run's model and its vocabulary this run's tokenizer's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from moe.config import (
    ConfigError,
    ModelConfig,
    MoEConfig,
    TrainConfig,
    resolved_config_dict,
    to_dict,
    upgrade_config_dict,
)
from moe.model.experts import expert_shards
from moe.model.hf import from_hf_llama, llama_model_config
from moe.training import checkpoint as ckpt

# the model keys that must agree between the dense source and the upcycled model
SHAPE_KEYS = (
    "n_layers",
    "d_model",
    "n_heads",
    "d_ff",
    "seq_len",
    "block",
    "activation",
    "tie_embeddings",
    "rope_theta",
    "norm_eps",
)


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face model directory (its ``config.json`` names a ``model_type``), not a run's."""
    try:
        return path.is_dir() and "model_type" in json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def read_hf_llama(path: Path) -> dict[str, Any]:
    """A Hugging Face Llama directory as a dense run's checkpoint would hold it: ``config``
    (our model keys, moe=dense) and ``model`` (our names).  One-line ConfigErrors."""
    from safetensors.torch import load_file

    hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    try:
        model = llama_model_config(hf)
    except ConfigError as e:
        raise ConfigError(f"init_from={path}: {e}") from None
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"init_from={path}: no model.safetensors (or its index); only safetensors weights are read")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(path / f)))
    try:
        state = from_hf_llama(weights, model["n_layers"], tied=model["tie_embeddings"])
    except KeyError as e:
        raise ConfigError(f"init_from={path}: the Llama's weights have no {e.args[0]}") from None
    return {"config": {"model": model, "moe": {"name": "dense"}}, "model": state, "hf": True}


def source_file(init_from: str) -> Path:
    """The checkpoint file ``init_from`` names: a run directory's ``checkpoint.pt`` or the file
    itself.  A one-line ConfigError when there is none, or when it is a pipeline run's
    DeepSpeed checkpoint (which this package does not read back into one process)."""
    p = Path(init_from).expanduser()
    if p.is_dir():
        if (p / ckpt.CHECKPOINT).exists():
            return p / ckpt.CHECKPOINT
        if (p / "pipeline.json").exists():
            raise ConfigError(
                f"init_from={init_from}: a pipeline-parallel run's DeepSpeed checkpoint; upcycle from "
                "a dense run trained without parallel.pp_size (one process, DDP or ZeRO write checkpoint.pt)"
            )
        raise ConfigError(f"init_from={init_from}: no {ckpt.CHECKPOINT} in that directory; point it at a dense run")
    if not p.is_file():
        raise ConfigError(f"init_from={init_from} does not exist; point it at a dense run's directory or checkpoint.pt")
    return p


def check_source(saved: dict[str, Any], cfg: TrainConfig, model_cfg: ModelConfig, path: Path) -> None:
    """The dense run's config against this one: the same model shape and vocabulary, and a
    dense source; one-line ConfigErrors naming the keys.  A Hugging Face Llama's config has
    our model keys and its vocabulary size (``read_hf_llama``)."""
    # a checkpoint of an older version lacks keys added since: it ran as their defaults do
    src = _merged(to_dict(TrainConfig()), upgrade_config_dict(saved.get("config") or {}))
    src = resolved_config_dict(src)
    now = resolved_config_dict({"model": dict(vars(model_cfg))})
    diff = [
        f"model.{k}: {src.get('model', {}).get(k)!r} -> {now['model'][k]!r}"
        for k in SHAPE_KEYS
        if src.get("model", {}).get(k) != now["model"][k] and not (k == "seq_len" and saved.get("hf"))
    ]
    if diff:
        raise ConfigError(
            f"init_from={path}: the dense model has another shape ({', '.join(diff)}); upcycling copies "
            "its weights, so set these as the dense run had them"
        )
    src_data, data = src.get("data", {}), cfg.data
    for k in ("tokenizer", "vocab_size"):
        if saved.get("hf"):  # no data config: its embedding must fit this run's vocabulary
            vocab = saved["config"]["model"]["vocab_size"]
            if vocab != model_cfg.vocab_size:
                raise ConfigError(
                    f"init_from={path}: the Llama's vocabulary is {vocab} tokens, this run's tokenizer has "
                    f"{model_cfg.vocab_size}; its embeddings only fit the tokenizer it was trained with"
                )
            break
        if src_data.get(k) != getattr(data, k):
            raise ConfigError(
                f"init_from={path}: the dense run used data.{k}={src_data.get(k)!r}, this run "
                f"data.{k}={getattr(data, k)!r}; the embeddings only fit the same tokenizer"
            )
    m = cfg.moe
    if m.name != "dense" and (m.expert_d_ff or model_cfg.d_ff) != model_cfg.d_ff:
        raise ConfigError(
            f"init_from={path}: moe.expert_d_ff={m.expert_d_ff} but upcycled experts are copies of the dense "
            f"FFN (d_ff {model_cfg.d_ff}), or 1/m slices of it: set moe.expert_d_ff=0 and split with moe.granularity"
        )
    if (src.get("moe") or {}).get("name", "dense") != "dense":
        raise ConfigError(
            f"init_from={path}: the source is an moe={src['moe']['name']} run; upcycling starts from a "
            "dense model (moe=dense)"
        )


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def exact_start(moe: MoEConfig) -> tuple[bool, str]:
    """Whether an upcycled model of layer config ``moe`` computes the dense model's function
    at step 0 (every token's combine weights over its copies sum to one), and why not."""
    if moe.name == "dense":
        return True, ""
    if moe.name in ("base", "switch"):
        return False, f"moe={moe.name} weighs its one expert by a router score below 1"
    if moe.name == "gshard" and moe.random_routing:
        return False, "gshard's random routing drops second experts in training (set moe.random_routing=false)"
    if moe.name == "gshard":
        return True, "" if moe.dropless else "(while no token is dropped by capacity)"
    if not moe.normalize_weights or moe.routed_top_k < 2:
        return False, "the combine weights are not renormalised over two or more experts"
    if moe.route_scale != moe.granularity:
        return False, f"moe.route_scale={moe.route_scale} is not the granularity {moe.granularity}"
    if not moe.dropless:
        return True, "(while no token is dropped by capacity)"
    return True, ""


@torch.no_grad()
def upcycle_(model: nn.Module, dense_state: dict[str, torch.Tensor], moe: MoEConfig) -> dict[str, int]:
    """Copy ``dense_state`` (a dense ``TransformerLM``'s state dict) into ``model`` as the module
    docstring says; returns counts of what was done (``copied``, ``experts``, ``fresh``)."""
    m = moe.granularity
    own = model.state_dict()
    shards = {key: (first, n_local) for key, _, first, n_local, _ in expert_shards(model)}
    copied = experts = 0
    fresh: list[str] = []
    for key, target in own.items():
        if key in dense_state and dense_state[key].shape == target.shape:
            target.copy_(dense_state[key])
            copied += 1
            continue
        if key in dense_state:
            raise ConfigError(
                f"init_from: {key} is {tuple(dense_state[key].shape)} in the dense model and "
                f"{tuple(target.shape)} here; upcycle from a dense run of this shape and tokenizer"
            )
        block, _, rest = key.partition(".ffn.")
        if key in shards:  # blocks.i.ffn.experts.w{1,2,3}_E..: slices of blocks.i.ffn.w{1,2,3}.weight
            which = rest.rsplit(".", 1)[-1][:2]  # w1 | w2 | w3
            dense = dense_state.get(f"{block}.ffn.{which}.weight")
            if dense is None:
                raise ConfigError(
                    f"init_from: the dense model has no {block}.ffn.{which}.weight for {key} (a "
                    f"{'SwiGLU' if which == 'w3' else 'dense'} FFN there?)"
                )
            full = dense.t()  # (D, F) for w1/w3, (F, D) for w2
            F = full.shape[1] if which != "w2" else full.shape[0]
            first, n_local = shards[key]
            for i in range(n_local):
                j = (first + i) % m  # slice j of copy (first + i) // m
                rows = slice(j * F // m, (j + 1) * F // m)
                target[i].copy_(full[:, rows] if which != "w2" else full[rows, :])
            experts += 1
            continue
        fresh.append(key)
    for key in fresh:
        if key.endswith("router.weight_ED") and m > 1:  # one fresh row per copy, repeated over its slices
            w = own[key]
            w.copy_(w[::m].repeat_interleave(m, dim=0))
        elif ".shared.w2." in key:
            own[key].zero_()
    model.load_state_dict(own)
    return {"copied": copied, "experts": experts, "fresh": len(fresh)}


def upcycle_from(model: nn.Module, cfg: TrainConfig, model_cfg: ModelConfig) -> str:
    """Read ``cfg.init_from``, check it, copy it into ``model``; one line saying what was done."""
    hf_dir = Path(cfg.init_from).expanduser()
    if is_hf_dir(hf_dir):
        path, saved = hf_dir, read_hf_llama(hf_dir)
    else:
        path = source_file(cfg.init_from)
        saved = ckpt.load(path)
    check_source(saved, cfg, model_cfg, path)
    counts = upcycle_(model, saved["model"], cfg.moe)  # (a key of another shape: ConfigError)
    exact, why = exact_start(cfg.moe)
    step = saved.get("step", "?")
    what = (
        f"{counts['copied']} tensors copied, {counts['experts']} expert stacks from the dense FFNs, "
        f"{counts['fresh']} fresh (routers, shared experts, biases)"
    )
    if cfg.moe.name == "dense":
        what = f"{counts['copied']} tensors copied"
    start = "step 0 computes the dense model's function" + (f" {why}" if exact and why else "")
    if not exact:
        start = f"step 0 is not the dense model's function: {why}"
    return f"init_from {path} (step {step}): {what}; {start}"
