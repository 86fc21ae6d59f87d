"""Encode stage on tiny CLIP presets: feature layout, scores against open_clip, resume, bad inputs, bench."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import encode_inputs, tiny_encode_config
from PIL import Image

from pcm.clip import ClipSpec, clip_head, encode_images, encode_texts, load_clip
from pcm.identity import clip_content_id
from pcm.stages.encode import plan, run_encode, verify
from storage import tables
from storage.arrays import open_arrays
from storage.layout import RunLayout
from storage.shards import done_path, is_done, iter_tar

REPO = Path(__file__).resolve().parents[1]

def direct_embeddings(clip, image_bytes: bytes, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's own encode_image / encode_text on one image and caption, normalised."""
    x = clip.preprocess(Image.open(io.BytesIO(image_bytes)).convert("RGB"))[None]
    with torch.no_grad():
        g = clip.model.encode_image(x, normalize=True)[0]
        t = clip.model.encode_text(clip.tokenizer([text]), normalize=True)[0]
    return g, t


def transformer_output(clip, pixels: torch.Tensor) -> torch.Tensor:
    """The last transformer block's output [B, 1 + grid^2, W], captured with a forward hook."""
    seen = []
    handle = clip.model.visual.transformer.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            clip.model.encode_image(pixels)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("preset, embed, patches, width, grid", [("tiny", 64, 4, 64, 2), ("tiny-l14", 32, 4, 48, 4)])
def test_feature_shapes_match_open_clip(preset, embed, patches, width, grid):
    clip = load_clip(ClipSpec(model=preset, precision="fp32"))
    size = clip.model.visual.image_size[0]
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    g, p = encode_images(clip, pixels)
    assert g.shape == (3, embed) and p.shape == (3, patches, width) and g.dtype == p.dtype == torch.float32
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        torch.testing.assert_close(g, clip.model.encode_image(pixels, normalize=True))
    tokens = transformer_output(clip, pixels)[:, 1:]            # [B, grid^2, W] without CLS
    assert tokens.shape[1] == grid * grid
    if grid == 4:  # 4x4 grid pooled 2x2: patch (r, c) is the mean of its 2x2 window, row-major
        grid_tokens = tokens.reshape(3, 4, 4, width)
        expect = torch.stack([grid_tokens[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean(dim=(1, 2))
                              for r in range(2) for c in range(2)], dim=1)
        torch.testing.assert_close(p, expect)
    else:
        torch.testing.assert_close(p, tokens)


def test_preset_is_deterministic_and_loads_from_a_checkpoint_file(tmp_path):
    from safetensors.torch import save_file

    a, b = load_clip(ClipSpec(model="tiny", precision="fp32")), load_clip(ClipSpec(model="tiny", precision="fp32"))
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    with torch.no_grad():
        for prm in a.model.parameters():
            prm.add_(0.01)
    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in a.model.state_dict().items()}, str(ckpt))
    c = load_clip(ClipSpec(model="tiny", precision="fp32", pretrained=str(ckpt)))
    assert torch.equal(c.model.visual.proj, a.model.visual.proj)
    assert not torch.equal(c.model.visual.proj, b.model.visual.proj)


@pytest.mark.bad_input
def test_clip_spec_defaults_and_errors():
    assert ClipSpec(model="tiny-l14").pool == 2 and ClipSpec(model="tiny").pool is None
    assert ClipSpec(model="tiny").pretrained is None
    assert ClipSpec(model="ViT-L-14").pool == 8           # the paper: 16x16 pooled to 8x8
    assert ClipSpec(model="ViT-L-14", pool=None).pool is None
    assert ClipSpec(model="ViT-B-32").pool is None        # 7x7 stays
    with pytest.raises(ValueError, match="must divide"):
        load_clip(ClipSpec(model="tiny-l14", pool=3, precision="fp32"))
    with pytest.raises(ValueError, match="prompt must contain"):
        tiny_encode_config(prompt="A photo of a thing.")


@pytest.mark.bad_input
def test_missing_weights_offline_give_one_clear_error():
    with pytest.raises(RuntimeError) as e:
        load_clip(ClipSpec(model="ViT-B-32", pretrained="openai", precision="fp32"))
    msg = str(e.value)
    assert "not available" in msg and "--set clip.pretrained=" in msg and "open_clip.create_model('ViT-B-32'" in msg


