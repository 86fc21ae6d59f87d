"""`pcm encode` (CLIP features, scores and concept vocabulary) and `pcm concepts` (inspect the noun vocabulary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pcm.cli.common import writable_dir


def _pool(text: str) -> dict[str, Any]:
    """`auto` -> the spec's default (paper: 16x16 -> 8x8), `none` -> no pooling, N -> an N x N grid."""
    if text == "auto":
        return {}
    if text == "none":
        return {"pool": None}
    try:
        return {"pool": int(text)}
    except ValueError:
        raise ValueError(f"--pool {text!r}: expected auto, none or a grid side such as 8") from None


def register(app: typer.Typer) -> None:
    @app.command(help="Encode synthetic (and real val/test) images with a frozen CLIP.\n\n"
                 "Writes <root>/encode/<fingerprint>/: features/shard-NNNNNN.safetensors (global embedding + "
                 "patch tokens per synthetic image), scores.parquet (CLIP score and caption embedding per "
                 "sample), real/ and real.parquet (with --images-root), concepts.parquet (noun vocabulary + "
                 "'A photo of {c}.' embeddings), clip_head.safetensors and pictures/clip_scores.png. "
                 "Reruns encode only the shards without a done marker.")
    def encode(
        captions: str = typer.Option(..., "--captions", help="finished ingest stage directory (captions.parquet)"),
        shards: str = typer.Option(..., "--shards", help="finished synthesize stage directory (shards/*.tar)"),
        root: str = typer.Option("runs", "--root", help="run root directory"),
        clip: str = typer.Option("ViT-L-14", "--clip", help="open_clip architecture (ViT-L-14, ViT-B-32, ...) "
                                 "or preset: tiny, tiny-l14"),
        pretrained: str | None = typer.Option(
            None, "--pretrained", help="open_clip tag (default: openai; none for presets), a checkpoint file, or "
            "local-dir:/path holding open_clip_config.json + weights"),
        precision: str = typer.Option("fp16", help="fp16, bf16 or fp32 (fp32 on the CPU is faster)"),
        pool: str = typer.Option("auto", help="patch grid side after average pooling: auto (16x16 -> 8x8 as in the "
                                 "paper, presets: their default), none, or N"),
        images_root: str | None = typer.Option(
            None, "--images-root", help="directory the val/test image_path values of captions.parquet are "
            "relative to (e.g. the COCO images folder); without it no real image is encoded"),
        real_shard_size: int = typer.Option(1000, help="real images per real/ feature shard"),
        min_count: int = typer.Option(2, help="concepts: keep nouns seen at least this often"),
        top_n: int | None = typer.Option(446, help="concepts: keep at most the N most frequent nouns"),
        vocabulary: str | None = typer.Option(None, "--vocabulary", help="text file, one concept a line, instead of "
                                              "extracting nouns from the captions"),
        prompt: str = typer.Option("A photo of {c}.", help="prompt template of the concept embeddings"),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
        batch_size: int = typer.Option(256, help="images per CLIP batch"),
        num_workers: int = typer.Option(4, help="DataLoader processes decoding and preprocessing images"),
        pin_memory: bool = typer.Option(True, "--pin-memory/--no-pin-memory", help="pinned host batches (GPU)"),
        force: bool = typer.Option(False, "--force", help="re-encode everything even if done"),
        progress_bar: bool = typer.Option(True, "--progress/--no-progress", help="show progress bars"),
    ) -> None:
        from pcm.config import validate
        from pcm.stages.encode import EncodeConfig, run_encode

        spec: dict[str, Any] = {"model": clip, "precision": precision, **_pool(pool)}
        if pretrained is not None:
            spec["pretrained"] = None if pretrained == "none" else pretrained
        values = dict(clip=spec, images_root=images_root, real_shard_size=real_shard_size, min_count=min_count,
                      top_n=top_n, vocabulary_file=vocabulary, prompt=prompt, device=device, batch_size=batch_size,
                      num_workers=num_workers, pin_memory=pin_memory, progress_bar=progress_bar)
        config = validate(EncodeConfig, values, "encode")
        writable_dir(root)
        result = run_encode(config, captions, shards, root, force=force)
        c, state = result.counts, "cached" if result.cached else "done"
        speed = f", {result.timings['images_per_s']:,.0f} images/s" if "images_per_s" in result.timings else ""
        typer.echo(f"encode {state}: {c['images_ok']} ok, {c['images_failed']} failed synthetic images; "
                   f"{c['real_ok']} ok, {c['real_failed']} failed real images; {c['concepts']} concepts{speed} "
                   f"-> {result.path}")
        if "real_note" in result.extra:
            typer.echo(f"note: {result.extra['real_note']}")

    @app.command(help="Print the concept vocabulary (lemmatised nouns, most frequent first) of caption files: "
                 "text files with one caption a line, or a captions.parquet (its ok train rows).")
    def concepts(
        files: list[Path] = typer.Argument(..., help="caption files (.txt or captions.parquet)", exists=True,
                                           dir_okay=False),
        min_count: int = typer.Option(2, help="keep nouns seen at least this often"),
        top_n: int | None = typer.Option(446, help="keep at most the N most frequent nouns"),
    ) -> None:
        from pcm.concepts import extract_concepts
        from storage import tables

        texts: list[str] = []
        for f in files:
            if f.suffix == ".parquet":
                texts += [r["text"] for r in tables.read(f, tables.CAPTIONS, ["split", "text", "status"]).to_pylist()
                          if r["split"] == "train" and r["status"] == tables.STATUS_OK]
            else:
                texts += [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        found = extract_concepts(texts, min_count=min_count, top_n=top_n)
        for concept, count in found:
            typer.echo(f"{count}\t{concept}")
        typer.echo(f"{len(found)} concepts from {len(texts)} captions", err=True)
