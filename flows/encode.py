"""Prefect flow of the encode stage: one GPU-tagged task per feature shard, one for real images, then the stage task."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows.artifacts import Progress, picture, summary_table
from flows.caching import fingerprint_key, is_finished, run_stage
from flows.retries import retry_transient
from pcm.stages.encode import (
    FEATURES,
    REAL,
    EncodeConfig,
    cached_clip,
    encode_shards,
    feature_units,
    plan,
    reset_stage,
    run_encode,
    verify,
)
from pcm.stages.pipeline import StageRef, stage_config


@task(name="encode-reset")
def encode_reset(config: EncodeConfig, captions: str, shards: str, root: str) -> None:
    reset_stage(config, captions, shards, root)


@task(name="encode-features-shard", task_run_name="features-shard-{index:06d}", tags=["gpu"], retries=2,
      retry_delay_seconds=30, retry_condition_fn=retry_transient)
def encode_features_shard(config: EncodeConfig, captions: str, shards: str, root: str, index: int) -> dict:
    # Done shards are skipped on disk (their marker), so this task needs no Prefect cache.
    return {"index": index, **encode_shards(config, captions, shards, root, kind=FEATURES, indices=[index])}


@task(name="encode-real", task_run_name="real-images", tags=["gpu"], retries=2, retry_delay_seconds=30,
      retry_condition_fn=retry_transient)
def encode_real(config: EncodeConfig, captions: str, shards: str, root: str) -> dict:
    return encode_shards(config, captions, shards, root, kind=REAL)


@task(name="encode", tags=["gpu"], cache_key_fn=fingerprint_key(plan))
def encode_stage(config: EncodeConfig, captions: str, shards: str, root: str):
    return run_encode(config, captions, shards, root)


@flow(name="encode")
def encode_flow(config: StageRef | EncodeConfig | dict[str, Any], captions: str, shards: str, root: str = "runs",
                force: bool = False, indices: list[int] | None = None):
    """Encode every synthetic shard (one task each) and the real images, then write the stage-wide outputs.

    `config`: the stage config, or a reference to one (`{"preset": "demo"}`, `{"from_run": DIR}`).
    `indices`: only these feature shards, and nothing else (a fan-out child; the parent finalises).
    """
    config = stage_config("encode", config)
    if indices is not None:
        return [encode_features_shard(config, captions, shards, root, index) for index in sorted(set(indices))]
    if force:
        encode_reset(config, captions, shards, root)
    if force or not is_finished(plan, verify, config=config, captions=captions, shards=shards, root=root):
        indices = [u.index for u in feature_units(shards)]
        progress = Progress(f"encode-{plan(config, captions, shards, root).fingerprint}", "encode feature shards")
        for k, index in enumerate(indices, 1):
            encode_features_shard(config, captions, shards, root, index)
            progress(k, len(indices), f"features-shard-{index:06d}")
        encode_real(config, captions, shards, root)
    result = run_stage(encode_stage, plan, verify, force=force, config=config, captions=captions, shards=shards,
                       root=root)
    cached_clip.cache_clear()  # free the model (GPU memory) before the next stages
    summary_table(f"encode-{result.fingerprint}", result, "encode: counts and timings")
    for name, path in result.extra.get("pictures", {}).items():
        picture(f"encode-{name}-{result.fingerprint}", path, f"encode: {name.replace('_', ' ')} histogram")
    return result
