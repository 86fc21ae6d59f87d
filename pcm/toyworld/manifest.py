"""The manifest of the shipped toy models: every file with its size and sha256, checked on demand."""

from __future__ import annotations

import hashlib
from pathlib import Path

from storage import atomic

MANIFEST_FILE = "MANIFEST.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(models_dir: Path) -> list[Path]:
    return sorted(p for p in models_dir.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
                  and not any(part.startswith(".") for part in p.relative_to(models_dir).parts))


def write_manifest(models_dir: str | Path, extra: dict | None = None) -> Path:
    """MANIFEST.json under `models_dir`: {files: {relative path: {bytes, sha256}}, total_bytes, ...extra}."""
    root = Path(models_dir)
    files = {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(root)}
    path = root / MANIFEST_FILE
    atomic.write_json(path, {"files": files, "total_bytes": sum(f["bytes"] for f in files.values()), **(extra or {})})
    return path


def check_manifest(models_dir: str | Path) -> list[str]:
    """What differs from the manifest (missing, changed or unlisted files); empty when all is as shipped."""
    root = Path(models_dir)
    path = root / MANIFEST_FILE
    if not path.is_file():
        return [f"{path}: no manifest; train the toy models with `pcm world train-models {root}`"]
    listed = atomic.read_json(path)["files"]
    problems = []
    for rel, want in sorted(listed.items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != want["bytes"] or _sha256(p) != want["sha256"]:
            problems.append(f"{p}: differs from the manifest (sha256 {want['sha256'][:12]}...)")
    for p in _files(root):
        if str(p.relative_to(root)) not in listed:
            problems.append(f"{p}: not in the manifest")
    return problems


def dir_digest(directory: str | Path) -> str:
    """sha256 over a directory's files (relative paths and contents, dot-files and the manifest left out):
    its content, however its path is spelled."""
    root = Path(directory)
    h = hashlib.sha256()
    for p in _files(root):
        h.update(f"{p.relative_to(root).as_posix()}\0{_sha256(p)}\n".encode())
    return h.hexdigest()


def is_shipped(directory: str | Path, part: str) -> bool:
    """Whether `directory` holds the shipped toy model `part` (`t2i` or `clip`): the same files with the same
    contents, wherever the directory lies (a copy counts, a retrained model does not). By content identity
    (pcm.identity.model_dir_id): the manifest's digests where the files are not newer than it, and each
    directory hashed once per process, not at every call."""
    from pcm import bundled
    from pcm.identity import model_dir_id

    root = Path(directory)
    return root.is_dir() and model_dir_id(root) == model_dir_id(bundled.TOYMODELS / part)
