"""The bundled demo dataset: hand-written training captions plus drawn val/test scenes with five references each.

`python -m pcm.demo_data OUT_DIR` regenerates `dataset_demo.json` and `images/` bit-exactly from
`pcm/data/sample_captions.txt` and a fixed seed; the copy shipped in `pcm/data/demo/` is its output.
"""

from __future__ import annotations

import io
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from pcm import bundled
from storage import atomic

DATA_DIR = bundled.DATA
SAMPLE_CAPTIONS = DATA_DIR / "sample_captions.txt"
DEMO_DIR = bundled.DEMO
DATASET_FILE = "dataset_demo.json"
IMAGE_DIR = "images"
SIZE = 128
N_VAL, N_TEST = 12, 24
SEED = 2024

COLORS = {
    "red": (200, 40, 40), "blue": (40, 80, 200), "yellow": (235, 200, 40), "white": (240, 240, 240),
    "green": (40, 150, 60), "brown": (120, 75, 40), "gray": (128, 128, 128), "black": (25, 25, 25),
    "orange": (240, 130, 30),
}
SKIES = {"day": (135, 195, 240), "sunset": (245, 160, 90), "night": (20, 30, 70)}
GROUNDS = {"grass": (80, 170, 70), "sand": (225, 200, 140), "snow": (245, 245, 250)}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}


def demo_paths() -> tuple[Path, Path]:
    """(the demo's Karpathy JSON, the images root its val/test `filepath/filename` are relative to)."""
    dataset = DEMO_DIR / DATASET_FILE
    if not dataset.is_file():
        raise FileNotFoundError(f"{dataset}: the bundled demo data is missing; regenerate it with "
                                f"`python -m pcm.demo_data {DEMO_DIR}`")
    return dataset, DEMO_DIR


@dataclass(frozen=True)
class Scene:
    """What a drawn picture shows, and where; the captions are written from the same record."""

    sky: str                                  # day / sunset / night
    ground: str                               # grass / sand / snow
    horizon: int                              # y of the horizon
    house: tuple[str, str, int] | None        # (wall colour, roof colour, x)
    trees: tuple[tuple[int, int], ...]        # (x, base y) per tree
    car: tuple[str, int] | None               # (colour, x)
    people: tuple[tuple[int, int], ...]       # (x, feet y) per person


def random_scene(rng: random.Random) -> Scene:
    """A scene with at least two kinds of things in it, so every caption has something to say."""
    while True:
        house = (rng.choice(["red", "blue", "yellow", "white"]), rng.choice(["brown", "red", "gray"]),
                 rng.randint(8, 70)) if rng.random() < 0.6 else None
        trees = tuple((rng.randint(8, 120), rng.randint(92, 104)) for _ in range(rng.choice([0, 1, 1, 2, 3])))
        car = (rng.choice(["red", "blue", "yellow", "black", "white"]), rng.randint(10, 80)) if rng.random() < 0.5 else None
        people = tuple((rng.randint(10, 118), rng.randint(112, 122)) for _ in range(rng.choice([0, 0, 1, 2, 3])))
        if sum(map(bool, (house, trees, car, people))) >= 2:
            return Scene(sky=rng.choice(list(SKIES)), ground=rng.choice(list(GROUNDS)), horizon=rng.randint(78, 90),
                         house=house, trees=trees, car=car, people=people)


def draw_scene(scene: Scene) -> Image.Image:
    """Flat shapes only (no fonts, no anti-aliasing) so the pixels are the same on every machine."""
    img = Image.new("RGB", (SIZE, SIZE), SKIES[scene.sky])
    d = ImageDraw.Draw(img)
    if scene.sky == "night":
        for x, y in ((14, 10), (40, 22), (70, 8), (96, 26), (118, 14), (58, 34)):
            d.point([(x, y), (x + 1, y), (x, y + 1)], fill=COLORS["white"])
        d.ellipse([92, 8, 110, 26], fill=(235, 235, 210))                     # the moon
    elif scene.sky == "sunset":
        d.ellipse([20, scene.horizon - 16, 52, scene.horizon + 16], fill=COLORS["orange"])
    else:
        d.ellipse([96, 8, 120, 32], fill=COLORS["yellow"])                    # the sun
    d.rectangle([0, scene.horizon, SIZE, SIZE], fill=GROUNDS[scene.ground])
    if scene.house:
        wall, roof, x = scene.house
        top, bottom = scene.horizon - 12, scene.horizon + 18
        d.rectangle([x, top, x + 44, bottom], fill=COLORS[wall], outline=COLORS["black"])
        d.polygon([(x - 4, top), (x + 48, top), (x + 22, top - 20)], fill=COLORS[roof], outline=COLORS["black"])
        d.rectangle([x + 18, bottom - 16, x + 27, bottom], fill=COLORS["brown"])             # door
        d.rectangle([x + 5, top + 6, x + 14, top + 14], fill=(200, 230, 250), outline=COLORS["black"])
        d.rectangle([x + 31, top + 6, x + 40, top + 14], fill=(200, 230, 250), outline=COLORS["black"])
    for x, base in scene.trees:
        d.rectangle([x - 2, base - 18, x + 2, base], fill=COLORS["brown"])
        d.ellipse([x - 11, base - 38, x + 11, base - 14], fill=COLORS["green"], outline=(20, 90, 30))
    if scene.car:
        colour, x = scene.car
        d.rectangle([x, 104, x + 36, 114], fill=COLORS[colour], outline=COLORS["black"])
        d.polygon([(x + 8, 104), (x + 12, 96), (x + 26, 96), (x + 30, 104)], fill=COLORS[colour], outline=COLORS["black"])
        for wx in (x + 8, x + 28):
            d.ellipse([wx - 4, 111, wx + 4, 119], fill=COLORS["black"])
    for x, feet in scene.people:
        ink = COLORS["white"] if scene.sky == "night" and scene.ground != "snow" else COLORS["black"]
        d.ellipse([x - 3, feet - 26, x + 3, feet - 20], outline=ink)                        # head
        d.line([(x, feet - 20), (x, feet - 8)], fill=ink)                                  # body
        d.line([(x - 5, feet - 16), (x + 5, feet - 16)], fill=ink)                         # arms
        d.line([(x, feet - 8), (x - 4, feet)], fill=ink)                                   # legs
        d.line([(x, feet - 8), (x + 4, feet)], fill=ink)
    return img


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _things(scene: Scene, rng: random.Random) -> tuple[list[str], str]:
    """Noun phrases for what the scene shows (house, trees, car, people), worded afresh on each call;
    and the people phrase alone ("" when nobody is in the picture)."""
    things: list[str] = []
    if scene.house:
        wall, roof, _ = scene.house
        things.append(rng.choice([f"a {wall} house", f"a {wall} house with a {roof} roof", f"a small {wall} house",
                                  f"a {wall} home"]))
    if scene.trees:
        n = len(scene.trees)
        things.append(rng.choice(["a tree", "a green tree", "a single tree"]) if n == 1
                      else f"{COUNT_WORDS[n]} {rng.choice(['trees', 'green trees', 'round trees'])}")
    if scene.car:
        things.append(rng.choice([f"a {scene.car[0]} car", f"a small {scene.car[0]} car", f"a parked {scene.car[0]} car"]))
    people = ""
    if scene.people:
        n = len(scene.people)
        people = (rng.choice(["a person", "a stick figure", "a man"]) if n == 1
                  else f"{COUNT_WORDS[n]} {rng.choice(['people', 'stick figures', 'little people'])}")
        things.append(people)
    return things, people


