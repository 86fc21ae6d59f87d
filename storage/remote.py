"""Run roots on object storage: each worker works in a local copy and publishes finished units to the store.

    root = "s3://bucket/runs"
    the worker's working copy:  <PCM_MIRROR_DIR, default ~/.cache/pcm/mirrors>/<sha256(url)[:16]>/

Stages read and write the working copy exactly as they do a local root; storage keeps it and the
store in step at a few points, each a unit with a marker:
- a finished shard (`shards.write_marker`): its files, then its done marker;
- a stage directory when its config.json is written (`pcm.stages.contract.open_stage`) and when the
  stage finishes (`finish`): its files, `stage.done.json` last;
- reading: a stage directory named by URL (`StageDir.at("s3://…/encode/<fp>")`) is fetched once
  its marker is in the store (image shards excepted: `shards.is_done` fetches each when asked
  about it, so an encode worker downloads only the tars it encodes).
Publication (storage.publish) creates each final key with one conditional PUT (`If-None-Match: *`), its
marker after it: the store never holds a partial object under a final name, a marker never names a file
that is not there, and no worker replaces or deletes what another wrote (docs/contracts.md).
Downloads land through storage.atomic, so the working copy keeps the same rule. Locks on a
mirrored root are lease objects (storage.lease), not files.
Credentials and endpoints come from the fsspec backend's own settings (for S3: the AWS_* variables,
AWS_ENDPOINT_URL included); this module passes none.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import atomic

log = logging.getLogger(__name__)
MIRROR_FILE = ".pcm-mirror.json"   # in a working copy's root: the URL it mirrors
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# Never published: locks are lease objects in the store, temporaries and old checkpoint names are
# a writer's own, and the mirror file is the working copy's.
PRIVATE = re.compile(r"^(\.tmp-|\.old-|\..*\.lock$|\.lock$|\.pcm-mirror\.json$)")
# Subdirectories of one file set per shard, published shard by shard with their markers.
UNIT_DIRS = ("shards", "features", "real")
# Of those, what a stage fetch leaves to `shards.fetch` (image tars: fetched one at a time, when read).
_LAZY_DIRS = ("shards",)


def is_url(root: str | os.PathLike) -> bool:
    """True for an fsspec URL (`s3://bucket/prefix`, `gcs://…`); a plain path (or file://) is local."""
    s = str(root)
    return bool(_URL.match(s)) and not s.startswith("file://")


def mirror_dir() -> Path:
    """Where this worker keeps its working copies (`PCM_MIRROR_DIR`, default ~/.cache/pcm/mirrors)."""
    return Path(os.environ.get("PCM_MIRROR_DIR") or Path.home() / ".cache" / "pcm" / "mirrors").expanduser()


def local_root(url: str) -> Path:
    """This worker's working copy of the run root `url`, created (with its mirror file) on first use."""
    url = url.rstrip("/")
    local = (mirror_dir() / _working_copy_name(url)).resolve()
    marker = local / MIRROR_FILE
    if not marker.exists():
        local.mkdir(parents=True, exist_ok=True)
        atomic.write_json(marker, {"url": url})
        _mirror_at.cache_clear()  # a lookup before it existed said "no mirror here"
    return local


def refused_condition(e: BaseException) -> bool:
    """The store refused a conditional write: s3fs raises a FileExistsError (If-None-Match), an OSError
    carrying PreconditionFailed (If-Match), or EBUSY for a 409 ConditionalRequestConflict (a conditional
    PUT racing a DELETE of the same key), which a lease retries like a held one."""
    text = str(e)
    return (isinstance(e, FileExistsError) or (isinstance(e, OSError) and e.errno == errno.EBUSY)
            or "pre-condition" in text or "PreconditionFailed" in text or "ConditionalRequestConflict" in text)


@dataclass(frozen=True)
class Mirror:
    """A working copy `local` of the run root `url`."""

    url: str
    local: Path

    @functools.cached_property
    def _fs_and_base(self) -> tuple[Any, str]:
        import fsspec

        # No listings cache: a listing cached here would hide the units other workers publish later.
        fs, base = fsspec.url_to_fs(self.url, use_listings_cache=False)
        return fs, base.rstrip("/")

    @property
    def fs(self) -> Any:
        return self._fs_and_base[0]

    @property
    def is_s3(self) -> bool:
        protocol = self.fs.protocol
        return "s3" in (protocol if isinstance(protocol, tuple) else (protocol,))

    @property
    def base(self) -> str:
        """The root in the filesystem's own path form (`bucket/prefix` for s3://bucket/prefix)."""
        return self._fs_and_base[1]

    def relative(self, path: str | os.PathLike) -> str:
        return Path(path).resolve().relative_to(self.local).as_posix()

    def key(self, path: str | os.PathLike) -> str:
        """The store path of a file of the working copy."""
        rel = self.relative(path)
        return f"{self.base}/{rel}" if rel != "." else self.base

    def public(self, path: str | os.PathLike) -> str:
        """The URL of a file or directory of the working copy (what results and messages show)."""
        rel = self.relative(path)
        return f"{self.url}/{rel}" if rel != "." else self.url

    def exists(self, path: str | os.PathLike) -> bool:
        return bool(self.fs.exists(self.key(path)))

    def _bucket_key(self, path: str | os.PathLike) -> tuple[str, str]:
        bucket, key = self.fs.split_path(self.key(path))[:2]
        return bucket, key

    def head(self, path: str | os.PathLike) -> dict[str, Any] | None:
        """The store's metadata of a file of the working copy (ETag, ContentLength), or None when it has none."""
        bucket, key = self._bucket_key(path)
        try:
            return self.fs.call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None

    def create(self, path: str | os.PathLike) -> bool:
        """Upload a file to its final key only if no object is there (`If-None-Match: *`); False when one is.

        One PUT: the store shows the whole object or none of it, so no temporary key is ever needed.
        """
        bucket, key = self._bucket_key(path)
        try:
            with open(path, "rb") as f:
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=f, IfNoneMatch="*")
        except Exception as e:  # noqa: BLE001 - the backend's own error for a refused condition
            if refused_condition(e):
                return False
            raise
        return True

    def replace(self, path: str | os.PathLike, etag: str) -> None:
        """Upload a file over the object this worker read (`If-Match: etag`); refused if another writer changed it."""
        bucket, key = self._bucket_key(path)
        with open(path, "rb") as f:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=f, IfMatch=etag)

    def delete(self, path: str | os.PathLike, etag: str) -> None:
        """Delete the object this worker read (`If-Match: etag`); refused if another writer changed it."""
        bucket, key = self._bucket_key(path)
        self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)

    def digest(self, path: str | os.PathLike) -> str:
        """sha256 of the store's copy of a file (downloaded: only to name what differs)."""
        return hashlib.sha256(self.fs.cat_file(self.key(path))).hexdigest()

    def fetch(self, paths: Iterable[str | os.PathLike]) -> None:
        """Download files of the store into the working copy, in order, each through a temporary name."""
        for p in paths:
            with atomic.atomic_path(p) as tmp:
                self.fs.get_file(self.key(p), str(tmp))

    def listing(self, directory: str | os.PathLike, prefix: str = "") -> dict[str, int]:
        """Public files under `directory` in the store whose names start with `prefix`: relative path -> size."""
        base = self.key(directory)
        try:
            if prefix and self.is_s3:  # S3 lists by key prefix: one shard's keys, not the whole directory's
                found = self.fs.find(base, detail=True, prefix=prefix)
            else:
                found = {k: v for k, v in self.fs.find(base, detail=True).items()
                         if k.startswith(f"{base}/{prefix}")}
        except FileNotFoundError:
            return {}
        out = {}
        for key, info in found.items():
            rel = key[len(base) + 1:] if key.startswith(base + "/") else None
            if rel and not any(PRIVATE.match(part) for part in rel.split("/")) and info.get("type") != "directory":
                out[rel] = int(info.get("size") or 0)
        return out


