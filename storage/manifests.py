"""Named manifests: each Parquet file of a stage directory declared once, its name with its schema.

    manifests.CAPTIONS.read(sd)            # <stage dir>/captions.parquet, checked against tables.CAPTIONS
    manifests.SCORES.write(sd, rows)
Stages never spell a manifest's file name or pair it with a schema by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from storage import shards, tables
from storage.layout import StageDir


@dataclass(frozen=True)
class Manifest:
    """One Parquet file of a stage directory: its name and the schema it is written and read with."""

    name: str
    schema: pa.Schema

    def path(self, sd: StageDir) -> Path:
        return sd.file(self.name)

    def exists(self, sd: StageDir) -> bool:
        return self.path(sd).exists()

    def read(self, sd: StageDir, columns: list[str] | None = None) -> pa.Table:
        return tables.read(self.path(sd), self.schema, columns=columns)

    def write(self, sd: StageDir, data: pa.Table | Iterable[Mapping[str, Any]] | Mapping[str, list]) -> pa.Table:
        return tables.write(self.path(sd), data, self.schema)


CAPTIONS = Manifest("captions.parquet", tables.CAPTIONS)      # ingest: one row per input caption
SAMPLES = Manifest("samples.parquet", tables.SAMPLES)         # synthesize: every shard's status rows
SCORES = Manifest("scores.parquet", tables.SCORES)            # encode: one row per synthetic sample
REAL = Manifest("real.parquet", tables.REAL_IMAGES)           # encode: one row per real val/test image
CONCEPTS = Manifest("concepts.parquet", tables.CONCEPTS)      # encode: the concept vocabulary
PAIRS = Manifest("pairs.parquet", tables.PAIRS)               # refine: caption -> the synthetic image it trains on
PER_IMAGE = Manifest("per_image.parquet", tables.PER_IMAGE)   # evaluate: one row per evaluated image


@dataclass(frozen=True)
class ShardManifest:
    """The per-shard status table of one shard kind (merged into a stage manifest at the end)."""

    kind: str
    suffix: str
    schema: pa.Schema

    def path(self, sd: StageDir, index: int) -> Path:
        return sd.shard_file(self.kind, index, self.suffix)

    def read(self, sd: StageDir, index: int) -> pa.Table:
        shards.fetch_file(self.path(sd, index))  # an object-store root: another worker's shard, fetched
        return tables.read(self.path(sd, index), self.schema)

    def write(self, sd: StageDir, index: int, data: pa.Table | Iterable[Mapping[str, Any]] | Mapping[str, list]) -> pa.Table:
        return tables.write(self.path(sd, index), data, self.schema)

    def concat(self, sd: StageDir, indices: Iterable[int]) -> pa.Table:
        paths = [self.path(sd, i) for i in indices]
        for p in paths:
            shards.fetch_file(p)  # an object-store root: the status tables of other workers' shards
        return tables.concat(paths, self.schema)


SHARD_SAMPLES = ShardManifest("shards", "status.parquet", tables.SAMPLES)      # synthesize, per image shard
SHARD_SCORES = ShardManifest("features", "scores.parquet", tables.SCORES)      # encode, per feature shard
SHARD_REAL = ShardManifest("real", "status.parquet", tables.REAL_IMAGES)       # encode, per real-image shard
