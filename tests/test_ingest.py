"""Ingest stage: every input format, every bad-input case, dedup, subsets, fingerprints, caching, demo bundle, flow."""

from __future__ import annotations

import codecs
import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pcm.stages.ingest import IngestConfig, checked_summary, plan, run_ingest, verify
from storage import tables
from storage.layout import RunLayout
from storage.shards import check_key


def rows_of(result) -> list[dict]:
    return tables.read(Path(result.path) / "captions.parquet", tables.CAPTIONS).to_pylist()


def by_id(result) -> dict[str, dict]:
    return {r["caption_id"]: r for r in rows_of(result)}


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def karpathy_doc() -> dict:
    """Four images: train, restval, val (with a messy and a blank caption) and test (no filepath)."""
    def sents(*pairs):
        return [{"raw": raw, "sentid": sid, "tokens": raw.split()} for sid, raw in pairs]

    return {"dataset": "coco", "images": [
        {"filepath": "train2014", "filename": "a.jpg", "imgid": 0, "cocoid": 10, "split": "train",
         "sentences": sents((1, "A dog on a couch."), (2, "a  dog\tsleeping "))},
        {"filepath": "val2014", "filename": "b.jpg", "imgid": 1, "cocoid": 11, "split": "restval",
         "sentences": sents((3, "a cat on a mat"))},
        {"filepath": "val2014", "filename": "c.jpg", "imgid": 2, "cocoid": 12, "split": "val",
         "sentences": sents((4, "a red bus"), (5, "  a bus\non the street "), (6, "   "))},
        {"filename": "d.jpg", "imgid": 3, "cocoid": 13, "split": "test",
         "sentences": sents((7, "two people walking"), (8, "people on a beach"))},
    ]}


@pytest.fixture
def karpathy(tmp_path: Path) -> Path:
    return write_json(tmp_path / "dataset_coco.json", karpathy_doc())


def ingest(source: Path, root: Path, **options):
    return run_ingest(IngestConfig(source=str(source), **options), RunLayout(root))


# -- formats ----------------------------------------------------------------------------


def test_karpathy_rows_splits_references_and_ids(karpathy, tmp_path):
    result = ingest(karpathy, tmp_path / "runs")
    rows = rows_of(result)
    assert [r["caption_id"] for r in rows] == [f"coco-{i}" for i in range(1, 9)]
    r = {row["caption_id"]: row for row in rows}
    assert r["coco-2"]["text"] == "a dog sleeping" and r["coco-2"]["raw_text"] == "a  dog\tsleeping "
    assert r["coco-3"]["split"] == "train"                                    # restval counts as train
    # train rows keep their image path (paired-image runs), but carry no references
    assert r["coco-1"]["image_id"] == "10" and r["coco-1"]["image_path"] == "train2014/a.jpg" and r["coco-1"]["references"] == []
    val_refs = ["a red bus", "a bus on the street"]
    for cid in ("coco-4", "coco-5", "coco-6"):                                # every row of the image, rejected too
        assert r[cid]["references"] == val_refs and r[cid]["image_path"] == "val2014/c.jpg"
        assert r[cid]["split"] == "val" and r[cid]["image_id"] == "12"
    assert r["coco-6"]["status"] == "rejected" and r["coco-6"]["error"] == "whitespace-only caption"
    assert r["coco-7"]["image_path"] == "d.jpg"                               # no filepath: the filename alone
    assert r["coco-8"]["references"] == ["two people walking", "people on a beach"]
    assert {row["source"] for row in rows} == {"karpathy:dataset_coco.json"}
    assert result.counts["rows"] == 8 and result.counts["ok"] == 7
    assert (result.counts["train_captions"], result.counts["val_captions"], result.counts["test_captions"]) == (3, 2, 2)
    assert (result.counts["val_images"], result.counts["test_images"], result.counts["rejected_whitespace"]) == (1, 1, 1)
    assert result.extra["format"] == "karpathy"


