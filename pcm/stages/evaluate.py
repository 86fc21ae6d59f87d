"""Evaluate stage: caption the real val/test images with a trained PCM-Net and score them as COCO does.

Inputs are three finished stage directories: `train` (the checkpoint: model, vocabulary and
concept bank), `encode` (real image features of the split: real/ shards + real.parquet) and
`captions` (the ingest stage holding the reference captions of those images). In-domain and
cross-domain evaluation differ only in which directories are passed: for cross-domain, the
encode and captions stages of dataset B with a model trained on dataset A (the model keeps A's
vocabulary and concepts, which live in its checkpoint).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator
from tqdm import tqdm

from pcm.config import BY_CONTENT, StageConfig
from pcm.split_images import SplitImages, check_features, feature_batches, load_split_images
from pcm.stages.contract import (
    ProgressFn,
    cached,
    drop_marker,
    finish,
    locked,
    stage_dir,
)
from storage import atomic, manifests, publish
from storage.layout import RunLayout, StageDir
from storage.result import StageResult

log = logging.getLogger(__name__)

CODE_VERSION = "1"
STAGE = "evaluate"


def outputs(sd: StageDir) -> list[Path]:
    """What a finished evaluate stage holds besides its marker."""
    return [sd.predictions, sd.metrics, manifests.PER_IMAGE.path(sd), sd.report]



class EvaluateConfig(StageConfig):
    """How to caption and score; `device` and `batch_size` do not change the outputs."""

    RUNTIME: ClassVar[frozenset[str]] = frozenset({"device", "batch_size"})

    split: Literal["test", "val"] = Field("test", description="Real images to caption: the test or val split.")
    checkpoint: Literal["best", "latest"] = Field(
        "best", description="best = best validation score (train's best/), latest = last step checkpoint.")
    beam_size: int = Field(3, ge=1, description="Beam width (the paper: 3); 1 = greedy.")
    max_len: int = Field(20, ge=1, description="Maximum caption length in words (the paper: 20).")
    length_penalty: float = Field(0.0, ge=0, description="Rank finished beams by score / length**a (0 = the paper).")
    spice: Literal["auto", "on", "off"] = Field(
        "auto", description="SPICE: auto = when its CoreNLP jars are installed, on = required, off = skipped.")
    published: str | None = Field(
        None, description="Paper setting to compare with (pcm/presets/published.toml), e.g. coco-vitl14.")
    control: bool = Field(
        True, description="Also score each caption against another image's references (a language-only "
        "control: what the captions score without looking at their image).")
    report_samples: int = Field(12, ge=0, description="Predictions shown beside their references in report.md.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    batch_size: int = Field(64, ge=1, description="Images decoded per batch.")

    @field_validator("published")
    @classmethod
    def _known_setting(cls, v: str | None) -> str | None:
        if v is not None:
            from pcm.report import published_setting

            published_setting(v)
        return v


# -- planning ---------------------------------------------------------------------------


def _inputs(train: StageResult, encode: StageResult, captions: StageResult) -> tuple[StageResult, ...]:
    """The train, encode and ingest stages' results, checked to be theirs."""
    results = train, encode, captions
    for r, want, flag in zip(results, ("train", "encode", "ingest"), ("--train", "--encode", "--captions"), strict=True):
        if r.stage != want:
            raise ValueError(f"{flag} {r.path}: this is a '{r.stage}' stage directory; expected a '{want}' one")
    return results


def plan(config: EvaluateConfig, train: StageResult, encode: StageResult, captions: StageResult,
         layout: RunLayout) -> StageDir:
    """The stage directory for this config and these three inputs (StageResults); no work, nothing written."""
    return stage_dir(layout, STAGE, config, _inputs(train, encode, captions), CODE_VERSION)


