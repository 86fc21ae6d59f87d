"""Caption image files with a trained checkpoint: encode them with the checkpoint's CLIP, then beam search."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given (any suffix: a bad one is reported per file), folders as their images (recursive, sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            # Any non-folder entry with an image suffix: a FIFO, device or dangling link named *.jpg is a
            # failed row (see read_image), never silently left out.
            out.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir()))
        else:
            out.append(p)  # a missing file becomes an error row, not a crash
    return out


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> str | None:
    """None for a regular file, else what the path is instead."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")


def read_image(path: Path, preprocess: Any) -> Any:
    """`preprocess` of the image at `path`; any problem raises, for the caller to make a failed row.

    Only a regular file is opened: a FIFO would block open() forever and a device may never end, so
    both are refused from os.stat (and again from the opened descriptor, in case the path was
    swapped in between; O_NONBLOCK keeps that open from waiting on a pipe). An image whose declared
    size is over PIL's Image.MAX_IMAGE_PIXELS is refused before it is decoded: PIL's
    DecompressionBombWarning (over the limit) counts as an error like its DecompressionBombError
    (over twice the limit).
    """
    from PIL import Image

    what = _not_regular(os.stat(path).st_mode)
    if what:
        raise ValueError(f"not a regular file: {path} is {what}")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    with open(path, "rb", opener=lambda name, _: os.open(name, flags)) as f:
        what = _not_regular(os.fstat(f.fileno()).st_mode)
        if what:
            raise ValueError(f"not a regular file: {path} is {what}")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                return preprocess(im.convert("RGB"))


# PIL names a file object it cannot identify by its repr, `<_io.BufferedReader name='/x/a.jpg'>`.
_FILE_REPR = re.compile(r"<_io\.BufferedReader name=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")>")


def image_error(e: BaseException) -> str:
    """`Type: message` of an image that could not be read (a file object's repr becomes its quoted path)."""
    return f"{type(e).__name__}: {_FILE_REPR.sub(lambda m: m.group(1), str(e))}"


def find_checkpoint(path: str | os.PathLike, which: str = "best") -> Path:
    """A checkpoint directory, or the `best`/`latest` checkpoint of a train stage directory."""
    from pcm import checkpoint

    return checkpoint.find(path, which)


class Captioner:
    """A trained checkpoint with its CLIP, loaded once, captioning images:

        from pcm import Captioner
        cap = Captioner.from_pretrained("runs/train/<fp>")          # or a checkpoint directory (best/)
        cap.caption(["a.jpg", "pictures/"])                         # [{"image", "caption", ...} or {"image", "error"}]

    Each captioned row also says how far to trust it (pcm.confidence): "clip_score" (image-caption cosine under
    the checkpoint's CLIP), "score_percentile" (its rank among the training pairs' scores, 0-100), "distance"
    (of the image from the training images) and "in_domain" (False, with a "reason": unlike the training
    images, the caption is likely wrong). A checkpoint made before these were saved gives "clip_score",
    "in_domain": None and "confidence": "unavailable (...)".
    """

    def __init__(self, model: Any, vocab: Any, clip: Any, device: str, checkpoint: Path, step: int,
                 reference: Any = None) -> None:
        self.model, self.vocab, self.clip, self.device = model, vocab, clip, device
        self.checkpoint, self.step = checkpoint, step
        self.reference = reference  # pcm.confidence.Reference, None for a checkpoint made before it

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, which: str = "best", clip: str | None = None,
                        device: str = "auto") -> Captioner:
        """Load a checkpoint directory (or a train stage's `which` checkpoint) and its CLIP.

        `clip`: the CLIP's directory, weights file or open_clip tag, for a checkpoint whose recorded CLIP
        is not on this machine (see pcm.identity.checkpoint_clip).
        """
        from pcm import checkpoint
        from pcm.clip import load_clip
        from pcm.device import resolve_device
        from pcm.identity import checkpoint_clip

        device = resolve_device(device)
        ckpt = find_checkpoint(path, which)
        spec = checkpoint_clip(read_clip_record(ckpt), clip, where=f"checkpoint {ckpt}")
        model, vocab, meta = checkpoint.load(ckpt, device)
        return cls(model, vocab, load_clip(spec, device), device, ckpt, meta["step"], checkpoint.load_reference(ckpt))

    def caption(self, images: Iterable[str | os.PathLike], *, beam_size: int = 3, max_len: int = 20,
                length_penalty: float = 0.0, batch_size: int = 64) -> list[dict[str, Any]]:
        """One {"image", "caption", confidence fields} (or {"image", "error"} for an unreadable file) per image,
        in input order."""
        return list(self.iter_captions(images, beam_size=beam_size, max_len=max_len,
                                       length_penalty=length_penalty, batch_size=batch_size))

    def iter_captions(self, images: Iterable[str | os.PathLike], *, beam_size: int = 3, max_len: int = 20,
                      length_penalty: float = 0.0, batch_size: int = 64) -> Iterator[dict[str, Any]]:
        """`caption`, row by row (a bar shows progress)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        paths = expand_inputs(images)
        log.info("caption: %d images with %s (step %s)", len(paths), self.checkpoint, self.step)
        yield from _caption_paths(self, paths, beam_size, max_len, length_penalty, batch_size)


def read_clip_record(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's clip.json (the CLIP spec its features came from, with its content identity)."""
    from storage import atomic
    from storage.checkpoints import CLIP

    return atomic.read_json(ckpt / CLIP)


