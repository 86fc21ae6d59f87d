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
from collections.abc import Callable
from typing import Any

from prefect import Task

from flows.records import results_dir
from storage.layout import StageDir

Plan = Callable[..., StageDir]
Verify = Callable[[StageDir], "str | None"]


def fingerprint_key(plan: Plan) -> Callable[[Any, dict[str, Any]], str]:
    """A cache_key_fn: the stage name and fingerprint computed from the task's parameters."""

    names = set(inspect.signature(plan).parameters)

    def key(_context: Any, parameters: dict[str, Any]) -> str:
        sd = plan(**{k: v for k, v in parameters.items() if k in names})  # `force` etc. are not content
        return f"{sd.stage}-{sd.fingerprint}"

    return key


def is_finished(plan: Plan, verify: Verify, **parameters: Any) -> bool:
    """The stage directory of these parameters is complete and its outputs verify."""
    sd = plan(**parameters)
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
