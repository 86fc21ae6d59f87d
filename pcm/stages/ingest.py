"""Ingest stage: read caption files (Karpathy, COCO, .txt, .jsonl, .csv) into one checked captions table."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from pcm.caption_files import MAX_NAME_CHARS, SAFE_NAME, SPLITS, Columns, Rows, read_captions, valid_utf8
from pcm.config import StageConfig
from pcm.stages.contract import ProgressFn, cached, drop_marker, finish, locked, stage_dir
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
# Every reason a row can be rejected for; each is counted as `rejected_<reason>` (0 included).
REASONS = ("invalid_utf8", "control_char", "empty", "whitespace", "too_long", "duplicate", "not_in_subset",
           "extra_cells")

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
        if v is not None and not (SAFE_NAME.match(v) and len(v) <= MAX_NAME_CHARS):
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


def plan(config: IngestConfig, layout: RunLayout) -> StageDir:
    """The stage directory for this config and this file's content; no work, nothing written (it reads the file)."""
    path = source_path(config)
    extra = {"source_name": path.name, "source_sha256": input_digest(path)}
    return stage_dir(layout, STAGE, config, [], CODE_VERSION, extra=extra)


def splits_present(config: IngestConfig, layout: RunLayout) -> set[str]:
    """The splits this source gives rows to: from the finished stage's captions.parquet, else by reading the file
    (nothing is written: `pcm run` checks before any stage works that evaluate will find images)."""
    sd = plan(config, layout)
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


def read_source(config: IngestConfig, bar: bool = True) -> tuple[str, Rows]:
    """The detected format and the input captions of `config.source`, in file order; `bar`: a terminal
    progress bar while reading (none for a check before the run)."""
    columns = Columns(text=config.text_column, image_id=config.image_id_column, split=config.split_column,
                      image_path=config.image_path_column)
    return read_captions(source_path(config), config.format, prefix=dataset_name(config), keep=config.splits,
                         default_split=config.default_split, columns=columns, bar=bar)


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
    if not valid_utf8(raw):
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


def build_columns(rows: Rows, config: IngestConfig, source: str) -> tuple[dict[str, list], dict[str, int]]:
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


def run_ingest(config: IngestConfig, layout: RunLayout, *, force: bool = False,
               progress: ProgressFn | None = None) -> StageResult:
    """Read `config.source`, check every caption and write captions.parquet; reuse a finished run."""
    started = time.monotonic()
    sd = plan(config, layout)
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
