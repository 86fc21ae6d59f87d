"""The evaluate stage end to end on a tiny checkpoint, its resume and checks, and `pcm caption` on image files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import ENCODED, TEST_IMAGES, evaluate_inputs, mark_done, tiny_evaluate_config, write_captions
from typer.testing import CliRunner

from pcm.metrics import spice_missing
from storage import tables
from storage.layout import RunLayout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Finished ingest, encode (real features from the tiny CLIP) and train (a tiny checkpoint) stages."""
    return evaluate_inputs(tmp_path_factory.mktemp("eval"))


@pytest.mark.heavy  # run, cached, then resumed: one decoding and the Java scorers twice
def test_evaluate_end_to_end_then_cached_and_resumed(run, monkeypatch):
    from pcm import checkpoint
    from pcm.decode import beam_search
    from pcm.stages import evaluate

    root = str(run["layout"].root)
    cfg = tiny_evaluate_config(published="coco-vitb32", batch_size=3)  # 4 images in 2 batches
    result = evaluate.run_evaluate(cfg, run["train"], run["encode"], run["captions"],
                             RunLayout(root))
    sd = run["layout"].stage_from_path(result.path)

    # predictions.json: COCO results format, integer ids where they are integers, in real.parquet order.
    preds = json.loads(sd.file("predictions.json").read_text())
    assert [p["image_id"] for p in preds] == [101, 102, 103, "coco_106"]
    # Each caption is the beam search of that image's own features with the best checkpoint.
    model, vocab, meta = checkpoint.load(run["train"].dir / "best")
    g, patches = run["features"]
    g16, p16 = g.half().float(), patches.half().float()  # the features went through float16 shards
    ids = beam_search(model, g16, p16, bos=vocab.bos, eos=vocab.eos, beam_size=3, max_len=20)
    assert [p["caption"] for p in preds] == [vocab.decode(t) for t in ids]

    summary = json.loads(sd.file("metrics.json").read_text())
    assert summary["counts"] == {"images": 4, "references": 8, "failed_encode": 1, "not_encoded": 1}
    assert summary["failed_images"] == [{"image_id": "104", "error": "cannot identify image file"}]
    assert summary["not_encoded"] == ["105"]
    assert summary["protocol"] == "in-domain" and summary["split"] == "test"
    assert summary["checkpoint"]["step"] == 5 and summary["checkpoint"]["which"] == "best"
    m = summary["metrics"]
    assert set(m) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"}
    assert all(isinstance(m[k], float) and 0 <= m[k] for k in m if k != "SPICE")
    if spice_missing():
        assert m["SPICE"].startswith("unavailable: ")
    assert [r["metric"] for r in summary["published"]["rows"]] == ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"]
    assert summary["published"]["rows"][3]["published"] == 103.8

    per_image = tables.read(sd.file("per_image.parquet"), tables.PER_IMAGE).to_pylist()
    assert [r["image_id"] for r in per_image] == ENCODED
    assert per_image[0]["references"] == TEST_IMAGES["101"]
    assert np.mean([r["cider"] for r in per_image]) == pytest.approx(m["CIDEr"], abs=1e-9)

    report = sd.file("report.md").read_text()
    assert "| BLEU-1 |" in report and "coco-vitb32" not in report and "COCO in-domain, ViT-B/32" in report
    assert "| IFCap | - | - | - | 108.0 | - |" in report and "| SynC + PCM-Net |" in report  # same setting, beside
    assert "`104` failed to encode" in report and "`105`" in report
    assert "](pictures/samples.png)" in report and (sd.pictures / "samples.png").stat().st_size > 0
    assert result.extra["pictures"] == {"samples": str(sd.pictures / "samples.png")}

    # Same inputs and config: the finished stage is reused without any work.
    monkeypatch.setattr(evaluate, "decode_split", lambda *a, **k: pytest.fail("decoded again"))
    monkeypatch.setattr("pcm.metrics.score_captions", lambda *a, **k: pytest.fail("scored again"))
    again = evaluate.run_evaluate(cfg, run["train"], run["encode"], run["captions"],
                            RunLayout(root))
    assert again.cached and again.path == result.path
    monkeypatch.undo()

    # Killed after decoding: the rerun reuses predictions.json and redoes only the scoring.
    sd.file("metrics.json").unlink()
    monkeypatch.setattr(evaluate, "decode_split", lambda *a, **k: pytest.fail("decoded again"))
    resumed = evaluate.run_evaluate(cfg, run["train"], run["encode"], run["captions"],
                              RunLayout(root))
    assert not resumed.cached
    assert json.loads(sd.file("metrics.json").read_text())["metrics"] == summary["metrics"]


