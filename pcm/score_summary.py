"""What the synthetic pairs' CLIP scores say before training: their distribution and the CXE weights they give.

The encode stage records both in its result, so a run whose scores would give most captions CXE weight
0 is seen before train starts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pcm.loss import cxe_weights_np
from pcm.pictures import score_histogram

log = logging.getLogger(__name__)

# CXE weights min(1, w * cos), cos <= 0 -> 0 (pcm.loss.clip_weights), summarised at the presets' w: the toy
# world's 1.8, the release's ViT-B/32 2.5, the paper's 4 (ViT-L/14, the train stage's default).
CXE_REFERENCE_W = (1.8, 2.5, 4.0)
SCORE_QUANTILES = {"q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75, "q95": 0.95}


def clip_score_stats(scores: np.ndarray) -> dict[str, Any]:
    """Distribution of the ok samples' CLIP scores: count, min, quantiles, max, mean, share <= 0 (CXE weight 0)."""
    n = int(len(scores))
    if not n:
        return {"n": 0}
    s = scores.astype(np.float64)
    out: dict[str, Any] = {"n": n, "min": round(float(s.min()), 4)}
    out |= {k: round(float(np.quantile(s, q)), 4) for k, q in SCORE_QUANTILES.items()}
    out |= {"max": round(float(s.max()), 4), "mean": round(float(s.mean()), 4),
            "fraction_le_0": round(float((s <= 0).mean()), 4)}
    return out


def cxe_weight_stats(scores: np.ndarray, w: float) -> dict[str, Any]:
    """The CXE weights `min(1, w * cos)` (cos <= 0 -> 0) these scores give at `w`: mean, share at 0, share at the cap 1."""
    if not len(scores):
        return {"w": w, "n": 0}
    weights = cxe_weights_np(scores, w)
    return {"w": w, "n": int(len(weights)), "mean": round(float(weights.mean()), 4),
            "fraction_zero": round(float((weights <= 0).mean()), 4),
            "fraction_cap": round(float((weights >= 1).mean()), 4)}


def summarise_scores(ok_scores: np.ndarray, picture: Path, clip_label: str) -> dict[str, Any]:
    """What the encode stage records of its ok pairs' CLIP scores: their mean and quantiles, the CXE weights at
    the reference w's, and a histogram with those caps marked (drawn to `picture`); warns when half or more of
    the pairs score <= 0 (CXE would give their captions weight 0)."""
    caps = {"paper ViT-L/14": 4.0, "release ViT-B/32": 2.5}
    if len(ok_scores) and float(np.median(ok_scores)) > 0:
        caps["auto (1 / median)"] = 1 / float(np.median(ok_scores))
    score_histogram(picture, ok_scores, f"CLIP scores, {clip_label} ({len(ok_scores)} images)", caps)
    stats = clip_score_stats(ok_scores)
    if len(ok_scores) and (share := stats["fraction_le_0"]) >= 0.5:
        log.warning("encode: %.0f%% of the synthetic (image, caption) pairs have a CLIP score <= 0, so CXE gives "
                    "their captions weight 0 and training learns mostly from the rest (clip_score_stats)",
                    100 * share)
    return {"clip_score_mean": round(float(ok_scores.mean()), 4) if len(ok_scores) else None,
            "clip_score_stats": stats, "cxe_weights": [cxe_weight_stats(ok_scores, w) for w in CXE_REFERENCE_W]}
