"""Planning is pure; a stage directory is opened when its stage runs (issue #15).

Every stage's `plan()` (and so Prefect's cache key and the "is it finished?" check of
flows/caching.py) computes the fingerprint and what config.json is to hold, writing nothing under
the root. The directory and its config.json appear when the stage runs (`open_stage`: under the
stage lock, or in a shard worker that writes without it), with the bytes planning computed.
Inputs travel as StageResults; a stage directory's path still works and gives the same plan.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pcm.stages import encode, evaluate, ingest, synthesize, train
from pcm.stages.contract import as_result, load_result, open_stage
from pcm.stages.pipeline import STAGE_ORDER, resolve, run_pipeline
from storage.layout import RunLayout, StageDir

pytestmark = pytest.mark.heavy  # the module's fixture runs the whole (small) tiny pipeline

# The tiny preset made small: 4 images of 32 px in 2 shards, 2 steps; 2 training steps; greedy decoding.
SMALL = {"synthesize.limit": 4, "synthesize.steps": 2, "synthesize.height": 32, "synthesize.width": 32,
         "synthesize.shard_size": 2, "train.max_steps": 2, "train.val_every": 2, "train.checkpoint_every": 2,
         "train.val_metric": "loss", "train.batch_size": 2, "evaluate.beam_size": 1, "evaluate.spice": "off"}
# One fingerprinted field changed per stage: every stage directory is a new one.
OTHER = {"ingest.max_chars": 499, "synthesize.seed": 1, "encode.top_n": 99, "train.seed": 1, "evaluate.max_len": 19}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The small tiny pipeline, run once in this process: (its config, its root, the five StageResults)."""
    cfg = resolve("tiny", SMALL)
    root = str(tmp_path_factory.mktemp("stage-dirs") / "runs")
    return cfg, root, run_pipeline(cfg, root)


def plans(cfg, root: str, r: dict) -> dict[str, StageDir]:
    """Every stage's plan() in `root`, its inputs the StageResults `r`."""
    return {"ingest": ingest.plan(cfg.ingest, RunLayout(root)),
            "synthesize": synthesize.plan(cfg.synthesize, r["ingest"], RunLayout(root)),
            "encode": encode.plan(cfg.encode, r["ingest"], r["synthesize"], RunLayout(root)),
            "train": train.plan(cfg.train, r["ingest"], r["encode"], RunLayout(root)),
            "evaluate": evaluate.plan(cfg.evaluate, r["train"], r["encode"], r["ingest"], RunLayout(root))}


def flow_parameters(cfg, root: str, r: dict) -> dict[str, tuple]:
    """Each stage's (plan, verify, task parameters) as flows/caching.py gets them."""
    return {"ingest": (ingest.plan, ingest.verify, {"config": cfg.ingest, "root": root}),
            "synthesize": (synthesize.plan, synthesize.verify,
                           {"config": cfg.synthesize, "captions": r["ingest"], "root": root}),
            "encode": (encode.plan, encode.verify,
                       {"config": cfg.encode, "captions": r["ingest"], "shards": r["synthesize"], "root": root}),
            "train": (train.plan, train.verify,
                      {"config": cfg.train, "captions": r["ingest"], "encode": r["encode"], "root": root}),
            "evaluate": (evaluate.plan, evaluate.verify,
                         {"config": cfg.evaluate, "train": r["train"], "encode": r["encode"],
                          "captions": r["ingest"], "root": root})}


def tree(root: str | Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(Path(root).rglob("*"))}


def test_planning_every_stage_writes_nothing(pipeline, tmp_path):
    from flows.caching import fingerprint_key, is_finished

    cfg, root, r = pipeline
    fresh = tmp_path / "fresh"
    planned = plans(cfg, str(fresh), r)
    assert [sd.stage for sd in planned.values()] == [s for s in STAGE_ORDER if s != "refine"]  # off in tiny
    assert not fresh.exists(), tree(fresh)
    # Prefect's cache key and the finished check plan too: they leave nothing either.
    for stage, (plan, verify, params) in flow_parameters(cfg, str(fresh), r).items():
        assert fingerprint_key(plan)(None, {**params, "force": False}) == f"{stage}-{planned[stage].fingerprint}"
        assert not is_finished(plan, verify, **params)
    assert not fresh.exists(), tree(fresh)

    # In the root that holds the runs, the plans of other configs add nothing (no empty directories).
    before = tree(root)
    other = plans(resolve("tiny", {**SMALL, **OTHER}), root, r)
    for stage, sd in other.items():
        assert sd.fingerprint != r[stage].fingerprint and not sd.path.exists(), stage
    for plan, _, params in flow_parameters(resolve("tiny", {**SMALL, **OTHER}), root, r).values():
        fingerprint_key(plan)(None, params)
    assert tree(root) == before


