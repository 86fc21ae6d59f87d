"""Atomic file writes: temporary name in the same directory, fsync, rename."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: Path) -> Path:
    """A unique temporary name beside `path` that no reader treats as final (`.tmp-` prefix)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.fchmod(fd, file_mode())  # mkstemp makes 0600; outputs on a shared root must be readable
    os.close(fd)
    return Path(name)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import (os.umask is process-wide: toggling it later would race with writer threads).
_UMASK = _read_umask()


def umask() -> int:
    """The process umask, as new files should honour it."""
    return _UMASK


def file_mode() -> int:
    """The mode of an ordinary new file under the process umask (0644 under umask 022)."""
    return 0o666 & ~_UMASK


def commit(tmp: Path, final: Path) -> None:
    """fsync `tmp`, rename it to `final` and fsync the directory, so `final` is whole or absent.

    `final` gets an ordinary file's mode (`file_mode()`), whatever wrote `tmp`: a library that
    replaced the temporary with its own (safetensors writes 0600 files) must not leave it private.
    """
    with open(tmp, "rb+") as f:
        os.fchmod(f.fileno(), file_mode())
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(Path(final).parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes `path`, on error it is removed."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(final)
    try:
        yield tmp
        commit(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a file for writing that appears under `path` only if the block succeeds."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open only writes; got mode {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); JSON files must be UTF-8") from None
    except RecursionError:  # thousands of nested arrays/objects exhaust the parser's recursion
        raise ValueError(f"{path}: invalid JSON: nested too deeply (arrays/objects inside each other beyond "
                         f"Python's recursion limit of about {sys.getrecursionlimit()} levels)") from None
    except ValueError as e:  # json's own limits (an integer of over 4300 digits) name no file
        raise ValueError(f"{path}: invalid JSON: {e}") from None


def remove_stale_temporaries(directory: str | os.PathLike, name: str = "") -> int:
    """Delete temporaries of `name` (all when empty) left by killed writers; returns the count.

    Call it only while holding the lock that covers those files.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    n = 0
    for p in directory.glob(f".tmp-{name}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def remove_temporaries_of(path: str | os.PathLike, *, min_age: float = 0.0) -> int:
    """Delete the temporaries killed writers of `path` left beside it; returns the count.

    Only `.tmp-<name>.<8 characters>` entries (files from `temporary_path`, directories from
    `mkdtemp` with the same prefix) untouched for `min_age` seconds go: never those of another
    file whose name merely starts with `name`. Call it only while holding the lock that covers `path`
    (`min_age` spares a writer that works without that lock and takes milliseconds).
    """
    import re
    import shutil
    import time

    path = Path(path)
    if not path.parent.is_dir():
        return 0
    pattern = re.compile(rf"^\.tmp-{re.escape(path.name)}\.[a-z0-9_]{{8}}$")
    now, n = time.time(), 0
    for p in path.parent.iterdir():
        if not pattern.match(p.name):
            continue
        try:
            if now - p.lstat().st_mtime < min_age:
                continue
        except FileNotFoundError:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n
