"""Benchmark the encode stage: open_clip model-only image throughput vs the stage end to end from JPEG shards.

    python bench/encode.py --preset tiny --device cpu                 # CPU smoke run, < 1 minute
    python bench/encode.py --preset vit-l-14 --device cuda --batch-size 256 --n-images 8192 --workers 16

Both numbers come from one process on one device, with the same batch size and precision. The
end-to-end run writes its own synthetic JPEG shards (random smooth images of a realistic size and
file size) and runs `run_encode` on them: JPEG decode and preprocessing in DataLoader workers, CLIP
image + caption encoding, feature/score writing. Random CLIP weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {  # name -> (ClipSpec fields, synthetic image side in px)
    "tiny": ({"model": "tiny"}, 64),
    "tiny-l14": ({"model": "tiny-l14"}, 64),
    "vit-b-32": ({"model": "ViT-B-32", "pretrained": None}, 512),
    "vit-l-14": ({"model": "ViT-L-14", "pretrained": None, "pool": 8}, 512),
}
CAPTIONS = ["a man riding a horse on a beach", "two dogs playing in the grass", "a plate of food on a table",
            "a red bus driving down a city street", "a cat sleeping on a couch next to a laptop"]


def jpeg_pool(side: int, n: int = 32) -> list[bytes]:
    """Smooth random images (upsampled noise) compress and decode like photos, unlike raw noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize((side, side), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_inputs(root: Path, n_images: int, side: int, shard_size: int) -> tuple[str, str]:
    """A finished ingest-like and synthesize-like stage directory, written through the storage layer."""
    from pcm.stages.contract import finish
    from storage import manifests
    from storage.layout import RunLayout
    from storage.shards import ShardWriter

    layout = RunLayout(root)
    cap = layout.stage("ingest", "0" * 16)
    cap.path.mkdir(parents=True, exist_ok=True)
    ids = [f"c{i:07d}" for i in range(n_images)]
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(n_images)]
    rows = [{"caption_id": c, "image_id": c, "split": "train", "text": t, "raw_text": t, "source": "bench",
             "image_path": None, "references": None, "status": "ok", "error": None} for c, t in zip(ids, texts, strict=True)]
    manifests.CAPTIONS.write(cap, rows)
    finish(cap, {"captions": n_images}, time.monotonic())
    syn = layout.stage("synthesize", "1" * 16)
    pool = jpeg_pool(side)
    for s, start in enumerate(range(0, n_images, shard_size)):
        with ShardWriter(syn.shard_file("shards", s, "tar")) as w:
            for i in range(start, min(start + shard_size, n_images)):
                w.write({"__key__": ids[i], "jpg": pool[i % len(pool)], "txt": texts[i], "json": json.dumps({})})
    finish(syn, {"images": n_images}, time.monotonic())
    return str(cap.path), str(syn.path)


def model_only(spec, device: str, batch_size: int, n_images: int) -> float:
    """open_clip's encode_image on random tensors: the ceiling the stage can reach."""
    import torch

    from pcm.clip import load_clip

    clip = load_clip(spec, device)
    side = clip.model.visual.image_size[0]
    x = torch.randn(batch_size, 3, side, side, device=device).to(clip.dtype)
    steps = max(1, n_images // batch_size)
    with torch.inference_mode():
        for _ in range(3):  # warm-up: kernels, allocator
            clip.model.encode_image(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            clip.model.encode_image(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    ap.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                    help="default: fp16 on a GPU, fp32 on the CPU")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--n-images", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--shard-size", type=int, default=None,
                    help="images per synthetic shard; default: at most 1000, and small enough that every worker gets "
                    "two shards (a worker decodes one shard at a time: with fewer shards than workers, some idle)")
    ap.add_argument("--image-size", type=int, default=None, help="side of the synthetic JPEGs (default per preset)")
    args = ap.parse_args()
    args.shard_size = args.shard_size or max(1, min(1000, math.ceil(args.n_images / (2 * max(1, args.workers)))))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from pcm.clip import ClipSpec
    from pcm.device import resolve_device
    from pcm.stages.contract import as_result
    from pcm.stages.encode import EncodeConfig, run_encode
    from storage.layout import RunLayout

    device = resolve_device(args.device)
    fields, side = PRESETS[args.preset]
    precision = args.precision or ("fp16" if device.startswith("cuda") else "fp32")
    spec = ClipSpec(**fields, precision=precision)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; clip {spec.model} {precision} pool={spec.pool}; batch {args.batch_size}; "
          f"workers {args.workers}; {args.n_images} images of {args.image_size or side} px in "
          f"{math.ceil(args.n_images / args.shard_size)} shards", flush=True)

    ceiling = model_only(spec, device, args.batch_size, args.n_images)
    print(f"model-only: {ceiling:,.1f} images/s (open_clip encode_image on random tensors)", flush=True)

    with tempfile.TemporaryDirectory(prefix="pcm-bench-encode-") as tmp:
        cap, syn = write_inputs(Path(tmp), args.n_images, args.image_size or side, args.shard_size)
        config = EncodeConfig(clip=spec, device=device, batch_size=args.batch_size, num_workers=args.workers,
                              min_count=1, top_n=50, progress_bar=False)
        result = run_encode(config, as_result(cap), as_result(syn), RunLayout(Path(tmp) / "runs"))
        e2e = result.timings["images_per_s"]
    print(f"end-to-end: {e2e:,.1f} images/s (run_encode from JPEG shards: decode + preprocess in workers, "
          f"CLIP image + caption, feature and score files)")
    print(f"ratio: {e2e / ceiling:.2f} (end-to-end / model-only)")


if __name__ == "__main__":
    main()
