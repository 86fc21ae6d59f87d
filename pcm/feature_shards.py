"""CLIP features of the encode stage's units: one DataLoader pass over a few units, each written as a feature shard.

A unit's batches (pcm.image_batches) go through CLIP in order; its status rows (CLIP score and
text embedding of a synthetic pair, or a real image's place), its float16 global and patch
features and its keys accumulate on the host, then its status table, its safetensors file and
last its done marker are written, so a killed run leaves no half shard that counts as done.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pcm.clip import ClipSpec, LoadedClip, encode_images, encode_tokens
from pcm.image_batches import FEATURES, Unit, UnitBatches, worker_init
from storage import atomic, claims, manifests, tables
from storage.arrays import write_arrays
from storage.layout import StageDir
from storage.lock import FileLock
from storage.shards import ShardError, drop_marker, is_done, write_marker

log = logging.getLogger(__name__)


@dataclass
class UnitFeatures:
    """What one unit has produced so far (feature arrays as float16 on the host)."""

    unit: Unit
    started: float = field(default_factory=time.monotonic)
    rows: list[dict[str, Any]] = field(default_factory=list)
    globals_: list[np.ndarray] = field(default_factory=list)
    patches: list[np.ndarray] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


def write_unit(sd: StageDir, acc: UnitFeatures, dims: tuple[int, int, int], spec: ClipSpec) -> dict[str, int]:
    """Status table, then the safetensors file, then the marker (written last)."""
    unit, (D, P, W) = acc.unit, dims
    kind = unit.kind
    status_file = (manifests.SHARD_SCORES if kind == FEATURES else manifests.SHARD_REAL).path(sd, unit.index)
    tables.write(status_file, acc.rows, tables.SCORES if kind == FEATURES else tables.REAL_IMAGES)
    g = np.concatenate(acc.globals_) if acc.globals_ else np.zeros((0, D), np.float16)
    p = np.concatenate(acc.patches) if acc.patches else np.zeros((0, P, W), np.float16)
    features = sd.feature_shard(kind, unit.index)
    write_arrays(features, {"global": g, "patches": p},
                 {"keys": json.dumps(acc.keys), "clip": spec.model_dump_json()})
    failed = sum(r["status"] != tables.STATUS_OK for r in acc.rows)
    write_marker(features, {"count": len(acc.keys), "failed": failed,
                                   "seconds": round(time.monotonic() - acc.started, 3)})
    return {"ok": len(acc.keys), "failed": failed}


def add_batch(acc: UnitFeatures, batch: dict[str, Any], clip: LoadedClip) -> int:
    """Run CLIP on a batch's ok images and append rows; returns the number of images encoded."""
    imported = batch.get("imported")  # (global, patches) from the release's files (encode.imported_features)
    n_ok = int((batch["pixels"] if imported is None else imported[0]).shape[0])
    if n_ok:
        g, patches = encode_images(clip, batch["pixels"]) if imported is None else imported  # [n, D], [n, P, W]
        if acc.unit.kind == FEATURES:
            t = encode_tokens(clip, batch["tokens"])                 # [n, D]
            scores = (g * t).sum(-1).cpu().numpy()                   # cosine: both are unit vectors
            t = t.cpu().numpy()
        acc.globals_.append(g.half().cpu().numpy())
        acc.patches.append(patches.half().cpu().numpy())
    j = 0
    for item in batch["items"]:
        ok = item["error"] is None
        row = len(acc.keys) if ok else -1
        if ok:
            acc.keys.append(item["key"])
        status = {"status": tables.STATUS_OK if ok else tables.STATUS_FAILED, "error": item["error"],
                  "shard": acc.unit.index, "row": row}
        if acc.unit.kind == FEATURES:
            acc.rows.append({"caption_id": item["key"], "clip_score": float(scores[j]) if ok else None,
                             "text_embedding": t[j].tolist() if ok else None, **status})
        else:
            acc.rows.append({"image_id": item["key"], "split": item["split"], "image_path": item["image_path"],
                             **status})
        j += ok
    return n_ok


