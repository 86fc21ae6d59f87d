"""The toy world's quality bars, measured end to end and printed as tables (nothing here is asserted).

    python bench/toyworld.py                       # everything: ~1 hour on 2 CPU cores
    python bench/toyworld.py --seeds 1 --test 300  # a quicker pass
    python bench/toyworld.py --skip-ablation

1. Toy CLIP: image-to-caption R@1 / R@5 among 1,000 held-out drawn scenes.
2. Toy text-to-image: toy-CLIP caption-to-image R@1 among 100 images generated from held-out
   captions (chance 1%), cosine to the own caption minus to the others, a real-vs-generated grid.
3. The pipeline on the toy world (the demo preset's models and settings, on a dataset with
   `--test` drawn test scenes): CIDEr of PCM-Net trained on toy-diffusion images, beside
   (a) the same captions scored against other images' references, (b) a model trained on images
   shuffled across captions, and (c) the oracle arm trained on the scenes' own drawings.
4. The paper's ablation: base, +PCM, +CXE, PCM+CXE, `--seeds` seeds each: mean and spread of
   CIDEr and per-attribute accuracy (sky, ground, kinds, colours, count, all) from the scene records.
5. `--parity`: the paper's equation (PCM+CXE) beside the release's numerics (`train.parity=release`),
   `--seeds` seeds each.

Writes bench/results/toyworld.json (every figure, the machine, the versions) unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ABLATION = {"base": {"train.model": {"pcm": False}, "train.cxe": False},
            "+PCM": {"train.cxe": False},
            "+CXE": {"train.model": {"pcm": False}},
            "PCM+CXE": {}}


def run_arm(args: tuple[str, dict, str, str]) -> dict:
    """One train + evaluate run of the demo preset with overrides; returns its metrics and attributes."""
    name, overrides, root, dataset = args
    import torch

    torch.set_num_threads(1)
    from pcm.stages.pipeline import resolve, run_pipeline
    from pcm.toyworld.score import attribute_accuracy
    from storage.atomic import read_json

    cfg = resolve("demo", overrides)
    t0 = time.monotonic()
    r = run_pipeline(cfg, root)
    metrics = read_json(r["evaluate"].stage_dir.metrics)
    return {"arm": name, "overrides": overrides, "cider": metrics["metrics"]["CIDEr"] * 100,
            "bleu4": metrics["metrics"]["Bleu_4"] * 100,
            "control_cider": (metrics.get("control") or {}).get("metrics", {}).get("CIDEr", float("nan")) * 100,
            "attributes": attribute_accuracy(r["evaluate"].stage_dir, r["ingest"].stage_dir, dataset),
            "train": r["train"].path, "evaluate": r["evaluate"].path, "seconds": round(time.monotonic() - t0, 1)}


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-toyworld"), help="run root and dataset (reused)")
    ap.add_argument("--captions", type=int, default=3000, help="training captions (all synthesised)")
    ap.add_argument("--test", type=int, default=1000, help="drawn test scenes")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per ablation arm")
    ap.add_argument("--processes", type=int, default=2, help="arms trained side by side (one core each)")
    ap.add_argument("--skip-models", action="store_true", help="skip the toy-model bars (1, 2)")
    ap.add_argument("--skip-ablation", action="store_true", help="skip the ablation (4)")
    ap.add_argument("--parity", action="store_true", help="paper vs release numerics (5)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every arm")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "toyworld.json")
    args = ap.parse_args(argv)

    import torch

    from pcm.stages.pipeline import parse_assignments, resolve, run_pipeline
    from pcm.toyworld.dataset import DATASET_FILE, SHIPPED_MODELS, build

    torch.set_num_threads(2)
    report: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                "torch": torch.__version__, "python": platform.python_version()},
                    "settings": {"captions": args.captions, "test": args.test, "seeds": args.seeds}}
    t_start = time.monotonic()

    # 1-2. The toy models.
    if not args.skip_models:
        from pcm.toyworld.quality import activation_mismatch, clip_retrieval, t2i_quality

        grid = Path(__file__).resolve().parents[1] / "docs" / "toyworld-real-vs-generated.png"
        report["clip"] = clip_retrieval(SHIPPED_MODELS / "clip")
        # The QuickGELU bug in miniature: the GELU-trained toy CLIP run with the other activation.
        report["clip_wrong_activation"] = activation_mismatch(SHIPPED_MODELS / "clip")
        report["t2i"] = t2i_quality(SHIPPED_MODELS / "t2i", SHIPPED_MODELS / "clip", grid=grid)
        c, t = report["clip"], report["t2i"]
        print("\n## Toy models\n" + table(
            ["bar", "measured", "aim"],
            [["CLIP image->caption R@1 (1,000 held-out scenes), %", 100 * c["image_to_caption_r1"], ">= 40"],
             ["CLIP image->caption R@5, %", 100 * c["image_to_caption_r5"], "-"],
             ["  run with QuickGELU instead of its GELU: R@1, %", 100 * report["clip_wrong_activation"]["r1_quick_gelu"],
              "-"],
             ["  ... image / text feature cosine to the right one",
              f"{report['clip_wrong_activation']['image_cos']:.5f} / {report['clip_wrong_activation']['text_cos']:.5f}",
              "-"],
             ["T2I caption->image R@1 among 100 generated (chance 1%), %", 100 * t["caption_to_image_r1"], ">= 20"],
             ["T2I caption->image R@5, %", 100 * t["caption_to_image_r5"], "-"],
             ["T2I cos(own caption) - cos(other captions)", t["cos_own_minus_other"], "> 0"],
             ["cos(caption, generated) / cos(caption, real drawing)",
              f"{t['cos_own_generated']:.3f} / {t['cos_own_real_drawing']:.3f}", "-"]]), flush=True)
        print(f"grid: {grid}", flush=True)

    # 3-4. The pipeline: one dataset with the oracle's drawings, synthesis and encoding shared by every arm.
    work = args.work.resolve()
    data = work / "data"
    if not (data / DATASET_FILE).exists():
        build(data, n_captions=args.captions, n_val=100, n_test=args.test, train_images=True)
    dataset = str(data / DATASET_FILE)
    base = {"ingest.source": dataset, "ingest.subset": None, "encode.images_root": str(data)} | \
        parse_assignments(args.extra)
    root = str(work / "runs")
    t0 = time.monotonic()
    shared = run_pipeline(resolve("demo", base), root, stages=("ingest", "synthesize", "encode"))
    report["shared_stages_s"] = round(time.monotonic() - t0, 1)
    report["synthesize"] = shared["synthesize"].counts | shared["synthesize"].timings

    arms = [(f"PCM+CXE seed {s}" if s else "grounded", base | {"train.seed": s}, root, dataset)
            for s in range(1 if args.skip_ablation else args.seeds)]
    arms += [("images shuffled across captions", base | {"train.shuffle_images": True}, root, dataset),
             ("oracle: trained on the drawings", base | {"synthesize.paired_images": str(data)}, root, dataset)]
    if not args.skip_ablation:
        arms += [(f"{name} seed {s}", base | o | {"train.seed": s}, root, dataset)
                 for name, o in ABLATION.items() if name != "PCM+CXE" for s in range(args.seeds)]
    if args.parity:
        arms += [(f"PCM+CXE seed {s}", base | {"train.seed": s}, root, dataset) for s in range(1, args.seeds)
                 if args.skip_ablation]
        arms += [(f"release seed {s}", base | {"train.parity": "release", "train.seed": s}, root, dataset)
                 for s in range(args.seeds)]
    with ProcessPoolExecutor(args.processes) as pool:
        results = list(pool.map(run_arm, arms))
    by_name = {r["arm"]: r for r in results}
    report["arms"] = results

    g = by_name["grounded"]
    rows = [["PCM-Net on toy-diffusion images", g["cider"], 100 * g["attributes"]["all"]],
            ["  same captions, other images' references", g["control_cider"], "-"],
            ["images shuffled across captions (trained so)", by_name["images shuffled across captions"]["cider"],
             100 * by_name["images shuffled across captions"]["attributes"]["all"]],
            ["oracle: trained on the drawings", by_name["oracle: trained on the drawings"]["cider"],
             100 * by_name["oracle: trained on the drawings"]["attributes"]["all"]]]
    print(f"\n## The pipeline on the toy world ({args.test} drawn test scenes, CIDEr x100)\n"
          + table(["arm", "CIDEr", "all attributes right, %"], rows))
    print(f"grounded / language-only control: {g['cider'] / max(g['control_cider'], 1e-9):.2f}x (aim >= 1.5x, "
          f"CIDEr >= 60)")

    if not args.skip_ablation:
        from pcm.toyworld.world import ATTRIBUTES

        summary = {}
        for name in ABLATION:
            runs = [by_name["grounded" if name == "PCM+CXE" and s == 0 else f"{name} seed {s}"]
                    for s in range(args.seeds)]
            ciders = [r["cider"] for r in runs]
            summary[name] = {"cider_mean": statistics.mean(ciders),
                             "cider_sd": statistics.stdev(ciders) if len(ciders) > 1 else 0.0,
                             **{a: statistics.mean(100 * r["attributes"][a] for r in runs) for a in ATTRIBUTES}}
        report["ablation"] = summary
        print(f"\n## Ablation ({args.seeds} seeds per arm; CIDEr mean +- sd; attribute accuracy %, mean)\n" + table(
            ["arm", "CIDEr", "sd", *ATTRIBUTES],
            [[n, s["cider_mean"], s["cider_sd"], *(s[a] for a in ATTRIBUTES)] for n, s in summary.items()]))

    if args.parity:
        from pcm.toyworld.world import ATTRIBUTES

        def seeds_of(name: str) -> list[dict]:
            return [by_name["grounded" if name == "PCM+CXE" and s == 0 else f"{name} seed {s}"]
                    for s in range(args.seeds)]

        parity = {}
        for name in ("PCM+CXE", "release"):
            ciders = [r["cider"] for r in seeds_of(name)]
            parity[name] = {"cider": ciders, "cider_mean": statistics.mean(ciders),
                            "cider_sd": statistics.stdev(ciders) if len(ciders) > 1 else 0.0,
                            **{a: statistics.mean(100 * r["attributes"][a] for r in seeds_of(name))
                               for a in ATTRIBUTES}}
        report["parity"] = parity
        print(f"\n## Paper vs release numerics ({args.seeds} seeds; CIDEr mean +- sd; attribute accuracy %)\n"
              + table(["numerics", "CIDEr", "sd", *ATTRIBUTES],
                      [["paper (PCM+CXE)" if n == "PCM+CXE" else "release", s["cider_mean"], s["cider_sd"],
                        *(s[a] for a in ATTRIBUTES)] for n, s in parity.items()]))

    report["total_s"] = round(time.monotonic() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out} ({report['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
