"""The train stage: PCM-Net on synthetic-image features with CLIP-weighted cross-entropy, resumable to the bit.

One process (CPU or one GPU) trains in-process; `devices > 1` relaunches this module under
torchrun (DDP, rank 0 writes). Checkpoints hold model, Adam state, data position and RNG
states, so a run killed at any moment resumes where its last checkpoint was; with one process and
`deterministic=True` it ends with bitwise the same weights as an uninterrupted run (DDP reseeds
per rank and step, so it resumes exactly in data order but not to the bit).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, PlainValidator, ValidationError, field_validator, model_validator

from pcm.config import StageConfig, validation_problems
from pcm.model import PCMNetConfig, load_preset
from pcm.pictures import loss_curve
from pcm.stages.contract import (
    ProgressFn,
    cached,
    drop_marker,
    finish,
    load_result,
    locked,
    stage_dir,
)
from pcm.stages.train_worker import TrainInputs, train_worker
from storage import atomic, checkpoints, jsonl, remote
from storage.layout import RunLayout, StageDir
from storage.locks import try_lock
from storage.result import StageResult

log = logging.getLogger(__name__)

CODE_VERSION = "2"  # 2: captions tokenised as the PTB tokenizer cuts them

# `parity = "release"`: the authors' training numerics (X-modaler configs and losses), each a plain
# field or model override that an explicit value still beats. docs/train.md tabulates them.
RELEASE_TRAIN = {"label_smoothing": 0.1, "focal_gamma": 2.0, "loss_reduction": "token-mean"}
RELEASE_MODEL = {"word_embedding": "release", "word_dropout": 0.1, "position_init_std": 0.02}


def _cxe_w(v: Any) -> float | str:
    """CXE's w: a positive finite number or "auto" (one error for either, not one per union member)."""
    if v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise ValueError("must be a positive finite number or \"auto\"")
    return float(v)


CxeW = Annotated[float | Literal["auto"], PlainValidator(_cxe_w, json_schema_input_type=float | Literal["auto"])]


