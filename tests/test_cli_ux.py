"""The `pcm` command line for a new user: honest defaults, commands that work as printed, fast listings."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pcm.cli import app

REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "pcm" / "presets"


def command(*path: str):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def param(cmd, name: str):
    return next(p for p in cmd.params if p.name == name)


def fake_inputs(monkeypatch) -> None:
    """The stage commands resolve their input directories (load_result) before the stage runs: any path
    stands for a finished stage here, for tests that stop the stage and only look at its config."""
    import pcm.stages.contract
    from storage.result import StageResult

    monkeypatch.setattr(pcm.stages.contract, "load_result",
                        lambda path: StageResult(stage="unknown", fingerprint="0" * 16, path=str(path)))


def preset_vae_factor(name: str) -> int:
    vae = json.loads((PRESETS / "diffusion" / f"{name}.json").read_text())["vae"]
    return 2 ** (len(vae["block_out_channels"]) - 1)


def dry_run(*args: str):
    res = CliRunner().invoke(app, ["synthesize", "--captions", "unused", "--dry-run", *args])
    assert res.exit_code == 0, (res.output, res.exception)
    return json.loads(res.stdout), res.stderr


# -- 3. pcm synthesize: a random-weight preset renders at its own size -------------------------------
def test_synthesize_defaults_to_the_presets_own_size_and_steps_and_says_so():
    from pcm.stages.pipeline import resolve

    tiny = json.loads((PRESETS / "diffusion" / "tiny.json").read_text())["render"]
    with open(PRESETS / "pipeline" / "tiny.toml", "rb") as f:
        section = tomllib.load(f)["synthesize"]
    assert not set(tiny) & set(section)   # the pipeline preset leaves size and steps to the model preset...
    assert {k: getattr(resolve("tiny").synthesize, k) for k in tiny} == tiny   # ...and renders alike
    config, said = dry_run()
    assert config["model"] == "tiny"
    assert (config["height"], config["width"], config["steps"]) == (tiny["height"], tiny["width"], tiny["steps"])
    assert f"{tiny['width']}x{tiny['height']} px, {tiny['steps']} steps" in said and "RANDOM WEIGHTS" in said
    shown = {k: d for k, d, _ in command("synthesize").config_rows()}
    assert {k: int(shown[k]) for k in tiny} == tiny   # --help's default column: what this run got
    # What the user gives wins; the rest still comes from the preset.
    config, _ = dry_run("--set", "height=128", "--set", "steps=2")
    assert (config["height"], config["width"], config["steps"]) == (128, tiny["width"], 2)


def test_every_entry_point_gets_the_same_synthesize_config_from_the_same_values():
    """One source for the defaults: the CLI, Python and a pipeline override give the same config, fingerprint
    content included (before: the CLI filled in 64 px and 4 steps, Python and flows 512 px and 20 steps)."""
    from pcm.config import parse_assignments
    from pcm.stages.pipeline import apply_overrides, load_preset
    from pcm.stages.synthesize import SynthesizeConfig

    cli, _ = dry_run("--set", "limit=3")
    python = SynthesizeConfig(limit=3)
    raw = apply_overrides(load_preset("tiny"), parse_assignments(["synthesize.limit=3"]))
    assert not {"height", "width", "steps"} & set(raw["synthesize"])   # all three from the model preset
    flow = SynthesizeConfig.model_validate(raw["synthesize"])
    assert cli == python.model_dump(mode="json")
    assert (flow.height, flow.width, flow.steps) == (python.height, python.width, python.steps) == (64, 64, 4)
    assert SynthesizeConfig(model="sd15-arch").height == 512


def test_synthesize_real_models_keep_the_config_defaults():
    from pcm.stages.synthesize import SynthesizeConfig

    defaults = {k: SynthesizeConfig.model_fields[k].default for k in ("height", "width", "steps")}
    rows = {k: (d, t) for k, d, t in command("synthesize").config_rows()}
    for k, default in defaults.items():  # --help names them for any model that is no preset
        assert f"`render`, else {default})" in rows[k][1], rows[k][1]
    config, said = dry_run("--set", "model=some-org/some-model")
    assert {k: config[k] for k in defaults} == defaults
    assert "RANDOM WEIGHTS" not in said and "model some-org/some-model" in said


def test_synthesize_help_states_each_presets_real_vae_factor():
    res = CliRunner().invoke(app, ["synthesize", "--help"])
    assert res.exit_code == 0 and "--dry-run" in res.output
    help_ = next(text for key, _, text in command("synthesize").config_rows() if key == "height")
    assert "8 for Stable Diffusion" in help_
    for name in ("tiny", "sd15-arch"):
        assert f"{name} {preset_vae_factor(name)}" in help_, help_
    assert preset_vae_factor("tiny") == 2  # the fact the old help ("multiple of 8" for the VAE) got wrong


def test_synthesize_size_errors_name_the_models_actual_factor():
    res = CliRunner().invoke(app, ["synthesize", "--captions", "unused", "--dry-run", "--set", "height=100"])
    assert res.exit_code != 0 and isinstance(res.exception, ValueError)
    message = str(res.exception)
    assert "--set height=100: must be a multiple of 8" in message
    assert f"preset 'tiny' downsamples by {preset_vae_factor('tiny')}" in message and "try 96 or 104" in message


# -- 7a. the download command the errors give exists ----------------------------------------------------
def test_offline_errors_and_docs_give_the_hf_command_that_is_installed():
    from pcm.diffusion import missing_model_message

    message = missing_model_message("some-org/some-model", "v1")
    assert "    hf download some-org/some-model --revision v1 --local-dir models/some-model\n" in message
    # where to pass the directory: the config key (`--model` was removed from the commands)
    assert "--set synthesize.model=models/some-model" in message and "--model " not in message
    hf = Path(sys.executable).parent / "hf"
    assert hf.exists(), "the locked environment ships the `hf` command"
    usage = subprocess.run([str(hf), "download", "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "--local-dir" in usage.stdout and "--revision" in usage.stdout
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        assert "huggingface-cli" not in doc.read_text(encoding="utf-8"), doc


def test_the_clip_weights_error_gives_an_hf_download_command():
    from pcm.clip import ClipSpec, _missing_weights_error

    message = str(_missing_weights_error(ClipSpec(model="ViT-B-32", pretrained="openai"), OSError("offline")))
    assert ("hf download timm/vit_base_patch32_clip_224.openai open_clip_model.safetensors --local-dir "
            "models/vit_base_patch32_clip_224.openai") in message
    assert "clip.pretrained=models/vit_base_patch32_clip_224.openai/open_clip_model.safetensors" in message
    assert "pcm encode --set clip.pretrained=" in message


# -- 7b. --force all and comma lists -----------------------------------------------------------------------
@pytest.fixture
def fake_pipeline(monkeypatch):
    import pcm.stages.pipeline

    calls = []

    def fake(cfg, root, *, stages, force, **kwargs):
        calls.append({"cfg": cfg, "stages": stages, "force": force})
        return {}

    monkeypatch.setattr(pcm.stages.pipeline, "run_pipeline", fake)
    return calls


def test_run_force_takes_all_and_comma_lists(tmp_path, fake_pipeline):
    from pcm.stages.pipeline import STAGE_ORDER

    runner, root = CliRunner(), ["--root", str(tmp_path / "runs")]
    res = runner.invoke(app, ["run", "--preset", "tiny", "--force", "all", *root])
    assert res.exit_code == 0, (res.output, res.exception)
    assert fake_pipeline[-1]["force"] == STAGE_ORDER and fake_pipeline[-1]["stages"] == STAGE_ORDER
    res = runner.invoke(app, ["run", "encode,train", "--preset", "tiny", "--force", "train,encode", *root])
    assert res.exit_code == 0, (res.output, res.exception)
    assert fake_pipeline[-1]["force"] == ("encode", "train") and fake_pipeline[-1]["stages"] == ("encode", "train")
    res = runner.invoke(app, ["run", "train", "--preset", "tiny", "--force", "ingest", "--force", "train", *root])
    assert fake_pipeline[-1]["force"] == ("ingest", "train")
    assert "--force ingest does nothing here" in res.stderr and "pcm run ingest,train" in res.stderr
    res = runner.invoke(app, ["run", "--preset", "tiny", "--force", "trian", *root])
    assert isinstance(res.exception, ValueError) and "--force: unknown stage(s) 'trian'" in str(res.exception)


# -- 7c. --show-config prints what --preset takes back -------------------------------------------------------
def test_show_config_round_trips_through_preset(tmp_path, fake_pipeline):
    from pcm.stages.pipeline import resolve

    runner = CliRunner()
    shown = runner.invoke(app, ["run", "--preset", "tiny", "--set", "train.epochs=3", "--show-config"])
    assert shown.exit_code == 0, shown.output
    saved = tmp_path / "resolved.json"
    saved.write_text(shown.stdout)
    again = runner.invoke(app, ["run", "--preset", str(saved), "--show-config"])
    assert again.exit_code == 0, (again.output, again.exception)
    assert json.loads(again.stdout) == json.loads(shown.stdout)
    res = runner.invoke(app, ["run", "ingest", "--preset", str(saved), "--root", str(tmp_path / "runs")])
    assert res.exit_code == 0, (res.output, res.exception)
    assert fake_pipeline[-1]["cfg"] == resolve("tiny", {"train.epochs": 3})
    # overrides apply to a saved config too, and a broken file is one clear error
    tweaked = runner.invoke(app, ["run", "--preset", str(saved), "--set", "train.epochs=5", "--show-config"])
    assert json.loads(tweaked.stdout)["train"]["epochs"] == 5
    (tmp_path / "bad.json").write_text("{not json")
    bad = runner.invoke(app, ["run", "--preset", str(tmp_path / "bad.json"), "--show-config"])
    assert isinstance(bad.exception, ValueError) and "invalid JSON" in str(bad.exception)


# -- 8. --version, examples, fast listings, an unambiguous --preset ----------------------------------------------
def test_version_is_the_installed_distributions(monkeypatch):
    import importlib.metadata

    import pcm
    from pcm.cli import DIST_NAME

    with open(REPO / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["name"] == DIST_NAME
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"pcm {importlib.metadata.version(DIST_NAME)}"

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert CliRunner().invoke(app, ["--version"]).stdout.strip() == f"pcm {pcm.__version__}"


@pytest.mark.parametrize("path", [(), ("run",), ("ingest",), ("synthesize",), ("encode",), ("train",), ("evaluate",),
                                  ("caption",)])
def test_help_has_examples_that_parse(path):
    from cli_parse import check_pcm_parses, split_redirect

    epilog = command(*path).epilog or ""
    assert epilog.startswith("Examples:"), epilog
    examples = [shlex.split(line, comments=True) for line in epilog.splitlines() if line.strip().startswith("pcm ")]
    assert len(examples) >= 2, epilog
    for words in examples:
        check_pcm_parses(split_redirect(words)[0][1:])
    res = CliRunner().invoke(app, [*path, "--help"])
    assert res.exit_code == 0 and "Examples:" in res.output


HEAVY = ("torch", "diffusers", "open_clip", "transformers", "prefect", "pyarrow", "pcm.stages.pipeline", "pcm.stages.train",
         "pcm.stages.synthesize", "pcm.stages.encode")
# A stage's --help lists its config fields from the config class itself: it imports that stage's module, but
# for ingest, synthesize and evaluate no model library (train and encode import torch at the top).
MODEL_LIBRARIES = ("torch", "diffusers", "open_clip", "transformers", "prefect", "pcm.stages.pipeline",
                   "pcm.stages.train", "pcm.stages.encode")


def test_help_version_and_presets_import_no_model_library():
    script = f"""
