"""Prefect flow of the encode stage: one GPU-tagged task per feature shard, one for real images, then the stage task."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, task

from flows.artifacts import Progress, picture, stage_key, summary_table
from flows.caching import fingerprint_key, is_finished, run_stage, stage_run_name
from flows.retries import retry_transient
from pcm.stages.contract import as_result
from pcm.stages.encode import (
    FEATURES,
    REAL,
    EncodeConfig,
    cached_clip,
    encode_shards,
    pending_feature_shards,
    plan,
    reset_stage,
    run_encode,
    verify,
)
from pcm.stages.pipeline import StageRef, stage_config
from storage import remote
from storage.layout import RunLayout, shard_name
from storage.result import StageResult


@task(name="encode-reset")
def encode_reset(config: EncodeConfig, captions: StageResult, shards: StageResult, root: str) -> None:
    reset_stage(config, captions, shards, RunLayout(root))


def _features_run_name(parameters: dict[str, Any]) -> str:
    """The feature shard task's run name on the dashboard: `features-` and the shard's name (no planning)."""
    return f"features-{shard_name(parameters['index'])}"


@task(name="encode-features-shard", task_run_name=_features_run_name, tags=["gpu"], retries=2,
      retry_delay_seconds=30, retry_condition_fn=retry_transient)
def encode_features_shard(config: EncodeConfig, captions: StageResult, shards: StageResult, root: str,
                          index: int) -> dict:
    # Done shards are skipped on disk (their marker), so this task needs no Prefect cache.
    return {"index": index, **encode_shards(config, captions, shards, RunLayout(root), kind=FEATURES, indices=[index])}


@task(name="encode-real", task_run_name="real-images", tags=["gpu"], retries=2, retry_delay_seconds=30,
      retry_condition_fn=retry_transient)
def encode_real(config: EncodeConfig, captions: StageResult, shards: StageResult, root: str) -> dict:
    return encode_shards(config, captions, shards, RunLayout(root), kind=REAL)


@task(name="encode", tags=["gpu"], cache_key_fn=fingerprint_key(plan))
def encode_stage(config: EncodeConfig, captions: StageResult, shards: StageResult, root: str) -> StageResult:
    return run_encode(config, captions, shards, RunLayout(root))


def shards_encoded(config: EncodeConfig, captions: StageResult, shards: StageResult, root: str,
                   reports: list[dict], started: float) -> StageResult:
    """A fan-out child's result: no finished stage (`extra["complete"]` False), its shard tasks' reports in
    `extra["shard_reports"]`, their counts summed."""
    sd = plan(config, captions, shards, RunLayout(root))
    return StageResult(stage=sd.stage, fingerprint=sd.fingerprint, path=remote.public(sd.path),
                       counts={k: sum(r.get(k, 0) for r in reports) for k in ("encoded", "units")},
                       timings={"total_s": round(time.monotonic() - started, 3)},
                       extra={"complete": False, "shard_reports": reports})


@flow(name="encode", flow_run_name=stage_run_name("encode", plan))
def encode_flow(config: StageRef | EncodeConfig | dict[str, Any], captions: StageResult | str,
                shards: StageResult | str | None, root: str = "runs", force: bool = False,
                indices: list[int] | None = None) -> StageResult:
    """Encode every synthetic shard (one task each) and the real images, then write the stage-wide outputs.

    `config`: the stage config, or a reference to one (`{"preset": "demo"}`, `{"from_run": DIR}`).
    `captions`, `shards`: the ingest and synthesize stages' results, or their directories (a deployment's
    parameters), resolved here; `shards` None: a real-only stage (an evaluation source's val/test images).
    `indices`: only these feature shards, and nothing else (a fan-out child; the parent finalises): the
    result is then a partial one, `extra["complete"]` False with the shard reports.
    """
    started = time.monotonic()
    config = stage_config("encode", config)
    captions, shards = as_result(captions), None if shards is None else as_result(shards)
    if indices is not None:
        reports = [encode_features_shard(config, captions, shards, root, index) for index in sorted(set(indices))]
        return shards_encoded(config, captions, shards, root, reports, started)
    if force:
        encode_reset(config, captions, shards, root)
    if force or not is_finished(plan, verify, config=config, captions=captions, shards=shards, root=root):
        layout = RunLayout(root)
        indices = pending_feature_shards(config, captions, shards, layout)  # shards done by fan-out children: no task
        sd = plan(config, captions, shards, layout)
        progress = Progress(stage_key("encode", sd.fingerprint), "encode feature shards")
        for k, index in enumerate(indices, 1):
            encode_features_shard(config, captions, shards, root, index)
            progress(k, len(indices), f"features-{sd.shard_name(index)}")
        encode_real(config, captions, shards, root)
    result = run_stage(encode_stage, plan, verify, force=force, config=config, captions=captions, shards=shards,
                       root=root)
    cached_clip.cache_clear()  # free the model (GPU memory) before the next stages
    summary_table(stage_key("encode", result.fingerprint, "summary"), result, "encode: counts and timings")
    for name, path in result.extra.get("pictures", {}).items():
        picture(stage_key("encode", result.fingerprint, name), path, f"encode: {name.replace('_', ' ')} histogram",
                result.root)
    return result