class TrainConfig(StageConfig):
    """PCM-Net training: model preset + overrides, loss, optimiser, schedule, data, validation, runtime."""

    RUNTIME: ClassVar[frozenset[str]] = frozenset({
        "device", "precision", "num_workers", "compile", "cuda_graphs", "devices", "dist_bind", "deterministic",
        "checkpoint_every", "keep_last", "progress_bar", "run_name"})

    # Model.
    preset: str = Field("vitl14", description="model preset: vitl14, vitb32, tiny or a .toml path")
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of preset fields (e.g. pcm=false)")
    parity: Literal["paper", "release"] = Field(
        "paper", description="paper = the paper's equation and this project's init; release = the authors' "
        "numerics (label smoothing 0.1, focal 2, token mean, their word/position embeddings) where not set")
    # Loss.
    cxe: bool = Field(True, description="CLIP-weighted cross-entropy (off = every caption weighs 1)")
    cxe_w: CxeW = Field(
        4.0, description="w of min(1, w * cos): 4 for ViT-L/14, 2.5 release ViT-B/32; auto = 1 / the median "
        "CLIP score of the training pairs (the median pair at the cap)")
    cxe_uniform: bool = Field(False, description="CONTROL, NOT THE METHOD: every pair weighs CXE's mean weight "
                              "over the training pairs (is it the per-pair weighting or the smaller loss?)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="0 = paper; 0.1 = release (KL to 1-eps / "
                                   "eps/(V-1))")
    focal_gamma: float = Field(0.0, ge=0, description="0 = off (paper); 2 = release (batch mean of (1-p)^2)")
    loss_reduction: Literal["caption-sum", "token-mean"] = Field(
        "caption-sum", description="caption-sum = paper (sum per caption, mean over captions); token-mean = release")
    min_word_count: int = Field(5, ge=1, description="words seen fewer times become <unk>")
    # Optimiser and schedule.
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam's betas, each in [0, 1)")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay (L2 on every trainable weight)")
    noam_d_model: int = Field(512, gt=0, description="model size of the Noam schedule")
    warmup: int = Field(10_000, gt=0, description="Noam warm-up steps (peak lr ~4.4e-4 for 512 / 10,000)")
    warmup_fraction: float | None = Field(None, gt=0, lt=1, description="warm-up as this fraction of the run's "
                                          "steps instead of `warmup` (a run of any size leaves warm-up)")
    lr_factor: float = Field(1.0, gt=0, le=1000, description="multiplies the Noam learning rate (at most 1000)")
    grad_clip: float | None = Field(0.1, gt=0, description="clip gradients by value; None = off")
    # Data.
    batch_size: int = Field(32, gt=0, description="global batch (split over devices)")
    epochs: int = Field(12, gt=0, description="passes over the training pairs")
    max_steps: int | None = Field(None, gt=0, description="stop after this many steps (demos, tests)")
    data_fraction: float = Field(1.0, gt=0, le=1, description="train on a seeded random fraction of the pairs")
    shuffle_images: bool = Field(False, description="CONTROL, NOT THE METHOD: train each caption on another "
                                 "caption's image (seeded), to measure what the captions alone teach")
    seed: int = Field(0, ge=0, description="seeds the model init, data order and noise")
    # Validation (val split only; test is never touched here) and bookkeeping.
    log_every: int = Field(50, gt=0, description="steps between metrics.jsonl lines")
    val_every: int = Field(2000, gt=0, description="steps between validations (and at the end)")
    val_metric: Literal["cider", "loss"] = Field("cider", description="picks best/: val CIDEr or val loss")
    val_beam: int = Field(1, ge=1, description="1 = greedy decoding for validation, else beam size")
    val_max_images: int | None = Field(1000, gt=0, description="validate on the first N val images; None = all")
    val_batch_size: int = Field(128, gt=0, description="images per batch when captioning the val split")
    # Runtime (not fingerprinted).
    checkpoint_every: int = Field(1000, gt=0, description="steps between resumable checkpoints")
    keep_last: int = Field(2, ge=1, description="step checkpoints kept")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU")
    num_workers: int = Field(2, ge=0, description="feature loading processes (0 = in the training process)")
    compile: bool = Field(False, description="torch.compile the model")
    devices: int = Field(1, ge=1, description="processes / GPUs; > 1 runs DDP")
    dist_bind: Literal["loopback", "all"] = Field(
        "loopback", description="loopback: the DDP processes meet through a file store on 127.0.0.1 only; all: "
        "torchrun --standalone (its stores listen on every interface)")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (bitwise resumable)")
    cuda_graphs: bool = Field(False, description="capture the whole training step as a CUDA graph (one GPU)")
    progress_bar: bool = Field(True, description="show a tqdm bar on the terminal (rank 0)")
    run_name: str | None = Field(None, description="the TensorBoard run name under events/ (the pipeline sets it: "
                                 "preset and overrides); None = the model preset's name")

    @model_validator(mode="before")
    @classmethod
    def _parity_defaults(cls, data: Any) -> Any:
        """Release parity fills the release's value of every piece the config leaves unset."""
        if not isinstance(data, dict) or data.get("parity") != "release":
            return data
        model = data.get("model") or {}
        if not isinstance(model, dict):
            return data
        return {**RELEASE_TRAIN, **data, "model": {**RELEASE_MODEL, **model}}

    @model_validator(mode="after")
    def _uniform_needs_cxe(self) -> TrainConfig:
        if self.cxe_uniform and not self.cxe:
            raise ValueError("cxe_uniform (a control) spreads CXE's mean weight over every pair: it needs cxe = true")
        return self

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each of Adam's betas must be in [0, 1), got {list(v)}")
        return v

    @field_validator("model")
    @classmethod
    def _known_preset_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = set(v) - set(PCMNetConfig.model_fields)
        if unknown:
            raise ValueError(f"unknown model fields {sorted(unknown)}; known: {sorted(PCMNetConfig.model_fields)}")
        return v

    @model_validator(mode="after")
    def _preset_resolves(self) -> TrainConfig:
        try:  # a bad preset name or override fails here, once, at the edge
            self.model_preset()
        except ValidationError as e:
            bad = "; ".join(validation_problems(e, "model"))
            raise ValueError(f"preset {self.preset!r} with overrides is invalid: {bad}") from None
        return self

    def model_preset(self) -> PCMNetConfig:
        return load_preset(self.preset, self.model)

    def content(self) -> dict[str, Any]:
        # Switches added later are left out at their defaults, so ordinary runs keep the fingerprints they had.
        out = super().content()
        for key, default in (("shuffle_images", False), ("parity", "paper"), ("loss_reduction", "caption-sum"),
                             ("cxe_uniform", False), ("warmup_fraction", None)):
            if out.get(key) == default:
                out.pop(key, None)
        return out


# ---------------------------------------------------------------------- stage API
def plan(config: TrainConfig, captions: StageResult, encode: StageResult, layout: RunLayout, *,
         refine: StageResult | None = None, val: tuple[StageResult, StageResult] | None = None) -> StageDir:
    """The train stage directory of these inputs (the ingest and encode results); no work, nothing written.

    `refine` (optional): a refine stage whose pairs.parquet says which image each caption trains on; without
    it the inputs, and so the fingerprint, are exactly those of a run before the refine stage existed.
    `val`: validate on another data set's (ingest, encode) instead of `captions`/`encode`'s val split; both
    enter the fingerprint (best/ depends on them) as `val_inputs`, apart from the inputs the lineage follows.
    """
    inputs = [captions, encode] + ([refine] if refine is not None else [])
    extra = {"val_inputs": {r.stage: r.fingerprint for r in val}} if val else None
    return stage_dir(layout, "train", config, inputs, CODE_VERSION, extra)


def verify(sd: StageDir) -> str | None:
    """None when the final checkpoint, best/ (holding the best step) and metrics.jsonl exist, else what is wrong."""
    latest = checkpoints.latest(sd.checkpoints)
    if latest is None:
        return "no checkpoint"
    state = atomic.read_json(latest / checkpoints.STATE)
    if not state.get("finished"):
        return f"training unfinished ({latest.name})"
    best = checkpoints.recover(sd.best)
    if not (best / checkpoints.MODEL).exists() or not (best / checkpoints.STATE).exists():
        return "no best/ checkpoint"
    want = (state.get("best") or {}).get("step")
    if sd.done_marker.exists():
        marked = (atomic.read_json(sd.done_marker).get("extra") or {}).get("best_step", want)
        if marked != want:
            return f"stage.done.json says best step {marked} but {latest.name} says {want}"
    got = atomic.read_json(best / checkpoints.STATE).get("step")
    if got != want:
        return f"best/ holds step {got}, not the best step {want}"
    if not sd.metrics_log.exists():
        return "no metrics.jsonl"
    return None


def run_train(config: TrainConfig, captions: StageResult, encode: StageResult, layout: RunLayout, *,
              force: bool = False, progress: ProgressFn | None = None, refine: StageResult | None = None,
              val: tuple[StageResult, StageResult] | None = None) -> StageResult:
    """Train (or resume) under the stage lock; write stage.done.json last and return the result.

    `captions`, `encode`: the ingest and encode stages' StageResults; `refine` (optional): a refine stage's,
    whose kept pairs are trained on; `val`: see `plan`.
    """
    sd = plan(config, captions, encode, layout, refine=refine, val=val)
    if not force and (done := cached(sd, verify)) is not None:
        if (lock := try_lock(sd.lock_file)) is not None:  # a finished stage is tidied too (if nobody works in it)
            try:
                remove_stale_temporaries(sd)
            finally:
                lock.release()
        return done
    with locked(sd):
        started = time.monotonic()
        drop_marker(sd, store=force)
        remove_stale_temporaries(sd)
        if force:
            for p in (sd.checkpoints, checkpoints.recover(sd.best)):
                shutil.rmtree(p, ignore_errors=True)
            sd.metrics_log.unlink(missing_ok=True)
            shutil.rmtree(sd.events, ignore_errors=True)
        if config.devices > 1 and "WORLD_SIZE" not in os.environ:
            from pcm import distributed

            total = total_steps_hint(sd)
            poll = (lambda: _report_from_metrics(sd, total, progress)) if progress else None
            val_args = ["--val-captions", val[0].path, "--val-encode", val[1].path] if val else []
            distributed.launch(["pcm.stages.train", "--config", config.model_dump_json(), "--captions", captions.path,
                                "--encode", encode.path, "--root", remote.public(layout.root),
                                *(["--refine", refine.path] if refine else []), *val_args], config.devices, poll,
                               bind=config.dist_bind)
        else:
            train_worker(config, TrainInputs(captions, encode, refine, val), sd, progress=progress)
        return _finish(sd, started)


# Another process opening this directory (pcm.stages.contract.open_stage, before it takes the lock) writes
# config.json without the stage lock (in milliseconds): its temporaries go only once this old.
CONFIG_TMP_MIN_AGE_S = 60.0


def remove_stale_temporaries(sd: StageDir) -> int:
    """Delete what killed writers of this stage left: temporaries of config.json, metrics.jsonl,
    stage.done.json, pictures/loss_curve.png, best/ and the step checkpoints (call it holding the stage lock).
    Event files are appended, not replaced: a resume purges their redone steps instead (open_events)."""
    n = atomic.remove_temporaries_of(sd.config_file, min_age=CONFIG_TMP_MIN_AGE_S)
    for path in (sd.metrics_log, sd.done_marker, sd.loss_curve_picture):
        n += atomic.remove_temporaries_of(path)
    n += checkpoints.remove_leftovers(sd.best)
    n += checkpoints.remove_step_leftovers(sd.checkpoints)
    if n:
        log.info("%s: removed %d temporaries left by killed writers", sd.path, n)
    return n


def total_steps_hint(sd: StageDir) -> int:
    """Steps planned, as the workers record them in metrics.jsonl's first line (0 before it exists)."""
    for rec in jsonl.read(sd.metrics_log):
        if "total_steps" in rec:
            return int(rec["total_steps"])
    return 0


def cxe_record(sd: StageDir) -> dict[str, Any]:
    """CXE's w as used and its weight statistics, as the workers record them in metrics.jsonl's first line."""
    return next((rec["cxe"] for rec in jsonl.read(sd.metrics_log) if "cxe" in rec), {})


def _report_from_metrics(sd: StageDir, total: int, progress: ProgressFn) -> None:
    recs = [r for r in jsonl.read(sd.metrics_log) if "loss" in r]
    total = total or total_steps_hint(sd)
    if recs and total:
        progress(recs[-1]["step"], total, f"loss {recs[-1]['loss']:.3f}")


def _finish(sd: StageDir, started: float) -> StageResult:
    latest = checkpoints.latest(sd.checkpoints)
    state = atomic.read_json(latest / checkpoints.STATE)
    pictures = {"loss_curve": str(loss_curve(jsonl.read(sd.metrics_log), sd.loss_curve_picture))}
    extra = {"best": str(checkpoints.recover(sd.best)), "latest": str(latest),
             "clip": atomic.read_json(latest / checkpoints.CLIP), "val_metric": state["best"]["metric"],
             "best_value": state["best"]["value"], "best_step": state["best"]["step"], "pictures": pictures,
             "cxe": cxe_record(sd)}
    counts = {"steps": state["step"], "train_pairs": state["train_pairs"], "val_images": state["val_images"],
              "vocab": state["vocab"]}
    from pcm import cards
    cards.write_model_card(sd)   # best/README.md; evaluate fills its model-index later
    return finish(sd, counts, started, extra)


# ---------------------------------------------------------------------- torchrun entry point
def main(argv: list[str] | None = None) -> None:
    """`python -m pcm.stages.train --config JSON --captions DIR --encode DIR --root DIR [--refine DIR]` (one torchrun
    worker)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pcm.stages.train", description=main.__doc__)
    p.add_argument("--config", required=True, help="TrainConfig as JSON")
    p.add_argument("--captions", required=True)
    p.add_argument("--encode", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--refine", default=None)
    p.add_argument("--val-captions")
    p.add_argument("--val-encode")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = TrainConfig.model_validate_json(a.config)
    captions, encode = load_result(a.captions), load_result(a.encode)
    refine = load_result(a.refine) if a.refine else None
    val = (load_result(a.val_captions), load_result(a.val_encode)) if a.val_captions and a.val_encode else None
    sd = plan(config, captions, encode, RunLayout(a.root), refine=refine, val=val)
    train_worker(config, TrainInputs(captions, encode, refine, val), sd)


if __name__ == "__main__":
    main(sys.argv[1:])
