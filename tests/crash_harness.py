"""Crash harness: run a stage in a subprocess, SIGKILL it at seeded random moments, rerun to the end.

The processes killed are forked from one "zygote" per chain, a Python process that has imported the
stage being crashed (that stage's module only, not the pipeline's five) and the libraries the stage
would import when it starts working (torch, diffusers, open_clip, ...), and then forks one child per
attempt. So every attempt's clock starts when the stage's own work starts, not at `import torch`:
seconds of imports are paid once per chain instead of once per attempt, and no kill is spent on
an import. Each child is a whole process of its own that runs the stage function and is SIGKILLed
like any other.

Kills alternate between two kinds of moments: early (a random delay after the stage started, in
its setup: planning, taking the lock, loading the model) and mid-work (a random delay after the
stage has made new progress on disk), so every landed kill interrupts real work.
After each kill the on-disk invariants are checked.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# One stage of the tiny (random-weight) pipeline (earlier stages reused from disk) with config overrides.
RUNNER = """
import json, sys
from pcm.stages.pipeline import resolve, run_pipeline
root, stage, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
run_pipeline(resolve("tiny", overrides), root, stages=(stage,))
"""

# What each stage imports when it starts working (not at module import): imported by the zygote, so
# that an early kill lands in the stage's work, not in an import. "module:name" also gets a name a
# package loads lazily (diffusers, transformers). Only an optimisation: what is missing here each
# child imports itself (and an entry that no longer exists is skipped).
WARM = {
    "ingest": (),
    "synthesize": ("torch", "numpy", "PIL.Image", "diffusers:AutoPipelineForText2Image", "diffusers:DiffusionPipeline",
                   "diffusers:StableDiffusionPipeline", "diffusers:AutoencoderTiny", "transformers:CLIPTextModel",
                   "transformers:CLIPTokenizer", "ftfy"),
    "encode": ("torch", "numpy", "PIL.Image", "open_clip", "lemminflect", "matplotlib.pyplot", "pcm.concepts"),
    "train": ("torch", "numpy", "torch._dynamo", "torch._inductor", "matplotlib.pyplot", "pcm.dataset", "pcm.loss",
              "pcm.distributed", "storage.tables", "storage.manifests"),
    "evaluate": ("torch", "numpy", "PIL.Image", "matplotlib.pyplot"),
}

# The zygote: argv = stage, JSON list of modules to import. Prints "ready", then for each request
# line ({"config": ..., "inputs": [...], "root": ...}) forks a child that runs the stage, prints
# {"pid": N}, waits for the child and prints {"exit": CODE} (-9: SIGKILLed). The child's stdout
# and stderr go to the zygote's stderr (a log file), never into the protocol pipe.
ZYGOTE = r"""
import importlib, json, os, sys, traceback
stage, warm = sys.argv[1], json.loads(sys.argv[2])
module = importlib.import_module(f"pcm.stages.{stage}")
for name in warm:
    module_name, _, attr = name.partition(":")
    try:
        getattr(importlib.import_module(module_name), attr) if attr else importlib.import_module(module_name)
    except (ImportError, AttributeError):
        pass
