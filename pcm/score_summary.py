"""What the synthetic pairs' CLIP scores say before training: their distribution and the CXE weights they give.

The encode stage records both in its result, so a run whose scores would give most captions CXE weight
0 is seen before train starts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pcm.loss import cxe_weights_np

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
