"""The evaluate stage end to end on a tiny checkpoint, its resume and checks, and `pcm caption` on image files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pcm.metrics import spice_missing
from storage import atomic, tables
from storage.arrays import write_arrays
from storage.layout import RunLayout
from storage.result import StageResult

CAPTIONS_FP, ENCODE_FP, TRAIN_FP = "a1" * 8, "b2" * 8, "c3" * 8
TRAIN_TEXTS = ["a dog runs on the grass", "a cat sleeps on a sofa", "two people ride horses on a beach",
               "a red bus on the street", "a plate of food on a table"]
TEST_IMAGES = {  # image id -> references; "105" is in the split but never encoded, "104" failed to encode
    "101": ["A dog running on grass.", "A brown dog in a field."],
    "102": ["A cat sleeping on a couch.", "A cat lying on a sofa."],
    "103": ["A bus on a city street.", "A red double decker bus."],
    "104": ["Food on a plate.", "A plate with rice."],
    "105": ["Horses on a beach.", "People riding horses."],
    "coco_106": ["A table with food.", "Dinner on a table."],
}
ENCODED = ["101", "102", "103", "coco_106"]


def finish_stage(sd, counts=None, extra=None, inputs=None):
    atomic.write_json(sd.config_file, {"stage": sd.stage, "code_version": "1", "config": {}, "inputs": inputs or {}})
    StageResult(stage=sd.stage, fingerprint=sd.fingerprint, path=str(sd.path), counts=counts or {},
                extra=extra or {}).save(sd.done_marker)


def make_images(folder: Path, names: list[str]) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name in names:
        p = folder / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def write_captions(layout: RunLayout, fp: str, name: str):
    sd = layout.stage("ingest", fp)
    sd.path.mkdir(parents=True)
    rows = [{"caption_id": f"tr{i}", "image_id": f"t{i}", "split": "train", "text": t, "raw_text": t,
             "source": "test", "image_path": None, "references": [], "status": "ok", "error": None}
            for i, t in enumerate(TRAIN_TEXTS)]
    for image_id, refs in TEST_IMAGES.items():
        for j, r in enumerate(refs):
            rows.append({"caption_id": f"{image_id}-{j}", "image_id": image_id, "split": "test", "text": r,
                         "raw_text": r, "source": "test", "image_path": f"{image_id}.png", "references": refs,
                         "status": "ok", "error": None})
    tables.write(sd.file("captions.parquet"), rows, tables.CAPTIONS)
    finish_stage(sd, extra={"name": name})
    return sd


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Finished ingest, encode (real features from the tiny CLIP) and train (a tiny checkpoint) stages."""
    from PIL import Image

    from pcm import checkpoint
    from pcm.clip import ClipSpec, clip_head, encode_images, load_clip
    from pcm.model import PCMNet, load_preset
    from pcm.vocab import Vocab

    base = tmp_path_factory.mktemp("eval")
    layout = RunLayout(base / "runs")
    captions = write_captions(layout, CAPTIONS_FP, "demo")

    spec = ClipSpec(model="tiny", pretrained=None, precision="fp32")
    clip = load_clip(spec)
    images = make_images(base / "images", ENCODED)
    pixels = torch.stack([clip.preprocess(Image.open(p).convert("RGB")) for p in images])
    g, patches = encode_images(clip, pixels)
    encode = layout.stage("encode", ENCODE_FP)
    write_arrays(encode.shard_file("real", 0, "safetensors"),
                 {"global": g.numpy().astype(np.float16), "patches": patches.numpy().astype(np.float16)},
                 {"keys": json.dumps(ENCODED)})
    atomic.write_json(encode.shard_done("real", 0), {"count": len(ENCODED)})
    real = [{"image_id": i, "split": "test", "image_path": f"{i}.png", "shard": 0, "row": r, "status": "ok",
             "error": None} for r, i in enumerate(ENCODED)]
    real.append({"image_id": "104", "split": "test", "image_path": "104.png", "shard": -1, "row": -1,
                 "status": "failed", "error": "cannot identify image file"})
    tables.write(encode.file("real.parquet"), real, tables.REAL_IMAGES)
    finish_stage(encode, extra={"clip": spec.model_dump(mode="json"), "images_root": str(base / "images")},
                 inputs={"ingest": CAPTIONS_FP})

    train = layout.stage("train", TRAIN_FP)
    torch.manual_seed(0)
    cfg = load_preset("tiny").with_data_shapes(clip.embed_dim, clip.width, clip.patches, "test")
    vocab = Vocab.build(TRAIN_TEXTS)
    bank = torch.nn.functional.normalize(torch.randn(6, clip.embed_dim), dim=-1)
    model = PCMNet(cfg, len(vocab), bank, clip_head(clip)).eval()
    for where, step in ((train.file("best"), 5), (train.path / "checkpoints" / "step-00000008", 8)):
        checkpoint.save(where, model=model, vocab=vocab, config={}, clip=spec.model_dump(mode="json"),
                        concept_names=[f"c{i}" for i in range(6)], state={"step": step})
    finish_stage(train, inputs={"ingest": CAPTIONS_FP, "encode": ENCODE_FP})
    return {"layout": layout, "captions": str(captions.path), "encode": str(encode.path), "train": str(train.path),
            "images": images, "features": (g, patches), "base": base}


