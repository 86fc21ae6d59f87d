"""The authors' concept file: `data/coco400_embeddings_<CLIP>_with_ensemble.pickle` of jianjieluo/PCM-Net.

The release loads it as `tag_vocab, tag_vocab_embed = pickle.load(f, encoding='bytes')` and calls
`tag_vocab_embed.float()`: a pair of the concept words (the COCO list; the paper says 446 nouns) and
their CLIP text embeddings [C, D] as a torch tensor, already averaged over a prompt ensemble whose
templates are not published. Read here through the restricted unpickler (pcm.safe_pickle, torch
tensors rebuilt with torch.load(weights_only=True)); a numpy array is accepted as well. The
embeddings are used as they are (L2-normalised), so a run uses the authors' exact concept bank.
The same file serves Flickr30k in the release (its Flickr30k configs point at the COCO file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pcm import safe_pickle

SUFFIXES = (".pickle", ".pkl")


def is_release_file(path: str | os.PathLike) -> bool:
    """Whether `path` names a pickled concept file (else a text vocabulary, one concept a line)."""
    return Path(path).suffix.lower() in SUFFIXES


def read(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(words, L2-normalised embeddings [C, D] float32) of a release concept file; errors name the file."""
    path = Path(path)
    obj = safe_pickle.load(path, allow_torch=True)
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected the release's (words, embeddings) pair, got {type(obj).__name__}"
                         f"{f' of {len(obj)}' if isinstance(obj, (tuple, list)) else ''}")
    words_raw, emb_raw = obj
    if not isinstance(words_raw, (list, tuple)) or not all(isinstance(w, (str, bytes)) for w in words_raw):
        raise ValueError(f"{path}: the first element must be the list of concept words")
    words = [" ".join(safe_pickle.text(w).split()) for w in words_raw]
    emb = emb_raw.detach().float().numpy() if hasattr(emb_raw, "detach") else np.asarray(emb_raw, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(words):
        raise ValueError(f"{path}: embeddings have shape {emb.shape}; expected [{len(words)}, D], one row per word")
    if not np.isfinite(emb).all() or not (np.linalg.norm(emb, axis=1) > 0).all():
        raise ValueError(f"{path}: embeddings hold non-finite values or zero rows")
    dup = sorted({w for w in words if words.count(w) > 1})
    if dup or not all(words):
        raise ValueError(f"{path}: concept words must be unique and non-empty (repeated: {dup[:5]})")
    return words, (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def concept_rows(path: str | os.PathLike, texts: list[str], clip: Any, progress: bool = False) -> list[dict[str, Any]]:
    """The encode stage's concept rows from a release file: its words in its order, counted as nouns in the
    training captions, with the file's embeddings (which must have this CLIP's joint width)."""
    from pcm.concepts import vocabulary_counts

    words, emb = read(path)
    if emb.shape[1] != clip.embed_dim:
        raise ValueError(f"{path}: embeddings are {emb.shape[1]}-d but {clip.spec.label()} embeds in {clip.embed_dim}-d: "
                         "use the file made with this CLIP (ViT-B32 or ViT-L14 in its name)")
    counts = vocabulary_counts(words, texts, progress=progress)
    return [{"concept": c, "count": n, "embedding": e.tolist(), "model": f"{clip.spec.label()} (release file)"}
            for (c, n), e in zip(counts, emb, strict=True)]
