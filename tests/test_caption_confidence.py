"""Confidence beside every caption (pcm.confidence) and where `pcm caption --out` may write.

The out-of-domain flag under the shipped toy CLIP: held-out toy-world drawings pass, noise, text images and
photo stand-ins are flagged; the checkpoint carries its training distribution (train writes it into step
checkpoints and best/), an older checkpoint still captions and says confidence is unavailable. `--out`
refuses devices, FIFOs, symbolic links and folders before anything, and leaves no lock file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pcm import confidence
from pcm.cli import app
from pcm.toyworld import ood, world
from pcm.toyworld.dataset import SHIPPED_DIR, SHIPPED_MODELS
from storage.checkpoints import REFERENCE, REFERENCE_ARRAYS
from storage.layout import RunLayout

N_REFERENCE = 300  # freshly drawn scenes stand in for the training images


def _test_drawings(n: int) -> list[Path]:
    return sorted((SHIPPED_DIR / "images").glob("test-*.png"))[:n]   # never among the reference scenes


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A checkpoint under the shipped toy CLIP (an untrained tiny PCM-Net: the flag does not depend on it) with a
    reference fitted to N_REFERENCE newly drawn toy-world scenes, and the same checkpoint without one."""
    from pcm import checkpoint
    from pcm.clip import ClipSpec, clip_head, encode_images, load_clip
    from pcm.model import PCMNet, load_preset
    from pcm.vocab import Vocab

    base = tmp_path_factory.mktemp("confidence")
    spec = ClipSpec(model="toyworld-clip", pretrained=f"local-dir:{SHIPPED_MODELS / 'clip'}", precision="fp32")
    clip = load_clip(spec)
    rng = random.Random(7)
    scenes = [world.random_scene(rng) for _ in range(N_REFERENCE)]
    pixels = torch.stack([clip.preprocess(world.draw(s).convert("RGB")) for s in scenes])
    _, patches = encode_images(clip, pixels)
    scores = np.linspace(-0.1, 0.5, 200)
    reference = confidence.build_reference(scores, patches.mean(1).numpy())

    torch.manual_seed(0)
    cfg = load_preset("tiny").with_data_shapes(clip.embed_dim, clip.width, clip.patches, "test")
    vocab = Vocab.build([world.caption(s, rng) for s in scenes[:50]])
    bank = torch.nn.functional.normalize(torch.randn(6, clip.embed_dim), dim=-1)
    model = PCMNet(cfg, len(vocab), bank, clip_head(clip)).eval()
    saved = dict(model=model, vocab=vocab, config={}, clip=spec.model_dump(mode="json"),
                 concept_names=[f"c{i}" for i in range(6)], state={"step": 1})
    checkpoint.save(base / "ckpt", **saved, reference=reference)
    checkpoint.save(base / "old", **saved)
    return {"checkpoint": base / "ckpt", "old": base / "old", "base": base, "clip": clip, "reference": reference,
            "scores": scores}


def _cli(*args: str) -> tuple[int, list[dict], str]:
    res = CliRunner().invoke(app, ["caption", "--device", "cpu", "--beam-size", "1", *args])
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    error = f"{type(res.exception).__name__}: {res.exception}" if res.exit_code and res.exception else ""
    return res.exit_code, rows, res.output + error   # `pcm` prints an error's message as one line (pcm.cli.run)


def test_held_out_drawings_pass_and_noise_text_and_photo_stand_ins_are_flagged(toy, tmp_path):
    odd = {kind: ood.save_images(tmp_path / kind, kind, 4) for kind in ("noise", "text", "photo_like")}
    drawings = _test_drawings(24)
    code, rows, output = _cli(*map(str, drawings), *(str(p) for ps in odd.values() for p in ps),
                              "--checkpoint", str(toy["checkpoint"]))
    assert code == 0, output
    by_image = {r["image"]: r for r in rows}
    assert len(by_image) == len(drawings) + 12
    for p in drawings:
        r = by_image[str(p)]
        assert r["in_domain"] is True and "reason" not in r, r
        assert r["distance"] <= toy["reference"].threshold
    for kind, paths in odd.items():
        for p in paths:
            r = by_image[str(p)]
            assert r["in_domain"] is False, (kind, r)
            assert r["distance"] > toy["reference"].threshold and "unlike the training images" in r["reason"]
    assert "12 images are unlike the training images" in output