def describe(scene: Scene, rng: random.Random) -> list[str]:
    """Five different reference captions of one scene, in varied wording, all true of the picture."""
    when = {"day": ["on a sunny day", "under a blue sky", "with the sun in the sky"],
            "sunset": ["at sunset", "under an orange sky", "as the sun goes down"],
            "night": ["at night", "under the moon", "on a starry night"]}[scene.sky]
    where = {"grass": ["on the grass", "in a green field"], "sand": ["on the sand", "on a sandy beach"],
             "snow": ["in the snow", "on a snowy field"]}[scene.ground]
    rng.shuffle(when)
    rng.shuffle(where)
    opening = rng.choice(["a drawing of", "a simple picture of", "an illustration of", "a cartoon of"])
    things, _ = _things(scene, rng)
    captions = [f"{opening} {_join(things)} {when[0]}"]
    things, _ = _things(scene, rng)
    captions.append(f"{things[0]} next to {_join(things[1:])} {where[0]}")
    things, people = _things(scene, rng)
    captions.append(f"{people} standing near {_join([t for t in things if t != people])} {when[1]}" if people
                    else f"{_join(things[::-1])} {where[1]}")
    things, _ = _things(scene, rng)
    captions.append(f"a {rng.choice(['simple', 'colorful', 'flat'])} scene with {_join(things)} {where[1]}")
    things, _ = _things(scene, rng)
    captions.append(f"{things[-1]} {where[0]} {when[2]}")
    # COCO's references mix sentence case and lower case; so do these.
    return [c[0].upper() + c[1:] if i % 2 else c for i, c in enumerate(captions)]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def caption_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def build(out_dir: str | Path) -> Path:
    """Write `dataset_demo.json` and `images/*.png` under `out_dir`; returns the JSON's path."""
    out = Path(out_dir)
    captions = [ln.strip() for ln in SAMPLE_CAPTIONS.read_text(encoding="utf-8").splitlines() if ln.strip()]
    images, sentid = [], 0

    def entry(split: str, filepath: str, filename: str, texts: list[str]) -> dict:
        nonlocal sentid
        imgid = len(images)
        sentences = [{"tokens": caption_tokens(t), "raw": t, "imgid": imgid, "sentid": sentid + k} for k, t in enumerate(texts)]
        sentid += len(texts)
        return {"filepath": filepath, "sentids": [s["sentid"] for s in sentences], "filename": filename,
                "imgid": imgid, "split": split, "sentences": sentences}

    # Training "images" do not exist: the pipeline synthesises them from the captions.
    for k, text in enumerate(captions):
        images.append(entry("train", "train", f"train-{k:03d}.png", [text]))
    rng = random.Random(SEED)
    for split, count in (("val", N_VAL), ("test", N_TEST)):
        for k in range(count):
            scene = random_scene(rng)
            name = f"{split}-{k:03d}.png"
            atomic.write_bytes(out / IMAGE_DIR / name, png_bytes(draw_scene(scene)))
            images.append(entry(split, IMAGE_DIR, name, describe(scene, rng)))
    dataset = out / DATASET_FILE
    atomic.write_text(dataset, json.dumps({"images": images, "dataset": "demo"}, indent=1, ensure_ascii=False) + "\n")
    return dataset


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        raise SystemExit(f"usage: python -m pcm.demo_data OUT_DIR   (the bundled copy is {DEMO_DIR})")
    print(build(args[0]))


if __name__ == "__main__":
    main()
