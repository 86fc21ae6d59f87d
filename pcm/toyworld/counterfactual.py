"""A world caption parsed into its parts, and the same caption with one attribute changed.

`parse` reads a caption of the world's grammar (`world._templates`: eight phrasings, objects left to
right) strictly: every word must be accounted for, or it returns None. The parts keep the caption's
own wording (which sky phrase, whether a tree's green is said), so `Parsed.text()` rebuilds the
caption exactly and a counterfactual differs from it only in the words of the changed attribute:

- sky, ground: another value, in the parallel phrase ("at dusk" -> "in the night");
- colour: another colour of one object group that its kind comes in ("a red car" -> "a blue car");
- kind: another kind for one group that comes in its colour ("a red car" -> "a red ball");
- count: another number for one group, at most three objects in all ("a red car" -> "two red cars").

A variant that would merge two neighbouring groups ("a red car and a blue car" -> "... a blue car and a
blue car", which the world writes "two blue cars") is left out, so every variant is a caption the world
could write of another scene. A tree is always green: it has no colour variant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from pcm.toyworld import world

CHANGES = ("sky", "ground", "colour", "kind", "count")   # the attributes a counterfactual changes


@dataclass(frozen=True)
class Group:
    """`count` neighbouring objects of one kind and colour, as the caption words them."""

    count: int
    kind: str
    colour: str
    colour_said: bool = True   # False only for a tree whose green the caption leaves out

    def text(self) -> str:
        """The group's phrase in the world's wording (`world.group_phrase`, the colour choice fixed)."""
        noun = self.kind if self.count == 1 else world.PLURAL[self.kind]
        if self.kind == "person":
            return f"{'a' if self.count == 1 else world.COUNT_WORDS[self.count]} {noun} in {self.colour}"
        head = f"{self.colour} {noun}" if self.colour_said else noun
        return f"{world._article(head) if self.count == 1 else world.COUNT_WORDS[self.count]} {head}"


@dataclass(frozen=True)
class Parsed:
    """A caption's parts: its phrasing `form` (a template with {objs}, {g0}, {rest}, {sky}, {ground}, {be}
    slots), the sky and ground it states (None: not stated) with the index of the phrase used, and its
    object groups left to right."""

    form: str
    sky: str | None
    sky_phrase: int
    ground: str | None
    ground_phrase: int
    groups: tuple[Group, ...]

    def text(self) -> str:
        g = [x.text() for x in self.groups]
        one = len(self.groups) == 1 and self.groups[0].count == 1
        return self.form.format(
            objs=world._join(g), g0=g[0], rest=world._join(g[1:]) if len(g) > 1 else "", be="is" if one else "are",
            sky=world.SKY_PHRASES[self.sky][self.sky_phrase] if self.sky else "",
            ground=world.GROUND_PHRASES[self.ground][self.ground_phrase] if self.ground else "")

    def key(self) -> tuple:
        """What the caption states (its wording left out): two captions with equal keys describe the same picture."""
        return self.sky, self.ground, tuple((g.count, g.kind, g.colour) for g in self.groups)


# -- parsing ------------------------------------------------------------------------------------
def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_COLOURS = _alternation(world.PALETTE)
_NOUN_OF = {w: k for k, p in world.PLURAL.items() for w in (k, p)}
_GROUP = re.compile(
    rf"\b(?:(a|two|three) (person|people) in ({_COLOURS})"                       # people wear their colour
    rf"|(a|an|two|three) (?:({_COLOURS}) )?({_alternation(_NOUN_OF)}))\b")
_SKY = {p: (v, i) for v, ps in world.SKY_PHRASES.items() for i, p in enumerate(ps)}
_GROUND = {p: (v, i) for v, ps in world.GROUND_PHRASES.items() for i, p in enumerate(ps)}
_SKY_RE = re.compile(rf"\b(?:{_alternation(_SKY)})\b")
_GROUND_RE = re.compile(rf"\b(?:{_alternation(_GROUND)})\b")
_OPEN = _alternation(world.OPENINGS)
_OBJS = r"O(?:(?:, O)* and O)?"
# The eight phrasings of world._templates, over a skeleton in which every group is O, the sky S, the ground G.
_FORMS = [
    (re.compile(rf"^({_OBJS}) G S$"), "{objs} {ground} {sky}"),
    (re.compile(rf"^({_OPEN}) ({_OBJS}) G S$"), "{open} {objs} {ground} {sky}"),
    (re.compile(rf"^({_OBJS}) S G$"), "{objs} {sky} {ground}"),
    (re.compile(rf"^there (is|are) ({_OBJS}) G S$"), "there {be} {objs} {ground} {sky}"),
    (re.compile(rf"^({_OBJS}) G$"), "{objs} {ground}"),
    (re.compile(rf"^({_OPEN}) ({_OBJS}) S$"), "{open} {objs} {sky}"),
    (re.compile(r"^O to the left of O G S$"), "{g0} to the left of {rest} {ground} {sky}"),
    (re.compile(rf"^O next to ({_OBJS}) G S$"), "{g0} next to {rest} {ground} {sky}"),
]


def _group(m: re.Match) -> Group | None:
    """A matched group phrase as a Group, or None when its words disagree (number, article, colour)."""
    if m.group(2):                                               # "<n> person/people in <colour>"
        number, noun, colour, said = m.group(1), m.group(2), m.group(3), True
    else:
        number, noun, colour = m.group(4), m.group(6), m.group(5)
        said = colour is not None
    kind = _NOUN_OF[noun]
    count = {"a": 1, "an": 1, "two": 2, "three": 3}[number]
    if not said:
        if kind != "tree":
            return None                                          # only a tree's colour goes unsaid
        colour = "green"
    if (noun == kind) != (count == 1) or colour not in world.KINDS[kind]:
        return None
    g = Group(count, kind, colour, said)
    return g if g.text() == m.group(0) else None                 # "a orange ball", "a people in red": not the world's


def parse(text: str) -> Parsed | None:
    """The parts of a caption in the world's grammar (case and surrounding space ignored), or None for any
    other text. A parsed caption describes a scene the world could draw: valid colours, one to three objects,
    no two equal neighbouring groups, "there is" only before one object."""
    t = " ".join(text.strip().lower().split())
    skies, grounds = list(_SKY_RE.finditer(t)), list(_GROUND_RE.finditer(t))
    if len(skies) > 1 or len(grounds) > 1:
        return None
    spans = [(m.start(), m.end(), "S") for m in skies] + [(m.start(), m.end(), "G") for m in grounds]
    masked = t
    for a, b, _ in spans:
        masked = masked[:a] + "#" * (b - a) + masked[b:]
    groups: list[Group] = []
    for m in _GROUP.finditer(masked):
        g = _group(m)
        if g is None:
            return None
        groups.append(g)
        spans.append((m.start(), m.end(), "O"))
    skeleton, pos = [], 0
    for a, b, tag in sorted(spans):
        skeleton += [t[pos:a], tag]
        pos = b
    skeleton = "".join(skeleton + [t[pos:]])
    if not groups or not _valid_groups(groups):
        return None
    for pattern, form in _FORMS:
        m = pattern.match(skeleton)
        if m is None:
            continue
        opening = m.group(1) if "{open}" in form else ""
        if "{be}" in form and m.group(1) != ("is" if len(groups) == 1 and groups[0].count == 1 else "are"):
            return None
        if "to the left of" in form and len(groups) != 2 or "next to" in form and len(groups) < 2:
            return None
        sky, si = _SKY[skies[0].group(0)] if skies else (None, 0)
        ground, gi = _GROUND[grounds[0].group(0)] if grounds else (None, 0)
        parsed = Parsed(form.replace("{open}", opening), sky, si, ground, gi, tuple(groups))
        return parsed if parsed.text() == t else None
    return None


def _valid_groups(groups: list[Group] | tuple[Group, ...]) -> bool:
    """One to three objects, no two neighbouring groups of the same kind and colour (the world merges them)."""
    return 1 <= sum(g.count for g in groups) <= 3 and all(
        (a.kind, a.colour) != (b.kind, b.colour) for a, b in zip(groups, groups[1:], strict=False))


# -- counterfactuals ---------------------------------------------------------------------------
def _with_group(p: Parsed, i: int, g: Group) -> Parsed | None:
    groups = p.groups[:i] + (g,) + p.groups[i + 1:]
    return replace(p, groups=groups) if _valid_groups(groups) else None


def variants(p: Parsed, attribute: str) -> list[Parsed]:
    """Every caption that differs from `p` in `attribute` alone (see the module docstring); empty when the
    caption does not state it (no sky phrase) or the world allows no other value (a tree's colour)."""
    out: list[Parsed | None] = []
    if attribute == "sky":
        out = [replace(p, sky=v) for v in world.SKIES if p.sky is not None and v != p.sky]
    elif attribute == "ground":
        out = [replace(p, ground=v) for v in world.GROUNDS if p.ground is not None and v != p.ground]
    elif attribute == "colour":
        out = [_with_group(p, i, replace(g, colour=c)) for i, g in enumerate(p.groups)
               for c in world.KINDS[g.kind] if c != g.colour]
    elif attribute == "kind":
        out = [_with_group(p, i, Group(g.count, k, g.colour)) for i, g in enumerate(p.groups)
               for k in world.KINDS if k != g.kind and g.colour in world.KINDS[k]]
    elif attribute == "count":
        total = sum(g.count for g in p.groups)
        out = [_with_group(p, i, replace(g, count=n)) for i, g in enumerate(p.groups)
               for n in (1, 2, 3) if n != g.count and total - g.count + n <= 3]
    else:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {', '.join(CHANGES)}")
    return [v for v in out if v is not None]
