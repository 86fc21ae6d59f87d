"""Bad config values, `--set` lines and preset files: every one an error naming the parameter or the file.

The field cases are built from the stage configs themselves (one case per field and kind of mistake:
a value below or above its bound, a boolean for a number, a number or word for a boolean, text for a
number, a list for a text, a choice not offered), so a field added later is covered without a new line
here. Each goes through `pcm.stages.pipeline.resolve`, the path every `pcm run --set` and flow takes,
and must fail naming `<preset>.<stage>.<field>`. Nothing runs a stage: the whole file takes a few
seconds.
"""

from __future__ import annotations

import math
import re
import typing
from pathlib import Path
from typing import Any

import annotated_types as at
import pytest

from pcm.config import parse_assignments
from pcm.stages.encode import EncodeConfig
from pcm.stages.evaluate import EvaluateConfig
from pcm.stages.ingest import IngestConfig
from pcm.stages.pipeline import resolve
from pcm.stages.refine import RefineConfig
from pcm.stages.synthesize import SynthesizeConfig
from pcm.stages.train import TrainConfig

SECTIONS = {"ingest": IngestConfig, "synthesize": SynthesizeConfig, "encode": EncodeConfig, "train": TrainConfig,
            "evaluate": EvaluateConfig, "refine": RefineConfig}
# Fields whose own validator has its own words (asserted in FIELD_ERRORS below instead).
OWN_RULES = {"train.cxe_w", "train.model", "encode.clip", "synthesize.scheduler", "encode.prompt", "ingest.splits",
             "train.betas", "ingest.name"}


def _args(annotation: Any) -> set[Any]:
    if typing.get_origin(annotation) in (typing.Union, __import__("types").UnionType):
        return set(typing.get_args(annotation))
    return {annotation}


def _bounds(metadata: list[Any]) -> tuple[float | None, float | None, bool, bool]:
    """(lower, upper, lower is strict, upper is strict) of a field's annotated_types constraints."""
    lo = hi = None
    lo_strict = hi_strict = False
    for m in metadata:
        if isinstance(m, at.Ge):
            lo = m.ge
        elif isinstance(m, at.Gt):
            lo, lo_strict = m.gt, True
        elif isinstance(m, at.Le):
            hi = m.le
        elif isinstance(m, at.Lt):
            hi, hi_strict = m.lt, True
    return lo, hi, lo_strict, hi_strict


def field_cases() -> list[tuple[str, Any, str]]:
    """(dotted key, bad value, message regex) for every field of every stage config."""
    cases: list[tuple[str, Any, str]] = []
    for section, cls in SECTIONS.items():
        for name, f in cls.model_fields.items():
            key = f"{section}.{name}"
            if key in OWN_RULES:
                continue
            args = _args(f.annotation)
            lo, hi, lo_strict, hi_strict = _bounds(f.metadata)
            literal = [a for a in args if typing.get_origin(a) is typing.Literal]
            if args & {int, float}:
                number = int if int in args else float
                cases.append((key, True, r"expected a number, got the boolean true"))
                cases.append((key, "many", r"Input should be a valid (integer|number)"))
                if number is int:
                    cases.append((key, 2.5, r"Input should be a valid integer, got a number with a fractional part"))
                else:
                    cases.append((key, math.nan, r"Input should be a finite number"))
                if lo is not None:
                    cases.append((key, lo if lo_strict else (lo - 1 if number is int else lo - 0.5),
                                  r"Input should be greater than"))
                if hi is not None:
                    cases.append((key, hi if hi_strict else (hi + 1 if number is int else hi + 0.5),
                                  r"Input should be less than"))
            elif bool in args:
                cases.append((key, 1, r"expected true or false, got 1"))
                cases.append((key, "yes", r"expected true or false, got 'yes'"))
            elif literal:
                cases.append((key, "nosuch", r"Input should be "))
            elif str in args:
                cases.append((key, ["a", "b"], r"Input should be a valid string"))
    return cases


FIELD_CASES = field_cases()


@pytest.mark.bad_input
@pytest.mark.parametrize("key, value, message", FIELD_CASES, ids=[f"{k}={v!r}" for k, v, _ in FIELD_CASES])
def test_a_bad_field_value_is_an_error_naming_the_parameter(key, value, message):
    with pytest.raises(ValueError) as err:
        resolve("tiny", {key: value})
    lines = [line.strip() for line in str(err.value).splitlines() if line.strip().startswith(f"tiny.{key}")]
    assert lines, str(err.value)
    assert re.search(message, lines[0]), lines[0]


def test_the_generated_table_covers_every_stage_and_many_fields():
    """A guard on the generator itself: a change that empties it must not pass silently."""
    assert {k.split(".")[0] for k, _, _ in FIELD_CASES} == set(SECTIONS)
    assert len(FIELD_CASES) >= 150


