"""An exclusive lock per stage (or shard) directory, naming its holder."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any


class LockHeld(RuntimeError):
    """Another process holds the lock (`path`: the lock file, `holder`: who, in words)."""

    def __init__(self, message: str, path: Path | None = None, holder: str = "") -> None:
        super().__init__(message)
        self.path, self.holder = path, holder


class FileLock:
    """An advisory exclusive lock on `path` (fcntl.flock), released on exit or process death.

    The holder (pid, host, start time, command) is written into the lock file so a second
    process can say who holds it. `timeout=0` fails fast; `timeout=None` waits forever.
    """

    def __init__(self, path: str | os.PathLike, timeout: float | None = 0.0, poll: float = 0.2) -> None:
        self.path = Path(path)
        self.timeout, self.poll = timeout, poll
        self._fd: int | None = None

    def holder(self) -> dict[str, Any]:
        """What the lock file says about its holder; {} when it says nothing readable (it lies in a shared root:
        not UTF-8, a list, 10^5 nested arrays were tracebacks where the holder was named)."""
        try:
            h = json.loads(self.path.read_bytes() or b"{}")
        except (OSError, ValueError, RecursionError):
            return {}
        return h if isinstance(h, dict) else {}

    def describe_holder(self) -> str:
        h = self.holder()
        if not h:
            return "an unknown process"
        started = h.get("started")
        since = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
                 if isinstance(started, int | float) and 0 < started < 1e11 else "?")
        return f"pid {str(h.get('pid'))[:20]} on {str(h.get('host'))[:100]} since {since} ({str(h.get('command', '?'))[:300]})"

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    holder = self.describe_holder()
                    raise LockHeld(
                        f"{self.path.parent} is locked by {holder}. Wait for it to finish, "
                        f"or stop that process; the lock is released automatically when it exits.",
                        path=self.path, holder=holder) from None
                time.sleep(self.poll)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
