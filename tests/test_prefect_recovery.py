"""The Prefect server dies during a flow run; after a restart the flow run again finishes the stage
without redoing the shards finished before the crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from crash_harness import REPO

from flows.local_server import LocalStack, free_port
from storage import shards

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

N = 24  # shards: enough that the crash lands mid-run (it comes after the third)

SMALL = {"synthesize.limit": N, "synthesize.shard_size": 1, "synthesize.height": 32, "synthesize.width": 32,
         "synthesize.steps": 2}

# Started while the server starts (its imports take as long): it waits, after its imports, for the
# server and the `gpu` concurrency limit the shard tasks are tagged for, then runs the flow.
FLOW = """
import json, os, sys, time, urllib.request
from flows.synthesize import synthesize_flow
from pcm.stages.pipeline import resolve
root, captions, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
deadline = time.monotonic() + 300
for url in (os.environ["PREFECT_API_URL"] + "/health", os.environ["PREFECT_API_URL"] + "/concurrency_limits/tag/gpu"):
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"{url} never answered")
        time.sleep(0.2)
synthesize_flow(resolve("tiny", overrides).synthesize, captions, root)
"""


def test_flow_run_after_server_crash_resumes_without_redoing_shards(tmp_path, monkeypatch):
    from pcm.stages.pipeline import resolve, run_pipeline

    # The server looks for expired concurrency leases every second instead of every 15 s (its default), so the
    # killed run's `gpu` slot comes back as soon as its lease runs out (Prefect's task engine fixes it at 60 s).
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS", "1")

    captions = run_pipeline(resolve("tiny", SMALL), str(tmp_path), stages=("ingest",))["ingest"].path
    stack = LocalStack(home=tmp_path / "prefect", port=free_port())
    flow = subprocess.Popen([sys.executable, "-c", FLOW, str(tmp_path), captions, json.dumps(SMALL)], cwd=REPO,
                            env=stack.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        stack.start_server()
        stack.create_pool()  # as the README does: the `gpu` concurrency limit the shard tasks are tagged for
        markers = lambda: sorted(tmp_path.glob("synthesize/*/shards/shard-*.done.json"))  # noqa: E731
        deadline = time.monotonic() + 300
        while len(markers()) < 3 and time.monotonic() < deadline:
            assert flow.poll() is None, flow.stderr.read()[-3000:]
            time.sleep(0.1)
        assert len(markers()) >= 3
        # The server dies mid-run (SIGKILL: no goodbye to its clients).
        server = stack.procs[0]
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        stack.procs.remove(server)
        try:  # the orphaned flow process fails on its own or goes down with its server moments later
            flow.wait(timeout=2)
        except subprocess.TimeoutExpired:
            flow.kill()
            flow.wait()
        finished = {p.name: p.stat().st_mtime_ns for p in markers()}
        assert finished and len(finished) < N

        # The killed run held a `gpu` slot; with leases kept in memory the restarted server would
        # never give it back and the rerun's next shard task would wait forever.
        rerun = subprocess.Popen([sys.executable, "-c", FLOW, str(tmp_path), captions, json.dumps(SMALL)], cwd=REPO,
                                 env=stack.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stack.start_server()  # same PREFECT_HOME: the same database comes back
            _, err = rerun.communicate(timeout=600)
        finally:
            if rerun.poll() is None:
                rerun.kill()
                rerun.communicate()
        assert rerun.returncode == 0, err[-3000:]
    finally:
        if flow.poll() is None:
            flow.kill()
            flow.wait()
        stack.stop()

    (sd,) = (tmp_path / "synthesize").iterdir()
    assert (sd / "stage.done.json").exists()
    after = {p.name: p.stat().st_mtime_ns for p in markers()}
    assert len(after) == N
    for name, mtime in finished.items():
        assert after[name] == mtime, f"{name} was redone after the crash"
    keys = [s["__key__"] for t in sorted(sd.glob("shards/*.tar")) for s in shards.iter_tar(t)]
    assert len(keys) == len(set(keys)) == N
