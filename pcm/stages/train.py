"""The train stage: PCM-Net on synthetic-image features with CLIP-weighted cross-entropy, resumable to the bit.

One process (CPU or one GPU) trains in-process; `devices > 1` relaunches this module under
torchrun (DDP, rank 0 writes). Checkpoints hold model, Adam state, data position and RNG
states, so a run killed at any moment resumes where its last checkpoint was; with one process and
`deterministic=True` it ends with bitwise the same weights as an uninterrupted run (DDP reseeds
per rank and step, so it resumes exactly in data order but not to the bit).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, PlainValidator, ValidationError, field_validator, model_validator

from pcm import checkpoint
from pcm.config import StageConfig, validation_problems
from pcm.device import resolve_device
from pcm.model import PCMNetConfig, load_preset
from pcm.optim import OptimizerSpec, StepSpec, TrainStep, make_optimizer, noam_lr
from pcm.pictures import loss_curve
from pcm.split_images import load_split_images
from pcm.stages.contract import (
    ProgressFn,
    cached,
    drop_marker,
    finish,
    load_result,
    locked,
    stage_dir,
)
from pcm.validation import evaluate_val
from storage import atomic, checkpoints, jsonl, publish, remote
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
@dataclass(frozen=True)
class TrainInputs:
    """What a train stage reads: the finished ingest and encode stages, a refine stage's pairs (optional), and
    validation on another data set (its ingest and real-only encode results; optional)."""

    captions: StageResult
    encode: StageResult
    refine: StageResult | None = None
    val: tuple[StageResult, StageResult] | None = None

    @property
    def val_source(self) -> tuple[StageResult, StageResult]:
        """The (ingest, encode) results whose val split picks best/."""
        return self.val or (self.captions, self.encode)


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


# ---------------------------------------------------------------------- the training loop
def warmup_steps(config: TrainConfig, total: int) -> int:
    """The run's warm-up: `warmup_fraction` of its `total` steps (at least 1) when set, else `warmup`."""
    return max(1, round(config.warmup_fraction * total)) if config.warmup_fraction else config.warmup


def lr_at(config: TrainConfig, step: int, warmup: int | None = None) -> float:
    """The Noam learning rate of `step` under this config (`warmup`: the run's, see warmup_steps)."""
    return noam_lr(step, config.noam_d_model, warmup or config.warmup, config.lr_factor)


def optimizer_spec(config: TrainConfig, warmup: int | None = None) -> OptimizerSpec:
    """Adam's settings of this config, starting at the schedule's step-1 rate."""
    return OptimizerSpec(lr=lr_at(config, 1, warmup), betas=config.betas, eps=config.eps,
                         weight_decay=config.weight_decay)


def step_spec(config: TrainConfig, cxe_w: float | None = None) -> StepSpec:
    """The loss and clipping settings of this config (`cxe_w`: the resolved w when the config says auto)."""
    if cxe_w is None:
        if config.cxe_w == "auto":
            raise ValueError("cxe_w = 'auto' is resolved from the training pairs: pass the resolved w")
        cxe_w = config.cxe_w
    return StepSpec(cxe=config.cxe, cxe_w=cxe_w, label_smoothing=config.label_smoothing,
                    focal_gamma=config.focal_gamma, loss_reduction=config.loss_reduction, grad_clip=config.grad_clip)


@dataclass
class TrainData:
    """What the inputs give a run: the pairs and their tokens, the val split, vocabulary, concepts, CLIP head."""

    pairs: Any            # dataset.Pairs (synthetic image features x captions)
    store: Any            # their FeatureStore
    inputs: Any           # decoder input / target token ids, one row per pair
    targets: Any
    val: Any              # split_images.SplitImages: the real val images and their references (possibly none)
    val_store: Any
    vocab: Any
    model_config: PCMNetConfig  # the preset fitted to the feature shapes
    names: list[str]      # concept names and their CLIP text embeddings
    bank: Any
    head: Any             # CLIP's ln_post and proj
    clip_spec: dict[str, Any]
    cxe: dict[str, Any]   # w as used (auto resolved) and the weights it gives the pairs (mean, share 0, share 1)
    reference: Any = None  # pcm.confidence.Reference: the training distribution saved with every checkpoint


