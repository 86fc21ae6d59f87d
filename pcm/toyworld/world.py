"""The toy world: a scene record, how it is drawn, how it is captioned, and how a caption is read back.

A scene is a sky (day / sunset / night) over a ground (grass / sand / snow) with one to three big,
filled objects standing in three slots, left to right. Captions name the objects left to right,
merging neighbours of the same kind and colour into a count ("two red cars"), so every caption is
checkable against the record: `read_caption` parses one back into (sky, ground, objects) and
`attribute_hits` says which attributes a caption got right.

Drawings are made in a 32-unit coordinate system at any scale with flat colours (no fonts, no
anti-aliasing), so the pixels are the same on every machine; the toy models see them at 32 px.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from PIL import Image, ImageDraw

UNITS = 32                                   # the drawing's coordinate system is UNITS x UNITS
MODEL_SIZE = 32                              # the toy models see 32 px images

PALETTE = {
    "red": (210, 40, 40), "blue": (40, 80, 215), "yellow": (245, 215, 40), "white": (250, 250, 250),
    "black": (25, 25, 25), "green": (20, 115, 40), "orange": (250, 140, 25), "brown": (125, 75, 35),
}
SKIES = {"day": (120, 185, 240), "sunset": (245, 150, 85), "night": (25, 30, 85)}
GROUNDS = {"grass": (80, 170, 65), "sand": (225, 200, 130), "snow": (238, 238, 245)}
# Which colours each kind comes in (a tree is always green).
KINDS = {
    "house": ("red", "blue", "yellow", "white"),
    "car": ("red", "blue", "yellow", "black", "white"),
    "tree": ("green",),
    "person": ("red", "blue", "yellow", "green"),
    "dog": ("brown", "black", "white"),
    "ball": ("red", "blue", "yellow", "orange"),
}
PLURAL = {"house": "houses", "car": "cars", "tree": "trees", "person": "people", "dog": "dogs", "ball": "balls"}
SLOTS = (6.0, 16.0, 26.0)                    # x of the three slot centres
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
_ROOF, _SKIN, _LEGS, _DOOR = (110, 55, 35), (235, 190, 150), (60, 60, 70), (70, 40, 20)


@dataclass(frozen=True)
class Thing:
    kind: str
    colour: str
    x: float        # centre, in units
    base: float     # y where it stands, in units


@dataclass(frozen=True)
class Scene:
    """What a picture shows, left to right; captions and drawings are made from this record alone."""

    sky: str
    ground: str
    horizon: float
    things: tuple[Thing, ...]

    def key(self) -> tuple:
        """What a caption can say about the scene (positions left out): the unit of disjointness."""
        return self.sky, self.ground, tuple((t.kind, t.colour) for t in self.things)

    def groups(self) -> list[tuple[int, str, str]]:
        """(count, kind, colour) left to right, neighbours of the same kind and colour merged."""
        out: list[tuple[int, str, str]] = []
        for t in self.things:
            if out and out[-1][1:] == (t.kind, t.colour):
                out[-1] = (out[-1][0] + 1, t.kind, t.colour)
            else:
                out.append((1, t.kind, t.colour))
        return out


def random_scene(rng: random.Random) -> Scene:
    """One to three objects in distinct slots; a neighbour repeats the previous object 40% of the time,
    so counts of two and three occur often enough to be learned."""
    n = rng.choices((1, 2, 3), weights=(3, 4, 3))[0]
    slots = sorted(rng.sample(range(3), n))
    horizon = 19 + rng.uniform(-1, 1)
    things: list[Thing] = []
    for s in slots:
        if things and rng.random() < 0.4:
            kind, colour = things[-1].kind, things[-1].colour
        else:
            kind = rng.choice(list(KINDS))
            colour = rng.choice(KINDS[kind])
        things.append(Thing(kind, colour, SLOTS[s] + rng.uniform(-1, 1), 27 + rng.uniform(-1.5, 1.5)))
    return Scene(rng.choice(list(SKIES)), rng.choice(list(GROUNDS)), horizon, tuple(things))


# -- drawing ----------------------------------------------------------------------------------
def _draw_thing(d: ImageDraw.ImageDraw, t: Thing, s: float) -> None:
    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [round((t.x + x0) * s), round((t.base + y0) * s), round((t.x + x1) * s) - 1, round((t.base + y1) * s) - 1]

    c = PALETTE[t.colour]
    if t.kind == "house":
        d.rectangle(box(-4.5, -7, 4.5, 0), fill=c)
        d.polygon([((t.x - 5.5) * s, (t.base - 7) * s), ((t.x + 5.5) * s, (t.base - 7) * s),
                   (t.x * s, (t.base - 12) * s)], fill=_ROOF)
        d.rectangle(box(-1, -3.5, 1, 0), fill=_DOOR)
    elif t.kind == "car":
        d.rectangle(box(-3, -6.5, 2.5, -3.5), fill=c)          # cabin
        d.rectangle(box(-4.5, -4, 4.5, -1.5), fill=c)          # body
        for wx in (-2.7, 2.7):
            d.ellipse(box(wx - 1.4, -2.8, wx + 1.4, 0), fill=PALETTE["black"])
    elif t.kind == "tree":
        d.rectangle(box(-1, -5, 1, 0), fill=PALETTE["brown"])
        d.ellipse(box(-4, -13, 4, -4.5), fill=c)
    elif t.kind == "person":
        d.rectangle(box(-1.5, -4, 1.5, 0), fill=_LEGS)
        d.rectangle(box(-2, -9, 2, -4), fill=c)
        d.ellipse(box(-1.6, -12.4, 1.6, -9.2), fill=_SKIN)
    elif t.kind == "dog":
        d.rectangle(box(-4, -5, 2.5, -2.5), fill=c)            # body
        d.rectangle(box(1.5, -7.5, 4.5, -4.5), fill=c)         # head
        d.rectangle(box(-4, -2.5, -2.8, 0), fill=c)            # legs
        d.rectangle(box(0.8, -2.5, 2, 0), fill=c)
        d.rectangle(box(-5.2, -6, -4, -4.5), fill=c)           # tail
    elif t.kind == "ball":
        d.ellipse(box(-2.5, -5, 2.5, 0), fill=c)
    else:
        raise ValueError(f"unknown kind {t.kind!r}; expected one of {', '.join(KINDS)}")


def draw(scene: Scene, size: int = 128) -> Image.Image:
    """The scene as an RGB image of `size` x `size` pixels (a multiple of nothing: any size works)."""
    s = size / UNITS
    img = Image.new("RGB", (size, size), SKIES[scene.sky])
    d = ImageDraw.Draw(img)
    d.rectangle([0, round(scene.horizon * s), size, size], fill=GROUNDS[scene.ground])
    for t in scene.things:
        _draw_thing(d, t, s)
    return img


def model_view(img: Image.Image) -> Image.Image:
    """A drawing as the toy models see it: bicubic (anti-aliased) down to 32 px, as CLIP's preprocessing does."""
    return img if img.size == (MODEL_SIZE, MODEL_SIZE) else img.resize((MODEL_SIZE, MODEL_SIZE), Image.BICUBIC)


