"""The faithfulness report of toy-world images: the caption parser, the counterfactual captions, and the measure
pinned against drawings of the scenes themselves (near perfect) and drawings under other scenes' captions (chance)."""

from __future__ import annotations

import random
import shutil
from collections import Counter

import pytest

from pcm.toyworld import world
from pcm.toyworld.counterfactual import CHANGES, Group, parse, variants
from pcm.toyworld.dataset import SHIPPED_MODELS
from pcm.toyworld.scenes import scene_set
from storage.layout import RunLayout


def _captions(n_scenes: int, seed: int = 0) -> list[tuple[world.Scene, str]]:
    """Every phrasing of `n_scenes` scenes, plus their references (some capitalised), with the scene each describes."""
    rng = random.Random(seed)
    return [(s, t) for s in scene_set("models", n_scenes) for t in world._templates(s, rng) + world.references(s, rng)]


def test_every_world_caption_parses_back_to_its_scene_and_rebuilds_word_for_word():
    forms = Counter()
    for scene, text in _captions(600):
        p = parse(text)
        assert p is not None, text
        assert p.text() == text.lower(), text
        assert [(g.count, g.kind, g.colour) for g in p.groups] == [tuple(g) for g in scene.groups()], text
        assert p.sky in (None, scene.sky) and p.ground in (None, scene.ground), text
        forms[p.form.split(" {objs}")[0] if p.form.startswith(("a ", "an ")) else p.form] += 1
    assert len(forms) == 10, forms  # the six phrasings without an opening, and the four openings
    # it is the world's grammar, not a keyword search: other text is refused
    for other in ("a red car", "a red car on the grass at night and a dog", "a orange ball on the grass",
                  "two red car on the grass", "a red tree on the grass", "there is two red cars on the grass",
                  "a red car and a red car on the grass", "two red cars and two blue balls on the grass",
                  "a dog in the snow", "a person in brown on the grass", "a photo of a red car on the grass"):
        assert parse(other) is None, other


def _changed(a, b) -> set[str]:
    """Which attributes differ between two parses of captions (an independent comparison, field by field)."""
    out = {k for k in ("sky", "ground") if getattr(a, k) != getattr(b, k)}
    if len(a.groups) != len(b.groups):
        return out | {"groups"}
    for x, y in zip(a.groups, b.groups, strict=True):
        out |= {f for f in ("count", "kind", "colour") if getattr(x, f) != getattr(y, f)}
    return out


def _scene_of(p, like: world.Scene) -> world.Scene:
    """A scene with the parse's objects (positions from `like`'s slots: only what a caption says matters)."""
    things = [world.Thing(g.kind, g.colour, 0.0, 27.0) for g in p.groups for _ in range(g.count)]
    return world.Scene(p.sky or like.sky, p.ground or like.ground, like.horizon, tuple(things))


def test_counterfactuals_change_exactly_one_attribute_and_are_captions_of_the_world():
    seen = Counter()
    for scene, text in _captions(150, seed=1):
        p = parse(text)
        for attribute in CHANGES:
            vs = variants(p, attribute)
            assert len({v.text() for v in vs}) == len(vs), (text, attribute)
            if attribute in ("sky", "ground"):
                assert len(vs) == (0 if getattr(p, attribute) is None else 2), (text, attribute)
            for v in vs:
                seen[attribute] += 1
                again = parse(v.text())
                assert again == v, (text, v.text())          # a caption of the world's grammar
                assert _changed(p, v) == {attribute}, (text, v.text())
                # one group changed (or the sky / ground); the rest of the wording is the original's
                assert sum(x != y for x, y in zip(p.groups, v.groups, strict=True)) == (attribute in ("colour", "kind", "count"))
                assert v.form == p.form
                # the world's own reader agrees: the variant states its new scene exactly, and is wrong about
                # the original in the changed attribute
                new = _scene_of(v, scene)
                assert world.attribute_hits(new, v.text())["all"], v.text()
                hits = world.attribute_hits(scene, v.text())
                assert not hits["all"], v.text()
    assert all(seen[a] > 100 for a in CHANGES), seen


def test_counterfactuals_respect_the_world_rules():
    p = parse("a red car and two blue cars on the grass at night")
    counts = {tuple(g.count for g in v.groups) for v in variants(p, "count")}
    assert counts == {(1, 1)}                              # at most three objects: only 2 -> 1 fits
    colours = [v.text() for v in variants(p, "colour")]
    assert "two blue cars and two blue cars on the grass at night" not in colours
    assert "a blue car and two blue cars on the grass at night" not in colours   # would merge: not the world's
    assert "an orange car" not in " ".join(colours)                             # cars come in no orange
    assert variants(parse("a tree in the snow"), "colour") == []                 # a tree is always green
    assert [v.text() for v in variants(parse("a tree in the snow"), "kind")] == ["a person in green in the snow"]
    assert [v.text() for v in variants(parse("there is a red ball on the sand at dusk"), "count")] == [
        "there are two red balls on the sand at dusk", "there are three red balls on the sand at dusk"]
    assert variants(parse("a red car on the grass"), "sky") == []
    assert Group(1, "ball", "orange").text() == "an orange ball"
    with pytest.raises(ValueError, match="unknown attribute"):
        variants(p, "size")


@pytest.fixture(scope="module")
def toy_clip():
    import torch

    from pcm.toyworld.quality import load_toy_clip

    torch.set_num_threads(1)
    return load_toy_clip(SHIPPED_MODELS / "clip")


def _drawings(n: int) -> tuple[list, list[str]]:
    """`n` held-out scenes as the toy models see them (32 px) with one caption each, in a random phrasing."""
    scenes, rng = scene_set("eval", n), random.Random(5)
    return [world.model_view(world.draw(s)) for s in scenes], [world.caption(s, rng) for s in scenes]


