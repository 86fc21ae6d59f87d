"""Bad files read back: imported image sets and their mapping CSV, JSON files, safetensors, stage markers and
checkpoint state. Each is one clear error naming the file (and the line or field where there is one); an
image that must not be read is an OSError naming it, which synthesize records as a failed row.

All cases call the readers directly on files of a few bytes: the whole file takes about a second.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import tarfile
from pathlib import Path

import pytest
from builders import refused_naming_file
from PIL import Image

from storage.arrays import open_arrays
from storage.atomic import read_json
from storage.image_sets import ImageIndex, read_mapping
from storage.result import StageResult


def image_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


# ---------------------------------------------------------------------- the mapping CSV (caption_id,image)
# (case, content, message): read_mapping must name the file, and the line where there is one.
MAPPINGS = [
    ("empty-file", b"", r"the header must name the columns caption_id and image \(got \[\]\)"),
    ("no-header", b"c1,a.jpg\n", r"the header must name the columns caption_id and image"),
    ("header-misspelt", b"caption,image\nc1,a.jpg\n", r"the header must name the columns caption_id and image"),
    ("header-only-image", b"image\na.jpg\n", r"the header must name the columns caption_id and image"),
    ("tab-separated", b"caption_id\timage\nc1\ta.jpg\n", r"the header must name the columns"),
    ("empty-image-cell", b"caption_id,image\nc1,\n", r":2: empty caption_id or image"),
    ("empty-caption-id-cell", b"caption_id,image\n,a.jpg\n", r":2: empty caption_id or image"),
    ("short-row", b"caption_id,image\nc1,a.jpg\nc2\n", r":3: empty caption_id or image"),
    ("blank-cells-only", b"caption_id,image\n  ,  \n", r":2: empty caption_id or image"),
    ("mapped-twice", b"caption_id,image\nc1,a.jpg\nc1,b.jpg\n", r":3: caption_id 'c1' is mapped twice"),
    ("mapped-twice-with-spaces", b"caption_id,image\nc1,a.jpg\n c1 ,b.jpg\n", r":3: caption_id 'c1' is mapped twice"),
    ("latin-1", b"caption_id,image\nc1,caf\xe9.jpg\n", r": not UTF-8 text \(byte 23\)"),
    ("utf-16", "caption_id,image\nc1,a.jpg\n".encode("utf-16"), r": not UTF-8 text \(byte 0\)"),
    ("200-kb-cell", b'caption_id,image\nc1,"' + b"x" * 200_000 + b'"\n', r":2: invalid CSV \(field larger"),
    ("stray-quote", b'caption_id,image\nc1,"a.jpg\nc2,b.jpg\n', r":2: a quoted cell starting on this line runs to line 3"),
    ("quote-closed-later", b'caption_id,image\nc1,"a.jpg\nc2",b.jpg\n', r":2: a quoted cell starting on this line"),
    ("text-after-quote", b'caption_id,image\nc1,"a"b.jpg\n', r":2: invalid CSV \(',' expected after '\"'\)"),
    ("duplicate-header", b"caption_id,image,image\nc1,a.jpg,b.jpg\n", r"line 1: duplicate column names"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("case, content, message", MAPPINGS, ids=[c[0] for c in MAPPINGS])
def test_a_bad_mapping_csv_is_an_error_naming_the_file_and_line(tmp_path, case, content, message):
    refused_naming_file(tmp_path / "map.csv", content, read_mapping, message)


@pytest.mark.bad_input
@pytest.mark.parametrize("case", ["missing", "directory", "fifo"])
def test_a_mapping_that_is_no_regular_file_is_refused_without_reading(tmp_path, case):
    path = tmp_path / "map.csv"
    if case == "directory":
        path.mkdir()
    elif case == "fifo":
        os.mkfifo(path)     # opening it would block until a writer comes
    with pytest.raises((ValueError, FileNotFoundError), match=rf"imported mapping {path}: (not found|not a regular)"):
        read_mapping(path)


# ---------------------------------------------------------------------- the imported image set
def _set(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _tar(path: Path, members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# (case, files under the set, message): ImageIndex refuses the whole set.
IMAGE_SETS = [
    ("empty-folder", {}, r"no image files"),
    ("only-text-files", {"a.txt": b"x", "b.json": b"{}"}, r"no image files"),
    ("same-key-jpg-and-png", {"a.jpg": image_bytes(), "a.png": image_bytes()}, r"key 'a' is both a\.jpg"),
    ("same-key-file-and-tar-member", {"a.jpg": image_bytes(), "s.tar": _tar(Path("s.tar"), {"a.jpg": image_bytes()})},
     r"key 'a' is both"),
    ("same-key-in-two-tars", {"s1.tar": _tar(Path("s1.tar"), {"a.jpg": image_bytes()}),
                              "s2.tar": _tar(Path("s2.tar"), {"a.jpg": image_bytes()})}, r"key 'a' is both"),
    ("tar-of-garbage", {"a.jpg": image_bytes(), "s.tar": b"not a tar at all" * 64}, r"is not a readable uncompressed tar"),
    ("gzipped-tar", {"a.jpg": image_bytes(), "s.tar": b"\x1f\x8b\x08\x00" + b"\0" * 600},
     r"is not a readable uncompressed tar"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("case, files, message", IMAGE_SETS, ids=[c[0] for c in IMAGE_SETS])
def test_a_bad_image_set_is_an_error_naming_it(tmp_path, case, files, message):
    root = _set(tmp_path / "set", files)
    root.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match=message) as err:
        ImageIndex(root)
    assert str(root) in str(err.value)


@pytest.mark.bad_input
@pytest.mark.parametrize("where", ["/", "/etc", "/usr", "/proc", "home", "a-file", "missing"])
def test_an_import_root_that_is_no_image_set_is_refused_before_walking_it(tmp_path, where, monkeypatch):
    if where == "home":
        monkeypatch.setenv("HOME", str(tmp_path))
        root = tmp_path
    elif where == "a-file":
        root = tmp_path / "x.jpg"
        root.write_bytes(image_bytes())
    elif where == "missing":
        root = tmp_path / "nope"
    else:
        root = Path(where)
    with pytest.raises((ValueError, FileNotFoundError), match=rf"imported images {root}: "):
        ImageIndex(root)


# (case, how the bad entry is made, message): the set is indexed, and reading that entry is an OSError naming
# it (synthesize's failed row), never a hang, a read outside the set or a whole huge file in memory.
def _fifo(root: Path) -> None:
    os.mkfifo(root / "b.jpg")


def _link_out(root: Path) -> None:
    (root.parent / "secret.jpg").write_bytes(image_bytes(9))
    (root / "b.jpg").symlink_to(root.parent / "secret.jpg")


def _dangling(root: Path) -> None:
    (root / "b.jpg").symlink_to(root / "nowhere.jpg")


def _big(root: Path) -> None:
    (root / "b.jpg").write_bytes(image_bytes() + b"\0" * 10_000)


def _big_member(root: Path) -> None:
    (root / "s.tar").write_bytes(_tar(Path("s.tar"), {"b.jpg": image_bytes() + b"\0" * 10_000}))


def _link_dir_out(root: Path) -> None:
    (root.parent / "outside").mkdir()
    (root.parent / "outside" / "b.jpg").write_bytes(image_bytes(9))
    (root / "sub").symlink_to(root.parent / "outside")


UNREADABLE = [
    ("fifo", _fifo, r"b\.jpg: not a regular file"),
    ("symlink-out-of-the-set", _link_out, r"b\.jpg: a link to .*secret\.jpg, outside the imported set"),
    ("dangling-symlink", _dangling, r"b\.jpg: (cannot be read|a link to)"),
    ("over-the-size-cap", _big, r"b\.jpg: \d+ bytes, over the cap of 5000 \(synthesize\.imported_max_bytes\)"),
    ("tar-member-over-the-size-cap", _big_member, r"s\.tar:b\.jpg: \d+ bytes, over the cap of 5000"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("case, make, message", UNREADABLE, ids=[c[0] for c in UNREADABLE])
def test_an_image_that_must_not_be_read_is_an_os_error_naming_it(tmp_path, case, make, message):
    root = _set(tmp_path / "set", {"a.jpg": image_bytes()})
    make(root)
    index = ImageIndex(root)
    assert index.read("a", max_bytes=5000) == image_bytes()      # the good image stays readable
    with pytest.raises(OSError, match=message):
        index.read("b", max_bytes=5000)


@pytest.mark.bad_input
def test_a_directory_linked_from_outside_the_set_is_not_walked_into(tmp_path):
    root = _set(tmp_path / "set", {"a.jpg": image_bytes()})
    _link_dir_out(root)
    index = ImageIndex(root)
    assert "sub/b" not in index.entries or index.entries["sub/b"].refused   # os.walk does not follow it


@pytest.mark.bad_input
def test_an_image_that_shrank_after_indexing_is_an_os_error_naming_it(tmp_path):
    root = _set(tmp_path / "set", {"a.jpg": image_bytes(), "b.jpg": image_bytes(1)})
    index = ImageIndex(root)
    (root / "b.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(OSError, match=r"b\.jpg: file is truncated \(2 of \d+ bytes\)"):
        index.read("b")


# ---------------------------------------------------------------------- JSON files read back (markers, configs)
JSON_FILES = [
    ("empty", b"", r"invalid JSON at line 1, column 1"),
    ("truncated", b'{"stage": "ingest", "counts": {', r"invalid JSON at line 1, column 32"),
    ("not-utf8", b'{"stage": "\xff"}', r"not UTF-8 text \(byte 11"),
    ("utf16", '{"stage": "x"}'.encode("utf-16"), r"not UTF-8 text \(byte 0"),
    ("nested-too-deeply", b"[" * 100_000 + b"]" * 100_000, r"nested too deeply"),
    ("integer-of-5000-digits", b'{"n": 1' + b"0" * 5000 + b"}", r"invalid JSON: Exceeds the limit \(4300 digits\)"),
    ("two-documents", b"{}\n{}", r"invalid JSON at line 2, column 1: Extra data"),
    ("single-quotes", b"{'a': 1}", r"invalid JSON at line 1, column 2"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("case, content, message", JSON_FILES, ids=[c[0] for c in JSON_FILES])
def test_a_bad_json_file_is_an_error_naming_it(tmp_path, case, content, message):
    refused_naming_file(tmp_path / "config.json", content, read_json, message)


MARKER = {"stage": "ingest", "fingerprint": "a" * 16, "path": "x", "counts": {"ok": 1}, "timings": {}, "extra": {}}
# (case, marker content, message): StageResult.load, what every later stage and `pcm status` reads.
MARKERS = [
    ("a-list", b"[]", r"not a stage marker \(expected a JSON object\)"),
    ("a-string", b'"done"', r"not a stage marker \(expected a JSON object\)"),
    ("missing-fingerprint", json.dumps({"stage": "ingest"}).encode(), r"not a stage marker .*'fingerprint'"),
    ("unknown-field", json.dumps(MARKER | {"owner": "x"}).encode(), r"unknown StageResult fields: \['owner'\]"),
    ("stage-a-number", json.dumps(MARKER | {"stage": 1}).encode(), r"'stage' must be a string, got 1"),
    ("fingerprint-a-list", json.dumps(MARKER | {"fingerprint": []}).encode(), r"'fingerprint' must be a string"),
    ("counts-a-string", json.dumps(MARKER | {"counts": "many"}).encode(), r"'counts' must be an object"),
    ("count-a-string", json.dumps(MARKER | {"counts": {"ok": "7"}}).encode(), r"counts\['ok'\] must be a number"),
    ("count-null", json.dumps(MARKER | {"counts": {"ok": None}}).encode(), r"counts\['ok'\] must be a number"),
    ("timings-a-list", json.dumps(MARKER | {"timings": [1]}).encode(), r"'timings' must be an object"),
    ("extra-a-list", json.dumps(MARKER | {"extra": []}).encode(), r"'extra' must be an object"),
    ("cached-a-string", json.dumps(MARKER | {"cached": "no"}).encode(), r"'cached' must be true or false"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("case, content, message", MARKERS, ids=[c[0] for c in MARKERS])
def test_a_malformed_stage_marker_is_an_error_naming_it(tmp_path, case, content, message):
    refused_naming_file(tmp_path / "runs" / "ingest" / ("a" * 16) / "stage.done.json", content, StageResult.load,
                        message)


# ---------------------------------------------------------------------- safetensors read back
def _header(obj: object) -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw


SAFETENSORS = [
    ("empty", b"", r"0 bytes, shorter than the 8-byte header length"),
    ("three-bytes", b"abc", r"3 bytes, shorter than the 8-byte header length"),
    ("length-only", struct.pack("<Q", 10), r"header length 10 is implausible for a file of 8 bytes"),
    ("text-file", b"hello world, no safetensors", r"header length \d+ is implausible"),
    ("header-not-json", struct.pack("<Q", 5) + b"hello", r"not a readable safetensors file"),
    ("header-not-utf8", struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", r"not a readable safetensors file"),
    ("header-a-list", _header([1, 2]), r"the header is a JSON list, not an object"),
    ("header-a-string", _header("x"), r"the header is a JSON str, not an object"),
    ("metadata-a-list", _header({"__metadata__": [1]}), r"__metadata__ must map strings to strings"),
    ("metadata-a-number-value", _header({"__metadata__": {"keys": 1}}), r"__metadata__ must map strings to strings"),
    ("entry-a-number", _header({"x": 3}), r"entry 'x' is not an object with dtype, shape and data_offsets"),
    ("dtype-unknown", _header({"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}) + b"\0",
     r"array 'x' has dtype 'Q9'"),
    ("shape-negative", _header({"x": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}),
     r"array 'x' has shape \[-1\]"),
    ("offsets-strings", _header({"x": {"dtype": "U8", "shape": [1], "data_offsets": ["0", "1"]}}) + b"\0",
     r"array 'x' has data_offsets \['0', '1'\]"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("case, content, message", SAFETENSORS, ids=[c[0] for c in SAFETENSORS])
def test_a_bad_safetensors_file_is_an_error_naming_it(tmp_path, case, content, message):
    refused_naming_file(tmp_path / "shard-000000.safetensors", content, open_arrays, message)


# ---------------------------------------------------------------------- checkpoint state and place
STATES = [
    ("empty", b"", r"invalid JSON at line 1, column 1"),
    ("a-list", b"[]", r"expected a JSON object \(got a list"),
    ("step-nan", b'{"step": NaN}', r"step: expected an integer \(got NaN\)"),
    ("step-a-string", b'{"step": "x"}', r"step: expected an integer \(got \"x\"\)"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("case, content, message", STATES, ids=[c[0] for c in STATES])
def test_a_bad_checkpoint_state_is_an_error_naming_the_file(tmp_path, case, content, message):
    from pcm.checkpoint import read_state

    refused_naming_file(tmp_path / "state.json", content, lambda state: read_state(state.parent), message)


@pytest.mark.bad_input
@pytest.mark.parametrize("case", ["empty-train-dir", "missing-train-dir"])
def test_a_train_directory_without_a_checkpoint_names_it(tmp_path, case):
    from pcm.checkpoint import find

    train = tmp_path / "train"
    if case == "empty-train-dir":
        train.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{train}: no best checkpoint; run `pcm train`"):
        find(train)


# ---------------------------------------------------------------------- a local stage lock's holder record
# The lock file lies in the (maybe shared) run root; what it says about its holder only names the holder.
LOCK_BODIES = [
    ("empty", b""),
    ("not-json", b"held by me"),
    ("not-utf8", b'{"pid": "\xff"}'),
    ("a-list", b"[1, 2]"),
    ("json-null", b"null"),
    ("nested-too-deeply", b"[" * 100_000 + b"]" * 100_000),
    ("started-a-string", b'{"pid": 1, "host": "h", "started": "yesterday", "command": "x"}'),
    ("started-1e308", b'{"pid": 1, "host": "h", "started": 1e308}'),
    ("fields-of-wrong-kinds", b'{"pid": [1], "host": {"a": 1}, "command": 7, "started": -1}'),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("case, body", LOCK_BODIES, ids=[c[0] for c in LOCK_BODIES])
def test_a_held_lock_with_a_malformed_holder_record_is_still_one_lock_held_error(tmp_path, case, body):
    from storage.lock import FileLock, LockHeld

    path = tmp_path / "stage" / ".lock"
    with FileLock(path):
        path.write_bytes(body)          # the holder's record overwritten while the flock is held
        with pytest.raises(LockHeld, match=rf"{re.escape(str(tmp_path / 'stage'))} is locked by "
                           r"(an unknown process|pid .{0,20} on .{0,100} since \S+)"):
            FileLock(path, timeout=0).acquire()
