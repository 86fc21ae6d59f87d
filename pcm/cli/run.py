"""`pcm run`: the pipeline (or one stage and what it needs) in this process, no Prefect server."""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import typer

from pcm.cli.common import VALUE_SYNTAX, build_config, config_command, pipeline_presets, writable_dir

if TYPE_CHECKING:
    from storage.layout import StageDir
    from storage.result import StageResult

RUN_EXAMPLES = """Examples:

  pcm run                                                   # the demo preset (toy world, CPU, ~4 minutes)

  pcm run --preset tiny                                     # random-weight models: mechanics only

  pcm run train --preset coco-vitl14 --set train.epochs=6   # one stage; earlier ones reused or run

  pcm run --force all                                       # redo every stage (or --force encode,train)

  pcm run --set refine.enabled=true                         # SynC re-pairing between encode and train

  pcm run --preset demo --show-config > my.json             # the resolved config (JSON) ...

  pcm run --preset my.json                                  # ... runs as a preset
"""


def parse_stages(items: Sequence[str] | None, option: str, order: Sequence[str]) -> tuple[str, ...]:
    """Stage names from repeated and/or comma-separated values; `all` is every stage. Pipeline order, no repeats."""
    names = [n.strip() for item in items or () for n in item.split(",") if n.strip()]
    if "all" in names:
        return tuple(order)
    unknown = [n for n in names if n not in order]
    if unknown:
        raise ValueError(f"{option}: unknown stage(s) {', '.join(map(repr, unknown))}; "
                         f"expected {', '.join(order)} or all (several: a comma list or the option repeated)")
    return tuple(s for s in order if s in names)


def pipeline_overrides(items: Sequence[str], preset: str) -> dict[str, Any]:
    """`--set SECTION.KEY=VALUE` of `pcm run`: each key checked against its stage's config, each stage a --set
    touches validated with the preset (a bad value is one line naming its --set); then resolve() takes them."""
    from pcm.config import parse_assignments, unknown_key
    from pcm.pipeline_presets import load_preset
    from pcm.stages.pipeline import STAGE_ORDER, PipelineConfig, apply_overrides

    overrides = parse_assignments(items, example="train.epochs=2")
    typed = {item.partition("=")[0].strip(): item for item in items}
    for key, value in overrides.items():
        section = key.split(".")[0]
        if section not in PipelineConfig.model_fields:
            near = difflib.get_close_matches(section, STAGE_ORDER, n=1)
            raise ValueError(f"--set {typed[key]}: unknown section {section!r}"
                             f"{f' (did you mean {near[0]!r}?)' if near else ''}; expected SECTION.KEY=VALUE with "
                             f"SECTION one of {', '.join(STAGE_ORDER)}")
        if why := unknown_key(PipelineConfig, key, value):
            raise ValueError(f"--set {typed[key]}: {why}")
    raw = apply_overrides(load_preset(preset), overrides)
    for section in dict.fromkeys(k.split(".")[0] for k in overrides):
        if section in STAGE_ORDER and section in raw:
            build_config(PipelineConfig.model_fields[section].annotation, raw[section], section,
                         [item for k, item in typed.items() if k.split(".")[0] == section], prefix=f"{section}.")
    return overrides


def toy_generator(config: Any) -> bool:
    """Whether the synthesize stage renders with the shipped toy text-to-image model (by its files' content)."""
    from pcm.toyworld.manifest import is_shipped

    return config.source == "generated" and is_shipped(config.model, "t2i")


def warn_unfamiliar_words(captions: StageResult) -> None:
    """Say when the training captions hold words the toy text-to-image model never saw (pcm.toyworld.wording)."""
    from pcm.toyworld.wording import train_texts, unfamiliar, warning

    if message := warning(unfamiliar(train_texts(captions.stage_dir))):
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def print_scores(sd: StageDir) -> None:
    """The evaluation's scores in one line (x100, as papers print them), its control's CIDEr, the report's path."""
    from pcm.report import LABELS
    from storage.atomic import read_json

    metrics = read_json(sd.metrics)
    scores = [f"{label} {100 * v:.1f}" for key, label in LABELS.items()
              if key in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
              and isinstance(v := metrics["metrics"].get(key), float)]
    control = ((metrics.get("control") or {}).get("metrics") or {}).get("CIDEr")
    shown = f"; language-only control CIDEr {100 * control:.1f}" if isinstance(control, float) else ""
    typer.echo(f"scores ({metrics.get('split', 'test')}, {metrics.get('counts', {}).get('images', '?')} images): "
               f"{', '.join(scores)}{shown}\nreport: {sd.report}")


