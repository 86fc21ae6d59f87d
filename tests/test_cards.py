"""Dataset and model cards: the Hub's YAML header, the shards and manifests as `datasets` loads them, and the
model-index that an evaluation fills."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from builders import N_TRAIN, TINY_SYNTHESIZE, evaluate_inputs, make_captions, tiny_evaluate_config

from pcm import cards
from pcm.stages.synthesize import SynthesizeConfig, run_synthesize
from storage import atomic, checkpoints, tables
from storage.layout import StageDir


def front_matter(path: Path) -> tuple[dict, str]:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n"), text[:80]
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


@pytest.mark.parametrize("n,want", [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (118_287, "100K<n<1M"),
                                    (591_753, "100K<n<1M"), (10**6, "1M<n<10M"), (2 * 10**9, "n>1B")])
def test_size_categories_follow_the_hub(n, want):
    assert cards.size_category(n) == want


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Finished ingest, encode and train stages (tests/builders.py: evaluate_inputs)."""
    return evaluate_inputs(tmp_path_factory.mktemp("eval"))


@pytest.fixture
def synth(layout):
    captions = make_captions(layout)
    return run_synthesize(SynthesizeConfig(**TINY_SYNTHESIZE, seed=3), captions, layout)


def test_synthesize_writes_a_dataset_card_that_datasets_loads(synth, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    stage = Path(synth.path)
    meta, body = front_matter(stage / "README.md")
    assert meta["license"] == "apache-2.0"   # the tiny preset is the project's own toy generator
    assert meta["task_categories"] == ["image-to-text", "text-to-image"]
    assert meta["size_categories"] == ["n<1K"]
    assert meta["source_datasets"] == []    # make_captions' ingest result records no dataset name
    assert meta["annotations_creators"] == ["machine-generated"]
    default = next(c for c in meta["configs"] if c["config_name"] == "default")
    shards = default["data_files"][0]["path"]
    assert shards == "shards/shard-*.tar"
    for words in ("tiny", "dpm++", "**2** steps", "guidance scale **7.5**", "run seed **3**", "SHA-256",
                  f"| {N_TRAIN} | {N_TRAIN} | 0 | 3 |", "Toy world"):
        assert words in body, words
    # The card is no input of anything: the fingerprint and the result are those of the stage without it.
    assert synth.counts == {"captions": N_TRAIN, "ok": N_TRAIN, "failed": 0, "shards": 3}

    from datasets import load_dataset

    cache = stage.parent.parent.parent / "hf-cache"
    images = load_dataset("webdataset", data_files={"train": str(stage / shards)}, split="train",
                          cache_dir=str(cache))
    assert images.num_rows == N_TRAIN
    got = {row["__key__"]: row for row in images}
    assert sorted(got) == [f"c{i:03d}" for i in range(N_TRAIN)]
    for key, row in got.items():
        assert row["txt"] == f"a photo of a red thing number {int(key[1:])}"
        assert row["jpg"].size == (32, 32)
        assert row["json"]["caption_id"] == key and row["json"]["seed"] > 0
    samples = next(c for c in meta["configs"] if c["config_name"] == "samples")["data_files"][0]["path"]
    status = load_dataset("parquet", data_files={"train": [str(stage / p) for p in samples]}, split="train",
                          cache_dir=str(cache))
    on_disk = tables.read(stage / "samples.parquet", tables.SAMPLES)
    assert status.num_rows == on_disk.num_rows == N_TRAIN
    assert status["caption_id"] == on_disk["caption_id"].to_pylist()
    assert set(status["status"]) == {"ok"}


def test_real_generator_cards_say_other_license_and_name_the_source():
    text = cards.dataset_card(
        config={"model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "scheduler": "dpm++", "steps": 20,
                "guidance_scale": 7.5, "seed": 0, "width": 512, "height": 512, "dtype": "fp16"},
        counts={"captions": 591_753, "ok": 591_700, "failed": 53, "shards": 592}, source_dataset="coco",
        toy=False, generator="stable-diffusion-v1-5/stable-diffusion-v1-5", shards="shards/shard-*.tar",
        manifests=["samples.parquet"], versions={"diffusers": "0.30"})
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "other" and "CC BY 4.0" in meta["license_details"]
    assert "OpenRAIL" in meta["license_details"]
    assert meta["source_datasets"] == ["coco"] and meta["size_categories"] == ["100K<n<1M"]
    assert "Toy world" not in text


def test_model_card_names_the_hub_clip_as_base_model():
    clip = {"model": "ViT-L-14", "pretrained": "openai", "precision": "fp16", "pool": 8}
    text = cards.model_card(name="m", clip=clip, toy=False, datasets=["coco"], counts={}, best={}, generator=None,
                            evaluations=[])
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "openai/clip-vit-large-patch14"
    assert meta["datasets"] == ["coco"] and "model-index" not in meta
    # Presets and local weights have no Hub id: no base_model rather than an invalid one.
    assert cards.base_model({"model": "tiny", "pretrained": None}) is None


@pytest.mark.heavy  # one evaluation: decoding and the Java scorers
def test_best_gets_a_model_card_and_evaluate_fills_its_model_index(run):
    from pcm.stages.evaluate import run_evaluate

    train = run["train"].dir
    card = cards.write_model_card(StageDir.at(train))    # what train's _finish does
    assert card == train / "best" / checkpoints.CARD
    meta, body = front_matter(card)
    assert meta["license"] == "apache-2.0" and "toy-world" in meta["tags"]   # the tiny preset CLIP
    assert "base_model" not in meta          # a preset CLIP has no Hub id
    assert meta["datasets"] == ["demo"] and "model-index" not in meta
    assert "Intended use" in body and "Toy world" in body and "Not evaluated yet" in body
    checkpoints.check_safe(train / "best")   # a card does not stop best/ from loading

    result = run_evaluate(tiny_evaluate_config(spice="off"), run["train"], run["encode"], run["captions"],
                          run["layout"])
    metrics = atomic.read_json(Path(result.path) / "metrics.json")
    meta, body = front_matter(card)
    [entry] = meta["model-index"]
    [res] = entry["results"]
    assert res["dataset"]["name"] == "demo" and res["dataset"]["split"] == "test"
    scores = {m["name"]: m["value"] for m in res["metrics"]}
    assert scores["CIDEr"] == metrics["metrics"]["CIDEr"]
    assert scores["Bleu_4"] == metrics["metrics"]["Bleu_4"]
    assert "cider" in meta["metrics"]
    assert f"{metrics['metrics']['CIDEr']:.3f}" in body
    # Rewriting converges: the same evaluations give the same card.
    before = card.read_bytes()
    cards.write_model_card(StageDir.at(train))
    assert card.read_bytes() == before
