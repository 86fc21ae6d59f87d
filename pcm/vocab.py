"""Word-level caption vocabulary built from the training captions, saved as JSON beside the model."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from storage import atomic

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Lowercase words and digits; a clitic ("'s", "'re") is its own token as the PTB tokenizer of
# the evaluation makes it, and other punctuation is dropped as the evaluation drops it.
_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*|'[a-z]+")  # "t-shirt" stays one word, as PTB keeps it


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens of a caption."""
    return _TOKEN.findall(text.lower())


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
