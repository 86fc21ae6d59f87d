"""The `synth-and-train` DAG: ingest -> synthesize -> encode -> [refine] -> train -> evaluate, each a subflow.

refine runs only when the config enables it (`refine.enabled`); train then trains on its pairs.

Its one parameter is a typed `PipelineParams` (preset + overrides); Prefect validates it, and
with it every stage config, before anything runs. Stages pass only small StageResults (paths,
fingerprints, counts). With `synthesize_fanout=N` (`encode_fanout=N`), shards are rendered (encoded)
by N child flow runs of the `synthesize/default` (`encode/default`) deployment, so every worker on the
pool (one per GPU host) takes a part; the parent then finalises the stage.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows import artifacts
from flows.encode import encode_flow
from flows.evaluate import evaluate_flow
from flows.ingest import ingest_flow
from flows.refine import refine_flow
from flows.synthesize import synthesize_flow
from flows.train import train_flow
from pcm.stages import encode, synthesize
from pcm.stages.pipeline import STAGE_ORDER, PipelineConfig, check_evaluable, enabled, resolve
from storage.layout import RunLayout
from storage.result import StageResult

Stage = Literal["ingest", "synthesize", "encode", "refine", "train", "evaluate"]


class PipelineParams(BaseModel):
    """A preset name (or .toml path) plus dotted overrides, resolved and validated as a whole."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = Field("demo", description="pipeline preset: demo (toy world), tiny (random weights), coco-vitl14, coco-vitb32, flickr30k-vitl14, or a .toml path")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description='dotted parameters, e.g. {"synthesize.guidance_scale": 5.0}')
    root: str = Field("runs", description="run root shared by every worker: a local path or mount, or "
                      "s3://bucket/prefix (each worker then keeps a local working copy)")
    force: list[Stage] = Field(default_factory=list, description="stages to redo even when finished")
    stop_after: Stage = Field("evaluate", description="last stage to run")
    synthesize_fanout: int = Field(0, ge=0, le=1024,
                                   description="render shards in N child flow runs on the work pool (0: in this run)")
    encode_fanout: int = Field(0, ge=0, le=1024,
                               description="encode feature shards in N child flow runs on the work pool (0: in this run)")

    @model_validator(mode="after")
    def _resolves(self) -> PipelineParams:
        resolve(self.preset, self.overrides)  # raises a ValueError naming every bad parameter
        return self

    def config(self) -> PipelineConfig:
        return resolve(self.preset, self.overrides)


def fan_out_synthesis(cfg: PipelineConfig, captions: StageResult, root: str, parts: int) -> None:
    """Split the pending shards into `parts` child flow runs of synthesize/default and wait for all of them.

    The children get their inputs as JSON parameters (the stage directories) and resolve them themselves.
    A finished stage has none pending, so it starts no child; a resumed one splits what is left."""
    fan_out("synthesize/default", synthesize.pending_shards(cfg.synthesize, captions, RunLayout(root)), parts, "shards",
            {"config": cfg.synthesize.model_dump(mode="json"), "captions": captions.path, "root": root})


def fan_out_encoding(cfg: PipelineConfig, captions: StageResult, shards: StageResult, root: str, parts: int) -> None:
    """Split the pending feature shards into `parts` child flow runs of encode/default and wait; the parent
    finalises. As for synthesis, a finished stage starts no child."""
    pending = encode.pending_feature_shards(cfg.encode, captions, shards, RunLayout(root))
    fan_out("encode/default", pending, parts, "indices",
            {"config": cfg.encode.model_dump(mode="json"), "captions": captions.path, "shards": shards.path,
             "root": root})


def fan_out(deployment: str, indices: list[int], parts: int, key: str, parameters: dict[str, Any]) -> None:
    """Run `deployment` as up to `parts` child flow runs, each given every parts-th shard index under `key`,
    and block until all are final; a failed child fails the parent. No index, no child."""
    if not indices:
        return
    groups = [indices[i::parts] for i in range(min(parts, len(indices)))]
    runs = [run_deployment(deployment, timeout=0, parameters={**parameters, key: g}) for g in groups]
    with get_client(sync_client=True) as client:  # block until every child is final; a failed one fails us
        pending = {r.id: r.name for r in runs}
        while pending:
            for run_id, name in list(pending.items()):
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_final():
                    del pending[run_id]
                    if not state.is_completed():
                        raise RuntimeError(f"{deployment} child flow run {name} ended {state.name}; rerun the "
                                           "pipeline to resume (finished shards are kept)")
            time.sleep(2)


