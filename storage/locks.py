"""Which lock guards a path: the flock (storage.lock) on a local root, a lease object (storage.lease) in a working
copy of an object-store root. Above both, so that neither imports the other."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from storage.lease import LeaseLock
from storage.lock import FileLock, LockHeld
from storage.remote import mirror_of


def lock_at(path: str | os.PathLike, timeout: float | None = 0.0) -> FileLock | Any:
    """The lock at `path`: a FileLock, or a lease object (storage.lease) in a working copy of an object-store root."""
    mirror = mirror_of(Path(path).parent)
    if mirror is None:
        return FileLock(path, timeout=timeout)
    return LeaseLock(mirror, path, timeout=timeout)


def try_lock(path: str | os.PathLike) -> FileLock | Any | None:
    """Take the lock at `path` now, or return None if another process holds it."""
    try:
        return lock_at(path, timeout=0).acquire()
    except LockHeld:
        return None