def encode_pass(sd: StageDir, units: list[Unit], clip: LoadedClip, *, batch_size: int, num_workers: int,
                pin_memory: bool, images_root: str | None, progress_bar: bool,
                report: Callable[[Unit, dict[str, int]], None], batches: Iterable[dict] | None = None) -> int:
    """Encode `units` (whose locks the caller holds) in one DataLoader pass of `num_workers` workers and
    `batch_size` images a batch; `report(unit, {ok, failed})` after each unit's shard is written. Returns the
    number of images encoded.

    Decoding runs in the workers, CLIP in this process, and a unit's shard is written on a thread so
    the device keeps working; `images_root`: where the real units' image paths start; `batches`: batches
    made elsewhere in place of decoding images (the release's features: pcm.release_features).
    """
    dims = (clip.embed_dim, clip.patches, clip.width)
    if batches is not None:
        loader = batches
    else:
        dataset = UnitBatches(units, clip.preprocess, clip.tokenizer, batch_size, images_root)
        workers = min(num_workers, len(units))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, worker_init_fn=worker_init if workers else None,
            pin_memory=pin_memory and clip.device.startswith("cuda"),
            prefetch_factor=4 if workers else None)
    known = [u.expected for u in units]
    total = sum(known) if all(k is not None for k in known) else None
    accs: dict[tuple[str, int], UnitFeatures] = {}
    by_id = {(u.kind, u.index): u for u in units}
    encoded = 0
    pending: list[tuple[Unit, Future]] = []

    def collect(wait: bool) -> None:
        for unit, fut in list(pending):
            if wait or fut.done():
                report(unit, fut.result())  # re-raises a write error here
                pending.remove((unit, fut))

    # Writing a shard (hundreds of MB for ViT-L/14) happens on a thread so the device keeps working.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode-writer") as writer, \
            tqdm(total=total, unit="img", desc="encode", disable=not progress_bar) as bar:
        for batch in loader:
            if "fatal" in batch:
                raise ShardError(batch["fatal"])
            key = (batch["kind"], batch["index"])
            acc = accs.setdefault(key, UnitFeatures(by_id[key]))
            encoded += add_batch(acc, batch, clip)
            bar.update(len(batch["items"]))
            if batch["last"]:
                pending.append((acc.unit, writer.submit(write_unit, sd, accs.pop(key), dims, clip.spec)))
            collect(wait=False)
        collect(wait=True)
    return encoded


def encode_claimed(sd: StageDir, units: list[Unit], *, clip: LoadedClip | None, load_clip: Callable[[], LoadedClip],
                   window: int, batch_size: int, num_workers: int, pin_memory: bool, images_root: str | None,
                   progress_bar: bool, batches_for: Callable[[list[Unit], LoadedClip], Iterable[dict] | None],
                   progress: Callable[[int, int, str], None] | None = None) -> tuple[int, float, LoadedClip | None]:
    """Encode the pending `units` under their shard locks, `window` at a time (storage.claims.claim_windows), so
    several processes on one stage share them; units another process holds are waited for. CLIP is loaded
    (`load_clip`) only when a unit needs it; `batches_for(units, clip)`: batches made elsewhere, or None to
    decode images. Returns (images encoded here, seconds spent encoding them, the loaded CLIP or None).
    """
    todo = [u for u in units if not unit_done(sd, u.kind, u.index)]
    done_count = len(units) - len(todo)
    encoded, seconds = 0, 0.0
    locks: dict[tuple[str, int], FileLock] = {}   # the shard locks this process holds

    def report(unit: Unit, stats: dict[str, int]) -> None:
        nonlocal done_count
        locks.pop((unit.kind, unit.index)).release()
        done_count += 1
        log.info("%s/%s: %d ok, %d failed", unit.kind, sd.shard_name(unit.index), stats["ok"], stats["failed"])
        if progress:
            progress(done_count, len(units), f"{unit.kind} {sd.shard_name(unit.index)}")

    def done_elsewhere(unit: Unit) -> None:
        nonlocal done_count
        done_count += 1   # another process encoded it: progress still reaches len(units)
        if progress:
            progress(done_count, len(units), f"{unit.kind} {sd.shard_name(unit.index)} (by another process)")

    for claimed in claims.claim_windows(todo, lambda u: sd.shard_lock(u.kind, u.index),
                                        lambda u: sd.feature_shard(u.kind, u.index),
                                        window=window, on_done=done_elsewhere):
        locks.update({(u.kind, u.index): lock for u, lock in claimed})
        try:
            for u, _ in claimed:
                atomic.remove_stale_temporaries(sd.shard_dir(u.kind), sd.shard_name(u.index))  # a killed writer's
            if clip is None:
                clip = load_clip()
            t0 = time.monotonic()
            todo = [u for u, _ in claimed]
            encoded += encode_pass(sd, todo, clip, batch_size=batch_size, num_workers=num_workers,
                                   pin_memory=pin_memory, images_root=images_root, progress_bar=progress_bar,
                                   report=report, batches=batches_for(todo, clip))
            seconds += time.monotonic() - t0
        finally:
            for lock in locks.values():
                lock.release()
            locks.clear()
    return encoded, seconds, clip


def unit_done(sd: StageDir, kind: str, index: int) -> bool:
    """Whether feature shard `index` of `kind` (features, real) is done: its marker is there."""
    return is_done(sd.feature_shard(kind, index))


def withdraw_units(sd: StageDir, units: list[Unit]) -> None:
    """Drop the units' done markers (from an object store too), so that they are encoded again."""
    for u in units:
        drop_marker(sd.feature_shard(u.kind, u.index), store=True)
