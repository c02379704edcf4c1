"""Tests for moe.training.data: corpus discovery, splits, tokenizers, the token cache and batches."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from moe.config import ConfigError, DataConfig
from moe.training import data as D
from moe.training.data import TokenData, Tokenizer, load_data, split_by_file, stdlib_files

UNICODE = "héllo wörld — 日本語 🙂\n\tdef f(x):\r\n    return x ** 2  # ∑ <|endoftext|> \x7f\n"


def _cfg(tmp_path: Path, path: Path | str = "", **kw) -> DataConfig:
    kw.setdefault("tokenizer", "byte")
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def _corpus(root: Path, n: int = 12) -> dict[str, str]:
    """n small text files in nested folders; returns relative path -> text."""
    texts = {}
    for i in range(n):
        rel = f"d{i % 3}/sub/f{i:02d}.txt" if i % 2 else f"f{i:02d}.py"
        body = "".join(f"line {j} of file {i}: value = {i * j} # ünïcode {'x' * (j % 5)}\n" for j in range(40))
        texts[rel] = body
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(body, encoding="utf-8")
    return texts


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------------------------
# the default corpus


def test_stdlib_files_and_split_by_file():
    files = stdlib_files()
    assert len(files) > 100
    assert all(f.suffix == ".py" for f in files)
    assert not any(part in ("site-packages", "dist-packages") for f in files for part in f.parts)
    assert files == stdlib_files()
    root = D.stdlib_root()
    rels = [f.relative_to(root).as_posix() for f in files]
    assert rels == sorted(rels)
    train, val = split_by_file(rels, 0.05)
    assert (train, val) == split_by_file(rels, 0.05)
    assert val and train and not set(train) & set(val)
    assert set(train) | set(val) == set(rels)
    assert 0.01 < len(val) / len(rels) < 0.15
    # adding files never moves an existing file across the split
    _, val_more = split_by_file(rels + ["zz_new.py"], 0.05)
    assert set(val) <= set(val_more)


def test_split_by_file_keeps_both_sides_non_empty():
    assert split_by_file(["a", "b"], 1e-9)[1]  # nothing hashes that low: one file is moved to val
    train, val = split_by_file(["a", "b", "c"], 0.999999)
    assert train and val


def test_stdlib_corpus_loads_and_val_is_the_val_files(tmp_path):
    d = load_data(_cfg(tmp_path, max_files=30), progress=False)
    m = d.meta
    assert m["source"] == "stdlib" and m["n_files_found"] > 30
    assert m["n_files"] + m["skipped"] == 30
    assert m["n_train_files"] + m["n_val_files"] == m["n_files"] and m["n_val_files"] >= 1
    assert m["n_train_tokens"] == len(d.train) > 0 and m["n_val_tokens"] == len(d.val) > 0
    # byte tokens: val is exactly the val files, each followed by the NUL separator
    root = D.stdlib_root()
    expected = "".join((root / r).read_text(encoding="utf-8-sig") + "\0" for r in m["val_files"])
    assert d.decode(d.val) == expected


def test_default_corpus_skips_bad_files_and_environments_even_with_error(tmp_path, monkeypatch):
    fake = tmp_path / "stdlib"
    (fake / "pkg").mkdir(parents=True)
    (fake / "site-packages" / "x").mkdir(parents=True)
    (fake / "env" / "lib").mkdir(parents=True)
    (fake / "env" / "pyvenv.cfg").write_text("home = /usr\n")
    for i in range(4):
        (fake / f"m{i}.py").write_text(f"x = {i}\n" * 20)
    (fake / "pkg" / "__init__.py").write_text("")
    (fake / "pkg" / "latin1.py").write_bytes(b"s = '\xe9t\xe9'\n")
    (fake / "site-packages" / "x" / "inst.py").write_text("installed = 1\n")
    (fake / "env" / "lib" / "venv_mod.py").write_text("in_venv = 1\n")
    (fake / "notes.txt").write_text("not python\n")
    monkeypatch.setattr(D, "stdlib_root", lambda: fake)

    rels = [p.relative_to(fake).as_posix() for p in stdlib_files()]
    assert rels == ["m0.py", "m1.py", "m2.py", "m3.py", "pkg/__init__.py", "pkg/latin1.py"]
    d = load_data(_cfg(tmp_path, on_bad_file="error"), progress=False)
    assert d.meta["n_files"] == 4 and d.meta["skipped"] == 2
    assert d.meta["skipped_reasons"] == {"empty": 1, "not_utf8": 1}
    assert ["pkg/latin1.py", "is not valid UTF-8 (byte 0xe9 at offset 5)"] in d.meta["skipped_files"]


# ---------------------------------------------------------------------------------------------
# tokenizers


def test_byte_tokenizer_round_trip():
    tok = Tokenizer.byte()
    ids = tok.encode(UNICODE)
    assert tok.vocab_size == 256 and max(ids) < 256 and len(ids) == len(UNICODE.encode())
    assert tok.decode(ids) == UNICODE
    assert tok.decode(torch.tensor(ids)) == UNICODE
    assert tok.encode_batch([UNICODE, "a"]) == [ids, [97]]


def test_bpe_tokenizer_round_trip_and_literal_eot(tmp_path):
    texts = list(_corpus(tmp_path).values())
    tok = Tokenizer.train_bpe(texts, 300)
    assert tok.vocab_size == 300 and tok.eot_id == 0
    ids = tok.encode(UNICODE)
    assert len(ids) < len(UNICODE.encode())  # merges were learned and used
    assert tok.decode(ids) == UNICODE
    assert tok.encode_batch([UNICODE]) == [ids]
    assert tok.eot_id not in ids  # "<|endoftext|>" inside data is text, not a document boundary
    tok.save(tmp_path / "tok.json")
    again = Tokenizer.load(tmp_path / "tok.json")
    assert again.encode(UNICODE) == ids and again.decode(ids) == UNICODE


# ---------------------------------------------------------------------------------------------
# user data


def test_folder_bpe_build_splits_by_file_and_decodes(tmp_path):
    texts = _corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "skip.csv").write_text("a,b\n")
    (tmp_path / "corpus" / ".hidden").mkdir()
    (tmp_path / "corpus" / ".hidden" / "h.txt").write_text("hidden\n")
    d = load_data(_cfg(tmp_path, tmp_path / "corpus", tokenizer="bpe", vocab_size=300), progress=False)
    m = d.meta
    assert m["source"] == "folder" and m["split"] == "file" and m["n_files"] == len(texts)
    assert d.vocab_size == 300 and d.train.dtype == np.uint16 and isinstance(d.train, np.memmap)
    assert int(d.train.max()) < d.vocab_size
    assert set(m["val_files"]) < set(texts)
    # val decodes to its files joined by end-of-text; train holds exactly the other files
    assert d.decode(d.val) == "".join(texts[r] + "<|endoftext|>" for r in m["val_files"])
    assert int((np.asarray(d.train) == d.tokenizer.eot_id).sum()) == len(texts) - len(m["val_files"])


def test_single_text_file_splits_by_position(tmp_path):
    text = "".join(f"row {i} — ok\n" for i in range(500))
    f = tmp_path / "one.txt"
    f.write_text(text, encoding="utf-8")
    d = load_data(_cfg(tmp_path, f, val_fraction=0.1), progress=False)
    head, tail = d.decode(d.train), d.decode(d.val)
    assert head.endswith("\0") and tail.endswith("\0")
    assert head[:-1] + tail[:-1] == text
    assert 0.05 < len(tail) / len(text) < 0.15 and tail.startswith("row ")  # cut at a line start
    assert d.meta["split"] == "position"


def test_max_files_limits_deterministically(tmp_path):
    _corpus(tmp_path / "c", n=6)
    a = load_data(_cfg(tmp_path, tmp_path / "c", max_files=3), progress=False)
    b = load_data(_cfg(tmp_path, tmp_path / "c", max_files=3), progress=False)
    assert a.meta["n_files"] == 3 and a.meta["n_files_found"] == 6
    assert a.meta["val_files"] == b.meta["val_files"] and np.array_equal(a.train, b.train)


def test_non_utf8_file_error_and_skip(tmp_path):
    _corpus(tmp_path / "c", n=4)
    bad = tmp_path / "c" / "bad.txt"
    bad.write_bytes(b"hello\n" + b"\xff\xfe oops\n")
    with pytest.raises(ConfigError) as e:
        load_data(_cfg(tmp_path, tmp_path / "c"), progress=False)
    msg = str(e.value)
    assert str(bad) in msg and "0xff at offset 6" in msg and "on_bad_file=skip" in msg and "\n" not in msg
    d = load_data(_cfg(tmp_path, tmp_path / "c", on_bad_file="skip"), progress=False)
    assert d.meta["skipped"] == 1 and d.meta["n_files"] == 4
    assert d.meta["skipped_files"] == [["bad.txt", "is not valid UTF-8 (byte 0xff at offset 6)"]]


def test_empty_file_error_and_skip(tmp_path):
    _corpus(tmp_path / "c", n=3)
    empty = tmp_path / "c" / "empty.md"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.md is empty"):
        load_data(_cfg(tmp_path, tmp_path / "c"), progress=False)
    d = load_data(_cfg(tmp_path, tmp_path / "c", on_bad_file="skip"), progress=False)
    assert d.meta["skipped"] == 1 and d.meta["skipped_reasons"] == {"empty": 1}


def test_nothing_usable_and_no_matching_files(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_bytes(b"\xff")
    (tmp_path / "c" / "b.txt").write_text("")
    with pytest.raises(ConfigError, match="nothing usable"):
        load_data(_cfg(tmp_path, tmp_path / "c", on_bad_file="skip"), progress=False)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("1,2\n")
    with pytest.raises(ConfigError) as e:
        load_data(_cfg(tmp_path, tmp_path / "d", extensions=[".txt", ".md"]), progress=False)
    assert str(tmp_path / "d") in str(e.value) and ".txt, .md" in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_data(_cfg(tmp_path, tmp_path / "missing"), progress=False)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_round_trip_and_sidecar(tmp_path, dtype):
    ids = (np.arange(1000) * 7 % 70001 % (65536 if dtype == "uint16" else 70001)).astype(dtype)
    f = tmp_path / "tokens.bin"
    ids.tofile(f)
    d = load_data(_cfg(tmp_path, f, bin_dtype=dtype, val_fraction=0.1), progress=False)
    assert d.tokenizer is None and d.meta["source"] == "bin"
    assert np.array_equal(np.concatenate([d.train, d.val]), ids) and len(d.val) == 100
    assert d.vocab_size == int(ids.max()) + 1
    assert d.decode([3, 4]) == "3 4"
    x, y = d.get_batch("train", 0, 2, 8, seed=0)
    assert torch.equal(x[:, 1:], y[:, :-1])
    (tmp_path / "tokens.bin.json").write_text('{"vocab_size": 80000}')
    assert load_data(_cfg(tmp_path, f, bin_dtype=dtype), progress=False).vocab_size == 80000
    (tmp_path / "tokens.bin.json").write_text('{"vocab_size": 5}')
    with pytest.raises(ConfigError, match="vocab_size=5"):
        load_data(_cfg(tmp_path, f, bin_dtype=dtype), progress=False)


def test_bin_with_wrong_size_is_an_error(tmp_path):
    f = tmp_path / "odd.bin"
    f.write_bytes(b"\x01\x00\x02")
    with pytest.raises(ConfigError, match="bin_dtype"):
        load_data(_cfg(tmp_path, f), progress=False)


# ---------------------------------------------------------------------------------------------
# the cache


def test_cache_is_reused_and_keyed_by_vocab(tmp_path):
    _corpus(tmp_path / "c")
    cfg = _cfg(tmp_path, tmp_path / "c", tokenizer="bpe", vocab_size=300)
    a = load_data(cfg, progress=False)
    train_bin = Path(a.meta["train_path"])
    mtime = train_bin.stat().st_mtime_ns
    b = load_data(cfg, progress=False)
    assert not a.meta["from_cache"] and b.meta["from_cache"]
    assert train_bin.stat().st_mtime_ns == mtime
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert b.tokenizer.encode(UNICODE) == a.tokenizer.encode(UNICODE)
    c = load_data(_cfg(tmp_path, tmp_path / "c", tokenizer="bpe", vocab_size=320), progress=False)
    assert c.meta["cache_dir"] != a.meta["cache_dir"] and not c.meta["from_cache"]
    # editing a file changes its size/mtime, hence the key
    f = tmp_path / "c" / "f00.py"
    f.write_text(f.read_text() + "more = 1\n")
    assert load_data(cfg, progress=False).meta["cache_dir"] != a.meta["cache_dir"]


def test_missing_meta_json_rebuilds_identically(tmp_path):
    _corpus(tmp_path / "c")
    cfg = _cfg(tmp_path, tmp_path / "c", tokenizer="bpe", vocab_size=300)
    a = load_data(cfg, progress=False)
    train, val = np.array(a.train), np.array(a.val)
    os.remove(Path(a.meta["cache_dir"]) / "meta.json")  # as if the build died before its last write
    b = load_data(cfg, progress=False)
    assert not b.meta["from_cache"]
    assert np.array_equal(b.train, train) and np.array_equal(b.val, val)
    assert load_data(cfg, progress=False).meta["from_cache"]


def test_truncated_tokens_rebuild(tmp_path):
    _corpus(tmp_path / "c")
    cfg = _cfg(tmp_path, tmp_path / "c")
    a = load_data(cfg, progress=False)
    train = np.array(a.train)
    with open(a.meta["train_path"], "r+b") as f:
        f.truncate(10)
    b = load_data(cfg, progress=False)
    assert not b.meta["from_cache"] and np.array_equal(b.train, train)


def test_leftover_temp_folder_from_dead_builder_is_reaped(tmp_path):
    _corpus(tmp_path / "c")
    cfg = _cfg(tmp_path, tmp_path / "c")
    final = Path(load_data(cfg, progress=False).meta["cache_dir"])
    train = np.array(load_data(cfg, progress=False).train)
    shutil.rmtree(final)
    stale = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{_dead_pid()}-deadbeef")
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\x00" * 7)  # half-written
    d = load_data(cfg, progress=False)
    assert not stale.exists() and not d.meta["from_cache"]
    assert np.array_equal(d.train, train)
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_concurrent_builders_agree(tmp_path):
    _corpus(tmp_path / "c")
    cfg = _cfg(tmp_path, tmp_path / "c")
    out: list[TokenData | BaseException] = []

    def run():
        try:
            out.append(load_data(cfg, progress=False))
        except BaseException as e:  # noqa: BLE001 - reported below
            out.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(d, TokenData) for d in out), out
    assert all(np.array_equal(d.train, out[0].train) for d in out)
    assert [p.name for p in Path(out[0].meta["cache_dir"]).parent.iterdir()] == [Path(out[0].meta["cache_dir"]).name]


# ---------------------------------------------------------------------------------------------
# batches


def test_get_batch_is_deterministic_shifted_and_from_the_data(tmp_path):
    _corpus(tmp_path / "c")
    d = load_data(_cfg(tmp_path, tmp_path / "c"), progress=False)
    x, y = d.get_batch("train", 5, batch_size=4, seq_len=32, seed=1)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, y2 = d.get_batch("train", 5, batch_size=4, seq_len=32, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, d.get_batch("train", 6, 4, 32, seed=1)[0])
    assert not torch.equal(x, d.get_batch("train", 5, 4, 32, seed=2)[0])
    # every row is a window of the train tokens
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(d.train, dtype=np.int64), 33)
    for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
        assert (windows == row).all(axis=1).any()
    xv, _ = d.get_batch("val", 5, 4, 8, seed=1)
    assert int(xv.max()) < 256


def test_get_batch_too_short_split_is_a_clear_error(tmp_path):
    _corpus(tmp_path / "c")
    d = load_data(_cfg(tmp_path, tmp_path / "c"), progress=False)
    with pytest.raises(ValueError, match=r"the val split has \d+ tokens, fewer than seq_len\+1"):
        d.get_batch("val", 0, 2, len(d.val), seed=0)
    with pytest.raises(ValueError, match="split must be"):
        d.get_batch("test", 0, 2, 8, seed=0)
