"""Publication to an object-store root under this worker's lease: a shard's files then its marker, a stage's files
then its done marker, and the probe of a root before any work. Above storage.remote (the transport) and
storage.lease, so that the transport never reaches up into the leases built on it."""

from __future__ import annotations

import uuid
from pathlib import Path

from storage import layout, lease, remote


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


def publish_unit(marker: Path) -> None:
    """Upload a shard's files (`shard-NNNNNN.*` beside `marker`), then `marker`; nothing for a local root."""
    m = remote.mirror_of(marker)
    if m is None:
        return
    stem = marker.name.split(".", 1)[0]
    files = sorted(p for p in marker.parent.glob(f"{stem}.*") if p != marker and p.is_file())
    lease.confirm(layout.shard_lock_of(marker))
    m.remove_temporaries(marker.parent, f"{stem}.")   # a killed earlier holder's, never another shard's
    m.publish([*files, marker])


def publish_tree(directory: Path, marker: Path | None = None, *, units: bool = False) -> None:
    """Upload a stage directory's own files, then `marker`; nothing for a local root.

    The per-shard directories (`shards/`, `features/`, `real/`) are published shard by shard by their
    markers (`publish_unit`); `units=True` also uploads their files the store lacks or holds at
    another size (a publication cut short). The stage's own files always go up: a rewritten file of
    the same size (new weights of the same shapes) must replace the old one.
    """
    m = remote.mirror_of(directory)
    if m is None:
        return
    files = [p for p in sorted(directory.rglob("*")) if p.is_file() and p != marker
             and not any(remote.PRIVATE.match(part) for part in p.relative_to(directory).parts)]
    own = [p for p in files if p.relative_to(directory).parts[0] not in remote.UNIT_DIRS]
    todo = own
    if units:
        have = m.listing(directory)
        todo += [p for p in files if p.relative_to(directory).parts[0] in remote.UNIT_DIRS
                 and have.get(p.relative_to(directory).as_posix()) != p.stat().st_size]
    lease.confirm(directory / layout.STAGE_LOCK)
    if marker is not None:  # the stage is complete: no upload under it is still wanted
        m.remove_temporaries(directory)
    m.publish([*todo, *([marker] if marker is not None else [])])


def ensure_published(directory: Path, marker: Path) -> None:
    """Publish a stage finished here whose marker never reached the store (its worker was killed while publishing)."""
    m = remote.mirror_of(directory)
    if m is not None and marker.exists() and not m.exists(marker):
        publish_tree(directory, marker, units=True)
