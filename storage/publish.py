"""Publication to an object-store root, built so that correctness never rests on a lease, a lock or a clock
(docs/contracts.md, "Object-store roots"); the pattern table formats use on object stores:

- Every final key is created by one conditional PUT (`If-None-Match: *`, storage.remote). A key that is
  already there holding the same bytes is this file published before (by a killed earlier run, a stalled
  or late host): nothing to do. Other bytes are an error naming both digests, since what the stages write
  is deterministic; except
  - a commit marker (a shard's `.done.json`, a stage's `stage.done.json`, which record timings): another
    host committed the unit first, and its marker is adopted (fetched over this worker's) instead;
  - a run log (`metrics.jsonl`, whose throughput differs between runs): the first writer's stays;
  - a card (`README.md`, rewritten when an evaluation adds its scores) and the files of a unit whose
    commit this process withdrew (`withdraw`, a forced rerun): replaced by an ETag-conditional write of
    the copy this worker read, so a concurrent writer's change is refused, never overwritten.
- The marker is created last, so it is the commit point: a unit without it is not done anywhere.
- Nothing is deleted except by `withdraw` (a forced rerun): an ETag-conditional delete of the marker it read.
- The lease is renewed before uploading; one lost to another host (a store outage or a stall longer than
  the lease) is said, not fatal: the conditional creates decide which copy is the commit, so finishing
  costs a duplicate upload where aborting would throw the finished work away.

Above storage.remote (the transport) and storage.lease, so that the transport never reaches up into the
leases built on it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from pathlib import Path

from storage import checkpoints, layout, lease, remote

log = logging.getLogger(__name__)
COMMIT = re.compile(r"(^|\.)done\.json$")   # stage.done.json, shard-NNNNNN.done.json
LOGS = ("metrics.jsonl",)
CARDS = ("README.md",)
# Stage directories and shard stems (their paths, resolved) whose commit this process withdrew (`withdraw`).
_withdrawn: set[str] = set()


class PublishConflict(RuntimeError):
    """The store holds other bytes under a final key than this worker made."""


def check_writable(url: str, option: str = "--root") -> None:
    """Probe an object-store root before work starts, or raise a ValueError naming it and what to do.

    Only s3:// is accepted: every stage takes a lock, and leases need conditional writes. The probe
    writes an object twice with `If-None-Match: *` (the second must be refused: a store that ignores
    the condition would let two workers hold one lock) and deletes it. A host clock off the store's by
    more than a quarter of the lease is warned about here (leases are judged on the store's clock).
    """
    url = url.rstrip("/")
    if not url.startswith(("s3://", "s3a://")):
        raise ValueError(f"cannot use {option} {url}: object-store roots must be s3:// (locks need S3's conditional "
                         "writes); use an s3:// bucket, or a local or shared-mount path")
    m = remote.Mirror(url, Path("."))
    probe = f"{m.base}/.pcm-write-check-{uuid.uuid4().hex[:8]}"
    try:
        bucket, key = m.fs.split_path(probe)[:2]
        reply = m.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"", IfNoneMatch="*")
    except ImportError as e:
        raise ValueError(f"cannot use {option} {url}: {e}; install the S3 backend: pip install s3fs") from None
    except Exception as e:  # noqa: BLE001 - every backend raises its own errors
        raise ValueError(f"cannot write to {option} {url}: {type(e).__name__}: {e}; check that the bucket exists and "
                         "the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for S3) "
                         "allow writing") from None
    lease.check_clock(bucket, reply, lease.lease_seconds())
    try:
        try:
            m.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"", IfNoneMatch="*")
        except Exception as e:  # noqa: BLE001
            if remote.refused_condition(e):
                return
            raise
        raise ValueError(f"cannot use {option} {url}: the store ignored a conditional write (If-None-Match), so "
                         "its locks would not exclude anyone; use a store with S3 conditional writes")
    finally:
        m.fs.rm_file(probe)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _same(m: remote.Mirror, path: Path, head: dict) -> bool:
    """Whether the store's object (`head`: its metadata) holds this file's bytes."""
    if int(head.get("ContentLength", -1)) != path.stat().st_size:
        return False
    etag = str(head.get("ETag", "")).strip('"')
    if etag and "-" not in etag:   # one PUT: the ETag is the MD5 of the bytes
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "md5").hexdigest() == etag
    return m.digest(path) == _sha256(path)   # a multipart upload's ETag is no digest of the bytes


def _replaceable(path: Path) -> bool:
    p = path.resolve()
    unit = str(p.parent / p.name.split(".", 1)[0])
    return unit in _withdrawn or any(str(d) in _withdrawn for d in p.parents)


def _publish_file(m: remote.Mirror, path: Path, *, replace: bool = False) -> bool:
    """Publish one file by the rules above (`replace`: the caller knows the store's copy uncommitted); False when the
    store's copy was kept instead (a commit or a log)."""
    head = m.head(path)
    if head is None and m.create(path):
        return True
    head = head or m.head(path)
    if head is None:   # deleted between the refused create and the look (a forced rerun elsewhere)
        if m.create(path):
            return True
        raise PublishConflict(f"{m.public(path)}: another host is rewriting this key; rerun when it has finished")
    if _same(m, path, head):
        return True
    if replace or path.name in CARDS or _replaceable(path):
        m.replace(path, head["ETag"])
        return True
    if COMMIT.search(path.name) or path.name in LOGS:
        return False
    raise PublishConflict(
        f"{m.public(path)}: the store holds other bytes (sha256 {m.digest(path)}) than this worker made "
        f"(sha256 {_sha256(path)}). What the stages write is deterministic, so two runs of the same stage disagree: "
        "check that the hosts run the same code and library versions, or rerun this stage with --force to "
        "replace the store's copy")


def _confirm(lock: Path) -> None:
    """Renew this worker's lease at `lock` before it uploads; a lease lost meanwhile is warned about (above)."""
    try:
        lease.confirm(lock)
    except lease.LeaseLost as e:
        log.warning("%s; publishing this finished work anyway: the store's conditional creates keep one copy", e)


def _adopt(m: remote.Mirror, marker: Path) -> None:
    log.info("%s: committed by another host first; its marker is kept and this worker's discarded", m.public(marker))
    m.fetch([marker])


def publish_files(*paths: Path) -> None:
    """Publish these files of a working copy in order (the rules above); nothing for a local root."""
    if paths and (m := remote.mirror_of(paths[0])) is not None:
        for p in paths:
            _publish_file(m, Path(p))


def withdraw(marker: Path) -> None:
    """A forced rerun's first step on an object-store root: delete the store's `marker` (the copy read, by its ETag)
    and let this process replace the files of that unit. Nothing for a local root."""
    m = remote.mirror_of(marker)
    if m is None:
        return
    marker = Path(marker)
    _withdrawn.add(str(marker.resolve().parent if marker.name == layout.DONE_MARKER
                       else marker.resolve().parent / marker.name.split(".", 1)[0]))
    head = m.head(marker)
    if head is not None:
        m.delete(marker, head["ETag"])


def publish_unit(marker: Path) -> None:
    """Publish a shard's files (`shard-NNNNNN.*` beside `marker`), then `marker`; nothing for a local root.

    A shard another host committed first keeps that host's marker (fetched here): the files are the same bytes.
    """
    m = remote.mirror_of(marker)
    if m is None:
        return
    stem = marker.name.split(".", 1)[0]
    files = sorted(p for p in marker.parent.glob(f"{stem}.*") if p != marker and p.is_file()
                   and not remote.PRIVATE.match(p.name))
    _confirm(layout.shard_lock_of(marker))
    for p in files:
        _publish_file(m, p)
    if not _publish_file(m, marker):
        _adopt(m, marker)


def publish_checkpoint(step_dir: Path, run_log: Path | None = None) -> None:
    """A train step checkpoint as soon as it is written, `state.json` last (its commit), then the run's log, so a
    train killed on one host resumes on another (`checkpoints.fetch_published`); nothing for a local root.

    A step checkpoint the store holds without its state.json is a killed writer's, never resumed from: its
    files are replaced over the copies read (on a GPU a retrained step need not be the same bits). The log
    is replaced likewise while the stage is not committed.
    """
    m = remote.mirror_of(step_dir)
    if m is None:
        return
    stage = step_dir.parent.parent
    _confirm(stage / layout.STAGE_LOCK)
    state = step_dir / checkpoints.STATE
    uncommitted = not m.exists(state)
    for p in sorted(f for f in step_dir.iterdir() if f.is_file() and f != state):
        _publish_file(m, p, replace=uncommitted)
    _publish_file(m, state, replace=uncommitted)
    if run_log is not None and run_log.exists() and not m.exists(stage / layout.DONE_MARKER):
        _publish_file(m, run_log, replace=True)


def publish_tree(directory: Path, marker: Path | None = None, *, units: bool = False) -> bool:
    """Publish a stage directory's own files, then `marker`; nothing for a local root.

    The per-shard directories (`shards/`, `features/`, `real/`) are published shard by shard by their
    markers (`publish_unit`); `units=True` publishes their files too (a publication cut short). Returns
    False when another host committed the stage first: its marker is adopted and nothing else uploaded.
    """
    m = remote.mirror_of(directory)
    if m is None:
        return True
    files = [p for p in sorted(directory.rglob("*")) if p.is_file() and p != marker
             and not any(remote.PRIVATE.match(part) for part in p.relative_to(directory).parts)]
    if not units:
        files = [p for p in files if p.relative_to(directory).parts[0] not in remote.UNIT_DIRS]
    _confirm(directory / layout.STAGE_LOCK)
    if marker is not None and not _replaceable(marker) and m.exists(marker):
        _adopt(m, marker)
        return False
    for p in files:
        _publish_file(m, p)
    if marker is not None and not _publish_file(m, marker):
        _adopt(m, marker)
        return False
    return True


def ensure_published(directory: Path, marker: Path) -> None:
    """Publish a stage finished here whose marker never reached the store (its worker was killed while publishing)."""
    m = remote.mirror_of(directory)
    if m is not None and marker.exists() and not m.exists(marker):
        publish_tree(directory, marker, units=True)