def run_name() -> str:
    """`synth-and-train-<preset>` (a preset file's stem), the parent run's name on the dashboard."""
    from pathlib import Path

    from prefect.context import FlowRunContext

    params = FlowRunContext.get().parameters.get("config") or {}
    preset = (params.get("preset", PipelineParams.model_fields["preset"].default) if isinstance(params, dict)
              else params.preset)
    return artifacts.artifact_key("synth-and-train", Path(str(preset)).stem)


@flow(name="synth-and-train", log_prints=True, flow_run_name=run_name)
def synth_and_train(config: PipelineParams = PipelineParams()) -> dict[str, StageResult]:
    """Caption text -> synthetic images -> CLIP features -> PCM-Net -> metrics on real images."""
    params = config
    cfg, root, force = params.config(), params.root, set(params.force)
    last = STAGE_ORDER.index(params.stop_after)

    def runs(stage: str) -> bool:
        return STAGE_ORDER.index(stage) <= last and enabled(cfg, stage)

    out: dict[str, StageResult] = {}
    check_evaluable(cfg, RunLayout(root), params.stop_after)  # a run evaluate could not score stops before any stage
    # Each stage gets the StageResults of the stages before it.
    out["ingest"] = ingest_flow(cfg.ingest, root, force="ingest" in force)
    if runs("synthesize"):
        if params.synthesize_fanout:
            fan_out_synthesis(cfg, out["ingest"], root, params.synthesize_fanout)
        out["synthesize"] = finished(synthesize_flow(cfg.synthesize, out["ingest"], root, force="synthesize" in force))
    if runs("encode"):
        if params.encode_fanout:
            fan_out_encoding(cfg, out["ingest"], out["synthesize"], root, params.encode_fanout)
        out["encode"] = encode_flow(cfg.encode, out["ingest"], out["synthesize"], root, force="encode" in force)
    if runs("refine"):
        out["refine"] = refine_flow(cfg.refine, out["ingest"], out["encode"], root, force="refine" in force)
    if runs("train") and cfg.eval_source is not None:  # validation and evaluate read another data set
        out["eval_ingest"] = ingest_flow(cfg.eval_source.ingest(), root)
        out["eval_encode"] = encode_flow(cfg.eval_source.encode(cfg.encode), out["eval_ingest"], None, root)
    val = (out["eval_ingest"], out["eval_encode"]) if "eval_encode" in out else None
    if runs("train"):
        out["train"] = train_flow(cfg.train, out["ingest"], out["encode"], root, force="train" in force,
                                  refine=out.get("refine"), val=val)
    if runs("evaluate"):
        captions, encode = val or (out["ingest"], out["encode"])
        out["evaluate"] = evaluate_flow(cfg.evaluate, out["train"], encode, captions, root,
                                        force="evaluate" in force)
    publish_summary(out)
    return out


def finished(result: StageResult) -> StageResult:
    """A stage subflow's result, which must be the finished stage (not a partial one with shards pending)."""
    if result.extra.get("complete") is False:
        pending = result.counts.get("shards_pending", "some")
        raise RuntimeError(f"{result.stage}: {pending} shard(s) of {result.path} are still pending after this run "
                           "rendered its own; rerun the pipeline to finish them (finished shards are kept)")
    return result


@task(name="pipeline-summary")
def publish_summary(results: dict[str, StageResult]) -> None:
    """The parent run's own artifact: each stage reused or computed, its outputs, the metrics."""
    # The last stage's fingerprint sees every stage before it: one key per pipeline, readable.
    last = list(results.values())[-1]
    key = artifacts.artifact_key("synth-and-train", last.stage, last.fingerprint[:8])
    artifacts.markdown(key, artifacts.pipeline_summary(results), "What each stage of this run did")
