"""Dashboard artifacts: progress bars, tables, markdown reports and pictures for Prefect's UI."""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

log = logging.getLogger(__name__)


def artifact_key(*parts: str) -> str:
    """Prefect keys: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")[:100]


class Progress:
    """A progress artifact fed by a stage's `progress(done, total, message)` callback.

    Updates are throttled (at most one per `every` seconds, and always the last one), and a
    failed update is logged, never raised: the dashboard must not slow down or stop the work.
    """

    def __init__(self, key: str, description: str, every: float = 5.0) -> None:
        self.key, self.description, self.every = artifact_key(key, "progress"), description, every
        self._last = 0.0
        self._id = create_progress_artifact(progress=0.0, key=self.key, description=description)

    def __call__(self, done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.every:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        try:
            update_progress_artifact(self._id, progress=pct,
                                     description=f"{self.description}: {done}/{total} {message}".strip())
        except Exception as e:  # noqa: BLE001 - a dashboard hiccup is not a stage failure
            log.warning("progress artifact %s not updated: %s", self.key, e)


def table(key: str, rows: Sequence[Mapping[str, Any]] | Mapping[str, Any], description: str) -> None:
    if isinstance(rows, Mapping):
        rows = [{"name": k, "value": v} for k, v in rows.items()]
    create_table_artifact(key=artifact_key(key), table=[dict(r) for r in rows], description=description)


def markdown(key: str, text: str, description: str) -> None:
    create_markdown_artifact(key=artifact_key(key), markdown=text, description=description)


def picture(key: str, path: str | Path, title: str, max_bytes: int = 1_500_000) -> None:
    """A PNG written by a stage, embedded in a markdown artifact (and left on disk beside it)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) > max_bytes:
        body = f"Picture too large to embed ({len(data)} bytes): `{path}`"
    else:
        body = f"![{title}](data:image/png;base64,{base64.b64encode(data).decode()})\n\n`{path}`"
    markdown(key, f"### {title}\n\n{body}\n", title)


def summary_table(key: str, result: Any, description: str) -> None:
    """Counts and timings of a StageResult as a table artifact."""
    rows = [{"name": k, "value": v} for k, v in {**result.counts, **result.timings}.items()]
    rows.append({"name": "cached", "value": result.cached})
    rows.append({"name": "path", "value": result.path})
    table(key, rows, description)

