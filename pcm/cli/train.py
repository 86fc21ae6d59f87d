"""`pcm train`: train PCM-Net on the encoded synthetic images of a run (resumes from the latest checkpoint)."""

from __future__ import annotations

from typing import Any

import typer

from pcm.cli.common import Row, build_config, config_command, set_option, stage_values, writable_dir

TRAIN_EXAMPLES = """Examples:

  pcm train --captions runs/ingest/<fp> --encode runs/encode/<fp>                          # the paper's ViT-L/14 model

  pcm train --captions runs/ingest/<fp> --encode runs/encode/<fp> --model-preset vitb32 --set cxe_w=2.5

  pcm train --captions runs/ingest/<fp> --encode runs/encode/<fp> --model-preset tiny --set epochs=2 --set device=cpu
"""

MODEL_PRESET = "vitl14"  # whose model fields --help shows as the model.KEY defaults (TrainConfig's default preset)


def help_rows(rows: list[Row]) -> dict[str, list[Row]]:
    """TrainConfig's rows, then a panel of the model fields (model.KEY; default: the default model preset's)."""
    from pcm.cli.common import CONFIG_TITLE
    from pcm.config import toml_text
    from pcm.model import PCMNetConfig, load_preset

    preset = load_preset(MODEL_PRESET)
    model = [(f"model.{name}", toml_text(getattr(preset, name)), (f.description or "").strip())
             for name, f in PCMNetConfig.model_fields.items()]
    return {CONFIG_TITLE: rows, f"Model: --set model.KEY=VALUE (defaults: model preset {MODEL_PRESET}'s; "
            "--model-preset picks another)": model}


def register(app: typer.Typer) -> None:
    @app.command(cls=config_command("train", rows=help_rows), epilog=TRAIN_EXAMPLES,
                 help="Train PCM-Net on a finished encode stage (features, CLIP scores, concepts).\n\n"
                 "Writes <root>/train/<fingerprint>/checkpoints/step-NNNNNNNN/, best/ (best validation "
                 "score on the val split), metrics.jsonl and pictures/loss_curve.png. A rerun resumes from "
                 "the latest checkpoint and ends with the same weights as an uninterrupted run. Every "
                 "TrainConfig field is set with --set KEY=VALUE, a model preset's fields with --set model.KEY=VALUE "
                 "(both listed below); ablations: --set model.pcm=false, --set cxe=false, --set model.noise=false.")
    def train(
        captions: str = typer.Option(..., "--captions", help="finished ingest stage directory (captions.parquet)"),
        encode: str = typer.Option(..., "--encode", help="finished encode stage directory (features, scores)"),
        refine: str | None = typer.Option(None, "--refine", help="finished refine stage directory: train on its "
                                          "kept pairs (pairs.parquet) instead of each caption's own image"),
        model_preset: str | None = typer.Option(
            None, "--model-preset", help="PCM-Net model preset: vitl14, vitb32, tiny, toy, or a .toml file "
            "(not a pipeline preset: those are `pcm run --preset`); the same as --set preset=NAME",
            show_default=MODEL_PRESET),
        preset: str | None = typer.Option(None, "--preset", hidden=True, help="deprecated: --model-preset"),
        sets: list[str] = set_option(),
        root: str = typer.Option("runs", "--root", help="run root: a directory, or s3://bucket/prefix"),
        force: bool = typer.Option(False, "--force", help="discard checkpoints and train from scratch"),
    ) -> None:
        from pcm.stages.contract import load_result
        from pcm.stages.train import TrainConfig, run_train
        from storage.layout import RunLayout

        if preset is not None:
            if model_preset is not None and model_preset != preset:
                raise ValueError(f"--preset {preset} and --model-preset {model_preset}: give --model-preset only "
                                 "(--preset is its deprecated name in `pcm train`)")
            typer.secho("note: `pcm train --preset` is deprecated, use --model-preset (a PCM-Net model preset; "
                        "`pcm run --preset` is a pipeline preset)", fg=typer.colors.YELLOW, err=True)
        name = model_preset if model_preset is not None else preset
        values: dict[str, Any] = stage_values(TrainConfig, sets, example="model.d_model=256")
        if name is not None:
            if values.get("preset", name) != name:
                raise ValueError(f"--model-preset {name} and --set preset={values['preset']}: give one of them")
            values["preset"] = name
        config = build_config(TrainConfig, values, "train", sets)
        writable_dir(root)
        ingest, encoded = load_result(captions), load_result(encode)  # the inputs, resolved once here
        refined = load_result(refine) if refine is not None else None
        result = run_train(config, ingest, encoded, RunLayout(root), force=force, refine=refined)
        e, c = result.extra, result.counts
        state = "cached" if result.cached else "done"
        best = (f"best val {e['val_metric']} {e['best_value']:.4f} at step {e['best_step']}"
                if e["best_value"] is not None else "no val images: best = final model")
        typer.echo(f"train {state}: {c['steps']} steps on {c['train_pairs']} pairs, vocab {c['vocab']}; {best} "
                   f"-> {e['best']}")
