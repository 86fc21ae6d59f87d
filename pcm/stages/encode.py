"""Encode stage: CLIP scores, global and patch features of synthetic and real images, concept vocabulary.

Units of work are feature shards: one per synthetic WebDataset shard (`features/`) and one per
`real_shard_size` real val/test images (`real/`). Each unit writes its status table, then its
safetensors file, then its done marker, so a killed run resumes with the pending units only.
JPEG decoding, preprocessing and tokenisation run in DataLoader worker processes; the main
process only moves pinned batches to the device, runs CLIP and hands results to a writer thread.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from pcm import concept_bank, release_concepts, release_features
from pcm.clip import ClipSpec, LoadedClip, clip_head, load_clip, preset_path, quick_gelu
from pcm.concepts import read_vocabulary
from pcm.config import BY_CONTENT, StageConfig
from pcm.device import resolve_device
from pcm.feature_shards import encode_claimed, unit_done, withdraw_units
from pcm.identity import clip_content_id
from pcm.image_batches import FEATURES, REAL, Unit, real_image_units, real_images_digest, synthetic_units
from pcm.score_summary import summarise_scores
from pcm.stages.contract import (
    ProgressFn,
    cached,
    check_made_from,
    check_stages,
    drop_marker,
    finish,
    finished_like,
    load_result,
    locked,
    open_stage,
    stage_dir,
)
from storage import manifests, tables
from storage.arrays import write_arrays
from storage.fingerprint import input_digest
from storage.layout import RunLayout, StageDir
from storage.result import StageResult

log = logging.getLogger(__name__)

CODE_VERSION = "2"  # 2: images_root and a local CLIP (local-dir: or a weights file) enter the fingerprint by
# content (the manifest of the real images read; the digest of the weights), not by absolute path.
STAGE = "encode"


class EncodeConfig(StageConfig):
    """What to encode and how; runtime fields (device, batching, workers) stay out of the fingerprint."""

    RUNTIME: ClassVar[frozenset[str]] = frozenset(
        {"device", "batch_size", "num_workers", "pin_memory", "progress_bar"})

    clip: ClipSpec = Field(default_factory=ClipSpec)
    images_root: str | None = None        # real val/test images: images_root / captions.image_path
    real_shard_size: int = Field(1000, ge=1)
    min_count: int = Field(2, ge=1)       # concept: a noun seen at least this often ...
    top_n: int | None = Field(446, ge=1)  # ... among the most frequent (446 = the authors' COCO list size)
    vocabulary_file: str | None = None    # one concept a line, instead of extraction
    concepts_from: str | None = None      # another encode stage: its concept words (the release: COCO's for Flickr)
    prompt: str = "A photo of {c}."
    # Concept embedding = mean of the normalised embeddings over a template set, renormalised (CLIP's
    # zero-shot recipe). The release's files say "with_ensemble" without naming the templates;
    # "openai-imagenet" is CLIP's 80 ImageNet templates, "simple-imagenet" open_clip's 7. None: `prompt` alone.
    prompt_ensemble: Literal["openai-imagenet", "simple-imagenet"] | None = None
    # The authors' released per-image .npz features (pcm.release_features) in place of CLIP's image tower;
    # CLIP still embeds the captions and concepts, so clip must be the model that made the files.
    imported_features: str | None = None
    device: str = "auto"
    batch_size: int = Field(256, ge=1)
    num_workers: int = Field(4, ge=0)
    pin_memory: bool = True
    progress_bar: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt_has_slot(cls, v: str) -> str:
        if "{c}" not in v:
            raise ValueError("the prompt must contain {c}, where the concept goes, e.g. 'A photo of {c}.'")
        try:
            v.format(c="dog")
        except (IndexError, KeyError, ValueError) as e:
            raise ValueError(f"the prompt may hold only the {{c}} slot ({e}); write literal braces as {{{{ }}}}") from None
        return v

    @model_validator(mode="after")
    def _one_concept_source(self) -> EncodeConfig:
        if self.vocabulary_file and self.concepts_from:
            raise ValueError("give vocabulary_file or concepts_from, not both: each is the whole concept list")
        return self

    def content(self) -> dict[str, Any]:
        """The fingerprinted fields, with paths normalised so their spelling cannot change the fingerprint.

        Paths are identified by content, never by spelling (two checkouts, two hosts agree): `plan`
        adds the manifest of the real images read from `images_root`, the digest of a local CLIP
        (`clip.pretrained` as `local-dir:` or a weights file), the sha256 of `vocabulary_file` and the
        fingerprint of `concepts_from`; their paths are left out.
        """
        out = super().content()
        if out.get("images_root") is not None:
            out["images_root"] = BY_CONTENT
        if self.clip.is_local:
            out["clip"]["pretrained"] = BY_CONTENT
        for key in ("vocabulary_file", "concepts_from", "imported_features"):
            if out.get(key) is not None:
                out[key] = BY_CONTENT
        if out.get("imported_features") is None:
            out.pop("imported_features", None)  # unset: the fingerprints of stages made before the option stay
        return out


def absolute_path(path: str) -> str:
    """`path` with `~` expanded, made absolute against the working directory, `..` and `//` collapsed.

    Symbolic links are not followed, so a path that is already absolute and clean stays as written.
    """
    return os.path.abspath(os.path.expanduser(path))


def check_images_root(config: EncodeConfig) -> None:
    """A given `images_root` must be an existing folder: a typo is an error, never 'every image failed'."""
    if config.images_root is None:
        return
    path = Path(config.images_root).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"encode.images_root={config.images_root!r} {what} ({absolute_path(config.images_root)}); give the folder "
            "that the ingest stage's image paths (captions.parquet image_path, e.g. val2014/COCO_val2014_....jpg) "
            "are relative to, or leave images_root out to encode no real val/test images")


# -- inputs and units ----------------------------------------------------------------------

def _inputs(cap: StageResult, syn: StageResult | None) -> tuple[StageResult, StageResult | None]:
    """The ingest and synthesize stages' results (`syn` None: a real-only stage, the val/test images of an
    evaluation source), checked to be theirs and made from each other: the features pair each caption with
    its image by caption id, so shards made from another caption file would pair them with other captions."""
    check_stages(captions=(cap, "ingest"), shards=(syn, "synthesize"))
    if syn is not None:
        check_made_from(syn, cap, "shards", "captions")
    return cap, syn


def plan(config: EncodeConfig, captions: StageResult, shards: StageResult | None, layout: RunLayout) -> StageDir:
    """The stage directory for these inputs (the ingest and synthesize results); no work, nothing written (Prefect's
    cache key).

    `shards` None plans a real-only stage: the val/test images of the captions, no synthetic features
    and no concepts (an evaluation source's, see pcm.stages.pipeline.EvalSource).
    """
    cap, syn = _inputs(captions, shards)
    inputs = [cap] if syn is None else [cap, syn]
    extra: dict[str, Any] = {"real_only": True} if syn is None else {}
    if config.clip.is_local:  # the weights' digest, wherever the file or directory is
        extra["clip_content"] = clip_content_id(config.clip)
    if config.vocabulary_file:
        path = Path(config.vocabulary_file)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary_file={config.vocabulary_file!r}: not found; "
                                    "give a text file with one concept a line, or the release's concept .pickle")
        extra["vocabulary_sha256"] = input_digest(path)  # the content, not the name, makes the fingerprint
    if config.concepts_from:
        extra["concepts_from"] = _concept_source(config.concepts_from).fingerprint  # its content, not its path
    if config.imported_features:  # the files' names and sizes, wherever the folder is
        extra["imported_features"] = release_features.manifest_digest(config.imported_features)
    if config.clip.is_preset:  # an edited preset file is a different model
        extra["clip_preset_sha256"] = input_digest(preset_path(config.clip.model))
    if quick_gelu(config.clip):  # features made before the QuickGELU fix were computed with GELU
        extra["clip_quick_gelu"] = True
    try:
        check_images_root(config)
    except FileNotFoundError:
        # A finished stage no longer needs its real images (its features are stored): reuse it.
        sd = finished_like(layout, stage_dir(layout, STAGE, config, inputs, CODE_VERSION, extra), "images_manifest")
        if sd is None:
            raise
        log.warning("encode.images_root=%r does not exist; reusing the finished stage encoded from it: %s",
                    config.images_root, sd.path)
        return sd
    if config.images_root is not None:
        extra["images_manifest"] = real_images_digest(config.images_root, cap.stage_dir, cap.fingerprint)
    return stage_dir(layout, STAGE, config, inputs, CODE_VERSION, extra)


def feature_units(shards: StageResult | None) -> list[Unit]:
    """One unit per synthetic shard of the finished synthesize stage (none for a real-only stage)."""
    return [] if shards is None else synthetic_units(shards.stage_dir, shards.counts.get("shards"))


def real_units(config: EncodeConfig, captions: StageResult) -> list[Unit]:
    """The val/test images to encode, in slices of real_shard_size (none without images or imported features)."""
    if config.images_root is None and not config.imported_features:
        return []
    return real_image_units(captions.stage_dir, config.real_shard_size)


@functools.lru_cache(maxsize=1)
def cached_clip(spec: ClipSpec, device: str) -> LoadedClip:
    """One loaded CLIP per process, shared by the per-shard tasks of a flow run (`cache_clear()` frees it)."""
    return load_clip(spec, device)


def pending_feature_shards(config: EncodeConfig, captions: StageResult, shards: StageResult,
                           layout: RunLayout) -> list[int]:
    """Indices of the synthetic shards whose feature shard is not done yet (what a flow run still has to encode)."""
    sd = plan(config, captions, shards, layout)
    return [u.index for u in feature_units(shards) if not unit_done(sd, u.kind, u.index)]


def _imported_batches(config: EncodeConfig, units: list[Unit], clip: LoadedClip) -> Iterable[dict] | None:
    """The release's files in place of decoded images (encode.imported_features), read in this process; else None."""
    if not config.imported_features:
        return None
    dims = (clip.embed_dim, clip.patches, clip.width)
    return release_features.imported_batches(
        units, release_features.npz_index(config.imported_features), clip.tokenizer, config.batch_size, dims,
        clip.grid, {k: v.numpy() for k, v in clip_head(clip).items()})


def encode_units(config: EncodeConfig, sd: StageDir, units: list[Unit], *, clip: LoadedClip | None = None,
                 progress: ProgressFn | None = None) -> tuple[int, float, LoadedClip | None]:
    """Encode the pending units under their shard locks (pcm.feature_shards.encode_claimed): a few per loader
    worker at a time. Returns (images encoded here, seconds spent encoding them, the loaded CLIP or None)."""
    return encode_claimed(
        sd, units, clip=clip, load_clip=lambda: cached_clip(config.clip, resolve_device(config.device)),
        window=2 * max(1, config.num_workers), batch_size=config.batch_size, num_workers=config.num_workers,
        pin_memory=config.pin_memory, images_root=str(Path(config.images_root).expanduser()) if config.images_root else None,
        progress_bar=config.progress_bar, batches_for=lambda todo, c: _imported_batches(config, todo, c),
        progress=progress)


# -- stage-wide outputs ---------------------------------------------------------------------

def _concept_source(path: str) -> StageResult:
    """A finished encode stage whose concept words another encode reuses (`concepts_from`)."""
    try:
        result = load_result(path)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"concepts_from={path!r}: {e}") from None
    if result.stage != "encode":
        raise ValueError(f"concepts_from={path!r} is a {result.stage} stage directory; pass an encode stage's")
    return result


