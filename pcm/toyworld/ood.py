"""Images unlike the toy world, to calibrate and test `pcm caption`'s out-of-domain flag (pcm.confidence).

No photos are bundled, so smooth colour gradients with soft blobs and sensor-like noise stand in for
"natural photos" (continuous tones and no flat-coloured shapes on a ground, unlike the drawings); they are
a stand-in, not photographs.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128  # the toy world's drawings are 128 x 128
_WORDS = ("the quick brown fox jumps over lazy dog invoice total due hello world lorem ipsum dolor sit amet "
          "page chapter report table figure").split()


def noise(seed: int) -> Image.Image:
    """Uniform RGB noise."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def text(seed: int) -> Image.Image:
    """Black lines of words on white (PIL's default font)."""
    r = random.Random(seed)
    im = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(im)
    for line in range(r.randint(2, 8)):
        d.text((r.randint(0, 20), 8 + 14 * line), " ".join(r.choice(_WORDS) for _ in range(3)), fill=(0, 0, 0))
    return im


def photo_like(seed: int) -> Image.Image:
    """A stand-in for a photo: a colour gradient, 2-5 soft blobs of other colours, Gaussian noise (sd 8)."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    a = r.uniform(0, 2 * np.pi)
    t = np.cos(a) * xx + np.sin(a) * yy
    t = ((t - t.min()) / (t.max() - t.min()))[..., None]
    img = r.uniform(0, 255, 3) * (1 - t) + r.uniform(0, 255, 3) * t
    for _ in range(r.integers(2, 6)):
        cx, cy, s = r.uniform(0, 1), r.uniform(0, 1), r.uniform(0.05, 0.3)
        w = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))[..., None]
        img = img * (1 - w) + r.uniform(0, 255, 3) * w
    img = img + r.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def checkerboard(seed: int) -> Image.Image:
    """Black and white squares, 2 to 16 per side."""
    n = (2, 4, 8, 16)[seed % 4]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] // (SIZE // n)
    return Image.fromarray(np.repeat((((yy + xx) % 2) * 255).astype(np.uint8)[..., None], 3, 2))


KINDS = {"noise": noise, "text": text, "photo_like": photo_like, "checkerboard": checkerboard}


def save_images(folder, kind: str, n: int, seed: int = 0) -> list:
    """`n` images of `kind` as PNGs in `folder` (made); their paths."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{kind}-{i:03d}.png"
        KINDS[kind](seed + i).save(p)
        paths.append(p)
    return paths