def test_run_encode_outputs(tmp_path):
    cap, syn = encode_inputs(tmp_path / "runs", corrupt="c0005", images_dir=tmp_path / "coco")
    cfg = tiny_encode_config(images_root=str(tmp_path / "coco"), real_shard_size=3)
    result = run_encode(cfg, cap, syn, RunLayout(tmp_path / "runs"))
    sd = plan(cfg, cap, syn, RunLayout(tmp_path / "runs"))
    assert verify(sd) is None and not result.cached
    assert result.counts["images"] == 12 and result.counts["concepts"] >= 6
    assert (result.counts["images_ok"], result.counts["images_failed"]) == (11, 1)
    assert (result.counts["real_ok"], result.counts["real_failed"]) == (3, 1)
    # the spec, and what its weights are (the preset's data file here), for train to copy into checkpoints
    assert result.extra["clip"] == cfg.clip.model_dump(mode="json") | {"content_id": clip_content_id(cfg.clip)}
    assert result.extra["clip"]["content_id"].startswith("preset:")
    assert Path(result.extra["pictures"]["clip_scores"]).read_bytes()[:4] == b"\x89PNG"

    clip = load_clip(cfg.clip)
    scores = {r["caption_id"]: r for r in tables.read(sd.file("scores.parquet"), tables.SCORES).to_pylist()}
    bad = scores.pop("c0005")
    assert bad["status"] == "failed" and bad["row"] == -1 and "c0005" in bad["error"] and "shard-000001" in bad["error"]
    for s in range(3):
        arrays, meta = open_arrays(sd.shard_file("features", s, "safetensors"))
        keys = json.loads(meta["keys"])
        assert arrays["global"].dtype == np.float16 and arrays["patches"].shape == (len(keys), 4, 64)
        assert keys == [f"c{i:04d}" for i in range(4 * s, 4 * s + 4) if i != 5]
        samples = {x["__key__"]: x for x in iter_tar(syn.dir / "shards" / f"shard-{s:06d}.tar")}
        for row, key in enumerate(keys):
            g, t = direct_embeddings(clip, samples[key]["jpg"], samples[key]["txt"].decode())
            r = scores[key]
            assert (r["status"], r["shard"], r["row"]) == ("ok", s, row)
            assert r["clip_score"] == pytest.approx(float(g @ t), abs=1e-5)
            np.testing.assert_allclose(r["text_embedding"], t.numpy(), atol=1e-5)
            np.testing.assert_allclose(arrays["global"][row].astype(np.float32), g.numpy(), atol=2e-3)

    # The saved head applied to the CLS token reproduces the global embedding.
    head, meta = open_arrays(sd.file("clip_head.safetensors"))
    assert json.loads(meta["clip"]) == cfg.clip.model_dump(mode="json")
    sample = next(iter_tar(syn.dir / "shards" / "shard-000000.tar"))
    x = clip.preprocess(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))[None]
    cls = transformer_output(clip, x)[:, 0]                              # [1, W]
    joint = torch.nn.functional.layer_norm(cls, (cls.shape[-1],), torch.from_numpy(np.array(head["ln_post.weight"])),
                                           torch.from_numpy(np.array(head["ln_post.bias"])), float(meta["ln_eps"]))
    joint = joint @ torch.from_numpy(np.array(head["proj"]))
    g, _ = encode_images(clip, x)
    torch.testing.assert_close(torch.nn.functional.normalize(joint, dim=-1), g)
    for k, v in clip_head(clip).items():
        np.testing.assert_array_equal(head[k], v.numpy())

    real = tables.read(sd.file("real.parquet"), tables.REAL_IMAGES).to_pylist()
    assert [r["image_id"] for r in real] == ["img0", "img1", "img2", "img3"]
    missing = real[3]
    assert missing["status"] == "failed" and str(tmp_path / "coco" / "images" / "img3.jpg") in missing["error"]
    arrays, meta = open_arrays(sd.shard_file("real", 0, "safetensors"))
    assert json.loads(meta["keys"]) == ["img0", "img1", "img2"] and arrays["global"].shape == (3, 64)

    concepts = tables.read(sd.file("concepts.parquet"), tables.CONCEPTS).to_pylist()
    by_name = {c["concept"]: c for c in concepts}
    assert {"dog", "horse", "man", "cat", "couch", "grass"} <= set(by_name)
    assert not {"riding", "playing", "red", "two", "a"} & set(by_name)
    assert by_name["dog"]["count"] == 6  # "dogs" x2 (lemmatised) + "dog" x4 over the 12 training captions
    expect = encode_texts(clip, ["A photo of dog."])[0].numpy()
    np.testing.assert_allclose(by_name["dog"]["embedding"], expect, atol=1e-6)
    assert by_name["dog"]["model"] == "tiny/seed-0"

    again = run_encode(cfg, cap, syn, RunLayout(tmp_path / "runs"))
    assert again.cached and again.fingerprint == result.fingerprint