@dataclass
class Run:
    """One process's run as setup builds it; the loop advances the last four (what a checkpoint records)."""

    config: TrainConfig
    sd: StageDir
    info: Any             # distributed.DistInfo
    device: Any
    data: TrainData
    model: Any            # the PCMNet (what is saved) ...
    opt: Any
    train_step: TrainStep  # ... and the step over its DDP / compiled wrapper
    batches: Any          # dataset.EpochBatches
    total: int
    warmup: int           # the run's warm-up steps (warmup_steps)
    autocast: Any         # bf16 autocast or a null context, for validation
    step: int
    epoch: int
    position: int         # next batch of the epoch
    best: dict[str, Any]  # {"metric", "value", "step"} of the best validation so far
    events: Any = None    # pcm.tracking.EventLog on rank 0, else None


def train_worker(config: TrainConfig, inputs: TrainInputs, sd: StageDir, progress: ProgressFn | None = None) -> None:
    """The training of one process (rank 0 writes checkpoints, best/ and metrics.jsonl)."""
    import torch

    from pcm import distributed

    info = distributed.from_env()
    device = torch.device(resolve_device(config.device, info.local_rank))
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    distributed.setup(info, device)
    try:
        run = setup(config, inputs, sd, info, device)
        try:
            train_loop(run, progress)
        finally:
            if run.events is not None:
                run.events.close()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        distributed.teardown(info)


def load_data(config: TrainConfig, inputs: TrainInputs) -> TrainData:
    """Pairs (a refine stage's when given), vocabulary, concepts, CLIP head and the val split (another data
    set's with `inputs.val`), checked against the feature shards."""
    from pcm import dataset
    from pcm.vocab import Vocab

    captions, encode, refine = inputs.captions, inputs.encode, inputs.refine
    enc = encode.stage_dir
    pairs = dataset.load_pairs(captions.stage_dir, enc, config.data_fraction, config.seed,
                               refine=refine.stage_dir if refine else None)
    store = dataset.FeatureStore(enc, "features")
    store.check_rows(pairs.shard, pairs.row, pairs.image_keys)
    reference = training_reference(pairs, store, config.seed)  # the pairs as made (before any control rewrites them)
    if config.shuffle_images:
        log.warning("train.shuffle_images: a control run; every caption is paired with another caption's image")
        pairs = pairs.with_images_shuffled(config.seed)
    pairs, cxe = cxe_weighting(config, pairs)
    d_embed, d_width, n_patches = store.shapes(int(pairs.shard[0]))
    names, bank = dataset.load_concepts(enc)
    head, head_meta = dataset.load_clip_head(enc)
    cfg = config.model_preset().with_data_shapes(d_embed, d_width, n_patches, str(enc.path))
    if "ln_eps" in head_meta:
        cfg = cfg.model_copy(update={"clip_ln_eps": float(head_meta["ln_eps"])})
    clip_spec = encode.extra.get("clip") or json.loads(head_meta.get("clip", "{}"))
    vocab = Vocab.build(pairs.texts, config.min_word_count)
    tokens, targets = dataset.caption_tokens(pairs.texts, vocab, cfg.max_len)
    val_cap, val_enc = inputs.val_source
    val = load_split_images(val_cap.stage_dir, val_enc.stage_dir, "val", config.val_max_images)
    val_store = dataset.FeatureStore(val_enc.stage_dir, "real")
    if len(val):
        val_store.check_rows(val.shard, val.row, val.image_ids)
        if config.val_metric == "cider":
            from pcm.metrics import require_java

            require_java()  # fail now, not at the first validation
    if len(val) == 0:
        log.warning("%s: no encoded val images (encode ran without real images or ingest has no val split); "
                    "validation is skipped and best/ holds the final model", val_enc.path)
    return TrainData(pairs, store, tokens, targets, val, val_store, vocab, cfg, names, bank, head, clip_spec, cxe,
                     reference)


def training_reference(pairs: Any, store: Any, seed: int) -> Any:
    """The pairs' CLIP scores and their images' pooled patch tokens, summarised for `pcm caption`'s confidence."""
    from pcm import confidence

    shard, row = confidence.sample_images(pairs.shard, pairs.row, seed)
    reference = confidence.build_reference(pairs.clip_score, confidence.pooled_features(store, shard, row), seed)
    if reference is None:
        log.warning("only %d distinct training images: checkpoints carry no confidence reference (needs %d)",
                    len(shard), confidence.MIN_IMAGES)
    return reference


