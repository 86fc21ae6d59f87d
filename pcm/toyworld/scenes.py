"""The toy world's three disjoint scene sets, each drawn from its own seed.

(a) `models`: what the toy CLIP and the toy text-to-image model learn from (the stand-in for LAION);
(b) `captions`: the captioner's training captions, text only (their drawings are never used, except
    by the oracle arm, which trains on them to measure the ceiling);
(c) `val` / `test`: drawn scenes with five references each (the stand-in for COCO's real photos).

No scene record appears in two sets: a later set skips any record an earlier one drew.
"""

from __future__ import annotations

import random

from pcm.toyworld.world import Scene, random_scene

SEEDS = {"models": 101, "captions": 202, "eval": 303}


def scene_set(name: str, n: int, exclude: set[Scene] | None = None) -> list[Scene]:
    """`n` scenes of set `name` (models, captions or eval), none equal to a scene in `exclude`."""
    if name not in SEEDS:
        raise ValueError(f"unknown scene set {name!r}; expected one of {', '.join(SEEDS)}")
    rng, out, seen = random.Random(SEEDS[name]), [], set(exclude or ())
    while len(out) < n:
        s = random_scene(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def three_sets(n_models: int, n_captions: int, n_val: int, n_test: int) -> dict[str, list[Scene]]:
    """The disjoint sets; val and test are two slices of one eval draw, so test is the same scenes
    whatever `n_val` is only when `n_val` is fixed (the shipped data fixes both)."""
    models = scene_set("models", n_models)
    captions = scene_set("captions", n_captions, exclude=set(models))
    ev = scene_set("eval", n_val + n_test, exclude=set(models) | set(captions))
    return {"models": models, "captions": captions, "val": ev[:n_val], "test": ev[n_val:]}
