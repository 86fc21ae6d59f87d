"""Word-level caption vocabulary built from the training captions, saved as JSON beside the model."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from storage import atomic

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

# The tokens the evaluation sees: pycocoevalcap runs Stanford's PTBTokenizer (lower-cased) and then
# drops . , ? ! : ; - -- ... and every quote. Training captions are cut the same way, so the model
# writes words the scorer counts: "doesn't" -> does n't, "can't" -> ca n't, "'STOP'" -> stop,
# "3.5" and "1,000" stay whole, "$" and "&" are words. tests/test_vocab_ptb.py compares this with
# the Java tokenizer on a corpus of tricky captions. Left different on purpose: brackets, which
# pycocoevalcap keeps as "-lrb-" / "-rrb-" tokens (its punctuation list is upper-case), are dropped.
# Words of every script stay whole, as in PTB ("café", "straße", Arabic, Devanagari; a CJK run
# without spaces is one token); non-ASCII sentence punctuation (。 ، ؟ ।), which PTB keeps as
# tokens, is dropped like its ASCII twins.
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
                "lemme": "lem me", "gimme": "gim me", "'tis": "'t is", "'twas": "'t was"}


def _mark_class() -> str:
    """A regex class of every combining mark (Unicode categories Mn, Mc, Me).

    `\\w` matches letters and digits of every script but not the marks that complete them (Devanagari
    vowel signs, a decomposed accent as in "cafe\\u0301", the dot of a lower-cased "I\\u0307"), so a word
    continues through them, as in PTB. Built from unicodedata once at import (about 50 ms).
    """
    import unicodedata

    ranges: list[list[int]] = []
    for c in (*range(0x0300, 0x20000), *range(0xE0100, 0xE01F0)):  # no marks outside these ranges
        if unicodedata.category(chr(c))[0] == "M":
            if ranges and ranges[-1][1] == c - 1:
                ranges[-1][1] = c
            else:
                ranges.append([c, c])
    return "[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges) + "]"


def _patterns(letter: str, word: str, after_word: str, digits: str) -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    """The n't, token and clitic regexes for one alphabet (ASCII, or every script).

    `letter` matches one letter, `word` a run of letters and digits, `after_word` is a lookbehind
    for the end of such a run, `digits` a run of digits.
    """
    nt = re.compile(rf"\b({letter}+)n't\b")                      # does|n't, ca|n't, wo|n't
    token = re.compile(rf"""
        {letter}(?:\.{letter})+\.?                              # abbreviations with inner periods: a.m., u.s.
      | {digits}(?:[.,:/]{digits})+                              # 3.5, 1,000, 10:30, 50/50
      | n't | '(?:s|re|ve|ll|d|m|t)\b                           # clitics, split off their word
      | {word}(?:['-]{word})*                                    # words: t-shirt, o'neill, café, हिन्दी
      | [$&%#@+=]                                                 # symbols PTB keeps as words
    """, re.VERBOSE)
    clitic = re.compile(rf"{after_word}'(s|re|ve|ll|d|m)\b")      # dog's -> dog 's (o'neill stays whole)
    return nt, token, clitic


# ASCII captions (nearly all of COCO) take the fast patterns; any other text takes the Unicode ones,
# which give the same tokens on ASCII: letters and digits of every script after lower-casing
# (`[^\W_]` is \w without the underscore, `[^\W\d_]` also without digits) and the combining marks
# inside a word. PTB keeps "café", "straße", Arabic, Devanagari and CJK words whole, and so do we.
_ASCII = _patterns("[a-z]", "[a-z0-9]+", "(?<=[a-z0-9])", "[0-9]+")
_M = _mark_class()
_UNICODE = _patterns(rf"(?:[^\W\d_]{_M}*)", rf"(?:[^\W_]+(?:{_M}[^\W_]*)*)", rf"(?:(?<=[^\W_])|(?<={_M}))", r"\d+")


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens of a caption, as the evaluation's PTB tokenizer cuts them."""
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    text = " ".join(_SPLIT_WORDS.get(w, w) for w in text.split())
    nt, token, clitic = _ASCII if text.isascii() else _UNICODE
    if "n't" in text:
        text = nt.sub(r"\1 n't", text)
    if "'" in text:
        text = clitic.sub(r" '\1", text)
    return token.findall(text)


class Vocab:
    """Words <-> ids; ids 0..3 are PAD, BOS, EOS, UNK."""

    def __init__(self, words: Iterable[str]) -> None:
        words = list(words)
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        if len(set(words)) != len(words):
            raise ValueError("a vocabulary must not repeat words")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        self.pad, self.bos, self.eos, self.unk = range(len(SPECIALS))
        self.banned = (self.pad, self.bos, self.unk)  # never generated when decoding

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> Vocab:
        """Every word seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(w for t in texts for w in tokenize(t))
        kept = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """Word ids of `text` (no BOS/EOS), unknown words as UNK, cut to `max_len` words."""
        ids = [self.index.get(w, self.unk) for w in tokenize(text)]
        return ids[:max_len] if max_len is not None else ids

    def decode(self, ids: Iterable[int]) -> str:
        """The caption of `ids`: stops at EOS, skips BOS and PAD."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if i in (self.bos, self.pad):
                continue
            out.append(self.words[i] if 0 <= i < len(self.words) else SPECIALS[self.unk])
        return " ".join(out)

    def save(self, path: str | os.PathLike) -> None:
        atomic.write_json(path, {"specials": list(SPECIALS), "words": self.words})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        data = atomic.read_json(Path(path))
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise ValueError(f"{path}: not a vocabulary file (expected a JSON object with a 'words' list)")
        try:
            return cls(data["words"])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