def config(**kw):
    from pcm.stages.evaluate import EvaluateConfig

    return EvaluateConfig(**{"device": "cpu", "report_samples": 3, **kw})


@pytest.mark.heavy  # run, cached, then resumed: one decoding and the Java scorers twice
def test_evaluate_end_to_end_then_cached_and_resumed(run, monkeypatch):
    import pcm.stages.evaluate as ev
    from pcm import checkpoint
    from pcm.decode import beam_search

    root = str(run["layout"].root)
    cfg = config(published="coco-vitb32", batch_size=3)  # 4 images in 2 batches
    result = ev.run_evaluate(cfg, run["train"], run["encode"], run["captions"], root)
    sd = run["layout"].stage_from_path(result.path)

    # predictions.json: COCO results format, integer ids where they are integers, in real.parquet order.
    preds = json.loads(sd.file("predictions.json").read_text())
    assert [p["image_id"] for p in preds] == [101, 102, 103, "coco_106"]
    # Each caption is the beam search of that image's own features with the best checkpoint.
    model, vocab, meta = checkpoint.load(Path(run["train"]) / "best")
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
    monkeypatch.setattr(ev, "decode_split", lambda *a, **k: pytest.fail("decoded again"))
    monkeypatch.setattr("pcm.metrics.score_captions", lambda *a, **k: pytest.fail("scored again"))
    again = ev.run_evaluate(cfg, run["train"], run["encode"], run["captions"], root)
    assert again.cached and again.path == result.path
    monkeypatch.undo()

    # Killed after decoding: the rerun reuses predictions.json and redoes only the scoring.
    sd.file("metrics.json").unlink()
    monkeypatch.setattr(ev, "decode_split", lambda *a, **k: pytest.fail("decoded again"))
    resumed = ev.run_evaluate(cfg, run["train"], run["encode"], run["captions"], root)
    assert not resumed.cached
    assert json.loads(sd.file("metrics.json").read_text())["metrics"] == summary["metrics"]


def test_protocol_follows_the_datasets_passed(run):
    from pcm.stages.evaluate import protocol
    from pcm.stages.stage import load_result

    train = load_result(run["train"])
    assert protocol(train, load_result(run["captions"])) == ("in-domain", "demo", "demo")
    other = write_captions(run["layout"], "d4" * 8, "flickr30k")
    assert protocol(train, load_result(other.path)) == ("cross-domain", "demo", "flickr30k")