def verify(sd: StageDir) -> str | None:
    """None when every output exists; also asks for a rerun when SPICE became available (spice=auto)."""
    missing = [p.name for p in outputs(sd) if not p.exists()]
    if missing:
        return f"missing {', '.join(missing)}"
    from pcm.metrics import spice_missing

    spice = atomic.read_json(sd.metrics)["metrics"].get("SPICE")
    wanted = atomic.read_json(sd.config_file)["config"].get("spice") == "auto" if sd.config_file.exists() else False
    if wanted and isinstance(spice, str) and spice.startswith("unavailable: Stanford") and spice_missing() is None:
        return "SPICE's jars are installed now; scoring again with SPICE"
    return None


# -- inputs -----------------------------------------------------------------------------


def load_eval_set(encode: StageResult, captions: StageResult, split: str) -> SplitImages:
    """The split's encoded images with their references (and those left out); an error when there are none,
    or when encoded images have no references (the captions of another data set)."""
    enc, cap = encode.stage_dir, captions.stage_dir
    out = load_split_images(cap, enc, split)
    if out.unreferenced:
        raise ValueError(f"{manifests.CAPTIONS.path(cap)}: {len(out.unreferenced)} {split} images of {enc.path} have "
                         f"no reference captions, e.g. {out.unreferenced[:5]}; pass the captions (ingest) stage of the "
                         "dataset whose images were encoded")
    if not out.image_ids:
        raise ValueError(f"{manifests.REAL.path(enc)}: no encoded {split} images to evaluate "
                         f"({len(out.failed)} failed); encode the {split} split's images first (encode.images_root), "
                         "or evaluate on another data set with references (pcm run: eval_source.source and "
                         "eval_source.images_root)")
    return out


def check_clip(recorded: dict[str, Any], encode: StageResult, clip: str | None = None) -> None:
    """The features must come from the CLIP the model was trained on (checked when encode records it).

    `recorded`: the checkpoint's clip.json; `clip`: the checkpoint's CLIP (directory, weights file or tag) when its
    recorded path is not here."""
    features_clip = encode.extra.get("clip")
    if not features_clip:
        log.warning("%s records no CLIP spec; cannot check it matches the checkpoint's", encode.path)
        return
    diff = [f"{k}: checkpoint {recorded.get(k)!r} vs features {features_clip.get(k)!r}"
            for k in ("model", "pool") if recorded.get(k) != features_clip.get(k)]
    # The weights by content: one directory spelt absolute and relative, or copied elsewhere, is one CLIP.
    if clip is not None:
        from pcm.identity import checkpoint_clip, clip_content_id

        recorded = recorded | {"content_id": clip_content_id(checkpoint_clip(recorded, clip))}
    mine, theirs = content_id(recorded), content_id(features_clip)
    if mine != theirs:
        diff.append(f"weights: checkpoint {recorded.get('pretrained')!r} ({mine}) vs features "
                    f"{features_clip.get('pretrained')!r} ({theirs})")
    if diff:
        raise ValueError(f"--encode {encode.path}: its features come from another CLIP than the model's "
                         f"({'; '.join(diff)}); encode this dataset with the checkpoint's CLIP (a checkpoint moved "
                         "from another checkout or machine: give its CLIP with --clip PATH_OR_TAG)")


def content_id(clip: dict[str, Any]) -> str | None:
    """A recorded CLIP's content identity: as recorded, else computed from its spec (older records), else its
    `pretrained` string when the weights it names are not here."""
    from pcm.identity import clip_content_id

    if clip.get("content_id"):
        return clip["content_id"]
    try:
        return clip_content_id(clip)
    except (FileNotFoundError, ValueError):
        return clip.get("pretrained")


def _ingest_lineage(train: StageResult) -> list[StageResult]:
    """The finished ingest stages upstream of a train stage (through each stage's config.json inputs), nearest first."""
    return [StageResult.load(sd.done_marker) for sd in train.stage_dir.lineage("ingest") if sd.is_complete()]


