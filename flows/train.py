"""Prefect flow of the train stage: cached on its fingerprint, progress, loss curve and summary as artifacts."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows import artifacts
from flows.caching import fingerprint_key, run_stage, stage_run_name
from pcm.stages.contract import as_result
from pcm.stages.pipeline import StageRef, stage_config
from pcm.stages.train import TrainConfig, plan, run_train, verify
from storage.layout import RunLayout
from storage.result import StageResult


@task(name="train", cache_key_fn=fingerprint_key(plan), tags=["gpu"])
def train_task(config: TrainConfig, captions: StageResult, encode: StageResult, root: str,
               refine: StageResult | None = None, force: bool = False,
               val: tuple[StageResult, StageResult] | None = None) -> StageResult:
    """Train or resume PCM-Net (the stage resumes from its latest checkpoint on disk)."""
    layout = RunLayout(root)
    sd = plan(config, captions, encode, layout, refine=refine, val=val)
    progress = artifacts.Progress(artifacts.stage_key("train", sd.fingerprint),
                                  "Training PCM-Net")
    return run_train(config, captions, encode, layout, force=force, progress=progress, refine=refine, val=val)


@task(name="train-artifacts")
def publish(result: StageResult) -> None:
    """Loss curve and summary for the dashboard (also when the task was cached)."""
    key = artifacts.stage_key("train", result.fingerprint)
    for name, path in result.extra.get("pictures", {}).items():
        artifacts.picture(f"{key}-{name}", path, "PCM-Net training loss and validation", result.root)
    artifacts.table(f"{key}-best", {"val_metric": result.extra["val_metric"], "best_value": result.extra["best_value"],
                                    "best_step": result.extra["best_step"], "best": result.extra["best"]},
                    "Best checkpoint by validation")
    artifacts.summary_table(f"{key}-summary", result, "Train stage counts and timings")


@flow(name="train", flow_run_name=stage_run_name("train", plan))
def train_flow(config: StageRef | TrainConfig | dict[str, Any], captions: StageResult | str,
               encode: StageResult | str, root: str = "runs", force: bool = False,
               refine: StageResult | str | None = None,
               val: tuple[StageResult, StageResult] | None = None) -> StageResult:
    """Train PCM-Net on an encode stage's synthetic-image features (val split picks best/).

    `config`: the stage config, or a reference to one (`{"preset": "demo"}`, `{"from_run": DIR}`;
    StageRef comes first, so `{"preset": "tiny"}` is the tiny pipeline's train section).
    `captions`, `encode`: the ingest and encode stages' results, or their directories (a deployment's
    parameters), resolved here. `refine` (optional): a refine stage's, whose kept pairs are trained on; `val`:
    validate on another data set's (ingest, encode) results.
    """
    config = stage_config("train", config)
    captions, encode = as_result(captions), as_result(encode)
    # Absent inputs are not passed at all: the task's cache key is then the one it had before they existed.
    refined = {"refine": as_result(refine)} if refine is not None else {}
    validated = {"val": val} if val is not None else {}
    result = run_stage(train_task, plan, verify, force=force, config=config, captions=captions, encode=encode,
                       root=root, **refined, **validated)
    publish(result)
    return result
