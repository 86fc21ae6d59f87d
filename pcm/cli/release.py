"""`pcm import-checkpoint`: the authors' X-modaler checkpoint as a train stage, for `pcm evaluate`."""

from __future__ import annotations

import typer

from pcm.cli.common import writable_dir

IMPORT_EXAMPLES = """Examples:

  pcm import-checkpoint model_final.pth --vocab mscoco_dataset/vocabulary.txt \\
      --concepts PCM-Net/data/coco400_embeddings_ViT-B32_with_ensemble.pickle

  pcm evaluate --train runs/train/<fp> --encode runs/encode/<fp> --captions runs/ingest/<fp>
"""


def register(app: typer.Typer) -> None:
    @app.command("import-checkpoint", epilog=IMPORT_EXAMPLES,
                 help="Convert an authors' X-modaler checkpoint (.pth of jianjieluo/PCM-Net) into a finished train "
                 "stage <root>/train/<fingerprint>/ whose best/ is a checkpoint of this project, so `pcm evaluate` "
                 "scores their model with this project's evaluator. Loaded with torch.load(weights_only=True); "
                 "every parameter must map onto PCM-Net or the import stops naming those that do not. The CLIP and "
                 "model preset follow from the shapes (ViT-B/32 or ViT-L/14). See docs/release-map.md.")
    def import_checkpoint(
        file: str = typer.Argument(..., help="the release's checkpoint (.pth)"),
        vocab: str = typer.Option(..., "--vocab", help="the vocabulary.txt it was trained with (INFERENCE.VOCAB)"),
        concepts: str = typer.Option(..., "--concepts", help="the release's concept file "
                                     "(data/coco400_embeddings_<CLIP>_with_ensemble.pickle)"),
        clip_model: str | None = typer.Option(None, "--clip-model", help="the CLIP of its features (open_clip name "
                                              "or preset); unset: inferred from the shapes"),
        clip_pretrained: str | None = typer.Option(None, "--clip-pretrained", help="with --clip-model: its weights "
                                                   "(open_clip tag, file or local-dir:PATH)"),
        model_preset: str | None = typer.Option(None, "--model-preset", help="PCM-Net preset for what a checkpoint "
                                                "does not hold (dropouts, top_k, top_m, tau); unset: by the shapes"),
        heads: int = typer.Option(8, "--heads", help="attention heads (not in a checkpoint; 8 in every release config)"),
        root: str = typer.Option("runs", "--root", help="run root directory"),
        force: bool = typer.Option(False, "--force", help="convert again even if done"),
    ) -> None:
        from pcm.clip import ClipSpec
        from pcm.stages.import_checkpoint import ImportCheckpointConfig, run_import_checkpoint
        from storage.layout import RunLayout

        clip = None
        if clip_model is not None:
            spec = {"model": clip_model} | ({"pretrained": clip_pretrained} if clip_pretrained is not None else {})
            clip = ClipSpec.model_validate(spec)
        config = ImportCheckpointConfig(clip=clip, model_preset=model_preset, n_heads=heads)
        writable_dir(root)
        result = run_import_checkpoint(config, file, vocab, concepts, RunLayout(root), force=force)
        state = "cached" if result.cached else "done"
        c = result.counts
        typer.echo(f"import-checkpoint {state}: {c['parameters']:,} parameters, {c['vocabulary']} words, "
                   f"{c['concepts']} concepts, CLIP {result.extra['clip']['model']} -> {result.path}")
        typer.echo(f"next: pcm evaluate --train {result.path} --encode <encode stage> --captions <ingest stage>")
