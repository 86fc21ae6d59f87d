"""Prefect caching keyed on stage fingerprints, checked against the outputs on disk.

A stage task's cache key is `<stage>-<fingerprint>`, so a second run of the same config and
inputs shows the task as Cached, on any machine sharing the run root. Computing it (the stage's
`plan`) writes nothing: the stage directory appears when the task starts working in it. Before trusting a cache
hit, `run_stage` checks that the stage directory is complete (marker + `verify`); if not, the
task is forced to run again and its record refreshed. Cache records are JSON kept on this host,
outside the shared run root (flows/records.py).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from prefect import Task

from flows.records import results_dir
from pcm.stages.contract import as_result
from pcm.stages.pipeline import stage_config
from storage.layout import RunLayout, StageDir
from storage.result import StageResult

log = logging.getLogger(__name__)

Plan = Callable[..., StageDir]
Verify = Callable[[StageDir], "str | None"]


def planned(plan: Plan, parameters: dict[str, Any]) -> StageDir:
    """`plan` of a task's or flow's parameters: those it takes (`force` etc. are not content), the run root
    (`root`, a JSON parameter) as its layout."""
    names = set(inspect.signature(plan).parameters) - {"layout"}
    return plan(**{k: v for k, v in parameters.items() if k in names}, layout=RunLayout(parameters["root"]))


def fingerprint_key(plan: Plan) -> Callable[[Any, dict[str, Any]], str]:
    """A cache_key_fn: the stage name and fingerprint computed from the task's parameters."""

    def key(_context: Any, parameters: dict[str, Any]) -> str:
        sd = planned(plan, parameters)
        return f"{sd.stage}-{sd.fingerprint}"

    return key


def stage_run_name(stage: str, plan: Plan) -> Callable[[], str]:
    """A flow's `flow_run_name`: `<stage>-<fingerprint[:8]>`, the start of the stage directory's name, so a
    subflow run on the dashboard says which stage directory it works in (instead of a random name).

    Prefect calls it with no arguments inside the new flow run; the parameters, as passed (a StageRef or dict
    for `config`, results or directories for the inputs), come from the run context and the flow's defaults.
    A name that cannot be computed is only the stage name: naming never fails a run (the flow reports the
    error itself)."""
    takes = set(inspect.signature(plan).parameters) | {"root"}

    def name() -> str:
        from prefect.context import FlowRunContext

        try:
            ctx = FlowRunContext.get()
            bound = inspect.signature(ctx.flow.fn).bind_partial(**ctx.parameters)
            bound.apply_defaults()
            params = {k: _resolved(k, v) for k, v in bound.arguments.items() if k in takes}
            params["config"] = stage_config(stage, params["config"])
            return f"{stage}-{planned(plan, params).fingerprint[:8]}"
        except Exception as e:  # noqa: BLE001 - a run without its readable name still runs
            log.warning("%s: no run name from the fingerprint (%s)", stage, e)
            return stage

    return name


def _resolved(name: str, value: Any) -> Any:
    """A flow's input parameter as the stage takes it: a StageResult (or a pair of them, train's `val`), resolved
    from a directory's path; the config, the root and the other parameters as given."""
    if name in ("config", "root") or value is None or not isinstance(value, str | StageResult | tuple):
        return value
    return tuple(map(as_result, value)) if isinstance(value, tuple) else as_result(value)


def is_finished(plan: Plan, verify: Verify, **parameters: Any) -> bool:
    """The stage directory of these parameters is complete and its outputs verify."""
    sd = planned(plan, parameters)
    return sd.is_complete() and verify(sd) is None


def run_stage(task: Task, plan: Plan, verify: Verify, *, force: bool = False, **parameters: Any) -> Any:
    """Call a stage task, refreshing its cache when forced or when its outputs are missing.

    A task with a `force` parameter gets it, so a forced run redoes the work on disk too.
    """
    stale = force or not is_finished(plan, verify, **parameters)
    if "force" in inspect.signature(task.fn).parameters:
        parameters = {**parameters, "force": force}
    return task.with_options(refresh_cache=stale, result_storage=results_dir(parameters["root"]),
                             persist_result=True, result_serializer="json")(**parameters)
