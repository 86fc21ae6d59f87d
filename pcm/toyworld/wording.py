"""What the toy text-to-image model understands: how much of a caption set lies outside the toy world's words.

The toy text encoder learnt only the world's caption vocabulary (`world.caption_vocabulary`, listed in
docs/toyworld.md); any other word ("cottage", "snowfield", "daylight") reaches it as an embedding it never
trained, and the image it renders ignores or misreads it. Reworded captions measured by a user: mean CLIP
score 0.321 against 0.487 for the world's own wording.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pcm.toyworld.world import caption_vocabulary

if TYPE_CHECKING:
    from storage.layout import StageDir

# Warn when more than this share of the captions hold a word the toy model never saw.
WARN_CAPTION_SHARE = 0.05
_WORD = re.compile(r"[a-z]+")


def unfamiliar(texts: Iterable[str], examples: int = 10) -> dict[str, Any]:
    """Counts of words outside the world's vocabulary: shares of words and of captions holding one, and the
    most frequent such words."""
    known = caption_vocabulary()
    n_captions = n_words = hit_captions = 0
    unknown: Counter = Counter()
    for text in texts:
        words = _WORD.findall(text.lower())
        new = [w for w in words if w not in known]
        n_captions += 1
        n_words += len(words)
        hit_captions += bool(new)
        unknown.update(new)
    return {"captions": n_captions, "words": n_words, "unfamiliar_words": sum(unknown.values()),
            "word_share": sum(unknown.values()) / n_words if n_words else 0.0,
            "caption_share": hit_captions / n_captions if n_captions else 0.0,
            "examples": [w for w, _ in unknown.most_common(examples)]}


def warning(report: dict[str, Any]) -> str | None:
    """The warning to show for a report, or None below WARN_CAPTION_SHARE."""
    if report["caption_share"] <= WARN_CAPTION_SHARE:
        return None
    return (f"{100 * report['caption_share']:.1f}% of the {report['captions']} training captions hold words the toy "
            f"text-to-image model never saw ({100 * report['word_share']:.1f}% of all words; e.g. "
            f"{', '.join(report['examples'][:5])}): it renders them wrongly or not at all. The toy world's words are "
            "listed in docs/toyworld.md (What the toy models understand)")


def train_texts(captions: StageDir) -> list[str]:
    """The ok training captions of an ingest stage (what synthesize renders)."""
    from storage import manifests, tables

    rows = manifests.CAPTIONS.read(captions, columns=["split", "text", "status"]).to_pylist()
    return [r["text"] for r in tables.ok_rows(rows, "train")]
