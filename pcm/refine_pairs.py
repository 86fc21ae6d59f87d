"""The refine stage's pairs: the encoded pairs read from an ingest and an encode stage, each caption's image
and scores by the chosen method, pairs.parquet's rows, and the pairs picture.

pcm.refine holds the rules on plain arrays; this module reads them from the stage directories it is given
and turns their results into rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pcm.dataset import FeatureStore
from pcm.pictures import pair_grid
from pcm.refine import Progress, keep_top, pair_cosines, sync, unit_rows
from storage import manifests, tables
from storage.layout import StageDir
from storage.shards import ShardError, image_member, iter_tar

log = logging.getLogger(__name__)

GRID_ROWS = 8  # captions shown in pictures/pairs.png


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


def load_embeddings(cap: StageDir, enc: StageDir) -> Embeddings:
    """Caption embeddings (scores.parquet) and image global features (feature shards) of the ok pairs of an
    ingest stage `cap` and an encode stage `enc`.

    The stored global feature is encode's normalised proj(ln_post(CLS)), the vector its CLIP score is the
    cosine of with the caption embedding (pcm.clip.encode_images), kept in float16: renormalised here.
    """
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


def pair_images(data: Embeddings, method: str, *, k: int, i2t_k: int, block: int, device: str,
                progress: Progress | None = None) -> tuple[np.ndarray, ...]:
    """(image index [n], pair score [n], CLIP score of the pair [n]) of every encoded caption, by `method`
    (`sync`: pcm.refine.sync with k, i2t_k, block on `device`; `clip-filter`: each caption's own image).

    A caption left with its own image keeps encode's CLIP score; a re-assigned one gets the cosine of its
    embedding and the new image's stored (float16) feature.
    """
    n = len(data.caption_ids)
    if method == "clip-filter":
        return np.arange(n), data.clip_score, data.clip_score
    image, score = sync(data.text, data.images, k, i2t_k, block, device, progress)
    own = image == np.arange(n)
    clip = np.where(own, data.clip_score, pair_cosines(data.text, data.images, image))
    return image, score.astype(np.float32), clip.astype(np.float32)


def pairs_rows(data: Embeddings, image: np.ndarray, score: np.ndarray, clip: np.ndarray,
               keep_fraction: float) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, Any]]:
    """pairs.parquet's rows (every training caption, by caption id), the counts and the summary numbers: the top
    `keep_fraction` of the scored pairs by `score` kept."""
    rank, kept = keep_top(score, keep_fraction)
    if not kept.any():
        raise ValueError(f"refine.keep_fraction={keep_fraction} keeps none of the {len(score)} pairs "
                         f"(floor(tau * n) = 0); raise keep_fraction")
    threshold = float(score[kept].min())
    by_id: dict[str, dict[str, Any]] = {}
    for i, cid in enumerate(data.caption_ids):
        j = int(image[i])
        by_id[cid] = {"caption_id": cid, "image_caption_id": data.caption_ids[j], "shard": int(data.shard[j]),
                      "row": int(data.row[j]), "score": float(score[i]), "clip_score": float(clip[i]),
                      "rank": int(rank[i]), "status": tables.STATUS_KEPT if kept[i] else tables.STATUS_DROPPED,
                      "reason": None if kept[i] else
                      f"score {score[i]:.4f} below the top {keep_fraction:g} by score (>= {threshold:.4f})"}
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


def shard_images(synth: StageDir, shards: list[int], wanted: set[str]) -> Iterator[tuple[str, bytes | None]]:
    """(caption id, image bytes or None when the sample has none) of the `wanted` caption ids in these image
    shards of a synthesize stage, as they are read (a reader stopped by a bad shard keeps what came before)."""
    for s in shards:
        for sample in iter_tar(synth.image_shard(s)):
            if sample["__key__"] in wanted:
                member = image_member(sample)
                yield sample["__key__"], sample[member] if member else None


def pairs_picture(data: Embeddings, rows: list[dict[str, Any]], synth: StageDir | None, out: Path,
                  n_rows: int = GRID_ROWS) -> str | None:
    """`out` (pictures/pairs.png): the `n_rows` best-ranked re-assigned captions with their own and their new
    image, from the synthesize stage `synth`'s shards (gray when there is none or they cannot be read);
    None when no caption moved."""
    moved = sorted((r for r in rows if r["status"] == tables.STATUS_KEPT and r["image_caption_id"] != r["caption_id"]),
                   key=lambda r: r["rank"])[:n_rows]
    if not moved:
        return None
    where = {cid: int(s) for cid, s in zip(data.caption_ids, data.shard, strict=True)}
    wanted = {k for r in moved for k in (r["caption_id"], r["image_caption_id"])}
    found: dict[str, bytes | None] = {}
    if synth is not None:
        try:
            for key, image in shard_images(synth, sorted({where[k] for k in wanted}), wanted):
                found[key] = image
        except (OSError, ShardError) as e:
            log.warning("%s: the pairs picture shows no images, the synthetic images cannot be read (%s)", out, e)
    lines = [(data.texts[r["caption_id"]], found.get(r["caption_id"]), found.get(r["image_caption_id"]),
              f"rank {r['rank']}, score {r['score']:.3f}, CLIP {r['clip_score']:.3f}") for r in moved]
    return str(pair_grid(lines, out))
