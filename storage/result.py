"""StageResult: the small record a stage returns and Prefect passes between stages."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage import atomic


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
        d = self.to_dict()
        d["cached"] = False
        atomic.write_json(path, d)

    @classmethod
    def load(cls, path: str | os.PathLike) -> StageResult:
        return cls.from_dict(atomic.read_json(path))

    @property
    def dir(self) -> Path:
        return Path(self.path)
