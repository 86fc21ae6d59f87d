"""The toy world: captions read back into the scene records, disjoint sets, the shipped data and models,
paired-image (oracle) synthesis, and the controls (images shuffled across captions, references shuffled)."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pcm.toyworld import world
from pcm.toyworld.dataset import SHIPPED_DIR, SHIPPED_MODELS, build, read_scenes, scene_from_record, scene_record
from pcm.toyworld.scenes import three_sets
from storage.layout import RunLayout


def scenes(n: int, seed: int = 5) -> list[world.Scene]:
    rng = random.Random(seed)
    return [world.random_scene(rng) for _ in range(n)]


# -- captions and their reading ---------------------------------------------------------------
def test_a_hand_written_caption_reads_as_what_it_says():
    r = world.read_caption("Two red cars and a tree on the sandy beach at night.")
    assert (r.sky, r.ground) == ("night", "sand")
    assert r.objects == {("car", "red"): 2, ("tree", "green"): 1}
    r = world.read_caption("there are three people in blue under an orange sky")
    assert (r.sky, r.ground, r.objects) == ("sunset", None, {("person", "blue"): 3})
    # "blue sky" is the sky, not a blue object; "an orange ball" is an object
    r = world.read_caption("an orange ball under a blue sky in the snow")
    assert (r.sky, r.ground, r.objects) == ("day", "snow", {("ball", "orange"): 1})


def test_every_reference_is_true_of_its_scene():
    for s in scenes(400):
        refs = world.references(s, random.Random(1))
        assert len(refs) == len(set(refs)) == 5
        truth = Counter((t.kind, t.colour) for t in s.things)
        for ref in refs:
            r = world.read_caption(ref)
            assert r.objects == dict(truth), ref
            assert r.sky in (None, s.sky) and r.ground in (None, s.ground), ref
        assert world.attribute_hits(s, refs[0]) == dict.fromkeys(world.ATTRIBUTES, True)


def test_captions_name_objects_left_to_right_with_counts():
    s = world.Scene("day", "grass", 19, (world.Thing("car", "red", 6, 27), world.Thing("car", "red", 16, 27),
                                         world.Thing("dog", "brown", 26, 27)))
    assert s.groups() == [(2, "car", "red"), (1, "dog", "brown")]
    text = world.references(s, random.Random(0))[0]
    assert text.index("two red cars") < text.index("a brown dog")


def test_another_scenes_caption_scores_as_wrong():
    pool = scenes(300)
    wrong = [world.attribute_hits(a, world.references(b, random.Random(0))[0])["all"]
             for a, b in zip(pool, pool[1:], strict=False) if a.key() != b.key()]
    assert sum(wrong) == 0


def test_drawings_are_deterministic_and_show_the_sky_and_ground_colours():
    s = scenes(1)[0]
    a, b = np.asarray(world.draw(s)), np.asarray(world.draw(s))
    assert (a == b).all() and a.shape == (128, 128, 3)
    assert tuple(a[2, 2]) == world.SKIES[s.sky]
    assert tuple(a[-1, 1]) == world.GROUNDS[s.ground] or s.things[0].x < 8
    assert world.model_view(world.draw(s)).size == (32, 32)


# -- the three sets and the dataset -----------------------------------------------------------
def test_the_three_sets_are_disjoint_and_reproducible():
    sets = three_sets(2000, 500, 50, 100)
    assert [len(sets[k]) for k in ("models", "captions", "val", "test")] == [2000, 500, 50, 100]
    seen: set = set()
    for name in ("models", "captions", "val", "test"):
        assert not seen & set(sets[name]), name
        seen |= set(sets[name])
    assert three_sets(2000, 500, 50, 100) == sets


def test_dataset_round_trips_its_scene_records(tmp_path):
    path = build(tmp_path, n_captions=20, n_val=3, n_test=4, train_images=True)
    data = json.loads(path.read_text())
    by_split = Counter(img["split"] for img in data["images"])
    assert by_split == {"train": 20, "val": 3, "test": 4}
    assert all(len(img["sentences"]) == (1 if img["split"] == "train" else 5) for img in data["images"])
    recs = read_scenes(path)
    for img in data["images"]:
        scene = recs[f"{img['filepath']}/{img['filename']}"]
        assert scene_record(scene) == img["scene"]
        assert (tmp_path / img["filepath"] / img["filename"]).is_file()
    with pytest.raises(ValueError, match="unknown sky, ground, kind or colour"):
        scene_from_record({**data["images"][0]["scene"], "sky": "noon"})


@pytest.mark.heavy  # regenerates the shipped dataset
def test_shipped_dataset_equals_the_generator_output(tmp_path):
    from pcm.toyworld.dataset import DATASET_FILE

    build(tmp_path)
    assert (tmp_path / DATASET_FILE).read_bytes() == (SHIPPED_DIR / DATASET_FILE).read_bytes()
    shipped = sorted(p.name for p in (SHIPPED_DIR / "images").iterdir())
    assert shipped == sorted(p.name for p in (tmp_path / "images").iterdir())
    for name in shipped[::37]:   # pixels, not PNG bytes: zlib builds may compress the same pixels differently
        with Image.open(tmp_path / "images" / name) as a, Image.open(SHIPPED_DIR / "images" / name) as b:
            assert a.size == (128, 128) and a.tobytes() == b.tobytes()


# -- the shipped models -----------------------------------------------------------------------
def test_shipped_models_match_their_manifest_and_budget():
    from pcm.toyworld.manifest import check_manifest

    assert check_manifest(SHIPPED_MODELS) == []
    total = json.loads((SHIPPED_MODELS / "MANIFEST.json").read_text())["total_bytes"]
    assert total < 32 * 2**20


def test_toy_clip_loads_like_a_checkpoint_and_knows_the_world():
    import torch

    from pcm.clip import encode_images, encode_texts
    from pcm.toyworld.quality import held_out, load_toy_clip

    clip = load_toy_clip(SHIPPED_MODELS / "clip")
    assert (clip.grid, clip.patches) == (8, 64)
    sc, texts = held_out(64)
    g, patches = encode_images(clip, torch.stack([clip.preprocess(world.draw(s)) for s in sc]))
    sim = g @ encode_texts(clip, texts).T
    own = sim.diag()
    assert patches.shape == (64, 64, clip.width)
    # an image is closer to its own caption than to the average other caption, for most images
    assert ((own > (sim.sum(1) - own) / 63).float().mean()) > 0.9


def test_toy_text_to_image_loads_through_from_pretrained_and_draws_32px():
    from pcm.diffusion import load_pipeline

    pipe = load_pipeline(str(SHIPPED_MODELS / "t2i"), dtype="fp32")
    import torch

    out = pipe(["a red car on the grass at night"], num_inference_steps=4, guidance_scale=4.0, height=32, width=32,
               generator=torch.Generator().manual_seed(0)).images[0]
    px = np.asarray(out)
    assert out.size == (32, 32)
    # the night sky is dark and the grass green: the model renders the caption's bands
    assert px[:8].mean() < 110 and px[-4:, :, 1].mean() > px[-4:, :, 0].mean()


# -- oracle arm: paired images instead of synthesis -------------------------------------------
def test_paired_images_put_each_captions_own_drawing_in_the_shards(tmp_path):
    from pcm.stages.ingest import IngestConfig, run_ingest
    from pcm.stages.synthesize import SynthesizeConfig, run_synthesize
    from storage import manifests
    from storage.shards import iter_tar

    data = tmp_path / "world"
    build(data, n_captions=6, n_val=1, n_test=1, train_images=True)
    (data / "train" / "train-00002.png").unlink()
    ing = run_ingest(IngestConfig(source=str(data / "dataset_toyworld.json"), name="tw"), RunLayout(tmp_path / "runs"))
    cfg = SynthesizeConfig(model="tiny", paired_images=str(data), height=32, width=32, shard_size=4,
                           image_format="png", progress_bar=False, device="cpu")
    res = run_synthesize(cfg, ing, RunLayout(tmp_path / "runs"))
    assert res.counts["ok"] == 5 and res.counts["failed"] == 1
    rows = manifests.SAMPLES.read(res.stage_dir).to_pylist()
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and "train-00002.png" in failed[0]["error"]
    caps = {r["caption_id"]: r for r in manifests.CAPTIONS.read(ing.stage_dir).to_pylist()}
    n = 0
    for i in range(res.counts["shards"]):
        for sample in iter_tar(res.stage_dir.image_shard(i)):
            src = np.asarray(Image.open(data / caps[sample["__key__"]]["image_path"]).convert("RGB"))
            assert (np.asarray(Image.open(io.BytesIO(sample["png"]))) == src).all()
            assert json.loads(sample["json"])["paired_image"] == caps[sample["__key__"]]["image_path"]
            n += 1
    assert n == 5
    # the diffusion runs' fingerprints do not see the new field
    assert "paired_images" not in SynthesizeConfig(model="tiny").content()


def test_paired_images_must_stay_inside_their_root(tmp_path):
    from pcm.image_sources import PairedImages
    from pcm.samples import Sample

    (tmp_path / "root").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    gen = PairedImages(str(tmp_path / "root"), width=32, height=32)
    out = gen.generate_samples([Sample("a", "t", 0, "../secret.png"), Sample("b", "t", 0, None)])
    assert "escapes paired_images" in out[0] and "no image_path" in out[1]
    with pytest.raises(FileNotFoundError, match="no such directory"):
        PairedImages(str(tmp_path / "nope"), width=32, height=32)


# -- controls ----------------------------------------------------------------------------------
def test_shuffled_images_give_every_caption_another_image():
    from pcm.dataset import Pairs

    n = 50
    pairs = Pairs([f"c{i}" for i in range(n)], [f"t{i}" for i in range(n)], np.zeros(n, dtype=np.int64),
                  np.arange(n, dtype=np.int64), np.ones(n, dtype=np.float32))
    a, b = pairs.with_images_shuffled(3), pairs.with_images_shuffled(3)
    assert (a.row == b.row).all() and sorted(a.row.tolist()) == list(range(n))
    assert not (a.row == pairs.row).any() and a.caption_ids == pairs.caption_ids


def test_shuffled_references_are_never_the_images_own():
    from pcm.stages.evaluate import shuffled_references

    refs = {f"img{i}": [f"ref of {i}"] for i in range(7)}
    out = shuffled_references(refs)
    assert set(out) == set(refs) and all(out[k] != refs[k] for k in refs)
    assert sorted(map(tuple, out.values())) == sorted(map(tuple, refs.values()))


def test_world_cli_writes_a_dataset_and_checks_the_shipped_models(tmp_path):
    from typer.testing import CliRunner

    from pcm.cli import app

    runner = CliRunner()
    made = runner.invoke(app, ["world", "dataset", str(tmp_path / "w"), "--captions", "5", "--val", "1", "--test", "2"])
    assert made.exit_code == 0, made.output
    assert len(json.loads((tmp_path / "w" / "dataset_toyworld.json").read_text())["images"]) == 8
    checked = runner.invoke(app, ["world", "check"])
    assert checked.exit_code == 0 and "every file matches" in checked.output, checked.output
    (tmp_path / "m").mkdir()
    missing = runner.invoke(app, ["world", "check", str(tmp_path / "m")])
    assert missing.exit_code == 1 and "no manifest" in missing.output


# -- training the toy models ---------------------------------------------------------------------
@pytest.mark.heavy  # three short toy-CLIP trainings
def test_toy_clip_training_resumes_exactly_after_a_kill(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from pcm.toyworld.resume import save_state
    from pcm.toyworld.train_clip import WEIGHTS_FILE, ClipTrainConfig, train_clip

    cfg = ClipTrainConfig(scenes=32, steps=6, batch_size=16, checkpoint_every=2, warmup=2)
    train_clip(tmp_path / "a", cfg, tmp_path / "work-a", progress=False)

    def killed_after_step_4(path, step, modules):
        save_state(path, step, modules)
        if step == 4:
            raise KeyboardInterrupt("killed right after the step-4 checkpoint")

    monkeypatch.setattr("pcm.toyworld.train_clip.save_state", killed_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_clip(tmp_path / "b", cfg, tmp_path / "work-b", progress=False)
    monkeypatch.setattr("pcm.toyworld.train_clip.save_state", save_state)
    train_clip(tmp_path / "b", cfg, tmp_path / "work-b", progress=False)
    a, b = load_file(tmp_path / "a" / WEIGHTS_FILE), load_file(tmp_path / "b" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_toy_training_state_restores_the_rngs_and_cuts_the_log_back_to_its_step(tmp_path):
    import random

    import numpy as np
    import torch

    from pcm.toyworld.resume import load_state, save_state
    from storage import jsonl

    model = torch.nn.Linear(2, 2)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    save_state(tmp_path / "state.pt", 4, {"model": model})
    drawn = (torch.rand(3), random.random(), np.random.rand())
    for step in (2, 4, 6):                      # step 6 was logged after the checkpoint, before the kill
        jsonl.append(tmp_path / "log.jsonl", {"step": step})
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    assert load_state(tmp_path / "state.pt", {"model": torch.nn.Linear(2, 2)}, tmp_path / "log.jsonl") == 4
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(drawn[0], again[0]) and drawn[1:] == again[1:]
    assert [r["step"] for r in jsonl.read(tmp_path / "log.jsonl")] == [2, 4]


@pytest.mark.heavy  # trains both toy models (tens of seconds)
def test_train_models_command_trains_both_measures_them_and_writes_a_manifest(tmp_path):
    from typer.testing import CliRunner

    from pcm.cli import app
    from pcm.diffusion import load_pipeline
    from pcm.toyworld.manifest import check_manifest
    from pcm.toyworld.quality import load_toy_clip

    out = tmp_path / "models"
    res = CliRunner().invoke(app, ["world", "train-models", str(out), "--clip-steps", "2", "--vae-steps", "2",
                                   "--unet-steps", "2", "--scenes", "32", "--check-images", "4"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert check_manifest(out) == [] and {"clip", "t2i"} <= set(manifest["quality"])
    assert "clip/open_clip_model.safetensors" in manifest["files"] and "t2i/model_index.json" in manifest["files"]
    assert load_toy_clip(out / "clip").patches == 64
    assert load_pipeline(str(out / "t2i")).unet.config.sample_size == 8
    (out / "clip" / "open_clip_config.json").write_text("{}")
    assert any("differs from the manifest" in p for p in check_manifest(out))


def test_activation_mismatch_swaps_every_gelu_and_changes_the_features():
    from open_clip.transformer import QuickGELU

    from pcm.toyworld.quality import activation_mismatch, load_toy_clip, swap_gelu_for_quick_gelu

    clip = load_toy_clip(SHIPPED_MODELS / "clip")
    n = swap_gelu_for_quick_gelu(clip.model)
    assert n == 7 and not any(isinstance(m, torch.nn.GELU) for m in clip.model.modules())   # 4 image + 3 text blocks
    assert sum(isinstance(m, QuickGELU) for m in clip.model.modules()) == n
    got = activation_mismatch(SHIPPED_MODELS / "clip", n=20)
    assert 0.9 < got["image_cos"] < 1.0 and 0.9 < got["text_cos"] < 1.0


def test_save_pipeline_replaces_an_older_model_whole_and_leaves_no_temporaries(tmp_path):
    """The toy text-to-image trainer's save goes through storage's atomic directory (subfolders included): a second
    save replaces the first in one rename, nothing else is left beside it, and the pipeline loads back."""
    from diffusers import StableDiffusionPipeline

    from pcm import diffusion
    from pcm.toyworld.train_t2i import save_pipeline

    pipe = diffusion.build_preset("tiny")
    out = tmp_path / "t2i"
    save_pipeline(pipe, out, torch.arange(10))
    (out / "stale.txt").write_text("from an older model")
    save_pipeline(pipe, out, torch.arange(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t2i"] and not (out / "stale.txt").exists()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert next(pipe.unet.parameters()).dtype == torch.float32  # saved in fp16, handed back in fp32
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "unet" / "diffusion_pytorch_model.safetensors").values()} == {torch.float16}
    assert StableDiffusionPipeline.from_pretrained(out).unet is not None
