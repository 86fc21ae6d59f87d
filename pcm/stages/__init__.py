"""The five pipeline stages, the recipes that turn the library into outputs on disk.

    storage/        formats and places: names, schemas, atomic shards, markers, locks (no torch)
    pcm/            the library: model, loss, decode, vocab, dataset, checkpoint, clip, diffusion,
                    concepts, metrics, report - functions of explicit arguments, no stage configs
    pcm/stages/     ingest -> synthesize -> encode -> train -> evaluate: each module holds its typed
                    config, `plan` (its directory from the fingerprint; writes nothing), `verify`, and `run_<stage>`;
                    contract.py the contract they keep (a Protocol) and what they share (lock, cache
                    check, marker last), pipeline.py the presets and the order
    pcm/cli/        the `pcm` command: one module per command, heavy imports inside the commands
    flows/          Prefect wiring only: one flow per stage plus synth-and-train (the only prefect user)

Imports point down this list (tests/test_layering.py checks it).
"""
