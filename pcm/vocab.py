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
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
                "lemme": "lem me", "gimme": "gim me", "'tis": "'t is", "'twas": "'t was"}
_NT = re.compile(r"\b([a-z]+)n't\b")                   # does|n't, ca|n't, wo|n't
_TOKEN = re.compile(r"""
    [a-z](?:\.[a-z])+\.?                               # abbreviations with inner periods: a.m., u.s.
  | [0-9]+(?:[.,:/][0-9]+)+                              # 3.5, 1,000, 10:30, 50/50
  | n't | '(?:s|re|ve|ll|d|m|t)\b                       # clitics, split off their word
  | [a-z0-9]+(?:['-][a-z0-9]+)*                        # words: t-shirt, o'neill
  | [$&%#@+=]                                           # symbols PTB keeps as words
""", re.VERBOSE)
_CLITIC = re.compile(r"(?<=[a-z0-9])'(s|re|ve|ll|d|m)\b")


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens of a caption, as the evaluation's PTB tokenizer cuts them."""
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    text = " ".join(_SPLIT_WORDS.get(w, w) for w in text.split())
    text = _NT.sub(r"\1 n't", text)
    text = _CLITIC.sub(r" '\1", text)                    # dog's -> dog 's (o'neill stays whole)
    return _TOKEN.findall(text)


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