def build_concepts(config: EncodeConfig, captions: StageResult, clip: LoadedClip, batch_size: int = 256) -> list[dict]:
    """Concept rows (pcm.concept_bank): the release's file as it is, else the given or extracted nouns embedded."""
    texts = concept_bank.caption_texts(captions.stage_dir)
    if config.vocabulary_file and release_concepts.is_release_file(config.vocabulary_file):
        return release_concepts.concept_rows(config.vocabulary_file, texts, clip, config.progress_bar)
    words = (read_vocabulary(config.vocabulary_file) if config.vocabulary_file else
             concept_bank.concept_words(_concept_source(config.concepts_from).stage_dir) if config.concepts_from
             else None)
    return concept_bank.concept_rows(texts, clip, words=words, min_count=config.min_count, top_n=config.top_n,
                                     prompt=config.prompt, prompt_ensemble=config.prompt_ensemble,
                                     progress_bar=config.progress_bar, batch_size=batch_size)


def write_clip_head(sd: StageDir, clip: LoadedClip) -> None:
    head = {k: v.numpy() for k, v in clip_head(clip).items()}
    write_arrays(sd.clip_head, head,
                 {"clip": clip.spec.model_dump_json(), "ln_eps": repr(clip.ln_eps)})


def _check_some_real_ok(config: EncodeConfig, sd: StageDir, units: list[Unit], real: Any) -> None:
    """Every real image failing is an error naming the root and the first reasons; some failing is fine.

    The real units' markers are dropped first, so a rerun after the images are put in place encodes
    them again instead of reusing the failed rows.
    """
    rows = real.select(["image_id", "status", "error"]).to_pylist()
    if not rows or tables.ok_rows(rows):
        return
    withdraw_units(sd, units)  # known bad: withdrawn from a store too
    shown = tables.failure_reasons(rows)
    raise FileNotFoundError(
        f"encode: none of the {len(rows)} real val/test images could be read from "
        f"encode.images_root={config.images_root!r} ({absolute_path(config.images_root or '.')}): {shown}. Check that "
        "images_root is the folder the image paths of captions.parquet (image_path) are relative to, and that the "
        "images are there and readable; the stage is not marked done")


