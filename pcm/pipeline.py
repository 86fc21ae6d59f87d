"""The whole pipeline as one typed config: a preset (a TOML data file) plus dotted overrides.

    cfg = resolve("demo", {"synthesize.guidance_scale": 5.0})
    results = run_pipeline(cfg)          # in-process, no Prefect server

Presets live in pcm/presets/pipeline/<name>.toml; a path to a TOML file works too. In a preset,
"{demo}" expands to the bundled demo data directory, "{toyworld}" to the bundled toy-world data
and "{toymodels}" to the shipped toy models (pcm/data/toymodels).
"""

from __future__ import annotations

import copy
import logging
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pcm.config import describe_validation_error
from pcm.encode import EncodeConfig, run_encode
from pcm.evaluate import EvaluateConfig, run_evaluate
from pcm.ingest import IngestConfig, run_ingest
from pcm.synthesize import SynthesizeConfig, run_synthesize
from pcm.train import TrainConfig, run_train
from storage.result import StageResult

log = logging.getLogger(__name__)

PRESETS = Path(__file__).parent / "presets" / "pipeline"
STAGE_ORDER = ("ingest", "synthesize", "encode", "train", "evaluate")


class PipelineConfig(BaseModel):
    """Every stage's config; validated as a whole before anything runs."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    description: str = ""
    ingest: IngestConfig
    synthesize: SynthesizeConfig
    encode: EncodeConfig
    train: TrainConfig
    evaluate: EvaluateConfig


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def load_preset(preset: str) -> dict[str, Any]:
    """The raw dict of a preset name or TOML path, with "{demo}", "{toyworld}" and "{toymodels}" expanded."""
    path = Path(preset)
    if not (path.suffix == ".toml" and path.exists()):
        # A bare name picks a bundled preset, never a path built from it.
        path = PRESETS / f"{preset}.toml" if preset in preset_names() else None
    if path is None or not path.exists():
        raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(preset_names())} or a path to a .toml file")
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from None
    from pcm.demo_data import DEMO_DIR
    from pcm.toyworld.dataset import SHIPPED_DIR, SHIPPED_MODELS

    return _expand(raw, {"{demo}": str(DEMO_DIR), "{toyworld}": str(SHIPPED_DIR), "{toymodels}": str(SHIPPED_MODELS)})


def _expand(value: Any, table: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, table) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, table) for v in value]
    if isinstance(value, str):
        for k, v in table.items():
            value = value.replace(k, v)
    return value


def _merge(old: Any, new: Any) -> Any:
    """A table set onto a table updates it key by key (recursively); anything else replaces."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merge(old.get(k), v) for k, v in new.items()}}
    return new


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`train.batch_size`) in a copy of `raw`; unknown sections are errors.

    A table value merges into the table it replaces: `encode.clip={pool = 4}` keeps the preset's
    model and weights, `train.model={pcm = false}` keeps the preset's other model overrides.
    """
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if parts[0] not in PipelineConfig.model_fields:
            raise ValueError(f"override {dotted!r}: unknown section {parts[0]!r}; "
                             f"expected one of {', '.join(STAGE_ORDER)}")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {dotted!r}: {p!r} is not a section")
        node[parts[-1]] = _merge(node.get(parts[-1]), copy.deepcopy(value))
    return out


def resolve(preset: str, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """A validated PipelineConfig; every invalid parameter is named in one error."""
    raw = apply_overrides(load_preset(preset), overrides or {})
    raw.setdefault("name", Path(preset).stem)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ValueError(describe_validation_error(e, preset)) from None


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`["train.epochs=2", "synthesize.negative_prompt=blurry"]` -> typed dict (values parsed as TOML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=2")
        try:
            out[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = text  # a bare word is a string
    return out


Progress = Callable[[str, int, int, str], None]


def run_pipeline(cfg: PipelineConfig, root: str, *, stages: tuple[str, ...] = STAGE_ORDER,
                 force: tuple[str, ...] = (), progress: Progress | None = None,
                 lock_wait_s: float | None = None) -> dict[str, StageResult]:
    """Run the stages in order in this process; finished stages are reused from disk.

    A stage another process is running (its lock held) is waited for, `lock_wait_s` at most
    (None: as long as it takes, 0: fail at once naming the holder), then reused or resumed.
    """
    unknown = set(stages) - set(STAGE_ORDER) | set(force) - set(STAGE_ORDER)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; expected {', '.join(STAGE_ORDER)}")

    def prog(stage: str) -> Callable[[int, int, str], None] | None:
        return (lambda done, total, msg="": progress(stage, done, total, msg)) if progress else None

    r: dict[str, StageResult] = {}
    wanted = set(stages)
    # A later stage needs the earlier ones: they are run (or reused) even when not asked for.
    last = max(STAGE_ORDER.index(s) for s in stages)
    for stage in STAGE_ORDER[: last + 1]:
        f = stage in force and stage in wanted
        r[stage] = _waiting_for_others(lambda stage=stage, f=f: _run_one(cfg, root, stage, r, f, prog(stage)),
                                       stage, wait_s=lock_wait_s)
    return r


def _waiting_for_others(run: Callable[[], StageResult], stage: str, wait_s: float | None) -> StageResult:
    """Run a stage; while another process holds its lock, wait for it (saying whom), then run it again,
    which reuses what that process finished or resumes what it left."""
    from storage.lock import FileLock, LockHeld

    while True:
        try:
            return run()
        except LockHeld as e:
            if e.path is None or wait_s == 0:
                raise
            log.warning("%s: waiting for %s, which is running this stage (its results will be reused)", stage,
                        e.holder)
            FileLock(e.path, timeout=wait_s).acquire().release()


def _run_one(cfg: PipelineConfig, root: str, stage: str, r: dict[str, StageResult], f: bool,
             progress: Callable[[int, int, str], None] | None) -> StageResult:
    if stage == "ingest":
        return run_ingest(cfg.ingest, root, force=f, progress=progress)
    if stage == "synthesize":
        return run_synthesize(cfg.synthesize, r["ingest"].path, root, force=f, progress=progress)
    if stage == "encode":
        return run_encode(cfg.encode, r["ingest"].path, r["synthesize"].path, root, force=f, progress=progress)
    if stage == "train":
        return run_train(cfg.train, r["ingest"].path, r["encode"].path, root, force=f, progress=progress)
    return run_evaluate(cfg.evaluate, r["train"].path, r["encode"].path, r["ingest"].path, root, force=f,
                        progress=progress)
