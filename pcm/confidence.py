"""How far to trust a caption: its CLIP score beside the training pairs', and whether the image is like the
training images at all.

Two signals, measured on the toy world (bench/caption_confidence.py, docs/evaluate.md "Confidence"):

- `clip_score`: the cosine of the image's CLIP embedding and the generated caption's text embedding, with its
  percentile among the training pairs' scores. Reported, but it does not decide the flag: under the toy CLIP,
  images of text score *higher* with their (wrong) toy captions than held-out toy drawings do with theirs.
- the out-of-distribution check (`in_domain`): the Mahalanobis distance of the image's mean-pooled patch tokens
  (the same tokens PCM-Net reads) from a Gaussian fitted to the training images' ones. It does not look at the
  caption. The global embedding was tried first and fails under the toy CLIP: its cosine to the nearest training
  image is higher for text images (median 0.97) than for held-out drawings (0.82).

The threshold is `MARGIN` times the 99th percentile of the distances of training images held out of the fit, so
it is calibrated per checkpoint from its own training images; MARGIN itself was chosen on the toy world.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

QUANTILES = np.linspace(0.0, 100.0, 101)  # percentiles stored for the score and distance distributions
MAX_IMAGES = 4096    # training images the Gaussian is fitted on (a seeded sample beyond that)
HOLDOUT = 0.2        # share of them held out of the fit to measure the distances of unseen in-domain images
SHRINKAGE = 1e-3     # ridge on the covariance, relative to its mean variance (the fit has few images per dim)
MARGIN = 1.25        # threshold = MARGIN x the held-out training images' 99th-percentile distance
MIN_IMAGES = 10      # fewer training images than this: no reference (the covariance would be meaningless)
VERSION = 1


@dataclass
class Reference:
    """What a checkpoint carries to judge new images: the training distribution, summarised."""

    score_quantiles: np.ndarray     # [101] the training pairs' CLIP scores at percentiles 0..100
    mean: np.ndarray                # [W] mean of the training images' pooled patch tokens
    precision: np.ndarray           # [W, W] inverse of their (shrunk) covariance
    distance_quantiles: np.ndarray  # [101] held-out training images' distances at percentiles 0..100
    threshold: float                # a larger distance: the image is unlike the training images
    info: dict[str, Any]            # pairs, images, held_out, margin, shrinkage (for the record)

    def to_record(self) -> dict[str, Any]:
        """The JSON half (the arrays go to safetensors: see `arrays`)."""
        return {"version": VERSION, "signal": "mahalanobis distance of mean-pooled patch tokens",
                "clip_score_quantiles": [round(float(v), 6) for v in self.score_quantiles],
                "distance_quantiles": [round(float(v), 6) for v in self.distance_quantiles],
                "threshold": float(self.threshold), **self.info}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean.astype(np.float32), "precision": self.precision.astype(np.float32)}

    @classmethod
    def from_parts(cls, record: dict[str, Any], arrays: dict[str, np.ndarray], where: str) -> Reference:
        """The inverse of to_record/arrays; anything missing or misshapen is one error naming `where`."""
        try:
            if record.get("version") != VERSION:
                raise ValueError(f"version {record.get('version')!r}, this code reads {VERSION}")
            mean, precision = np.asarray(arrays["mean"], np.float64), np.asarray(arrays["precision"], np.float64)
            if mean.ndim != 1 or precision.shape != (mean.size, mean.size):
                raise ValueError(f"mean {list(mean.shape)} and precision {list(precision.shape)} do not fit")
            scores = np.asarray(record["clip_score_quantiles"], np.float64)
            dists = np.asarray(record["distance_quantiles"], np.float64)
            if scores.shape != QUANTILES.shape or dists.shape != QUANTILES.shape:
                raise ValueError(f"expected {QUANTILES.size} quantiles")
            info = {k: record[k] for k in ("pairs", "images", "held_out", "margin", "shrinkage") if k in record}
            return cls(scores, mean, precision, dists, float(record["threshold"]), info)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: unreadable confidence reference ({type(e).__name__}: {e}); "
                             "retrain, or delete the reference files to caption without confidence") from None


def fit_gaussian(x: np.ndarray, shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """(mean, precision) of rows `x` [n, W]; the covariance gets `shrinkage` x its mean variance on the diagonal."""
    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False).reshape(x.shape[1], x.shape[1])
    cov += shrinkage * max(np.trace(cov) / x.shape[1], 1e-12) * np.eye(x.shape[1])
    return mean, np.linalg.inv(cov)


def distances(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each row of `x` [n, W]."""
    d = np.asarray(x, np.float64) - mean
    return np.sqrt(np.maximum(np.einsum("nw,wv,nv->n", d, precision, d), 0.0))


