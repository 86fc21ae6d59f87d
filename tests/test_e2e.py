"""End to end with real parts: a Prefect server, two process workers, `prefect deployment run`.

The module's own Prefect server (127.0.0.1, SQLite) with a work pool, the deployments from prefect.yaml, the
`gpu` concurrency limit and two workers serves every test here; runs write to a temporary root. The
server is this module's, not the run's shared one: its `gpu` limit would hold back the flows other tests
run meanwhile on other xdist workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import urllib.request
from pathlib import Path

import pytest
from prefect_server import start_server

from flows.local_server import LocalStack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3000)]

# The tiny preset on 72 of its 201 training captions, at 32 px with 2 denoising steps and 4 epochs
# (two validations): the same stages, tasks, caching and fan-out, a fraction of the CPU time.
FAST = {"ingest.subset": 72, "synthesize.height": 32, "synthesize.width": 32, "synthesize.steps": 2,
        "train.epochs": 4, "train.batch_size": 16, "train.val_every": 9, "train.checkpoint_every": 9}

MAIN_TASKS = {"ingest": "ingest", "synthesize": "synthesize-finalize", "encode": "encode", "train": "train",
              "evaluate": "evaluate"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3):
    """A server of this module's own plus a work pool, the deployments and two workers (logs in its home), each
    worker a host of its own for object-store roots (its working copy; the S3 server's endpoint from `s3`)."""
    s = start_server(tmp_path_factory.mktemp("prefect"))
    mirrors = tmp_path_factory.mktemp("mirrors")
    try:
        s.create_pool()
        s.deploy()
        s.start_worker("worker-1", env={"PCM_MIRROR_DIR": str(mirrors / "host-1")})
        s.start_worker("worker-2", env={"PCM_MIRROR_DIR": str(mirrors / "host-2")})
        yield s
    finally:
        for proc in s.procs[1:]:  # the workers (procs[0] is the server): told together, they stop together
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        # Idle workers that have run flows stay up after their graceful stop began (measured: past 10 s), so the
        # second SIGTERM (a worker then SIGKILLs itself) comes after a second: no flow run is left to finish.
        s.stop(grace=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def api(stack: LocalStack, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(f"{stack.api_url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def run(stack: LocalStack, name: str, config: dict) -> str:
    """Run a deployment to completion; returns the flow run id."""
    done = stack.run_deployment(name, {"config": config}, timeout=1500)
    logs = "".join(p.read_text()[-5000:] for p in sorted(stack.home.glob("worker-*.log")))
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{logs}"
    assert "Completed" in done.stdout, done.stdout[-3000:]
    return re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)


def run_ids(stack: LocalStack, flow_run_id: str) -> list[str]:
    """The flow run and all its subflow runs."""
    ids, frontier = [flow_run_id], [flow_run_id]
    while frontier:
        children = api(stack, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": frontier}}})
        frontier = [c["id"] for c in children]
        ids += frontier
    return ids


def fanned_out(runs: list[dict]) -> list[str]:
    """The stages of the fan-out children among flow runs: synthesize/default runs given a list of `shards`,
    encode/default ones a list of `indices` (encode's own `shards` parameter is the synthesize stage)."""
    kinds = []
    for r in runs:
        params = r.get("parameters") or {}
        if isinstance(params.get("indices"), list):
            kinds.append("encode")
        elif isinstance(params.get("shards"), list):
            kinds.append("synthesize")
    return sorted(kinds)


def task_states(stack: LocalStack, flow_run_id: str) -> dict[str, list[str]]:
    """Main stage task -> the state names of its runs, over the flow run and all its subflow runs."""
    ids = run_ids(stack, flow_run_id)
    # Tasks of the stage subflows (the parent holds only the subflows' wrapper task runs).
    runs = api(stack, "/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": ids[1:]}}})
    states = {}
    for task in MAIN_TASKS.values():  # default run names are "<task name>-<suffix>"
        states[task] = sorted(t["state"]["name"] for t in runs
                              if re.fullmatch(rf"{re.escape(task)}(-\w{{1,12}})?", t["name"]))
        assert states[task], (task, sorted(t["name"] for t in runs))
    return states


def stage_dirs(root: Path, stage: str) -> list[Path]:
    return sorted(p for p in (root / stage).iterdir() if p.is_dir() and (p / "stage.done.json").exists())


def test_demo_pipeline_fans_out_over_two_workers_caches_and_recomputes_downstream(stack, root):
    from storage.arrays import open_arrays
    from storage.shards import iter_tar

    # The demo deployment, on the random-weight preset (fast), with synthesize and encode each split
    # into two child flow runs, which the two workers share.
    config = {"preset": "tiny", "root": str(root), "synthesize_fanout": 2, "encode_fanout": 2,
              "overrides": {**FAST, "synthesize.shard_size": 16}}
    first = run(stack, "synth-and-train/demo", config)

    # Every stage's outputs exist; the metrics are numbers.
    for stage in MAIN_TASKS:
        assert len(stage_dirs(root, stage)) == 1, stage
    metrics = json.loads((stage_dirs(root, "evaluate")[0] / "metrics.json").read_text())["metrics"]
    for key in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert isinstance(metrics[key], float), key
    assert "unavailable" in str(metrics.get("SPICE")) or isinstance(metrics.get("SPICE"), float)
    (sd,) = stage_dirs(root, "synthesize")
    tars = sorted(sd.glob("shards/shard-*.tar"))
    assert len(tars) == 5  # 72 captions, 16 per shard: split 3 + 2 between the two children
    keys = [s["__key__"] for tar in tars for s in iter_tar(tar)]
    assert len(keys) == 72 and len(set(keys)) == 72  # every caption once, none twice
    assert not list(sd.glob("shards/.tmp-*"))
    # Encode: every feature shard once, finalised by the parent.
    (enc,) = stage_dirs(root, "encode")
    feats = sorted(enc.glob("features/shard-*.safetensors"))
    assert len(feats) == 5
    assert sum(len(open_arrays(f)[0]["global"]) for f in feats) == 72
    # The parent, its two synthesize children and its two encode children were picked up by the workers.
    logs = "".join((stack.home / f"worker-{i}.log").read_text() for i in (1, 2))
    assert logs.count("submitting flow run") >= 5
    runs = api(stack, "/flow_runs/filter", {"limit": 200, "flow_runs": {"id": {"any_": run_ids(stack, first)}}})
    assert fanned_out(runs) == ["encode", "encode", "synthesize", "synthesize"], fanned_out(runs)
    # Each stage task ran once; synthesize was finalised once, by whichever of the parent and the child
    # that finished last got there first (the other found it finished: Cached).
    states = task_states(stack, first)
    assert all(states[t] == ["Completed"] for t in ("ingest", "encode", "train", "evaluate")), states
    assert states["synthesize-finalize"].count("Completed") == 1, states
    assert set(states["synthesize-finalize"]) <= {"Completed", "Cached"}, states
    # The project's own log lines (stage loggers) reach the dashboard, not only Prefect's.
    logs = api(stack, "/logs/filter", {"limit": 200, "logs": {"flow_run_id": {"any_": run_ids(stack, first)}}})
    assert any(entry["name"].startswith("pcm.") for entry in logs), sorted({entry["name"] for entry in logs})

    # Artifacts on the dashboard: progress, tables, pictures, the evaluation report.
    artifacts = api(stack, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": run_ids(stack, first)}}})
    kinds = {a["type"] for a in artifacts}
    assert {"progress", "table", "markdown"} <= kinds, kinds
    keys = " ".join(a.get("key") or "" for a in artifacts)
    for part in ("ingest", "synthesize", "encode", "train", "evaluate"):
        assert part in keys, (part, keys)

    # Second run: every stage is a cache hit, and no child flow run is started for finished stages.
    second = run(stack, "synth-and-train/demo", config)
    states = task_states(stack, second)
    assert all(states[t] == ["Cached"] for t in MAIN_TASKS.values()), states
    runs = api(stack, "/flow_runs/filter", {"limit": 200, "flow_runs": {"id": {"any_": run_ids(stack, second)}}})
    assert fanned_out(runs) == [], fanned_out(runs)

    # One changed parameter, in this run's own process (no fan-out): the stages before it are cached, it
    # and those after it recompute.
    third = run(stack, "synth-and-train/demo", {**config, "synthesize_fanout": 0, "encode_fanout": 0,
                                                "overrides": {**config["overrides"], "encode.top_n": 50}})
    states = task_states(stack, third)
    assert states["ingest"] == ["Cached"] and states["synthesize-finalize"] == ["Cached"], states
    assert all(states[t] == ["Completed"] for t in ("encode", "train", "evaluate")), states
    for stage, n in {"ingest": 1, "synthesize": 1, "encode": 2, "train": 2, "evaluate": 2}.items():
        assert len(stage_dirs(root, stage)) == n, stage


def test_a_deployment_run_on_an_s3_root_finishes_with_every_stage_in_the_bucket(stack, bucket, store):
    """The demo deployment with `root` an s3:// URL, synthesize and encode fanned out over the two workers (two
    hosts: each its own working copy): every stage committed in the bucket, evaluate's scores included."""
    url = f"s3://{bucket}/run"
    config = {"preset": "tiny", "root": url, "synthesize_fanout": 2, "encode_fanout": 2,
              "overrides": {**FAST, "synthesize.shard_size": 16}}
    run(stack, "synth-and-train/demo", config)
    store.invalidate_cache()
    keys = store.find(f"{bucket}/run")
    committed = {k.split("/")[2] for k in keys if k.endswith("/stage.done.json")}
    assert committed >= set(MAIN_TASKS), sorted(keys)[:50]
    metrics = next(k for k in keys if "/evaluate/" in k and k.endswith("/metrics.json"))
    assert isinstance(json.loads(store.cat(metrics))["metrics"]["CIDEr"], float)
    assert not [k for k in keys if "/.tmp-" in k]
