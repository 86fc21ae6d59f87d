"""Stage inputs built by hand, for tests that need a stage's inputs or outputs but not the stages' work.

Every test module that needs another stage's directories takes them from here (no test module imports
another): finished ingest/encode/synthesize/train directories, the tiny configs the stage tests run
with, and the malicious pickle of the security tests.

Everything is written through the storage layer (RunLayout, tables, write_arrays, ShardWriter) and the
stage marker comes last, as `pcm.stages.contract.finish` writes it, so the stages downstream read these
directories like real ones. The fingerprints are fixed strings ("c" * 16 ...): one directory of a
stage per run root. A finished stage comes back as its StageResult, read back from its marker
(`load_result`, as the CLI resolves a stage directory's path), so a test passes it to plan/run_<stage> as it
is and takes `.path`, `.dir` or `.stage_dir` where it needs the directory. torch and the stage configs that
import it are imported inside the functions that need them, so a test that builds plain directories does not
pay for torch.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pcm.stages.contract import finish, load_result
from storage import atomic, manifests, tables
from storage.arrays import write_arrays
from storage.layout import RunLayout, StageDir
from storage.result import StageResult
from storage.shards import ShardWriter

if TYPE_CHECKING:
    from pcm.stages.encode import EncodeConfig
    from pcm.stages.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def caption_row(caption_id: str, text: str = "a dog", **fields: Any) -> dict[str, Any]:
    """One ok train row of captions.parquet (tables.CAPTIONS); `fields` override any column."""
    return {"caption_id": caption_id, "image_id": "i", "split": "train", "text": text, "raw_text": text,
            "source": "t", "image_path": None, "references": [], "status": "ok", "error": None, **fields}


def new_stage(root: str | Path, stage: str, fingerprint: str) -> StageDir:
    """An empty (unfinished) stage directory under the run root `root`."""
    sd = RunLayout(root).stage(stage, fingerprint)
    sd.path.mkdir(parents=True, exist_ok=True)
    return sd


def finished_stage(root: str | Path, stage: str, fingerprint: str,
                   counts: dict[str, int] | None = None) -> StageResult:
    """A finished stage with no outputs (a synthesize stage with no synthetic shards, say)."""
    sd = new_stage(root, stage, fingerprint)
    finish(sd, counts or {}, 0.0)
    return load_result(sd.path)


def ingest_stage(root: str | Path, captions: pa.Table | list[dict[str, Any]],
                 fingerprint: str = "c" * 16) -> StageResult:
    """A finished ingest stage holding `captions` as captions.parquet: row dicts are checked against
    tables.CAPTIONS, a pyarrow table is written as it is (whatever its schema)."""
    sd = new_stage(root, "ingest", fingerprint)
    if isinstance(captions, pa.Table):
        pq.write_table(captions, sd.file("captions.parquet"))
        rows = captions.num_rows
    else:
        rows = tables.write(sd.file("captions.parquet"), captions, tables.CAPTIONS).num_rows
    finish(sd, {"rows": rows}, 0.0)
    return load_result(sd.path)


def feature_stage(root: str | Path, fingerprint: str = "e" * 16, keys: tuple[str, ...] = ("a", "b"),
                  seed: int = 0) -> StageDir:
    """An encode-like stage directory (no marker): one feature shard and one real-image shard of
    len(keys) rows (global 8-d, patches 4 x 12, float16) and the CLIP head (12 -> 8)."""
    sd = new_stage(root, "encode", fingerprint)
    rng = np.random.default_rng(seed)
    for kind in ("features", "real"):
        write_arrays(sd.shard_file(kind, 0, "safetensors"),
                     {"global": rng.standard_normal((len(keys), 8)).astype(np.float16),
                      "patches": rng.standard_normal((len(keys), 4, 12)).astype(np.float16)},
                     {"keys": json.dumps(list(keys))})
    write_arrays(sd.file("clip_head.safetensors"), {"ln_post.weight": np.ones(12, np.float32),
                                                    "ln_post.bias": np.zeros(12, np.float32),
                                                    "proj": np.ones((12, 8), np.float32)}, {"ln_eps": "1e-5"})
    return sd


# ---------------------------------------------------------------------- encode inputs: ingest and synthesize stages
ENCODE_TEXTS = ["a man riding horses on a beach", "two dogs are playing in the grass", "a dog chasing a ball",
         "a cat sleeping on a red couch", "a man holding a dog", "the horse eats grass near a fence",
         "a cat and a dog on a couch", "a plate of pizza on a table"]


def jpeg(seed: int, size: int = 64) -> bytes:
    """A random (noise) JPEG, fixed by `seed`."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def encode_inputs(root: Path, *, n_shards: int = 3, per_shard: int = 4, corrupt: str | None = None,
                images_dir: Path | None = None) -> tuple[StageResult, StageResult]:
    """An ingest-like and a synthesize-like finished stage, written through the storage layer."""
    layout = RunLayout(root)
    cap = layout.stage("ingest", "a" * 16)
    cap.path.mkdir(parents=True)
    rows, samples = [], []
    for i in range(n_shards * per_shard):
        cid = f"c{i:04d}"
        text = ENCODE_TEXTS[i % len(ENCODE_TEXTS)]
        rows.append({"caption_id": cid, "image_id": f"t{i}", "split": "train", "text": text, "raw_text": text,
                     "source": "test", "image_path": None, "references": None, "status": "ok", "error": None})
        samples.append((cid, text))
    for j, split in enumerate(["val", "val", "test", "test"]):
        rows.append({"caption_id": f"v{j}", "image_id": f"img{j}", "split": split, "text": "a photo",
                     "raw_text": "a photo", "source": "test", "image_path": f"images/img{j}.jpg",
                     "references": ["a photo"], "status": "ok", "error": None})
    tables.write(cap.file("captions.parquet"), rows, tables.CAPTIONS)
    finish(cap, {"captions": len(rows)}, time.monotonic())
    if images_dir is not None:
        (images_dir / "images").mkdir(parents=True, exist_ok=True)
        for j in range(3):  # img3 is missing on purpose
            (images_dir / "images" / f"img{j}.jpg").write_bytes(jpeg(1000 + j))

    syn = layout.stage("synthesize", "b" * 16)
    for s in range(n_shards):
        with ShardWriter(syn.shard_file("shards", s, "tar")) as w:
            for cid, text in samples[s * per_shard:(s + 1) * per_shard]:
                data = b"\xff\xd8 not a jpeg" if cid == corrupt else jpeg(int(cid[1:]))
                w.write({"__key__": cid, "jpg": data, "txt": text, "json": json.dumps({"seed": 1})})
    finish(syn, {"images": len(samples), "shards": n_shards}, time.monotonic())
    return load_result(cap.path), load_result(syn.path)


