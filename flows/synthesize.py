"""Prefect flow of the synthesize stage: one GPU-tagged task per shard, then a finalize task."""

from __future__ import annotations

import functools
import time
from typing import Any

from prefect import flow, task

from flows.artifacts import Progress, picture, stage_key, summary_table, table
from flows.caching import fingerprint_key, is_finished, run_stage, stage_run_name
from flows.records import results_dir
from flows.retries import retry_transient
from pcm.diffusion import Synthesizer
from pcm.image_sources import ImportedImages, PairedImages
from pcm.stages.contract import as_result
from pcm.stages.pipeline import StageRef, stage_config
from pcm.stages.synthesize import (
    SynthesizeConfig,
    finalize,
    make_generator,
    num_shards,
    partial_result,
    pending_shards,
    plan,
    run_synthesize,
    verify,
)
from pcm.toyworld.faithfulness import stage_report, table_rows
from pcm.toyworld.manifest import is_shipped
from pcm.toyworld.wording import train_texts, unfamiliar, warning
from storage.layout import RunLayout, shard_name
from storage.result import StageResult
from storage.shards import is_done


def _shard_key(_context: Any, parameters: dict[str, Any]) -> str:
    sd = plan(parameters["config"], parameters["captions"], RunLayout(parameters["root"]))
    return f"{sd.stage}-{sd.fingerprint}-{sd.shard_name(parameters['index'])}"


def _shard_run_name(parameters: dict[str, Any]) -> str:
    """The shard task's run name on the dashboard: the shard's (`shard-000003`), without planning the stage."""
    return shard_name(parameters["index"])


@task(name="synthesize-shard", task_run_name=_shard_run_name, tags=["gpu"], retries=2,
      retry_delay_seconds=30, retry_condition_fn=retry_transient, cache_key_fn=_shard_key)
def synthesize_shard(config: SynthesizeConfig, captions: StageResult, root: str, index: int, force: bool = False) -> dict:
    r = run_synthesize(config, captions, RunLayout(root), shards=[index], force=force, finalize_when_complete=False,
                       synthesizer=loaded_synthesizer(config.model_dump_json()))
    return {"index": index, **r.counts}


@functools.lru_cache(maxsize=1)
def loaded_synthesizer(config_json: str) -> Synthesizer | PairedImages | ImportedImages:
    """One loaded (and compiled) pipeline per flow-run process, shared by its shard tasks."""
    return make_generator(SynthesizeConfig.model_validate_json(config_json))


@task(name="synthesize-finalize", cache_key_fn=fingerprint_key(plan))
def synthesize_finalize(config: SynthesizeConfig, captions: StageResult, root: str) -> StageResult:
    return finalize(config, captions, RunLayout(root))


def run_shard(config: SynthesizeConfig, captions: StageResult, root: str, index: int, force: bool) -> dict:
    """The shard task, its cache trusted only while the shard is done on disk."""
    stale = force or not is_done(plan(config, captions, RunLayout(root)).image_shard(index))
    return synthesize_shard.with_options(refresh_cache=stale, result_storage=results_dir(root), persist_result=True,
                                         result_serializer="json")(config, captions, root, index, force)


def shard_indices(config: SynthesizeConfig, captions: StageResult, shards: list[int] | None) -> list[int]:
    return sorted(set(shards)) if shards is not None else list(range(num_shards(config, captions)))


def shards_written(config: SynthesizeConfig, captions: StageResult, root: str, reports: list[dict],
                   started: float) -> StageResult:
    """The partial result of a run that rendered its shards while others are pending: `extra["complete"]` False,
    its shard tasks' reports in `extra["shard_reports"]`, their counts summed."""
    counts = {k: sum(r.get(k, 0) for r in reports) for k in ("ok", "failed", "shards_written")}
    return partial_result(plan(config, captions, RunLayout(root)), num_shards(config, captions), counts, started,
                          extra={"shard_reports": reports})


@flow(name="synthesize", flow_run_name=stage_run_name("synthesize", plan))
def synthesize_flow(config: StageRef | SynthesizeConfig | dict[str, Any], captions: StageResult | str,
                    root: str = "runs", shards: list[int] | None = None, force: bool = False) -> StageResult:
    """Render the shards (all, or `shards` when fanning out over machines), then finalise the stage.

    `config`: the stage config, or a reference to one (`{"preset": "demo"}`, `{"from_run": DIR}`).
    `captions`: the ingest stage's result, or its directory (a deployment's parameter), resolved here.
    Returns the finished stage's result, or, when shards outside this run's are still pending (a
    fan-out child), a partial one: `extra["complete"]` False and this run's shard reports.
    """
    started = time.monotonic()
    config = stage_config("synthesize", config)
    captions = as_result(captions)
    toy = judged_by_toy_clip(config)
    if toy:
        wording_check(captions)
    if force or not is_finished(plan, verify, config=config, captions=captions, root=root):
        indices = shard_indices(config, captions, shards)
        sd = plan(config, captions, RunLayout(root))
        progress = Progress(stage_key("synthesize", sd.fingerprint), "synthesize shards")
        done = []
        for k, index in enumerate(indices, 1):
            done.append(run_shard(config, captions, root, index, force))
            progress(k, len(indices), sd.shard_name(index))
        loaded_synthesizer.cache_clear()  # free the pipeline (GPU memory) before the next stages
        if pending_shards(config, captions, RunLayout(root)):
            # Other flow runs own the remaining shards; the last one finalises.
            return shards_written(config, captions, root, done, started)
    result = run_stage(synthesize_finalize, plan, verify, force=force, config=config, captions=captions, root=root)
    summary_table(stage_key("synthesize", result.fingerprint, "summary"), result, "synthesize: counts and timings")
    for name, path in result.extra.get("pictures", {}).items():
        picture(stage_key("synthesize", result.fingerprint, name), path, f"synthesize: {name}", result.root)
    if toy:
        report = synthesize_faithfulness(result)
        table(stage_key("synthesize", result.fingerprint, "faithfulness"), table_rows(report),
              f"synthesize: faithfulness of {report['images']} images to their captions, judged by the toy CLIP "
              "(pcm world quality --synthesize; docs/toyworld.md)")
    return result


def judged_by_toy_clip(config: SynthesizeConfig) -> bool:
    """Whether the stage's images come from the shipped toy text-to-image model (by its files' content), so the
    toy CLIP can judge them against their captions."""
    return config.source == "generated" and is_shipped(config.model, "t2i")


@task(name="synthesize-wording")
def wording_check(captions: StageResult) -> dict:
    """Words of the training captions that the toy text-to-image model never saw: a warning in the log and a
    table on the dashboard above pcm.toyworld.wording's threshold."""
    from prefect import get_run_logger

    report = unfamiliar(train_texts(captions.stage_dir))
    if message := warning(report):
        get_run_logger().warning(message)
        table("synthesize-unfamiliar-words", {k: v for k, v in report.items() if k != "examples"} |
              {"examples": ", ".join(report["examples"])}, f"synthesize: {message}")
    return report


@task(name="synthesize-faithfulness")
def synthesize_faithfulness(result: StageResult) -> dict:
    """The stage's faithfulness report, computed once and kept in the stage directory (faithfulness.json)."""
    return stage_report(result.stage_dir)
