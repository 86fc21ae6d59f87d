"""StageResult: the small record a stage returns and Prefect passes between stages.

On disk (`stage.done.json`) every path inside the run root is written relative to it
(`@root/encode/<fp>/pictures/x.png`) and the stage's own `path` is the marker's directory, so a
root can be moved, copied or mounted elsewhere: a marker read at its new place names the new
place, never the old root (which may still exist and hold other data).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage import atomic, remote


@dataclass(frozen=True)
class StageResult:
    """Where a finished stage's outputs are and what it did; never tensors or tables."""

    stage: str
    fingerprint: str
    path: str
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageResult:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown StageResult fields: {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        """Write the marker `path` (`<root>/<stage>/<fingerprint>/stage.done.json`), root-relative."""
        root = _root_of(path)
        d = _map_strings(self.to_dict(), lambda s: _relative(s, root))
        d["cached"] = False
        atomic.write_json(path, d)

    @classmethod
    def load(cls, path: str | os.PathLike) -> StageResult:
        """Read a marker; root-relative paths resolve against the root it lies in now."""
        root = _root_of(path)
        d = atomic.read_json(path)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: not a stage marker (expected a JSON object)")
        d = _map_strings(d, lambda s: _absolute(s, root))
        d["path"] = remote.public(Path(path).resolve().parent)   # where the marker is, whatever it says
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a stage marker ({e})") from None

    @property
    def dir(self) -> Path:
        """The stage directory here (this worker's working copy when `path` is an object-store URL)."""
        return remote.local_path(self.path)


ROOT_PREFIX = "@root/"


def _root_of(marker: str | os.PathLike) -> Path:
    """The run root of `<root>/<stage>/<fingerprint>/stage.done.json`."""
    return Path(marker).resolve().parent.parent.parent


def _relative(s: str, root: Path) -> str:
    for base in {str(root), str(root.resolve())}:
        if s.startswith(base + os.sep):
            return ROOT_PREFIX + Path(s[len(base) + 1:]).as_posix()
    url = remote.public(root)  # an object-store root's URL, as a mirrored result's `path` names it
    if url != str(root) and s.startswith(url + "/"):
        return ROOT_PREFIX + s[len(url) + 1:]
    return s


def _absolute(s: str, root: Path) -> str:
    return str(root / s[len(ROOT_PREFIX):]) if s.startswith(ROOT_PREFIX) else s


def _map_strings(value: Any, fn: Any) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value
