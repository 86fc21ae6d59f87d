"""The whole pipeline as one typed config: a preset (a TOML data file) plus dotted overrides.

    cfg = resolve("demo", {"synthesize.guidance_scale": 5.0})
    results = run_pipeline(cfg)          # in-process, no Prefect server

A preset is a bundled name, a TOML file or the JSON `pcm run --show-config` prints, read by
pcm/pipeline_presets.py (base presets, "{demo}"-style placeholders); here it is validated and run.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pcm import tracking
from pcm.config import BY_CONTENT, StageConfig, describe_validation_error, set_dotted, validate
from pcm.config import parse_assignments as parse_assignments  # the `--set` grammar, re-exported
from pcm.pipeline_presets import expand, load_preset, placeholders
from pcm.stages.encode import EncodeConfig, run_encode
from pcm.stages.evaluate import EvaluateConfig, run_evaluate
from pcm.stages.ingest import IngestConfig, run_ingest, source_path, splits_present
from pcm.stages.refine import RefineConfig, run_refine
from pcm.stages.synthesize import SynthesizeConfig, run_synthesize
from pcm.stages.train import TrainConfig, run_train
from storage import atomic
from storage.layout import STAGES, RunLayout, StageDir
from storage.result import StageResult

log = logging.getLogger(__name__)

STAGE_ORDER = STAGES  # the layout's stage list is the run order


class EvalSource(BaseModel):
    """Evaluate (and validate) on another data set with references, e.g. own text-only captions scored on the
    toy world's drawn val/test scenes: its caption file is ingested (val/test only) and its real images encoded
    (no synthesis) with the run's CLIP, as stages of their own; the report says cross-domain."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="caption file with val/test splits and references (Karpathy or COCO JSON, "
                        ".jsonl/.csv with split and image_path columns)")
    images_root: str = Field(description="the folder its image paths are relative to")
    name: str | None = Field(None, description="its dataset name (caption-id prefix); default from the file name")

    def ingest(self) -> IngestConfig:
        return IngestConfig(source=self.source, name=self.name, splits=("val", "test"))

    def encode(self, run: EncodeConfig) -> EncodeConfig:
        """The run's encode config (same CLIP, so the features match the model) on these images."""
        return run.model_copy(update={"images_root": self.images_root})


class PipelineConfig(BaseModel):
    """Every stage's config; validated as a whole before anything runs."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    description: str = ""
    ingest: IngestConfig
    synthesize: SynthesizeConfig
    encode: EncodeConfig
    # Optional (SynC re-pairing / CLIP-score filtering): off unless `refine.enabled = true`, so a preset without
    # a [refine] table runs, and fingerprints, exactly as before the stage existed.
    refine: RefineConfig = Field(default_factory=RefineConfig)
    train: TrainConfig
    evaluate: EvaluateConfig
    eval_source: EvalSource | None = None   # evaluate and validate on another data set (cross-domain)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`train.batch_size`) in a copy of `raw`; unknown sections are errors.

    A table value merges into the table it replaces: `encode.clip={pool = 4}` keeps the preset's
    model and weights, `train.model={pcm = false}` keeps the preset's other model overrides.
    The grammar is pcm.config's, the one every `pcm ... --set` uses (the stage commands without SECTION.).
    """
    for dotted in overrides:
        section = dotted.split(".")[0]
        if section not in PipelineConfig.model_fields:
            raise ValueError(f"override {dotted!r}: unknown section {section!r}; "
                             f"expected one of {', '.join(STAGE_ORDER)}")
    return set_dotted(raw, overrides)


