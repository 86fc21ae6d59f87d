"""Building a synthesize stage from existing images (the authors' SynthImgCap): files, tar sets, a mapping."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from builders import N_TRAIN, make_captions, train_ids
from PIL import Image

from pcm.stages.synthesize import SynthesizeConfig, plan, run_synthesize
from storage import tables
from storage.image_sets import ImageIndex, read_mapping
from storage.shards import iter_tar


def image_bytes(seed: int, fmt: str = "JPEG", size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def add_to_tar(tar_path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def released_set(root: Path) -> dict[str, bytes]:
    """c000-c003 as JPEG files (one nested), c004-c006 as PNG members of a tar, c007 missing."""
    files = {f"c00{i}": image_bytes(i) for i in range(4)}
    root.mkdir(parents=True)
    for i, (key, data) in enumerate(files.items()):
        path = root / ("part-1" if i == 3 else "") / f"{key}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    (root / "sets").mkdir()
    add_to_tar(root / "sets" / "00000.tar", {f"c00{i}.png": image_bytes(i, "PNG") for i in range(4, 7)})
    (root / "README.txt").write_text("not an image: ignored")
    return files


def test_an_imported_set_becomes_the_stage_with_status_rows_and_provenance(layout, tmp_path):
    captions = make_captions(layout)
    files = released_set(tmp_path / "synthimgcap")
    cfg = SynthesizeConfig(imported_images=str(tmp_path / "synthimgcap"), shard_size=3, progress_bar=False)
    r = run_synthesize(cfg, captions, layout)
    assert r.counts == {"captions": N_TRAIN, "ok": N_TRAIN - 1, "failed": 1, "shards": 3}
    assert r.extra["source"] == r.extra["model"] == "imported"
    status = tables.read(Path(r.path) / "samples.parquet", tables.SAMPLES).to_pylist()
    assert [s["caption_id"] for s in status] == train_ids()
    assert status[-1]["status"] == "failed" and "no image named for caption_id 'c007'" in status[-1]["error"]
    samples = {s["__key__"]: s for p in sorted(Path(r.path, "shards").glob("*.tar")) for s in iter_tar(p)}
    assert sorted(samples) == train_ids()[:-1]
    for key in ("c000", "c003"):  # JPEG files are kept byte for byte
        assert samples[key]["jpg"] == files[key]
    png = Image.open(io.BytesIO(samples["c005"]["jpg"]))
    assert png.format == "JPEG" and png.size == (48, 48)  # PNG members are converted to the stage's format
    meta = json.loads(samples["c005"]["json"])
    assert meta["source"] == "imported" and meta["imported_from"] == "sets/00000.tar:c005.png"
    assert "model" not in meta and "steps" not in meta  # no generator settings: the image was made elsewhere
    assert json.loads(samples["c003"]["json"])["imported_from"] == "part-1/c003.jpg"


@pytest.mark.bad_input
def test_a_mapping_names_the_images_and_a_corrupt_one_is_a_failed_row(layout, tmp_path):
    captions = make_captions(layout)
    root = tmp_path / "set"
    root.mkdir()
    for i in range(N_TRAIN):
        (root / f"img_{100 + i}.jpg").write_bytes(image_bytes(i))
    (root / "img_101.jpg").write_bytes(b"\xff\xd8 truncated")
    mapping = tmp_path / "map.csv"
    mapping.write_text("caption_id,image\n" + "".join(f"c{i:03d},img_{100 + i}.jpg\n" for i in range(N_TRAIN)))
    cfg = SynthesizeConfig(imported_images=str(root), imported_mapping=str(mapping), shard_size=4, progress_bar=False)
    r = run_synthesize(cfg, captions, layout)
    assert (r.counts["ok"], r.counts["failed"]) == (N_TRAIN - 1, 1)
    bad = [s for s in tables.read(Path(r.path) / "samples.parquet", tables.SAMPLES).to_pylist() if s["error"]]
    assert [b["caption_id"] for b in bad] == ["c001"] and "image import failed" in bad[0]["error"]
    # The set's content is the fingerprint: another file is another stage, and the same set is cached.
    assert run_synthesize(cfg, captions, layout).cached
    (root / "img_999.jpg").write_bytes(image_bytes(99))
    from pcm.image_sources import _image_index

    _image_index.cache_clear()
    assert plan(cfg, captions, layout).fingerprint != r.fingerprint


@pytest.mark.bad_input
def test_bad_sets_and_mappings_give_errors_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ImageIndex(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageIndex(tmp_path / "empty")
    dup = tmp_path / "dup"
    dup.mkdir()
    (dup / "a.jpg").write_bytes(image_bytes(0))
    (dup / "a.png").write_bytes(image_bytes(0, "PNG"))
    with pytest.raises(ValueError, match="key 'a' is both a.jpg"):
        ImageIndex(dup)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,file\nc1,a.jpg\n")
    with pytest.raises(ValueError, match="bad.csv: the header must name"):
        read_mapping(bad)
    bad.write_text("caption_id,image\nc1,a.jpg\nc1,b.jpg\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: caption_id 'c1' is mapped twice"):
        read_mapping(bad)
    with pytest.raises(ValueError, match="not both"):
        SynthesizeConfig(imported_images=str(dup), paired_images=str(dup))
    with pytest.raises(ValueError, match="imported_mapping needs imported_images"):
        SynthesizeConfig(imported_mapping=str(bad))


@pytest.mark.heavy  # the whole tiny pipeline on imported images
def test_encode_train_and_evaluate_run_unchanged_on_an_imported_stage(tmp_path):
    from pcm.stages.pipeline import resolve, run_pipeline

    root = str(tmp_path / "runs")
    ingest = run_pipeline(resolve("tiny"), root, stages=("ingest",))["ingest"]
    rows = tables.read(Path(ingest.path) / "captions.parquet", tables.CAPTIONS).to_pylist()
    ids = [r["caption_id"] for r in rows if r["split"] == "train" and r["status"] == "ok"]
    images = tmp_path / "released"
    images.mkdir()
    for i, cid in enumerate(ids):
        (images / f"{cid}.jpg").write_bytes(image_bytes(i, size=64))
    cfg = resolve("tiny", {"synthesize.imported_images": str(images), "train.max_steps": 6, "train.val_every": 6})
    out = run_pipeline(cfg, root)
    assert out["synthesize"].counts["ok"] == len(ids) and out["synthesize"].extra["source"] == "imported"
    assert out["encode"].counts["images_ok"] == len(ids) and out["encode"].counts["images_failed"] == 0
    assert out["train"].counts["train_pairs"] == len(ids)
    metrics = json.loads((Path(out["evaluate"].path) / "metrics.json").read_text())
    assert "CIDEr" in metrics["metrics"]


@pytest.mark.bad_input
def test_the_mapping_reader_names_the_file_and_line_of_every_problem(tmp_path):
    import os

    from storage.image_sets import read_mapping

    def mapping(text: bytes | str, name: str = "map.csv"):
        p = tmp_path / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p

    assert read_mapping(mapping("caption_id,image\nc1,a.jpg\n\nc2, b.jpg\n")) == {"c1": "a.jpg", "c2": "b.jpg"}
    big = mapping("caption_id,image\nc1,\"" + "x" * 200_000 + "\"\n")            # was: a raw csv.Error
    with pytest.raises(ValueError, match=r"map\.csv:2: invalid CSV \(field larger than field limit"):
        read_mapping(big)
    latin = mapping(b"caption_id,image\nc1,caf\xe9.jpg\n")                         # was: no file named
    with pytest.raises(ValueError, match=r"map\.csv: not UTF-8 text \(byte 23\)"):
        read_mapping(latin)
    stray = mapping('caption_id,image\nc1,a.jpg\nc2,"b.jpg\nc3,c.jpg\nc4,d.jpg\n')   # was: the last line named
    with pytest.raises(ValueError, match=r"map\.csv:3: a quoted cell starting on this line runs to line 5"):
        read_mapping(stray)
    os.mkfifo(tmp_path / "fifo.csv")                                             # never opened (it would block)
    with pytest.raises(ValueError, match=r"fifo\.csv: not a regular file"):
        read_mapping(tmp_path / "fifo.csv")


@pytest.mark.bad_input
def test_an_unreadable_imported_image_fails_with_the_same_words_in_every_run():
    from PIL import Image, UnidentifiedImageError

    from pcm.rendering import without_addresses

    try:
        Image.open(io.BytesIO(b"not an image"))
    except UnidentifiedImageError as e:
        text = str(e)
    assert " at 0x" in text and without_addresses(text) == "cannot identify image file <_io.BytesIO object>"


@pytest.mark.bad_input
def test_a_hostile_image_set_fails_rows_and_never_hangs_reads_outside_or_reads_big_files(layout, tmp_path):
    import os

    captions = make_captions(layout)
    root = tmp_path / "set"
    released_set(root)
    (root / "c000.jpg").unlink()
    os.mkfifo(root / "c000.jpg")                                       # was: synthesize hung on it
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(image_bytes(9))
    (root / "part-1" / "c003.jpg").unlink()
    (root / "part-1" / "c003.jpg").symlink_to(outside)                 # was: read through the link
    (root / "c001.jpg").write_bytes(image_bytes(1) + b"\0" * 5000)     # was: the trailing bytes landed in the shard
    big = image_bytes(2, size=400)
    (root / "c002.jpg").write_bytes(big)                               # over the cap below: never read
    add_to_tar(root / "sets" / "00000.tar", {"c004.png": image_bytes(4, "PNG"), "c005.png": image_bytes(5, "PNG")})
    cfg = SynthesizeConfig(imported_images=str(root), imported_max_bytes=len(big) - 1, shard_size=3,
                           progress_bar=False)
    r = run_synthesize(cfg, captions, layout)
    errors = {s["caption_id"]: s["error"] for s in tables.read(Path(r.path) / "samples.parquet", tables.SAMPLES).to_pylist()}
    assert "not a regular file" in errors["c000"]
    assert "5000 bytes after the end of the JPEG image" in errors["c001"]
    assert f"{len(big)} bytes, over the cap of {len(big) - 1}" in errors["c002"]
    assert "outside the imported set" in errors["c003"]
    assert errors["c004"] is None and errors["c005"] is None and r.counts["ok"] == 2
    for bad_root in ("/", str(Path.home())):                           # was: walked the whole file system
        with pytest.raises(ValueError, match="is no image set"):
            ImageIndex(bad_root)
