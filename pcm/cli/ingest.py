"""`pcm ingest`: read a caption file into <root>/ingest/<fingerprint>/captions.parquet."""

from __future__ import annotations

from typing import Any

import typer

from pcm.cli.common import build_config, config_command, set_option, stage_values, writable_dir

INGEST_EXAMPLES = """Examples:

  pcm ingest dataset_coco.json                                 # Karpathy split JSON (COCO or Flickr30k)

  pcm ingest captions_val2014.json --set default_split=val     # COCO annotations: one file, one split

  pcm ingest my_captions.txt --set subset=10000 --set seed=1   # 10,000 training captions, seeded

  pcm ingest --demo                                            # the bundled demo dataset
"""

GIVEN_BY = {"source": "SOURCE or --demo"}


def register(app: typer.Typer) -> None:
    @app.command(cls=config_command("ingest", given_by=GIVEN_BY), epilog=INGEST_EXAMPLES,
                 help="Read captions (Karpathy or COCO JSON, .txt, .jsonl, .csv) into captions.parquet.\n\n"
                 "Every input caption becomes one row: ok, or rejected with a reason (empty, too long, "
                 "invalid UTF-8, control characters, duplicate, outside the train subset, a CSV row with more cells "
                 "than its header). Val/test rows carry the image path and "
                 "all reference captions of their image. The same file and config reuse the finished "
                 "directory <root>/ingest/<fingerprint>/. Prints the counts, then that directory (the input "
                 "of `pcm synthesize --captions`). Every config field is set with --set KEY=VALUE (listed below).")
    def ingest(
        source: str | None = typer.Argument(None, help="caption file: dataset_coco.json, captions_val2014.json, "
                                            "a .txt (one caption a line), .jsonl or .csv"),
        demo: bool = typer.Option(False, "--demo", help="ingest the bundled demo dataset instead of SOURCE"),
        sets: list[str] = set_option(),
        root: str = typer.Option("runs", "--root", help="run root: a directory, or s3://bucket/prefix"),
        force: bool = typer.Option(False, "--force", help="ingest again even if the directory is finished"),
    ) -> None:
        from pcm.demo_data import demo_paths
        from pcm.stages.ingest import IngestConfig, run_ingest
        from storage.layout import RunLayout

        if demo == (source is not None):
            raise ValueError("give a caption file SOURCE or --demo (exactly one)")
        values: dict[str, Any] = {**stage_values(IngestConfig, sets, GIVEN_BY, example="max_chars=200"),
                                  "source": str(demo_paths()[0]) if demo else source}
        config = build_config(IngestConfig, values, "ingest", sets)
        writable_dir(root)
        result = run_ingest(config, RunLayout(root), force=force)
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
