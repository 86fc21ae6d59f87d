"""`pcm synthesize`: render one diffusion image per training caption into WebDataset shards."""

from __future__ import annotations

from typing import Any

import typer

from pcm.commands import writable_dir


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


def register(app: typer.Typer) -> None:
    @app.command(help="Render one image per ok train caption of an ingest stage into WebDataset shards.\n\n"
                 "Writes <root>/synthesize/<fingerprint>/shards/shard-NNNNNN.tar (+ .status.parquet, "
                 ".done.json) and, when every shard is done, samples.parquet and pictures/samples.png. "
                 "Reruns do only pending shards. Several processes (or machines sharing the root) can "
                 "split the shards with --worker-index/--num-workers or --shards; the last one to "
                 "finish finalises the stage.")
    def synthesize(
        captions: str = typer.Option(..., "--captions", help="finished ingest stage directory (holds captions.parquet)"),
        root: str = typer.Option("runs", "--root", help="run root directory"),
        model: str = typer.Option("tiny", help="diffusers hub id, local pipeline directory, or preset: tiny, sd15-arch"),
        revision: str | None = typer.Option(None, help="hub revision (branch, tag or commit)"),
        dtype: str = typer.Option("fp32", help="fp16, bf16 or fp32 (use fp16 on GPUs)"),
        scheduler: str = typer.Option("dpm++", help="dpm++, ddim, euler, euler-a or lcm"),
        steps: int = typer.Option(20, help="denoising steps"),
        guidance_scale: float = typer.Option(7.5, help="classifier-free guidance scale (<= 1 disables it)"),
        height: int = typer.Option(512, help="image height in pixels (multiple of 8)"),
        width: int = typer.Option(512, help="image width in pixels (multiple of 8)"),
        negative_prompt: str = typer.Option("", help="negative prompt"),
        seed: int = typer.Option(0, help="run seed (each image's seed derives from it and its caption_id)"),
        limit: int | None = typer.Option(None, help="only the first N ok train captions"),
        shard_size: int = typer.Option(1000, help="images per shard"),
        image_format: str = typer.Option("jpeg", help="jpeg, png or webp"),
        jpeg_quality: int = typer.Option(95, help="JPEG/WebP quality (1-100)"),
        import_images: str | None = typer.Option(
            None, "--import-images", help="NOT GENERATED HERE: take the images from this directory (files and/or "
            "tar sets, e.g. the authors' SynthImgCap) instead of a diffusion model; see docs/synthesize.md"),
        import_mapping: str | None = typer.Option(
            None, "--import-mapping", help="CSV caption_id,image naming each caption's image under --import-images "
            "(default: the image named after the caption_id)"),
        tiny_vae: str | None = typer.Option(
            None, help="APPROXIMATE (changes the images): decode with a tiny VAE, e.g. madebyollin/taesd, a "
            "local directory, or 'tiny' for the presets"),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
        batch_size: int = typer.Option(8, help="images per UNet batch"),
        compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the UNet (GPU)"),
        channels_last: bool = typer.Option(False, "--channels-last/--no-channels-last",
                                           help="channels-last memory format (GPU)"),
        writer_threads: int = typer.Option(4, help="threads encoding images while the GPU works"),
        worker_index: int = typer.Option(0, help="this worker's index when splitting shards (i % N == index)"),
        num_workers: int = typer.Option(1, help="number of workers splitting the shards"),
        shards: str | None = typer.Option(None, help="explicit shard indices, e.g. 0,1,5-9 (instead of workers)"),
        force: bool = typer.Option(False, "--force", help="regenerate the shards in scope even if done"),
        progress_bar: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    ) -> None:
        from pcm.config import validate
        from pcm.synthesize import SynthesizeConfig, run_synthesize

        values: dict[str, Any] = dict(
            model=model, revision=revision, dtype=dtype, scheduler=scheduler, steps=steps,
            guidance_scale=guidance_scale, height=height, width=width, negative_prompt=negative_prompt, seed=seed,
            limit=limit, shard_size=shard_size, image_format=image_format, jpeg_quality=jpeg_quality,
            imported_images=import_images, imported_mapping=import_mapping, tiny_vae=tiny_vae, device=device,
            batch_size=batch_size, compile=compile, channels_last=channels_last, writer_threads=writer_threads, progress_bar=progress_bar)
        config = validate(SynthesizeConfig, values, "synthesize")
        if shards is not None and num_workers != 1:
            raise ValueError("give either --shards or --worker-index/--num-workers, not both")
        writable_dir(root)
        result = run_synthesize(config, captions, root, shards=parse_shards(shards) if shards else None,
                                worker_index=worker_index, num_workers=num_workers, force=force)
        c = result.counts
        if result.extra.get("complete"):
            state = "cached" if result.cached else "done"
            typer.echo(f"synthesize {state}: {c['ok']} ok, {c['failed']} failed, {c['shards']} shards -> {result.path}")
        else:
            typer.echo(f"synthesize: wrote {c['shards_written']} shard(s) ({c['ok']} ok, {c['failed']} failed); "
                       f"{c['shards_pending']} of {c['shards']} shards still pending elsewhere -> {result.path}")
