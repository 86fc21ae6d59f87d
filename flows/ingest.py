"""Prefect flow of the ingest stage: one task cached on the stage fingerprint, a progress bar and a summary table."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows import artifacts
from flows.caching import fingerprint_key, run_stage, stage_run_name
from pcm.stages.ingest import IngestConfig, plan, run_ingest, verify
from pcm.stages.pipeline import StageRef, stage_config
from storage.layout import RunLayout
from storage.result import StageResult


@task(name="ingest", cache_key_fn=fingerprint_key(plan), result_serializer="json")
def ingest_task(config: IngestConfig, root: str, force: bool = False) -> StageResult:
    """Read the caption file into captions.parquet (or return the finished stage directory)."""
    layout = RunLayout(root)
    progress = artifacts.Progress(artifacts.stage_key("ingest", plan(config, layout).fingerprint), "Ingesting captions")
    return run_ingest(config, layout, force=force, progress=progress)


@task(name="ingest-artifacts")
def publish(result: StageResult) -> None:
    """Counts and timings for the dashboard (also when the ingest task was cached)."""
    artifacts.summary_table(artifacts.stage_key("ingest", result.fingerprint, "summary"), result, "Ingest stage counts and timings")


@flow(name="ingest", flow_run_name=stage_run_name("ingest", plan))
def ingest_flow(config: StageRef | IngestConfig | dict[str, Any], root: str = "runs",
                force: bool = False) -> StageResult:
    """Ingest one caption file; the same file content and config reuse the finished stage directory.

    `config`: the stage config, or a reference to one (`{"preset": "demo"}`, `{"from_run": DIR}`).
    """
    config = stage_config("ingest", config)
    result = run_stage(ingest_task, plan, verify, force=force, config=config, root=root)
    publish(result)
    return result