def cxe_weighting(config: TrainConfig, pairs: Any) -> tuple[Any, dict[str, Any]]:
    """CXE's w as used (`auto`: from these pairs) and the weights it gives them; with `cxe_uniform` (a control)
    the pairs' scores are replaced so that every pair gets the mean weight."""
    import numpy as np

    from pcm.loss import auto_cxe_w, cxe_weights_np

    if config.cxe_w != "auto":
        w = float(config.cxe_w)
    else:  # without CXE, w weighs nothing: 1 stands in, and the scores need not allow an auto w
        w = auto_cxe_w(pairs.clip_score) if config.cxe else 1.0
    weights = cxe_weights_np(pairs.clip_score, w) if config.cxe else np.ones(len(pairs))
    stats = {"cxe_w": w, "weight_mean": float(weights.mean()), "weight_zero": float((weights <= 0).mean()),
             "weight_cap": float((weights >= 1).mean())}
    if config.cxe_uniform:
        log.warning("train.cxe_uniform: a control run; every pair weighs %.4f, CXE's mean weight", stats["weight_mean"])
        # min(1, w * s) with s = mean / w is exactly the mean (at most 1) for every pair.
        pairs = pairs.with_scores(np.full(len(pairs), stats["weight_mean"] / w, dtype=np.float32))
        stats["uniform"] = True
    return pairs, stats


def setup(config: TrainConfig, inputs: TrainInputs, sd: StageDir, info: Any, device: Any) -> Run:
    """Data, model, Adam and the step; then the latest checkpoint's state, or a fresh start."""
    import torch

    from pcm import dataset, distributed
    from pcm.model import PCMNet

    data = load_data(config, inputs)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = PCMNet(data.model_config, len(data.vocab), data.bank, data.head).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.cuda_graphs and (device.type != "cuda" or info.world > 1):
        raise ValueError("cuda_graphs needs one CUDA device (devices=1, device=cuda)")
    batches = dataset.EpochBatches(data.pairs, data.store, data.inputs, data.targets, config.batch_size, config.seed,
                                   info.rank, info.world)
    total = len(batches) * config.epochs
    total = min(total, config.max_steps) if config.max_steps else total
    warmup = warmup_steps(config, total)
    if total < warmup and info.is_main:
        log.warning("train: %d steps in all but %d of warm-up: the learning rate rises for the whole run and never "
                    "decays; lower train.warmup or give train.warmup_fraction (e.g. 0.1)", total, warmup)
    opt = make_optimizer(params, optimizer_spec(config, warmup), device, capturable=config.cuda_graphs)

    if info.is_main:  # an object-store root: a newer checkpoint another host published (killed there)
        checkpoints.fetch_published(sd.checkpoints, sd.metrics_log)
    distributed.barrier(info)
    latest = checkpoints.latest(sd.checkpoints)
    if latest is not None:
        state = resume(config, sd, latest, info, model, opt, data.vocab)
    else:
        torch.manual_seed(config.seed + 1 + info.rank)
        state = {"step": 0, "epoch": 0, "position": 0, "best": {"metric": config.val_metric, "value": None, "step": None}}
    events = None
    if info.is_main:
        metrics_path = sd.metrics_log
        if latest is not None:
            jsonl.truncate(metrics_path, state["step"])
        else:  # lines (and events) of a run killed before its first checkpoint are redone
            metrics_path.unlink(missing_ok=True)
            shutil.rmtree(sd.events, ignore_errors=True)
            jsonl.append(metrics_path, {"step": 0, "total_steps": total, "train_pairs": len(data.pairs),
                                        "val_images": len(data.val), "vocab": len(data.vocab),
                                        "val_metric": config.val_metric, "warmup": warmup, "cxe": data.cxe})
        events = open_events(config, sd, data, resumed_at=state["step"] if latest is not None else None)

    # Wrapped and stepped only now, over the loaded weights and Adam state: a CUDA-graph step turns Adam's
    # learning rate into a GPU tensor, which loading the optimizer state would replace.
    net = distributed.wrap(model, info, device)
    if config.compile:
        net = torch.compile(net)
    amp = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    train_step = TrainStep(net, opt, params, step_spec(config, data.cxe["cxe_w"]), data.vocab.pad, device, amp, config.cuda_graphs)
    return Run(config, sd, info, device, data, model, opt, train_step, batches, total, warmup, autocast,
               step=state["step"], epoch=state["epoch"], position=state["position"], best=state["best"],
               events=events)