def test_inconsistent_inputs_are_clear_errors(run, tmp_path):
    from pcm.stages.evaluate import EvaluateConfig, run_evaluate

    root = str(tmp_path / "other")
    with pytest.raises(ValueError, match="--encode .*'ingest' stage directory; expected a 'encode' one"):
        run_evaluate(config(), run["train"], run["captions"], run["captions"], root)
    with pytest.raises(ValueError, match="no encoded val images"):
        run_evaluate(config(split="val"), run["train"], run["encode"], run["captions"], root)
    with pytest.raises(ValueError, match="unknown published setting 'coco-vit-h'"):
        EvaluateConfig(published="coco-vit-h")
    # Features from another CLIP than the checkpoint's are refused before decoding.
    layout = RunLayout(tmp_path / "runs2")
    enc = layout.stage("encode", "e5" * 8)
    enc.path.mkdir(parents=True)
    for name in ("real.parquet",):
        (enc.path / name).write_bytes((Path(run["encode"]) / name).read_bytes())
    finish_stage(enc, extra={"clip": {"model": "ViT-B-32", "pretrained": "openai", "precision": "fp16", "pool": None}})
    with pytest.raises(ValueError, match="another CLIP than the model's.*model: checkpoint 'tiny' vs features 'ViT-B-32'"):
        run_evaluate(config(), run["train"], str(enc.path), run["captions"], root)


@pytest.mark.heavy  # a whole evaluate through the CLI: decoding and the Java scorers
def test_evaluate_command_prints_the_metrics(run):
    import typer

    from pcm.cli.evaluate import register

    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["evaluate", "--train", run["train"], "--encode", run["encode"], "--captions",
                                   run["captions"], "--set", "report_samples=3", "--set", "published=coco-vitb32",
                                   "--set", "device=cpu"])
    assert res.exit_code == 0, res.output
    assert "test split, in-domain, step 5, 4 images" in res.output
    assert "CIDEr" in res.output and "report: " + str(run["layout"].root / "evaluate") in res.output
    res = CliRunner().invoke(app, ["evaluate", "--train", run["train"], "--encode", run["encode"], "--captions",
                                   run["captions"], "--set", "split=train"])
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
    res = CliRunner().invoke(app, ["caption", str(folder), str(run["images"][3]), "--checkpoint", run["train"],
                                   "--out", str(out), "--batch-size", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["101.png", "102.png", "103.png", "broken.jpg", "coco_106.png"]
    assert "error" in rows[3] and "caption" not in rows[3]

    model, vocab, meta = checkpoint.load(Path(run["train"]) / "best")
    clip = load_clip(ClipSpec.model_validate(meta["clip"]))
    from PIL import Image

    pixels = torch.stack([clip.preprocess(Image.open(p).convert("RGB")) for p in run["images"]])
    g, patches = encode_images(clip, pixels)
    want = [vocab.decode(t) for t in beam_search(model, g, patches, bos=vocab.bos, eos=vocab.eos)]
    assert [r["caption"] for r in rows if "caption" in r] == want


def test_flow_caches_on_the_fingerprint_and_publishes_artifacts(run, tmp_path, monkeypatch, prefect_api):
    import flows.evaluate as fe
    from flows.evaluate import evaluate_flow

    root = str(tmp_path / "flow-runs")
    cfg = config(spice="off")
    first = evaluate_flow(cfg, run["train"], run["encode"], run["captions"], root=root)
    assert not first.cached and Path(first.path, "report.md").exists()
    # The second flow run hits Prefect's cache (keyed on the fingerprint): the stage is not called.
    monkeypatch.setattr(fe, "run_evaluate", lambda *a, **k: pytest.fail("stage ran again"))
    second = evaluate_flow(cfg, run["train"], run["encode"], run["captions"], root=root)
    assert second.path == first.path
    assert json.loads(Path(first.path, "metrics.json").read_text())["metrics"]["SPICE"] == "skipped: spice=off"