def test_score_histogram_is_a_png_and_the_same_each_time(tmp_path):
    from pcm.pictures import score_histogram

    scores = np.random.default_rng(0).uniform(-0.1, 0.4, 200).astype(np.float32)
    score_histogram(tmp_path / "a.png", scores, "CLIP scores")
    score_histogram(tmp_path / "b.png", scores, "CLIP scores")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    score_histogram(tmp_path / "empty.png", np.zeros(0, np.float32), "no images")  # no mean line, no error
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_real_images_skipped_without_images_root(tmp_path):
    cap, syn = encode_inputs(tmp_path / "runs", n_shards=1)
    result = run_encode(tiny_encode_config(), cap, syn, RunLayout(tmp_path / "runs"))
    assert result.counts["real"] == 0 and "images_root" in result.extra["real_note"]


@pytest.mark.bad_input
def test_a_synthetic_shard_lost_after_synthesis_is_an_error_naming_it(tmp_path):
    cap, syn = encode_inputs(tmp_path / "runs", n_shards=3)
    (syn.dir / "shards" / "shard-000001.done.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-000001\.tar: synthetic shard missing or unfinished"):
        run_encode(tiny_encode_config(), cap, syn, RunLayout(tmp_path / "runs"))


def test_vocabulary_file_replaces_extraction(tmp_path):
    cap, syn = encode_inputs(tmp_path / "runs", n_shards=1)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("# my concepts\nzebra\ndog\n\nteddy bear\n")
    cfg = tiny_encode_config(vocabulary_file=str(vocab), prompt="a picture of {c}")
    result = run_encode(cfg, cap, syn, RunLayout(tmp_path / "runs"))
    rows = tables.read(Path(result.path) / "concepts.parquet", tables.CONCEPTS).to_pylist()
    assert [(r["concept"], r["count"]) for r in rows] == [("zebra", 0), ("dog", 2), ("teddy bear", 0)]
    clip = load_clip(cfg.clip)
    np.testing.assert_allclose(rows[2]["embedding"], encode_texts(clip, ["a picture of teddy bear"])[0], atol=1e-6)
    vocab.write_text("zebra\n")  # a different file content is a different stage directory
    assert plan(cfg, cap, syn, RunLayout(tmp_path / "runs")).fingerprint != result.fingerprint


def test_concepts_from_another_encode_stage_reuses_its_words_embedded_by_this_clip(tmp_path):
    cap, syn = encode_inputs(tmp_path / "runs", n_shards=1)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("zebra\ndog\nteddy bear\n")
    source = run_encode(tiny_encode_config(vocabulary_file=str(vocab)), cap, syn,
                        RunLayout(tmp_path / "runs"))
    # Another run (another CLIP seed preset, another prompt) takes the first stage's words.
    cfg = tiny_encode_config(clip={"model": "tiny-l14", "precision": "fp32"}, concepts_from=source.path,
                      prompt="a picture of {c}")
    result = run_encode(cfg, cap, syn, RunLayout(tmp_path / "runs"))
    rows = tables.read(Path(result.path) / "concepts.parquet", tables.CONCEPTS).to_pylist()
    assert [(r["concept"], r["count"]) for r in rows] == [("zebra", 0), ("dog", 2), ("teddy bear", 0)]
    np.testing.assert_allclose(rows[0]["embedding"], encode_texts(load_clip(cfg.clip), ["a picture of zebra"])[0],
                               atol=1e-6)
    with pytest.raises(ValueError, match="concepts_from=.* is a synthesize stage"):
        plan(tiny_encode_config(concepts_from=syn.path), cap, syn, RunLayout(tmp_path / "runs"))
    with pytest.raises(ValueError, match="not both"):
        tiny_encode_config(concepts_from=source.path, vocabulary_file=str(vocab))


