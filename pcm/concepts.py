"""The concept vocabulary: frequent nouns of the training captions, lemmatised to the singular.

Nouns are found in context by an averaged-perceptron part-of-speech tagger trained on UD
English-EWT whose weights ship inside the `denckring-en-pos` wheel (no download at run
time), and lemmatised with `lemminflect`'s tables. Captions are often verbless fragments
("a man riding horses") on which a treebank tagger sometimes calls a participle a noun, so
a tagged noun is kept only when lemminflect's lexicon allows a noun reading of the word (or
does not know the word at all, e.g. "frisbee").
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from tqdm import tqdm

# Nouns that name no visible thing, or only a quantity, position or the picture itself.
STOP_NOUNS = frozenset("""
    image picture photo photograph photography pic shot view scene camera background foreground
    front top bottom side middle center centre edge corner end left right rear
    thing something someone somebody anything everything nothing one ones other others
    lot lots bunch couple pair group number variety kind type sort piece part bit set
    way day time while area place spot close closeup close-up distance
    each all both some several few many
    """.split())

_WORD = re.compile(r"[a-z]+(?:['-][a-z]+)*")


def words(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation and digits are dropped (the tagger saw no punctuation)."""
    return _WORD.findall(text.lower())


@cache
def _tagger():
    try:
        from denckring_en_pos import tagger
    except ImportError as e:
        raise RuntimeError("concept extraction needs the part-of-speech tagger package: "
                           "pip install denckring-en-pos (or pass a vocabulary file instead)") from e
    return tagger()


@functools.cache  # a corpus repeats its words millions of times
def _can_be_noun(word: str) -> bool:
    from lemminflect import getAllLemmas

    readings = getAllLemmas(word)
    return not readings or "NOUN" in readings


@functools.cache
def lemma(word: str) -> str:
    """The singular of a noun: `horses` -> `horse`, `men` -> `man`, `frisbees` -> `frisbee`."""
    from lemminflect import getLemma

    found = getLemma(word, upos="NOUN", lemmatize_oov=True)
    return found[0] if found else word


def caption_nouns(text: str) -> list[str]:
    """Lemmatised nouns of one caption, in order, stop-nouns removed."""
    tokens = words(text)
    if not tokens:
        return []
    tags = _tagger().tag(tokens)
    nouns = []
    for word, tag in zip(tokens, tags, strict=True):
        if not tag.startswith("NOUN|") or len(word) < 2 or not _can_be_noun(word):
            continue
        noun = lemma(word)
        if noun not in STOP_NOUNS and word not in STOP_NOUNS:
            nouns.append(noun)
    return nouns


def count_nouns(texts: Iterable[str], *, progress: bool = True) -> Counter[str]:
    """How often each lemmatised noun occurs over all captions."""
    counts: Counter[str] = Counter()
    texts = list(texts)
    for text in tqdm(texts, desc="concept nouns", unit="caption", disable=not progress or len(texts) < 1000):
        counts.update(caption_nouns(text))
    return counts


def select(counts: Counter[str], *, min_count: int = 1, top_n: int | None = None) -> list[tuple[str, int]]:
    """Nouns with at least `min_count` occurrences, most frequent first (ties alphabetical), at most `top_n`."""
    ranked = sorted(((c, n) for c, n in counts.items() if n >= min_count), key=lambda cn: (-cn[1], cn[0]))
    return ranked[:top_n] if top_n is not None else ranked


def extract_concepts(texts: Iterable[str], *, min_count: int = 1, top_n: int | None = None,
                     progress: bool = True) -> list[tuple[str, int]]:
    """The concept vocabulary of a caption corpus: (noun, count), most frequent first."""
    return select(count_nouns(texts, progress=progress), min_count=min_count, top_n=top_n)


def read_vocabulary(path: str | Path) -> list[str]:
    """A user vocabulary: one concept a line; blank lines and `#` comments skipped, duplicates refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {path} not found: give a text file with one concept a line")
    concepts: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        concept = " ".join(line.split("#", 1)[0].split())
        if not concept:
            continue
        if concept in seen:
            raise ValueError(f"{path}:{lineno}: concept {concept!r} repeats line {seen[concept]}; list each once")
        seen[concept] = lineno
        concepts.append(concept)
    if not concepts:
        raise ValueError(f"{path}: no concepts found; write one concept a line")
    return concepts


def vocabulary_counts(concepts: list[str], texts: Iterable[str], *, progress: bool = True) -> list[tuple[str, int]]:
    """(concept, count as a noun in the captions) for a user vocabulary, in the file's order."""
    counts = count_nouns(texts, progress=progress)
    return [(c, counts.get(c, 0)) for c in concepts]