def stage_files(sd: StageDir, real_only: bool = False) -> list[Path]:
    """The whole-stage outputs (the per-shard files are checked through the marker's units); real.parquet alone
    for a real-only stage."""
    if real_only:
        return [manifests.REAL.path(sd)]
    return [m.path(sd) for m in (manifests.SCORES, manifests.REAL, manifests.CONCEPTS)] + [sd.clip_head]


def verify(sd: StageDir) -> str | None:
    """None when every output exists with its done marker, else what is missing."""
    if not sd.done_marker.exists():
        return f"{sd.done_marker.name} missing"
    try:
        extra = StageResult.load(sd.done_marker).extra
    except ValueError as e:
        return str(e)
    for path in stage_files(sd, bool(extra.get("real_only"))):
        if not path.exists():
            return f"{path.name} missing"
    units = extra.get("units", {})
    for kind, indices in units.items():
        for i in indices:
            if not unit_done(sd, kind, i):
                return f"{kind}/{sd.shard_name(i)} missing or unfinished"
    return None


def _reset(sd: StageDir, units: list[Unit]) -> None:
    """Drop the stage marker, the units' markers and the stage-wide files, so everything is redone."""
    drop_marker(sd, store=True)
    withdraw_units(sd, units)
    for path in stage_files(sd):
        path.unlink(missing_ok=True)


