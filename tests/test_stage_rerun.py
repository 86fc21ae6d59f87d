"""A single-stage rerun names its config: a pipeline preset (+ overrides) and/or a finished run of the stage.

`{"preset": "tiny", "overrides": ...}` must be exactly the config `synth-and-train` gives the stage,
and `{"from_run": DIR}` the config that directory ran with, so the rerun lands in the same stage
directory and reuses its work (issue #14: a bare `{"model": "tiny"}` re-rendered everything).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pcm.stages.pipeline import STAGE_ORDER, StageRef, resolve, run_pipeline, stage_config
from storage import atomic
from storage.layout import RunLayout

# The tiny preset made small: 4 images of 32 px in 2 shards, 2 steps.
SMALL = {"synthesize.limit": 4, "synthesize.steps": 2, "synthesize.height": 32, "synthesize.width": 32,
         "synthesize.shard_size": 2}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny pipeline's ingest and synthesize stages, run in this process."""
    root = str(tmp_path_factory.mktemp("rerun") / "runs")
    r = run_pipeline(resolve("tiny", SMALL), root, stages=("synthesize",))
    return root, r


def shard_mtimes(stage_path: str) -> dict[str, int]:
    files = [p for p in Path(stage_path, "shards").rglob("*") if p.is_file()]
    assert files, f"no shards under {stage_path}"
    return {str(p): p.stat().st_mtime_ns for p in files}


def test_a_preset_reference_is_the_pipelines_section_of_that_stage():
    tiny = resolve("tiny")
    for stage in STAGE_ORDER:
        assert stage_config(stage, {"preset": "tiny"}) == getattr(tiny, stage)
        assert stage_config(stage, StageRef(preset="tiny")) == getattr(tiny, stage)
    # {"preset": "tiny"} for train is the tiny pipeline's train section, not TrainConfig(preset="tiny").
    assert stage_config("train", {"preset": "tiny"}).epochs == tiny.train.epochs
    # Overrides: this stage's keys with or without the section, other sections' keys validated and ignored.
    want = resolve("tiny", SMALL).synthesize
    bare = {k.split(".", 1)[1]: v for k, v in SMALL.items()}
    assert stage_config("synthesize", {"preset": "tiny", "overrides": SMALL}) == want
    assert stage_config("synthesize", {"preset": "tiny", "overrides": bare}) == want
    assert stage_config("synthesize", {"preset": "tiny", "overrides": {**SMALL, "train.epochs": 2}}) == want
    assert stage_config("encode", {"preset": "tiny", "overrides": {"clip": {"pool": 2}}}).clip.pool == 2
    # A full stage config (as before) and a config object pass through.
    assert stage_config("synthesize", want.model_dump(mode="json")) == want
    assert stage_config("synthesize", want) is want
    assert stage_config("synthesize", {}) == type(want)()


def test_a_bad_reference_names_the_key_at_fault(tmp_path):
    def error(stage, config) -> str:
        with pytest.raises((ValueError, FileNotFoundError, TypeError)) as e:
            stage_config(stage, config)
        return str(e.value)

    assert "synthesize.stepz" in error("synthesize", {"preset": "tiny", "overrides": {"stepz": 2}})
    assert "synthesize.stepz" in error("synthesize", {"preset": "tiny", "overrides": {"synthesize.stepz": 2}})
    assert "synthesize.steps" in error("synthesize", {"preset": "tiny", "overrides": {"steps": 0}})
    assert "sythesize" in error("synthesize", {"preset": "tiny", "overrides": {"sythesize.steps": 2}})
    assert "overide" in error("synthesize", {"preset": "tiny", "overide": {"steps": 2}})
    assert "preset and/or from_run" in error("synthesize", {"overrides": {"steps": 2}})
    assert "unknown preset 'nope'" in error("synthesize", {"preset": "nope"})
    assert "synthesize.steps" in error("synthesize", {"model": "tiny", "steps": -1})
    assert "no config.json" in error("synthesize", {"from_run": str(tmp_path / "missing")})
    assert "unknown stage 'render'" in error("render", {"preset": "tiny"})
    assert "expected a SynthesizeConfig" in error("synthesize", resolve("tiny").encode)


