"""Two runs of one stage on the same outputs at once: they cooperate or fail fast naming the holder."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from crash_harness import REPO, RUNNER, _env, run_stage

from pcm.stages.contract import as_result
from storage import shards
from storage.layout import RunLayout
from storage.lock import LockHeld
from storage.result import StageResult

pytestmark = [pytest.mark.timeout(900), pytest.mark.heavy]  # every test runs stages in subprocesses

SMALL = {"synthesize.limit": 12, "synthesize.shard_size": 1, "synthesize.height": 32, "synthesize.width": 32,
         "synthesize.steps": 2, "encode.top_n": 20, "train.batch_size": 4, "train.val_metric": "loss", "train.val_every": 10000}


def start(root: Path, stage: str, overrides: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(root), stage, json.dumps(overrides)], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_synthesize_runs_share_the_shards(tmp_path):
    run_stage(tmp_path, "ingest", SMALL)
    a, b = start(tmp_path, "synthesize", SMALL), start(tmp_path, "synthesize", SMALL)
    for p in (a, b):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    (sd,) = (tmp_path / "synthesize").iterdir()
    tars = sorted(sd.glob("shards/shard-*.tar"))
    assert len(tars) == 12 and all(shards.is_done(t) for t in tars)
    keys = [s["__key__"] for t in tars for s in shards.iter_tar(t)]
    assert len(keys) == len(set(keys)) == 12  # every caption once: no shard written twice
    assert (sd / "stage.done.json").exists() and not list(sd.rglob(".tmp-*"))


def test_second_run_waits_for_the_holder_then_reuses_its_stage(tmp_path, caplog):
    from pcm.stages.pipeline import resolve, run_pipeline
    from pcm.stages.train import plan, verify

    long_train = {**SMALL, "train.max_steps": 400, "train.checkpoint_every": 1}
    run_stage(tmp_path, "encode", long_train)
    cfg = resolve("tiny", long_train)
    first = start(tmp_path, "train", long_train)
    try:
        # Wait until the first run holds the stage lock (its pid is written into the lock file).
        lock_file = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            found = list((tmp_path / "train").glob("*/.lock")) if (tmp_path / "train").exists() else []
            if found and str(first.pid) in found[0].read_text():
                lock_file = found[0]
                break
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.05)
        assert lock_file is not None, "the first run never took the lock"
        with pytest.raises(LockHeld, match=rf"locked by pid {first.pid} on .*Wait for it to finish"):
            run_pipeline(cfg, str(tmp_path), stages=("train",), lock_wait_s=0)   # told not to wait
        # By default a second run waits for the first, saying whom it waits for, then reuses its stage.
        with caplog.at_level("WARNING", logger="pcm.stages.pipeline"):
            second = run_pipeline(cfg, str(tmp_path), stages=("train",))["train"]
        assert f"train: waiting for pid {first.pid} on " in caplog.text
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.cached
    ing = next((tmp_path / "ingest").iterdir())
    enc = next((tmp_path / "encode").iterdir())
    sd = plan(cfg.train, as_result(str(ing)), as_result(str(enc)), RunLayout(tmp_path))
    assert sd.is_complete() and verify(sd) is None
    assert second.path == str(sd.path) and second.counts == StageResult.load(sd.done_marker).counts