def reset_stage(config: EncodeConfig, captions: StageResult, shards: StageResult | None, layout: RunLayout) -> None:
    """Forget every finished output of this stage directory (a forced rerun's first step)."""
    sd = plan(config, captions, shards, layout)
    with locked(sd):
        _reset(sd, feature_units(shards) + real_units(config, captions))


def encode_shards(config: EncodeConfig, captions: StageResult, shards: StageResult | None, layout: RunLayout, *,
                  kind: str, indices: list[int] | None = None, progress: ProgressFn | None = None) -> dict[str, int]:
    """Encode the pending units of one kind (all, or `indices`): a Prefect task per shard.

    `run_encode` afterwards finds them done and writes the stage-wide files.
    """
    if kind not in (FEATURES, REAL):
        raise ValueError(f"kind={kind!r}: expected {FEATURES!r} or {REAL!r}")
    sd = open_stage(plan(config, captions, shards, layout))  # these units are written without the stage lock
    units = feature_units(shards) if kind == FEATURES else real_units(config, captions)
    if indices is not None:
        units = [u for u in units if u.index in set(indices)]
    encoded, seconds, _ = encode_units(config, sd, units, progress=progress)
    return {"encoded": encoded, "units": len(units), "seconds": round(seconds, 3)}


def run_encode(config: EncodeConfig, captions: StageResult, shards: StageResult | None, layout: RunLayout, *,
               force: bool = False, progress: ProgressFn | None = None) -> StageResult:
    """Encode every pending unit, then write scores, real, concepts, the CLIP head and the histogram.

    `captions`, `shards`: the ingest and synthesize stages' StageResults.
    `shards` None: a real-only stage (an evaluation source's val/test images): real.parquet and its shards only.
    """
    started = time.monotonic()
    sd = plan(config, captions, shards, layout)
    if not force and (done := cached(sd, verify)) is not None:
        return done
    check_images_root(config)  # before any work (a finished stage was returned above)
    with locked(sd):
        f_units, r_units = feature_units(shards), real_units(config, captions)
        if force:
            _reset(sd, f_units + r_units)
        encoded, encode_s, clip = encode_units(config, sd, f_units + r_units, progress=progress)
        real = manifests.SHARD_REAL.concat(sd, [u.index for u in r_units])
        _check_some_real_ok(config, sd, r_units, real)
        if shards is None:
            return _finish_real_only(config, sd, started, real, r_units, encoded, encode_s)

        need = [p.name for p in (manifests.CONCEPTS.path(sd), sd.clip_head) if not p.exists()]
        if need and clip is None:
            clip = cached_clip(config.clip, resolve_device(config.device))
        t0 = time.monotonic()
        if not manifests.CONCEPTS.exists(sd):
            manifests.CONCEPTS.write(sd, build_concepts(config, captions, clip))
        concepts_s = time.monotonic() - t0
        if not sd.clip_head.exists():
            write_clip_head(sd, clip)

        scores = manifests.SHARD_SCORES.concat(sd, [u.index for u in f_units])
        manifests.SCORES.write(sd, scores)
        manifests.REAL.write(sd, real)

        scored = scores.select(["clip_score", "status"]).to_pylist()
        ok_scores = np.array([r["clip_score"] for r in tables.ok_rows(scored)], dtype=np.float32)
        summary = summarise_scores(ok_scores, sd.clip_scores_picture, config.clip.label())

        n_concepts = manifests.CONCEPTS.read(sd, columns=["concept"]).num_rows
        counts = {**_status_counts("images", scores), **_status_counts("real", real), "concepts": n_concepts,
                  "feature_shards": len(f_units), "real_shards": len(r_units), "encoded_now": encoded}
        timings = {"encode_s": round(encode_s, 3), "concepts_s": round(concepts_s, 3)}
        if encoded:
            timings["images_per_s"] = round(encoded / encode_s, 1)
        extra: dict[str, Any] = {
            "clip": clip_record(config), "pictures": {"clip_scores": str(sd.clip_scores_picture)},
            "images_root": absolute_path(config.images_root) if config.images_root else None,
            "units": {FEATURES: [u.index for u in f_units], REAL: [u.index for u in r_units]}, **summary}
        if config.images_root is None:
            extra["real_note"] = "no images_root given: real val/test images were not encoded"
        elif not r_units:
            extra["real_note"] = "captions.parquet has no ok val/test rows: no real images to encode"
        return finish(sd, counts, started, extra=extra, timings=timings)