def test_a_stage_directory_given_as_a_path_plans_the_same(pipeline):
    cfg, root, r = pipeline
    by_path = {k: load_result(v.path) for k, v in r.items()}
    assert plans(cfg, root, by_path) == plans(cfg, root, r)
    assert synthesize.plan(cfg.synthesize, as_result(r["ingest"].path), RunLayout(root)) == plans(cfg, root,
                                                                                                  r)["synthesize"]
    assert evaluate.plan(cfg.evaluate, as_result(r["train"].path), as_result(r["encode"].path),
                         as_result(r["ingest"].path), RunLayout(root)).fingerprint == r["evaluate"].fingerprint
    # A flow's run name plans from its parameters as a deployment gives them: directories, resolved first.
    from flows.caching import _resolved, planned

    params = {"config": cfg.evaluate, "train": r["train"].path, "encode": r["encode"].path,
              "captions": r["ingest"].path, "root": root}
    assert planned(evaluate.plan, {k: _resolved(k, v) for k, v in params.items()}) == plans(cfg, root, r)["evaluate"]


def test_running_a_stage_writes_the_config_json_planning_computed(pipeline, tmp_path):
    cfg, root, r = pipeline
    ran = plans(cfg, root, r)
    for stage, sd in ran.items():  # the pipeline's directories are the planned ones
        assert (sd.path, sd.fingerprint) == (Path(r[stage].path), r[stage].fingerprint), stage
        assert sd.config_file.is_file() and sd.record is not None

    # Opening the planned directory in another root writes the same bytes, once.
    fresh = tmp_path / "fresh"
    for stage, sd in plans(cfg, str(fresh), r).items():
        assert open_stage(sd) is sd
        assert sd.config_file.read_bytes() == ran[stage].config_file.read_bytes(), stage
        stamp = sd.config_file.stat().st_mtime_ns
        open_stage(sd)
        assert sd.config_file.stat().st_mtime_ns == stamp  # written once, kept after
        assert not sd.done_marker.exists()
    # A StageDir found on disk opens only where its config.json already is.
    with pytest.raises(ValueError, match="not planned"):
        open_stage(StageDir.at(tmp_path / "runs" / "ingest" / ("0" * 16)))


def test_the_stage_and_its_shard_workers_open_the_directory(pipeline, tmp_path):
    cfg, root, r = pipeline
    ran = plans(cfg, root, r)
    fresh = str(tmp_path / "fresh")
    # The stage itself (under its lock).
    done = ingest.run_ingest(cfg.ingest, RunLayout(fresh))
    assert done.fingerprint == r["ingest"].fingerprint
    assert ingest.plan(cfg.ingest, RunLayout(fresh)).config_file.read_bytes() == ran["ingest"].config_file.read_bytes()
    # A synthesize shard worker (no stage lock): one shard, no marker, config.json in place.
    part = synthesize.run_synthesize(cfg.synthesize, done, RunLayout(fresh), shards=[0])
    assert part.extra["complete"] is False and part.counts["shards_pending"] == 1
    syn = synthesize.plan(cfg.synthesize, done, RunLayout(fresh))
    assert syn.config_file.read_bytes() == ran["synthesize"].config_file.read_bytes()
    assert not syn.done_marker.exists()
    # A partial result is no input: it names the stage as unfinished.
    with pytest.raises(FileNotFoundError, match="not a finished stage directory"):
        as_result(part)
    # An encode shard worker (no stage lock), on the finished synthesize stage of the first root.
    enc = encode.plan(cfg.encode, r["ingest"], r["synthesize"], RunLayout(fresh))
    got = encode.encode_shards(cfg.encode, r["ingest"], r["synthesize"], RunLayout(fresh), kind=encode.FEATURES,
                               indices=[0])
    assert got["units"] == 1
    assert enc.config_file.read_bytes() == ran["encode"].config_file.read_bytes()
    assert not enc.done_marker.exists()