def test_prompt_ensemble_is_the_renormalised_mean_over_the_templates(tmp_path):
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    from pcm.clip import embed_concepts

    clip = load_clip(tiny_encode_config().clip)
    got = embed_concepts(clip, ["dog", "teddy bear", "zebra"], "A photo of {c}.", "simple-imagenet", batch_size=8)
    for i, word in enumerate(["dog", "teddy bear", "zebra"]):
        each = encode_texts(clip, [t(word) for t in SIMPLE_IMAGENET_TEMPLATES])        # [7, D], unit rows
        want = torch.nn.functional.normalize(each.mean(0), dim=-1)
        np.testing.assert_allclose(got[i], want.numpy(), atol=1e-5)
    single = embed_concepts(clip, ["dog"], "A photo of {c}.", None)
    np.testing.assert_allclose(single[0], encode_texts(clip, ["A photo of dog."])[0].numpy(), atol=1e-6)


def test_workers_give_the_same_features(tmp_path):
    cap, syn = encode_inputs(tmp_path / "runs", n_shards=3)
    a = run_encode(tiny_encode_config(), cap, syn, RunLayout(tmp_path / "runs"))
    b = run_encode(tiny_encode_config(num_workers=2, batch_size=3), cap, syn,
                   RunLayout(tmp_path / "other"))
    assert a.fingerprint == b.fingerprint  # workers are a runtime setting
    for s in range(3):
        x, _ = open_arrays(Path(a.path) / "features" / f"shard-{s:06d}.safetensors")
        y, _ = open_arrays(Path(b.path) / "features" / f"shard-{s:06d}.safetensors")
        np.testing.assert_array_equal(x["patches"], y["patches"])


KILLED_RUN = """
import sys, time
from pcm.stages.contract import load_result
from pcm.stages.encode import EncodeConfig, run_encode
from storage.layout import RunLayout
cfg = EncodeConfig.model_validate({cfg!r})
run_encode(cfg, load_result({cap!r}), load_result({syn!r}), RunLayout({root!r}),
           progress=lambda done, total, msg: time.sleep(2))
"""


@pytest.mark.heavy
def test_sigkill_resume_redoes_only_pending_shards(tmp_path):
    cap, syn = encode_inputs(tmp_path / "runs", n_shards=4, per_shard=3)
    cfg = tiny_encode_config()
    root = str(tmp_path / "runs")
    sd = plan(cfg, cap, syn, RunLayout(root))
    code = KILLED_RUN.format(cfg=cfg.model_dump(mode="json"), cap=cap.path, syn=syn.path, root=root)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    first = done_path(sd.shard_file("features", 0, "safetensors"))
    while not first.exists():
        assert proc.poll() is None, "the encode subprocess ended before writing a shard"
        assert time.monotonic() < deadline, "no features marker within 60 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = [s for s in range(4) if is_done(sd.shard_file("features", s, "safetensors"))]
    assert 1 <= len(done_before) < 4 and not sd.done_marker.exists()

    resumed = run_encode(cfg, cap, syn, RunLayout(root))
    assert resumed.counts["encoded_now"] == 3 * (4 - len(done_before))   # pending shards only
    clean = run_encode(cfg, cap, syn, RunLayout(tmp_path / "clean"))
    for s in range(4):
        x, mx = open_arrays(Path(resumed.path) / "features" / f"shard-{s:06d}.safetensors")
        y, my = open_arrays(Path(clean.path) / "features" / f"shard-{s:06d}.safetensors")
        assert mx["keys"] == my["keys"]
        np.testing.assert_array_equal(x["global"], y["global"])
        np.testing.assert_array_equal(x["patches"], y["patches"])
    a = tables.read(Path(resumed.path) / "scores.parquet", tables.SCORES)
    b = tables.read(Path(clean.path) / "scores.parquet", tables.SCORES)
    assert a.equals(b)
    assert not list((Path(resumed.path) / "features").glob(".tmp-*"))


@pytest.mark.bad_input
def test_shards_made_from_another_ingest_stage_are_refused_naming_both(tmp_path):
    from storage import atomic

    cap, syn = encode_inputs(tmp_path / "runs", n_shards=1)
    record = syn.stage_dir.config_file
    atomic.write_json(record, {"stage": "synthesize", "inputs": {"ingest": "a" * 16}})
    plan(tiny_encode_config(), cap, syn, RunLayout(tmp_path / "runs"))          # the shards' own captions: fine
    atomic.write_json(record, {"stage": "synthesize", "inputs": {"ingest": "d" * 16}})
    with pytest.raises(ValueError, match=f"made from the ingest stage {'d' * 16}.*not from captions=.*ingest {'a' * 16}"):
        plan(tiny_encode_config(), cap, syn, RunLayout(tmp_path / "runs"))
    with pytest.raises(ValueError, match=f"ingest {'a' * 16}"):
        run_encode(tiny_encode_config(), cap, syn, RunLayout(tmp_path / "runs"))