def tiny_encode_config(**kw) -> EncodeConfig:
    from pcm.stages.encode import EncodeConfig

    base = {"clip": {"model": "tiny", "precision": "fp32"}, "device": "cpu", "batch_size": 3, "num_workers": 0,
            "min_count": 1, "top_n": None, "progress_bar": False}
    return EncodeConfig.model_validate(base | kw)


# ---------------------------------------------------------------------- train inputs: stage dirs built through storage
D_EMBED, D_WIDTH, N_PATCHES = 16, 24, 4
TRAIN_CAPTIONS = [
    "a dog runs on the grass",
    "two cats sleep on a red sofa",
    "a man rides a bike down the street",
    "a plate of pasta with tomato sauce",
    "a train stops at the station",
    "children play football in the park",
    "a bird sits on a wooden fence",
    "a woman holds an umbrella in the rain",
]
TRAIN_CONCEPTS = ["dog", "cat", "man", "plate", "train", "child", "bird", "woman", "grass", "sofa"]
CLIP_SPEC = {"model": "tiny", "pretrained": None, "precision": "fp32", "pool": None}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def train_inputs(root: Path, n_train: int = 8, n_val: int = 3, seed: int = 0) -> tuple[StageResult, StageResult]:
    """(captions stage, encode stage) finished under `root` for `n_train` captions (cycled) and val images."""
    rng = np.random.default_rng(seed)
    layout = RunLayout(root)
    cap = layout.stage("ingest", "a" * 16)
    enc = layout.stage("encode", "b" * 16)
    started = time.monotonic()

    texts = [TRAIN_CAPTIONS[i % len(TRAIN_CAPTIONS)] + ("" if i < len(TRAIN_CAPTIONS) else f" number {i}") for i in range(n_train)]
    rows = [{"caption_id": f"c{i:04d}", "image_id": f"i{i:04d}", "split": "train", "text": t, "raw_text": t,
             "source": "test", "image_path": None, "references": [], "status": "ok", "error": None}
            for i, t in enumerate(texts)]
    val_refs = [[TRAIN_CAPTIONS[j % len(TRAIN_CAPTIONS)], TRAIN_CAPTIONS[(j + 1) % len(TRAIN_CAPTIONS)]] for j in range(n_val)]
    for j, refs in enumerate(val_refs):
        for r, text in enumerate(refs):
            rows.append({"caption_id": f"v{j:04d}-{r}", "image_id": f"val{j:04d}", "split": "val", "text": text,
                         "raw_text": text, "source": "test", "image_path": f"val/{j}.jpg", "references": refs,
                         "status": "ok", "error": None})
    rows.append({"caption_id": "t0000", "image_id": "test0000", "split": "test", "text": "never used",
                 "raw_text": "never used", "source": "test", "image_path": "test/0.jpg", "references": ["never used"],
                 "status": "ok", "error": None})
    cap.path.mkdir(parents=True, exist_ok=True)
    tables.write(cap.file("captions.parquet"), rows, tables.CAPTIONS)
    finish(cap, {"captions": len(rows)}, started)

    # Concept bank, CLIP head and features: random but fixed by the seed.
    enc.path.mkdir(parents=True, exist_ok=True)
    bank = _unit(rng.standard_normal((len(TRAIN_CONCEPTS), D_EMBED)).astype(np.float32))
    tables.write(enc.file("concepts.parquet"), [{"concept": c, "count": 10, "embedding": bank[i].tolist(),
                                                 "model": "tiny"} for i, c in enumerate(TRAIN_CONCEPTS)], tables.CONCEPTS)
    head = {"ln_post.weight": np.ones(D_WIDTH, np.float32), "ln_post.bias": np.zeros(D_WIDTH, np.float32),
            "proj": (rng.standard_normal((D_WIDTH, D_EMBED)) / np.sqrt(D_WIDTH)).astype(np.float32)}
    write_arrays(enc.file("clip_head.safetensors"), head, {"clip": json.dumps(CLIP_SPEC), "ln_eps": "1e-05"})

    def features(n: int) -> dict[str, np.ndarray]:
        return {"global": _unit(rng.standard_normal((n, D_EMBED))).astype(np.float16),
                "patches": rng.standard_normal((n, N_PATCHES, D_WIDTH)).astype(np.float16)}

    # Two training shards, so batches gather across files; one failed sample is skipped.
    half = (n_train + 1) // 2
    score_rows = []
    for shard, ids in enumerate([range(0, half), range(half, n_train)]):
        ids = list(ids)
        write_arrays(enc.shard_file("features", shard, "safetensors"), features(len(ids)),
                     {"keys": json.dumps([f"c{i:04d}" for i in ids])})
        atomic.write_json(enc.shard_done("features", shard), {"count": len(ids)})
        score_rows += [{"caption_id": f"c{i:04d}", "shard": shard, "row": r, "clip_score": float(0.15 + 0.02 * (i % 8)),
                        "text_embedding": [0.0] * D_EMBED, "status": "ok", "error": None} for r, i in enumerate(ids)]
    score_rows.append({"caption_id": "c9999", "shard": 0, "row": -1, "clip_score": None, "text_embedding": None,
                       "status": "failed", "error": "decode error"})
    tables.write(enc.file("scores.parquet"), score_rows, tables.SCORES)

    write_arrays(enc.shard_file("real", 0, "safetensors"), features(n_val + 1),
                 {"keys": json.dumps([f"val{j:04d}" for j in range(n_val)] + ["test0000"])})
    atomic.write_json(enc.shard_done("real", 0), {"count": n_val + 1})
    real = [{"image_id": f"val{j:04d}", "split": "val", "image_path": f"val/{j}.jpg", "shard": 0, "row": j,
             "status": "ok", "error": None} for j in range(n_val)]
    real.append({"image_id": "test0000", "split": "test", "image_path": "test/0.jpg", "shard": 0, "row": n_val,
                 "status": "ok", "error": None})
    tables.write(enc.file("real.parquet"), real, tables.REAL_IMAGES)
    finish(enc, {"features": n_train}, started, extra={"clip": CLIP_SPEC})
    return load_result(cap.path), load_result(enc.path)
