"""Incremental decoding with a KV cache: greedy or sampled (temperature, top-k, top-p).

The prompt is run through the model once (prefill); then each new token is one forward of a
single position over the cached keys and values (:class:`moe.model.transformer.KVCache`), so a
token costs one position's compute, not the whole sequence's.  The model was trained on
``model.seq_len`` positions; when the context would pass that, the cache is rebuilt from the
last ``seq_len // 2`` tokens (a sliding window) and decoding goes on.

Shape suffixes: B batch (1 here), S positions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moe.model.transformer import KVCache, TransformerLM


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.  ``greedy``: the most likely one (the rest is ignored);
    otherwise drawn from ``softmax(logits / temperature)`` kept to the ``top_k`` most likely
    (0: all) and to the smallest set whose probability reaches ``top_p`` (1.0: all)."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (or use greedy decoding)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0: no limit)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def next_token(logits_BV: torch.Tensor, how: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token id of each row, ``(B,)`` long."""
    logits_BV = logits_BV.float()
    if how.greedy:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV / how.temperature
    if how.top_k and how.top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(how.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if how.top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        before_BV = probs_BV.cumsum(dim=-1) - probs_BV  # probability of the tokens ranked above
        sorted_BV = sorted_BV.masked_fill(before_BV >= how.top_p, float("-inf"))  # the first always stays
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, order_BV, sorted_BV)
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: TransformerLM,
    prompt: list[int],
    max_new_tokens: int,
    how: Sampling = Sampling(),
    *,
    seed: int | None = None,
    stop: int | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new token ids after ``prompt``, one at a time; stops after
    yielding ``stop`` (e.g. the end-of-text id) when given.  ``seed`` makes sampling repeatable."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token (e.g. the end-of-text id)")
    model.eval()
    device = model.tok_emb.weight.device
    limit = model.cfg.seq_len
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    tokens = list(prompt[-limit:])
    cache = KVCache(model, 1)
    logits = model(torch.tensor([tokens], device=device), cache=cache).logits[:, -1]
    for i in range(max_new_tokens):
        tok = int(next_token(logits, how, generator)[0])
        yield tok
        if (stop is not None and tok == stop) or i == max_new_tokens - 1:
            return  # (no forward for a token that will not be asked for)
        tokens.append(tok)
        if cache.length == limit:  # full: slide the window (module docstring)
            tokens = tokens[-(limit // 2) :]
            cache = KVCache(model, 1)
            logits = model(torch.tensor([tokens], device=device), cache=cache).logits[:, -1]
        else:
            logits = model(torch.tensor([[tok]], device=device), cache=cache).logits[:, -1]


class TextStream:
    """Token ids in, text out as soon as it is whole: a multi-byte character split over
    tokens is held back until its last byte arrives."""

    def __init__(self, decode):
        self.decode = decode
        self.ids: list[int] = []
        self.shown = 0  # characters already returned

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete character so far
            return ""
        new, self.shown = text[self.shown :], len(text)
        return new

    def flush(self) -> str:
        text = self.decode(self.ids)
        new, self.shown = text[self.shown :], len(text)
        return new