def test_from_run_rebuilds_the_config_with_the_same_fingerprint(tiny_run):
    from pcm.stages import ingest, synthesize

    root, r = tiny_run
    captions, syn = r["ingest"].path, r["synthesize"].path
    planned = resolve("tiny", SMALL)

    alone = stage_config("synthesize", {"from_run": syn})
    assert synthesize.plan(alone, r["ingest"], RunLayout(root)).fingerprint == r["synthesize"].fingerprint
    assert alone.content() == planned.synthesize.content()
    assert alone.device == "auto" and alone.batch_size == 8  # not recorded: defaults
    # With a preset: what to compute from the run, how to run it (runtime fields) from the preset.
    both = stage_config("synthesize", {"from_run": syn, "preset": "tiny"})
    assert both == planned.synthesize
    # Overrides apply on top of the run's config, and make another stage.
    more = stage_config("synthesize", {"from_run": syn, "overrides": {"steps": 3}})
    assert more.steps == 3 and more.shard_size == 2
    assert synthesize.plan(more, r["ingest"], RunLayout(root)).fingerprint != r["synthesize"].fingerprint

    # ingest's `source` is runtime (the file is fingerprinted by content): a preset or an override gives it.
    assert "ingest.source" in _error("ingest", {"from_run": captions})
    again = stage_config("ingest", {"from_run": captions, "preset": "tiny"})
    assert ingest.plan(again, RunLayout(root)).fingerprint == r["ingest"].fingerprint
    by_path = stage_config("ingest", {"from_run": captions, "overrides": {"source": planned.ingest.source}})
    assert ingest.plan(by_path, RunLayout(root)).fingerprint == r["ingest"].fingerprint

    assert "a 'ingest' stage directory, not a synthesize one" in _error("synthesize", {"from_run": captions})
    assert "train.epochs" in _error("synthesize", {"from_run": syn, "overrides": {"train.epochs": 2}})
    assert "synthesize.stepz" in _error("synthesize", {"from_run": syn, "overrides": {"stepz": 2}})


def test_from_run_asks_again_for_a_file_it_holds_by_content_only(tmp_path):
    from pcm.stages.encode import CODE_VERSION, EncodeConfig

    vocab = tmp_path / "concepts.txt"
    vocab.write_text("dog\ncat\n")
    run = tmp_path / "encode" / "ab12"
    run.mkdir(parents=True)
    content = EncodeConfig(vocabulary_file=str(vocab), min_count=3).content() | {"vocabulary_sha256": "0" * 64}
    atomic.write_json(run / "config.json", {"stage": "encode", "code_version": CODE_VERSION, "config": content,
                                            "inputs": {}})
    assert "encode.vocabulary_file" in _error("encode", {"from_run": str(run)})
    cfg = stage_config("encode", {"from_run": str(run), "overrides": {"vocabulary_file": str(vocab)}})
    assert cfg.vocabulary_file == str(vocab) and cfg.min_count == 3


def test_flow_rerun_by_preset_reuses_the_pipelines_stage(tiny_run, prefect_api):
    from prefect.utilities.callables import parameter_schema

    from flows.encode import encode_flow
    from flows.evaluate import evaluate_flow
    from flows.ingest import ingest_flow
    from flows.synthesize import synthesize_flow
    from flows.train import train_flow

    for f in (ingest_flow, synthesize_flow, encode_flow, train_flow, evaluate_flow):
        anyof = parameter_schema(f.fn).properties["config"]["anyOf"]  # the run form offers both shapes
        assert anyof[0]["$ref"].endswith("/StageRef") and anyof[1]["$ref"].endswith("Config"), f.name

    root, r = tiny_run
    before = shard_mtimes(r["synthesize"].path)
    again = synthesize_flow(config={"preset": "tiny", "overrides": SMALL}, captions=r["ingest"].path, root=root)
    assert again.path == r["synthesize"].path and again.fingerprint == r["synthesize"].fingerprint
    assert again.counts == r["synthesize"].counts
    assert shard_mtimes(r["synthesize"].path) == before  # no shard re-rendered


def _error(stage: str, config: dict) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        stage_config(stage, config)
    return str(e.value)
