"""More bad caption files, every reader: an error naming the file and the entry, or rejected rows beside ok ones.

The first corpus (tests/test_bad_inputs.py) has one case of each kind; this file walks every field of
every reader (Karpathy JSON, COCO JSON, .jsonl, .csv, .txt) through wrong types, unsafe values,
structure breaks, encodings, control characters, limits and empty files. Each case is one real
ingest run on a file of a few bytes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from builders import ingest_fails, ingest_rows

from pcm.stages.ingest import IngestConfig, run_ingest
from storage.layout import RunLayout


def karpathy(*images: dict) -> bytes:
    return json.dumps({"images": list(images)}).encode()


def kimg(imgid: Any = 1, sentences: Any = None, **fields: Any) -> dict:
    """One Karpathy image entry; `fields` replace (or, given as None via DROP, remove) its keys."""
    entry = {"imgid": imgid, "filename": f"{imgid}.jpg", "split": "train",
             "sentences": [{"sentid": 1, "raw": "a dog on the grass"}] if sentences is None else sentences}
    entry.update(fields)
    return {k: v for k, v in entry.items() if v is not DROP}


def sent(sentid: Any = 1, raw: Any = "a dog", **more: Any) -> dict:
    out = {"sentid": sentid, "raw": raw, **more}
    return {k: v for k, v in out.items() if v is not DROP}


DROP = object()
COCO_IMAGE = {"id": 1, "file_name": "1.jpg"}
COCO_ANN = {"id": 10, "image_id": 1, "caption": "a dog"}


def coco(images: Any = None, annotations: Any = None, **top: Any) -> bytes:
    doc = {"images": [COCO_IMAGE] if images is None else images,
           "annotations": [COCO_ANN] if annotations is None else annotations, **top}
    return json.dumps(doc).encode()


def cimg(**fields: Any) -> dict:
    return {k: v for k, v in (COCO_IMAGE | fields).items() if v is not DROP}


def cann(**fields: Any) -> dict:
    return {k: v for k, v in (COCO_ANN | fields).items() if v is not DROP}


def jsonl(*records: Any) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


ID_RULE = r"must be an integer or a string of 1-\d+ letters, digits, '_' or '-'"
LABEL_RULE = r"must be an integer or a non-empty UTF-8 string"
PATH_RULE = r"must be a relative path inside the image root \(no '\.\.', not absolute\)"
NAME_RULE = r"must be a non-empty UTF-8 string"

# (case, file name, content, message regex): each must name the file, and the entry where there is one.
ERRORS = [
    # Karpathy split JSON: every field of an image and a sentence.
    ("k-entry-not-an-object", "dataset_x.json", karpathy(3), r"images\[0\]: expected an object, got int"),
    ("k-entry-null", "dataset_x.json", karpathy(None), r"images\[0\]: expected an object, got NoneType"),
    ("k-missing-split", "dataset_x.json", karpathy(kimg(split=DROP)), r"images\[0\]: missing 'split'"),
    ("k-missing-filename", "dataset_x.json", karpathy(kimg(filename=DROP)), r"images\[0\]: missing 'filename'"),
    ("k-missing-imgid", "dataset_x.json", karpathy(kimg(imgid=DROP)), r"images\[0\]: missing 'imgid'"),
    ("k-imgid-bool", "dataset_x.json", karpathy(kimg(imgid=True)), rf"images\[0\]: 'imgid' {LABEL_RULE}, got True"),
    ("k-imgid-float", "dataset_x.json", karpathy(kimg(imgid=1.5)), rf"images\[0\]: 'imgid' {LABEL_RULE}, got 1\.5"),
    ("k-imgid-empty", "dataset_x.json", karpathy(kimg(imgid="")), rf"images\[0\]: 'imgid' {LABEL_RULE}, got ''"),
    ("k-imgid-list", "dataset_x.json", karpathy(kimg(imgid=[1])), rf"images\[0\]: 'imgid' {LABEL_RULE}"),
    ("k-imgid-null", "dataset_x.json", karpathy(kimg(imgid=None)), rf"images\[0\]: 'imgid' {LABEL_RULE}, got None"),
    ("k-cocoid-object", "dataset_x.json", karpathy(kimg(cocoid={"a": 1})), rf"images\[0\]: 'cocoid' {LABEL_RULE}"),
    ("k-split-null", "dataset_x.json", karpathy(kimg(split=None)), r"images\[0\]: unknown split None"),
    ("k-split-int", "dataset_x.json", karpathy(kimg(split=1)), r"images\[0\]: unknown split 1"),
    ("k-split-capitalised", "dataset_x.json", karpathy(kimg(split="Train")), r"images\[0\]: unknown split 'Train'"),
    ("k-filename-absolute", "dataset_x.json", karpathy(kimg(filename="/etc/passwd")), rf"'filename' {PATH_RULE}"),
    ("k-filename-dotdot", "dataset_x.json", karpathy(kimg(filename="../x.jpg")), rf"'filename' {PATH_RULE}"),
    ("k-filename-backslash-dotdot", "dataset_x.json", karpathy(kimg(filename="..\\x.jpg")),
     rf"'filename' {PATH_RULE}"),
    ("k-filename-drive", "dataset_x.json", karpathy(kimg(filename="C:\\x.jpg")), rf"'filename' {PATH_RULE}"),
    ("k-filename-empty", "dataset_x.json", karpathy(kimg(filename="")), rf"'filename' {NAME_RULE}"),
    ("k-filename-int", "dataset_x.json", karpathy(kimg(filename=5)), r"'filename' must be a string, got int"),
    ("k-filepath-dotdot", "dataset_x.json", karpathy(kimg(filepath="a/../..")), rf"'filepath' {PATH_RULE}"),
    ("k-filepath-absolute", "dataset_x.json", karpathy(kimg(filepath="/tmp")), rf"'filepath' {PATH_RULE}"),
    ("k-sentences-null", "dataset_x.json", karpathy(kimg(sentences=DROP) | {"sentences": None}),
     r"images\[0\]: 'sentences' must be a list, got NoneType"),
    ("k-sentences-object", "dataset_x.json", karpathy(kimg(sentences={"raw": "a dog"})),
     r"images\[0\]: 'sentences' must be a list, got dict"),
    ("k-sentence-a-string", "dataset_x.json", karpathy(kimg(sentences=["a dog"])),
     r"images\[0\]\.sentences\[0\]: expected an object, got str"),
    ("k-sentence-missing-raw", "dataset_x.json", karpathy(kimg(sentences=[sent(raw=DROP)])),
     r"images\[0\]\.sentences\[0\]: missing 'raw'"),
    ("k-sentence-missing-sentid", "dataset_x.json", karpathy(kimg(sentences=[sent(sentid=DROP)])),
     r"images\[0\]\.sentences\[0\]: missing 'sentid'"),
    ("k-sentid-bool", "dataset_x.json", karpathy(kimg(sentences=[sent(sentid=False)])), rf"'sentid' {ID_RULE}"),
    ("k-sentid-float", "dataset_x.json", karpathy(kimg(sentences=[sent(sentid=1.5)])), rf"'sentid' {ID_RULE}"),
    ("k-sentid-dotdot", "dataset_x.json", karpathy(kimg(sentences=[sent(sentid="../x")])), rf"'sentid' {ID_RULE}"),
    ("k-sentid-dot", "dataset_x.json", karpathy(kimg(sentences=[sent(sentid="a.b")])), rf"'sentid' {ID_RULE}"),
    ("k-sentid-space", "dataset_x.json", karpathy(kimg(sentences=[sent(sentid="a b")])), rf"'sentid' {ID_RULE}"),
    ("k-sentid-empty", "dataset_x.json", karpathy(kimg(sentences=[sent(sentid="")])), rf"'sentid' {ID_RULE}"),
    ("k-sentid-too-long", "dataset_x.json", karpathy(kimg(sentences=[sent(sentid="x" * 300)])),
     rf"'sentid' {ID_RULE}"),
    ("k-sentid-non-ascii", "dataset_x.json", karpathy(kimg(sentences=[sent(sentid="caf\u00e9")])),
     rf"'sentid' {ID_RULE}"),
    ("k-raw-null", "dataset_x.json", karpathy(kimg(sentences=[sent(raw=None)])),
     r"sentences\[0\]: 'raw' must be a string, got NoneType"),
    ("k-raw-list", "dataset_x.json", karpathy(kimg(sentences=[sent(raw=["a", "dog"])])),
     r"sentences\[0\]: 'raw' must be a string, got list"),
    ("k-raw-object", "dataset_x.json", karpathy(kimg(sentences=[sent(raw={"en": "a dog"})])),
     r"sentences\[0\]: 'raw' must be a string, got dict"),
    ("k-same-sentid-as-int-and-text", "dataset_x.json",
     karpathy(kimg(1, [sent(7)]), kimg(2, [sent("7", "a cat")])), r"duplicate caption id 'x-7'"),
    ("k-same-imgid-as-int-and-text", "dataset_x.json", karpathy(kimg(1, [sent(1)]), kimg("1", [sent(2, "a cat")])),
     r"images\[1\]: duplicate image id '1', first used by images\[0\]"),
    ("k-duplicate-key-in-a-sentence", "dataset_x.json",
     b'{"images": [{"imgid": 1, "filename": "1.jpg", "split": "train", "sentences": [{"sentid": 1, "raw": "a", '
     b'"raw": "b"}]}]}', r"duplicate key 'raw' in a JSON object"),
    # JSON structure of a whole file.
    ("json-empty-file", "dataset_x.json", b"", r"invalid JSON at line 1, column 1"),
    ("json-whitespace-only", "dataset_x.json", b" \n\t\n", r"invalid JSON at line 3, column 1"),
    ("json-trailing-garbage", "dataset_x.json", karpathy(kimg()) + b" x", r"invalid JSON at line 1, column \d+: Extra"),
    ("json-two-documents", "dataset_x.json", karpathy(kimg()) + b"\n" + karpathy(kimg()),
     r"invalid JSON at line 2, column 1: Extra data"),
    ("json-single-quotes", "dataset_x.json", b"{'images': []}", r"invalid JSON at line 1, column 2"),
    ("json-comment", "dataset_x.json", b'// captions\n{"images": []}', r"invalid JSON at line 1, column 1"),
    ("json-trailing-comma", "dataset_x.json", b'{"images": [],}', r"invalid JSON at line 1, column 15"),
    ("json-nested-too-deeply", "dataset_x.json", b"[" * 100_000 + b"]" * 100_000, r"nested too deeply"),
    ("json-integer-of-5000-digits", "dataset_x.json",
     b'{"images": [{"imgid": 1' + b"0" * 5000 + b"}]}", r"invalid JSON: Exceeds the limit \(4300 digits\)"),
    ("json-top-level-string", "dataset_x.json", b'"images"', r"must be Karpathy split JSON"),
    ("json-images-a-string", "dataset_x.json", b'{"images": "a dog"}', r"must be Karpathy split JSON"),
    ("json-unknown-suffix", "captions.yaml", b"- a dog\n", r"cannot tell the format from the suffix '\.yaml'"),
    ("json-no-suffix", "captions", b"a dog\n", r"cannot tell the format from the suffix ''"),
    ("utf32-invalid-after-bom", "dataset_x.json", b"\xff\xfe\x00\x00" + b"{\x00\x00\x00" + b"\x00\x00\x11\x00",
     r"line 1: not valid UTF-32-LE"),
    ("utf16be-odd-byte-count", "x.txt", "\ufeffa dog\n".encode("utf-16-be") + b"\x00",
     r"line 2: not valid UTF-16-BE"),
    # COCO annotations.
    ("coco-images-missing", "captions.json", json.dumps({"annotations": [COCO_ANN]}).encode(),
     r"top level: missing 'images'"),
    ("coco-images-null", "captions.json", coco(images=DROP) if False else
     json.dumps({"images": None, "annotations": [COCO_ANN]}).encode(), r"top level: 'images' must be a list"),
    ("coco-image-not-an-object", "captions.json", coco(images=[[1, "1.jpg"]]), r"images\[0\]: expected an object"),
    ("coco-image-missing-id", "captions.json", coco(images=[cimg(id=DROP)]), r"images\[0\]: missing 'id'"),
    ("coco-image-missing-file_name", "captions.json", coco(images=[cimg(file_name=DROP)]),
     r"images\[0\]: missing 'file_name'"),
    ("coco-image-id-bool", "captions.json", coco(images=[cimg(id=True)]), rf"images\[0\]: 'id' {LABEL_RULE}"),
    ("coco-file_name-absolute", "captions.json", coco(images=[cimg(file_name="/etc/shadow")]),
     rf"images\[0\]: 'file_name' {PATH_RULE}"),
    ("coco-file_name-dotdot", "captions.json", coco(images=[cimg(file_name="a/../../b.jpg")]),
     rf"images\[0\]: 'file_name' {PATH_RULE}"),
    ("coco-file_name-null", "captions.json", coco(images=[cimg(file_name=None)]),
     r"images\[0\]: 'file_name' must be a string, got NoneType"),
    ("coco-duplicate-image-id", "captions.json", coco(images=[cimg(), cimg(file_name="2.jpg")]),
     r"images\[1\]: duplicate image id '1', first used by images\[0\]"),
    ("coco-annotation-not-an-object", "captions.json", coco(annotations=["a dog"]),
     r"annotations\[0\]: expected an object, got str"),
    ("coco-annotation-missing-id", "captions.json", coco(annotations=[cann(id=DROP)]),
     r"annotations\[0\]: missing 'id'"),
    ("coco-annotation-missing-image_id", "captions.json", coco(annotations=[cann(image_id=DROP)]),
     r"annotations\[0\]: missing 'image_id'"),
    ("coco-annotation-id-unsafe", "captions.json", coco(annotations=[cann(id="../../x")]),
     rf"annotations\[0\]: 'id' {ID_RULE}"),
    ("coco-annotation-id-float", "captions.json", coco(annotations=[cann(id=10.5)]),
     rf"annotations\[0\]: 'id' {ID_RULE}"),
    ("coco-image_id-bool", "captions.json", coco(annotations=[cann(image_id=True)]),
     rf"annotations\[0\]: 'image_id' {LABEL_RULE}"),
    ("coco-caption-int", "captions.json", coco(annotations=[cann(caption=7)]),
     r"annotations\[0\]: 'caption' must be a string, got int"),
    ("coco-caption-null", "captions.json", coco(annotations=[cann(caption=None)]),
     r"annotations\[0\]: 'caption' must be a string, got NoneType"),
    ("coco-image_id-int-vs-text", "captions.json", coco(annotations=[cann(image_id="01")]),
     r"annotations\[0\]: image_id '01' is not in images\[\]"),
    # .jsonl: a record a line.
    ("jsonl-line-an-array", "x.jsonl", jsonl({"caption": "a dog"}, ["a cat"]), r"line 2: expected an object, got list"),
    ("jsonl-line-a-string", "x.jsonl", jsonl("a dog"), r"line 1: expected an object, got str"),
    ("jsonl-line-a-number", "x.jsonl", b"42\n", r"line 1: expected an object, got int"),
    ("jsonl-line-null", "x.jsonl", b"null\n", r"line 1: expected an object, got NoneType"),
    ("jsonl-missing-caption", "x.jsonl", jsonl({"caption": "a dog"}, {"text": "a cat"}), r"line 2: missing 'caption'"),
    ("jsonl-caption-int", "x.jsonl", jsonl({"caption": 3}), r"line 1: 'caption' must be a string, got int"),
    ("jsonl-caption-null", "x.jsonl", jsonl({"caption": None}), r"line 1: 'caption' must be a string, got NoneType"),
    ("jsonl-caption-list", "x.jsonl", jsonl({"caption": ["a", "dog"]}), r"line 1: 'caption' must be a string, got list"),
    ("jsonl-split-unknown", "x.jsonl", jsonl({"caption": "a dog", "split": "dev"}), r"line 1: unknown split 'dev'"),
    ("jsonl-split-int", "x.jsonl", jsonl({"caption": "a dog", "split": 2}), r"line 1: unknown split 2"),
    ("jsonl-image_id-bool", "x.jsonl", jsonl({"caption": "a dog", "image_id": False}),
     rf"line 1: 'image_id' {LABEL_RULE}"),
    ("jsonl-image_id-float", "x.jsonl", jsonl({"caption": "a dog", "image_id": 2.5}),
     rf"line 1: 'image_id' {LABEL_RULE}"),
    ("jsonl-image_id-nan", "x.jsonl", b'{"caption": "a dog", "image_id": NaN}\n', rf"line 1: 'image_id' {LABEL_RULE}"),
    ("jsonl-image_id-overflows-to-inf", "x.jsonl", b'{"caption": "a dog", "image_id": 1e400}\n',
     rf"line 1: 'image_id' {LABEL_RULE}, got inf"),
    ("jsonl-image_id-5000-digits", "x.jsonl", b'{"caption": "a dog", "image_id": 1' + b"0" * 5000 + b"}\n",
     r"line 1: invalid JSON: Exceeds the limit \(4300 digits\)"),
    ("jsonl-image_path-absolute", "x.jsonl", jsonl({"caption": "a dog", "image_path": "/etc/passwd"}),
     rf"line 1: 'image_path' {PATH_RULE}"),
    ("jsonl-image_path-dotdot", "x.jsonl", jsonl({"caption": "a dog", "image_path": "../../x.jpg"}),
     rf"line 1: 'image_path' {PATH_RULE}"),
    ("jsonl-image_path-int", "x.jsonl", jsonl({"caption": "a dog", "image_path": 3}),
     r"line 1: 'image_path' must be a string, got int"),
    ("jsonl-two-objects-on-a-line", "x.jsonl", b'{"caption": "a dog"} {"caption": "a cat"}\n',
     r"invalid JSON at line 1, column 22: Extra data"),
    ("jsonl-trailing-comma", "x.jsonl", b'{"caption": "a dog",}\n', r"invalid JSON at line 1, column 21"),
    ("jsonl-nul-after-the-object", "x.jsonl", b'{"caption": "a dog"}\x00\n', r"invalid JSON at line 1, column 21"),
    ("jsonl-bad-line-3-crlf", "x.jsonl", b'{"caption": "a"}\r\n{"caption": "b"}\r\n{"caption": c}\r\n',
     r"invalid JSON at line 3, column 13"),
    ("jsonl-nested-too-deeply", "x.jsonl", b'{"caption": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
     r"line 1: JSON nested too deeply"),
    ("jsonl-duplicate-nested-key", "x.jsonl", b'{"caption": "a dog", "meta": {"k": 1, "k": 2}}\n',
     r"line 1: duplicate key 'k'"),
    # .csv
    ("csv-empty-file", "x.csv", b"", r"no 'caption' column in the header \[\]"),
    ("csv-blank-lines-only", "x.csv", b"\n\n\n", r"no 'caption' column in the header \[\]"),
    ("csv-tab-separated", "x.csv", b"caption\timage_id\na dog\t1\n", r"no 'caption' column in the header"),
    ("csv-header-case", "x.csv", b"Caption\na dog\n", r"no 'caption' column in the header \['Caption'\]"),
    ("csv-text-after-closing-quote", "x.csv", b'caption,image_id\n"a dog"x,1\n',
     r"line 2: invalid CSV: ',' expected after '\"'"),
    ("csv-200kb-cell", "x.csv", b"caption\na cat\n" + b"a" * 200_000 + b"\n",
     r"line 3: invalid CSV: field larger than field limit"),
    ("csv-short-row-without-caption", "x.csv", b"image_id,caption\n1,a dog\n2\n", r"row 2 \(line 3\): missing 'caption'"),
    ("csv-split-unknown", "x.csv", b"caption,split\na dog,training\n", r"row 1 \(line 2\): unknown split 'training'"),
    ("csv-image_path-absolute", "x.csv", b"caption,image_path\na dog,/etc/passwd\n",
     rf"row 1 \(line 2\): 'image_path' {PATH_RULE}"),
    ("csv-image_path-dotdot", "x.csv", b"caption,image_path\na dog,../x.jpg\n",
     rf"row 1 \(line 2\): 'image_path' {PATH_RULE}"),
    ("csv-every-row-too-long", "x.csv", b"caption\na dog, on grass\na cat, on a sofa\n",
     r"every row has more cells than the 1 column\(s\) of the header"),
    ("csv-duplicate-header-three-times", "x.csv", b"caption,caption,caption\na,b,c\n",
     r"line 1: duplicate column names in the header: 'caption' \(columns 1, 2 and 3\)"),
    ("csv-quote-open-at-eof", "x.csv", b'caption\na dog\n"a cat\n', r"line 3: invalid CSV: a quoted cell .* still open"),
    # Files that hold no caption at all (before: an ok stage with 0 rows).
    ("txt-empty-file", "x.txt", b"", r"no captions in the file \(txt\)"),
    ("csv-header-only", "x.csv", b"caption,image_id\n", r"no captions in the file \(csv\)"),
    ("jsonl-empty-file", "x.jsonl", b"", r"no captions in the file \(jsonl\)"),
    ("karpathy-no-images", "dataset_x.json", b'{"images": []}', r"no captions in the file \(karpathy\)"),
    ("coco-no-annotations", "captions.json", coco(annotations=[]), r"no captions in the file \(coco\)"),
    ("coco-annotations-an-object", "captions.json", coco(annotations={"0": COCO_ANN}),
     r"images\[0\]: missing 'imgid'"),  # read as Karpathy JSON (no annotations list), whose fields it lacks
]


@pytest.mark.bad_input
@pytest.mark.parametrize("case, name, content, message", ERRORS, ids=[c[0] for c in ERRORS])
def test_a_bad_caption_file_is_an_error_naming_it_and_the_entry(tmp_path, case, name, content, message):
    ingest_fails(tmp_path, name, content, message)


def test_ids_of_the_error_table_are_unique():
    assert len({c[0] for c in ERRORS}) == len(ERRORS)


LONG = "a dog " * 100  # 599 characters after normalisation
# (case, file name, content, {caption_id: expected error (None: ok)}): the bad rows are rejected with a
# reason, the others stay ok.
ROWS = [
    ("txt-bel", "x.txt", b"a dog\x07 barks\na cat\n", {"x-1": "U+0007 (BEL", "x-2": None}),
    ("txt-backspace", "x.txt", b"a dog\x08\x08\x08cat\na cat\n", {"x-1": "U+0008 (BS", "x-2": None}),
    ("txt-vertical-tab", "x.txt", b"a dog\x0bruns\na cat\n", {"x-1": "U+000B (VT", "x-2": None}),
    ("txt-form-feed", "x.txt", b"a dog\x0cruns\na cat\n", {"x-1": "U+000C (FF", "x-2": None}),
    ("txt-del", "x.txt", b"a dog\x7f\na cat\n", {"x-1": "U+007F", "x-2": None}),
    ("txt-escape-title-sequence", "x.txt", b"\x1b]0;owned\x07a dog\na cat\n", {"x-1": "U+001B (ESC", "x-2": None}),
    ("txt-c1-nel", "x.txt", "a dog\u0085runs\na cat\n".encode(), {"x-1": "U+0085 (NEL", "x-2": None}),
    ("txt-c1-osc", "x.txt", "a \u009d0;x dog\na cat\n".encode(), {"x-1": "U+009D (OSC", "x-2": None}),
    ("txt-blank-line", "x.txt", b"a dog\n\na cat\n", {"x-1": None, "x-2": "empty caption", "x-3": None}),
    ("txt-spaces-only", "x.txt", b"a dog\n   \na cat\n", {"x-1": None, "x-2": "whitespace-only", "x-3": None}),
    ("txt-over-long", "x.txt", f"{LONG}\na cat\n".encode(), {"x-1": "longer than max_chars=500", "x-2": None}),
    ("txt-1-mb-line", "x.txt", b"a " * 500_000 + b"\na cat\n", {"x-1": "longer than max_chars=500", "x-2": None}),
    ("txt-duplicate-text", "x.txt", b"a dog\nA  dog\na dog\n", {"x-1": None, "x-2": None, "x-3": "duplicate of x-1"}),
    ("txt-lone-continuation-byte", "x.txt", b"a \x80 dog\na cat\n", {"x-1": "invalid UTF-8", "x-2": None}),
    ("txt-overlong-utf8-slash", "x.txt", b"a \xc0\xaf dog\na cat\n", {"x-1": "invalid UTF-8", "x-2": None}),
    ("txt-utf8-surrogate-bytes", "x.txt", b"a \xed\xa0\x80 dog\na cat\n", {"x-1": "invalid UTF-8", "x-2": None}),
    ("txt-cut-multibyte", "x.txt", b"a caf\xc3\na cat\n", {"x-1": "invalid UTF-8", "x-2": None}),
    ("txt-crlf-and-lf-mixed", "x.txt", b"a dog\r\na cat\n\r\na man\r", {"x-1": None, "x-2": None,
                                                                         "x-3": "empty caption", "x-4": None}),
    ("jsonl-escaped-lone-surrogate", "x.jsonl", b'{"caption": "a \\ud800 dog"}\n{"caption": "a cat"}\n',
     {"x-1": "invalid UTF-8", "x-2": None}),
    ("jsonl-escaped-nul", "x.jsonl", b'{"caption": "a \\u0000 dog"}\n{"caption": "a cat"}\n',
     {"x-1": "U+0000 (NUL", "x-2": None}),
    ("jsonl-escaped-esc", "x.jsonl", b'{"caption": "\\u001b[2Ja dog"}\n{"caption": "a cat"}\n',
     {"x-1": "U+001B (ESC", "x-2": None}),
    ("jsonl-empty-caption", "x.jsonl", jsonl({"caption": ""}, {"caption": "a cat"}),
     {"x-1": "empty caption", "x-2": None}),
    ("jsonl-whitespace-caption", "x.jsonl", jsonl({"caption": "\t \u3000"}, {"caption": "a cat"}),
     {"x-1": "whitespace-only", "x-2": None}),
    ("jsonl-over-long", "x.jsonl", jsonl({"caption": LONG}, {"caption": "a cat"}),
     {"x-1": "longer than max_chars=500", "x-2": None}),
    ("jsonl-invalid-utf8-in-string", "x.jsonl", b'{"caption": "a \xff dog"}\n{"caption": "a cat"}\n',
     {"x-1": "invalid UTF-8", "x-2": None}),
    ("jsonl-duplicate-text", "x.jsonl", jsonl({"caption": "a cat"}, {"caption": "a cat"}),
     {"x-1": None, "x-2": "duplicate of x-1"}),
    ("csv-empty-cell", "x.csv", b"caption,image_id\n,1\na cat,2\n", {"x-1": "empty caption", "x-2": None}),
    ("csv-quoted-empty-cell", "x.csv", b'caption\n""\na cat\n', {"x-1": "empty caption", "x-2": None}),
    ("csv-nul-in-a-cell", "x.csv", b"caption\na\x00dog\na cat\n", {"x-1": "U+0000 (NUL", "x-2": None}),
    ("csv-esc-in-a-quoted-cell", "x.csv", b'caption\n"a \x1b[1m dog"\na cat\n', {"x-1": "U+001B (ESC", "x-2": None}),
    ("csv-invalid-utf8", "x.csv", b"caption\na \xfe dog\na cat\n", {"x-1": "invalid UTF-8", "x-2": None}),
    ("csv-over-long", "x.csv", f"caption\n{LONG}\na cat\n".encode(), {"x-1": "longer than max_chars=500", "x-2": None}),
    ("csv-unquoted-comma", "x.csv", b"caption,image_id\na dog, sitting,1\na cat,2\n",
     {"x-1": "3 cells, more than the 2 column(s)", "x-2": None}),
    ("csv-duplicate-text", "x.csv", b"caption\na cat\na cat\n", {"x-1": None, "x-2": "duplicate of x-1"}),
    ("csv-multiline-quoted-cell", "x.csv", b'caption\n"a dog\n\n\non grass"\na cat\n', {"x-1": None, "x-2": None}),
    ("coco-empty-caption", "captions.json", coco(annotations=[cann(caption=""), cann(id=11, caption="a cat")]),
     {"captions-10": "empty caption", "captions-11": None}),
    ("coco-control-char", "captions.json", coco(annotations=[cann(caption="a\x1bdog"), cann(id=11, caption="a cat")]),
     {"captions-10": "U+001B (ESC", "captions-11": None}),
    ("coco-over-long", "captions.json", coco(annotations=[cann(caption=LONG), cann(id=11, caption="a cat")]),
     {"captions-10": "longer than max_chars=500", "captions-11": None}),
    ("karpathy-whitespace-raw", "dataset_x.json", karpathy(kimg(sentences=[sent(1, "\n\n"), sent(2, "a cat")])),
     {"x-1": "whitespace-only", "x-2": None}),
    ("karpathy-del-char", "dataset_x.json", karpathy(kimg(sentences=[sent(1, "a\x7fdog"), sent(2, "a cat")])),
     {"x-1": "U+007F", "x-2": None}),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("case, name, content, expect", ROWS, ids=[c[0] for c in ROWS])
def test_a_bad_caption_is_a_rejected_row_with_its_reason_and_the_others_stay_ok(tmp_path, case, name, content,
                                                                                   expect):
    r, rows = ingest_rows(tmp_path, name, content)
    assert set(rows) == set(expect)
    for cid, error in expect.items():
        row = rows[cid]
        if error is None:
            assert row["status"] == "ok" and row["error"] is None and row["text"].isprintable(), row
        else:
            assert row["status"] == "rejected" and error in row["error"] and row["text"] == "", row
    assert r.counts["rejected"] == sum(e is not None for e in expect.values())


def test_ids_of_the_row_table_are_unique():
    assert len({c[0] for c in ROWS}) == len(ROWS)


# Configs that do not fit the file they read.
MISFITS = [
    ("text-column-missing", "x.csv", b"caption\na dog\n", {"text_column": "text"}, r"no 'text' column in the header"),
    ("text-column-empty-name", "x.csv", b"caption\na dog\n", {"text_column": ""}, r"no '' column in the header"),
    ("format-coco-on-karpathy", "dataset_x.json", karpathy(kimg()), {"format": "coco"},
     r"top level: missing 'annotations'"),
    ("format-karpathy-on-coco", "captions.json", coco(), {"format": "karpathy"}, r"images\[0\]: missing 'imgid'"),
    ("format-karpathy-on-a-list", "x.json", b"[]", {"format": "karpathy"}, r"top level: expected an object, got list"),
    ("format-jsonl-on-csv", "x.csv", b"caption\na dog\n", {"format": "jsonl"}, r"invalid JSON at line 1"),
    ("source-missing", "nosuch.txt", None, {}, r"nosuch\.txt"),
    ("source-a-directory", "adir.txt", "dir", {}, r"adir\.txt"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("case, name, content, config, message", MISFITS, ids=[c[0] for c in MISFITS])
def test_a_config_that_does_not_fit_the_file_names_it(tmp_path, case, name, content, config, message):
    source = tmp_path / name
    if content == "dir":
        source.mkdir()
    elif content is not None:
        source.write_bytes(content)
    with pytest.raises((ValueError, OSError), match=message):
        run_ingest(IngestConfig(source=str(source), **config), RunLayout(tmp_path / "runs"))
    for sd in (tmp_path / "runs" / "ingest").glob("*"):
        assert not (sd / "stage.done.json").exists()
