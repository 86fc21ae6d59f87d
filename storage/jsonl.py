"""JSON-lines logs that a kill may tear: one JSON object a line, appended and fsynced line by line.

A process killed mid-write leaves at most a torn last line; readers skip it, and a resume
truncates the log to the step it resumes from (atomically), so the redone steps are not logged twice.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from storage import atomic


def read(path: Path) -> list[dict[str, Any]]:
    """The whole lines of the log (a torn last line from a kill is skipped); [] when there is no log."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def truncate(path: Path, step: int) -> None:
    """Keep only the lines up to `step` (a line without one counts as step 0); later ones are redone."""
    if path.exists():
        kept = [r for r in read(path) if r.get("step", 0) <= step]
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def append(path: Path, record: dict[str, Any]) -> None:
    """Add one line and fsync it: a line written is a line that survives a kill."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