NO_DROPOUT = {k: 0.0 for k in ("embed_dropout", "dropout", "attn_dropout", "decoder_dropout", "output_dropout")}


def tiny_train_config(**overrides) -> TrainConfig:
    from pcm.stages.train import TrainConfig

    values = dict(preset="tiny", batch_size=4, epochs=4, warmup=20, min_word_count=1, log_every=1, val_every=4,
                  val_metric="loss", checkpoint_every=2, keep_last=2, num_workers=0, device="cpu",
                  deterministic=True, progress_bar=False)
    return TrainConfig(**{**values, **overrides})


def child_env() -> dict[str, str]:
    """The environment of a child Python process that imports this tree's packages on one thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# ---------------------------------------------------------------------- synthesize inputs
N_TRAIN = 8
# The synthesize config fields of a fast CPU run of the tiny preset.
TINY_SYNTHESIZE = dict(model="tiny", steps=2, height=32, width=32, shard_size=3, batch_size=2, progress_bar=False,
                       device="cpu")


def make_captions(layout: RunLayout, n_train: int = N_TRAIN) -> StageResult:
    """A finished ingest stage: n_train ok train captions, plus a val and a rejected row to skip."""
    sd = layout.stage("ingest", "00000000000000aa")
    sd.path.mkdir(parents=True)
    rows = [dict(caption_id=f"c{i:03d}", image_id=f"img{i}", split="train", text=f"a photo of a red thing number {i}",
                 raw_text=f"a photo of a red thing number {i}", source="test", image_path=None, references=[],
                 status="ok", error=None) for i in range(n_train)]
    rows.insert(2, dict(caption_id="v000", image_id="imgv", split="val", text="a val caption", raw_text="a val caption",
                        source="test", image_path="v.jpg", references=["a val caption"], status="ok", error=None))
    rows.insert(5, dict(caption_id="r000", image_id="imgr", split="train", text="", raw_text="", source="test",
                        image_path=None, references=[], status="rejected", error="empty caption"))
    tables.write(sd.file("captions.parquet"), rows, tables.CAPTIONS)
    finish(sd, {"captions": len(rows)}, time.monotonic())
    return load_result(sd.path)


def train_ids(n: int = N_TRAIN) -> list[str]:
    """The caption ids of make_captions's train rows, in order."""
    return [f"c{i:03d}" for i in range(n)]


