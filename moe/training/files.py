"""Files written atomically, and the temporaries a killed writer leaves behind.

A file is written to a temporary beside it, flushed to disk, then renamed over the old one: a
reader (or a crash at any moment) sees the old file or the new one, never half of one.  The
temporary is named ``.<name>.tmp-<host>-<pid>``, so a later start can tell which leftovers are
its own kind and whose writer is gone (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP = ".tmp-"


def temporary_for(path: Path) -> Path:
    """The temporary a write of ``path`` by this process goes through."""
    return path.with_name(f".{path.name}{TMP}{socket.gethostname()}-{os.getpid()}")


def user_cache_dir() -> Path:
    """Where this package keeps what it computes once per machine: ``$XDG_CACHE_HOME/moe``, else
    ``~/.cache/moe`` (the token caches, the measured matmul peak)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "moe"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours
        return True
    return True


def _writer(name: str, stem: str | None) -> tuple[str | None, int] | None:
    """(host, pid) of the writer of temporary ``name`` (of file ``stem``; None: of any file),
    host None for the older ``.<stem>.tmp-<pid>`` form; None when the name is not one of ours."""
    if not name.startswith("."):
        return None
    target, sep, rest = name[1:].rpartition(TMP)
    if not sep or not target or (stem is not None and target != stem):
        return None
    host, _, pid = rest.rpartition("-")
    if not pid.isdigit():
        return None
    return (host or None), int(pid)


def remove_stale_temporaries(directory: Path, stem: str | None = None) -> list[Path]:
    """Delete the temporaries of ``directory/stem`` (None: of any file in ``directory``) whose
    writer is gone: written on this host by a process that no longer exists (a temporary of the
    older ``.<stem>.tmp-<pid>`` form counts as this host's).  Another host's, or a live
    process's, are left alone.  Returns what went."""
    gone = []
    if not directory.is_dir():
        return gone
    here = socket.gethostname()
    for entry in directory.iterdir():
        writer = _writer(entry.name, stem)
        if writer is None or (writer[0] not in (None, here)) or pid_alive(writer[1]):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        gone.append(entry)
    return gone


def _fsync_dir(directory: Path) -> None:
    try:  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """``write(f)`` into a temporary beside ``path``, flushed to disk, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_for(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Readers see the old text or the new, never half."""
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))
