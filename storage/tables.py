"""Parquet manifests: every schema declared once here, checked on write and on read."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage import atomic

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_REJECTED = "rejected"
STATUS_KEPT = "kept"          # refine: the pair trains
STATUS_DROPPED = "dropped"    # refine: the caption does not train (reason says why)

# ingest: one row per input caption (rejected rows kept with a reason).
CAPTIONS = pa.schema([
    ("caption_id", pa.string()),        # stable, safe as a file name and WebDataset key
    ("image_id", pa.string()),
    ("split", pa.string()),             # train / val / test
    ("text", pa.string()),              # normalised (whitespace collapsed); "" when rejected
    ("raw_text", pa.string()),          # as read
    ("source", pa.string()),            # e.g. "karpathy:dataset_coco.json"
    ("image_path", pa.string()),        # relative image path when the source names one (train rows too)
    ("references", pa.list_(pa.string())),  # all reference captions of the image (val/test)
    ("status", pa.string()),            # ok / rejected
    ("error", pa.string()),             # reason when rejected
])

# synthesize: one row per planned training caption.
SAMPLES = pa.schema([
    ("caption_id", pa.string()),
    ("shard", pa.int32()),
    ("seed", pa.int64()),               # the seed the image was rendered with
    ("rendered_from", pa.string()),     # null, or the caption whose image this one got (wrong_image_fraction)
    ("status", pa.string()),            # ok / failed
    ("error", pa.string()),
])

# encode: one row per synthetic sample.
SCORES = pa.schema([
    ("caption_id", pa.string()),
    ("shard", pa.int32()),
    ("row", pa.int32()),                # row in the shard's feature file (-1 when failed)
    ("clip_score", pa.float32()),       # raw cosine of CLIP image and caption embeddings
    ("text_embedding", pa.list_(pa.float32())),
    ("status", pa.string()),
    ("error", pa.string()),
])

# refine: one row per ok training caption of the ingest stage: the synthetic image it is now paired with.
PAIRS = pa.schema([
    ("caption_id", pa.string()),
    ("image_caption_id", pa.string()),  # whose synthetic image (the feature row's key); null when not scored
    ("shard", pa.int32()),              # that image's encode feature shard and row (-1 when not scored)
    ("row", pa.int32()),
    ("score", pa.float32()),            # what the pairs are ranked by (method's pair score); null when not scored
    ("clip_score", pa.float32()),       # raw cosine of the caption's and the paired image's CLIP embeddings (CXE)
    ("rank", pa.int32()),               # 1 = best score among the scored captions; null when not scored
    ("status", pa.string()),            # kept / dropped
    ("reason", pa.string()),            # why dropped; null when kept
])

# encode: one row per real val/test image.
REAL_IMAGES = pa.schema([
    ("image_id", pa.string()),
    ("split", pa.string()),
    ("image_path", pa.string()),
    ("shard", pa.int32()),
    ("row", pa.int32()),
    ("status", pa.string()),
    ("error", pa.string()),
])

# encode: the concept vocabulary.
CONCEPTS = pa.schema([
    ("concept", pa.string()),
    ("count", pa.int64()),
    ("embedding", pa.list_(pa.float32())),  # L2-normalised CLIP text embedding of "A photo of {c}."
    ("model", pa.string()),
])

# evaluate: one row per evaluated image.
PER_IMAGE = pa.schema([
    ("image_id", pa.string()),
    ("caption", pa.string()),
    ("references", pa.list_(pa.string())),
    ("bleu4", pa.float64()),
    ("meteor", pa.float64()),
    ("rouge_l", pa.float64()),
    ("cider", pa.float64()),
    ("spice", pa.float64()),
])


class SchemaError(ValueError):
    """A table does not match its declared schema."""


def _check(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    got = {f.name: f.type for f in table.schema}
    want = {f.name: f.type for f in schema}
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    wrong = [f"{n}: {got[n]} (expected {want[n]})" for n in want if n in got and not got[n].equals(want[n])]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if extra:
            parts.append(f"unexpected columns {extra}")
        if wrong:
            parts.append("wrong types " + "; ".join(wrong))
        raise SchemaError(f"{where}: does not match the schema: " + ", ".join(parts))
    return table.select(schema.names)


def to_table(rows: Iterable[Mapping[str, Any]] | Mapping[str, list], schema: pa.Schema, where: str = "table") -> pa.Table:
    """Build a table of `schema` from row dicts or a column dict; a wrong value names its column."""
    if isinstance(rows, Mapping):
        columns = rows
    else:
        rows = list(rows)
        columns = {name: [r.get(name) for r in rows] for name in schema.names}
        extra = {k for r in rows for k in r} - set(schema.names)
        if extra:
            raise SchemaError(f"{where}: unexpected columns {sorted(extra)}")
    arrays = []
    for f in schema:
        if f.name not in columns:
            raise SchemaError(f"{where}: missing column {f.name!r}")
        values = columns[f.name]
        if pa.types.is_list(f.type) and not isinstance(values, (pa.Array, pa.ChunkedArray)):
            for i, v in enumerate(values):
                if v is not None and isinstance(v, (str, bytes)):
                    raise SchemaError(f"{where}: column {f.name!r} row {i}: expected a list, got {type(v).__name__}")
        try:
            arrays.append(pa.array(values, type=f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            raise SchemaError(f"{where}: column {f.name!r} ({f.type}): {e}") from None
    return pa.Table.from_arrays(arrays, schema=schema)


def write(path: str | os.PathLike, data: pa.Table | Iterable[Mapping[str, Any]] | Mapping[str, list],
          schema: pa.Schema) -> pa.Table:
    """Check `data` against `schema` and write it atomically as Parquet."""
    path = Path(path)
    table = data if isinstance(data, pa.Table) else to_table(data, schema, str(path))
    table = _check(table, schema, str(path))
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return table


def read(path: str | os.PathLike, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file and check it against `schema`; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; run the stage that writes it first")
    try:
        _check(pq.read_schema(path).empty_table(), schema, str(path))  # the whole schema, from the footer
        return pq.read_table(path, columns=columns or schema.names)     # only the columns asked for
    except (pa.ArrowInvalid, OSError) as e:
        raise SchemaError(f"{path}: not a readable Parquet file ({e})") from None


def ok_rows(rows: Iterable[Mapping[str, Any]], split: str | None = None) -> list[Mapping[str, Any]]:
    """The rows with status ok (of one split when given), in order: the filter every reader of a manifest needs."""
    return [r for r in rows if r["status"] == STATUS_OK and (split is None or r["split"] == split)]


def concat(paths: Iterable[str | os.PathLike], schema: pa.Schema) -> pa.Table:
    """Read and concatenate several files of one schema (empty table when none)."""
    tables = [read(p, schema) for p in paths]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def failure_reasons(rows: list[dict], shown: int = 3) -> str:
    """The distinct reasons of failed status rows (their error, else their status), the first `shown` of them."""
    reasons = list(dict.fromkeys(r["error"] or r["status"] for r in rows))
    return "; ".join(reasons[:shown]) + (f"; ... ({len(reasons) - shown} more)" if len(reasons) > shown else "")
