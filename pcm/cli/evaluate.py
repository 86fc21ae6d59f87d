"""`pcm evaluate` (score a trained model on real val/test images) and `pcm caption` (caption image files)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pcm.cli.common import build_config, config_command, set_option, stage_values, writable_dir
from storage.layout import run_root_of

EVALUATE_EXAMPLES = """Examples:

  pcm evaluate --train runs/train/<fp> --encode runs/encode/<fp> --captions runs/ingest/<fp>

  pcm evaluate --train runs/train/<fp> --encode runs/encode/<fp> --captions runs/ingest/<fp> --set split=val --set beam_size=5
"""

CAPTION_EXAMPLES = """Examples:

  pcm caption photo.jpg --checkpoint runs/train/<fp>                         # one JSON line per image

  pcm caption photos/ more.png --checkpoint runs/train/<fp> --out captions.jsonl

  pcm caption photos/ --checkpoint runs/train/<fp>/best --beam-size 1 --device cpu   # greedy, on the CPU
"""


def register(app: typer.Typer) -> None:
    @app.command("evaluate", cls=config_command("evaluate"), epilog=EVALUATE_EXAMPLES)
    def evaluate(
        train: str = typer.Option(..., "--train", help="Finished train stage directory (holds the checkpoints)."),
        encode: str = typer.Option(..., "--encode", help="Finished encode stage directory with the real images' "
                                   "features (another dataset's for cross-domain evaluation)."),
        captions: str = typer.Option(..., "--captions", help="Finished ingest stage directory with the reference "
                                     "captions of those images."),
        sets: list[str] = set_option(),
        root: str = typer.Option(None, "--root", help="Run root for the output (default: the train stage's root)."),
        force: bool = typer.Option(False, "--force", help="Redo the evaluation even if it is finished."),
        clip: str = typer.Option(None, "--clip", metavar="PATH_OR_TAG", help="The checkpoint's CLIP (directory, "
                                 "weights file or open_clip tag) when the path it records is not on this machine."),
    ) -> None:
        """Caption the real images of a split with a trained model and score them (BLEU, METEOR, ROUGE-L, CIDEr, SPICE).

        Writes predictions.json (COCO results format), metrics.json, per_image.parquet and report.md to ROOT/evaluate/<fingerprint>/.
        Cross-domain: pass the other dataset's --encode and --captions. Every config field is set with
        --set KEY=VALUE (listed below).
        """
        from pcm.report import LABELS
        from pcm.stages.contract import load_result
        from pcm.stages.evaluate import EvaluateConfig, run_evaluate
        from storage.layout import RunLayout

        config = build_config(EvaluateConfig, stage_values(EvaluateConfig, sets, example="beam_size=5"), "evaluate",
                              sets)
        if root is not None or Path(train).is_dir():  # a missing train directory is run_evaluate's error
            writable_dir(root or run_root_of(train), "--root" if root is not None else
                         "--root (default: the train stage's run root)")
        inputs = load_result(train), load_result(encode), load_result(captions)  # resolved once here
        result = run_evaluate(config, *inputs, RunLayout(root or run_root_of(train)), force=force, clip=clip)
        metrics = result.extra["metrics"]
        state = "cached" if result.cached else "done"
        typer.echo(f"evaluate {state}: {result.extra['split']} split, {result.extra['protocol']}, "
                   f"step {result.extra['step']}, {result.counts['images']} images")
        for key, label in LABELS.items():
            value = metrics.get(key)
            typer.echo(f"  {label:<8} {100 * value:6.1f}" if isinstance(value, float) else f"  {label:<8} {value}")
        typer.echo(f"report: {result.extra['report']}")

    @app.command("caption", epilog=CAPTION_EXAMPLES)
    def caption(
        images: list[str] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
        checkpoint: str = typer.Option(..., "--checkpoint", help="Checkpoint directory, or a train stage directory "
                                       "(its best checkpoint, see --which)."),
        which: str = typer.Option("best", "--which", help="For a train stage directory: best or latest."),
        out: str = typer.Option(None, "--out", help="Write JSON lines here instead of printing them."),
        beam_size: int = typer.Option(3, "--beam-size", help="Beam width; 1 = greedy."),
        max_len: int = typer.Option(20, "--max-len", help="Maximum caption length in words."),
        batch_size: int = typer.Option(64, "--batch-size", help="Images per batch."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
        clip: str = typer.Option(None, "--clip", metavar="PATH_OR_TAG", help="The checkpoint's CLIP (directory, "
                                 "weights file or open_clip tag) when the path it records is not on this machine."),
    ) -> None:
        """Caption image files: one JSON line per image, {"image", "caption", "clip_score", "score_percentile",
        "distance", "in_domain"} ({"image", "error"} if unreadable).

        in_domain false (with a "reason"): the image is unlike the checkpoint's training images and its caption
        is likely wrong. clip_score: the image-caption cosine under the checkpoint's CLIP; score_percentile:
        where it falls among the training pairs' scores. See docs/evaluate.md, "Captioning your own images".
        --out writes only to a new path or an existing regular file.
        """
        from pcm.caption import caption_images, check_output, write_captions

        if out:  # checked before any image is captioned, not when the rows are written
            writable_dir(check_output(out).parent, "--out folder")
        rows = caption_images(checkpoint, images, which=which, beam_size=beam_size, max_len=max_len,
                              batch_size=batch_size, device=device, clip=clip)
        failed = unlike = 0

        def counted(rows):
            nonlocal unlike
            for r in rows:
                unlike += r.get("in_domain") is False
                yield r

        if out:
            n, failed = write_captions(out, counted(rows))
            typer.echo(f"{n} images -> {out}")
        else:
            for r in counted(rows):
                failed += "error" in r
                typer.echo(json.dumps(r, ensure_ascii=False))
        if failed:
            typer.secho(f"{failed} images could not be read (see their 'error')", fg=typer.colors.YELLOW, err=True)
        if unlike:
            typer.secho(f"{unlike} images are unlike the training images (in_domain false): their captions are "
                        "likely wrong", fg=typer.colors.YELLOW, err=True)
