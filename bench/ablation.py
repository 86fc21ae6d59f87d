"""The paper's ablation on the toy world as an experiment: arms x defect levels x seeds, with intervals.

    python bench/ablation.py run                      # every arm still missing, in priority order (hours on 2 cores)
    python bench/ablation.py run --levels defective --seeds 5 --processes 2
    python bench/ablation.py report                   # tables, bench/results/ablation.json, docs/ablation.png
    python bench/ablation.py plan                     # what would run, and what is done

Levels (pipeline presets, docs/toyworld.md#defect-levels): `faithful` (the demo's generator, 10 steps),
`defective` (2 steps: details wrong, layout right), `wrong30` (the faithful generator, 30% of the captions
given another caption's image). Every level trains with CXE's w = "auto" (1 / the median CLIP score of its
training pairs), so each world's median pair sits at the cap.

Arms: base, +PCM, +CXE, PCM+CXE (the paper's table), and two controls that separate mechanism from side
effect: `uniform` (PCM+CXE, but every pair weighs CXE's mean weight: is it the per-pair weighting or the
smaller loss?) and, on wrong30, `drop30` (PCM, no CXE, a random 70% of the pairs: does CXE beat having
less data?). Ingest, synthesize and encode are shared by the arms of a level.

Resumable in pieces: every arm is a cached train + evaluate stage under `--work`, and a finished arm's
record (metrics, per-image CIDEr, attributes, CXE weights, the commit) is written to
`bench/results/ablation/<level>/<arm>/seed-<n>.json`, which a rerun skips. Kill it at any moment.

Statistics (report): per arm the mean and sd of CIDEr over seeds and a 95% interval from a two-level
bootstrap (seeds, then the 300 test images, resampled together); per comparison with base the mean
difference paired by seed and image, its interval, and the smallest effect the comparison could have
detected (80% power at alpha 0.05: 2.8 x the bootstrap standard error). Per-image CIDEr-D keeps the
corpus idf of the full test set (the bootstrap resamples the images' scores, not the idf).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = ROOT / "bench" / "results"
RECORDS = RESULTS / "ablation"
PLOT = ROOT / "docs" / "ablation.png"

# level -> (pipeline preset, overrides shared by its arms)
LEVELS = {"defective": ("demo-defective", {}),
          "wrong30": ("demo-wrong30", {}),
          "faithful": ("demo", {"train.cxe_w": "auto"})}
NO_PCM = {"train.model": {"pcm": False}}
ARMS = {"base": NO_PCM | {"train.cxe": False},
        "+PCM": {"train.cxe": False},
        "+CXE": NO_PCM,
        "PCM+CXE": {},
        "uniform": {"train.cxe_uniform": True},
        "drop30": {"train.cxe": False, "train.data_fraction": 0.7}}
PAPER = {"base": 108.9, "+PCM": 111.6, "+CXE": 112.0, "PCM+CXE": 113.6}  # COCO ViT-L/14 CIDEr (PCM-NET.md)
# Which arms run on which level, in the order they are worth running.
ARMS_OF = {"defective": ["base", "+PCM", "+CXE", "PCM+CXE", "uniform"],
           "wrong30": ["base", "+PCM", "+CXE", "PCM+CXE", "drop30", "uniform"],
           "faithful": ["base", "+PCM", "+CXE", "PCM+CXE"]}
BOOTSTRAP = 2000


def record_path(level: str, arm: str, seed: int) -> Path:
    return RECORDS / level / arm.replace("+", "plus-") / f"seed-{seed}.json"


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_arm(job: tuple[str, str, int, str]) -> dict:
    """Train and evaluate one (level, arm, seed), reusing every finished stage; write its record last."""
    level, arm, seed, root = job
    import torch

    torch.set_num_threads(1)
    from pcm.stages.pipeline import resolve, run_pipeline
    from pcm.toyworld.score import attribute_accuracy
    from storage import manifests
    from storage.atomic import read_json, write_json
    from storage.layout import StageDir

    preset, shared = LEVELS[level]
    cfg = resolve(preset, shared | ARMS[arm] | {"train.seed": seed, "train.progress_bar": False,
                                                "synthesize.progress_bar": False})
    t0 = time.monotonic()
    r = run_pipeline(cfg, root)
    ev = StageDir.at(r["evaluate"].path)
    metrics = read_json(ev.file("metrics.json"))
    per_image = manifests.PER_IMAGE.read(ev, columns=["image_id", "cider"]).to_pylist()
    rec = {"level": level, "arm": arm, "seed": seed, "preset": preset, "overrides": shared | ARMS[arm],
           "cider": metrics["metrics"]["CIDEr"] * 100, "bleu4": metrics["metrics"]["Bleu_4"] * 100,
           "control_cider": ((metrics.get("control") or {}).get("metrics") or {}).get("CIDEr", float("nan")) * 100,
           "per_image_cider": {p["image_id"]: p["cider"] * 100 for p in per_image},
           "attributes": attribute_accuracy(r["evaluate"].path, r["ingest"].path, cfg.ingest.source),
           "cxe": r["train"].extra.get("cxe", {}), "train_pairs": r["train"].counts.get("train_pairs"),
           "stages": {s: r[s].fingerprint for s in r}, "commit": commit(),
           "seconds": round(time.monotonic() - t0, 1)}
    path = record_path(level, arm, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, rec)
    print(f"[ablation] {level} {arm} seed {seed}: CIDEr {rec['cider']:.1f} ({rec['seconds']:.0f} s)", flush=True)
    return rec


def planned(levels: list[str], seeds: int) -> list[tuple[str, str, int]]:
    """Every (level, arm, seed), level by level, seed-major within a level (every arm gets seed 0 first)."""
    return [(lv, arm, s) for lv in levels for s in range(seeds) for arm in ARMS_OF[lv]]


def load_records() -> dict[tuple[str, str, int], dict]:
    from storage.atomic import read_json

    out = {}
    for p in sorted(RECORDS.glob("*/*/seed-*.json")):
        r = read_json(p)
        out[(r["level"], r["arm"], r["seed"])] = r
    return out


# ---------------------------------------------------------------------- statistics
def summarise(records: dict[tuple[str, str, int], dict]) -> dict:
    import numpy as np

    from pcm.stats import bootstrap_arms
    from pcm.toyworld.world import ATTRIBUTES

    summary: dict = {}
    for level in LEVELS:
        arms = {arm: [records[(level, arm, s)] for s in sorted(s for (lv, a, s) in records if lv == level and a == arm)]
                for arm in ARMS_OF[level]}
        arms = {a: recs for a, recs in arms.items() if recs}
        if not arms:
            continue
        images = sorted(next(iter(arms.values()))[0]["per_image_cider"])
        scores = {a: np.array([[r["per_image_cider"][i] for i in images] for r in recs]) for a, recs in arms.items()}
        stats = bootstrap_arms(scores, "base" if "base" in arms else None, n=BOOTSTRAP)
        for a, recs in arms.items():
            stats[a]["attributes"] = {k: 100 * statistics.mean(r["attributes"][k] for r in recs) for k in ATTRIBUTES}
            stats[a]["cxe_weight_mean"] = statistics.mean(r["cxe"].get("weight_mean", 1.0) for r in recs)
            stats[a]["cxe_weight_zero"] = statistics.mean(r["cxe"].get("weight_zero", 0.0) for r in recs)
            stats[a]["cxe_w"] = statistics.mean(r["cxe"].get("cxe_w", float("nan")) for r in recs)
            stats[a]["control_cider"] = statistics.mean(r["control_cider"] for r in recs)
        summary[level] = stats
    return summary


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def print_summary(summary: dict) -> None:
    from pcm.toyworld.world import ATTRIBUTES

    for level, stats in summary.items():
        rows = []
        for a, s in stats.items():
            vs = s.get("vs")
            rows.append([a, s["seeds"], s["mean"], s["sd"], f"[{s['ci95'][0]:.1f}, {s['ci95'][1]:.1f}]",
                         f"{vs['mean']:+.1f} [{vs['ci95'][0]:+.1f}, {vs['ci95'][1]:+.1f}]" if vs else "-",
                         f"{vs['detectable']:.1f}" if vs else "-", s["cxe_weight_mean"],
                         *(s["attributes"][k] for k in ATTRIBUTES)])
        print(f"\n## {level} ({LEVELS[level][0]}): CIDEr x100 on 300 drawn test scenes\n" + table(
            ["arm", "seeds", "mean", "sd", "95% CI", "vs base [95% CI]", "detectable", "mean weight", *ATTRIBUTES],
            rows))


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(4.2 * len(summary), 3.6), squeeze=False, sharey=False)
    for ax, (level, stats) in zip(axes[0], summary.items(), strict=True):
        names = list(stats)
        means = [stats[a]["mean"] for a in names]
        lo = [m - stats[a]["ci95"][0] for a, m in zip(names, means, strict=True)]
        hi = [stats[a]["ci95"][1] - m for a, m in zip(names, means, strict=True)]
        ax.errorbar(range(len(names)), means, yerr=[lo, hi], fmt="o", capsize=4, color="tab:blue")
        for x, a in enumerate(names):
            ax.scatter([x] * len(stats[a]["per_seed"]), stats[a]["per_seed"], s=8, color="gray", alpha=0.6, zorder=0)
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_title(f"{level} ({min(s['seeds'] for s in stats.values())}+ seeds)")
        ax.set_ylabel("CIDEr (300 test scenes)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Toy-world ablation: mean and 95% bootstrap interval (seeds x images); dots = seeds", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("command", choices=["run", "report", "plan"])
    ap.add_argument("--levels", default=",".join(LEVELS), help="comma-separated levels (default: all, in this order)")
    ap.add_argument("--seeds", type=int, default=5, help="training seeds per arm (default 5)")
    ap.add_argument("--processes", type=int, default=1, help="arms trained side by side, one core each")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "ablation", help="run root (stages reused)")
    ap.add_argument("--out", type=Path, default=RESULTS / "ablation.json")
    args = ap.parse_args(argv)
    levels = [lv for lv in args.levels.split(",") if lv]
    unknown = set(levels) - set(LEVELS)
    if unknown:
        ap.error(f"unknown levels {sorted(unknown)}; choose from {', '.join(LEVELS)}")

    done = load_records()
    jobs = [j for j in planned(levels, args.seeds) if j not in done]
    if args.command == "plan":
        print(f"{len(done)} arm-seeds done, {len(jobs)} to run:")
        for lv, arm, s in jobs:
            print(f"  {lv:10s} {arm:8s} seed {s}")
        return 0
    if args.command == "run":
        work = str(args.work.resolve())
        print(f"[ablation] {len(jobs)} arm-seeds to run under {work} ({len(done)} done)", flush=True)
        with ProcessPoolExecutor(args.processes) as pool:
            for _ in pool.map(run_arm, [(lv, arm, s, work) for lv, arm, s in jobs]):
                pass
        done = load_records()
    import torch

    summary = summarise(done)
    print_summary(summary)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "python": platform.python_version()},
              "settings": {"captions": 1500, "test_scenes": 300, "bootstrap": BOOTSTRAP,
                           "levels": {lv: {"preset": p, "overrides": o} for lv, (p, o) in LEVELS.items()},
                           "arms": ARMS, "arms_of": ARMS_OF},
              "paper_coco_vitl14": PAPER, "levels": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if summary:
        print(f"\nwrote {args.out} and {plot(summary, PLOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
