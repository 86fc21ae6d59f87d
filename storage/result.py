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
from storage.layout import StageDir, run_root_of


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
        result = cls(**d)
        if why := _wrong_types(result):  # a marker of the wrong shape failed later, far from its file
            raise ValueError(why)
        return result

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

    @property
    def root(self) -> str:
        """The run root the stage lies in, as `path` spells it (an object-store root's URL, or a local path)."""
        return run_root_of(self.path)

    @property
    def stage_dir(self) -> StageDir:
        """The StageDir of `path` and the names inside it; a URL's is this worker's copy, fetched from the store
        the first time this process names it (StageDir.at)."""
        return StageDir.at(self.path)


def _wrong_types(r: StageResult) -> str | None:
    """Why the fields of `r` are not of their declared kinds (texts, tables of numbers), else None."""
    for name in ("stage", "fingerprint", "path"):
        if not isinstance(getattr(r, name), str):
            return f"{name!r} must be a string, got {getattr(r, name)!r}"
    for name in ("counts", "timings", "extra"):
        value = getattr(r, name)
        if not isinstance(value, dict):
            return f"{name!r} must be an object, got {value!r}"
        if name != "extra" and (bad := [k for k, v in value.items() if not isinstance(v, int | float) or v is None]):
            return f"{name}[{bad[0]!r}] must be a number, got {value[bad[0]]!r}"
    if not isinstance(r.cached, bool):
        return f"'cached' must be true or false, got {r.cached!r}"
    return None


ROOT_PREFIX = "@root/"


def _root_of(marker: str | os.PathLike) -> Path:
    """The run root of a marker `<root>/<stage>/<fingerprint>/stage.done.json` (a local file): its stage
    directory's, as storage.layout.run_root_of spells the run tree."""
    return Path(run_root_of(Path(marker).resolve().parent))


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
