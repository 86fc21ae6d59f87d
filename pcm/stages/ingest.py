"""Ingest stage: read caption files (Karpathy, COCO, .txt, .jsonl, .csv) into one checked captions table."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from pcm.config import StageConfig
from pcm.stages.stage import ProgressFn, cached, drop_marker, finish, locked, stage_dir
from storage import atomic, manifests, tables
from storage.fingerprint import input_digest
from storage.layout import RunLayout, StageDir
from storage.result import StageResult

log = logging.getLogger(__name__)

CODE_VERSION = "4"  # 2: train rows keep their image path (paired-image runs); 3: BOM encodings, CR line
# breaks, control characters rejected, duplicate JSON keys / CSV columns and runaway CSV quotes are errors;
# 4: a CSV row with more cells than the header is a rejected row (its extra cells were dropped)
STAGE = "ingest"
OUTPUT = manifests.CAPTIONS.name
FORMATS = ("karpathy", "coco", "txt", "jsonl", "csv")
SPLITS = ("train", "val", "test")
# Karpathy's "restval" images are the part of COCO val2014 that the split gives to training.
_SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "test": "test"}
# Every reason a row can be rejected for; each is counted as `rejected_<reason>` (0 included).
REASONS = ("invalid_utf8", "control_char", "empty", "whitespace", "too_long", "duplicate", "not_in_subset",
           "extra_cells")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# Caption ids are `<name>-<id>` and must pass storage.shards.check_key (at most 200 characters).
MAX_NAME_CHARS, MAX_ID_CHARS = 64, 120
# A CSV record may span at most this many physical lines (a quoted cell may hold line breaks); a longer
# one is a quote left open by mistake, swallowing the rows after it, and stops the stage.
MAX_CSV_RECORD_LINES = 10

Split = Literal["train", "val", "test"]


class IngestConfig(StageConfig):
    """What to read and which rows to keep; every field but `source` goes into the fingerprint.

    `source` is runtime: the file is fingerprinted by its name and content digest instead, so
    the same file reached through another path (another machine, a mounted copy) reuses the
    same stage directory.
    """

    RUNTIME: ClassVar[frozenset[str]] = frozenset({"source"})

    source: str = Field(description="Caption file: Karpathy or COCO JSON, .txt, .jsonl or .csv.")
    format: Literal["auto", "karpathy", "coco", "txt", "jsonl", "csv"] = Field(
        "auto", description="File format; auto = from the suffix (and, for .json, the content).")
    name: str | None = Field(
        None, description="Dataset name used as the caption-id prefix; default from the file name "
        "(dataset_coco.json -> coco).")
    splits: tuple[Split, ...] = Field(SPLITS, description="Splits to keep; rows of other splits are not read.")
    default_split: Split = Field(
        "train", description="Split of every row of a file without splits (COCO annotations, .txt, "
        "or .jsonl/.csv rows without a split column).")
    text_column: str = Field("caption", description=".jsonl/.csv: the caption column.")
    image_id_column: str = Field("image_id", description=".jsonl/.csv: image id column, used when present.")
    split_column: str = Field("split", description=".jsonl/.csv: split column, used when present.")
    image_path_column: str = Field("image_path", description=".jsonl/.csv: image path column, used when present.")
    dedup: bool = Field(True, description="Reject exact duplicate training captions (after normalisation).")
    subset: int | None = Field(None, ge=1, description="Keep this many training captions (seeded).")
    fraction: float | None = Field(None, gt=0, le=1, description="Keep this fraction of training captions (seeded).")
    seed: int = Field(0, description="Seed of the training subset.")
    max_chars: int = Field(500, ge=1, description="Reject captions longer than this (normalised characters).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not (_SAFE_NAME.match(v) and len(v) <= MAX_NAME_CHARS):
            raise ValueError(f"use 1-{MAX_NAME_CHARS} letters, digits, '_' or '-' (it prefixes every caption id)")
        return v

    @field_validator("splits")
    @classmethod
    def _canonical_splits(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("keep at least one of train, val, test")
        return tuple(s for s in SPLITS if s in v)  # canonical order: same set, same fingerprint

    @model_validator(mode="after")
    def _one_subset(self) -> IngestConfig:
        if self.subset is not None and self.fraction is not None:
            raise ValueError("give subset (a count) or fraction, not both")
        return self

    def content(self) -> dict[str, Any]:
        """The fingerprinted fields, with `name` the effective caption-id prefix (`dataset_name`).

        `name` left out (`pcm ingest --demo`) and `name` given as the name the file would give
        (`name = "demo"` in the pipeline presets) write the same rows, so they are one stage.
        """
        return super().content() | {"name": dataset_name(self)}


# -- planning ---------------------------------------------------------------------------


def source_path(config: IngestConfig) -> Path:
    """The caption file, or a clear error when it is missing."""
    path = Path(config.source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{config.source}: caption file not found; pass the path of a Karpathy or "
                                "COCO JSON, .txt, .jsonl or .csv file")
    return path


def dataset_name(config: IngestConfig) -> str:
    """The caption-id prefix: `config.name`, else the file name without `dataset_` and suffix."""
    if config.name:
        return config.name
    stem = Path(config.source).name.split(".")[0].removeprefix("dataset_")
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[:MAX_NAME_CHARS] or "captions"


def plan(config: IngestConfig, root: str) -> StageDir:
    """The stage directory for this config and this file's content; no work, nothing written (it reads the file)."""
    path = source_path(config)
    extra = {"source_name": path.name, "source_sha256": input_digest(path)}
    return stage_dir(RunLayout(root), STAGE, config, [], CODE_VERSION, extra=extra)