import json, sys
from typer.testing import CliRunner
from pcm.cli import app
out = {{}}
for args, heavy in ((["--help"], {HEAVY!r}), (["--version"], {HEAVY!r}), (["presets"], {HEAVY!r}),
                    (["run", "--help"], {HEAVY!r}), (["ingest", "--help"], {MODEL_LIBRARIES!r}),
                    (["synthesize", "--help"], {MODEL_LIBRARIES!r}), (["evaluate", "--help"], {MODEL_LIBRARIES!r})):
    res = CliRunner().invoke(app, args)
    out[" ".join(args)] = [res.exit_code, res.stdout, [m for m in heavy if m in sys.modules]]
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    for args, (code, _, imported) in json.loads(done.stdout).items():
        assert code == 0, args
        assert imported == [], f"`pcm {args}` imported {imported}"
    listing = json.loads(done.stdout)["presets"][1]
    from pcm.pipeline_presets import load_preset, preset_names

    assert [line.split()[0] for line in listing.splitlines()] == preset_names()
    for name in preset_names():
        assert re.search(rf"^{re.escape(name)}\s+{re.escape(load_preset(name).get('description', ''))}$",
                         listing, flags=re.M), (name, listing)


@pytest.fixture
def fake_train(monkeypatch):
    import pcm.stages.train

    seen = []

    def fake(config, *args, **kwargs):
        seen.append(config)
        raise RuntimeError("stopped before training")

    monkeypatch.setattr(pcm.stages.train, "run_train", fake)
    fake_inputs(monkeypatch)
    return seen


