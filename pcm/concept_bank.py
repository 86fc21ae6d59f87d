"""The concept bank's rows: the concept words (extracted from the training captions, or given) with their counts and
CLIP prompt embeddings, as the encode stage writes them to concepts.parquet."""

from __future__ import annotations

from typing import Any

from pcm import concepts
from pcm.clip import LoadedClip, embed_concepts
from storage import manifests, tables
from storage.layout import StageDir


def caption_texts(captions: StageDir) -> list[str]:
    """The ok training captions of an ingest stage, in file order."""
    table = manifests.CAPTIONS.read(captions, columns=["split", "text", "status"])
    return [r["text"] for r in tables.ok_rows(table.to_pylist(), "train") if r["text"]]


def concept_words(encode: StageDir) -> list[str]:
    """The concept words of a finished encode stage, in its order."""
    return manifests.CONCEPTS.read(encode, columns=["concept"]).column("concept").to_pylist()


def concept_rows(texts: list[str], clip: LoadedClip, *, words: list[str] | None, min_count: int, top_n: int | None,
                 prompt: str, prompt_ensemble: str | None, progress_bar: bool,
                 batch_size: int = 256) -> list[dict[str, Any]]:
    """`words` (None: the nouns of `texts` seen at least `min_count` times, the `top_n` most frequent) counted in
    `texts` and embedded by `clip` through `prompt` (and `prompt_ensemble`'s templates)."""
    vocab = (concepts.vocabulary_counts(words, texts, progress=progress_bar) if words is not None
             else concepts.extract_concepts(texts, min_count=min_count, top_n=top_n, progress=progress_bar))
    if not vocab:
        raise ValueError(f"no concept has min_count={min_count} occurrences among the {len(texts)} training "
                         "captions; lower min_count or pass vocabulary_file")
    emb = embed_concepts(clip, [c for c, _ in vocab], prompt, prompt_ensemble, batch_size)
    return [{"concept": c, "count": n, "embedding": e.tolist(), "model": clip.spec.label()}
            for (c, n), e in zip(vocab, emb, strict=True)]
