"""Rendering shards: images from a source (a diffusion Synthesizer, paired or imported images) written as WebDataset
shards, one claimed shard at a time, so that the generator never waits for image encoding or tar writing.

The synthesize stage builds the source, the shard groups and the format from its config; this module
takes them as explicit arguments.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pcm.diffusion import Synthesizer
from pcm.image_sources import ImportedImages, PairedImages, encode_image, import_image
from pcm.samples import Sample
from storage import atomic, claims, manifests, tables
from storage.layout import StageDir
from storage.lock import FileLock
from storage.shards import ShardWriter, image_member, iter_tar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardFormat:
    """How a shard's samples are stored: the image encoding and each sample's `.json`."""

    image_format: str                            # jpeg, png or webp (ignored for imported bytes)
    jpeg_quality: int
    extension: str                               # the image's member suffix: jpg, png, webp
    importing: bool                              # the images are imported bytes (a failure says "import")
    metadata: Callable[[Sample], dict[str, Any]]  # what made each image (the `.json` of each sample)


def without_addresses(text: str) -> str:
    """`text` without the memory addresses of object reprs (PIL names its `<_io.BytesIO object at 0x7f...>`), so
    that identical runs write identical status rows."""
    return re.sub(r"<([\w.]+) object at 0x[0-9a-fA-F]+>", r"<\1 object>", text)


def write_shard(sd: StageDir, index: int, samples: list[Sample], results: list[Future | str], fmt: ShardFormat,
                generate_s: float) -> dict[str, int]:
    """Write one shard: images in caption order, failed samples as status rows only."""
    ext = fmt.extension
    rows: list[dict[str, Any]] = []
    with ShardWriter(sd.image_shard(index)) as w:
        for s, r in zip(samples, results, strict=True):
            error = r if isinstance(r, str) else None
            data = b""
            if error is None:
                try:
                    data = r.result()  # type: ignore[union-attr]
                except Exception as e:  # noqa: BLE001 - one bad image is a failed row, not a failed shard
                    error = (f"image {'import' if fmt.importing else 'encoding'} failed: "
                             f"{type(e).__name__}: {without_addresses(str(e))}")
            if error is not None:
                rows.append({"caption_id": s.caption_id, "shard": index, "seed": s.seed,
                             "rendered_from": s.rendered_from, "status": tables.STATUS_FAILED, "error": error})
                continue
            meta = json.dumps(fmt.metadata(s), sort_keys=True, ensure_ascii=False)
            w.write({"__key__": s.caption_id, ext: data, "txt": s.text.encode("utf-8"), "json": meta.encode("utf-8")})
            rows.append({"caption_id": s.caption_id, "shard": index, "seed": s.seed,
                         "rendered_from": s.rendered_from, "status": tables.STATUS_OK, "error": None})
        failed = sum(r["status"] == tables.STATUS_FAILED for r in rows)
        w.stats.update(ok=len(rows) - failed, failed=failed, generate_s=round(generate_s, 3))
        # The status rows go in before the tar is committed, so a done shard always has them.
        manifests.SHARD_SAMPLES.write(sd, index, rows)
    return {"ok": len(rows) - failed, "failed": failed}


def render_shards(synth: Synthesizer | PairedImages | ImportedImages, sd: StageDir, groups: list[list[Sample]],
                  todo: list[int], fmt: ShardFormat, *, redo: bool, batch_size: int, writer_threads: int,
                  progress_bar: bool, counts: dict[str, int], report: Callable[[str], None]) -> dict[str, int]:
    """Render the shards `todo` of `groups` under their claims (`redo`: even those done) and add to `counts`; the
    generator never waits for image encoding or tar writing."""
    from tqdm.auto import tqdm

    sd.shard_dir("shards").mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(len(groups[i]) for i in todo), desc="synthesize", unit="img",
               disable=not progress_bar)
    # Encoding threads turn pixels into JPEG bytes; one writer thread writes whole shards in order.
    with ThreadPoolExecutor(writer_threads, thread_name_prefix="pcm-encode") as encoders, \
            ThreadPoolExecutor(1, thread_name_prefix="pcm-shard-writer") as writer:
        in_flight: tuple[int, Future] | None = None

        def collect() -> None:
            nonlocal in_flight
            if in_flight is not None:
                index, fut = in_flight
                in_flight = None
                got = fut.result()  # re-raises a writer error (e.g. disk full) here
                counts["ok"] += got["ok"]
                counts["failed"] += got["failed"]
                counts["shards_written"] += 1
                report(f"{sd.shard_name(index)}: {got['ok']} ok, {got['failed']} failed")

        def one(index: int, lock: FileLock) -> None:
            nonlocal in_flight
            try:
                atomic.remove_stale_temporaries(sd.shard_dir("shards"), sd.shard_name(index))
                t0 = time.monotonic()
                results: list[Future | str] = []
                group = groups[index]
                for b in range(0, len(group), batch_size):
                    batch = group[b:b + batch_size]
                    for out in synth.generate_samples(batch):
                        encode = import_image if isinstance(out, bytes) else encode_image
                        results.append(out if isinstance(out, str) else encoders.submit(
                            encode, out, fmt.image_format, fmt.jpeg_quality))
                    bar.update(len(batch))
                collect()  # at most one shard waits for its writer: bounded memory
                fut = writer.submit(write_shard, sd, index, group, results, fmt, time.monotonic() - t0)
                fut.add_done_callback(lambda _f: lock.release())
                in_flight = (index, fut)
            except BaseException:
                lock.release()
                raise

        def held(index: int) -> None:
            log.info("%s is being written by another process; skipping it for now", sd.shard_name(index))

        def done_elsewhere(index: int) -> None:
            bar.update(len(groups[index]))  # so the bar reaches its total
            report(f"{sd.shard_name(index)}: written by another process")

        # Free shards first, then the ones other processes held: redone only if their holder died.
        for index, lock in claims.claim_each(todo, lambda i: sd.shard_lock("shards", i),
                                             sd.image_shard, redo=redo,
                                             on_held=held, before_waiting=collect, on_done=done_elsewhere):
            one(index, lock)
        collect()
    bar.close()
    return counts


def first_images(sd: StageDir, n_shards: int, n: int = 16) -> list[tuple[bytes, str]]:
    """The first `n` images of a stage's shards (file bytes) with their captions: what the sample grid shows."""
    items: list[tuple[bytes, str]] = []
    for i in range(n_shards):
        for sample in iter_tar(sd.image_shard(i)):
            items.append((sample[image_member(sample)], sample["txt"].decode("utf-8")))
            if len(items) >= n:
                return items
    return items
