"""The refine stage (optional): which synthetic image each training caption trains on, and which pairs train.

`sync` (SynC, docs/refine.md): each caption takes the best of its k nearest synthetic images by
cycle consistency, then the top `keep_fraction` of pairs by that score are kept. `clip-filter`: the
original pairs, the top `keep_fraction` by CLIP score. Both work on the encode stage's stored
embeddings (caption text embeddings from scores.parquet, image global features from the feature
shards); the output is pairs.parquet, one row per training caption, which the train stage reads
when it is given this stage. The pipeline runs it only with `refine.enabled = true`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from pcm.config import StageConfig
from pcm.device import resolve_device
from pcm.pictures import pair_grid
from pcm.refine import keep_top, pair_cosines, sync, unit_rows
from pcm.stages.contract import ProgressFn, cached, check_stages, drop_marker, finish, locked, stage_dir
from storage import atomic, manifests, tables
from storage.layout import RunLayout, StageDir
from storage.result import StageResult
from storage.shards import ShardError, iter_tar

log = logging.getLogger(__name__)

CODE_VERSION = "1"
GRID_ROWS = 8  # captions shown in pictures/pairs.png


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
        data = load_embeddings(captions, encode)
        load_s = time.monotonic() - t0
        t0 = time.monotonic()
        image, score, clip = pair_images(config, data, progress)
        score_s = time.monotonic() - t0
        rows, counts, extra = pairs_rows(config, data, image, score, clip)
        manifests.PAIRS.write(sd, rows)
        picture = pairs_picture(sd, encode, data, rows)
        extra |= {"method": config.method, "keep_fraction": config.keep_fraction, "encode": encode.fingerprint,
                  "pictures": {"pairs": str(picture)} if picture else {}}
        if progress:
            progress(1, 1, "pairs written")
        return finish(sd, counts, started, extra,
                      timings={"load_s": round(load_s, 3), "score_s": round(score_s, 3)})


# ---------------------------------------------------------------------- the work
@dataclass
class Embeddings:
    """The encoded training pairs, sorted by caption id: row i is caption i and its own synthetic image."""

    caption_ids: list[str]
    shard: np.ndarray        # [n] the image's feature shard and row
    row: np.ndarray
    clip_score: np.ndarray   # [n] encode's CLIP score of the own pair
    text: np.ndarray         # [n, D] unit caption embeddings
    images: np.ndarray       # [n, D] unit image embeddings
    unscored: dict[str, str]  # training caption id -> why it has no encoded pair
    texts: dict[str, str]     # training caption id -> text (for the picture)


def load_embeddings(captions: StageResult, encode: StageResult) -> Embeddings:
    """Caption embeddings (scores.parquet) and image global features (feature shards) of the ok pairs.

    The stored global feature is encode's normalised proj(ln_post(CLS)), the vector its CLIP score is the
    cosine of with the caption embedding (pcm.clip.encode_images), kept in float16: renormalised here.
    """
    from pcm.dataset import FeatureStore

    cap, enc = captions.stage_dir, encode.stage_dir
    texts = {r["caption_id"]: r["text"] for r in tables.ok_rows(
        manifests.CAPTIONS.read(cap, columns=["caption_id", "split", "text", "status"]).to_pylist(), "train")}
    meta = manifests.SCORES.read(enc, columns=["caption_id", "shard", "row", "clip_score", "status", "error"])
    meta_rows = meta.to_pylist()
    ok = [i for i, r in enumerate(meta_rows) if r["status"] == tables.STATUS_OK]
    unknown = [meta_rows[i]["caption_id"] for i in ok if meta_rows[i]["caption_id"] not in texts]
    if unknown:
        raise ValueError(f"{manifests.SCORES.path(enc)}: {len(unknown)} caption ids (first {unknown[0]!r}) are not ok "
                         f"training captions of {manifests.CAPTIONS.path(cap)}; were both stages run on the same data?")
    if not ok:
        raise ValueError(f"{manifests.SCORES.path(enc)}: no rows with status ok; nothing to refine")
    ok.sort(key=lambda i: meta_rows[i]["caption_id"])
    emb = manifests.SCORES.read(enc, columns=["text_embedding"]).column("text_embedding").combine_chunks()
    emb = emb.take(ok)
    dim = len(emb[0].values)
    flat = emb.flatten().to_numpy(zero_copy_only=False)
    if flat.size != len(ok) * dim:
        raise ValueError(f"{manifests.SCORES.path(enc)}: text_embedding rows differ in length (expected {dim} each); "
                         "rerun `pcm encode --force`")
    rows = [meta_rows[i] for i in ok]
    ids = [r["caption_id"] for r in rows]
    shard = np.array([r["shard"] for r in rows], dtype=np.int64)
    row = np.array([r["row"] for r in rows], dtype=np.int64)
    store = FeatureStore(enc, "features")
    store.check_rows(shard, row, ids)
    images = np.empty((len(ids), dim), dtype=np.float32)
    for s in np.unique(shard):
        sel = np.nonzero(shard == s)[0]
        g = store.shard(int(s))["global"]
        if g.shape[1] != dim:
            raise ValueError(f"{enc.feature_shard('features', int(s))}: global features are {g.shape[1]}-d but the "
                             f"caption embeddings are {dim}-d; rerun `pcm encode --force`")
        images[sel] = g[row[sel]]
    unscored = {r["caption_id"]: f"not encoded: {r['error'] or r['status']}" for r in meta_rows
                if r["status"] != tables.STATUS_OK and r["caption_id"] in texts}
    scored = set(ids)
    for cid in texts:
        if cid not in scored and cid not in unscored:
            unscored[cid] = "no synthetic image in the encode stage (not synthesized or not encoded)"
    return Embeddings(ids, shard, row, np.array([r["clip_score"] for r in rows], dtype=np.float32),
                      unit_rows(flat.reshape(len(ids), dim)), unit_rows(images), unscored, texts)


def pair_images(config: RefineConfig, data: Embeddings, progress: ProgressFn | None) -> tuple[np.ndarray, ...]:
    """(image index [n], pair score [n], CLIP score of the pair [n]) of every encoded caption.

    A caption left with its own image keeps encode's CLIP score; a re-assigned one gets the cosine of its
    embedding and the new image's stored (float16) feature.
    """
    n = len(data.caption_ids)
    if config.method == "clip-filter":
        return np.arange(n), data.clip_score, data.clip_score
    image, score = sync(data.text, data.images, config.k, config.i2t_k, config.block,
                              resolve_device(config.device), progress)
    own = image == np.arange(n)
    clip = np.where(own, data.clip_score, pair_cosines(data.text, data.images, image))
    return image, score.astype(np.float32), clip.astype(np.float32)


def pairs_rows(config: RefineConfig, data: Embeddings, image: np.ndarray, score: np.ndarray,
               clip: np.ndarray) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, Any]]:
    """pairs.parquet's rows (every training caption, by caption id), the counts and the summary numbers."""
    rank, kept = keep_top(score, config.keep_fraction)
    if not kept.any():
        raise ValueError(f"refine.keep_fraction={config.keep_fraction} keeps none of the {len(score)} pairs "
                         f"(floor(tau * n) = 0); raise keep_fraction")
    threshold = float(score[kept].min())
    by_id: dict[str, dict[str, Any]] = {}
    for i, cid in enumerate(data.caption_ids):
        j = int(image[i])
        by_id[cid] = {"caption_id": cid, "image_caption_id": data.caption_ids[j], "shard": int(data.shard[j]),
                      "row": int(data.row[j]), "score": float(score[i]), "clip_score": float(clip[i]),
                      "rank": int(rank[i]), "status": tables.STATUS_KEPT if kept[i] else tables.STATUS_DROPPED,
                      "reason": None if kept[i] else
                      f"score {score[i]:.4f} below the top {config.keep_fraction:g} by score (>= {threshold:.4f})"}
    for cid, why in data.unscored.items():
        by_id[cid] = {"caption_id": cid, "image_caption_id": None, "shard": -1, "row": -1, "score": None,
                      "clip_score": None, "rank": None, "status": tables.STATUS_DROPPED, "reason": why}
    rows = [by_id[c] for c in sorted(by_id)]
    moved = kept & (image != np.arange(len(image)))
    counts = {"captions": len(rows), "scored": len(score), "kept": int(kept.sum()),
              "dropped": len(rows) - int(kept.sum()), "reassigned": int(moved.sum()),
              "images_used": len(np.unique(image[kept]))}
    extra = {"score_threshold": round(threshold, 4),
             "clip_score_mean_before": round(float(data.clip_score.mean()), 4),
             "clip_score_mean_kept": round(float(clip[kept].mean()), 4)}
    return rows, counts, extra


