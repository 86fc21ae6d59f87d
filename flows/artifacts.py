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


# What each timing of a StageResult measures. Every stage's `total_s` is the wall time of the one call
# that wrote stage.done.json; in a Prefect flow the shards are separate tasks, so it is only the final
# merge, while the per-shard sums (`generate_s`) cover the shards whenever they ran.
TIMINGS = {
    "total_s": "seconds: the call that finished the stage (wrote stage.done.json) -- in a flow only the final "
               "step, not the shard tasks",
    "generate_s": "seconds: image generation summed over all shards, measured when each shard ran "
                  "(possibly in earlier runs)",
    "images_per_s": "images per second of the stage's own work (images / generate_s or encode_s)",
    "encode_s": "seconds: CLIP encoding of the encoded_now images of the finishing call (shards encoded by "
                "shard tasks or earlier runs are not in it)",
    "concepts_s": "seconds: concept vocabulary and embeddings (0 when an earlier call built them)",
    "read_s": "seconds: reading the caption file", "check_s": "seconds: checking the captions",
    "write_s": "seconds: writing captions.parquet",
    "load_s": "seconds: loading the evaluation set and checkpoint", "decode_s": "seconds: captioning (beam search)",
    "score_s": "seconds: scoring the captions", "report_s": "seconds: writing metrics and report",
}
REUSED_NOTE = "; measured when the stage ran (finished {when}), NOT in this run: the result was reused"


def _flow_run_started() -> float | None:
    """When the current Prefect flow run started (epoch seconds), or None outside a flow run."""
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        return ctx.start_time.timestamp() if ctx is not None else None
    except Exception:  # noqa: BLE001 - no context, no answer
        return None


def _finished_at(result: Any) -> float | None:
    try:
        return (Path(result.path) / "stage.done.json").stat().st_mtime
    except OSError:
        return None


def reused(result: Any) -> bool | None:
    """Whether `result` was finished before this call: a stage cache hit (`cached`), or a marker older than
    the current flow run (Prefect returns its cached task result with `cached` as it was stored).
    None when this cannot be told."""
    if result.cached:
        return True
    finished, started = _finished_at(result), _flow_run_started()
    if finished is None or started is None:
        return None
    return finished < started - 1.0


def summary_table(key: str, result: Any, description: str) -> None:
    """Counts and timings of a StageResult as a table artifact, each timing saying what it covers.

    The first row says whether the stage ran in this flow run or its earlier result was reused; the
    timings of a reused result are marked as measured when the stage ran.
    """
    finished = _finished_at(result)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(finished)) if finished is not None else "earlier"
    was_reused = reused(result)
    status = {True: f"reused: finished {when}, no stage work in this run (the timings are from then)",
              False: f"computed in this run (finished {when})",
              None: f"finished {when}"}[was_reused]
    rows = [{"name": "result", "value": status, "covers": "whether this run did the work"}]
    rows += [{"name": k, "value": v, "covers": "count"} for k, v in result.counts.items()]
    for k, v in result.timings.items():
        covers = TIMINGS.get(k, "seconds: measured by the stage when it ran")
        rows.append({"name": k, "value": v, "covers": covers + (REUSED_NOTE.format(when=when) if was_reused else "")})
    rows.append({"name": "cached", "value": bool(was_reused), "covers": "the stage's outputs were reused"})
    rows.append({"name": "path", "value": result.path, "covers": "stage directory"})
    table(key, rows, description + (" (reused result)" if was_reused else ""))

