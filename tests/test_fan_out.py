"""The pipeline's fan-out hands the child flow runs only the shards still pending, and starts none when none
is (no Prefect server: the child runs are recorded instead of started)."""

from __future__ import annotations

import pytest

from flows import synth_and_train
from pcm.stages.encode import FEATURES, encode_shards, run_encode
from pcm.stages.pipeline import resolve, run_pipeline
from pcm.stages.synthesize import run_synthesize
from storage.layout import RunLayout

pytestmark = pytest.mark.heavy  # synthesize and encode on the tiny models, in this process (seconds)

SMALL = {"ingest.subset": 24, "synthesize.shard_size": 8, "synthesize.height": 32, "synthesize.width": 32,
         "synthesize.steps": 2}


@pytest.fixture
def children(monkeypatch) -> list[tuple[str, list[int], int, str]]:
    started: list[tuple[str, list[int], int, str]] = []
    monkeypatch.setattr(synth_and_train, "fan_out",
                        lambda deployment, indices, parts, key, parameters: started.append((deployment, indices, parts, key)))
    return started


def test_fan_out_sends_only_pending_shards_and_nothing_for_a_finished_stage(tmp_path, children):
    cfg, root = resolve("tiny", SMALL), str(tmp_path)
    captions = run_pipeline(cfg, root, stages=("ingest",))["ingest"]

    # Synthesize: 3 shards, shard 1 already rendered (a resumed fan-out).
    run_synthesize(cfg.synthesize, captions, RunLayout(root), shards=[1], finalize_when_complete=False)
    synth_and_train.fan_out_synthesis(cfg, captions, root, parts=2)
    assert children == [("synthesize/default", [0, 2], 2, "shards")]
    shards = run_synthesize(cfg.synthesize, captions, RunLayout(root))   # the rest, and the stage finalised
    children.clear()
    synth_and_train.fan_out_synthesis(cfg, captions, root, parts=2)
    assert children == [("synthesize/default", [], 2, "shards")]   # fan_out starts no child for no index
    children.clear()

    # Encode: feature shard 2 already encoded.
    encode_shards(cfg.encode, captions, shards, RunLayout(root), kind=FEATURES, indices=[2])
    synth_and_train.fan_out_encoding(cfg, captions, shards, root, parts=2)
    assert children == [("encode/default", [0, 1], 2, "indices")]
    run_encode(cfg.encode, captions, shards, RunLayout(root))
    children.clear()
    synth_and_train.fan_out_encoding(cfg, captions, shards, root, parts=2)
    assert children == [("encode/default", [], 2, "indices")]


def test_fan_out_of_no_shard_starts_no_child_and_asks_the_server_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("nothing to fan out, yet the server was asked")

    monkeypatch.setattr(synth_and_train, "run_deployment", refuse)
    monkeypatch.setattr(synth_and_train, "get_client", refuse)
    synth_and_train.fan_out("synthesize/default", [], 4, "shards", {})