def resolve(preset: str, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """A validated PipelineConfig; every invalid parameter is named in one error."""
    base = load_preset(preset)
    overrides = expand(overrides or {}, placeholders())
    raw = apply_overrides(base, overrides)
    raw.setdefault("name", Path(preset).stem)
    if isinstance(raw.get("train"), dict) and "run_name" not in raw["train"]:
        # TensorBoard's name of the run: the preset and what the overrides change (one that sets the preset's
        # own value is left out); a runtime field, outside the fingerprint.
        changed = {k: v for k, v in overrides.items() if apply_overrides(base, {k: v}) != base}
        raw["train"]["run_name"] = tracking.run_name(str(raw["name"]), changed)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ValueError(describe_validation_error(e, preset)) from None


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
    layout = RunLayout(root)   # the edge: stages take the layout, never the root's spelling
    check_evaluable(cfg, layout, STAGE_ORDER[last])   # before any stage works: a run that cannot be scored stops now
    for stage in STAGE_ORDER[: last + 1]:
        if not enabled(cfg, stage):
            if stage in wanted and wanted != set(STAGE_ORDER):  # asked for by name, not as part of "all"
                log.warning("%s: off in this config (set %s.enabled=true to run it); skipped", stage, stage)
            continue
        f = stage in force and stage in wanted
        r[stage] = _waiting_for_others(lambda stage=stage, f=f: _run_one(cfg, layout, stage, r, f, prog(stage)),
                                       stage, wait_s=lock_wait_s)
    return r


def enabled(cfg: PipelineConfig, stage: str) -> bool:
    """Whether the pipeline runs `stage` under `cfg`: every stage, but refine only when enabled."""
    return stage != "refine" or cfg.refine.enabled


def _waiting_for_others(run: Callable[[], StageResult], stage: str, wait_s: float | None) -> StageResult:
    """Run a stage; while another process holds its lock, wait for it (saying whom), then run it again,
    which reuses what that process finished or resumes what it left."""
    from storage.lock import LockHeld
    from storage.locks import lock_at

    while True:
        try:
            return run()
        except LockHeld as e:
            if e.path is None or wait_s == 0:
                raise
            log.warning("%s: waiting for %s, which is running this stage (its results will be reused)", stage,
                        e.holder)
            lock_at(e.path, timeout=wait_s).acquire().release()


EVAL_SOURCE_HINT = ("give an evaluation source with references, e.g. the toy world's drawn val/test scenes: "
                    "--set eval_source.source={toyworld}/dataset_toyworld.json --set eval_source.images_root={toyworld} "
                    "(the [eval_source] section of a preset), or stop before evaluate (pcm run ... train)")


def check_evaluable(cfg: PipelineConfig, layout: RunLayout, last: str) -> None:
    """Fail before any stage works when evaluate would find no images (no images_root, or no captions of its split);
    warn when training would validate on nothing. Reads the caption file (or the finished ingest), writes nothing."""
    if cfg.eval_source is not None:
        source_path(cfg.eval_source.ingest())     # a missing file is named now, not after training
        if not Path(cfg.eval_source.images_root).expanduser().is_dir():
            raise FileNotFoundError(f"eval_source.images_root={cfg.eval_source.images_root!r}: no such folder")
        return
    if STAGE_ORDER.index(last) < STAGE_ORDER.index("train"):
        return
    split = cfg.evaluate.split
    present = splits_present(cfg.ingest, layout)
    why = None
    if split not in present:
        why = (f"ingest.source={cfg.ingest.source!r} holds no {split} captions (splits: "
               f"{', '.join(sorted(present)) or 'none'}); own captions are usually text-only training captions")
    elif cfg.encode.images_root is None:
        why = "encode.images_root is not set, so no real val/test images are encoded"
    if why is None:
        return
    if last == "evaluate":
        raise ValueError(f"evaluate would find no images to score: {why}. Nothing was run; {EVAL_SOURCE_HINT}")
    log.warning("train: validation will be skipped (%s); best/ will be the last step. To validate, "
                "give eval_source.source and eval_source.images_root", why)


def _eval_inputs(cfg: PipelineConfig, layout: RunLayout, r: dict[str, StageResult],
                 f: bool) -> tuple[StageResult, StageResult]:
    """(captions, encode) that validation and evaluate read: the run's own, or the evaluation source's, whose
    ingest and real-only encode run once as stages of their own (results under "eval_ingest", "eval_encode")."""
    es = cfg.eval_source
    if es is None:
        return r["ingest"], r["encode"]
    if "eval_encode" not in r:
        r["eval_ingest"] = run_ingest(es.ingest(), layout, force=f)
        r["eval_encode"] = run_encode(es.encode(cfg.encode), r["eval_ingest"], None, layout, force=f)
    return r["eval_ingest"], r["eval_encode"]


def _run_one(cfg: PipelineConfig, layout: RunLayout, stage: str, r: dict[str, StageResult], f: bool,
             progress: Callable[[int, int, str], None] | None) -> StageResult:
    if stage == "ingest":
        return run_ingest(cfg.ingest, layout, force=f, progress=progress)
    # Each stage takes its inputs as the StageResults the earlier stages returned.
    if stage == "synthesize":
        return run_synthesize(cfg.synthesize, r["ingest"], layout, force=f, progress=progress)
    if stage == "encode":
        return run_encode(cfg.encode, r["ingest"], r["synthesize"], layout, force=f, progress=progress)
    if stage == "refine":
        return run_refine(cfg.refine, r["ingest"], r["encode"], layout, force=f, progress=progress)
    if stage == "train":  # on the refine stage's pairs when it ran, else on encode's own pairs
        val = _eval_inputs(cfg, layout, r, False) if cfg.eval_source else None
        return run_train(cfg.train, r["ingest"], r["encode"], layout, force=f, progress=progress,
                         refine=r.get("refine"), val=val)
    captions, encode = _eval_inputs(cfg, layout, r, False)
    return run_evaluate(cfg.evaluate, r["train"], encode, captions, layout, force=f, progress=progress)


# ------------------------------------------------------------ one stage's config, by reference
class StageRef(BaseModel):
    """One stage's config named instead of spelt out: a pipeline preset's section and/or a run's config.

    `{"preset": "demo"}` is the config `synth-and-train` runs that stage with (`overrides` in the
    same dotted grammar, with or without the section: `{"steps": 8}` or `{"synthesize.steps": 8}`);
    `{"from_run": "runs/synthesize/<fp>"}` is the config that stage directory ran with. Together, the
    run gives what the stage computes and the preset how it runs (device, batching: the runtime
    fields, which a stage directory does not record); alone, a run's runtime fields take defaults.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str | None = Field(None, description="pipeline preset whose section is the config: demo, tiny, "
                               "coco-vitl14, coco-vitb32, flickr30k-vitl14, or a .toml path")
    overrides: dict[str, Any] = Field(default_factory=dict, description='dotted parameters of this stage, e.g. '
                                      '{"steps": 8} or {"synthesize.steps": 8}')
    from_run: str | None = Field(None, description="a directory of this stage (runs/<stage>/<fingerprint>): "
                                 "reuse the config it ran with")

    @model_validator(mode="after")
    def _names_something(self) -> StageRef:
        if self.preset is None and self.from_run is None:
            raise ValueError("give preset and/or from_run")
        return self


REF_KEYS = frozenset(StageRef.model_fields)


def stage_config(stage: str, config: StageConfig | StageRef | dict[str, Any]) -> StageConfig:
    """The validated config of `stage` from a stage config, a StageRef, or the dict of either.

    A dict holding only `preset`, `overrides` and `from_run` is a reference (so `{"preset": "tiny"}`
    is the tiny pipeline's train section, not a train config with model preset tiny); any other
    dict is the stage config itself. Every error names the parameter at fault.
    """
    if stage not in STAGE_ORDER:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGE_ORDER)}")
    cls: type[StageConfig] = PipelineConfig.model_fields[stage].annotation
    if isinstance(config, cls):
        return config
    if isinstance(config, dict):
        keys = set(config)
        # A reference with a misspelt key is named as such, not validated as a stage config.
        if keys and (keys <= REF_KEYS or keys & (REF_KEYS - set(cls.model_fields))):
            try:
                config = StageRef.model_validate(config)
            except ValidationError as e:
                raise ValueError(describe_validation_error(e, f"{stage} config reference")) from None
        else:
            return validate(cls, config, stage)
    if not isinstance(config, StageRef):
        raise TypeError(f"{stage} config: expected a {cls.__name__}, a StageRef or a dict, "
                        f"got {type(config).__name__}")

    overrides = {k if k.split(".")[0] in STAGE_ORDER else f"{stage}.{k}": v for k, v in config.overrides.items()}
    preset = resolve(config.preset, overrides) if config.preset is not None else None
    if config.from_run is None:
        return getattr(preset, stage)
    if preset is None:
        other = sorted(k for k in overrides if k.split(".")[0] != stage)
        if other:
            raise ValueError(f"override {other[0]!r}: a {stage} reference without a preset takes only "
                             f"{stage} overrides")
    stored = _run_config(stage, config.from_run)
    raw = {k: _without_content(v) for k, v in stored.items() if k in cls.model_fields and v != BY_CONTENT}
    if preset is not None:  # how to run it: the preset's (with the overrides already applied)
        given_preset = getattr(preset, stage).model_dump(mode="json")
        raw |= {k: v for k, v in given_preset.items() if k in cls.RUNTIME}
        # A path the directory holds by content only: the preset's (the fingerprint checks it is the same content).
        raw |= {k: given_preset[k] for k, v in stored.items() if k in given_preset and _holds_content(v)}
    raw = apply_overrides({stage: raw}, {k: v for k, v in overrides.items() if k.split(".")[0] == stage})[stage]
    where = f"from_run {config.from_run!r}"
    try:
        cfg = cls.model_validate(raw)
    except ValidationError as e:
        msg = f"{where}: {describe_validation_error(e, stage)}"
        if any(err["type"] == "missing" for err in e.errors()):
            msg += (f"\n  (a stage directory does not record the runtime fields ({', '.join(sorted(cls.RUNTIME))}): "
                    "give them in overrides, or add a preset)")
        raise ValueError(msg) from None
    # A field the directory holds by content only (a file's digest, another stage's fingerprint)
    # cannot be rebuilt from it: the caller gives it again, or the rerun would be another stage.
    given = {f for k, v in overrides.items() if k.split(".")[0] == stage
             for f in ([k.split(".")[1]] if "." in k else v if isinstance(v, dict) else [])}
    content = cfg.content()
    lost = sorted(k for k in content if k in stored and k not in given and content[k] != stored[k])
    if lost:
        raise ValueError(f"{where}: its config.json holds {', '.join(f'{stage}.{k}={stored[k]!r}' for k in lost)} "
                         f"by content only; give {'it' if len(lost) == 1 else 'them'} in overrides, e.g. "
                         f'{{"{lost[0]}": PATH}}')
    return cfg


def _holds_content(v: Any) -> bool:
    return v == BY_CONTENT or (isinstance(v, dict) and any(_holds_content(x) for x in v.values()))


def _without_content(v: Any) -> Any:
    """A stored value without the entries held by content only (`clip.pretrained` of a local CLIP)."""
    if isinstance(v, dict):
        return {k: _without_content(x) for k, x in v.items() if x != BY_CONTENT}
    return v


def _run_config(stage: str, path: str) -> dict[str, Any]:
    """The fingerprinted config a stage directory recorded (its config.json), checked to be of `stage`."""
    file = StageDir.at(path).config_file
    if not file.is_file():
        raise FileNotFoundError(f"from_run {path!r}: no config.json there; give a {stage} stage directory, "
                                f"e.g. runs/{stage}/<fingerprint>")
    recorded = atomic.read_json(file)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("config"), dict):
        raise ValueError(f"from_run {path!r}: {file} is not a stage config.json (no 'config' table)")
    if recorded.get("stage") != stage:
        raise ValueError(f"from_run {path!r}: a {recorded.get('stage')!r} stage directory, not a {stage} one")
    code_version = importlib.import_module(f"pcm.stages.{stage}").CODE_VERSION
    if recorded.get("code_version") != code_version:
        log.warning("from_run %s: made by %s code version %s, this is %s; its config is reused, its outputs "
                    "are not", path, stage, recorded.get("code_version"), code_version)
    return recorded["config"]
