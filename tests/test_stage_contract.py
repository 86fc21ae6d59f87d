"""Every stage module keeps the stage contract of DESIGN.md (pcm.stages.contract.Stage): its config class, `plan`,
`verify` and `run_<stage>`, with the inputs as StageResults between the config and the layout."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from pcm.config import StageConfig
from pcm.stages.contract import Stage
from storage.layout import RunLayout

# module -> the name its config class and run function carry
STAGE_MODULES = {"ingest": "Ingest", "synthesize": "Synthesize", "encode": "Encode", "refine": "Refine",
                 "train": "Train", "evaluate": "Evaluate", "import_checkpoint": "ImportCheckpoint"}


def _module(name: str):
    return importlib.import_module(f"pcm.stages.{name}")


@pytest.mark.parametrize("name", sorted(STAGE_MODULES))
def test_stage_module_has_the_four_names(name):
    mod = _module(name)
    assert isinstance(mod, Stage), f"pcm.stages.{name} lacks plan, verify or CODE_VERSION"
    config = getattr(mod, f"{STAGE_MODULES[name]}Config")
    assert issubclass(config, StageConfig)
    assert callable(getattr(mod, f"run_{name}"))


def test_a_module_without_verify_breaks_the_contract():
    """The check above can fail: a module missing one of the names is no Stage."""
    import types

    mod = types.ModuleType("half_a_stage")
    mod.CODE_VERSION, mod.plan = "1", lambda config, layout: None
    assert not isinstance(mod, Stage)


def test_stage_modules_are_the_layouts_stages():
    """No stage module is left out of the list above (import_checkpoint makes a train directory); the others are
    the shared contract, the pipeline and train's worker (one process of the train stage)."""
    from storage.layout import STAGES

    assert set(STAGES) <= set(STAGE_MODULES)
    files = {p.stem for p in Path(inspect.getfile(Stage)).parent.glob("*.py")}
    assert files - {"__init__", "contract", "pipeline", "train_worker"} == set(STAGE_MODULES)


def test_a_results_stage_dir_is_the_directory_it_names(tmp_path):
    from storage.layout import RunLayout
    from storage.result import StageResult

    sd = RunLayout(tmp_path).stage("encode", "ab" * 8)
    r = StageResult(stage="encode", fingerprint=sd.fingerprint, path=str(sd.path))
    assert r.stage_dir == sd and r.stage_dir.clip_head == sd.path / "clip_head.safetensors"


@pytest.mark.parametrize("name", sorted(STAGE_MODULES))
def test_one_signature_for_every_stage(name):
    """plan(config, *inputs, layout) and run_<stage>(config, *inputs, layout, *, force, progress): the same inputs
    in the same order, the layout last, the options keyword-only."""
    mod = _module(name)
    plan = inspect.signature(mod.plan).parameters
    run = inspect.signature(getattr(mod, f"run_{name}")).parameters
    positional = [n for n, p in plan.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional[0] == "config" and positional[-1] == "layout", positional
    assert [n for n, p in run.items() if p.kind == p.POSITIONAL_OR_KEYWORD] == positional
    assert plan["layout"].annotation in ("RunLayout", RunLayout)
    keyword_only = {n for n, p in run.items() if p.kind == p.KEYWORD_ONLY}
    assert {"force", "progress"} <= keyword_only
    # options of plan (train's refine, val) are options of run too, never positional
    assert {n for n, p in plan.items() if p.kind == p.KEYWORD_ONLY} <= keyword_only


def test_the_run_root_is_spelt_as_the_stage_directory_is(tmp_path):
    """StageDir.root is the local directory; run_root_of (and StageResult.root) keep a URL a URL."""
    from storage.layout import RunLayout, run_root_of
    from storage.result import StageResult

    sd = RunLayout(tmp_path).stage("train", "ab" * 8)
    assert run_root_of(sd.path) == str(sd.root) == str(tmp_path.resolve())
    assert run_root_of("s3://bucket/runs/a/train/" + "ab" * 8 + "/") == "s3://bucket/runs/a"
    assert StageResult(stage="train", fingerprint="ab" * 8, path=f"s3://b/r/train/{'ab' * 8}").root == "s3://b/r"