def open_events(config: TrainConfig, sd: StageDir, data: TrainData, resumed_at: int | None) -> Any:
    """Rank 0's TensorBoard log under events/<run name>/. A fresh run records its name, config and CXE's
    statistics at step 0; a resumed one purges the points after its checkpoint's step, which it redoes."""
    from pcm import tracking

    name = tracking.run_name(config.run_name or Path(config.preset).stem)
    events = tracking.EventLog(sd.events_run(name), purge_step=None if resumed_at is None else resumed_at + 1)
    if resumed_at is None:
        events.text("run", 0, f"`{name}`: train {sd.fingerprint}\n\n    " + json.dumps(config.content(), indent=1)
                    .replace("\n", "\n    "))
        events.scalars(0, {f"cxe/{k}": v for k, v in data.cxe.items() if isinstance(v, int | float)
                           and not isinstance(v, bool)})
    return events


def resume(config: TrainConfig, sd: StageDir, latest: Path, info: Any, model: Any, opt: Any, vocab: Any) -> dict[str, Any]:
    """Load model, Adam and RNG states from the latest checkpoint; returns its state (position, best)."""
    import torch

    from pcm.vocab import Vocab

    state = checkpoint.load_weights(latest, model, opt)
    if Vocab.load(latest / checkpoints.VOCAB).words != vocab.words:
        raise ValueError(f"{latest}: its vocabulary differs from the one built from the data; "
                         "the inputs changed under this stage directory; rerun with --force")
    if info.world == 1:
        checkpoint.set_rng_state(state["rng"])
    else:  # ranks draw different dropout masks; resume reseeds them from (seed, rank, step)
        torch.manual_seed(hash((config.seed, info.rank, state["step"])) % 2**63)
    log.info("resuming %s at step %d (epoch %d, batch %d)", sd.path, state["step"], state["epoch"], state["position"])
    if info.is_main:
        repair_best(sd, latest, state)
    return state


def train_loop(run: Run, progress: ProgressFn | None) -> None:
    """Step to `run.total`: log every `log_every`, validate every `val_every`, checkpoint every `checkpoint_every`."""
    import torch
    from tqdm import tqdm

    from pcm import distributed

    config, info, device = run.config, run.info, run.device
    metrics_path = run.sd.metrics_log
    bar = tqdm(total=run.total, initial=run.step, desc="train", unit="step",
               disable=not (config.progress_bar and info.is_main))
    loss_sum, loss_n, t_log = torch.zeros((), device=device), 0, time.monotonic()
    run.model.train()
    while run.step < run.total:
        run.batches.set_epoch(run.epoch)
        loader = torch.utils.data.DataLoader(
            run.batches, batch_size=None, sampler=range(run.position, len(run.batches)),
            num_workers=config.num_workers, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(config.seed), persistent_workers=False)
        for batch in loader:
            b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            run.step, run.position = run.step + 1, run.position + 1
            log_step = run.step % config.log_every == 0 or run.step >= run.total
            loss = run.train_step(b, lr_at(config, run.step, run.warmup), measure_clip=log_step and info.is_main)
            loss_sum += loss
            loss_n += 1
            bar.update(1)

            if run.position == len(run.batches):  # the epoch is done: the next position is the next epoch's start
                run.epoch, run.position = run.epoch + 1, 0
            last = run.step >= run.total
            if log_step:
                mean_loss = float(distributed.mean(loss_sum / loss_n, info))
                now = time.monotonic()
                if info.is_main:
                    line = {"step": run.step, "epoch": run.epoch, "loss": mean_loss,
                            "lr": lr_at(config, run.step, run.warmup),
                            "samples_per_s": loss_n * config.batch_size / (now - t_log)}
                    if run.train_step.clip_share is not None:  # this step's, not the window's (see TrainStep)
                        line["grad_clip_share"] = run.train_step.clip_share
                    jsonl.append(metrics_path, line)
                    run.events.scalars(run.step, {"train/" + k: v for k, v in line.items() if k != "step"})
                    bar.set_postfix(loss=f"{mean_loss:.3f}")
                    if progress:
                        progress(run.step, run.total, f"loss {mean_loss:.3f}")
                loss_sum, loss_n, t_log = torch.zeros((), device=device), 0, now
            do_val = run.step % config.val_every == 0 or last
            do_save = run.step % config.checkpoint_every == 0 or last
            better = False
            if info.is_main and do_val:
                run.model.eval()
                better = validate(run, last)
                run.model.train()
            # A new best is always checkpointed, and that step checkpoint first: a kill before best/
            # is written leaves a checkpoint that names it, and the resume writes best/ from it.
            if info.is_main and (do_save or better):
                run.events.flush()  # the points the checkpoint covers are on disk before it
                save(run, finished=last)
            if better:
                save_best(run)
            if do_val or do_save:  # the other ranks wait for rank 0's writes
                distributed.barrier(info)
                t_log = time.monotonic()  # samples/s counts training time only
            if last:
                break
    bar.close()


