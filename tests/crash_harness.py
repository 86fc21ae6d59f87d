"""Crash harness: run a stage in a subprocess, SIGKILL it at seeded random moments, rerun to the end.

Kills alternate between two kinds of moments: early (during imports and model loading, a
random delay) and mid-work (a random delay after the stage has made new progress on disk), so
every landed kill interrupts real work. After each kill the on-disk invariants are checked.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One stage of the tiny (random-weight) pipeline (earlier stages reused from disk) with config overrides.
RUNNER = """
import json, sys
from pcm.stages.pipeline import resolve, run_pipeline
root, stage, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
run_pipeline(resolve("tiny", overrides), root, stages=(stage,))
"""


def run_stage(root: Path, stage: str, overrides: dict, timeout: float = 900) -> None:
    """Run to completion in a subprocess (the uninterrupted reference, and the final rerun)."""
    done = subprocess.run([sys.executable, "-c", RUNNER, str(root), stage, json.dumps(overrides)], cwd=REPO,
                          timeout=timeout, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"{stage} failed:\n{done.stderr[-4000:]}")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}


@dataclass
class ChainReport:
    attempts: int = 0
    landed: int = 0                   # kills that hit a live process
    mid_work: int = 0                 # of those, kills after progress was seen
    progress: list[int] = field(default_factory=list)   # progress units on disk after each kill


def kill_chain(root: Path, stage: str, overrides: dict, progress: Callable[[], int],
               check: Callable[[], None], *, kills: int = 10, seed: int = 0,
               jitter: tuple[float, float] = (0.0, 0.4), max_attempts: int = 40) -> ChainReport:
    """SIGKILL `stage` until `kills` kills landed (or it finished), checking invariants after each."""
    rng = random.Random(seed)
    report = ChainReport()
    while report.landed < kills and report.attempts < max_attempts:
        report.attempts += 1
        before = progress()
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(root), stage, json.dumps(overrides)], cwd=REPO,
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mid_work = report.attempts % 2 == 0
        deadline = time.monotonic() + (600 if mid_work else rng.uniform(0.5, 4.0))
        while time.monotonic() < deadline and proc.poll() is None:
            if mid_work and progress() > before:
                time.sleep(rng.uniform(*jitter))  # a random moment after new work reached the disk
                break
            time.sleep(0.02)
        alive = proc.poll() is None
        if alive:
            os.kill(proc.pid, signal.SIGKILL)
            report.landed += 1
            report.mid_work += mid_work
        proc.wait()
        check()
        report.progress.append(progress())
        if not alive and proc.returncode == 0:
            break  # finished before the kill: nothing left to interrupt
    return report