# (override, message) for fields with rules of their own, nested tables and the override grammar itself.
FIELD_ERRORS = [
    ({"train.cxe_w": "heavy"}, r"tiny\.train\.cxe_w: .*must be a positive finite number or \"auto\""),
    ({"train.cxe_w": -1.0}, r"tiny\.train\.cxe_w: .*must be a positive finite number"),
    ({"train.cxe_w": True}, r"tiny\.train\.cxe_w: .*expected a number, got the boolean true"),
    ({"train.betas": [0.9]}, r"tiny\.train\.betas\.1: Field required"),
    ({"train.betas": [0.9, 1.5]}, r"tiny\.train\.betas: .*must be in \[0, 1\)"),
    ({"train.betas": [0.9, True]}, r"tiny\.train\.betas"),
    ({"train.betas": "fast"}, r"tiny\.train\.betas: Input should be a valid tuple"),
    ({"train.betas": [0.9, 0.99, 0.999]}, r"tiny\.train\.betas: Tuple should have at most 2 items"),
    ({"ingest.splits": []}, r"tiny\.ingest\.splits: .*keep at least one of train, val, test"),
    ({"ingest.splits": ["training"]}, r"tiny\.ingest\.splits\.0: Input should be 'train', 'val' or 'test'"),
    ({"ingest.splits": "train"}, r"tiny\.ingest\.splits: Input should be a valid tuple"),
    ({"ingest.name": "../../etc"}, r"tiny\.ingest\.name: .*use 1-64 letters, digits"),
    ({"ingest.name": "a.b"}, r"tiny\.ingest\.name: .*use 1-64 letters, digits"),
    ({"ingest.name": "x" * 65}, r"tiny\.ingest\.name: .*use 1-64 letters, digits"),
    ({"synthesize.scheduler": "os.system"}, r"tiny\.synthesize\.scheduler: .*unknown scheduler 'os\.system'"),
    ({"synthesize.scheduler": "diffusers.DDIMScheduler"}, r"tiny\.synthesize\.scheduler: .*unknown scheduler"),
    ({"synthesize.scheduler": 3}, r"tiny\.synthesize\.scheduler: Input should be a valid string"),
    ({"synthesize.width": 100}, r"tiny\.synthesize\.width: .*must be a multiple of 8"),
    ({"encode.prompt": "{d} {c}"}, r"tiny\.encode\.prompt: .*may hold only the \{c\} slot"),
    ({"encode.prompt": "no slot"}, r"tiny\.encode\.prompt: .*must contain \{c\}"),
    ({"encode.prompt": "{c"}, r"tiny\.encode\.prompt"),
    ({"encode.clip": {"nosuch": 1}}, r"tiny\.encode\.clip\.nosuch: Extra inputs are not permitted"),
    ({"encode.clip": "tiny"}, r"tiny\.encode\.clip"),
    ({"encode.clip.pool": True}, r"tiny\.encode\.clip\.pool: .*expected a number, got the boolean true"),
    ({"encode.clip.pool": 0}, r"tiny\.encode\.clip: .*pool must be a grid side >= 1"),
    ({"encode.clip.pool": 2.5}, r"tiny\.encode\.clip\.pool: Input should be a valid integer"),
    ({"encode.clip.precision": "fp8"}, r"tiny\.encode\.clip\.precision: Input should be 'fp32', 'fp16' or 'bf16'"),
    ({"encode.clip.model": 3}, r"tiny\.encode\.clip\.model: Input should be a valid string"),
    ({"train.model": {"topk": 3}}, r"tiny\.train\.model: .*unknown model fields \['topk'\]"),
    ({"train.model": {"top_k": True}}, r"model\.top_k: .*expected a number, got the boolean true"),
    ({"train.model": {"top_k": 2.5}}, r"model\.top_k: Input should be a valid integer"),
    ({"train.model": {"top_k": 0}}, r"model\.top_k: Input should be greater than 0"),
    ({"train.model": {"pcm": 1}}, r"model\.pcm: .*expected true or false, got 1"),
    ({"train.model": {"noise": "off"}}, r"model\.noise: .*expected true or false, got 'off'"),
    ({"train.model": {"dropout": 1.0}}, r"model\.dropout: Input should be less than 1"),
    ({"train.model": {"tau": math.inf}}, r"model\.tau: Input should be a finite number"),
    ({"train.model": {"word_embedding": "learned"}}, r"model\.word_embedding: Input should be 'scaled' or 'release'"),
    ({"train.model": "big"}, r"tiny\.train\.model: Input should be a valid dictionary"),
    ({"train.preset": "nosuch"}, r"tiny\.train: .*model preset 'nosuch' not found; known presets"),
    ({"train.preset": "../model/tiny"}, r"tiny\.train: .*model preset '\.\./model/tiny' not found"),
    ({"train.epochz": 3}, r"tiny\.train\.epochz: Extra inputs are not permitted"),
    ({"synthesize.stepz": 3}, r"tiny\.synthesize\.stepz: Extra inputs are not permitted"),
    ({"nosuch.steps": 3}, r"override 'nosuch\.steps': unknown section 'nosuch'"),
    ({"train.epochs.x": 3}, r"override 'train\.epochs\.x': 'epochs' is not a section"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides, message", FIELD_ERRORS, ids=[f"{k}={v!r}" for o, _ in FIELD_ERRORS
                                                                   for k, v in o.items()])
