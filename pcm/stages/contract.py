"""The stage contract (`Stage`, the four names every stage module defines) and what every stage shares:
its directory from the fingerprint, the lock, the cache check, the final marker.

Planning is pure: `stage_dir` (each stage's `plan`) computes the fingerprint and what config.json is
to hold, and writes nothing, so Prefect's cache keys and "is it finished?" checks leave no trace.
`open_stage` creates the directory and writes config.json once, when work is about to start there:
`locked` opens the directory it locks, and the shard workers that write without the stage lock open
it themselves.

A stage's inputs are StageResults (the finished upstream stages), resolved once where a run starts
(the CLI, a flow, `run_pipeline`) with `as_result` from a stage directory's path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pcm.config import StageConfig
from storage import atomic, publish, remote
from storage.fingerprint import fingerprint
from storage.layout import RunLayout, StageDir
from storage.locks import lock_at
from storage.result import StageResult

log = logging.getLogger(__name__)

@runtime_checkable
class Stage(Protocol):
    """The contract of a stage module (pcm/stages/<stage>.py; DESIGN.md, "A stage is a function from manifests to
    a manifest"): four names, of which the Protocol can spell the two whose names are fixed.

    - `<Name>Config`: its pydantic StageConfig (RUNTIME fields left out of the fingerprint);
    - `plan(config, *inputs, layout) -> StageDir`: the stage directory of this config and these inputs (the
      upstream stages' StageResults), computed only, nothing written;
    - `verify(sd) -> str | None`: None when the outputs in `sd` are complete, else what is missing;
    - `run_<stage>(config, *inputs, layout, *, force, progress) -> StageResult`: the work, resumable, its marker
      written last; a finished directory is returned at once unless `force`.

    `layout` is the RunLayout of the run root. tests/test_stage_contract.py checks every stage module against it.
    """

    CODE_VERSION: str
    # Callables, not methods: the inputs differ by stage (ingest has none, evaluate three), so only the ends of
    # `plan`'s signature are common; the test checks them (config first, `layout` last).
    plan: Callable[..., StageDir]
    verify: Callable[[StageDir], str | None]


# A stage reports progress as `progress(done, total, message)` after each shard or step.
ProgressFn = Callable[[int, int, str], None]


# A stage's input: the StageResult of a finished stage, or the path of its directory.
StageInput = StageResult | str | os.PathLike


def stage_dir(layout: RunLayout, stage: str, config: StageConfig, inputs: Sequence[StageResult],
              code_version: str, extra: dict | None = None) -> StageDir:
    """The directory of this (stage, config, inputs, code) combination; computed only, nothing is written.

    Its `record` is the content of its config.json, which `open_stage` writes.
    """
    content = config.content() | (extra or {})
    fp = fingerprint(stage, content, [r.fingerprint for r in inputs], code_version)
    record = {"stage": stage, "code_version": code_version, "config": content,
              "inputs": {r.stage: r.fingerprint for r in inputs}}
    return dataclasses.replace(layout.stage(stage, fp), record=record)


def open_stage(sd: StageDir) -> StageDir:
    """Create the stage directory and write its config.json once (an existing one is kept); returns `sd`.

    Called when work is about to start there: by `locked`, and by the shard workers that write
    shards without the stage lock. `sd` must come from planning (`stage_dir`) unless the directory
    already has its config.json.
    """
    sd.path.mkdir(parents=True, exist_ok=True)
    if not sd.config_file.exists():
        if sd.record is None:
            raise ValueError(f"{sd.path}: no config.json, and this StageDir was not planned (it records no config); "
                             "open the StageDir the stage's plan() returns")
        atomic.write_json(sd.config_file, sd.record)
        publish.publish_files(sd.config_file)  # an object-store root: other workers see what the directory is
    return sd


def cached(sd: StageDir, verify: Callable[[StageDir], str | None] | None = None) -> StageResult | None:
    """The finished result of `sd` if its marker exists and `verify` finds nothing missing.

    `verify` returns None when the outputs are complete, else a reason; an incomplete stage
    has its marker removed so the rerun redoes what is missing.
    """
    if not sd.done_marker.exists() and not remote.fetch_tree(sd.path, sd.done_marker):
        return None
    problem = verify(sd) if verify else None
    if problem:
        log.warning("%s: outputs incomplete (%s); resuming", sd.path, problem)
        drop_marker(sd)
        return None
    publish.ensure_published(sd.path, sd.done_marker)  # an object-store root: a publish cut short is finished
    r = StageResult.load(sd.done_marker)
    return StageResult(**{**r.to_dict(), "cached": True})


def drop_marker(sd: StageDir, *, store: bool = False) -> None:
    """Forget that the stage is finished here (an incomplete stage, a rerun); `store=True` (a forced rerun) also
    withdraws its marker from an object-store root (storage.publish.withdraw: the copy read, by its ETag)."""
    if store:
        publish.withdraw(sd.done_marker)
    sd.done_marker.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(sd: StageDir, wait: float | None = 0.0) -> Iterator[None]:
    """Open the stage directory (`open_stage`), then hold its lock; `wait=0` fails fast naming the holder, `None` waits."""
    open_stage(sd)
    with lock_at(sd.lock_file, timeout=wait):
        yield


def finish(sd: StageDir, counts: dict[str, int], started: float, extra: dict | None = None,
           timings: dict[str, float] | None = None) -> StageResult:
    """Write the stage marker last and return the result."""
    result = StageResult(stage=sd.stage, fingerprint=sd.fingerprint, path=remote.public(sd.path), counts=counts,
                         timings={"total_s": round(time.monotonic() - started, 3), **(timings or {})},
                         extra=extra or {})
    result.save(sd.done_marker)
    # An object-store root: the outputs, then the marker; a stage another host committed first is its result.
    if not publish.publish_tree(sd.path, marker=sd.done_marker):
        return StageResult.load(sd.done_marker)
    return result


def check_stages(**inputs: tuple[StageResult | None, str]) -> None:
    """Each input, given by its parameter name as (its result or None, the stage it must come from), is that
    stage's result; else one error naming the parameter and what was passed."""
    for name, (r, want) in inputs.items():
        if r is not None and r.stage != want:
            raise ValueError(f"{name}={r.path!r} is a {r.stage} stage directory; pass the {want} stage's")


def check_made_from(result: StageResult, source: StageResult, name: str, source_name: str) -> None:
    """`result` was made from `source` (its config.json names `source`'s stage among its inputs, when it names one of
    that stage at all); else one error naming both and what to pass instead."""
    made_from = [sd.fingerprint for sd in result.stage_dir.inputs() if sd.stage == source.stage]
    if made_from and source.fingerprint not in made_from:
        raise ValueError(f"{name}={result.path!r} were made from the {source.stage} stage {made_from[0]} "
                         f"(its config.json's inputs), not from {source_name}={source.path!r} ({source.stage} "
                         f"{source.fingerprint}); pass the {source_name} the {name} were made from ({result.root}/"
                         f"{source.stage}/{made_from[0]}), or {result.stage} {name} from these {source_name}")


def load_result(path: str | Path) -> StageResult:
    """The result of a finished stage directory (given as a path), or a clear error."""
    marker = StageDir.at(path).done_marker   # a URL is fetched from the store (storage.remote)
    if not marker.exists():
        raise FileNotFoundError(f"{path}: not a finished stage directory (no {marker.name}); run that stage first")
    return StageResult.load(marker)


def as_result(x: StageInput) -> StageResult:
    """A stage input as a StageResult: `x` itself, or the result of the stage directory it names (`load_result`).

    A partial result (`extra["complete"] is False`: a synthesize call with shards still pending
    elsewhere) is no finished stage, and an error like a directory without its marker.
    """
    if not isinstance(x, StageResult):
        return load_result(x)
    if x.extra.get("complete") is False:
        raise FileNotFoundError(f"{x.path}: not a finished stage directory (this {x.stage} result is partial, "
                                "with work pending); finish that stage first")
    return x


def finished_like(layout: RunLayout, planned: StageDir, ignoring: str) -> StageDir | None:
    """A finished local stage whose config.json equals `planned`'s but for the config key `ignoring`.

    For inputs that may vanish once used (encode's real images: its fingerprint hashed a manifest of images that
    cannot be listed any more), the stage is found by the config.json `stage_dir` wrote from the same record, not
    by recomputing the fingerprint.
    """
    def without(record: dict[str, Any]) -> dict[str, Any]:
        return record | {"config": {k: v for k, v in record.get("config", {}).items() if k != ignoring}}

    want = without(planned.record or {})
    for sd in layout.stage_dirs(planned.stage):
        if sd.done_marker.exists() and sd.config_file.exists():
            rec = atomic.read_json(sd.config_file)
            if without(rec) == want:
                return dataclasses.replace(sd, record=rec)
    return None