def protocol(train: StageResult, captions: StageResult) -> tuple[str, str | None, str | None]:
    """(in-domain | cross-domain | unknown, training dataset name, evaluation dataset name)."""
    eval_name = captions.extra.get("name")
    lineage = _ingest_lineage(train)
    if not lineage:
        return "unknown", None, eval_name
    train_name = lineage[0].extra.get("name")
    same = any(r.fingerprint == captions.fingerprint for r in lineage) or (train_name and train_name == eval_name)
    return ("in-domain" if same else "cross-domain"), train_name, eval_name


def images_root(encode: StageResult) -> Path | None:
    """Where real.parquet's relative image paths start (recorded by the encode stage)."""
    root = encode.extra.get("images_root")
    config = encode.stage_dir.config_file
    if root is None and config.exists():
        root = atomic.read_json(config).get("config", {}).get("images_root")
        root = None if root == BY_CONTENT else root  # encode code version 2+ records the path in its result
    return Path(root).expanduser() if root else None


def resolve_image(root: Path | None, image_path: str | None) -> Path | None:
    if not image_path:
        return None
    p = Path(image_path).expanduser()
    return p if p.is_absolute() else (root / p if root else None)


# -- the work ---------------------------------------------------------------------------


def decode_split(model: Any, vocab: Any, encode: StageResult, evalset: SplitImages, device: str, *, batch_size: int,
                 beam_size: int, max_len: int, length_penalty: float,
                 progress: ProgressFn | None = None) -> dict[str, str]:
    """Caption every image of `evalset` from its stored features, `batch_size` images at a time, by beam
    search (`beam_size`, `max_len` words, `length_penalty`); image id -> caption."""
    from pcm.decode import decode_features

    batches = _feature_batches(encode, evalset, device, batch_size, progress)
    captions = decode_features(model, vocab, batches, beam_size=beam_size, max_len=max_len,
                               length_penalty=length_penalty)
    return {i: captions[i] for i in evalset.image_ids}


def _feature_batches(encode: StageResult, evalset: SplitImages, device: str, batch_size: int,
                     progress: ProgressFn | None) -> Iterator[tuple[list[str], Any, Any]]:
    """(image ids, global features, patches) of `evalset`, shard by shard, `batch_size` images at a time;
    each batch is counted as captioned (bar and `progress`) when the next one is asked for."""
    from pcm.dataset import FeatureStore

    store = FeatureStore(encode.stage_dir, "real")
    check_features(evalset, store)
    total, done = len(evalset.image_ids), 0
    bar = tqdm(total=total, desc="evaluate: decoding", unit="img")
    for at, g, p in feature_batches(evalset, store, device, batch_size, by_shard=True):
        yield [evalset.image_ids[i] for i in at], g, p
        done += len(at)
        bar.update(len(at))
        if progress:
            progress(done, total, "images captioned")
    bar.close()


CONTROL_HOW = ("each caption scored against the references of another image of the split (image ids sorted, "
               "shifted by half the split): the language-only score a caption gets without looking")


def shuffled_references(references: dict[str, list[str]]) -> dict[str, list[str]]:
    """Every image gets the references of the image half the split away (sorted ids): never its own."""
    ids = sorted(references)
    shift = len(ids) // 2
    return {i: references[ids[(k + shift) % len(ids)]] for k, i in enumerate(ids)}


def coco_image_id(image_id: str) -> int | str:
    """COCO's results format uses integer ids: an id that is an integer is written as one."""
    return int(image_id) if image_id.isdigit() and str(int(image_id)) == image_id else image_id


def _read_predictions(path: Path, image_ids: list[str]) -> dict[str, str] | None:
    """Predictions of an earlier interrupted run of this same stage, if they cover exactly these images."""
    if not path.exists():
        return None
    found = {str(p["image_id"]): p["caption"] for p in atomic.read_json(path)}
    return {i: found[i] for i in image_ids} if set(found) == set(image_ids) else None


