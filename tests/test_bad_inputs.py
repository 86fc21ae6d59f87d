"""Bad inputs at every stage: a clear error naming the file, row or parameter, or a recorded failed row.

Each case also checks that nothing else is lost or corrupted: the other rows are ok, no shard or
feature file sits under its final name without its done marker, no temporary is left behind,
and no stage.done.json follows a fatal error. The disk-full cases fail a write in the middle of
a shard, then rerun without the fault and compare the outputs with a clean run's.

One tiny ingest -> synthesize -> encode run (6 captions, 2 shards, 2 test images of which one is
missing on disk) is shared by the whole module; each case works on copies of it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from builders import caption_row, ingest_fails, ingest_rows, ingest_stage
from PIL import Image

from pcm.stages.encode import EncodeConfig, run_encode
from pcm.stages.ingest import IngestConfig, run_ingest
from pcm.stages.synthesize import SynthesizeConfig, run_synthesize
from storage import tables
from storage.arrays import open_arrays
from storage.layout import RunLayout
from storage.result import StageResult
from storage.shards import ShardWriter, done_path, iter_tar

pytestmark = pytest.mark.bad_input  # every test here is a case of the bad-input corpus (docs/reliability.md)

TRAIN = ["a dog runs on the grass", "two cats sleep on a red sofa", "a man rides a bike",
         "a dog and a cat on a sofa", "a man walks a dog", "a cat on the grass"]
SYNTH = dict(model="tiny", steps=2, height=32, width=32, shard_size=3, batch_size=3, device="cpu",
             progress_bar=False, writer_threads=1)


def encode_config(images_root: Path, **kw: Any) -> EncodeConfig:
    base = {"clip": {"model": "tiny", "precision": "fp32"}, "device": "cpu", "batch_size": 2, "num_workers": 0,
            "min_count": 1, "top_n": None, "progress_bar": False, "images_root": str(images_root)}
    return EncodeConfig.model_validate(base | kw)


def jpeg(seed: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


# ---------------------------------------------------------------------- integrity checks
def leftovers(stage_path: str | Path) -> list[str]:
    """What a failed or finished stage must never leave: temporaries, unmarked data files."""
    found = []
    for p in Path(stage_path).rglob("*"):
        if p.name.startswith(".tmp-"):
            found.append(f"temporary {p}")
        elif re.fullmatch(r"shard-\d+\.(tar|safetensors)", p.name) and not done_path(p).exists():
            found.append(f"{p} without its done marker")
    return found


def stage_dirs(root: Path, stage: str) -> list[Path]:
    return sorted(p for p in (root / stage).glob("*") if p.is_dir())


def assert_failed_cleanly(root: Path, stage: str) -> Path:
    """The one directory of `stage` under `root` has no stage marker and nothing partial; returns it."""
    (sd,) = stage_dirs(root, stage)
    assert not (sd / "stage.done.json").exists()
    assert leftovers(sd) == []
    return sd


def clone_stage(source: StageResult, root: Path) -> StageResult:
    """A copy of a finished stage under another run root, its marker pointing at the copy; the copy's result."""
    dst = RunLayout(root).stage(source.stage, source.fingerprint).path
    shutil.copytree(source.dir, dst)
    r = StageResult.load(dst / "stage.done.json")
    StageResult(**{**r.to_dict(), "path": str(dst)}).save(dst / "stage.done.json")
    return StageResult.load(dst / "stage.done.json")


def encode_outputs(path: str | Path) -> dict[str, Any]:
    """Everything an encode stage wrote that later stages read, as comparable values."""
    path = Path(path)
    out: dict[str, Any] = {}
    for f in sorted(path.glob("*/shard-*.safetensors")):
        arrays, meta = open_arrays(f)
        out[f"{f.parent.name}/{f.name}"] = ({k: np.asarray(v).tobytes() for k, v in arrays.items()}, meta["keys"])
    for name, schema in (("scores", tables.SCORES), ("real", tables.REAL_IMAGES), ("concepts", tables.CONCEPTS)):
        out[name] = tables.read(path / f"{name}.parquet", schema).to_pylist()
    return out


