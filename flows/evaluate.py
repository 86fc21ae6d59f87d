"""Prefect flow of the evaluate stage: cached on its fingerprint, metrics table and report as artifacts."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows import artifacts
from flows.caching import fingerprint_key, run_stage, stage_run_name
from pcm.report import LABELS
from pcm.stages.contract import as_result
from pcm.stages.evaluate import EvaluateConfig, plan, run_evaluate, verify
from pcm.stages.pipeline import StageRef, stage_config
from storage import atomic
from storage.layout import RunLayout
from storage.result import StageResult


@task(name="evaluate", cache_key_fn=fingerprint_key(plan), tags=["gpu"])
def evaluate_task(config: EvaluateConfig, train: StageResult, encode: StageResult, captions: StageResult, root: str,
                  force: bool = False) -> StageResult:
    """Decode and score (the stage skips work already on disk)."""
    layout = RunLayout(root)
    sd = plan(config, train, encode, captions, layout)
    progress = artifacts.Progress(artifacts.stage_key("evaluate", sd.fingerprint),
                                  "Captioning real images")
    return run_evaluate(config, train, encode, captions, layout, force=force, progress=progress)


@task(name="evaluate-artifacts")
def publish(result: StageResult) -> None:
    """Metrics table, paper comparison, report and thumbnails for the dashboard (also when cached)."""
    summary = atomic.read_json(result.stage_dir.metrics)
    metrics = summary["metrics"]
    control = (summary.get("control") or {}).get("metrics") or {}

    def x100(v: object) -> object:
        return round(100 * v, 2) if isinstance(v, float) else v

    # The control column: the same captions scored against another image's references (language only).
    rows = [{"metric": label, "value (x100)": x100(metrics.get(k))}
            | ({"control (x100)": x100(control.get(k)) if k != "SPICE" else "-"} if control else {})
            for k, label in LABELS.items()]
    key = artifacts.stage_key("evaluate", result.fingerprint, summary["split"])
    artifacts.table(key, rows, f"{summary['split']} split, {summary['protocol']}, step {summary['checkpoint']['step']}")
    if summary.get("published"):
        artifacts.table(f"{key}-paper", summary["published"]["rows"], summary["published"]["title"])
        if len(summary["published"].get("methods") or []) > 1:
            artifacts.table(f"{key}-methods", summary["published"]["methods"],
                            "Published methods in this setting, for reference: "
                            + summary["published"].get("paper_title", summary["published"]["title"]))
    # The report links its thumbnail grid by relative path, which the dashboard cannot follow: the
    # artifact shows it inline instead (a JPEG thumbnail), numbered as the samples table.
    artifacts.report(f"{key}-report", result.stage_dir.report, result.extra.get("pictures", {}), "Evaluation report")
    artifacts.summary_table(f"{key}-summary", result, "Evaluate stage counts and timings")


@flow(name="evaluate", flow_run_name=stage_run_name("evaluate", plan))
def evaluate_flow(config: StageRef | EvaluateConfig | dict[str, Any], train: StageResult | str,
                  encode: StageResult | str, captions: StageResult | str, root: str = "runs",
                  force: bool = False) -> StageResult:
    """Caption a split's real images with a trained model and score them with the COCO caption metrics.

    `config`: the stage config, or a reference to one (`{"preset": "demo"}`, `{"from_run": DIR}`).
    `train`, `encode`, `captions`: those stages' results, or their directories (a deployment's
    parameters), resolved here.
    """
    config = stage_config("evaluate", config)
    train, encode, captions = as_result(train), as_result(encode), as_result(captions)
    result = run_stage(evaluate_task, plan, verify, force=force, config=config, train=train, encode=encode,
                       captions=captions, root=root)
    publish(result)
    return result
