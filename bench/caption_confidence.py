"""Calibrate `pcm caption`'s out-of-domain flag on the toy world: how often it flags held-out toy-world drawings
(false positives) and images unlike them (true positives), through the Captioner API as `pcm caption` runs it.

    python bench/caption_confidence.py --train runs/train/<fp> --encode runs/encode/<fp>

The reference is built from the encode stage's training pairs exactly as train builds it
(pcm.confidence.training_reference), so a checkpoint trained before confidence existed can be measured.
In-domain: the bundled toy world's 300 test + 100 val drawings and 100 newly drawn scenes (pcm.toyworld.world);
out-of-domain: pcm.toyworld.ood's uniform noise, text on white, photo stand-ins (gradients with blobs),
checkerboards. Also prints each signal's spread per set (the caption's CLIP score and the distance), and
writes bench/results/caption_confidence.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def image_sets(folder: Path, n_ood: int) -> dict[str, list[Path]]:
    from pcm.toyworld import ood, world
    from pcm.toyworld.dataset import SHIPPED_DIR

    images = SHIPPED_DIR / "images"
    drawn = folder / "drawn"
    drawn.mkdir(parents=True)
    fresh = []
    for i in range(100):
        p = drawn / f"scene-{i:03d}.png"
        world.draw(world.random_scene(random.Random(10_000 + i))).save(p)
        fresh.append(p)
    sets = {"toy test": sorted(images.glob("test-*.png")), "toy val": sorted(images.glob("val-*.png")),
            "toy drawn": fresh}
    for kind in ood.KINDS:
        sets[kind] = ood.save_images(folder / kind, kind, n_ood if kind != "checkerboard" else 20)
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, help="train stage (or checkpoint) directory")
    ap.add_argument("--encode", required=True, help="the encode stage it was trained on")
    ap.add_argument("--clip", default=None, help="the checkpoint's CLIP when its recorded path is not here")
    ap.add_argument("--n-ood", type=int, default=100)
    ap.add_argument("--margin", type=float, default=None, help="override pcm.confidence.MARGIN")
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from pcm import confidence, dataset
    from pcm.caption import Captioner
    from storage import manifests, tables
    from storage.layout import StageDir

    enc = StageDir.at(args.encode)
    ok = tables.ok_rows(manifests.SCORES.read(enc, columns=["shard", "row", "clip_score", "status"]).to_pylist())
    pairs = dataset.Pairs([""] * len(ok), [""] * len(ok), np.array([r["shard"] for r in ok]),
                          np.array([r["row"] for r in ok]), np.array([r["clip_score"] for r in ok], np.float32))
    # The margin is an argument: a default bound when build_reference was defined ignores a later MARGIN.
    margin = confidence.MARGIN if args.margin is None else args.margin
    reference = confidence.training_reference(pairs.clip_score, pairs.shard, pairs.row,
                                              dataset.FeatureStore(enc, "features"), seed=0, margin=margin)
    cap = Captioner.from_pretrained(args.train, clip=args.clip, device="cpu")
    cap.reference = reference
    in_domain = ("toy test", "toy val", "toy drawn")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, paths in image_sets(Path(tmp), args.n_ood).items():
            rows = cap.caption(paths, beam_size=3)
            flagged = np.array([r["in_domain"] is False for r in rows])
            dist = np.array([r["distance"] for r in rows])
            score = np.array([r["clip_score"] for r in rows])
            results[name] = {"images": len(rows), "flagged": round(float(flagged.mean()), 4),
                             "distance": {"min": round(float(dist.min()), 2), "median": round(float(np.median(dist)), 2),
                                          "max": round(float(dist.max()), 2)},
                             "clip_score": {"min": round(float(score.min()), 3),
                                            "median": round(float(np.median(score)), 3),
                                            "max": round(float(score.max()), 3)},
                             "example": rows[0]["caption"]}
    print(f"checkpoint {cap.checkpoint} (step {cap.step}); reference of {reference.info['images']} training images, "
          f"{reference.info['pairs']} pairs; threshold {reference.threshold:.2f} "
          f"(margin {reference.info['margin']} x held-out 99th percentile {reference.distance_quantiles[99]:.2f})")
    print(f"{'set':<12} {'images':>6} {'flagged':>8}   distance min/median/max   clip_score min/median/max")
    for name, r in results.items():
        d, s = r["distance"], r["clip_score"]
        kind = "FPR" if name in in_domain else "TPR"
        print(f"{name:<12} {r['images']:>6} {100 * r['flagged']:>6.1f}% {kind}  {d['min']:6.1f} {d['median']:6.1f} "
              f"{d['max']:6.1f}        {s['min']:6.3f} {s['median']:6.3f} {s['max']:6.3f}")
    out = REPO / "bench" / "results" / "caption_confidence.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "checkpoint": str(cap.checkpoint),
                               "threshold": reference.threshold, "reference": reference.info, "sets": results},
                              indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
