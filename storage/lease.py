"""A lock without a shared file system: a lease object in an S3 bucket, created only if absent, renewed while held.

    acquire: PUT <lock key> If-None-Match: *         -> held (its ETag kept)
             the key exists and has expired           -> PUT If-Match: <that ETag>  (one taker wins)
    renew:   a thread PUTs If-Match: <our ETag> every ttl/3 (a new Last-Modified each time)
    release: DELETE If-Match: <our ETag>

A holder that dies (SIGKILL, a lost host) stops renewing, and its lease expires `ttl` seconds later
(`PCM_LEASE_SECONDS`, default 30): then a waiting worker takes it over, as the fcntl lock of a local
root is released when its process exits. Expiry is judged on the store's clock alone: a lease has
expired when the Date of the store's reply to a GET of it is more than ttl + 1 s (the headers'
one-second resolution) after the object's Last-Modified in that same reply (ttl: the holder's own
when its body names one in (0, 10 x ours], else ours). No host's clock and nothing else the holder
wrote enters it (its `expires` is for older pcm versions only), so a host whose clock is off
neither takes over a live lease nor keeps a dead one, and a lease object with a malformed body (not
JSON, not a dict, an absurd `expires`) expires by its age like any other; its body only names the holder. A host whose clock
differs from the store's by more than ttl/4 + 1 s is warned about once (`check_clock`).
A renewal that finds the ETag changed means the lease was taken over (the holder was stalled, or
the store unreachable, past its expiry): `lost` is set and the holder is logged about it. A lease
only saves duplicate work; correctness never depends on one (units are published whole, marker last).
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
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
    """This worker's lease was taken over (it stalled, or the store was out, past its expiry)."""


_HELD: dict[str, LeaseLock] = {}   # lock path -> the lease this process holds there
_CLOCK_CHECKED: set[str] = set()    # the buckets whose clock this process has compared with its own
RESOLUTION = 1.0                    # seconds: HTTP Date and Last-Modified name whole seconds


@dataclass(frozen=True)
class Lease:
    """A lease object as one GET of the store saw it: the holder's body, its ETag, and its age on the store's clock."""

    holder: dict[str, Any]
    etag: str
    age: float

    def ttl(self, own: float) -> float:
        """The holder's ttl (it renews every third of it) when its body names a sane one: a number in (0, 10 x
        `own`]; else `own`. So a holder with a longer lease is not taken over early, and no body can block forever."""
        theirs = self.holder.get("ttl")
        if isinstance(theirs, (int, float)) and not isinstance(theirs, bool) and 0 < theirs <= 10 * own:
            return float(theirs)
        return own

    def left(self, own: float) -> float:
        """Seconds until it expires on the store's clock (<= 0: expired): its age past ttl + the clocks' resolution."""
        return self.ttl(own) + RESOLUTION - self.age

    def expired(self, own: float) -> bool:
        return self.left(own) < 0


def _header_time(headers: dict[str, str], name: str) -> float | None:
    value = headers.get(name)
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def store_time(response: dict[str, Any]) -> float | None:
    """The store's clock when it answered (the reply's HTTP Date), or None when the reply carries none."""
    return _header_time(response.get("ResponseMetadata", {}).get("HTTPHeaders", {}), "date")


def check_clock(bucket: str, response: dict[str, Any], ttl: float) -> None:
    """Warn once per bucket when this host's clock and the store's (the reply's Date) differ by more than
    ttl/4 + 1 s. Leases never use this host's clock; the warning is for people reading its times and logs."""
    now = store_time(response)
    if now is None or bucket in _CLOCK_CHECKED:
        return
    _CLOCK_CHECKED.add(bucket)
    here = time.time()
    if abs(here - now) > ttl / 4 + RESOLUTION:
        log.warning("this host's clock (%s) is %+.0f s off the clock of the store holding %s (%s); leases are judged "
                    "on the store's clock, but keep this host in step (NTP)", _utc(here), here - now, bucket,
                    _utc(now))


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _read_holder(data: bytes) -> dict[str, Any]:
    """The holder a lease body names, or {} when it is unreadable (only names come from it, never expiry)."""
    try:
        body = json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: a body of 10^5 nested arrays
        return {}
    return body if isinstance(body, dict) else {}