def splits_present(config: IngestConfig, root: str) -> set[str]:
    """The splits this source gives rows to: from the finished stage's captions.parquet, else by reading the file
    (nothing is written: `pcm run` checks before any stage works that evaluate will find images)."""
    sd = plan(config, root)
    if sd.done_marker.exists() and manifests.CAPTIONS.exists(sd):
        rows = manifests.CAPTIONS.read(sd, columns=["split", "status"]).to_pylist()
        return {r["split"] for r in tables.ok_rows(rows)}
    return set(read_source(config, bar=False)[1].split)


def verify(sd: StageDir) -> str | None:
    """None when captions.parquet is in place with the row count the marker promises."""
    path = manifests.CAPTIONS.path(sd)
    if not path.exists():
        return f"{OUTPUT} missing"
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # noqa: BLE001 - any unreadable file means "redo"
        return f"{OUTPUT} unreadable ({e})"
    if sd.done_marker.exists():
        want = StageResult.load(sd.done_marker).counts.get("rows")
        if want is not None and want != rows:
            return f"{OUTPUT} has {rows} rows, the marker says {want}"
    return None


# -- reading ----------------------------------------------------------------------------


@dataclass
class _Rows:
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


def _decode(path: Path) -> str:
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


class _DuplicateKey(ValueError):
    def __init__(self, key: str, keys: list[str]) -> None:
        shown = keys if len(keys) <= 8 else [*keys[:8], "..."]
        super().__init__(f"duplicate key {key!r} in a JSON object (keys {shown}); a key may appear once "
                         "per object (a JSON reader would silently keep only its last value)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: the object, or _DuplicateKey naming the repeated key."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key, [k for k, _ in pairs])
            seen.add(key)
    return obj


def _json(text: str) -> Any:
    """json.loads refusing repeated keys in an object."""
    return json.loads(text, object_pairs_hook=_unique_keys)


# json.loads recurses once per nested array/object: thousands of levels ("[[[[...") exhaust Python's
# recursion limit and raise RecursionError, which must become an error naming the file (and line).
_TOO_DEEP = ("JSON nested too deeply: arrays/objects inside each other beyond Python's recursion limit "
             "(about {limit} levels); caption files need only a few levels")