def print_faithfulness(config: Any, stage: StageResult) -> None:
    """For images of the shipped toy text-to-image model: how faithful they are to their captions (the toy CLIP's
    judgement, kept in the stage's faithfulness.json; a few seconds the first time)."""
    from pcm.toyworld.faithfulness import stage_report, summary_line

    if toy_generator(config):
        typer.echo(f"{'':<11} faithfulness: {summary_line(stage_report(stage.stage_dir))}")


def register(app: typer.Typer) -> None:
    @app.command("run", cls=config_command(None), epilog=RUN_EXAMPLES)
    def run(
        stages: list[str] = typer.Argument(
            None, help="Stages to run: ingest, synthesize, encode, refine (only with refine.enabled=true), train, "
            "evaluate, or 'all' (default); "
            "several as separate words or a comma list. Earlier stages a stage needs are reused from disk or "
            "run first."),
        preset: str = typer.Option("demo", "--preset", "-p", help="Pipeline preset name (see `pcm presets`), a "
                                   ".toml file, or the .json that --show-config prints."),
        set_: list[str] = typer.Option(
            None, "--set", "-s", metavar="SECTION.KEY=VALUE",
            help="Override a parameter: SECTION.KEY=VALUE, e.g. synthesize.steps=4 (repeatable); each stage's keys, "
            f"defaults and meanings: `pcm <stage> --help`. {VALUE_SYNTAX}."),
        root: str = typer.Option("runs", "--root", help="Run root: outputs go to ROOT/<stage>/<fingerprint>/; a directory, or s3://bucket/prefix (README: Scale-out)."),
        force: list[str] = typer.Option(
            None, "--force", help="Redo these stages even if finished: a stage, a comma list (encode,train) or "
            "all; only stages this run asks for are redone (repeatable)."),
        show_config: bool = typer.Option(False, "--show-config", help="Print the resolved config as JSON and exit; "
                                         "save it to a .json file and pass that file as --preset to run it."),
    ) -> None:
        """Run the pipeline from a preset, reusing every finished stage."""
        from pcm.stages.pipeline import STAGE_ORDER, resolve, run_pipeline

        wanted = parse_stages(stages, "STAGES", STAGE_ORDER) or tuple(STAGE_ORDER)
        forced = parse_stages(force, "--force", STAGE_ORDER)
        cfg = resolve(preset, pipeline_overrides(set_ or [], preset))
        if show_config:
            typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
            return
        force_all = any(n.strip() == "all" for item in force or () for n in item.split(","))
        if ignored := [] if force_all else [s for s in forced if s not in wanted]:
            both = ",".join(s for s in STAGE_ORDER if s in wanted or s in ignored)
            typer.secho(f"note: --force {','.join(ignored)} does nothing here: only the stages asked for "
                        f"({','.join(wanted)}) are redone; ask for it too: pcm run {both} --force "
                        f"{','.join(forced)}", fg=typer.colors.YELLOW, err=True)
        writable_dir(root)
        if toy_generator(cfg.synthesize) and STAGE_ORDER.index(max(wanted, key=STAGE_ORDER.index)) > 0:
            # Before anything is rendered: does the toy model know these captions' words?
            warn_unfamiliar_words(run_pipeline(cfg, root, stages=("ingest",), force=forced)["ingest"])
        results = run_pipeline(cfg, root, stages=wanted, force=forced)
        for name, r in results.items():
            state = "cached" if r.cached else "done"
            typer.echo(f"{name:<11} {state:<7} {r.path}  {json.dumps(r.counts)}")
        if "synthesize" in results:
            print_faithfulness(cfg.synthesize, results["synthesize"])
        if "evaluate" in results:
            print_scores(results["evaluate"].stage_dir)

    @app.command("presets")
    def presets() -> None:
        """List the pipeline presets (pcm/presets/pipeline/*.toml)."""
        for name, description in pipeline_presets().items():
            typer.echo(f"{name:<20} {description}")