def test_protocol_follows_the_datasets_passed(run):
    from pcm.stages.evaluate import protocol

    assert protocol(run["train"], run["captions"]) == ("in-domain", "demo", "demo")
    other = write_captions(run["layout"], "d4" * 8, "flickr30k")
    assert protocol(run["train"], other) == ("cross-domain", "demo", "flickr30k")


@pytest.mark.bad_input
def test_inconsistent_inputs_are_clear_errors(run, tmp_path):
    from pcm.stages.evaluate import EvaluateConfig, run_evaluate

    root = str(tmp_path / "other")
    with pytest.raises(ValueError, match="--encode .*'ingest' stage directory; expected a 'encode' one"):
        run_evaluate(tiny_evaluate_config(), run["train"], run["captions"],
                     run["captions"], RunLayout(root))
    with pytest.raises(ValueError, match="no encoded val images"):
        run_evaluate(tiny_evaluate_config(split="val"), run["train"], run["encode"],
                     run["captions"], RunLayout(root))
    with pytest.raises(ValueError, match="unknown published setting 'coco-vit-h'"):
        EvaluateConfig(published="coco-vit-h")
    # Features from another CLIP than the checkpoint's are refused before decoding.
    layout = RunLayout(tmp_path / "runs2")
    enc = layout.stage("encode", "e5" * 8)
    enc.path.mkdir(parents=True)
    for name in ("real.parquet",):
        (enc.path / name).write_bytes((run["encode"].dir / name).read_bytes())
    other_clip = mark_done(enc, extra={"clip": {"model": "ViT-B-32", "pretrained": "openai", "precision": "fp16",
                                                "pool": None}})
    with pytest.raises(ValueError, match="another CLIP than the model's.*model: checkpoint 'tiny' vs features 'ViT-B-32'"):
        run_evaluate(tiny_evaluate_config(), run["train"], other_clip,
                     run["captions"], RunLayout(root))


@pytest.mark.heavy  # a whole evaluate through the CLI: decoding and the Java scorers
def test_evaluate_command_prints_the_metrics(run):
    import typer

    from pcm.cli.evaluate import register

    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["evaluate", "--train", run["train"].path, "--encode", run["encode"].path,
                                   "--captions", run["captions"].path, "--set", "report_samples=3",
                                   "--set", "published=coco-vitb32", "--set", "device=cpu"])
    assert res.exit_code == 0, res.output
    assert "test split, in-domain, step 5, 4 images" in res.output
    assert "CIDEr" in res.output and "report: " + str(run["layout"].root / "evaluate") in res.output
    res = CliRunner().invoke(app, ["evaluate", "--train", run["train"].path, "--encode", run["encode"].path,
                                   "--captions", run["captions"].path, "--set", "split=train"])
    assert res.exit_code != 0 and "invalid evaluate config: --set split=train: Input should be" in str(res.exception)


