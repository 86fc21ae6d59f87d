"""`pcm import-checkpoint`: the authors' X-modaler checkpoint as a finished train stage ("their model, our evaluator").

The stage directory is `<root>/train/<fingerprint>/` with `best/` a checkpoint of this project
(pcm.checkpoint) holding the converted weights (pcm.release_checkpoint), so `pcm evaluate --train`
scores it with this project's decoding and COCO metrics. The fingerprint sees the three files'
contents and the config, never their paths; nothing is trained, so it has no step checkpoints,
no metrics.jsonl and no ingest/encode inputs (evaluate calls the protocol "unknown").
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field

from pcm import checkpoint, release_checkpoint, release_concepts
from pcm.clip import ClipSpec
from pcm.config import StageConfig
from pcm.identity import clip_content_id
from pcm.model import load_preset
from pcm.stages.contract import ProgressFn, cached, finish, locked, stage_dir
from storage import checkpoints
from storage.fingerprint import input_digest
from storage.layout import RunLayout, StageDir
from storage.result import StageResult

CODE_VERSION = "release-import-1"
# The release's two backbones by (patch width W, joint width D, patches N): CLIP tag and model preset.
KNOWN_BACKBONES = {(768, 512, 49): ({"model": "ViT-B-32", "pretrained": "openai", "pool": None}, "vitb32"),
                   (1024, 768, 64): ({"model": "ViT-L-14", "pretrained": "openai", "pool": 8}, "vitl14")}


class ImportCheckpointConfig(StageConfig):
    """How to read a release checkpoint; None fields are inferred from its shapes (ViT-B/32 or ViT-L/14)."""

    RUNTIME: ClassVar[frozenset[str]] = frozenset()

    clip: ClipSpec | None = Field(None, description="the CLIP the checkpoint's features came from; unset: inferred "
                                  "from the shapes (ViT-B-32 or ViT-L-14, openai)")
    model_preset: str | None = Field(None, description="PCM-Net preset for what a checkpoint does not hold "
                                     "(dropouts, top_k, top_m, tau); unset: vitb32 or vitl14 by the shapes")
    n_heads: int = Field(release_checkpoint.RELEASE_HEADS, gt=0, description="attention heads (not in a checkpoint)")


def _backbone(shapes: dict[str, int], config: ImportCheckpointConfig) -> tuple[ClipSpec, str]:
    key = (shapes["d_width"], shapes["d_embed"], shapes["n_patches"])
    known = KNOWN_BACKBONES.get(key)
    if (config.clip is None or config.model_preset is None) and known is None:
        raise ValueError(f"the checkpoint's shapes (patch width {key[0]}, joint width {key[1]}, {key[2]} patches) are "
                         "not the release's ViT-B/32 or ViT-L/14: give --clip-model and --model-preset")
    clip = config.clip or ClipSpec.model_validate(known[0])
    return clip, config.model_preset or known[1]


def plan(config: ImportCheckpointConfig, file: str, vocab_file: str, concepts_file: str, layout: RunLayout) -> StageDir:
    """The train stage directory these three files (its inputs: files of the release, no stages) and this config
    make (nothing written)."""
    for what, path in (("checkpoint", file), ("vocabulary", vocab_file), ("concepts", concepts_file)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what} file {path!r} not found")
    extra = {"imported": {"checkpoint_sha256": input_digest(file), "vocabulary_sha256": input_digest(vocab_file),
                          "concepts_sha256": input_digest(concepts_file)}}
    return stage_dir(layout, "train", config, [], CODE_VERSION, extra)


def verify(sd: StageDir) -> str | None:
    if not sd.done_marker.exists():
        return f"{sd.done_marker.name} missing"
    return None if (checkpoints.recover(sd.best) / checkpoints.MODEL).exists() else "best/ missing"


def run_import_checkpoint(config: ImportCheckpointConfig, file: str, vocab_file: str, concepts_file: str,
                          layout: RunLayout, *, force: bool = False, progress: ProgressFn | None = None) -> StageResult:
    """Convert `file` (with the release's vocabulary.txt and concept pickle) into a finished train stage."""
    started = time.monotonic()
    sd = plan(config, file, vocab_file, concepts_file, layout)
    if not force and (done := cached(sd, verify)) is not None:
        return done
    with locked(sd):
        state = release_checkpoint.read_state_dict(file)
        shapes = release_checkpoint.release_shapes(state)
        clip, preset = _backbone(shapes, config)
        words = release_checkpoint.read_release_vocabulary(vocab_file)
        concept_words, bank = release_concepts.read(concepts_file)
        cfg = release_checkpoint.model_config(state, load_preset(preset), config.n_heads)
        model, vocab = release_checkpoint.convert(state, words, torch.from_numpy(bank), cfg)
        clip_json: dict[str, Any] = clip.model_dump(mode="json") | {"content_id": clip_content_id(clip)}
        source = {"checkpoint": str(Path(file).resolve()), "vocabulary": str(Path(vocab_file).resolve()),
                  "concepts": str(Path(concepts_file).resolve()), **sd.record["config"]["imported"]}
        checkpoint.save(sd.best, model=model, vocab=vocab,
                        config={"imported_from": source, "parity": "release"}, clip=clip_json,
                        concept_names=concept_words, state={"step": 0, "imported": True})
        counts = {"parameters": sum(p.numel() for p in model.parameters()), "vocabulary": len(vocab),
                  "concepts": len(concept_words)}
        if progress:
            progress(1, 1, "checkpoint imported")
        return finish(sd, counts, started, extra={"imported_from": source, "clip": clip_json, "model_preset": preset,
                                                  "release_shapes": release_checkpoint.describe(state)})
