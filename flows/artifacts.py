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


def in_root(path: str | Path, root: str | Path | None) -> str:
    """A path as the dashboard shows it: relative to the run root (`encode/<fp>/pictures/x.png`), never a
    machine path; a path outside the root (or with no root known) is shown by its file name only."""
    text, base = str(path), str(root).rstrip("/") if root is not None else None
    if base and text.startswith(base + "/"):
        return text[len(base) + 1:]
    return Path(text).name


def stage_key(stage: str, fingerprint: str, *parts: str) -> str:
    """A stage's artifact key: `<stage>-<fingerprint[:8]>[-<part>...]`, readable, and with the stage
    subflow's run name (flows.caching.stage_run_name) as its start. Eight hex digits name one stage directory
    among a run root's (a clash needs about 65,000 directories of the same stage)."""
    return artifact_key(stage, fingerprint[:8], *parts)


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


def embedded_image(path: str | Path, title: str, max_side: int = 960, max_bytes: int = 400_000,
                   root: str | Path | None = None) -> str:
    """Markdown showing a stage's picture inline: a JPEG thumbnail at most `max_side` px (the file stays on disk)."""
    import io

    from PIL import Image

    path = Path(path)
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
    data = buf.getvalue()
    if len(data) > max_bytes:
        return f"Picture too large to embed ({len(data)} bytes): `{in_root(path, root)}`"
    return f"![{title}](data:image/jpeg;base64,{base64.b64encode(data).decode()})"


def _digest(path: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _already_published(key: str, digest: str) -> bool:
    """Whether the newest artifact under `key` already shows a picture of this content (no re-upload)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    try:
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=5)
    except Exception as e:  # noqa: BLE001 - a dashboard hiccup means publishing again, not failing
        log.warning("could not read artifact %s: %s", key, e)
        return False
    return any(digest in (a.description or "") for a in found)


def picture(key: str, path: str | Path, title: str, root: str | Path | None = None) -> None:
    """A picture written by a stage, as a markdown artifact with an inline thumbnail and its path relative to the
    run root `root`; skipped when the newest artifact under the key already shows the same file content (a cached
    rerun re-uploads nothing)."""
    key, digest = artifact_key(key), _digest(path)
    if _already_published(key, digest):
        return
    body = f"{embedded_image(path, title, root=root)}\n\n`{in_root(path, root)}`"
    create_markdown_artifact(key=key, markdown=f"### {title}\n\n{body}\n", description=f"{title} [sha256 {digest}]")


def report(key: str, path: str | Path, pictures: Mapping[str, str], description: str) -> None:
    """A markdown report whose relative picture links become inline thumbnails; not re-uploaded when unchanged."""
    path = Path(path)
    digest = _digest(path)
    key = artifact_key(key)
    if _already_published(key, digest):
        return
    by_name = {Path(p).name: p for p in pictures.values()}
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"!\[(.*)\]\((.+)\)$", line.strip())
        if m and Path(m.group(2)).name in by_name:
            line = embedded_image(by_name[Path(m.group(2)).name], m.group(1))
        elif m:
            line = f"(picture `{m.group(2)}` beside the report)"
        out.append(line)
    create_markdown_artifact(key=key, markdown="\n".join(out) + "\n", description=f"{description} [sha256 {digest}]")


def pipeline_summary(results: Mapping[str, Any]) -> str:
    """Markdown for the parent run: each stage, reused or computed, where its outputs are (relative to the run
    root; evaluate's report.md), its main counts, then the metrics beside the language-only control."""
    lines = ["# synth-and-train", "", "| stage | this run | outputs (in the run root) | counts |", "|---|---|---|---|"]
    for stage, r in results.items():
        state = "reused" if reused(r) else "computed"
        counts = ", ".join(f"{k} {v}" for k, v in list(r.counts.items())[:6])
        where = in_root(r.path, r.root)
        outputs = f"`{where}/`" + (f", `{where}/{r.stage_dir.report.name}`" if r.stage == "evaluate" else "")
        lines.append(f"| {stage} | {state} | {outputs} | {counts} |")
    lines += ["", "Each stage's own artifacts (progress, tables, pictures, the evaluation report) are on its "
              "subflow run, named `<stage>-<fingerprint[:8]>` like their keys."]
    if "evaluate" in results:
        metrics_file = results["evaluate"].stage_dir.metrics
        if metrics_file.is_file():
            import json

            m = json.loads(metrics_file.read_text(encoding="utf-8"))
            scores = {k: v for k, v in m.get("metrics", {}).items() if isinstance(v, float)}
            control = (m.get("control") or {}).get("metrics") or {}
            if control:  # the same captions scored against another image's references: language only
                lines += ["", "| metric (x100) | value | control |", "|---|---:|---:|"]
                lines += [f"| {k} | {100 * v:.1f} | {_x100(control.get(k))} |" for k, v in scores.items()]
                lines += ["", f"Control: {m['control'].get('how', 'a language-only baseline')}. A captioner that "
                          "uses its image scores above it."]
            else:
                lines += ["", "| metric (x100) | value |", "|---|---:|"]
                lines += [f"| {k} | {100 * v:.1f} |" for k, v in scores.items()]
            published = m.get("published") or {}
            if published.get("caveat"):
                lines += ["", f"Paper numbers ({published.get('paper_title', '')}): {published['caveat']}"]
    return "\n".join(lines) + "\n"


def _x100(value: Any) -> str:
    return f"{100 * value:.1f}" if isinstance(value, float) else "-"


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
        return result.stage_dir.done_marker.stat().st_mtime
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
    rows.append({"name": "path", "value": in_root(result.path, result.root),
                 "covers": "stage directory, relative to the run root"})
    table(key, rows, description + (" (reused result)" if was_reused else ""))