def _too_deep() -> str:
    import sys

    return _TOO_DEEP.format(limit=sys.getrecursionlimit())


def _load_json(path: Path) -> Any:
    """Like storage.atomic.read_json (errors name line and column), tolerating invalid UTF-8 in strings."""
    try:
        return _json(_decode(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except _DuplicateKey as e:
        raise ValueError(f"{path}: {e}") from None
    except RecursionError:
        raise ValueError(f"{path}: {_too_deep()}") from None
    except ValueError as e:  # json's own limits (an integer of over 4300 digits) name no file
        raise ValueError(f"{path}: invalid JSON: {e}") from None


def _valid_utf8(s: str) -> bool:
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
        if not v or not _valid_utf8(v):
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
        if isinstance(v, str) and _SAFE_NAME.match(v) and len(v) <= MAX_ID_CHARS:
            return v
        raise self.fail(f"{key!r} must be an integer or a string of 1-{MAX_ID_CHARS} letters, digits, '_' or '-', "
                        f"got {v!r}")

    def label(self, key: str) -> str:
        """An image id: an integer or any non-empty UTF-8 string (it is never used as a file name)."""
        v = self.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        if isinstance(v, str) and v and _valid_utf8(v):
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


def _read_karpathy(data: Any, file: str, prefix: str, keep: tuple[str, ...], bar: bool = True) -> _Rows:
    """Karpathy split JSON: images[].{filepath?, filename, imgid, cocoid?, split, sentences[].{raw, sentid}}."""
    rows = _Rows(file, lambda w: f"images[{w[0]}].sentences[{w[1]}]")
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


def _read_coco(data: Any, file: str, prefix: str, split: str, keep: tuple[str, ...], bar: bool = True) -> _Rows:
    """COCO captions annotations: images[].{id, file_name}, annotations[].{id, image_id, caption}; one split."""
    rows = _Rows(file, lambda k: f"annotations[{k}]")
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


def _read_txt(text: str, file: str, prefix: str, split: str, keep: tuple[str, ...], bar: bool = True) -> _Rows:
    """One caption a line; each line is its own image; blank lines become rejected rows."""
    rows = _Rows(file, lambda n: f"line {n}")
    lines = _lines(text)
    if split not in keep:
        rows.skipped = len(lines)
        return rows
    for n, line in enumerate(_bar(lines, len(lines), f"ingest {Path(file).name}", "line", bar), start=1):
        rows.add(f"{prefix}-{n}", f"{prefix}-{n}", split, line, None, n)
    return rows


def _add_record(rows: _Rows, rec: _Fields, cid: str, config: IngestConfig, keep: tuple[str, ...], where: Any) -> None:
    """One .jsonl/.csv record; the optional columns are used when present and non-empty."""
    text = rec.text(config.text_column)
    split = rec.split(config.split_column) if rec.has(config.split_column) else config.default_split
    if split not in keep:
        rows.skipped += 1
        return
    image_id = rec.label(config.image_id_column) if rec.has(config.image_id_column) else cid
    image_path = rec.relpath(config.image_path_column) if rec.has(config.image_path_column) else None
    rows.add(cid, image_id, split, text, image_path, where)


def _read_jsonl(text: str, file: str, prefix: str, config: IngestConfig, keep: tuple[str, ...],
                bar: bool = True) -> _Rows:
    """One JSON object a line; blank lines become rejected rows like empty captions."""
    rows = _Rows(file, lambda n: f"line {n}")
    lines = _lines(text)
    for n, line in enumerate(_bar(lines, len(lines), f"ingest {Path(file).name}", "line", bar), start=1):
        cid = f"{prefix}-{n}"
        if not line.strip():
            if config.default_split in keep:
                rows.add(cid, cid, config.default_split, line, None, n)
            else:
                rows.skipped += 1
            continue
        try:
            obj = _json(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: invalid JSON at line {n}, column {e.colno}: {e.msg}") from None
        except _DuplicateKey as e:
            raise ValueError(f"{file}: line {n}: {e}") from None
        except RecursionError:
            raise ValueError(f"{file}: line {n}: {_too_deep()}") from None
        except ValueError as e:  # json's own limits (an integer of over 4300 digits) name no file
            raise ValueError(f"{file}: line {n}: invalid JSON: {e}") from None
        _add_record(rows, _Fields(file, obj, f"line {n}"), cid, config, keep, n)
    return rows


def _add_long_record(rows: _Rows, record: list[str], header: list[str], cid: str, config: IngestConfig,
                     keep: tuple[str, ...], n: int, line: int) -> None:
    """A CSV row with more cells than the header: a rejected row, never a caption cut at the header's width.

    Its cells no longer line up with the header (an unquoted comma in a caption splits it in two), so
    only a split cell that names a split is used (else the default split), the image id is the row's
    caption id, and raw_text is the whole record, its cells joined by commas again.
    """
    cell = dict(zip(header, record, strict=False)).get(config.split_column)
    split = _SPLIT_NAMES.get(cell, config.default_split) if isinstance(cell, str) else config.default_split
    if split not in keep:
        rows.skipped += 1
        return
    rows.add(cid, cid, split, ",".join(record), None, n)
    rows.rejected[len(rows.raw) - 1] = (
        "extra_cells", f"row {n} (line {line}): {len(record)} cells, more than the {len(header)} column(s) of the "
        f"header {header}: a comma inside an unquoted cell? Quote a cell that holds a comma (\"a dog, sitting\")")


def _read_csv(text: str, file: str, prefix: str, config: IngestConfig, keep: tuple[str, ...],
              bar: bool = True) -> _Rows:
    """A CSV file with a header row; ids count data rows from 1 (blank lines are not rows).

    Quoting is strict (a quote opens and closes a whole cell), a record may span at most
    MAX_CSV_RECORD_LINES lines, and header names must be unique; each break is an error naming the
    line where the record starts, which for a stray quote is the line where it opened.
    """
    rows = _Rows(file, lambda n: f"row {n}")
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
        if config.text_column not in header:
            raise ValueError(f"{file}: no {config.text_column!r} column in the header {header}; set the text "
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
                    _add_long_record(rows, record, header, f"{prefix}-{n}", config, keep, n, start)
                    continue
                # A short row lacks its last cells (a missing caption cell is an error, like a missing key).
                present = dict(zip(header, record, strict=False))
                _add_record(rows, _Fields(file, present, f"row {n} (line {start})"), f"{prefix}-{n}", config, keep,
                            n)
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


def read_source(config: IngestConfig, bar: bool = True) -> tuple[str, _Rows]:
    """The detected format and the input captions of `config.source`, in file order; `bar`: a terminal
    progress bar while reading (none for a check before the run)."""
    path = source_path(config)
    fmt, data = _detect(path, config.format)
    file, prefix, keep = str(path), dataset_name(config), config.splits
    if fmt == "karpathy":
        return fmt, _read_karpathy(data, file, prefix, keep, bar)
    if fmt == "coco":
        return fmt, _read_coco(data, file, prefix, config.default_split, keep, bar)
    text = _decode(path)
    if fmt == "txt":
        return fmt, _read_txt(text, file, prefix, config.default_split, keep, bar)
    if fmt == "jsonl":
        return fmt, _read_jsonl(text, file, prefix, config, keep, bar)
    return fmt, _read_csv(text, file, prefix, config, keep, bar)


# -- checking ---------------------------------------------------------------------------


# C0 and C1 control characters and DEL (Unicode category Cc) but tab, line feed and carriage return,
# which are ordinary whitespace (collapsed into one space).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_CONTROL_NAMES = (
    "NUL SOH STX ETX EOT ENQ ACK BEL BS HT LF VT FF CR SO SI DLE DC1 DC2 DC3 DC4 NAK SYN ETB CAN EM SUB ESC "
    "FS GS RS US".split()
    + "PAD HOP BPH NBH IND NEL SSA ESA HTS HTJ VTS PLD PLU RI SS2 SS3 DCS PU1 PU2 STS CCH MW SPA EPA SOS SGC "
      "SCI CSI ST OSC PM APC".split())


def _control_message(raw: str, m: re.Match) -> str:
    c = ord(m.group())
    name = "DEL" if c == 0x7F else _CONTROL_NAMES[c if c < 0x20 else c - 0x80 + 0x20]
    what = ", a terminal escape sequence" if c in (0x1B, 0x9B) else ""
    count = len(_CONTROL.findall(raw))
    more = f" (and {count - 1} more)" if count > 1 else ""
    return f"control character U+{c:04X} ({name}{what}) at character {m.start() + 1}{more}; captions must be text"


def _check_text(raw: str, max_chars: int) -> tuple[str, str, str | None, str | None]:
    """(text, raw_text, reason, error) for one caption; reason None when it is accepted."""
    if not _valid_utf8(raw):
        try:  # bytes that were not UTF-8 (surrogateescape'd) are shown as \x escapes
            shown = raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape such as "\ud83d"
            shown = raw.encode("utf-8", "backslashreplace").decode("utf-8")
        return "", shown, "invalid_utf8", "invalid UTF-8 (undecodable bytes shown as \\x escapes)"
    if not raw:
        return "", raw, "empty", "empty caption"
    if m := _CONTROL.search(raw):
        return "", raw, "control_char", _control_message(raw, m)
    text = " ".join(raw.split())
    if not text:
        return "", raw, "whitespace", "whitespace-only caption"
    if len(text) > max_chars:
        return "", raw, "too_long", f"{len(text)} characters, longer than max_chars={max_chars}"
    return text, raw, None, None


def _subset_rank(seed: int, caption_id: str) -> bytes:
    """A per-caption random key: the subset of size k is the k smallest keys, so subsets of one seed
    are nested (a 10% run contains the 1% run) and do not depend on the file's row order."""
    return hashlib.blake2b(f"{seed}:{caption_id}".encode(), digest_size=8).digest()


def build_columns(rows: _Rows, config: IngestConfig, source: str) -> tuple[dict[str, list], dict[str, int]]:
    """The CAPTIONS columns of `rows` (checked, deduplicated, subset) and the counts; `source` labels every row."""
    n = len(rows.raw)
    text, raw_text = [""] * n, [""] * n
    status, error = [tables.STATUS_OK] * n, [None] * n
    reasons: Counter[str] = Counter()

    def reject(i: int, reason: str, message: str) -> None:
        text[i], status[i], error[i] = "", tables.STATUS_REJECTED, message
        reasons[reason] += 1

    for i, raw in enumerate(rows.raw):
        text[i], raw_text[i], reason, message = _check_text(raw, config.max_chars)
        if i in rows.rejected:  # a row its reader rejected already (raw_text still shown as _check_text made it)
            reason, message = rows.rejected[i]
        if reason:
            reject(i, reason, message)

    train = [i for i in range(n) if rows.split[i] == "train" and status[i] == tables.STATUS_OK]
    if config.dedup:
        first: dict[str, str] = {}
        unique = []
        for i in train:
            kept = first.setdefault(text[i], rows.caption_id[i])
            if kept == rows.caption_id[i]:
                unique.append(i)
            else:
                reject(i, "duplicate", f"duplicate of {kept}")
        train = unique

    counts: dict[str, int] = {}
    if config.subset is not None or config.fraction is not None:
        pool = len(train)
        k = config.subset if config.subset is not None else max(1, round(config.fraction * pool))
        k = min(k, pool)
        ranked = sorted(train, key=lambda i: _subset_rank(config.seed, rows.caption_id[i]))
        for i in ranked[k:]:
            reject(i, "not_in_subset", f"not in the seeded train subset (seed {config.seed}, {k} of {pool} kept)")
        counts |= {"subset_pool": pool, "subset_kept": k}

    # Every row of a val/test image carries all its accepted captions as references.
    refs: dict[tuple[str, str], list[str]] = {}
    captions: Counter[str] = Counter()
    images: dict[str, set[str]] = {s: set() for s in SPLITS}
    for i in range(n):
        if status[i] == tables.STATUS_OK:
            s, image = rows.split[i], rows.image_id[i]
            captions[s] += 1
            images[s].add(image)
            if s != "train":
                refs.setdefault((s, image), []).append(text[i])
    none: list[str] = []  # one shared empty list: 600k fresh ones would wake the garbage collector
    references = [refs.get((s, image), none) for s, image in zip(rows.split, rows.image_id, strict=True)]

    ok = sum(captions.values())
    # A caption left out of a seeded subset is fine, only not chosen: counted apart from the rejected ones
    # (its row keeps status "rejected" with reason not_in_subset, so that only chosen rows are "ok").
    not_selected = reasons["not_in_subset"]
    counts |= {"rows": n, "ok": ok, "rejected": n - ok - not_selected, "not_selected": not_selected,
               "skipped_splits": rows.skipped}
    counts |= {f"rejected_{r}": reasons[r] for r in REASONS}
    for s in SPLITS:
        counts[f"{s}_captions"], counts[f"{s}_images"] = captions[s], len(images[s])
    columns = {"caption_id": rows.caption_id, "image_id": rows.image_id, "split": rows.split, "text": text,
               "raw_text": raw_text, "source": [source] * n,
               "image_path": rows.image_path, "references": references, "status": status, "error": error}
    return columns, counts


# -- the stage --------------------------------------------------------------------------


def checked_summary(counts: dict[str, int]) -> str:
    """"3500 ok, 0 rejected, 1500 not selected by the subset" (the last part only when a subset was drawn)."""
    text = f"{counts['ok']} ok, {counts['rejected']} rejected"
    return text + (f", {counts['not_selected']} not selected by the subset" if counts.get("not_selected") else "")


def run_ingest(config: IngestConfig, root: str, *, force: bool = False,
               progress: ProgressFn | None = None) -> StageResult:
    """Read `config.source`, check every caption and write captions.parquet; reuse a finished run."""
    started = time.monotonic()
    sd = plan(config, root)
    if not force and (done := cached(sd, verify)):
        log.info("ingest: reusing %s", sd.path)
        return done
    report = progress or (lambda done, total, message: None)
    with locked(sd):
        drop_marker(sd, store=force)
        atomic.remove_stale_temporaries(sd.path, OUTPUT)
        t0 = time.monotonic()
        fmt, rows = read_source(config)
        if not rows.raw and not rows.skipped:  # an empty file, a header alone, images: []: no data set
            raise ValueError(f"{source_path(config)}: no captions in the file ({fmt}); nothing to ingest")
        report(1, 3, f"read {len(rows.raw)} captions ({fmt})")
        t1 = time.monotonic()
        columns, counts = build_columns(rows, config, f"{fmt}:{source_path(config).name}")
        report(2, 3, f"checked: {checked_summary(counts)}")
        t2 = time.monotonic()
        manifests.CAPTIONS.write(sd, columns)
        report(3, 3, f"wrote {OUTPUT}")
        t3 = time.monotonic()
        log.info("ingest: %d captions from %s (%s) -> %s", counts["rows"], config.source, checked_summary(counts),
                 sd.file(OUTPUT))
        extra = {"source": str(source_path(config).resolve()), "format": fmt, "name": dataset_name(config)}
        return finish(sd, counts, started, extra=extra,
                      timings={"read_s": round(t1 - t0, 3), "check_s": round(t2 - t1, 3),
                               "write_s": round(t3 - t2, 3)})