def run_evaluate(config: EvaluateConfig, train: StageResult, encode: StageResult, captions: StageResult,
                 layout: RunLayout, *,
                 force: bool = False, progress: ProgressFn | None = None, clip: str | None = None) -> StageResult:
    """Caption the split's real images with the checkpoint, score them, write predictions, metrics and report.

    `train`, `encode`, `captions`: those stages' StageResults; `clip`: the checkpoint's
    CLIP when its recorded path is not here (only checked against the features' CLIP, never loaded).
    """
    started = time.monotonic()
    sd = plan(config, train, encode, captions, layout)
    if not force and (done := cached(sd, verify)):
        log.info("evaluate: reusing %s", sd.path)
        return done
    from pcm import checkpoint
    from pcm.device import resolve_device
    from pcm.metrics import score_captions

    with locked(sd):
        drop_marker(sd, store=force)
        for path in outputs(sd):
            atomic.remove_stale_temporaries(sd.path, path.name)
        t0 = time.monotonic()
        evalset = load_eval_set(encode, captions, config.split)
        ckpt_dir = checkpoint.find(train.stage_dir.path, config.checkpoint)
        device = resolve_device(config.device)
        model, vocab, meta = checkpoint.load(ckpt_dir, device)
        check_clip(meta["clip"], encode, clip)
        if evalset.failed or evalset.not_encoded:
            log.warning("evaluate: %d %s images failed to encode and %d were not encoded; they are not scored "
                        "(listed in metrics.json)", len(evalset.failed), config.split, len(evalset.not_encoded))

        t1 = time.monotonic()
        predictions = None if force else _read_predictions(sd.predictions, evalset.image_ids)
        if predictions is None:
            predictions = decode_split(model, vocab, encode, evalset, device, batch_size=config.batch_size,
                                       beam_size=config.beam_size, max_len=config.max_len,
                                       length_penalty=config.length_penalty, progress=progress)
            atomic.write_json(sd.predictions,
                              [{"image_id": coco_image_id(i), "caption": c} for i, c in predictions.items()])
        else:
            log.info("evaluate: reusing the %d predictions of %s", len(predictions), sd.predictions)
        t2 = time.monotonic()
        # The scores and the control share the process's METEOR (metrics.shared_meteor: one start, ~10 s).
        references = evalset.references_by_id()
        corpus, per_image = score_captions(predictions, references, spice=config.spice)
        control = score_captions(predictions, shuffled_references(references),
                                 spice="off")[0] if config.control and len(predictions) > 1 else None
        t3 = time.monotonic()

        rows = [{"image_id": i, "caption": predictions[i], "references": references[i],
                 "bleu4": per_image[i]["bleu4"], "meteor": per_image[i]["meteor"], "rouge_l": per_image[i]["rouge_l"],
                 "cider": per_image[i]["cider"], "spice": per_image[i].get("spice")} for i in evalset.image_ids]
        manifests.PER_IMAGE.write(sd, rows)
        summary = _summary(config, corpus, evalset, ckpt_dir, meta, train, encode, captions)
        summary["control"] = None if control is None else {"metrics": control, "how": CONTROL_HOW}
        atomic.write_json(sd.metrics, summary)
        write_events(sd, train.stage_dir, summary)
        pictures = _write_report(sd, config, summary, rows, evalset, encode)
        t4 = time.monotonic()

        counts = {k: int(v) for k, v in summary["counts"].items()}
        log.info("evaluate: %s", ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} n/a"
                                           for k, v in corpus.items()))
        if control is not None:
            log.info("evaluate: control (references of another image): CIDEr %.3f vs %.3f", control["CIDEr"],
                     corpus["CIDEr"])
        extra = {"metrics": corpus, "control_metrics": control, "split": config.split,
                 "protocol": summary["protocol"], "step": meta["step"], "report": str(sd.report),
                 "pictures": pictures}
        result = finish(sd, counts, started, extra=extra,
                        timings={"load_s": round(t1 - t0, 3), "decode_s": round(t2 - t1, 3),
                                 "score_s": round(t3 - t2, 3), "report_s": round(t4 - t3, 3)})
    update_model_card(train)
    return result


