"""Finished stage directories built by hand, for tests that need a stage's outputs but not its work.

Everything is written through the storage layer (RunLayout, tables, write_arrays) and the stage
marker comes last, as `pcm.stages.stage.finish` writes it, so the stages downstream read these
directories like real ones. The fingerprints are fixed strings ("c" * 16 ...): one directory of a
stage per run root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pcm.stages.stage import finish
from storage import tables
from storage.arrays import write_arrays
from storage.layout import RunLayout, StageDir


def caption_row(caption_id: str, text: str = "a dog", **fields: Any) -> dict[str, Any]:
    """One ok train row of captions.parquet (tables.CAPTIONS); `fields` override any column."""
    return {"caption_id": caption_id, "image_id": "i", "split": "train", "text": text, "raw_text": text,
            "source": "t", "image_path": None, "references": [], "status": "ok", "error": None, **fields}


def new_stage(root: str | Path, stage: str, fingerprint: str) -> StageDir:
    """An empty (unfinished) stage directory under the run root `root`."""
    sd = RunLayout(root).stage(stage, fingerprint)
    sd.path.mkdir(parents=True, exist_ok=True)
    return sd


def finished_stage(root: str | Path, stage: str, fingerprint: str, counts: dict[str, int] | None = None) -> str:
    """A finished stage directory with no outputs (a synthesize stage with no synthetic shards, say)."""
    sd = new_stage(root, stage, fingerprint)
    finish(sd, counts or {}, 0.0)
    return str(sd.path)


def ingest_stage(root: str | Path, captions: pa.Table | list[dict[str, Any]], fingerprint: str = "c" * 16) -> str:
    """A finished ingest stage holding `captions` as captions.parquet: row dicts are checked against
    tables.CAPTIONS, a pyarrow table is written as it is (whatever its schema); returns its path."""
    sd = new_stage(root, "ingest", fingerprint)
    if isinstance(captions, pa.Table):
        pq.write_table(captions, sd.file("captions.parquet"))
        rows = captions.num_rows
    else:
        rows = tables.write(sd.file("captions.parquet"), captions, tables.CAPTIONS).num_rows
    finish(sd, {"rows": rows}, 0.0)
    return str(sd.path)


def feature_stage(root: str | Path, fingerprint: str = "e" * 16, keys: tuple[str, ...] = ("a", "b"),
                  seed: int = 0) -> StageDir:
    """An encode-like stage directory (no marker): one feature shard and one real-image shard of
    len(keys) rows (global 8-d, patches 4 x 12, float16) and the CLIP head (12 -> 8)."""
    sd = new_stage(root, "encode", fingerprint)
    rng = np.random.default_rng(seed)
    for kind in ("features", "real"):
        write_arrays(sd.shard_file(kind, 0, "safetensors"),
                     {"global": rng.standard_normal((len(keys), 8)).astype(np.float16),
                      "patches": rng.standard_normal((len(keys), 4, 12)).astype(np.float16)},
                     {"keys": json.dumps(list(keys))})
    write_arrays(sd.file("clip_head.safetensors"), {"ln_post.weight": np.ones(12, np.float32),
                                                    "ln_post.bias": np.zeros(12, np.float32),
                                                    "proj": np.ones((12, 8), np.float32)}, {"ln_eps": "1e-5"})
    return sd
