"""`pcm refine`: re-pair the training captions with synthetic images (SynC) or filter them by CLIP score."""

from __future__ import annotations

import typer

from pcm.cli.common import build_config, config_command, set_option, stage_values, writable_dir

REFINE_EXAMPLES = """Examples:

  pcm refine --captions runs/ingest/<fp> --encode runs/encode/<fp>                          # SynC, k 15, keep 90%

  pcm refine --captions runs/ingest/<fp> --encode runs/encode/<fp> --set method=clip-filter --set keep_fraction=0.8

  pcm train --captions runs/ingest/<fp> --encode runs/encode/<fp> --refine runs/refine/<fp>   # train on its pairs
"""


def register(app: typer.Typer) -> None:
    @app.command(cls=config_command("refine"), epilog=REFINE_EXAMPLES,
                 help="Choose which synthetic image each training caption trains on, and which pairs train.\n\n"
                 "method=sync (SynC): each caption takes the best of its k nearest synthetic images by cycle "
                 "consistency, then the top keep_fraction of pairs by that score train; method=clip-filter: the "
                 "original pairs, top keep_fraction by CLIP score. Uses the encode stage's CLIP embeddings. Writes "
                 "<root>/refine/<fingerprint>/pairs.parquet (every training caption: its image, score, rank, kept "
                 "or dropped with the reason) and pictures/pairs.png; `pcm train --refine DIR` trains on it. Every "
                 "config field is set with --set KEY=VALUE (listed below).")
    def refine(
        captions: str = typer.Option(..., "--captions", help="finished ingest stage directory (captions.parquet)"),
        encode: str = typer.Option(..., "--encode", help="finished encode stage directory (features, scores)"),
        sets: list[str] = set_option(),
        root: str = typer.Option("runs", "--root", help="run root: a directory, or s3://bucket/prefix"),
        force: bool = typer.Option(False, "--force", help="recompute even if done"),
    ) -> None:
        from pcm.stages.contract import load_result
        from pcm.stages.refine import RefineConfig, run_refine
        from storage.layout import RunLayout

        config = build_config(RefineConfig, stage_values(RefineConfig, sets, example="keep_fraction=0.8"), "refine",
                              sets)
        writable_dir(root)
        ingest, encoded = load_result(captions), load_result(encode)  # the inputs, resolved once here
        result = run_refine(config, ingest, encoded, RunLayout(root), force=force)
        c, state = result.counts, "cached" if result.cached else "done"
        typer.echo(f"refine {state} ({config.method}): {c['kept']} of {c['captions']} captions kept, {c['reassigned']} "
                   f"of them on another caption's image; {c['dropped']} dropped -> {result.path}")