def validate(run: Run, last: bool) -> bool:
    """Score the val split at this step; True when it is the best so far (then best/ is written)."""
    config, data = run.config, run.data
    if len(data.val) == 0:  # nothing to select on: best/ is the final model
        if last:
            run.best = {"metric": "none", "value": None, "step": run.step}
        return last
    value = evaluate_val(run.model, data.vocab, data.val, data.val_store, run.device, run.autocast,
                         metric=config.val_metric, beam=config.val_beam, batch_size=config.val_batch_size)
    best = run.best["value"]
    better = best is None or (value > best if config.val_metric == "cider" else value < best)
    jsonl.append(run.sd.metrics_log, {"step": run.step, "val": value, "val_metric": config.val_metric})
    run.events.scalars(run.step, {f"val/{config.val_metric}": value})
    if better:
        run.best = {"metric": config.val_metric, "value": value, "step": run.step}
    return better


def save(run: Run, finished: bool) -> None:
    """The step checkpoint: weights, Adam, position, best and RNG states (the oldest beyond keep_last go)."""
    config, data = run.config, run.data
    ckpt_root = run.sd.checkpoints
    record = {"train_pairs": len(data.pairs), "val_images": len(data.val), "vocab": len(data.vocab),
              "scheduler": {"kind": "noam", "d_model": config.noam_d_model, "warmup": run.warmup,
                            "factor": config.lr_factor},
              "step": run.step, "epoch": run.epoch, "position": run.position, "finished": finished,
              "best": run.best, "rng": checkpoint.rng_state()}
    checkpoint.save(ckpt_root / checkpoints.step_name(run.step), model=run.model, vocab=data.vocab,
                    config=config.model_dump(mode="json"), clip=data.clip_spec, concept_names=data.names,
                    state=record, optimizer=run.opt, reference=data.reference)
    publish.publish_checkpoint(ckpt_root / checkpoints.step_name(run.step), run.sd.metrics_log)
    checkpoints.prune(ckpt_root, config.keep_last)   # here only: the store keeps every step a host published


def save_best(run: Run) -> None:
    """best/: this step's weights without Adam."""
    data = run.data
    checkpoint.save(checkpoints.recover(run.sd.best), model=run.model, vocab=data.vocab,
                    config=run.config.model_dump(mode="json"), clip=data.clip_spec, concept_names=data.names,
                    state={"step": run.step, "epoch": run.epoch, "best": run.best}, reference=data.reference)


def repair_best(sd: StageDir, latest: Path, state: dict[str, Any]) -> None:
    """Make best/ hold the step that the resumed checkpoint's state names as best.

    The best step's checkpoint is written before best/ (see the loop), so a kill between the two
    leaves `latest` naming a best step that best/ does not hold yet: best/ is written from that
    step's checkpoint (byte-identical to what the loop would have written).
    """
    best_step = state["best"]["step"]
    if best_step is None:
        return
    best = checkpoints.recover(sd.best)
    held = atomic.read_json(best / checkpoints.STATE).get("step") if (best / checkpoints.STATE).exists() else None
    if held == best_step:
        return
    source = dict(checkpoints.list_steps(sd.checkpoints)).get(best_step)
    if source is None:
        raise ValueError(f"{sd.path}: best/ holds step {held} but {latest.name} says the best is step {best_step}, "
                         "whose checkpoint is gone; rerun with --force")
    src_state = checkpoint.read_state(source)
    log.warning("%s: best/ holds step %s, not the best step %d (a kill before it was written); writing it from %s",
                sd.path, held, best_step, source.name)
    checkpoint.export(source, best, {"step": best_step, "epoch": src_state["epoch"], "best": state["best"]})


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
