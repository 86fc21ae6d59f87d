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
