"""The paper's ablation on the toy world as an experiment: defect levels x arms x seeds, with intervals.

Levels are pipeline presets (docs/toyworld.md#defect-levels): `faithful` (the demo's generator, 10
steps), `defective` (2 steps: details wrong, layout right), `wrong30` (the faithful generator, 30% of
the captions given another caption's image). Every level trains with CXE's w = "auto" (1 / the median
CLIP score of its training pairs), so each world's median pair sits at the cap.

Arms: base, +PCM, +CXE, PCM+CXE (the paper's table) and controls that separate mechanism from side
effect: `uniform` (PCM+CXE, but every pair weighs CXE's mean weight: is it the per-pair weighting or
the smaller loss?) and, on wrong30, `drop30` (PCM without CXE on a random 70% of the pairs: does CXE
beat having less data?). On the defective levels, SynC's data step before PCM+CXE: `refine` (re-assign
and filter) and its cheap baseline `clip-filter` (the original pairs' top 90% by CLIP score). Ingest, synthesize and encode are shared by the arms of a level; every arm
is a cached train + evaluate stage, and a finished arm leaves a record (`storage.layout.experiment_record`:
metrics, per-image CIDEr, attributes, CXE weights, the commit) that later runs skip and the report reads.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.result import StageResult

# level -> (pipeline preset, overrides shared by its arms)
LEVELS: dict[str, tuple[str, dict[str, Any]]] = {
    "defective": ("demo-defective", {}),
    "wrong30": ("demo-wrong30", {}),
    "faithful": ("demo", {"train.cxe_w": "auto"}),
}
NO_PCM = {"train.model": {"pcm": False}}
ARMS: dict[str, dict[str, Any]] = {
    "base": NO_PCM | {"train.cxe": False},
    "+PCM": {"train.cxe": False},
    "+CXE": NO_PCM,
    "PCM+CXE": {},
    "uniform": {"train.cxe_uniform": True},
    "drop30": {"train.cxe": False, "train.data_fraction": 0.7},
    # SynC's data step before PCM-Net (docs/refine.md), and its cheap baseline.
    "refine": {"refine.enabled": True, "refine.method": "sync"},
    "clip-filter": {"refine.enabled": True, "refine.method": "clip-filter"},
}
# Which arms run on which level, in the order they are worth running.
ARMS_OF: dict[str, list[str]] = {
    "defective": ["base", "+PCM", "+CXE", "PCM+CXE", "refine", "clip-filter", "uniform"],
    "wrong30": ["base", "+PCM", "+CXE", "PCM+CXE", "refine", "clip-filter", "drop30", "uniform"],
    "faithful": ["base", "+PCM", "+CXE", "PCM+CXE"],
}
PAPER = {"base": 108.9, "+PCM": 111.6, "+CXE": 112.0, "PCM+CXE": 113.6}  # COCO ViT-L/14 CIDEr (PCM-NET.md)
REFERENCE_ARM = "base"
# What each arm is compared with, paired by seed and image: the paper's arms with base; the data step and the
# controls with PCM+CXE, the method they change (refine: with vs without; uniform: per-pair weights vs their
# mean; drop30: CXE vs as much less data).
COMPARED_WITH = {"+PCM": "base", "+CXE": "base", "PCM+CXE": "base", "refine": "PCM+CXE", "clip-filter": "PCM+CXE",
                 "uniform": "PCM+CXE", "drop30": "PCM+CXE"}
BOOTSTRAP = 2000


def planned(levels: list[str], seeds: int) -> list[tuple[str, str, int]]:
    """Every (level, arm, seed): the paper's arms and SynC's refine on every level first, then the controls, so a
    sweep cut short holds the comparisons the claims rest on; level by level and seed-major within each part."""
    unknown = sorted(set(levels) - set(LEVELS))
    if unknown:
        raise ValueError(f"unknown levels {unknown}; choose from {', '.join(LEVELS)}")
    first = [*PAPER, "refine"]
    return [(lv, arm, s) for part in (True, False) for lv in levels for s in range(seeds) for arm in ARMS_OF[lv]
            if (arm in first) == part]


def arm_config(level: str, arm: str, seed: int) -> Any:
    """The validated pipeline config of one arm and seed."""
    from pcm.stages.pipeline import resolve

    preset, shared = LEVELS[level]
    return resolve(preset, shared | ARMS[arm] | {"train.seed": seed, "train.progress_bar": False,
                                                 "synthesize.progress_bar": False})


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_arm(level: str, arm: str, seed: int, root: str | os.PathLike, records: str | os.PathLike) -> dict[str, Any]:
    """Train and evaluate one arm and seed under `root` (finished stages are reused), then write its record last."""
    from pcm.stages.pipeline import run_pipeline
    from pcm.toyworld.score import attribute_accuracy
    from storage import manifests
    from storage.atomic import read_json, write_json
    from storage.layout import experiment_record

    cfg = arm_config(level, arm, seed)
    t0 = time.monotonic()
    r = run_pipeline(cfg, str(root))
    ev = r["evaluate"].stage_dir
    metrics = read_json(ev.metrics)
    per_image = manifests.PER_IMAGE.read(ev, columns=["image_id", "cider"]).to_pylist()
    control = ((metrics.get("control") or {}).get("metrics") or {}).get("CIDEr", float("nan"))
    refined = refine_outcomes(r["synthesize"], r["refine"], r["ingest"]) if "refine" in r else None
    rec = {"level": level, "arm": arm, "seed": seed, "preset": LEVELS[level][0],
           "overrides": LEVELS[level][1] | ARMS[arm], "cider": metrics["metrics"]["CIDEr"] * 100,
           "bleu4": metrics["metrics"]["Bleu_4"] * 100, "control_cider": control * 100,
           "per_image_cider": {p["image_id"]: p["cider"] * 100 for p in per_image},
           "attributes": attribute_accuracy(ev, r["ingest"].stage_dir, cfg.ingest.source),
           "cxe": r["train"].extra.get("cxe", {}), "train_pairs": r["train"].counts.get("train_pairs"),
           "refine": refined,
           "stages": {s: res.fingerprint for s, res in r.items()}, "commit": _commit(),
           "seconds": round(time.monotonic() - t0, 1)}
    path = experiment_record(records, level, arm, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, rec)
    return rec


def refine_outcomes(synthesize: StageResult, refine: StageResult, captions: StageResult) -> dict[str, int]:
    """What a refine stage did with each pair, split by whether the pair was deliberately wrong
    (synthesize.wrong_image_fraction): dropped; kept on the caption's own image (for a wrong pair: repaired);
    kept on the image it had (for a wrong pair: still wrong); moved to an image made from another caption
    that states the same scene (`equivalent`, judged on the captions) or a different one (`other`)."""
    from collections import Counter

    from pcm.toyworld.counterfactual import parse
    from pcm.toyworld.faithfulness import compatible
    from storage import manifests, tables

    made_from = {r["caption_id"]: r["rendered_from"] or r["caption_id"]
                 for r in manifests.SAMPLES.read(synthesize.stage_dir).to_pylist()}
    text = {r["caption_id"]: r["text"] for r in manifests.CAPTIONS.read(captions.stage_dir).to_pylist()}
    out: Counter = Counter()
    for p in manifests.PAIRS.read(refine.stage_dir).to_pylist():
        cid = p["caption_id"]
        was = "wrong" if made_from.get(cid, cid) != cid else "right"
        source = made_from.get(p["image_caption_id"]) if p["image_caption_id"] else None
        if p["status"] != tables.STATUS_KEPT:
            now = "dropped"
        elif source == cid:
            now = "own image"
        elif p["image_caption_id"] == cid:
            now = "kept its image"
        else:
            same = source is not None and compatible(parse(text[cid]) or text[cid], parse(text[source]) or text[source])
            now = "equivalent image" if same else "other image"
        out[f"{was}: {now}"] += 1
    return dict(sorted(out.items()))


def level_faithfulness(level: str, root: str | os.PathLike) -> dict[str, Any] | None:
    """The faithfulness report (pcm.toyworld.faithfulness) of a level's synthesize stage under `root`, or None
    when that stage has not finished there (nothing is run)."""
    from pcm.stages import ingest, synthesize
    from pcm.toyworld.faithfulness import stage_report
    from storage.layout import RunLayout
    from storage.result import StageResult

    cfg = arm_config(level, ARMS_OF[level][0], 0)
    captions = ingest.plan(cfg.ingest, RunLayout(root))
    if not captions.done_marker.exists():
        return None
    images = synthesize.plan(cfg.synthesize, StageResult.load(captions.done_marker), RunLayout(root))
    return stage_report(images) if images.done_marker.exists() else None


def load_records(records: str | os.PathLike) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Every finished arm's record under `records`, by (level, arm, seed)."""
    from storage.atomic import read_json
    from storage.layout import experiment_records

    out = {}
    for p in experiment_records(records):
        r = read_json(p)
        out[(r["level"], r["arm"], r["seed"])] = r
    return out