run = getattr(module, f"run_{stage}")
config_class = getattr(module, f"{stage.capitalize()}Config")
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
print("ready", file=out, flush=True)
for line in sys.stdin:
    request = json.loads(line)
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(0)
            out.close()
            print(f"--- child {os.getpid()}", file=sys.stderr, flush=True)
            from pcm.stages.contract import load_result
            from storage.layout import RunLayout
            inputs = [load_result(p) for p in request["inputs"]]  # stage directories' paths, resolved at this edge
            run(config_class.model_validate(request["config"]), *inputs, RunLayout(request["root"]))
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), file=out, flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), file=out, flush=True)
"""


def start_stage(root: Path, stage: str, overrides: dict) -> subprocess.Popen:
    """The tiny pipeline up to `stage` in a subprocess (stderr piped), started and not waited for."""
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(root), stage, json.dumps(overrides)], cwd=REPO,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_stage(root: Path, stage: str, overrides: dict, timeout: float = 900) -> None:
    """Run to completion in a subprocess (the uninterrupted reference)."""
    proc = start_stage(root, stage, overrides)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode:
        raise RuntimeError(f"{stage} failed:\n{err[-4000:]}")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "MPLBACKEND": "Agg"}


def stage_request(root: Path, stage: str, overrides: dict) -> dict[str, Any]:
    """What a child needs to run `stage` of the tiny pipeline alone: its config section and its inputs
    (the earlier stages' directories, finished before the chain starts and reused from disk here)."""
    from pcm.stages.pipeline import STAGE_ORDER, resolve, run_pipeline

    cfg = resolve("tiny", overrides)
    before = STAGE_ORDER[: STAGE_ORDER.index(stage)]
    r = run_pipeline(cfg, str(root), stages=(before[-1],)) if before else {}
    inputs = {"ingest": [], "synthesize": ["ingest"], "encode": ["ingest", "synthesize"], "train": ["ingest", "encode"],
              "evaluate": ["train", "encode", "ingest"]}[stage]
    return {"config": getattr(cfg, stage).model_dump(mode="json"), "inputs": [r[s].path for s in inputs],
            "root": str(root)}


class Zygote:
    """A process that imports `stage` and then forks children that run it (see ZYGOTE).

    It starts importing at once; the first `spawn` waits until it is ready, so a zygote can be
    started early and import while something else runs."""

    def __init__(self, stage: str, log: Path, timeout: float = 600) -> None:
        self.stage, self.log, self.timeout = stage, log, timeout
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "ab")
        self._buf = b""
        self._ready = False
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, stage, json.dumps(WARM.get(stage, ()))],
                                     cwd=REPO, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log)

    def wait_ready(self) -> None:
        if not self._ready:
            if self._line(self.timeout) != "ready":
                raise RuntimeError(f"the {self.stage} zygote did not start:\n{self.tail()}")
            self._ready = True

    def _line(self, timeout: float) -> str | None:
        """The next line from the zygote, or None if none came within `timeout` seconds (0: just look)."""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the zygote exited (code {self.proc.wait()}):\n{self.tail()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def spawn(self, request: dict[str, Any]) -> int:
        """Fork a child running the stage; returns its pid."""
        self.wait_ready()
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        line = self._line(120)
        if line is None:
            raise RuntimeError(f"the zygote did not fork:\n{self.tail()}")
        return json.loads(line)["pid"]

    def exit_code(self, timeout: float) -> int | None:
        """The running child's exit code (-9: SIGKILLed) once it has ended, None while it runs."""
        line = self._line(timeout)
        return None if line is None else json.loads(line)["exit"]

    def tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ChainReport:
    attempts: int = 0
    landed: int = 0                   # kills that hit a live process
    mid_work: int = 0                 # of those, kills after progress was seen
    progress: list[int] = field(default_factory=list)   # progress units on disk after each kill
    in_setup: int = 0                 # landed kills before the attempt's first new unit (plan, lock, model loading)
    failed: int = 0                   # attempts that ended with an error of their own (see `log`)
    setup_s: float | None = None      # seconds from a child's start to its first new unit, as last seen
    log: str = ""                     # the children's output


def kill_chain(root: Path, stage: str, overrides: dict, progress: Callable[[], int],
               check: Callable[[], None], *, kills: int = 10, seed: int = 0,
               jitter: tuple[float, float] = (0.0, 0.4), early: tuple[float, float] = (0.0, 2.0),
               max_attempts: int = 40, finish: bool = True, zygote: Zygote | None = None,
               units: int | None = None) -> ChainReport:
    """SIGKILL `stage` until `kills` kills landed (or it finished), checking invariants after each; then
    (`finish`) run it once more to the end, raising if that run fails.

    Attempts alternate. An early kill comes a uniform random delay after the child starts (the
    imports already done): within the stage's setup (planning, the lock, model loading), as long as
    the last attempt that made progress took to make its first new unit (`early` seconds before any
    did). A mid-work kill comes `jitter` seconds after progress() first rose in that attempt, and so
    does an early one whose delay outlasts the setup. The children are forked from `zygote` (closed
    at the end), or from a zygote of this chain's own. `units`: the progress count of a finished stage; once
    every unit is on disk no attempt can wait for progress, so the mid-work ones become timed ones too (their
    kills land in the stage's last steps; a mid-work attempt would run to the end and stop the chain short).
    """
    rng = random.Random(seed)
    zygote = zygote or Zygote(stage, root / f"crash-{stage}.log")
    report = ChainReport(log=str(zygote.log))
    request = stage_request(root, stage, overrides)
    with zygote:
        while report.landed < kills and report.attempts < max_attempts:
            report.attempts += 1
            before = progress()
            pid = zygote.spawn(request)
            started = time.monotonic()
            mid_work = report.attempts % 2 == 0 and (units is None or before < units)
            if mid_work:
                delay = 600.0
            else:
                delay = rng.uniform(*early) if report.setup_s is None else rng.uniform(0.0, report.setup_s)
            deadline = started + delay
            code, worked = None, False
            while code is None and time.monotonic() < deadline:
                if progress() > before:
                    worked = True
                    report.setup_s = time.monotonic() - started
                    time.sleep(rng.uniform(*jitter))  # a random moment after new work reached the disk
                    code = zygote.exit_code(0)
                    break
                code = zygote.exit_code(min(0.02, max(0.0, deadline - time.monotonic())))
            if code is None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended a moment ago
                    pass
                code = zygote.exit_code(120)
                if code is None:
                    raise RuntimeError(f"child {pid} survived SIGKILL:\n{zygote.tail()}")
            if code == -signal.SIGKILL:
                report.landed += 1
                report.mid_work += mid_work
                report.in_setup += not worked and progress() == before
            elif code != 0:
                report.failed += 1
            check()
            report.progress.append(progress())
            if code == 0:
                break  # finished before the kill: nothing left to interrupt
        if finish:  # the final rerun completes the stage
            zygote.spawn(request)
            code = zygote.exit_code(900)
            if code != 0:
                raise RuntimeError(f"the final {stage} run failed (exit {code}):\n{zygote.tail()}")
    return report