def test_clip_score_is_the_image_caption_cosine_and_its_percentile_ranks_the_training_scores(toy):
    from PIL import Image

    from pcm.caption import Captioner

    cap = Captioner.from_pretrained(toy["checkpoint"], device="cpu")
    paths = _test_drawings(3)
    rows = cap.caption(paths, beam_size=1)
    clip = toy["clip"]
    for p, r in zip(paths, rows, strict=True):
        x = clip.preprocess(Image.open(p).convert("RGB"))[None]
        with torch.no_grad():   # open_clip's own encoders, not the pipeline's
            g = clip.model.encode_image(x, normalize=True)[0]
            t = clip.model.encode_text(clip.tokenizer([r["caption"]]), normalize=True)[0]
        assert r["clip_score"] == pytest.approx(float(g @ t), abs=1e-3)
        share_below = 100 * float(np.mean(toy["scores"] <= r["clip_score"]))
        assert r["score_percentile"] == pytest.approx(share_below, abs=1.5)


def test_percentile_and_distance_against_direct_computations():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(5000)
    q = np.percentile(x, confidence.QUANTILES)
    for v in (-5.0, -1.0, 0.0, 0.3, 2.0, 5.0):
        assert confidence.percentile(q, v) == pytest.approx(100 * np.mean(x <= v), abs=1.0)
    # A Gaussian with a known covariance: squared Mahalanobis distances are chi-square with W degrees of freedom.
    w = 8
    a = rng.standard_normal((w, w))
    sample = rng.standard_normal((20000, w)) @ a.T + 3.0
    mean, precision = confidence.fit_gaussian(sample, shrinkage=0.0)
    fresh = rng.standard_normal((20000, w)) @ a.T + 3.0
    d2 = confidence.distances(fresh, mean, precision) ** 2
    assert d2.mean() == pytest.approx(w, rel=0.03) and d2.var() == pytest.approx(2 * w, rel=0.1)
    assert confidence.build_reference(np.ones(5), sample[:confidence.MIN_IMAGES - 1]) is None


def test_a_checkpoint_made_before_confidence_still_captions_and_says_so(toy):
    code, rows, output = _cli(str(_test_drawings(1)[0]), "--checkpoint", str(toy["old"]))
    assert code == 0, output
    (row,) = rows
    assert row["caption"] is not None and isinstance(row["clip_score"], float)
    assert row["in_domain"] is None and row["confidence"].startswith("unavailable (checkpoint made before")
    assert "score_percentile" not in row


def test_a_damaged_reference_is_one_error_naming_the_file(toy, tmp_path):
    from pcm.caption import Captioner

    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy["checkpoint"], ckpt)
    record = json.loads((ckpt / REFERENCE).read_text())
    record["distance_quantiles"] = [1.0, 2.0]
    (ckpt / REFERENCE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"reference\.json: unreadable confidence reference"):
        Captioner.from_pretrained(ckpt, device="cpu")


def test_training_writes_the_reference_into_step_checkpoints_and_best(tmp_path):
    import pyarrow.parquet as pq
    from builders import tiny_train_config, train_inputs

    from pcm import checkpoint
    from pcm.stages.train import run_train

    cap, enc = train_inputs(tmp_path, n_train=16)
    result = run_train(tiny_train_config(epochs=1), cap, enc, RunLayout(tmp_path))
    best = checkpoint.find(result.path, "best")
    step = checkpoint.find(result.path, "latest")
    for ckpt in (best, step):
        assert (ckpt / REFERENCE).is_file() and (ckpt / REFERENCE_ARRAYS).is_file()
    ref = checkpoint.load_reference(best)
    scores = [r["clip_score"] for r in pq.read_table(enc.dir / "scores.parquet").to_pylist() if r["status"] == "ok"]
    assert ref.info["pairs"] == len(scores) == 16 and ref.info["images"] == 16
    np.testing.assert_allclose(ref.score_quantiles, np.percentile(scores, confidence.QUANTILES), atol=1e-5)
    assert json.loads((step / REFERENCE).read_text()) == json.loads((best / REFERENCE).read_text())
    exported = tmp_path / "exported"     # how a resume rewrites best/ from a step checkpoint: the reference goes too
    checkpoint.export(step, exported, {"step": 1})
    assert (exported / REFERENCE).read_bytes() == (step / REFERENCE).read_bytes()
    assert (exported / REFERENCE_ARRAYS).read_bytes() == (step / REFERENCE_ARRAYS).read_bytes()


