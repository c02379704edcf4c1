"""A trained model back from its run directory, ready for inference.

Every checkpoint this project writes holds the whole model in the one-process format
(``checkpoint.pt``: one process, DDP with expert parallelism, ZeRO-1/2, Ray, upcycled runs all
gather their shards into it), except a pipeline-parallel run's, which is DeepSpeed's per-layer
files: those are read layer by layer (``moe.parallel.pipeline.read_pipeline_checkpoint``).

The model is rebuilt from the config saved with the weights, with every expert in this
process and **dropless routing** (``moe.dropless=true``): at inference no token is dropped by a
capacity limit, whatever the run trained with.  The tokenizer is the run's: ``tokenizer.json``
in the run directory (a BPE run writes it at start), the byte tokenizer, or, for runs of older
versions, the data cache's (rebuilt from the corpus when it is gone).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe.config import ConfigError, TrainConfig, from_dict, upgrade_config_dict
from moe.model.transformer import TransformerLM
from moe.parallel.pipeline import PIPELINE_JSON, read_pipeline_checkpoint
from moe.training import checkpoint as ckpt
from moe.training.data import TOKENIZER_FILE, Tokenizer, load_data

# expert layers whose experts live outside this process: inference cannot rebuild them
REMOTE_LAYERS = ("hivemind",)


@dataclass
class LoadedRun:
    """What :func:`load_run` returns."""

    model: TransformerLM  # eval mode, dropless, on ``device``
    tokenizer: Tokenizer | None  # None: the run trained on pre-tokenized ids (a .bin)
    cfg: TrainConfig  # the run's config, vocabulary filled in, moe.dropless on
    step: int  # the optimizer steps the weights have seen
    path: Path  # the file (or pipeline.json) the weights came from

    @property
    def device(self) -> torch.device:
        return self.model.tok_emb.weight.device


def checkpoint_file(run: str | Path) -> Path:
    """The file holding a run's weights: ``run`` itself if it is a file, else the run
    directory's ``checkpoint.pt`` or ``pipeline.json``; one-line ConfigError when there is none."""
    p = Path(run).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise ConfigError(f"{run} does not exist; pass a run directory (e.g. runs/switch-e8) or its checkpoint.pt")
    for name in (ckpt.CHECKPOINT, PIPELINE_JSON):
        if (p / name).exists():
            return p / name
    raise ConfigError(
        f"{run} holds no checkpoint ({ckpt.CHECKPOINT} or {PIPELINE_JSON}); train it first, or pass the run "
        "directory moe-train printed"
    )


def read_weights(run: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """``(config dict, one-process state dict, file)`` of a run directory or checkpoint file."""
    path = checkpoint_file(run)
    if path.name == PIPELINE_JSON:
        try:
            info, state = read_pipeline_checkpoint(path.parent)
        except (ValueError, KeyError) as e:  # (ConfigError is a ValueError: passed on as it is)
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{path} is not a readable pipeline checkpoint ({type(e).__name__}: {e})") from None
        return {**info, "model": state}, state, path
    try:
        saved = ckpt.load(path, map_location="cpu")
    except ckpt.CheckpointError as e:  # its advice is the trainer's (resume=false): ours is where to look
        raise ConfigError(
            str(e).split("; it is left as it is")[0] + "; point at a run directory moe-train wrote"
        ) from None
    if not isinstance(saved, dict) or "model" not in saved or "config" not in saved:
        raise ConfigError(f"{path} is not a moe-train checkpoint (it has no model weights and config)")
    return saved, saved["model"], path


def run_config(saved: dict[str, Any], state: dict[str, torch.Tensor], path: Path) -> TrainConfig:
    """The config a checkpoint was trained with (keys of older versions upgraded), its
    vocabulary taken from the embedding, ``moe.dropless`` on."""
    cfg = from_dict(TrainConfig, upgrade_config_dict(saved.get("config") or {}))
    if cfg.moe.name in REMOTE_LAYERS:
        raise ConfigError(
            f"{path}: moe={cfg.moe.name} keeps its experts on the volunteers' servers, not in the checkpoint; "
            "inference needs them local (train with moe=switch, topk or deepseek to use the model here)"
        )
    vocab = int(state["tok_emb.weight"].shape[0])
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, vocab_size=vocab, dropout=0.0),
        moe=dataclasses.replace(cfg.moe, dropless=True, expert_dropout=0.0),
    )


def run_tokenizer(run_dir: Path, cfg: TrainConfig) -> Tokenizer | None:
    """The run's tokenizer (module docstring); None for a run on pre-tokenized ids."""
    if (run_dir / TOKENIZER_FILE).exists():
        return Tokenizer.load(run_dir / TOKENIZER_FILE)
    if cfg.data.path.endswith(".bin"):
        return None
    if cfg.data.tokenizer == "byte":
        return Tokenizer.byte()
    print(f"{run_dir} has no {TOKENIZER_FILE} (an older run): taking the data cache's", file=sys.stderr)
    try:
        return load_data(cfg.data, progress=True).tokenizer
    except (ConfigError, OSError) as e:
        raise ConfigError(
            f"{run_dir}: no {TOKENIZER_FILE}, and the data it trained on cannot be read to rebuild it ({e}); "
            f"copy the data cache's {TOKENIZER_FILE} into the run directory"
        ) from None


def load_run(run: str | Path, *, device: str | torch.device | None = None) -> LoadedRun:
    """The model of a run directory (or checkpoint file) in eval mode, dropless, with its
    tokenizer.  ``device`` defaults to CUDA when there is one."""
    saved, state, path = read_weights(run)
    cfg = run_config(saved, state, path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this torch has no CUDA device here; use --device cpu")
    model = TransformerLM(cfg.model, cfg.moe)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        shown = ", ".join((missing + unexpected)[:3])
        raise ConfigError(f"{path}: its weights do not fit the model its config describes ({shown}); was it edited?")
    model.to(device).eval()
    run_dir = path.parent
    return LoadedRun(model, run_tokenizer(run_dir, cfg), cfg, int(saved.get("step", 0)), path)
