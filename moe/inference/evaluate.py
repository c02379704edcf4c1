"""Score a model on text: loss, perplexity, bits per byte, and each MoE layer's expert load.

Text is tokenized as training tokenizes it: every file is one document followed by the
end-of-text id, documents concatenated, the whole stream starting with an end-of-text id too
(so the first document's first token is predicted, as after any other document).  The stream
is cut into consecutive windows of ``seq_len + 1`` tokens overlapping by one (each window
predicts its last ``seq_len`` tokens from the ones before; every token after the first is
predicted exactly once), the last window shorter.

The loss is the mean cross-entropy over all predicted tokens (nats); perplexity is
``exp(loss)``; bits per byte is the total cross-entropy in bits over the text's UTF-8 bytes,
each end-of-text separator counted as one byte (the byte tokenizer's NUL), so it compares
models with different tokenizers.  A ``.bin`` of token ids is scored as it is (no bytes, no
bits per byte).  Routing is the loaded model's: dropless.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moe.config import ConfigError
from moe.model.transformer import TransformerLM
from moe.training.data import Tokenizer, read_text_file, walk_files


@dataclass
class EvalText:
    """Token ids to score and the UTF-8 bytes they stand for (None for pre-tokenized ids)."""

    tokens: np.ndarray  # int64
    n_bytes: int | None
    files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def read_eval_text(
    path: str | Path,
    tokenizer: Tokenizer | None,
    *,
    extensions: list[str] | None = None,
    bin_dtype: str = "uint16",
    vocab_size: int | None = None,
) -> EvalText:
    """``path`` (a text file, a folder of them, or a ``.bin`` of ids) as one token stream.  In
    a folder every file with one of ``extensions`` (None: every file) is read; files that are
    not UTF-8 text are skipped and listed.  One-line ConfigError when nothing is usable."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--data {path} does not exist; pass a text file, a folder of text files, or a .bin of ids")
    if p.is_file() and p.suffix == ".bin":
        ids = np.fromfile(p, dtype=np.dtype(bin_dtype)).astype(np.int64)
        if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
            raise ConfigError(
                f"--data {path} holds token id {int(ids.max())}, outside the model's vocabulary of {vocab_size}; "
                f"is it another tokenizer's (or not {bin_dtype})?"
            )
        return EvalText(ids, None, [str(p)])
    if tokenizer is None:
        raise ConfigError(
            f"the run trained on pre-tokenized ids and has no tokenizer; pass a .bin of token ids, not {path}"
        )
    if p.is_file():
        files = [p]
    else:
        files = walk_files(p, extensions or None, skip_hidden=True, skip_envs=False)
    eot = np.asarray([tokenizer.eot_id], dtype=np.int64)
    pieces: list[np.ndarray] = [eot]  # a document starts after end-of-text: its first token is predicted too
    n_bytes = 0
    good, skipped = [], []
    for f in files:
        text, reason, _ = read_text_file(f)
        if text is None:
            skipped.append((str(f), reason))
            continue
        pieces += [np.asarray(tokenizer.encode(text), dtype=np.int64), eot]
        n_bytes += len(text.encode("utf-8")) + 1
        good.append(str(f))
    if not good:
        why = f" ({skipped[0][0]} {skipped[0][1]})" if skipped else ""
        raise ConfigError(f"--data {path}: no UTF-8 text to score{why}")
    return EvalText(np.concatenate(pieces), n_bytes, good, skipped)


def windows(n_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """``(start, length)`` of the input windows over a stream of ``n_tokens``: inputs
    ``[start, start + length)``, targets one further; every token after the first is a target
    once."""
    return [(s, min(seq_len, n_tokens - 1 - s)) for s in range(0, n_tokens - 1, seq_len)]


@torch.no_grad()
def evaluate_tokens(
    model: TransformerLM, tokens: np.ndarray, *, seq_len: int | None = None, batch_size: int = 8
) -> dict[str, Any]:
    """Sum and mean cross-entropy of ``tokens`` under ``model`` (module docstring), and each
    MoE layer's assignments per expert."""
    model.eval()
    seq_len = seq_len or model.cfg.seq_len
    if batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size} must be >= 1")
    if len(tokens) < 2:
        raise ConfigError("the text to score has fewer than two tokens")
    device = model.tok_emb.weight.device
    spans = windows(len(tokens), seq_len)
    nll, counted = 0.0, 0
    loads: list[torch.Tensor] | None = None
    t0 = time.perf_counter()
    i = 0
    while i < len(spans):
        length = spans[i][1]
        batch = [s for s, n in spans[i : i + batch_size] if n == length]  # equal lengths only
        i += len(batch)
        buf = torch.from_numpy(np.stack([tokens[s : s + length + 1] for s in batch])).to(device)
        out = model(buf[:, :-1])
        nll += F.cross_entropy(
            out.logits.float().reshape(-1, out.logits.shape[-1]), buf[:, 1:].reshape(-1), reduction="sum"
        ).item()
        counted += buf[:, 1:].numel()
        layer_counts = [a.counts_E.detach().float().cpu() for a in out.layer_aux]
        loads = layer_counts if loads is None else [a + b for a, b in zip(loads, layer_counts)]
    seconds = time.perf_counter() - t0
    return {
        "nll_sum": nll,
        "tokens": counted,
        "loss": nll / counted,
        "seconds": seconds,
        "tokens_per_s": counted / seconds if seconds > 0 else float("nan"),
        "expert_load": {str(layer): counts.tolist() for layer, counts in zip(model.moe_layers(), loads or [])},
    }


def evaluate_text(
    model: TransformerLM, text: EvalText, *, seq_len: int | None = None, batch_size: int = 8
) -> dict[str, Any]:
    """:func:`evaluate_tokens` on ``text`` plus perplexity and bits per byte."""
    r = evaluate_tokens(model, text.tokens, seq_len=seq_len, batch_size=batch_size)
    r["perplexity"] = math.exp(r["loss"]) if r["loss"] < 700 else float("inf")
    r["bytes"] = text.n_bytes
    r["bits_per_byte"] = None if not text.n_bytes else r["nll_sum"] / math.log(2) / text.n_bytes
    r["files"] = len(text.files)
    r["skipped"] = [{"file": f, "reason": why} for f, why in text.skipped]
    return r


def load_table(expert_load: dict[str, list[float]]) -> list[str]:
    """One line per MoE layer: the busiest and idlest expert against the mean, and the loads."""
    lines = []
    for layer, counts in expert_load.items():
        c = np.asarray(counts, dtype=np.float64)
        mean = c.mean() if c.size else 0.0
        if mean <= 0:
            continue
        share = " ".join(f"{x / c.sum():.2f}" for x in c) if c.size <= 16 else f"({c.size} experts)"
        lines.append(
            f"  layer {layer:>3}: max/mean {c.max() / mean:5.2f}  min/mean {c.min() / mean:5.2f}  shares {share}"
        )
    return lines
