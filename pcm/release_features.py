"""Encode from the authors' released CLIP features instead of running CLIP's image tower.

The encode stage's per-unit batches (see pcm.stages.encode) are produced here from the release's
per-image .npz files (storage.release_npz): the same items and caption tokens, with the features
read from the files in place of decoded pixels. CLIP still embeds the captions (CLIP scores, CXE)
and the concepts, so the CLIP spec must be the model that made the files; every file is checked
against it before it is used:

- shapes: [N, W] patches with N = the spec's patches after pooling (ViT-L/14: 8x8 = 64, pooled
  2x2 from 16x16 as the paper says), W = the transformer width; a [D] global feature;
- the definition: the patches must be the last block's tokens *before* ln_post. Tokens that went
  through ln_post are, after undoing its affine (x - b) / w, exactly zero-mean and unit-variance per
  token; tokens before it are not. Projected tokens have width D, not W.

A mismatch is an error naming the file; a missing file is that image's failed row (as a missing image is).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage import release_npz
from storage.fingerprint import files_manifest_digest
from storage.shards import iter_tar

FEATURES, REAL = "features", "real"   # the encode stage's unit kinds
# Per-token mean and std after undoing ln_post's affine: ln_post output is (0, 1) to float precision;
# a real residual stream token is far from it (CLIP's last-block tokens have outlier channels).
LN_POST_TOLERANCE = 1e-3


@functools.lru_cache(maxsize=4)
def _cached_index(real: str) -> release_npz.NpzIndex:
    return release_npz.index(real)


def npz_index(folder: str) -> release_npz.NpzIndex:
    """The folder's .npz files by name, listed once per process (plan and run both need it)."""
    return _cached_index(os.path.realpath(os.path.expanduser(folder)))


def manifest_digest(folder: str) -> str:
    """The feature set's identity for the fingerprint: names and sizes of its files, not the folder's path."""
    idx = npz_index(folder)
    return files_manifest_digest(idx.root, [str(p.relative_to(idx.root)) for p in idx.files.values()])


class FeatureMismatch(ValueError):
    """A released feature file does not match the CLIP spec or the feature definition."""


def check_features(path: Path, patches: np.ndarray, g: np.ndarray, dims: tuple[int, int, int], grid: int,
                   head: dict[str, np.ndarray]) -> None:
    """Refuse a file whose shapes or definition differ from what this CLIP spec encodes (see the module doc)."""
    D, P, W = dims
    n, w = patches.shape
    if w == D and D != W:
        raise FeatureMismatch(f"{path}: patches have width {w} = the CLIP joint width D: they were projected "
                              f"(ln_post then proj); the release and this project use the last block's tokens before "
                              f"ln_post (width {W})")
    if w != W:
        raise FeatureMismatch(f"{path}: patches have width {w}; this CLIP's transformer width is {W}: the files were "
                              "made by another CLIP model (set clip.model to the one that made them)")
    if n != P:
        if n == grid * grid and P < n:
            raise FeatureMismatch(f"{path}: {n} patches = the unpooled {grid}x{grid} grid; this CLIP spec pools to "
                                  f"{P} (clip.pool); set clip.pool=none to keep the grid, or pool the files")
        raise FeatureMismatch(f"{path}: {n} patches; this CLIP spec gives {P} (grid {grid}x{grid}, clip.pool)")
    if g.shape != (D,):
        raise FeatureMismatch(f"{path}: global feature has shape {g.shape}; this CLIP's embedding width is {D}")
    if not np.linalg.norm(g) > 0:
        raise FeatureMismatch(f"{path}: the global feature is all zeros")
    if looks_ln_post(patches, head["ln_post.weight"], head["ln_post.bias"]):
        raise FeatureMismatch(f"{path}: the patches are already layer-normalised by ln_post (zero mean, unit variance "
                              "per token after undoing its affine); the release and this project store the tokens "
                              "before ln_post")


