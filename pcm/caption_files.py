"""Caption files (Karpathy or COCO JSON, .txt, .jsonl, .csv) read into parallel column lists.

What a file holds and how its rows are told apart lives here; how captions are checked and which
rows a run keeps is pcm/caption_checks.py's. Every error names the file and
the row, line or JSON entry. Nothing here knows a stage config: a `Columns` spec names the
.jsonl/.csv columns.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pcm import strict_json

FORMATS = ("karpathy", "coco", "txt", "jsonl", "csv")
SPLITS = ("train", "val", "test")
# Karpathy's "restval" images are the part of COCO val2014 that the split gives to training.
_SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "test": "test"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# Caption ids are `<name>-<id>` and must pass storage.shards.check_key (at most 200 characters).
MAX_NAME_CHARS, MAX_ID_CHARS = 64, 120
# A CSV record may span at most this many physical lines (a quoted cell may hold line breaks); a longer
# one is a quote left open by mistake, swallowing the rows after it, and stops the stage.
MAX_CSV_RECORD_LINES = 10


@dataclass(frozen=True)
class Columns:
    """The .jsonl/.csv column names: the caption (required) and the optional image id, split and image path."""

    text: str
    image_id: str
    split: str
    image_path: str



@dataclass
class Rows:
    """Input captions as parallel column lists (600k captions must not become 600k dicts)."""

    file: str
    locate: Callable[[Any], str]          # a row's `where` -> "images[3].sentences[1]"
    caption_id: list[str] = field(default_factory=list)
    image_id: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)  # may hold surrogates for undecodable bytes
    image_path: list[str | None] = field(default_factory=list)
    skipped: int = 0                      # rows of splits not asked for
    rejected: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (reason, error) known when read
    _seen: dict[str, Any] = field(default_factory=dict)

    def add(self, caption_id: str, image_id: str, split: str, raw: str, image_path: str | None, where: Any) -> None:
        if caption_id in self._seen:
            raise ValueError(f"{self.file}: {self.locate(where)}: duplicate caption id {caption_id!r}, "
                             f"first used by {self.locate(self._seen[caption_id])}; ids must be unique")
        self._seen[caption_id] = where
        self.caption_id.append(caption_id)
        self.image_id.append(image_id)
        self.split.append(split)
        self.raw.append(raw)
        self.image_path.append(image_path)


# Byte-order marks, UTF-32 first: its little-endian mark starts with UTF-16's.
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32-LE"), (codecs.BOM_UTF32_BE, "UTF-32-BE"), (codecs.BOM_UTF8, "UTF-8"),
         (codecs.BOM_UTF16_LE, "UTF-16-LE"), (codecs.BOM_UTF16_BE, "UTF-16-BE"))


def decode_text(path: Path) -> str:
    """The file's text, in the encoding its byte-order mark names (UTF-8 without one).

    In UTF-8, undecodable bytes survive as surrogates so one bad caption is one rejected row; a
    UTF-16 or UTF-32 file that does not decode is an error naming the line.
    """
    data = path.read_bytes()
    bom, encoding = next(((b, e) for b, e in _BOMS if data.startswith(b)), (b"", "UTF-8"))
    if encoding == "UTF-8":
        return data[len(bom):].decode("utf-8", "surrogateescape")
    try:
        return data[len(bom):].decode(encoding)
    except UnicodeDecodeError as e:
        line = data[len(bom):len(bom) + e.start].decode(encoding, "replace").count("\n") + 1
        raise ValueError(f"{path}: line {line}: not valid {encoding} (the encoding its byte-order mark names): "
                         f"{e.reason} at byte {len(bom) + e.start}") from None


# json.loads recurses once per nested array/object: thousands of levels ("[[[[...") exhaust Python's
# recursion limit and raise RecursionError, which must become an error naming the file (and line).
_TOO_DEEP = ("JSON nested too deeply: arrays/objects inside each other beyond Python's recursion limit "
             "(about {limit} levels); caption files need only a few levels")


def _too_deep() -> str:
    return _TOO_DEEP.format(limit=sys.getrecursionlimit())


def _parse_json(text: str, file: str | Path, line: int | None = None) -> Any:
    """`text` as JSON, or one ValueError naming the file and place (`line`: a .jsonl line's number)."""
    at = f"{file}: line {line}" if line is not None else f"{file}"
    try:
        return strict_json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON at line {line or e.lineno}, column {e.colno}: {e.msg}") from None
    except strict_json.DuplicateKey as e:
        raise ValueError(f"{at}: {e}") from None
    except RecursionError:
        raise ValueError(f"{at}: {_too_deep()}") from None
    except ValueError as e:  # json's own limits (an integer of over 4300 digits) name no file
        raise ValueError(f"{at}: invalid JSON: {e}") from None


def _load_json(path: Path) -> Any:
    """Like storage.atomic.read_json (errors name line and column), tolerating invalid UTF-8 in strings."""
    return _parse_json(decode_text(path), path)


def valid_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _bar(items: Iterable[Any] | None, total: int, desc: str, unit: str, show: bool = True) -> tqdm:
    """A terminal progress bar over `items` (nothing when not `show`: a check that only reads the file)."""
    return tqdm(items, total=total, desc=desc, unit=unit, leave=False, mininterval=0.5, disable=not show)


class _Fields:
    """Typed access to one JSON entry; every error names the file and the entry."""

    def __init__(self, file: str, obj: Any, at: str) -> None:
        if not isinstance(obj, dict):
            raise ValueError(f"{file}: {at}: expected an object, got {type(obj).__name__}")
        self.file, self.obj, self.at = file, obj, at

    def fail(self, msg: str) -> ValueError:
        return ValueError(f"{self.file}: {self.at}: {msg}")

    def has(self, key: str) -> bool:
        return self.obj.get(key) not in (None, "")

    def get(self, key: str) -> Any:
        if key not in self.obj:
            raise self.fail(f"missing {key!r}")
        return self.obj[key]

    def array(self, key: str) -> list:
        v = self.get(key)
        if not isinstance(v, list):
            raise self.fail(f"{key!r} must be a list, got {type(v).__name__}")
        return v

    def text(self, key: str) -> str:
        """A caption: any string (content problems become rejected rows later)."""
        v = self.get(key)
        if not isinstance(v, str):
            raise self.fail(f"{key!r} must be a string, got {type(v).__name__}")
        return v

    def name(self, key: str) -> str:
        """A file name or path: a non-empty, valid UTF-8 string."""
        v = self.text(key)
        if not v or not valid_utf8(v):
            raise self.fail(f"{key!r} must be a non-empty UTF-8 string, got {v!r}")
        return v

    def relpath(self, key: str) -> str:
        """An image path relative to the image root: no absolute path, no '..' (it must not escape the root)."""
        v = self.name(key)
        if v.startswith(("/", "\\")) or ".." in v.replace("\\", "/").split("/") or ":" in v.split("/")[0]:
            raise self.fail(f"{key!r} must be a relative path inside the image root (no '..', not absolute), got {v!r}")
        return v

    def ident(self, key: str) -> str:
        """A caption id part: an integer or a string of letters, digits, '_' and '-' (a key and a file name)."""
        v = self.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        if isinstance(v, str) and SAFE_NAME.match(v) and len(v) <= MAX_ID_CHARS:
            return v
        raise self.fail(f"{key!r} must be an integer or a string of 1-{MAX_ID_CHARS} letters, digits, '_' or '-', "
                        f"got {v!r}")

    def label(self, key: str) -> str:
        """An image id: an integer or any non-empty UTF-8 string (it is never used as a file name)."""
        v = self.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        if isinstance(v, str) and v and valid_utf8(v):
            return v
        raise self.fail(f"{key!r} must be an integer or a non-empty UTF-8 string, got {v!r}")

    def split(self, key: str) -> str:
        v = self.get(key)
        if v not in _SPLIT_NAMES:
            raise self.fail(f"unknown split {v!r}; expected one of {', '.join(_SPLIT_NAMES)}")
        return _SPLIT_NAMES[v]


def _detect(path: Path, fmt: str) -> tuple[str, Any]:
    """The format to read and, for JSON formats, the parsed document."""
    if fmt == "auto":
        suffix = path.suffix.lower()
        by_suffix = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv"}
        if suffix in by_suffix:
            return by_suffix[suffix], None
        if suffix != ".json":
            raise ValueError(f"{path}: cannot tell the format from the suffix {suffix!r}; expected .json "
                             f"(Karpathy or COCO), .jsonl, .csv or .txt, or set the format to one of "
                             f"{', '.join(FORMATS)}")
        data = _load_json(path)
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            return "coco", data
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            return "karpathy", data
        raise ValueError(f"{path}: a .json caption file must be Karpathy split JSON (images[].sentences) or "
                         f"COCO annotations (images and annotations); set the format to one of {', '.join(FORMATS)}")
    return fmt, (_load_json(path) if fmt in ("karpathy", "coco") else None)


def _read_karpathy(data: Any, file: str, prefix: str, keep: tuple[str, ...], bar: bool = True) -> Rows:
    """Karpathy split JSON: images[].{filepath?, filename, imgid, cocoid?, split, sentences[].{raw, sentid}}."""
    rows = Rows(file, lambda w: f"images[{w[0]}].sentences[{w[1]}]")
    images = _Fields(file, data, "top level").array("images")
    image_seen: dict[str, int] = {}
    for i, entry in enumerate(_bar(images, len(images), f"ingest {Path(file).name}", "image", bar)):
        img = _Fields(file, entry, f"images[{i}]")
        image_id = img.label("cocoid") if "cocoid" in img.obj else img.label("imgid")
        first = image_seen.setdefault(image_id, i)
        if first != i:
            raise img.fail(f"duplicate image id {image_id!r}, first used by images[{first}]")
        split = img.split("split")
        sentences = img.array("sentences")
        if split not in keep:
            rows.skipped += len(sentences)
            continue
        image_path = img.relpath("filename")
        if img.has("filepath"):
            image_path = f"{img.relpath('filepath')}/{image_path}"
        for j, s in enumerate(sentences):
            # Fast path for the usual well-formed sentence; _Fields names the entry of a bad one.
            if type(s) is dict and type(raw := s.get("raw")) is str and type(sentid := s.get("sentid")) is int:
                rows.add(f"{prefix}-{sentid}", image_id, split, raw, image_path, (i, j))
            else:
                sent = _Fields(file, s, f"images[{i}].sentences[{j}]")
                rows.add(f"{prefix}-{sent.ident('sentid')}", image_id, split, sent.text("raw"), image_path, (i, j))
    return rows


def _read_coco(data: Any, file: str, prefix: str, split: str, keep: tuple[str, ...], bar: bool = True) -> Rows:
    """COCO captions annotations: images[].{id, file_name}, annotations[].{id, image_id, caption}; one split."""
    rows = Rows(file, lambda k: f"annotations[{k}]")
    top = _Fields(file, data, "top level")
    images, annotations = top.array("images"), top.array("annotations")
    if split not in keep:
        rows.skipped = len(annotations)
        return rows
    files: dict[str, tuple[str, int]] = {}
    for i, entry in enumerate(images):
        img = _Fields(file, entry, f"images[{i}]")
        image_id = img.label("id")
        if image_id in files:
            raise img.fail(f"duplicate image id {image_id!r}, first used by images[{files[image_id][1]}]")
        files[image_id] = (img.relpath("file_name"), i)
    for k, entry in enumerate(_bar(annotations, len(annotations), f"ingest {Path(file).name}", "caption", bar)):
        ann = _Fields(file, entry, f"annotations[{k}]")
        image_id = ann.label("image_id")
        if image_id not in files:
            raise ann.fail(f"image_id {image_id!r} is not in images[]")
        rows.add(f"{prefix}-{ann.ident('id')}", image_id, split, ann.text("caption"), files[image_id][0], k)
    return rows


def _lines(text: str) -> list[str]:
    """Lines split on \\n, \\r\\n and a lone \\r (old Mac files); str.splitlines would also split on
    form feeds and U+2028."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start an empty one
    return lines


def _read_txt(text: str, file: str, prefix: str, split: str, keep: tuple[str, ...], bar: bool = True) -> Rows:
    """One caption a line; each line is its own image; blank lines become rejected rows."""
    rows = Rows(file, lambda n: f"line {n}")
    lines = _lines(text)
    if split not in keep:
        rows.skipped = len(lines)
        return rows
    for n, line in enumerate(_bar(lines, len(lines), f"ingest {Path(file).name}", "line", bar), start=1):
        rows.add(f"{prefix}-{n}", f"{prefix}-{n}", split, line, None, n)
    return rows


def _add_record(rows: Rows, rec: _Fields, cid: str, columns: Columns, default_split: str, keep: tuple[str, ...],
                where: Any) -> None:
    """One .jsonl/.csv record; the optional columns are used when present and non-empty."""
    text = rec.text(columns.text)
    split = rec.split(columns.split) if rec.has(columns.split) else default_split
    if split not in keep:
        rows.skipped += 1
        return
    image_id = rec.label(columns.image_id) if rec.has(columns.image_id) else cid
    image_path = rec.relpath(columns.image_path) if rec.has(columns.image_path) else None
    rows.add(cid, image_id, split, text, image_path, where)


def _read_jsonl(text: str, file: str, prefix: str, columns: Columns, default_split: str, keep: tuple[str, ...],
                bar: bool = True) -> Rows:
    """One JSON object a line; blank lines become rejected rows like empty captions."""
    rows = Rows(file, lambda n: f"line {n}")
    lines = _lines(text)
    for n, line in enumerate(_bar(lines, len(lines), f"ingest {Path(file).name}", "line", bar), start=1):
        cid = f"{prefix}-{n}"
        if not line.strip():
            if default_split in keep:
                rows.add(cid, cid, default_split, line, None, n)
            else:
                rows.skipped += 1
            continue
        obj = _parse_json(line, file, n)
        _add_record(rows, _Fields(file, obj, f"line {n}"), cid, columns, default_split, keep, n)
    return rows


def _add_long_record(rows: Rows, record: list[str], header: list[str], cid: str, columns: Columns,
                     default_split: str, keep: tuple[str, ...], n: int, line: int) -> None:
    """A CSV row with more cells than the header: a rejected row, never a caption cut at the header's width.

    Its cells no longer line up with the header (an unquoted comma in a caption splits it in two), so
    only a split cell that names a split is used (else the default split), the image id is the row's
    caption id, and raw_text is the whole record, its cells joined by commas again.
    """
    cell = dict(zip(header, record, strict=False)).get(columns.split)
    split = _SPLIT_NAMES.get(cell, default_split) if isinstance(cell, str) else default_split
    if split not in keep:
        rows.skipped += 1
        return
    rows.add(cid, cid, split, ",".join(record), None, n)
    rows.rejected[len(rows.raw) - 1] = (
        "extra_cells", f"row {n} (line {line}): {len(record)} cells, more than the {len(header)} column(s) of the "
        f"header {header}: a comma inside an unquoted cell? Quote a cell that holds a comma (\"a dog, sitting\")")


def _read_csv(text: str, file: str, prefix: str, columns: Columns, default_split: str, keep: tuple[str, ...],
              bar: bool = True) -> Rows:
    """A CSV file with a header row; ids count data rows from 1 (blank lines are not rows).

    Quoting is strict (a quote opens and closes a whole cell), a record may span at most
    MAX_CSV_RECORD_LINES lines, and header names must be unique; each break is an error naming the
    line where the record starts, which for a stray quote is the line where it opened.
    """
    rows = Rows(file, lambda n: f"row {n}")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1  # the line the current record starts on

    def records() -> Iterable[list[str]]:
        nonlocal start
        while True:
            start = reader.line_num + 1
            record = next(reader, None)
            if record is None:
                return
            if (span := reader.line_num - start + 1) > MAX_CSV_RECORD_LINES:
                raise ValueError(f"{file}: line {start}: a quoted cell of the record starting here runs over "
                                 f"{span} lines (to line {reader.line_num}), more than {MAX_CSV_RECORD_LINES}: a "
                                 "stray or unclosed quote; quote whole cells and double the quotes inside them")
            if record:
                yield record

    try:
        it = iter(records())
        header = next(it, [])
        repeated = {h: [i for i, g in enumerate(header, 1) if g == h] for h in header if h and header.count(h) > 1}
        if repeated:
            shown = "; ".join(f"{h!r} (columns {', '.join(map(str, cols[:-1]))} and {cols[-1]})"
                              for h, cols in repeated.items())
            raise ValueError(f"{file}: line {start}: duplicate column names in the header: {shown}; every column "
                             "needs its own name")
        if columns.text not in header:
            raise ValueError(f"{file}: no {columns.text!r} column in the header {header}; set the text "
                             "column to one of these")
        n = long_rows = 0
        # A record may span lines, so the bar counts the file's lines read so far (its total known), not records.
        total = text.count("\n") + (not text.endswith("\n"))
        with _bar(None, total, f"ingest {Path(file).name}", "line", bar) as progress:
            for n, record in enumerate(it, start=1):
                progress.update(reader.line_num - progress.n)
                # A long row is rejected, unless its extra cells are empty (a trailing comma loses nothing).
                if len(record) > len(header) and any(record[len(header):]):
                    long_rows += 1
                    _add_long_record(rows, record, header, f"{prefix}-{n}", columns, default_split, keep, n, start)
                    continue
                # A short row lacks its last cells (a missing caption cell is an error, like a missing key).
                present = dict(zip(header, record, strict=False))
                _add_record(rows, _Fields(file, present, f"row {n} (line {start})"), f"{prefix}-{n}", columns,
                            default_split, keep, n)
        if long_rows and long_rows == n:
            raise ValueError(f"{file}: every row has more cells than the {len(header)} column(s) of the header "
                             f"{header}: a column name missing from the header, or commas inside unquoted cells; "
                             'quote a cell that holds a comma ("a dog, sitting on grass")')
    except csv.Error as e:
        if str(e) == "unexpected end of data":
            raise ValueError(f"{file}: line {start}: invalid CSV: a quoted cell of the record starting here is "
                             f"still open at the end of the file (line {reader.line_num}): a stray or unclosed "
                             "quote") from None
        where = f"line {start}" if reader.line_num <= start else f"line {start} (record to line {reader.line_num})"
        raise ValueError(f"{file}: {where}: invalid CSV: {e}") from None
    return rows


def read_captions(path: Path, fmt: str, *, prefix: str, keep: tuple[str, ...], default_split: str,
                  columns: Columns, bar: bool = True) -> tuple[str, Rows]:
    """The detected format and the input captions of `path`, in file order.

    `fmt`: one of FORMATS or "auto"; `prefix`: the caption-id prefix; `keep`: the splits to read
    (rows of others are only counted); `default_split`: the split of a row the file gives none;
    `bar`: a terminal progress bar while reading.
    """
    fmt, data = _detect(path, fmt)
    file = str(path)
    if fmt == "karpathy":
        return fmt, _read_karpathy(data, file, prefix, keep, bar)
    if fmt == "coco":
        return fmt, _read_coco(data, file, prefix, default_split, keep, bar)
    text = decode_text(path)
    if fmt == "txt":
        return fmt, _read_txt(text, file, prefix, default_split, keep, bar)
    if fmt == "jsonl":
        return fmt, _read_jsonl(text, file, prefix, columns, default_split, keep, bar)
    return fmt, _read_csv(text, file, prefix, columns, default_split, keep, bar)