def test_the_measure_is_near_perfect_on_the_drawings_themselves(toy_clip):
    from pcm.toyworld.faithfulness import measure

    images, captions = _drawings(120)
    r = measure(images, captions, toy_clip)
    assert r["captions_parsed"] == 120 and r["images"] == 120
    assert r["caption_to_image_r1"] >= 0.97 and r["caption_to_image_r5"] >= 0.99, r
    for a in CHANGES:
        assert r["attributes"][a]["judged"] >= 40, (a, r["attributes"][a])
        assert r["attributes"][a]["pairwise"] >= 0.95, (a, r["attributes"][a])
        assert r["attributes"][a]["beats_all"] >= 0.85, (a, r["attributes"][a])
    assert r["attributes"]["sky"]["beats_all"] >= 0.97 and r["attributes"]["ground"]["beats_all"] >= 0.97


def test_the_measure_is_at_chance_on_drawings_under_other_scenes_captions(toy_clip):
    from pcm.toyworld.faithfulness import measure

    images, captions = _drawings(120)
    shuffled = captions[1:] + captions[:1]                 # every drawing gets its neighbour's caption
    r = measure(images, shuffled, toy_clip)
    assert r["caption_to_image_r1"] <= 0.05, r
    for a in CHANGES:
        s = r["attributes"][a]
        # each image's caption is a random other scene's: it beats a variant about as often as it loses
        assert abs(s["pairwise"] - 0.5) <= 0.12, (a, s)
        assert abs(s["beats_all"] - s["chance_beats_all"]) <= 0.15, (a, s)


def test_the_stage_report_judges_a_synthesize_stage_writes_its_file_and_reuses_it(tmp_path, toy_clip, monkeypatch):
    """The oracle arm's stage (each caption's own drawing in the shards) read back through the stage's files."""
    from pcm.stages.ingest import IngestConfig, run_ingest
    from pcm.stages.synthesize import SynthesizeConfig, run_synthesize
    from pcm.toyworld import faithfulness
    from pcm.toyworld.dataset import build
    from storage import atomic

    data = tmp_path / "world"
    build(data, n_captions=60, n_val=1, n_test=1, train_images=True)
    ing = run_ingest(IngestConfig(source=str(data / "dataset_toyworld.json"), name="tw"), RunLayout(tmp_path / "runs"))
    cfg = SynthesizeConfig(model="tiny", paired_images=str(data), height=32, width=32, shard_size=25,
                           image_format="png", progress_bar=False, device="cpu")
    stage = run_synthesize(cfg, ing, RunLayout(tmp_path / "runs")).stage_dir
    monkeypatch.setattr("pcm.toyworld.quality.load_toy_clip", lambda _dir: toy_clip)

    r = faithfulness.stage_report(stage, n=40, seed=3)
    assert r["images"] == 40 and r["images_in_stage"] == 60 and r["seed"] == 3
    assert r["caption_to_image_r1"] >= 0.85 and all(r["attributes"][a]["pairwise"] >= 0.9 for a in CHANGES), r
    assert atomic.read_json(stage.faithfulness) == r
    rows = faithfulness.table_rows(r)                        # the dashboard's table: one set of columns
    assert len({tuple(row) for row in rows}) == 1 and len(rows) == 2 + 2 * len(CHANGES) + 2
    assert "R@1" in faithfulness.summary_line(r)
    ids, _, texts = faithfulness.sampled_images(stage, 40, seed=3)
    assert len(set(ids)) == 40 and ids == faithfulness.sampled_images(stage, 40, seed=3)[0]
    assert all(parse(t) for t in texts)

    def fail(*_a, **_k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(faithfulness, "measure", fail)
    assert faithfulness.stage_report(stage, n=40, seed=3) == r                  # reused from the file
    with pytest.raises(AssertionError, match="recomputed"):
        faithfulness.stage_report(stage, n=30, seed=3)                         # another choice: recomputed
    assert faithfulness.stage_report(stage, n=40, seed=3)["images"] == 40
    with pytest.raises(ValueError, match="not a finished synthesize stage"):
        faithfulness.stage_report(ing.stage_dir)


def test_the_shipped_toy_text_to_image_model_is_recognised_by_content(tmp_path, monkeypatch):
    import storage.fingerprint
    from pcm.stages.synthesize import SynthesizeConfig
    from pcm.toyworld.manifest import is_shipped

    assert is_shipped(SHIPPED_MODELS / "t2i", "t2i")
    import pcm.toyworld.manifest

    hashed = []
    for module, name in ((storage.fingerprint, "input_digest"), (pcm.toyworld.manifest, "_sha256")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda p, *a, real=real: hashed.append(p) or real(p, *a))
    assert is_shipped(SHIPPED_MODELS / "t2i", "t2i") and hashed == []   # asked again (every flow run): no file reread

    copy = tmp_path / "elsewhere" / "t2i"
    shutil.copytree(SHIPPED_MODELS / "t2i", copy)
    assert is_shipped(SHIPPED_MODELS / "t2i", "t2i") and is_shipped(copy, "t2i")
    assert not is_shipped(SHIPPED_MODELS / "clip", "t2i") and not is_shipped("tiny", "t2i")
    (copy / "scheduler" / "scheduler_config.json").write_text("{}")
    assert not is_shipped(copy, "t2i")

    from flows.synthesize import judged_by_toy_clip

    assert judged_by_toy_clip(SynthesizeConfig(model=str(SHIPPED_MODELS / "t2i")))
    assert not judged_by_toy_clip(SynthesizeConfig(model="tiny"))
    assert not judged_by_toy_clip(SynthesizeConfig(model=str(SHIPPED_MODELS / "t2i"), paired_images=str(tmp_path)))