def clip_record(config: EncodeConfig) -> dict[str, Any]:
    """The CLIP spec the features came from, with its content identity (train copies it into checkpoints'
    clip.json; evaluate compares identities, never path spellings)."""
    return config.clip.model_dump(mode="json") | {"content_id": clip_content_id(config.clip)}


def _finish_real_only(config: EncodeConfig, sd: StageDir, started: float, real: Any, r_units: list[Unit],
                      encoded: int, encode_s: float) -> StageResult:
    """Write real.parquet and the marker of a real-only stage (an evaluation source: no synthetic images)."""
    manifests.REAL.write(sd, real)
    counts = {**_status_counts("real", real), "real_shards": len(r_units), "encoded_now": encoded}
    extra = {"clip": clip_record(config), "real_only": True, "units": {REAL: [u.index for u in r_units]},
             "images_root": absolute_path(config.images_root) if config.images_root else None}
    if not r_units:
        extra["real_note"] = "no real val/test images to encode (images_root unset, or no ok val/test rows)"
    return finish(sd, counts, started, extra=extra, timings={"encode_s": round(encode_s, 3)})


def _status_counts(name: str, table: Any) -> dict[str, int]:
    """`name`, `name_ok`, `name_failed`: the rows of a status table (scores, real) and how they ended."""
    statuses = table.column("status").to_pylist()
    return {name: len(statuses), f"{name}_ok": statuses.count(tables.STATUS_OK),
            f"{name}_failed": statuses.count(tables.STATUS_FAILED)}
