"""Generator defects as a measured knob: the wrong-image switch, CXE's auto w and uniform control, defect presets."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import caption_row, ingest_stage

from pcm.dataset import Pairs
from pcm.loss import auto_cxe_w, clip_weights
from pcm.samples import sample_seed
from pcm.stages.pipeline import load_preset, resolve
from pcm.stages.synthesize import SynthesizeConfig, plan, planned_samples, run_synthesize
from pcm.stages.train import TrainConfig
from pcm.stages.train_worker import cxe_weighting
from storage import tables
from storage.layout import RunLayout
from storage.result import StageResult
from storage.shards import iter_tar

TINY = dict(model="tiny", steps=2, height=32, width=32, shard_size=4, batch_size=4, progress_bar=False, device="cpu")
N = 10


@pytest.fixture
def captions(tmp_path) -> StageResult:
    rows = [caption_row(f"c{i:02d}", f"a photo of a red thing number {i}") for i in range(N)]
    return ingest_stage(tmp_path / "runs", rows)


# ---------------------------------------------------------------------- synthesize.wrong_image_fraction
def test_wrong_images_are_a_seeded_derangement_of_the_chosen_captions(captions):
    own = {s.caption_id: s for s in planned_samples(SynthesizeConfig(**TINY), captions)}
    cfg = SynthesizeConfig(**TINY, wrong_image_fraction=0.5)
    samples = planned_samples(cfg, captions)
    swapped = [s for s in samples if s.rendered_from is not None]
    assert len(swapped) == round(0.5 * N)
    assert [s.caption_id for s in samples] == sorted(own)            # captions and their order are unchanged
    for s in samples:
        assert s.text == own[s.caption_id].text                      # trained on its own caption ...
        if s.rendered_from is None:
            assert (s.prompt, s.seed) == (s.text, sample_seed(0, s.caption_id))
        else:                                                        # ... rendered as another caption's image
            assert s.rendered_from != s.caption_id
            src = own[s.rendered_from]
            assert (s.prompt, s.seed) == (src.text, src.seed)
    # A permutation among the chosen: every chosen caption's image goes to exactly one other chosen caption.
    assert sorted(s.rendered_from for s in swapped) == sorted(s.caption_id for s in swapped)
    again = planned_samples(SynthesizeConfig(**TINY, wrong_image_fraction=0.5), captions)
    assert again == samples
    other = planned_samples(SynthesizeConfig(**{**TINY, "seed": 1}, wrong_image_fraction=0.5), captions)
    assert [s.rendered_from for s in other] != [s.rendered_from for s in samples]


def test_wrong_image_fraction_fingerprint_and_errors(captions, tmp_path):
    root = str(tmp_path / "runs")
    base = plan(SynthesizeConfig(**TINY), captions, RunLayout(root)).fingerprint
    assert plan(SynthesizeConfig(**TINY, wrong_image_fraction=0.0), captions,
                RunLayout(root)).fingerprint == base
    assert plan(SynthesizeConfig(**TINY, wrong_image_fraction=0.3), captions,
                RunLayout(root)).fingerprint != base
    with pytest.raises(ValueError, match="a swap needs at least 2 captions"):
        planned_samples(SynthesizeConfig(**TINY, wrong_image_fraction=0.05), captions)
    with pytest.raises(ValueError, match="less than 1"):
        SynthesizeConfig(**TINY, wrong_image_fraction=1.0)
    with pytest.raises(ValueError, match="does not apply to imported_images"):
        SynthesizeConfig(imported_images=str(tmp_path), wrong_image_fraction=0.3)


def _images(stage: str) -> dict[str, tuple[np.ndarray, dict]]:
    from PIL import Image

    return {s["__key__"]: (np.asarray(Image.open(io.BytesIO(s["png"]))).astype(int), json.loads(s["json"]))
            for p in sorted(Path(stage, "shards").glob("*.tar")) for s in iter_tar(p)}


@pytest.mark.heavy
def test_a_swapped_caption_gets_exactly_the_image_its_source_caption_gets_unswapped(captions, tmp_path):
    root = str(tmp_path / "runs")
    clean = _images(run_synthesize(SynthesizeConfig(**TINY, image_format="png"), captions,
                                   RunLayout(root)).path)
    r = run_synthesize(SynthesizeConfig(**TINY, image_format="png", wrong_image_fraction=0.4), captions,
                       RunLayout(root))
    wrong = _images(r.path)
    status = {row["caption_id"]: row for row in tables.read(Path(r.path) / "samples.parquet", tables.SAMPLES).to_pylist()}
    swapped = {cid for cid, row in status.items() if row["rendered_from"]}
    assert len(swapped) == 4
    for cid, (pixels, meta) in wrong.items():
        src = status[cid]["rendered_from"] or cid
        # The source caption's image (up to rounding: a batch of other prompts changes the float sums a little),
        # not its own.
        assert np.abs(pixels - clean[src][0]).max() <= 3
        if src != cid:
            assert np.abs(pixels - clean[cid][0]).mean() > 10 * np.abs(pixels - clean[src][0]).mean() + 1
        assert meta["text"] == clean[cid][1]["text"]                 # stored with its own caption
        assert meta.get("rendered_from") == status[cid]["rendered_from"]
        assert status[cid]["seed"] == clean[src][1]["seed"]


# ---------------------------------------------------------------------- CXE: auto w and the uniform control
def _pairs(scores: list[float]) -> Pairs:
    n = len(scores)
    return Pairs([f"c{i}" for i in range(n)], ["t"] * n, np.zeros(n, np.int64), np.arange(n),
                 np.array(scores, np.float32))


def test_auto_w_puts_the_median_pair_at_the_cap():
    scores = np.array([0.1, 0.4, 0.5, 0.6, -0.2], np.float32)
    assert auto_cxe_w(scores) == pytest.approx(1 / 0.4)
    with pytest.raises(ValueError, match="median CLIP score .* needs it positive"):
        auto_cxe_w(np.array([-0.1, 0.0, 0.2]))
    _, stats = cxe_weighting(TrainConfig(preset="tiny", cxe_w="auto"), _pairs(list(scores)))
    weights = np.clip(scores / 0.4, 0, 1)                            # computed independently
    assert stats["cxe_w"] == pytest.approx(2.5)
    assert stats["weight_mean"] == pytest.approx(weights.mean(), abs=1e-6)
    assert stats["weight_zero"] == pytest.approx(0.2) and stats["weight_cap"] == pytest.approx(0.6)
    # Without CXE, "auto" needs no positive median: nothing is weighted.
    _, off = cxe_weighting(TrainConfig(preset="tiny", cxe=False, cxe_w="auto"), _pairs([-0.5, -0.1, 0.0]))
    assert off["weight_mean"] == 1.0


def test_uniform_control_gives_every_pair_cxes_mean_weight():
    scores = [0.05, 0.2, 0.3, 0.45, 0.9, -0.3]
    config = TrainConfig(preset="tiny", cxe_w=3.0, cxe_uniform=True)
    pairs, stats = cxe_weighting(config, _pairs(scores))
    mean = float(np.clip(3.0 * np.array(scores), 0, 1).mean())
    got = clip_weights(torch.from_numpy(pairs.clip_score), 3.0).numpy()   # what the loss uses
    assert np.allclose(got, mean, atol=1e-6) and stats["uniform"]
    assert pairs.caption_ids == _pairs(scores).caption_ids and list(pairs.row) == list(range(6))
    with pytest.raises(ValueError, match="cxe_uniform .* needs cxe = true"):
        TrainConfig(preset="tiny", cxe=False, cxe_uniform=True)


def test_new_train_switches_leave_old_fingerprints_alone():
    plain = TrainConfig(preset="tiny").content()
    assert "cxe_uniform" not in plain
    assert TrainConfig(preset="tiny", cxe_uniform=True).content()["cxe_uniform"] is True
    assert TrainConfig(preset="tiny", cxe_w="auto").content()["cxe_w"] == "auto"
    with pytest.raises(ValueError, match="cxe_w"):
        TrainConfig(preset="tiny", cxe_w="soon")
    with pytest.raises(ValueError, match="cxe_w"):
        TrainConfig(preset="tiny", cxe_w=0)


# ---------------------------------------------------------------------- defect presets
def test_defect_presets_are_the_demo_with_one_knob_turned():
    demo = resolve("demo")
    for name, changed in (("demo-defective", {("synthesize", "steps"): 2, ("train", "cxe_w"): "auto"}),
                          ("demo-wrong30", {("synthesize", "wrong_image_fraction"): 0.3, ("train", "cxe_w"): "auto"})):
        cfg = resolve(name)
        for section in ("ingest", "synthesize", "encode", "train", "evaluate"):
            # run_name (TensorBoard's, runtime) names the preset: it is meant to differ.
            want = getattr(demo, section).model_dump(exclude={"run_name"}) | {
                k: v for (s, k), v in changed.items() if s == section}
            assert getattr(cfg, section).model_dump(exclude={"run_name"}) == want, (name, section)
        assert cfg.description and cfg.description != demo.description


def test_a_preset_base_must_be_another_bundled_preset(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text('base = "nope"\n')
    with pytest.raises(ValueError, match="base = 'nope' must name another bundled preset"):
        load_preset(str(bad))
    ok = tmp_path / "mine2.toml"
    ok.write_text('base = "demo-defective"\n[train]\nepochs = 3\n')
    raw = load_preset(str(ok))
    assert raw["synthesize"]["steps"] == 2 and raw["train"]["epochs"] == 3 and raw["train"]["cxe_w"] == "auto"
