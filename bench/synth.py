"""Benchmark: plain diffusers pipeline vs the synthesize stage end to end (images/s, same device, same run)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_captions(root: Path, n: int) -> str:
    """A finished ingest stage with n train captions (varied lengths, like COCO)."""
    from pcm.stages.contract import finish
    from storage import manifests
    from storage.layout import RunLayout

    sd = RunLayout(root).stage("ingest", "00000000000be4c0")
    sd.path.mkdir(parents=True, exist_ok=True)
    words = "a man riding a red bicycle down a busy city street next to tall buildings at night".split()
    rows = [dict(caption_id=f"b{i:06d}", image_id=f"b{i}", split="train", text=" ".join(words[: 6 + i % 10]),
                 raw_text="", source="bench", image_path=None, references=[], status="ok", error=None)
            for i in range(n)]
    manifests.CAPTIONS.write(sd, rows)
    finish(sd, {"captions": n}, time.monotonic())
    return str(sd.path)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_pipeline(args: argparse.Namespace, prompts: list[str]) -> float:
    """(a) StableDiffusionPipeline as documented: batched prompts, output_type="np"."""
    import torch

    from pcm import diffusion

    pipe = diffusion.load_pipeline(args.preset, dtype=args.dtype, device=args.device, scheduler="dpm++")
    kw = dict(height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=7.5, output_type="np")
    with torch.inference_mode():
        pipe(prompts[: args.batch_size], **kw)  # warm-up
        sync(args.device)
        t0 = time.perf_counter()
        for b in range(0, len(prompts), args.batch_size):
            pipe(prompts[b:b + args.batch_size], generator=torch.Generator("cpu").manual_seed(b), **kw)
        sync(args.device)
    del pipe
    return len(prompts) / (time.perf_counter() - t0)


def generator_only(args: argparse.Namespace, prompts: list[str], **opts) -> float:
    """(c) this project's generator alone (Synthesizer.generate: per-sample seeds, latents decoded and converted
    to uint8 on the device), no JPEG encoding or shards: tells the model path from the stage's writing."""
    from pcm.diffusion import Synthesizer
    from pcm.stages.synthesize import SynthesizeConfig, generation_spec

    config = SynthesizeConfig(model=args.preset, dtype=args.dtype, device=args.device, scheduler="dpm++",
                              steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size,
                              batch_size=args.batch_size, **opts)
    synth = Synthesizer(generation_spec(config))
    synth.generate(prompts[: args.batch_size], list(range(args.batch_size)))  # warm-up
    sync(args.device)
    t0 = time.perf_counter()
    for b in range(0, len(prompts), args.batch_size):
        batch = prompts[b:b + args.batch_size]
        synth.generate(batch, list(range(b, b + len(batch))))
    sync(args.device)
    elapsed = time.perf_counter() - t0
    del synth
    return len(prompts) / elapsed


def stage(args: argparse.Namespace, work: Path, captions: str, name: str, **opts) -> float:
    """(b) run_synthesize end to end (generation, JPEG encoding, shard writing, finalising).

    The model is loaded and warmed up (and compiled, if asked) before the clock starts, as for (a).
    """
    from pcm.diffusion import Synthesizer
    from pcm.stages.contract import as_result
    from pcm.stages.synthesize import SynthesizeConfig, generation_spec, run_synthesize
    from storage.layout import RunLayout

    config = SynthesizeConfig(model=args.preset, dtype=args.dtype, device=args.device, scheduler="dpm++",
                              steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size,
                              batch_size=args.batch_size, shard_size=max(args.batch_size, args.n_images // 4),
                              limit=args.n_images, progress_bar=False, **opts)
    synth = Synthesizer(generation_spec(config))
    synth.generate(["warm-up"] * args.batch_size, list(range(args.batch_size)))
    sync(args.device)
    t0 = time.perf_counter()
    r = run_synthesize(config, as_result(captions), RunLayout(work / name), synthesizer=synth)
    sync(args.device)
    elapsed = time.perf_counter() - t0
    assert r.counts["ok"] == args.n_images, r.counts
    del synth
    return args.n_images / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", choices=["tiny", "sd15-arch"], default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 32 on GPU, 4 on CPU")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n-images", type=int, default=None, help="default: 256 on GPU, 8 on CPU")
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default: fp16 on GPU, fp32 on CPU")
    ap.add_argument("--size", type=int, default=None, help="pixels; default 512 (sd15-arch) or 64 (tiny)")
    ap.add_argument("--opt-in", choices=["auto", "compile", "tiny-vae", "compile+tiny-vae", "none"],
                    default="auto", help="the opt-in setting measured on the third line; auto: tiny-vae on CPU, "
                    "compile+tiny-vae on GPU; none: skip it")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the generator alone and both arms with and without channels-last, to tell "
                    "where the stage's time goes")
    ap.add_argument("--work-dir", default=None, help="where the benchmark's shards go (default: a temp dir)")
    args = ap.parse_args()

    from pcm.device import resolve_device

    args.device = resolve_device(args.device)
    gpu = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (32 if gpu else 4)
    args.n_images = args.n_images or (256 if gpu else 8)
    args.dtype = args.dtype or ("fp16" if gpu else "fp32")
    args.size = args.size or (512 if args.preset == "sd15-arch" else 64)
    opt_in = args.opt_in if args.opt_in != "auto" else ("compile+tiny-vae" if gpu else "tiny-vae")

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        captions = make_captions(work / "runs", max(args.n_images, args.batch_size))
        import torch

        from pcm.stages.contract import load_result
        from pcm.stages.synthesize import SynthesizeConfig, planned_samples

        prompts = [s.text for s in planned_samples(SynthesizeConfig(limit=args.n_images), load_result(captions))]
        plain = plain_pipeline(args, prompts)
        ours = stage(args, work, captions, "stage", channels_last=gpu)
        breakdown: dict[str, float] = {}
        if args.breakdown:
            breakdown["generator alone"] = generator_only(args, prompts, channels_last=gpu)
            breakdown[f"generator alone, channels_last={not gpu}"] = generator_only(args, prompts,
                                                                                 channels_last=not gpu)
            breakdown[f"this stage, channels_last={not gpu}"] = stage(args, work, captions, "stage-cl",
                                                                      channels_last=not gpu)
        best = None
        if opt_in != "none":
            extra = {"channels_last": gpu, "compile": "compile" in opt_in,
                     "tiny_vae": "tiny" if "tiny-vae" in opt_in else None}
            best = stage(args, work, captions, "opt-in", **extra)
    device = torch.cuda.get_device_name(args.device) if gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device}; preset {args.preset}, {args.n_images} images, batch {args.batch_size}, "
          f"{args.steps} DPM-Solver++ steps, guidance 7.5, {args.size} px, {args.dtype}")
    print(f"plain pipeline:            {plain:10.3f} images/s")
    print(f"this stage:                {ours:10.3f} images/s   ratio {ours / plain:.3f} (stage / plain; "
          "includes JPEG encoding and shard writing)")
    for name, rate in breakdown.items():  # channels_last is on for the lines above on a GPU, off on the CPU
        print(f"breakdown: {name + ':':<40} {rate:10.3f} images/s   ratio {rate / plain:.3f}")
    if best is not None:
        print(f"opt-in ({opt_in}):{' ' * max(1, 17 - len(opt_in))}{best:10.3f} images/s   ratio {best / plain:.3f} "
              "(tiny VAE changes the images)")


if __name__ == "__main__":
    main()
