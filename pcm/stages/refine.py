"""The refine stage (optional): which synthetic image each training caption trains on, and which pairs train.

`sync` (SynC, docs/refine.md): each caption takes the best of its k nearest synthetic images by
cycle consistency, then the top `keep_fraction` of pairs by that score are kept. `clip-filter`: the
original pairs, the top `keep_fraction` by CLIP score. Both work on the encode stage's stored
embeddings (caption text embeddings from scores.parquet, image global features from the feature
shards); the output is pairs.parquet, one row per training caption, which the train stage reads
when it is given this stage. The pipeline runs it only with `refine.enabled = true`.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import Field

from pcm.config import StageConfig
from pcm.device import resolve_device
from pcm.refine_pairs import load_embeddings, pair_images, pairs_picture, pairs_rows
from pcm.stages.contract import ProgressFn, cached, check_stages, drop_marker, finish, locked, stage_dir
from storage import atomic, manifests, tables
from storage.layout import RunLayout, StageDir
from storage.result import StageResult

CODE_VERSION = "1"


class RefineConfig(StageConfig):
    """Re-pairing (SynC) or CLIP-score filtering of the encode stage's (caption, synthetic image) pairs."""

    RUNTIME: ClassVar[frozenset[str]] = frozenset({"block", "device"})

    enabled: bool = Field(False, description="the pipeline (pcm run, synth-and-train) runs this stage and trains on "
                          "its pairs; `pcm refine` runs it whatever this says. Not fingerprinted")
    method: Literal["sync", "clip-filter"] = Field(
        "sync", description="sync = SynC re-assignment (k text->image candidates, cycle score, best per caption) "
        "then filtering; clip-filter = the original pairs, filtered by CLIP score")
    k: int = Field(15, ge=1, description="sync: candidate images per caption (text->image), the release's K")
    i2t_k: int = Field(2, ge=1, description="sync: captions each candidate image retrieves (image->text), the "
                       "release's i2tK")
    keep_fraction: float = Field(0.9, gt=0, le=1, description="tau: the top fraction of pairs by score that trains "
                                 "(floor(tau * n) pairs; the release builds 0.9)")
    block: int = Field(4096, ge=1, description="retrieval tile: block x block similarities at a time (memory "
                       "4 * block^2 bytes); results do not depend on it")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N: where the retrieval matmuls run")

    def content(self) -> dict[str, Any]:
        # `enabled` says whether the pipeline uses the stage, not what it writes; clip-filter uses no retrieval.
        out = super().content()
        out.pop("enabled", None)
        if out["method"] == "clip-filter":
            out.pop("k", None)
            out.pop("i2t_k", None)
        return out


# ---------------------------------------------------------------------- stage API
def plan(config: RefineConfig, captions: StageResult, encode: StageResult, layout: RunLayout) -> StageDir:
    """The refine stage directory of these inputs (the ingest and encode results); no work, nothing written."""
    check_stages(captions=(captions, "ingest"), encode=(encode, "encode"))
    return stage_dir(layout, "refine", config, [captions, encode], CODE_VERSION)


def verify(sd: StageDir) -> str | None:
    """None when pairs.parquet is there and readable, else what is wrong."""
    if not manifests.PAIRS.exists(sd):
        return f"{manifests.PAIRS.name} missing"
    try:
        manifests.PAIRS.read(sd, columns=["status"])
    except (tables.SchemaError, OSError) as e:
        return str(e)
    return None


def run_refine(config: RefineConfig, captions: StageResult, encode: StageResult, layout: RunLayout, *,
               force: bool = False, progress: ProgressFn | None = None) -> StageResult:
    """Score and filter the pairs under the stage lock; write pairs.parquet, the picture, then stage.done.json.

    One computation: a kill loses it (nothing partial is left under a final name) and a rerun redoes it.
    """
    sd = plan(config, captions, encode, layout)
    if not force and (done := cached(sd, verify)) is not None:
        return done
    with locked(sd):
        started = time.monotonic()
        drop_marker(sd, store=force)
        for path in (manifests.PAIRS.path(sd), sd.pairs_picture, sd.done_marker):
            atomic.remove_temporaries_of(path)  # what a killed run of this stage left
        t0 = time.monotonic()
        data = load_embeddings(captions.stage_dir, encode.stage_dir)
        load_s = time.monotonic() - t0
        t0 = time.monotonic()
        image, score, clip = pair_images(data, config.method, k=config.k, i2t_k=config.i2t_k, block=config.block,
                                         device=resolve_device(config.device), progress=progress)
        score_s = time.monotonic() - t0
        rows, counts, extra = pairs_rows(data, image, score, clip, config.keep_fraction)
        manifests.PAIRS.write(sd, rows)
        synth = encode.stage_dir.lineage("synthesize")  # the images the picture shows, found through encode's inputs
        picture = pairs_picture(data, rows, synth[0] if synth else None, sd.pairs_picture)
        extra |= {"method": config.method, "keep_fraction": config.keep_fraction, "encode": encode.fingerprint,
                  "pictures": {"pairs": str(picture)} if picture else {}}
        if progress:
            progress(1, 1, "pairs written")
        return finish(sd, counts, started, extra,
                      timings={"load_s": round(load_s, 3), "score_s": round(score_s, 3)})
