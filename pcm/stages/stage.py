"""What every stage shares: its directory from the fingerprint, the lock, the cache check, the final marker."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pcm.config import StageConfig
from storage import atomic
from storage.fingerprint import fingerprint
from storage.layout import RunLayout, StageDir
from storage.lock import FileLock
from storage.result import StageResult

log = logging.getLogger(__name__)

# A stage reports progress as `progress(done, total, message)` after each shard or step.
ProgressFn = Callable[[int, int, str], None]


def stage_dir(layout: RunLayout, stage: str, config: StageConfig, inputs: Sequence[StageResult],
              code_version: str, extra: dict | None = None) -> StageDir:
    """The directory of this (stage, config, inputs, code) combination; writes config.json once."""
    content = config.content() | (extra or {})
    fp = fingerprint(stage, content, [r.fingerprint for r in inputs], code_version)
    sd = layout.stage(stage, fp)
    sd.path.mkdir(parents=True, exist_ok=True)
    if not sd.config_file.exists():
        atomic.write_json(sd.config_file, {"stage": stage, "code_version": code_version, "config": content,
                                           "inputs": {r.stage: r.fingerprint for r in inputs}})
    return sd


def cached(sd: StageDir, verify: Callable[[StageDir], str | None] | None = None) -> StageResult | None:
    """The finished result of `sd` if its marker exists and `verify` finds nothing missing.

    `verify` returns None when the outputs are complete, else a reason; an incomplete stage
    has its marker removed so the rerun redoes what is missing.
    """
    if not sd.done_marker.exists():
        return None
    problem = verify(sd) if verify else None
    if problem:
        log.warning("%s: outputs incomplete (%s); resuming", sd.path, problem)
        sd.done_marker.unlink(missing_ok=True)
        return None
    r = StageResult.load(sd.done_marker)
    return StageResult(**{**r.to_dict(), "cached": True})


@contextlib.contextmanager
def locked(sd: StageDir, wait: float | None = 0.0) -> Iterator[None]:
    """Hold the stage lock; `wait=0` fails fast naming the holder, `None` waits."""
    with FileLock(sd.lock_file, timeout=wait):
        yield


def finish(sd: StageDir, counts: dict[str, int], started: float, extra: dict | None = None,
           timings: dict[str, float] | None = None) -> StageResult:
    """Write the stage marker last and return the result."""
    result = StageResult(stage=sd.stage, fingerprint=sd.fingerprint, path=str(sd.path), counts=counts,
                         timings={"total_s": round(time.monotonic() - started, 3), **(timings or {})},
                         extra=extra or {})
    result.save(sd.done_marker)
    return result


def load_result(path: str | Path) -> StageResult:
    """The result of a finished stage directory (given as a path), or a clear error."""
    marker = StageDir.at(path).done_marker
    if not marker.exists():
        raise FileNotFoundError(f"{path}: not a finished stage directory (no stage.done.json); run that stage first")
    return StageResult.load(marker)
