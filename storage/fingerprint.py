"""Stage fingerprints: a stable hash of a stage's config, its inputs' fingerprints and its code version."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

FINGERPRINT_LENGTH = 16


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace; paths become strings; NaN and infinity are refused."""

    def default(o: Any) -> Any:
        if isinstance(o, Path):
            return str(o)
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        if hasattr(o, "model_dump"):
            return o.model_dump(mode="json")
        raise TypeError(f"cannot fingerprint a value of type {type(o).__name__}: {o!r}")

    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=default, allow_nan=False,
                          ensure_ascii=False)
    except ValueError as e:
        raise ValueError(f"cannot fingerprint a config holding NaN or infinity: {e}") from None


def fingerprint(stage: str, config: Mapping[str, Any], inputs: Iterable[str] = (), code_version: str = "1") -> str:
    """Hash of (stage, config, input fingerprints in order, code version): same inputs, same value."""
    payload = {"stage": stage, "config": dict(config), "inputs": list(inputs), "code_version": code_version}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()[:FINGERPRINT_LENGTH]


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (used to fingerprint raw inputs by content, not by name)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_INPUT_DIGESTS: dict[tuple, str] = {}


def input_digest(path: str | os.PathLike) -> str:
    """`file_digest` of a raw input file, hashed once per process while the file is unchanged.

    Planning a stage hashes its input files, and one run plans a stage several times (Prefect's cache
    key, the cached-result check, the task itself): a 600k-caption JSON would be read four times. The
    file is identified by device, inode, size and nanosecond mtime, so a rewritten file is hashed again.
    Integrity checks of written outputs (`storage.shards.check_shard`) keep using `file_digest`.
    """
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _INPUT_DIGESTS:
        _INPUT_DIGESTS[key] = file_digest(path)
    return _INPUT_DIGESTS[key]


# What a directory's identity reads: its files, except hidden ones and the manifests written beside them.
_SKIP_NAMES = frozenset({"MANIFEST.json"})
_DIR_DIGESTS: dict[tuple, str] = {}


def _dir_files(root: Path) -> list[tuple[str, os.stat_result]]:
    """(relative POSIX path, stat) of every regular file under `root`, sorted; hidden parts and manifests skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or name in _SKIP_NAMES:
                continue
            p = Path(dirpath) / name
            st = p.stat()
            out.append((p.relative_to(root).as_posix(), st))
    return sorted(out, key=lambda t: t[0])


def dir_digest(path: str | os.PathLike, known: dict[str, dict[str, Any]] | None = None) -> str:
    """`sha256:<hex>` over the sorted (relative path, size, sha256 of the bytes) of a directory's files.

    A model directory's identity: the same files give the same value wherever the directory is and
    however its path is spelled. Hashed once per process while no file's size or mtime changes.
    `known` maps relative paths to `{"bytes", "sha256"}` already computed (a shipped MANIFEST.json):
    a file listed there with its size is not read again; the value is the same either way.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    files = _dir_files(root)
    key = (os.path.realpath(root), tuple((rel, st.st_size, st.st_mtime_ns) for rel, st in files))
    if key not in _DIR_DIGESTS:
        h = hashlib.sha256()
        for rel, st in files:
            k = (known or {}).get(rel)
            sha = k["sha256"] if k and k.get("bytes") == st.st_size else input_digest(root / rel)
            h.update(f"{rel}\t{st.st_size}\t{sha}\n".encode())
        _DIR_DIGESTS[key] = "sha256:" + h.hexdigest()
    return _DIR_DIGESTS[key]


_MANIFEST_DIGESTS: dict[tuple, str] = {}


def files_manifest_digest(root: str | os.PathLike, relative_paths: Iterable[str], cache_key: str = "") -> str:
    """`files:<hex>` over the sorted (relative path, size) of the named files under `root` (-1: missing).

    An image root's identity: thousands of images cannot be hashed at every plan, so the files a
    stage reads are identified by name and size (one stat each). Cached per process by root and
    `cache_key` (the fingerprint of the table naming the files).
    """
    key = (os.path.realpath(root), cache_key) if cache_key else None
    if key is not None and key in _MANIFEST_DIGESTS:
        return _MANIFEST_DIGESTS[key]
    h = hashlib.sha256()
    for rel in sorted(set(relative_paths)):
        try:
            size = os.stat(Path(root) / rel).st_size
        except OSError:
            size = -1
        h.update(f"{rel}\t{size}\n".encode())
    digest = "files:" + h.hexdigest()
    if key is not None:
        _MANIFEST_DIGESTS[key] = digest
    return digest