def test_train_takes_model_preset_and_keeps_preset_as_a_deprecated_alias(tmp_path, fake_train):
    runner = CliRunner()
    base = ["train", "--captions", "c", "--encode", "e", "--root", str(tmp_path / "runs")]
    res = runner.invoke(app, [*base, "--model-preset", "tiny"])
    assert fake_train[-1].preset == "tiny" and "deprecated" not in res.stderr
    res = runner.invoke(app, [*base, "--preset", "vitb32"])
    assert fake_train[-1].preset == "vitb32"
    notes = [line for line in res.stderr.splitlines() if "deprecated" in line]
    assert len(notes) == 1 and "--model-preset" in notes[0]
    runner.invoke(app, base)
    assert fake_train[-1].preset == "vitl14"  # TrainConfig's default
    res = runner.invoke(app, [*base, "--preset", "tiny", "--model-preset", "vitb32"])
    assert isinstance(res.exception, ValueError) and "give --model-preset only" in str(res.exception)
    train = command("train")
    assert param(train, "preset").hidden and not param(train, "model_preset").hidden
    assert "--model-preset" in runner.invoke(app, ["train", "--help"]).output
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in doc.read_text(encoding="utf-8").splitlines():
            assert not re.search(r"pcm train .*--preset\b", line), (doc.name, line)


