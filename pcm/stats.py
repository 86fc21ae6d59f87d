"""Experiment statistics for seeds x test images: a two-level bootstrap of means and paired differences.

A run's score is the mean of its per-image scores (COCO's CIDEr-D is), so an arm trained with S seeds
and scored on I images is an S x I matrix. Its uncertainty has two sources, the training seed and the
choice of test images; resampling both together (seeds with replacement, then images with
replacement, the same draws for every arm) gives intervals for each arm's mean and, paired by seed
index and image, for each difference to a reference arm. The idf of CIDEr-D stays the full test set's:
the images' scores are resampled, not recomputed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# 80% power at two-sided alpha 0.05: an effect of (z_0.975 + z_0.8) standard errors is found 4 times in 5.
DETECTABLE_SE = 1.959964 + 0.841621


def bootstrap_arms(scores: dict[str, np.ndarray], reference: str | Mapping[str, str] | None = None, *,
                   n: int = 2000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per arm of `scores` (arm -> [seeds, images] array, images in the same order for every arm): mean over
    seeds of the per-seed mean, sd over seeds, a 95% percentile interval; and, against its reference arm
    (`reference`: one arm for all, or arm -> its reference) when that has at least as many seeds, `vs`: the mean
    paired difference, its interval, standard error, the smallest effect detectable at 80% power (`detectable`),
    and whether the interval excludes 0."""
    rng = np.random.default_rng(seed)
    shapes = {a.shape[1] for a in scores.values()}
    if len(shapes) != 1:
        raise ValueError(f"every arm must be scored on the same images; got image counts {sorted(shapes)}")
    refs = reference if isinstance(reference, Mapping) else {a: reference for a in scores if a != reference}
    out: dict[str, dict[str, Any]] = {}
    for arm, m in scores.items():
        seeds, images = m.shape
        ref_arm = refs.get(arm) if reference is not None else None
        ref = scores.get(ref_arm) if ref_arm is not None else None
        paired = ref is not None and ref.shape[0] >= seeds
        boot, diff = np.empty(n), np.empty(n)
        for b in range(n):
            s_idx, i_idx = rng.integers(0, seeds, seeds), rng.integers(0, images, images)
            boot[b] = m[np.ix_(s_idx, i_idx)].mean()
            if paired:  # the same seeds (by index) and the same images for both arms
                diff[b] = boot[b] - ref[np.ix_(s_idx, i_idx)].mean()
        per_seed = m.mean(axis=1)
        row: dict[str, Any] = {
            "seeds": seeds, "per_seed": per_seed.tolist(), "mean": float(per_seed.mean()),
            "sd": float(per_seed.std(ddof=1)) if seeds > 1 else float("nan"),
            "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]}
        if paired:
            d = per_seed - ref[:seeds].mean(axis=1)
            lo, hi = float(np.quantile(diff, 0.025)), float(np.quantile(diff, 0.975))
            se = float(diff.std(ddof=1))
            row["vs"] = {"reference": ref_arm, "mean": float(d.mean()), "per_seed": d.tolist(), "ci95": [lo, hi],
                         "se": se, "detectable": DETECTABLE_SE * se, "excludes_0": lo > 0 or hi < 0}
        out[arm] = row
    return out
