"""Integrity of what a stage reads back: shards checked against their marker's sha256, safetensors
headers checked against the file, feature shards whose arrays disagree refused, sample errors that
are the same on every run.
"""

from __future__ import annotations

import json
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from builders import encode_inputs, tiny_encode_config

from pcm.stages.encode import plan, run_encode
from storage import shards, tables
from storage.arrays import open_arrays, read_header, write_arrays
from storage.fingerprint import file_digest
from storage.layout import RunLayout


# ---------------------------------------------------------------------- shards and their sha256
def flip_caption_byte(tar: Path, sample: int = 0) -> tuple[bytes, str]:
    """Change one letter of a sample's caption in place (same size, still valid UTF-8 and a valid tar).

    Returns the original bytes and the sha256 the marker holds.
    """
    whole = tar.read_bytes()
    with tarfile.open(tar) as t:
        member = [m for m in t.getmembers() if m.name.endswith(".txt")][sample]
    at = member.offset_data
    data = bytearray(whole)
    data[at] = ord("X") if data[at] != ord("X") else ord("Y")
    tar.write_bytes(bytes(data))
    assert tar.stat().st_size == len(whole)
    return whole, shards.read_marker(tar)["sha256"]


@pytest.mark.bad_input
def test_iter_tar_finds_bytes_changed_inside_a_finished_shard(tmp_path):
    path = tmp_path / "shard-000000.tar"
    with shards.ShardWriter(path) as w:
        for i in range(5):
            w.write({"__key__": f"k{i}", "txt": f"caption number {i}", "json": "{}"})
    whole, stored = flip_caption_byte(path, sample=2)
    found = file_digest(path)
    assert list(tarfile.open(path))  # still a valid tar: only the digest tells
    with pytest.raises(shards.ShardError) as e:
        list(shards.iter_tar(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: corrupt shard")
    assert stored in msg and found in msg and stored != found
    assert "delete it and its .done.json and rerun the stage that wrote it" in msg
    with pytest.raises(ValueError, match="corrupt shard"):  # nothing is yielded before the check
        next(shards.iter_tar(path))
    path.write_bytes(whole)  # restored: reads fine again
    assert [s["__key__"] for s in shards.iter_tar(path)] == [f"k{i}" for i in range(5)]


@pytest.mark.bad_input
@pytest.mark.parametrize("workers", [0, 1])
def test_encode_refuses_a_corrupt_synthetic_shard_naming_it_and_the_digests(tmp_path, workers):
    root = tmp_path / "runs"
    cap, syn = encode_inputs(root, n_shards=2, per_shard=2)
    tar = syn.stage_dir.shard_file("shards", 1, "tar")
    whole, stored = flip_caption_byte(tar)
    found = file_digest(tar)
    config = tiny_encode_config(num_workers=workers)
    with pytest.raises(ValueError) as e:
        run_encode(config, cap, syn, RunLayout(root))
    msg = str(e.value)
    # The shard's own message, not a DataLoader worker's wrapped traceback.
    assert msg.startswith(f"{tar}: corrupt shard") and "Traceback" not in msg
    assert f"sha256 {found}" in msg and f"says {stored}" in msg
    assert "delete it and its .done.json and rerun the stage that wrote it" in msg
    sd = plan(config, cap, syn, RunLayout(root))
    assert not sd.done_marker.exists() and not sd.file("scores.parquet").exists()
    assert not shards.is_done(sd.shard_file("features", 1, "safetensors"))
    tar.write_bytes(whole)  # the shard restored: the rerun finishes with every row ok
    r = run_encode(config, cap, syn, RunLayout(root))
    assert r.counts["images_ok"] == 4 and r.counts["images_failed"] == 0


# ---------------------------------------------------------------------- safetensors headers
def feature_shard(path: Path, rows: int = 2, d: int = 8, patches: int = 4, width: int = 12) -> None:
    rng = np.random.default_rng(rows * 100 + d)
    write_arrays(path, {"global": rng.standard_normal((rows, d)).astype(np.float16),
                        "patches": rng.standard_normal((rows, patches, width)).astype(np.float16)},
                 {"keys": json.dumps([f"k{i}" for i in range(rows)])})


def rewrite_header(path: Path, mutate) -> None:
    """Rewrite a safetensors file's header (the data bytes unchanged): `mutate(header)` edits it in place
    or returns a replacement."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    replaced = mutate(header)
    header = header if replaced is None else replaced
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _set(name, field, value):
    def mutate(h):
        h[name][field] = value
    return mutate


# global is (2, 8) f16 = bytes [0, 32] of the data section, patches (2, 4, 12) f16 = [32, 224].
LIES = {
    "offsets-into-the-header": (_set("global", "data_offsets", [-32, 0]), "outside the data section"),
    "overlapping": (_set("patches", "data_offsets", [16, 208]), "'patches' at bytes \\[16, 208\\] overlaps array 'global'"),
    "same-bytes-twice": (lambda h: [h["patches"].update(data_offsets=[0, 192]),
                                    h["global"].update(data_offsets=[160, 192])] and None, "overlaps"),
    "beyond-the-file": (_set("patches", "data_offsets", [32, 256]), "outside the data section"),
    "size-disagrees-with-shape": (_set("global", "shape", [3, 8]), "needs 48 bytes"),
    "gap": (lambda h: h["patches"].update(shape=[2, 4, 11], data_offsets=[48, 224]),
            "bytes \\[32, 48\\] of the data section belong to no array"),
    "unknown-dtype": (_set("global", "dtype", "Q7"), "dtype 'Q7'"),
    "shape-not-integers": (_set("global", "shape", ["2", 8]), "expected a list of non-negative integers"),
    "negative-dimension": (_set("global", "shape", [-2, -8]), "expected a list of non-negative integers"),
    "offsets-not-a-pair": (_set("global", "data_offsets", [0]), "expected \\[start, end\\] integers"),
    "offsets-floats": (_set("global", "data_offsets", [0.0, 32.0]), "expected \\[start, end\\] integers"),
    "entry-not-an-object": (lambda h: h.update(glob=5), "'glob' is not an object"),
    "header-not-an-object": (lambda h: [1, 2, 3], "the header is a JSON list, not an object"),
    "metadata-not-strings": (lambda h: h["__metadata__"].update(keys=5), "__metadata__ must map strings to strings"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(LIES))
def test_feature_file_whose_header_lies_is_a_clear_error_naming_it(tmp_path, case):
    from pcm.dataset import FeatureStore

    sd = RunLayout(tmp_path / "runs").stage("encode", "e" * 16)
    path = sd.shard_file("features", 0, "safetensors")
    feature_shard(path)
    open_arrays(path)  # fine before the lie
    mutate, reason = LIES[case]
    rewrite_header(path, mutate)
    for read in (open_arrays, read_header, lambda p: FeatureStore(sd, "features").gather(np.array([0]), np.array([1]))):
        with pytest.raises(ValueError) as e:  # never an IndexError/TypeError, never data read from the header
            read(path)
        assert type(e.value) is ValueError
        msg = str(e.value)
        assert msg.startswith(f"{path}: corrupt safetensors header") and re.search(reason, msg), msg
        assert "rerun the stage that wrote it" in msg


@pytest.mark.bad_input
@pytest.mark.parametrize("length", [0, 7, 10**12, 2**64 - 1])
def test_implausible_header_length_is_a_clear_error(tmp_path, length):
    path = tmp_path / "x.safetensors"
    feature_shard(path)
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", length) + raw[8:])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not a readable safetensors file"):
        open_arrays(path)
    path.write_bytes(raw[:5])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not a readable safetensors file"):
        open_arrays(path)


def test_files_of_the_reference_writer_pass_the_header_checks(tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = {"a": torch.ones(3, 5), "b": torch.zeros(0, 4), "c": torch.arange(7, dtype=torch.int64),
               "h": torch.ones(2, 3, dtype=torch.bfloat16), "u": torch.ones(3, dtype=torch.uint8)}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"k": "v"})
    header, meta, _ = read_header(tmp_path / "ref.safetensors")
    assert set(header) == set(tensors) and meta == {"k": "v"}
    with pytest.raises(ValueError, match="BF16 that cannot be memory-mapped"):
        open_arrays(tmp_path / "ref.safetensors")
    del tensors["h"]
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    arrays, _ = open_arrays(tmp_path / "ref.safetensors")
    for k, t in tensors.items():
        np.testing.assert_array_equal(arrays[k], t.numpy())


def _store(tmp_path: Path):
    from pcm.dataset import FeatureStore

    sd = RunLayout(tmp_path / "runs").stage("encode", "e" * 16)
    return sd, FeatureStore(sd, "features")


@pytest.mark.bad_input
def test_feature_shard_whose_arrays_disagree_on_rows_is_a_clear_error(tmp_path):
    sd, store = _store(tmp_path)
    path = sd.shard_file("features", 0, "safetensors")
    rng = np.random.default_rng(0)
    write_arrays(path, {"global": rng.standard_normal((3, 8)).astype(np.float16),
                        "patches": rng.standard_normal((2, 4, 12)).astype(np.float16)},
                 {"keys": json.dumps(["a", "b", "c"])})
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: the arrays disagree on the number of rows "
                                         r"\(global \[3, 8\], patches \[2, 4, 12\], 3 keys\)"):
        store.gather(np.array([0]), np.array([2]))


@pytest.mark.bad_input
@pytest.mark.parametrize("arrays, meta, reason", [
    ({"global": np.zeros((2, 8), np.float16)}, {"keys": '["a", "b"]'}, "no 'patches' array"),
    ({"global": np.zeros((2, 8, 1), np.float16), "patches": np.zeros((2, 4, 12), np.float16)}, {"keys": '["a", "b"]'},
     "'global' is a float16 array of shape \\[2, 8, 1\\]"),
    ({"global": np.zeros((2, 8), np.int64), "patches": np.zeros((2, 4, 12), np.float16)}, {"keys": '["a", "b"]'},
     "'global' is a int64 array"),
    ({"global": np.zeros((2, 8), np.float16), "patches": np.zeros((2, 4, 12), np.float16)}, {"keys": '["a", "b'},
     "the 'keys' metadata is not JSON"),
    ({"global": np.zeros((2, 8), np.float16), "patches": np.zeros((2, 4, 12), np.float16)}, {"keys": '{"a": 1}'},
     "must be a JSON list of strings"),
    ({"global": np.zeros((2, 8), np.float16), "patches": np.zeros((2, 4, 12), np.float16)}, {"keys": '["a"]'},
     "disagree on the number of rows"),
], ids=["missing-array", "wrong-rank", "integer-features", "keys-not-json", "keys-not-a-list", "keys-count"])
def test_feature_shard_of_the_wrong_form_is_a_clear_error(tmp_path, arrays, meta, reason):
    sd, store = _store(tmp_path)
    path = sd.shard_file("features", 0, "safetensors")
    write_arrays(path, arrays, meta)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: .*{reason}"):
        store.gather(np.array([0, 0]), np.array([0, 1]))


@pytest.mark.bad_input
def test_feature_shards_with_different_shapes_are_a_clear_error(tmp_path):
    sd, store = _store(tmp_path)
    feature_shard(sd.shard_file("features", 0, "safetensors"), d=8)
    feature_shard(sd.shard_file("features", 1, "safetensors"), d=6)
    other = sd.shard_file("features", 1, "safetensors")
    with pytest.raises(ValueError, match=rf"{re.escape(str(other))}: 'global' rows are float16 \[6\] but "
                                         rf"{re.escape(str(sd.shard_file('features', 0, 'safetensors')))} has "
                                         r"float16 \[8\]"):
        store.gather(np.array([0, 1]), np.array([0, 0]))


@pytest.mark.bad_input
def test_feature_row_beyond_the_shard_is_a_clear_error(tmp_path):
    sd, store = _store(tmp_path)
    feature_shard(sd.shard_file("features", 0, "safetensors"))
    with pytest.raises(ValueError, match=r"row 5 asked for but the shard holds 2 rows"):
        store.gather(np.array([0]), np.array([5]))


# ---------------------------------------------------------------------- deterministic sample errors
@pytest.mark.bad_input
def test_undecodable_images_give_the_same_error_rows_on_every_run(tmp_path):
    images = tmp_path / "coco"
    outputs = []
    for run in ("one", "two"):
        root = tmp_path / run
        cap, syn = encode_inputs(root, n_shards=1, per_shard=3, corrupt="c0001", images_dir=images)
        (images / "images" / "img1.jpg").write_bytes(b"not an image at all")
        config = tiny_encode_config(images_root=str(images), real_shard_size=4)
        r = run_encode(config, cap, syn, RunLayout(root))
        sd = Path(r.path)
        outputs.append({name: (sd / name).read_bytes() for name in
                        ("features/shard-000000.scores.parquet", "real/shard-000000.status.parquet",
                         "scores.parquet", "real.parquet")})
        errors = {row["caption_id"]: row["error"] for row in tables.read(sd / "scores.parquet", tables.SCORES).to_pylist()}
        assert errors["c0001"] == ("shard-000000.tar: sample c0001: UnidentifiedImageError: "
                                   "cannot identify image file c0001.jpg")
        real = {row["image_id"]: row["error"] for row in tables.read(sd / "real.parquet", tables.REAL_IMAGES).to_pylist()}
        bad = images / "images" / "img1.jpg"
        assert real["img1"] == f"{bad}: UnidentifiedImageError: cannot identify image file {bad}"
        assert not any("0x" in (e or "") for e in [*errors.values(), *real.values()])
    assert outputs[0] == outputs[1]


@pytest.mark.bad_input
def test_bytes_after_the_last_array_are_a_clear_error(tmp_path):
    path = tmp_path / "x.safetensors"
    feature_shard(path)
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: corrupt safetensors header: bytes \[224, 232\] "
                                         "at the end of the data section belong to no array"):
        open_arrays(path)
