"""Images from existing files in place of a diffusion model, and the image bytes a synthetic shard holds.

`PairedImages` (the oracle arm: each caption's own image, resized) and `ImportedImages` (an existing
image set such as the authors' SynthImgCap, each caption's file bytes) have the interface of
`pcm.diffusion.Synthesizer`: `generate_samples(samples)` gives, per sample (anything with
`caption_id` and `image_path`), its image or the message of its failure. Two sources are equal when
they read the same images the same way, so a loaded one is reused only for the same reading.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.fingerprint import files_manifest_digest
from storage.image_sets import ImageIndex, read_mapping


@functools.lru_cache(maxsize=4)
def _image_index(root: str) -> ImageIndex:
    return ImageIndex(root)


def image_index(root: str) -> ImageIndex:
    """The index of an imported image set (names and sizes only), built once per process."""
    return _image_index(str(Path(root).resolve()))


@functools.lru_cache(maxsize=4)
def _mapping(path: str, stamp: tuple[int, int]) -> dict[str, str]:
    # Keyed on (mtime, size) rather than a digest: it is looked up once per caption, and hashing the
    # file each time would read it once per caption (the fingerprint hashes it once, in plan()).
    return read_mapping(path)


@dataclass
class PairedImages:
    """The oracle arm's stand-in for a diffusion model: each caption's own image under `root`, resized to
    `width` x `height`; a missing, unreadable or escaping image is that sample's failure."""

    root: Path
    width: int
    height: int

    def __post_init__(self) -> None:
        given, self.root = self.root, Path(self.root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"synthesize.paired_images={str(given)!r}: no such directory")

    def generate_samples(self, samples: Sequence[Any]) -> list[Any]:
        import numpy as np
        from PIL import Image

        out: list[Any] = []
        for s in samples:
            if not s.image_path:
                out.append("no image_path for this train caption in captions.parquet (paired_images needs one)")
                continue
            path = (self.root / s.image_path).resolve()
            if not path.is_relative_to(self.root):
                out.append(f"image_path {s.image_path!r} escapes paired_images {self.root}")
                continue
            try:
                with Image.open(path) as img:
                    rgb = img.convert("RGB").resize((self.width, self.height), Image.BICUBIC)
                out.append(np.asarray(rgb, dtype=np.uint8))
            except Exception as e:  # noqa: BLE001 - one bad image is a failed row, not a failed shard
                out.append(f"{path}: {type(e).__name__}: {e}")
        return out


@dataclass
class ImportedImages:
    """An existing image set under `root` in place of a diffusion model: each caption's file bytes (checked and,
    if need be, converted by `import_image` in the encoding threads), at most `max_bytes` a file.

    A caption's image is named by its caption id, or by the `mapping` CSV (caption_id -> image) when given;
    a caption without an image, or an unreadable one, is that sample's failure row.
    """

    root: str
    mapping: str | None
    max_bytes: int

    def __post_init__(self) -> None:
        self.index = image_index(self.root)

    def key(self, caption_id: str) -> str | None:
        """The key of a caption's image in the set, or None when it has none."""
        if self.mapping is None:
            return self.index.resolve(caption_id)
        st = Path(self.mapping).stat()
        image = _mapping(self.mapping, (st.st_mtime_ns, st.st_size)).get(caption_id)
        return None if image is None else self.index.resolve(image)

    def generate_samples(self, samples: Sequence[Any]) -> list[Any]:
        out: list[Any] = []
        for s in samples:
            key = self.key(s.caption_id)
            if key is None:
                where = f"mapped by {self.mapping}" if self.mapping else "named"
                out.append(f"no image {where} for caption_id {s.caption_id!r} under {self.index.root}")
                continue
            try:
                out.append(self.index.read(key, self.max_bytes))
            except OSError as e:
                out.append(f"{self.index.describe(key)}: {type(e).__name__}: {e}")
        return out


def import_image(data: bytes, image_format: str, quality: int) -> bytes:
    """An imported image's bytes, kept as they are when already in `image_format`, else re-encoded; decoded once
    either way, so an unreadable file fails here (its row) and not in the encode stage."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        fmt = (img.format or "").lower()
        img.load()
        if extra := trailing_bytes(data, fmt):
            raise ValueError(f"{extra} bytes after the end of the {fmt.upper()} image: not one whole image file")
        if fmt == image_format:
            return data
        return encode_image(np.asarray(img.convert("RGB"), dtype=np.uint8), image_format, quality)


def trailing_bytes(data: bytes, fmt: str) -> int:
    """How many bytes follow the end of a JPEG (its last EOI marker), PNG (its IEND chunk) or WebP (its RIFF size);
    0 for another format. Bytes after an image would be copied into the shard as if they were the image."""
    if fmt == "jpeg":
        end = data.rfind(b"\xff\xd9")
        return len(data) - (end + 2) if end >= 0 else 0
    if fmt == "png":
        end = data.rfind(b"IEND")
        return len(data) - (end + 8) if end >= 0 else 0   # "IEND" then its 4-byte CRC
    if fmt == "webp" and len(data) >= 8:
        return max(0, len(data) - 8 - int.from_bytes(data[4:8], "little"))
    return 0


def encode_image(pixels: Any, image_format: str, quality: int) -> bytes:
    """uint8 [H, W, 3] -> image file bytes; deterministic (no timestamps or metadata)."""
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(pixels, mode="RGB") if pixels.ndim == 3 else Image.fromarray(pixels)
    if image_format == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    elif image_format == "png":
        img.save(buf, format="PNG", compress_level=6)
    else:
        img.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()


def paired_images_digest(root: str, samples: Sequence[Any], cache_key: str) -> str:
    """The paired images' identity: names and sizes of the train images a synthesize reads (one stat each).

    Hashing a COCO train root (~20 GB) at every plan is out of the question; names + sizes of the
    files read catch a swapped or re-encoded image set, wherever the root is mounted.
    """
    return files_manifest_digest(root, [s.image_path for s in samples if s.image_path], cache_key=cache_key)