# ---------------------------------------------------------------------- where --out may write
def _refused(toy, out: Path, what: str) -> None:
    code, rows, output = _cli(str(_test_drawings(1)[0]), "--checkpoint", str(toy["checkpoint"]), "--out", str(out))
    assert code != 0 and not rows and "ValueError" in output
    assert f"--out {out} is {what}" in " ".join(output.split()), output
    assert not list(out.parent.glob(f".{out.name}.lock")) and not list(out.parent.glob(f".tmp-{out.name}.*"))


def test_out_refuses_a_character_device_untouched(toy):
    before = os.stat("/dev/null")
    _refused(toy, Path("/dev/null"), "a character device")
    after = os.stat("/dev/null")
    assert (after.st_ino, after.st_rdev, after.st_mode) == (before.st_ino, before.st_rdev, before.st_mode)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_out_refuses_a_fifo_untouched(toy, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    ino = os.lstat(fifo).st_ino
    _refused(toy, fifo, "a FIFO")
    assert os.lstat(fifo).st_ino == ino


def test_out_refuses_a_symbolic_link_and_its_target_is_unchanged(toy, tmp_path):
    from pcm.caption import write_captions

    target = tmp_path / "kept.jsonl"
    target.write_text("precious\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    _refused(toy, link, "a symbolic link")
    assert link.is_symlink() and target.read_text() == "precious\n"
    with pytest.raises(ValueError, match="is a symbolic link"):   # the library checks too, just before the rename
        write_captions(link, iter([{"image": "a.png", "caption": "x"}]))
    assert link.is_symlink() and target.read_text() == "precious\n"


def test_out_refuses_a_folder(toy, tmp_path):
    folder = tmp_path / "captions"
    folder.mkdir()
    _refused(toy, folder, "a folder")
    assert list(folder.iterdir()) == []


def test_out_writes_a_new_file_and_replaces_a_regular_one_leaving_no_lock(toy, tmp_path):
    out = tmp_path / "captions.jsonl"
    for _ in range(2):  # new, then replaced
        code, _, output = _cli(str(_test_drawings(1)[0]), "--checkpoint", str(toy["checkpoint"]), "--out", str(out))
        assert code == 0, output
        (row,) = [json.loads(line) for line in out.read_text().splitlines()]
        assert row["in_domain"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.jsonl"]


def test_training_reference_samples_distinct_images_and_applies_the_given_margin(caplog):
    """training_reference pools each distinct (shard, row) image once and scales the threshold by `margin` (a
    default bound at definition would ignore an override: bench/caption_confidence.py --margin passes it)."""
    patches = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 40, 5, 8)).astype(np.float32))

    class Store:
        def gather(self, shard, row):
            return None, patches[torch.as_tensor(shard), torch.as_tensor(row)]

    shard, row = np.repeat([0, 1], 40), np.tile(np.arange(40), 2)
    shard, row = np.concatenate([shard, shard[:7]]), np.concatenate([row, row[:7]])  # 7 images paired twice
    scores = np.linspace(0.1, 0.3, len(shard)).astype(np.float32)
    one = confidence.training_reference(scores, shard, row, Store(), seed=3, margin=1.0)
    two = confidence.training_reference(scores, shard, row, Store(), seed=3, margin=2.0)
    assert one.info["images"] == 80 and one.info["pairs"] == 87  # distinct images, every pair's score
    assert one.info["margin"] == 1.0 and two.info["margin"] == 2.0
    assert two.threshold == pytest.approx(2 * one.threshold)
    pooled = patches.reshape(80, 5, 8).mean(1).numpy().astype(np.float64)
    mean, _ = confidence.fit_gaussian(pooled)
    assert np.allclose(one.mean, mean)
    assert confidence.training_reference(scores[:5], shard[:5], row[:5], Store(), seed=3) is None
    assert "distinct training images" in caplog.text
