"""`pcm caption` on inputs that are not plain, reasonable images: each is one failed row, the rest is captioned.

Decompression bombs (an image declaring more pixels than PIL's Image.MAX_IMAGE_PIXELS: over the limit PIL
warns, over twice the limit it raises), FIFOs (open() would block forever) and a folder entry that is not a
file must never stop the run nor hang it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import TRAIN_TEXTS, make_images
from typer.testing import CliRunner

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint (tiny CLIP, tiny PCM-Net) and four good 48x64 images."""
    from pcm import checkpoint
    from pcm.clip import ClipSpec, clip_head, load_clip
    from pcm.model import PCMNet, load_preset
    from pcm.vocab import Vocab

    base = tmp_path_factory.mktemp("caption-inputs")
    spec = ClipSpec(model="tiny", pretrained=None, precision="fp32")
    clip = load_clip(spec)
    torch.manual_seed(0)
    cfg = load_preset("tiny").with_data_shapes(clip.embed_dim, clip.width, clip.patches, "test")
    vocab = Vocab.build(TRAIN_TEXTS)
    bank = torch.nn.functional.normalize(torch.randn(6, clip.embed_dim), dim=-1)
    model = PCMNet(cfg, len(vocab), bank, clip_head(clip)).eval()
    where = base / "ckpt"
    checkpoint.save(where, model=model, vocab=vocab, config={}, clip=spec.model_dump(mode="json"),
                    concept_names=[f"c{i}" for i in range(6)], state={"step": 1})
    return {"checkpoint": str(where), "images": make_images(base / "good", ["g1", "g2", "g3", "g4"])}


def _png(path: Path, height: int, width: int) -> Path:
    from PIL import Image

    Image.fromarray(np.full((height, width, 3), 127, dtype=np.uint8)).save(path)
    return path


def _caption(ckpt, inputs, **kw) -> list[dict]:
    from pcm.caption import caption_images

    return list(caption_images(ckpt["checkpoint"], inputs, device="cpu", **kw))


def _finishing(fn, fifos: list[Path], timeout: float = 180.0):
    """fn() in a thread; if it is still running after `timeout` (blocked opening a FIFO), the FIFOs get a
    writer so it can end, and the test fails."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # releases a reader blocked in open()
            except OSError:
                pass
        t.join(30)
        pytest.fail(f"captioning did not finish within {timeout:.0f} s (blocked on a FIFO?)")
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.bad_input
@needs_fifo
def test_bombs_fifos_and_odd_entries_are_failed_rows_and_the_rest_is_captioned(ckpt, tmp_path, monkeypatch):
    from PIL import Image

    good = ckpt["images"]
    want = [r["caption"] for r in _caption(ckpt, good)]
    assert len(want) == len(good) and all(isinstance(c, str) for c in want)

    # Good images have 48 * 64 = 3072 pixels; with a limit of 10,000 a 120x120 image (14,400) is over
    # the limit (PIL warns) and a 200x200 one (40,000) is over twice the limit (PIL raises).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    warn_bomb = _png(tmp_path / "warn_bomb.png", 120, 120)
    bomb = _png(tmp_path / "bomb.png", 200, 200)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a_good.png").write_bytes(good[2].read_bytes())
    os.mkfifo(folder / "b_pipe.png")               # a FIFO inside a folder: a failed row, not left out
    _png(folder / "c_bomb.png", 200, 200)
    (folder / "d_dir.png").mkdir()                  # a folder named like an image is searched, not a row
    (folder / "d_dir.png" / "e_good.png").write_bytes(good[3].read_bytes())

    inputs = [good[0], bomb, fifo, warn_bomb, good[1], folder]
    rows = _finishing(lambda: _caption(ckpt, inputs, batch_size=2), [fifo, folder / "b_pipe.png"])

    names = [Path(r["image"]).name for r in rows]
    assert names == ["g1.png", "bomb.png", "pipe.jpg", "warn_bomb.png", "g2.png",
                     "a_good.png", "b_pipe.png", "c_bomb.png", "e_good.png"]
    by_name = dict(zip(names, rows, strict=True))
    for name in ("bomb.png", "pipe.jpg", "warn_bomb.png", "b_pipe.png", "c_bomb.png"):
        assert "caption" not in by_name[name] and by_name[name]["error"], by_name[name]
    assert by_name["bomb.png"]["error"].startswith("DecompressionBombError: ")
    assert by_name["c_bomb.png"]["error"].startswith("DecompressionBombError: ")
    assert by_name["warn_bomb.png"]["error"].startswith("DecompressionBombWarning: ")
    assert "14400 pixels" in by_name["warn_bomb.png"]["error"]
    assert by_name["pipe.jpg"]["error"] == f"ValueError: not a regular file: {fifo} is a FIFO (named pipe)"
    assert "FIFO" in by_name["b_pipe.png"]["error"]
    assert [by_name[n]["caption"] for n in ("g1.png", "g2.png", "a_good.png", "e_good.png")] == want


@pytest.mark.bad_input
@needs_fifo
def test_caption_command_writes_every_row_despite_a_bomb_and_a_fifo(ckpt, tmp_path, monkeypatch):
    from PIL import Image

    from pcm.cli import app

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    bomb = _png(tmp_path / "bomb.png", 200, 200)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    missing = tmp_path / "missing.png"
    out = tmp_path / "captions.jsonl"
    args = ["caption", str(ckpt["images"][0]), str(bomb), str(fifo), str(missing), str(tmp_path / "none_here"),
            "--checkpoint", ckpt["checkpoint"], "--out", str(out), "--device", "cpu"]
    res = _finishing(lambda: CliRunner().invoke(app, args), [fifo])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["g1.png", "bomb.png", "pipe.png", "missing.png", "none_here"]
    assert "caption" in rows[0] and "error" not in rows[0]
    assert rows[1]["error"].startswith("DecompressionBombError: ")
    assert "FIFO" in rows[2]["error"]
    assert rows[3]["error"].startswith("FileNotFoundError: ") and rows[4]["error"].startswith("FileNotFoundError: ")
    assert "4 images could not be read" in res.output


@pytest.mark.bad_input
@needs_fifo
def test_a_fifo_is_a_failed_row_at_once_not_a_hang(ckpt, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    rows = _finishing(lambda: _caption(ckpt, [fifo, ckpt["images"][0]]), [fifo], timeout=60)
    assert rows[0] == {"image": str(fifo), "error": f"ValueError: not a regular file: {fifo} is a FIFO (named pipe)"}
    assert "caption" in rows[1] and "error" not in rows[1]   # (and its confidence fields)


@pytest.mark.bad_input
def test_an_unidentified_image_names_its_path(ckpt, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    [row] = _caption(ckpt, [broken])
    assert row == {"image": str(broken), "error": f"UnidentifiedImageError: cannot identify image file {str(broken)!r}"}
