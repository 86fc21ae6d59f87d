"""Per-attribute accuracy of an evaluate stage's captions on toy-world scenes, read from the scene records."""

from __future__ import annotations

from pathlib import Path

from pcm.toyworld.dataset import read_scenes
from pcm.toyworld.world import ATTRIBUTES, attribute_hits
from storage import manifests
from storage.layout import StageDir


def attribute_accuracy(evaluate: StageDir, captions: StageDir, dataset: str | Path) -> dict[str, float]:
    """Share of evaluated images whose caption gets each attribute right, joining the evaluate stage's
    per-image captions (`evaluate`) to the dataset's scene records through the ingest stage (`captions`). Sky
    and ground are judged on the captions that mention them (`sky_stated`, `ground_stated`: how many do); kinds,
    colours, count and all on every one."""
    per_image = manifests.PER_IMAGE.read(evaluate, columns=["image_id", "caption"])
    rows = manifests.CAPTIONS.read(captions, columns=["image_id", "image_path"]).to_pylist()
    path_of = {r["image_id"]: r["image_path"] for r in rows}
    scenes = read_scenes(dataset)
    hits = {a: 0 for a in ATTRIBUTES}
    stated = {"sky": 0, "ground": 0}
    n = 0
    for image_id, caption in zip(per_image["image_id"].to_pylist(), per_image["caption"].to_pylist(), strict=True):
        scene = scenes.get(path_of.get(image_id, ""))
        if scene is None:
            raise ValueError(f"{dataset}: no scene record for image {image_id!r} ({path_of.get(image_id)}); "
                             "was the evaluate stage run on this toy-world dataset?")
        for a, ok in attribute_hits(scene, caption).items():
            hits[a] += bool(ok)
            if a in stated:
                stated[a] += ok is not None
        n += 1

    def share(a: str) -> float:
        judged = stated.get(a, n)
        return hits[a] / judged if judged else float("nan")

    return {a: share(a) for a in ATTRIBUTES} | {f"{a}_stated": stated[a] / n for a in stated} | {"images": n}