def _describe(h: dict[str, Any]) -> str:
    """Who a lease body names, each field shown only when it is of the expected kind."""
    pid, host, command, started = h.get("pid"), h.get("host"), h.get("command"), h.get("started")
    if not isinstance(pid, int) or not isinstance(host, str):
        return "an unknown holder"
    text = f"pid {pid} on {host[:100]}"
    if isinstance(started, (int, float)) and 0 < started < 1e11:
        text += f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"
    return text + (f" ({command[:300]})" if isinstance(command, str) else "")


def confirm(path: str | os.PathLike) -> None:
    """Renew the lease this process holds at `path` now, or raise LeaseLost; nothing if it holds none there.

    Called before a unit is published (storage.publish), which says so when the lease was lost.
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
        check_clock(self.bucket, r, self.ttl)
        return r["ETag"]

    def _get(self) -> Lease | None:
        """The lease as one GET sees it (body, ETag, age all of one reply); None when there is none."""
        from fsspec.asyn import sync

        fs = self.mirror.fs

        async def get() -> tuple[bytes, dict[str, Any]]:
            r = await fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with r["Body"] as stream:
                return await stream.read(), r
        try:
            data, r = sync(fs.loop, get)
        except FileNotFoundError:
            return None
        check_clock(self.bucket, r, self.ttl)
        return Lease(_read_holder(data), r["ETag"], self._age(r))

    def _age(self, r: dict[str, Any]) -> float:
        modified = r.get("LastModified")
        if not isinstance(modified, datetime):
            raise RuntimeError(f"s3://{self.bucket}/{self.key}: the store gave no Last-Modified for this lease, so "
                               "its age cannot be judged; use a store that does (any S3 does)")
        now = store_time(r)
        if now is None:  # a reply without a Date (a proxy stripped it): this host's clock stands in, said once
            if self.bucket not in _CLOCK_CHECKED:
                _CLOCK_CHECKED.add(self.bucket)
                log.warning("the store holding %s sends no Date header: lease ages are judged on this host's clock",
                            self.bucket)
            now = time.time()
        return now - modified.timestamp()

    def _body(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": self._started, "nonce": self._nonce,
                "command": " ".join(sys.argv)[:300], "ttl": self.ttl,
                "expires": time.time() + self.ttl}  # read only by older pcm versions, which judge expiry by it

    def _ours(self) -> str | None:
        """The lease's ETag if the store holds our own body (a write whose reply was lost did land), else None."""
        got = self._get()
        return got.etag if got is not None and got.holder.get("nonce") == self._nonce else None

    # -- FileLock's interface ---------------------------------------------------------------
    def holder(self) -> dict[str, Any]:
        got = self._get()
        return got.holder if got else {}

    def describe_holder(self) -> str:
        got = self._get()
        if got is None:
            return "an unknown process (the lease was just released)"
        left = got.left(self.ttl)
        lease = f"lease expires in {left:.0f} s" if left > 0 else "lease expired"
        return f"{_describe(got.holder)} ({lease})"

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
            if got.holder.get("nonce") == self._nonce:  # our create landed, its reply was lost and retried
                self._etag = got.etag
                return True
            if not got.expired(self.ttl):
                return False
            try:  # expired on the store's clock: take it over, unless another worker does first
                self._etag = self._put(self._body(), IfMatch=got.etag)
                log.warning("took over the expired lease %s of %s (unrenewed for %.0f s on the store's clock)",
                            self.key, _describe(got.holder), got.age)
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
                if not (refused_condition(e) or isinstance(e, FileNotFoundError)):   # taken over, or released by its taker
                    raise
                etag = self._ours()  # a renewal whose reply was lost did land: still ours
                if etag is None:
                    self.lost = True
                    log.error("lost the lease %s: another worker took it over after it expired", self.key)
                    raise LeaseLost(f"lost the lease {self.key}: another worker took it over after it "
                                    "expired") from None
                self._etag = etag

    def _renew(self) -> None:
        wait = self.ttl / 3
        while not self._stop.wait(wait):
            try:
                self.renew()
                wait = self.ttl / 3
            except LeaseLost:
                return
            except Exception as e:  # noqa: BLE001 - a renewal failure is logged, the work goes on
                # Retry soon: the first renewal after a store outage must land before a waiter judges it expired.
                log.warning("could not renew the lease %s (%s); retrying", self.key, e)
                wait = min(1.0, self.ttl / 10)

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