def test_caption_command_on_files_and_folders(run, tmp_path):
    import typer

    from pcm import checkpoint
    from pcm.cli.evaluate import register
    from pcm.clip import ClipSpec, encode_images, load_clip
    from pcm.decode import beam_search

    app = typer.Typer()
    register(app)
    folder = tmp_path / "pics"
    folder.mkdir()
    for p in run["images"][:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "captions.jsonl"
    res = CliRunner().invoke(app, ["caption", str(folder), str(run["images"][3]), "--checkpoint", run["train"].path,
                                   "--out", str(out), "--batch-size", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["101.png", "102.png", "103.png", "broken.jpg", "coco_106.png"]
    assert "error" in rows[3] and "caption" not in rows[3]

    model, vocab, meta = checkpoint.load(run["train"].dir / "best")
    clip = load_clip(ClipSpec.model_validate(meta["clip"]))
    from PIL import Image

    pixels = torch.stack([clip.preprocess(Image.open(p).convert("RGB")) for p in run["images"]])
    g, patches = encode_images(clip, pixels)
    want = [vocab.decode(t) for t in beam_search(model, g, patches, bos=vocab.bos, eos=vocab.eos)]
    assert [r["caption"] for r in rows if "caption" in r] == want


def test_flow_caches_on_the_fingerprint_and_publishes_artifacts(run, tmp_path, monkeypatch, prefect_api):
    import flows.evaluate
    from flows.evaluate import evaluate_flow

    root = str(tmp_path / "flow-runs")
    cfg = tiny_evaluate_config(spice="off")
    first = evaluate_flow(cfg, run["train"].path, run["encode"].path, run["captions"].path, root=root)
    assert not first.cached and Path(first.path, "report.md").exists()
    # The second flow run hits Prefect's cache (keyed on the fingerprint): the stage is not called.
    monkeypatch.setattr(flows.evaluate, "run_evaluate", lambda *a, **k: pytest.fail("stage ran again"))
    second = evaluate_flow(cfg, run["train"].path, run["encode"].path, run["captions"].path, root=root)
    assert second.path == first.path
    assert json.loads(Path(first.path, "metrics.json").read_text())["metrics"]["SPICE"] == "skipped: spice=off"


def test_split_feature_batches_keep_each_callers_batches_and_check_shards_first(tmp_path):
    """feature_batches: evaluate's batches never span a shard (by_shard), validation's follow the split across
    shards; each batch's features are the rows the split names (read here straight from the shard files)."""
    from builders import train_inputs

    from pcm.dataset import FeatureStore, open_features
    from pcm.split_images import SplitImages, check_features, feature_batches

    _, encode = train_inputs(tmp_path, n_train=8)   # features/: c0000-c0003 in shard 0, c0004-c0007 in shard 1
    enc = encode.stage_dir
    ids = [f"c{i:04d}" for i in range(8)]
    images = SplitImages(image_ids=ids, shard=np.array([0] * 4 + [1] * 4), row=np.array([0, 1, 2, 3] * 2))
    store = FeatureStore(enc, "features")
    check_features(images, store)
    stored = [open_features(enc.feature_shard("features", s))[0] for s in (0, 1)]

    def batches(**kw):
        return [(at.tolist(), g, v) for at, g, v in feature_batches(images, store, "cpu", 3, **kw)]

    assert [at for at, _, _ in batches()] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [at for at, _, _ in batches(by_shard=True)] == [[0, 1, 2], [3], [4, 5, 6], [7]]
    for at, g, v in batches():
        want = [stored[images.shard[i]]["global"][images.row[i]] for i in at]
        assert np.array_equal(g.numpy(), np.stack(want)) and g.dtype == torch.float16  # the stored dtype
        assert v.shape == (len(at), *stored[0]["patches"].shape[1:])

    bad = SplitImages(image_ids=ids[:2], shard=np.array([0, 0]), row=np.array([1, 0]))   # rows swapped
    with pytest.raises(ValueError, match="row 1 should hold 'c0000' but holds c0001"):
        check_features(bad, store)
    enc.shard_done("features", 1).unlink()   # a shard without its marker is unfinished, even if its file is whole
    with pytest.raises(FileNotFoundError, match="shard-000001.safetensors: real-image feature shard missing or unfinished"):
        check_features(images, FeatureStore(enc, "features"))
