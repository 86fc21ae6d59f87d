"""Ingest stage: read caption files (Karpathy, COCO, .txt, .jsonl, .csv) into one checked captions table."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from pcm.caption_checks import check_captions
from pcm.caption_files import MAX_NAME_CHARS, SAFE_NAME, SPLITS, Columns, Rows, read_captions
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
        columns, counts = check_captions(rows, f"{fmt}:{source_path(config).name}", max_chars=config.max_chars,
                                         dedup=config.dedup, subset=config.subset, fraction=config.fraction,
                                         seed=config.seed)
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
