"""How faithful images are to their toy-world captions, judged by the toy CLIP: retrieval and counterfactual tests.

For N images with the captions they were made from (a synthesize stage: N = min(200, all) ok images,
a seeded random choice), the toy CLIP gives:

- caption -> image R@1 and R@5 among the N images: an image counts as right for a query caption when
  its own caption contradicts nothing the query states (the same objects left to right; the same sky
  and ground where both captions state one), so another image of the same scene, in other words or
  with the sky left unsaid, is right too (`compatible`); chance R@1 is about 1/N;
- the mean CLIP score: cosine of each image to its own caption (the encode stage's `clip_score`);
- per attribute (sky, ground, colour, kind, count; `counterfactual.variants`): each image's caption
  against every caption that differs from it in that attribute alone. `beats_all`: the share of judged
  images whose own caption scores higher than every variant (the image shows the attribute as stated,
  as far as the toy CLIP can tell); `pairwise`: the share of variants beaten, averaged over the judged
  images (chance 0.5). An image is judged on an attribute when its caption has variants of it (a caption
  that names no sky is not judged on the sky; a caption of trees only has no colour variant). `all`:
  the share of images whose caption beats every variant of every attribute.

The measure is pinned in tests against drawings of the scenes themselves (near perfect) and drawings
paired with other scenes' captions (chance). It is the toy CLIP's judgement, not a human's: the toy
CLIP itself errs on some drawings (image -> caption R@1 about 99% among 1,000 drawn scenes).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcm.toyworld.counterfactual import CHANGES, Parsed, parse, variants

if TYPE_CHECKING:
    from storage.layout import StageDir

DEFAULT_IMAGES = 200
DEFAULT_SEED = 0
REPORT_VERSION = 2
DEFINITION = ("per attribute: for each judged image, is cos(image, its caption) > cos(image, v) for every "
              "caption v that differs in that attribute alone (beats_all), and the share of such v it beats "
              "(pairwise, averaged over images); judged = the caption states the attribute and the world allows "
              "another value")


def measure(images: Sequence[Any], captions: Sequence[str], clip: Any, batch_size: int = 256) -> dict[str, Any]:
    """The report for `images` (PIL images) and the `captions` they were made from, judged by `clip` (pcm.clip)."""
    import torch

    from pcm.clip import encode_images, encode_texts

    if len(images) != len(captions) or not images:
        raise ValueError(f"need one caption per image and at least one image; got {len(images)} images, "
                         f"{len(captions)} captions")
    parsed = [parse(c) for c in captions]
    texts: dict[str, int] = {}

    def index(text: str) -> int:
        return texts.setdefault(text, len(texts))

    own = [index(p.text() if p else c) for p, c in zip(parsed, captions, strict=True)]
    alts = [{a: [index(v.text()) for v in variants(p, a)] if p else [] for a in CHANGES} for p in parsed]
    feats = [encode_images(clip, torch.stack([clip.preprocess(im) for im in images[b:b + batch_size]]))[0]
             for b in range(0, len(images), batch_size)]
    g = torch.cat(feats)                                                   # [N, D]
    order = list(texts)
    t = torch.cat([encode_texts(clip, order[b:b + batch_size]) for b in range(0, len(order), batch_size)])
    sim = t @ g.T                                                          # [texts, N] cosines
    r1, r5 = _caption_to_image(sim[own], [p or c.strip().lower() for p, c in zip(parsed, captions, strict=True)])
    n = len(images)
    report: dict[str, Any] = {
        "images": n, "captions_parsed": sum(p is not None for p in parsed),
        "caption_to_image_r1": r1, "caption_to_image_r5": r5, "chance_r1": 1 / n,
        "clip_score_mean": sim[own, torch.arange(n)].mean().item(), "definition": DEFINITION}
    attributes, all_right = {}, [True] * n
    for a in CHANGES:
        beats_all, pairwise, chance = [], [], []
        for i in range(n):
            if not alts[i][a]:
                continue
            wins = (sim[own[i], i] > sim[alts[i][a], i]).float()
            beats_all.append(bool(wins.all()))
            pairwise.append(wins.mean().item())
            chance.append(1 / (1 + len(alts[i][a])))
            all_right[i] &= beats_all[-1]
        k = len(beats_all)
        attributes[a] = {"judged": k, "beats_all": sum(beats_all) / k if k else None,
                         "pairwise": sum(pairwise) / k if k else None,
                         "chance_beats_all": sum(chance) / k if k else None,
                         "variants_per_image": sum(1 / c - 1 for c in chance) / k if k else None}
    report["attributes"] = attributes
    report["all"] = sum(ok for ok, p in zip(all_right, parsed, strict=True) if p) / max(1, report["captions_parsed"])
    return report


def compatible(query: Parsed | str, other: Parsed | str) -> bool:
    """Whether an image made from caption `other` shows what `query` states, as far as the captions tell: the
    same object groups, and no sky or ground stated differently. Text outside the world's grammar (a str):
    only the same text."""
    if isinstance(query, str) or isinstance(other, str):
        return query == other
    return query.key()[2] == other.key()[2] and all(
        a is None or b is None or a == b for a, b in ((query.sky, other.sky), (query.ground, other.ground)))


def _caption_to_image(sim, queries: list[Parsed | str]) -> tuple[float, float]:
    """R@1 and R@5 of caption rows over image columns; image j is right for row i when `compatible`."""
    top = sim.topk(min(5, sim.shape[1]), dim=1).indices.tolist()
    hits = [[compatible(queries[i], queries[j]) for j in row] for i, row in enumerate(top)]
    return sum(h[0] for h in hits) / len(hits), sum(any(h) for h in hits) / len(hits)


# -- a synthesize stage --------------------------------------------------------------------------
def sampled_images(sd: StageDir, n: int = DEFAULT_IMAGES, seed: int = DEFAULT_SEED):
    """(caption ids, PIL images, captions) of `min(n, all)` ok images of a finished synthesize stage: a seeded
    random choice (random.Random(seed).sample over samples.parquet's ok rows in file order), in that order."""
    import io

    from PIL import Image

    from storage import manifests, tables
    from storage.shards import image_member, iter_tar

    if sd.stage != "synthesize" or not sd.done_marker.exists():
        raise ValueError(f"{sd.path}: not a finished synthesize stage directory (<root>/synthesize/<fingerprint> "
                         "with a stage.done.json)")
    rows = manifests.SAMPLES.read(sd, columns=["caption_id", "shard", "status"]).to_pylist()
    ok = [r for r in rows if r["status"] == tables.STATUS_OK]
    if not ok:
        raise ValueError(f"{sd.path}: no ok images to judge (samples.parquet has {len(rows)} rows, none ok)")
    chosen = sorted(random.Random(seed).sample(range(len(ok)), min(n, len(ok))))
    wanted = {ok[i]["caption_id"]: k for k, i in enumerate(chosen)}
    found: dict[str, tuple[Any, str]] = {}
    for shard in sorted({ok[i]["shard"] for i in chosen}):
        for sample in iter_tar(sd.image_shard(shard)):
            if sample["__key__"] in wanted:
                data = sample[image_member(sample)]
                with Image.open(io.BytesIO(data)) as img:
                    found[sample["__key__"]] = (img.convert("RGB"), sample["txt"].decode("utf-8"))
    missing = [c for c in wanted if c not in found]
    if missing:
        raise ValueError(f"{sd.path}: {len(missing)} sampled image(s) not in their shards, e.g. {missing[0]!r}")
    ids = sorted(wanted, key=wanted.get)
    return ids, [found[c][0] for c in ids], [found[c][1] for c in ids]


def stage_report(sd: StageDir, clip_dir: str | Path | None = None, n: int = DEFAULT_IMAGES,
                 seed: int = DEFAULT_SEED, reuse: bool = True) -> dict[str, Any]:
    """The report of a finished synthesize stage, written to its `faithfulness.json` (atomically) and returned.

    `clip_dir`: the toy CLIP (default the shipped one). With `reuse`, a file already there made with the
    same toy CLIP (by content), `n`, `seed` and report version is returned as it is.
    """
    from pcm import bundled
    from pcm.toyworld.manifest import dir_digest
    from pcm.toyworld.quality import load_toy_clip
    from storage import atomic

    clip_dir = Path(clip_dir or bundled.TOYMODELS / "clip")
    made_with = {"version": REPORT_VERSION, "images_asked": n, "seed": seed, "clip_sha256": dir_digest(clip_dir)}
    if reuse and sd.faithfulness.is_file():
        old = atomic.read_json(sd.faithfulness)
        if all(old.get(k) == v for k, v in made_with.items()):
            return old
    ids, images, captions = sampled_images(sd, n, seed)
    report = measure(images, captions, load_toy_clip(clip_dir))
    config = atomic.read_json(sd.config_file).get("config", {}) if sd.config_file.is_file() else {}
    report |= made_with | {
        "stage": sd.fingerprint, "clip": str(clip_dir),
        "images_in_stage": _ok_count(sd), "sample": f"random.Random({seed}).sample of min({n}, all) ok images",
        "steps": config.get("steps"), "guidance_scale": config.get("guidance_scale"), "model": config.get("model")}
    atomic.write_json(sd.faithfulness, report)
    return report


def _ok_count(sd: StageDir) -> int:
    from storage import manifests, tables

    return sum(s == tables.STATUS_OK for s in manifests.SAMPLES.read(sd, columns=["status"])["status"].to_pylist())


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report as rows (name, value in %, chance, images judged): the dashboard's table and the CLI's lines."""
    pct = lambda x: None if x is None else round(100 * x, 1)  # noqa: E731
    n = report["images"]
    rows = [{"measure": "caption -> image R@1", "value_pct": pct(report["caption_to_image_r1"]),
             "chance_pct": pct(report["chance_r1"]), "judged": n},
            {"measure": "caption -> image R@5", "value_pct": pct(report["caption_to_image_r5"]),
             "chance_pct": pct(min(1.0, 5 * report["chance_r1"])), "judged": n}]
    for a, r in report["attributes"].items():
        rows.append({"measure": f"{a}: beats every variant", "value_pct": pct(r["beats_all"]),
                     "chance_pct": pct(r["chance_beats_all"]), "judged": r["judged"]})
        rows.append({"measure": f"{a}: variants beaten", "value_pct": pct(r["pairwise"]),
                     "chance_pct": 50.0 if r["judged"] else None, "judged": r["judged"]})
    rows.append({"measure": "all attributes right", "value_pct": pct(report["all"]), "chance_pct": None,
                 "judged": report["captions_parsed"]})
    rows.append({"measure": "mean CLIP score (cosine x 100, own caption)", "value_pct": pct(report["clip_score_mean"]),
                 "chance_pct": None, "judged": n})
    return rows


def summary_line(report: dict[str, Any]) -> str:
    """One line for a terminal: R@1 and the share of variants beaten per attribute."""
    attrs = " ".join(f"{a} {100 * r['pairwise']:.1f}%" for a in CHANGES
                     if (r := report["attributes"].get(a)) and r["pairwise"] is not None)
    return (f"caption->image R@1 {100 * report['caption_to_image_r1']:.1f}% (chance {100 * report['chance_r1']:.1f}%) "
            f"among {report['images']} images; variants beaten: {attrs}")