def test_a_run_hashes_its_caption_file_once(karpathy, tmp_path, monkeypatch):
    # plan() runs for Prefect's cache key, the cached-result check, the task and run_ingest: one read of the file.
    from storage import fingerprint

    calls = []
    real = fingerprint.file_digest
    monkeypatch.setattr(fingerprint, "file_digest", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(fingerprint, "_INPUT_DIGESTS", {})  # as in a fresh process
    config = IngestConfig(source=str(karpathy))
    first = plan(config, RunLayout(tmp_path / "runs"))
    assert plan(config, RunLayout(tmp_path / "runs")) == first
    assert run_ingest(config, RunLayout(tmp_path / "runs")).fingerprint == first.fingerprint
    assert len(calls) == 1


def test_karpathy_without_cocoid_uses_imgid(tmp_path):
    doc = {"images": [{"filename": "1000.jpg", "imgid": 5, "split": "test",
                       "sentences": [{"raw": "a boy", "sentid": 25}]}]}
    rows = rows_of(ingest(write_json(tmp_path / "dataset_flickr30k.json", doc), tmp_path / "runs"))
    assert [(r["caption_id"], r["image_id"], r["image_path"]) for r in rows] == [("flickr30k-25", "5", "1000.jpg")]


def test_splits_option_keeps_only_those_splits(karpathy, tmp_path):
    result = ingest(karpathy, tmp_path / "runs", splits=["test", "val"])
    assert {r["split"] for r in rows_of(result)} == {"val", "test"}
    assert result.counts["skipped_splits"] == 3 and result.counts["rows"] == 5


def test_coco_annotations(tmp_path):
    doc = {"images": [{"id": 7, "file_name": "x.jpg"}, {"id": 9, "file_name": "y.jpg"}],
           "annotations": [{"id": 100, "image_id": 7, "caption": "a plane"},
                           {"id": 101, "image_id": 9, "caption": "a train"},
                           {"id": 102, "image_id": 7, "caption": "a jet in the sky"}]}
    path = write_json(tmp_path / "captions_val2014.json", doc)
    result = ingest(path, tmp_path / "runs", default_split="val")
    r = by_id(result)
    assert list(r) == ["captions_val2014-100", "captions_val2014-101", "captions_val2014-102"]
    assert r["captions_val2014-102"]["references"] == ["a plane", "a jet in the sky"]
    assert r["captions_val2014-101"]["image_path"] == "y.jpg" and r["captions_val2014-101"]["image_id"] == "9"
    assert result.extra["format"] == "coco" and result.counts["val_images"] == 2


@pytest.mark.bad_input
def test_txt_blank_and_invalid_utf8_lines_are_rejected_rows(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_bytes(b"a man on a horse\r\n\n   \na bad \xff\xfe line\na  woman  reading\n")
    result = ingest(path, tmp_path / "runs")
    rows = rows_of(result)
    assert [r["caption_id"] for r in rows] == ["mine-1", "mine-2", "mine-3", "mine-4", "mine-5"]
    assert [r["status"] for r in rows] == ["ok", "rejected", "rejected", "rejected", "ok"]
    assert rows[0]["text"] == "a man on a horse" and rows[4]["text"] == "a woman reading"
    assert rows[1]["error"] == "empty caption" and rows[2]["error"] == "whitespace-only caption"
    assert rows[3]["error"].startswith("invalid UTF-8") and rows[3]["raw_text"] == "a bad \\xff\\xfe line"
    c = result.counts
    assert (c["ok"], c["rejected"], c["rejected_empty"], c["rejected_whitespace"], c["rejected_invalid_utf8"]) == (2, 3, 1, 1, 1)
    assert all(r["image_id"] == r["caption_id"] and r["split"] == "train" for r in rows)


def test_jsonl_with_configured_columns(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join([
        json.dumps({"sentence": "a kite in the sky", "img": "k1", "part": "val", "image_path": "v/k1.png"}),
        json.dumps({"sentence": "a kite flying", "img": "k1", "part": "val", "image_path": "v/k1.png"}),
        "",
        json.dumps({"sentence": "a horse"}),
    ]) + "\n", encoding="utf-8")
    result = ingest(path, tmp_path / "runs", text_column="sentence", image_id_column="img", split_column="part")
    r = by_id(result)
    assert list(r) == ["caps-1", "caps-2", "caps-3", "caps-4"]
    assert r["caps-1"]["references"] == ["a kite in the sky", "a kite flying"] and r["caps-1"]["image_path"] == "v/k1.png"
    assert r["caps-3"]["status"] == "rejected" and r["caps-3"]["error"] == "empty caption"
    assert (r["caps-4"]["split"], r["caps-4"]["image_id"], r["caps-4"]["image_path"]) == ("train", "caps-4", None)


def test_csv_with_optional_columns(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text('caption,image_id,split\n"a dog, running",d1.jpg,test\na cat,,\n"a dog jumping",d1.jpg,test\n', encoding="utf-8")
    r = by_id(ingest(path, tmp_path / "runs"))
    assert r["caps-1"]["image_id"] == "d1.jpg" and r["caps-1"]["text"] == "a dog, running"
    assert r["caps-1"]["references"] == r["caps-3"]["references"] == ["a dog, running", "a dog jumping"]
    assert (r["caps-2"]["split"], r["caps-2"]["image_id"]) == ("train", "caps-2")


def test_csv_without_the_text_column_names_the_header(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text("text,id\nhello,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no 'caption' column in the header \['text', 'id'\]"):
        ingest(path, tmp_path / "runs")
    assert by_id(ingest(path, tmp_path / "runs", text_column="text"))["caps-1"]["text"] == "hello"


@pytest.mark.bad_input
def test_forced_format_and_unknown_formats(tmp_path, karpathy):
    odd = tmp_path / "captions.dat"
    odd.write_text("a car\na bus\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"suffix '\.dat'.*karpathy, coco, txt, jsonl, csv"):
        ingest(odd, tmp_path / "runs")
    assert ingest(odd, tmp_path / "runs", format="txt").counts["ok"] == 2
    with pytest.raises(ValueError, match="'auto', 'karpathy', 'coco', 'txt', 'jsonl' or 'csv'"):
        IngestConfig(source=str(karpathy), format="xml")
    neither = write_json(tmp_path / "other.json", {"hello": 1})
    with pytest.raises(ValueError, match="Karpathy split JSON .* or COCO annotations"):
        ingest(neither, tmp_path / "runs")


# -- bad input --------------------------------------------------------------------------


@pytest.mark.bad_input
def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text('{"images": [\n  {"imgid": 1,}\n]}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"dataset_coco\.json: invalid JSON at line 2, column 15"):
        ingest(path, tmp_path / "runs")
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"caption": "ok"}\n{"caption": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c\.jsonl: invalid JSON at line 2, column 13"):
        ingest(jl, tmp_path / "runs")


@pytest.mark.bad_input
@pytest.mark.parametrize("edit, message", [
    (lambda d: d["images"][2]["sentences"][1].pop("raw"), r"images\[2\]\.sentences\[1\]: missing 'raw'"),
    (lambda d: d["images"][1].pop("split"), r"images\[1\]: missing 'split'"),
    (lambda d: d["images"][3].update(split="dev"), r"images\[3\]: unknown split 'dev'"),
    (lambda d: d["images"][0]["sentences"][0].update(raw=5), r"images\[0\]\.sentences\[0\]: 'raw' must be a string"),
    (lambda d: d["images"][0]["sentences"][1].update(sentid="a/b"), r"images\[0\]\.sentences\[1\]: 'sentid' must be"),
    (lambda d: d.pop("images"), r"top level: missing 'images'"),
])
def test_missing_or_wrong_field_names_the_entry(tmp_path, edit, message):
    doc = karpathy_doc()
    edit(doc)
    path = write_json(tmp_path / "dataset_coco.json", doc)
    with pytest.raises(ValueError, match=r"dataset_coco\.json: " + message):
        ingest(path, tmp_path / "runs", format="karpathy")


@pytest.mark.bad_input
def test_empty_whitespace_too_long_and_invalid_utf8_captions_are_counted(tmp_path):
    doc = {"images": [{"filename": "a.jpg", "imgid": 0, "split": "train", "sentences": [
        {"raw": "", "sentid": 1}, {"raw": " \t ", "sentid": 2}, {"raw": "x" * 30, "sentid": 3},
        {"raw": "BAD", "sentid": 4}, {"raw": "fine", "sentid": 5}]}]}
    path = tmp_path / "dataset_t.json"
    path.write_bytes(json.dumps(doc).replace('"BAD"', '"b\xe9"').encode("latin-1"))   # one Latin-1 byte
    result = ingest(path, tmp_path / "runs", max_chars=20)
    r = by_id(result)
    assert [r[f"t-{i}"]["status"] for i in range(1, 6)] == ["rejected"] * 4 + ["ok"]
    assert r["t-3"]["error"] == "30 characters, longer than max_chars=20"
    assert r["t-4"]["raw_text"] == "b\\xe9" and r["t-4"]["text"] == ""
    c = result.counts
    assert [c[k] for k in ("rejected_empty", "rejected_whitespace", "rejected_too_long", "rejected_invalid_utf8")] == [1] * 4
    assert (c["rows"], c["ok"], c["rejected"]) == (5, 1, 4)


@pytest.mark.bad_input
def test_a_lone_surrogate_escape_is_one_rejected_row(tmp_path):
    path = tmp_path / "dataset_t.json"
    path.write_text('{"images": [{"filename": "a.jpg", "imgid": 0, "split": "train", "sentences": ['
                    '{"raw": "half an emoji \\ud83d", "sentid": 1}, {"raw": "fine", "sentid": 2}]}]}')
    r = by_id(ingest(path, tmp_path / "runs"))
    assert r["t-1"]["status"] == "rejected" and "invalid UTF-8" in r["t-1"]["error"]
    assert r["t-1"]["raw_text"] == "half an emoji \\ud83d" and r["t-2"]["status"] == "ok"


def test_image_paths_must_stay_inside_the_image_root(tmp_path):
    for filepath, filename in (("../private", "x.jpg"), ("val", "/etc/passwd"), ("a/../..", "x.jpg")):
        doc = {"images": [{"filepath": filepath, "filename": filename, "imgid": 0, "split": "test",
                           "sentences": [{"raw": "a cat", "sentid": 1}]}]}
        with pytest.raises(ValueError, match=r"images\[0\]: '(filepath|filename)' must be a relative path inside"):
            ingest(write_json(tmp_path / "dataset_t.json", doc), tmp_path / "runs")


@pytest.mark.bad_input
def test_duplicate_ids_name_both_occurrences(tmp_path):
    doc = karpathy_doc()
    doc["images"][3]["sentences"][1]["sentid"] = 2
    with pytest.raises(ValueError, match=r"images\[3\]\.sentences\[1\]: duplicate caption id 'coco-2', first used "
                                         r"by images\[0\]\.sentences\[1\]"):
        ingest(write_json(tmp_path / "dataset_coco.json", doc), tmp_path / "runs")
    doc = karpathy_doc()
    doc["images"][2]["sentences"][0]["sentid"] = "1"                          # same caption id as the integer 1
    with pytest.raises(ValueError, match=r"duplicate caption id 'coco-1'"):
        ingest(write_json(tmp_path / "dataset_coco.json", doc), tmp_path / "runs")
    doc = karpathy_doc()
    doc["images"][2]["cocoid"] = 10
    with pytest.raises(ValueError, match=r"images\[2\]: duplicate image id '10', first used by images\[0\]"):
        ingest(write_json(tmp_path / "dataset_coco.json", doc), tmp_path / "runs")
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}],
            "annotations": [{"id": 5, "image_id": 1, "caption": "a"}, {"id": 5, "image_id": 1, "caption": "b"}]}
    with pytest.raises(ValueError, match=r"annotations\[1\]: duplicate caption id 'cap-5', first used by annotations\[0\]"):
        ingest(write_json(tmp_path / "cap.json", coco), tmp_path / "runs")


def _stray_quote_csv(n: int, close_after: int | None = None) -> bytes:
    """A CSV of `n` captions whose 12th row's cell opens with a stray quote (on line 13), closed `close_after`
    lines later by another stray quote at the end of a cell, or never."""
    lines = ["caption,image_id"] + [f"caption number {i},{i}" for i in range(n)]
    lines[12] = '"' + lines[12]
    if close_after is not None:
        lines[12 + close_after] = lines[12 + close_after].replace(",", '",', 1)
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.bad_input
def test_csv_stray_quote_is_an_error_naming_the_line_where_it_opened(tmp_path):
    # Before: exit 0 with 11 ok rows and one 20,602-character too_long row; 989 captions gone.
    path = tmp_path / "caps.csv"
    path.write_bytes(_stray_quote_csv(1000))
    with pytest.raises(ValueError, match=r"caps\.csv: line 13: invalid CSV: a quoted cell of the record starting "
                                         r"here is still open at the end of the file \(line 1001\)"):
        ingest(path, tmp_path / "runs")
    path.write_bytes(_stray_quote_csv(1000, close_after=49))       # closed again 49 lines later
    with pytest.raises(ValueError, match=r"caps\.csv: line 13: a quoted cell of the record starting here runs over "
                                         r"50 lines \(to line 62\), more than 10: a stray or unclosed quote"):
        ingest(path, tmp_path / "runs")
    path.write_bytes(b'caption,image_id\n"a dog" on grass,1\n')   # strict quoting: a quote closes a whole cell
    with pytest.raises(ValueError, match=r"caps\.csv: line 2: invalid CSV: ',' expected after '\"'"):
        ingest(path, tmp_path / "runs")


def test_csv_quoted_cells_may_hold_a_few_line_breaks(tmp_path):
    path = tmp_path / "caps.csv"
    cell = "\n".join(f"part {i}" for i in range(10))                 # one record over 10 lines: allowed
    path.write_text(f'caption,image_id\n"{cell}",1\n\na "quoted" word,2\n', encoding="utf-8")
    r = by_id(ingest(path, tmp_path / "runs"))
    assert r["caps-1"]["text"] == " ".join(f"part {i}" for i in range(10)) and r["caps-1"]["raw_text"] == cell
    assert r["caps-2"]["text"] == 'a "quoted" word' and r["caps-2"]["image_id"] == "2"   # the blank line is no row


@pytest.mark.bad_input
def test_csv_duplicate_header_names_the_columns(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text("caption,image_id,caption,image_id,image_id\na,1,b,2,3\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"caps\.csv: line 1: duplicate column names in the header: 'caption' "
                                         r"\(columns 1 and 3\); 'image_id' \(columns 2, 4 and 5\)"):
        ingest(path, tmp_path / "runs")
    path.write_text("caption,image_id,,\na,1,,\n", encoding="utf-8")  # unnamed columns cannot be chosen: ignored
    assert by_id(ingest(path, tmp_path / "runs"))["caps-1"]["image_id"] == "1"


@pytest.mark.bad_input
@pytest.mark.parametrize("where, doc, message", [
    ("top level", '{"images": [], "images": []}', r"duplicate key 'images' in a JSON object \(keys \['images', 'images'\]\)"),
    ("a sentence", '{"images": [{"imgid": 1, "filename": "a.jpg", "split": "train", "sentences": '
                   '[{"raw": "a dog", "sentid": 1, "raw": "a cat"}]}]}', r"duplicate key 'raw'"),
    ("coco", '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": '
             '[{"id": 5, "image_id": 1, "caption": "a", "id": 6}]}', r"duplicate key 'id'"),
])
def test_duplicate_json_keys_name_the_key_and_file(tmp_path, where, doc, message):
    # Before: json kept the last value; a repeated "images" gave 0 rows and exit 0.
    path = tmp_path / "dataset_x.json"
    path.write_text(doc.replace("\n", ""), encoding="utf-8")
    with pytest.raises(ValueError, match=r"dataset_x\.json: " + message):
        ingest(path, tmp_path / "runs")


@pytest.mark.bad_input
def test_duplicate_jsonl_key_names_the_line(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"caption": "a dog"}\n{"caption": "a cat", "caption": "a cow"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"caps\.jsonl: line 2: duplicate key 'caption'"):
        ingest(path, tmp_path / "runs")


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le",
                                      "utf-32-be"])
@pytest.mark.parametrize("suffix", ["txt", "jsonl", "csv", "json"])
def test_a_byte_order_mark_gives_the_encoding(tmp_path, encoding, suffix):
    captions = ["a café by the sea", "a dog \U0001f415 on grass"]
    text = {"txt": "\n".join(captions) + "\n",
            "jsonl": "".join(json.dumps({"caption": c}, ensure_ascii=False) + "\n" for c in captions),
            "csv": "caption\n" + "".join(f"{c}\n" for c in captions),
            "json": json.dumps({"images": [{"imgid": 0, "filename": "a.jpg", "split": "train", "sentences": [
                {"raw": c, "sentid": i} for i, c in enumerate(captions, 1)]}]}, ensure_ascii=False)}[suffix]
    data = text.encode(encoding)
    if encoding.endswith(("-le", "-be")):       # these codecs write no mark: add it
        data = "\ufeff".encode(encoding) + data
    path = tmp_path / f"caps.{suffix}"
    path.write_bytes(data)
    result = ingest(path, tmp_path / "runs")
    assert [r["text"] for r in rows_of(result)] == captions and result.counts["ok"] == 2


@pytest.mark.bad_input
def test_invalid_utf16_after_its_byte_order_mark_names_file_and_line(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_bytes(codecs.BOM_UTF16_LE + "a dog\na cat\n".encode("utf-16-le") + b"\x3d\xd8a\x00")  # lone surrogate
    with pytest.raises(ValueError, match=r"caps\.txt: line 3: not valid UTF-16-LE \(the encoding its byte-order "
                                         r"mark names\): illegal UTF-16 surrogate"):
        ingest(path, tmp_path / "runs")
    path.write_bytes(codecs.BOM_UTF16_BE + "a dog\n".encode("utf-16-be") + b"\x00")               # odd length
    with pytest.raises(ValueError, match=r"caps\.txt: line 2: not valid UTF-16-BE .*truncated data"):
        ingest(path, tmp_path / "runs")


@pytest.mark.bad_input
def test_control_characters_are_rejected_rows_naming_the_character(tmp_path):
    # Before: NUL and ANSI escapes were ok captions (the vocabulary then held "31mred").
    path = tmp_path / "caps.txt"
    path.write_bytes("a dog\x00 on grass\nthe \x1b[31mred\x1b[0m car\na \x9b31m bus\nx\x7f\n"
                     "a\ttab and\x0bform\x0cfeed\na cat\n".encode())
    result = ingest(path, tmp_path / "runs")
    r = by_id(result)
    assert r["caps-1"]["error"] == "control character U+0000 (NUL) at character 6; captions must be text"
    assert r["caps-2"]["error"] == ("control character U+001B (ESC, a terminal escape sequence) at character 5 "
                                    "(and 1 more); captions must be text")
    assert r["caps-3"]["error"].startswith("control character U+009B (CSI, a terminal escape sequence) at character 3")
    assert r["caps-4"]["error"].startswith("control character U+007F (DEL) at character 2")
    assert r["caps-5"]["error"].startswith("control character U+000B (VT) at character 10 (and 1 more)")
    assert r["caps-2"]["raw_text"] == "the \x1b[31mred\x1b[0m car" and r["caps-2"]["text"] == ""
    assert r["caps-6"]["status"] == "ok"
    assert result.counts["rejected_control_char"] == 5 and result.counts["ok"] == 1
    doc = {"images": [{"imgid": 0, "filename": "a.jpg", "split": "train", "sentences": [
        {"raw": "a\tdog\r\non grass", "sentid": 1}, {"raw": "a \u0085 cat", "sentid": 2}]}]}
    r = by_id(ingest(write_json(tmp_path / "dataset_t.json", doc), tmp_path / "runs"))
    assert r["t-1"]["text"] == "a dog on grass"                                  # tab, CR, LF: whitespace
    assert r["t-2"]["error"].startswith("control character U+0085 (NEL) at character 3")


@pytest.mark.parametrize("suffix, content", [
    ("txt", b"a dog\ra cat\r\ra man"),
    ("jsonl", b'{"caption": "a dog"}\r{"caption": "a cat"}\r\r{"caption": "a man"}\r'),
    ("csv", b"caption\ra dog\ra cat\r\ra man\r"),
])
def test_cr_only_line_endings_are_line_breaks(tmp_path, suffix, content):
    # Before: a .txt with CR-only line endings was one caption, a .jsonl one invalid line.
    path = tmp_path / f"caps.{suffix}"
    path.write_bytes(content)
    rows = rows_of(ingest(path, tmp_path / "runs"))
    ok = [(r["caption_id"], r["text"]) for r in rows if r["status"] == "ok"]
    if suffix == "csv":                     # data rows count from 1; a blank line is no row
        assert ok == [("caps-1", "a dog"), ("caps-2", "a cat"), ("caps-3", "a man")]
    else:                                   # a line each: the blank third line is an empty row
        assert ok == [("caps-1", "a dog"), ("caps-2", "a cat"), ("caps-4", "a man")]
        assert [r["error"] for r in rows if r["status"] != "ok"] == ["empty caption"]


# -- dedup and subsets ------------------------------------------------------------------


def test_dedup_rejects_exact_training_duplicates_only(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"caption": "a dog"}, {"caption": "a  dog "}, {"caption": "A dog"}, {"caption": "a dog"},
             {"caption": "a dog", "split": "val", "image_id": "v"}, {"caption": "a dog", "split": "val", "image_id": "v"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    result = ingest(path, tmp_path / "runs")
    rows = rows_of(result)
    assert [r["status"] for r in rows] == ["ok", "rejected", "ok", "rejected", "ok", "ok"]
    assert rows[1]["error"] == rows[3]["error"] == "duplicate of d-1"
    assert rows[4]["references"] == ["a dog", "a dog"]                        # references keep duplicates
    assert result.counts["rejected_duplicate"] == 2
    kept = ingest(path, tmp_path / "runs", dedup=False)
    assert kept.counts["rejected_duplicate"] == 0 and kept.counts["ok"] == 6


def subset_ids(path: Path, root: Path, **options) -> list[str]:
    return [r["caption_id"] for r in rows_of(ingest(path, root, **options)) if r["status"] == "ok"]


def test_seeded_subset_by_count_and_fraction(tmp_path):
    path = tmp_path / "many.txt"
    path.write_text("".join(f"caption number {i}\n" for i in range(200)), encoding="utf-8")
    root = tmp_path / "runs"
    a = subset_ids(path, root, subset=20, seed=1)
    assert len(a) == 20 and a == subset_ids(path, tmp_path / "other-root", subset=20, seed=1)
    assert a != subset_ids(path, root, subset=20, seed=2)
    assert set(a) < set(subset_ids(path, root, subset=50, seed=1))           # nested for one seed
    result = ingest(path, root, fraction=0.25, seed=1)
    assert result.counts["subset_kept"] == 50 and result.counts["subset_pool"] == 200
    assert result.counts["rejected_not_in_subset"] == 150 and result.counts["train_captions"] == 50
    assert (result.counts["ok"], result.counts["rejected"], result.counts["not_selected"]) == (50, 0, 150)
    assert ingest(path, root, subset=500).counts["subset_kept"] == 200       # more than there are: all
    with pytest.raises(ValueError, match="subset .* or fraction, not both"):
        IngestConfig(source=str(path), subset=5, fraction=0.5)



def test_subset_drops_are_logged_as_not_selected_not_rejected(tmp_path, caplog):
    path = tmp_path / "many.txt"
    path.write_text("".join(f"caption number {i}\n" for i in range(20)) + "   \n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="pcm.stages.ingest"):
        result = ingest(path, tmp_path / "runs", subset=5, seed=3)
    c = result.counts
    assert (c["rows"], c["ok"], c["rejected"], c["not_selected"], c["rejected_whitespace"]) == (21, 5, 1, 15, 1)
    assert "(5 ok, 1 rejected, 15 not selected by the subset)" in caplog.text, caplog.text
    plain = ingest(path, tmp_path / "plain")
    assert plain.counts["not_selected"] == 0 and checked_summary(plain.counts) == "20 ok, 1 rejected"


# -- fingerprints and caching -----------------------------------------------------------


def test_fingerprint_follows_file_content_and_every_config_field(karpathy, tmp_path):
    root = str(tmp_path / "runs")
    base = IngestConfig(source=str(karpathy))
    fp = plan(base, RunLayout(root)).fingerprint
    alternatives = {"format": "karpathy", "name": "other", "splits": ["train"], "default_split": "val",
                    "text_column": "t", "image_id_column": "i", "split_column": "s", "image_path_column": "p",
                    "dedup": False, "subset": 5, "fraction": 0.5, "seed": 1, "max_chars": 10}
    assert set(alternatives) == set(IngestConfig.model_fields) - IngestConfig.RUNTIME
    fps = {plan(IngestConfig(**(base.model_dump() | {k: v})), RunLayout(root)).fingerprint for k,
           v in alternatives.items()}
    assert len(fps) == len(alternatives) and fp not in fps
    assert plan(IngestConfig(source=str(karpathy), splits=["test", "train", "val"]), RunLayout(root)).fingerprint == fp
    copy = tmp_path / "elsewhere" / karpathy.name                             # same name and bytes: same stage
    copy.parent.mkdir()
    shutil.copy(karpathy, copy)
    assert plan(IngestConfig(source=str(copy)), RunLayout(root)).fingerprint == fp
    doc = karpathy_doc()
    doc["images"][0]["sentences"][0]["raw"] = "a dog on a sofa."
    write_json(karpathy, doc)
    assert plan(base, RunLayout(root)).fingerprint != fp


def test_rerun_returns_the_cached_result_and_redoes_missing_output(karpathy, tmp_path):
    first = ingest(karpathy, tmp_path / "runs")
    out = Path(first.path) / "captions.parquet"
    mtime = out.stat().st_mtime_ns
    again = ingest(karpathy, tmp_path / "runs")
    assert again.cached and not first.cached and again.counts == first.counts and out.stat().st_mtime_ns == mtime
    assert run_ingest(IngestConfig(source=str(karpathy)), RunLayout(tmp_path / "runs"), force=True).cached is False
    sd = plan(IngestConfig(source=str(karpathy)), RunLayout(tmp_path / "runs"))
    out.unlink()
    assert verify(sd) == "captions.parquet missing"
    redone = ingest(karpathy, tmp_path / "runs")
    assert not redone.cached and out.exists() and verify(sd) is None


@pytest.mark.bad_input
def test_caption_ids_are_safe_keys_and_missing_source_is_named(tmp_path):
    path = tmp_path / "my captions (v2).txt"
    path.write_text("a b\nc d\n", encoding="utf-8")
    ids = [r["caption_id"] for r in rows_of(ingest(path, tmp_path / "runs"))]
    assert ids == ["my_captions_v2-1", "my_captions_v2-2"]
    assert all(check_key(i) for i in ids)
    with pytest.raises(FileNotFoundError, match="nope.json: caption file not found"):
        ingest(tmp_path / "nope.json", tmp_path / "runs")
    with pytest.raises(ValueError, match="name"):
        IngestConfig(source=str(path), name="has.dot")


# -- demo bundle, CLI and flow ----------------------------------------------------------


def test_demo_bundle_equals_the_generator_output(tmp_path):
    from pcm.demo_data import DATA_DIR, DATASET_FILE, IMAGE_DIR, build, demo_paths

    dataset, images_root = demo_paths()
    build(tmp_path / "demo")
    assert (tmp_path / "demo" / DATASET_FILE).read_bytes() == dataset.read_bytes()
    bundled = sorted(p.name for p in (images_root / IMAGE_DIR).iterdir())
    assert bundled == sorted(p.name for p in (tmp_path / "demo" / IMAGE_DIR).iterdir())
    for name in bundled:   # pixels, not PNG bytes: zlib builds may compress the same pixels differently
        with Image.open(images_root / IMAGE_DIR / name) as a, Image.open(tmp_path / "demo" / IMAGE_DIR / name) as b:
            assert a.size == (128, 128) and a.tobytes() == b.tobytes()
    assert sum(p.stat().st_size for p in (DATA_DIR / "demo").rglob("*") if p.is_file()) < 1_500_000

    result = ingest(dataset, tmp_path / "runs")
    c = result.counts
    assert (c["rejected"], c["val_images"], c["test_images"], c["val_captions"], c["test_captions"]) == (0, 12, 24, 60, 120)
    assert c["train_captions"] >= 190
    for row in rows_of(result):
        assert check_key(row["caption_id"])
        if row["split"] != "train":
            assert len(set(row["references"])) == 5 and (images_root / row["image_path"]).is_file()


def test_cli_prints_counts_and_the_stage_directory(karpathy, tmp_path):
    from typer.testing import CliRunner

    from pcm.cli import app

    res = CliRunner().invoke(app, ["ingest", str(karpathy), "--root", str(tmp_path / "runs"),
                                   "--set", 'splits=["val", "test"]', "--set", "max_chars=100"])
    assert res.exit_code == 0, res.output
    path = res.stdout.strip().splitlines()[-1]
    assert Path(path, "captions.parquet").exists() and "rejected_whitespace" in res.output
    res = CliRunner().invoke(app, ["ingest", "--root", str(tmp_path / "runs")])
    assert res.exit_code != 0 and "SOURCE or --demo" in str(res.exception)


def test_flow_second_run_is_cached(karpathy, tmp_path, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.ingest import ingest_flow

    config = IngestConfig(source=str(karpathy))
    states = [ingest_flow(config=config, root=str(tmp_path / "runs"), return_state=True) for _ in range(2)]
    names = []
    with get_client(sync_client=True) as client:
        for state in states:
            # The server is the session's: only this flow run's task runs (never those of other tests).
            flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            runs = client.read_task_runs(flow_run_filter=flow_runs)
            names.append([r.state.name for r in runs if not r.name.startswith("ingest-artifacts")])
    results = [s.result() for s in states]
    assert results[0].fingerprint == results[1].fingerprint and results[0].counts == results[1].counts
    assert names == [["Completed"], ["Cached"]]


# -- JSON nested too deeply, CSV rows with more cells than the header -------------------------------

DEEP = 100_000  # levels of nesting: far past Python's recursion limit (json.loads raised RecursionError)


@pytest.mark.bad_input
@pytest.mark.parametrize("fmt", ["karpathy", "coco", "auto"])
def test_json_nested_too_deeply_is_an_error_naming_the_file(tmp_path, fmt):
    path = tmp_path / "dataset_deep.json"
    path.write_text("[" * DEEP + "]" * DEEP, encoding="utf-8")
    with pytest.raises(ValueError, match=r"dataset_deep\.json: JSON nested too deeply"):
        ingest(path, tmp_path / "runs", format=fmt)
    path.write_text('{"images": [{"deep": ' + "[" * DEEP + "]" * DEEP + "}]}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dataset_deep\.json: JSON nested too deeply"):
        ingest(path, tmp_path / "runs", format=fmt)


@pytest.mark.bad_input
def test_jsonl_line_nested_too_deeply_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"caption": "a dog"}\n{"caption": ' + "[" * DEEP + "]" * DEEP + "}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"caps\.jsonl: line 2: JSON nested too deeply"):
        ingest(path, tmp_path / "runs")


@pytest.mark.bad_input
def test_read_json_nested_too_deeply_names_the_file(tmp_path):
    from storage.atomic import read_json

    path = tmp_path / ".done.json"
    path.write_text("[" * DEEP + "]" * DEEP, encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.done\.json: invalid JSON: nested too deeply"):
        read_json(path)
    path.write_text("[" * 50 + "]" * 50, encoding="utf-8")       # a little nesting is fine
    value, depth = read_json(path), 0
    while value:
        value, depth = value[0], depth + 1
    assert value == [] and depth == 49


@pytest.mark.bad_input
def test_csv_row_with_more_cells_than_the_header_is_a_rejected_row(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text('caption,split\na dog, sitting on grass,train\na cat,val\n"a bus, red",test\na car,\n',
                    encoding="utf-8")
    result = ingest(path, tmp_path / "runs")
    r = by_id(result)
    assert r["caps-1"]["status"] == "rejected" and r["caps-1"]["text"] == ""
    assert r["caps-1"]["raw_text"] == "a dog, sitting on grass,train"      # nothing of the row is lost
    assert r["caps-1"]["error"].startswith("row 1 (line 2): 3 cells, more than the 2 column(s) of the header "
                                           "['caption', 'split']")
    assert (r["caps-2"]["status"], r["caps-2"]["text"], r["caps-2"]["split"]) == ("ok", "a cat", "val")
    assert (r["caps-3"]["status"], r["caps-3"]["text"]) == ("ok", "a bus, red")            # quoted: one cell
    assert (r["caps-4"]["status"], r["caps-4"]["text"]) == ("ok", "a car")   # an empty extra cell loses nothing
    c = result.counts
    assert (c["rows"], c["ok"], c["rejected"], c["rejected_extra_cells"]) == (4, 3, 1, 1)


@pytest.mark.bad_input
def test_csv_where_every_row_has_more_cells_than_the_header_is_an_error(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text("caption\na dog, sitting on grass\na cat, on a mat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"caps\.csv: every row has more cells than the 1 column\(s\) of the "
                                         r"header \['caption'\].*quote a cell that holds a comma"):
        ingest(path, tmp_path / "runs")


def test_a_csv_bar_counts_the_files_lines_and_the_pre_run_check_shows_none(tmp_path, capsys):
    from pcm.stages.ingest import read_source, splits_present

    src = tmp_path / "mine.csv"
    src.write_text('caption,split\n"a dog\non the grass",train\na cat,test\na car,val\n')   # 5 lines, 3 records
    config = IngestConfig(source=str(src))
    _, rows = read_source(config)
    err = capsys.readouterr().err
    assert len(rows.raw) == 3 and "ingest mine.csv:" in err and "0/5 [" in err and "row [" not in err
    assert splits_present(config, RunLayout(tmp_path / "runs")) == {"train", "test", "val"}
    assert capsys.readouterr().err == ""
