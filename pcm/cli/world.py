"""`pcm world`: the toy world (its dataset, its trained toy models, their quality)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

world_app = typer.Typer(
    help="The toy world: drawn scenes whose captions are checkable, with a toy text-to-image model and a toy "
    "CLIP trained on it by this project, so the whole method can be seen working on a CPU.\n\n"
    "The `demo` pipeline preset uses the shipped data (pcm/data/toyworld) and models (pcm/data/toymodels).",
    no_args_is_help=True)


@world_app.command("dataset")
def dataset(
    out: Path = typer.Argument(..., help="directory to write dataset_toyworld.json and the drawings into"),
    captions: int = typer.Option(3000, help="training captions (set b, text only)"),
    val: int = typer.Option(100, help="val scenes (drawn, five references each)"),
    test: int = typer.Option(300, help="test scenes (drawn, five references each)"),
    train_images: bool = typer.Option(False, "--train-images", help="also draw the training captions' scenes "
                                      "(for the oracle arm: synthesize.paired_images=OUT)"),
) -> None:
    """Write a toy-world caption dataset (Karpathy format, scene records included)."""
    from pcm.toyworld.dataset import build

    typer.echo(build(out, n_captions=captions, n_val=val, n_test=test, train_images=train_images))


@world_app.command("train-models")
def train_models(
    out: Path = typer.Argument(..., help="models directory: OUT/clip (open_clip local-dir) and OUT/t2i (diffusers)"),
    work: Path | None = typer.Option(None, help="resumable training state (default OUT/../.toymodels-work)"),
    clip_steps: int = typer.Option(1800, help="toy CLIP steps of 256 (image, text) pairs"),
    vae_steps: int = typer.Option(600, help="toy VAE steps of 64 images"),
    unet_steps: int = typer.Option(1900, help="toy UNet steps of 64 latents"),
    scenes: int = typer.Option(20000, help="drawn training scenes (set a)"),
    check_images: int = typer.Option(100, help="images generated for the quality report (CLIP retrieval: 10x)"),
    seed: int = typer.Option(0, help="seed of both trainings"),
) -> None:
    """Train the toy CLIP and the toy text-to-image model (two processes, one core each; resumable), then
    measure them and write OUT/MANIFEST.json. About 45 minutes on 2 CPU cores."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from pcm.toyworld.manifest import write_manifest
    from pcm.toyworld.train_clip import ClipTrainConfig, train_clip
    from pcm.toyworld.train_t2i import T2ITrainConfig, train_t2i

    work = work or out.parent / ".toymodels-work"
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        clip = pool.submit(train_clip, out / "clip", ClipTrainConfig(scenes=scenes, steps=clip_steps, seed=seed),
                           work / "clip")
        t2i = pool.submit(train_t2i, out / "t2i", T2ITrainConfig(scenes=scenes, vae_steps=vae_steps,
                                                                 unet_steps=unet_steps, seed=seed), work / "t2i")
        clip.result(), t2i.result()
    report = _quality(out, check_images)
    write_manifest(out, {"quality": report})
    typer.echo(json.dumps(report, indent=2))


def _quality(models: Path, images: int = 100) -> dict:
    from pcm.toyworld.quality import clip_retrieval, t2i_quality

    return {"clip": clip_retrieval(models / "clip", 10 * images),
            "t2i": t2i_quality(models / "t2i", models / "clip", n=images)}


@world_app.command("quality")
def quality(
    models: Path = typer.Argument(None, help="models directory (default: the shipped pcm/data/toymodels)"),
    synthesize: Path | None = typer.Option(
        None, "--synthesize", metavar="STAGE_DIR",
        help="instead, judge a finished synthesize stage's images against their captions "
        "(runs/synthesize/<fingerprint>) and write its faithfulness.json"),
    clip: Path | None = typer.Option(None, "--clip", help="with --synthesize: the toy CLIP that judges "
                                     "(default: MODELS/clip, else the shipped one)"),
    images: int = typer.Option(200, min=1, help="with --synthesize: images judged, a seeded random choice "
                               "(all when the stage has fewer)"),
    seed: int = typer.Option(0, help="with --synthesize: seed of the choice of images"),
    force: bool = typer.Option(False, "--force", help="with --synthesize: recompute even when the stage's "
                               "faithfulness.json was made with the same CLIP, images and seed"),
) -> None:
    """Measure the toy models on held-out scenes (CLIP retrieval, text-to-image faithfulness), or, with
    --synthesize, how faithful a synthesize stage's images are to their captions, as the toy CLIP judges.

    The stage report: caption->image R@1 / R@5 among the chosen images and the mean CLIP score.

    Per attribute (sky, ground, colour, kind, count), its caption vs the same caption with that attribute changed.

    beats_all: the share of images whose caption scores above every such variant; pairwise: the share beaten.

    Definitions and measured levels: pcm/toyworld/faithfulness.py, docs/toyworld.md ("Defect levels").
    """
    from pcm.toyworld.dataset import SHIPPED_MODELS

    if synthesize is None:
        typer.echo(json.dumps(_quality(models or SHIPPED_MODELS), indent=2))
        return
    from pcm.toyworld.faithfulness import stage_report, summary_line
    from storage.layout import StageDir

    sd = StageDir.at(synthesize)   # the directory given, resolved once here
    report = stage_report(sd, clip or (models / "clip" if models else None), n=images, seed=seed, reuse=not force)
    typer.echo(json.dumps(report, indent=2))
    typer.echo(f"{summary_line(report)}\nwritten to {sd.faithfulness}", err=True)


@world_app.command("check")
def check(models: Path = typer.Argument(None, help="models directory (default: the shipped pcm/data/toymodels)")) -> None:
    """Check the toy models' files against their MANIFEST.json (sizes and sha256)."""
    from pcm.toyworld.dataset import SHIPPED_MODELS
    from pcm.toyworld.manifest import check_manifest

    problems = check_manifest(models or SHIPPED_MODELS)
    for p in problems:
        typer.echo(p, err=True)
    if problems:
        raise SystemExit(1)
    typer.echo(f"{models or SHIPPED_MODELS}: every file matches its manifest")


def register(app: typer.Typer) -> None:
    app.add_typer(world_app, name="world")