# -- 9. one `--set KEY=VALUE` grammar; a stage's --help lists its config fields ---------------------------------
STAGES = ("ingest", "synthesize", "encode", "refine", "train", "evaluate")
# What each stage command keeps as options: its inputs, --root, --force and switches that are no config field.
KEPT = {"ingest": {"source", "demo", "sets", "root", "force"},
        "synthesize": {"captions", "sets", "import_images", "import_mapping", "root", "worker_index", "num_workers",
                       "shards", "force", "dry_run"},
        "encode": {"captions", "shards", "images_root", "import_features", "sets", "root", "force"},
        "refine": {"captions", "encode", "sets", "root", "force"},
        "train": {"captions", "encode", "refine", "model_preset", "preset", "sets", "root", "force"},
        "evaluate": {"train", "encode", "captions", "sets", "root", "force", "clip"}}


def expected_defaults(cls) -> dict[str, str]:
    """Every --set key of a config class and its default as --set spells it (a nested model as KEY.SUB)."""
    from pydantic import BaseModel

    from pcm.config import toml_text

    out = {}
    for name, f in cls.model_fields.items():
        value = None if f.is_required() else f.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            out |= {f"{name}.{k}": toml_text(getattr(value, k)) for k in type(value).model_fields}
        else:
            out[name] = "(" if f.is_required() else toml_text(value)  # required: the row names what gives it
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_help_lists_every_config_field_with_its_default(stage, monkeypatch):
    import typer.rich_utils

    from pcm.cli.common import config_class

    assert {p.name for p in command(stage).params} == KEPT[stage]  # no option re-declares a config field
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 250)  # one table row a line
    res = CliRunner().invoke(app, [stage, "--help"])
    assert res.exit_code == 0, res.output
    cls = config_class(stage)
    expected = expected_defaults(cls)
    if stage == "synthesize":  # size and steps: what a run with none set gets, the default model's (tiny's)
        expected |= {"height": "64", "width": "64", "steps": "4"}
    if stage == "train":
        from pcm.model import PCMNetConfig

        expected |= {f"model.{k}": "" for k in PCMNetConfig.model_fields}
    for key, default in expected.items():
        assert re.search(rf"^\W*{re.escape(key)}\s+{re.escape(default)}", res.output, flags=re.M), (key, default)
    for name, f in cls.model_fields.items():  # and what each field means, from its pydantic description
        if f.description:
            assert " ".join(f.description.split())[:40] in " ".join(res.output.split()), name
    literal = {"ingest": 'splits  ["train", "val", "test"]', "synthesize": "steps  4", "encode": "clip.model  ViT-L-14",
               "refine": "keep_fraction  0.9", "train": "cxe_w  4.0", "evaluate": "beam_size  3"}[stage]
    key, default = literal.split("  ")
    assert re.search(rf"^\W*{re.escape(key)}\s+{re.escape(default)}\s", res.output, flags=re.M), literal