def update_model_card(train: StageResult) -> None:
    """Rewrite the train stage's best/README.md with every finished evaluation of best/ in its model-index.

    The card is documentation in the finished train stage (like synthesize's faithfulness.json, written after
    it): no fingerprint or check reads it, and the train stage stays done. A failure is logged, never fatal:
    the evaluation itself is complete.
    """
    from pcm import cards

    try:
        card = cards.write_model_card(train.stage_dir)
        if card is not None:
            publish.publish_files(card)   # an object-store root: the card is uploaded beside the checkpoint
    except Exception as e:  # noqa: BLE001 - a card never fails an evaluation
        log.warning("evaluate: could not update the model card of %s: %s: %s", train.path, type(e).__name__, e)


def write_events(sd: StageDir, train: StageDir, summary: dict[str, Any]) -> None:
    """metrics.json's scores (and the control's) as TensorBoard scalars at the checkpoint's training step, under
    the train run's name, so that they line up with its validation curve; rewritten whole on every run."""
    from pcm.tracking import EventLog

    shutil.rmtree(sd.events, ignore_errors=True)
    name = train.events_run("train").name if train.events.is_dir() else "evaluate"
    events = EventLog(sd.events_run(name))
    try:
        step = summary["checkpoint"]["step"]
        split = summary["split"]
        events.scalars(step, {f"{split}/{k}": v for k, v in summary["metrics"].items() if isinstance(v, int | float)})
        control = (summary.get("control") or {}).get("metrics") or {}
        events.scalars(step, {f"{split}_control/{k}": v for k, v in control.items() if isinstance(v, int | float)})
    finally:
        events.close()


def _summary(config: EvaluateConfig, corpus: dict[str, Any], evalset: SplitImages, ckpt_dir: Path, meta: dict[str, Any],
             train: StageResult, encode: StageResult, captions: StageResult) -> dict[str, Any]:
    """The content of metrics.json."""
    from pcm.report import published_block

    proto, train_name, eval_name = protocol(train, captions)
    published = None
    if config.published:  # the paper's numbers, labelled not comparable on another dataset or split
        published = published_block(corpus, config.published, train=train_name, evaluated=eval_name,
                                    split=config.split)
    return {
        "metrics": corpus,
        "split": config.split,
        "protocol": proto,
        "datasets": {"train": train_name, "eval": eval_name},
        "checkpoint": {"which": config.checkpoint, "step": meta["step"], "path": str(ckpt_dir)},
        "decoding": {"beam_size": config.beam_size, "max_len": config.max_len,
                     "length_penalty": config.length_penalty},
        "counts": {"images": len(evalset.image_ids),
                   "references": sum(len(r) for r in evalset.references),
                   "failed_encode": len(evalset.failed), "not_encoded": len(evalset.not_encoded)},
        "failed_images": evalset.failed,
        "not_encoded": evalset.not_encoded,
        "clip": meta["clip"],
        "inputs": {"train": train.fingerprint, "encode": encode.fingerprint, "captions": captions.fingerprint},
        "published": published,
    }


def _write_report(sd: StageDir, config: EvaluateConfig, summary: dict[str, Any], rows: list[dict[str, Any]],
                  evalset: SplitImages, encode: StageResult) -> dict[str, str]:
    """report.md and its thumbnail grid; returns the pictures written ({name: path})."""
    from pcm.pictures import thumbnail_grid
    from pcm.report import render, spread

    picks = spread(len(rows), config.report_samples)
    samples = [rows[i] for i in picks]
    root = images_root(encode)
    grid = thumbnail_grid([resolve_image(root, evalset.image_paths[i]) for i in picks],
                          sd.samples_picture)
    link = sd.samples_picture.relative_to(sd.path).as_posix()  # pictures/samples.png, relative to report.md
    atomic.write_text(sd.report, render(summary, samples, link if grid else None, root=sd.root))
    return {"samples": str(grid)} if grid else {}
