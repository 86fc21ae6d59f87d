"""The images of the encode stage's units, decoded and batched in DataLoader worker processes.

A unit is one output shard: a synthetic WebDataset tar (its images and caption texts) or a slice
of real val/test images read from an image root. `UnitBatches` yields each unit's batches in the
same order on every run, never mixing units; a sample that does not decode is a failed row with a
reason that reads the same on every run, and a broken tar is a `fatal` batch that stops the stage.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from storage import manifests, tables
from storage.fingerprint import files_manifest_digest
from storage.layout import StageDir
from storage.shards import IMAGE_KEYS, ShardError, image_member, is_done, iter_tar, read_marker

FEATURES, REAL = "features", "real"   # the two kinds of unit, and the shard folders they write


@dataclass(frozen=True)
class Unit:
    """One output shard: a synthetic tar to encode, or a slice of real images."""

    kind: str
    index: int
    tar: str | None = None
    images: tuple[tuple[str, str, str | None], ...] = ()   # real: (image_id, split, image_path)
    expected: int | None = None                           # samples, when known in advance


_BYTESIO_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


def _reason(e: BaseException, source: str) -> str:
    """`Type: message` of a sample's error, the same on every run.

    PIL names the in-memory file it could not identify by its repr (`<_io.BytesIO object at
    0x7f...>`), an address that differs from run to run; it becomes `source` (the sample's member
    name or the image path), and any other `... at 0x...>` repr loses its address.
    """
    message = _ADDRESS.sub(">", _BYTESIO_REPR.sub(source, str(e)))
    return f"{type(e).__name__}: {message}"


def _decode(data: bytes, preprocess: Callable) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return preprocess(im.convert("RGB"))


class UnitBatches(torch.utils.data.IterableDataset):
    """Yields per-unit batches (never mixing units), so a unit's batches are the same on every run.

    Each worker takes every n-th unit; a batch is a dict with the decoded pixels and tokens of
    its ok items, the failure reasons of the others, and `last` on a unit's final batch.
    """

    def __init__(self, units: list[Unit], preprocess: Callable, tokenizer: Callable, batch_size: int,
                 images_root: str | None) -> None:
        self.units, self.preprocess, self.tokenizer = units, preprocess, tokenizer
        self.batch_size, self.images_root = batch_size, images_root

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        mine = self.units[info.id::info.num_workers] if info else self.units
        for unit in mine:
            items = self._synthetic(unit) if unit.kind == FEATURES else self._real(unit)
            try:
                yield from self._batches(unit, items)
            except ShardError as e:
                # A truncated or corrupt shard stops the stage. Sent as a batch, so the main process raises
                # it with its own message (a DataLoader worker's exception arrives wrapped in a traceback).
                yield {"kind": unit.kind, "index": unit.index, "fatal": str(e)}
                return

    def _batches(self, unit: Unit, items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        buf: list[dict[str, Any]] = []
        for item in items:
            buf.append(item)
            if len(buf) == self.batch_size:
                yield self._collate(unit, buf, last=False)
                buf = []
        yield self._collate(unit, buf, last=True)

    def _collate(self, unit: Unit, items: list[dict[str, Any]], last: bool) -> dict[str, Any]:
        ok = [it for it in items if it["error"] is None]
        batch = {"kind": unit.kind, "index": unit.index, "last": last,
                 "items": [{k: v for k, v in it.items() if k not in ("pixels", "text")} for it in items],
                 "pixels": torch.stack([it["pixels"] for it in ok]) if ok else torch.empty(0)}
        if unit.kind == FEATURES:
            batch["tokens"] = self.tokenizer([it["text"] for it in ok]) if ok else torch.empty(0, dtype=torch.long)
        return batch

    def _synthetic(self, unit: Unit) -> Iterator[dict[str, Any]]:
        name = Path(unit.tar).name
        for sample in iter_tar(unit.tar):
            key = sample["__key__"]
            item = {"key": key, "error": None}
            ext = image_member(sample)
            try:
                text = sample.get("txt", b"").decode("utf-8").strip()
                if ext is None:
                    raise ValueError(f"no image ({'/'.join(IMAGE_KEYS)}) in the sample")
                if not text:
                    raise ValueError("no caption text (.txt) in the sample")
                item["pixels"], item["text"] = _decode(sample[ext], self.preprocess), text
            except Exception as e:  # noqa: BLE001 - one bad sample is a failed row, never fatal
                item["error"] = f"{name}: sample {key}: {_reason(e, f'{key}.{ext}')}"
            yield item

    def _real(self, unit: Unit) -> Iterator[dict[str, Any]]:
        for image_id, split, rel in unit.images:
            item = {"key": image_id, "split": split, "image_path": rel, "error": None}
            path = Path(self.images_root) / rel if rel else None
            try:
                if path is None:
                    raise ValueError("no image_path in captions.parquet for this val/test image")
                if not path.resolve().is_relative_to(Path(self.images_root).resolve()):
                    raise ValueError(f"image_path {rel!r} escapes images_root {self.images_root}")
                if not path.is_file():
                    raise FileNotFoundError(f"image not found: {path}")
                item["pixels"] = _decode(path.read_bytes(), self.preprocess)
            except Exception as e:  # noqa: BLE001 - a missing or corrupt image is a failed row
                item["error"] = str(e) if isinstance(e, FileNotFoundError) else f"{path}: {_reason(e, str(path))}"
            yield item


def worker_init(_: int) -> None:
    torch.set_num_threads(1)  # each worker decodes one image at a time; no thread oversubscription


# -- planning: which units a stage encodes ------------------------------------------------------
def synthetic_units(shards: StageDir, count: int | None) -> list[Unit]:
    """One unit per synthetic shard of a finished synthesize stage directory, in index order (`count`: the shards
    its result reports; None for an older result: the shards on disk).

    Every shard must still be done on disk: a missing one is an error naming it, never a silently smaller encode.
    """
    n = shards.shard_count("shards", "tar") if count is None else count
    units = []
    for i in range(n):
        tar = shards.image_shard(i)
        if not is_done(tar):
            raise FileNotFoundError(f"{tar}: synthetic shard missing or unfinished (no .done.json); rerun the "
                                    "synthesize stage to restore it")
        units.append(Unit(FEATURES, i, tar=str(tar), expected=_marker_count(tar)))
    return units


def _marker_count(tar: Path) -> int | None:
    try:
        count = read_marker(tar).get("count")
    except ValueError:
        return None
    return count if isinstance(count, int) else None


def real_image_units(captions: StageDir, size: int) -> list[Unit]:
    """Unique val/test images of an ingest stage's ok caption rows, sorted by image_id, in slices of `size`."""
    table = manifests.CAPTIONS.read(captions, columns=["image_id", "split", "image_path", "status"])
    images: dict[str, tuple[str, str, str | None]] = {}
    for r in tables.ok_rows(table.to_pylist()):
        if r["split"] in ("val", "test") and r["image_id"] not in images:
            images[r["image_id"]] = (r["image_id"], r["split"], r["image_path"])
    rows = [images[k] for k in sorted(images)]
    return [Unit(REAL, i, images=tuple(rows[s:s + size]), expected=len(rows[s:s + size]))
            for i, s in enumerate(range(0, len(rows), size))]


def real_images_digest(images_root: str, captions: StageDir, cache_key: str) -> str:
    """The real images' identity: names and sizes of the val/test images an encode reads (one stat each).

    Hashing a COCO image root (123k JPEGs, ~20 GB) at every plan is out of the question; the names
    and sizes of the images read catch another or re-encoded image set, wherever the root is mounted,
    and cost one stat per image, once per process (`cache_key`: the captions' fingerprint).
    """
    paths = [p for u in real_image_units(captions, 1 << 30) for _, _, p in u.images if p]
    return files_manifest_digest(images_root, paths, cache_key=cache_key)