def stage_config(monkeypatch, tmp_path, stage: str, args: list[str]):
    """The config `pcm STAGE ARGS` would run its stage with (the stage itself is stopped)."""
    import importlib

    seen = []

    def stop(config, *a, **k):
        seen.append(config)
        raise RuntimeError("stopped before the stage")

    monkeypatch.setattr(importlib.import_module(f"pcm.stages.{stage}"), f"run_{stage}", stop)
    fake_inputs(monkeypatch)
    res = CliRunner().invoke(app, [stage, *args, "--root", str(tmp_path / "runs")])
    assert seen, (res.output, res.exception)
    return seen[-1]


# Values of each kind: numbers (1e-4 style too), booleans, bare words and quoted text, none, arrays, tables.
TRICKY = {"ingest": ['splits=["train", "test"]', "max_chars=200", "dedup=false", "name=none"],
          "synthesize": ["steps=3", "guidance_scale=5e0", "negative_prompt=blurry photo", "compile=true", "limit=6"],
          "encode": ["clip.pool=none", "prompt=A picture of {c}.", "top_n=none", "batch_size=8"],
          "refine": ["enabled=true", "method=clip-filter", "keep_fraction=8e-1", "k=3"],
          "train": ["model.pcm=false", "model={top_k = 3}", "cxe_w=2.5", "lr_factor=1e-1", "val_metric=loss",
                    "betas=[0.8, 0.99]", "grad_clip=null"],
          "evaluate": ["beam_size=5", "split=val", "published=coco-vitl14", "length_penalty=0.5", 'spice="off"']}


@pytest.mark.parametrize("stage", STAGES)
def test_set_gives_the_same_config_on_run_and_on_the_stage_command(stage, monkeypatch, tmp_path):
    from pcm.config import toml_text
    from pcm.stages.pipeline import load_preset

    shown = CliRunner().invoke(app, ["run", "--preset", "tiny", "--show-config",
                                     *[x for s in TRICKY[stage] for x in ("--set", f"{stage}.{s}")]])
    assert shown.exit_code == 0, (shown.output, shown.exception)
    want = json.loads(shown.stdout)[stage]
    # The stage command from the same preset section, given as --set (its inputs as options) ...
    section = load_preset("tiny").get(stage, {})  # refine: no table in the preset, its defaults
    inputs = {"ingest": lambda: [section.pop("source")], "synthesize": lambda: ["--captions", "c"],
              "encode": lambda: ["--captions", "c", "--shards", "s", "--images-root", section.pop("images_root")],
              "refine": lambda: ["--captions", "c", "--encode", "e"],
              "train": lambda: ["--captions", "c", "--encode", "e"],
              "evaluate": lambda: ["--train", str(tmp_path), "--encode", "e", "--captions", "c"]}[stage]()
    sets = [f"{k}={toml_text(v)}" for k, v in section.items()] + TRICKY[stage]
    got = stage_config(monkeypatch, tmp_path, stage, [*inputs, *[x for s in sets for x in ("--set", s)]])
    # ... is the same config: every --set value parsed the same way (but the TensorBoard run name, a runtime field
    # only the pipeline sets from its preset's name).
    want.pop("run_name", None)
    assert got.model_dump(mode="json", exclude={"run_name"}) == want


def test_pcm_run_ends_with_the_scores_the_control_and_the_report(tmp_path, capsys):
    from builders import new_stage

    from pcm.cli.run import print_scores
    from storage.atomic import write_json

    sd = new_stage(tmp_path, "evaluate", "ab" * 8)
    write_json(sd.metrics, {"split": "test", "counts": {"images": 300},
                            "metrics": {"Bleu_4": 0.3335, "METEOR": 0.297, "ROUGE_L": 0.57, "CIDEr": 1.79,
                                        "SPICE": "unavailable: jars missing"},
                            "control": {"metrics": {"CIDEr": 0.361}}})
    print_scores(sd)
    out = capsys.readouterr().out
    assert "scores (test, 300 images): BLEU-4 33.4, METEOR 29.7, ROUGE-L 57.0, CIDEr 179.0; " \
           "language-only control CIDEr 36.1" in out
    assert f"report: {sd.report}" in out and "SPICE" not in out


def test_libraries_logging_info_through_the_root_logger_are_quiet_unless_verbose():
    import logging

    from pcm.cli import quiet_libraries

    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "loading", None, None)

    assert not quiet_libraries(record("root", logging.INFO))          # open_clip's dozen lines per load
    assert quiet_libraries(record("root", logging.WARNING))
    assert quiet_libraries(record("pcm.stages.encode", logging.INFO))
