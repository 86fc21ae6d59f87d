"""Pipeline presets, overrides and `pcm run`: one typed config, validated before anything runs."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from pcm.cli import app
from pcm.pipeline_presets import load_preset, preset_names
from pcm.stages.pipeline import apply_overrides, parse_assignments, resolve


@pytest.mark.parametrize("name", ["demo", "tiny", "coco-vitl14", "coco-vitb32", "flickr30k-vitl14"])
def test_every_preset_validates(name):
    cfg = resolve(name)
    assert cfg.name == name
    assert cfg.evaluate.split == "test" and cfg.evaluate.beam_size == 3


def test_published_settings_follow_the_paper():
    l14, b32 = resolve("coco-vitl14"), resolve("coco-vitb32")
    assert (l14.encode.clip.model, l14.encode.clip.pool, l14.train.preset, l14.train.cxe_w) == ("ViT-L-14", 8, "vitl14", 4.0)
    assert (b32.encode.clip.model, b32.train.preset) == ("ViT-B-32", "vitb32")
    assert l14.train.batch_size == 32 and l14.train.epochs == 12 and l14.train.warmup == 10_000
    assert resolve("flickr30k-vitl14").ingest.source.endswith("dataset_flickr30k.json")


def test_encoder_dropout_follows_the_release_per_dataset_and_backbone():
    # The release: 0.25 for COCO ViT-L/14 only; 0.2 for COCO ViT-B/32 and for Flickr30k.
    got = {n: resolve(n).train.model_preset().dropout for n in ("coco-vitl14", "coco-vitb32", "flickr30k-vitl14")}
    assert got == {"coco-vitl14": 0.25, "coco-vitb32": 0.2, "flickr30k-vitl14": 0.2}


def test_demo_points_at_the_toy_world_and_its_shipped_models():
    cfg = resolve("demo")
    assert cfg.ingest.source.endswith("pcm/data/toyworld/dataset_toyworld.json")
    assert cfg.encode.images_root.endswith("pcm/data/toyworld")
    assert cfg.synthesize.model.endswith("pcm/data/toymodels/t2i")
    assert cfg.encode.clip.pretrained.endswith("pcm/data/toymodels/clip") and cfg.train.preset == "toy"
    assert not {"{demo}", "{toyworld}", "{toymodels}"} & set(re.findall(r"\{\w+\}", json.dumps(cfg.model_dump(mode="json"))))


def test_tiny_points_at_the_bundled_random_weight_demo_data():
    cfg = resolve("tiny")
    assert cfg.ingest.source.endswith("pcm/data/demo/dataset_demo.json")
    assert cfg.encode.images_root.endswith("pcm/data/demo")
    assert cfg.synthesize.model == "tiny" and cfg.encode.clip.model == "tiny"
    assert "{demo}" not in json.dumps(cfg.model_dump(mode="json"))


def test_overrides_are_typed_and_validated():
    cfg = resolve("demo", {"synthesize.guidance_scale": 5.0, "train.model": {"pcm": False}})
    assert cfg.synthesize.guidance_scale == 5.0 and cfg.train.model == {"pcm": False}
    with pytest.raises(ValueError, match=r"demo\.synthesize\.steps"):
        resolve("demo", {"synthesize.steps": -1})
    with pytest.raises(ValueError, match="unknown section 'sythesize'"):
        resolve("demo", {"sythesize.steps": 4})
    with pytest.raises(ValueError, match=r"unknown preset 'nope'.*demo"):
        resolve("nope")
    raw = load_preset("demo")
    assert apply_overrides(raw, {"train.epochs": 1})["train"]["epochs"] == 1 and raw["train"]["epochs"] != 1


def test_parse_assignments():
    assert parse_assignments(["train.epochs=2", "synthesize.negative_prompt=blurry", "train.model={pcm = false}",
                              "encode.images_root=/data/x"]) == {
        "train.epochs": 2, "synthesize.negative_prompt": "blurry", "train.model": {"pcm": False},
        "encode.images_root": "/data/x"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_assignments(["train.epochs"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_assignments(["train..epochs=2"])
    # One grammar for every command (pcm.config's): TOML values, none/null for None, else the text itself.
    assert parse_assignments(["lr=1e-4", "on=true", "v=none", "w=null", 'q="none"', "p=a b", "d=2024-01-01",
                              'l=["val", "test"]', "t=[val, test]", "e="]) == {
        "lr": 1e-4, "on": True, "v": None, "w": None, "q": "none", "p": "a b", "d": "2024-01-01",
        "l": ["val", "test"], "t": "[val, test]", "e": ""}
    assert parse_assignments(["x=1\ny = 2"]) == {"x": "1\ny = 2"}  # one value, never a second TOML key


def test_toml_text_reads_back_as_the_same_value():
    from pcm.config import parse_value, toml_text

    for value in (2, 1e-08, 0.5, True, None, "text", "a path/x.json", "", "none", "1.5", "A photo of {c}.",
                  ["train", "val"], [0.9, 0.999], {"pcm": False, "top_k": 3}):
        assert parse_value(toml_text(value)) == value, (value, toml_text(value))
    assert toml_text({"pool": None}) == "{pool = none}"  # shown in --help only: a TOML table cannot hold none


def test_flow_parameter_validates_the_whole_config():
    from pydantic import ValidationError

    from flows.synth_and_train import PipelineParams

    assert PipelineParams().config().name == "demo"
    with pytest.raises(ValidationError, match=r"synthesize\.scheduler"):
        PipelineParams(preset="demo", overrides={"synthesize.scheduler": "heun"})
    with pytest.raises(ValidationError):
        PipelineParams(stop_after="deploy")


def test_cli_run_one_stage_and_show_config(tmp_path):
    runner = CliRunner()
    shown = runner.invoke(app, ["run", "--preset", "demo", "--set", "train.epochs=2", "--show-config"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["train"]["epochs"] == 2
    done = runner.invoke(app, ["run", "ingest", "--root", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert "ingest" in done.output and "done" in done.output
    again = runner.invoke(app, ["run", "ingest", "--root", str(tmp_path)])
    assert "cached" in again.output
    listed = runner.invoke(app, ["presets"])
    assert all(name in listed.output for name in preset_names())


@pytest.mark.parametrize("override, message", [
    ({"train.betas": [float("nan"), 0.9]}, r"tiny\.train\.betas\.0: Input should be a finite number"),
    ({"train.cxe_w": float("inf")}, r"tiny\.train\.cxe_w: must be a positive finite number or \"auto\""),
    ({"train.focal_gamma": float("inf")}, r"tiny\.train\.focal_gamma: Input should be a finite number"),
    ({"train.betas": [0.9, 1.5]}, r"tiny\.train\.betas: .*each of Adam's betas must be in \[0, 1\)"),
    ({"train.seed": -1}, r"tiny\.train\.seed: Input should be greater than or equal to 0"),
    ({"train.lr_factor": 1e308}, r"tiny\.train\.lr_factor: Input should be less than or equal to 1000"),
    ({"train.model": {"tau": float("nan")}}, r"model\.tau: Input should be a finite number"),
    ({"synthesize.guidance_scale": float("nan")}, r"tiny\.synthesize\.guidance_scale: Input should be a finite"),
    ({"encode.clip": {"pool": float("inf")}}, r"tiny\.encode\.clip\.pool"),
])
def test_numeric_values_are_checked_at_the_edge_naming_the_parameter(override, message):
    # Before: NaN/inf failed only when training started ("cannot fingerprint a config holding NaN"),
    # betas > 1, seed -1 and lr_factor 1e308 gave raw torch / numpy errors.
    with pytest.raises(ValueError, match=message):
        resolve("tiny", override)


def test_a_table_override_merges_into_the_presets_table():
    clip = resolve("demo", {"encode.clip": {"pool": 4}}).encode.clip
    assert (clip.model, clip.pool) == ("toyworld-clip", 4) and clip.pretrained.endswith("toymodels/clip")
    assert resolve("flickr30k-vitl14", {"train.model": {"pcm": False}}).train.model == {"dropout": 0.2, "pcm": False}
    assert resolve("demo", {"train.epochs": 3}).train.epochs == 3   # scalars still replace


def test_one_stage_list():
    # The layout's list is the run order, the CLI's and the Prefect parameter's (a Literal must spell it out).
    import typing

    from flows.synth_and_train import Stage
    from pcm.stages.pipeline import STAGE_ORDER
    from storage.layout import STAGES

    assert STAGE_ORDER is STAGES and typing.get_args(Stage) == STAGES


def test_red_team_small_holes_booleans_repeated_json_keys_and_file_urls(tmp_path):
    from pcm.cli.common import writable_dir
    from storage.layout import RunLayout

    with pytest.raises(ValueError, match=r"tiny\.train\.epochs: .*expected a number, got the boolean true"):
        resolve("tiny", {"train.epochs": True})           # was: trained one epoch
    with pytest.raises(ValueError, match=r"guidance_scale: .*got the boolean false"):
        resolve("tiny", {"synthesize.guidance_scale": False})
    assert resolve("tiny", {"train.cxe": True}).train.cxe is True      # a boolean field takes booleans
    preset = tmp_path / "mine.json"
    preset.write_text('{"name": "x", "train": {"epochs": 1, "epochs": 5}}')
    with pytest.raises(ValueError, match=r"mine\.json: invalid JSON: duplicate key 'epochs'"):
        resolve(str(preset))                              # was: silently 5
    for make in (RunLayout, writable_dir):
        with pytest.raises(ValueError, match=r"as a path \(/tmp/x\), not a file: URL"):
            make("file:///tmp/x")                         # was: wrote into ./file:/tmp/x


def test_an_off_stage_is_mentioned_only_when_asked_for_by_name(monkeypatch, caplog, tmp_path):
    from pcm.stages import pipeline

    monkeypatch.setattr(pipeline, "check_evaluable", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "_run_one", lambda cfg, root, stage, r, f, progress: stage)
    cfg = resolve("tiny")
    assert not cfg.refine.enabled
    with caplog.at_level("WARNING", logger="pcm.stages.pipeline"):
        ran = pipeline.run_pipeline(cfg, str(tmp_path))               # the whole pipeline: refine is simply off
    assert "refine" not in ran and "off in this config" not in caplog.text
    with caplog.at_level("WARNING", logger="pcm.stages.pipeline"):
        pipeline.run_pipeline(cfg, str(tmp_path), stages=("refine",))
    assert "refine: off in this config (set refine.enabled=true to run it); skipped" in caplog.text
