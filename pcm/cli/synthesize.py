"""`pcm synthesize`: render one diffusion image per training caption into WebDataset shards."""

from __future__ import annotations

import json
from typing import Any

import typer

from pcm import diffusion  # stdlib-only at import time
from pcm.cli.common import (
    Row,
    build_config,
    config_command,
    set_option,
    stage_values,
    writable_dir,
)


def help_rows(rows: list[Row]) -> list[Row]:
    """--help's rows, with the real size rule of each model and what a preset renders at (`tiny 64`), both read
    from the presets (pcm.diffusion), as SynthesizeConfig applies them; the default shown for height, width and
    steps is what a run with none of them set gets (the default model's preset's; the description names the rest)."""
    from pcm.config import toml_text
    from pcm.stages.synthesize import SynthesizeConfig

    names = diffusion.preset_names()
    unset = SynthesizeConfig()   # the default model, its preset's render applied as for any run
    out = []
    for key, default, text in rows:
        if key in ("height", "width"):
            factors = ", ".join(f"{n} {diffusion.vae_factor(n)}" for n in names)
            text = f"{text}; the VAE factor is {diffusion.SD_VAE_FACTOR} for Stable Diffusion; presets: {factors}"
        if key in ("height", "width", "steps"):
            per = ", ".join(f"{n} {diffusion.render_defaults(n)[key]}" for n in names)
            text = f"{text}; presets render at: {per}"
            default = toml_text(getattr(unset, key))
        out.append((key, default, text))
    return out


def describe(config: Any) -> str:
    """One line saying what `pcm synthesize` is about to make."""
    if config.imported_images:
        return f"synthesize: importing images from {config.imported_images} (NOT GENERATED HERE)"
    weights = (" -- RANDOM WEIGHTS (a preset: the images mean nothing)" if diffusion.is_preset(config.model) else "")
    limit = f", first {config.limit} captions" if config.limit else ""
    vae = f", tiny VAE {config.tiny_vae} (APPROXIMATE)" if config.tiny_vae else ""
    return (f"synthesize: {config.width}x{config.height} px, {config.steps} steps ({config.scheduler}, guidance "
            f"{config.guidance_scale:g}, {config.dtype}){limit}{vae}, model {config.model}{weights}")


def parse_shards(text: str) -> list[int]:
    """`0,1,5-9` -> [0, 1, 5, 6, 7, 8, 9]; errors name the bad part."""
    out: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"--shards: {part!r} is not an index or a range like 5-9") from None
        if a < 0 or b < a:
            raise ValueError(f"--shards: {part!r} is not a valid range (expected 0 <= start <= end)")
        out.update(range(a, b + 1))
    if not out:
        raise ValueError("--shards: no shard index given (e.g. --shards 0,1,5-9)")
    return sorted(out)


SYNTHESIZE_EXAMPLES = """Examples:

  pcm synthesize --captions runs/ingest/<fp> --dry-run                 # what it would render, then stop

  pcm synthesize --captions runs/ingest/<fp> --set limit=16            # tiny random-weight model, {height} px, {steps} steps

  pcm synthesize --captions runs/ingest/<fp> --set model=models/stable-diffusion-v1-5 --set dtype=fp16 --set device=cuda

  pcm synthesize --captions runs/ingest/<fp> --worker-index 0 --num-workers 4   # one of 4 hosts
"""

GIVEN_BY = {"imported_images": "--import-images", "imported_mapping": "--import-mapping"}


def register(app: typer.Typer) -> None:
    tiny = diffusion.render_defaults("tiny")

    @app.command(cls=config_command("synthesize", given_by=GIVEN_BY, rows=help_rows),
                 help="Render one image per ok train caption of an ingest stage into WebDataset shards.\n\n"
                 "Writes <root>/synthesize/<fingerprint>/shards/shard-NNNNNN.tar (+ .status.parquet, "
                 ".done.json) and, when every shard is done, samples.parquet and pictures/samples.png. "
                 "Reruns do only pending shards. Several processes (or machines sharing the root) can "
                 "split the shards with --worker-index/--num-workers or --shards; the last one to "
                 "finish finalises the stage.\n\n"
                 "The default model, tiny, has RANDOM WEIGHTS (noise-like images, for mechanics checks); "
                 f"a preset renders at its own size and steps (tiny: {tiny['width']}x{tiny['height']} px, {tiny['steps']} "
                 "steps) unless height, width or steps are set. Every config field is set with --set KEY=VALUE "
                 "(listed below). Prints what it will render first; --dry-run stops there.",
                 epilog=SYNTHESIZE_EXAMPLES.format(**tiny))
    def synthesize(
        captions: str = typer.Option(..., "--captions", help="finished ingest stage directory (holds captions.parquet)"),
        sets: list[str] = set_option(),
        import_images: str | None = typer.Option(
            None, "--import-images", help="NOT GENERATED HERE: take the images from this directory (files and/or "
            "tar sets, e.g. the authors' SynthImgCap) instead of a diffusion model; see docs/synthesize.md"),
        import_mapping: str | None = typer.Option(
            None, "--import-mapping", help="CSV caption_id,image naming each caption's image under --import-images "
            "(default: the image named after the caption_id)"),
        root: str = typer.Option("runs", "--root", help="run root: a directory, or s3://bucket/prefix"),
        worker_index: int = typer.Option(0, help="this worker's index when splitting shards (i % N == index)"),
        num_workers: int = typer.Option(1, help="number of workers splitting the shards"),
        shards: str | None = typer.Option(None, help="explicit shard indices, e.g. 0,1,5-9 (instead of workers)"),
        force: bool = typer.Option(False, "--force", help="regenerate the shards in scope even if done"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config (JSON) and exit"),
    ) -> None:
        from pcm.stages.contract import load_result
        from pcm.stages.synthesize import SynthesizeConfig, run_synthesize
        from storage.layout import RunLayout

        values = stage_values(SynthesizeConfig, sets, GIVEN_BY, example="steps=4")
        if import_images is not None:
            values["imported_images"] = import_images
        if import_mapping is not None:
            values["imported_mapping"] = import_mapping
        config = build_config(SynthesizeConfig, values, "synthesize", sets)
        if shards is not None and num_workers != 1:
            raise ValueError("give either --shards or --worker-index/--num-workers, not both")
        if dry_run:
            typer.echo(describe(config), err=True)
            typer.echo(json.dumps(config.model_dump(mode="json"), indent=2))
            return
        writable_dir(root)
        typer.echo(describe(config), err=True)
        ingest = load_result(captions)  # the input, resolved once here
        result = run_synthesize(config, ingest, RunLayout(root), shards=parse_shards(shards) if shards else None,
                                worker_index=worker_index, num_workers=num_workers, force=force)
        c = result.counts
        if result.extra.get("complete"):
            state = "cached" if result.cached else "done"
            typer.echo(f"synthesize {state}: {c['ok']} ok, {c['failed']} failed, {c['shards']} shards -> {result.path}")
        else:
            typer.echo(f"synthesize: wrote {c['shards_written']} shard(s) ({c['ok']} ok, {c['failed']} failed); "
                       f"{c['shards_pending']} of {c['shards']} shards still pending elsewhere -> {result.path}")
