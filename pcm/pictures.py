"""The stages' pictures (PNG files under a stage's pictures/), drawn from explicit inputs.

Each function takes what it draws (image bytes, paths, arrays) and the file to write, never a
stage config or directory, and writes it atomically. PIL and matplotlib are imported inside the
functions (numpy too): importing a stage must not cost their start-up. The same inputs give the same bytes
(no timestamps or metadata), so a rerun's pictures are identical.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from storage import atomic

if TYPE_CHECKING:
    import numpy as np


def sample_grid(samples: Sequence[tuple[bytes, str]], out: Path, cell: int = 160) -> Path:
    """A grid of (image file bytes, caption) samples, four a row, each caption under its image; `out`."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    items = [(Image.open(io.BytesIO(data)).convert("RGB"), text) for data, text in samples]
    cols = max(1, min(4, len(items)))
    rows = max(1, math.ceil(len(items) / cols))
    text_h = 48
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for k, (img, text) in enumerate(items):
        x, y = (k % cols) * cell, (k // cols) * (cell + text_h)
        grid.paste(img.resize((cell, cell)), (x, y))
        lines = textwrap.wrap(text, width=cell // 7)[:3]
        draw.multiline_text((x + 3, y + cell + 2), "\n".join(lines), fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    return out


def pair_grid(rows: Sequence[tuple[str, bytes | None, bytes | None, str]], out: Path, cell: int = 128) -> Path:
    """One line per (caption, original image bytes, re-assigned image bytes, note): the caption and note on
    the left, then the two images (gray where one is missing); `out`."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    text_w, pad = 260, 4
    grid = Image.new("RGB", (text_w + 2 * cell + 3 * pad, max(1, len(rows)) * (cell + pad) + 16), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    draw.text((text_w + pad, 2), "original", fill="black", font=font)
    draw.text((text_w + cell + 2 * pad, 2), "re-assigned", fill="black", font=font)
    for k, (caption, original, new, note) in enumerate(rows):
        y = 16 + k * (cell + pad)
        lines = textwrap.wrap(caption, width=text_w // 7)[:6] + [note]
        draw.multiline_text((pad, y + 2), "\n".join(lines), fill="black", font=font)
        for j, data in enumerate((original, new)):
            x = text_w + pad + j * (cell + pad)
            if data is None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(200, 200, 200))
                continue
            with Image.open(io.BytesIO(data)) as im:
                grid.paste(im.convert("RGB").resize((cell, cell)), (x, y))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    return out


def score_histogram(path: Path, scores: np.ndarray, title: str, caps: dict[str, float] | None = None) -> None:
    """A PNG histogram of raw CLIP scores (cosines); `caps` marks where CXE's weight min(1, w * cos) reaches 1
    for each named w (at cos = 1 / w)."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(scores, bins=min(50, max(5, len(scores) // 10)), color="#3b6ea5")
    ax.set(xlabel="CLIP score (cosine of image and caption embeddings)", ylabel="synthetic images")
    ax.set_title(textwrap.fill(title, 64), fontsize=9)  # a long model label wraps instead of running off the figure
    if len(scores):
        ax.axvline(float(np.mean(scores)), color="#c0392b", linestyle="--", label=f"mean {np.mean(scores):.3f}")
        for (name, w), colour in zip((caps or {}).items(), ("#27ae60", "#8e44ad", "#d35400", "#7f8c8d"), strict=False):
            ax.axvline(1 / w, color=colour, linestyle=":", label=f"CXE weight 1 from here, {name} (w {w:.2f})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def thumbnail_grid(paths: list[Path | None], out: Path, tile: int = 160, cols: int = 4) -> Path | None:
    """A PNG grid of numbered thumbnails (gray where an image is missing); None when no image opens."""
    from PIL import Image, ImageDraw, UnidentifiedImageError

    if not paths:
        return None
    cols = min(cols, len(paths))
    rows = math.ceil(len(paths) / cols)
    grid = Image.new("RGB", (cols * tile, rows * tile), "white")
    draw = ImageDraw.Draw(grid)
    opened = 0
    for i, path in enumerate(paths):
        x, y = (i % cols) * tile, (i // cols) * tile
        try:
            if path is None:
                raise FileNotFoundError
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((tile - 4, tile - 4))
                grid.paste(im, (x + (tile - im.width) // 2, y + (tile - im.height) // 2))
                opened += 1
        except (OSError, UnidentifiedImageError, ValueError):
            draw.rectangle([x + 2, y + 2, x + tile - 3, y + tile - 3], fill=(200, 200, 200))
        draw.rectangle([x + 2, y + 2, x + 24, y + 18], fill="black")
        draw.text((x + 5, y + 4), str(i + 1), fill="white")
    if not opened:
        return None
    with atomic.atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    return out


def loss_curve(records: Sequence[dict], out: Path) -> Path:
    """The training loss per step and the validation metric (train's metrics.jsonl records) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val"]) for r in records if "val" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (CXE)", color="tab:blue")
    if val:
        ax2 = ax.twinx()
        metric = next((r["val_metric"] for r in records if "val" in r), "")
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange")
        ax2.set_ylabel(f"validation {metric}", color="tab:orange")
    ax.set_title("PCM-Net training")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