def looks_ln_post(patches: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> bool:
    """Whether every token is ln_post's output: (x - b) / w has mean 0 and std 1 per token."""
    w = weight.astype(np.float64)
    keep = np.abs(w) > 1e-6                      # channels ln_post scales to ~0 carry no trace of it
    if not keep.any():
        return False
    z = (patches.astype(np.float64)[:, keep] - bias.astype(np.float64)[keep]) / w[keep]
    mean, std = z.mean(axis=1), z.std(axis=1)
    tol = max(LN_POST_TOLERANCE, 4 * float(np.finfo(patches.dtype).eps) ** 0.5)  # float16 files round more
    return bool((np.abs(mean) < tol).all() and (np.abs(std - 1) < tol * 10).all())


def _sample_names(sample: dict[str, Any]) -> tuple[str, ...]:
    """The names a synthetic sample's feature file may have: its key, and the file it was imported from."""
    names = [sample["__key__"]]
    try:
        meta = json.loads(sample.get("json", b"{}"))
    except (ValueError, TypeError):
        meta = {}
    if isinstance(meta, dict) and isinstance(meta.get("imported_from"), str):
        names.append(meta["imported_from"].rsplit(":", 1)[-1])  # "<tar>:<member>" or a path
    return tuple(names)


def imported_batches(units: list[Any], idx: release_npz.NpzIndex, tokenizer: Callable, batch_size: int,
                     dims: tuple[int, int, int], grid: int, head: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    """Per-unit batches as the encode stage's image loader yields them, with `imported` = (global, patches)
    float32 tensors (global L2-normalised, as CLIP's image embedding is in this project) for the ok items."""
    for unit in units:
        buf: list[dict[str, Any]] = []
        for item in (_synthetic(unit, idx) if unit.kind == FEATURES else _real(unit, idx)):
            if item["error"] is None:
                check_features(item["path"], item["patches"], item["global"], dims, grid, head)
            buf.append(item)
            if len(buf) == batch_size:
                yield _collate(unit, buf, False, tokenizer)
                buf = []
        yield _collate(unit, buf, True, tokenizer)


def _collate(unit: Any, items: list[dict[str, Any]], last: bool, tokenizer: Callable) -> dict[str, Any]:
    ok = [it for it in items if it["error"] is None]
    D = ok[0]["global"].shape[0] if ok else 0
    g = torch.from_numpy(np.stack([it["global"] for it in ok]).astype(np.float32)) if ok else torch.empty(0, D)
    p = torch.from_numpy(np.stack([it["patches"] for it in ok]).astype(np.float32)) if ok else torch.empty(0)
    batch = {"kind": unit.kind, "index": unit.index, "last": last,
             "items": [{k: v for k, v in it.items() if k not in ("global", "patches", "text", "path")} for it in items],
             "imported": (torch.nn.functional.normalize(g, dim=-1), p)}
    if unit.kind == FEATURES:
        batch["tokens"] = tokenizer([it["text"] for it in ok]) if ok else torch.empty(0, dtype=torch.long)
    return batch


def _load(item: dict[str, Any], path: Path | None, where: str) -> dict[str, Any]:
    if path is None:
        item["error"] = f"no released feature file ({where}) under the imported features folder"
        return item
    item["patches"], item["global"] = release_npz.read(path)   # a malformed file is an error naming it
    item["path"] = path
    return item


def _synthetic(unit: Any, idx: release_npz.NpzIndex) -> Iterator[dict[str, Any]]:
    name = Path(unit.tar).name
    for sample in iter_tar(unit.tar):
        item: dict[str, Any] = {"key": sample["__key__"], "error": None}
        text = sample.get("txt", b"").decode("utf-8").strip()
        if not text:
            item["error"] = f"{name}: sample {item['key']}: no caption text (.txt) in the sample"
            yield item
            continue
        item["text"] = text
        names = _sample_names(sample)
        yield _load(item, idx.find(*names), f"{name}: sample {item['key']}: tried {', '.join(names)}")


def _real(unit: Any, idx: release_npz.NpzIndex) -> Iterator[dict[str, Any]]:
    for image_id, split, rel in unit.images:
        item = {"key": image_id, "split": split, "image_path": rel, "error": None}
        yield _load(item, idx.find(image_id, rel), f"image {image_id} ({rel})")