def _working_copy_name(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4096)
def _mirror_at(directory: str) -> Mirror | None:
    """The working copy whose root is `directory`, or None. Only `local_root` makes one: a folder of the mirror
    cache named by its URL's hash. A mirror file anywhere else (planted in or above a local run root) would send
    that root's outputs to whatever bucket it names with this host's credentials: it is ignored, and said so."""
    f = Path(directory) / MIRROR_FILE
    if not f.exists():
        return None
    try:
        url = json.loads(f.read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        url = None
    here = Path(directory).resolve()
    if not isinstance(url, str) or here.parent != mirror_dir().resolve() or here.name != _working_copy_name(url):
        log.warning("%s: ignored; a run root's bucket comes only from the root given (--root, the flow's root), "
                    "never from a file in or above a local root", f)
        return None
    return Mirror(url=url, local=here)


def mirror_of(path: str | os.PathLike) -> Mirror | None:
    """The working copy `path` lies in (a file or directory up to five levels below its root), or None."""
    p = Path(path).resolve()
    for d in (p, *list(p.parents)[:5]):
        m = _mirror_at(str(d))
        if m is not None:
            return m
    return None


def local_path(path: str | os.PathLike) -> Path:
    """A local path for `path`: the working-copy path of a URL `<root>/<stage>/<fingerprint>`, else `path` itself."""
    s = str(path)
    if not is_url(s):
        return Path(path)
    parts = s.rstrip("/").rsplit("/", 2)
    if len(parts) != 3:
        raise ValueError(f"{s}: expected a stage directory URL <root>/<stage>/<fingerprint>")
    return local_root(parts[0]) / parts[1] / parts[2]


def public(path: str | os.PathLike) -> str:
    """What to call a path of the working copy outside this worker: its URL; a local root's path is itself."""
    m = mirror_of(path)
    return m.public(path) if m is not None else str(path)


def fetch_unit(marker: Path) -> bool:
    """Fetch a shard whose `marker` is in the store but not here (its files, then the marker); False if unpublished."""
    m = mirror_of(marker)
    if m is None or not m.exists(marker):
        return False
    stem = marker.name.split(".", 1)[0]
    listing = m.listing(marker.parent, prefix=f"{stem}.")
    files = sorted(marker.parent / rel for rel in listing if "/" not in rel and rel.split(".", 1)[0] == stem
                   and rel != marker.name)
    m.fetch([*files, marker])
    return True


def fetch_tree(directory: Path, marker: Path) -> bool:
    """Bring a stage directory whose `marker` is in the store into the working copy, marker last.

    Returns False (fetching nothing) when the marker is not published. The stage's own files are
    fetched unless the local marker is the store's (the same stage run); shard files only when
    missing or of another size, and image shards (`shards/`) not at all: `shards.fetch` gets each
    when it is read, so a host downloads only the tars it encodes.
    """
    m = mirror_of(directory)
    if m is None or not m.exists(marker):
        return False
    same_run = marker.exists() and m.fs.cat_file(m.key(marker)) == marker.read_bytes()
    rel_marker = marker.relative_to(directory).as_posix()
    todo = []
    for rel, size in sorted(m.listing(directory).items()):
        local, top = directory / rel, rel.split("/", 1)[0]
        if rel == rel_marker or top in _LAZY_DIRS:
            continue
        here = local.is_file() and local.stat().st_size == size
        if not here or (top not in UNIT_DIRS and not same_run):
            todo.append(local)
    m.fetch([*todo, marker])
    return True


_fetched: set[str] = set()


def fetch_stage_once(directory: Path, marker: Path) -> None:
    """`fetch_tree` the first time this process names the stage by URL (later stages read what it fetched)."""
    if str(directory) not in _fetched and fetch_tree(directory, marker):
        _fetched.add(str(directory))


def published(marker: Path) -> bool:
    """Whether the store holds `marker` (a file of a working copy); False for a local root."""
    m = mirror_of(marker)
    return m is not None and m.exists(marker)


def fetch_file(path: Path, marker: Path) -> bool:
    """Fetch one file of a shard whose `marker` is published (and the marker, if missing here); False otherwise."""
    m = mirror_of(path)
    if m is None or not m.exists(marker):
        return False
    m.fetch([p for p in dict.fromkeys((path, marker)) if not p.exists()])
    return True
