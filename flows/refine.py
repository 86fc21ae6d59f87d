"""Prefect flow of the refine stage: cached on its fingerprint; progress, summary and the pairs grid as artifacts."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows import artifacts
from flows.caching import fingerprint_key, run_stage, stage_run_name
from pcm.stages.contract import as_result
from pcm.stages.pipeline import StageRef, stage_config
from pcm.stages.refine import RefineConfig, plan, run_refine, verify
from storage.layout import RunLayout
from storage.result import StageResult


@task(name="refine", cache_key_fn=fingerprint_key(plan), tags=["gpu"])
def refine_task(config: RefineConfig, captions: StageResult, encode: StageResult, root: str,
                force: bool = False) -> StageResult:
    """Re-pair (SynC) or filter (CLIP score) the encode stage's pairs; writes pairs.parquet."""
    layout = RunLayout(root)
    progress = artifacts.Progress(artifacts.stage_key("refine", plan(config, captions, encode, layout).fingerprint),
                                  f"Refining pairs ({config.method})")
    return run_refine(config, captions, encode, layout, force=force, progress=progress)


@task(name="refine-artifacts")
def publish(result: StageResult) -> None:
    """The pairs grid and the summary for the dashboard (also when the task was cached)."""
    key = artifacts.stage_key("refine", result.fingerprint)
    for name, path in result.extra.get("pictures", {}).items():
        artifacts.picture(f"{key}-{name}", path, "Captions with their original and their re-assigned image",
                          result.root)
    artifacts.table(f"{key}-pairs", {k: result.extra.get(k) for k in (
        "method", "keep_fraction", "score_threshold", "clip_score_mean_before", "clip_score_mean_kept")},
        "What the refine stage kept")
    artifacts.summary_table(f"{key}-summary", result, "Refine stage counts and timings")


@flow(name="refine", flow_run_name=stage_run_name("refine", plan))
def refine_flow(config: StageRef | RefineConfig | dict[str, Any], captions: StageResult | str,
                encode: StageResult | str, root: str = "runs", force: bool = False) -> StageResult:
    """Choose which synthetic image each training caption trains on and which pairs train (SynC or CLIP filter).

    `config`: the stage config, or a reference to one (`{"preset": "demo"}`, `{"from_run": DIR}`).
    `captions`, `encode`: the ingest and encode stages' results, or their directories.
    """
    config = stage_config("refine", config)
    captions, encode = as_result(captions), as_result(encode)
    result = run_stage(refine_task, plan, verify, force=force, config=config, captions=captions, encode=encode,
                       root=root)
    publish(result)
    return result