def build_reference(scores: np.ndarray, pooled: np.ndarray, seed: int = 0, margin: float = MARGIN) -> Reference | None:
    """The reference of a training set: its pairs' CLIP `scores` and its images' mean-pooled patch tokens
    `pooled` [n, W] (one row per distinct image). None when there are fewer than MIN_IMAGES images.

    The threshold comes from images held out of a first fit (a fit's own images look closer than new ones);
    the stored Gaussian is then fitted on all of them.
    """
    pooled = np.asarray(pooled, np.float64)
    scores = np.asarray(scores, np.float64)
    scores = scores[np.isfinite(scores)]
    if len(pooled) < MIN_IMAGES or not len(scores):
        return None
    order = np.random.default_rng(seed).permutation(len(pooled))
    n_held = max(2, int(round(HOLDOUT * len(pooled))))
    held, fit = pooled[order[:n_held]], pooled[order[n_held:]]
    held_d = distances(held, *fit_gaussian(fit))
    mean, precision = fit_gaussian(pooled)
    threshold = margin * float(np.percentile(held_d, 99))
    info = {"pairs": int(len(scores)), "images": int(len(pooled)), "held_out": int(n_held), "margin": margin,
            "shrinkage": SHRINKAGE}
    return Reference(np.percentile(scores, QUANTILES), mean, precision, np.percentile(held_d, QUANTILES),
                     threshold, info)


def sample_images(shard: np.ndarray, row: np.ndarray, seed: int = 0, limit: int = MAX_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (shard, row) images of the pairs, a seeded sample of `limit` when there are more."""
    pairs = np.unique(np.stack([np.asarray(shard, np.int64), np.asarray(row, np.int64)], 1), axis=0)
    if len(pairs) > limit:
        pairs = pairs[np.sort(np.random.default_rng(seed).permutation(len(pairs))[:limit])]
    return pairs[:, 0], pairs[:, 1]


def pooled_features(store: Any, shard: np.ndarray, row: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Mean-pooled patch tokens [n, W] (float32) of the (shard, row) images of a FeatureStore, `chunk` at a time
    (a real run's patches are large: 4096 ViT-B/16 images hold 1.2 GB of them)."""
    out = [store.gather(shard[i:i + chunk], row[i:i + chunk])[1].float().mean(1).numpy()
           for i in range(0, len(shard), chunk)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def training_reference(clip_scores: np.ndarray, shard: np.ndarray, row: np.ndarray, store: Any, seed: int,
                       margin: float = MARGIN) -> Reference | None:
    """The reference of training pairs: their CLIP scores and their (sampled) images' pooled patch tokens from the
    FeatureStore `store`; None (and a warning) with too few distinct images."""
    shard, row = sample_images(shard, row, seed)
    reference = build_reference(clip_scores, pooled_features(store, shard, row), seed, margin)
    if reference is None:
        log.warning("only %d distinct training images: checkpoints carry no confidence reference (needs %d)",
                    len(shard), MIN_IMAGES)
    return reference


def percentile(quantiles: np.ndarray, value: float) -> float:
    """Where `value` falls among the distribution whose percentiles 0..100 are `quantiles` (0 to 100)."""
    q = np.maximum.accumulate(np.asarray(quantiles, np.float64))  # np.interp needs them non-decreasing
    lo = np.searchsorted(q, value, side="left")                    # ties: the middle of the tied run
    hi = np.searchsorted(q, value, side="right")
    if hi == 0:
        return 0.0
    if lo >= len(q):
        return 100.0
    if hi > lo:
        return float((QUANTILES[lo] + QUANTILES[hi - 1]) / 2)
    return float(np.interp(value, q, QUANTILES))


UNAVAILABLE = ("unavailable (checkpoint made before confidence statistics were saved with checkpoints; "
               "retrain to get score_percentile and in_domain)")


def assess(reference: Reference | None, clip_scores: np.ndarray, pooled: np.ndarray) -> list[dict[str, Any]]:
    """Per image: clip_score, and with a reference score_percentile, distance, in_domain (+ reason when False);
    without one in_domain is None and `confidence` says why."""
    rows: list[dict[str, Any]] = []
    dist = distances(pooled, reference.mean, reference.precision) if reference is not None else None
    for i, score in enumerate(np.asarray(clip_scores, np.float64)):
        row: dict[str, Any] = {"clip_score": round(float(score), 4)}
        if reference is None:
            row.update({"in_domain": None, "confidence": UNAVAILABLE})
        else:
            d = float(dist[i])
            row.update({"score_percentile": round(percentile(reference.score_quantiles, score), 1),
                        "distance": round(d, 3), "in_domain": d <= reference.threshold})
            if d > reference.threshold:
                row["reason"] = (f"image unlike the training images: distance {d:.1f} > threshold "
                                 f"{reference.threshold:.1f} (the caption is likely wrong)")
        rows.append(row)
    return rows