def summarise(records: dict[tuple[str, str, int], dict[str, Any]], n_boot: int = BOOTSTRAP) -> dict[str, Any]:
    """Per level and arm: CIDEr mean, sd, 95% interval and the paired difference to base (pcm.stats), mean
    attribute accuracies, CXE's w and weights, the control score."""
    import numpy as np

    from pcm.stats import bootstrap_arms
    from pcm.toyworld.world import ATTRIBUTES

    summary: dict[str, Any] = {}
    for level in LEVELS:
        arms = {arm: [records[k] for k in sorted(k for k in records if k[:2] == (level, arm))]
                for arm in ARMS_OF[level]}
        arms = {a: recs for a, recs in arms.items() if recs}
        if not arms:
            continue
        images = sorted(next(iter(arms.values()))[0]["per_image_cider"])
        scores = {a: np.array([[r["per_image_cider"][i] for i in images] for r in recs]) for a, recs in arms.items()}
        stats = bootstrap_arms(scores, COMPARED_WITH, n=n_boot)
        for a, recs in arms.items():
            stats[a]["attributes"] = {k: 100 * statistics.mean(r["attributes"][k] for r in recs) for k in ATTRIBUTES}
            stats[a]["cxe_w"] = statistics.mean(r["cxe"].get("cxe_w", float("nan")) for r in recs)
            stats[a]["cxe_weight_mean"] = statistics.mean(r["cxe"].get("weight_mean", 1.0) for r in recs)
            stats[a]["cxe_weight_zero"] = statistics.mean(r["cxe"].get("weight_zero", 0.0) for r in recs)
            stats[a]["control_cider"] = statistics.mean(r["control_cider"] for r in recs)
        summary[level] = {"preset": LEVELS[level][0], "images": len(images), "arms": stats}
    return summary


