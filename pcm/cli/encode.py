"""`pcm encode` (CLIP features, scores and concept vocabulary) and `pcm concepts` (inspect the noun vocabulary)."""

from __future__ import annotations

from pathlib import Path

import typer

from pcm.cli.common import Row, build_config, config_command, set_option, stage_values, writable_dir

ENCODE_EXAMPLES = """Examples:

  pcm encode --captions runs/ingest/<fp> --shards runs/synthesize/<fp> --images-root /data/coco   # ViT-L/14, openai

  pcm encode --captions runs/ingest/<fp> --shards runs/synthesize/<fp> --set clip.model=tiny --set clip.precision=fp32

  pcm encode --captions runs/ingest/<fp> --shards runs/synthesize/<fp> --set clip.model=ViT-B-32 --set clip.pool=none
"""

GIVEN_BY = {"images_root": "--images-root", "imported_features": "--import-features"}
# The --help text of EncodeConfig and ClipSpec fields that have no pydantic description (yet).
DESCRIPTIONS = {
    "images_root": "directory the val/test image_path values of captions.parquet are relative to (e.g. the COCO "
                   "images folder); without it no real image is encoded",
    "real_shard_size": "real images per real/ feature shard",
    "min_count": "concepts: keep nouns seen at least this often",
    "top_n": "concepts: keep at most the N most frequent nouns (446 = the authors' COCO list); none = all",
    "vocabulary_file": "text file, one concept a line, instead of extracting nouns from the captions",
    "concepts_from": "another encode stage directory: use its concept words (the release: COCO's for Flickr30k)",
    "prompt": "prompt template of the concept embeddings ({c} = the concept)",
    "prompt_ensemble": "average each concept's embedding over a prompt ensemble: openai-imagenet (CLIP's 80 "
                       "ImageNet templates) or simple-imagenet (open_clip's 7); none: the prompt alone",
    "imported_features": "folder of the authors' released per-image .npz CLIP features (features + g_feature), "
                         "used in place of CLIP's image tower; see docs/release-map.md",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "batch_size": "images per CLIP batch",
    "num_workers": "DataLoader processes decoding and preprocessing images",
    "pin_memory": "pinned host batches (GPU)",
    "progress_bar": "show progress bars",
}


def help_rows(rows: list[Row]) -> list[Row]:
    """--help's rows; where a field has no description of its own, the one above."""
    out = []
    for key, default, text in rows:
        if (not text or text.startswith("one of ")) and key in DESCRIPTIONS:
            text = f"{DESCRIPTIONS[key]} ({text})" if text else DESCRIPTIONS[key]
        out.append((key, default, text))
    return out


def register(app: typer.Typer) -> None:
    @app.command(cls=config_command("encode", given_by=GIVEN_BY, rows=help_rows), epilog=ENCODE_EXAMPLES,
                 help="Encode synthetic (and real val/test) images with a frozen CLIP.\n\n"
                 "Writes <root>/encode/<fingerprint>/: features/shard-NNNNNN.safetensors (global embedding + "
                 "patch tokens per synthetic image), scores.parquet (CLIP score and caption embedding per "
                 "sample), real/ and real.parquet (with --images-root), concepts.parquet (noun vocabulary + "
                 "'A photo of {c}.' embeddings), clip_head.safetensors and pictures/clip_scores.png. "
                 "Reruns encode only the shards without a done marker. Every config field is set with "
                 "--set KEY=VALUE (listed below), the CLIP's as clip.KEY.")
    def encode(
        captions: str = typer.Option(..., "--captions", help="finished ingest stage directory (captions.parquet)"),
        shards: str = typer.Option(..., "--shards", help="finished synthesize stage directory (shards/*.tar)"),
        images_root: str | None = typer.Option(
            None, "--images-root", help="directory the val/test image_path values of captions.parquet are "
            "relative to (e.g. the COCO images folder); without it no real image is encoded"),
        import_features: str | None = typer.Option(
            None, "--import-features", help="folder of the authors' released per-image .npz CLIP features: "
            "encode from them instead of running CLIP's image tower (clip must be the model that made them)"),
        sets: list[str] = set_option(),
        root: str = typer.Option("runs", "--root", help="run root: a directory, or s3://bucket/prefix"),
        force: bool = typer.Option(False, "--force", help="re-encode everything even if done"),
    ) -> None:
        from pcm.stages.contract import load_result
        from pcm.stages.encode import EncodeConfig, run_encode
        from storage.layout import RunLayout

        values = stage_values(EncodeConfig, sets, GIVEN_BY, example="clip.model=ViT-B-32")
        if images_root is not None:
            values["images_root"] = images_root
        if import_features is not None:
            values["imported_features"] = import_features
        config = build_config(EncodeConfig, values, "encode", sets)
        writable_dir(root)
        ingest, synthesize = load_result(captions), load_result(shards)  # the inputs, resolved once here
        result = run_encode(config, ingest, synthesize, RunLayout(root), force=force)
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
                rows = tables.read(f, tables.CAPTIONS, ["split", "text", "status"]).to_pylist()
                texts += [r["text"] for r in tables.ok_rows(rows, "train")]
            else:
                texts += [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        found = extract_concepts(texts, min_count=min_count, top_n=top_n)
        for concept, count in found:
            typer.echo(f"{count}\t{concept}")
        typer.echo(f"{len(found)} concepts from {len(texts)} captions", err=True)
