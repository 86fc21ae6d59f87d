"""WebDataset shards written atomically, with a done marker written last.

A shard `shard-NNNNNN.tar` is written under a temporary name, renamed into place only when its
block finishes without an exception, and then `shard-NNNNNN.done.json` (count, bytes, sha256,
seconds and caller stats) is written. A shard without its marker is pending.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from storage import atomic, publish, remote
from storage.fingerprint import file_digest

_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")
# A sample's image member suffix by image format (the synthesize stage's image_format).
IMAGE_EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
# The members a sample's image may be under: those suffixes, and `jpeg` as other WebDataset writers spell it.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def check_key(key: str) -> str:
    """A sample key must be a safe file name with no dot (WebDataset groups files by the first dot)."""
    if not isinstance(key, str) or not _KEY.match(key) or len(key) > 200:
        raise ValueError(
            f"invalid sample key {key!r}: use 1-200 characters of letters, digits, '_' or '-' "
            "(no '/', no '.', no spaces)")
    return key


def image_member(sample: dict[str, Any]) -> str | None:
    """The key of a sample's image member (`jpg`, `png`, ...), or None when it has no image."""
    return next((k for k in IMAGE_KEYS if k in sample), None)


def done_path(shard: Path) -> Path:
    """`.../shard-000001.tar` -> `.../shard-000001.done.json` (any suffix)."""
    shard = Path(shard)
    return shard.with_name(shard.name.split(".", 1)[0] + ".done.json")


def is_done(shard: Path) -> bool:
    """A shard counts only when both the file and its marker exist.

    On an object-store root, a shard another worker published counts (its marker is in the store);
    it is fetched only when read (`fetch`, which the readers here call).
    """
    if Path(shard).exists() and done_path(shard).exists():
        return True
    return remote.published(done_path(shard))


def fetch(shard: Path) -> None:
    """On an object-store root, bring a published shard's files into the working copy (a no-op when here)."""
    if not (Path(shard).exists() and done_path(shard).exists()):
        remote.fetch_unit(done_path(shard))


def fetch_file(path: Path) -> None:
    """One file of a published shard (`shard-NNNNNN.status.parquet`, ...), fetched if not here."""
    if not Path(path).exists():
        remote.fetch_file(Path(path), done_path(path))


def drop_marker(shard: Path, *, store: bool = False) -> None:
    """Forget that a shard is done here, so it is redone; `store=True` (a forced rerun, a shard known bad) also
    withdraws its marker from an object-store root (storage.publish.withdraw: the copy read, by its ETag)."""
    if store:
        publish.withdraw(done_path(shard))
    done_path(shard).unlink(missing_ok=True)


def pending(shards: Iterable[Path]) -> list[Path]:
    """The shards of `shards` that are not done, in order."""
    return [Path(s) for s in shards if not is_done(s)]


def read_marker(shard: Path) -> dict[str, Any]:
    if not done_path(shard).exists():
        remote.fetch_file(done_path(shard), done_path(shard))  # an object-store root: the marker alone
    return atomic.read_json(done_path(shard))


def write_marker(shard: Path, stats: dict[str, Any]) -> None:
    """Write the shard's done marker; on an object-store root, then publish the shard, marker last."""
    atomic.write_json(done_path(shard), stats)
    try:
        publish.publish_unit(done_path(shard))
    except BaseException:
        done_path(shard).unlink(missing_ok=True)  # unpublished (a lost lease, a failed upload): not done here either
        raise


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what passes through."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0
        self.abandoned = False  # set on failure: the tar stream's late writes are dropped

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.abandoned:
            return len(b)
        self.sha.update(b)
        self.nbytes += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        if not self.abandoned:
            self.f.flush()