def synth_outputs(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    out: dict[str, Any] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                           for p in sorted(path.glob("shards/shard-*.tar"))}
    out["samples"] = tables.read(path / "samples.parquet", tables.SAMPLES).to_pylist()
    return out


# ---------------------------------------------------------------------- the shared tiny run
heavy = pytest.mark.heavy  # the cases on the shared tiny run (real stages, ~10 s): not in `make test-fast`


@dataclass(frozen=True)
class TinyRun:
    base: Path
    images: Path
    captions: StageResult   # the ingest stage
    shards: StageResult     # the synthesize stage
    encode: StageResult     # the encode stage


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: the machine is shared and runs compared bit for bit must match."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyRun:
    base = tmp_path_factory.mktemp("tiny")
    images = [{"imgid": i, "filename": f"t{i}.jpg", "split": "train", "sentences": [{"raw": t, "sentid": i}]}
              for i, t in enumerate(TRAIN)]
    images += [{"imgid": 100 + j, "filepath": "test", "filename": f"img{j}.jpg", "split": "test",
                "sentences": [{"raw": "a dog on a sofa", "sentid": 100 + 2 * j},
                              {"raw": "a cat on the grass", "sentid": 101 + 2 * j}]} for j in range(2)]
    source = base / "dataset_tiny.json"
    source.write_text(json.dumps({"images": images}))
    (base / "images" / "test").mkdir(parents=True)
    (base / "images" / "test" / "img0.jpg").write_bytes(jpeg(0))  # img1.jpg is missing on purpose
    root = str(base / "runs")
    cap = run_ingest(IngestConfig(source=str(source)), RunLayout(root))
    syn = run_synthesize(SynthesizeConfig(**SYNTH), cap, RunLayout(root))
    enc = run_encode(encode_config(base / "images"), cap, syn, RunLayout(root))
    assert syn.counts["shards"] == 2 and syn.counts["ok"] == 6
    return TinyRun(base, base / "images", cap, syn, enc)


# ---------------------------------------------------------------------- ingest: files and captions
def karpathy(*images: dict) -> bytes:
    return json.dumps({"images": list(images)}).encode()


def kimg(imgid: Any, *sentences: tuple[Any, Any], split: str = "train", **extra: Any) -> dict:
    return {"imgid": imgid, "filename": f"{imgid}.jpg", "split": split,
            "sentences": [{"sentid": s, "raw": r} for s, r in sentences], **extra}


def coco(images: list, annotations: list) -> bytes:
    return json.dumps({"images": images, "annotations": annotations}).encode()


GOOD_KARPATHY = karpathy(kimg(1, (1, "a dog on the grass"), (2, "a cat on a sofa")), kimg(2, (3, "a man on a bike")))
GOOD_COCO = coco([{"id": 1, "file_name": "1.jpg"}], [{"id": 10, "image_id": 1, "caption": "a dog"},
                                                      {"id": 11, "image_id": 1, "caption": "a cat"}])

# 1,000 captions; a stray quote opens the cell of the 12th (line 13) and is never closed.
STRAY_QUOTE_CSV = ("caption,image_id\n" + "".join(f"caption number {i},{i}\n" for i in range(1000))).replace(
    "caption number 11,", '"caption number 11,').encode()
