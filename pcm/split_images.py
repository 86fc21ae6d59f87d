"""The encoded real images of one split with their reference captions: what train validates on and evaluate scores.

Read from an ingest stage's captions.parquet (the references) and an encode stage's real.parquet (where
each image's features are), and their features batched from the encode stage's real/ shards. No model
library is imported: `pcm evaluate` checks its inputs without torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storage import manifests, shards, tables
from storage.layout import StageDir


@dataclass
class SplitImages:
    """The usable images of a split (encoded, with references), sorted by image id, and those left out."""

    image_ids: list[str] = field(default_factory=list)
    shard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # feature shard of each image
    row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))     # its row in that shard
    image_paths: list[str | None] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)   # encode status != ok: {image_id, error}
    unreferenced: list[str] = field(default_factory=list)        # encoded, but no accepted caption in the split
    not_encoded: list[str] = field(default_factory=list)         # with references, absent from real.parquet

    def __len__(self) -> int:
        return len(self.image_ids)

    def references_by_id(self) -> dict[str, list[str]]:
        return dict(zip(self.image_ids, self.references, strict=True))


def _references(captions: StageDir, split: str) -> dict[str, list[str]]:
    """image id -> references: the `references` of its first accepted row (ingest gives every val/test row all
    the accepted captions of its image), else its accepted caption texts (a table without references filled)."""
    rows = manifests.CAPTIONS.read(captions, columns=["image_id", "split", "text", "references", "status"])
    given: dict[str, list[str]] = {}
    texts: dict[str, list[str]] = {}
    for r in tables.ok_rows(rows.to_pylist(), split):
        if r["references"]:
            given.setdefault(r["image_id"], list(r["references"]))
        elif r["text"] not in (seen := texts.setdefault(r["image_id"], [])):
            seen.append(r["text"])
    return {i: given.get(i) or texts[i] for i in given | texts}


def load_split_images(cap: StageDir, enc: StageDir, split: str, max_images: int | None = None) -> SplitImages:
    """The images of `split` that encode read and the captions give references for (the first `max_images` by
    image id: the order encode writes real.parquet in); images encode failed on, encoded images without
    references and images with references that were not encoded are listed apart."""
    refs = _references(cap, split)
    real = manifests.REAL.read(enc).to_pylist() if manifests.REAL.exists(enc) else []
    out, seen, usable = SplitImages(), set(), []
    for r in sorted((r for r in real if r["split"] == split), key=lambda r: r["image_id"]):
        if r["image_id"] in seen:
            continue
        seen.add(r["image_id"])
        if r["status"] != tables.STATUS_OK:
            out.failed.append({"image_id": r["image_id"], "error": r["error"] or r["status"]})
        elif r["image_id"] not in refs:
            out.unreferenced.append(r["image_id"])
        else:
            usable.append(r)
    usable = usable[:max_images]
    out.image_ids = [r["image_id"] for r in usable]
    out.shard = np.array([r["shard"] for r in usable], dtype=np.int64)
    out.row = np.array([r["row"] for r in usable], dtype=np.int64)
    out.image_paths = [r["image_path"] for r in usable]
    out.references = [refs[r["image_id"]] for r in usable]
    out.not_encoded = sorted(set(refs) - seen)
    return out


def check_features(images: SplitImages, store: Any) -> None:
    """Every feature shard of `images` is finished (file and marker) and each image's row holds it, in `store` (a
    pcm.dataset.FeatureStore of an encode stage's real/ shards); otherwise a FileNotFoundError or ValueError naming
    the shard. Checked before any batch is read: a bad shard fails the work before any image is decoded."""
    for s in sorted(set(images.shard.tolist())):
        path = store.sd.feature_shard(store.kind, s)
        if not shards.is_done(path):
            raise FileNotFoundError(f"{path}: real-image feature shard missing or unfinished; rerun the encode stage")
    store.check_rows(images.shard, images.row, images.image_ids)


def feature_batches(images: SplitImages, store: Any, device: Any, batch_size: int, *,
                    by_shard: bool = False) -> Iterator[tuple[np.ndarray, Any, Any]]:
    """(positions in `images`, their global features [b, D], their patches [b, P, W]) on `device`, `batch_size`
    images at a time, from `store` (a pcm.dataset.FeatureStore), in the stored dtype (the model widens them).

    In the split's order (image id), a batch taking images from any shards; `by_shard`: shard by shard (sorted), a
    batch never spanning two shards. Both orders are kept because a batch's make-up can move a row's floating-point
    result (matrix kernels chosen by batch size): evaluate's predictions were made shard by shard, train's
    validation scores across shards, and neither may change.
    """
    groups = ([np.flatnonzero(images.shard == s) for s in np.unique(images.shard)] if by_shard
              else [np.arange(len(images))])
    for members in groups:
        for start in range(0, len(members), batch_size):
            at = members[start: start + batch_size]
            g, v = store.gather(images.shard[at], images.row[at])
            yield at, g.to(device), v.to(device)
