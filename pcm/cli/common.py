"""What the CLI commands share: the bundled pipeline presets (read as data) and the output-folder check."""

from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path

# The pipeline presets, read here as data: listing them must not import pcm.stages.pipeline (torch, diffusers, ...).
PIPELINE_PRESETS = Path(__file__).resolve().parent.parent / "presets" / "pipeline"


def pipeline_presets() -> dict[str, str]:
    """Bundled pipeline preset name -> its `description`, straight from pcm/presets/pipeline/*.toml."""
    out: dict[str, str] = {}
    for path in sorted(PIPELINE_PRESETS.glob("*.toml")):
        with open(path, "rb") as f:
            out[path.stem] = str(tomllib.load(f).get("description", ""))
    return out


def _blocker(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` (or `path`) when it is not a folder, else None."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def writable_dir(path: str | os.PathLike, option: str = "--root") -> Path:
    """Create the output folder `path` (given as `option`) if needed and check that files can be made in it.

    Every failure is a ValueError naming the folder and what to do, raised before any work starts
    (a read-only root would otherwise end a stage with an OSError traceback, possibly hours in).
    """
    folder = Path(path).expanduser()
    fix = f"choose a writable {option}"
    if blocker := _blocker(folder):
        raise ValueError(f"cannot use {option} {folder}: {blocker} is a file, not a folder; {fix}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {option} {folder}: {e.strerror or e}; {fix}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {option} {folder}: permission denied; {fix}")
    try:  # access() can say yes where a write still fails (read-only mounts, ACLs, network file systems)
        fd, probe = tempfile.mkstemp(prefix=".pcm-write-check-", dir=folder)
    except OSError as e:
        raise ValueError(f"cannot write to {option} {folder}: {e.strerror or e}; {fix}") from None
    os.close(fd)
    os.unlink(probe)
    return folder
