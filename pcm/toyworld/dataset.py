"""The toy world as a caption dataset in the Karpathy format the ingest stage reads.

Train entries are set (b)'s captions, one per scene, text only (the pipeline synthesises their
images); with `train_images=True` their drawings are written too, for the oracle arm that trains
on them. Val and test entries are set (c)'s drawings with five references each. Every entry
carries its scene record under "scene", so a caption can be scored attribute by attribute.
`pcm world dataset OUT_DIR` writes one; the copy shipped in `pcm/data/toyworld/` is its output
with the default sizes.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

from pcm import bundled
from pcm.demo_data import caption_tokens, png_bytes
from pcm.toyworld import world
from pcm.toyworld.scenes import three_sets
from storage import atomic

DATASET_FILE = "dataset_toyworld.json"
SHIPPED_DIR = bundled.TOYWORLD
SHIPPED_MODELS = bundled.TOYMODELS
DEFAULTS = {"n_captions": 3000, "n_val": 100, "n_test": 300}
MODEL_SCENES = 20000           # size of set (a): the sets after it skip its records
EVAL_SIZE = 128                # val/test drawings are larger than what the models see
CAPTION_SEED = 7


def shipped_paths() -> tuple[Path, Path]:
    """(the shipped dataset JSON, the images root its val/test paths are relative to)."""
    dataset = SHIPPED_DIR / DATASET_FILE
    if not dataset.is_file():
        raise FileNotFoundError(f"{dataset}: the bundled toy-world data is missing; regenerate it with "
                                f"`pcm world dataset {SHIPPED_DIR}`")
    return dataset, SHIPPED_DIR


def scene_record(scene: world.Scene) -> dict:
    """The record as JSON (positions rounded to 0.01 units: only what a caption says is scored)."""
    rec = asdict(scene)
    rec["horizon"] = round(rec["horizon"], 2)
    rec["things"] = list(rec["things"])
    for t in rec["things"]:
        t["x"], t["base"] = round(t["x"], 2), round(t["base"], 2)
    return rec


def scene_from_record(record: dict) -> world.Scene:
    """The inverse of `scene_record`; an invalid record is an error naming what is wrong."""
    try:
        things = tuple(world.Thing(**t) for t in record["things"])
        scene = world.Scene(record["sky"], record["ground"], float(record["horizon"]), things)
    except (KeyError, TypeError) as e:
        raise ValueError(f"invalid scene record {record!r}: {e}") from None
    if scene.sky not in world.SKIES or scene.ground not in world.GROUNDS or not all(
            t.kind in world.KINDS and t.colour in world.KINDS[t.kind] for t in things):
        raise ValueError(f"invalid scene record {record!r}: unknown sky, ground, kind or colour")
    return scene


def build(out_dir: str | Path, n_captions: int = DEFAULTS["n_captions"], n_val: int = DEFAULTS["n_val"],
          n_test: int = DEFAULTS["n_test"], train_images: bool = False) -> Path:
    """Write `dataset_toyworld.json` and the drawings under `out_dir`; returns the JSON's path."""
    out = Path(out_dir)
    sets = three_sets(MODEL_SCENES, n_captions, n_val, n_test)
    rng = random.Random(CAPTION_SEED)
    images: list[dict] = []
    sentid = 0

    def entry(split: str, filepath: str, filename: str, texts: list[str], scene: world.Scene) -> dict:
        nonlocal sentid
        imgid = len(images)
        sentences = [{"tokens": caption_tokens(t), "raw": t, "imgid": imgid, "sentid": sentid + k} for k, t in enumerate(texts)]
        sentid += len(texts)
        return {"filepath": filepath, "filename": filename, "imgid": imgid, "split": split,
                "sentids": [s["sentid"] for s in sentences], "sentences": sentences, "scene": scene_record(scene)}

    for k, scene in enumerate(sets["captions"]):
        name = f"train-{k:05d}.png"
        if train_images:
            atomic.write_bytes(out / "train" / name, png_bytes(world.model_view(world.draw(scene, EVAL_SIZE))))
        images.append(entry("train", "train", name, [world.caption(scene, rng)], scene))
    for split in ("val", "test"):
        for k, scene in enumerate(sets[split]):
            name = f"{split}-{k:04d}.png"
            atomic.write_bytes(out / "images" / name, png_bytes(world.draw(scene, EVAL_SIZE)))
            images.append(entry(split, "images", name, world.references(scene, rng), scene))
    dataset = out / DATASET_FILE
    # One image entry per line: small, and a diff of a regenerated copy reads entry by entry.
    lines = ",\n".join(json.dumps(e, ensure_ascii=False, separators=(",", ":")) for e in images)
    atomic.write_text(dataset, '{"dataset":"toyworld","images":[\n' + lines + "\n]}\n")
    return dataset


def read_scenes(dataset: str | Path) -> dict[str, world.Scene]:
    """Scene records of a toy-world dataset by image path (`filepath/filename`, as ingest stores it)."""
    data = atomic.read_json(dataset)
    out = {}
    for i, img in enumerate(data.get("images", [])):
        if "scene" not in img:
            raise ValueError(f"{dataset}: images[{i}] has no scene record; is this a toy-world dataset?")
        out[f"{img['filepath']}/{img['filename']}"] = scene_from_record(img["scene"])
    return out
