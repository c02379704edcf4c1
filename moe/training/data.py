"""Token data: a corpus on disk -> a tokenizer and two memory-mapped arrays of token ids.

Sources (``DataConfig.path``):

* ``""`` - the default corpus: the running Python's own standard library ``.py`` files
  (``sysconfig.get_paths()["stdlib"]`` without ``site-packages``/``dist-packages``, bytecode
  caches or any virtualenv).  It ships with every Python, so the default run needs no download.
  Its test suite deliberately contains non-UTF-8 and empty files; those are always skipped and
  counted, whatever ``on_bad_file`` says.
* a folder - every file below it (recursively) whose suffix is in ``data.extensions``; hidden
  files and folders (``.git``, ``.venv``, ...) are left out.
* a text file - one document, split by position (its last ``val_fraction`` goes to val).
* a ``.bin`` - raw token ids of ``data.bin_dtype``, used as is (no cache, no tokenizer); the last
  ``val_fraction`` of the tokens is val.  ``vocab_size`` is ``max id + 1`` unless a sidecar
  ``<name>.bin.json`` holding ``{"vocab_size": N}`` says otherwise.

Several files are split train/val *by file*: a file is val when the sha1 of its relative path,
read as a fraction in [0, 1), is below ``val_fraction`` (so the split does not move when files are
added).  If that leaves either side empty, one file is moved over.  A folder with a single usable
file is split by position like a text file.

Tokenizers: ``bpe`` is a byte-level BPE (HuggingFace ``tokenizers``) trained on the train split
only, with ``<|endoftext|>`` (id 0) reserved; ``byte`` is raw UTF-8 bytes (256 ids) and uses the
NUL byte (id 0) as its end-of-text separator - files containing NUL are rejected as binary, so
the separator is unambiguous.  Every document (file) is followed by the end-of-text id.

Cache: ``<cache root>/data/<source>-<tokenizer><vocab>-<key>/`` with ``train.bin``, ``val.bin``
(uint16 when the vocabulary fits, else uint32), ``tokenizer.json`` (BPE) and ``meta.json``.  The
key hashes the file list (paths, sizes, mtimes) and every setting that changes the tokens.  A
build happens in a private temporary folder (named by host and pid) that is renamed into place
when complete, and ``meta.json`` is written last: a cache folder without a valid ``meta.json``
is never trusted, so a crashed or concurrent build cannot leave half-written tokens behind.

Batches are a pure function of ``(split, index, seed)``, so resuming at step ``s`` replays
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe.config import ConfigError, DataConfig
from moe.training.files import pid_alive, user_cache_dir, write_text_atomic

FORMAT_VERSION = 1  # bump when the cache layout or the tokenization changes
EOT_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"  # a BPE run's tokenizer, in its run directory (and the cache's)
_CHUNK_CHARS = 1 << 20  # long texts are encoded in ~1 MB pieces so encode_batch can parallelise
_BATCH_CHARS = 8 << 20  # text handed to one encode_batch call
_MAX_LISTED_SKIPS = 100  # meta.json lists at most this many skipped files (the count is exact)
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


# ---------------------------------------------------------------------------------------------
# tokenizer


class Tokenizer:
    """Encode/decode for both tokenizer kinds.  ``eot_id`` separates documents."""

    def __init__(self, kind: str, hf: Any = None):
        if kind not in ("bpe", "byte"):
            raise ValueError(f"unknown tokenizer kind {kind!r}; use bpe or byte")
        if kind == "bpe" and hf is None:
            raise ValueError("a bpe Tokenizer needs a trained tokenizers.Tokenizer")
        self.kind = kind
        self._hf = hf
        if hf is not None:
            eot = hf.token_to_id(EOT_TOKEN)
            if eot is None:
                raise ValueError(f"the BPE tokenizer has no {EOT_TOKEN} token")
            # text is encoded literally: a "<|endoftext|>" inside a file (or a prompt) is text, not a
            # document boundary; the boundary id is only ever inserted by the pipeline itself
            if hasattr(hf, "encode_special_tokens"):  # tokenizers >= 0.15.1
                hf.encode_special_tokens = True
            self.eot_id = int(eot)
            self.vocab_size = int(hf.get_vocab_size(with_added_tokens=True))
        else:
            self.eot_id = 0
            self.vocab_size = 256

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"

    @classmethod
    def byte(cls) -> Tokenizer:
        return cls("byte")

    @classmethod
    def train_bpe(
        cls, texts: Iterable[str], vocab_size: int, *, length: int | None = None, progress: bool = False
    ) -> Tokenizer:
        """Byte-level BPE: every byte is in the alphabet, so any text round-trips exactly."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )
        hf.train_from_iterator(texts, trainer=trainer, length=length)
        return cls("bpe", hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls("bpe", HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_json())

    def to_json(self) -> str:
        """The BPE tokenizer as ``tokenizers``' JSON (what :meth:`load` reads)."""
        if self._hf is None:
            raise ValueError("the byte tokenizer has nothing to save")
        return self._hf.to_str()

    def encode(self, text: str) -> list[int]:
        if self._hf is None:
            return list(text.encode("utf-8"))
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._hf is None:
            return [list(t.encode("utf-8")) for t in texts]
        # encode_batch_fast skips offset tracking (tokenizers >= 0.20)
        fast = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return [e.ids for e in fast(list(texts), add_special_tokens=False)]

    def _encode_array(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Like encode_batch but straight to int64 arrays (no Python int lists for bytes)."""
        if self._hf is None:
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Any) -> str:
        ids = _as_int_list(ids)
        if self._hf is None:
            # a model may be built wider than 256; ids outside the byte range have no text
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self._hf.decode(ids, skip_special_tokens=False)


def _as_int_list(ids: Any) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return [int(i) for i in ids.reshape(-1).tolist()]
    if isinstance(ids, np.ndarray):
        return [int(i) for i in ids.reshape(-1).tolist()]
    return [int(i) for i in ids]


# ---------------------------------------------------------------------------------------------
# token data


@dataclass(eq=False)
class TokenData:
    """The two splits as memory-mapped 1-D arrays of token ids, plus how to read them."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer: Tokenizer | None
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"TokenData(source={self.meta.get('source')!r}, train={len(self.train)} tokens, "
            f"val={len(self.val)} tokens, vocab_size={self.vocab_size}, tokenizer={self.tokenizer!r})"
        )

    def get_batch(
        self,
        split: str,
        index: int,
        batch_size: int,
        seq_len: int,
        seed: int,
        device: Any = None,
        *,
        shard: int = 0,
        num_shards: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of ``split``: (x, y) int64 of shape (batch_size, seq_len), y = x shifted by one.

        Offsets are drawn from a generator seeded by (seed, split, index) alone, so the batch at a
        given step is the same however the run got there (fresh, resumed, other batch order).

        ``num_shards > 1``: batch ``index`` is ``batch_size * num_shards`` sequences and this
        call returns rows ``[shard * batch_size, (shard + 1) * batch_size)`` of it: the shards
        of one index, put side by side, are exactly ``get_batch(..., batch_size * num_shards)``.
        The trainer gives each (data-parallel rank, micro-batch) one shard of the step's batch.
        """
        if split not in ("train", "val"):
            raise ValueError(f"get_batch: split must be 'train' or 'val', got {split!r}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"get_batch: batch_size={batch_size} and seq_len={seq_len} must be >= 1")
        if not 0 <= shard < num_shards:
            raise ValueError(f"get_batch: shard={shard} must be in [0, num_shards={num_shards})")
        arr = self.train if split == "train" else self.val
        n = len(arr)
        if n < seq_len + 1:
            more = "raise data.val_fraction or add data" if split == "val" else "add data"
            raise ValueError(
                f"get_batch: the {split} split has {n} tokens, fewer than seq_len+1={seq_len + 1}; "
                f"lower model.seq_len or {more}"
            )
        g = torch.Generator().manual_seed(_batch_seed(seed, split, index))
        starts = torch.randint(0, n - seq_len, (batch_size * num_shards,), generator=g).numpy()
        starts = starts[shard * batch_size : (shard + 1) * batch_size]
        idx = starts[:, None] + np.arange(seq_len + 1)
        buf = torch.from_numpy(np.asarray(arr[idx]).astype(np.int64))
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        if device is not None:
            device = torch.device(device)
            if device.type == "cuda":
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x, y

    def decode(self, ids: Any) -> str:
        """Text for ``ids``; a pre-tokenized .bin has no tokenizer, so its ids are shown as numbers."""
        if self.tokenizer is None:
            return " ".join(str(i) for i in _as_int_list(ids))
        return self.tokenizer.decode(ids)


def _batch_seed(seed: int, split: str, index: int) -> int:
    # a hash, not seed + index: nearby (seed, index) pairs must not share offsets
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------
# sources: which files, and how they split


@dataclass
class _Source:
    kind: str  # stdlib | folder | file
    root: Path  # the folder (stdlib, folder) or the file itself
    files: list[Path]  # after max_files
    n_found: int  # before max_files
    skip_bad: bool


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The default corpus: the standard library's ``.py`` files, sorted by relative path."""
    return walk_files(stdlib_root(), (".py",), skip_hidden=False, skip_envs=True)


def walk_files(root: Path, extensions: Sequence[str] | None, *, skip_hidden: bool, skip_envs: bool) -> list[Path]:
    """Files below ``root`` with one of ``extensions`` (None: every file), sorted by relative
    path; installed packages and bytecode caches left out (hidden files and virtualenvs too
    when asked)."""
    exts = None if extensions is None else {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune in place so os.walk never descends into installed packages or environments
        keep = []
        for d in dirnames:
            if d in SKIPPED_DIRS or (skip_hidden and d.startswith(".")):
                continue
            if skip_envs and os.path.exists(os.path.join(dirpath, d, "pyvenv.cfg")):
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            if skip_hidden and name.startswith("."):
                continue
            if exts is None or os.path.splitext(name)[1].lower() in exts:
                p = Path(dirpath) / name
                found.append((p.relative_to(root).as_posix(), p))
    found.sort(key=lambda t: t[0])  # os.walk order depends on the file system
    return [p for _, p in found]


def _hash_fraction(rel: str) -> float:
    # surrogateescape: undecodable file names (bytes on POSIX) still hash, deterministically
    return int.from_bytes(hashlib.sha1(rel.encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2.0**64


def split_by_file(rels: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/val split of relative paths; both sides non-empty when len(rels) >= 2."""
    h = {r: _hash_fraction(r) for r in rels}
    val = {r for r in rels if h[r] < val_fraction}
    if len(rels) >= 2:
        if not val:
            val = {min(rels, key=lambda r: (h[r], r))}
        elif len(val) == len(rels):
            val.discard(max(rels, key=lambda r: (h[r], r)))
    return [r for r in rels if r not in val], [r for r in rels if r in val]


def _position_cut(text: str, val_fraction: float) -> int:
    """Where a single document splits: the last ``val_fraction`` is val, cut at a line start if possible."""
    n = len(text)
    if n < 2:
        return n
    cut = min(max(int(n * (1.0 - val_fraction)), 1), n - 1)
    line_start = text.rfind("\n", 0, cut) + 1
    return line_start if line_start > 0 and line_start >= cut - 4096 else cut


def _resolve_source(cfg: DataConfig) -> _Source:
    if not cfg.path:
        files = stdlib_files()
        n_found = len(files)
        if cfg.max_files > 0:
            files = files[: cfg.max_files]
        return _Source("stdlib", stdlib_root(), files, n_found, skip_bad=True)
    p = Path(cfg.path).expanduser()
    if not p.exists():
        raise ConfigError(
            f"data.path={cfg.path!r} does not exist; point it at a text file, a folder of text "
            "files or a .bin of token ids (empty: the standard-library corpus)"
        )
    p = p.resolve()
    skip = cfg.on_bad_file == "skip"
    if p.is_file():
        return _Source("file", p, [p], 1, skip_bad=skip)
    files = walk_files(p, cfg.extensions, skip_hidden=True, skip_envs=False)
    if not files:
        raise ConfigError(
            f"data: no files with extensions {', '.join(cfg.extensions)} under {p}; add files or "
            "set data.extensions (e.g. data.extensions=[.txt])"
        )
    n_found = len(files)
    if cfg.max_files > 0:
        files = files[: cfg.max_files]
    return _Source("folder", p, files, n_found, skip_bad=skip)


def _rel(source: _Source, path: Path) -> str:
    return path.name if source.kind == "file" else path.relative_to(source.root).as_posix()


# ---------------------------------------------------------------------------------------------
# reading files


def read_text_file(path: Path) -> tuple[str | None, str, str]:
    """(text, reason, fix): text is None when the file is unusable, with the reason and the fix."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        return (
            None,
            f"is unreadable ({type(e).__name__}: {e.strerror or e})",
            "fix its permissions, remove it, or set data.on_bad_file=skip",
        )
    try:
        text = raw.decode("utf-8-sig")  # a BOM is an encoding marker, not text
    except UnicodeDecodeError as e:
        bad = e.object[e.start]
        return (
            None,
            f"is not valid UTF-8 (byte 0x{bad:02x} at offset {e.start})",
            "convert it to UTF-8 (e.g. iconv -t utf-8), remove it, or set data.on_bad_file=skip",
        )
    if not text.strip():
        return None, "is empty", "remove it or set data.on_bad_file=skip"
    nul = text.find("\0")
    if nul >= 0:
        # NUL is the byte tokenizer's separator, and text files do not contain it
        return None, f"contains a NUL byte at character {nul} (binary?)", "remove it, or set data.on_bad_file=skip"
    return text, "", ""


def _reason_kind(reason: str) -> str:
    for kind, marker in (("unreadable", "unreadable"), ("not_utf8", "UTF-8"), ("empty", "empty"), ("binary", "NUL")):
        if marker in reason:
            return kind
    return "other"


def _check_files(source: _Source, progress: bool) -> tuple[list[Path], list[tuple[str, str]]]:
    """Read every file once: the usable ones, and (relative path, reason) for the rest."""
    good: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for path in _bar(source.files, progress, "data: checking files"):
        text, reason, fix = read_text_file(path)
        if text is not None:
            good.append(path)
        elif source.skip_bad:
            skipped.append((_rel(source, path), reason))
        else:
            raise ConfigError(f"data: {path} {reason}; {fix}")
    if not good:
        if not skipped:
            raise ConfigError(f"data: no files found under {source.root}; point data.path at text")
        what = "the file" if source.kind == "file" else f"{len(source.files)} files under"
        raise ConfigError(
            f"data: nothing usable in {what} {source.root} ({len(skipped)} skipped, e.g. "
            f"{skipped[0][0]} {skipped[0][1]}); point data.path at UTF-8 text"
        )
    return good, skipped


@dataclass
class _Doc:
    path: Path
    part: str = "all"  # all | head | tail (position split of a single file)
    val_fraction: float = 0.0

    def text(self) -> str:
        text, reason, fix = read_text_file(self.path)
        if text is None:  # the file changed since it was checked
            raise ConfigError(f"data: {self.path} {reason} (it changed during the build); {fix}")
        if self.part == "all":
            return text
        cut = _position_cut(text, self.val_fraction)
        return text[:cut] if self.part == "head" else text[cut:]


def _chunks(text: str) -> Iterator[str]:
    """~1 MB pieces ending at a newline where possible; decode(concat(ids)) is still the text."""
    start = 0
    while start < len(text):
        end = min(start + _CHUNK_CHARS, len(text))
        if end < len(text):
            nl = text.rfind("\n", start, end)
            if nl > start:
                end = nl + 1
        yield text[start:end]
        start = end


def _bar(it: Iterable, progress: bool, desc: str) -> Iterable:
    if not progress:
        return it
    from tqdm import tqdm  # imported on use: progress=False callers never pay for it

    return tqdm(it, desc=desc, unit="file", leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# building and opening the cache


def cache_root(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$XDG_CACHE_HOME/moe``, else ``~/.cache/moe`` (tokens go in ``data/``)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return user_cache_dir()


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _cache_dir(cfg: DataConfig, source: _Source) -> tuple[Path, str]:
    vocab = 256 if cfg.tokenizer == "byte" else cfg.vocab_size
    files = []
    for p in source.files:
        st = p.stat()
        files.append([str(p), st.st_size, st.st_mtime_ns])
    material = {
        "format": FORMAT_VERSION,
        "source": source.kind,
        "files": files,
        "tokenizer": cfg.tokenizer,
        "vocab_size": vocab,
        "val_fraction": cfg.val_fraction,
        "max_files": cfg.max_files,
        # with error, a bad file must raise, so a cache built with skip must not answer for it
        "skip_bad": source.skip_bad,
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root(cfg) / "data" / f"{source.kind}-{cfg.tokenizer}{vocab}-{key}", key


def _open_cache(path: Path, key: str) -> TokenData | None:
    """The cached TokenData, or None when the folder is missing, incomplete or from another format."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
            return None
        dtype = np.dtype(meta["dtype"])
        arrays = []
        for split in ("train", "val"):
            f = path / f"{split}.bin"
            n = int(meta[f"n_{split}_tokens"])
            if f.stat().st_size != n * dtype.itemsize:
                return None
            arrays.append(np.memmap(f, dtype=dtype, mode="r") if n else np.zeros(0, dtype))
        tok = Tokenizer.load(path / TOKENIZER_FILE) if meta["tokenizer"] == "bpe" else Tokenizer.byte()
    except Exception:  # noqa: BLE001 - any damage (missing, truncated, unparsable) means rebuild
        return None
    meta.update(cache_dir=str(path), train_path=str(path / "train.bin"), val_path=str(path / "val.bin"))
    if tok.kind == "bpe":
        meta["tokenizer_path"] = str(path / TOKENIZER_FILE)
    return TokenData(arrays[0], arrays[1], int(meta["vocab_size"]), tok, meta)


def _reap_stale(parent: Path, name: str) -> None:
    """Delete temporary build folders of ``name`` left by dead processes on this host."""
    prefix = f".{name}.tmp-{socket.gethostname()}-"
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if entry.name.startswith(prefix):
            try:
                pid = int(entry.name[len(prefix) :].split("-")[0])
            except ValueError:
                continue
            if not pid_alive(pid):
                shutil.rmtree(entry, ignore_errors=True)


def _discard(path: Path) -> None:
    """Move a damaged cache folder aside atomically, then delete it (a reader may still have it open)."""
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _write_tokens(tok: Tokenizer, docs: list[_Doc], out: Path, dtype: np.dtype, bar: Any) -> int:
    """Encode ``docs`` in batches, each followed by the end-of-text id, appending to ``out``."""
    eot = np.array([tok.eot_id], dtype=dtype)
    n = 0
    with open(out, "wb") as f:
        i = 0
        while i < len(docs):
            pieces: list[str] = []
            last_piece: list[bool] = []  # does this piece end a document?
            chars = n_docs = 0
            while i < len(docs) and (chars < _BATCH_CHARS or n_docs == 0):
                parts = list(_chunks(docs[i].text())) or [""]
                pieces += parts
                last_piece += [False] * (len(parts) - 1) + [True]
                chars += sum(len(p) for p in parts)
                n_docs += 1
                i += 1
            out_parts: list[np.ndarray] = []
            for ids, ends in zip(tok._encode_array(pieces), last_piece):
                out_parts.append(ids.astype(dtype))
                if ends:
                    out_parts.append(eot)
            block = np.concatenate(out_parts)
            block.tofile(f)
            n += len(block)
            if bar is not None:
                bar.update(n_docs)
        f.flush()
        os.fsync(f.fileno())
    return n


def _write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def _build(cfg: DataConfig, source: _Source, key: str, out: Path, progress: bool) -> None:
    """Write tokenizer, train.bin, val.bin and (last) meta.json into the empty folder ``out``."""
    t0 = time.perf_counter()
    good, skipped = _check_files(source, progress)
    if len(good) == 1:
        # one document cannot be split by file: its tail is val
        split_mode = "position"
        train_docs = [_Doc(good[0], "head", cfg.val_fraction)]
        val_docs = [_Doc(good[0], "tail", cfg.val_fraction)]
        val_rels = [_rel(source, good[0]) + " (tail)"]
    else:
        split_mode = "file"
        by_rel = {_rel(source, p): p for p in good}
        train_rels, val_rels = split_by_file(list(by_rel), cfg.val_fraction)
        train_docs = [_Doc(by_rel[r]) for r in train_rels]
        val_docs = [_Doc(by_rel[r]) for r in val_rels]

    if cfg.tokenizer == "bpe":
        texts = (c for d in train_docs for c in _chunks(d.text()))
        tok = Tokenizer.train_bpe(texts, cfg.vocab_size, length=len(train_docs), progress=progress)
        tok.save(out / TOKENIZER_FILE)
    else:
        tok = Tokenizer.byte()
    dtype = _token_dtype(tok.vocab_size)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(train_docs) + len(val_docs),
            desc=f"data: encoding {source.kind}",
            unit="file",
            leave=False,
            dynamic_ncols=True,
        )
    try:
        n_train = _write_tokens(tok, train_docs, out / "train.bin", dtype, bar)
        n_val = _write_tokens(tok, val_docs, out / "val.bin", dtype, bar)
    finally:
        if bar is not None:
            bar.close()

    reasons: dict[str, int] = {}
    for _, r in skipped:
        reasons[_reason_kind(r)] = reasons.get(_reason_kind(r), 0) + 1
    meta = {
        "format": FORMAT_VERSION,
        "key": key,
        "source": source.kind,
        "path": str(source.root),
        "python": sys.version.split()[0],
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": cfg.vocab_size if tok.kind == "bpe" else 256,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "val_fraction": cfg.val_fraction,
        "max_files": cfg.max_files,
        "split": split_mode,
        "n_files_found": source.n_found,
        "n_files": len(good),
        "n_train_files": len(train_docs),
        "n_val_files": len(val_docs),
        "val_files": val_rels,
        "skipped": len(skipped),
        "skipped_reasons": reasons,
        "skipped_files": [list(s) for s in skipped[:_MAX_LISTED_SKIPS]],
        "n_train_tokens": n_train,
        "n_val_tokens": n_val,
        "build_seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json(out / "meta.json", meta)  # last: its presence marks the folder complete


def _check_cfg(cfg: DataConfig) -> None:
    if cfg.tokenizer not in ("bpe", "byte"):
        raise ConfigError(f"data.tokenizer={cfg.tokenizer!r}; use bpe or byte")
    if cfg.tokenizer == "bpe" and not 257 <= cfg.vocab_size <= 65535:
        raise ConfigError(f"data.vocab_size={cfg.vocab_size} must be in [257, 65535] for the BPE tokenizer")
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1)")
    if cfg.on_bad_file not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_file={cfg.on_bad_file!r}; use error or skip")
    if cfg.bin_dtype not in ("uint16", "uint32"):
        raise ConfigError(f"data.bin_dtype={cfg.bin_dtype!r}; use uint16 or uint32")


def _load_bin(path: Path, cfg: DataConfig) -> TokenData:
    """A pre-tokenized file: memory-mapped in place, its last val_fraction is val."""
    dtype = np.dtype(cfg.bin_dtype)
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(f"data: {path} is empty; point data.path at a .bin of token ids")
    if size % dtype.itemsize:
        raise ConfigError(f"data: {path} is {size} bytes, not a whole number of {dtype.name} ids; check data.bin_dtype")
    n = size // dtype.itemsize
    if n < 2:
        raise ConfigError(f"data: {path} holds {n} token; a train and a val split need at least 2")
    ids = np.memmap(path, dtype=dtype, mode="r")
    cut = min(max(n - int(round(n * cfg.val_fraction)), 1), n - 1)
    max_id = max(int(ids[i : i + (1 << 24)].max()) for i in range(0, n, 1 << 24))
    vocab_size, vocab_from = max_id + 1, "max id + 1"
    sidecar = path.with_name(path.name + ".json")
    if sidecar.exists():
        try:
            vocab_size = int(json.loads(sidecar.read_text(encoding="utf-8"))["vocab_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f'data: {sidecar} must be JSON like {{"vocab_size": 50257}} ({e}); fix or delete it'
            ) from e
        vocab_from = str(sidecar)
        if vocab_size <= max_id:
            raise ConfigError(
                f"data: {sidecar} says vocab_size={vocab_size} but {path} holds id {max_id}; fix the "
                "sidecar or data.bin_dtype"
            )
    meta = {
        "format": FORMAT_VERSION,
        "source": "bin",
        "path": str(path),
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "vocab_size_from": vocab_from,
        "val_fraction": cfg.val_fraction,
        "split": "position",
        "n_files": 1,
        "skipped": 0,
        "n_train_tokens": cut,
        "n_val_tokens": n - cut,
        "from_cache": False,
    }
    return TokenData(ids[:cut], ids[cut:], vocab_size, None, meta)


def load_data(cfg: DataConfig, *, progress: bool = True) -> TokenData:
    """Tokens for ``cfg``: from the cache when it holds this exact corpus, else built once and cached."""
    _check_cfg(cfg)
    if cfg.path and Path(cfg.path).expanduser().is_file() and cfg.path.endswith(".bin"):
        return _load_bin(Path(cfg.path).expanduser().resolve(), cfg)
    source = _resolve_source(cfg)
    final, key = _cache_dir(cfg, source)
    data = _open_cache(final, key)
    if data is not None:
        data.meta["from_cache"] = True
        return data

    final.parent.mkdir(parents=True, exist_ok=True)
    _reap_stale(final.parent, final.name)
    # private build folder: concurrent builders never write into each other's files
    tmp = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _build(cfg, source, key, tmp, progress)
        for _ in range(2):
            try:
                os.rename(tmp, final)  # atomic publish; fails if a complete folder is already there
                break
            except OSError:
                if _open_cache(final, key) is not None:
                    break  # another process finished first: its tokens are the same
                _discard(final)  # damaged leftover (e.g. meta.json missing): replace it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data = _open_cache(final, key)
    if data is None:
        raise RuntimeError(f"data: the cache at {final} could not be published or read back; delete it and retry")
    data.meta["from_cache"] = False
    return data
