"""`pcm train`: train PCM-Net on the encoded synthetic images of a run (resumes from the latest checkpoint)."""

from __future__ import annotations

import json
from typing import Any

import typer

from pcm.cli.common import writable_dir


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs (values parsed as JSON when they parse, else kept as text); `model.x` goes to overrides."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set batch_size=64 or --set model.pcm=false")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key.startswith("model."):
            values.setdefault("model", {})[key.removeprefix("model.")] = value
        else:
            values[key] = value
    return values


TRAIN_EXAMPLES = """Examples:

  pcm train --captions runs/ingest/<fp> --encode runs/encode/<fp>                          # the paper's ViT-L/14 model

  pcm train --captions runs/ingest/<fp> --encode runs/encode/<fp> --model-preset vitb32 --set cxe_w=2.5

  pcm train --captions runs/ingest/<fp> --encode runs/encode/<fp> --model-preset tiny --set epochs=2 --device cpu
"""


def register(app: typer.Typer) -> None:
    @app.command(help="Train PCM-Net on a finished encode stage (features, CLIP scores, concepts).\n\n"
                 "Writes <root>/train/<fingerprint>/checkpoints/step-NNNNNNNN/, best/ (best validation "
                 "score on the val split), metrics.jsonl and pictures/loss_curve.png. A rerun resumes from "
                 "the latest checkpoint and ends with the same weights as an uninterrupted run. Any "
                 "TrainConfig field can be set with --set key=value, model fields with --set model.key=value; "
                 "ablations: --set model.pcm=false, --set cxe=false, --set model.noise=false.",
                 epilog=TRAIN_EXAMPLES)
    def train(
        captions: str = typer.Option(..., "--captions", help="finished ingest stage directory (captions.parquet)"),
        encode: str = typer.Option(..., "--encode", help="finished encode stage directory (features, scores)"),
        root: str = typer.Option("runs", "--root", help="run root directory"),
        model_preset: str | None = typer.Option(
            None, "--model-preset", help="PCM-Net model preset: vitl14, vitb32, tiny, toy, or a .toml file "
            "(not a pipeline preset: those are `pcm run --preset`)", show_default="vitl14"),
        preset: str | None = typer.Option(None, "--preset", hidden=True, help="deprecated: --model-preset"),
        sets: list[str] = typer.Option([], "--set", help="override a config field: key=value (repeatable)"),
        devices: int = typer.Option(1, help="GPUs (processes); > 1 runs DDP under torchrun"),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N"),
        force: bool = typer.Option(False, "--force", help="discard checkpoints and train from scratch"),
        progress_bar: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    ) -> None:
        from pcm.config import validate
        from pcm.stages.train import TrainConfig, run_train

        if preset is not None:
            if model_preset is not None and model_preset != preset:
                raise ValueError(f"--preset {preset} and --model-preset {model_preset}: give --model-preset only "
                                 "(--preset is its deprecated name in `pcm train`)")
            typer.secho("note: `pcm train --preset` is deprecated, use --model-preset (a PCM-Net model preset; "
                        "`pcm run --preset` is a pipeline preset)", fg=typer.colors.YELLOW, err=True)
        name = model_preset if model_preset is not None else preset
        values = {**({"preset": name} if name is not None else {}), "devices": devices, "device": device,
                  "progress_bar": progress_bar, **parse_sets(sets)}
        config = validate(TrainConfig, values, "train")
        writable_dir(root)
        result = run_train(config, captions, encode, root, force=force)
        e, c = result.extra, result.counts
        state = "cached" if result.cached else "done"
        best = (f"best val {e['val_metric']} {e['best_value']:.4f} at step {e['best_step']}"
                if e["best_value"] is not None else "no val images: best = final model")
        typer.echo(f"train {state}: {c['steps']} steps on {c['train_pairs']} pairs, vocab {c['vocab']}; {best} "
                   f"-> {e['best']}")