# -- captions ---------------------------------------------------------------------------------
SKY_PHRASES = {"day": ("on a sunny day", "under a blue sky", "during the day"),
               "sunset": ("at sunset", "under an orange sky", "at dusk"),
               "night": ("at night", "under a dark sky", "in the night")}
GROUND_PHRASES = {"grass": ("on the grass", "on a grassy field", "on a lawn"),
                  "sand": ("on the sand", "on a sandy beach", "in the desert"),
                  "snow": ("in the snow", "on a snowy field", "on snowy ground")}
OPENINGS = ("a picture of", "a drawing of", "an image of", "a scene with")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def group_phrase(count: int, kind: str, colour: str, rng: random.Random) -> str:
    """`a red car`, `two blue balls`, `a person in yellow`, `three trees` (a tree's green is optional)."""
    noun = kind if count == 1 else PLURAL[kind]
    if kind == "person":
        return f"{COUNT_WORDS[count] if count > 1 else 'a'} {noun} in {colour}"
    adj = "" if kind == "tree" and rng.random() < 0.5 else colour + " "
    head = f"{adj}{noun}"
    return f"{_article(head) if count == 1 else COUNT_WORDS[count]} {head}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _templates(scene: Scene, rng: random.Random) -> list[str]:
    """Every phrasing of the scene, in a fixed order, with fresh word choices."""
    groups = [group_phrase(c, k, col, rng) for c, k, col in scene.groups()]
    objs, sky, ground = _join(groups), rng.choice(SKY_PHRASES[scene.sky]), rng.choice(GROUND_PHRASES[scene.ground])
    out = [f"{objs} {ground} {sky}",
           f"{rng.choice(OPENINGS)} {objs} {ground} {sky}",
           f"{objs} {sky} {ground}",
           f"{'there is' if len(groups) == 1 and groups[0].startswith(('a ', 'an ')) else 'there are'} {objs} {ground} {sky}",
           f"{objs} {ground}",
           f"{rng.choice(OPENINGS)} {objs} {sky}"]
    if len(groups) == 2:
        out.append(f"{groups[0]} to the left of {groups[1]} {ground} {sky}")
    if len(groups) >= 2:
        out.append(f"{groups[0]} next to {_join(groups[1:])} {ground} {sky}")
    return out


# The words the templates above add around the phrases (see _templates and group_phrase).
_TEMPLATE_WORDS = ("a", "an", "there", "is", "are", "to", "the", "left", "of", "next", "and", "in")


def caption_vocabulary() -> frozenset[str]:
    """Every word a caption of the world can hold: what the toy text encoder was trained on (docs/toyworld.md)."""
    phrases = [*OPENINGS, *(p for ps in SKY_PHRASES.values() for p in ps), *(p for ps in GROUND_PHRASES.values()
                                                                             for p in ps)]
    return frozenset({*_TEMPLATE_WORDS, *PALETTE, *KINDS, *PLURAL.values(), *COUNT_WORDS.values(),
                      *(w for p in phrases for w in p.split())})