# ---------------------------------------------------------------------- evaluate inputs
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


def mark_done(sd: StageDir, counts=None, extra=None, inputs=None) -> StageResult:
    """Mark `sd` finished by hand: its config.json and stage.done.json, no timing (pcm.stages.contract.finish times);
    returns its result as read back from the marker."""
    atomic.write_json(sd.config_file, {"stage": sd.stage, "code_version": "1", "config": {}, "inputs": inputs or {}})
    StageResult(stage=sd.stage, fingerprint=sd.fingerprint, path=str(sd.path), counts=counts or {},
                extra=extra or {}).save(sd.done_marker)
    return load_result(sd.path)


def make_images(folder: Path, names: list[str]) -> list[Path]:
    """One random 64 x 48 PNG per name in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name in names:
        p = folder / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def write_captions(layout: RunLayout, fp: str, name: str) -> StageResult:
    """A finished ingest stage named `name`: TRAIN_TEXTS as train rows, TEST_IMAGES as test rows."""
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
    return mark_done(sd, extra={"name": name})


def evaluate_inputs(base: Path) -> dict[str, Any]:
    """Finished ingest, encode (real features from the tiny CLIP) and train (a tiny checkpoint) stages under
    `base`, the inputs of an evaluate stage, as StageResults under "captions", "encode" and "train"; torch and
    the tiny CLIP are imported here, not by this module."""
    import torch

    from pcm import checkpoint
    from pcm.clip import ClipSpec, clip_head, encode_images, load_clip
    from pcm.model import PCMNet, load_preset
    from pcm.vocab import Vocab

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
    encoded = mark_done(encode, extra={"clip": spec.model_dump(mode="json"), "images_root": str(base / "images")},
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
    trained = mark_done(train, inputs={"ingest": CAPTIONS_FP, "encode": ENCODE_FP})
    return {"layout": layout, "captions": captions, "encode": encoded, "train": trained, "images": images,
            "features": (g, patches), "base": base}


def tiny_evaluate_config(**kw):
    from pcm.stages.evaluate import EvaluateConfig

    return EvaluateConfig(**{"device": "cpu", "report_samples": 3, **kw})


# ---------------------------------------------------------------------- hostile inputs
class Payload:
    """Unpickling this calls open(sentinel, "w"): code runs, and leaves a file behind."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self) -> tuple:
        return (open, (self.sentinel, "w"))


def refused_naming_file(path: Path, content: bytes, read: Any, message: str) -> None:
    """Write `content` to `path`: `read(path)` must raise a ValueError matching `message` that names the file."""
    import pytest

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        read(path)
    assert str(path) in str(err.value)


def ingest_fails(tmp_path: Path, name: str, content: bytes, message: str) -> Path:
    """Ingest a caption file `name` holding `content`: the error must match `message` and name the file, and no
    ingest directory may hold a marker or captions.parquet. Returns the run root."""

    from pcm.stages.ingest import IngestConfig, run_ingest

    refused_naming_file(tmp_path / name, content,
                        lambda source: run_ingest(IngestConfig(source=str(source)), RunLayout(tmp_path / "runs")),
                        message)
    for sd in (tmp_path / "runs" / "ingest").glob("*"):
        assert not (sd / "stage.done.json").exists() and not (sd / "captions.parquet").exists()
        assert not list(sd.glob(".tmp-*"))
    return tmp_path / "runs"


def ingest_rows(tmp_path: Path, name: str, content: bytes) -> tuple[StageResult, dict[str, dict[str, Any]]]:
    """Ingest a caption file `name` holding `content` (it must finish): its result and captions.parquet's rows by id."""
    from pcm.stages.ingest import IngestConfig, run_ingest

    source = tmp_path / name
    source.write_bytes(content)
    r = run_ingest(IngestConfig(source=str(source)), RunLayout(tmp_path / "runs"))
    return r, {row["caption_id"]: row for row in manifests.CAPTIONS.read(r.stage_dir).to_pylist()}