def table_rows(level_summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per arm, formatted for a table (the bench's print and the dashboard's table artifact)."""
    from pcm.toyworld.world import ATTRIBUTES

    rows = []
    for a, s in level_summary["arms"].items():
        vs = s.get("vs")
        rows.append({"arm": a, "seeds": s["seeds"], "CIDEr": round(s["mean"], 1), "sd": round(s["sd"], 1),
                     "95% CI": f"[{s['ci95'][0]:.1f}, {s['ci95'][1]:.1f}]",
                     "compared with": vs["reference"] if vs else "-",
                     "difference [95% CI]": f"{vs['mean']:+.1f} [{vs['ci95'][0]:+.1f}, {vs['ci95'][1]:+.1f}]" if vs else "-",
                     "detectable": round(vs["detectable"], 1) if vs else "-",
                     "mean CXE weight": round(s["cxe_weight_mean"], 3),
                     **{k: round(s["attributes"][k], 1) for k in ATTRIBUTES}})
    return rows


def plot(summary: dict[str, Any], path: str | os.PathLike) -> Path:
    """Each level's arms: mean CIDEr with its 95% interval, and the seeds as dots (PNG at `path`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(max(6.0, 4.6 * len(summary)), 4.0), squeeze=False)
    for ax, (level, lv) in zip(axes[0], summary.items(), strict=True):
        stats = lv["arms"]
        names = list(stats)
        means = [stats[a]["mean"] for a in names]
        lo = [m - stats[a]["ci95"][0] for a, m in zip(names, means, strict=True)]
        hi = [stats[a]["ci95"][1] - m for a, m in zip(names, means, strict=True)]
        for x, a in enumerate(names):
            ax.scatter([x] * stats[a]["seeds"], stats[a]["per_seed"], s=9, color="gray", alpha=0.6, zorder=0)
        ax.errorbar(range(len(names)), means, yerr=[lo, hi], fmt="o", capsize=4, color="tab:blue")
        if REFERENCE_ARM in stats:
            ax.axhline(stats[REFERENCE_ARM]["mean"], color="tab:red", linestyle=":", linewidth=1, label="base")
        ax.set_xticks(range(len(names)), names, rotation=30)
        seeds = sorted({stats[a]["seeds"] for a in names})
        count = f"{seeds[0]}" + (f" to {seeds[-1]}" if len(seeds) > 1 else "")
        ax.set_title(f"{level} ({lv['preset']}), {count} seeds per arm", fontsize=9)
        ax.set_ylabel(f"CIDEr ({lv['images']} test scenes)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Toy-world ablation: mean CIDEr, 95% interval (bootstrap over seeds and images); dots: seeds",
                 fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