def caption(scene: Scene, rng: random.Random) -> str:
    """One caption of the scene in a random phrasing (the captioner's training text)."""
    return rng.choice(_templates(scene, rng))


def references(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """`n` different reference captions, all true of the picture; the first says everything."""
    first = _templates(scene, rng)[0]
    rest = [t for t in _templates(scene, rng)[1:] if t != first]
    rng.shuffle(rest)
    out = [first] + rest[: n - 1]
    while len(out) < n:                         # never short: re-word the full caption
        out.append(_templates(scene, rng)[rng.randrange(4)])
    # COCO's references mix sentence case and lower case; so do these.
    return [c[0].upper() + c[1:] if i % 2 else c for i, c in enumerate(out)]


GROUND_NOUNS = {"grass": ["grass", "lawn", "field"], "sand": ["sand", "beach", "desert"],
                "snow": ["snow", "field", "ground"]}
SKY_NOUNS = {"day": ["day", "sky"], "sunset": ["sunset", "dusk", "sky"], "night": ["night", "sky"]}


def concept_words(scene: Scene) -> list[str]:
    """Nouns a caption of the scene can use for it: its kinds, its ground and its sky."""
    return sorted({t.kind for t in scene.things}) + GROUND_NOUNS[scene.ground] + SKY_NOUNS[scene.sky]


def all_concept_words() -> list[str]:
    """Every concept word of the world, sorted: all kinds, grounds and skies."""
    return sorted({*KINDS, *(w for ws in GROUND_NOUNS.values() for w in ws), *(w for ws in SKY_NOUNS.values() for w in ws)})


# -- reading a caption back -------------------------------------------------------------------
_COLOURS = "|".join(PALETTE)
_NOUNS = {w: k for k, p in PLURAL.items() for w in (k, p)}
_OBJECT = re.compile(rf"\b(a|an|one|two|three|four)\s+(?:({_COLOURS})\s+)?({'|'.join(_NOUNS)})\b(?:\s+in\s+({_COLOURS})\b)?")
_NUMBER = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}


@dataclass(frozen=True)
class Reading:
    """What a caption claims: sky, ground (None when it says nothing) and (kind, colour) -> count."""

    sky: str | None
    ground: str | None
    objects: dict[tuple[str, str | None], int]


_SKY_WORDS = re.compile(r"\b(sunny|blue sky|day|sunset|orange sky|dusk|night|dark sky)\b")
_GROUND_WORDS = re.compile(r"\b(grass|grassy|lawn|sand|sandy|beach|desert|snow|snowy)\b")
_SKY_OF = {"sunny": "day", "blue sky": "day", "day": "day", "sunset": "sunset", "orange sky": "sunset",
           "dusk": "sunset", "night": "night", "dark sky": "night"}
_GROUND_OF = {"grass": "grass", "grassy": "grass", "lawn": "grass", "sand": "sand", "sandy": "sand",
              "beach": "sand", "desert": "sand", "snow": "snow", "snowy": "snow"}


def read_caption(text: str) -> Reading:
    """Parse a caption (the world's grammar, or a model's attempt at it) into what it claims.

    Sky and ground come from their first keyword ("sunny", "dusk", "beach", "snowy", ...), objects
    from "<count> [colour] <kind> [in <colour>]" phrases, summed per (kind, colour).
    """
    t = re.sub(r"[^a-z ]+", " ", text.lower())
    sky_m, ground_m = _SKY_WORDS.search(t), _GROUND_WORDS.search(t)
    sky = _SKY_OF[sky_m.group(1)] if sky_m else None
    ground = _GROUND_OF[ground_m.group(1)] if ground_m else None
    objects: Counter = Counter()
    for m in _OBJECT.finditer(t):
        kind = _NOUNS[m.group(3)]
        colour = m.group(2) or m.group(4) or ("green" if kind == "tree" else None)
        objects[(kind, colour)] += _NUMBER[m.group(1)]
    return Reading(sky, ground, dict(objects))


ATTRIBUTES = ("sky", "ground", "kinds", "colours", "count", "all")


def attribute_hits(scene: Scene, text: str) -> dict[str, bool | None]:
    """Which attributes of the scene a caption states correctly.

    Sky and ground are None when the caption does not mention them (references often leave one
    out); kinds, colours and count are always judged; `all` means the objects are exactly right
    and nothing stated about sky or ground is wrong.
    """
    r = read_caption(text)
    truth = Counter((t.kind, t.colour) for t in scene.things)
    hits: dict[str, bool | None] = {
        "sky": None if r.sky is None else r.sky == scene.sky,
        "ground": None if r.ground is None else r.ground == scene.ground,
        "kinds": {k for k, _ in r.objects} == {k for k, _ in truth},
        "colours": set(r.objects) == set(truth),
        "count": sum(r.objects.values()) == len(scene.things),
    }
    hits["all"] = hits["sky"] is not False and hits["ground"] is not False and dict(r.objects) == dict(truth)
    return hits
