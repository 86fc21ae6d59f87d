"""`pcm ingest`: read a caption file into <root>/ingest/<fingerprint>/captions.parquet."""

from __future__ import annotations

from typing import Any

import typer

from pcm.cli.common import writable_dir


def register(app: typer.Typer) -> None:
    @app.command(help="Read captions (Karpathy or COCO JSON, .txt, .jsonl, .csv) into captions.parquet.\n\n"
                 "Every input caption becomes one row: ok, or rejected with a reason (empty, too long, "
                 "invalid UTF-8, control characters, duplicate, outside the train subset, a CSV row with more cells "
                 "than its header). Val/test rows carry the image path and "
                 "all reference captions of their image. The same file and options reuse the finished "
                 "directory <root>/ingest/<fingerprint>/. Prints the counts, then that directory (the input "
                 "of `pcm synthesize --captions`).")
    def ingest(
        source: str | None = typer.Argument(None, help="caption file: dataset_coco.json, captions_val2014.json, "
                                            "a .txt (one caption a line), .jsonl or .csv"),
        demo: bool = typer.Option(False, "--demo", help="ingest the bundled demo dataset instead of SOURCE"),
        format: str = typer.Option("auto", "--format", help="auto, karpathy, coco, txt, jsonl or csv"),
        splits: str = typer.Option("train,val,test", help="comma-separated splits to keep"),
        default_split: str = typer.Option("train", help="split of files without one (COCO annotations, .txt, "
                                          ".jsonl/.csv without a split column)"),
        name: str | None = typer.Option(None, help="caption-id prefix (default: from the file name)"),
        text_column: str = typer.Option("caption", help=".jsonl/.csv caption column"),
        image_id_column: str = typer.Option("image_id", help=".jsonl/.csv image id column (used when present)"),
        split_column: str = typer.Option("split", help=".jsonl/.csv split column (used when present)"),
        image_path_column: str = typer.Option("image_path", help=".jsonl/.csv image path column (used when present)"),
        subset: int | None = typer.Option(None, help="keep N training captions, chosen by --seed"),
        fraction: float | None = typer.Option(None, help="keep this fraction (0-1] of training captions, chosen by --seed"),
        seed: int = typer.Option(0, help="seed of the training subset"),
        max_chars: int = typer.Option(500, help="reject captions longer than this many characters"),
        dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="reject exact duplicate training captions"),
        root: str = typer.Option("runs", "--root", help="run root directory"),
        force: bool = typer.Option(False, "--force", help="ingest again even if the directory is finished"),
    ) -> None:
        from pcm.config import validate
        from pcm.demo_data import demo_paths
        from pcm.stages.ingest import IngestConfig, run_ingest

        if demo == (source is not None):
            raise ValueError("give a caption file SOURCE or --demo (exactly one)")
        values: dict[str, Any] = dict(
            source=str(demo_paths()[0]) if demo else source, format=format, name=name,
            splits=[s.strip() for s in splits.split(",") if s.strip()], default_split=default_split,
            text_column=text_column, image_id_column=image_id_column, split_column=split_column,
            image_path_column=image_path_column, subset=subset, fraction=fraction, seed=seed, max_chars=max_chars,
            dedup=dedup)
        config = validate(IngestConfig, values, "ingest")
        writable_dir(root)
        result = run_ingest(config, root, force=force)
        print_result(result)


def print_result(result: Any) -> None:
    """The non-zero counts as a table on stderr; the stage directory alone on stdout (for `$(pcm ingest ...)`)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ingest {'(cached) ' if result.cached else ''}{result.fingerprint}")
    table.add_column("count")
    table.add_column("value", justify="right")
    for key, value in result.counts.items():
        if value or key in ("rows", "ok", "rejected"):
            table.add_row(key, str(value))
    Console(stderr=True).print(table)
    typer.echo(result.path)