def test_a_bad_value_with_its_own_rule_is_an_error_naming_the_parameter(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve("tiny", overrides)


# `--set` lines that are not KEY=VALUE.
SET_SYNTAX = ["train.epochs", "=3", " =3", "train..epochs=3", ".epochs=3", "train.=3", ""]


@pytest.mark.bad_input
@pytest.mark.parametrize("item", SET_SYNTAX, ids=[f"set-{i!r}" for i in SET_SYNTAX])
def test_a_set_line_that_is_not_key_equals_value_names_itself(item):
    with pytest.raises(ValueError, match=rf"--set {re.escape(repr(item))}: expected KEY=VALUE"):
        parse_assignments([item])


# ---------------------------------------------------------------------- preset files
GOOD_TOML = (Path(__file__).resolve().parents[1] / "pcm" / "presets" / "pipeline" / "tiny.toml").read_text()
# (case, file name, content, message): a pipeline preset file given by path (`pcm run PRESET.toml`).
PRESET_FILES = [
    ("toml-syntax", "p.toml", b"[train\nepochs = 2\n", r"invalid TOML"),
    ("toml-duplicate-key", "p.toml", b"[train]\nepochs = 2\nepochs = 3\n", r"invalid TOML: .*(defined|overwrite)"),
    ("toml-duplicate-table", "p.toml", b"[train]\nepochs = 2\n[train]\nseed = 1\n", r"invalid TOML"),
    ("toml-not-utf8", "p.toml", b"[train]\nrun_name = \"\xff\"\n", r"invalid TOML"),
    ("toml-unknown-section", "p.toml", GOOD_TOML.encode() + b"\n[nosuch]\nx = 1\n", r"p\.toml\.nosuch: Extra inputs"),
    ("toml-wrong-type", "p.toml", re.sub(r"(?m)^epochs = .*$", 'epochs = "many"', GOOD_TOML).encode(),
     r"p\.toml\.train\.epochs: Input should be a valid integer"),
    ("toml-bool-for-int", "p.toml", re.sub(r"(?m)^epochs = .*$", "epochs = true", GOOD_TOML).encode(),
     r"p\.toml\.train\.epochs: .*expected a number, got the boolean true"),
    ("toml-base-unknown", "p.toml", b"base = \"nosuch\"\n", r"base = 'nosuch' must name another bundled preset"),
    ("toml-base-not-text", "p.toml", b"base = 3\n", r"base = 3 must name another bundled preset"),
    ("toml-section-not-a-table", "p.toml", b"base = \"tiny\"\ntrain = 3\n", r"p\.toml\.train: Input should be a valid dictionary"),
    ("json-invalid", "p.json", b'{"train": {', r"p\.json: invalid JSON"),
    ("json-duplicate-key", "p.json", b'{"train": {"epochs": 1, "epochs": 2}}', r"duplicate key 'epochs'"),
    ("json-not-an-object", "p.json", b"[1, 2]", r"expected a JSON object"),
    ("json-not-utf8", "p.json", b'{"name": "\xff"}', r"p\.json: invalid JSON"),
    ("json-deep", "p.json", b"[" * 100_000 + b"]" * 100_000, r"p\.json: invalid JSON"),
    ("json-huge-integer", "p.json", b'{"train": {"epochs": 1' + b"0" * 5000 + b"}}", r"p\.json: invalid JSON"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("case, name, content, message", PRESET_FILES, ids=[c[0] for c in PRESET_FILES])
def test_a_bad_preset_file_is_an_error_naming_it(tmp_path, case, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        resolve(str(path), {})
    assert str(path) in str(err.value) or f"{path.stem}." in str(err.value)


@pytest.mark.bad_input
@pytest.mark.parametrize("preset", ["nosuch", "../pipeline/tiny", "/etc/passwd", "tiny.yaml"])
def test_an_unknown_preset_name_is_an_error_listing_the_known_ones(preset):
    with pytest.raises(ValueError, match=rf"unknown preset {re.escape(repr(preset))}: use one of .*tiny"):
        resolve(preset, {})