# (case, file name, content, the error's message) - every one must name the file and the place.
INGEST_ERRORS = [
    ("karpathy-malformed-json", "dataset_x.json", b'{"images": [{"imgid": 1,, }]}',
     r"invalid JSON at line 1, column 25"),
    ("karpathy-truncated-json", "dataset_x.json", GOOD_KARPATHY[: len(GOOD_KARPATHY) // 2],
     r"invalid JSON at line 1, column \d+"),
    ("coco-truncated-json", "captions.json", GOOD_COCO[:-7], r"invalid JSON at line 1, column \d+"),
    ("jsonl-malformed-line", "x.jsonl", b'{"caption": "a dog"}\n{"caption": "a cat"\n',
     r"invalid JSON at line 2, column"),
    ("json-neither-karpathy-nor-coco", "x.json", b"[1, 2, 3]", r"must be Karpathy split JSON .* or COCO annotations"),
    ("karpathy-missing-sentences", "dataset_x.json", json.dumps({"images": [{"imgid": 1, "split": "train",
                                                                             "filename": "1.jpg"}]}).encode(),
     r"images\[0\]: missing 'sentences'"),
    ("karpathy-raw-not-a-string", "dataset_x.json", karpathy(kimg(1, (1, "ok")), kimg(2, (2, 42))),
     r"images\[1\]\.sentences\[0\]: 'raw' must be a string, got int"),
    ("karpathy-sentid-wrong-type", "dataset_x.json", karpathy(kimg(1, ([1], "a dog"))),
     r"images\[0\]\.sentences\[0\]: 'sentid' must be an integer or a string"),
    ("karpathy-unknown-split", "dataset_x.json", karpathy(kimg(1, (1, "a dog"), split="training")),
     r"images\[0\]: unknown split 'training'"),
    ("karpathy-sentences-not-a-list", "dataset_x.json",
     json.dumps({"images": [{"imgid": 1, "split": "train", "filename": "1.jpg", "sentences": "a dog"}]}).encode(),
     r"images\[0\]: 'sentences' must be a list, got str"),
    ("coco-missing-caption", "captions.json", coco([{"id": 1, "file_name": "1.jpg"}],
                                                   [{"id": 10, "image_id": 1, "caption": "a"}, {"id": 11, "image_id": 1}]),
     r"annotations\[1\]: missing 'caption'"),
    ("coco-unknown-image", "captions.json", coco([{"id": 1, "file_name": "1.jpg"}],
                                                 [{"id": 10, "image_id": 99, "caption": "a dog"}]),
     r"annotations\[0\]: image_id '99' is not in images\[\]"),
    ("coco-images-not-a-list", "captions.json", json.dumps({"images": {}, "annotations": []}).encode(),
     r"top level: 'images' must be a list, got dict"),
    ("csv-no-caption-column", "x.csv", b"text,image_id\na dog,1\n", r"no 'caption' column in the header"),
    ("karpathy-duplicate-caption-id", "dataset_x.json", karpathy(kimg(1, (7, "a dog")), kimg(2, (7, "a cat"))),
     r"images\[1\]\.sentences\[0\]: duplicate caption id 'x-7', first used by images\[0\]\.sentences\[0\]"),
    ("karpathy-duplicate-image-id", "dataset_x.json", karpathy(kimg(1, (1, "a dog")), kimg(1, (2, "a cat"))),
     r"images\[1\]: duplicate image id '1', first used by images\[0\]"),
    ("coco-duplicate-annotation-id", "captions.json",
     coco([{"id": 1, "file_name": "1.jpg"}], [{"id": 10, "image_id": 1, "caption": "a dog"},
                                              {"id": 10, "image_id": 1, "caption": "a cat"}]),
     r"annotations\[1\]: duplicate caption id 'captions-10', first used by annotations\[0\]"),
    ("csv-stray-quote", "x.csv", STRAY_QUOTE_CSV,
     r"line 13: invalid CSV: a quoted cell of the record starting here is still open at the end of the file"),
    ("csv-stray-quote-closed-later", "x.csv", STRAY_QUOTE_CSV.replace(b"number 60,", b'number 60",'),
     r"line 13: a quoted cell of the record starting here runs over 50 lines \(to line 62\), more than 10"),
    ("csv-duplicate-header", "x.csv", b"caption,image_id,caption\na dog,1,a cat\n",
     r"line 1: duplicate column names in the header: 'caption' \(columns 1 and 3\)"),
    ("karpathy-duplicate-images-key", "dataset_x.json",
     GOOD_KARPATHY[:-1] + b', "images": []}', r"duplicate key 'images' in a JSON object"),
    ("jsonl-duplicate-key", "x.jsonl", b'{"caption": "a dog", "caption": "a cat"}\n', r"line 1: duplicate key 'caption'"),
    ("utf16-invalid-after-bom", "x.txt", "\ufeffa dog\n".encode("utf-16-le") + b"\x3d\xd8",
     r"line 2: not valid UTF-16-LE \(the encoding its byte-order mark names\)"),
]


@pytest.mark.parametrize("case, name, content, message", INGEST_ERRORS, ids=[c[0] for c in INGEST_ERRORS])
def test_ingest_fatal_input_names_file_and_place_and_writes_nothing(tmp_path, case, name, content, message):
    assert_failed_cleanly(ingest_fails(tmp_path, name, content, message), "ingest")


TOO_LONG = "a dog " * 100  # 599 characters after normalisation
# (case, file name, content, {caption_id: expected error (None = ok)}, rejected_<reason> counts)
INGEST_ROWS = [
    ("empty-caption", "dataset_x.json", karpathy(kimg(1, (1, "a dog"), (2, ""))),
     {"x-1": None, "x-2": "empty caption"}, {"empty": 1}),
    ("whitespace-caption", "dataset_x.json", karpathy(kimg(1, (1, " \t\n "), (2, "a dog"))),
     {"x-1": "whitespace-only caption", "x-2": None}, {"whitespace": 1}),
    ("over-long-caption", "dataset_x.json", karpathy(kimg(1, (1, TOO_LONG), (2, "a dog"))),
     {"x-1": "599 characters, longer than max_chars=500", "x-2": None}, {"too_long": 1}),
    ("invalid-utf8-txt", "x.txt", b"a dog\n\xff\xfe a cat\na man\n",
     {"x-1": None, "x-2": "invalid UTF-8", "x-3": None}, {"invalid_utf8": 1}),
    ("invalid-utf8-inside-json", "dataset_x.json", karpathy(kimg(1, (1, "a dog"), (2, "CAT"))).replace(b"CAT", b"c\xe9t"),
     {"x-1": None, "x-2": "invalid UTF-8"}, {"invalid_utf8": 1}),
    ("blank-jsonl-line", "x.jsonl", b'{"caption": "a dog"}\n\n{"caption": "a cat"}\n',
     {"x-1": None, "x-2": "empty caption", "x-3": None}, {"empty": 1}),
    ("duplicate-caption-text", "dataset_x.json", karpathy(kimg(1, (1, "a  dog")), kimg(2, (2, "a dog"))),
     {"x-1": None, "x-2": "duplicate of x-1"}, {"duplicate": 1}),
    ("nul-byte-txt", "x.txt", b"a dog\x00 on grass\na cat\n",
     {"x-1": "control character U+0000 (NUL) at character 6", "x-2": None}, {"control_char": 1}),
    ("ansi-escape-inside-json", "dataset_x.json", karpathy(kimg(1, (1, "the \x1b[31mred\x1b[0m car"), (2, "a red car"))),
     {"x-1": "control character U+001B (ESC, a terminal escape sequence) at character 5", "x-2": None},
     {"control_char": 1}),
    ("c1-control-csv", "x.csv", "caption\na \u009b31m bus\na bus\n".encode(),
     {"x-1": "control character U+009B (CSI", "x-2": None}, {"control_char": 1}),
    ("utf16-with-bom-txt", "x.txt", "a dog\na caf\u00e9\n".encode("utf-16"), {"x-1": None, "x-2": None}, {}),
    ("utf32-with-bom-jsonl", "x.jsonl", '{"caption": "a dog"}\n'.encode("utf-32"), {"x-1": None}, {}),
    ("cr-only-line-endings-txt", "x.txt", b"a dog\ra cat\ra man\r", {"x-1": None, "x-2": None, "x-3": None}, {}),
    ("cr-only-line-endings-jsonl", "x.jsonl", b'{"caption": "a dog"}\r{"caption": "a cat"}\r',
     {"x-1": None, "x-2": None}, {}),
]


@pytest.mark.parametrize("case, name, content, expect, reasons", INGEST_ROWS, ids=[c[0] for c in INGEST_ROWS])
def test_ingest_bad_caption_is_a_rejected_row_and_the_rest_is_kept(tmp_path, case, name, content, expect, reasons):
    r, rows = ingest_rows(tmp_path, name, content)
    assert set(rows) == set(expect)
    for cid, error in expect.items():
        if error is None:
            assert rows[cid]["status"] == "ok" and rows[cid]["error"] is None and rows[cid]["text"]
            assert rows[cid]["text"].isprintable() and rows[cid]["text"] == rows[cid]["text"].strip()
        else:
            assert rows[cid]["status"] == "rejected" and error in rows[cid]["error"] and rows[cid]["text"] == ""
    assert r.counts["rejected"] == sum(e is not None for e in expect.values())
    assert {k: v for k, v in r.counts.items() if k.startswith("rejected_") and v} == {f"rejected_{k}": v for k, v in reasons.items()}
    assert leftovers(r.path) == []


# ---------------------------------------------------------------------- synthesize
def test_synthesize_refuses_captions_with_a_wrong_schema(tmp_path):
    table = pa.table({"caption_id": ["c1", "c2"], "split": ["train", "train"], "text": [1, 2]})
    captions = ingest_stage(tmp_path / "runs", table)
    with pytest.raises(tables.SchemaError) as err:
        run_synthesize(SynthesizeConfig(**SYNTH), captions, RunLayout(tmp_path / "runs"))
    message = str(err.value)
    assert f"{captions.path}/captions.parquet" in message
    assert "missing columns" in message and "'status'" in message and "text: int64 (expected string)" in message
    sd = assert_failed_cleanly(tmp_path / "runs", "synthesize")
    assert not list(sd.glob("shards/*"))


def test_synthesize_refuses_duplicate_caption_ids_naming_the_row(tmp_path):
    rows = [caption_row(cid, f"a dog {n}", raw_text="a dog") for n, cid in enumerate(["c-1", "c-2", "c-1"])]
    captions = ingest_stage(tmp_path / "runs", tables.to_table(rows, tables.CAPTIONS))
    with pytest.raises(ValueError, match=r"captions\.parquet: row 2: duplicate caption_id 'c-1'; caption ids must be unique"):
        run_synthesize(SynthesizeConfig(**SYNTH), captions, RunLayout(tmp_path / "runs"))
    sd = assert_failed_cleanly(tmp_path / "runs", "synthesize")
    assert not list(sd.glob("shards/*"))


@heavy
@pytest.mark.parametrize("case", ["missing-directory", "directory-without-model_index"])
def test_synthesize_with_a_missing_or_wrong_model_directory(tiny, tmp_path, case):
    model = tmp_path / "my-model"
    if case == "directory-without-model_index":
        (model / "unet").mkdir(parents=True)
        (model / "unet" / "config.json").write_text("{}")
        message = rf"{model}: not a diffusers pipeline directory \(no model_index\.json\)"
    else:
        message = rf"diffusion model directory '{model}' does not exist"
    with pytest.raises(FileNotFoundError, match=message):
        run_synthesize(SynthesizeConfig(**dict(SYNTH, model=str(model))), tiny.captions,
                       RunLayout(tmp_path / "runs"))
    sd = assert_failed_cleanly(tmp_path / "runs", "synthesize")
    assert not list(sd.glob("shards/*.tar"))


def fail_after(limit: int, shard_name: str, calls: list[int]):
    """A _HashingFile.write that raises ENOSPC once `limit` bytes of shard `shard_name` are written."""
    from storage.shards import _HashingFile

    original = _HashingFile.write

    def write(self, b):
        if shard_name in self.f.name:
            calls[0] += len(b)
            if calls[0] > limit:
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return original(self, b)

    return write


@heavy
def test_disk_full_while_writing_a_shard_then_rerun_equals_a_clean_run(tiny, tmp_path, monkeypatch):
    from storage import shards

    root = str(tmp_path / "runs")
    captions = clone_stage(tiny.captions, tmp_path / "runs")
    written = [0]
    monkeypatch.setattr(shards._HashingFile, "write", fail_after(2000, "shard-000001", written))
    with pytest.raises(OSError) as err:
        run_synthesize(SynthesizeConfig(**SYNTH), captions, RunLayout(root))
    assert err.value.errno == errno.ENOSPC and written[0] > 2000  # failed in the middle of shard 1
    sd = assert_failed_cleanly(tmp_path / "runs", "synthesize")
    assert (sd / "shards" / "shard-000000.done.json").exists()           # the shard before it is kept
    assert not (sd / "shards" / "shard-000001.tar").exists() and not (sd / "shards" / "shard-000001.done.json").exists()

    monkeypatch.undo()
    r = run_synthesize(SynthesizeConfig(**SYNTH), captions, RunLayout(root))
    assert r.counts["ok"] == 6 and Path(r.path) == sd
    assert synth_outputs(r.path) == synth_outputs(tiny.shards.path)


# ---------------------------------------------------------------------- encode
@heavy
def test_encode_records_a_missing_test_image_as_a_failed_row(tiny):
    real = {r["image_id"]: r for r in tables.read(tiny.encode.dir / "real.parquet", tables.REAL_IMAGES).to_pylist()}
    assert real["100"]["status"] == "ok" and real["100"]["row"] == 0
    assert real["101"]["status"] == "failed" and real["101"]["row"] == -1
    assert real["101"]["error"] == f"image not found: {tiny.images / 'test' / 'img1.jpg'}"
    result = StageResult.load(tiny.encode.dir / "stage.done.json")
    assert result.counts["real_ok"] == 1 and result.counts["real_failed"] == 1 and result.counts["images_ok"] == 6
    assert leftovers(tiny.encode.path) == []


@heavy
def test_encode_records_corrupt_jpegs_as_failed_score_rows(tiny, tmp_path):
    shards = clone_stage(tiny.shards, tmp_path / "runs")
    tar = shards.dir / "shards" / "shard-000000.tar"
    samples = list(iter_tar(tar))
    cut, garbage = samples[0]["__key__"], samples[2]["__key__"]
    corrupt = {cut: samples[0]["jpg"][: len(samples[0]["jpg"]) // 2], garbage: b"\xff\xd8\xff\xe0 not a jpeg"}
    with ShardWriter(tar) as w:  # rewritten with its marker: a finished shard holding two corrupt images
        for s in samples:
            w.write({**s, "jpg": corrupt.get(s["__key__"], s["jpg"])})
    r = run_encode(encode_config(tiny.images), tiny.captions, shards,
                   RunLayout(tmp_path / "runs"))
    rows = {row["caption_id"]: row for row in tables.read(Path(r.path) / "scores.parquet", tables.SCORES).to_pylist()}
    for key, error in ((cut, "OSError: image file is truncated"), (garbage, "OSError: Truncated File Read")):
        assert rows[key]["status"] == "failed" and rows[key]["row"] == -1 and rows[key]["clip_score"] is None
        assert rows[key]["error"].startswith(f"shard-000000.tar: sample {key}: {error}")
    good = {k: v for k, v in rows.items() if k not in corrupt}
    assert len(good) == 4 and all(v["status"] == "ok" for v in good.values())
    clean = {row["caption_id"]: row for row in tables.read(tiny.encode.dir / "scores.parquet", tables.SCORES).to_pylist()}
    # The other samples are untouched (up to float rounding: their batches now hold fewer images).
    assert {k: v["clip_score"] for k, v in good.items()} == pytest.approx({k: clean[k]["clip_score"] for k in good}, abs=1e-5)
    arrays, meta = open_arrays(Path(r.path) / "features" / "shard-000000.safetensors")
    assert arrays["global"].shape[0] == 1 and json.loads(meta["keys"]) == [samples[1]["__key__"]]
    assert r.counts["images_failed"] == 2 and r.counts["images_ok"] == 4 and leftovers(r.path) == []


def _cut_points(tar: Path) -> dict[str, tuple[int, str]]:
    """Byte offsets that truncate the tar in the middle of an image, and on the header of its last sample."""
    members = list(tarfile.open(tar))
    second_image = members[3]                      # 3 members (jpg, json, txt) a sample
    last_sample = members[6]
    return {"mid-image": (second_image.offset_data + second_image.size // 2, "unexpected end of data"),
            "on-a-header": (last_sample.offset, "")}


@heavy
def test_encode_truncated_tar_mid_image_is_an_error_naming_the_shard_and_keeps_the_rest(tiny, tmp_path):
    shards = clone_stage(tiny.shards, tmp_path / "runs")
    tar = shards.dir / "shards" / "shard-000001.tar"
    whole = tar.read_bytes()
    cut, reason = _cut_points(tar)["mid-image"]
    tar.write_bytes(whole[:cut])
    # The size check against the shard's marker catches the cut before tarfile does.
    with pytest.raises(ValueError, match=rf"{re.escape(str(tar))}: truncated or altered shard .*; delete it"):
        run_encode(encode_config(tiny.images), tiny.captions, shards,
                   RunLayout(tmp_path / "runs"))
    sd = assert_failed_cleanly(tmp_path / "runs", "encode")
    assert (sd / "features" / "shard-000000.done.json").exists()     # the shard before it is kept
    assert not (sd / "features" / "shard-000001.safetensors").exists()
    tar.write_bytes(whole)  # the shard restored: the rerun finishes and equals a clean run
    r = run_encode(encode_config(tiny.images), tiny.captions, shards,
                   RunLayout(tmp_path / "runs"))
    assert r.counts["encoded_now"] < 7 and encode_outputs(r.path) == encode_outputs(tiny.encode.path)


@heavy
def test_encode_truncated_tar_on_a_header_boundary_loses_no_sample_silently(tiny, tmp_path):
    shards = clone_stage(tiny.shards, tmp_path / "runs")
    tar = shards.dir / "shards" / "shard-000001.tar"
    cut, _ = _cut_points(tar)["on-a-header"]
    tar.write_bytes(tar.read_bytes()[:cut])
    planned = [s["caption_id"] for s in tables.read(tiny.shards.dir / "samples.parquet", tables.SAMPLES).to_pylist()]
    try:
        r = run_encode(encode_config(tiny.images), tiny.captions, shards,
                       RunLayout(tmp_path / "runs"))
    except ValueError as e:  # an error naming the shard is an acceptable outcome
        assert "shard-000001.tar" in str(e)
        assert_failed_cleanly(tmp_path / "runs", "encode")
        return
    rows = tables.read(Path(r.path) / "scores.parquet", tables.SCORES).to_pylist()
    assert sorted(row["caption_id"] for row in rows) == sorted(planned)  # every sample has a (failed) row


@heavy
def test_encode_with_a_missing_clip_checkpoint_names_the_parameter(tiny, tmp_path):
    missing = tmp_path / "no-such-weights.safetensors"
    config = encode_config(tiny.images, clip={"model": "tiny", "precision": "fp32", "pretrained": str(missing)})
    with pytest.raises(FileNotFoundError, match=rf"clip\.pretrained='{re.escape(str(missing))}': checkpoint file not found"):
        run_encode(config, tiny.captions, tiny.shards, RunLayout(tmp_path / "runs"))
    sd = assert_failed_cleanly(tmp_path / "runs", "encode")
    assert not list(sd.glob("features/shard-*")) and not (sd / "scores.parquet").exists()


@heavy
def test_disk_full_while_writing_features_then_rerun_equals_a_clean_run(tiny, tmp_path, monkeypatch):
    import contextlib

    import storage.atomic

    original = storage.atomic.atomic_open
    hits = []

    class FullDisk:
        """The first write (the header length) goes through; the next is half written, then ENOSPC."""

        def __init__(self, f, path):
            self.f, self.path, self.calls = f, path, 0

        def write(self, b):
            self.calls += 1
            if self.calls > 1:
                self.f.write(bytes(b)[: len(b) // 2])
                hits.append(self.path)
                raise OSError(errno.ENOSPC, "No space left on device (simulated)", str(self.path))
            return self.f.write(b)

    @contextlib.contextmanager
    def atomic_open(path, mode="wb"):
        with original(path, mode) as f:
            full = "features" in str(path) and "shard-000001" in str(path)
            yield FullDisk(f, path) if full else f

    monkeypatch.setattr(storage.atomic, "atomic_open", atomic_open)
    root = str(tmp_path / "runs")
    with pytest.raises(OSError) as err:
        run_encode(encode_config(tiny.images), tiny.captions, tiny.shards, RunLayout(root))
    assert err.value.errno == errno.ENOSPC and len(hits) == 1
    sd = assert_failed_cleanly(tmp_path / "runs", "encode")
    assert (sd / "features" / "shard-000000.done.json").exists()
    assert not (sd / "features" / "shard-000001.safetensors").exists()
    assert not (sd / "features" / "shard-000001.done.json").exists()
    assert not any((sd / name).exists() for name in ("scores.parquet", "concepts.parquet", "clip_head.safetensors"))

    monkeypatch.undo()
    r = run_encode(encode_config(tiny.images), tiny.captions, tiny.shards, RunLayout(root))
    assert Path(r.path) == sd and r.counts["images_ok"] == 6
    assert encode_outputs(r.path) == encode_outputs(tiny.encode.path)


def test_a_json_file_with_invalid_utf8_gives_an_error_naming_it(tmp_path):
    from storage import atomic

    path = tmp_path / "stage.done.json"
    path.write_bytes(b'{"stage": "\xff"}')
    with pytest.raises(ValueError, match=re.escape(str(path))):
        atomic.read_json(path)


# ---------------------------------------------------------------------- train and the model
@heavy
def test_train_with_k_larger_than_the_concept_vocabulary(tiny, tmp_path):
    from pcm.stages.train import TrainConfig, run_train

    n_concepts = StageResult.load(tiny.encode.dir / "stage.done.json").counts["concepts"]
    config = TrainConfig(preset="tiny", model={"top_k": n_concepts + 1}, batch_size=2, epochs=1, min_word_count=1,
                         val_metric="loss", device="cpu", num_workers=0, progress_bar=False)
    with pytest.raises(ValueError, match=rf"top_k={n_concepts + 1} exceeds the {n_concepts} concepts of the bank"):
        run_train(config, tiny.captions, tiny.encode, RunLayout(tmp_path / "runs"))
    sd = assert_failed_cleanly(tmp_path / "runs", "train")
    assert not (sd / "checkpoints").exists() and not (sd / "best").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"top_k": 4}, r"top_k=4 exceeds the 3 concepts of the bank"),
    ({"top_k": 2, "top_m": 9}, r"top_m=9 exceeds the 4x2 \(patch, concept\) pairs"),
])
def test_model_refuses_k_or_m_larger_than_it_can_pick(overrides, message):
    import torch

    from pcm.model import PCMNet, load_preset

    cfg = load_preset("tiny", overrides).with_data_shapes(8, 12, 4, "test")
    head = {"ln_post.weight": torch.ones(12), "ln_post.bias": torch.zeros(12), "proj": torch.randn(12, 8)}
    with pytest.raises(ValueError, match=message):
        PCMNet(cfg, 10, torch.randn(3, 8), head)


# ---------------------------------------------------------------------- config values
CONFIG_ERRORS = [
    ({"synthesize.steps": -1}, r"demo\.synthesize\.steps: Input should be greater than or equal to 1 \(got -1\)"),
    ({"synthesize.scheduler": "heun"}, r"demo\.synthesize\.scheduler: .*unknown scheduler 'heun'; expected one of"),
    ({"synthesize.batch_size": 0}, r"demo\.synthesize\.batch_size: Input should be greater than or equal to 1"),
    ({"synthesize.height": 100}, r"demo\.synthesize\.height: .*must be a multiple of 8"),
    ({"encode.batch_size": 0}, r"demo\.encode\.batch_size: Input should be greater than or equal to 1"),
    ({"encode.prompt": "a photo"}, r"demo\.encode\.prompt: .*must contain \{c\}"),
    ({"train.batch_size": 0}, r"demo\.train\.batch_size: Input should be greater than 0"),
    ({"train.model": {"top_k": 0}}, r"top_k: Input should be greater than 0"),
    ({"train.model": {"topk": 3}}, r"demo\.train\.model: .*unknown model fields \['topk'\]"),
    ({"ingest.max_chars": 0}, r"demo\.ingest\.max_chars: Input should be greater than or equal to 1"),
    ({"evaluate.beam_size": 0}, r"demo\.evaluate\.beam_size: Input should be greater than or equal to 1"),
    ({"train.epochz": 3}, r"demo\.train\.epochz: Extra inputs are not permitted"),
    ({"nosuch.steps": 3}, r"override 'nosuch\.steps': unknown section 'nosuch'; expected one of ingest, synthesize"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_ERRORS, ids=[next(iter(o)) for o, _ in CONFIG_ERRORS])
def test_invalid_config_values_name_the_parameter(overrides, message):
    from pcm.stages.pipeline import resolve

    with pytest.raises(ValueError, match=message):
        resolve("demo", overrides)
