"""A lock without a shared file system: a lease object in an S3 bucket, created only if absent, renewed while held.

    acquire: PUT <lock key> If-None-Match: *         -> held (its ETag kept)
             the key exists, its `expires` has passed -> PUT If-Match: <that ETag>  (one taker wins)
    renew:   a thread PUTs If-Match: <our ETag> every ttl/3, moving `expires` on
    release: DELETE If-Match: <our ETag>

A holder that dies (SIGKILL, a lost host) stops renewing, and its lease expires `ttl` seconds later
(`PCM_LEASE_SECONDS`, default 30): then a waiting worker takes it over, as the fcntl lock of a local
root is released when its process exits. Expiry compares the hosts' wall clocks, so keep them in
step (NTP) to well within `ttl`. A renewal that finds the ETag changed means the lease was taken
over (the holder was stalled past its expiry): `lost` is set and the holder is logged about it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from storage.lock import LockHeld
from storage.remote import Mirror, refused_condition

log = logging.getLogger(__name__)


def lease_seconds() -> float:
    """How long a lease lives without renewal (`PCM_LEASE_SECONDS`, default 30)."""
    raw = os.environ.get("PCM_LEASE_SECONDS", "30")
    try:
        ttl = float(raw)
    except ValueError:
        raise ValueError(f"PCM_LEASE_SECONDS={raw!r}: expected a number of seconds") from None
    if ttl <= 0:
        raise ValueError(f"PCM_LEASE_SECONDS={raw!r}: must be > 0")
    return ttl


class LeaseLost(RuntimeError):
    """This worker's lease was taken over (it stalled past its expiry): what it wrote is not published."""


_HELD: dict[str, LeaseLock] = {}   # lock path -> the lease this process holds there


def confirm(path: str | os.PathLike) -> None:
    """Renew the lease this process holds at `path` now, or raise LeaseLost; nothing if it holds none there.

    Called before a unit is published, so a worker that lost its shard to another never publishes over it.
    """
    held = _HELD.get(str(Path(path)))
    if held is not None:
        held.renew()


class LeaseLock:
    """The lease at `path` (a lock file's name in a working copy of an s3:// root); FileLock's interface."""

    def __init__(self, mirror: Mirror, path: str | os.PathLike, timeout: float | None = 0.0, poll: float = 0.5,
                 ttl: float | None = None) -> None:
        if not mirror.is_s3:
            raise ValueError(f"{mirror.url}: locks on this store need conditional writes, which pcm implements for "
                             "s3:// only; use an s3:// root, or a local/shared-mount root")
        self.mirror, self.path = mirror, Path(path)
        self.timeout, self.poll = timeout, poll
        self.ttl = lease_seconds() if ttl is None else ttl
        self.bucket, self.key = mirror.fs.split_path(mirror.key(path))[:2]
        self._etag: str | None = None
        self._nonce = ""                 # this acquisition's, in the body: tells our own lease from another's
        self._started = 0.0
        self._stop = threading.Event()
        self._renewing = threading.Lock()
        self._renewer: threading.Thread | None = None
        self.lost = False

    # -- the store's conditional operations -------------------------------------------------
    def _put(self, body: dict[str, Any], **condition: str) -> str:
        r = self.mirror.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key,
                                   Body=json.dumps(body).encode(), **condition)
        return r["ETag"]

    def _get(self) -> tuple[dict[str, Any], str] | None:
        """The lease's body and ETag, read in one GET (so the two belong together); None when there is none."""
        from fsspec.asyn import sync

        fs = self.mirror.fs

        async def get() -> tuple[bytes, str]:
            r = await fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with r["Body"] as stream:
                return await stream.read(), r["ETag"]
        try:
            data, etag = sync(fs.loop, get)
        except FileNotFoundError:
            return None
        try:
            return json.loads(data or b"{}"), etag
        except json.JSONDecodeError:
            return {}, etag

    def _body(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": self._started, "nonce": self._nonce,
                "command": " ".join(sys.argv)[:300], "expires": time.time() + self.ttl}

    def _ours(self) -> str | None:
        """The lease's ETag if the store holds our own body (a write whose reply was lost did land), else None."""
        got = self._get()
        return got[1] if got is not None and got[0].get("nonce") == self._nonce else None

    # -- FileLock's interface ---------------------------------------------------------------
    def holder(self) -> dict[str, Any]:
        got = self._get()
        return got[0] if got else {}

    def describe_holder(self) -> str:
        h = self.holder()
        if not h:
            return "an unknown process"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("started", 0)))
        left = h.get("expires", 0) - time.time()
        lease = f"lease expires in {left:.0f} s" if left > 0 else "lease expired"
        return f"pid {h.get('pid')} on {h.get('host')} since {started} ({h.get('command', '?')}; {lease})"

    def _try_take(self) -> bool:
        self._nonce, self._started = uuid.uuid4().hex, time.time()
        for _ in range(3):  # a lease released between our two calls: try again at once
            try:
                self._etag = self._put(self._body(), IfNoneMatch="*")
                return True
            except Exception as e:  # noqa: BLE001 - only a refused condition means "held"
                if not refused_condition(e):
                    raise
            got = self._get()
            if got is None:
                continue
            holder, etag = got
            if holder.get("nonce") == self._nonce:  # our create landed, its reply was lost and retried
                self._etag = etag
                return True
            if holder.get("expires", 0) > time.time():
                return False
            try:  # expired: take it over, unless another worker does first
                self._etag = self._put(self._body(), IfMatch=etag)
                log.warning("took over the expired lease %s of %s", self.key,
                            f"pid {holder.get('pid')} on {holder.get('host')}")
                return True
            except Exception as e:  # noqa: BLE001
                if not refused_condition(e):
                    raise
                return False
        return False

    def acquire(self) -> LeaseLock:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while not self._try_take():
            if deadline is not None and time.monotonic() >= deadline:
                holder = self.describe_holder()
                raise LockHeld(f"{self.mirror.public(self.path.parent)} is locked by {holder}. Wait for it to "
                               "finish, or stop that process; a dead holder's lease expires by itself.",
                               path=self.path, holder=holder)
            time.sleep(self.poll)
        self.lost = False
        _HELD[str(self.path)] = self
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name=f"lease-{self.path.name}", daemon=True)
        self._renewer.start()
        return self

    def renew(self) -> None:
        """Move the expiry on now (If-Match our ETag), or raise LeaseLost if another worker has taken the lease."""
        with self._renewing:
            if self.lost:
                raise LeaseLost(f"lost the lease {self.key}: another worker took it over after it expired")
            try:
                self._etag = self._put(self._body(), IfMatch=self._etag)
            except Exception as e:  # noqa: BLE001
                if not refused_condition(e):
                    raise
                etag = self._ours()  # a renewal whose reply was lost did land: still ours
                if etag is None:
                    self.lost = True
                    log.error("lost the lease %s: another worker took it over after it expired", self.key)
                    raise LeaseLost(f"lost the lease {self.key}: another worker took it over after it "
                                    "expired") from None
                self._etag = etag

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLost:
                return
            except Exception as e:  # noqa: BLE001 - a renewal failure is logged, the work goes on
                log.warning("could not renew the lease %s (%s); retrying", self.key, e)

    def release(self) -> None:
        if self._etag is None:
            return
        _HELD.pop(str(self.path), None)
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if not self.lost:
            try:
                self.mirror.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self._etag)
            except FileNotFoundError:
                pass  # taken over and released by another worker meanwhile
            except Exception as e:  # noqa: BLE001
                if not refused_condition(e):
                    raise
        self._etag = None

    def __enter__(self) -> LeaseLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
