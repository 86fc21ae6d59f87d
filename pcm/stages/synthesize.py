"""The synthesize stage: one diffusion image per training caption, batched, into WebDataset shards."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

import storage.shards
from pcm import diffusion
from pcm.config import BY_CONTENT, StageConfig
from pcm.diffusion import GenerationSpec, Synthesizer
from pcm.identity import local_model_dir, model_dir_id
from pcm.image_sources import ImportedImages, PairedImages, image_index, paired_images_digest
from pcm.pictures import sample_grid
from pcm.rendering import ShardFormat, first_images, render_shards
from pcm.samples import Sample, swapped_samples, train_samples
from pcm.samples import sample_seed as sample_seed  # re-exported: the dataset cards name it here (cards.SEED_RULE)
from pcm.stages.contract import (
    ProgressFn,
    cached,
    drop_marker,
    finish,
    locked,
    open_stage,
    stage_dir,
)
from storage import atomic, manifests, remote, tables
from storage.fingerprint import input_digest
from storage.layout import RunLayout, StageDir
from storage.result import StageResult
from storage.shards import IMAGE_EXTENSIONS, is_done, read_marker

log = logging.getLogger(__name__)

CODE_VERSION = "3"  # 2: status rows record rendered_from (the wrong_image_fraction switch); 3: local model and
# TAESD directories, paired and imported image roots enter the fingerprint by content, not by path
STAGE = "synthesize"
# What a model that is no preset renders at unless told (a preset renders at its own `render`, see the validator).
SIZE, STEPS = 512, 20


class SynthesizeConfig(StageConfig):
    """What to generate (fingerprinted) and how to run it (RUNTIME: device, batching, speed-ups)."""

    RUNTIME: ClassVar[frozenset[str]] = frozenset(
        {"device", "batch_size", "compile", "channels_last", "writer_threads", "progress_bar"})

    model: str = Field("tiny", description="diffusers hub id, local pipeline directory, or preset (tiny, sd15-arch)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of `model`")
    dtype: Literal["fp16", "bf16", "fp32"] = Field("fp32", description="weights and activations; fp16 on GPUs")
    scheduler: str = Field("dpm++", description=f"sampler: {', '.join(diffusion.SCHEDULERS)}")
    steps: int = Field(STEPS, ge=1, le=1000, description=f"denoising steps (unset: the model preset's `render`, "
                       f"else {STEPS})")
    guidance_scale: float = Field(7.5, ge=0.0, le=100.0, description="classifier-free guidance; <= 1 disables it")
    height: int = Field(SIZE, ge=8, le=4096, description="image height in pixels, a multiple of 8 and of the model's "
                        f"VAE factor (unset: the model preset's render size, its `render`, else {SIZE})")
    width: int = Field(SIZE, ge=8, le=4096, description="image width in pixels, a multiple of 8 and of the model's "
                       f"VAE factor (unset: the model preset's render size, its `render`, else {SIZE})")
    negative_prompt: str = Field("", description="negative prompt used with guidance")
    seed: int = Field(0, ge=0, description="run seed; each image's seed derives from it and its caption_id")
    limit: int | None = Field(None, ge=1, description="only the first N ok train captions (demos, benchmarks)")
    shard_size: int = Field(1000, ge=1, description="images per WebDataset shard")
    image_format: Literal["jpeg", "png", "webp"] = Field("jpeg", description="encoding of the stored images")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality")
    paired_images: str | None = Field(
        None, description="NOT SYNTHETIC (the oracle arm): take each train caption's own image from this root "
        "(the ingest stage's image_path) instead of generating one; resized to height x width")
    imported_images: str | None = Field(
        None, description="NOT GENERATED HERE: build the stage from existing images (e.g. the authors' SynthImgCap) "
        "under this directory, image files and/or tar sets, one per train caption; the generation fields do not apply")
    imported_mapping: str | None = Field(
        None, description="CSV `caption_id,image` naming each caption's image under imported_images; None = the "
        "image whose name (without suffix) is the caption_id")
    wrong_image_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="A CONTROLLED DEFECT, NOT THE METHOD: give this fraction of the train "
        "captions another caption's image (a seeded derangement among them; recorded per sample as rendered_from)")
    imported_max_bytes: int = Field(
        64 * 2**20, ge=1, description="imported_images: an image file or tar member over this many bytes is a failed "
        "row, refused before it is read")
    tiny_vae: str | None = Field(
        None, description="APPROXIMATE, CHANGES THE IMAGES: decode with a tiny VAE (TAESD) by hub id, local "
        "directory, or `tiny` (random, presets only) instead of the model's VAE; ~8x faster decoding")

    # -- runtime: how, not what -------------------------------------------------------
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    batch_size: int = Field(8, ge=1, description="images per UNet batch (x2 with guidance)")
    compile: bool = Field(False, description="torch.compile the UNet (GPU; slow first batch)")
    channels_last: bool = Field(False, description="channels-last memory format for UNet and VAE (GPU)")
    writer_threads: int = Field(4, ge=1, le=64, description="threads encoding images while the GPU works")
    progress_bar: bool = Field(True, description="show a tqdm bar")

    def content(self) -> dict[str, Any]:
        # Sources added later are left out when unset, so diffusion runs keep the fingerprints they had.
        out = super().content()
        for key in ("paired_images", "imported_images", "imported_mapping"):
            if out.get(key) is None:
                out.pop(key, None)
        if out.get("wrong_image_fraction") == 0.0:
            out.pop("wrong_image_fraction")
        if out.get("imported_images") is None:  # the size cap applies to imported images only
            out.pop("imported_max_bytes", None)
        # Paths are identified by content (`plan` adds the identities), never by how they are spelled.
        for key in ("model", "tiny_vae"):
            if local_model_dir(out.get(key)) is not None:
                out[key] = BY_CONTENT
        for key in ("paired_images", "imported_images", "imported_mapping"):
            if out.get(key) is not None:
                out[key] = BY_CONTENT
        return out

    @property
    def source(self) -> str:
        """Where the images come from: generated (diffusion), paired (oracle) or imported."""
        return "paired" if self.paired_images else "imported" if self.imported_images else "generated"

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        return diffusion.check_scheduler(v)

    @model_validator(mode="before")
    @classmethod
    def _preset_renders_at_its_own_size(cls, data: Any) -> Any:
        # The one place a preset's size and steps apply, whatever builds the config (CLI, Python, a flow).
        if isinstance(data, dict) and not data.get("imported_images"):
            model = data.get("model", cls.model_fields["model"].default)
            if isinstance(model, str):
                data = {**diffusion.render_defaults(model), **data}
        return data

    @field_validator("height", "width")
    @classmethod
    def _size_multiple(cls, v: int, info: ValidationInfo) -> int:
        model = info.data.get("model")
        step = diffusion.size_multiple(model) if isinstance(model, str) else diffusion.SIZE_MULTIPLE
        if v % step:
            factor = diffusion.vae_factor(model) if isinstance(model, str) else None
            why = (f"the VAE of preset {model!r} downsamples by {factor}" if factor is not None else
                   f"the model's own VAE factor ({diffusion.SD_VAE_FACTOR} for Stable Diffusion) is checked when it "
                   "loads")
            lower, upper = v - v % step, v - v % step + step
            near = f"{lower} or {upper}" if lower >= 8 else f"{upper}"
            raise ValueError(f"must be a multiple of {step} (the config requires multiples of {diffusion.SIZE_MULTIPLE}; "
                             f"{why}); try {near}")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty model: pass a hub id, a local directory or a preset")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> SynthesizeConfig:
        if self.paired_images and self.imported_images:
            raise ValueError("give paired_images or imported_images, not both: each replaces the diffusion model")
        if self.imported_mapping and not self.imported_images:
            raise ValueError("imported_mapping needs imported_images (the directory the mapping points into)")
        if self.wrong_image_fraction and self.imported_images:
            raise ValueError("wrong_image_fraction does not apply to imported_images: write the wrong pairs into "
                             "an imported_mapping instead")
        return self

    @model_validator(mode="after")
    def _tiny_vae_preset(self) -> SynthesizeConfig:
        if self.tiny_vae == "tiny" and not diffusion.is_preset(self.model):
            raise ValueError("tiny_vae='tiny' is a random decoder for the presets; for real models use "
                             "madebyollin/taesd (SD 1.x/2.x), madebyollin/taesdxl (SDXL) or a local directory")
        return self


# -- the plan -----------------------------------------------------------------------------
def _captions_file(captions: StageResult) -> Path:
    return manifests.CAPTIONS.path(captions.stage_dir)


def planned_samples(config: SynthesizeConfig, captions: StageResult) -> list[Sample]:
    """The ok train-split captions in file order (first `limit`), each with its seed (some swapped, with
    `wrong_image_fraction`)."""
    key = (config.seed, config.limit, str(_captions_file(captions)), config.paired_images is not None)
    return list(swapped_samples(*key, config.wrong_image_fraction) if config.wrong_image_fraction else train_samples(*key))


def shard_samples(config: SynthesizeConfig, samples: Sequence[Sample]) -> list[list[Sample]]:
    n = config.shard_size
    return [list(samples[i:i + n]) for i in range(0, len(samples), n)]


def num_shards(config: SynthesizeConfig, captions: StageResult) -> int:
    return math.ceil(len(planned_samples(config, captions)) / config.shard_size)


def plan(config: SynthesizeConfig, captions: StageResult, layout: RunLayout) -> StageDir:
    """The stage directory for these captions (the ingest stage's result) and this config; no work, nothing
    written (Prefect's cache key)."""
    extra = {"model_preset_digest": diffusion.preset_digest(config.model)} if diffusion.is_preset(config.model) else {}
    if config.imported_images:  # what the set and the mapping hold, not their names, make the fingerprint
        extra = {"imported_index": image_index(config.imported_images).digest()}
        if config.imported_mapping:
            extra["imported_mapping_sha256"] = input_digest(config.imported_mapping)
    for key in ("model", "tiny_vae"):   # a local directory: the digest of its files
        if config.source == "generated" and (d := local_model_dir(getattr(config, key))) is not None:
            extra[f"{key}_content"] = model_dir_id(d)
    if config.paired_images:
        samples = planned_samples(config, captions)
        extra["paired_images_manifest"] = paired_images_digest(config.paired_images, samples,
                                                               f"{captions.fingerprint}:{config.limit}")
    return stage_dir(layout, STAGE, config, [captions], CODE_VERSION, extra or None)


def pending_shards(config: SynthesizeConfig, captions: StageResult, layout: RunLayout) -> list[int]:
    """Indices of the shards not done yet (what flow runs still have to render)."""
    sd = plan(config, captions, layout)
    return [i for i in range(num_shards(config, captions)) if not is_done(sd.image_shard(i))]


def verify(sd: StageDir) -> str | None:
    """None when every shard and samples.parquet exist, else what is missing."""
    if not sd.done_marker.exists():
        return f"no {sd.done_marker.name}"
    n = StageResult.load(sd.done_marker).counts.get("shards", 0)
    missing = [i for i in range(n) if not is_done(sd.image_shard(i))]
    if missing:
        return f"{len(missing)} shard(s) missing, e.g. {sd.shard_name(missing[0])}"
    if not manifests.SAMPLES.exists(sd):
        return f"{manifests.SAMPLES.name} missing"
    return None


# -- generation -----------------------------------------------------------------------------
def generation_spec(config: SynthesizeConfig) -> GenerationSpec:
    """What the diffusion model (`pcm.diffusion.Synthesizer`) needs of the config."""
    return GenerationSpec(
        model=config.model, revision=config.revision, dtype=config.dtype, scheduler=config.scheduler,
        steps=config.steps, guidance_scale=config.guidance_scale, height=config.height, width=config.width,
        negative_prompt=config.negative_prompt, tiny_vae=config.tiny_vae, device=config.device,
        batch_size=config.batch_size, compile=config.compile, channels_last=config.channels_last)


def make_generator(config: SynthesizeConfig) -> Synthesizer | PairedImages | ImportedImages:
    """What turns the plan's samples into images: the diffusion model, the paired images (oracle) or an import."""
    if config.paired_images:
        return PairedImages(config.paired_images, width=config.width, height=config.height)
    return imported_images(config) if config.imported_images else Synthesizer(generation_spec(config))


def imported_images(config: SynthesizeConfig) -> ImportedImages:
    return ImportedImages(config.imported_images, mapping=config.imported_mapping, max_bytes=config.imported_max_bytes)


def made_from(generator: Synthesizer | PairedImages | ImportedImages, config: SynthesizeConfig) -> bool:
    """Whether a loaded generator is what `make_generator(config)` makes (the diffusion model: from its spec)."""
    if isinstance(generator, Synthesizer):
        return config.source == "generated" and generator.spec == generation_spec(config)
    return config.source != "generated" and generator == make_generator(config)


@lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    import diffusers
    import torch

    return {"diffusers": diffusers.__version__, "torch": torch.__version__}


def sample_metadata(config: SynthesizeConfig, sample: Sample) -> dict[str, Any]:
    """What made this image (the `.json` of each sample)."""
    if config.imported_images:  # no generator settings: the image was made elsewhere, by means not recorded here
        source = imported_images(config)
        key, index = source.key(sample.caption_id), source.index
        return {"caption_id": sample.caption_id, "text": sample.text, "source": "imported",
                "imported_images": str(index.root), "imported_mapping": config.imported_mapping,
                "imported_from": index.describe(key) if key else None, "versions": _versions()}
    return {"source": config.source,
        "caption_id": sample.caption_id, "text": sample.text, "seed": sample.seed, "run_seed": config.seed,
        "model": config.model, "revision": config.revision, "scheduler": config.scheduler,
        "steps": config.steps, "guidance_scale": config.guidance_scale, "negative_prompt": config.negative_prompt,
        "height": config.height, "width": config.width, "dtype": config.dtype, "tiny_vae": config.tiny_vae,
        "versions": _versions(),
    } | ({"paired_image": sample.image_path, "paired_images": config.paired_images} if config.paired_images else {}) \
      | ({"rendered_from": sample.rendered_from, "rendered_text": sample.rendered_text,
          "wrong_image_fraction": config.wrong_image_fraction} if sample.rendered_from else {})


def shard_format(config: SynthesizeConfig) -> ShardFormat:
    """How this config's shards store their samples (pcm.rendering)."""
    return ShardFormat(image_format=config.image_format, jpeg_quality=config.jpeg_quality,
                       extension=IMAGE_EXTENSIONS[config.image_format], importing=bool(config.imported_images),
                       metadata=lambda sample: sample_metadata(config, sample))


def run_synthesize(config: SynthesizeConfig, captions: StageResult, layout: RunLayout, *,
                   shards: list[int] | None = None, worker_index: int = 0, num_workers: int = 1, force: bool = False,
                   progress: ProgressFn | None = None, finalize_when_complete: bool = True,
                   synthesizer: Synthesizer | PairedImages | ImportedImages | None = None) -> StageResult:
    """Generate the pending shards in scope; finalise the stage when every shard is done.

    Scope: `shards` (explicit indices), else shards with `i % num_workers == worker_index`. A
    per-shard lock keeps overlapping workers from writing a shard twice: held shards are skipped,
    then waited for. Returns the finished stage result, or, when shards outside this call's scope
    are still pending (or `finalize_when_complete` is False, as in the per-shard Prefect tasks, which
    leave finalising to their own task), a partial result with `extra["complete"] = False`.
    `synthesizer`: an already loaded model to reuse (benchmarks, notebooks); made from `config`.
    `captions`: the ingest stage's StageResult.
    """
    if synthesizer is not None and not made_from(synthesizer, config):
        raise ValueError("the synthesizer passed to run_synthesize was made from another config")
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index must be in [0, num_workers); got {worker_index} of {num_workers}")
    started = time.monotonic()
    sd = plan(config, captions, layout)
    if not force and (hit := cached(sd, verify)) is not None:
        return hit
    open_stage(sd)  # the shards of this call are written without the stage lock
    samples = planned_samples(config, captions)
    groups = shard_samples(config, samples)
    total = len(groups)
    if shards is not None:
        bad = [i for i in shards if not 0 <= i < total]
        if bad:
            raise ValueError(f"shard indices {bad} out of range: this plan has {total} shards (0..{total - 1})")
        scope = sorted(set(shards))
    else:
        scope = [i for i in range(total) if i % num_workers == worker_index]
    if force:
        drop_marker(sd, store=True)

    def tar(i: int) -> Path:
        return sd.image_shard(i)

    todo = [i for i in scope if force or not is_done(tar(i))]
    counts = {"ok": 0, "failed": 0, "shards_written": 0}

    def report(message: str) -> None:
        if progress:
            progress(sum(is_done(tar(i)) for i in range(total)), total, message)

    if todo:
        counts = render_shards(synthesizer or make_generator(config), sd, groups, todo, shard_format(config),
                               redo=force, batch_size=config.batch_size, writer_threads=config.writer_threads,
                               progress_bar=config.progress_bar, counts=counts, report=report)
    if not finalize_when_complete or not all(is_done(tar(i)) for i in range(total)):
        return partial_result(sd, total, counts, started)
    return finalize(config, captions, layout, started=started)


def partial_result(sd: StageDir, total: int, counts: dict[str, int], started: float,
                   extra: dict[str, Any] | None = None) -> StageResult:
    """What a call that wrote some shards returns while others are pending: `extra["complete"] = False`, no marker."""
    pending = [i for i in range(total) if not is_done(sd.image_shard(i))]
    return StageResult(stage=STAGE, fingerprint=sd.fingerprint, path=remote.public(sd.path),
                       counts={**counts, "shards": total, "shards_pending": len(pending)},
                       timings={"total_s": round(time.monotonic() - started, 3)},
                       extra={"complete": False, "pending": pending[:100], **(extra or {})})


# -- finalisation -----------------------------------------------------------------------------
def finalize(config: SynthesizeConfig, captions: StageResult, layout: RunLayout, *,
             started: float | None = None) -> StageResult:
    """Merge the shards' status rows into samples.parquet, draw a sample grid, write the stage marker."""
    started = time.monotonic() if started is None else started
    sd = plan(config, captions, layout)
    with locked(sd, wait=None):
        if (hit := cached(sd, verify)) is not None:
            return hit
        groups = shard_samples(config, planned_samples(config, captions))
        pending = [i for i in range(len(groups)) if not is_done(sd.image_shard(i))]
        if pending:
            raise RuntimeError(f"{sd.path}: cannot finalise, {len(pending)} shard(s) not done "
                               f"(e.g. {sd.shard_name(pending[0])}); run `pcm synthesize` for them first")
        status = manifests.SHARD_SAMPLES.concat(sd, range(len(groups)))
        planned = [s.caption_id for g in groups for s in g]
        if status["caption_id"].to_pylist() != planned:
            raise RuntimeError(f"{sd.path}: shard status rows do not match the plan; delete the shards "
                               "and rerun with --force")
        ok = sum(s == tables.STATUS_OK for s in status["status"].to_pylist())
        failed_warning = check_some_ok(sd, status.select(["status", "error"]).to_pylist(), len(groups))
        manifests.SAMPLES.write(sd, status)
        pictures = {"samples": str(sample_grid(first_images(sd, len(groups)), sd.samples_picture))}
        gen_s = sum(read_marker(sd.image_shard(i)).get("generate_s", 0.0) for i in range(len(groups)))
        timings = {"generate_s": round(gen_s, 3)}
        if gen_s > 0:
            timings["images_per_s"] = round(len(planned) / gen_s, 3)
        counts = {"captions": len(planned), "ok": ok, "failed": len(planned) - ok, "shards": len(groups)}
        write_card(config, captions, sd, counts)
        return finish(sd, counts=counts,
                      started=started, timings=timings,
                      extra={"complete": True, "pictures": pictures, "source": config.source,
                             "warning": failed_warning,
                             "model": config.model if config.source == "generated" else config.source,
                             "image_format": config.image_format, "extension": IMAGE_EXTENSIONS[config.image_format]})


def write_card(config: SynthesizeConfig, captions: StageResult, sd: StageDir, counts: dict[str, int]) -> None:
    """The stage's dataset card (README.md, pcm.cards), so the directory is what `hf upload --repo-type dataset`
    takes; written before the marker, and no part of the fingerprint."""
    from pcm import cards

    generator = config.source if config.source != "generated" else (
        f"{Path(config.model).name} (local directory)" if local_model_dir(config.model) is not None else config.model)
    shards = sd.shard_glob("shards", "tar")
    text = cards.dataset_card(
        config=config.model_dump(mode="json"), counts=counts, source_dataset=captions.extra.get("name"),
        toy=config.source == "generated" and cards.is_toy_generator(config.model), generator=generator,
        shards=shards, manifests=[manifests.SAMPLES.path(sd).relative_to(sd.path).as_posix()],
        versions=_versions() if config.source != "imported" else {})
    atomic.write_text(sd.card, text)


# A stage where more than this share of the samples failed is finished, with a warning in the log and its result.
WARN_FAILED_SHARE = 0.1


def check_some_ok(sd: StageDir, rows: list[dict[str, Any]], n_shards: int) -> str | None:
    """No sample ok is an error naming the first reasons (no stage marker, and the shards' markers are dropped so
    that a rerun renders them again); a failed share over WARN_FAILED_SHARE is a warning, returned."""
    failed = [r for r in rows if r["status"] != tables.STATUS_OK]
    if rows and len(failed) == len(rows):
        for i in range(n_shards):
            storage.shards.drop_marker(sd.image_shard(i), store=True)  # known bad: withdrawn from a store too
        shown = tables.failure_reasons(failed)
        raise RuntimeError(f"{sd.path}: every one of the {len(rows)} samples failed ({shown}); the likely cause is the "
                           "model, the device or the image source, not the captions. The stage is not marked done; "
                           "fix the cause and rerun (its shards will be made again)")
    if len(failed) > WARN_FAILED_SHARE * len(rows):
        message = (f"{len(failed)} of {len(rows)} samples failed ({100 * len(failed) / len(rows):.0f}%), e.g. "
                   f"{failed[0]['error']}; they are failed rows of samples.parquet and train without them")
        log.warning("%s: %s", sd.path, message)
        return message
    return None
