"""`pcm run`: the pipeline (or one stage and what it needs) in this process, no Prefect server."""

from __future__ import annotations

import json

import typer

from pcm.commands import writable_dir


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        stages: list[str] = typer.Argument(
            None, help="Stages to run: ingest, synthesize, encode, train, evaluate, or 'all' (default). "
            "Earlier stages a stage needs are reused from disk or run first."),
        preset: str = typer.Option("demo", "--preset", "-p", help="Pipeline preset name or path to a .toml file."),
        set_: list[str] = typer.Option(
            None, "--set", "-s", help="Override a parameter: SECTION.KEY=VALUE, e.g. synthesize.steps=4 (repeatable)."),
        root: str = typer.Option("runs", "--root", help="Run root: outputs go to ROOT/<stage>/<fingerprint>/."),
        force: list[str] = typer.Option(None, "--force", help="Redo this stage even if finished (repeatable)."),
        show_config: bool = typer.Option(False, "--show-config", help="Print the resolved config and exit."),
    ) -> None:
        """Run the pipeline from a preset, reusing every finished stage."""
        from pcm.pipeline import STAGE_ORDER, parse_assignments, resolve, run_pipeline

        cfg = resolve(preset, parse_assignments(set_ or []))
        if show_config:
            typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
            return
        writable_dir(root)
        wanted = tuple(STAGE_ORDER) if not stages or stages == ["all"] else tuple(stages)
        results = run_pipeline(cfg, root, stages=wanted, force=tuple(force or ()))
        for name, r in results.items():
            state = "cached" if r.cached else "done"
            typer.echo(f"{name:<11} {state:<7} {r.path}  {json.dumps(r.counts)}")

    @app.command("presets")
    def presets() -> None:
        """List the pipeline presets."""
        from pcm.pipeline import load_preset, preset_names

        for name in preset_names():
            typer.echo(f"{name:<20} {load_preset(name).get('description', '')}")