def _sample_files(key: str, sample: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The tar members of a sample in webdataset.TarWriter's order (sorted extensions, `_` fields left out)."""
    files = []
    for ext in sorted(k for k in sample if not k.startswith("_")):
        value = sample[ext]
        if isinstance(value, str):
            value = value.encode("utf-8")
        elif ext == "json" and isinstance(value, (dict, list)):
            value = json.dumps(value).encode("utf-8")  # webdataset's json encoder
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ValueError(f"sample {key!r}: {ext!r} must be bytes or str (or a dict for json), "
                             f"got {type(value).__name__}")
        files.append((f"{key}.{ext}", bytes(value)))
    return files


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    """One tar member with webdataset.TarWriter's header fields, so shards stay byte-identical to its output.

    Written with `tarfile` here because importing webdataset imports torch (about 9.5 s), which every
    user of storage (a crash-harness child, `pcm presets`) would pay for.
    """
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o444
    info.uname = info.gname = "bigdata"
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Write one WebDataset tar atomically; the done marker is written last.

        with ShardWriter(path) as w:
            w.write({"__key__": "k1", "jpg": b"...", "txt": "a cat"})
            w.stats["failed"] = 0          # extra fields for the marker
    An exception inside the block removes the temporary file: no shard, no marker.
    """

    def __init__(self, path: str | os.PathLike, mtime: float = 0.0) -> None:
        self.path = Path(path)
        self.mtime = mtime  # fixed mtime makes the same samples give byte-identical tars
        self.stats: dict[str, Any] = {}
        self.count = 0
        self._keys: set[str] = set()

    def __enter__(self) -> ShardWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_temporaries(self.path.parent, self.path.name)
        drop_marker(self.path)  # a rewrite invalidates the old marker here (the store's is a commit: storage.publish)
        self._tmp = atomic.temporary_path(self.path)
        self._file = open(self._tmp, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w|")  # a stream: PAX format, like webdataset
        self._start = time.monotonic()
        return self

    def write(self, sample: dict[str, Any]) -> None:
        key = check_key(sample.get("__key__", ""))
        if key in self._keys:
            raise ValueError(f"{self.path.name}: duplicate sample key {key!r}")
        files = _sample_files(key, sample)  # all checked before the first byte is written
        self._keys.add(key)
        for name, data in files:
            _add_file(self._tar, name, data, self.mtime)
        self.count += 1

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            # Never finalise a partial shard: drop the temporary file and let the error go on.
            self._hashing.abandoned = True
            try:
                self._file.close()
            finally:
                self._tmp.unlink(missing_ok=True)
            return
        try:
            self._tar.close()
            if not self._file.closed:
                self._file.close()
            atomic.commit(self._tmp, self.path)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        marker = {"count": self.count, "bytes": self._hashing.nbytes, "sha256": self._hashing.sha.hexdigest(),
                  "seconds": round(time.monotonic() - self._start, 3), **self.stats}
        write_marker(self.path, marker)


class ShardError(ValueError):
    """A finished shard that does not match its done marker (truncated, altered or unreadable)."""


_REDO = "delete it and its .done.json and rerun the stage that wrote it"


def check_shard(path: str | os.PathLike) -> dict[str, Any] | None:
    """Check a finished shard against its done marker: its size, then the sha256 of its bytes.

    Returns the marker (None for a shard without one, which is not checked). Raises ShardError
    naming the file, the stored and the found values, and what to do. One sequential read of the
    file: a stage reading the shard right after finds it in the page cache.
    """
    path = Path(path)
    fetch(path)
    if not done_path(path).exists():
        return None
    marker = read_marker(path)
    if not isinstance(marker, dict):
        raise ShardError(f"{done_path(path)}: not a shard marker (a JSON object with count, bytes and sha256); "
                         f"delete {path.name} and its .done.json and rerun the stage that wrote it")
    if not path.exists():
        raise ShardError(f"{path}: shard missing but {done_path(path).name} exists; {_REDO}")
    size, want = path.stat().st_size, marker.get("bytes")
    if isinstance(want, int) and size != want:
        raise ShardError(f"{path}: truncated or altered shard ({size} bytes, its marker says {want}); {_REDO}")
    stored = marker.get("sha256")
    if isinstance(stored, str):
        found = file_digest(path)
        if found != stored:
            raise ShardError(f"{path}: corrupt shard: its bytes changed since it was written (sha256 {found}, its "
                             f"marker {done_path(path).name} says {stored}); {_REDO}")
    return marker


def iter_tar(path: str | os.PathLike, *, verify: bool = True) -> Iterator[dict[str, Any]]:
    """Samples of a finished shard as dicts of raw bytes (grouped by key), in file order.

    A shard with a done marker is checked against it before any sample is read (`check_shard`:
    its size, as a tar cut at a header boundary looks like a shorter, valid archive to `tarfile`,
    then its sha256, so bytes changed in place are found), and its sample count at the end.
    `verify=False` skips the size and sha256 check for a caller that has just run `check_shard`.
    Raises ShardError (a ValueError) naming the file for a truncated, corrupt or unreadable tar.
    """
    path = Path(path)
    fetch(path)
    if verify:
        marker = check_shard(path)
    else:
        marker = read_marker(path) if done_path(path).exists() else None
    want_count = marker.get("count") if isinstance(marker, dict) else None
    if not isinstance(want_count, int):
        want_count = None
    current: dict[str, Any] | None = None
    count = 0
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                        count += 1
                    current = {"__key__": key}
                current[ext] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"{path}: unreadable shard ({e}); delete it and its .done.json and rerun the stage") from e
    if current is not None:
        count += 1
        if want_count is not None and count != want_count:
            raise ShardError(f"{path}: {count} samples but its marker says {want_count}; {_REDO}")
        yield current
    elif want_count:
        raise ShardError(f"{path}: no samples but its marker says {want_count}; {_REDO}")