def pairs_picture(sd: StageDir, encode: StageResult, data: Embeddings, rows: list[dict[str, Any]]) -> str | None:
    """pictures/pairs.png: the best-ranked re-assigned captions with their own and their new image, from the
    synthesize stage's shards (found through the encode stage's inputs; gray when they cannot be read);
    None when no caption moved."""
    moved = sorted((r for r in rows if r["status"] == tables.STATUS_KEPT and r["image_caption_id"] != r["caption_id"]),
                   key=lambda r: r["rank"])[:GRID_ROWS]
    if not moved:
        return None
    synth = encode.stage_dir.lineage("synthesize")
    where = {cid: int(s) for cid, s in zip(data.caption_ids, data.shard, strict=True)}
    wanted = {k for r in moved for k in (r["caption_id"], r["image_caption_id"])}
    found: dict[str, bytes] = {}
    try:
        for s in sorted({where[k] for k in wanted}) if synth else ():
            for sample in iter_tar(synth[0].image_shard(s)):
                if sample["__key__"] in wanted:
                    found[sample["__key__"]] = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample),
                                                    None)
    except (OSError, ShardError) as e:
        log.warning("%s: the pairs picture shows no images, the synthetic images cannot be read (%s)", sd.path, e)
    lines = [(data.texts[r["caption_id"]], found.get(r["caption_id"]), found.get(r["image_caption_id"]),
              f"rank {r['rank']}, score {r['score']:.3f}, CLIP {r['clip_score']:.3f}") for r in moved]
    return str(pair_grid(lines, sd.pairs_picture))
