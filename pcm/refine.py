"""SynC-style re-pairing of captions with synthetic images, and CLIP-score filtering, on stored embeddings.

Every function takes explicit arrays: unit-norm caption embeddings `text` [n, D] and image embeddings
`images` [m, D] (row i of both is caption i and its own synthetic image). Retrieval is blocked over
queries and keys, so memory is O(block * block + n * k) and no n x m similarity matrix is ever built
(COCO: 566k x 566k would be 1.3 TB in float32).

The rules follow SynC's released code (boreng0817/SynC at 9aa2f48; /work/shared/SYNC.md): text->image
candidates, an image->text cycle scored by caption-caption cosine, the best candidate per caption,
then the top fraction of pairs by score. Where this departs: caption-caption similarity uses the same
CLIP text embeddings as the retrieval (the release uses Sentence-BERT), and retrieval runs in float32
(the release scores in float16).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

# progress(done, total, message) after each block.
Progress = Callable[[int, int, str], None]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """`x` as float32 with unit-norm rows (the stored float16 features are unit only to ~1e-3)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    if (norm == 0).any():
        raise ValueError(f"row {int(np.nonzero(norm[:, 0] == 0)[0][0])} of an embedding matrix is all zeros; "
                         "it has no direction to compare")
    return x / norm


def topk_similar(queries: np.ndarray, keys: np.ndarray, k: int, block: int = 4096, device: str = "cpu",
                 progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The `k` keys of highest dot product for every query: (values [n, k] float32, indices [n, k] int64),
    best first. Blocks of `block` queries x `block` keys at a time: a block's top-k merges into the running
    top-k, so only a block x block similarity tile exists at once. Ties between equal scores fall either way."""
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1")
    if block < 1:
        raise ValueError(f"block={block}: must be >= 1")
    n, m = len(queries), len(keys)
    k = min(k, m)
    q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    keys_t = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32)).to(device)
    values = np.empty((n, k), dtype=np.float32)
    indices = np.empty((n, k), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, n, block):
            q = q_all[start:start + block].to(device)
            best_v = torch.full((len(q), 0), -math.inf, device=device)
            best_i = torch.empty((len(q), 0), dtype=torch.int64, device=device)
            for kstart in range(0, m, block):
                sims = q @ keys_t[kstart:kstart + block].T                     # [bq, bk]: the only tile
                v, i = torch.topk(sims, min(k, sims.shape[1]), dim=1)
                best_v, pos = torch.topk(torch.cat([best_v, v], dim=1), min(k, best_v.shape[1] + v.shape[1]), dim=1)
                best_i = torch.gather(torch.cat([best_i, i + kstart], dim=1), 1, pos)
            values[start:start + len(q)] = best_v.cpu().numpy()
            indices[start:start + len(q)] = best_i.cpu().numpy()
            if progress:
                progress(min(start + block, n), n, "retrieval")
    return values, indices


def cycle_scores(text: np.ndarray, candidates: np.ndarray, image_to_text: np.ndarray,
                 block: int = 256) -> np.ndarray:
    """Cycle consistency [n, k]: for caption q and its candidate image j, the highest cosine between caption q
    and the captions image j retrieves (`image_to_text[j]`, its i2t_k nearest captions).

    An image scores high for a caption when it "comes back" to captions that say the same thing (1.0 when
    it retrieves the caption itself). Memory: block x k x i2t_k x D floats at a time.
    """
    n, _ = candidates.shape
    out = np.empty(candidates.shape, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(text, dtype=np.float32))
    back = torch.from_numpy(np.ascontiguousarray(image_to_text, dtype=np.int64))
    cand = torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.int64))
    with torch.inference_mode():
        for start in range(0, n, block):
            c = cand[start:start + block]                  # [b, k] candidate images
            returned = t[back[c]]                          # [b, k, i2t_k, D] the captions they retrieve
            sims = torch.einsum("bd,bkmd->bkm", t[start:start + block], returned)
            out[start:start + len(c)] = sims.max(dim=2).values.numpy()
    return out


def assign(candidates: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each caption's best candidate: (image index [n], its score [n]). A tie goes to the earlier candidate,
    i.e. the one more similar to the caption by text->image retrieval (the release's argmax)."""
    best = np.argmax(scores, axis=1)                         # numpy: the first maximum
    rows = np.arange(len(candidates))
    return candidates[rows, best], scores[rows, best]


def keep_count(n: int, keep_fraction: float) -> int:
    """How many of `n` pairs the top `keep_fraction` keeps: floor(fraction * n), as the release's int(n * r)
    (the 1e-9 keeps a product such as 0.29 * 100 = 28.999... at 29)."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction={keep_fraction}: must be in (0, 1]")
    return min(n, math.floor(keep_fraction * n + 1e-9))


def keep_top(scores: np.ndarray, keep_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(rank [n], kept [n]): rank 1 is the highest score; the first keep_count(n, keep_fraction) ranks are kept.
    Equal scores rank in input order (a stable sort, as the release's sort of the dataset list)."""
    scores = np.asarray(scores)
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = np.arange(1, len(scores) + 1)
    return rank, rank <= keep_count(len(scores), keep_fraction)


def pair_cosines(text: np.ndarray, images: np.ndarray, image_index: np.ndarray) -> np.ndarray:
    """Row-wise cosine of caption i and image image_index[i] (unit rows): the CLIP score of each new pair."""
    return np.einsum("nd,nd->n", text, images[image_index]).astype(np.float32)


def sync(text: np.ndarray, images: np.ndarray, k: int, i2t_k: int, block: int = 4096, device: str = "cpu",
         progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SynC's re-assignment: (image index [n], pair score [n]) for every caption.

    Candidates: the k images nearest the caption (text->image); each is scored by `cycle_scores` with its
    i2t_k nearest captions (image->text); the caption keeps its best candidate.
    """
    if i2t_k < 1:
        raise ValueError(f"i2t_k={i2t_k}: must be >= 1")

    def stage(name: str) -> Progress | None:
        return (lambda done, total, _msg="": progress(done, total, name)) if progress else None

    _, candidates = topk_similar(text, images, k, block, device, stage("text->image candidates"))
    _, back = topk_similar(images, text, i2t_k, block, device, stage("image->text cycle"))
    cycle_block = max(1, block // (candidates.shape[1] * back.shape[1]))
    return assign(candidates, cycle_scores(text, candidates, back, cycle_block))
