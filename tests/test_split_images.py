"""The one loader of a split's encoded images with their references (train's validation, evaluate's images)."""

from __future__ import annotations

from pcm.split_images import load_split_images
from storage import tables
from storage.layout import RunLayout


def caption(cid, image, split, text, references=(), status="ok"):
    return {"caption_id": cid, "image_id": image, "split": split, "text": text if status == "ok" else "",
            "raw_text": text, "source": "test", "image_path": None, "references": list(references),
            "status": status, "error": None if status == "ok" else "rejected"}


def real(image, split, row, status="ok", error=None):
    return {"image_id": image, "split": split, "image_path": f"{image}.jpg", "shard": row % 2, "row": row,
            "status": status, "error": error}


def stages(tmp_path, captions, images):
    layout = RunLayout(tmp_path)
    cap, enc = layout.stage("ingest", "a" * 16), layout.stage("encode", "b" * 16)
    cap.path.mkdir(parents=True)
    enc.path.mkdir(parents=True)
    tables.write(cap.file("captions.parquet"), captions, tables.CAPTIONS)
    if images is not None:
        tables.write(enc.file("real.parquet"), images, tables.REAL_IMAGES)
    return cap, enc


def test_references_ids_and_what_is_left_out(tmp_path):
    captions = [
        caption("1", "b", "val", "a dog", ["a dog", "a brown dog"]),
        caption("2", "b", "val", "a brown dog", ["a dog", "a brown dog"]),
        caption("3", "a", "val", "a cat"),                 # no references filled: its texts, each once
        caption("4", "a", "val", "a cat"),
        caption("5", "a", "val", "a grey cat"),
        caption("6", "a", "val", "", status="rejected"),   # rejected rows give nothing
        caption("7", "c", "val", "a bird", ["a bird"]),    # never encoded
        caption("8", "t", "test", "a test", ["a test"]),   # another split
    ]
    images = [real("b", "val", 0), real("t", "test", 1), real("z", "val", 2), real("a", "val", 3),
              real("f", "val", 4, "failed", "cannot identify image file"), real("b", "val", 5)]
    cap, enc = stages(tmp_path, captions, images)
    got = load_split_images(cap, enc, "val")
    assert got.image_ids == ["a", "b"]                    # by image id; "b" once (its first row)
    assert got.shard.tolist() == [1, 0] and got.row.tolist() == [3, 0] and got.image_paths == ["a.jpg", "b.jpg"]
    assert got.references == [["a cat", "a grey cat"], ["a dog", "a brown dog"]]
    assert got.references_by_id() == {"a": ["a cat", "a grey cat"], "b": ["a dog", "a brown dog"]}
    assert got.failed == [{"image_id": "f", "error": "cannot identify image file"}]
    assert got.unreferenced == ["z"] and got.not_encoded == ["c"]
    assert load_split_images(cap, enc, "val", max_images=1).image_ids == ["a"]
    assert load_split_images(cap, enc, "test").image_ids == ["t"]


def test_no_real_images_is_an_empty_split(tmp_path):
    cap, enc = stages(tmp_path, [caption("1", "a", "val", "a cat", ["a cat"])], None)
    got = load_split_images(cap, enc, "val")
    assert len(got) == 0 and got.shard.dtype.kind == "i" and got.not_encoded == ["a"]
