"""``moe-export``: a run's model as a Hugging Face model directory that ``transformers`` loads
with no custom code: ``config.json`` of an architecture it has (``moe.model.hf``), the weights
as ``model.safetensors``, ``generation_config.json``, and the tokenizer (``tokenizer.json`` +
``tokenizer_config.json``, so ``AutoTokenizer`` loads it; the byte tokenizer is written as the
equivalent byte-level BPE with no merges).  A document starts after ``<|endoftext|>``: prompts
begin with that id, as in training (``bos_token_id`` says so).

The directory is written beside its final place and renamed into it when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from moe.config import ConfigError
from moe.inference.load import read_weights, run_config, run_tokenizer
from moe.model.hf import architecture, hf_config, to_hf
from moe.training.data import EOT_TOKEN, TOKENIZER_FILE, Tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of a byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer_json() -> str:
    """The byte tokenizer (id = UTF-8 byte) as a ``tokenizers`` byte-level BPE with no merges."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def write_tokenizer(tokenizer: Tokenizer, out: Path, max_len: int) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` for ``AutoTokenizer``."""
    if tokenizer.kind == "bpe":
        (out / TOKENIZER_FILE).write_text(tokenizer.to_json(), encoding="utf-8")
        special = {"eos_token": EOT_TOKEN, "bos_token": EOT_TOKEN}
    else:  # id 0 (NUL) ends a document; no special token string (U+0100 would be text)
        (out / TOKENIZER_FILE).write_text(byte_tokenizer_json(), encoding="utf-8")
        special = {}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "split_special_tokens": True,  # a literal "<|endoftext|>" in text is text, as in training
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def export_run(run: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write ``run``'s model to ``out_dir`` (module docstring); what was written.  Refused
    configs are one-line ``ExportRefused`` errors, before anything is written."""
    from safetensors.torch import save_file

    saved, state, path = read_weights(run)
    cfg = run_config(saved, state, path)
    arch = architecture(cfg.model, cfg.moe)
    out = Path(out_dir).expanduser().resolve()
    run_dir = path.parent.resolve()
    if out == run_dir or out in run_dir.parents:
        raise ConfigError(f"OUT_DIR {out_dir} is the run directory or holds it; write the export elsewhere")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT_DIR {out_dir} is a file; pick a directory to write the model into")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir} exists and is not empty; pick another OUT_DIR or pass --overwrite")
    tokenizer = run_tokenizer(path.parent, cfg)
    eos = tokenizer.eot_id if tokenizer is not None else 0
    config = hf_config(cfg.model, cfg.moe, arch, eos_token_id=eos)
    dtype = state["tok_emb.weight"].dtype
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    tensors = {k: v.contiguous() for k, v in to_hf(state, cfg.model, cfg.moe, arch).items()}

    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        generation = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
        if tokenizer is not None:
            write_tokenizer(tokenizer, tmp, cfg.model.seq_len)
        (tmp / "README.md").write_text(_card(cfg, arch, saved.get("step", 0), path, tokenizer), encoding="utf-8")
        old = out.with_name(out.name + ".old-export")
        if out.exists():  # aside first: a crash now leaves the old export, not nothing
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(t.numel() for t in tensors.values())
    return {
        "architecture": arch,
        "out_dir": str(out),
        "tensors": len(tensors),
        "parameters": n,
        "step": saved.get("step"),
    }


def _card(cfg, arch: str, step: int, path: Path, tokenizer: Tokenizer | None) -> str:
    start = "`<|endoftext|>`" if tokenizer is not None and tokenizer.kind == "bpe" else "token id 0"
    return f"""# {path.parent.name}

Exported by `moe-export` from `{path}` (step {step}): model.block={cfg.model.block},
moe={cfg.moe.name}, {cfg.model.n_layers} blocks of d_model {cfg.model.d_model}, as `{arch}`.
Routing is dropless, as `moe-generate` runs it.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{Path(path).parent.name}-hf")
tok = AutoTokenizer.from_pretrained("{Path(path).parent.name}-hf")
```

Documents start after {start} (id {tokenizer.eot_id if tokenizer else 0}): put it before a prompt,
as training did. The model saw {cfg.model.seq_len} positions in training.
"""
