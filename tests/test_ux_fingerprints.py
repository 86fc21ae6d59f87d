"""Fingerprints ignore what cannot change a stage's output: path spelling, and `name` left to its default."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from builders import encode_inputs, tiny_encode_config

from pcm.config import BY_CONTENT
from pcm.stages import encode, ingest
from pcm.stages.encode import EncodeConfig
from pcm.stages.ingest import IngestConfig, dataset_name
from storage.layout import RunLayout


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _karpathy(path):
    path.write_text(json.dumps({"images": [
        {"imgid": 1, "filename": "1.jpg", "split": "train", "sentences": [{"sentid": 1, "raw": "a dog"}]}]}))
    return path


def test_ingest_name_left_out_equals_the_name_the_file_gives(in_tmp):
    source = _karpathy(in_tmp / "dataset_demo.json")
    derived = IngestConfig(source=str(source))
    assert dataset_name(derived) == "demo"
    named = IngestConfig(source=str(source), name="demo")          # the pipeline presets' spelling
    other = IngestConfig(source=str(source), name="other")
    root = str(in_tmp / "runs")
    assert ingest.plan(derived, RunLayout(root)).fingerprint == ingest.plan(named, RunLayout(root)).fingerprint
    assert ingest.plan(other, RunLayout(root)).fingerprint != ingest.plan(named, RunLayout(root)).fingerprint
    assert derived.content()["name"] == "demo"


def test_ingest_relative_and_absolute_source_share_a_fingerprint(in_tmp):
    _karpathy(in_tmp / "dataset_x.json")
    root = str(in_tmp / "runs")
    (in_tmp / "sub").mkdir()
    rel = ingest.plan(IngestConfig(source="dataset_x.json"), RunLayout(root)).fingerprint
    assert rel == ingest.plan(IngestConfig(source=str(in_tmp / "dataset_x.json")), RunLayout(root)).fingerprint
    assert rel == ingest.plan(IngestConfig(source="./sub/../dataset_x.json"), RunLayout(root)).fingerprint


def test_encode_relative_and_absolute_images_root_share_a_fingerprint(in_tmp):
    cap, syn = encode_inputs(in_tmp / "runs", n_shards=1, images_dir=in_tmp / "coco")
    root = str(in_tmp / "runs")
    absolute = encode.plan(tiny_encode_config(images_root=str(in_tmp / "coco")), cap, syn,
                           RunLayout(root)).fingerprint
    for spelling in ("coco", "./coco", "coco/", f"{in_tmp}/coco/", "runs/../coco"):
        assert encode.plan(tiny_encode_config(images_root=spelling), cap, syn,
                           RunLayout(root)).fingerprint == absolute, spelling
    assert encode.plan(tiny_encode_config(images_root=str(in_tmp / "runs")), cap, syn,
                       RunLayout(root)).fingerprint != absolute
    # by the names and sizes of the images read, not the path: a copy elsewhere is the same stage
    shutil.copytree(in_tmp / "coco", in_tmp / "elsewhere" / "coco-copy")
    assert encode.plan(tiny_encode_config(images_root="elsewhere/coco-copy"), cap, syn,
                       RunLayout(root)).fingerprint == absolute


def test_encode_vocabulary_file_counts_by_content_not_path(in_tmp):
    cap, syn = encode_inputs(in_tmp / "runs", n_shards=1)
    root = str(in_tmp / "runs")
    (in_tmp / "vocab.txt").write_text("dog\ncat\n")
    os.mkdir(in_tmp / "copy")
    shutil.copy(in_tmp / "vocab.txt", in_tmp / "copy" / "other-name.txt")
    fps = {encode.plan(tiny_encode_config(vocabulary_file=v), cap, syn, RunLayout(root)).fingerprint
           for v in ("vocab.txt", str(in_tmp / "vocab.txt"), "copy/other-name.txt")}
    assert len(fps) == 1
    (in_tmp / "vocab.txt").write_text("dog\nhorse\n")
    assert encode.plan(tiny_encode_config(vocabulary_file="vocab.txt"), cap, syn,
                       RunLayout(root)).fingerprint not in fps


def test_encode_clip_checkpoint_counts_by_content_not_path(in_tmp):
    cap, syn = encode_inputs(in_tmp / "runs", n_shards=1)
    root = str(in_tmp / "runs")
    (in_tmp / "ckpt.safetensors").write_bytes(b"x")
    os.mkdir(in_tmp / "copy")
    shutil.copy(in_tmp / "ckpt.safetensors", in_tmp / "copy" / "renamed.safetensors")

    def fp(pretrained: str) -> str:
        return encode.plan(EncodeConfig.model_validate({"clip": {"model": "tiny", "pretrained": pretrained}}),
                           cap, syn, RunLayout(root)).fingerprint

    fps = {fp(p) for p in ("ckpt.safetensors", str(in_tmp / "ckpt.safetensors"), "copy/renamed.safetensors")}
    assert len(fps) == 1
    (in_tmp / "copy" / "renamed.safetensors").write_bytes(b"y")
    assert fp("copy/renamed.safetensors") not in fps
    (in_tmp / "models" / "clip").mkdir(parents=True)
    local = EncodeConfig.model_validate({"clip": {"model": "ViT-B-32", "pretrained": "local-dir:models/clip"}})
    assert local.content()["clip"]["pretrained"] == BY_CONTENT     # plan adds the directory's digest
    tag = EncodeConfig.model_validate({"clip": {"model": "ViT-B-32", "pretrained": "openai"}})
    assert tag.content()["clip"]["pretrained"] == "openai"