def caption_images(checkpoint_path: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, which: str = "best",
                   beam_size: int = 3, max_len: int = 20, length_penalty: float = 0.0, batch_size: int = 64,
                   device: str = "auto", clip: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield {"image": path, "caption": text, confidence fields (see Captioner)} per image, or
    {"image": path, "error": why} when it cannot be read.

    `clip`: the checkpoint's CLIP (directory, weights file or tag) when its recorded one is not here.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    captioner = Captioner.from_pretrained(checkpoint_path, which=which, clip=clip, device=device)
    yield from captioner.iter_captions(inputs, beam_size=beam_size, max_len=max_len, length_penalty=length_penalty,
                                       batch_size=batch_size)


def _caption_paths(captioner: Captioner, paths: list[Path], beam_size: int, max_len: int, length_penalty: float,
                   batch_size: int) -> Iterator[dict[str, Any]]:
    import torch

    from pcm.clip import encode_images, encode_texts
    from pcm.confidence import assess
    from pcm.decode import beam_search

    model, vocab, clip, device = captioner.model, captioner.vocab, captioner.clip, captioner.device

    bar = tqdm(total=len(paths), desc="caption", unit="img")
    for start in range(0, len(paths), batch_size):
        batch = paths[start: start + batch_size]
        good: list[tuple[Path, Any]] = []
        results: dict[Path, dict[str, Any]] = {}
        for p in batch:
            try:
                good.append((p, read_image(p, clip.preprocess)))
            except Exception as e:  # noqa: BLE001 - one bad file is a failed row, never fatal for the others
                results[p] = {"image": str(p), "error": image_error(e)}
        if good:
            pixels = torch.stack([t for _, t in good])                          # [b, 3, H, W]
            g, patches = encode_images(clip, pixels)                           # [b, D], [b, P, W]
            ids = beam_search(model, g.to(device), patches.to(device), bos=vocab.bos, eos=vocab.eos,
                              banned=vocab.banned, beam_size=beam_size, max_len=max_len, length_penalty=length_penalty)
            texts = [vocab.decode(tokens) for tokens in ids]
            scores = (g * encode_texts(clip, texts).to(g.device)).sum(-1)         # both unit vectors: the cosine
            judged = assess(captioner.reference, scores.cpu().numpy(), patches.float().mean(1).cpu().numpy())
            for (p, _), text, judgement in zip(good, texts, judged, strict=True):
                results[p] = {"image": str(p), "caption": text, **judgement}
        for p in batch:
            yield results[p]
        bar.update(len(batch))
    bar.close()


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """The lock every `write_captions` to `out` holds while it touches `out` and its temporaries.

    An flock on `out`'s folder itself: a lock file beside `out` would be left behind (removing it
    after use lets a waiting writer lock the removed file while a third locks a new one).
    """
    import fcntl

    fd = os.open(out.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def check_output(out: str | os.PathLike) -> Path:
    """`out` as a path `--out` may write: a new path or an existing regular file, in an existing folder.

    The file is replaced by a rename, so a device (`/dev/null`), a FIFO or a symbolic link there would be
    replaced too, not written through: all are refused, and a folder, before any image is captioned.
    """
    out = Path(out).expanduser()
    try:
        mode = os.lstat(out).st_mode
    except (FileNotFoundError, NotADirectoryError):  # a folder path through a file: the caller's folder check
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise ValueError(f"--out {out} is a folder; give the path of the JSON lines file to write")
    if mode is not None and stat.S_ISLNK(mode):
        raise ValueError(f"--out {out} is a symbolic link; captions are written only to a new path or an existing "
                         "regular file (give the link's target, or another path)")
    what = None if mode is None else _not_regular(mode)
    if what:
        raise ValueError(f"--out {out} is {what}; captions are written only to a new path or an existing regular "
                         "file (give the path of the JSON lines file to write)")
    return out


def remove_stale_temporaries(out: str | os.PathLike) -> int:
    """Delete the temporaries of `out` that killed writers left (under the output's lock, so no live one's)."""
    from storage import atomic

    out = Path(out)
    if not out.parent.is_dir():
        return 0
    with _output_lock(out):
        return atomic.remove_temporaries_of(out)


def write_captions(out: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """`pcm caption --out`: rows as JSON lines, written whole to `out`; returns (rows, unreadable images).

    `out` must be a new path or a regular file (check_output, again just before the rename). A killed
    writer's temporaries of `out` are removed first, and again just before the write; both under an
    flock on `out`'s folder, which every writer holds while it writes (nothing is left beside `out`).
    """
    from storage import atomic

    out = check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    lines, failed = [], 0
    for r in rows:
        failed += "error" in r
        lines.append(json.dumps(r, ensure_ascii=False))
    with _output_lock(out):
        check_output(out)  # what stands there now, after the captioning (it may have taken hours)
        atomic.remove_temporaries_of(out)
        atomic.write_text(out, "".join(f"{line}\n" for line in lines))
    return len(lines), failed
